"""Pretraining corpus: FineWeb-edu (streamed from the hub) or local jsonl/parquet with a `text` field.

The paper continues pretraining on FineWeb-edu documents longer than 4K tokens (1B runs) or 6K (3B runs),
each cut into sequences of the stage's total length. Rows: `{"input_ids": int64[seq_len],
"labels": int64[seq_len]}` (labels = input_ids). Each document is bos + text + eos; `min_tokens` counts
those tokens, and a document kept must have MORE than `min_tokens` ("over 4K").

    src = pretraining_dataset("fineweb-edu", tokenizer, seq_len=4096, min_tokens=4096)
    ds, report = src                          # a DataSource is a (dataset, report) pair
    ... train on ds ...
    mlflow.log_metrics(report.counts())       # rows read/valid/skipped by reason, sequences, tokens
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .pipeline import DataSource, PackMode, tokenize_and_pack
from .report import DataReport
from .sources import hub_spec, looks_local, read_records, validated

DEFAULT_CORPUS = "fineweb-edu"


def pretraining_dataset(source: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, min_tokens: int | None = None,
                        *, mode: PackMode = "cut", split: str = "train", config: str | None = None,
                        text_field: str | None = None, limit_documents: int | None = None,
                        batch_size: int = 64, num_cpus: float = 0.25) -> DataSource:
    """Tokenized, length-filtered sequences of exactly `seq_len` tokens.

    min_tokens: keep documents with more tokens than this (default: seq_len - 1, i.e. at least one full
    sequence). mode "cut": each document gives floor(len/seq_len) sequences of its own text (the paper's
    setting); "pack": documents are concatenated within a batch (for corpora of short documents).
    limit_documents: read only the first N raw documents (a streamed hub corpus is effectively infinite).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    field = text_field or _text_field(source)
    report = DataReport(f"pretraining:{source}")
    ds = read_records(source, split=split, config=config)
    if limit_documents is not None:
        ds = ds.limit(limit_documents)
    ds = validated(ds, [field], ["text"], report, source, num_cpus=num_cpus)
    ds = ds.map_batches(
        tokenize_and_pack, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len,
                   "min_tokens": seq_len - 1 if min_tokens is None else min_tokens,
                   "mode": mode, "report": report, "source": source},
    )
    return DataSource(ds, report)


def _text_field(source: str) -> str:
    """`text` for FineWeb-edu and local files; a known hub dataset's first field otherwise."""
    spec = None if looks_local(source) else hub_spec(source)
    return spec.fields[0] if spec else "text"
