"""The driver's side of a workload's log: what Ray and Ray Data print before and while the workers train.

    quiet_driver_logs()        # before ray.init: one progress line per interval comes from the training loop
"""

from __future__ import annotations

import logging


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
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
