"""Summarization data: CNN/DailyMail and BookSum in the paper's Appendix D format, loss on the summary only.

The template. Appendix D prints, as separate paragraphs, "Summarize this text:", the article, "----Summary:",
then the expected output. We read each paragraph break as one blank line ("\\n\\n") and end the prompt with
a blank line after "----Summary:", so the summary starts on its own paragraph as the expected output does:

    SUMMARY_PROMPT = "Summarize this text:\\n\\n{article}\\n\\n----Summary:\\n\\n"

Tokens. Each example is bos + tok("Summarize this text:\\n\\n") + tok(article) + tok("\\n\\n----Summary:\\n\\n")
+ tok(summary) + eos, each piece encoded on its own. Why piecewise: the evaluation prompt is then exactly the
prefix of the training example (encoding the joined string could merge the trailing blank line into the
summary's first token differently), articles can be truncated at a token boundary, and the article's token
count is exact. Decoding the prompt ids gives the template text verbatim.

Rows (train=True): `input_ids`, `labels` (-100 except summary + eos), both int64[max_tokens] (right-padded
with the pad id, labels -100: a causal model never attends forward, so padding at the end changes nothing
before it), `input_length` (prompt tokens including bos: what the model reads before it writes; the key of
the 0-512 / 512-1024 / 1024+ ROUGE buckets), `article_tokens`. Rows (train=False): `input_ids` = the prompt
only (variable length), `reference` (the summary text), `input_length`, `article_tokens`.

Length: the paper filters to a total length (3K for CNN/DailyMail, 5.5K for CNN/DailyMail + BookSum).
mode="filter" skips longer examples (counted as skipped_too_long); mode="truncate" shortens the article.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from .pipeline import IGNORE_INDEX, DataSource, encode_texts
from .report import TOO_LONG, DataReport, log_skips
from .sources import hub_spec, looks_local, read_records, validated

SUMMARY_PROMPT = "Summarize this text:\n\n{article}\n\n----Summary:\n\n"
_HEAD, _TAIL = SUMMARY_PROMPT.split("{article}")
CNN_FIELDS = ("article", "highlights")
BOOKSUM_FIELDS = ("chapter", "summary_text")
LengthMode = Literal["filter", "truncate"]
SourceSpec = str | tuple[str, tuple[str, str]]


def format_summary_prompt(article: str) -> str:
    """The paper's Appendix D prompt for one article (the text the model reads before the summary)."""
    return SUMMARY_PROMPT.format(article=article)


def _template_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    head, tail = encode_texts(tokenizer, [_HEAD, _TAIL])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + head, tail


def build_summary_example(head: list[int], article: list[int], tail: list[int], summary: list[int],
                          eos_id: int | None, pad_id: int, max_tokens: int, mode: LengthMode, train: bool,
                          ) -> dict[str, np.ndarray | int] | None:
    """One example from token pieces, or None when it cannot fit in `max_tokens`."""
    target = summary + ([eos_id] if eos_id is not None else [])
    fixed = len(head) + len(tail) + (len(target) if train else 0)
    room = max_tokens - fixed
    if room < 1 or (mode == "filter" and len(article) > room):
        return None
    article = article[:room]
    prompt = head + article + tail
    row: dict[str, np.ndarray | int] = {"input_length": len(prompt), "article_tokens": len(article)}
    if not train:
        row["input_ids"] = np.asarray(prompt, dtype=np.int64)
        return row
    ids = np.full(max_tokens, pad_id, dtype=np.int64)
    labels = np.full(max_tokens, IGNORE_INDEX, dtype=np.int64)
    n = len(prompt) + len(target)
    ids[:n] = prompt + target
    labels[len(prompt):n] = target
    row["input_ids"], row["labels"] = ids, labels
    return row


def tokenize_summaries(batch: pa.Table, tokenizer: PreTrainedTokenizerBase, max_tokens: int, mode: LengthMode,
                       train: bool, report: DataReport, source: str) -> dict[str, np.ndarray]:
    """Ray stage: format, tokenize and length-filter a batch of (article, summary) pairs."""
    articles = batch.column("article").to_pylist()
    summaries = batch.column("summary").to_pylist()
    head, tail = _template_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows, references = [], []
    for article, summary, reference in zip(encode_texts(tokenizer, articles), encode_texts(tokenizer, summaries),
                                           summaries):
        row = build_summary_example(head, article, tail, summary, tokenizer.eos_token_id, pad_id, max_tokens,
                                    mode, train)
        if row is not None:
            rows.append(row)
            references.append(reference)
    too_long = len(articles) - len(rows)
    log_skips(source, {TOO_LONG: too_long})
    report.add({f"skipped_{TOO_LONG}": too_long, "sequences": len(rows),
                "tokens": sum(int(r["input_length"]) for r in rows)})
    return _columns(rows, references, train, max_tokens)


def _columns(rows: list[dict], references: list[str], train: bool, max_tokens: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {
        "input_length": np.asarray([r["input_length"] for r in rows], dtype=np.int64),
        "article_tokens": np.asarray([r["article_tokens"] for r in rows], dtype=np.int64),
    }
    if train:
        shape = (len(rows), max_tokens)
        out["input_ids"] = np.stack([r["input_ids"] for r in rows]) if rows else np.zeros(shape, np.int64)
        out["labels"] = np.stack([r["labels"] for r in rows]) if rows else np.zeros(shape, np.int64)
    else:
        prompts = np.empty(len(rows), dtype=object)  # ragged prompts: an object array, not a stacked tensor
        prompts[:] = [r["input_ids"] for r in rows]
        out["input_ids"] = prompts
        out["reference"] = np.asarray(references, dtype=object)
    return out


def _fields(source: str, fields: tuple[str, str] | None) -> tuple[str, str]:
    """(article field, summary field): given, or the known hub dataset's, or CNN/DailyMail's for local files."""
    if fields is not None:
        return fields
    spec = None if looks_local(source) else hub_spec(source)
    return (spec.fields[0], spec.fields[1]) if spec else CNN_FIELDS


def summarization_dataset(sources: SourceSpec | Sequence[SourceSpec], tokenizer: PreTrainedTokenizerBase,
                          max_tokens: int, *, train: bool = True, mode: LengthMode = "filter",
                          split: str = "train", limit_documents: int | None = None, batch_size: int = 32,
                          num_cpus: float = 0.25) -> DataSource:
    """Examples from one or more sources, e.g. ["cnn_dailymail", "booksum"] (the paper's 5.5K mix).

    A source is a short name / hub id / local path, or (path, (article_field, summary_field)) for local
    files in BookSum's schema: ("books.jsonl", BOOKSUM_FIELDS). Local files default to CNN/DailyMail's fields.
    """
    specs = [sources] if isinstance(sources, str) or (isinstance(sources, tuple) and len(sources) == 2
                                                      and isinstance(sources[1], tuple)) else list(sources)
    names = [s if isinstance(s, str) else s[0] for s in specs]
    report = DataReport(f"summarization:{'+'.join(names)}")
    parts = []
    for spec in specs:
        source, fields = (spec, None) if isinstance(spec, str) else spec
        article_field, summary_field = _fields(source, fields)
        ds = read_records(source, split=split)
        if limit_documents is not None:
            ds = ds.limit(limit_documents)
        ds = validated(ds, [article_field, summary_field], ["article", "summary"], report, source, num_cpus)
        parts.append(ds.map_batches(
            tokenize_summaries, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus,
            fn_kwargs={"tokenizer": tokenizer, "max_tokens": max_tokens, "mode": mode, "train": train,
                       "report": report, "source": source},
        ))
    return DataSource(parts[0] if len(parts) == 1 else parts[0].union(*parts[1:]), report)
