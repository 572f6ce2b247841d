"""MLflow bookkeeping a new user sees (issue 17): experiments filed as model training, runs stopped from outside
end KILLED (and run again, RUNNING)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from condensation.config import load_config, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(tmp_path, *overrides):
    return resolve(load_config(overrides=[f"run.storage={tmp_path}", "run.name=r", *overrides]))


def test_experiment_is_a_model_training_experiment(tmp_path):
    from mlflow import MlflowClient

    from condensation.curriculum import ensure_parent_run, load_curriculum_config
    from condensation.train.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_run, tracking_uri

    cfg = _cfg(tmp_path)
    ensure_run(cfg)
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # an experiment made elsewhere without a kind gets it; one with a kind keeps the user's
    other = _cfg(tmp_path, "tracking.experiment=mine", "run.name=r2")
    client.create_experiment("mine")
    ensure_run(other)
    assert client.get_experiment_by_name("mine").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    ensure_run(_cfg(tmp_path, "tracking.experiment=genai", "run.name=r3"))
    assert client.get_experiment_by_name("genai").tags[EXPERIMENT_KIND_TAG] == "genai_development"

    cur = load_curriculum_config("debug", overrides=[f"train.run.storage={tmp_path / 'cur'}"])
    ensure_parent_run(cur)
    exp = MlflowClient(f"sqlite:///{tmp_path / 'cur'}/mlflow.db").get_experiment_by_name(cur.train.tracking.experiment)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_end_run_marks_a_running_run_killed_and_a_restart_running(tmp_path):
    from mlflow import MlflowClient

    from condensation.train.tracking import MlflowLogger, end_run, ensure_run, tracking_uri

    cfg = _cfg(tmp_path)
    run_id = ensure_run(cfg)
    client = MlflowClient(tracking_uri(cfg))
    assert client.get_run(run_id).info.status == "RUNNING"
    assert end_run(cfg, "KILLED") == run_id
    assert client.get_run(run_id).info.status == "KILLED"
    assert end_run(cfg, "KILLED") is None  # only a RUNNING run is ended
    MlflowLogger(tracking_uri(cfg), ensure_run(cfg))  # what rank 0 does when the run starts again
    assert client.get_run(run_id).info.status == "RUNNING"
    assert end_run(_cfg(tmp_path, "run.name=never-ran")) is None


@pytest.mark.slow
def test_ctrl_c_ends_the_mlflow_run_killed(tmp_path):
    """SIGINT to `workloads/pretrain.py` mid-training: exit 130, the MLflow run KILLED, not RUNNING forever."""
    from mlflow import MlflowClient

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "workloads", "pretrain.py"), "--preset", "debug", f"run.storage={tmp_path}",
         "run.name=stopped", "schedule.total_steps=400", "checkpoint.every=0", "data.seq_len=64", "data.num_rows=16"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    lines = []
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            lines.append(line)
            if "[condensation.train] step 2/" in line:
                break
            assert time.time() < deadline, "".join(lines[-40:])
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out[-4000:]
    assert "interrupted; the same command continues run 'stopped'" in out
    run_id = open(tmp_path / "stopped" / "mlflow_run_id").read().strip()
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"


def test_curriculum_runs_end_killed_and_continue_running(tmp_path):
    import dataclasses

    from mlflow import MlflowClient

    from condensation.curriculum import end_runs, ensure_parent_run, load_curriculum_config, stage_train_config
    from condensation.train.tracking import ensure_run

    cfg = load_curriculum_config("debug", overrides=[f"train.run.storage={tmp_path}"])
    parent = ensure_parent_run(cfg)
    stage0 = stage_train_config(cfg, 0)
    stage0 = dataclasses.replace(stage0, tracking=dataclasses.replace(stage0.tracking, parent_run_id=parent))
    child = ensure_run(stage0)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert sorted(end_runs(cfg, "KILLED")) == sorted([parent, child])
    assert {client.get_run(r).info.status for r in (parent, child)} == {"KILLED"}
    assert ensure_parent_run(cfg) == parent and client.get_run(parent).info.status == "RUNNING"
