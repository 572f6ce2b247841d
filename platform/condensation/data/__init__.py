"""The data layer: Ray Data pipelines that read, validate, tokenize, filter, pack and shard the paper's corpora.

- `passkey`: the Appendix C passkey task, generated to an exact token length and needle depth.
- `pretraining`: FineWeb-edu (streamed) or local jsonl/parquet, filtered by length and cut into sequences.
- `summarization`: CNN/DailyMail and BookSum in the Appendix D format, loss on the summary only.
- `synthetic_summaries`: generated reports with templated reference summaries in CNN/DailyMail's schema (the
  offline CPU default of `workloads/summarize.py`, labelled synthetic wherever it is scored).
- `pipeline`: the shared stages, `DataSource` (dataset + skip-count report), sharding for Ray Train.
- `sources`: hub and local readers, row validation; `report`: counts aggregated out of Ray tasks.
- `corpora`: a real-text corpus with a held-out split built offline (King James Bible from a Debian .deb,
  CPython's library and language reference); `workloads/make_corpus.py` builds it.
- `manpages`: real summarization pairs built offline: Linux man pages (Debian's manpages, manpages-dev .debs)
  summarized by their NAME line, rendered by `roff` (a pure-Python man(7) renderer);
  `workloads/make_summaries.py` builds them.
"""

from .passkey import passkey_dataset, passkey_example
from .pipeline import DataSource, equal_batches, shard_for_workers, torch_batches, train_view
from .pretraining import pretraining_dataset
from .report import DataReport
from .sources import KNOWN_DATASETS, DataSourceError, read_records
from .summarization import SUMMARY_PROMPT, format_summary_prompt, summarization_dataset

__all__ = [
    "KNOWN_DATASETS",
    "SUMMARY_PROMPT",
    "DataReport",
    "DataSource",
    "DataSourceError",
    "equal_batches",
    "format_summary_prompt",
    "passkey_dataset",
    "passkey_example",
    "pretraining_dataset",
    "read_records",
    "shard_for_workers",
    "summarization_dataset",
    "torch_batches",
    "train_view",
]
