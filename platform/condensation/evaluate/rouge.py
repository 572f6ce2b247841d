"""Summarization evaluation as in the paper (Table II): sample summaries (temperature 0.3, 256 new tokens, no beam
search), then ROUGE-1/2/L F1 overall and per input-length bucket (0-512, 512-1024, 1024+ tokens), with counts, so
a drop with longer inputs shows and a bucket's size says how much to trust it.

Scores come from Google's `rouge-score` package (the reference re-implementation of Lin 2004) with Porter
stemming, averaged over examples (macro), as the usual CNN/DailyMail numbers are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ._generation import (
    equal_length_batches,
    eval_mode,
    generate_new_tokens,
    left_pad,
    length_sorted_batches,
    model_device,
    pad_token_id,
)

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
Bucket = tuple[int, int | None]
DEFAULT_BUCKETS: tuple[Bucket, ...] = ((0, 512), (512, 1024), (1024, None))


def buckets_from_edges(edges: Sequence[int]) -> tuple[Bucket, ...]:
    """[512, 1024] -> ((0, 512), (512, 1024), (1024, None)): the paper's buckets from their inner edges."""
    edges = [int(e) for e in edges]
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket edges must be positive and increasing, got {list(edges)}")
    lows = [0, *edges]
    return tuple((lo, hi) for lo, hi in zip(lows, [*edges, None]))


def bucket_of(n: int, buckets: Sequence[Bucket] = DEFAULT_BUCKETS) -> str | None:
    """The name of the bucket an input of `n` tokens falls in (None: in none of them)."""
    return next((bucket_name(b) for b in buckets if _in_bucket(int(n), b)), None)


def bucket_name(bucket: Bucket) -> str:
    """(0, 512) -> '0-512'; (1024, None) -> '1024+' (the paper's labels)."""
    lo, hi = bucket
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def _in_bucket(n: int, bucket: Bucket) -> bool:
    lo, hi = bucket  # half-open [lo, hi): 512 goes to 512-1024, as the labels read
    return n >= lo and (hi is None or n < hi)


def rouge_by_length(
    predictions: Sequence[str],
    references: Sequence[str],
    input_lengths: Sequence[int],
    buckets: Sequence[Bucket] = DEFAULT_BUCKETS,
    *,
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = True,
) -> dict[str, dict[str, float]]:
    """Mean ROUGE F1 overall and per input-length bucket.

    Returns {"overall": {"rouge1": f, "rouge2": f, "rougeL": f, "count": n}, "0-512": {...}, "512-1024": {...},
    "1024+": {...}}; a bucket with no examples has count 0 and NaN scores. Buckets are half-open [lo, hi) in the
    caller's length unit (the paper: input tokens); an input outside every bucket counts only in "overall".
    """
    from rouge_score import rouge_scorer

    if not len(predictions) == len(references) == len(input_lengths):
        raise ValueError(f"lengths differ: {len(predictions)} predictions, {len(references)} references, "
                         f"{len(input_lengths)} input lengths")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    # rouge_score.score(target, prediction): the reference comes first
    scores = [{rt: s.fmeasure for rt, s in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]

    def mean(idx: list[int]) -> dict[str, float]:
        row = {rt: (sum(scores[i][rt] for i in idx) / len(idx) if idx else math.nan) for rt in rouge_types}
        return {**row, "count": len(idx)}

    out = {"overall": mean(list(range(len(scores))))}
    for b in buckets:
        out[bucket_name(b)] = mean([i for i, n in enumerate(input_lengths) if _in_bucket(int(n), b)])
    return out


def rouge_metrics(result: dict[str, dict[str, float]], prefix: str = "rouge") -> dict[str, float]:
    """Flatten a `rouge_by_length` result into MLflow-safe metric names ('+' is not allowed there):
    `rouge/overall/rouge1`, `rouge/len_0-512/rouge2`, `rouge/len_1024-inf/count`. NaN (empty buckets) is left out."""
    metrics = {}
    for bucket, row in result.items():
        key = bucket if bucket == "overall" else "len_" + re.sub(r"\+$", "-inf", bucket)
        for name, v in row.items():
            if not (isinstance(v, float) and math.isnan(v)):
                metrics[f"{prefix}/{key}/{name}"] = float(v)
    return metrics


def rouge_from_metrics(metrics: dict[str, float], prefix: str = "rouge") -> dict[str, dict[str, float]]:
    """The inverse of `rouge_metrics`: a `rouge_by_length`-shaped result from a run's metrics (buckets in order of
    their lower edge, "overall" first; a bucket logged without scores, i.e. empty, gets NaN and its count)."""
    rows: dict[str, dict[str, float]] = {}
    head = prefix + "/"
    for key, value in metrics.items():
        if not key.startswith(head) or key.count("/") != prefix.count("/") + 2:
            continue
        bucket, name = key[len(head):].rsplit("/", 1)
        if bucket != "overall":
            if not bucket.startswith("len_"):
                continue
            bucket = re.sub(r"-inf$", "+", bucket[len("len_"):])
        rows.setdefault(bucket, {})[name] = int(value) if name == "count" else float(value)
    types = sorted({n for row in rows.values() for n in row if n != "count"})
    for row in rows.values():
        for t in types:
            row.setdefault(t, math.nan)
        row.setdefault("count", 0)

    def lower(b: str) -> float:
        m = re.match(r"(\d+)", b)
        return -1 if b == "overall" else (float(m.group(1)) if m else math.inf)

    return {b: rows[b] for b in sorted(rows, key=lower)}


def format_rouge_table(results: dict[str, dict[str, dict[str, float]]], rouge_types: Sequence[str] = ROUGE_TYPES) -> str:
    """Markdown in the shape of Table II: model, input length, ROUGE-1/2/L (F1), count."""
    lines = ["| model | input length | " + "/".join(r.upper().replace("ROUGE", "R-") for r in rouge_types) + " (F1) | n |",
             "|---|---|---|---|"]
    for name, res in results.items():
        for bucket in [b for b in res if b != "overall"] + ["overall"]:
            row = res[bucket]
            vals = " / ".join("-" if math.isnan(row[r]) else f"{row[r]:.4f}" for r in rouge_types)
            lines.append(f"| {name} | {bucket} | {vals} | {row['count']} |")
    return "\n".join(lines)


def generate_summaries(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 0.3,
    do_sample: bool = True,
    seed: int = 0,
    batch_size: int = 1,
    progress: bool = True,
    padded: bool = False,
) -> list[str]:
    """Generate one summary per prompt with the model's own `generate`, the paper's setting by default
    (sampling at temperature 0.3, 256 new tokens, no beam search). Prompts are text (tokenized with the
    tokenizer's own special tokens) or token ids, already in the task's prompt format.

    Sampling is reproducible: each batch draws from a fresh RNG seeded with `seed` + the index of its first
    prompt, inside `torch.random.fork_rng`, so the caller's global RNG state is untouched. Only prompts of equal
    token length share a batch (the Condensation model takes no padding); batch_size=1 makes each summary
    independent of the others. padded=True (plain transformers models only, never Condensation): prompts sorted by
    length share left-padded batches of batch_size with their attention mask, which is what makes batches of real
    articles (every one of its own length) possible. Returns decoded new text, special tokens dropped, in prompt order.
    """
    ids = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    out: list[str] = [""] * len(ids)
    device = model_device(model)
    sample_kwargs = dict(do_sample=do_sample, num_beams=1)
    if do_sample:
        sample_kwargs["temperature"] = temperature  # the rest (top-k, top-p) stays the model's generation config
    bar = tqdm(total=len(ids), desc="summaries", disable=not progress, leave=False)
    with eval_mode(model):
        lengths = [len(x) for x in ids]
        batches = length_sorted_batches(lengths, batch_size) if padded else equal_length_batches(lengths, batch_size)
        for batch in batches:
            devices = [device] if device.type == "cuda" else []
            if padded:
                input_ids, mask = left_pad([ids[k] for k in batch], pad_token_id(tokenizer) or 0)
            else:
                input_ids, mask = torch.tensor([ids[k] for k in batch], dtype=torch.long), None
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + batch[0])
                new = generate_new_tokens(model, input_ids, tokenizer, attention_mask=mask,
                                          max_new_tokens=max_new_tokens, **sample_kwargs)
            for k, tokens in zip(batch, new.tolist()):
                out[k] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(batch))
    bar.close()
    return out
