"""Ray Train (what `workloads/pretrain.py` runs), each engine, against the model's own benchmark, in one run, on GPUs.

    python benchmarks/train_throughput.py --out benchmarks/results/h200_train.json        # Table I, 1 GPU, < 5 min
    python benchmarks/train_throughput.py --engines torch-graph --workers 1,2 --lengths 4096 --batches 4 \
        --out benchmarks/results/h200_train_2gpu.json                                         # scaling over GPUs

For each (length, batch) of Table I's model in the configuration of `--config` (compiled cells, deferred weight
gradients, bf16, AdamW, clipping):
1. the benchmark's training step in this process (`workloads/benchmark.py`): eager, and as one CUDA graph;
2. `fit()` on 1 GPU (and N, with --workers) with each engine variant (`--engines`):
   - `deepspeed`: ZeRO-2, eager (its step cannot be captured);
   - `torch`: the torch engine, eager;
   - `torch-graph`: the torch engine, two CUDA graphs a step (schedule.cuda_graph).
The training figure is the last logged interval's tokens/s (steps/2 .. steps, after compilation and capture). Ratios:
each training figure against the benchmark's best case (the issue-11 target: >= 0.90) and against the benchmark case
of its own kind (eager against eager, graph against graph); N GPUs against N x the same engine on 1 GPU.

Time: the benchmark cases first (they also warm the compile cache the workers read), then the training runs in the
order of `--engines` over all shapes, so that a run cut by `--budget-s` loses the last engine's rows, not a shape.
A training run is not started once the budget cannot hold it (its estimate: the longest run so far); what was
skipped is printed with the command that measures it. MLflow is off in these runs (it changes no step, only the
wall time; `--mlflow` turns it on).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform as _platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# engine variant -> its config overrides (cuda_graph needs one micro-batch a step: global batch = batch x workers)
VARIANTS = {
    "deepspeed": ["schedule.engine=deepspeed"],
    "torch": ["schedule.engine=torch"],
    "torch-graph": ["schedule.engine=torch", "schedule.cuda_graph=true"],
    # not in the default set: AdamW on the bf16 weights as the benchmark steps them (memory and traffic alike; for
    # telling the cost of fp32 master weights apart, not for training)
    "torch-graph-bf16": ["schedule.engine=torch", "schedule.cuda_graph=true", "schedule.master_weights=false"],
}
# which benchmark case a variant is compared with besides the best one
SAME_KIND = {"deepspeed": "eager", "torch": "eager", "torch-graph": "graph", "torch-graph-bf16": "graph"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "workloads" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = mod  # its dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


def bench_cases(bench, size: str, batch: int, segment: int, overrides: dict) -> dict:
    kw = dict(compile_cells=overrides.get("compile_cells", False),
              weight_grads=overrides.get("weight_grads", "autograd"),
              checkpoint_group_steps=overrides.get("checkpoint_group_steps", 0), size=size, batch=batch)
    return {"eager": bench.Case(f"bench-eager-b{batch}", "condensation", "sdpa", segment, **kw),
            "graph": bench.Case(f"bench-graph-b{batch}", "condensation", "sdpa", segment, graph=True, **kw)}


def train_config(config: str, size: str, L: int, batch: int, workers: int, steps: int, storage: str, variant: str,
                 peak_tflops: float | None, mlflow: bool, extra: list[str]):
    """The run's TrainConfig: `config` at this shape and engine, one checkpoint at the end, no HF export."""
    from condensation.config import load_config

    name = f"{variant}-{size}-L{L}-b{batch}-w{workers}"
    return load_config(yaml_path=config, overrides=[
        f"model.size={size}", f"data.seq_len={L}",
        f"data.num_rows={steps * batch * workers + 8}",  # one epoch covers the run: no pipeline restart in the window
        f"schedule.per_worker_batch={batch}", f"schedule.num_workers={workers}",
        f"schedule.global_batch={batch * workers}", f"schedule.total_steps={steps}",
        f"optim.warmup_steps={min(5, steps)}",
        f"tracking.log_every={steps // 2}", "checkpoint.every=0", "checkpoint.export_hf=false",
        f"tracking.enabled={str(mlflow).lower()}", *([f"tracking.peak_tflops={peak_tflops}"] if peak_tflops else []),
        f"run.storage={storage}", f"run.name={name}", *VARIANTS[variant], *extra])


def train_once(cfg) -> dict:
    from condensation.train import fit

    t0 = time.time()
    try:
        res = fit(cfg)
    finally:  # the final checkpoint (~2 GB of optimizer state for Table I) is not kept
        shutil.rmtree(cfg.run.run_dir, ignore_errors=True)
    m = res.metrics
    return {"tokens_per_s": m["tokens_per_s"], "step_time_s": m["step_time_s"], "mfu": m.get("mfu"),
            "peak_memory_gib": m["peak_memory_gib"], "loss": m["loss"], "ranks_in_sync": m["ranks_in_sync"],
            "wall_s": time.time() - t0, "steps": cfg.schedule.total_steps}


def _k(x) -> str:
    return f"{x / 1e3:.0f}K" if x else "-"


def summarize(results: dict) -> list[str]:
    """One line per (length, batch): the benchmark cases, then each variant's tokens/s, peak GiB, ratio to the best
    benchmark case and (in brackets) to the benchmark case of its own kind."""
    variants = results["engines"]
    lines = ["length batch | bench eager | bench graph | " + " | ".join(f"{v} (x best, x same kind)" for v in variants)]
    for row in results["rows"]:
        b = row["bench"]
        cells = [f"{_k(b.get(c, {}).get('tokens_per_s'))} {b.get(c, {}).get('peak_gib') or 0:.1f}G"
                 for c in ("eager", "graph")]
        for v in variants:
            r = row["train"].get(v, {}).get("1", {})
            if "tokens_per_s" in r:
                cells.append(f"{_k(r['tokens_per_s'])} {r['peak_memory_gib']:.1f}G {r.get('vs_best_bench', 0):.2f} "
                             f"({r.get('vs_same_kind_bench', 0):.2f})")
            else:
                cells.append(r.get("skipped") or r.get("error", "-")[:40])
        lines.append(f"{row['length']:>6} {row['batch']:>5} | " + " | ".join(cells))
        for v in variants:
            for W, r in row["train"].get(v, {}).items():
                if W != "1" and "scaling_vs_n_x_1gpu" in r:
                    lines.append(f"{'':>12} | {v} on {W} GPUs: {_k(r['tokens_per_s'])} = "
                                 f"{r['scaling_vs_n_x_1gpu']:.2f} x ({W} x 1 GPU)")
    return lines


def add_ratios(results: dict) -> None:
    for row in results["rows"]:
        ok = {k: b["tokens_per_s"] for k, b in row["bench"].items() if b.get("status") == "ok"}
        for v, per_w in row["train"].items():
            one = per_w.get("1", {}).get("tokens_per_s")
            for W, r in per_w.items():
                if "tokens_per_s" not in r:
                    continue
                if W == "1" and ok:
                    r["vs_best_bench"] = r["tokens_per_s"] / max(ok.values())
                    if SAME_KIND[v] in ok:
                        r["vs_same_kind_bench"] = r["tokens_per_s"] / ok[SAME_KIND[v]]
                if W != "1" and one:
                    r["scaling_vs_n_x_1gpu"] = r["tokens_per_s"] / (int(W) * one)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "table1_h200.yaml"))
    ap.add_argument("--size", default="table1")
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--engines", default="torch-graph,torch,deepspeed",
                    help=f"variants, measured in this order: {list(VARIANTS)}")
    ap.add_argument("--workers", default="1", help="GPU counts to train on (the first must be 1)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps a run; the second half is measured")
    ap.add_argument("--budget-s", type=float, default=285.0, help="no training run starts that would end after this")
    ap.add_argument("--no-bench", action="store_true", help="training only")
    ap.add_argument("--mlflow", action="store_true", help="log the training runs to MLflow (the default store)")
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    ap.add_argument("overrides", nargs="*", help="extra key.sub=value for the training config")
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(VARIANTS):
        ap.error(f"--engines: unknown {sorted(unknown)}; known: {list(VARIANTS)}")
    workers = [int(x) for x in args.workers.split(",")]
    if workers[0] != 1:
        ap.error("--workers: the first count must be 1 (the other counts are compared with it)")
    shapes = [(int(L), int(B)) for L in args.lengths.split(",") for B in args.batches.split(",")]

    t_start = time.time()
    import ray
    import transformers

    from condensation.config import load_config

    bench = load_benchmark()
    mo = load_config(yaml_path=args.config, overrides=args.overrides).model
    segment = mo.segment_length or 512
    device, dtype = torch.device("cuda"), torch.bfloat16
    peak = bench.matmul_peak_tflops(device, dtype)
    import deepspeed

    results = {"machine": {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "deepspeed": deepspeed.__version__, "ray": ray.__version__,
                           "python": _platform.python_version()},
               "config": args.config, "size": args.size, "segment_length": segment, "model_overrides": mo.overrides,
               "engines": engines, "steps": args.steps, "matmul_peak_tflops": peak, "rows": [], "skipped": []}
    rows = {s: {"length": s[0], "batch": s[1], "bench": {}, "train": {}} for s in shapes}
    results["rows"] = list(rows.values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        add_ratios(results)
        results["wall_s"] = time.time() - t_start
        out.write_text(json.dumps(results, indent=1))

    if not args.no_bench:
        for (L, B), row in rows.items():
            for kind, case in bench_cases(bench, args.size, B, segment, mo.overrides).items():
                t0 = time.time()
                r = bench.measure(case, L, False, device, dtype, steps=5, warmup=2)
                if r["status"] == "ok":
                    r["mfu"] = r["flops"] / r["step_s"] / 1e12 / peak
                row["bench"][kind] = {**{k: r.get(k) for k in ("status", "tokens_per_s", "peak_gib", "mfu", "error")},
                                      "wall_s": time.time() - t0}
                print(json.dumps({"L": L, "batch": B, "bench": kind, **row["bench"][kind]}), flush=True)
            torch.cuda.empty_cache()
            write()

    from condensation.train.runtime import init_ray, shutdown_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray, as the tests start it
    # with its own dashboard, which Ray Train's placement-group cleaner asks (without one it printed "Failed to query
    # Ray Train Controller actor state" every few seconds of the 2-GPU runs, session 11)
    init_ray(None, joining=False, use_gpu=True)
    storage = tempfile.mkdtemp(prefix="train-throughput-")
    longest = 0.0
    for variant in engines:
        for (L, B), row in rows.items():
            for W in workers:
                cell = row["train"].setdefault(variant, {})
                if W > torch.cuda.device_count():
                    cell[str(W)] = {"skipped": f"{W} GPUs asked, {torch.cuda.device_count()} here"}
                    continue
                elapsed = time.time() - t_start
                if elapsed + max(longest, 45.0) > args.budget_s:  # a first run: Ray start, compile, save
                    cell[str(W)] = {"skipped": "time budget"}
                    results["skipped"].append(f"--engines {variant} --lengths {L} --batches {B} --workers {W}")
                    continue
                try:
                    r = train_once(train_config(args.config, args.size, L, B, W, args.steps, storage, variant, peak,
                                                args.mlflow, args.overrides))
                    longest = max(longest, r["wall_s"])
                except Exception as e:  # recorded; the other configurations still run
                    r = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                cell[str(W)] = r
                print(json.dumps({"L": L, "batch": B, "engine": variant, "workers": W, **r}), flush=True)
                write()
    shutil.rmtree(storage, ignore_errors=True)
    shutdown_ray()
    write()
    print()
    for line in summarize(results):
        print(line)
    if results["skipped"]:
        print(f"\nskipped for the time budget ({args.budget_s:.0f} s); measure them with:")
        for s in results["skipped"]:
            print(f"  python benchmarks/train_throughput.py {s} --out /tmp/rest.json")
    print(f"wrote {out} in {time.time() - t_start:.0f} s")
    return results


if __name__ == "__main__":
    main()
