"""One self-contained HTML report of MLflow runs (pictures inlined), logged back to MLflow.

    python dashboards/report.py                                   # the curriculum `python workloads/curriculum.py` just ran
    python dashboards/report.py --attention                       # + Fig. 10 attention maps from its stages' checkpoints
    python dashboards/report.py --tracking-uri sqlite:////abs/runs/mlflow.db --experiment summarization --all
    python dashboards/report.py --experiment condensation --runs passkey-cpu,passkey-cpu-2 --out runs/compare.html
    python dashboards/report.py --experiment benchmark --all --no-log
    python dashboards/report.py --attention --screenshot docs/img/report_example.png    # the README's picture

Which runs: --runs (ids, or run names in --experiment) with their nested runs; --all: every run of the experiment;
neither: the experiment's newest top-level run (a curriculum parent if there is one) with its nested runs. The
defaults are the default curriculum's store (`sqlite:///<absolute path of ./runs>/mlflow.db`) and experiment; a store
that does not exist is an error, never created. The page goes to --out (default runs/report/<name>.html) and, unless
--no-log, into MLflow: under `report/` of the runs' one top-level run, else of a new run named `report`.
--attention first computes attention maps for runs with an exported checkpoint (tag `hf_path`) and logs them into
those runs (condensation.report.add_attention_maps), so the report, like every section, reads them from MLflow.
--screenshot also saves the page as the system's headless Chromium draws it (condensation.report.browser; needs
`chromium` and the `playwright` package of the test extra).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from condensation.report import add_attention_maps, build_report, log_report, select_runs


def default_store() -> tuple[str, str]:
    """(tracking URI, experiment) of the default curriculum run from the current directory, as the workload
    resolves them."""
    from condensation.config import resolve
    from condensation.curriculum import default_preset, stage_train_config
    from condensation.train.tracking import tracking_uri

    train = resolve(stage_train_config(default_preset(), 0))  # the base config alone need not validate
    return tracking_uri(train), train.tracking.experiment


def ints(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    uri, experiment = default_store()
    ap.add_argument("--tracking-uri", default=uri, help=f"MLflow tracking URI (default: {uri})")
    ap.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default: {experiment})")
    ap.add_argument("--runs", default="", help="comma-separated run ids or names (default: the newest top-level run)")
    ap.add_argument("--all", action="store_true", help="every run of the experiment")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", default=None, help="the HTML file (default: runs/report/<name>.html)")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    ap.add_argument("--attention", action="store_true", help="compute attention maps of runs with a checkpoint first")
    ap.add_argument("--attention-layers", default=None, help="e.g. 0,7,15 (default: first, middle, last)")
    ap.add_argument("--attention-segments", default=None, help="segments s, each shown against s-1 (default: 3 spread)")
    ap.add_argument("--attention-device", default="auto", help="where the checkpoints run: auto (a GPU if any), cpu, cuda")
    ap.add_argument("--screenshot", default=None, help="also save the page as a PNG, drawn by headless Chromium")
    args = ap.parse_args(argv)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per artifact read otherwise
    from mlflow.tracking import MlflowClient

    if args.tracking_uri.startswith("sqlite:///"):  # MlflowClient would create an empty store there
        db = Path(args.tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise SystemExit(f"no MLflow store at {db}: run `python workloads/curriculum.py` first, or pass --tracking-uri")
    client = MlflowClient(args.tracking_uri)
    try:
        runs = select_runs(client, args.experiment, [r for r in args.runs.split(",") if r], all_runs=args.all)
    except ValueError as e:
        raise SystemExit(f"report: {e}") from None
    if args.attention:
        import torch

        device = args.attention_device if args.attention_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        for run in runs:
            if add_attention_maps(client, run, ints(args.attention_layers), ints(args.attention_segments),
                                  device=device, force=True):
                print(f"attention maps logged into {run.info.run_name} ({run.info.run_id})")
    report = build_report(client, runs, title=args.title)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", runs[0].info.run_name or runs[0].info.run_id) + ("-all" if args.all else "")
    path = report.write(args.out or Path("runs") / "report" / f"{name}.html")
    print(f"{len(runs)} run(s), {len(report.sections)} sections, {report.images} pictures -> {path}")
    if not args.no_log:
        run_id = log_report(client, path, runs)
        print(f"logged to MLflow run {run_id} under report/{path.name}")
    if args.screenshot:
        from condensation.report.browser import screenshot

        print(f"screenshot -> {screenshot(path, args.screenshot)}")
    return path


if __name__ == "__main__":
    main()
