"""Build the offline summarization data: Linux man pages, each summarized by its NAME line's description.

    mkdir -p data/debs && (cd data/debs && apt-get download manpages manpages-dev)    # once, where apt works
    python workloads/make_summaries.py                                               # -> data/summaries/manpages/
    python workloads/make_summaries.py --tokenizer smollm2-135m-instruct             # also prompt-length buckets
    python workloads/summarize.py --preset h200-manpages                            # the three models on it (GPU)

`data/` is ignored by git; the two .debs (3.4 MB) are all a machine without apt or internet needs (pure-Python .deb
reading and roff rendering, no dpkg, no groff), and the built folder (~7 MB) travels as it is. Writes `train.jsonl`
and `test.jsonl` (rows `{"article", "highlights", "name", "section", "names", "package"}`: CNN/DailyMail's schema)
and `manifest.json` (see condensation.data.manpages); run again, it says the folder is up to date. `--debs` takes
.deb files or unpacked folders in order (default: data/debs/manpages*.deb). Under `ray job submit` pass the files
as absolute paths: the job's copy of the working dir leaves out git-ignored folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from condensation.data.corpora import CorpusError, record_tokens
from condensation.data.manpages import SKIP_HELP, build_manpage_summaries, token_stats

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "data" / "summaries" / "manpages")
    p.add_argument("--debs", type=Path, nargs="+", default=sorted((ROOT / "data" / "debs").glob("manpages*.deb")),
                   help=".deb files or unpacked folders of man pages (default: data/debs/manpages*.deb)")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--min-description-words", type=int, default=2)
    p.add_argument("--min-article-chars", type=int, default=200)
    p.add_argument("--tokenizer", default=None, help="also count prompt tokens (builtin, smollm2-135m-instruct, ...)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        manifest = build_manpage_summaries(args.out, args.debs, test_fraction=args.test_fraction,
                                           min_description_words=args.min_description_words,
                                           min_article_chars=args.min_article_chars)
    except CorpusError as error:
        hint = "" if args.debs else " (none found: mkdir -p data/debs && cd data/debs && apt-get download " \
                                    "manpages manpages-dev)"
        print(f"summaries error: {error}{hint}", file=sys.stderr)
        return 2
    print(f"{args.out}: {'built' if manifest['rebuilt'] else 'up to date'} in {time.perf_counter() - start:.1f} s "
          f"(content {manifest['content_sha256'][:12]}): {manifest['rows']} pages")
    for deb, note in manifest["inputs"].items():
        print(f"  {deb}: {note['page_files']} page files, {note['links']} links, {note['rows']} rows")
    print("  sections: " + ", ".join(f"{k} {v}" for k, v in manifest["sections"].items()))
    for reason, n in manifest["skipped"].items():
        print(f"  skipped {n:5d} {reason}: {SKIP_HELP.get(reason.split(':')[0], '')}")
    for name, f in manifest["files"].items():
        print(f"  {name:11s} {f['rows']:5d} rows {f['bytes'] / 2**20:6.1f} MiB; article chars median "
              f"{f['article_chars']['median']:,}, description words median {f['description_words']['median']}")
    if args.tokenizer:
        from condensation.tokenizer import load_tokenizer

        start = time.perf_counter()
        stats = token_stats(args.out, load_tokenizer(args.tokenizer))
        record_tokens(args.out, args.tokenizer, stats)
        print(f"tokens ({args.tokenizer}, {time.perf_counter() - start:.0f} s; prompt = the paper's template around "
              "the article):")
        for name, s in stats.items():
            print(f"  {name:11s} buckets {json.dumps(s['buckets'])}; prompt tokens {json.dumps(s['prompt_tokens'])}; "
                  f"summary tokens median {s['summary_tokens']['median']}, max {s['summary_tokens']['max']}; "
                  f"rows fitting a training row of N tokens {json.dumps(s['fit'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
