"""dashboards/report.py end to end: real MLflow runs logged with the project's own loggers (a curriculum with two
stages and a checkpoint, a summarization comparison, a benchmark run) -> one self-contained HTML report per
selection, logged back to MLflow -> opened in headless Chromium, where every picture must decode and show something
(a screenshot of each, not only the HTML text).

Chromium: /usr/bin/chromium (Debian's `chromium`, which .ci/run installs) or $CHROMIUM_PATH, driven by the
`playwright` package. Without it the browser test is skipped, or fails when CONDENSATION_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from condensation.evaluate import LossCurve, PasskeyGrid, log_loss_curves, log_passkey_grid, rouge_by_length
from condensation.evaluate.tracking import MODEL_TAG, log_rouge
from condensation.report import add_attention_maps, build_report, comparison_table, log_report, select_runs
from condensation.report.browser import find_chromium, open_page, screenshot
from condensation.report.runs import REPORT_TAG

ROOT = Path(__file__).resolve().parents[1]


def load_command():
    spec = importlib.util.spec_from_file_location("dashboards_report", ROOT / "dashboards" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def grid(acc: float, lengths=(96, 192)) -> PasskeyGrid:
    shape = (len(lengths), 3)
    return PasskeyGrid(list(lengths), [0.0, 0.5, 1.0], np.full(shape, acc), np.full(shape, min(1.0, acc + 0.2)),
                       np.full(shape, 4))


def curve(name: str, base: float) -> LossCurve:
    bins = [base + 1.0 / (1 + b) for b in range(4)]
    return LossCurve(name=name, length=256, bin_tokens=64, bin_loss=bins, bin_count=[63, 64, 64, 64], tokens=255,
                     loss=float(np.mean(bins)), window_loss=[float(np.mean(bins))] * 2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three experiments as the workloads leave them. Returns (uri, client, ids)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    ids = {}

    # a curriculum: parent + two stages (loss curves, passkey grids, the second with an exported checkpoint)
    exp = client.create_experiment("condensation", artifact_location=str(tmp / "artifacts"))
    old = client.create_run(exp, run_name="passkey-old", tags={"curriculum": "passkey-old"}).info.run_id
    parent = client.create_run(exp, run_name="passkey-cpu", tags={"curriculum": "passkey-cpu"}).info.run_id
    client.log_param(parent, "stages", "2")
    from condensation import CondensationForCausalLM
    from condensation.sizes import build_config

    torch.manual_seed(0)
    hf = tmp / "stage1-hf"
    CondensationForCausalLM(build_config("tiny-cpu", segment_length=32)).save_pretrained(hf)
    for k, (length, lr) in enumerate([(96, 1e-3), (192, 5e-4)]):
        tags = {"mlflow.parentRunId": parent, "stage": f"{k}: {length}", **({"hf_path": str(hf)} if k else {})}
        child = client.create_run(exp, run_name=f"passkey-cpu-stage{k}-{length}", tags=tags).info.run_id
        for name, value in [("data.seq_len", length), ("optim.lr", lr), ("model.size", "tiny-cpu")]:
            client.log_param(child, name, value)
        for step in range(0, 100, 10):
            client.log_metric(child, "loss", 6.0 / (1 + step / 10) + k, step=step)
        log_passkey_grid(grid(0.5 + 0.5 * k), run_id=child, tracking_uri=uri, trained_length=length, plot=False)
        client.set_terminated(child)
        ids[f"stage{k}"] = child
    log_loss_curves([curve("final", 2.0), curve("start", 3.0)], run_id=parent, tracking_uri=uri, metrics=False,
                    plot=False)
    client.set_terminated(parent)
    ids.update(parent=parent, old=old)

    # a summarization comparison: a parent and two model runs with ROUGE by input length
    exp = client.create_experiment("summarization", artifact_location=str(tmp / "artifacts"))
    sp = client.create_run(exp, run_name="summarize-cpu").info.run_id
    refs = ["the cat sat on the mat today", "a dog ran in the park", "rain falls on the plain in spain"]
    for model, preds in [("condensation", ["the cat sat on a mat", "a dog ran", "rain falls on spain"]),
                         ("instruct_zero_shot", ["cat", "the park", "spain"])]:
        run = client.create_run(exp, run_name=model, tags={"mlflow.parentRunId": sp, MODEL_TAG: model}).info.run_id
        log_rouge(rouge_by_length(preds, refs, [300, 700, 1500]), label=model, run_id=run, tracking_uri=uri)
    ids["summarize"] = sp

    # a benchmark run as workloads/benchmark.py --mlflow-uri logs it: <case>/<metric> at step = length
    exp = client.create_experiment("benchmark", artifact_location=str(tmp / "artifacts"))
    bench = client.create_run(exp, run_name="h200").info.run_id
    for case, mem, tps in [("llama-sdpa", 8.0, 170e3), ("cond-sdpa-l512", 3.0, 30e3)]:
        for i, length in enumerate([4096, 8192, 16384]):
            client.log_metric(bench, f"{case}/peak_gib", mem * 2**i, step=length)
            client.log_metric(bench, f"{case}/tokens_per_s", tps / (1 + i * (case == "llama-sdpa")), step=length)
    ids["bench"] = bench
    return uri, client, ids


@pytest.fixture(scope="module")
def everything(store, tmp_path_factory):
    """One report over all three experiments (the curriculum with its attention maps): (runs, report, html path)."""
    uri, client, ids = store
    add_attention_maps(client, client.get_run(ids["stage1"]))
    runs = select_runs(client, None, [ids["parent"], ids["summarize"], ids["bench"]])
    report = build_report(client, runs, title="everything")
    return runs, report, report.write(tmp_path_factory.mktemp("report") / "all.html")


def test_select_runs_and_comparison_table(store):
    uri, client, ids = store
    runs = select_runs(client, "condensation")  # the newest curriculum, with its stages
    assert [r.info.run_id for r in runs] == [ids["parent"], ids["stage0"], ids["stage1"]]
    assert [r.info.run_id for r in select_runs(client, "condensation", ["passkey-old"])] == [ids["old"]]
    assert len(select_runs(client, "condensation", all_runs=True)) == 4
    with pytest.raises(ValueError, match="no run 'nope'"):
        select_runs(client, "condensation", ["nope"])

    header, rows, notes = comparison_table(runs[1:])
    # the params that differ between the stages are columns; the equal one is named in a note
    assert "data.seq_len" in header and "optim.lr" in header and "model.size" not in header
    assert any("model.size=tiny-cpu" in n for n in notes)
    col = header.index("passkey/exact/mean")
    assert [r[col] for r in rows] == [0.5, 1.0]
    assert not any("depth_" in h for h in header)  # per-cell metrics stay in the pictures


def test_report_command_logs_to_parent_and_comparison_run(store, everything, tmp_path, capsys):
    uri, client, ids = store
    command = load_command()
    out = command.main(["--tracking-uri", uri, "--experiment", "condensation", "--attention",
                        "--out", str(tmp_path / "curriculum.html")])
    page = out.read_text()
    for title in ("Runs", "Training loss", "Passkey retrieval", "Loss by token position",
                  "Attention between consecutive segments"):
        assert f">{title}</h2>" in page
    assert "Summarization" not in page and "Memory and speed" not in page  # nothing of theirs in this curriculum
    assert 'src="data:image/png;base64,' in page and 'src="http' not in page and "<script" not in page
    # the attention maps were computed from the stage's checkpoint (the only run with one) and logged into that run
    assert capsys.readouterr().out.count("attention maps logged into") == 1
    arts = {a.path for a in client.list_artifacts(ids["stage1"], "attention")}
    assert {"attention/attention_maps.npz", "attention/attention_maps.png"} <= arts
    assert [a.path for a in client.list_artifacts(ids["parent"], "report")] == ["report/curriculum.html"]

    # a comparison across experiments: a new run `report` holds it, and later reports leave it out
    runs, report, path = everything
    assert [s.title for s in report.sections] == [
        "Runs", "Training loss", "Passkey retrieval", "Summarization: ROUGE by input length", "Memory and speed",
        "Loss by token position", "Attention between consecutive segments"]
    run_id = log_report(client, path, runs)
    assert run_id not in {r.info.run_id for r in runs} and client.get_run(run_id).data.tags[REPORT_TAG] == "true"
    assert run_id not in {r.info.run_id for r in select_runs(client, "condensation", all_runs=True)}
    assert "instruct_zero_shot" in report.html and "cond-sdpa-l512" in report.html


def browser() -> str:
    """The chromium to use; skip, or fail in CI (CONDENSATION_REQUIRE_BROWSER=1), when it or playwright is missing."""
    chromium = find_chromium(os.environ.get("CHROMIUM_PATH"))
    why = "no chromium (apt-get install chromium, or set CHROMIUM_PATH)" if chromium is None else None
    if importlib.util.find_spec("playwright") is None:
        why = "the playwright package is missing (pip install -e '.[test]')"
    if why:
        if os.environ.get("CONDENSATION_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CONDENSATION_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return chromium


def rendered_images(page) -> list[dict]:
    return page.evaluate("""() => Array.from(document.images).map((img, i) => ({
        i, alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
        shown: img.getBoundingClientRect().width}))""")


def pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")[..., :3]


def test_report_renders_in_chromium(everything, tmp_path):
    chromium = browser()
    runs, report, path = everything
    broken = tmp_path / "broken.html"  # negative control: a picture that does not decode must be caught
    broken.write_text('<html><body><img alt="bad" src="data:image/png;base64,iVBORw0KGgoAAAA="></body></html>')

    with open_page(path, chromium, width=1300) as page:
        images = rendered_images(page)
        assert len(images) == report.images >= 9
        for im in images:
            assert im["complete"] and im["w"] > 100 and im["h"] > 100 and im["shown"] > 100, im
        # each picture as the browser draws it: not blank (a white or one-colour box would have no spread)
        for k, handle in enumerate(page.query_selector_all("img")):
            shot = pixels(handle.screenshot())
            assert shot.std() > 0.05 and (shot.min(-1) < 0.9).mean() > 0.01, images[k]["alt"]
        page.goto(broken.as_uri())
        assert [(im["w"], im["h"]) for im in rendered_images(page)] == [(0, 0)]

    # the whole page as the README's picture is made: tables and pictures, top to bottom
    shot = pixels(screenshot(path, tmp_path / "page.png", chromium).read_bytes())
    assert shot.shape[0] > 2000 and shot.std() > 0.1


def test_command_refuses_a_missing_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = load_command()
    uri, experiment = command.default_store()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    with pytest.raises(SystemExit, match="no MLflow store at .*runs/mlflow.db"):
        command.main([])
    assert not list(tmp_path.rglob("mlflow.db")) and not (tmp_path / "mlruns").exists()  # nothing created
