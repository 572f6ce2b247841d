"""MLflow round trip: grids logged per stage (nested runs) are found again by the dashboard, which renders its report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from condensation.evaluate import PasskeyGrid, load_passkey_grids, log_passkey_grid

REPORT = Path(__file__).resolve().parents[2] / "dashboards" / "passkey_report.py"


def load_report_module():
    spec = importlib.util.spec_from_file_location("passkey_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def grid(acc: float) -> PasskeyGrid:
    return PasskeyGrid([128, 256], [0.0, 0.5, 1.0], np.full((2, 3), acc), np.full((2, 3), min(1.0, acc + 0.25)),
                       np.full((2, 3), 4))


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("passkey-curriculum", artifact_location=str(tmp_path / "artifacts"))
    return uri, client, exp


def test_log_and_report(store, tmp_path):
    uri, client, exp = store
    parent = client.create_run(exp, run_name="curriculum").info.run_id
    for k, (name, length) in enumerate([("stage-128", 128), ("stage-256", 256)]):
        child = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent, "stage": name}).info.run_id
        log_passkey_grid(grid(0.5 * (k + 1)), run_id=child, tracking_uri=uri, trained_length=length, step=k)
    child_runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(child_runs) == 2
    run = client.get_run(child_runs[0].info.run_id)
    assert "passkey/exact/len_128/depth_0.50" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "passkey")}
    assert arts == {"passkey/passkey_grid.json", "passkey/passkey_heatmap.png"}
    grids = load_passkey_grids(run.info.run_id, uri)
    assert list(grids) == ["passkey/passkey_grid.json"] and grids["passkey/passkey_grid.json"].meta["trained_length"] in (128, 256)

    report = load_report_module()
    index = report.main(["--tracking-uri", uri, "--experiment", "passkey-curriculum", "--out", str(tmp_path / "rep"),
                         "--log-to-parent"])
    page = index.read_text()
    assert "stage-128" in page and "stage-256" in page and "1.00 / 1.00" in page and "0.50 / 0.75" in page
    assert {p.name for p in index.parent.glob("*.png")} == {"stage_summary.png", "stage_00.png", "stage_01.png"}
    assert any(a.path == "report/index.html" for a in client.list_artifacts(parent, "report"))


def test_report_defaults_open_the_default_curriculum(tmp_path, monkeypatch):
    from condensation.curriculum import default_preset

    monkeypatch.chdir(tmp_path)
    report = load_report_module()
    uri, experiment = report.default_store()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert experiment == default_preset().train.tracking.experiment
    # nothing run yet: one clear line, and no store created anywhere
    with pytest.raises(SystemExit, match="no MLflow store at .*runs/mlflow.db"):
        report.main([])
    assert not list(tmp_path.rglob("mlflow.db")) and not (tmp_path / "mlruns").exists()

    (tmp_path / "runs").mkdir()
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment, artifact_location=str(tmp_path / "runs" / "mlartifacts"))
    parent = client.create_run(exp, run_name="passkey-cpu", tags={"curriculum": "passkey-cpu"}).info.run_id
    child = client.create_run(exp, run_name="stage0", tags={"mlflow.parentRunId": parent, "stage": "0: 128"}).info.run_id
    log_passkey_grid(grid(1.0), run_id=child, tracking_uri=uri, trained_length=128)
    client.create_run(exp, run_name="pretrain-debug")  # a newer top-level run of another workload, same experiment
    index = report.main([])
    assert index.resolve() == tmp_path.resolve() / "runs" / "passkey_report" / "index.html"
    assert "0: 128" in index.read_text()


def test_fluent_active_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fluent.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("fluent")
        with mlflow.start_run() as run:
            log_passkey_grid(grid(1.0), plot=False)
        assert MlflowClient(uri).get_run(run.info.run_id).data.metrics["passkey/exact/mean"] == 1.0
        with pytest.raises(RuntimeError):
            log_passkey_grid(grid(1.0), plot=False)
    finally:
        mlflow.set_tracking_uri(None)
