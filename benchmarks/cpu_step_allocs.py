"""One training step of a benchmark case on CPU (its second step, as the benchmark measures): the CPU allocator's
peak, the bytes allocated in all, and how many allocations were the size of a whole stacked projection (each partial
range's zero-padded gradient before the stacked ranges' gradients went into one buffer; cpu_stackgrad_s12.md).

    PYTHONPATH=platform:tests OMP_NUM_THREADS=1 python benchmarks/cpu_step_allocs.py \
        --case cond-sdpa-l512-ckpt-groupauto-stacked-compile-graph --size smollm2-135m --length 4096

The fused loss's CE gradient runs a few rows at a time, in place, as on the GPU (cpu_step_peak.py --gpu-ce)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workloads"))
from benchmark import build_model, default_cases, make_runner  # noqa: E402

import condensation.fast_train as fast_train  # noqa: E402
from memory_probe import row_chunked_cross_entropy_grad_  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", required=True, help="a case of workloads/benchmark.py (it must use stacked_params)")
    ap.add_argument("--size", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--compile", action="store_true", help="keep the case's compile_cells (off by default)")
    args = ap.parse_args(argv)
    fast_train.cross_entropy_grad_ = row_chunked_cross_entropy_grad_
    case = next(c for c in default_cases(False) if c.name == args.case)
    case = dataclasses.replace(case, size=args.size, **({} if args.compile else {"compile_cells": False}))
    torch.manual_seed(0)
    model = build_model(case, False, torch.device("cpu"), torch.bfloat16)
    run = make_runner(case, model, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    run(batch)  # the first step makes AdamW's state
    sizes = {p.numel() * p.element_size() for p in model.model.layer_stack.projections().values()}
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = float(run(batch).detach())
    step_s = time.perf_counter() - t0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = total = stack_sized = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
        if e.nbytes() > 0:
            total += e.nbytes()
            stack_sized += e.nbytes() in sizes
    print(json.dumps(dict(case=args.case, size=args.size, length=args.length, compile=args.compile, loss=loss,
                          step_s=round(step_s, 1), peak_step_bytes=peak, allocated_bytes=total,
                          stack_sized_allocs=stack_sized)))


if __name__ == "__main__":
    main()
