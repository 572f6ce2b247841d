"""Pretraining sources: local jsonl / parquet (FineWeb-edu's schema) and the hub path (stubbed offline):
length filter, exact sequences, labels = input_ids, malformed rows counted not fatal, clear errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from condensation.data import DataSourceError, pretraining_dataset
from condensation.data.pipeline import cut_documents, document_tokens

from .conftest import write_jsonl

SEQ, MIN = 128, 600


def expected_sequences(tokenizer, texts, seq_len=SEQ, min_tokens=MIN):
    """What the pipeline must emit, computed directly: bos + text + eos, kept if > min_tokens, cut."""
    docs = [document_tokens(tokenizer.encode(t, add_special_tokens=False), tokenizer.bos_token_id,
                            tokenizer.eos_token_id) for t in texts]
    chunks, _ = cut_documents([d for d in docs if len(d) > min_tokens and len(d) >= seq_len], seq_len)
    return sorted(tuple(c.tolist()) for c in chunks)


def rows_of(got):
    return sorted(tuple(r["input_ids"].tolist()) for r in got)


def test_jsonl_with_malformed_rows(ray_session, tokenizer, documents, tmp_path):
    good = documents[:6] + documents[-3:]  # six long documents and three short ones
    path = write_jsonl(tmp_path / "corpus.jsonl", [
        {"text": good[0], "id": 1},
        {"id": 2},                                   # missing field
        {"text": 12345},                             # not a string
        {"text": "   "},                              # empty
        b'{"text": "caf\xe9 in latin-1"}',            # undecodable bytes
        "{not json",                                 # invalid json
        *({"text": t} for t in good[1:]),
        {"text": None},                              # null = missing
    ])
    src = pretraining_dataset(str(path), tokenizer, seq_len=SEQ, min_tokens=MIN)
    ds, report = src
    got = ds.take_all()
    assert got and all(r["input_ids"].dtype == np.int64 and r["input_ids"].shape == (SEQ,) for r in got)
    assert all(np.array_equal(r["input_ids"], r["labels"]) for r in got)
    assert rows_of(got) == expected_sequences(tokenizer, good)
    counts = report.counts()
    n_short = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 2 <= MIN for t in good)
    assert n_short >= 3
    assert counts["rows_read"] == 15 and counts["rows_valid"] == len(good)
    assert (counts["skipped_missing_field"], counts["skipped_not_string"], counts["skipped_empty"],
            counts["skipped_undecodable"], counts["skipped_invalid_json"]) == (2, 1, 1, 1, 1)
    assert counts["skipped_too_short"] == n_short
    assert counts["sequences"] == len(got) and counts["tokens"] == len(got) * SEQ
    ds.take_all()  # every pass over the data counts again (an epoch's counts add to the last one's)
    assert report.counts()["rows_read"] == 30
    # the first sequence of a document starts with bos: documents are not glued together in "cut" mode
    assert sum(r["input_ids"][0] == tokenizer.bos_token_id for r in got) == len(good) - n_short


def test_parquet_folder_and_pack_mode(ray_session, tokenizer, documents, tmp_path):
    folder = tmp_path / "fineweb"
    folder.mkdir()
    texts = documents[10:40]
    pq.write_table(pa.table({"text": texts[:15] + [None, ""]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"text": texts[15:], "score": [3.0] * 15}), folder / "part-1.parquet")
    ds, report = pretraining_dataset(str(folder), tokenizer, seq_len=64, min_tokens=0, mode="pack", batch_size=1000)
    got = ds.take_all()
    counts = report.counts()
    assert counts["rows_read"] == 32 and counts["skipped_missing_field"] == 1 and counts["skipped_empty"] == 1
    total = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in texts)
    assert counts["tokens"] + counts["tokens_dropped"] == total == len(got) * 64 + counts["tokens_dropped"]
    assert counts["tokens_dropped"] < 64 * 2  # one partial tail per file batch at most
    assert all(r["input_ids"].shape == (64,) for r in got)


def test_hub_path_streams_via_datasets(ray_session, tokenizer, documents, monkeypatch):
    """The real hub code path with `datasets.load_dataset` stubbed by an in-memory streaming dataset."""
    import datasets
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return datasets.Dataset.from_dict({"text": documents[:4], "url": ["u"] * 4}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(HuggingFaceDatasource, "list_parquet_urls_from_dataset", classmethod(lambda cls, d: []))
    ds, report = pretraining_dataset("fineweb-edu", tokenizer, seq_len=SEQ, min_tokens=MIN, limit_documents=3)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert rows_of(ds.take_all()) == expected_sequences(tokenizer, documents[:3])
    assert report.counts()["rows_read"] == 3


def test_missing_file_and_unknown_dataset(ray_session, tokenizer, tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        pretraining_dataset(str(missing), tokenizer, seq_len=SEQ)
    with pytest.raises(DataSourceError, match="no-such-corpus"):
        pretraining_dataset("no-such-corpus", tokenizer, seq_len=SEQ)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError, match="someone/missing-dataset"):
        pretraining_dataset("someone/missing-dataset", tokenizer, seq_len=SEQ)


def test_missing_text_field_log_names_it_and_the_fields_there(caplog):
    """Issue 17: `missing_field=13` per batch did not say which field, nor what the rows hold instead."""
    import json
    import logging

    import pyarrow as pa

    from condensation.data.sources import RAW_LINE, validate_batch

    class Counts:
        def add(self, counts):
            self.counts = counts

    rows = pa.table({RAW_LINE: pa.array([json.dumps({"body": "x", "id": 1}).encode()] * 3, pa.binary())})
    report = Counts()
    with caplog.at_level(logging.WARNING, logger="condensation.data.report"):
        assert validate_batch(rows, ["text"], ["text"], report, "my.jsonl").num_rows == 0
    assert report.counts["skipped_missing_field"] == 3
    assert "['text'] (its fields: ['body', 'id']" in caplog.text and "data.dataset_options.text_field" in caplog.text
