"""Summarization: the Appendix D template verbatim, loss on the summary only, length filter/truncation,
input lengths recorded, CNN/DailyMail and BookSum schemas (jsonl and parquet), evaluation rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condensation.data import SUMMARY_PROMPT, format_summary_prompt, summarization_dataset
from condensation.data.pipeline import IGNORE_INDEX, torch_batches, train_view
from condensation.data.summarization import BOOKSUM_FIELDS

from .conftest import write_jsonl

MAX = 512


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def test_template_is_the_papers():
    assert SUMMARY_PROMPT == "Summarize this text:\n\n{article}\n\n----Summary:\n\n"
    expected = "Summarize this text:\n\nA {braced} article.\n\n----Summary:\n\n"
    assert format_summary_prompt("A {braced} article.") == expected


@pytest.fixture
def cnn_rows(documents):
    """Articles of many lengths (a few too long for MAX) with one-line summaries."""
    articles = [d[:n] for d, n in zip(documents[5:25], range(200, 4200, 200))]
    return [{"article": a, "highlights": f"Summary number {i}: {a[:60].strip()}", "id": str(i)}
            for i, a in enumerate(articles)]


def test_cnn_jsonl_train_rows(ray_session, tokenizer, cnn_rows, tmp_path):
    path = write_jsonl(tmp_path / "cnn.jsonl", cnn_rows + [{"article": "text only"}, {"article": 3, "highlights": "x"}])
    ds, report = summarization_dataset(str(path), tokenizer, max_tokens=MAX)
    got = ds.take_all()
    by_summary = {r["highlights"]: r for r in cnn_rows}
    assert got
    for row in got:
        ids, labels = row["input_ids"], row["labels"]
        assert ids.shape == labels.shape == (MAX,) and ids.dtype == np.int64
        n_in = int(row["input_length"])
        assert ids[0] == tokenizer.bos_token_id
        prompt = _decode(tokenizer, ids[1:n_in])
        assert prompt.startswith("Summarize this text:\n\n") and prompt.endswith("\n\n----Summary:\n\n")
        article = prompt[len("Summarize this text:\n\n"):-len("\n\n----Summary:\n\n")]
        assert prompt == format_summary_prompt(article)  # verbatim template around the verbatim article
        target = labels[labels != IGNORE_INDEX]
        assert np.all(labels[:n_in] == IGNORE_INDEX) and np.array_equal(ids[n_in:n_in + len(target)], target)
        summary = tokenizer.decode(target, skip_special_tokens=True)
        assert target[-1] == tokenizer.eos_token_id and by_summary[summary]["article"] == article
        assert row["article_tokens"] == len(tokenizer.encode(article, add_special_tokens=False))
        assert np.all(ids[n_in + len(target):] == tokenizer.pad_token_id)
    counts = report.counts()
    too_long = sum(1 for r in cnn_rows
                   if len(tokenizer.encode(format_summary_prompt(r["article"]) + r["highlights"],
                                           add_special_tokens=False)) + 2 > MAX)
    assert too_long >= 3 and counts["skipped_too_long"] == too_long
    assert counts["sequences"] == len(got) == len(cnn_rows) - too_long
    assert counts["skipped_missing_field"] == 1 and counts["skipped_not_string"] == 1
    batch = next(torch_batches(train_view(ds), batch_size=4))
    assert tuple(batch["input_ids"].shape) == (4, MAX)


def test_truncate_mode_and_eval_rows(ray_session, tokenizer, cnn_rows, tmp_path):
    path = write_jsonl(tmp_path / "cnn.jsonl", cnn_rows)
    ds, report = summarization_dataset(str(path), tokenizer, max_tokens=MAX, mode="truncate", train=False)
    got = ds.take_all()
    assert len(got) == len(cnn_rows) and report.counts().get("skipped_too_long", 0) == 0
    references = {r["highlights"] for r in cnn_rows}
    for row in got:
        assert row["reference"] in references
        assert len(row["input_ids"]) == row["input_length"] <= MAX
        assert _decode(tokenizer, row["input_ids"]).endswith("\n\n----Summary:\n\n")
    assert max(r["input_length"] for r in got) == MAX  # long articles were cut to fit exactly


def test_booksum_parquet_mixed_with_cnn(ray_session, tokenizer, documents, cnn_rows, tmp_path):
    books = tmp_path / "booksum.parquet"
    chapters = [d[:1500] for d in documents[30:36]]
    pq.write_table(pa.table({"chapter": chapters, "summary_text": [f"Chapter {i} summary." for i in range(6)],
                             "book_id": [f"b{i}" for i in range(6)]}), books)
    cnn = write_jsonl(tmp_path / "cnn.jsonl", cnn_rows[:5])
    ds, report = summarization_dataset([str(cnn), (str(books), BOOKSUM_FIELDS)], tokenizer, max_tokens=1024)
    got = ds.take_all()
    summaries = {tokenizer.decode(r["labels"][r["labels"] != IGNORE_INDEX], skip_special_tokens=True) for r in got}
    assert {f"Chapter {i} summary." for i in range(6)} <= summaries
    assert len(got) == 11 and report.counts()["rows_valid"] == 11
