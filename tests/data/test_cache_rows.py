"""`data.cache_rows`: a text source's tokenized rows computed once and materialized for every epoch (and every trial
of a sweep), the same rows in the same order as the stream they replace; when it is decided by size; its errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from condensation.config import ConfigError, DataConfig, TrainConfig, merge, validate

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, documents):
    return write_jsonl(tmp_path_factory.mktemp("cache") / "train.jsonl", [{"text": d} for d in documents[:60]])


def _data(corpus, **kw) -> DataConfig:
    return DataConfig(source=str(corpus), seq_len=64, num_rows=None, dataset_options={"mode": "pack", "min_tokens": 8},
                      **kw)


def _rows(ds) -> np.ndarray:
    return np.stack([r["input_ids"] for r in ds.take_all()])


def test_cached_rows_are_the_streamed_rows_in_order_computed_once(ray_session, corpus):
    from condensation.train.data import data_layer_datasets

    streamed, s_report = data_layer_datasets(_data(corpus, cache_rows=False))
    cached, c_report = data_layer_datasets(_data(corpus, cache_rows=True))
    assert type(cached["train"]).__name__ == "MaterializedDataset"
    assert type(streamed["train"]).__name__ != "MaterializedDataset"
    counts = c_report.counts()  # complete on return: the rows were computed while materializing
    assert counts["rows_read"] == 60 and counts["sequences"] > 0
    a, b = _rows(streamed["train"]), _rows(cached["train"])
    assert a.shape == b.shape and (a == b).all()  # the same rows, the same order (first batches as before)
    for _ in range(2):  # more epochs read the stored blocks: nothing is read or tokenized again
        assert (_rows(cached["train"]) == b).all()
    assert c_report.counts() == counts
    # num_rows: the first rows of the source, the same every time
    first, _ = data_layer_datasets(dataclasses.replace(_data(corpus, cache_rows=True), num_rows=5))
    assert (_rows(first["train"]) == b[:5]).all()


def test_cache_rows_decided_by_size(corpus, monkeypatch):
    from condensation.train import data as train_data
    from condensation.train.data import row_bytes_estimate, rows_cached

    d = _data(corpus)
    assert d.cache_rows is None and rows_cached(d)  # a small local file: cached
    assert row_bytes_estimate(d) == corpus.stat().st_size * 16
    assert row_bytes_estimate(dataclasses.replace(d, num_rows=3)) == 3 * 64 * 16
    assert not rows_cached(_data(corpus, cache_rows=False))
    monkeypatch.setattr(train_data, "CACHE_ROWS_AUTO_BYTES", corpus.stat().st_size)  # "too large": streamed
    assert not rows_cached(d) and rows_cached(_data(corpus, cache_rows=True))
    hub = DataConfig(source="fineweb-edu", seq_len=64)
    assert row_bytes_estimate(hub) is None and not rows_cached(hub)  # a hub corpus streams unless asked
    assert rows_cached(DataConfig(source="local")) and rows_cached(DataConfig(source="synthetic"))


def test_cache_rows_errors_name_the_field():
    from condensation.train.data import check_data

    with pytest.raises(ConfigError, match=r"^data\.cache_rows: .*true, false or null"):
        cfg = TrainConfig()
        cfg.data.cache_rows = "sometimes"
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^data\.cache_rows: .*bool"):
        merge(TrainConfig(), {"data": {"cache_rows": "sometimes"}})
    with pytest.raises(ConfigError, match=r"^data\.cache_rows: .*fineweb-edu.*data\.num_rows"):
        check_data(DataConfig(source="fineweb-edu", seq_len=64, num_rows=None, cache_rows=True))
