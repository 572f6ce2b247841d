"""A workload's Ray on the driver: which cluster it joins, and what Ray and Ray Data print while workers train.

    init_ray(args.ray_address, joining=bool(os.environ.get("RAY_ADDRESS")), use_gpu=cfg.schedule.use_gpu)
    ...
    shutdown_ray()  # where the workload stops Ray itself (else Ray's atexit hook does)
"""

from __future__ import annotations

import logging
import os
import socket

# The state API's own setting for where the dashboard (its server) is; it is read before RAY_ADDRESS, the
# ray_current_cluster file and the local GCS processes (ray.dashboard.utils.get_address_for_submission_client).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# the driver's env vars that init_ray set for its private Ray, with their values before (None: unset); shutdown_ray
# puts them back
_driver_env_before: dict[str, str | None] = {}


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


def _free_port() -> int:
    """A free TCP port of 127.0.0.1, chosen before Ray starts (the workers' env names it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore_driver_env() -> None:
    while _driver_env_before:
        name, before = _driver_env_before.popitem()
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def init_ray(address: str | None, joining: bool, use_gpu: bool) -> None:
    """Start or join Ray for a workload, with its log kept readable. `address`: an explicit address (e.g. "auto");
    `joining`: the workload runs under `ray job submit` (the caller read RAY_ADDRESS), so it joins that cluster.
    Otherwise a private local Ray starts, rather than attaching to whatever /tmp/ray last pointed at (a stopped
    cluster there hangs ray.init). Pair with shutdown_ray where the workload stops Ray itself."""
    import ray

    quiet_driver_logs()
    if ray.is_initialized():
        return
    _restore_driver_env()  # a private Ray of an earlier init_ray, stopped by a bare ray.shutdown()
    address = address or ("auto" if joining else "local")
    if address != "local":
        # a cluster's (or a job's) runtime environment and state API address are its own: nothing set here
        ray.init(address=address)
        return
    # Ray's state API does not ask the connected worker which cluster it is in: it finds the dashboard through
    # RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else /tmp/ray/ray_current_cluster (the last `ray start`), else the
    # one GCS process on the host. That file outlives a killed `ray start --head --block`, and Ray Train's
    # placement-group cleaner (a detached actor asking whether its controller lives) then waited 40 s per training
    # stage for the dead GCS and died with an RpcError traceback; with other Rays running, it found several GCSs
    # and failed too. So the private Ray's dashboard gets a port known before it starts, and RAY_API_SERVER_ADDRESS
    # names it: for the workers through the job's runtime env (the cleaner and Train's controller inherit it), for
    # the driver in os.environ while this Ray runs. RAY_API_SERVER_ADDRESS, not RAY_ADDRESS: only the state and job
    # clients read it, so neither a later ray.init nor a caller's `joining` (RAY_ADDRESS) is steered by it.
    port = _free_port()
    api_server = f"http://127.0.0.1:{port}"
    ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {**worker_env(use_gpu), API_SERVER_ENV: api_server}})
    _driver_env_before.setdefault(API_SERVER_ENV, os.environ.get(API_SERVER_ENV))
    os.environ[API_SERVER_ENV] = api_server


def shutdown_ray() -> None:
    """ray.shutdown(), and the driver's env as it was before init_ray started a private Ray: no
    RAY_API_SERVER_ADDRESS is left naming the stopped cluster's dashboard."""
    import ray

    ray.shutdown()
    _restore_driver_env()
