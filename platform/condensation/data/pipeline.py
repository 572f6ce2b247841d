"""Tokenize, length-filter and pack in Ray Data; shard to Ray Train workers with equal batch counts.

Stages (each a `map_batches` with fractional CPUs, because Ray Data deadlocks on 2 cores when its tasks and
two train workers each ask for a whole CPU):

    read -> validate (sources.validated) -> tokenize + length filter + pack (tokenize_and_pack) -> shard

How the training layer consumes a dataset (`ds` from `pretraining_dataset`, `summarization_dataset` or
`passkey_dataset`):

    ds = train_view(ds)                       # only input_ids/labels: int64 [seq_len] each
    trainer = TorchTrainer(..., datasets={"train": ds})
    # in the worker loop:
    shard = ray.train.get_dataset_shard("train")
    for batch in torch_batches(shard, batch_size):   # drop_last=True
        model(batch["input_ids"], labels=batch["labels"])

Why every worker gets the same number of batches: Ray Train's default `DataConfig` splits with
`streaming_split(world_size, equal=True)`, which gives every worker the same number of rows (dropping at
most world_size - 1); `torch_batches` uses `drop_last=True`, so equal rows means equal full batches. Outside
Ray Train (tests, custom loops) `shard_for_workers` does the same split. A collective step then never waits
on a worker that ran out. For a finite dataset, `equal_batches` also trims it to a multiple of
workers*batch so no partial batch exists at all (it counts the rows, so it executes the dataset once).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import ray.data
from transformers import PreTrainedTokenizerBase

from .report import TOO_SHORT, DataReport, log_skips

TRAIN_COLUMNS = ("input_ids", "labels")
IGNORE_INDEX = -100
PackMode = Literal["cut", "pack"]


class DataSource(NamedTuple):
    """A dataset and the report that counts what it read and skipped (complete once consumed)."""

    dataset: ray.data.Dataset
    report: DataReport


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens: the data layer places bos/eos itself, the same for every tokenizer."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: same ids, without the Python wrapper's per-call cost
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def document_tokens(ids: list[int], bos_id: int | None, eos_id: int | None) -> list[int]:
    """One document as the model reads it in pretraining: bos, text, eos (Llama's layout)."""
    return ([bos_id] if bos_id is not None else []) + ids + ([eos_id] if eos_id is not None else [])


def cut_documents(docs: Sequence[list[int]], seq_len: int) -> tuple[list[np.ndarray], int]:
    """Each document cut into whole `seq_len` chunks; the remainder dropped (returned as a count).

    Why cut rather than pack by default: the paper trains on documents longer than the sequence, so each
    sequence is one document and the segment memory never carries over from an unrelated text.
    """
    chunks: list[np.ndarray] = []
    dropped = 0
    for doc in docs:
        n = len(doc) // seq_len
        arr = np.asarray(doc, dtype=np.int64)
        chunks.extend(arr[i * seq_len:(i + 1) * seq_len] for i in range(n))
        dropped += len(doc) - n * seq_len
    return chunks, dropped


def pack_documents(docs: Sequence[list[int]], seq_len: int) -> tuple[list[np.ndarray], int]:
    """Documents concatenated (each already ends in eos) and cut into `seq_len` chunks.

    Packing is per Ray batch, so the tail of each batch (< seq_len tokens) is dropped and counted; with
    batches of hundreds of documents that is a small fraction.
    """
    if not docs:
        return [], 0
    stream = np.fromiter((t for doc in docs for t in doc), dtype=np.int64)
    n = len(stream) // seq_len
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)], len(stream) - n * seq_len


def tokenize_and_pack(batch: pa.Table, tokenizer: PreTrainedTokenizerBase, seq_len: int, min_tokens: int,
                      mode: PackMode, report: DataReport, source: str) -> dict[str, np.ndarray]:
    """Ray stage: tokenize a batch of `text`, keep documents over `min_tokens`, pack into `seq_len` rows.

    Labels equal input_ids (plain language modelling; the model shifts them by one internally).
    """
    cpu_start = time.process_time()
    texts = batch.column("text").to_pylist()
    ids = encode_texts(tokenizer, texts)
    docs = [document_tokens(x, tokenizer.bos_token_id, tokenizer.eos_token_id) for x in ids]
    too_short = sum(1 for doc in docs if len(doc) <= min_tokens)
    docs = [doc for doc in docs if len(doc) > min_tokens]
    if mode == "cut":
        short_for_cut = sum(1 for doc in docs if len(doc) < seq_len)
        too_short += short_for_cut
        docs = [doc for doc in docs if len(doc) >= seq_len]
    chunks, dropped = (cut_documents if mode == "cut" else pack_documents)(docs, seq_len)
    input_ids = np.stack(chunks) if chunks else np.zeros((0, seq_len), dtype=np.int64)
    log_skips(source, {TOO_SHORT: too_short})
    # CPU time (all threads of the task's process) makes throughput comparable on a shared, loaded machine
    report.add({f"skipped_{TOO_SHORT}": too_short, "documents": len(docs), "sequences": len(chunks),
                "tokens": len(chunks) * seq_len, "tokens_dropped": dropped,
                "tokenize_cpu_ms": round(1000 * (time.process_time() - cpu_start))})
    return {"input_ids": input_ids, "labels": input_ids.copy()}


@contextlib.contextmanager
def ordered_execution(enabled: bool = True):
    """Datasets created and executed inside keep their rows in the source's order (Ray Data's `preserve_order` on
    this process's DataContext, restored after): what a dataset materialized once for many consumers needs, so that
    they all read the same rows in the same order whichever task finished first."""
    options = ray.data.DataContext.get_current().execution_options
    was = options.preserve_order
    options.preserve_order = was or enabled
    try:
        yield
    finally:
        options.preserve_order = was


def train_view(ds: ray.data.Dataset, with_length: bool = False) -> ray.data.Dataset:
    """Only the tensor columns a training step uses (strings such as `answer` cannot become tensors); with_length
    keeps the `length` column of rows generated at random lengths (`uniform_length_batches`)."""
    # a fraction of a CPU, as every data stage here: a whole one never frees up beside two training workers
    return ds.select_columns(list(TRAIN_COLUMNS) + (["length"] if with_length else []), num_cpus=0.25)


# ----------------------------------------------------------------------------------------------------------------
# Random lengths in whole segments (`data.random_lengths`): every micro-batch one length, no padding


def segment_multiples(max_tokens: int, segment_length: int, min_tokens: int = 1) -> list[int]:
    """The lengths a batch may take: whole segments l, 2l, ... up to max_tokens (max_tokens itself too when it is not
    a multiple of l), those below min_tokens left out (max_tokens never). max_tokens < l gives [max_tokens]."""
    lengths = list(range(segment_length, max_tokens + 1, segment_length))
    if not lengths or lengths[-1] != max_tokens:
        lengths.append(max_tokens)
    return [n for n in lengths if n >= min_tokens or n == max_tokens]


def draw_length(lengths: Sequence[int], seed: int, *key: int) -> int:
    """One of `lengths`, uniformly, from (seed, *key) only: the same key gives the same length in any process."""
    return int(lengths[np.random.default_rng([seed, *key]).integers(len(lengths))])


def uniform_length_batches(batches, batch_size: int):
    """Micro-batches whose rows all have one length, from batches of rows stored at a fixed width with their real
    length in a `length` column (padding after it): rows are regrouped by length (kept across epochs until their
    group is full) and each group is cut to its length, so no padding reaches the model. Rows generated in groups of
    `batch_size` that share a length (passkey_dataset's `group_size`) pass straight through when the split keeps
    them together; `length` is dropped. Yields (epoch, batch) as it receives them."""
    import torch

    pending: dict[int, list] = {}
    for epoch, b in batches:
        lengths = b["length"].tolist()
        for i, n in enumerate(lengths):
            rows = pending.setdefault(n, [])
            rows.append({k: v[i, :n] for k, v in b.items() if k != "length"})
            if len(rows) == batch_size:
                del pending[n]
                yield epoch, {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def equal_batches(ds: ray.data.Dataset, num_workers: int, batch_size: int) -> ray.data.Dataset:
    """Trim a finite dataset to a multiple of num_workers*batch_size rows (executes it once to count)."""
    unit = num_workers * batch_size
    n = ds.count()
    if n < unit:
        raise ValueError(f"dataset has {n} rows, fewer than one batch per worker ({num_workers} x {batch_size})")
    return ds.limit(n - n % unit)


def shard_for_workers(ds: ray.data.Dataset, num_workers: int, batch_size: int | None = None,
                      ) -> list[ray.data.DataIterator]:
    """Split as Ray Train does (`streaming_split(equal=True)`); with batch_size, trimmed first.

    The iterators must be consumed concurrently (one per worker/thread): a streaming split hands out
    blocks round-robin and waits for a slow consumer.
    """
    if batch_size is not None:
        ds = equal_batches(ds, num_workers, batch_size)
    return ds.streaming_split(num_workers, equal=True)


def torch_batches(it: ray.data.DataIterator | ray.data.Dataset, batch_size: int,
                  columns: Sequence[str] = TRAIN_COLUMNS) -> Iterator[dict]:
    """Batches of int64 tensors [batch_size, seq_len]; drop_last so all workers see only full batches.

    Only `columns` are converted (a collate function picks them), so a shard that still carries string
    columns such as `answer` works without `train_view`.
    """
    collate = functools.partial(_int64_columns, columns=tuple(columns))
    yield from it.iter_torch_batches(batch_size=batch_size, drop_last=True, collate_fn=collate)


def _int64_columns(batch: dict[str, np.ndarray], columns: tuple[str, ...]) -> dict:
    import torch

    return {c: torch.as_tensor(np.asarray(batch[c], dtype=np.int64)) for c in columns}
