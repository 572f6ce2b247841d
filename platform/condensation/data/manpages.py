"""Real summarization data without any hub: Linux man pages, each summarized by its one-line NAME description.

Why: the summarization comparison (`condensation.summarize`, issue 14) needs real article/summary pairs on machines
that reach no hub (the GPU machine, CI). Every Debian mirror carries the Linux man-pages project's pages as roff
sources: `manpages-dev` (sections 2 and 3: system calls, library functions) and `manpages` (sections 1, 4, 5, 7, 8:
commands, devices, file formats, overviews); `apt-get download manpages manpages-dev` (3.4 MB) and the .debs travel
anywhere. Other packages of man(7) pages may be added (`debs=[...]`).

A row per page, in CNN/DailyMail's schema so the summarization data layer reads it as it is:

- `article`: the page as plain text (rendered in pure Python by `condensation.data.roff`, no groff) without its NAME,
  SYNOPSIS and LIBRARY sections (`EXCLUDED_SECTIONS`): DESCRIPTION and what follows, each section under its heading.
  The function and command names stay in the text: they name the page's subject, but not what its summary says.
- `highlights`: the NAME line's description after the dash ("allocate and free dynamic memory" for
  "malloc, free, calloc, realloc, reallocarray \\- allocate and free dynamic memory").
- `name` (the page's file name, "malloc"), `section` ("3", "3type", ...), `names` (those of the NAME line),
  `package` (the .deb it came from).

Skipped, each counted by reason in the manifest (with the page names): links to other pages (symbolic links in the
package, or pages that are only a `.so` request), pages the renderer cannot read (not UTF-8, mdoc(7) macros), a
missing NAME section or one without a dash, descriptions shorter than `min_description_words`, articles shorter
than `min_article_chars`, and a page already read from an earlier package (same file name and section).

Split by page name, deterministically: a page is in the test file when sha256(name) falls below `test_fraction`
(10%), so pages of one name in several sections (stat.2, stat.3type) stay on one side. Rows are in a fixed
pseudo-random order (by a hash of the page), so the first N test rows are a sample of all sections.

    from condensation.data.manpages import build_manpage_summaries
    manifest = build_manpage_summaries("data/summaries/manpages", debs=["data/debs/manpages_6.03-2_all.deb",
                                                                       "data/debs/manpages-dev_6.03-2_all.deb"])

writes `train.jsonl`, `test.jsonl` and `manifest.json` (inputs, options, counts, skipped pages by reason, content
hash); idempotent like `condensation.data.corpora`: a folder whose manifest has the same content hash and options is
left untouched, otherwise it is written to a temporary sibling folder and renamed into place. `token_stats` adds the
prompt lengths in a tokenizer (the paper's prompt: the 0-512 / 512-1024 / 1024+ buckets of Table II).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .corpora import CorpusError, deb_tree, heldout_by_hash, read_manifest, replace_folder
from .roff import RoffError, render

FORMAT = 1  # of the folder; part of the manifest, so a format change rebuilds
TRAIN_FILE, TEST_FILE, MANIFEST_FILE = "train.jsonl", "test.jsonl", "manifest.json"
EXCLUDED_SECTIONS = ("NAME", "SYNOPSIS", "LIBRARY")
# English pages only (translations live in usr/share/man/<lang>/man*/)
_PAGE_PATH = re.compile(r"(?:^|/)usr/share/man/man[1-9n][^/]*/([^/]+)$")
_PAGE_FILE = re.compile(r"(.+)\.([1-9n][a-z]*)(?:\.gz)?$")
_DASH = re.compile(r"\s+(?:\\-|-|\u2013|\u2014)+\s+")

# reasons a page gives no row (manifest["skipped"])
LINK, SO_LINK, NOT_UTF8, UNREADABLE = "link", "so_link", "not_utf8", "unreadable"
NO_NAME, NO_DASH, SHORT_DESCRIPTION, SHORT_ARTICLE, DUPLICATE = (
    "no_name_section", "name_without_dash", "short_description", "short_article", "duplicate")
REASONS = (LINK, SO_LINK, NOT_UTF8, UNREADABLE, NO_NAME, NO_DASH, SHORT_DESCRIPTION, SHORT_ARTICLE, DUPLICATE)


@dataclass(frozen=True)
class ManPage:
    name: str
    section: str
    names: tuple[str, ...]
    description: str
    article: str
    package: str

    @property
    def key(self) -> str:
        return f"{self.name}.{self.section}"

    def row(self) -> dict:
        return {"article": self.article, "highlights": self.description, "name": self.name, "section": self.section,
                "names": list(self.names), "package": self.package}


def parse_name_line(text: str) -> tuple[list[str], str] | None:
    """(names, description) of a rendered NAME section ("malloc, free - allocate and free dynamic memory"), or None
    when it has no dash between spaces. The section may span lines; the first dash separates."""
    flat = " ".join(text.split())
    m = _DASH.search(flat)
    if not m:
        return None
    names = [n.strip() for n in flat[:m.start()].split(",") if n.strip()]
    return names, flat[m.end():].strip()


def page_article(sections: Sequence[tuple[str, str]], excluded: Sequence[str] = EXCLUDED_SECTIONS) -> str:
    """The rendered page without its `excluded` sections: each section's heading on its own line above its text."""
    parts = [f"{heading}\n{text}" if heading else text for heading, text in sections
             if heading not in excluded and text.strip()]
    return "\n\n".join(parts).strip()


def page_sources(path: str | os.PathLike) -> tuple[str, dict[str, bytes], dict[str, str]]:
    """(package name, {file name: bytes}, {file name: link target}) of the English man pages in a .deb, its unpacked
    root (`dpkg-deb -x`) or a folder of man<N>/ folders. File names are "malloc.3.gz"-like (no folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"man pages: no such file or folder: {p}")
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    if p.is_file():
        if p.suffix != ".deb":
            raise CorpusError(f"man pages: {p} is neither a .deb nor a folder")
        found, found_links = deb_tree(p, lambda m: _PAGE_PATH.search(m) is not None)
        for member, data in found.items():
            files.setdefault(Path(member).name, data)
        for member, target in found_links.items():
            links.setdefault(Path(member).name, target)
        return p.name.split("_")[0], files, links
    roots = [d for d in (p / "usr" / "share" / "man", p) if d.is_dir()]
    for folder in sorted(d for d in roots[0].iterdir() if d.is_dir() and re.fullmatch(r"man[1-9n][^/]*", d.name)):
        for f in sorted(folder.iterdir()):
            if f.is_symlink():
                links.setdefault(f.name, os.readlink(f))
            elif f.is_file():
                files.setdefault(f.name, f.read_bytes())
    return p.name, files, links


def read_page(file_name: str, data: bytes, package: str, min_description_words: int = 2,
              min_article_chars: int = 200) -> tuple[ManPage | None, str | None, dict[str, int]]:
    """(page, None, unknown roff) or (None, reason, unknown roff) for one man page file (gzipped or plain roff)."""
    m = _PAGE_FILE.fullmatch(file_name)
    name, section = (m.group(1), m.group(2)) if m else (file_name, "")
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, NOT_UTF8, {}
    try:
        page = render(source)
    except (RoffError, RecursionError, ValueError, IndexError) as error:
        return None, f"{UNREADABLE}: {error}"[:80], {}
    if page.so is not None:
        return None, SO_LINK, page.unknown
    name_text = page.section("NAME")
    if name_text is None or not name_text.strip():
        return None, NO_NAME, page.unknown
    parsed = parse_name_line(name_text)
    if parsed is None:
        return None, NO_DASH, page.unknown
    names, description = parsed
    if len(description.split()) < min_description_words:
        return None, SHORT_DESCRIPTION, page.unknown
    article = page_article(page.sections)
    if len(article) < min_article_chars:
        return None, SHORT_ARTICLE, page.unknown
    return ManPage(name, section, tuple(names), description, article, package), None, page.unknown


def collect(debs: Sequence[str | os.PathLike], min_description_words: int = 2, min_article_chars: int = 200,
            ) -> tuple[list[ManPage], dict[str, list[str]], dict]:
    """The pages of every package in order (a page already read from an earlier package is a duplicate), the skipped
    pages by reason ({reason: ["malloc.3", ...]}), and per-package notes (pages, rows, unknown roff)."""
    if not debs:
        raise CorpusError("man pages: no package given: `apt-get download manpages manpages-dev` and pass the .debs")
    pages: list[ManPage] = []
    skipped: dict[str, list[str]] = {}
    notes: dict = {}
    seen: set[str] = set()
    for deb in debs:
        package, files, links = page_sources(deb)
        unknown: dict[str, int] = {}
        rows = 0
        for file_name in sorted(files):
            key = _key(file_name)
            if key in seen:
                skipped.setdefault(DUPLICATE, []).append(key)
                continue
            seen.add(key)
            page, reason, odd = read_page(file_name, files[file_name], package, min_description_words,
                                          min_article_chars)
            for k, v in odd.items():
                unknown[k] = unknown.get(k, 0) + v
            if page is None:
                skipped.setdefault(reason, []).append(key)
            else:
                pages.append(page)
                rows += 1
        for file_name in sorted(links):
            skipped.setdefault(LINK, []).append(_key(file_name))
        notes[Path(deb).name] = {"package": package, "page_files": len(files), "links": len(links), "rows": rows,
                                 "unknown_roff": dict(sorted(unknown.items()))}
    return pages, skipped, notes


def _key(file_name: str) -> str:
    return file_name[:-3] if file_name.endswith(".gz") else file_name


def is_test(page: ManPage, fraction: float) -> bool:
    """The deterministic split: by the page's name (not its section), so same-named pages stay on one side."""
    return heldout_by_hash(page.name, fraction)


def _mix_key(page: ManPage) -> str:
    return hashlib.sha256(page.key.encode()).hexdigest()


def content_hash(pages: Iterable[ManPage], fraction: float) -> str:
    h = hashlib.sha256()
    for p in pages:
        h.update(json.dumps([p.row(), is_test(p, fraction)]).encode())
        h.update(b"\n")
    return h.hexdigest()


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _stats(values: Sequence[int]) -> dict[str, int]:
    if not values:
        return {}
    v = sorted(values)
    at = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"min": v[0], "p10": at(0.1), "median": at(0.5), "p90": at(0.9), "max": v[-1],
            "mean": round(sum(v) / len(v))}


def build_manpage_summaries(out_dir: str | os.PathLike, debs: Sequence[str | os.PathLike], *,
                            test_fraction: float = 0.1, min_description_words: int = 2,
                            min_article_chars: int = 200) -> dict:
    """Build (or find up to date) the folder `out_dir` from the man pages of `debs` (.deb files or unpacked
    folders, read in order); returns its manifest (`"rebuilt"`: False when the folder already held this content)."""
    if not 0 < test_fraction < 1:
        raise CorpusError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out = Path(out_dir)
    pages, skipped, notes = collect(debs, min_description_words, min_article_chars)
    if not pages:
        raise CorpusError(f"man pages: no page of {[str(d) for d in debs]} gave a row (skipped: "
                          f"{ {k: len(v) for k, v in skipped.items()} })")
    digest = content_hash(pages, test_fraction)
    options = {"test_fraction": test_fraction, "min_description_words": min_description_words,
               "min_article_chars": min_article_chars, "excluded_sections": list(EXCLUDED_SECTIONS)}
    old = read_manifest(out)
    if old is not None and old.get("content_sha256") == digest and old.get("options") == options \
            and old.get("format") == FORMAT and all((out / f).is_file() for f in (TRAIN_FILE, TEST_FILE)):
        return {**old, "rebuilt": False}
    if out.exists() and old is None and (not out.is_dir() or any(out.iterdir())):
        raise CorpusError(f"{out} exists and is not a summaries folder (no {MANIFEST_FILE}); refusing to replace it")

    ordered = sorted(pages, key=_mix_key)
    train = [p for p in ordered if not is_test(p, test_fraction)]
    test = [p for p in ordered if is_test(p, test_fraction)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sizes = {TRAIN_FILE: _write_jsonl(tmp / TRAIN_FILE, (p.row() for p in train)),
                 TEST_FILE: _write_jsonl(tmp / TEST_FILE, (p.row() for p in test))}
        sections: dict[str, int] = {}
        for p in pages:
            sections[p.section] = sections.get(p.section, 0) + 1
        manifest = {
            "format": FORMAT, "options": options, "content_sha256": digest,
            "inputs": notes,
            "rows": len(pages), "sections": dict(sorted(sections.items())),
            "skipped": {r: len(skipped[r]) for r in sorted(skipped, key=_reason_order)},
            "skipped_pages": {r: sorted(skipped[r]) for r in sorted(skipped, key=_reason_order) if r != LINK},
            "files": {name: {"rows": len(part), "bytes": sizes[name],
                             "article_chars": _stats([len(p.article) for p in part]),
                             "description_words": _stats([len(p.description.split()) for p in part])}
                      for name, part in ((TRAIN_FILE, train), (TEST_FILE, test))},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")  # last
        tmp.chmod(0o755)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "rebuilt": True}


def _reason_order(reason: str) -> tuple[int, str]:
    base = reason.split(":")[0]
    return (REASONS.index(base) if base in REASONS else len(REASONS), reason)


def token_stats(out_dir: str | os.PathLike, tokenizer, edges: Sequence[int] = (512, 1024),
                seq_lens: Sequence[int] = (1024, 2048, 3072)) -> dict:
    """Per file: the paper's prompt length (bos + "Summarize this text:" + article + "----Summary:", what places an
    example in Table II's buckets) and the summary length in `tokenizer`, the rows per bucket of `edges`, and how
    many rows fit a training row of each of `seq_lens` (prompt + summary + eos)."""
    from .pipeline import encode_texts
    from .summarization import _template_ids

    head, tail = _template_ids(tokenizer)
    names = [f"0-{edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    out: dict = {}
    for file in (TRAIN_FILE, TEST_FILE):
        rows = [json.loads(line) for line in (Path(out_dir) / file).read_text(encoding="utf-8").splitlines()]
        prompts, summaries = [], []
        for start in range(0, len(rows), 64):
            batch = rows[start:start + 64]
            prompts += [len(head) + len(a) + len(tail) for a in encode_texts(tokenizer, [r["article"] for r in batch])]
            summaries += [len(s) for s in encode_texts(tokenizer, [r["highlights"] for r in batch])]
        buckets = {n: 0 for n in names}
        for n in prompts:
            i = sum(n >= e for e in edges)  # 0-512 holds lengths below 512, as condensation.evaluate.rouge buckets
            buckets[names[i]] += 1
        out[file] = {"rows": len(rows), "prompt_tokens": _stats(prompts), "summary_tokens": _stats(summaries),
                     "buckets": buckets,
                     "fit": {str(s): sum(p + q + 1 <= s for p, q in zip(prompts, summaries)) for s in seq_lens}}
    return out


SKIP_HELP: dict[str, str] = {
    LINK: "a symbolic link to another page (an alias)", SO_LINK: "a page that is only `.so <other page>` (an alias)",
    NOT_UTF8: "not UTF-8", UNREADABLE: "the renderer cannot read it (e.g. mdoc(7) macros)",
    NO_NAME: "no NAME section", NO_DASH: "a NAME section without ' - ' between names and description",
    SHORT_DESCRIPTION: "a description shorter than min_description_words",
    SHORT_ARTICLE: "an article shorter than min_article_chars", DUPLICATE: "already read from an earlier package",
}
