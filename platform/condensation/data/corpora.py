"""Real long English and code text without any hub: a train / held-out corpus built from files every machine has.

Why: continual pretraining of a real Llama (SmolLM2, `condensation.pretrained`) as Condensation needs real text,
and its evaluation needs held-out text long enough for 64K-token windows; the CPU machines, CI and the GPU machine
cannot reach a hub. Sources, each optional and selected by name (`SOURCES`):

- `bible-kjv`: the King James Bible of Debian's `bible-kjv-text` package (`apt-get download bible-kjv-text`; the
  .deb or its unpacked folder travels anywhere). Its `usr/lib/bible.data` is the Bible Retrieval System's windowed
  LZW file ("EC02": a header, a table of window offsets, each 64 KiB window compressed like compress(1));
  `read_bible_data` decodes it in pure Python (byte-identical to the package's `bible` program on all 31,102
  verses). One document per book (66), with its title, chapter headings and verse numbers.
- `python-stdlib`: the running interpreter's standard library sources (`sysconfig.get_paths()["stdlib"]`), one
  document per `.py` file of at least `stdlib_min_chars` characters, test suites and generated tables excluded.
- `pydoc-topics`: CPython's language reference topics (`pydoc_data.topics`), one document per topic.
- `gcide`: the Collaborative International Dictionary of English (Debian's `dict-gcide`), one document per initial
  letter (a few MB each).

Held out, by whole document and deterministically: the Bible books of `HELDOUT_BOOKS` (338K SmolLM2 tokens, Jeremiah
and Ezekiel among them), the gcide letters of `HELDOUT_LETTERS`, and for the stdlib and the pydoc topics the documents
whose name hashes below `heldout_fraction` (5%; by name, so a file stays on its side across Python versions).

    from condensation.data.corpora import build_corpus
    manifest = build_corpus("data/corpus", bible="data/debs/bible-kjv-text_4.38_all.deb")

writes `train.jsonl` and `heldout.jsonl` (rows `{"text", "source", "name"}`; `data.source=<folder>/train.jsonl`
trains on it), `heldout_long.jsonl` (per source, its held-out documents joined in canonical order into one long
text, so 64K-token windows of natural text exist) and `manifest.json` (sources, documents, characters, held-out
names, Python version, content hash). Rows of `train.jsonl` are in a fixed pseudo-random order (by a hash of
source and name) so that sources are mixed: the pretraining pipeline reads rows in order and never shuffles.
A folder whose manifest already has the same content hash and options is left untouched; otherwise the corpus is
written to a temporary sibling folder and renamed into place, so a crash never leaves a half corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import struct
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("bible-kjv", "python-stdlib", "pydoc-topics", "gcide")
DEFAULT_SOURCES = ("bible-kjv", "python-stdlib", "pydoc-topics")
FORMAT = 1  # of the folder; part of the manifest, so a format change rebuilds

TRAIN_FILE, HELDOUT_FILE, LONG_FILE = "train.jsonl", "heldout.jsonl", "heldout_long.jsonl"
MANIFEST_FILE = "manifest.json"


class CorpusError(ValueError):
    """A source that cannot be read (missing path, wrong layout, unknown name); the message names source and path."""


@dataclass(frozen=True)
class Document:
    source: str
    name: str
    text: str
    heldout: bool


# ---------------------------------------------------------------------------------------------------- Debian files

def deb_tree(deb: Path, select: Callable[[str], bool]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The files and symbolic links of a Debian package whose path (e.g. "usr/share/man/man3/malloc.3.gz") passes
    `select`, in pure Python: ({path: bytes}, {path: link target}), in the archive's order.

    A .deb is an ar archive (`!<arch>\\n`, then 60-byte headers: name 16, dates and ids 32, size 10, magic 2; bodies
    padded to even length) holding `data.tar.xz` (or .gz, .bz2, plain), which tarfile reads."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise CorpusError(f"{deb}: not a Debian package (no ar archive header)")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos:pos + 16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(raw[pos + 48:pos + 58].decode("ascii").strip())
        except ValueError:
            raise CorpusError(f"{deb}: damaged Debian package (bad ar header at byte {pos})") from None
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if not name.startswith("data.tar"):
            continue
        files: dict[str, bytes] = {}
        links: dict[str, str] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for info in tar:
                    member = info.name[2:] if info.name.startswith("./") else info.name
                    if not select(member):
                        continue
                    if info.isfile():
                        files[member] = tar.extractfile(info).read()
                    elif info.issym() or info.islnk():
                        links[member] = info.linkname
        except tarfile.ReadError as error:
            raise CorpusError(f"{deb}: cannot read its {name} ({error}); unpack it with `dpkg-deb -x` and pass "
                              "the folder instead") from error
        return files, links
    raise CorpusError(f"{deb}: no data.tar member in the package")


def deb_members(deb: Path, members: Sequence[str]) -> dict[str, bytes]:
    """The bytes of each of `members` (e.g. "usr/lib/bible.data") inside a Debian package, in pure Python."""
    wanted = set(members)
    found, _ = deb_tree(deb, wanted.__contains__)
    missing = [m for m in members if m not in found]
    if missing:
        raise CorpusError(f"{deb}: the package holds no {', '.join(missing)}")
    return found


def package_files(source: str, path: str | os.PathLike | None, members: Sequence[str],
                  package: str) -> dict[str, bytes]:
    """`members` of a Debian package given as the .deb, its unpacked root (`dpkg-deb -x`), or a folder holding the
    files themselves; a single member may also be given as the file itself."""
    if path is None:
        raise CorpusError(f"source {source!r} needs the path of Debian's {package} package (.deb or unpacked "
                          f"folder): `apt-get download {package}`")
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"source {source!r}: no such file or folder: {p}")
    if p.is_file() and p.suffix == ".deb":
        try:
            return deb_members(p, members)
        except CorpusError as error:
            raise CorpusError(f"source {source!r}: {error}") from error
    if p.is_file() and len(members) == 1:
        return {members[0]: p.read_bytes()}
    found = {}
    for member in members:
        candidate = next((c for c in (p / member, p / Path(member).name) if c.is_file()), None)
        if candidate is None:
            raise CorpusError(f"source {source!r}: {p} holds neither {member} nor {Path(member).name} "
                              f"(pass the {package} .deb or the folder `dpkg-deb -x` unpacked it to)")
        found[member] = candidate.read_bytes()
    return found


# ---------------------------------------------------------------------------------------------------- bible-kjv

def unlzw(data: bytes, maxbits: int = 16) -> bytes:
    """Decompress one compress(1) LZW stream without its 3-byte header (block mode, codes of 9..maxbits bits).

    Follows compress's reader exactly: codes are read in groups of n_bits bytes (8 codes), and a group is abandoned
    when the code width grows or the table is cleared (code 256), because the writer pads it there."""
    out = bytearray()
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b""] * ((1 << maxbits) - 256)
    maxmaxcode = 1 << maxbits
    n_bits, maxcode, free_ent, clear = 9, 511, 257, False
    pos = buf = offset = size = 0
    prev: bytes | None = None
    while True:
        if clear or offset >= size or free_ent > maxcode:
            if free_ent > maxcode:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
            if clear:
                n_bits, maxcode, clear = 9, 511, False
            chunk = data[pos:pos + n_bits]
            pos += len(chunk)
            if not chunk:
                return bytes(out)
            buf, offset, size = int.from_bytes(chunk, "little"), 0, len(chunk) * 8 - (n_bits - 1)
        code = (buf >> offset) & ((1 << n_bits) - 1)
        offset += n_bits
        if prev is None:  # the first code is a literal byte
            prev = table[code]
            out += prev
            continue
        if code == 256:  # CLEAR: the next code starts a fresh table (its entry at 256 is a never-used dummy)
            free_ent, clear = 256, True
            continue
        if code < free_ent:
            entry = table[code]
        elif code == free_ent:  # the KwKwK case
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corrupt LZW data: code {code} beyond the table ({free_ent})")
        out += entry
        if free_ent < maxmaxcode:
            table[free_ent] = prev + entry[:1]
            free_ent += 1
        prev = entry


def read_bible_data(data: bytes) -> str:
    """The plain text of a Bible Retrieval System data file ("EC02": magic, version, 80-byte description, window
    size and count as big-endian int32, count+1 absolute window offsets, then one LZW stream per window)."""
    if data[:4] != b"EC02" or len(data) < 92:
        raise ValueError(f"not an EC02 text file (starts {data[:4]!r})")
    wsize, wnum = struct.unpack(">II", data[84:92])
    offsets = struct.unpack(f">{wnum + 1}I", data[92:92 + 4 * (wnum + 1)])
    if list(offsets) != sorted(offsets) or offsets[-1] != len(data):
        raise ValueError("window table is not increasing up to the end of the file")
    parts = []
    for i in range(wnum):
        window = unlzw(data[offsets[i]:offsets[i + 1]])
        if (len(window) != wsize and i != wnum - 1) or len(window) > wsize:  # only the last may be short
            raise ValueError(f"window {i} decompressed to {len(window)} bytes, not {wsize}")
        parts.append(window)
    return b"".join(parts).decode("ascii")


# The 66 books in the file's order: its abbreviation, then the name used in documents.
_BOOK_LIST = (
    "Ge=Genesis Exo=Exodus Lev=Leviticus Num=Numbers Deu=Deuteronomy Josh=Joshua Jdgs=Judges Ruth=Ruth "
    "1Sm=1_Samuel 2Sm=2_Samuel 1Ki=1_Kings 2Ki=2_Kings 1Chr=1_Chronicles 2Chr=2_Chronicles Ezra=Ezra "
    "Neh=Nehemiah Est=Esther Job=Job Psa=Psalms Prv=Proverbs Eccl=Ecclesiastes SSol=Song_of_Solomon Isa=Isaiah "
    "Jer=Jeremiah Lam=Lamentations Eze=Ezekiel Dan=Daniel Hos=Hosea Joel=Joel Amos=Amos Obad=Obadiah Jonah=Jonah "
    "Mic=Micah Nahum=Nahum Hab=Habakkuk Zep=Zephaniah Hag=Haggai Zec=Zechariah Mal=Malachi Mat=Matthew Mark=Mark "
    "Luke=Luke John=John Acts=Acts Rom=Romans 1Cor=1_Corinthians 2Cor=2_Corinthians Gal=Galatians Eph=Ephesians "
    "Phi=Philippians Col=Colossians 1Th=1_Thessalonians 2Th=2_Thessalonians 1Tim=1_Timothy 2Tim=2_Timothy "
    "Titus=Titus Phmn=Philemon Heb=Hebrews Jas=James 1Pet=1_Peter 2Pet=2_Peter 1Jn=1_John 2Jn=2_John 3Jn=3_John "
    "Jude=Jude Rev=Revelation")
BOOKS: tuple[tuple[str, str], ...] = tuple(
    (abbrev, name.replace("_", " ")) for abbrev, name in (pair.split("=") for pair in _BOOK_LIST.split()))

# Held out: 12 whole books, 29% of the Bible (338K SmolLM2 tokens: five disjoint 64K windows of the joined text),
# from the law, history, wisdom, the prophets (Jeremiah and Ezekiel, ~60K tokens each, the longest), gospel
# narrative and letters.
HELDOUT_BOOKS = ("Numbers", "Joshua", "1 Samuel", "Ezra", "Job", "Jeremiah", "Ezekiel", "Daniel", "Acts", "Romans",
                 "Hebrews", "Revelation")
_VERSE = re.compile(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)")


def bible_books(text: str) -> list[tuple[str, str]]:
    """(name, text) per book of the decoded Bible: "Genesis\\n\\nChapter 1\\n1 In the beginning ...\\n2 ..."."""
    lines = text.splitlines()
    if lines and not _VERSE.fullmatch(lines[0]):
        lines = lines[1:]  # the file's title line
    books: dict[str, list[str]] = {}
    chapter: dict[str, str] = {}
    for number, line in enumerate(lines):
        m = _VERSE.fullmatch(line)
        if not m:
            raise ValueError(f"verse line {number + 1} is not '<book><chapter>:<verse> <text>': {line[:60]!r}")
        abbrev, ch, verse, words = m.groups()
        out = books.setdefault(abbrev, [])
        if chapter.get(abbrev) != ch:
            chapter[abbrev] = ch
            out.append(f"\nChapter {ch}")
        out.append(f"{verse} {words}")
    if list(books) != [a for a, _ in BOOKS]:
        raise ValueError(f"books {list(books)[:5]}... are not the 66 books of the King James Bible in order")
    names = dict(BOOKS)
    return [(names[a], names[a] + "\n" + "\n".join(books[a]) + "\n") for a in books]


def bible_documents(path: str | os.PathLike | None) -> list[Document]:
    member = "usr/lib/bible.data"
    data = package_files("bible-kjv", path, [member], "bible-kjv-text")[member]
    try:
        books = bible_books(read_bible_data(data))
    except (ValueError, UnicodeDecodeError, struct.error) as error:  # a truncated or foreign file
        raise CorpusError(f"source 'bible-kjv': {path}: {error}") from error
    return [Document("bible-kjv", name, text, name in HELDOUT_BOOKS) for name, text in books]


# ---------------------------------------------------------------------------------------------------- python-stdlib

# Excluded folders: test suites; third-party packages; pydoc_data (its topics.py is `pydoc-topics` as a Python
# literal: the same text in two places would leak held-out topics into training); encodings (mostly generated
# character-map tables). `_sysconfigdata_*` files are this machine's build settings, not library code.
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                                  "pydoc_data", "encodings"})


def heldout_by_hash(name: str, fraction: float) -> bool:
    """True for a deterministic `fraction` of names: the first 8 bytes of sha256(name) as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2 ** 64 < fraction


def default_stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """Relative paths ('/'-separated, sorted) of the library's .py files, test suites and excluded folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("config-")]
        for f in filenames:
            if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata")):
                found.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(found)


def stdlib_documents(root: str | os.PathLike | None = None, min_chars: int = 2000,
                     heldout_fraction: float = 0.05) -> tuple[list[Document], dict[str, int]]:
    """One document per library file of at least `min_chars` characters; also the counts of files skipped."""
    base = Path(root) if root is not None else default_stdlib_root()
    if not base.is_dir():
        raise CorpusError(f"source 'python-stdlib': no standard library folder at {base}")
    docs, skipped = [], {"short": 0, "undecodable": 0}
    for rel in stdlib_files(base):
        try:
            text = (base / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["undecodable"] += 1
            continue
        if len(text) < min_chars:
            skipped["short"] += 1
            continue
        docs.append(Document("python-stdlib", rel, text, heldout_by_hash(rel, heldout_fraction)))
    if not docs:
        raise CorpusError(f"source 'python-stdlib': no .py file of at least {min_chars} characters under {base}")
    return docs, skipped


# ---------------------------------------------------------------------------------------------------- pydoc-topics

def pydoc_documents(heldout_fraction: float = 0.05) -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise CorpusError(f"source 'pydoc-topics': this Python has no pydoc_data.topics ({error})") from error
    return [Document("pydoc-topics", k, topics[k], heldout_by_hash(k, heldout_fraction))
            for k in sorted(topics) if topics[k].strip()]


# ---------------------------------------------------------------------------------------------------- gcide

HELDOUT_LETTERS = ("j", "k", "q")
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(digits: str) -> int:
    n = 0
    for c in digits:
        n = n * 64 + _B64[c]
    return n


def gcide_documents(path: str | os.PathLike | None) -> list[Document]:
    """One document per initial letter (a-z, then "other"): the dictionary's entries in file order.

    The dictd index maps every headword to (offset, length) in the gzip-compatible .dict.dz; headwords that share
    an entry share its range, so each range is taken once, filed under its first headword."""
    index_name, dict_name = "usr/share/dictd/gcide.index", "usr/share/dictd/gcide.dict.dz"
    files = package_files("gcide", path, [index_name, dict_name], "dict-gcide")
    index, data = files[index_name].decode("utf-8"), gzip.decompress(files[dict_name])
    first: dict[tuple[int, int], str] = {}
    for line in index.splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00-database"):
            first.setdefault((_dictd_number(offset), _dictd_number(length)), word)
    letters: dict[str, list[str]] = {}
    for (offset, length), word in sorted(first.items()):
        key = word[0].lower() if word[0].isascii() and word[0].isalpha() else "other"
        letters.setdefault(key, []).append(data[offset:offset + length].decode("utf-8", "replace"))
    return [Document("gcide", k, "\n".join(letters[k]), k in HELDOUT_LETTERS) for k in sorted(letters)]


# ---------------------------------------------------------------------------------------------------- the corpus

def _long_header(doc: Document) -> str:
    """What precedes a document inside a long held-out text (books and topics carry their own titles)."""
    return f"# Lib/{doc.name}\n\n" if doc.source == "python-stdlib" else ""


def heldout_long(docs: Sequence[Document]) -> list[dict]:
    """Per source, its held-out documents (canonical order) joined into one text."""
    rows = []
    for source in dict.fromkeys(d.source for d in docs if d.heldout):
        held = [d for d in docs if d.source == source and d.heldout]
        rows.append({"text": "\n\n".join(_long_header(d) + d.text for d in held), "source": source,
                     "name": f"{source} held out", "documents": [d.name for d in held]})
    return rows


def _mix_key(doc: Document) -> str:
    return hashlib.sha256(f"{doc.source}/{doc.name}".encode()).hexdigest()


def collect(sources: Sequence[str] = DEFAULT_SOURCES, *, bible: str | os.PathLike | None = None,
            gcide: str | os.PathLike | None = None, stdlib_root: str | os.PathLike | None = None,
            stdlib_min_chars: int = 2000, heldout_fraction: float = 0.05) -> tuple[list[Document], dict]:
    """Every selected source's documents in canonical order (sources in `SOURCES` order), and per-source notes."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise CorpusError(f"unknown corpus source(s) {unknown}: choose among {list(SOURCES)}" if unknown
                          else f"no corpus source selected: choose among {list(SOURCES)}")
    docs: list[Document] = []
    notes: dict[str, dict] = {}
    for source in (s for s in SOURCES if s in sources):
        if source == "bible-kjv":
            docs += bible_documents(bible)
            notes[source] = {"input": Path(bible).name}
        elif source == "python-stdlib":
            found, skipped = stdlib_documents(stdlib_root, stdlib_min_chars, heldout_fraction)
            docs += found
            notes[source] = {"input": str(stdlib_root or default_stdlib_root()),
                             "skipped_files": skipped, "min_chars": stdlib_min_chars}
        elif source == "pydoc-topics":
            docs += pydoc_documents(heldout_fraction)
            notes[source] = {"input": "pydoc_data.topics"}
        else:
            docs += gcide_documents(gcide)
            notes[source] = {"input": Path(gcide).name}
    return docs, notes


def content_hash(docs: Iterable[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.source, d.name, d.heldout, d.text]).encode())
        h.update(b"\n")
    return h.hexdigest()


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _row(doc: Document) -> dict:
    return {"text": doc.text, "source": doc.source, "name": doc.name}


def build_corpus(out_dir: str | os.PathLike, sources: Sequence[str] = DEFAULT_SOURCES, *,
                 bible: str | os.PathLike | None = None, gcide: str | os.PathLike | None = None,
                 stdlib_root: str | os.PathLike | None = None, stdlib_min_chars: int = 2000,
                 heldout_fraction: float = 0.05) -> dict:
    """Build (or find up to date) the corpus folder `out_dir`; returns its manifest (`"rebuilt"`: False when the
    folder already held this content). Paths: `bible`/`gcide` a .deb or unpacked folder; `stdlib_root` the library
    folder (default: this interpreter's)."""
    out = Path(out_dir)
    docs, notes = collect(sources, bible=bible, gcide=gcide, stdlib_root=stdlib_root,
                          stdlib_min_chars=stdlib_min_chars, heldout_fraction=heldout_fraction)
    digest = content_hash(docs)
    options = {"sources": [s for s in SOURCES if s in sources], "heldout_fraction": heldout_fraction,
               "stdlib_min_chars": stdlib_min_chars}
    old = read_manifest(out)
    if old is not None and old.get("content_sha256") == digest and old.get("options") == options \
            and old.get("format") == FORMAT and all((out / f).is_file() for f in (TRAIN_FILE, HELDOUT_FILE, LONG_FILE)):
        return {**old, "rebuilt": False}
    if out.exists() and old is None and (not out.is_dir() or any(out.iterdir())):
        raise CorpusError(f"{out} exists and is not a corpus folder (no {MANIFEST_FILE}); refusing to replace it")

    train = sorted((d for d in docs if not d.heldout), key=_mix_key)
    held = [d for d in docs if d.heldout]
    long_rows = heldout_long(docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sizes = {TRAIN_FILE: _write_jsonl(tmp / TRAIN_FILE, map(_row, train)),
                 HELDOUT_FILE: _write_jsonl(tmp / HELDOUT_FILE, map(_row, held)),
                 LONG_FILE: _write_jsonl(tmp / LONG_FILE, long_rows)}
        manifest = {
            "format": FORMAT, "options": options, "content_sha256": digest,
            "python_version": platform.python_version(),
            "sources": {s: _source_summary(s, docs, notes[s]) for s in options["sources"]},
            "files": {
                TRAIN_FILE: {"documents": len(train), "characters": sum(len(d.text) for d in train),
                             "bytes": sizes[TRAIN_FILE]},
                HELDOUT_FILE: {"documents": len(held), "characters": sum(len(d.text) for d in held),
                               "bytes": sizes[HELDOUT_FILE]},
                LONG_FILE: {"documents": len(long_rows), "characters": sum(len(r["text"]) for r in long_rows),
                            "bytes": sizes[LONG_FILE]},
            },
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")  # written last: marks it complete
        tmp.chmod(0o755)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "rebuilt": True}


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing an older one by renames, so a reader never sees half of it."""
    if out.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, stale / out.name)
        os.replace(tmp, out)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _source_summary(source: str, docs: Sequence[Document], note: dict) -> dict:
    mine = [d for d in docs if d.source == source]
    held = [d for d in mine if d.heldout]
    return {**note, "documents": len(mine), "characters": sum(len(d.text) for d in mine),
            "train_documents": len(mine) - len(held), "heldout_documents": len(held),
            "heldout_characters": sum(len(d.text) for d in held), "heldout": [d.name for d in held]}


def read_manifest(out: Path) -> dict | None:
    """The manifest of a built folder (corpus or man-page summaries), or None when absent or unreadable."""
    try:
        return json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def count_tokens(out_dir: str | os.PathLike, encode_batch) -> dict[str, dict[str, int]]:
    """Tokens per file and source of a built corpus: `encode_batch(texts) -> list of id lists` (no special tokens).

    For a Hugging Face tokenizer: `lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]`."""
    counts: dict[str, dict[str, int]] = {}
    for name in (TRAIN_FILE, HELDOUT_FILE, LONG_FILE):
        per_source: dict[str, int] = {}
        rows = [json.loads(line) for line in (Path(out_dir) / name).read_text(encoding="utf-8").splitlines()]
        for start in range(0, len(rows), 16):
            batch = rows[start:start + 16]
            for row, ids in zip(batch, encode_batch([r["text"] for r in batch])):
                per_source[row["source"]] = per_source.get(row["source"], 0) + len(ids)
        counts[name] = {**per_source, "total": sum(per_source.values())}
    return counts


def record_tokens(out_dir: str | os.PathLike, tokenizer_name: str, counts: dict) -> dict:
    """Add `counts` (from `count_tokens`, or `manpages.token_stats`) under manifest["tokens"][tokenizer_name] of a built
    folder; returns the manifest."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise CorpusError(f"{out}: no {MANIFEST_FILE}; build it first")
    manifest.setdefault("tokens", {})[tokenizer_name] = counts
    tmp = out / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_FILE)
    return manifest
