"""JSON storage shared by the evaluation results (passkey grids, loss curves): each defines to_dict/from_dict."""

from __future__ import annotations

import json
from pathlib import Path


class JsonRecord:
    """`to_json(path=None)` and `from_json(text_or_path)` over a class's `to_dict` / `from_dict`."""

    def to_json(self, path: str | Path | None = None) -> str:
        """The record as JSON text; also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """From JSON text, or from a file path (a `Path`, or a str that does not look like a JSON object)."""
        if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
            text_or_path = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text_or_path))
