"""Reports built from MLflow runs: one self-contained HTML page (pictures inlined as base64 PNG) of an experiment's
runs or of chosen runs, logged back to MLflow. `dashboards/report.py` is the command; this is the library.

    from mlflow.tracking import MlflowClient
    from condensation.report import build_report, log_report, select_runs
    client = MlflowClient("sqlite:////abs/runs/mlflow.db")
    runs = select_runs(client, "condensation")                 # the newest curriculum and its stages
    report = build_report(client, runs, title="passkey-cpu")
    path = report.write("runs/report.html")
    log_report(client, path, runs)                             # into the parent run, under report/

Sections (each only when some run holds its data; `condensation.report.sections` lists where each comes from):
the runs table (params that differ, key metrics), training loss, passkey heat maps across runs and stages (Fig. 8),
ROUGE by input length (Table II, Fig. 9, 11, 12), memory and speed by length (Fig. 5-7), loss by token position,
and attention maps between consecutive segments (Fig. 10), which `add_attention_maps` computes from a run's
exported checkpoint (tag `hf_path`) and logs into the run first.
"""

from __future__ import annotations

import datetime
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .page import Section, render_page
from .runs import PARENT_TAG, REPORT_TAG, comparison_table, run_label, select_runs, with_descendants
from .sections import (
    attention_section,
    benchmark_section,
    long_context_section,
    passkey_section,
    rouge_section,
    runs_section,
    training_section,
)

__all__ = ["Report", "Section", "add_attention_maps", "build_report", "comparison_table", "log_report", "run_label",
           "select_runs", "with_descendants"]


@dataclass
class Report:
    title: str
    html: str
    sections: list[Section]
    run_ids: list[str]

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html, encoding="utf-8")
        return path

    @property
    def images(self) -> int:
        return sum(s.images for s in self.sections)


def build_report(client, runs: Sequence, title: str | None = None) -> Report:
    """Every section whose data the runs hold, in a fixed order, on one page."""
    if not runs:
        raise ValueError("build_report: no runs")
    uri = client.tracking_uri
    labels = {r.info.run_id: run_label(r, runs) for r in runs}
    with tempfile.TemporaryDirectory() as tmp:  # the pictures are drawn to files, then inlined
        t = Path(tmp)
        sections = [runs_section(runs)] + [s for s in (
            training_section(client, runs, labels, t),
            passkey_section(client, runs, labels, uri, t),
            rouge_section(client, runs, labels, t),
            benchmark_section(client, runs, labels, t),
            long_context_section(client, runs, labels, uri, t),
            attention_section(runs, labels, uri, t),
        ) if s is not None]
        experiments = sorted({client.get_experiment(r.info.experiment_id).name for r in runs})
        title = title or f"{', '.join(experiments)}: {labels[runs[0].info.run_id]}"
        subtitle = (f"{len(runs)} run(s) of experiment {', '.join(experiments)} at {uri}; made "
                    f"{datetime.datetime.now():%Y-%m-%d %H:%M} by condensation.report")
        html = render_page(title, subtitle, sections)
    return Report(title, html, sections, [r.info.run_id for r in runs])


def log_report(client, path: str | Path, runs: Sequence, artifact_dir: str = "report") -> str:
    """Store the report in MLflow and return the run that holds it: the runs' one top-level run when they have a
    single root (a curriculum's parent), else a new run `report` (tag `condensation.report`, param `runs`) in the
    first run's experiment, which `select_runs` never reports on."""
    ids = {r.info.run_id for r in runs}
    roots = [r for r in runs if r.data.tags.get(PARENT_TAG) not in ids]
    if len(roots) == 1:
        run_id = roots[0].info.run_id
    else:
        run = client.create_run(runs[0].info.experiment_id, run_name="report", tags={REPORT_TAG: "true"})
        run_id = run.info.run_id
        client.log_param(run_id, "runs", ",".join(r.info.run_id for r in roots)[:6000])
        client.set_terminated(run_id)
    client.log_artifact(run_id, str(path), artifact_dir)
    return run_id


def add_attention_maps(client, run, layers: Sequence[int] | None = None, segments: Sequence[int] | None = None,
                       total_tokens: int | None = None, device: str = "cpu", force: bool = False) -> bool:
    """Compute Fig. 10's maps for a run with an exported checkpoint (tag `hf_path`, a folder that still exists) and
    log them into it (`evaluate.attention_maps.log_attention_maps`); False when the run has no checkpoint here or
    already has maps (unless force). The input is a passkey prompt of the run's training length (param
    `data.seq_len`; at least 2 segments), needle at half depth, in the run's tokenizer (param `data.tokenizer`).
    Default layers: first, middle and last; default segments: up to three pairs (s-1, s) spread over the input."""
    import os

    import torch

    from ..data.passkey import passkey_example
    from ..evaluate.attention_maps import attention_scores, head_mean_maps, load_attention_maps, log_attention_maps
    from ..modeling import CondensationForCausalLM
    from ..tokenizer import load_tokenizer

    path = run.data.tags.get("hf_path")
    if not path or not os.path.isdir(path):
        return False
    uri = client.tracking_uri
    if not force and load_attention_maps(run.info.run_id, uri) is not None:
        return False
    model = CondensationForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    cfg, l = model.config, model.config.segment_length
    tok_name = run.data.params.get("data.tokenizer")
    tokenizer = load_tokenizer(None if tok_name in (None, "None", "") else tok_name)
    total = total_tokens or max(int(run.data.params.get("data.seq_len", 0) or 0), 2 * l)
    ids = torch.as_tensor(passkey_example(tokenizer, total, 0.5, 73914, train=False)["input_ids"])[None].to(device)
    n_seg = -(-ids.shape[1] // l)
    if n_seg < 2:
        raise ValueError(f"add_attention_maps: {ids.shape[1]} prompt tokens are one segment of {l}: nothing to compare")
    n = cfg.num_hidden_layers
    layers = list(layers) if layers is not None else sorted({0, n // 2, n - 1})
    if segments is None:  # up to three pairs, the first and the last among them
        segments = sorted({1, n_seg // 2, n_seg - 1})
    maps = head_mean_maps(attention_scores(model, ids, layers, list(segments)))
    log_attention_maps(maps, run_id=run.info.run_id, tracking_uri=uri, segment_length=l,
                       meta={"input": f"passkey prompt of {ids.shape[1]} tokens (needle at depth 0.5), "
                                      f"checkpoint {path}", "tokens": int(ids.shape[1]), "hf_path": path})
    return True
