"""CPU peak-memory probe of one Condensation training step (forward, fused loss, backward) on a named shape, for
breaking a GPU peak down without a GPU (benchmarks/results/cpu_smollm2_memory_s8.md).

    PYTHONPATH=platform:tests python benchmarks/cpu_memory_probe.py --size smollm2-135m --length 8192 \
        --groups 1,2,4,8 --dtype bfloat16

Per (length, group) it prints one JSON line: peak_step (the most bytes the CPU allocator held at once during the step
beyond the weights and their pre-allocated gradients, as in a graphed step; tests/memory_probe.py) and the step's
seconds (the profiler's bookkeeping included). --cell prints the bytes one
diagonal of k cells saves for its backward (the unit of a group's recomputed activations)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from condensation import CondensationForCausalLM
from condensation.modeling import Rope, _run_step, SEGMENT_ATTENTION
from condensation.fast_train import StackedLayers
from condensation.config import parse_overrides
from condensation.sizes import build_config
from memory_probe import peak_live_bytes


def saved_bytes_of_diagonal(model, k: int, with_memory: bool) -> int:
    """Bytes (distinct storages) autograd saves for one wavefront step of k cells (layers 0..k-1) of one segment."""
    cfg = model.config
    l, d = cfg.segment_length, cfg.hidden_size
    dt = model.dtype
    xs = [torch.randn(1, l, d, dtype=dt, requires_grad=True) for _ in range(k)]
    mems = [torch.randn(1, l, d, dtype=dt, requires_grad=True) for _ in range(k)] if with_memory else []
    rope = model.model.rope(xs[0])
    w = StackedLayers(model.model.layers[:k], cfg.weight_grads).range(0, k)
    seen: dict[int, int] = {}
    inputs = {t.untyped_storage().data_ptr() for t in xs + mems} | {
        t.untyped_storage().data_ptr() for t in model.parameters()}  # the layers' or their stack's

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in inputs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _run_step(w, xs, mems, [], rope, cfg, SEGMENT_ATTENTION[cfg.segment_attention], False)
    seen[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()  # the output, kept as next input/memory
    return sum(seen.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="smollm2-135m")
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--groups", default="1,2,4,8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--set", action="append", default=[], help="CondensationConfig override key=value (repeatable)")
    ap.add_argument("--cell", default="", help="comma-separated k: bytes one diagonal of k cells saves")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    for k in filter(None, args.cell.split(",")):
        cfg = build_config(args.size)
        model = CondensationForCausalLM(cfg).to(dtype)
        b = saved_bytes_of_diagonal(model, int(k), True)
        tokens = int(k) * cfg.segment_length
        print(json.dumps({"cell_k": int(k), "saved_bytes": b, "bytes_per_token_layer": b / tokens}), flush=True)
    for L in (int(x) for x in args.lengths.split(",") if x):
        for g in (int(x) for x in args.groups.split(",") if x):
            cfg = build_config(args.size, checkpoint_group_steps=g, **parse_overrides(args.set))
            model = CondensationForCausalLM(cfg).to(dtype).train()
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # as in a graphed step: gradients exist before it
            ids = torch.randint(0, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
            out = {}

            def fwd():
                out["loss"] = model(ids, labels=ids, return_logits=False).loss

            def bwd():
                out.pop("loss").backward()

            t0 = time.perf_counter()
            peak = peak_live_bytes(lambda: (fwd(), bwd()))
            dt = time.perf_counter() - t0
            n_params = sum(p.numel() for p in model.parameters())
            print(json.dumps({"L": L, "group": g, "dtype": args.dtype, "set": args.set, "peak_step_bytes": peak,
                              "params": n_params, "s": round(dt, 1)}), flush=True)


if __name__ == "__main__":
    main()
