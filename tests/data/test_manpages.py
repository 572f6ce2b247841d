"""condensation.data.roff and condensation.data.manpages: the pure-Python roff renderer on small pages (man(7) macros,
fonts, escapes, strings, macros, conditionals, tables), the NAME line, and the man-page summaries built from fake
.debs made here (the real packages' layout: gzipped roff in usr/share/man/man<N>/, aliases as symbolic links or
`.so` pages): rows, the deterministic split, the skipped pages by reason, idempotence, the workload script and the
`h200-manpages` preset. When groff is installed, the renderer's words are compared with groff's; when
data/debs/ holds the real manpages-dev, its malloc(3) row is checked."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from condensation.data import manpages
from condensation.data.corpora import CorpusError, heldout_by_hash
from condensation.data.manpages import build_manpage_summaries, parse_name_line, token_stats
from condensation.data.roff import render, split_args, strip_comment

ROOT = Path(__file__).resolve().parents[2]

PAGE = r""".\" a comment line
'\" t
.TH FOO 3 2023-01-01 "Linux man-pages 6.03"
.ds v 1.2\" a string
.de Qu
\\(lq\\$1\\(rq\\$2
..
.SH NAME
foo, bar \- frobnicate
the widgets
.SH SYNOPSIS
.nf
.B #include <foo.h>
.BI "int foo(int " x );
.fi
.SH DESCRIPTION
The
.BR foo ()
function frobnicates
.IR x ,
see
.BR bar (2).
It uses \fBbold\fP, \fIitalic\fR and \f(CWmono\fP fonts \(em and a \[aq]quote\[aq],
a backslash \e, a minus \-1, version \*v\& and
.Qu word ,
no\&space, x\ y, c\c
ontinued.  \" an inline comment
.PP
Second paragraph.
.SS Options
.TP
.B \-a
All of them.
.TP
.BI \-n " count"
At most
.I count
of them.
.IP \[bu] 3
A bullet item.
.RS
.EX
int x = 1;
    indented(x);
.EE
.RE
.if n Nroff only.
.if t Troff only.
.ie \n(.g \{\
Groff
here.
.\}
.el Not groff.
.TS
tab(:);
l l.
Interface:Value
_
T{
.BR foo ()
T}:MT-Safe
.TE
See
.UR https://example.org
the site
.UE .
.SH "SEE ALSO"
.BR bar (2)
"""

DESCRIPTION = """\
The foo() function frobnicates x, see bar(2). It uses bold, italic and mono fonts \u2014 and a 'quote', a backslash \\, \
a minus -1, version 1.2 and \u201cword\u201d, nospace, x y, continued.

Second paragraph.

Options

-a
All of them.

-n count
At most count of them.

\u2022 A bullet item.
int x = 1;
    indented(x);
Nroff only. Groff here.

Interface  Value
foo()  MT-Safe

See the site \u27e8https://example.org\u27e9."""


# ---------------------------------------------------------------------------------------------------- roff

def test_render_macros_fonts_escapes_strings_conditionals_tables():
    page = render(PAGE)
    assert page.th == ["FOO", "3", "2023-01-01", "Linux man-pages 6.03"] and page.so is None and not page.unknown
    assert [h for h, _ in page.sections] == ["NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"]
    assert page.section("NAME") == "foo, bar - frobnicate the widgets"
    assert page.section("SYNOPSIS") == "#include <foo.h>\nint foo(int x);"  # no-fill: one line each
    assert page.section("DESCRIPTION") == DESCRIPTION
    assert page.section("SEE ALSO") == "bar(2)"


@pytest.mark.parametrize("roff, text", [
    (".B one two\n.I three", "one two three"),                      # .B/.I join their arguments with spaces
    (".BR open (2),\n.RB [ \\-x ]", "open(2), [-x]"),               # alternating fonts: no spaces
    (".BI \"size_t \" n \" bytes\"", "size_t n bytes"),              # quoted arguments keep their spaces
    ("a \\fBb\\fR \\f[I]c\\fP \\f2d\\f1", "a b c d"),               # every font form dropped
    ("\\(lq\\(rq \\[lq]\\[rq] \\*(lq\\*(rq \\(em \\[en]", "\u201c\u201d \u201c\u201d \u201c\u201d \u2014 \u2013"),
    ("\\[u00E9] \\[:a] \\['e] \\(12 \\N'65'", "\u00e9 \u00e4 \u00e9 \u00bd A"),
    ("a\\&b\\:c\\%d\\|e\\^f", "abcdef"),                              # zero-width escapes
    ("\\s-1SMALL\\s0 \\h'2n'x\\v'-1'y \\w'abc'z", "SMALL xy z"),    # sizes, motions and widths dropped
    ("one\\c\n.B two", "onetwo"),                                     # \c joins the next line, even a macro's
    ("x\\\ny", "xy"),                                                 # an escaped newline continues the line
    (".ds X hello\n.ds XY you\n\\*X \\*(XY \\*[X]\\*[Z]", "hello you hello"),  # strings; an unknown one: ""
    (".nr N 5\n.nr NN 6\n.nr NN +1\n\\nN \\n(NN \\n[NN]", "5 7 7"),
    (".ie '\\[lq]'' .ds q \"\n.el .ds q \\[lq]\n\\*q", "\u201c"),  # string comparison, as zic(8) does
    (".if !n no\n.if !t yes", "yes"),
    (".if t \\{\\\nnot\nthis\n.\\}\nafter", "after"),              # a false block is skipped to its \}
    (".de XX\n.B \\\\$2 \\\\$1\n..\n.XX b a", "a b"),                # a macro with arguments
    (".de1 YY\n\\\\$*\n..\n.YY p q", "p q"),
    (".SH\nHEADING ON NEXT LINE\ntext", "text"),
    (".ig\nhidden\n..\nshown", "shown"),                             # .ig skips to ..
])
def test_render_one_construct(roff, text):
    page = render(roff)
    assert page.sections[-1][1] == text


def test_render_breaks_no_fill_tables_and_so():
    out = render(".PP\na\nb\n.br\nc\n.sp\nd\n\n e\n.nf\n  x  y\n\nz\n.fi\nf\ng").sections[0][1]
    assert out == "a b\nc\n\nd\n\ne\n  x  y\n\nz\nf g"  # a blank line or leading space breaks; no-fill keeps spaces
    table = render(".TS\nallbox;\nl l\nl l.\nA\tB\n=\n\\&_\t= \nT{\nlong\n.B cell\nT}\tT{\nother\nT}\n.T&\nc.\nC\n.TE")
    assert table.sections[0][1] == "A  B\n_  =\nlong cell  other\nC"  # "\&_" and "= " are text, not rules
    assert render('.so man3/other.3\n').so == "man3/other.3"
    with pytest.raises(ValueError, match="mdoc"):
        render(".Dd January 1, 2023\n.Dt FOO 1\n.Sh NAME\n.Nm foo\n.Nd bar")
    assert render("\\X'x' \\[nosuch] \\*[nosuch]").unknown == {"\\[nosuch]": 1, "\\*[nosuch]": 1}


def test_args_and_comments():
    assert split_args(' a "b c" "d ""e""" f\\ g') == ["a", "b c", 'd "e"', "f\\ g"]
    assert strip_comment('text \\" comment') == "text " and strip_comment('a\\\\" b') == 'a\\\\" b'
    assert strip_comment("abc\\#x") == "abc\\"  # \# also swallows the newline: the line continues


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_render_matches_groff_words():
    """The same words in the same order as `groff -man -Tutf8` (layout aside: groff indents, wraps and boxes)."""
    out = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-Kutf8", "-P-cbou", "-rLL=300n"], input=PAGE.encode(),
                         capture_output=True, check=True).stdout.decode()
    body = [line for line in out.splitlines() if line.strip()][1:-1]  # without the page header and footer
    ours = "\n".join(f"{h}\n{t}" for h, t in render(PAGE).sections)
    assert ours.split() == " ".join(body).replace("\u2500", "").split()


# ---------------------------------------------------------------------------------------------------- NAME line

@pytest.mark.parametrize("text, names, description", [
    ("malloc, free, calloc, realloc, reallocarray - allocate and free dynamic memory",
     ["malloc", "free", "calloc", "realloc", "reallocarray"], "allocate and free dynamic memory"),
    ("ld.so,\nld-linux.so - dynamic\nlinker/loader", ["ld.so", "ld-linux.so"], "dynamic linker/loader"),
    ("pthread_attr_setstack - set stack - attributes", ["pthread_attr_setstack"], "set stack - attributes"),
    ("intro \u2014 introduction to library functions", ["intro"], "introduction to library functions"),
])
def test_parse_name_line(text, names, description):
    assert parse_name_line(text) == (names, description)


def test_parse_name_line_needs_a_spaced_dash():
    assert parse_name_line("foo-bar does things") is None and parse_name_line("foo") is None
    page = render(".SH NAME\nfoo, bar \\- do\n.B things\n.SH DESCRIPTION\nx")
    assert parse_name_line(page.section("NAME")) == (["foo", "bar"], "do things")


# ---------------------------------------------------------------------------------------------------- the data set

BODY = "\n".join(f"Sentence {i} of the description, long enough to be an article." for i in range(8))


def man_page(name: str, section: str, description: str, body: str = BODY) -> bytes:
    text = (f'.TH {name} {section} 2023-01-01 "Linux man-pages 6.03"\n.SH NAME\n{name} \\- {description}\n'
            f".SH SYNOPSIS\n.B {name}\n.SH DESCRIPTION\n.B {name}\n{body}\n")
    return gzip.compress(text.encode(), mtime=0)


def write_deb(path: Path, files: dict[str, bytes], links: dict[str, str]) -> Path:
    """A Debian package as dpkg-deb writes it (ar: debian-binary, control.tar.xz, data.tar.xz) with symlinks."""
    def tar_xz(members: dict[str, bytes], symlinks: dict[str, str]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for name, target in symlinks.items():
                info = tarfile.TarInfo("./" + name)
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
        return buf.getvalue()

    out = bytearray(b"!<arch>\n")
    for name, data in [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": b"Package: x\n"}, {})),
                       ("data.tar.xz", tar_xz(files, links))]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    path.write_bytes(bytes(out))
    return path


MAN = "usr/share/man"
GOOD = [(f"func{i:02d}", "3", f"compute the value number {i}") for i in range(40)] + \
       [("stat", "2", "get file status"), ("stat", "3type", "file status"), ("tool", "1", "run the tool on files")]


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("debs")
    files = {f"{MAN}/man{s[0]}/{n}.{s}.gz": man_page(n, s, d) for n, s, d in GOOD}
    files.update({
        f"{MAN}/man3/alias_so.3.gz": gzip.compress(b".so man3/func00.3\n"),
        f"{MAN}/man3/noname.3.gz": gzip.compress(b".TH NONAME 3\n.SH DESCRIPTION\n" + BODY.encode()),
        f"{MAN}/man3/nodash.3.gz": gzip.compress(b".TH NODASH 3\n.SH NAME\nnodash does things\n.SH DESCRIPTION\nx"),
        f"{MAN}/man3/oneword.3.gz": man_page("oneword", "3", "frobnicate"),
        f"{MAN}/man3/tiny.3.gz": man_page("tiny", "3", "a tiny page", body="Too short."),
        f"{MAN}/man3/latin1.3.gz": gzip.compress(".TH L 3\n.SH NAME\nlatin1 \\- caf\xe9 page\n.SH DESCRIPTION\n"
                                                 .encode("latin-1") + BODY.encode()),
        f"{MAN}/man3/mdoc.3.gz": gzip.compress(b".Dd 2023\n.Dt MDOC 3\n.Sh NAME\n.Nm mdoc\n.Nd a page\n"),
        f"{MAN}/de/man3/func00.3.gz": man_page("func00", "3", "eine deutsche Seite"),  # a translation: not read
        "usr/share/doc/manpages-dev/copyright": b"GPL\n",
    })
    links = {f"{MAN}/man3/func00_alias.3.gz": "func00.3.gz", f"{MAN}/man3/func01_alias.3.gz": "func01.3.gz"}
    dev = write_deb(folder / "manpages-dev_6.03-2_all.deb", files, links)
    other = write_deb(folder / "manpages_6.03-2_all.deb",
                      {f"{MAN}/man7/topic.7.gz": man_page("topic", "7", "an overview of the topic"),
                       f"{MAN}/man3/func05.3.gz": man_page("func05", "3", "a second copy")}, {})
    return [dev, other]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_rows_split_skips_and_idempotence(debs, tmp_path):
    out = tmp_path / "manpages"
    manifest = build_manpage_summaries(out, debs)
    assert manifest["rebuilt"]
    train, test = read_rows(out / "train.jsonl"), read_rows(out / "test.jsonl")
    rows = {f"{r['name']}.{r['section']}": r for r in train + test}
    assert set(rows) == {f"{n}.{s}" for n, s, _ in GOOD} | {"topic.7"} and len(rows) == len(train) + len(test)
    r = rows["func07.3"]
    assert set(r) == {"article", "highlights", "name", "section", "names", "package"}
    assert r["highlights"] == "compute the value number 7" and r["names"] == ["func07"]
    assert r["package"] == "manpages-dev" and rows["topic.7"]["package"] == "manpages"
    assert r["article"].startswith("DESCRIPTION\nfunc07 Sentence 0 of the description")  # no NAME, no SYNOPSIS
    assert "SYNOPSIS" not in r["article"] and "compute the value" not in r["article"]
    # the split: by page name (stat.2 and stat.3type on one side), deterministic
    assert all(heldout_by_hash(row["name"], 0.1) == (row in test) for row in train + test)
    assert (rows["stat.2"] in test) == (rows["stat.3type"] in test)
    assert 1 <= len(test) <= 12
    # every page that gives no row is counted, by reason; aliases are not malformed
    assert manifest["skipped"] == {"link": 2, "so_link": 1, "not_utf8": 1, "unreadable: an mdoc(7) page (.Dd/.Sh "
                                   "macros), not man(7)": 1, "no_name_section": 1, "name_without_dash": 1,
                                   "short_description": 1, "short_article": 1, "duplicate": 1}
    assert manifest["skipped_pages"]["duplicate"] == ["func05.3"] and "link" not in manifest["skipped_pages"]
    assert manifest["rows"] == len(rows) and manifest["files"]["test.jsonl"]["rows"] == len(test)
    assert manifest["inputs"]["manpages-dev_6.03-2_all.deb"]["links"] == 2
    assert manifest["sections"] == {"1": 1, "2": 1, "3": 40, "3type": 1, "7": 1}
    # idempotent; deterministic (a second folder is byte-identical); other options rebuild in place
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert not build_manpage_summaries(out, debs)["rebuilt"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    build_manpage_summaries(tmp_path / "again", debs)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    fewer = build_manpage_summaries(out, debs, min_description_words=5)
    assert fewer["rebuilt"] and fewer["skipped"]["short_description"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "manpages"]


def test_unpacked_folder_reads_like_the_deb(debs, tmp_path):
    root = tmp_path / "root"
    for deb in debs[:1]:
        with tarfile.open(fileobj=io.BytesIO(_data_tar(deb))) as tar:
            tar.extractall(root, filter="fully_trusted")
    from_deb = build_manpage_summaries(tmp_path / "a", debs[:1])
    from_folder = build_manpage_summaries(tmp_path / "b", [root])
    assert (tmp_path / "a" / "train.jsonl").read_text().replace('"manpages-dev"', '"root"') == \
        (tmp_path / "b" / "train.jsonl").read_text()
    assert from_folder["skipped"]["link"] == from_deb["skipped"]["link"] == 2


def _data_tar(deb: Path) -> bytes:
    raw, pos = deb.read_bytes(), 8
    while pos < len(raw):
        name, size = raw[pos:pos + 16].decode().strip(), int(raw[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            return raw[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2
    raise AssertionError("no data.tar")


def test_errors(debs, tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        build_manpage_summaries(tmp_path / "x", [tmp_path / "nope.deb"])
    with pytest.raises(CorpusError, match="apt-get download manpages manpages-dev"):
        build_manpage_summaries(tmp_path / "x", [])
    empty = write_deb(tmp_path / "empty.deb", {"usr/share/doc/x/README": b"x"}, {})
    with pytest.raises(CorpusError, match="no page"):
        build_manpage_summaries(tmp_path / "x", [empty])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a summaries folder"):
        build_manpage_summaries(tmp_path / "mine", debs)
    assert not (tmp_path / "x").exists()


def test_token_stats_buckets(debs, tmp_path, tokenizer):
    out = tmp_path / "m"
    build_manpage_summaries(out, debs)
    stats = token_stats(out, tokenizer, edges=(100, 120))
    for name in ("train.jsonl", "test.jsonl"):
        s = stats[name]
        assert sum(s["buckets"].values()) == s["rows"] == len(read_rows(out / name))
        assert list(s["buckets"]) == ["0-100", "100-120", "120+"] and s["prompt_tokens"]["min"] > 50
        assert s["fit"]["3072"] == s["rows"]


def _script():
    spec = importlib.util.spec_from_file_location("make_summaries_workload", ROOT / "workloads" / "make_summaries.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_summaries_script(debs, tmp_path, capsys):
    script = _script()
    argv = ["--out", str(tmp_path / "s"), "--debs", *map(str, debs), "--tokenizer", "builtin"]
    assert script.main(argv) == 0 and script.main(argv[:-2]) == 0
    out = capsys.readouterr().out
    assert "built in" in out and "up to date in" in out and "skipped     1 so_link" in out and "buckets" in out
    assert "builtin" in json.loads((tmp_path / "s" / "manifest.json").read_text())["tokens"]
    assert script.main(["--out", str(tmp_path / "t"), "--debs", str(tmp_path / "x.deb")]) == 2
    assert capsys.readouterr().err.startswith("summaries error: man pages: no such file or folder")


def test_h200_manpages_preset_validates_and_names_the_build_command(debs, tmp_path, monkeypatch):
    from condensation import pretrained, summarize
    from condensation.config import ConfigError

    monkeypatch.setattr(pretrained, "is_converted", lambda name, cache_dir=None: True)
    monkeypatch.setattr(summarize, "MANPAGES_DIR", tmp_path / "data" / "summaries" / "manpages")
    with pytest.raises(ConfigError, match="make_summaries.py"):
        summarize.load_summarize_config("h200-manpages")
    build_manpage_summaries(summarize.MANPAGES_DIR, debs)
    cfg = summarize.load_summarize_config("h200-manpages")
    assert cfg.data.train_sources == [str(summarize.MANPAGES_DIR / "train.jsonl")]
    assert cfg.data.eval_source == str(summarize.MANPAGES_DIR / "test.jsonl") and cfg.buckets == [512, 1024]
    assert cfg.generation.max_new_tokens == 64 and cfg.max_input_tokens == 3072 - 64
    assert (cfg.train.data.seq_len, cfg.train.model.segment_length) == (3072, 512)
    assert cfg.models == ["condensation", "full_finetuned", "instruct_zero_shot"] and not cfg.synthetic


def test_real_manpages_dev_when_downloaded():
    """The real package, when data/debs/ of the checkout has it (`apt-get download manpages-dev`): malloc(3)."""
    found = sorted((ROOT / "data" / "debs").glob("manpages-dev_*.deb"))
    if not found:
        pytest.skip("no data/debs/manpages-dev_*.deb (apt-get download manpages-dev)")
    from condensation.data.corpora import deb_tree

    files, _ = deb_tree(found[-1], lambda m: m == f"{MAN}/man3/malloc.3.gz")
    page, reason, unknown = manpages.read_page("malloc.3.gz", files[f"{MAN}/man3/malloc.3.gz"], "manpages-dev")
    assert reason is None and not unknown
    assert page.description == "allocate and free dynamic memory"
    assert page.names == ("malloc", "free", "calloc", "realloc", "reallocarray")
    assert page.article.startswith("DESCRIPTION\nmalloc()\nThe malloc() function allocates size bytes and returns a "
                                   "pointer to the allocated memory. The memory is not initialized.")
    assert "\nmalloc(nmemb * size);\n" in page.article and "#include <stdlib.h>" not in page.article
