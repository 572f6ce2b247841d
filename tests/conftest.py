"""Fixtures shared by the top-level test modules (tests/train and tests/data keep their own)."""

import os

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A private local Ray for one module (2 CPUs, no dashboard), shut down after it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
