"""Which MLflow runs a report covers, and the table that compares them (params that differ, key metrics).

Runs come from `MlflowClient.search_runs` (the client form of `mlflow.search_runs`, without setting the process's
global tracking URI). A chosen run always brings its nested runs (tag `mlflow.parentRunId`, any depth): a
curriculum's parent and its stages, a summarization comparison and its models. Runs that are themselves reports
(tag `condensation.report`) are never reported on.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence

REPORT_TAG = "condensation.report"
PARENT_TAG = "mlflow.parentRunId"


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return [r for r in out if REPORT_TAG not in r.data.tags]


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment {name!r}; there are: {names}")
    return exp.experiment_id


def with_descendants(client, runs: Sequence) -> list:
    """The runs and every run nested under them, each parent followed by its children (oldest first)."""
    by_exp: dict[str, list] = {}
    for r in runs:
        if r.info.experiment_id not in by_exp:
            by_exp[r.info.experiment_id] = _search(client, [r.info.experiment_id])
    children: dict[str, list] = {}
    for exp_runs in by_exp.values():
        for r in exp_runs:
            pid = r.data.tags.get(PARENT_TAG)
            if pid:
                children.setdefault(pid, []).append(r)
    out, seen = [], set()

    def visit(r) -> None:
        if r.info.run_id in seen:
            return
        seen.add(r.info.run_id)
        out.append(r)
        for c in children.get(r.info.run_id, []):
            visit(c)

    for r in runs:
        visit(r)
    return out


def select_runs(client, experiment: str | None = None, run_ids: Sequence[str] = (), all_runs: bool = False) -> list:
    """The runs of a report.
    - run_ids: these runs (ids, or run names in `experiment`) with their nested runs, in the given order;
    - all_runs: every run of the experiment;
    - neither: the experiment's newest top-level run (preferring a curriculum parent, tagged `curriculum`) with its
      nested runs: "the run I just made"."""
    if run_ids:
        exp_id = experiment_id(client, experiment) if experiment else None
        chosen = []
        for key in run_ids:
            run = None
            if re.fullmatch(r"[0-9a-f]{32}", key):
                run = client.get_run(key)
            elif exp_id is not None:
                named = [r for r in _search(client, [exp_id]) if r.info.run_name == key]
                run = named[-1] if named else None  # the newest of that name
            if run is None:
                raise ValueError(f"no run {key!r}" + (f" in experiment {experiment!r}" if experiment else
                                                        " (give a run id, or --experiment to find it by name)"))
            chosen.append(run)
        return with_descendants(client, chosen)
    if not experiment:
        raise ValueError("select_runs: give an experiment or run ids")
    runs = _search(client, [experiment_id(client, experiment)])
    if all_runs:
        return with_descendants(client, [r for r in runs if PARENT_TAG not in r.data.tags])
    top = [r for r in runs if PARENT_TAG not in r.data.tags]
    if not top:
        raise ValueError(f"experiment {experiment!r} has no runs")
    curricula = [r for r in top if "curriculum" in r.data.tags]
    return with_descendants(client, [(curricula or top)[-1]])


def run_label(run, runs: Sequence) -> str:
    """The run name (a curriculum's stage runs are named after their stage), with the start of the run id when two
    runs share it."""
    name = run.info.run_name or run.info.run_id[:8]
    twins = [r for r in runs if (r.info.run_name or r.info.run_id[:8]) == name]
    return name if len(twins) <= 1 else f"{name} ({run.info.run_id[:6]})"


# metrics shown first in the comparison table, in this order (regular expressions on the metric name)
KEY_METRICS = (r"loss", r"passkey/exact/mean", r"passkey/exact/len_\d+/mean", r"passkey/digit/mean",
               r"rouge/overall/rouge(1|2|L)", r"lc/[^/]+/len_\d+/ppl", r".*tokens_per_s", r"peak_memory_gib",
               r".*/peak_gib", r"mfu", r"step_time_s")
# per-cell, per-bin and system metrics would make the table unreadably wide: their pictures are below it
HIDDEN_METRICS = (r"system/.*", r"segment_loss_\d+", r".*/depth_[^/]+", r"lc/.*/(loss|ppl_range)", r"rouge/.*/count",
                  r"rouge/[^o].*")


def comparison_table(runs: Sequence, max_params: int = 40, max_metrics: int = 24) -> tuple[list[str], list[list], list[str]]:
    """(header, rows, notes) of the runs table: name, status, parent, start, minutes, then the params whose values
    differ between the runs that have them (all params when there is one run: a parent run and its stages log
    different params, and a param only one of them has is no difference), then the last value of the key metrics.
    Notes say what was left out (the other params with their one value, the number of hidden metrics)."""
    labels = {r.info.run_id: run_label(r, runs) for r in runs}
    keys = sorted({k for r in runs for k in r.data.params})
    values = {k: [r.data.params[k] for r in runs if k in r.data.params] for k in keys}
    differ = [k for k in keys if len(runs) == 1 or len(set(values[k])) > 1]
    same = [k for k in keys if k not in differ]
    notes = []
    if same:
        shown = ", ".join(f"{k}={values[k][0]}" for k in same[:40])
        notes.append(f"{len(same)} params with one value in the runs that have them: {shown}"
                     f"{' ...' if len(same) > 40 else ''}")
    if len(differ) > max_params:
        notes.append(f"{len(differ) - max_params} more differing params not shown: {', '.join(differ[max_params:])}")
        differ = differ[:max_params]

    names = sorted({k for r in runs for k in r.data.metrics})
    visible = [m for m in names if not any(re.fullmatch(p, m) for p in HIDDEN_METRICS)]
    ranked = sorted(visible, key=lambda m: (next((i for i, p in enumerate(KEY_METRICS) if re.fullmatch(p, m)),
                                                 len(KEY_METRICS)), m))
    metrics = ranked[:max_metrics]
    if len(names) > len(metrics):
        notes.append(f"{len(names) - len(metrics)} metrics not in the table (per cell, per bin, system, or past "
                     f"{max_metrics} columns)")
    header = ["run", "status", "parent", "started", "min", *differ, *metrics]
    rows = []
    for r in runs:
        pid = r.data.tags.get(PARENT_TAG)
        start = datetime.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M") if r.info.start_time else ""
        minutes = (r.info.end_time - r.info.start_time) / 60000 if r.info.end_time and r.info.start_time else float("nan")
        rows.append([labels[r.info.run_id], r.info.status, labels.get(pid, pid[:8] if pid else ""), start, minutes,
                     *(r.data.params.get(k, "") for k in differ),
                     *(r.data.metrics.get(m, float("nan")) for m in metrics)])
    return header, rows, notes
