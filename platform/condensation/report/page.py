"""One self-contained HTML page: sections of text, tables and pictures, every picture inlined as a base64 PNG
(`data:` URI), no script, no stylesheet or font from the network, so the file opens anywhere and can be mailed or
stored as one MLflow artifact."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1280px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 12px; margin: .5em 0; }
th, td { border: 1px solid #bbb; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td.l, th.l { text-align: left; }
figure { margin: .8em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { font-size: 12px; color: #555; } nav a { margin-right: 1em; }
.scroll { overflow-x: auto; }
"""


def esc(x: object) -> str:
    return html.escape(str(x))


def image_html(png: str | Path | bytes, alt: str, caption: str | None = None) -> str:
    """<figure> with the PNG inlined (bytes or a file's path)."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"image_html: {alt!r} is not a PNG")
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{src}" alt="{esc(alt)}">{cap}</figure>'


def table_html(header: list[str], rows: list[list[object]], caption: str | None = None) -> str:
    """A plain table: text left aligned, numbers right aligned (floats to 4 significant digits, NaN as -)."""
    def cell(v: object, tag: str = "td") -> str:
        cls = "" if isinstance(v, (int, float)) else ' class="l"'
        if isinstance(v, float):
            v = "-" if v != v else f"{v:.4g}"
        return f"<{tag}{cls}>{esc('' if v is None else v)}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}{head}{body}</table></div>'


@dataclass
class Section:
    """A part of the report: a title and HTML fragments (text, tables, `image_html` figures)."""

    title: str
    parts: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower())

    @property
    def images(self) -> int:
        return sum(p.count("<img ") for p in self.parts)


def render_page(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<h2 id="{s.anchor}">{esc(s.title)}</h2>' + "".join(s.parts) for s in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p><nav>{nav}</nav>{body}</body></html>")
