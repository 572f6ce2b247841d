"""Fixtures of the data-layer tests: one local Ray session for the whole run, the shipped tokenizer, and
small generated corpora (real English from `pydoc_data.topics`) with deliberately malformed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from private_ray import private_ray

from condensation.tokenizer import load_tokenizer


@pytest.fixture(scope="package")
def ray_session():
    """One Ray session for every data test (ray.init costs 3-6 s here), shut down before other packages' tests
    start Ray with their own settings.

    One CPU: the 0.25-CPU data tasks then run at most 4 at a time, so at most 4 worker processes pay the
    import of torch/transformers (seconds each on 2 shared cores); the pipeline itself is unchanged.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    # no dashboard: no Ray Train run here (tests/private_ray.py)
    with private_ray(1, dashboard=False, quiet=True) as ray:
        yield ray


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """The language reference's documents, longest first: a few are thousands of tokens, many are short."""
    from pydoc_data.topics import topics

    return sorted((topics[k] for k in sorted(topics)), key=len, reverse=True)


def write_jsonl(path: Path, rows: list[dict | bytes | str]) -> Path:
    """Rows as json lines; bytes/str entries are written raw (to make undecodable or invalid lines)."""
    with path.open("wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path
