"""Fixtures shared by the top-level test modules (tests/train and tests/data keep their own)."""

import pytest

from private_ray import private_ray


@pytest.fixture(scope="module")
def ray_session():
    """A private local Ray for one module (2 CPUs), shut down after it; with its own dashboard on 127.0.0.1, so that
    each Ray Train run ends without waiting (tests/private_ray.py)."""
    with private_ray(2) as ray:
        yield ray


def pytest_runtest_logreport(report):
    """A failed GPU test's traceback at once, not in the summary at the end: on the GPU machine a Ray fixture's
    teardown after a failed multi-GPU run can hang until the command's time limit, and the summary never came
    (session 11, the 2-GPU SIGKILL test)."""
    if report.failed and "gpu" in report.keywords:
        import sys

        sys.stderr.write(f"\n{report.nodeid} FAILED ({report.when}):\n{report.longreprtext}\n")
        sys.stderr.flush()
