"""Peak CPU allocator bytes of a call, for the tests that show a working set is bounded (generation's prefill, the
fused loss and embedding gradient): the CPU profiler's allocation events, summed in time order. Also the fused loss's
cross-entropy gradient with the GPU's memory (`row_chunked_cross_entropy_grad_`), for CPU peaks that stand for GPU
ones."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def peak_live_bytes(fn) -> int:
    """Most bytes the CPU allocator held at once while fn ran, beyond what was allocated before it (so the inputs and
    weights are not counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


CE_ROWS = 8


def row_chunked_cross_entropy_grad_(logits, targets, weights):
    """`kernels.cross_entropy_grad_torch_` over CE_ROWS rows at a time, in place in the logits: the memory of the GPU's
    Triton kernel (one program per row, in place), where the torch path's float32 copy of the whole [chunk, V] logits
    would be a CPU-only peak. The same values row by row (logsumexp and the elementwise ops are per row)."""
    from condensation.kernels import cross_entropy_grad_torch_

    return torch.cat([cross_entropy_grad_torch_(logits[i : i + CE_ROWS], targets[i : i + CE_ROWS],
                                                weights[i : i + CE_ROWS]) for i in range(0, logits.shape[0], CE_ROWS)])
