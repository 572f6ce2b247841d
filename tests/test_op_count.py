"""Kernel-launching ATen ops per wavefront diagonal of a training step (issue 16: SmolLM2-shaped steps are bound by
kernel launches on a GPU). Counted with a TorchDispatchMode, deterministic: ops whose outputs alias their inputs
(views) and bare allocations launch no kernel and are not counted. A diagonal's count is the difference between two
step lengths over the diagonals added (benchmarks/op_count.py prints the same by op name, on the SmolLM2 shape).

The budgets are the counts after the cuts of issue 16 (no full-range slices, RoPE by one roll, a step's memories read
as the previous step's output, memory and segment keys/values from one matmul); before them the same diagonals cost
58 / 204.75 (groupckpt-accumulate), 58 / 170.25 (group-autograd) kernel ops in forward / backward. A change that adds
ops to every diagonal fails here: if it is worth its ops, raise the budget with the reason.

Raised: +2 backward ops a diagonal with weight sinks (160.75 -> 162.75), the SwiGLU recomputed from gate and up in
the down projection's backward (fast_train._SwiGLUDown: its output, [k, l, I], no longer saved; 47 MB a 30-cell
SmolLM2 step, and the MLP's gradients no longer all at once at a step's peak)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from condensation import CondensationConfig, CondensationForCausalLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def op_count():
    """benchmarks/op_count.py, whose counter this test uses: the budgets below are its numbers."""
    spec = importlib.util.spec_from_file_location("op_count", ROOT / "benchmarks" / "op_count.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["op_count"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def causal_bias_restored(monkeypatch):
    """op_count.count_step swaps SDPA's causal_lower_right for one made outside its dispatch mode: put back after."""
    import torch.nn.attention.bias as bias

    monkeypatch.setattr(bias, "causal_lower_right", bias.causal_lower_right)


# (config, budget forward, budget backward): kernel ops a diagonal
CASES = {
    # the SmolLM2 benchmark's cond-sdpa-l512-groupckpt-accumulate-graph (and -stacked-)
    "groupckpt-accumulate": (dict(checkpoint_cells=True, checkpoint_group_steps=4, weight_grads="accumulate"),
                             47.25, 162.75),
    "groupckpt-accumulate-stacked": (dict(checkpoint_cells=True, checkpoint_group_steps=4,
                                          weight_grads="accumulate", stacked_params=True), 47.25, 162.75),
    # cond-sdpa-l512-group8-graph (weight gradients through autograd)
    "group-autograd": (dict(checkpoint_group_steps=4), 47.25, 134.25),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_ops_per_diagonal_stay_within_budget(case, op_count, causal_bias_restored):
    overrides, budget_fwd, budget_bwd = CASES[case]
    cfg = CondensationConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, segment_length=8, **overrides)
    torch.manual_seed(0)
    model = CondensationForCausalLM(cfg)
    ops = op_count.per_diagonal(model, 4, 8)["kernels"]  # 8 more full diagonals (two more groups of 4)
    per_diag = {phase: sum(ops[phase].values()) for phase in ("forward", "backward")}
    assert per_diag["forward"] <= budget_fwd, (per_diag, ops["forward"])
    assert per_diag["backward"] <= budget_bwd, (per_diag, ops["backward"])
