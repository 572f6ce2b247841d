"""ATen ops per wavefront diagonal of a training step (forward + backward), counted on the CPU (issue 16).

    PYTHONPATH=platform python benchmarks/op_count.py                       # the SmolLM2 benchmark cases, eager
    PYTHONPATH=platform python benchmarks/op_count.py --cases cond-sdpa-l512-groupckpt-accumulate-graph --top 60
    PYTHONPATH=platform python benchmarks/op_count.py --layers 30 --segments 8 --segment-length 512   # the real step

On a GPU a SmolLM2-shaped wavefront step is bound by kernel launches, not FLOPs: every 576-wide norm, cast, add and
copy of a diagonal is one more kernel. This counts the ops that reach the dispatcher (below autograd, so composite ops
appear as what they decompose into, and backward as the ops autograd runs) with a TorchDispatchMode, over one
training step (model forward, the fused loss, backward), and splits them into

- views: ops whose outputs alias their input (view, expand, slice, select, transpose, unbind, detach, ...), and
  allocations without a fill (empty, empty_strided): no kernel runs;
- kernels: everything else (on a GPU, one or more kernel launches each).

Per diagonal = the difference between two step lengths (`--segments` and `--segments` + `--extra-segments`, both at
least the number of layers, so every added diagonal is a full one of `--layers` cells) divided by the number of
diagonals added: the marginal cost of a diagonal, including its share of group checkpoints and of the per-segment
loss. The step size of the cases is that of workloads/benchmark.py (SmolLM2-135M: width 576, 9/3 heads, head_dim 64,
intermediate 1536, vocabulary 49152, bf16), with fewer layers and shorter segments for CPU speed: the per-diagonal op
counts do not depend on either (cells of a diagonal are batched; loss chunks scale with the segment length here).
Attention runs through the CPU's SDPA kernels, which may decompose differently from CUDA's (marked in the table).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))

from condensation import CondensationForCausalLM  # noqa: E402
from condensation.sizes import build_config  # noqa: E402

# no kernel: allocation without a fill (the views are found by their schema: OpOverload.is_view)
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "is_same_size", "_has_same_storage_numel", "is_nonzero"}
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")

DEFAULT_CASES = ["cond-sdpa-l512-groupckpt-accumulate-graph", "cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-graph",
                 "cond-sdpa-l512-group8-graph"]


def is_view(func) -> bool:
    return bool(getattr(func, "is_view", False)) or func.overloadpacket.__name__ in NO_KERNEL


class OpCounter(TorchDispatchMode):
    """Counts every ATen op reaching the dispatcher, by phase ("forward" / "backward") and op name."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.where = where  # also count by source: the innermost line of condensation/ (forward), autograd node
        self.sources: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}
        self.phase = "forward"
        self.counts: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}
        self.views: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        view = is_view(func)
        (self.views if view else self.counts)[self.phase][name] += 1
        if self.where and not view:
            self.sources[self.phase][f"{name} @ {self._source()}"] += 1
        return func(*args, **(kwargs or {}))


    @staticmethod
    def _source() -> str:
        import traceback

        node = torch._C._current_autograd_node()
        frames = [f for f in traceback.extract_stack() if "/condensation/" in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line.strip()[:60]}" if frames else "?"
        return where if node is None else f"{node.name()} <- {where}"


def case_config(name: str, layers: int, segment_length: int, **extra):
    import benchmark

    case = next((c for c in benchmark.default_cases(False) if c.name == name), None)
    if case is None:
        raise SystemExit(f"unknown case {name!r}")
    chunk = case.loss_chunk_tokens or 2048
    # loss chunks scaled with the segment (chunk512 at l512: one chunk per segment)
    chunk = max(1, chunk * segment_length // (case.segment_length or 512))
    return build_config("smollm2-135m", num_hidden_layers=layers, segment_length=segment_length,
                        segment_attention=case.attention, segment_schedule=case.schedule,
                        checkpoint_cells=case.checkpoint_cells, compile_cells=case.compile_cells,
                        checkpoint_group_steps=case.checkpoint_group_steps, weight_grads=case.weight_grads,
                        max_step_cells=case.max_step_cells, stacked_params=case.stacked_params,
                        loss_chunk_tokens=chunk, **extra)


_BIASES: dict = {}


def _causal_lower_right(c: int, kv_len: int):
    # SDPA's CausalBias is a tensor subclass that cannot be created under a TorchDispatchMode: made outside it, once
    # per shape (it holds nothing but the shape; creating it runs no kernel)
    from torch.nn.attention.bias import CausalBias, CausalVariant
    from torch.utils._python_dispatch import _disable_current_modes

    if (c, kv_len) not in _BIASES:
        with _disable_current_modes():
            _BIASES[c, kv_len] = CausalBias(CausalVariant.LOWER_RIGHT, c, kv_len)
    return _BIASES[c, kv_len]


def count_step(model, n_seg: int) -> OpCounter:
    import torch.nn.attention.bias as bias

    bias.causal_lower_right = _causal_lower_right  # read by modeling.sdpa_attention at each call
    l = model.config.segment_length
    ids = torch.randint(0, model.config.vocab_size, (1, n_seg * l), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, return_logits=False).loss.backward()  # warm (lazy state, compiled graphs)
    model.zero_grad(set_to_none=True)
    counter = OpCounter()
    with counter:
        loss = model(ids, labels=ids, return_logits=False).loss
        counter.phase = "backward"
        loss.backward()
    return counter


def per_diagonal(model, n_seg: int, extra: int) -> dict[str, dict[str, Counter]]:
    """{"kernels" | "views": {"forward" | "backward": Counter(op -> count per diagonal)}} (floats)."""
    a, b = count_step(model, n_seg), count_step(model, n_seg + extra)
    out = {}
    for kind in ("counts", "views"):
        out["kernels" if kind == "counts" else "views"] = {
            phase: Counter({op: (getattr(b, kind)[phase][op] - getattr(a, kind)[phase][op]) / extra
                            for op in getattr(b, kind)[phase].keys() | getattr(a, kind)[phase].keys()})
            for phase in ("forward", "backward")}
    return out


def totals(d: dict[str, dict[str, Counter]]) -> dict[str, float]:
    return {f"{kind}_{phase}": sum(d[kind][phase].values()) for kind in d for phase in d[kind]}


def table(d: dict[str, dict[str, Counter]], top: int) -> str:
    ops = sorted(set(d["kernels"]["forward"]) | set(d["kernels"]["backward"]),
                 key=lambda op: -(d["kernels"]["forward"][op] + d["kernels"]["backward"][op]))
    lines = [f"{'kernel op':40s} {'fwd':>7s} {'bwd':>7s} {'total':>7s}"]
    for op in ops[:top]:
        f, b = d["kernels"]["forward"][op], d["kernels"]["backward"][op]
        if f or b:
            mark = "  (attention: CPU kernel)" if any(a in op for a in ATTENTION) else ""
            lines.append(f"{op:40s} {f:7.2f} {b:7.2f} {f + b:7.2f}{mark}")
    t = totals(d)
    lines.append(f"{'= kernel ops per diagonal':40s} {t['kernels_forward']:7.2f} {t['kernels_backward']:7.2f} "
                 f"{t['kernels_forward'] + t['kernels_backward']:7.2f}")
    lines.append(f"{'= views/no-kernel ops per diagonal':40s} {t['views_forward']:7.2f} {t['views_backward']:7.2f} "
                 f"{t['views_forward'] + t['views_backward']:7.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--segment-length", type=int, default=32)
    p.add_argument("--segments", type=int, default=8, help="at least --layers")
    p.add_argument("--extra-segments", type=int, default=16, help="diagonals added for the difference")
    p.add_argument("--compile", action="store_true", help="also each case with compile_cells=True")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for name in args.cases.split(","):
        for compile_cells in ([False, True] if args.compile else [False]):
            cfg = case_config(name, args.layers, args.segment_length,
                              **({"compile_cells": True} if compile_cells else {}))
            model = CondensationForCausalLM(cfg).to(getattr(torch, args.dtype)).train()
            d = per_diagonal(model, args.segments, args.extra_segments)
            print(f"\n## {name}{' compile_cells=True' if compile_cells else ''}: {args.layers} layers, "
                  f"l={args.segment_length}, per diagonal ({args.segments} -> {args.segments + args.extra_segments} "
                  f"segments)")
            print(table(d, args.top))


if __name__ == "__main__":
    main()
