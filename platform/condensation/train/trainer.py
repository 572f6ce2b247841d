"""`fit(cfg, datasets)`: validate, prepare the run folder and the MLflow run, run the TorchTrainer, return paths.

    result = fit(cfg)                                            # data from cfg.data
    result = fit(cfg, {"train": ds}, init_from=prev.hf_path)     # a curriculum stage chained from the last
    result = fit(cfg, {"train": passkey, "replay": text})        # schedule.replay_micro_batches > 0

The run folder `<cfg.run.storage>/<cfg.run.name>` holds Ray Train's checkpoints (`checkpoint_<step>/`), the
resolved config, the MLflow run id, and (by default) the MLflow store `<storage>/mlflow.db` sits beside it.
Calling `fit` again with the same run name and storage continues from the last checkpoint to the same
`total_steps`; a finished run returns at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ..config import TrainConfig, resolve, to_yaml
from .engines import check_resume_engine, resolved as engine_resolved
from .checkpoints import checkpoint_step, newest_complete_checkpoint
from .loop import ERROR_FILE, HF_DIR, NONFINITE_FILE, STOPPED_FILE, train_loop_per_worker
from .resources import worker_resources
from .tracking import ensure_run, tracking_uri


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf at `step`; training stopped and `last_checkpoint` (possibly None) is intact."""

    def __init__(self, message: str, step: int, last_checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class RepeatedFailureError(RuntimeError):
    """The same error at the same step in two attempts in a row: a bug or a bad config, not a lost machine, so the
    run fails at once instead of using up `checkpoint.max_failures`."""

    def __init__(self, message: str, step: int, error_type: str):
        super().__init__(message)
        self.step = step
        self.error_type = error_type


def _lost_worker(err) -> bool:
    """A worker that died (SIGKILL, OOM killer, node lost) rather than raised: Ray reports a failed health check."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    failures = getattr(err, "worker_failures", None) or {}
    return any(isinstance(f, (WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)) for f in failures.values())


def _wait_removed(groups: set, timeout_s: float = 60.0) -> None:
    import time

    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = placement_group_table()
        if all(table.get(g, {}).get("state", "REMOVED") == "REMOVED" for g in groups):
            return
        time.sleep(0.5)


def _read_error(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _mark_failed(cfg: TrainConfig, run_id: str | None) -> None:
    if run_id:
        from .tracking import MlflowLogger

        MlflowLogger(tracking_uri(cfg), run_id, mark_running=False).finish("FAILED")


@dataclass
class TrainResult:
    """What a finished run leaves: the last Ray checkpoint (DeepSpeed state) and its HF export. `stopped`: the run
    ended early on a stop request (a `stop` file in its run folder) after `step` steps; `checkpoint_path` is then
    its newest checkpoint, if any (None before the first one)."""

    checkpoint_path: str | None
    hf_path: str | None
    step: int
    run_dir: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    metrics: dict | None
    stopped: bool = False


def prepare(cfg: TrainConfig, init_from: str | None = None) -> TrainConfig:
    """The resolved config a run uses: `init_from` applied, validated, storage absolute, its engine the one of the
    run's checkpoints. Raises ConfigError."""
    if init_from is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(init_from)))
    cfg = resolve(cfg)
    check_resume_engine(cfg)
    return cfg


def resolved_config_dict(cfg: TrainConfig) -> dict:
    return {**cfg.to_dict(), **engine_resolved(cfg)}


def _vocab_size(cfg: TrainConfig) -> int:
    if cfg.model.init_from:
        from transformers import AutoConfig

        from ..pretrained import resolve_pretrained

        return AutoConfig.from_pretrained(resolve_pretrained(cfg.model.init_from)).vocab_size
    from ..sizes import MODEL_SIZES

    return cfg.model.overrides.get("vocab_size", MODEL_SIZES[cfg.model.size]["vocab_size"])


def _check_replay(cfg: TrainConfig, datasets: dict | None) -> None:
    """A "replay" dataset exactly when replay micro-batches are asked for: one without the other is a mistake that
    would otherwise show only inside the workers (or never, as a dataset nobody reads)."""
    from ..config import ConfigError

    n, has = cfg.schedule.replay_micro_batches, bool(datasets) and "replay" in datasets
    if n and not has:
        raise ConfigError("schedule.replay_micro_batches", f"{n} replay micro-batches per step need a 'replay' "
                                                           "dataset: fit(cfg, {'train': ..., 'replay': ...})")
    if has and not n:
        raise ConfigError("schedule.replay_micro_batches", "a 'replay' dataset was given, but no replay micro-batches "
                                                           "(set schedule.replay_micro_batches > 0 to train on it)")


def fit(cfg: TrainConfig, datasets: dict | None = None, *, init_from: str | None = None,
        data_stats=None, callbacks: list | None = None, evaluate=None) -> TrainResult:
    """Train with Ray Train + DeepSpeed as `cfg` says. `datasets`: {"train": ray.data.Dataset} of rows
    {"input_ids": int64[L], "labels": int64[L]} (None builds them from `cfg.data`), and with
    `schedule.replay_micro_batches` > 0 (only then) also "replay" rows of the same schema and length, whose
    micro-batches join every optimizer step's (see `ScheduleConfig`). `init_from`: a HF folder (e.g. the previous
    stage's `TrainResult.hf_path`) whose weights start this run. `data_stats`: the data pipeline's counts: a dict
    (logged by rank 0 at the start) or a `condensation.data.DataReport` (its counts are logged after the run, when the
    data has streamed through).

    `callbacks`: Ray Train `UserCallback`s for the run (e.g. `ray.tune.integration.ray_train.TuneReportCallback()`
    from a Ray Tune trainable); with any, the workers report their metrics to Ray Train at every log interval
    (`tracking.log_every`), not only with checkpoints, so a callback's `after_report` sees the whole curve (rank 0's
    metrics first). `evaluate`: a picklable `fn(model) -> {name: float}` that rank 0 runs at every log interval (the
    unwrapped model, in eval mode, without gradients; ZeRO-2 or lower keeps whole weights on every rank); its values
    join that interval's metrics in MLflow and in the reports. Raises ConfigError before Ray starts,
    NonFiniteLossError when the loss stops being finite, RepeatedFailureError when the same error comes back at the
    same step after a restart, ray.train.TrainingFailedError when failures exceed `checkpoint.max_failures`.

    Stopping: a file `stop` in the run folder (`loop.STOP_FILE`, e.g. written when Ray Tune stops a trial) ends every
    worker before the current step's update; `fit` then returns at once with `stopped=True` (no new checkpoint).

    Retries: a lost worker (killed, out of host memory, node gone) or an error seen for the first time restarts the
    whole worker group from the last checkpoint, up to `checkpoint.max_failures` times."""
    cfg = prepare(cfg, init_from)  # validation first: nothing below starts before the config is known good
    _check_replay(cfg, datasets)
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util import placement_group_table

    run_dir = cfg.run.run_dir
    os.makedirs(run_dir, exist_ok=True)
    marker, stopped_marker = os.path.join(run_dir, NONFINITE_FILE), os.path.join(run_dir, STOPPED_FILE)
    for old in (marker, stopped_marker):
        if os.path.exists(old):
            os.remove(old)
    with open(os.path.join(run_dir, "resolved_config.yaml"), "w") as f:
        f.write(to_yaml(resolved_config_dict(cfg)))
    run_id = ensure_run(cfg) if cfg.tracking.enabled else None

    if datasets is None:
        from .data import train_datasets

        datasets, stats = train_datasets(cfg.data, _vocab_size(cfg))
        data_stats = data_stats if data_stats is not None else stats
    data_report = None
    if data_stats is not None and hasattr(data_stats, "counts"):  # a condensation.data DataReport: counts come later
        data_report, data_stats = data_stats, None
    if "train" not in datasets:
        raise ValueError("datasets must hold a 'train' Dataset")

    s = cfg.schedule
    resources = worker_resources(cfg, datasets)  # fails here, not in a silent wait, when workers + data cannot fit

    def trainer():
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.to_dict(), "mlflow_run_id": run_id, "data_stats": data_stats,
                               "resume_from": newest_complete_checkpoint(run_dir),
                               "report_every_log": bool(callbacks), "evaluate": evaluate},
            torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=cfg.run.name,
                storage_path=cfg.run.storage,
                # retries are decided here (below), so that a repeated bug is not retried like a lost worker
                failure_config=ray.train.FailureConfig(max_failures=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                # Ray Train's own INFO lines would drown the one progress line per interval that rank 0 prints
                # (its per-report echo has a logger of its own, silenced in the worker loop)
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
                callbacks=list(callbacks or []),
            ),
            datasets=datasets,
        )

    error_file = os.path.join(run_dir, ERROR_FILE)
    failures, previous = 0, None
    while True:
        if os.path.exists(error_file):
            os.remove(error_file)
        groups_before = set(placement_group_table())
        try:
            result = trainer().fit()
            break
        except ray.train.TrainingFailedError as e:
            # the failed attempt's placement group is removed asynchronously; a new worker group started before
            # that can have its workers destroyed with it
            _wait_removed(set(placement_group_table()) - groups_before)
            rec = None if _lost_worker(e) else _read_error(error_file)
            key = rec and (rec["step"], rec["type"], rec["message"])
            if key and key == previous:
                _mark_failed(cfg, run_id)
                raise RepeatedFailureError(
                    f"run {cfg.run.name!r} failed twice at step {rec['step']} with the same error, so it is not "
                    f"retried again: {rec['type']}: {rec['message']}", rec["step"], rec["type"]) from e
            failures += 1
            limit = cfg.checkpoint.max_failures
            if limit != -1 and failures > limit:
                _mark_failed(cfg, run_id)
                raise
            what = "a worker was lost" if rec is None else f"{rec['type']} at step {rec['step']}: {rec['message'][:200]}"
            print(f"[condensation.train] attempt {failures} of run {cfg.run.name!r} failed ({what}); restarting from "
                  f"its last checkpoint ({failures}/{'unlimited' if limit == -1 else limit} retries)", flush=True)
            previous = key
    if data_report is not None and run_id:  # skip counts exist once the data has streamed through the workers
        from .tracking import MlflowLogger

        counts = {f"data.{k}": v for k, v in data_report.counts().items() if isinstance(v, (int, float))}
        MlflowLogger(tracking_uri(cfg), run_id, mark_running=False).log_metrics(counts, step=0)
    last = result.checkpoint.path if result.checkpoint is not None else None

    if os.path.exists(marker):
        with open(marker) as f:
            info = json.load(f)
        raise NonFiniteLossError(f"{info['message']} (last good checkpoint: {last})", info["step"], last)
    if os.path.exists(stopped_marker):
        with open(stopped_marker) as f:
            info = json.load(f)
        newest = last or newest_complete_checkpoint(run_dir)
        return TrainResult(checkpoint_path=newest, hf_path=None, step=info["step"], run_dir=run_dir,
                           mlflow_run_id=run_id, tracking_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
                           metrics=result.metrics, stopped=True)
    if last is None:
        raise RuntimeError(f"run {cfg.run.name!r} finished without a checkpoint")
    step = checkpoint_step(last)
    hf = os.path.join(last, HF_DIR)
    return TrainResult(
        checkpoint_path=last,
        hf_path=hf if os.path.isdir(hf) else None,
        step=step,
        run_dir=run_dir,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri(cfg) if cfg.tracking.enabled else None,
        metrics=result.metrics,
    )
