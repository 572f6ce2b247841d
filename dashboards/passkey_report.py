"""Passkey curriculum report from MLflow: each stage's Fig. 8 heat map and a stage x length summary, one HTML page.

    .venv/bin/python dashboards/passkey_report.py          # the curriculum `python workloads/curriculum.py` just ran
    .venv/bin/python dashboards/passkey_report.py --tracking-uri sqlite:////abs/runs/mlflow.db \\
        --experiment condensation [--parent-run RUN_ID] [--out runs/passkey_report] [--log-to-parent]

Then open runs/passkey_report/index.html. The defaults are the default curriculum's: its store
(`sqlite:///<absolute path of ./runs>/mlflow.db`) and experiment; a store that does not exist is an error, never
created. Without --parent-run the newest curriculum run of the experiment is used (top level, tagged `curriculum`;
else the newest top-level run).
Stages are the parent's nested runs (tag mlflow.parentRunId), oldest first, named by their `stage` tag or run
name; a stage's grid is the `passkey_grid.json` it logged with `condensation.evaluate.log_passkey_grid`
(the parent's own grids, if any, come last). --log-to-parent stores the report in the parent run under `report/`.
"""

from __future__ import annotations

import argparse
import html
from dataclasses import dataclass
from pathlib import Path

from condensation.evaluate import PasskeyGrid, load_passkey_grids, passkey_table_html, plot_passkey_heatmap, plot_stage_summary
from condensation.evaluate.passkey import length_label
from condensation.evaluate.plots import heatmap_title


def default_store() -> tuple[str, str]:
    """(tracking URI, experiment) of the default curriculum run from the current directory, as the workload
    resolves them."""
    from condensation.config import resolve
    from condensation.curriculum import default_preset, stage_train_config
    from condensation.train.tracking import tracking_uri

    train = resolve(stage_train_config(default_preset(), 0))  # the base config alone need not validate
    return tracking_uri(train), train.tracking.experiment


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for any other store)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


@dataclass
class Stage:
    name: str
    run_id: str
    grid: PasskeyGrid


def find_parent_run(client, experiment: str, parent_run: str | None):
    """The given run, or the newest top-level run of the experiment, preferring curriculum parents (tagged
    `curriculum`): the experiment may also hold runs of other workloads."""
    if parent_run:
        return client.get_run(parent_run)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment named {experiment!r}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    top = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    for run in [*(r for r in top if "curriculum" in r.data.tags), *top]:
        return run
    raise SystemExit(f"experiment {experiment!r} has no top-level run")


def collect_stages(client, parent, tracking_uri: str | None) -> list[Stage]:
    """(stage name, run id, grid) for every grid logged by the parent's children (oldest first), then the parent."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    stages = []
    for run in [*children, parent]:
        name = run.data.tags.get("stage") or run.info.run_name or run.info.run_id[:8]
        grids = load_passkey_grids(run.info.run_id, tracking_uri)
        for path, grid in sorted(grids.items()):
            label = name if len(grids) == 1 else f"{name} [{path.rsplit('/', 1)[0]}]"
            stages.append(Stage(label, run.info.run_id, grid))
    return stages


def render_report(stages: list[Stage], out_dir: str | Path, title: str = "Passkey curriculum") -> Path:
    """index.html + stage_summary.png + one heat map per stage in out_dir; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not stages:
        raise SystemExit("no passkey grids found in these runs")
    # stage names must be unique keys of the summary
    names = [s.name if [t.name for t in stages].count(s.name) == 1 else f"{s.name} ({s.run_id[:6]})" for s in stages]
    plot_stage_summary({n: s.grid for n, s in zip(names, stages)}, out / "stage_summary.png")
    lengths = sorted({n for s in stages for n in s.grid.lengths})
    head = "<tr><th>stage</th><th>trained</th>" + "".join(f"<th>{length_label(n)}</th>" for n in lengths) + "</tr>"
    rows, sections = [], []
    for i, (name, stage) in enumerate(zip(names, stages)):
        summary, trained = stage.grid.summary(), stage.grid.meta.get("trained_length")
        cells = "".join(
            f"<td>{summary[n]['exact']:.2f} / {summary[n]['digit']:.2f}</td>" if n in summary and summary[n]["count"] else "<td>-</td>"
            for n in lengths
        )
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{length_label(trained) if trained else '-'}</td>{cells}</tr>")
        png = plot_passkey_heatmap(stage.grid, out / f"stage_{i:02d}.png", title=f"{name}: {heatmap_title(stage.grid)}")
        sections.append(f"<h2>{html.escape(name)}</h2><p>run <code>{stage.run_id}</code></p>"
                        f'<img src="{png.name}" alt="heat map {html.escape(name)}"><br>{passkey_table_html(stage.grid)}')
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Mean over depths, exact / per digit.</p>"
            f'<table border="1" style="border-collapse:collapse">{head}{"".join(rows)}</table>'
            f'<img src="stage_summary.png" alt="stage summary">{"".join(sections)}</body></html>')
    index = out / "index.html"
    index.write_text(page)
    return index


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    uri, experiment = default_store()
    ap.add_argument("--tracking-uri", default=uri, help=f"MLflow tracking URI (default: the default curriculum's, {uri})")
    ap.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default: {experiment})")
    ap.add_argument("--parent-run", default=None, help="run id of the curriculum's parent run (default: newest)")
    ap.add_argument("--out", default="runs/passkey_report")
    ap.add_argument("--log-to-parent", action="store_true", help="also log the report to the parent run (report/)")
    args = ap.parse_args(argv)

    from mlflow.tracking import MlflowClient

    db = sqlite_path(args.tracking_uri)
    if db is not None and not db.is_file():  # MlflowClient would create an empty store there
        raise SystemExit(f"no MLflow store at {db}: run `python workloads/curriculum.py` first, or pass --tracking-uri")
    client = MlflowClient(args.tracking_uri)
    parent = find_parent_run(client, args.experiment, args.parent_run)
    stages = collect_stages(client, parent, args.tracking_uri)
    index = render_report(stages, args.out, title=f"Passkey curriculum: {parent.info.run_name or parent.info.run_id}")
    if args.log_to_parent:
        client.log_artifacts(parent.info.run_id, str(index.parent), "report")
    print(f"{len(stages)} stage(s) -> {index}")
    return index


if __name__ == "__main__":
    main()
