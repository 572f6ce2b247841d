"""MLflow conventions for evaluation results, shared by the training loop (which logs) and `dashboards/` (which
reads), so both agree on names: a passkey grid is logged as metrics (`PasskeyGrid.to_metrics`), as JSON at
`<artifact_dir>/passkey_grid.json` and as the Fig. 8 picture at `<artifact_dir>/passkey_heatmap.png`.

mlflow is imported inside the functions: importing `condensation.evaluate` must not need a tracking setup.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .passkey import PasskeyGrid

GRID_ARTIFACT = "passkey_grid.json"
HEATMAP_ARTIFACT = "passkey_heatmap.png"
DEFAULT_ARTIFACT_DIR = "passkey"


def log_passkey_grid(
    grid: PasskeyGrid,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    step: int | None = None,
    artifact_dir: str = DEFAULT_ARTIFACT_DIR,
    trained_length: int | None = None,
    plot: bool = True,
    metric_prefix: str = "passkey",
) -> None:
    """Log a grid into an MLflow run: metrics, the JSON (what `dashboards/passkey_report.py` collects) and, with
    plot=True, the Fig. 8 heat map. The run is `run_id` (through an `MlflowClient`, as the trainer logs from rank
    0), else the active fluent run. trained_length is stored in the grid's meta so the report can mark it."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_passkey_grid: no run_id given and no active MLflow run")
        run_id = active.info.run_id
    client = MlflowClient(tracking_uri)
    if trained_length is not None:
        grid.meta["trained_length"] = int(trained_length)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step or 0) for k, v in grid.to_metrics(metric_prefix).items()]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.log_text(run_id, grid.to_json(), f"{artifact_dir}/{GRID_ARTIFACT}")
    if plot:
        from .plots import plot_passkey_heatmap

        with tempfile.TemporaryDirectory() as tmp:
            png = plot_passkey_heatmap(grid, Path(tmp) / HEATMAP_ARTIFACT)
            client.log_artifact(run_id, str(png), artifact_dir)


def load_passkey_grids(run_id: str, tracking_uri: str | None = None) -> dict[str, PasskeyGrid]:
    """Every passkey grid logged in one run, keyed by artifact path (a run may hold several, e.g. per step)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found: dict[str, PasskeyGrid] = {}

    def walk(path: str | None) -> None:
        for info in client.list_artifacts(run_id, path):
            if info.is_dir:
                walk(info.path)
            elif info.path.rsplit("/", 1)[-1] == GRID_ARTIFACT:
                with tempfile.TemporaryDirectory() as tmp:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=info.path, dst_path=tmp, tracking_uri=tracking_uri)
                    text = Path(local).read_text()
                found[info.path] = PasskeyGrid.from_json(text)

    walk(None)
    return found
