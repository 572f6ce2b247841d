"""Counts of what the pipeline read, kept and skipped, aggregated out of Ray tasks.

Why an actor: map tasks run in other processes, possibly on other nodes, and a streaming dataset is never
"done" in one place where a return value could be collected. Each task adds its batch's counts to one
named-less actor (0 CPUs, so it never competes with data or train workers for the 2 cores); the driver
reads the totals whenever it logs (e.g. to MLflow after each epoch). The add is awaited, so once a
consumer has seen a batch the counts of every batch before it are in. Every execution of the dataset counts
again (a second epoch doubles `rows_read`): log differences between epochs, or `counts()` after the first.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import ray

logger = logging.getLogger(__name__)

# Reasons a row is skipped (keys of DataReport.counts(), prefixed "skipped_").
MISSING_FIELD = "missing_field"
NOT_STRING = "not_string"
EMPTY = "empty"
UNDECODABLE = "undecodable"
INVALID_JSON = "invalid_json"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
SKIP_REASONS = (MISSING_FIELD, NOT_STRING, EMPTY, UNDECODABLE, INVALID_JSON, TOO_SHORT, TOO_LONG)


@ray.remote(num_cpus=0)
class _CountsActor:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, counts: Mapping[str, int]) -> None:
        self._counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self._counts)


class DataReport:
    """A handle to the counts of one pipeline; picklable, so map functions carry it into Ray tasks.

    Keys: `rows_read`, `rows_valid`, `skipped_<reason>` (reasons in SKIP_REASONS), `skipped_total`,
    and per source `sequences`, `tokens` (tokens emitted in sequences), `tokens_dropped` (valid tokens
    that did not fill a whole sequence), `tokenize_cpu_ms` (CPU time spent tokenizing and packing).
    """

    def __init__(self, name: str = "data") -> None:
        self.name = name
        self._actor = _CountsActor.remote()

    def add(self, counts: Mapping[str, int]) -> None:
        """Add one batch's counts (called inside Ray tasks). Zero entries are dropped to keep it small."""
        nonzero = {k: int(v) for k, v in counts.items() if v}
        if nonzero:
            ray.get(self._actor.add.remote(nonzero))

    def counts(self) -> dict[str, int]:
        """Totals so far, with `skipped_total`; complete once the dataset has been fully consumed."""
        counts = ray.get(self._actor.get.remote())
        counts["skipped_total"] = sum(v for k, v in counts.items() if k.startswith("skipped_") and k != "skipped_total")
        return dict(sorted(counts.items()))

    def __repr__(self) -> str:
        return f"DataReport({self.name!r})"


def log_skips(source: str, skipped: Mapping[str, int], example: str | None = None) -> None:
    """One log line per batch that had bad rows: enough to find them without flooding worker logs."""
    if any(skipped.values()):
        detail = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()) if v)
        suffix = f" (first: {example})" if example else ""
        logger.warning("%s: skipped rows: %s%s", source, detail, suffix)
