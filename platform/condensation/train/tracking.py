"""MLflow from rank 0 only, one MLflow run per run folder.

The driver (`ensure_run`) creates the MLflow run once and stores its id in `<run_dir>/mlflow_run_id`; every later
start of the same run (worker restart through FailureConfig, or the job started again) resumes that id, so a run
never gets a second MLflow run. On the workers, rank 0 logs through `MlflowLogger`; other ranks get `NullLogger`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..config import TrainConfig, flatten

RUN_ID_FILE = "mlflow_run_id"


def tracking_uri(cfg: TrainConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return f"sqlite:///{os.path.join(cfg.run.storage, 'mlflow.db')}"


def artifact_location(cfg: TrainConfig) -> str | None:
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if not cfg.tracking.tracking_uri:
        return os.path.join(cfg.run.storage, "mlartifacts")
    return None


# MLflow 3's UI files experiments without this tag under GenAI ("Evaluation runs"); the value is the one its UI
# and docs give for training models (mlflow.server js: CUSTOM_MODEL_DEVELOPMENT)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def reopen_parent_run(client, id_file: str) -> str | None:
    """The parent run of a workload (curriculum, sweep, summarization) whose id `id_file` recorded, set RUNNING again
    when it was continued after an interrupt (KILLED); None when there is no such file or the store lost the run (a
    wiped store starts over in a new parent run)."""
    if not os.path.exists(id_file):
        return None
    run_id = open(id_file).read().strip()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    except Exception:
        return None


def ensure_experiment(client, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created the first time, marked as a model-training experiment (an existing
    experiment's kind is set only when it has none, so a user's choice stays)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def end_run(cfg: TrainConfig, status: str = "KILLED") -> str | None:
    """End the MLflow run of `cfg`'s run folder with `status` if it is still RUNNING (a run stopped from outside:
    Ctrl-C, `ray job stop`); its id, or None when there is none. Starting the run again marks it RUNNING."""
    id_file = os.path.join(cfg.run.run_dir, RUN_ID_FILE)
    if not cfg.tracking.enabled or not os.path.exists(id_file):
        return None
    return end_run_id(tracking_uri(cfg), open(id_file).read().strip(), status)


def end_run_id(uri: str, run_id: str, status: str = "KILLED") -> str | None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return None
    except Exception:  # the store was wiped or is unreachable: nothing to end
        return None
    client.set_terminated(run_id, status=status)
    return run_id


def ensure_run(cfg: TrainConfig) -> str:
    """The MLflow run id of this run folder, creating the experiment / run the first time."""
    from mlflow import MlflowClient

    run_dir = cfg.run.run_dir
    os.makedirs(run_dir, exist_ok=True)
    id_file = os.path.join(run_dir, RUN_ID_FILE)
    client = MlflowClient(tracking_uri(cfg))
    if os.path.exists(id_file):
        run_id = open(id_file).read().strip()
        try:
            client.get_run(run_id)
            return run_id
        except Exception:  # the store was wiped: start a new MLflow run for this folder
            pass
    exp_id = ensure_experiment(client, cfg.tracking.experiment, artifact_location(cfg))
    tags = {"run_dir": run_dir}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id  # how MLflow nests runs
    run = client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
    with open(id_file + ".tmp", "w") as f:
        f.write(run.info.run_id)
    os.replace(id_file + ".tmp", id_file)
    return run.info.run_id


class NullLogger:
    """What ranks other than 0 (or a run without tracking) log through: nothing."""

    run_id = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MlflowLogger(NullLogger):
    """Logs into one existing MLflow run. `system_metrics_interval_s`: also sample this node's GPUs, CPU and memory
    into the run (MLflow's `system/...` metrics) until `finish`."""

    def __init__(self, uri: str, run_id: str, mark_running: bool = True, system_metrics_interval_s: float | None = None):
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.monitor = None
        if mark_running:
            self.client.update_run(run_id, status="RUNNING")
        if system_metrics_interval_s:
            self.monitor = _system_metrics_monitor(uri, run_id, system_metrics_interval_s)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = {k: ("None" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 500])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        self.client.set_terminated(self.run_id, status=status)


def _system_metrics_monitor(uri: str, run_id: str, interval_s: float):
    """MLflow's own sampler (GPU utilisation and memory through NVML, CPU and memory through psutil), or None with
    a warning where it cannot run (no nvidia-ml-py / psutil)."""
    import logging

    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=True, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # missing optional packages must not stop training
        logging.getLogger(__name__).warning("MLflow system metrics are off: %s", e)
        return None


def make_logger(cfg: TrainConfig, run_id: str | None, rank: int, system_metrics: bool = False) -> NullLogger:
    if rank != 0 or not cfg.tracking.enabled or not run_id:
        return NullLogger()
    interval = cfg.tracking.system_metrics_interval_s if system_metrics and cfg.tracking.system_metrics else None
    return MlflowLogger(tracking_uri(cfg), run_id, system_metrics_interval_s=interval)
