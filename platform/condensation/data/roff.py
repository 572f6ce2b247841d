"""A small roff renderer for man(7) pages, in pure Python: a page's sections as plain text, no groff needed.

Why: the man-page summarization data (`condensation.data.manpages`) is built from Debian's roff sources on machines
without groff. The renderer covers what the Linux man-pages project (and rst2man, tzcode) actually use:

- man(7) macros: .TH .SH .SS .PP/.LP/.P .TP/.TQ .IP .HP .RS/.RE .EX/.EE .UR/.UE .MT/.ME .SY/.OP/.YS and the font
  macros .B .I .SM .SB .BR .BI .IB .IR .RB .RI (alternating fonts join their arguments without spaces).
- roff requests: .nf/.fi, .br, .sp, .ce, .ds/.as (strings), .nr (registers), .de/.de1/.am (macros, expanded with
  their \\$n arguments), .if/.ie/.el with \\{ ... \\} blocks (nroff conditions: `n` true, `t` false, `\\n(.g`
  true, string comparisons), .so (reported: such a page only points at another), and tbl tables (.TS/.T&/.TE,
  tab(x) option, T{ ... T} blocks); layout-only requests (.in .ti .ta .ad .na .hy .nh .PD .ft .ne .ll ...) are
  ignored.
- escapes: fonts (\\fB \\fI \\fR \\fP \\f(CW \\f[BI]), \\- \\e \\\\ \\& \\: \\% \\| \\^ \\~ \\0 \\(space), special
  characters \\(xx and \\[name] (and \\[uXXXX], composed accents \\[:a]), strings \\*x \\*(xx \\*[name], registers
  \\n, \\N'n', \\c (joins the next line), size and motion escapes (\\s \\h \\v \\w ...) dropped, comments \\" \\#.

Output: fill mode joins the input lines of a paragraph into one line (no line length, no hyphenation, one space
between words); no-fill text (.nf, .EX) keeps its lines and their leading spaces; paragraphs are separated by a blank
line; a .TP tag stands on its own line above its body, an .IP tag starts its paragraph; .SS headings are lines of
their own; no indentation. `render(source)` gives the sections as (heading, text) pairs in page order, `.TH`'s fields
and whether the page is a `.so` link.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass, field

# Special characters (groff_char(7)): ASCII where the page means ASCII (quotes, minus, hyphen), else Unicode.
SPECIAL_CHARS = {
    "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "ga": "`", "aa": "\u00b4",
    "ha": "^", "ti": "~", "a^": "^", "a~": "~", "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "-": "-",
    "bu": "\u2022", "ci": "\u25cb", "sq": "\u25a1", "dg": "\u2020", "dd": "\u2021", "de": "\u00b0", "fm": "\u2032",
    "sd": "\u2033", "+-": "\u00b1", "mu": "\u00d7", "di": "\u00f7", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260",
    "==": "\u2261", "~=": "\u2245", "ap": "~", "pl": "+", "eq": "=", "**": "*", "->": "\u2192", "<-": "\u2190",
    "<>": "\u2194", "ua": "\u2191", "da": "\u2193", "rA": "\u21d2", "lA": "\u21d0", "la": "\u27e8", "ra": "\u27e9",
    "sl": "/", "rs": "\\", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "at": "@", "sh": "#", "Do": "$", "ul": "_",
    "ru": "_", "or": "|", "ba": "|", "bv": "|", "br": "|", "rn": "\u203e", "co": "\u00a9", "rg": "\u00ae",
    "tm": "\u2122", "sc": "\u00a7", "ps": "\u00b6", "mc": "\u00b5", "ss": "\u00df", "12": "\u00bd", "14": "\u00bc",
    "34": "\u00be", "S1": "\u00b9", "S2": "\u00b2", "S3": "\u00b3", "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039",
    "fc": "\u203a", "no": "\u00ac", "OK": "\u2713", "ct": "\u00a2", "Po": "\u00a3", "Ye": "\u00a5", "Eu": "\u20ac",
    "es": "\u2205", "if": "\u221e", "pt": "\u221d", "ca": "\u2229", "cu": "\u222a", "mo": "\u2208", "sr": "\u221a",
    "*a": "\u03b1", "*b": "\u03b2", "*g": "\u03b3", "*d": "\u03b4", "*e": "\u03b5", "*l": "\u03bb", "*m": "\u03bc",
    "*p": "\u03c0", "*s": "\u03c3", "bq": "\u201e", "Bq": "\u201e", "hA": "\u21d4", "tno": "\u00ac",
}
_ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327", "o": "\u030a",
            "v": "\u030c", "/": "\u0338", "-": "\u0304", "h": "\u030c"}
# Predefined strings of groff's man package (an.tmac).
PREDEFINED_STRINGS = {"R": "\u00ae", "Tm": "\u2122", "lq": "\u201c", "rq": "\u201d", "S": "", "HF": "B"}
# Escapes taking a delimited argument ('...'), dropped from the output (motions, widths, drawing, device controls).
_DELIMITED_DROP = set("bDhHlLoSvxXZwARBVYOMm")
_FONT_MACROS = {"B": " ", "I": " ", "SM": " ", "SB": " ", "BR": "", "BI": "", "IB": "", "IR": "", "RB": "", "RI": ""}
_BREAKS_PARA = {"PP", "LP", "P"}
_IGNORED = {"in", "ti", "ta", "ad", "na", "hy", "nh", "PD", "ft", "ne", "ll", "ps", "vs", "ss", "cs", "bp", "fam",
            "lf", "UC", "DT", "hw", "mso", "pc", "tr", "ev", "rm", "rr", "rn", "cu", "ul", "fp", "lg", "kern", "pl",
            "po", "mk", "rt", "ns", "rs", "ch", "wh", "it", "itc", "em", "tm", "ab", "ex", "cc", "c2", "ec", "eo",
            "hc", "hlm", "hym", "hys", "shc", "ls", "lt", "nm", "nn", "pm", "sv", "os", "fl", "vpt", "warn", "nroff",
            "troff", "ftr", "fchar", "schar", "char", "do", "AT", "PU", "LINKSTYLE", "\\}", "\\{", "}", "T&",
            "hcode", "nop", "IX", "padj", "blm", "lsm", "class", "fzoom", "stringup", "stringdown",
            "chop", "substring", "length", "while", "break", "continue", "return", "als", "aln"}
_MDOC = {"Dd", "Dt", "Os", "Sh", "Nm", "Nd"}


class RoffError(ValueError):
    """A page the renderer cannot read (the message says why)."""


@dataclass
class Page:
    """A rendered page: `sections` as (heading, text) pairs in page order; `th` the .TH fields (title, section, ...);
    `so` the target of a `.so` request when the page is only that (a link to another page); `unknown` the escapes and
    requests it did not know (name -> count), for reports."""

    sections: list[tuple[str, str]]
    th: list[str]
    so: str | None = None
    unknown: dict[str, int] = field(default_factory=dict)

    def section(self, name: str) -> str | None:
        for heading, text in self.sections:
            if heading == name:
                return text
        return None


def strip_comment(line: str) -> str:
    """The line up to an unescaped \\" (comment) or \\# (comment and the newline)."""
    i = line.find("\\")
    if i < 0:
        return line
    n = len(line)
    while i < n:
        if line[i] == "\\" and i + 1 < n:
            if line[i + 1] == '"':
                return line[:i]
            if line[i + 1] == "#":
                return line[:i] + "\\"  # a continued line: joined with the next one
            i += 2
            continue
        i += 1
    return line


def _odd_backslash_end(line: str) -> bool:
    k = len(line) - len(line.rstrip("\\"))
    return k % 2 == 1


def split_args(s: str) -> list[str]:
    """Request arguments: separated by spaces, "double quoted" ones may hold spaces ("" is a quote inside them);
    an escaped space (\\ ) does not separate."""
    args, i, n = [], 0, len(s)
    while i < n:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            break
        buf = []
        if s[i] == '"':
            i += 1
            while i < n:
                if s[i] == '"':
                    if i + 1 < n and s[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                if s[i] == "\\" and i + 1 < n:
                    buf.append(s[i:i + 2])
                    i += 2
                    continue
                buf.append(s[i])
                i += 1
        else:
            while i < n and s[i] not in " \t":
                if s[i] == "\\" and i + 1 < n:
                    buf.append(s[i:i + 2])
                    i += 2
                    continue
                buf.append(s[i])
                i += 1
        args.append("".join(buf))
    return args


class _Renderer:
    def __init__(self) -> None:
        self.strings: dict[str, str] = dict(PREDEFINED_STRINGS)
        self.registers: dict[str, int] = {".g": 1, ".T": 0}
        self.macros: dict[str, list[str]] = {}
        self.unknown: dict[str, int] = {}
        self.sections: list[tuple[str, list[str]]] = [("", [])]
        self.th: list[str] = []
        self.so: str | None = None
        self.words: list[str] = []  # the fill-mode line being built
        self.fill = True
        self.join_next = False  # \c: the next text continues this one
        self.tag: str | None = None  # "tp": the next text line is a .TP tag; "tq": another tag line
        self.ie_stack: list[bool] = []
        self.pending_heading: str | None = None  # .SH / .SS without arguments: the heading is the next line
        self.pending_url: list[str] = []
        self.depth = 0

    # -- output --------------------------------------------------------------------------------------------------

    @property
    def lines(self) -> list[str]:
        return self.sections[-1][1]

    def flush(self) -> None:
        """End the current fill-mode line (roff's break)."""
        if self.words:
            text = re.sub(r"[ \t]+", " ", "".join(self.words)).strip()
            if text:
                self.lines.append(text)
            self.words = []
        self.join_next = False

    def blank(self) -> None:
        """A paragraph break: end the line, then one blank line (never two, never at a section's start)."""
        self.flush()
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def text(self, s: str, joined: bool = False) -> None:
        """Text of one input line (escapes already interpreted); `joined`: it ended in \\c."""
        if self.pending_heading is not None:
            self._heading(self.pending_heading, s)
            self.pending_heading = None
            return
        if self.tag is not None:
            self._tag_line(s, joined)
            return
        if self.fill:
            if self.words and not self.join_next:
                self.words.append(" ")
            self.words.append(s)
        else:
            if self.join_next and self.lines:
                self.lines[-1] += s
            elif self.words:  # an .IP tag waiting for its paragraph
                self.words.append(s)
                self.lines.append("".join(self.words))
                self.words = []
            else:
                self.lines.append(s)
            if not joined:
                self.lines[-1] = self.lines[-1].rstrip()
        self.join_next = joined

    def _tag_line(self, s: str, joined: bool) -> None:
        if self.words and self.join_next:
            self.words.append(s)
        else:
            self.words = [s]
        self.join_next = joined
        if joined:
            return
        tag = re.sub(r"[ \t]+", " ", "".join(self.words)).strip()
        self.words = []
        if tag:
            self.lines.append(tag)
        self.tag = None

    def _heading(self, kind: str, title: str) -> None:
        title = re.sub(r"\s+", " ", title).strip()
        if kind == "SH":
            self.flush()
            while self.lines and self.lines[-1] == "":
                self.lines.pop()
            self.sections.append((title.upper(), []))
        else:
            self.blank()
            self.lines.append(title)

    # -- escapes -------------------------------------------------------------------------------------------------

    def _note(self, what: str) -> None:
        self.unknown[what] = self.unknown.get(what, 0) + 1

    def _name(self, s: str, i: int) -> tuple[str, int]:
        """A name after an escape: x, (xx or [long name]; returns (name, index after it)."""
        if i >= len(s):
            return "", i
        if s[i] == "(":
            return s[i + 1:i + 3], i + 3
        if s[i] == "[":
            j = s.find("]", i)
            if j < 0:
                return s[i + 1:], len(s)
            return s[i + 1:j], j + 1
        return s[i], i + 1

    def _delimited(self, s: str, i: int) -> tuple[str, int]:
        """A delimited argument 'like this' starting at s[i] (the delimiter); returns (content, index after)."""
        if i >= len(s):
            return "", i
        d = s[i]
        j = i + 1
        while j < len(s) and s[j] != d:
            j += 2 if s[j] == "\\" else 1
        return s[i + 1:j], j + 1

    def special(self, name: str) -> str:
        if name in SPECIAL_CHARS:
            return SPECIAL_CHARS[name]
        m = re.fullmatch(r"u([0-9A-Fa-f]{4,6})(?:_.*)?", name)
        if m:
            return chr(int(m.group(1), 16))
        if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
            return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
        if len(name) == 1:
            return name
        self._note(f"\\[{name}]")
        return ""

    def expand(self, s: str, depth: int = 0) -> str:
        """Interpret the escapes of one line (comments already stripped). \\c leaves a "\\x00c" marker at the end."""
        if "\\" not in s:
            return s
        out: list[str] = []
        i, n = 0, len(s)
        while i < n:
            c = s[i]
            if c != "\\" or i + 1 >= n:
                out.append(c)
                i += 1
                continue
            e = s[i + 1]
            i += 2
            if e in "fFmM":
                _, i = self._name(s, i)
            elif e == "(":
                out.append(self.special(s[i:i + 2]))
                i += 2
            elif e == "[":
                name, i = self._name(s, i - 1)
                out.append(self.special(name.split()[0] if name.strip() else name))
            elif e == "*":
                name, i = self._name(s, i)
                if name in self.strings and depth < 8:
                    out.append(self.expand(self.strings[name], depth + 1))
                elif name not in self.strings:
                    self._note(f"\\*[{name}]")
            elif e == "n":
                if i < n and s[i] in "+-":
                    i += 1
                name, i = self._name(s, i)
                out.append(str(self.registers.get(name, 0)))
            elif e == "s":
                if i < n and s[i] in "+-":
                    i += 1
                if i < n and s[i] in "([":
                    _, i = self._name(s, i)
                elif i < n and s[i] == "'":
                    _, i = self._delimited(s, i)
                else:
                    while i < n and s[i].isdigit() and i < n:
                        i += 1
            elif e == "N":
                arg, i = self._delimited(s, i)
                out.append(chr(int(arg)) if arg.isdigit() else "")
            elif e == "C":
                arg, i = self._delimited(s, i)
                out.append(self.special(arg))
            elif e in _DELIMITED_DROP:
                _, i = self._delimited(s, i)
            elif e in "kgz$":  # mark, register format, zero-width (keeps the next char), macro argument
                if e == "z":
                    continue
                _, i = self._name(s, i)
            elif e in "-":
                out.append("-")
            elif e in "eE\\":
                out.append("\\")
            elif e in " ~0":
                out.append("\u00a0")  # an unbreakable space: fill mode keeps it (it is turned into " " at the end)
            elif e in "&:%|^){}/,!pradu\n":
                pass
            elif e == "c":
                out.append("\x00c")
                i = n  # whatever follows \c on the line is dropped
            elif e == "t":
                out.append("\t")
            elif e == "'":
                out.append("\u00b4")
            elif e == "`":
                out.append("`")
            elif e == ".":
                out.append(".")
            else:
                self._note(f"\\{e}")
                out.append(e)
        return "".join(out)

    # -- input ---------------------------------------------------------------------------------------------------

    def run(self, source: str) -> None:
        queue: deque[str] = deque(source.replace("\r\n", "\n").split("\n"))
        if queue and queue[-1] == "":
            queue.pop()
        self.queue = queue
        while queue:
            line = queue.popleft()
            if line.startswith((".", "'")) and line[1:].lstrip().startswith(("de", "am")) \
                    and re.match(r"[.']\s*(de1?|am1?)\s", line):
                self._define(line)
                continue
            line = strip_comment(line)
            while _odd_backslash_end(line) and queue:
                line = line[:-1] + strip_comment(queue.popleft())
            if _odd_backslash_end(line):
                line = line[:-1]
            self.line(line)
        self.flush()

    def _define(self, line: str) -> None:
        args = split_args(strip_comment(line).lstrip(".'").strip()[2:].lstrip("1").strip())
        req = strip_comment(line).lstrip(".'").strip()
        name = args[0] if args else ""
        end = ".." if len(args) < 2 else "." + args[1]
        body: list[str] = []
        while self.queue:
            raw = self.queue.popleft()
            if raw.strip() == end or raw.rstrip().startswith(end + " ") or (end == ".." and raw.startswith("..")):
                break
            body.append(raw)
        if req.startswith("am"):
            self.macros.setdefault(name, []).extend(body)
        else:
            self.macros[name] = body

    def _call(self, name: str, args: list[str]) -> None:
        if self.depth > 20:
            return
        lines = []
        for raw in self.macros[name]:
            raw = raw.replace("\\\\", "\\")
            raw = re.sub(r"\\\$(\d)", lambda m: args[int(m.group(1)) - 1] if int(m.group(1)) <= len(args) else "", raw)
            raw = raw.replace("\\$*", " ".join(args)).replace("\\$@", " ".join(f'"{a}"' for a in args))
            raw = raw.replace("\\$#", str(len(args)))
            lines.append(raw)
        self.queue.extendleft(reversed(lines))

    def line(self, line: str) -> None:
        if line.startswith((".", "'")):
            self.request(line[1:])
            return
        if self.fill and (line == "" or line[:1] in " \t"):
            if line.strip() == "":  # a blank line: a paragraph break
                if self.tag is None and self.pending_heading is None:
                    self.blank()
                return
            self.flush()  # a line starting with a space starts a new output line
        if not self.fill and line == "":
            if self.tag is None:
                self.lines.append("")
            return
        out = self.expand(line)
        joined = out.endswith("\x00c")
        if joined:
            out = out[:-2]
        self.text(out, joined)

    def request(self, rest: str) -> None:
        rest = rest.lstrip(" \t")
        m = re.match(r"(\\[{}]|[^\s\\]+)(.*)", rest)
        if not m:
            return
        name, argstr = m.group(1), m.group(2)
        if name in self.macros and name not in ("TH", "SH", "SS"):
            self.depth += 1
            try:
                self._call(name, split_args(argstr))
            finally:
                self.depth -= 1
            return
        args = split_args(argstr)
        if name in _MDOC:
            raise RoffError("an mdoc(7) page (.Dd/.Sh macros), not man(7)")
        handler = getattr(self, "r_" + name, None) if name.isidentifier() else None
        if handler is not None:
            handler(args, argstr)
        elif name in _FONT_MACROS:
            if args:
                out = _FONT_MACROS[name].join(self.expand(a) for a in args)
                joined = out.endswith("\x00c")
                self.text(out[:-2] if joined else out, joined)
        elif name in ("if", "ie", "el"):
            self.conditional(name, argstr)
        elif name in _IGNORED:
            pass
        else:
            self._note(f".{name}")

    # -- conditionals --------------------------------------------------------------------------------------------

    def condition(self, s: str) -> tuple[bool, str]:
        s = s.lstrip()
        neg = False
        while s.startswith("!"):
            neg, s = not neg, s[1:]
        if s[:1] in "ntoe" and (len(s) == 1 or s[1] in " \t\\"):
            value, rest = s[0] in "no", s[1:]
        elif s[:1] in "cdrmFS" and len(s) > 1 and s[1] in " \t":
            m = re.match(r"\S\s+(\S+)(.*)", s)
            what, rest = (m.group(1), m.group(2)) if m else ("", "")
            value = {"d": what in self.strings or what in self.macros, "r": what in self.registers}.get(s[0], True)
        elif s[:1] in "'\"/|":
            d = s[0]
            parts = s[1:].split(d, 2)
            if len(parts) < 3:
                return False, ""
            value, rest = self.expand(parts[0]) == self.expand(parts[1]), parts[2]
        else:
            m = re.match(r"(\S+)(.*)", s)
            if not m:
                return False, ""
            expr, rest = self.expand(m.group(1)), m.group(2)
            try:
                value = bool(_numeric(expr))
            except ValueError:
                value = False
        return value != neg, rest

    def conditional(self, kind: str, argstr: str) -> None:
        if kind == "el":
            value, rest = (not self.ie_stack.pop()) if self.ie_stack else False, argstr
        else:
            value, rest = self.condition(argstr)
            if kind == "ie":
                self.ie_stack.append(value)
        rest = rest.lstrip(" \t")
        block = rest.startswith("\\{")
        if block:
            rest = rest[2:].lstrip(" \t")
        if not value:
            if block:
                depth = 1 + rest.count("\\{") - rest.count("\\}")
                while depth > 0 and self.queue:
                    nxt = self.queue.popleft()
                    depth += nxt.count("\\{") - nxt.count("\\}")
            return
        if rest:
            self.line(rest)

    # -- requests and macros -------------------------------------------------------------------------------------

    def r_TH(self, args, _):
        self.th = [self.expand(a) for a in args]

    def _section(self, kind: str, args) -> None:
        """A heading from the arguments, or (none given) from the next text line."""
        self.tag = None
        if args:
            self._heading(kind, " ".join(self.expand(a) for a in args))
        else:
            self.flush()
            self.pending_heading = kind

    def r_SH(self, args, _):
        self._section("SH", args)
        self.fill = True

    def r_SS(self, args, _):
        self._section("SS", args)

    def _para(self, *_):
        self.tag = None
        self.blank()

    r_PP = r_LP = r_P = r_HP = _para

    def r_TP(self, args, _):
        self.blank()
        self.tag = "tp"

    def r_TQ(self, args, _):
        self.flush()
        self.tag = "tq"

    def r_IP(self, args, _):
        self.tag = None
        self.blank()
        if args and self.expand(args[0]).strip():
            self.words = [self.expand(args[0]).strip(), " "]

    def r_RS(self, *_):
        self.flush()

    r_RE = r_br = r_RS

    def r_sp(self, args, _):
        self.tag = None
        self.blank()

    def r_nf(self, *_):
        self.flush()
        self.fill = False

    def r_fi(self, *_):
        self.flush()
        self.fill = True

    def r_EX(self, *_):
        self.r_nf()

    def r_EE(self, *_):
        self.r_fi()

    def r_ce(self, args, _):
        self.flush()

    def r_ig(self, args, _):
        """Ignore input up to `..` (or `.<end>`)."""
        end = "." + (args[0] if args else ".")
        while self.queue and self.queue.popleft().strip() != end:
            pass

    def r_nop(self, args, argstr):
        if argstr.strip():
            self.line(argstr.lstrip())

    def r_so(self, args, _):
        self.so = args[0] if args else ""

    def r_ds(self, args, argstr):
        m = re.match(r"\s*(\S+)\s?\"?(.*)", argstr)
        if m:
            self.strings[m.group(1)] = m.group(2)

    def r_as(self, args, argstr):
        m = re.match(r"\s*(\S+)\s?\"?(.*)", argstr)
        if m:
            self.strings[m.group(1)] = self.strings.get(m.group(1), "") + m.group(2)

    def r_nr(self, args, _):
        if len(args) >= 2:
            try:
                value = _numeric(self.expand(args[1]).lstrip("+-"))
            except ValueError:
                return
            old = self.registers.get(args[0], 0)
            self.registers[args[0]] = old + value if args[1][:1] == "+" else old - value if args[1][:1] == "-" \
                else value

    def r_UR(self, args, _):
        self.pending_url.append(self.expand(args[0]) if args else "")

    def r_MT(self, args, _):
        self.r_UR(args, _)

    def r_UE(self, args, _):
        url = self.pending_url.pop() if self.pending_url else ""
        tail = "".join(self.expand(a) for a in args)
        if url:
            self.text(f"\u27e8{url}\u27e9{tail}")
        elif tail:
            self.text(tail)

    r_ME = r_UE

    def r_SY(self, args, _):
        self.blank()
        if args:
            self.text(" ".join(self.expand(a) for a in args))

    def r_OP(self, args, _):
        self.text("[" + " ".join(self.expand(a) for a in args) + "]")

    def r_YS(self, *_):
        self.blank()

    def r_TS(self, args, _):
        self.table()

    def table(self) -> None:
        """tbl(1) input up to .TE: each data row one output line, cells separated by two spaces."""
        self.blank()
        tab = "\t"
        lines: list[str] = []
        while self.queue:
            raw = strip_comment(self.queue.popleft())
            if re.match(r"[.']\s*TE\b", raw):
                break
            lines.append(raw)
        i = 0
        if lines and lines[0].rstrip().endswith(";"):
            m = re.search(r"tab\s*\((.)\)", lines[0])
            tab = m.group(1) if m else tab
            i = 1
        while i < len(lines) and not lines[i].rstrip().endswith("."):  # format lines
            i += 1
        i += 1
        rows: list[list[str]] = []
        cells: list[str] = []
        block: list[str] | None = None
        skip_format = False
        for raw in lines[i:]:
            if block is not None:  # inside T{ ... T}
                if raw.startswith("T}"):
                    cells.append(" ".join(b for b in block if b))
                    block = None
                    rest = raw[2:]
                    if rest.startswith(tab):
                        rest = rest[1:]
                        more = rest.split(tab)
                        if more and more[-1].startswith("T{"):
                            cells += [self._cell(c) for c in more[:-1]]
                            block = [self._cell(more[-1][2:])] if more[-1][2:].strip() else []
                            continue
                        cells += [self._cell(c) for c in more]
                    rows.append(cells)
                    cells = []
                elif raw.startswith((".", "'")):
                    m = re.match(r"[.']\s*(\S+)(.*)", raw)
                    if m and m.group(1) in _FONT_MACROS:
                        block.append(_FONT_MACROS[m.group(1)].join(self._cell(a) for a in split_args(m.group(2))))
                else:
                    block.append(self._cell(raw))
                continue
            if skip_format:
                skip_format = not raw.rstrip().endswith(".")
                continue
            if raw.startswith((".", "'")):
                m = re.match(r"[.']\s*(\S+)", raw)
                skip_format = bool(m) and m.group(1) == "T&"  # new format lines follow, up to one ending in "."
                continue
            if raw.strip() in ("_", "=", ""):  # a rule across the table
                continue
            parts = raw.split(tab)
            if parts[-1].startswith("T{"):
                cells = [self._cell(c) for c in parts[:-1]]
                block = [self._cell(parts[-1][2:])] if parts[-1][2:].strip() else []
                continue
            rows.append([self._cell(c) for c in parts])
        for row in rows:
            text = "  ".join(c for c in row if c)
            if text.strip():
                self.lines.append(text.strip())
        self.blank()

    def _cell(self, s: str) -> str:
        if s in ("_", "=", "\\_", "\\=", "\\^"):  # rules and vertical spans (not "\\&_", not "= ")
            return ""
        out = self.expand(s.lstrip(" \t"))
        out = out[:-2] if out.endswith("\x00c") else out
        return out.replace("\u00a0", " ").strip()


def _numeric(expr: str) -> int:
    """A roff numeric expression of integers with + - * / < > = & : and scale units (dropped); left to right."""
    tokens = re.findall(r"\d+(?:\.\d+)?[icpPmnvuMs]?|<=|>=|==|[-+*/<>=&:()]", expr)
    if not tokens or "".join(tokens) != re.sub(r"\s", "", expr):
        raise ValueError(expr)
    value, op = 0, "+"
    for t in tokens:
        if t[0].isdigit():
            v = int(float(t.rstrip("icpPmnvuMs")))
            value = {"+": value + v, "-": value - v, "*": value * v, "/": value // v if v else 0, "<": value < v,
                     ">": value > v, "=": value == v, "==": value == v, "<=": value <= v, ">=": value >= v,
                     "&": bool(value) and bool(v), ":": bool(value) or bool(v)}[op]
            value = int(value)
        elif t in "()":
            continue
        else:
            op = t
    return value


def render(source: str) -> Page:
    """Render a man(7) page's roff source; raises RoffError for a page it cannot read (e.g. mdoc)."""
    r = _Renderer()
    r.run(source)
    sections = []
    for heading, lines in r.sections:
        while lines and lines[-1] == "":
            lines.pop()
        text = "\n".join(lines).replace("\u00a0", " ")
        if heading or text.strip():
            sections.append((heading, text))
    return Page(sections, r.th, r.so, r.unknown)
