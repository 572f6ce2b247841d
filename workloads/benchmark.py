"""Training-step and generation benchmark: Condensation against transformers' LlamaForCausalLM, in one process.

On a GPU (the paper's Table I model, bf16, AdamW):
    python workloads/benchmark.py --out benchmarks/results/h200.json
    ray job submit --working-dir . -- python workloads/benchmark.py --out benchmarks/results/h200.json
The fastest configurations against the baseline, with kernel-time profiles:
    python workloads/benchmark.py --out /tmp/fast.json --profile \
        --cases llama-sdpa,cond-sdpa-l512-compile-graph,cond-sdpa-l512-group8-compile-graph --lengths 4096,32768
    python workloads/benchmark.py --out /tmp/1b.json --profile --lengths 16384 \
        --cases llama-1b-sdpa,cond-1b-l512-deferred-compile-graph
CPU smoke run (tiny sizes, seconds):
    python workloads/benchmark.py --smoke --out /tmp/bench.json

Every configuration runs a full training step (forward, backward, gradient clipping, AdamW step) at each total
length until it runs out of memory; "-graph" cases replay the whole step as one CUDA graph
(condensation.cuda_graph). Peak memory is torch.cuda.max_memory_allocated from after the first step (a graph's
capture included), step time the median of CUDA-synchronised steps after warm-up. Ratios are against Llama-sdpa measured in the same run. Pictures like the
paper's Fig. 5-7 are written beside the JSON, and everything is logged to MLflow when --mlflow-uri is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform as _platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from condensation import CondensationForCausalLM, attention_unavailable_reason
from condensation.flops import matmul_peak_tflops, training_flops
from condensation.sizes import build_config


@dataclass
class Case:
    name: str
    kind: str  # "llama" or "condensation"
    attention: str
    segment_length: int | None = None
    schedule: str = "wavefront"
    checkpoint_cells: bool = False
    compile_cells: bool | str = False
    checkpoint_group_steps: int = 0
    weight_grads: str = "autograd"  # CondensationConfig.weight_grads
    graph: bool = False  # the whole step (forward, backward, AdamW) as one CUDA graph (condensation.cuda_graph)
    size: str = "table1"  # condensation.sizes.MODEL_SIZES
    batch: int = 1
    lengths: list[int] = field(default_factory=list)


def default_cases(smoke: bool) -> list[Case]:
    if smoke:
        L = [64, 128, 256]
        return [
            Case("llama-sdpa", "llama", "sdpa", lengths=L),
            Case("cond-sdpa-l32", "condensation", "sdpa", 32, lengths=L),
            Case("cond-sdpa-l32-seq", "condensation", "sdpa", 32, schedule="sequential", lengths=L),
            Case("cond-sdpa-l32-ckpt", "condensation", "sdpa", 32, checkpoint_cells=True, lengths=L),
            Case("cond-sdpa-l32-graph", "condensation", "sdpa", 32, graph=True, lengths=L),  # eager off CUDA
            Case("cond-sdpa-l32-deferred", "condensation", "sdpa", 32, weight_grads="deferred", lengths=L),
        ]
    short = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    long = [4096, 16384, 65536, 262144, 1048576]
    return [
        Case("llama-sdpa", "llama", "sdpa", lengths=short),
        Case("llama-sdpa-graph", "llama", "sdpa", graph=True, lengths=short[2:6]),
        Case("llama-sdpa-b4", "llama", "sdpa", batch=4, lengths=short[:5]),
        Case("llama-eager", "llama", "eager", lengths=short[:4]),
        Case("llama-flash", "llama", "flash_attention_2", lengths=short),
        Case("cond-sdpa-l256", "condensation", "sdpa", 256, lengths=short[:6]),
        Case("cond-sdpa-l512", "condensation", "sdpa", 512, lengths=short[:6]),
        Case("cond-sdpa-l512-b4", "condensation", "sdpa", 512, batch=4, lengths=short[:5]),
        Case("cond-sdpa-l256-graph", "condensation", "sdpa", 256, graph=True, lengths=short[:6]),
        Case("cond-sdpa-l512-graph", "condensation", "sdpa", 512, graph=True, lengths=short[:6]),
        Case("cond-sdpa-l512-ckpt-graph", "condensation", "sdpa", 512, checkpoint_cells=True, graph=True,
             lengths=long[:4]),
        Case("cond-sdpa-l512-groupckpt", "condensation", "sdpa", 512, checkpoint_cells=True, checkpoint_group_steps=16,
             lengths=long),
        Case("cond-sdpa-l512-groupckpt-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps=16, graph=True, lengths=long),
        Case("cond-flex-l512", "condensation", "flex", 512, lengths=[4096, 16384]),
        Case("cond-flash-l512", "condensation", "flash", 512, lengths=[4096, 16384]),
        Case("cond-eager-l512", "condensation", "eager", 512, lengths=[4096, 16384]),
        Case("cond-sdpa-l512-seq", "condensation", "sdpa", 512, schedule="sequential", lengths=[4096, 16384]),
        Case("cond-sdpa-l512-compile-graph", "condensation", "sdpa", 512, compile_cells=True, graph=True,
             lengths=short[:6]),
        Case("cond-sdpa-l512-ckpt-compile-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             compile_cells=True, graph=True, lengths=long),
        Case("cond-sdpa-l512-groupckpt-compile-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps=16, compile_cells=True, graph=True, lengths=long),
        # group checkpoints alone: a group's recomputation keeps its activations for its backward, so every cell
        # runs forward twice (as with per-step checkpoints, not three times as nested), and memory holds the group
        # frontiers plus one group's activations
        Case("cond-sdpa-l512-deferred-compile-graph", "condensation", "sdpa", 512, weight_grads="deferred",
             compile_cells=True, graph=True, lengths=short[:6]),
        Case("cond-sdpa-l512-group8-compile-graph", "condensation", "sdpa", 512, checkpoint_group_steps=8,
             compile_cells=True, graph=True, lengths=long),
        # a Llama-3.2-1B-shaped model (random weights): model FLOP utilisation at 16K
        Case("llama-1b-sdpa", "llama", "sdpa", size="llama-3.2-1b", lengths=[4096, 16384]),
        Case("cond-1b-l512", "condensation", "sdpa", 512, size="llama-3.2-1b", lengths=[4096, 16384]),
        Case("cond-1b-l512-graph", "condensation", "sdpa", 512, size="llama-3.2-1b", graph=True,
             lengths=[4096, 16384]),
        Case("cond-1b-l512-compile-graph", "condensation", "sdpa", 512, size="llama-3.2-1b", compile_cells=True,
             graph=True, lengths=[4096, 16384]),
        # weight gradients as one GEMM per layer over all tokens (K = L), or accumulated by baddbmm
        Case("cond-1b-l512-deferred-graph", "condensation", "sdpa", 512, size="llama-3.2-1b", weight_grads="deferred",
             graph=True, lengths=[4096, 16384]),
        Case("cond-1b-l512-deferred-compile-graph", "condensation", "sdpa", 512, size="llama-3.2-1b",
             weight_grads="deferred", compile_cells=True, graph=True, lengths=[4096, 16384]),
        Case("cond-1b-l512-accumulate-graph", "condensation", "sdpa", 512, size="llama-3.2-1b",
             weight_grads="accumulate", graph=True, lengths=[4096, 16384]),
        Case("cond-1b-l512-ckpt-compile-graph", "condensation", "sdpa", 512, size="llama-3.2-1b",
             checkpoint_cells=True, compile_cells=True, graph=True, lengths=[16384, 65536]),
    ]


def build_model(case: Case, smoke: bool, device, dtype):
    size = "debug" if smoke else case.size
    cfg = build_config(size, segment_length=case.segment_length or 256, segment_attention=case.attention
                       if case.kind == "condensation" else "sdpa", segment_schedule=case.schedule,
                       checkpoint_cells=case.checkpoint_cells, compile_cells=case.compile_cells,
                       checkpoint_group_steps=case.checkpoint_group_steps, weight_grads=case.weight_grads)
    if case.kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama_cfg = LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k in LlamaConfig().to_dict()})
        llama_cfg._attn_implementation = case.attention
        model = LlamaForCausalLM(llama_cfg)
    else:
        model = CondensationForCausalLM(cfg)
    return model.to(device=device, dtype=dtype)


def flops_per_step(model, case: Case, L: int) -> float:
    return training_flops(model.config, L, case.batch, None if case.kind == "llama" else case.segment_length)


def train_step(model, opt, ids, case):
    if case.kind == "llama":
        loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # as training does; no host sync
    opt.step()
    return loss


def make_runner(case: Case, model, device):
    """A callable running one training step on {"input_ids": ids}; eager, or replaying a captured CUDA graph."""
    graph = case.graph and device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True, capturable=graph)

    def step(batch):
        return train_step(model, opt, batch["input_ids"], case)

    if graph:
        from condensation.cuda_graph import CUDAGraphStep

        return CUDAGraphStep(step, opt, warmup=1)

    def eager(batch):
        opt.zero_grad(set_to_none=True)
        return step(batch)

    return eager


def measure(case: Case, L: int, smoke: bool, device, dtype, steps: int, warmup: int, profile: bool = False) -> dict:
    cuda = device.type == "cuda"
    model = build_model(case, smoke, device, dtype)
    run = make_runner(case, model, device)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (case.batch, L), device=device)}
    try:
        n_steps = 2 if L >= 262144 else steps
        # peak memory counts from after the first (eager) step: optimizer state exists, and a graphed case's capture,
        # which allocates every activation of the step in the graph's pool, falls inside the window
        loss = run(batch)
        first_loss = float(loss.detach())
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(max(warmup - 1, 1 if case.graph else 0)):  # a graphed case captures on its second call
            loss = run(batch)
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(n_steps):
            t0 = time.perf_counter()
            loss = run(batch)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        out = {"status": "ok", "step_s": step, "tokens_per_s": case.batch * L / step, "first_loss": first_loss,
               "loss": float(loss.detach()), "warmup_s": warmup_s}
        out["flops"] = flops_per_step(model, case, L)
        if cuda:
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if profile:
            out["profile"] = profile_step(run, batch)
        return out
    except torch.OutOfMemoryError:
        return {"status": "oom"}
    except RuntimeError as e:  # e.g. a capture that failed: recorded, and the remaining cases still run
        return {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        del model, run, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def profile_step(run, batch) -> dict:
    """GPU kernel time inside one step against its wall time, and the kernels that take the most."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run(batch)
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": wall * 1e3, "kernel_ms": sum(by_name.values()) / 1e3, "kernels": len(kernels),
            "top": [(name[:90], round(us / 1e3, 3)) for name, us in top]}


@torch.no_grad()
def measure_generation(prompt_len: int, segment_length: int, new_tokens: int, smoke: bool, device, dtype) -> dict:
    """Prefill a long prompt segment by segment, then decode `new_tokens` tokens greedily with the bounded cache."""
    cfg = build_config("debug" if smoke else "table1", segment_length=segment_length)
    model = CondensationForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1, cfg.vocab_size, (1, prompt_len), device=device)  # no pad id (0): no inferred padding
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    sync()
    total = time.perf_counter() - t0
    res = {"prompt_tokens": prompt_len, "new_tokens": out.shape[1] - prompt_len, "seconds": total,
           "tokens_per_s": (prompt_len + new_tokens) / total}
    if device.type == "cuda":
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    gc.collect()
    return res


def plot(results: dict, path_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, label, fname in (("peak_gib", "peak memory (GiB)", "memory"), ("tokens_per_s", "tokens / s", "speed")):
        if not any(isinstance(r, dict) and metric in r for rows in results["cases"].values() for r in rows.values()):
            continue  # no memory off CUDA
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rows in results["cases"].items():
            pts = [(int(L), r[metric]) for L, r in rows.items() if isinstance(r, dict) and r.get("status") == "ok"
                   and metric in r]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="s" if name.startswith("llama") else "o", label=name,
                        linestyle="--" if name.startswith("llama") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: Condensation vs Llama ({results['machine']['device']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = path_prefix.with_name(f"{path_prefix.stem}_{fname}.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def ratios_against_llama(results: dict) -> None:
    """Add speed and memory ratios against Llama-sdpa at the same length and batch (measured in the same run)."""
    configs = results["case_configs"]

    def baseline(cfg):  # the plain (eager, not graphed) Llama-sdpa case of the same size and batch
        for name, c in configs.items():
            if (c["kind"], c["attention"], c.get("graph", False)) == ("llama", "sdpa", False) and \
                    c.get("size", "table1") == cfg.get("size", "table1") and c["batch"] == cfg["batch"]:
                return name
        return None

    for name, rows in results["cases"].items():
        base_name = baseline(configs.get(name, {"batch": 1}))
        if base_name in (None, name) or "skipped" in rows:
            continue
        base = results["cases"][base_name]
        for L, r in rows.items():
            b = base.get(L)
            if r.get("status") == "ok" and b and b.get("status") == "ok":
                r["baseline"] = base_name
                r["speed_vs_llama_sdpa"] = r["tokens_per_s"] / b["tokens_per_s"]
                if "peak_gib" in r:
                    r["llama_sdpa_memory_ratio"] = b["peak_gib"] / r["peak_gib"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    ap.add_argument("--out", default="benchmarks/results/benchmark.json")
    ap.add_argument("--cases", default="", help="comma-separated case names to run (default all)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--generation", default="", help="comma-separated prompt lengths for prefill+generate")
    ap.add_argument("--mlflow-uri", default=None)
    ap.add_argument("--lengths", default="", help="comma-separated lengths overriding every case's own")
    ap.add_argument("--profile", action="store_true", help="add GPU kernel time and the top kernels of one step")
    ap.add_argument("--replot", default=None, help="only redraw pictures (and ratios) from an existing JSON")
    args = ap.parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        ratios_against_llama(results)
        Path(args.replot).write_text(json.dumps(results, indent=1))
        return plot(results, Path(args.replot))

    wanted = set(filter(None, args.cases.split(",")))
    unknown = wanted - {c.name for c in default_cases(args.smoke)}
    if unknown:
        ap.error(f"--cases: unknown {sorted(unknown)}; known: {[c.name for c in default_cases(args.smoke)]}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import transformers

    results = {
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else _platform.processor() or "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": _platform.python_version(), "dtype": str(dtype)},
        "model": "debug" if args.smoke else "table1 (cases may name another size)",
        "matmul_peak_tflops": matmul_peak_tflops(device, dtype),
        "cases": {}, "case_configs": {}, "generation": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in default_cases(args.smoke):
        if wanted and case.name not in wanted:
            continue
        reason = None
        if case.kind == "condensation":
            reason = attention_unavailable_reason(case.attention, device, backward=True)
        elif case.attention == "flash_attention_2":
            reason = attention_unavailable_reason("flash", device)
        if reason:
            results["cases"][case.name] = {"skipped": reason}
            print(json.dumps({"case": case.name, "skipped": reason}), flush=True)
            continue
        results["case_configs"][case.name] = asdict(case)
        rows = results["cases"].setdefault(case.name, {})
        lengths = [int(x) for x in args.lengths.split(",") if x] or case.lengths
        for L in lengths:
            r = measure(case, L, args.smoke, device, dtype, args.steps, args.warmup, args.profile)
            if r["status"] == "ok" and results["matmul_peak_tflops"]:
                r["mfu"] = r["flops"] / r["step_s"] / 1e12 / results["matmul_peak_tflops"]
            rows[str(L)] = r
            print(json.dumps({"case": case.name, "L": L, **r}), flush=True)
            out.write_text(json.dumps(results, indent=1))  # a crash or timeout later keeps what was measured
            if r["status"] != "ok":
                break
    ratios_against_llama(results)
    for p in filter(None, args.generation.split(",")):
        g = measure_generation(int(p), 32 if args.smoke else 512, 16 if args.smoke else 256, args.smoke, device, dtype)
        results["generation"].append(g)
        print(json.dumps({"generation": g}), flush=True)

    out.write_text(json.dumps(results, indent=1))
    pictures = plot(results, out)
    print(f"wrote {out} and {', '.join(map(str, pictures))}")
    if args.mlflow_uri:
        import mlflow

        mlflow.set_tracking_uri(args.mlflow_uri)
        mlflow.set_experiment("benchmark")
        with mlflow.start_run(run_name=out.stem):
            mlflow.log_params(results["machine"])
            for name, rows in results["cases"].items():
                for L, r in rows.items():
                    if isinstance(r, dict) and r.get("status") == "ok":
                        mlflow.log_metric(f"{name}/tokens_per_s", r["tokens_per_s"], step=int(L))
                        if "peak_gib" in r:
                            mlflow.log_metric(f"{name}/peak_gib", r["peak_gib"], step=int(L))
            mlflow.log_artifact(str(out))
            for p in pictures:
                mlflow.log_artifact(str(p))
    return results


if __name__ == "__main__":
    main()
