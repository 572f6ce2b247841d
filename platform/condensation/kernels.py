"""Triton kernels, each with the plain-torch computation it replaces beside it (used on CPU, and as the reference
in tests/test_gpu.py).

cross_entropy_grad_: per row of logits [n, V], the cross-entropy and, written over the logits in place, its
gradient w * (softmax - onehot). In torch this is a chain of full passes over [n, V] in float32 (upcast,
logsumexp, subtract, exp, scatter, scale, downcast: ~40 bytes of traffic per logit); the kernel reads the bf16
logits twice and writes the gradient once (6 bytes per logit). With a 128K vocabulary this was the largest single
cost of a Condensation training step on an H200 (a third of the GPU time at 32K tokens).
"""

from __future__ import annotations

import importlib.util

import torch

# False sends every call to the torch path (to compare or debug on a GPU)
USE_TRITON = True
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once, not per loss chunk


def triton_usable(x: torch.Tensor) -> bool:
    return USE_TRITON and _HAS_TRITON and x.is_cuda and x.dtype in _TRITON_DTYPES


def cross_entropy_grad_torch_(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits [n, V] (overwritten with d(sum_t w_t ce_t)/d logits), targets [n] (-100: ignored), weights [n].
    Returns ce [n] in at least float32 (0 where ignored)."""
    valid = targets != -100
    tc = targets.clamp(min=0)[:, None]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a copy unless already >= float32
    lse = torch.logsumexp(x, -1)
    ce = (lse - x.gather(1, tc)[:, 0]) * valid
    probs = x.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, tc, -valid.to(probs.dtype)[:, None])
    probs.mul_((weights * valid).to(probs.dtype)[:, None])
    if probs.data_ptr() != logits.data_ptr():
        logits.copy_(probs)
    return ce


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """As cross_entropy_grad_torch_, one Triton program per row when the logits are on a GPU."""
    if not triton_usable(logits):
        return cross_entropy_grad_torch_(logits, targets, weights)
    n, V = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    ce = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _ce_grad_kernel()[(n,)](logits, logits.stride(0), targets, weights.float(), ce, V, BLOCK=4096, num_warps=16)
    return ce


_KERNEL = None


def _ce_grad_kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(logits_ptr, stride, targets_ptr, weights_ptr, ce_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        t = tl.load(targets_ptr + row)
        valid = t != -100
        w = tl.where(valid, tl.load(weights_ptr + row), 0.0)
        # pass 1: running max and sum of exponentials (online log-sum-exp)
        m = tl.zeros([], dtype=tl.float32) - float("inf")
        s = tl.zeros([], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_t = tl.load(base + tl.maximum(t, 0)).to(tl.float32)
        tl.store(ce_ptr + row, tl.where(valid, lse - x_t, 0.0))
        # pass 2: the gradient over the logits, in place
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = w * (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0))
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)

    _KERNEL = kernel
    return kernel
