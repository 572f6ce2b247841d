"""The benchmark scripts are files, not a package: each test module loads its script by path."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script(request):
    """`benchmarks/<name>.py` as a module; the test module names its script in `SCRIPT`."""
    name = request.module.SCRIPT
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
