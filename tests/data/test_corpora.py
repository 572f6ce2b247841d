"""condensation.data.corpora (issue 12): the offline corpus from a fake bible-kjv-text .deb built here (the real
package's layout: ar archive, data.tar.xz, usr/lib/bible.data in the windowed-LZW "EC02" format), a fake standard
library folder and the real pydoc topics. Checks the LZW reader against compress(1)'s writer, the disjoint and
deterministic split, the manifest, idempotence, the error messages, and that the pretraining pipeline reads it."""

from __future__ import annotations

import io
import json
import struct
import tarfile

import pytest

from condensation.data import corpora
from condensation.data.corpora import BOOKS, HELDOUT_BOOKS, CorpusError, build_corpus, heldout_by_hash, unlzw


def lzw_compress(data: bytes, maxbits: int = 16, clear_after: int | None = None) -> bytes:
    """compress(1)'s writer without its header (block mode): codes LSB first, in groups of n_bits bytes (8 codes);
    when the code width grows or the table is cleared the group is written out padded to its full n_bits bytes."""
    out = bytearray()
    group: list[int] = []
    n_bits, maxcode, free_ent, maxmaxcode = 9, 511, 257, 1 << maxbits
    table = {bytes([i]): i for i in range(256)}

    def flush(full: bool) -> None:
        acc = sum(code << (i * n_bits) for i, code in enumerate(group))
        out.extend(acc.to_bytes(n_bits if full else (len(group) * n_bits + 7) // 8, "little"))
        group.clear()

    def output(code: int, clearing: bool = False) -> None:
        nonlocal n_bits, maxcode
        group.append(code)
        if len(group) == 8:
            flush(True)
        if free_ent > maxcode or clearing:
            if group:
                flush(True)
            if clearing:
                n_bits, maxcode = 9, 511
            else:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1

    w, emitted = data[:1], 0
    for i in range(1, len(data)):
        c = data[i:i + 1]
        if w + c in table:
            w += c
            continue
        output(table[w])
        emitted += 1
        if free_ent < maxmaxcode:
            table[w + c] = free_ent
            free_ent += 1
        if clear_after and emitted % clear_after == 0:
            table, free_ent = {bytes([i]): i for i in range(256)}, 257
            output(256, clearing=True)
        w = c
    output(table[w])
    flush(False)
    return bytes(out)


def ec02(text: bytes, wsize: int) -> bytes:
    """A Bible Retrieval System data file: header, window table (absolute offsets), one LZW stream per window."""
    windows = [lzw_compress(text[i:i + wsize]) for i in range(0, len(text), wsize)]
    header = b"EC02" + b"Compressed Data File".ljust(80, b"\0") + struct.pack(">II", wsize, len(windows))
    offsets = [len(header) + 4 * (len(windows) + 1)]
    for w in windows:
        offsets.append(offsets[-1] + len(w))
    return header + struct.pack(f">{len(offsets)}I", *offsets) + b"".join(windows)


def fake_bible() -> str:
    """The real file's layout: a title line, then '<abbrev><chapter>:<verse> <text>' for every book in order."""
    lines = ["Holy Bible, Authorized (King James) Version.  Textfile 930105."]
    for b, (abbrev, name) in enumerate(BOOKS):
        for ch in (1, 2):
            for v in (1, 2, 3):
                lines.append(f"{abbrev}{ch}:{v} And in the book of {name} the {b * 7 + ch * 3 + v}th word was so.")
    return "\n".join(lines) + "\n"


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_deb(path, files: dict[str, bytes]):
    """A Debian package as dpkg-deb writes it: ar archive of debian-binary, control.tar.xz, data.tar.xz."""
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"control": b"Package: fake\n"})),
               ("data.tar.xz", _tar_xz(files))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="module")
def bible_deb(tmp_path_factory):
    folder = tmp_path_factory.mktemp("debs")
    # 1 KiB windows: several windows, each growing its codes to 10-11 bits
    return write_deb(folder / "bible-kjv-text_4.38_all.deb", {"usr/lib/bible.data": ec02(fake_bible().encode(), 1024),
                                                               "usr/share/doc/bible-kjv-text/copyright": b"PD\n"})


LONG = "def f(x):\n    return x + 1\n" * 100  # 2,700 characters: above the default minimum


@pytest.fixture(scope="module")
def stdlib_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    files = {f"mod_{i:03d}.py": f"# module {i}\n" + LONG for i in range(60)}
    files.update({
        "pkg/__init__.py": "# pkg\n" + LONG, "pkg/sub/deep.py": "# deep\n" + LONG,
        "short.py": "x = 1\n",                                     # below min_chars
        "test/test_os.py": LONG, "pkg/tests/helper.py": LONG,        # test suites
        "idlelib/idle_test/t.py": LONG, "test_top.py": LONG,
        "pydoc_data/topics.py": LONG, "site-packages/third.py": LONG, "encodings/cp1252.py": LONG,
        "_sysconfigdata__linux.py": LONG, "README.txt": LONG,       # build settings; not .py
    })
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "latin1.py").write_bytes(b"# caf\xe9\n" + LONG.encode())
    return root


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unlzw_reads_what_compress_writes():
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))[:60_000].encode()
    data = lzw_compress(text)
    assert len(data) < len(text) * 0.6  # codes grew well past 9 bits
    assert unlzw(data) == text
    assert unlzw(lzw_compress(text, clear_after=700)) == text  # table clears (code 256) mid-stream
    assert unlzw(lzw_compress(b"abababababababab")) == b"abababababababab"  # the KwKwK case


def test_bible_from_deb_and_unpacked_folder(bible_deb, tmp_path):
    docs = corpora.bible_documents(bible_deb)
    assert [d.name for d in docs] == [name for _, name in BOOKS] and len(docs) == 66
    assert docs[0].text.startswith("Genesis\n\nChapter 1\n1 And in the book of Genesis the 4th word was so.\n2 ")
    assert "\n\nChapter 2\n1 " in docs[0].text and docs[-1].text.endswith("word was so.\n")
    assert {d.name for d in docs if d.heldout} == set(HELDOUT_BOOKS)
    # the same from `dpkg-deb -x` output, and from a folder holding the file itself
    unpacked = tmp_path / "root" / "usr" / "lib"
    unpacked.mkdir(parents=True)
    (unpacked / "bible.data").write_bytes(corpora.deb_members(bible_deb, ["usr/lib/bible.data"])["usr/lib/bible.data"])
    assert corpora.bible_documents(tmp_path / "root") == docs
    assert corpora.bible_documents(unpacked) == docs


def test_build_split_manifest_and_idempotence(bible_deb, stdlib_root, tmp_path):
    from pydoc_data.topics import topics

    out = tmp_path / "corpus"
    manifest = build_corpus(out, bible=bible_deb, stdlib_root=stdlib_root)
    assert manifest["rebuilt"]
    train, held, long = (read_rows(out / f) for f in ("train.jsonl", "heldout.jsonl", "heldout_long.jsonl"))
    assert all(set(r) == {"text", "source", "name"} for r in train + held)
    keys = lambda rows: {(r["source"], r["name"]) for r in rows}  # noqa: E731
    assert not keys(train) & keys(held) and len(keys(train)) == len(train) and len(keys(held)) == len(held)

    # bible: the fixed books held out; stdlib and topics: by hash of the name
    assert {r["name"] for r in held if r["source"] == "bible-kjv"} == set(HELDOUT_BOOKS)
    stdlib = {r["name"]: r in held for r in train + held if r["source"] == "python-stdlib"}
    assert set(stdlib) == {f"mod_{i:03d}.py" for i in range(60)} | {"pkg/__init__.py", "pkg/sub/deep.py"}
    assert 1 <= sum(stdlib.values()) <= 10 and all(h == heldout_by_hash(n, 0.05) for n, h in stdlib.items())
    topic_rows = {r["name"]: r for r in train + held if r["source"] == "pydoc-topics"}
    assert set(topic_rows) == {k for k in topics if topics[k].strip()}
    assert topic_rows["assert"]["text"] == topics["assert"]

    # manifest counts agree with the files
    assert manifest["python_version"] and len(manifest["content_sha256"]) == 64
    assert manifest["files"]["train.jsonl"]["documents"] == len(train)
    assert manifest["files"]["heldout.jsonl"]["characters"] == sum(len(r["text"]) for r in held)
    s = manifest["sources"]["python-stdlib"]
    assert s["documents"] == 62 and s["skipped_files"] == {"short": 1, "undecodable": 1}
    assert s["heldout"] == sorted(n for n, h in stdlib.items() if h)
    assert manifest["sources"]["bible-kjv"]["heldout"] == [n for _, n in BOOKS if n in HELDOUT_BOOKS]
    assert manifest["sources"]["bible-kjv"]["train_documents"] == 66 - len(HELDOUT_BOOKS)
    assert json.loads((out / "manifest.json").read_text())["content_sha256"] == manifest["content_sha256"]

    # long held-out text: one per source, its held-out documents joined in canonical order
    bible_long = next(r for r in long if r["source"] == "bible-kjv")
    assert bible_long["documents"] == manifest["sources"]["bible-kjv"]["heldout"]
    starts = [bible_long["text"].index(f"{name}\n\nChapter 1\n") for name in bible_long["documents"]]
    assert starts == sorted(starts) and starts[0] == 0
    stdlib_long = next(r for r in long if r["source"] == "python-stdlib")
    assert stdlib_long["text"].startswith(f"# Lib/{s['heldout'][0]}\n\n")
    # train rows are mixed across sources in a fixed order (the pipeline never shuffles)
    assert [r["source"] for r in train[:40]].count("bible-kjv") < 40

    # idempotent: the same inputs leave the folder untouched; deterministic: a second folder is byte-identical
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_corpus(out, bible=bible_deb, stdlib_root=stdlib_root)
    assert not again["rebuilt"] and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    other = build_corpus(tmp_path / "other", bible=bible_deb, stdlib_root=stdlib_root)
    for name in ("train.jsonl", "heldout.jsonl", "heldout_long.jsonl"):
        assert (tmp_path / "other" / name).read_bytes() == (out / name).read_bytes()
    assert other["content_sha256"] == manifest["content_sha256"]
    # other options rebuild in place, leaving no temporary folder behind
    fewer = build_corpus(out, ["pydoc-topics"], stdlib_root=stdlib_root)
    assert fewer["rebuilt"] and set(fewer["sources"]) == {"pydoc-topics"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "other"]


def test_errors_name_the_source_and_path(bible_deb, stdlib_root, tmp_path):
    def error(**kwargs) -> str:
        with pytest.raises(CorpusError) as err:
            build_corpus(tmp_path / "out", **{"stdlib_root": stdlib_root, **kwargs})
        return str(err.value)

    assert "'bible-kjv'" in (m := error()) and "apt-get download bible-kjv-text" in m
    assert str(tmp_path / "nope.deb") in error(bible=tmp_path / "nope.deb")
    (tmp_path / "empty").mkdir()
    assert "bible.data" in (m := error(bible=tmp_path / "empty")) and str(tmp_path / "empty") in m
    other_deb = write_deb(tmp_path / "other.deb", {"usr/share/doc/other/README": b"x"})
    assert "holds no usr/lib/bible.data" in (m := error(bible=other_deb)) and "other.deb" in m and "'bible-kjv'" in m
    (tmp_path / "broken.deb").write_bytes(b"!<arch>\n" + b"x" * 70)
    assert "damaged Debian package" in (m := error(bible=tmp_path / "broken.deb")) and "broken.deb" in m
    (tmp_path / "bible.data").write_bytes(b"not a bible")
    assert "EC02" in (m := error(bible=tmp_path / "bible.data")) and "'bible-kjv'" in m
    assert "'gcide'" in error(sources=["gcide"]) and "dict-gcide" in error(sources=["gcide"])
    assert "unknown corpus source(s) ['bibel']" in error(sources=["bibel"], bible=bible_deb)
    assert str(tmp_path / "no-lib") in error(sources=["python-stdlib"], stdlib_root=tmp_path / "no-lib")
    assert not (tmp_path / "out").exists()  # nothing written on an error
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a corpus folder"):
        build_corpus(tmp_path / "mine", ["pydoc-topics"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_pretraining_pipeline_reads_train_jsonl(ray_session, tokenizer, bible_deb, stdlib_root, tmp_path):
    from condensation.data import pretraining_dataset

    out = tmp_path / "corpus"
    manifest = build_corpus(out, bible=bible_deb, stdlib_root=stdlib_root)
    ds, report = pretraining_dataset(str(out / "train.jsonl"), tokenizer, seq_len=64, min_tokens=0)
    rows = ds.take_all()
    counts = report.counts()
    assert counts["rows_read"] == counts["rows_valid"] == manifest["files"]["train.jsonl"]["documents"]
    assert rows and counts["sequences"] == len(rows) and all(r["input_ids"].shape == (64,) for r in rows)


def test_make_corpus_script(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "workloads" / "make_corpus.py"
    spec = importlib.util.spec_from_file_location("make_corpus_workload", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path / "c"), "--sources", "pydoc-topics"]) == 0
    assert script.main(["--out", str(tmp_path / "c"), "--sources", "pydoc-topics"]) == 0
    out = capsys.readouterr().out
    assert "built in" in out and "up to date in" in out and "pydoc-topics" in out
    missing = ["--out", str(tmp_path / "d"), "--sources", "bible-kjv", "--bible", str(tmp_path / "x.deb")]
    assert script.main(missing) == 2
    assert capsys.readouterr().err.startswith(f"corpus error: source 'bible-kjv': no such file or folder: {tmp_path}")


def test_real_bible_deb_when_downloaded():
    """The real package, when `data/debs/` of the checkout has it (`apt-get download bible-kjv-text`)."""
    from pathlib import Path

    found = sorted((Path(__file__).resolve().parents[2] / "data" / "debs").glob("bible-kjv-text_*.deb"))
    if not found:
        pytest.skip("no data/debs/bible-kjv-text_*.deb (apt-get download bible-kjv-text)")
    docs = corpora.bible_documents(found[-1])
    verses = [line for d in docs for line in d.text.splitlines()[1:] if line[:1].isdigit()]  # not "1 Samuel"
    assert len(docs) == 66 and len(verses) == 31102  # every verse of the King James Bible
    assert docs[0].text.startswith("Genesis\n\nChapter 1\n1 In the beginning God created the heaven and the earth.\n")
    john = next(d for d in docs if d.name == "John").text
    assert "\n16 For God so loved the world, that he gave his only begotten Son," in john
    assert docs[-1].text.endswith("\n21 The grace of our Lord Jesus Christ be with you all. Amen.\n")
    assert sum(len(d.text) for d in docs if d.heldout) > 1_300_000  # ~337K SmolLM2 tokens held out
