"""The private local Ray that every test fixture starts (tests/conftest.py, tests/train, tests/data, test_sweep.py).

Each Ray Train run's end waits on its placement-group cleaner, a detached actor that asks the state API (the
dashboard) whether the run's controller still lives; stopping it waits until that query returns or its stop timeout
(12 s) passes. Left to find the dashboard itself, the cleaner auto-detects the newest Ray on the host (another test
session's, or one without a dashboard) and retries for ~40 s, so every `fit()` ended 12 s late. Here Ray starts with
its own dashboard on a free port of 127.0.0.1 (nothing listens on the network) and RAY_API_SERVER_ADDRESS points the
cleaner at it. With it, for Ray Train runs (runtime env vars: Ray Train's only interface for these; the controller
hands them on to its workers):
- RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.25: the controller collects the workers' reports every 0.25 s instead of 2 s,
  so that a tiny run's reports and its end do not each wait seconds;
- RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0: no preemption-watcher actor per run (a single local node is never drained).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket


def free_port() -> int:
    """A free TCP port of 127.0.0.1, known before Ray starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env(dashboard_port: int) -> dict:
    """Env vars for the Ray Train runs of a Ray whose dashboard listens on 127.0.0.1:`dashboard_port`."""
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def private_ray(num_cpus: int, num_gpus: int = 0, *, dashboard: bool = True, env_vars: dict | None = None,
                quiet: bool = False, **init_kwargs):
    """A fresh local Ray of the caller's own, shut down on exit. address="local": never another session's cluster
    found via /tmp/ray. `dashboard`: for Ray Train runs (see the module docstring); without Ray Train runs (the data
    tests) it only costs start-up time. `env_vars`: more env vars for the workers. `quiet`: no worker logs on the
    driver, Ray's own log at ERROR."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = dict(env_vars or {})
    kwargs = {"include_dashboard": False}
    if dashboard:
        port = free_port()
        kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
        env = {**train_env(port), **env}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if quiet:
        kwargs.update(log_to_driver=False, logging_level=logging.ERROR)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs, **init_kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if quiet:
        ctx.print_on_execution_start = False
    try:
        yield ray
    finally:
        ray.shutdown()
