"""CUDAGraphStep's checks that run anywhere; its equality with eager steps is in tests/test_gpu.py."""

import pytest
import torch

from condensation.cuda_graph import CUDAGraphStep


def test_optimizer_must_be_capturable():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"param_groups\[0\].*capturable=True"):
        CUDAGraphStep(lambda batch: p.sum(), torch.optim.AdamW([p]))


def test_warmup_must_run_an_eager_step():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphStep(lambda batch: p.sum(), torch.optim.AdamW([p], capturable=True), warmup=0)


def test_capture_error_mode_is_checked():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="capture_error_mode"):
        CUDAGraphStep(lambda batch: p.sum(), torch.optim.AdamW([p], capturable=True), capture_error_mode="local")
