"""Where the peak memory of one training step goes, by allocation site (CUDA only).

    python benchmarks/memory_breakdown.py --length 262144 --set checkpoint_group_steps=8 \
        --out benchmarks/results/h200_s3_memory_256k.json

Cells run eagerly here: with compile_cells, recording the allocator history once made a compiled autograd Function
fail (SystemError) on torch 2.11. Compiled cells save other (fewer) intermediates inside a cell; the tensors that
scale with the sequence length are the same.

Builds the Table I model with the given CondensationConfig overrides, runs one eager training step (forward, the
fused loss, backward, AdamW) so that the optimizer state exists, then records the CUDA allocator's history over a
second step. Replaying that history finds the moment of peak allocated memory; the blocks live then are grouped by
the innermost frame of this project (condensation/, workloads/, benchmarks/) that allocated them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from condensation import CondensationForCausalLM
from condensation.config import parse_overrides
from condensation.sizes import build_config

OURS = ("condensation/", "workloads/", "benchmarks/")


def _site(frames: list[dict]) -> str:
    for f in frames:
        if any(part in f["filename"] for part in OURS):
            return f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
    return "other (" + (frames[0]["name"] if frames else "no frames") + ")"


def peak_breakdown(trace: list[dict]) -> dict:
    """Replay alloc/free events; return the peak and the live bytes per allocation site at that moment."""
    live: dict[int, int] = {}
    total = peak = peak_at = 0
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])
    sites: dict[str, int] = defaultdict(int)
    live_at: dict[int, tuple[int, str]] = {}
    for ev in trace[: peak_at + 1]:
        if ev["action"] == "alloc":
            live_at[ev["addr"]] = (ev["size"], _site(ev.get("frames", [])))
        elif ev["action"] == "free_completed":
            live_at.pop(ev["addr"], None)
    for size, site in live_at.values():
        sites[site] += size
    top = sorted(sites.items(), key=lambda kv: -kv[1])[:25]
    return {"peak_in_step_gib": peak / 2**30, "peak_event": peak_at, "events": len(trace),
            "live_at_peak": [{"site": site, "gib": round(b / 2**30, 4), "bytes": b} for site, b in top]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1048576)
    ap.add_argument("--size", default="table1")
    ap.add_argument("--set", action="append", default=[], help="CondensationConfig override key=value (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/memory_breakdown.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (it reads the CUDA allocator's history)")
    overrides = {"segment_length": 512, **parse_overrides(args.set)}  # key=value, values read as YAML
    cfg = build_config(args.size, **overrides)
    model = CondensationForCausalLM(cfg).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    ids = torch.randint(0, cfg.vocab_size, (1, args.length), device="cuda")

    def step():
        model(ids, labels=ids, return_logits=False).loss.backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)  # the recorded step allocates its gradients afresh
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = [ev for dev in snap["device_traces"] for ev in dev]
    res = {"length": args.length, "size": args.size, "overrides": overrides,
           "allocated_before_step_gib": base / 2**30,
           "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
           "torch": torch.__version__, "device": torch.cuda.get_device_name(), **peak_breakdown(trace)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
