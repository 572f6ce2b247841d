"""Build the offline text corpus (King James Bible, CPython's library and language reference) with its held-out split.

    mkdir -p data/debs && (cd data/debs && apt-get download bible-kjv-text)        # once, where apt works
    python workloads/make_corpus.py                                                 # -> data/corpus/
    python workloads/make_corpus.py --tokenizer smollm2-135m-instruct               # also count tokens
    python workloads/pretrain.py data.source=$PWD/data/corpus/train.jsonl ...

`data/` is ignored by git; the .deb (2.4 MB) is all a machine without apt or internet needs (the library is read
from the running Python, pure-Python .deb reading, no dpkg). Writes `train.jsonl`, `heldout.jsonl`,
`heldout_long.jsonl` and `manifest.json` under `--out` (see condensation.data.corpora); run again, it says the
folder is up to date. `--sources` picks among bible-kjv, python-stdlib, pydoc-topics, gcide (`--gcide` takes
dict-gcide's .deb). Under `ray job submit` pass data.source as an absolute path: the job's copy of the working
dir leaves out git-ignored folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from condensation.data.corpora import DEFAULT_SOURCES, CorpusError, build_corpus, count_tokens, record_tokens

ROOT = Path(__file__).resolve().parent.parent


def _found(pattern: str) -> Path | None:
    """The newest `data/debs/<pattern>` of the checkout, if any."""
    matches = sorted((ROOT / "data" / "debs").glob(pattern))
    return matches[-1] if matches else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "data" / "corpus")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma-separated source names")
    p.add_argument("--bible", type=Path, default=_found("bible-kjv-text_*.deb"),
                   help="bible-kjv-text .deb or unpacked folder (default: data/debs/bible-kjv-text_*.deb)")
    p.add_argument("--gcide", type=Path, default=_found("dict-gcide_*.deb"),
                   help="dict-gcide .deb or unpacked folder (default: data/debs/dict-gcide_*.deb)")
    p.add_argument("--stdlib-root", type=Path, default=None, help="default: this Python's standard library")
    p.add_argument("--stdlib-min-chars", type=int, default=2000)
    p.add_argument("--tokenizer", default=None, help="also count tokens (builtin, smollm2-135m-instruct, a folder)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        manifest = build_corpus(args.out, [s.strip() for s in args.sources.split(",") if s.strip()],
                                bible=args.bible, gcide=args.gcide, stdlib_root=args.stdlib_root,
                                stdlib_min_chars=args.stdlib_min_chars)
    except CorpusError as error:
        print(f"corpus error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"{args.out}: {'built' if manifest['rebuilt'] else 'up to date'} in {seconds:.1f} s "
          f"(Python {manifest['python_version']}, content {manifest['content_sha256'][:12]})")
    for name, s in manifest["sources"].items():
        print(f"  {name:14s} {s['documents']:5d} documents {s['characters']:>11,} chars; held out "
              f"{s['heldout_documents']} ({s['heldout_characters']:,} chars)")
    for name, f in manifest["files"].items():
        print(f"  {name:19s} {f['documents']:5d} rows {f['characters']:>11,} chars {f['bytes'] / 2**20:7.1f} MiB")
    if args.tokenizer:
        from condensation.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        start = time.perf_counter()
        counts = count_tokens(args.out, lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"])
        record_tokens(args.out, args.tokenizer, counts)
        print(f"tokens ({args.tokenizer}, {time.perf_counter() - start:.0f} s): {json.dumps(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
