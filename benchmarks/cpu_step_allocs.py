"""One training step of a benchmark case on CPU (the second step): the CPU allocator's peak, the bytes allocated in all,
and the allocations the size of a whole stacked projection (SliceBackward's zero-padded gradients, before s12-stackgrad).

    PYTHONPATH=platform:tests OMP_NUM_THREADS=1 python benchmarks/cpu_step_allocs.py CASE LENGTH COMPILE(0|1)"""
import dataclasses, json, sys, time
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile
ROOT = Path.cwd()
sys.path.insert(0, str(ROOT / "workloads"))
from benchmark import build_model, default_cases, make_runner
import condensation.fast_train as fast_train
from memory_probe import row_chunked_cross_entropy_grad_
fast_train.cross_entropy_grad_ = row_chunked_cross_entropy_grad_
name, length, comp = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
case = next(c for c in default_cases(False) if c.name == name)
case = dataclasses.replace(case, size="smollm2-135m", **({} if comp else {"compile_cells": False}))
torch.manual_seed(0)
model = build_model(case, False, torch.device("cpu"), torch.bfloat16)
run = make_runner(case, model, torch.device("cpu"))
batch = {"input_ids": torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))}
run(batch)
sizes = {p.numel() * p.element_size() for p in model.model.layer_stack.projections().values()}
t0 = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    loss = float(run(batch).detach())
dt = time.perf_counter() - t0
ev = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
now = peak = total = 0
stack_sized = 0
for e in ev:
    now += e.nbytes(); peak = max(peak, now)
    if e.nbytes() > 0:
        total += e.nbytes(); stack_sized += e.nbytes() in sizes
print(json.dumps(dict(case=name, length=length, compile=comp, loss=loss, step_s=round(dt, 1), peak_step_bytes=peak,
                      allocated_bytes=total, stack_sized_allocs=stack_sized)))
