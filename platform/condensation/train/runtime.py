"""A workload's Ray on the driver: which cluster it joins, and what Ray and Ray Data print while workers train.

    init_ray(args.ray_address, joining=bool(os.environ.get("RAY_ADDRESS")), use_gpu=cfg.schedule.use_gpu)
"""

from __future__ import annotations

import logging


def worker_env(use_gpu: bool) -> dict:
    """Environment for the Ray workers of a local run: on CPU, DeepSpeed is told so, instead of warning in every
    worker that it found no accelerator."""
    return {} if use_gpu else {"DS_ACCELERATOR": "cpu"}


def quiet_driver_logs() -> None:
    """Keep the driver's log to the workload's own lines, the training progress and real warnings.

    - Ray Data's progress bars and execution banners: a training stage consumes its dataset for minutes, and the
      bar sat at "Total Progress: 0/?" throughout; the loop's step lines are the progress.
    - Ray's notice that token authentication is on: that is the safe default (a private Ray binds to this host's
      address), so it is not something to act on in every run.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled ..." (we did)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def init_ray(address: str | None, joining: bool, use_gpu: bool) -> None:
    """Start or join Ray for a workload, with its log kept readable. `address`: an explicit address (e.g. "auto");
    `joining`: the workload runs under `ray job submit` (the caller read RAY_ADDRESS), so it joins that cluster.
    Otherwise a private local Ray starts, rather than attaching to whatever /tmp/ray last pointed at (a stopped
    cluster there hangs ray.init)."""
    import ray

    quiet_driver_logs()
    if ray.is_initialized():
        return
    address = address or ("auto" if joining else "local")
    # a cluster's (or a job's) runtime environment is its own; only a private Ray gets the workers' env from here
    ray.init(address=address, **({"runtime_env": {"env_vars": worker_env(use_gpu)}} if address == "local" else {}))
