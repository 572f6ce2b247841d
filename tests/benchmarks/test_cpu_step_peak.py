"""benchmarks/cpu_step_peak.py: --gpu-ce's row-chunked cross-entropy gradient (tests/memory_probe.py's; the GPU
kernel's memory, the torch path's values) and the tracker's forward peak, without running a model step."""

import torch

from condensation.kernels import cross_entropy_grad_torch_
from memory_probe import CE_ROWS, peak_live_bytes, row_chunked_cross_entropy_grad_

SCRIPT = "cpu_step_peak"  # conftest's `script` fixture


def test_row_chunked_cross_entropy_grad_is_the_torch_path_bit_for_bit_with_row_scratch_only():
    g = torch.Generator().manual_seed(0)
    n, V = 37, 4099  # n not a multiple of CE_ROWS
    logits = (torch.randn(n, V, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[[3, 17, 36]] = -100
    weights = torch.rand(n, generator=g)
    ref_logits, rows_logits = logits.clone(), logits.clone()
    ref_ce = cross_entropy_grad_torch_(ref_logits, targets, weights)
    rows_ce = row_chunked_cross_entropy_grad_(rows_logits, targets, weights)
    assert torch.equal(rows_ce, ref_ce)
    assert torch.equal(rows_logits, ref_logits)  # the gradient, written over the logits in place
    # scratch: a few float32 rows, not a float32 copy of the whole chunk (the torch path's 4 bytes a logit)
    whole = peak_live_bytes(lambda: cross_entropy_grad_torch_(logits.clone(), targets, weights)) - logits.nbytes
    rows = peak_live_bytes(lambda: row_chunked_cross_entropy_grad_(logits.clone(), targets, weights)) - logits.nbytes
    assert whole >= n * V * 4
    assert rows <= 3 * CE_ROWS * V * 4


def test_forward_peak_stops_at_backwards_first_allocation(script):
    csp = script
    t = csp.AllocTracker()
    # forward: +100, +50 (150; the fused loss's own autograd.grad runs nodes too), -100 (50); backward: +300 (350)
    t.events = [(1, 100, "forward| a | mm"), (2, 50, "forward| b | mm <ToCopyBackward0>"), (1, -100, ""),
                (3, 300, "backward| c | mm <MmBackward0>"), (3, -300, "")]
    res = t.peak()
    assert res["forward_peak_bytes"] == 150
    assert res["peak_bytes"] == 350 and res["peak_site"].endswith("<MmBackward0>")
