"""Tokens per second of the data pipeline's tokenize + pack on this machine (local Ray, 2 CPUs).

    .venv/bin/python workloads/data_benchmark.py --out benchmarks/results/data_pipeline_cpu.json

Corpus: CPython's `pydoc_data.topics` (real English, no download) written `--copies` times to a local jsonl,
each copy's documents suffixed with the copy number so no two are identical. Measured:
- `ray_pipeline`: `pretraining_dataset` end to end (read jsonl -> validate -> tokenize -> length filter ->
  cut into `--seq-len` sequences) consumed with `iter_batches`; the first pass warms Ray's workers up
  (their start-up is reported separately), then `--repeats` timed passes; tokens/s = emitted tokens / wall s
  of a pass; tokens_per_task_cpu_s = emitted tokens / CPU seconds inside the tokenize+pack tasks (what the
  work costs, independent of how busy the shared cores were).
- `single_process`: the same tokenize + cut functions in this process without Ray, for scale.
Ray is started privately (address="local"), never joined to a running cluster.
Why the load average is recorded: the 2 cores are shared with other jobs; a loaded machine reads slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, copies: int) -> tuple[int, int]:
    """A jsonl of `copies` x the language reference; returns (documents, bytes)."""
    from pydoc_data.topics import topics

    n = 0
    with path.open("w") as f:
        for c in range(copies):
            for name in sorted(topics):
                f.write(json.dumps({"text": f"{topics[name]}\n\n(copy {c})"}) + "\n")
                n += 1
    return n, path.stat().st_size


def time_ray(corpus: Path, tokenizer, seq_len: int, min_tokens: int, repeats: int) -> dict:
    import ray

    from condensation.data import pretraining_dataset

    def one_pass() -> tuple[float, dict]:
        ds, report = pretraining_dataset(str(corpus), tokenizer, seq_len=seq_len, min_tokens=min_tokens)
        start = time.perf_counter()
        for _ in ds.iter_batches(batch_size=64, batch_format="numpy"):
            pass
        return time.perf_counter() - start, report.counts()

    warm_s, _ = one_pass()
    runs = [one_pass() for _ in range(repeats)]
    seconds = [s for s, _ in runs]
    counts = runs[-1][1]
    median = statistics.median(seconds)
    return {"warmup_pass_s": round(warm_s, 2), "pass_s": [round(s, 2) for s in seconds],
            "median_pass_s": round(median, 2), "tokens_emitted": counts["tokens"],
            "tokens_dropped": counts.get("tokens_dropped", 0), "sequences": counts["sequences"],
            "documents_kept": counts.get("documents", 0),
            "tokens_per_s": round(counts["tokens"] / median),
            "tokens_per_task_cpu_s": round(counts["tokens"] / (counts["tokenize_cpu_ms"] / 1000)),
            "counts": counts,
            "ray_version": ray.__version__}


def time_single_process(corpus: Path, tokenizer, seq_len: int, min_tokens: int) -> dict:
    from condensation.data.pipeline import cut_documents, document_tokens, encode_texts

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 64):
        docs = [document_tokens(x, tokenizer.bos_token_id, tokenizer.eos_token_id)
                for x in encode_texts(tokenizer, texts[i:i + 64])]
        chunks, _ = cut_documents([d for d in docs if len(d) > min_tokens], seq_len)
        tokens += len(chunks) * seq_len
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "tokens_emitted": tokens, "tokens_per_s": round(tokens / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--min-tokens", type=int, default=511)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--tokenizer", default=None, help="HF id or folder; default: the shipped one")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from condensation.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        docs, size = write_corpus(corpus, args.copies)
        load_before = os.getloadavg()
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        init_s = time.perf_counter() - start
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            ray_result = time_ray(corpus, tokenizer, args.seq_len, args.min_tokens, args.repeats)
        finally:
            ray.shutdown()
        single = time_single_process(corpus, tokenizer, args.seq_len, args.min_tokens)
    result = {
        "benchmark": "data pipeline tokenize + pack (pretraining_dataset, cut mode)",
        "command": "python workloads/data_benchmark.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "platform": platform.platform(),
                    "python": platform.python_version(), "load_average_1_5_15_before": load_before,
                    "load_average_1_5_15_after": os.getloadavg()},
        "tokenizer": args.tokenizer or "builtin", "vocab": len(tokenizer),
        "corpus": {"documents": docs, "bytes": size, "source": "pydoc_data.topics x copies"},
        "seq_len": args.seq_len, "min_tokens": args.min_tokens,
        "ray_init_s": round(init_s, 2),
        "ray_pipeline": ray_result,
        "single_process": single,
    }
    text = json.dumps(result, indent=2)
    print(text)
    print(f"\nRay Data tokenize+pack: {ray_result['tokens_per_s']:,} tokens/s wall, "
          f"{ray_result['tokens_per_task_cpu_s']:,} tokens per task-CPU-second "
          f"(single process, no Ray: {single['tokens_per_s']:,} tokens/s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
