"""Reading raw records: Hugging Face hub datasets (streamed) and local jsonl / parquet files, then validation.

`read_records(source)` accepts
- a known short name (`KNOWN_DATASETS`: "fineweb-edu", "cnn_dailymail", "booksum"),
- a hub id "owner/name" (streamed with `datasets.load_dataset(..., streaming=True)`, never fully downloaded),
- a local file or folder of `.jsonl` / `.json` / `.parquet` files with the same fields as the hub dataset.

Local jsonl is read line by line as raw bytes (`JsonlLinesDatasource`), not with pyarrow's JSON reader,
because pyarrow fails the whole file on one line with a wrong type or invalid UTF-8; here such a line is
counted and skipped by `validate_batch`, as the data contract asks ("nothing valid is dropped silently").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource

from .report import EMPTY, INVALID_JSON, MISSING_FIELD, NOT_STRING, UNDECODABLE, DataReport, log_skips

RAW_LINE = "__raw_line__"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_LINES_PER_BLOCK = 1024


@dataclass(frozen=True)
class HubDataset:
    """Where a paper corpus lives on the hub and which fields hold its text."""

    repo_id: str
    config: str | None
    fields: tuple[str, ...]


KNOWN_DATASETS: dict[str, HubDataset] = {
    # sample-10BT: a 10B-token random sample; the paper filters to >4K/>6K-token documents, so any large
    # slice works and this one streams fastest. Pass the full id to use another config.
    "fineweb-edu": HubDataset("HuggingFaceFW/fineweb-edu", "sample-10BT", ("text",)),
    "cnn_dailymail": HubDataset("abisee/cnn_dailymail", "3.0.0", ("article", "highlights")),
    # kmfoda/booksum: chapter-level BookSum; text in `chapter`, reference in `summary_text`
    "booksum": HubDataset("kmfoda/booksum", None, ("chapter", "summary_text")),
}
_BY_REPO = {spec.repo_id: spec for spec in KNOWN_DATASETS.values()}


class DataSourceError(ValueError):
    """A source that cannot be read at all (unknown id, hub failure); the message names the source."""


class JsonlLinesDatasource(FileBasedDatasource):
    """Each line of each file as raw bytes, so decoding and parsing errors stay per-row (see module doc)."""

    _FILE_EXTENSIONS = ["jsonl", "json"]

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        data = f.readall()
        lines = [line for line in data.split(b"\n") if line.strip()]
        for start in range(0, len(lines), _LINES_PER_BLOCK):
            yield pa.table({RAW_LINE: pa.array(lines[start:start + _LINES_PER_BLOCK], pa.binary())})


def looks_local(source: str) -> bool:
    """A path rather than a hub id: has a data-file suffix, starts like a path, or exists."""
    return (source.endswith(LOCAL_SUFFIXES) or source.startswith(("/", "./", "../", "~"))
            or Path(source).expanduser().exists())


def _local_files(source: str) -> tuple[list[str], list[str]]:
    """(jsonl files, parquet files) under a file or folder; raises naming the path when there are none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r}: no such file or directory")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    jsonl = [str(p) for p in files if p.suffix in (".jsonl", ".json")]
    parquet = [str(p) for p in files if p.suffix == ".parquet"]
    if not jsonl and not parquet:
        raise FileNotFoundError(f"data source {source!r}: no .jsonl/.json/.parquet files there")
    return jsonl, parquet


def read_local(source: str) -> ray.data.Dataset:
    """Local jsonl and/or parquet files as a Ray dataset (jsonl rows carry one raw-line column)."""
    jsonl, parquet = _local_files(source)
    parts: list[ray.data.Dataset] = []
    if jsonl:
        parts.append(ray.data.read_datasource(JsonlLinesDatasource(jsonl), num_cpus=0.25))
    if parquet:
        parts.append(ray.data.read_parquet(parquet, num_cpus=0.25))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def hub_spec(source: str) -> HubDataset | None:
    """The known spec for a short name or hub id; None for an unknown hub id (read with given config)."""
    if source in KNOWN_DATASETS:
        return KNOWN_DATASETS[source]
    return _BY_REPO.get(source)


def read_hub(source: str, split: str = "train", config: str | None = None) -> ray.data.Dataset:
    """Stream a hub dataset into Ray Data (no full download). Fails with a message naming the source."""
    spec = hub_spec(source)
    if spec is None and "/" not in source:
        raise DataSourceError(
            f"unknown dataset {source!r}: not a local path, not one of {sorted(KNOWN_DATASETS)}, "
            "and not a hub id of the form 'owner/name'"
        )
    repo_id = spec.repo_id if spec else source
    name = config if config is not None else (spec.config if spec else None)
    import datasets

    try:
        stream = datasets.load_dataset(repo_id, name=name, split=split, streaming=True)
    except Exception as error:  # the hub raises many types (offline, 404, gated); all mean "cannot read"
        raise DataSourceError(f"cannot load dataset {repo_id!r} (config {name!r}, split {split!r}): {error}") \
            from error
    return ray.data.from_huggingface(stream)


def read_records(source: str, split: str = "train", config: str | None = None) -> ray.data.Dataset:
    """Raw records of a local path or hub dataset; validation happens later, per row."""
    if looks_local(source):
        return read_local(source)
    return read_hub(source, split=split, config=config)


def _row_dicts(batch: pa.Table) -> list[dict[str, Any] | str]:
    """Rows of a batch as dicts; a jsonl row whose line cannot be parsed becomes its skip reason."""
    rows: list[dict[str, Any] | str] = []
    for row in batch.to_pylist():
        if RAW_LINE not in row:
            rows.append(row)
            continue
        try:
            obj = json.loads(row[RAW_LINE].decode("utf-8"))
        except UnicodeDecodeError:
            rows.append(UNDECODABLE)
            continue
        except json.JSONDecodeError:
            rows.append(INVALID_JSON)
            continue
        rows.append(obj if isinstance(obj, dict) else INVALID_JSON)
    return rows


def check_field(row: dict[str, Any], field: str) -> str | tuple[str]:
    """The field's text, or a 1-tuple holding the skip reason (a tuple so it cannot be mistaken for text)."""
    value = row.get(field)
    if value is None:
        return (MISSING_FIELD,)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return (UNDECODABLE,)
    if not isinstance(value, str):
        return (NOT_STRING,)
    if not value.strip():
        return (EMPTY,)
    return value


def validate_batch(batch: pa.Table, fields: Sequence[str], out_fields: Sequence[str],
                   report: DataReport, source: str) -> pa.Table:
    """Keep rows whose `fields` are all non-empty strings, renamed to `out_fields`; count the rest."""
    rows = _row_dicts(batch)
    columns: list[list[str]] = [[] for _ in fields]
    skipped: Counter[str] = Counter()
    first_bad: str | None = None
    for index, row in enumerate(rows):
        if isinstance(row, str):
            values: list[str | tuple[str]] = [(row,)]
        else:
            values = [check_field(row, f) for f in fields]
        reason = next((v[0] for v in values if isinstance(v, tuple)), None)
        if reason is not None:
            skipped[reason] += 1
            if first_bad is None:
                first_bad = f"row {index} of its batch: {reason}"
                if reason == MISSING_FIELD and isinstance(row, dict):  # the usual cause: the text is under another name
                    missing = [f for f, v in zip(fields, values) if v == (MISSING_FIELD,)]
                    first_bad += (f" {missing} (its fields: {sorted(row)}; name the text field with text_field=..., "
                                  f"in a training config data.dataset_options.text_field=...)")
            continue
        for column, value in zip(columns, values):
            column.append(value)
    log_skips(source, skipped, first_bad)
    report.add({"rows_read": len(rows), "rows_valid": len(columns[0]),
                **{f"skipped_{k}": v for k, v in skipped.items()}})
    return pa.table({name: pa.array(col, pa.string()) for name, col in zip(out_fields, columns)})


def validated(ds: ray.data.Dataset, fields: Sequence[str], out_fields: Sequence[str], report: DataReport,
              source: str, num_cpus: float = 0.25) -> ray.data.Dataset:
    """Ray stage: validate and rename fields (fractional CPUs: whole CPUs deadlock Ray Data on 2 cores)."""
    return ds.map_batches(
        validate_batch, batch_format="pyarrow", num_cpus=num_cpus,
        fn_kwargs={"fields": tuple(fields), "out_fields": tuple(out_fields), "report": report, "source": source},
    )
