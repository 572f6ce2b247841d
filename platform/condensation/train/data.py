"""Small local datasets of the trainer's row schema `{"input_ids": int64[seq_len], "labels": int64[seq_len]}`.

The real sources live in `condensation.data` (the data layer); these need no downloads and no tokenizer files:
- "local": CPython's pydoc topics (~65K words of English), byte-level tokens (0-255, eos 256), packed.
- "synthetic": short random token patterns repeated along the row (learnable within a few steps).
`train_datasets(cfg.data, vocab_size)` picks one, or delegates to `condensation.data` for other sources.
"""

from __future__ import annotations

import numpy as np

from ..config import DataConfig

BYTE_EOS = 256


def local_text_tokens() -> np.ndarray:
    """All pydoc topics as one byte-level token stream, documents separated by BYTE_EOS."""
    from pydoc_data.topics import topics

    parts = []
    for name in sorted(topics):
        parts.append(np.frombuffer(topics[name].encode("utf-8"), dtype=np.uint8).astype(np.int64))
        parts.append(np.array([BYTE_EOS], dtype=np.int64))
    return np.concatenate(parts)


def local_text_rows(seq_len: int, num_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """[num_rows, seq_len] int64 rows packed from the local text (cycled if more rows are asked than it holds)."""
    stream = local_text_tokens()
    n_avail = len(stream) // seq_len
    rows = stream[: n_avail * seq_len].reshape(n_avail, seq_len)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_avail)
    if num_rows is not None:
        order = np.resize(order, num_rows)
    return rows[order]


def synthetic_rows(seq_len: int, num_rows: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((num_rows, seq_len), dtype=np.int64)
    for i in range(num_rows):
        period = int(rng.integers(3, 9))
        pattern = rng.integers(0, vocab_size, size=period)
        out[i] = np.resize(pattern, seq_len)
    return out


def rows_dataset(rows: np.ndarray):
    """A Ray Dataset of `{"input_ids", "labels"}` from [N, seq_len] token rows (labels = input_ids; the model
    shifts by one)."""
    import ray.data

    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return ray.data.from_items([{"input_ids": r, "labels": r.copy()} for r in rows])


def train_datasets(d: DataConfig, vocab_size: int) -> tuple[dict, dict | None]:
    """({"train": Dataset}, data-pipeline stats or None) for the configured source."""
    if d.source == "local":
        return {"train": rows_dataset(local_text_rows(d.seq_len, d.num_rows, d.seed))}, None
    if d.source == "synthetic":
        return {"train": rows_dataset(synthetic_rows(d.seq_len, d.num_rows or 256, vocab_size, d.seed))}, None
    return data_layer_datasets(d, vocab_size)


def data_layer_datasets(d: DataConfig, vocab_size: int | None = None) -> tuple[dict, object | None]:
    """Delegate to `condensation.data.pretraining_dataset(source, tokenizer, seq_len, **dataset_options)`; returns
    ({"train": Dataset}, its DataReport), `num_rows` capping the rows. The report's counts fill as the data runs."""
    try:
        from ..data import pretraining_dataset
        from ..tokenizer import load_tokenizer
    except ImportError as e:
        raise RuntimeError(f"data.source={d.source!r} needs condensation.data ({e}); use data.source=local or synthetic, "
                           "or pass datasets= to fit()") from e
    tok = load_tokenizer(d.tokenizer)
    if vocab_size is not None and len(tok) > vocab_size:
        from ..config import ConfigError

        raise ConfigError("data.tokenizer", f"{d.tokenizer or 'builtin'} has {len(tok)} tokens, more than the model's "
                                            f"vocab_size {vocab_size}")
    ds, report = pretraining_dataset(d.source, tok, d.seq_len, **d.dataset_options)
    if d.num_rows is not None:
        ds = ds.limit(d.num_rows)
    return {"train": ds}, report
