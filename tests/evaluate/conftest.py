"""Fixtures of the evaluation tests; the stand-ins themselves live in eval_stubs.py."""

from __future__ import annotations

import pytest
import torch

from eval_stubs import CharTokenizer


@pytest.fixture
def tok() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    """A real CondensationForCausalLM of the 'debug' size (random weights, segment 32): the generate path end to end."""
    from condensation import CondensationForCausalLM
    from condensation.sizes import build_config

    torch.manual_seed(0)
    return CondensationForCausalLM(build_config("debug")).eval()
