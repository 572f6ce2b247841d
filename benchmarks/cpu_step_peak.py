"""Where the peak of one whole training step goes, on CPU, by allocation site: a benchmark case's own step (forward,
fused loss, backward, gradient clipping, AdamW) as workloads/benchmark.py runs it, measured after a first step so
that the optimizer state exists (as the benchmark's peak window), with gradients set to None before it (as both the
eager runner and CUDAGraphStep's capture do).

    PYTHONPATH=platform:tests OMP_NUM_THREADS=1 python benchmarks/cpu_step_peak.py \
        --case cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph --size smollm2-135m --length 16384

How: a TorchDispatchMode sees every tensor an op returns; a storage that is none of the op's inputs' is a new
allocation, charged to the innermost frame of this project (or the autograd node running it in backward) and
uncharged when the storage dies (a weakref finalizer on its Python object, which PyTorch keeps as long as the
storage lives). Replaying those events finds the step's peak and what was live then. Memory allocated before the
step (parameters, AdamW's exp_avg / exp_avg_sq) is added from the model and optimizer. Op-internal scratch (a
kernel's workspace freed before it returns) is not seen; --profiler also runs the CPU allocator's own count
(tests/memory_probe.py) over the same step to compare. compile_cells is turned off unless --compile (inductor's
buffers are allocated outside the dispatcher, so a compiled piece's saved tensors would be charged to it only as
they leave it).

--gpu-ce: on a GPU the fused loss's cross-entropy gradient is one Triton program per row, in place in the bf16
[chunk, V] logits (kernels.cross_entropy_grad_); on CPU its torch fallback makes a float32 copy of the whole chunk
first (1.05 GB at 2048 tokens of a 128K vocabulary, twice the logits), which can be the CPU step's peak but is not the
GPU's. With --gpu-ce the fallback runs a few rows at a time, in place as the GPU does
(tests/memory_probe.py's row_chunked_cross_entropy_grad_: the same values, a scratch of a few float32 rows)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
OURS = ("/condensation/", "/workloads/", "/benchmarks/", "/torch/optim/", "/torch/nn/utils/clip_grad",
        "/torch/utils/checkpoint")


def _site() -> str:
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if any(p in fn for p in OURS) and not fn.endswith("cpu_step_peak.py"):
            return f"{fn.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "other"


class AllocTracker(TorchDispatchMode):
    """Alloc / free events of the storages ops return (see the module's docstring)."""

    def __init__(self, min_bytes: int = 1 << 16):
        super().__init__()
        self.events: list[tuple[int, int, str]] = []  # (serial, +bytes or -bytes, site)
        self.live: dict[int, tuple[int, int]] = {}  # data_ptr -> (serial, bytes)
        self.serial = 0
        self.phase = "forward"  # "backward" from the fused loss's backward (the first node) on (main)
        self.min_bytes = min_bytes

    def _free(self, ptr: int, serial: int) -> None:
        cur = self.live.get(ptr)
        if cur is not None and cur[0] == serial:
            del self.live[ptr]
            self.events.append((serial, -cur[1], ""))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            ptr, nb = s.data_ptr(), s.nbytes()
            if nb == 0 or ptr in ins or ptr in self.live:
                continue
            self.serial += 1
            if nb >= self.min_bytes:
                node = torch._C._current_autograd_node()
                where = _site()
                site = f"{self.phase}| {where} | {func.__name__}" + (f" <{node.name()}>" if node is not None else "")
            else:
                site = f"{self.phase}| small"
            self.live[ptr] = (self.serial, nb)
            self.events.append((self.serial, nb, site))
            weakref.finalize(s, self._free, ptr, self.serial)
        return out

    def peak(self, grads: set[int] | None = None) -> dict:
        total = peak = peak_at = 0
        forward_peak, in_forward = 0, True  # the forward's peak (with the fused loss's), before backward's
        for i, (_, nb, site) in enumerate(self.events):
            total += nb
            in_forward = in_forward and not site.startswith("backward|")
            if in_forward:
                forward_peak = max(forward_peak, total)
            if total > peak:
                peak, peak_at = total, i
        live: dict[int, tuple[int, str]] = {}
        for serial, nb, site in self.events[: peak_at + 1]:
            if nb > 0:
                live[serial] = (nb, site)
            else:
                live.pop(serial, None)
        sites: dict[str, int] = defaultdict(int)
        for nb, site in live.values():
            sites[site] += nb
        return {"peak_bytes": peak, "forward_peak_bytes": forward_peak, "peak_event": peak_at,
                "events": len(self.events), "end_bytes": total, "peak_site": self.events[peak_at][2],
                "live_at_peak": sorted(sites.items(), key=lambda kv: -kv[1])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph")
    ap.add_argument("--size", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--set", action="append", default=[], help="Case field override key=value (repeatable)")
    ap.add_argument("--compile", action="store_true", help="keep the case's compile_cells")
    ap.add_argument("--profiler", action="store_true", help="also the CPU allocator's peak (tests/memory_probe.py)")
    ap.add_argument("--no-track", action="store_true", help="only the profiler's peak (e.g. with --compile)")
    ap.add_argument("--gpu-ce", action="store_true", help="the loss's CE gradient in place, a few rows at a time, as "
                    "the GPU's Triton kernel (no float32 copy of a whole [chunk, V] logits chunk)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "workloads"))
    import dataclasses

    import yaml

    from benchmark import build_model, default_cases, make_runner

    case = next(c for c in default_cases(False) if c.name == args.case)
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    case = dataclasses.replace(case, size=args.size, **over, **({} if args.compile else {"compile_cells": False}))
    sys.path.insert(0, str(ROOT / "tests"))
    import condensation.fast_train as fast_train
    from memory_probe import peak_live_bytes, row_chunked_cross_entropy_grad_

    if args.gpu_ce:
        fast_train.cross_entropy_grad_ = row_chunked_cross_entropy_grad_
    torch.manual_seed(0)
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    model = build_model(case, False, device, dtype)
    run = make_runner(case, model, device)  # eager on CPU: zero_grad(set_to_none=True), then the step
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (case.batch, args.length),
                                        generator=torch.Generator().manual_seed(0))}
    t0 = time.perf_counter()
    loss0 = float(run(batch).detach())
    first_s = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # make_runner's eager step closes over its optimizer
    opt = next(c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, torch.optim.Optimizer))
    opt_state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if isinstance(t, torch.Tensor))
    old_grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    tracker = AllocTracker()
    # CausalBias (sdpa's lower-right mask) is a Tensor subclass whose construction fails under a dispatch mode: made
    # outside it (it holds no data)
    import torch.nn.attention.bias as bias
    from torch.utils._python_dispatch import _disable_current_modes

    lower_right = bias.causal_lower_right

    def causal_lower_right(*a):
        with _disable_current_modes():
            return lower_right(*a)

    bias.causal_lower_right = causal_lower_right
    # the fused loss's backward is the first node of backward: allocations from there on are charged to "backward"
    loss_backward = fast_train.NormLinearCrossEntropy.backward

    def backward_marked(ctx, *grads):
        tracker.phase = "backward"
        return loss_backward(ctx, *grads)

    fast_train.NormLinearCrossEntropy.backward = staticmethod(backward_marked)
    if args.no_track:

        peak = peak_live_bytes(lambda: run(batch))
        print(json.dumps({"case": case.name, "size": args.size, "length": args.length, "set": args.set,
                          "gpu_ce": args.gpu_ce,
                          "compile_cells": case.compile_cells, "params_bytes": params, "opt_state_bytes": opt_state,
                          "first_step_s": round(first_s, 1), "profiler_peak_step_bytes": peak,
                          "predicted_gpu_peak_gib": (params + opt_state + peak) / 2**30}, indent=1))
        return
    t0 = time.perf_counter()
    with tracker:
        loss1 = float(run(batch).detach())  # zero_grad(set_to_none=True) frees the first step's gradients first
    fast_train.NormLinearCrossEntropy.backward = staticmethod(loss_backward)
    step_s = time.perf_counter() - t0
    grad_ptrs = {p.grad.untyped_storage().data_ptr(): n for n, p in model.named_parameters() if p.grad is not None}
    res = tracker.peak()
    res["live_at_peak"] = [(s, b) for s, b in res["live_at_peak"]]
    out = {"case": case.name, "size": args.size, "length": args.length, "dtype": args.dtype, "set": args.set,
           "gpu_ce": args.gpu_ce,
           "compile_cells": case.compile_cells, "params_bytes": params, "opt_state_bytes": opt_state,
           "grads_before_step_bytes": old_grads, "first_loss": loss0, "loss": loss1, "first_step_s": round(first_s, 1),
           "tracked_step_s": round(step_s, 1), "peak_step_bytes": res["peak_bytes"],
           "forward_peak_step_bytes": res["forward_peak_bytes"],
           "predicted_gpu_peak_gib": (params + opt_state + res["peak_bytes"]) / 2**30,
           "end_of_step_bytes": res["end_bytes"], "peak_site": res["peak_site"], "events": res["events"],
           "grads_after_step_bytes": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                         if p.grad is not None),
           "live_at_peak": res["live_at_peak"][: args.top]}
    if args.profiler:

        out["profiler_peak_step_bytes"] = peak_live_bytes(lambda: run(batch))
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
