"""Small local datasets of the trainer's row schema `{"input_ids": int64[seq_len], "labels": int64[seq_len]}`.

The real sources live in `condensation.data` (the data layer); these need no downloads and no tokenizer files:
- "local": CPython's pydoc topics (~65K words of English), byte-level tokens (0-255, eos 256), packed.
- "synthetic": short random token patterns repeated along the row (learnable within a few steps).
`train_datasets(cfg.data, vocab_size)` picks one, or delegates to `condensation.data` for other sources, whose
tokenized rows it materializes once for every epoch when `data.cache_rows` says so (`rows_cached`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import DataConfig

BYTE_EOS = 256
# data.cache_rows=None caches a local text source whose rows are estimated at most this many bytes (`row_bytes_estimate`)
CACHE_ROWS_AUTO_BYTES = 1 << 30
# object-store bytes per token of a row: int64 input_ids + int64 labels
_ROW_BYTES_PER_TOKEN = 16
# tokens at most per byte of a source file: a BPE token holds at least one byte of text (jsonl/json); parquet is
# compressed, its text taken as at most 4x the file
_TOKENS_PER_FILE_BYTE = {".parquet": 4}


def local_text_tokens() -> np.ndarray:
    """All pydoc topics as one byte-level token stream, documents separated by BYTE_EOS."""
    from pydoc_data.topics import topics

    parts = []
    for name in sorted(topics):
        parts.append(np.frombuffer(topics[name].encode("utf-8"), dtype=np.uint8).astype(np.int64))
        parts.append(np.array([BYTE_EOS], dtype=np.int64))
    return np.concatenate(parts)


def _local_text_grid(seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The local text cut into [n, seq_len] rows, and the order training reads them in."""
    stream = local_text_tokens()
    n_avail = len(stream) // seq_len
    return stream[: n_avail * seq_len].reshape(n_avail, seq_len), np.random.default_rng(seed).permutation(n_avail)


def local_text_rows(seq_len: int, num_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """[num_rows, seq_len] int64 rows packed from the local text (cycled if more rows are asked than it holds)."""
    rows, order = _local_text_grid(seq_len, seed)
    if num_rows is not None:
        order = np.resize(order, num_rows)
    return rows[order]


def local_text_heldout(seq_len: int, used: int | None, seed: int = 0) -> np.ndarray:
    """The local text's tokens that training on `used` rows of `local_text_rows(seq_len, used, seed)` never reads
    (None: every row is read, nothing is left), in text order, as one int64 stream."""
    rows, order = _local_text_grid(seq_len, seed)
    return rows[np.sort(order[len(order) if used is None else used:])].reshape(-1)


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


def check_data(d: DataConfig, vocab_size: int | None = None) -> None:
    """What can be known about a data-layer source before Ray starts, as ConfigErrors naming the field: a local
    path that is not there, a tokenizer larger than the model's vocabulary, a text field the file's rows lack (read
    from its first row). "local" and "synthetic" need nothing."""
    from ..config import BUILTIN_SOURCES, ConfigError

    if d.source in BUILTIN_SOURCES:
        return
    from ..data.sources import KNOWN_DATASETS, LOCAL_SUFFIXES, looks_local

    local = looks_local(d.source)
    files: list[str] = []
    if local:
        path = Path(d.source).expanduser()
        if not path.exists():
            raise ConfigError("data.source", f"{d.source}: no such file or folder (a local .jsonl/.json/.parquet file or "
                                             f"folder, a hub id owner/name, or one of {['local', 'synthetic', *KNOWN_DATASETS]})")
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*") if p.is_file())
        files = [f for f in files if f.endswith(LOCAL_SUFFIXES)]
        if not files:
            raise ConfigError("data.source", f"{d.source}: no .jsonl/.json/.parquet files there")
    try:
        from ..tokenizer import load_tokenizer

        n_tokens = len(load_tokenizer(d.tokenizer))
    except OSError as e:
        raise ConfigError("data.tokenizer", str(e)) from None
    if vocab_size is not None and n_tokens > vocab_size:
        raise ConfigError("data.tokenizer", f"{d.tokenizer or 'the builtin tokenizer'} has {n_tokens} tokens, more than the "
                                            f"model's vocab_size {vocab_size}; use a model size with a vocabulary of at "
                                            f"least {n_tokens} (e.g. model.size=tiny-cpu) or "
                                            f"model.overrides.vocab_size={n_tokens}")
    if d.cache_rows and not local and d.num_rows is None and d.dataset_options.get("limit_documents") is None:
        raise ConfigError("data.cache_rows", f"true would read all of the hub corpus {d.source!r} into Ray's object "
                                             "store; bound it (data.num_rows or data.dataset_options.limit_documents) "
                                             "or leave data.cache_rows unset to stream it")
    if files:
        field = d.dataset_options.get("text_field") or "text"
        row = _first_row(files[0])
        if row is not None and field not in row:
            texts = [k for k, v in row.items() if isinstance(v, str)] or ["<field>"]
            raise ConfigError("data.dataset_options.text_field",
                              f"the first row of {files[0]} has no field {field!r} (its fields: {list(row)}); "
                              f"name the text field, e.g. data.dataset_options.text_field={texts[0]}")


def row_bytes_estimate(d: DataConfig) -> int | None:
    """An upper estimate of the object-store bytes of a `condensation.data` text source's rows (`_ROW_BYTES_PER_TOKEN`
    per token, tokens from the local files' sizes, capped by num_rows x seq_len); None for a hub corpus (streamed:
    its size is not known beforehand, and reading it all is what streaming avoids) or a path that is not there."""
    from ..data.sources import LOCAL_SUFFIXES, looks_local

    path = Path(d.source).expanduser()
    if not looks_local(d.source) or not path.exists():
        return None
    cap = d.num_rows * d.seq_len * _ROW_BYTES_PER_TOKEN if d.num_rows is not None else None
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    tokens = sum(p.stat().st_size * _TOKENS_PER_FILE_BYTE.get(p.suffix, 1) for p in files
                 if str(p).endswith(LOCAL_SUFFIXES))
    est = tokens * _ROW_BYTES_PER_TOKEN
    return est if cap is None else min(est, cap)


def rows_cached(d: DataConfig) -> bool:
    """Whether `train_datasets(d)` gives rows computed once and kept in the object store (read by every epoch, and by
    every trial of a sweep) rather than a stream that reads and tokenizes the source again each epoch: always for
    "local" and "synthetic" (in-memory rows), else `data.cache_rows`, and when that is None, whether
    `row_bytes_estimate` is known and at most CACHE_ROWS_AUTO_BYTES."""
    from ..config import BUILTIN_SOURCES

    if d.source in BUILTIN_SOURCES:
        return d.source != "passkey"
    if d.cache_rows is not None:
        return d.cache_rows
    est = row_bytes_estimate(d)
    return est is not None and est <= CACHE_ROWS_AUTO_BYTES


def check_train_data(cfg) -> None:
    """`check_data` for a whole TrainConfig (the model's vocabulary from its size or `init_from`)."""
    from ..config import BUILTIN_SOURCES, ConfigError
    from .trainer import _vocab_size

    if cfg.data.source in BUILTIN_SOURCES:
        return
    try:
        vocab = _vocab_size(cfg)
    except OSError as e:
        raise ConfigError("model.init_from", f"cannot read its config: {e}") from None
    check_data(cfg.data, vocab)


def _first_row(path: str, max_lines: int = 100) -> dict | None:
    """A local file's first row that parses (for parquet, its schema's fields with no values); None if none does."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return {name: None for name in pq.read_schema(path).names}
    with open(path, "rb") as f:
        for _, line in zip(range(max_lines), f):
            try:
                row = json.loads(line)
            except ValueError:  # blank or broken lines are the data layer's to count and skip
                continue
            if isinstance(row, dict):
                return row
    return None


def train_datasets(d: DataConfig, vocab_size: int) -> tuple[dict, dict | None]:
    """({"train": Dataset}, data-pipeline stats or None) for the configured source."""
    if d.source == "local":
        return {"train": rows_dataset(local_text_rows(d.seq_len, d.num_rows, d.seed))}, None
    if d.source == "synthetic":
        return {"train": rows_dataset(synthetic_rows(d.seq_len, d.num_rows or 256, vocab_size, d.seed))}, None
    return data_layer_datasets(d, vocab_size)


def data_layer_datasets(d: DataConfig, vocab_size: int | None = None) -> tuple[dict, object | None]:
    """Delegate to `condensation.data.pretraining_dataset(source, tokenizer, seq_len, **dataset_options)`; returns
    ({"train": Dataset}, its DataReport), `num_rows` capping the rows. The report's counts fill as the data runs.

    When `rows_cached(d)`, the rows are computed here, once, in the source's order (Ray Data's `preserve_order`, so
    the first num_rows are the same rows in the same order every time) and materialized in the object store: every
    epoch then reads those blocks, and the report's counts are complete on return."""
    try:
        from ..data import pretraining_dataset
        from ..data.pipeline import ordered_execution
        from ..tokenizer import load_tokenizer
    except ImportError as e:
        raise RuntimeError(f"data.source={d.source!r} needs condensation.data ({e}); use data.source=local or synthetic, "
                           "or pass datasets= to fit()") from e
    check_data(d, vocab_size)
    tok = load_tokenizer(d.tokenizer)
    cache = rows_cached(d)
    with ordered_execution(cache):
        ds, report = pretraining_dataset(d.source, tok, d.seq_len, **d.dataset_options)
        if d.num_rows is not None:
            ds = ds.limit(d.num_rows)
        if cache:
            ds = ds.materialize()
    return {"train": ds}, report
