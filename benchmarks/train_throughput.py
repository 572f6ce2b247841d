"""Ray Train + DeepSpeed (what `workloads/pretrain.py` runs) against the model's own benchmark, in one run, on GPUs.

    python benchmarks/train_throughput.py --out benchmarks/results/h200_train.json                  # Table I model
    python benchmarks/train_throughput.py --size llama-3.2-1b --lengths 16384 --batches 1 --workers 2 \
        --out benchmarks/results/h200_train_1b.json

For each (length, batch): the benchmark's training step of the same model configuration (compiled cells, deferred
weight gradients, bf16, AdamW; eager and as one CUDA graph) in this process, then `fit()` with
`configs/table1_h200.yaml` on 1 GPU and on N GPUs (ZeRO-2 over NCCL, per-worker batch fixed, so the global batch
grows with N). The training figure is the last logged interval's tokens/s (after compilation and warm-up). Printed
ratios: 1-GPU training against the benchmark's best case, and N-GPU training against N x the 1-GPU training figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform as _platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "workloads" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = mod  # its dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


def bench_cases(bench, size: str, batch: int, segment: int, overrides: dict):
    kw = dict(compile_cells=overrides.get("compile_cells", False), weight_grads=overrides.get("weight_grads", "autograd"),
              checkpoint_group_steps=overrides.get("checkpoint_group_steps", 0), size=size, batch=batch)
    return [bench.Case(f"bench-eager-b{batch}", "condensation", "sdpa", segment, **kw),
            bench.Case(f"bench-graph-b{batch}", "condensation", "sdpa", segment, graph=True, **kw)]


def train_once(config: str, size: str, L: int, batch: int, workers: int, steps: int, storage: str, extra: list[str]):
    from condensation.config import load_config
    from condensation.train import fit

    name = f"{size}-L{L}-b{batch}-w{workers}"
    cfg = load_config(yaml_path=config, overrides=[
        f"model.size={size}", f"data.seq_len={L}", f"data.num_rows={max(64, 8 * batch * workers)}",
        f"schedule.per_worker_batch={batch}", f"schedule.num_workers={workers}",
        f"schedule.global_batch={batch * workers}", f"schedule.total_steps={steps}", f"optim.warmup_steps={min(5, steps)}",
        f"tracking.log_every={steps // 2}", "checkpoint.every=0", "checkpoint.export_hf=false",
        f"run.storage={storage}", f"run.name={name}", *extra])
    t0 = time.time()
    res = fit(cfg)
    m = res.metrics
    return {"tokens_per_s": m["tokens_per_s"], "step_time_s": m["step_time_s"], "mfu": m.get("mfu"),
            "peak_memory_gib": m["peak_memory_gib"], "loss": m["loss"], "ranks_in_sync": m["ranks_in_sync"],
            "wall_s": time.time() - t0, "steps": steps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "table1_h200.yaml"))
    ap.add_argument("--size", default="table1")
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--workers", default="1,2", help="GPU counts to train on (the first should be 1)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-bench", action="store_true", help="training only")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value for the training config")
    args = ap.parse_args(argv)

    import ray
    import transformers

    from condensation.config import load_config

    bench = load_benchmark()
    mo = load_config(yaml_path=args.config, overrides=args.overrides).model
    segment = mo.segment_length or 512
    device, dtype = torch.device("cuda"), torch.bfloat16
    import deepspeed

    results = {"machine": {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "deepspeed": deepspeed.__version__, "ray": ray.__version__,
                           "python": _platform.python_version()},
               "config": args.config, "size": args.size, "segment_length": segment, "model_overrides": mo.overrides,
               "matmul_peak_tflops": bench.matmul_peak_tflops(device, dtype), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    storage = tempfile.mkdtemp(prefix="train-throughput-")
    for L in [int(x) for x in args.lengths.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            row = {"length": L, "batch": B, "bench": {}, "train": {}}
            if not args.no_bench:
                for case in bench_cases(bench, args.size, B, segment, mo.overrides):
                    r = bench.measure(case, L, False, device, dtype, steps=5, warmup=2)
                    if r["status"] == "ok":
                        r["mfu"] = r["flops"] / r["step_s"] / 1e12 / results["matmul_peak_tflops"]
                    row["bench"][case.name] = {k: r.get(k) for k in ("status", "tokens_per_s", "peak_gib", "mfu", "error")}
                    print(json.dumps({"L": L, "batch": B, "case": case.name, **row["bench"][case.name]}), flush=True)
                torch.cuda.empty_cache()
            if not ray.is_initialized():
                ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False,
                         log_to_driver=True)
            for W in [int(x) for x in args.workers.split(",")]:
                if W > torch.cuda.device_count():
                    continue
                try:
                    r = train_once(args.config, args.size, L, B, W, args.steps, storage, args.overrides)
                except Exception as e:  # recorded; the other configurations still run
                    r = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                row["train"][str(W)] = r
                print(json.dumps({"L": L, "batch": B, "workers": W, **r}), flush=True)
            ok = [b["tokens_per_s"] for b in row["bench"].values() if b.get("status") == "ok"]
            one = row["train"].get("1", {}).get("tokens_per_s")
            if ok and one:
                row["train_vs_best_bench"] = one / max(ok)
            for W, r in row["train"].items():
                if one and W != "1" and "tokens_per_s" in r:
                    r["scaling_vs_n_x_1gpu"] = r["tokens_per_s"] / (int(W) * one)
            results["rows"].append(row)
            out.write_text(json.dumps(results, indent=1))
    print("\nlength batch | bench best tok/s | train 1 GPU tok/s (ratio) | N GPUs tok/s (vs N x 1 GPU)")
    for row in results["rows"]:
        ok = [b["tokens_per_s"] for b in row["bench"].values() if b.get("status") == "ok"]
        one = row["train"].get("1", {})
        multi = " ".join(f"{W}: {r.get('tokens_per_s', 0):.0f} ({r.get('scaling_vs_n_x_1gpu', 0):.2f})"
                         for W, r in row["train"].items() if W != "1")
        print(f"{row['length']:>6} {row['batch']:>5} | {max(ok) if ok else 0:>10.0f} | "
              f"{one.get('tokens_per_s', 0):>10.0f} ({row.get('train_vs_best_bench', 0):.2f}) | {multi}")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
