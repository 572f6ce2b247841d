"""Fixtures shared by the top-level test modules (tests/train and tests/data keep their own)."""

import pytest

from private_ray import private_ray


@pytest.fixture(scope="module")
def ray_session():
    """A private local Ray for one module (2 CPUs), shut down after it; with its own dashboard on 127.0.0.1, so that
    each Ray Train run ends without waiting (tests/private_ray.py)."""
    with private_ray(2) as ray:
        yield ray
