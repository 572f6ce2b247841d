"""Pictures of evaluation results: the passkey heat map (paper Fig. 8), a lengths x depths matrix, a stage x length
summary, ROUGE bars by input length (Table II) and by model (Fig. 9), and the long-context loss by token position.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly, never through pyplot: no global
backend switch, no figure registry to leak from in a long training process, works without a display.
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .passkey import PasskeyGrid, depth_key, length_label

if TYPE_CHECKING:
    from .long_context import LossCurve

CMAP = "RdYlGn"  # red = fails, green = retrieves


def _figure(width: float, height: float, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    return path


def text_colour(rgba) -> str:
    """Black or white, whichever reads better on a background of this colour (the colour map's dark red ends and
    green ends take white; its pale middle takes black)."""
    r, g, b = (float(c) for c in rgba[:3])
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def heatmap_title(grid: PasskeyGrid, trained_length: int | None = None) -> str:
    """The accuracy at the trained length (what a curriculum prints after a stage), and the grid mean labelled as
    such; just the grid mean when the trained length is unknown or not in the grid."""
    trained_length = trained_length if trained_length is not None else grid.meta.get("trained_length")
    mean = f"mean over all {len(grid.lengths)} lengths: exact {grid.mean_exact:.2f}"
    at = grid.summary().get(int(trained_length)) if trained_length is not None else None
    if at is None or not at["count"]:
        return f"Passkey retrieval: exact {grid.mean_exact:.2f}, per digit {grid.mean_digit:.2f} (mean over the grid)"
    if len(grid.lengths) == 1:
        return f"Passkey retrieval at {length_label(trained_length)} tokens (trained): exact {at['exact']:.2f}, per digit {at['digit']:.2f}"
    return (f"Passkey retrieval at {length_label(trained_length)} tokens (trained): exact {at['exact']:.2f}, "
            f"per digit {at['digit']:.2f}; {mean}")


def plot_passkey_heatmap(
    grid: PasskeyGrid,
    path: str | Path,
    trained_length: int | None = None,
    *,
    title: str | None = None,
    ncols: int | None = None,
) -> Path:
    """Fig. 8: one panel per total length; x = needle depth, coloured squares joined by a line = exact-match accuracy
    (a 0 stays visible on the axis, as a bar would not), black dots = per-digit accuracy. The trained length's
    panel is framed in red. In longer panels a dashed red line marks the depth at which the needle is the trained
    length away from the end of the prompt: to its right the needle is as close to the question as in training,
    to its left farther than any training example put it.

    trained_length defaults to grid.meta["trained_length"]; title defaults to `heatmap_title`. Returns the PNG path.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    trained_length = trained_length if trained_length is not None else grid.meta.get("trained_length")
    n = len(grid.lengths)
    ncols = ncols or (n if n <= 4 else 3)
    nrows = math.ceil(n / ncols)
    fig = _figure(3.6 * ncols + 0.9, 2.9 * nrows + 0.6, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    annotate = len(grid.depths) <= 6  # numbers next to the points only while they fit
    cmap, norm = colormaps[CMAP], Normalize(0.0, 1.0)
    depths = np.asarray(grid.depths)
    gaps = np.diff(np.sort(depths))
    pad = 0.5 * (gaps[gaps > 0].min() if (gaps > 0).any() else 0.1)
    order = np.argsort(depths)
    handles = [Line2D([], [], color="0.4", marker="s", markerfacecolor=cmap(norm(0.5)), markeredgecolor="0.2",
                      label="exact match"),
               Line2D([], [], color="black", marker="o", linestyle=":", markersize=3.5, label="per digit")]
    for idx, length in enumerate(grid.lengths):
        ax = axes[idx // ncols][idx % ncols]
        has = grid.counts[idx] > 0
        keep = order[has[order]]
        exact = grid.exact[idx]
        ax.axhline(0.0, color="0.85", linewidth=0.8, zorder=0)
        ax.plot(depths[keep], exact[keep], "-", color="0.4", linewidth=1.0, zorder=2)
        ax.scatter(depths[keep], exact[keep], s=46, marker="s", c=cmap(norm(exact[keep])), edgecolors="0.2",
                   linewidths=0.6, zorder=3)
        ax.plot(depths[keep], grid.digit[idx][keep], "o:", color="black", markersize=3.5, linewidth=0.8, zorder=4)
        for d, v, ok in zip(depths, exact, has):
            if annotate or not ok:
                y = v + 0.06 if v < 0.85 else v - 0.07
                ax.text(d, y if ok else 0.03, f"{v:.2f}" if ok else "-", ha="center", va="center", fontsize=7)
        ax.set_xlim(depths.min() - pad, depths.max() + pad)
        if annotate:
            ax.set_xticks(depths, [depth_key(d) for d in depths])
        ax.set_ylim(-0.08, 1.1)
        label = f"{length_label(length)} tokens"
        if trained_length is not None and length == trained_length:
            ax.set_title(label + " (trained)", color="red", fontweight="bold")
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2.0)
        else:
            ax.set_title(label)
        if trained_length is not None and length > trained_length:
            ax.axvline(1.0 - trained_length / length, color="red", linestyle="--", linewidth=1.2, zorder=1)
        if idx % ncols == 0:
            ax.set_ylabel("accuracy")
        if idx + ncols >= n:  # nothing below this panel
            ax.set_xlabel("needle depth")
    for idx in range(n, nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    if trained_length is not None and any(length > trained_length for length in grid.lengths):
        handles.append(Line2D([], [], color="red", linestyle="--",
                              label=f"needle {length_label(trained_length)} tokens before the end (trained length; "
                                    "farther to its left)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8, label="exact match")
    # wrapped to the figure's width: a one-length grid is one narrow panel, and its title would be cut at both sides
    text = title if title is not None else heatmap_title(grid, trained_length)
    fig.suptitle(textwrap.fill(text, width=int(11 * (3.6 * ncols + 0.9))))
    return _save(fig, path)


def plot_passkey_matrix(grid: PasskeyGrid, path: str | Path, metric: str = "exact", trained_length: int | None = None) -> Path:
    """The whole grid as one heat map (rows = total length, columns = depth, annotated), the trained row marked."""
    trained_length = trained_length if trained_length is not None else grid.meta.get("trained_length")
    values = np.where(grid.counts > 0, getattr(grid, metric), np.nan)
    fig = _figure(1.0 + 0.7 * len(grid.depths) + 1.2, 1.0 + 0.45 * len(grid.lengths) + 0.6)
    ax = fig.subplots()
    im = ax.imshow(values, cmap=CMAP, vmin=0, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            _annotate(ax, j, i, values[i, j], im)
    ax.set_xticks(range(len(grid.depths)), [depth_key(d) for d in grid.depths])
    ax.set_yticks(range(len(grid.lengths)), [length_label(n) + (" *" if n == trained_length else "") for n in grid.lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("total length" + (" (* trained)" if trained_length in grid.lengths else ""))
    fig.colorbar(im, ax=ax, label=metric)
    fig.suptitle(f"Passkey {metric} accuracy")
    fig.tight_layout()
    return _save(fig, path)


def _annotate(ax, x: int, y: int, value: float, im) -> None:
    if np.isnan(value):
        ax.text(x, y, "-", ha="center", va="center", fontsize=8)
    else:
        ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8, color=text_colour(im.cmap(im.norm(value))))


def plot_stage_summary(
    grids: Mapping[str, PasskeyGrid], path: str | Path, metric: str = "exact", trained_lengths: Mapping[str, int] | None = None
) -> Path:
    """A curriculum at a glance: rows = stages (in the mapping's order), columns = total lengths, colour = mean
    accuracy over depths; each stage's trained length is boxed."""
    from matplotlib.patches import Rectangle

    stages = list(grids)
    lengths = sorted({n for g in grids.values() for n in g.lengths})
    values = np.full((len(stages), len(lengths)), np.nan)
    for i, s in enumerate(stages):
        for n, row in grids[s].summary().items():
            if row["count"]:
                values[i, lengths.index(n)] = row[metric]
    fig = _figure(2.0 + 0.8 * len(lengths) + 1.2, 1.0 + 0.5 * len(stages) + 0.6)
    ax = fig.subplots()
    im = ax.imshow(values, cmap=CMAP, vmin=0, vmax=1, aspect="auto")
    for i, s in enumerate(stages):
        for j in range(len(lengths)):
            _annotate(ax, j, i, values[i, j], im)
        t = (trained_lengths or {}).get(s, grids[s].meta.get("trained_length"))
        if t in lengths:
            j = lengths.index(t)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.0))
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(stages)), stages)
    ax.set_xlabel("evaluated total length (boxed: the stage's trained length)")
    fig.colorbar(im, ax=ax, label=f"mean {metric}")
    fig.suptitle(f"Passkey {metric} accuracy by stage")
    fig.tight_layout()
    return _save(fig, path)


def passkey_table_html(grid: PasskeyGrid, metric: str = "exact") -> str:
    """An HTML table (lengths x depths + mean), cells tinted by accuracy: for reports without pictures."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps[CMAP]
    values, summary = getattr(grid, metric), grid.summary()

    def td(v: float) -> str:
        if v is None or np.isnan(v):
            return "<td>-</td>"
        rgba = cmap(float(v))
        return f'<td style="background:{to_hex(rgba)};color:{text_colour(rgba)};text-align:center">{v:.2f}</td>'

    head = "<tr><th>length</th>" + "".join(f"<th>{html.escape(depth_key(d))}</th>" for d in grid.depths) + "<th>mean</th></tr>"
    rows = [
        f"<tr><th>{length_label(n)}</th>"
        + "".join(td(values[i, j] if grid.counts[i, j] else np.nan) for j in range(len(grid.depths)))
        + td(summary[n][metric])
        + "</tr>"
        for i, n in enumerate(grid.lengths)
    ]
    return f'<table border="1" style="border-collapse:collapse"><caption>passkey {metric}</caption>{head}{"".join(rows)}</table>'


def plot_rouge_by_length(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | Path,
    rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    title: str | None = None,
) -> Path:
    """Table II as bars: one panel per ROUGE type, x = input-length bucket (then "overall"), one bar per
    model. `results` maps a model name to a `rouge_by_length` result; tick labels give the first model's counts.
    `title`: a line over the panels (e.g. which data)."""
    names = list(results)
    buckets = [b for b in next(iter(results.values())) if b != "overall"] + ["overall"]
    fig = _figure(4.2 * len(rouge_types), 3.8, layout="constrained")
    axes = fig.subplots(1, len(rouge_types), squeeze=False)[0]
    x = np.arange(len(buckets))
    width = 0.8 / max(len(names), 1)
    for ax, rt in zip(axes, rouge_types):
        for k, name in enumerate(names):
            vals = [results[name].get(b, {}).get(rt, math.nan) for b in buckets]
            bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, np.nan_to_num(vals), width, label=name)
            for bar, v in zip(bars, vals):
                if not math.isnan(v):
                    ax.text(bar.get_x() + bar.get_width() / 2, v + 0.005, f"{v:.2f}", ha="center", va="bottom", fontsize=6)
        first = results[names[0]]
        ax.set_xticks(x, [f"{b}\nn={first.get(b, {}).get('count', 0)}" for b in buckets])
        ax.set_title(f"{rt.upper().replace('ROUGE', 'ROUGE-')} F1")
        ax.set_xlabel("input length (tokens)")
        top = np.nanmax([results[n].get(b, {}).get(rt, math.nan) for n in names for b in buckets] + [0.0])
        ax.set_ylim(0, min(1.08, top + 0.1) if top > 0 else 1.0)
    axes[0].set_ylabel("F1")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(len(names), 1), fontsize=8)
    if title:
        fig.suptitle(_wrap(title, 160), fontsize=9)
    return _save(fig, path)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def plot_rouge_overall(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: str | Path,
    rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    title: str | None = None,
) -> Path:
    """Fig. 9: the models' overall ROUGE F1 as grouped bars, one group per metric (ROUGE-1, -2, -L), one bar per
    model, the value on each bar. `results` maps a model name to a `rouge_by_length` result."""
    names = list(results)
    fig = _figure(max(5.0, 1.2 + 1.1 * len(rouge_types) * max(len(names), 1) * 0.6), 3.8)
    ax = fig.subplots()
    x = np.arange(len(rouge_types))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        overall = results[name].get("overall", {})
        vals = [float(overall.get(rt, math.nan)) for rt in rouge_types]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, np.nan_to_num(vals), width,
                      label=f"{name} (n={overall.get('count', 0)})")
        for bar, v in zip(bars, vals):
            if not math.isnan(v):
                ax.text(bar.get_x() + bar.get_width() / 2, v + 0.005, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [rt.upper().replace("ROUGE", "ROUGE-") for rt in rouge_types])
    top = np.nanmax([float(results[n].get("overall", {}).get(rt, math.nan)) for n in names for rt in rouge_types]
                    + [0.0])
    ax.set_ylim(0, min(1.1, top * 1.25 + 0.05) if top > 0 else 1.0)
    ax.set_ylabel("F1 (overall)")
    ax.set_title(_wrap(title or "ROUGE F1 by model", 90), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def loss_curves_title(curves: Sequence["LossCurve"]) -> str:
    """'Loss by position: heldout.jsonl, 8 windows of 64K tokens' (+ 'documents concatenated' when they were)."""
    sources = sorted({Path(str(c.meta["source"])).name for c in curves if c.meta.get("source")})
    lengths = sorted({c.length for c in curves})
    windows = sorted({c.windows for c in curves})
    what = (f"{'/'.join(str(w) for w in windows)} windows of "
            f"{'/'.join(length_label(n) for n in lengths)} tokens")
    joined = " (documents concatenated)" if any(c.meta.get("concatenated") for c in curves) else ""
    text = f"{', '.join(sources)}{joined}, " if sources else ""
    return f"Next-token loss by position: {text}{what}"


def _exp(y):
    return np.exp(np.clip(y, -50.0, 50.0))


def _log(p):  # matplotlib probes the inverse at 0 and below while laying out the axis
    return np.log(np.maximum(p, 1e-300))


def plot_loss_by_position(
    curves: Mapping[str, "LossCurve"] | Sequence["LossCurve"],
    path: str | Path,
    trained_length: int | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Loss (left axis, nats) and perplexity (right axis) against token position on a log2 axis, one line per
    model; each point is a bin's mean, drawn at the bin's middle position. A dashed red line marks the trained
    context when given: to its right a full-attention model runs past the positions it was trained on.

    curves: a mapping display name -> curve (the name labels the line) or a sequence (each curve's own name).
    title defaults to `loss_curves_title` (the text source and the windows). Returns the PNG path.
    """
    items = list(curves.items()) if isinstance(curves, Mapping) else [(c.name, c) for c in curves]
    if not items:
        raise ValueError("plot_loss_by_position: no curves")
    fig = _figure(8.0, 4.6, layout="constrained")
    ax = fig.subplots()
    longest = max(c.length for _, c in items)
    markers = "os^vDP*X"
    for k, (label, c) in enumerate(items):
        starts = np.asarray(c.bin_starts, dtype=float)
        ends = np.minimum(starts + c.bin_tokens, c.length)
        x = np.where(starts == 0, ends / 2, (starts + ends) / 2)  # bin 0's middle: the first bin on a log axis
        y = np.asarray(c.bin_loss, dtype=float)
        ax.plot(x, y, marker=markers[k % len(markers)], markersize=3.5 if len(x) <= 64 else 0, linewidth=1.4,
                label=f"{label} (ppl {c.ppl:.2f})")
    ax.set_xscale("log", base=2)
    lo = min(c.bin_tokens for _, c in items) / 2
    ticks = [2 ** k for k in range(int(math.floor(math.log2(lo))), int(math.ceil(math.log2(longest))) + 1)]
    ax.set_xticks(ticks, [length_label(t) for t in ticks], fontsize=8)
    ax.set_xlim(lo / 1.3, longest * 1.1)
    if trained_length and trained_length <= longest:  # beyond the windows there is nothing to mark
        ax.axvline(trained_length, color="red", linestyle="--", linewidth=1.3,
                   label=f"trained context ({length_label(int(trained_length))} tokens)")
    ax.set_xlabel("token position (context before the predicted token)")
    ax.set_ylabel("next-token loss (nats)")
    ax.grid(True, which="major", alpha=0.3)
    # perplexity on the right: the same line read through exp, so one set of curves serves both
    right = ax.secondary_yaxis("right", functions=(_exp, _log))
    # the default locator spaces perplexity ticks linearly, which leaves the low (interesting) end bare: 1-2-5 steps
    lo, hi = ax.get_ylim()
    nice = [m * 10**k for k in range(0, 10) for m in (1, 2, 5)]
    ticks = [v for v in nice if lo <= math.log(v) <= hi]
    if len(ticks) > 12:
        ticks = [v for v in ticks if str(int(v))[0] == "1"]
    right.set_yticks(ticks, [f"{v:g}" for v in ticks])
    right.set_ylabel("perplexity")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title if title is not None else loss_curves_title([c for _, c in items]), fontsize=10)
    return _save(fig, path)
