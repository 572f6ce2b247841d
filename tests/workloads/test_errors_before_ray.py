"""A new user's mistakes end in one line `config error: <field>: ...` (exit 2) before Ray starts (issue 17)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _workload(name):
    spec = importlib.util.spec_from_file_location(f"workload_{name}", os.path.join(ROOT, "workloads", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def boom(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", boom)
    was = ray.is_initialized()
    yield
    assert ray.is_initialized() == was


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "body.jsonl"
    text.write_text("\n".join(json.dumps({"id": i, "body": "hello world " * 50}) for i in range(4)) + "\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello world " * 50}) + "\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("schedule:\n  total_steps: [3\n")
    return {"body": str(text), "good": str(good), "bad_yaml": str(bad_yaml), "tmp": str(tmp_path)}


PRETRAIN_CASES = [
    (["data.source={tmp}/nonexistent.jsonl"], "data.source", "no such file"),
    (["--preset", "debug", "data.source={good}"], "data.tokenizer", "more than the model's vocab_size 512"),
    (["--config", "{tmp}/nonexistent.yaml"], "--config", "no such file"),
    (["--config", "{bad_yaml}"], "--config", "not valid YAML at line 3"),
    (["data.source=local", "data.dataset_options.path={tmp}/x.jsonl"], "data.dataset_options.path", "takes no"),
    (["data.source={body}"], "data.dataset_options.text_field",
     "has no field 'text' (its fields: ['id', 'body']); name the text field, e.g. data.dataset_options.text_field=body"),
]


@pytest.mark.parametrize("argv, field, text", PRETRAIN_CASES, ids=[c[1] + ":" + c[2][:20] for c in PRETRAIN_CASES])
def test_pretrain_errors_are_one_line_before_ray(argv, field, text, files, no_ray, capsys, tmp_path):
    argv = [a.format(**files) for a in argv] + [f"run.storage={tmp_path}/runs"]
    assert _workload("pretrain").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: {field}: ") and "\n" not in err, err
    assert text in err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("argv, field", [
    (["stages.0.steps=abc"], "stages.0.steps"),
    (["--config", "{tmp}/nonexistent.yaml"], "--config"),
    (["--config", "{bad_yaml}"], "--config"),
])
def test_curriculum_errors_are_one_line_before_ray(argv, field, files, no_ray, capsys):
    assert _workload("curriculum").main([a.format(**files) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: {field}: ") and "\n" not in err, err


def test_error_from_the_command_line_has_no_traceback(files):
    """The real entry point (a process of its own): exit 2, stderr exactly one line, no Ray."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "workloads", "pretrain.py"), f"data.source={files['body']}"],
                         capture_output=True, text=True, timeout=180, cwd=files["tmp"])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]  # deepspeed's import notice
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("config error: data.dataset_options.text_field: ")
    assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stderr + out.stdout
