"""MLflow conventions for evaluation results, shared by the training loop (which logs) and `dashboards/` (which
reads), so both agree on names: a passkey grid is logged as metrics (`PasskeyGrid.to_metrics`), as JSON at
`<artifact_dir>/passkey_grid.json` and as the Fig. 8 picture at `<artifact_dir>/passkey_heatmap.png`. Long-context
loss curves are logged as metrics under `lc/<model>/len_<L>/` (`loss_curve_metrics`), as JSON at
`long_context/loss_curves.json` and as one picture per window length, `long_context/loss_by_position_len_<L>.png`.
ROUGE by input length: one run per summarization model, tagged `summarize.model`, with metrics `rouge/<bucket>/<type>`,
`summaries/rouge.json`, `summaries/rouge_table.md` and `summaries/predictions.jsonl`; the comparison's parent run
holds Table II (`summaries/rouge_table.md`) and the pictures `summaries/rouge_overall.png` (Fig. 9) and
`summaries/rouge_by_length.png`.

mlflow is imported inside the functions: importing `condensation.evaluate` must not need a tracking setup.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .long_context import LossCurve, slug
from .passkey import PasskeyGrid

GRID_ARTIFACT = "passkey_grid.json"
HEATMAP_ARTIFACT = "passkey_heatmap.png"
DEFAULT_ARTIFACT_DIR = "passkey"
CURVES_ARTIFACT = "loss_curves.json"
LONG_CONTEXT_DIR = "long_context"


def log_passkey_grid(
    grid: PasskeyGrid,
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    step: int | None = None,
    artifact_dir: str = DEFAULT_ARTIFACT_DIR,
    trained_length: int | None = None,
    plot: bool = True,
    metric_prefix: str = "passkey",
) -> None:
    """Log a grid into an MLflow run: metrics, the JSON (what `dashboards/passkey_report.py` collects) and, with
    plot=True, the Fig. 8 heat map. The run is `run_id` (through an `MlflowClient`, as the trainer logs from rank
    0), else the active fluent run. trained_length is stored in the grid's meta so the report can mark it."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_passkey_grid: no run_id given and no active MLflow run")
        run_id = active.info.run_id
    client = MlflowClient(tracking_uri)
    if trained_length is not None:
        grid.meta["trained_length"] = int(trained_length)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step or 0) for k, v in grid.to_metrics(metric_prefix).items()]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.log_text(run_id, grid.to_json(), f"{artifact_dir}/{GRID_ARTIFACT}")
    if plot:
        from .plots import plot_passkey_heatmap

        with tempfile.TemporaryDirectory() as tmp:
            png = plot_passkey_heatmap(grid, Path(tmp) / HEATMAP_ARTIFACT)
            client.log_artifact(run_id, str(png), artifact_dir)


def load_passkey_grids(run_id: str, tracking_uri: str | None = None) -> dict[str, PasskeyGrid]:
    """Every passkey grid logged in one run, keyed by artifact path (a run may hold several, e.g. per step)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found: dict[str, PasskeyGrid] = {}

    def walk(path: str | None) -> None:
        for info in client.list_artifacts(run_id, path):
            if info.is_dir:
                walk(info.path)
            elif info.path.rsplit("/", 1)[-1] == GRID_ARTIFACT:
                with tempfile.TemporaryDirectory() as tmp:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=info.path, dst_path=tmp, tracking_uri=tracking_uri)
                    text = Path(local).read_text()
                found[info.path] = PasskeyGrid.from_json(text)

    walk(None)
    return found


def loss_curve_prefix(curve: LossCurve) -> str:
    """`lc/<slug of the curve's name>/len_<length>`: e.g. `lc/condensation-l512/len_65536`."""
    return f"lc/{slug(curve.name)}/len_{curve.length}"


def loss_curve_metrics(curve: LossCurve) -> list[tuple[str, float, int]]:
    """(name, value, step) of one curve's metrics, under `loss_curve_prefix(curve)`:
    `/loss` at step = each bin's first position (MLflow charts it against the step: the curve itself);
    `/ppl_range` at step = the end of each octave of positions (`LossCurve.ranges`): perplexity over [end/2, end);
    `/loss_mean`, `/ppl`: the whole window; `/ppl_2k`: positions [0, 2048), in windows of at least 2048 tokens
    whose bins fit 2048 (the context every model sees in full: a sanity check that they agree)."""
    p = loss_curve_prefix(curve)
    out = [(f"{p}/loss", v, s) for v, s, c in zip(curve.bin_loss, curve.bin_starts, curve.bin_count) if c]
    out += [(f"{p}/ppl_range", r["ppl"], r["hi"]) for r in curve.ranges() if r["ppl"] == r["ppl"]]
    out += [(f"{p}/loss_mean", curve.loss, 0), (f"{p}/ppl", curve.ppl, 0)]
    if curve.length >= 2048 and (2048 % curve.bin_tokens == 0 or curve.length == 2048):
        out.append((f"{p}/ppl_2k", curve.perplexity(0, 2048), 0))
    return out


def log_loss_curves(
    curves: Sequence[LossCurve],
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    artifact_dir: str = LONG_CONTEXT_DIR,
    metrics: bool = True,
    plot: bool = True,
    trained_length: int | None = None,
    title: str | None = None,
) -> None:
    """Log loss curves into an MLflow run (`run_id`, else the active fluent run): each curve's metrics
    (`loss_curve_metrics`), all curves as one JSON list at `<artifact_dir>/loss_curves.json`, and with plot=True
    one comparison picture per window length, `<artifact_dir>/loss_by_position_len_<L>.png` (the dashed line at
    `trained_length`). metrics=False logs only the artifacts (e.g. a parent run over per-model runs)."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    curves = list(curves)
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_loss_curves: no run_id given and no active MLflow run")
        run_id = active.info.run_id
    prefixes = [loss_curve_prefix(c) for c in curves]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"two curves would log under the same metric names: {prefixes}; give them distinct names")
    client = MlflowClient(tracking_uri)
    if metrics:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(s)) for c in curves for k, v, s in loss_curve_metrics(c)]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=batch[i : i + 1000])
    client.log_text(run_id, json.dumps([c.to_dict() for c in curves], indent=1), f"{artifact_dir}/{CURVES_ARTIFACT}")
    if plot:
        from .plots import plot_loss_by_position

        with tempfile.TemporaryDirectory() as tmp:
            for length in sorted({c.length for c in curves}):
                png = plot_loss_by_position([c for c in curves if c.length == length],
                                            Path(tmp) / f"loss_by_position_len_{length}.png",
                                            trained_length=trained_length, title=title)
                client.log_artifact(run_id, str(png), artifact_dir)


# ----------------------------------------------------------------------------------------------------------------
# ROUGE by input length (Table II, Fig. 9): one run per model, a comparison on the parent run

ROUGE_DIR = "summaries"
ROUGE_JSON = "rouge.json"
ROUGE_TABLE = "rouge_table.md"
PREDICTIONS_ARTIFACT = "predictions.jsonl"
ROUGE_BARS = "rouge_by_length.png"
ROUGE_OVERALL = "rouge_overall.png"
MODEL_TAG = "summarize.model"  # which of the compared models a run is (condensation, full_finetuned, ...)
LABEL_TAG = "summarize.label"  # its name in tables and pictures


def _run_id(run_id: str | None, what: str) -> str:
    import mlflow

    if run_id is not None:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise RuntimeError(f"{what}: no run_id given and no active MLflow run")
    return active.info.run_id


def log_rouge(
    result: dict,
    *,
    label: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    predictions_path: str | Path | None = None,
    step: int = 0,
    prefix: str = "rouge",
    artifact_dir: str = ROUGE_DIR,
) -> None:
    """One model's `rouge_by_length` result into its run: metrics `rouge/overall/rouge1`, `rouge/len_0-512/rouge2`,
    ..., `rouge/len_1024-inf/count` (`rouge_metrics`), `<artifact_dir>/rouge.json`, `<artifact_dir>/rouge_table.md`
    (Table II's rows for this model), the predictions file beside them, and the tag `summarize.label`."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from .rouge import format_rouge_table, rouge_metrics

    run_id = _run_id(run_id, "log_rouge")
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in rouge_metrics(result, prefix).items()])
    client.log_text(run_id, json.dumps({"label": label, "rouge": _nan_to_none(result)}, indent=1),
                    f"{artifact_dir}/{ROUGE_JSON}")
    client.log_text(run_id, format_rouge_table({label: result}) + "\n", f"{artifact_dir}/{ROUGE_TABLE}")
    client.set_tag(run_id, LABEL_TAG, label)
    if predictions_path is not None:
        client.log_artifact(run_id, str(predictions_path), artifact_dir)


def _nan_to_none(result: dict) -> dict:
    return {b: {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for b, row in result.items()}


def log_rouge_comparison(
    results: dict[str, dict],
    *,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    title: str | None = None,
    artifact_dir: str = ROUGE_DIR,
    metrics: bool = True,
) -> None:
    """Several models' results into one (parent) run: metrics `rouge/<slug(model)>/<bucket>/<type>`, all results in
    `<artifact_dir>/rouge.json`, Table II as `<artifact_dir>/rouge_table.md`, Fig. 9 (grouped bars of the overall
    scores per metric and model) as `rouge_overall.png` and the scores by input length as `rouge_by_length.png`."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from .plots import plot_rouge_by_length, plot_rouge_overall
    from .rouge import format_rouge_table, rouge_metrics

    run_id = _run_id(run_id, "log_rouge_comparison")
    client = MlflowClient(tracking_uri)
    if metrics:
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for name, res in results.items()
                 for k, v in rouge_metrics(res, f"rouge/{slug(name)}").items()]
        for i in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[i : i + 1000])
    client.log_text(run_id, json.dumps({n: _nan_to_none(r) for n, r in results.items()}, indent=1),
                    f"{artifact_dir}/{ROUGE_JSON}")
    table = format_rouge_table(results)
    client.log_text(run_id, (f"{title}\n\n" if title else "") + table + "\n", f"{artifact_dir}/{ROUGE_TABLE}")
    with tempfile.TemporaryDirectory() as tmp:
        for png in (plot_rouge_overall(results, Path(tmp) / ROUGE_OVERALL, title=title),
                    plot_rouge_by_length(results, Path(tmp) / ROUGE_BARS, title=title)):
            client.log_artifact(run_id, str(png), artifact_dir)


def load_rouge_runs(tracking_uri: str | None, experiment: str, parent: str | None = None) -> list[dict]:
    """Every run of `experiment` that holds a model's ROUGE (the tag `summarize.model` and `rouge/overall/*`
    metrics), oldest first: dicts with run_id, run_name, model, label, parent_run_id, parent_name, status and
    `result` (the `rouge_by_length` shape, rebuilt from the metrics). `parent`: only the runs under the parent run
    of that name or id. An unknown experiment raises ValueError naming the ones there are."""
    from mlflow.tracking import MlflowClient

    from .rouge import rouge_from_metrics

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r} at {tracking_uri}; there are: {names}")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{MODEL_TAG}` != ''",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    names: dict[str, str] = {}
    out = []
    for r in runs:
        result = rouge_from_metrics(r.data.metrics)
        if "overall" not in result:
            continue
        pid = r.data.tags.get("mlflow.parentRunId")
        if pid and pid not in names:
            try:
                names[pid] = client.get_run(pid).info.run_name
            except Exception:  # a deleted parent: the child still counts
                names[pid] = pid
        if parent is not None and parent not in (pid, names.get(pid)):
            continue
        out.append({"run_id": r.info.run_id, "run_name": r.info.run_name, "model": r.data.tags[MODEL_TAG],
                    "label": r.data.tags.get(LABEL_TAG, r.data.tags[MODEL_TAG]), "parent_run_id": pid,
                    "parent_name": names.get(pid), "status": r.info.status, "result": result})
    return out
