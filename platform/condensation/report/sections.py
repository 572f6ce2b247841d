"""The report's sections, each built from what the chosen MLflow runs logged (conventions of
`condensation.evaluate.tracking`, `workloads/benchmark.py` and `evaluate.attention_maps`); a section whose data no
run holds is left out.

| section | read from |
|---|---|
| runs | params and metrics of every run (`runs.comparison_table`) |
| training loss | metric history `loss` |
| passkey (Fig. 8) | artifacts `**/passkey_grid.json` |
| ROUGE (Table II, Fig. 9, 11, 12) | runs tagged `summarize.model`, metrics `rouge/<bucket>/<type>` |
| memory and speed (Fig. 5-7) | metric histories `<case>/peak_gib`, `<case>/tokens_per_s` at step = sequence length |
| loss by position | artifacts `**/loss_curves.json` |
| attention (Fig. 10) | artifacts `attention/attention_maps.npz` |
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..evaluate.plots import _figure, _save
from .page import Section, esc, image_html, table_html
from .runs import comparison_table


def artifact_files(client, run_id: str, filename: str, path: str | None = None) -> list[str]:
    """Paths of every artifact of the run named `filename`, at any depth."""
    found = []
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            found += artifact_files(client, run_id, filename, info.path)
        elif info.path.rsplit("/", 1)[-1] == filename:
            found.append(info.path)
    return found


def read_artifact_text(run_id: str, path: str, tracking_uri: str | None) -> str:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                    tracking_uri=tracking_uri)
        return Path(local).read_text()


def runs_section(runs: Sequence) -> Section:
    header, rows, notes = comparison_table(runs)
    # a long note (the list of params with one value) folds away behind its first clause
    folded = [f"<details class='note'><summary>{esc(n.split(': ', 1)[0])}</summary>{esc(n.split(': ', 1)[1])}</details>"
              if len(n) > 200 and ": " in n else f"<p class='note'>{esc(n)}</p>" for n in notes]
    return Section("Runs", [table_html(header, rows), *folded])


def training_section(client, runs: Sequence, labels: dict, tmp: Path) -> Section | None:
    """The training loss of every run that logged more than one `loss` point, against its own step."""
    curves = {}
    for r in runs:
        if "loss" in r.data.metrics:
            hist = sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)
            if len(hist) > 1:
                curves[labels[r.info.run_id]] = ([m.step for m in hist], [m.value for m in hist])
    if not curves:
        return None
    fig = _figure(8.0, 3.8, layout="constrained")
    ax = fig.subplots()
    for name, (x, y) in curves.items():
        ax.plot(x, y, linewidth=1.2, label=name)
    if min(min(y) for _, y in curves.values()) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step (each run's own)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Training loss", fontsize=10)
    png = _save(fig, tmp / "training_loss.png")
    return Section("Training loss", [image_html(png, "training loss by step")])


def passkey_section(client, runs: Sequence, labels: dict, tracking_uri: str | None, tmp: Path) -> Section | None:
    """Fig. 8 across runs and stages: one summary (rows = every grid found, oldest run first; columns = lengths;
    the trained length boxed), then each grid's heat map by length and depth."""
    from ..evaluate import PasskeyGrid, passkey_table_html, plot_passkey_heatmap, plot_stage_summary
    from ..evaluate.plots import heatmap_title
    from ..evaluate.tracking import GRID_ARTIFACT

    grids: dict[str, PasskeyGrid] = {}
    for r in runs:
        paths = sorted(artifact_files(client, r.info.run_id, GRID_ARTIFACT))
        for p in paths:
            name = labels[r.info.run_id] if len(paths) == 1 else f"{labels[r.info.run_id]} [{p.rsplit('/', 1)[0]}]"
            grids[name] = PasskeyGrid.from_json(read_artifact_text(r.info.run_id, p, tracking_uri))
    if not grids:
        return None
    parts = [image_html(plot_stage_summary(grids, tmp / "passkey_summary.png"), "passkey accuracy by run and length",
                        "Mean exact-match accuracy over depths; each grid's trained length is boxed.")]
    for k, (name, grid) in enumerate(grids.items()):
        png = plot_passkey_heatmap(grid, tmp / f"passkey_{k:02d}.png", title=f"{name}: {heatmap_title(grid)}")
        parts += [f"<h3>{esc(name)}</h3>", image_html(png, f"passkey heat map {name}"),
                  f"<details><summary>table</summary>{passkey_table_html(grid)}</details>"]
    return Section("Passkey retrieval", parts)


def rouge_section(client, runs: Sequence, labels: dict, tmp: Path) -> Section | None:
    """Table II (ROUGE-1/2/L F1 by input length, with counts) and its bars (Fig. 9, 11, 12) for every run tagged
    `summarize.model`; models of different comparisons are told apart by their parent's name."""
    from ..evaluate import plot_rouge_by_length, plot_rouge_overall, rouge_from_metrics
    from ..evaluate.rouge import ROUGE_TYPES
    from ..evaluate.tracking import LABEL_TAG, MODEL_TAG
    from .runs import PARENT_TAG

    rouge_runs = [r for r in runs if MODEL_TAG in r.data.tags and "overall" in rouge_from_metrics(r.data.metrics)]
    if not rouge_runs:
        return None
    parents = {r.data.tags.get(PARENT_TAG) for r in rouge_runs}
    parent_names = {r.info.run_id: r.info.run_name for r in runs}
    results = {}
    for r in rouge_runs:
        name = r.data.tags.get(LABEL_TAG, r.data.tags[MODEL_TAG])
        if len(parents) > 1:
            pid = r.data.tags.get(PARENT_TAG)
            name = f"{parent_names.get(pid, (pid or '')[:8]) or r.info.run_name}/{name}"
        if name in results:
            name = f"{name} ({r.info.run_id[:6]})"
        results[name] = rouge_from_metrics(r.data.metrics)
    header = ["model", "input length", *(t.upper().replace("ROUGE", "ROUGE-") for t in ROUGE_TYPES), "n"]
    rows = [[name, bucket, *(float(res[bucket].get(t, math.nan)) for t in ROUGE_TYPES), int(res[bucket].get("count", 0))]
            for name, res in results.items() for bucket in [*(b for b in res if b != "overall"), "overall"]]
    return Section("Summarization: ROUGE by input length", [
        table_html(header, rows, caption="ROUGE F1 (Table II layout)"),
        image_html(plot_rouge_overall(results, tmp / "rouge_overall.png"), "ROUGE overall by model",
                   "Overall ROUGE F1 per model (Fig. 9)."),
        image_html(plot_rouge_by_length(results, tmp / "rouge_by_length.png"), "ROUGE by input length",
                   "ROUGE F1 by input-length bucket; n = examples in the bucket."),
    ])


BENCH_METRIC = re.compile(r"(?P<case>.+)/(?P<what>tokens_per_s|peak_gib)")


def benchmark_section(client, runs: Sequence, labels: dict, tmp: Path) -> Section | None:
    """Fig. 5-7: peak memory and throughput against total sequence length, one line per benchmark case (Llama
    cases dashed), from `workloads/benchmark.py --mlflow-uri` runs (its metrics are logged at step = length)."""
    series: dict[str, dict[str, dict[int, float]]] = {"peak_gib": {}, "tokens_per_s": {}}
    bench_runs = [r for r in runs if any(BENCH_METRIC.fullmatch(m) for m in r.data.metrics)]
    for r in bench_runs:
        for metric in r.data.metrics:
            match = BENCH_METRIC.fullmatch(metric)
            if match:
                case = match["case"] if len(bench_runs) == 1 else f"{labels[r.info.run_id]}: {match['case']}"
                hist = client.get_metric_history(r.info.run_id, metric)
                series[match["what"]][case] = {int(m.step): float(m.value) for m in hist}
    if not any(series.values()):
        return None
    panels = [(k, t) for k, t in (("peak_gib", "peak memory (GiB)"), ("tokens_per_s", "training tokens / s"))
              if series[k]]
    fig = _figure(6.0 * len(panels), 4.2, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels):
        for case, pts in sorted(series[key].items()):
            xs = sorted(pts)
            llama = "llama" in case.lower()
            ax.plot(xs, [pts[x] for x in xs], marker="s" if llama else "o", linestyle="--" if llama else "-",
                    markersize=4, label=case)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total sequence length (tokens)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Memory and speed by sequence length (Llama dashed)", fontsize=10)
    png = _save(fig, tmp / "benchmark.png")
    rows = []
    for case in sorted(set(series["peak_gib"]) | set(series["tokens_per_s"])):
        for length in sorted(set(series["peak_gib"].get(case, {})) | set(series["tokens_per_s"].get(case, {}))):
            rows.append([case, length, series["peak_gib"].get(case, {}).get(length, math.nan),
                         series["tokens_per_s"].get(case, {}).get(length, math.nan)])
    return Section("Memory and speed", [
        image_html(png, "memory and speed by sequence length", "Peak memory (Fig. 5, 6) and throughput (Fig. 7)."),
        f"<details><summary>table</summary>{table_html(['case', 'tokens', 'peak GiB', 'tokens/s'], rows)}</details>",
    ])


def long_context_section(client, runs: Sequence, labels: dict, tracking_uri: str | None, tmp: Path) -> Section | None:
    """Next-token loss by token position, one picture per window length, every curve of the runs on it."""
    from ..evaluate import LossCurve, format_curves_table, plot_loss_by_position
    from ..evaluate.tracking import CURVES_ARTIFACT

    found = []
    for r in runs:
        for p in artifact_files(client, r.info.run_id, CURVES_ARTIFACT):
            found += [(r, LossCurve.from_dict(d)) for d in json.loads(read_artifact_text(r.info.run_id, p, tracking_uri))]
    if not found:
        return None
    several = len({r.info.run_id for r, _ in found}) > 1
    parts = []
    for length in sorted({c.length for _, c in found}):
        curves = {(f"{labels[r.info.run_id]}: {c.name}" if several else c.name): c for r, c in found if c.length == length}
        trained = {c.meta.get("trained_length") for c in curves.values()}
        png = plot_loss_by_position(curves, tmp / f"loss_by_position_{length}.png",
                                    trained_length=trained.pop() if len(trained) == 1 else None)
        parts += [image_html(png, f"loss by position, {length} tokens"),
                  f"<details><summary>perplexity by position range</summary><pre>"
                  f"{esc(format_curves_table(list(curves.values())))}</pre></details>"]
    return Section("Loss by token position", parts)


def attention_section(runs: Sequence, labels: dict, tracking_uri: str | None, tmp: Path) -> Section | None:
    """Fig. 10 for every run that logged attention maps: rows = layers, columns = consecutive segment pairs."""
    from ..evaluate.attention_maps import load_attention_maps, plot_attention_maps

    parts = []
    for k, r in enumerate(runs):
        loaded = load_attention_maps(r.info.run_id, tracking_uri)
        if loaded is None:
            continue
        maps, meta = loaded
        name = labels[r.info.run_id]
        png = plot_attention_maps(maps, tmp / f"attention_{k:02d}.png", segment_length=meta.get("segment_length"),
                                  title=f"{name}: pre-softmax attention scores, mean over heads, min-max scaled")
        what = meta.get("input", "")
        parts += [f"<h3>{esc(name)}</h3>", image_html(png, f"attention maps {name}", what or None)]
    if not parts:
        return None
    return Section("Attention between consecutive segments", [
        "<p class='note'>Queries of segment s (rows) against the keys of the layer's memory, its own output for "
        "segment s-1 (left of the white line), and of segment s itself (right; causal, so the upper-right triangle "
        "is empty).</p>", *parts])

