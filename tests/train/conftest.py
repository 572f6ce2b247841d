import pytest

from private_ray import private_ray


def debug_cfg(tmp_path, name: str, *overrides: str):
    """The debug preset in a test's own storage folder: debug model, 128-token rows, 2 CPU workers (gloo)."""
    from condensation.config import load_config

    base = [
        f"run.storage={tmp_path}", f"run.name={name}",
        "data.seq_len=128", "data.num_rows=64",
        "schedule.total_steps=8", "schedule.global_batch=4", "schedule.per_worker_batch=1", "schedule.num_workers=2",
        "schedule.cpus_per_worker=0.9", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=1",
        "checkpoint.every=2", "checkpoint.keep=2", "tracking.log_every=1",
    ]
    return load_config(overrides=base + list(overrides))


def local_ray(num_cpus: int, num_gpus: int = 0):
    """A fresh local Ray of the test's own (address="local": never another session's cluster found via /tmp/ray),
    with its own dashboard on 127.0.0.1, so that each `fit()` ends without waiting (tests/private_ray.py)."""
    with private_ray(num_cpus, num_gpus, log_to_driver=True) as ray:
        yield ray


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for a test module: 2 CPUs (the CI machine)."""
    yield from local_ray(2)


def mlflow_runs(result):
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    exps = client.search_experiments()
    runs = [r for e in exps for r in client.search_runs([e.experiment_id])]
    return client, runs
