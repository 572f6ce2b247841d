"""Long-context evaluation of any checkpoint: next-token loss by token position over held-out text, for the base model
with full attention and for Condensation at each segment length, with an optional passkey grid; tracked in MLflow.

    python workloads/evaluate.py model=smollm2-135m-instruct text=data/corpus/heldout.jsonl segment_lengths=[512,1024]
    python workloads/evaluate.py model=runs/<stage run>/checkpoint_.../hf text=heldout.jsonl lengths=[4096,16384] n=4
    python workloads/evaluate.py --config my_eval.yaml passkey.lengths=[2048,8192] passkey.n_per_cell=10
    python workloads/evaluate.py model=smollm2-135m-instruct text=heldout.jsonl lengths=[2048] n=2 device=cpu

model: a HF folder (a Llama or a Condensation checkpoint), a hub id, or a `condensation.pretrained` name. Each
window of `lengths` tokens of the held-out text (a .jsonl file or folder, one document a row in `text`) goes through
the base model as a plain `LlamaForCausalLM` (sdpa, full attention; `baseline=false` skips it, and it is skipped for
windows over `baseline_max_tokens`) and through `CondensationForCausalLM` at each of `segment_lengths` (none given:
the checkpoint's own). Printed: one line per model and length, the perplexity table by position, the passkey tables.
Written to `<out>/long-context/<run name>/`: evaluation.json (config, windows, curves, grids), one picture per length
(loss_by_position_len_<L>.png) and the passkey heat maps. MLflow (`sqlite:///<out>/mlflow.db` by default): a parent
run with every curve and the pictures, one nested run per model with its curves and passkey grid; then
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

Config: defaults <- `--config file.yaml` <- `key.sub=value` overrides (values are YAML: `lengths=[4096,65536]`). A
bad field is one line `config error: <field>: <why>` (exit 2) before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condensation.config import ConfigError, job_storage_base, load_yaml, merge, parse_overrides, to_yaml


@dataclass
class PasskeyEvalConfig:
    """A passkey accuracy grid per model (greedy `generate`, exact match of the digits); skipped when `lengths` is
    empty.

    lengths: total prompt lengths in tokens (e.g. [2048, 8192, 32768]); depths: needle depths in [0, 1].
    n_per_cell: prompts per (length, depth) cell; batch_size: prompts per generate call; seed: the passkeys.
    """

    lengths: list = field(default_factory=list)
    depths: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    n_per_cell: int = 5
    batch_size: int = 8
    seed: int = 0


@dataclass
class EvalTrackingConfig:
    """MLflow: a parent run per evaluation, one nested run per model.

    enabled: log to MLflow (the JSON and pictures are written to `out` either way).
    tracking_uri: MLflow tracking URI; None = `sqlite:///<out>/mlflow.db` (the training workloads' default store).
    experiment: MLflow experiment name.
    run_name: the parent run's name and the results folder's name; None = `lc-<label>`.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "long-context"
    run_name: str | None = None


@dataclass
class EvaluateConfig:
    """One long-context evaluation of one checkpoint.

    model: a HF folder (Llama or Condensation checkpoint), a hub id, or a `condensation.pretrained` name.
    label: the model's name in tables and pictures; None = the folder's or name's last part.
    tokenizer: a tokenizer for `condensation.tokenizer.load_tokenizer` ("builtin", a folder, a hub id, a
        pretrained name); None = the model's own.
    text: held-out text: a .jsonl file or folder, one document a row (required).
    text_field: the field holding a row's text.
    lengths: window lengths in tokens; each gives one loss curve per model.
    n: windows per length (`token_windows`: whole documents preferred, else documents concatenated with eos).
    seed: which documents / windows are taken.
    bin_tokens: positions per bin of the curve.
    batch_size: windows per forward pass.
    segment_lengths: evaluate Condensation at each of these segment lengths; [] = the checkpoint's own (512 for a
        Llama checkpoint).
    condensation_overrides: further `CondensationConfig` fields for the Condensation models (e.g.
        `segment_attention: flash`, `compile_cells: true` on a GPU); a checkpoint's saved values otherwise.
    baseline: also evaluate the model as a plain `LlamaForCausalLM` with full attention (sdpa).
    baseline_max_tokens: skip the full-attention baseline for windows and passkey prompts longer than this
        (its attention and time grow with the square of the length; on CPU keep it to a few thousand).
    trained_length: where the pictures draw the dashed "trained context" line; None = the checkpoint config's
        max_position_embeddings; 0 = no line.
    passkey: the passkey grid (off unless passkey.lengths is set).
    device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:<i>".
    dtype: "auto" (bf16 on cuda, fp32 on cpu), "bf16", "fp16" or "fp32".
    out: results go to `<out>/long-context/<run name>/`; also the default MLflow store's folder.
    tracking: MLflow.
    """

    model: str = "smollm2-135m-instruct"
    label: str | None = None
    tokenizer: str | None = None
    text: str | None = None
    text_field: str = "text"
    lengths: list = field(default_factory=lambda: [65536])
    n: int = 8
    seed: int = 0
    bin_tokens: int = 512
    batch_size: int = 1
    segment_lengths: list = field(default_factory=list)
    condensation_overrides: dict = field(default_factory=dict)
    baseline: bool = True
    baseline_max_tokens: int = 65536
    trained_length: int | None = None
    passkey: PasskeyEvalConfig = field(default_factory=PasskeyEvalConfig)
    device: str = "auto"
    dtype: str = "auto"
    out: str = "runs"
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)


# ----------------------------------------------------------------------------------------------------------------
# Config: merged, then checked field by field before anything heavy happens


def _positive_ints(values: list, key: str, minimum: int = 1) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < minimum:
            raise ConfigError(key, f"must be a list of ints >= {minimum}, got {values!r}")
        out.append(int(v))
    return out


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def check_config(cfg: EvaluateConfig) -> EvaluateConfig:
    """The config with lists of ints normalised; raises ConfigError naming the first bad field."""
    import torch

    from condensation.pretrained import MissingExtraError, check_installed, is_registered

    if not cfg.model or not cfg.model.strip():
        raise ConfigError("model", "must be a folder, hub id or condensation.pretrained name")
    if is_registered(cfg.model):
        try:
            check_installed(cfg.model)
        except MissingExtraError as e:
            raise ConfigError("model", str(e)) from None
    elif _looks_like_path(cfg.model) and not os.path.isdir(os.path.expanduser(cfg.model)):
        raise ConfigError("model", f"{cfg.model}: no such folder")
    if cfg.text is None:
        raise ConfigError("text", "required: a held-out .jsonl file or folder (one document a row), e.g. "
                                  "text=data/heldout.jsonl")
    if not os.path.exists(os.path.expanduser(cfg.text)):
        raise ConfigError("text", f"{cfg.text}: no such file or folder")
    if not cfg.lengths:
        raise ConfigError("lengths", "at least one window length is needed")
    lengths = _positive_ints(cfg.lengths, "lengths", minimum=2)
    segment_lengths = _positive_ints(cfg.segment_lengths, "segment_lengths")
    for key in ("n", "bin_tokens", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(key, f"must be positive, got {getattr(cfg, key)}")
    if cfg.baseline_max_tokens < 2:
        raise ConfigError("baseline_max_tokens", f"must be at least 2, got {cfg.baseline_max_tokens}")
    if cfg.trained_length is not None and cfg.trained_length < 0:
        raise ConfigError("trained_length", f"must be >= 0 (0: no line), got {cfg.trained_length}")
    pk = cfg.passkey
    pk_lengths = _positive_ints(pk.lengths, "passkey.lengths")
    if any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in pk.depths) or not pk.depths:
        raise ConfigError("passkey.depths", f"must be numbers in [0, 1], got {pk.depths!r}")
    for key in ("n_per_cell", "batch_size"):
        if getattr(pk, key) < 1:
            raise ConfigError(f"passkey.{key}", f"must be positive, got {getattr(pk, key)}")
    if cfg.condensation_overrides:
        from condensation import CondensationConfig

        known = {f.name for f in dataclasses.fields(CondensationConfig)}
        for k in cfg.condensation_overrides:
            if k == "segment_length":
                raise ConfigError("condensation_overrides.segment_length", "set segment_lengths=[...] instead")
            if k not in known:
                raise ConfigError(f"condensation_overrides.{k}", "not a CondensationConfig field")
        try:
            CondensationConfig(**cfg.condensation_overrides)  # its own checks (attention kernel, schedule, ...)
        except Exception as e:  # transformers' strict dataclass wraps the ValueError of validate_architecture
            raise ConfigError("condensation_overrides", str(e.__cause__ or e)) from None
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError("dtype", f"must be 'auto', 'bf16', 'fp16' or 'fp32', got {cfg.dtype!r}")
    if cfg.device != "auto":
        try:
            dev = torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {cfg.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{cfg.device!r}: torch sees no CUDA device here")
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {cfg.device!r}")
    if not cfg.out:
        raise ConfigError("out", "must not be empty")
    if not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment", "must not be empty")
    name = cfg.tracking.run_name
    if name is not None and (not name or "/" in name or name in (".", "..")):
        raise ConfigError("tracking.run_name", f"must be a plain folder name, got {name!r}")
    return dataclasses.replace(cfg, lengths=lengths, segment_lengths=segment_lengths,
                               passkey=dataclasses.replace(pk, lengths=pk_lengths, depths=[float(d) for d in pk.depths]))


def load_eval_config(yaml_path: str | None, overrides: list[str]) -> EvaluateConfig:
    cfg = EvaluateConfig()
    if yaml_path is not None:
        cfg = merge(cfg, load_yaml(yaml_path))
    return check_config(merge(cfg, parse_overrides(overrides)))


# ----------------------------------------------------------------------------------------------------------------
# Inputs (before any model loads) and the models to evaluate


@dataclass
class Inputs:
    """What every model is evaluated on: the resolved checkpoint folder and its config, the tokenizer, and per window
    length the token windows [n, length] with their `token_windows` info."""

    folder: str
    model_config: Any
    tokenizer: Any
    windows: dict
    window_info: dict


def prepare_inputs(cfg: EvaluateConfig) -> Inputs:
    """Checkpoint config, tokenizer and text windows; every mistake in them is a ConfigError naming the field, and
    no weights are read."""
    import transformers

    from condensation.evaluate import token_windows
    from condensation.pretrained import resolve_pretrained
    from condensation.tokenizer import load_tokenizer

    folder = resolve_pretrained(cfg.model)
    try:
        mcfg = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ConfigError("model", f"cannot read the config of {cfg.model!r}: {e}") from None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer if cfg.tokenizer is not None else folder)
    except OSError as e:
        raise ConfigError("tokenizer", f"{e}; set tokenizer=<folder, hub id or builtin>") from None
    if len(tokenizer) > mcfg.vocab_size:
        raise ConfigError("tokenizer", f"has {len(tokenizer)} tokens, more than the model's vocab_size "
                                       f"{mcfg.vocab_size}: is it the model's tokenizer?")
    windows, info = {}, {}
    for length in cfg.lengths:
        with warnings.catch_warnings():  # a concatenation is reported from the info, in one line
            warnings.simplefilter("ignore", UserWarning)
            try:
                windows[length], info[length] = token_windows(tokenizer, cfg.text, length, cfg.n, cfg.seed,
                                                              text_field=cfg.text_field, return_info=True)
            except (ValueError, FileNotFoundError) as e:
                raise ConfigError("text", str(e)) from None
    return Inputs(folder, mcfg, tokenizer, windows, info)


def model_plan(cfg: EvaluateConfig, mcfg, label: str) -> list[tuple[str, str, int | None]]:
    """(curve name, "baseline" or "condensation", segment length) per model. No segment lengths given: the
    checkpoint's own (a Llama folder loads with CondensationConfig's default)."""
    plan = [(f"{label} full attention", "baseline", None)] if cfg.baseline else []
    if cfg.segment_lengths:
        return plan + [(f"Condensation l={seg}", "condensation", seg) for seg in cfg.segment_lengths]
    from condensation import CondensationConfig

    own = mcfg.segment_length if mcfg.model_type == "condensation" else CondensationConfig().segment_length
    return plan + [(f"Condensation l={own}", "condensation", None)]


def resolve_device_dtype(cfg: EvaluateConfig):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else torch.device(cfg.device)
    name = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_model(folder: str, kind: str, segment_length: int | None, dtype, device, overrides: dict | None = None):
    """`kind` "baseline": the checkpoint as a plain LlamaForCausalLM with sdpa full attention (a Condensation
    checkpoint's weights keep Llama's names, so it loads as is); "condensation": CondensationForCausalLM at
    `segment_length` (None: the checkpoint's own) with `overrides` of its config."""
    from transformers import LlamaForCausalLM

    from condensation import CondensationForCausalLM

    if kind == "baseline":
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    else:
        kw = dict(overrides or {}, **({} if segment_length is None else {"segment_length": segment_length}))
        model = CondensationForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    return model.to(device).eval()


def free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# One model: its curves (one line each) and its passkey grid


def evaluate_model(model, name: str, kind: str, lengths: list[int], passkey_lengths: list[int], cfg: EvaluateConfig,
                   inputs: Inputs, device):
    """(curves, passkey grid or None) of one loaded model."""
    import torch

    from condensation.evaluate import loss_by_position, passkey_grid
    from condensation.evaluate.passkey import length_label

    curves = []
    for length in lengths:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        meta = {**{k: v for k, v in inputs.window_info[length].items() if k != "windows"}, "model": cfg.model,
                "kind": kind}
        curve = loss_by_position(model, inputs.windows[length], cfg.bin_tokens, cfg.batch_size, device, name=name,
                                 progress=sys.stderr.isatty(), meta=meta)
        seconds = time.time() - t0
        curve.meta.update(seconds=round(seconds, 2), tokens_per_s=round(cfg.n * length / seconds, 1))
        if device.type == "cuda":
            curve.meta["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        curves.append(curve)
        last = curve.ranges()[-1]
        first_2k = (f", first 2K: {curve.perplexity(0, 2048):.2f}"
                    if length > 2048 and 2048 % cfg.bin_tokens == 0 else "")
        peak = f", peak {curve.meta['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in curve.meta else ""
        print(f"{name:<36} {length_label(length):>5}: loss {curve.loss:.3f}, ppl {curve.ppl:.2f} (positions "
              f"{length_label(last['lo'])}-{length_label(last['hi'])}: {last['ppl']:.2f}{first_2k}); "
              f"{curve.meta['tokens_per_s']:.0f} tokens/s{peak}", flush=True)
    grid = None
    if passkey_lengths:
        pk = cfg.passkey
        grid = passkey_grid(model, inputs.tokenizer, passkey_lengths, pk.depths, pk.n_per_cell, pk.seed,
                            pk.batch_size, progress=sys.stderr.isatty(), meta={"model": name})
        print(f"{name}: passkey exact match\n{grid.format_table()}", flush=True)
    return curves, grid


# ----------------------------------------------------------------------------------------------------------------
# MLflow


def start_parent_run(cfg: EvaluateConfig, uri: str, run_name: str, results_dir: Path):
    """(client, parent run id), creating the experiment the first time (artifacts beside a local store)."""
    from mlflow import MlflowClient

    from condensation.config import flatten
    from condensation.train.tracking import ensure_experiment

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # after mlflow's import, which sets it to INFO
    client = MlflowClient(uri)
    artifacts = os.path.join(cfg.out, "mlartifacts") if cfg.tracking.tracking_uri is None else None
    exp = ensure_experiment(client, cfg.tracking.experiment, artifacts)
    run = client.create_run(exp, run_name=run_name, tags={"model": cfg.model, "text": cfg.text,
                                                          "results_dir": str(results_dir), "kind": "long-context"})
    params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
              for k, v in flatten(dataclasses.asdict(cfg)).items()}
    log_params(client, run.info.run_id, params)
    return client, run.info.run_id


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=items[i : i + 100])


def speed_metrics(curves) -> list:
    """tokens/s, seconds and peak GPU memory of each curve, beside its loss metrics."""
    from mlflow.entities import Metric

    from condensation.evaluate.tracking import loss_curve_prefix

    now = int(time.time() * 1000)
    return [Metric(f"{loss_curve_prefix(c)}/{key}", float(c.meta[key]), now, 0)
            for c in curves for key in ("tokens_per_s", "seconds", "peak_memory_gib") if key in c.meta]


def end_runs(client, run_ids, status: str) -> None:
    for run_id in run_ids:
        if client is not None and run_id is not None:
            try:
                client.set_terminated(run_id, status)
            except Exception:  # the store itself failing must not hide the error that got us here
                pass


# ----------------------------------------------------------------------------------------------------------------


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="a YAML file of overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    try:
        cfg = load_eval_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    # under `ray job submit` the cwd is a throw-away copy: a relative out goes under ~/condensation-runs
    base = job_storage_base(os.getcwd(), dict(os.environ), os.path.expanduser("~"))
    if base is not None and not os.path.isabs(os.path.expanduser(cfg.out)):
        cfg = dataclasses.replace(cfg, out=os.path.join(base, cfg.out))
    cfg = dataclasses.replace(cfg, out=os.path.abspath(os.path.expanduser(cfg.out)))

    import transformers

    transformers.logging.set_verbosity_error()  # "a model of type llama to instantiate condensation" is expected
    transformers.utils.logging.disable_progress_bar()
    try:
        inputs = prepare_inputs(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from condensation.evaluate import format_curves_table, log_loss_curves, log_passkey_grid
    from condensation.evaluate import plot_loss_by_position, plot_passkey_heatmap
    from condensation.evaluate.long_context import slug
    from condensation.evaluate.passkey import length_label

    device, dtype = resolve_device_dtype(cfg)
    label = cfg.label or Path(cfg.model.rstrip("/")).name
    run_name = cfg.tracking.run_name or f"lc-{label}"
    results_dir = Path(cfg.out) / "long-context" / run_name
    results_dir.mkdir(parents=True, exist_ok=True)
    trained = cfg.trained_length if cfg.trained_length is not None else getattr(inputs.model_config,
                                                                                "max_position_embeddings", None)
    trained = trained or None  # 0: no line

    print(f"long-context evaluation of {cfg.model} on {cfg.text} ({device}, {str(dtype).removeprefix('torch.')})")
    for length, info in inputs.window_info.items():
        long_docs = f"{info['long_documents']} documents at least that long"
        how = (f"from its {info['documents']} documents concatenated with eos ({long_docs})" if info["concatenated"]
               else f"from {long_docs}")
        print(f"  {cfg.n} windows of {length_label(length)} tokens {how}")
    print(f"results: {results_dir}")
    client = parent = child = None
    uri = cfg.tracking.tracking_uri or f"sqlite:///{os.path.join(cfg.out, 'mlflow.db')}"
    if cfg.tracking.enabled:
        client, parent = start_parent_run(cfg, uri, run_name, results_dir)
        print(f"tracking: mlflow ui --backend-store-uri {uri}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` ends the MLflow runs as KILLED, as Ctrl-C does

    curves, grids, skipped = [], {}, []
    try:
        for name, kind, seg in model_plan(cfg, inputs.model_config, label):
            # full attention's cost grows with the square of the length: the baseline stops at baseline_max_tokens
            limit = cfg.baseline_max_tokens if kind == "baseline" else None
            lengths = [n for n in cfg.lengths if limit is None or n <= limit]
            pk_lengths = [n for n in cfg.passkey.lengths if limit is None or n <= limit]
            for n in sorted(set(cfg.lengths + cfg.passkey.lengths) - set(lengths + pk_lengths)):
                skipped.append(f"{name}: skipped at {length_label(n)} tokens: more than baseline_max_tokens={limit}")
                print(skipped[-1])
            if not lengths and not pk_lengths:
                continue
            t0 = time.time()
            model = load_model(inputs.folder, kind, seg, dtype, device,
                               cfg.condensation_overrides if kind == "condensation" else None)
            print(f"{name}: loaded in {time.time() - t0:.0f} s", flush=True)
            if client is not None:
                child = client.create_run(client.get_run(parent).info.experiment_id, run_name=name,
                                          tags={"mlflow.parentRunId": parent, "model": cfg.model}).info.run_id
                log_params(client, child, {"model": cfg.model, "kind": kind, "dtype": str(dtype), "device": str(device),
                                           "segment_length": str(getattr(model.config, "segment_length", "full"))})
            mine, grid = evaluate_model(model, name, kind, lengths, pk_lengths, cfg, inputs, device)
            curves += mine
            if grid is not None:
                grids[name] = grid
                plot_passkey_heatmap(grid, results_dir / f"passkey_{slug(name)}.png", title=f"Passkey: {name}")
            if client is not None:
                if mine:
                    log_loss_curves(mine, run_id=child, tracking_uri=uri, trained_length=trained)
                    client.log_batch(child, metrics=speed_metrics(mine))
                if grid is not None:
                    log_passkey_grid(grid, run_id=child, tracking_uri=uri)
                client.set_terminated(child, "FINISHED")
                child = None
            free(model)
            model = None
    except KeyboardInterrupt:
        end_runs(client, [child, parent], "KILLED")
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BaseException:
        end_runs(client, [child, parent], "FAILED")
        raise

    # the comparison: per window length a picture and a table; one JSON record of everything
    by_length = {n: [c for c in curves if c.length == n] for n in cfg.lengths}
    by_length = {n: cs for n, cs in by_length.items() if cs}
    pictures = [plot_loss_by_position(cs, results_dir / f"loss_by_position_len_{n}.png", trained_length=trained)
                for n, cs in by_length.items()]
    summary = "\n\n".join(f"{length_label(n)} tokens, {cfg.n} windows: {format_curves_table(cs)}"
                           for n, cs in by_length.items())
    record = {"config": dataclasses.asdict(cfg), "windows": {str(n): i for n, i in inputs.window_info.items()},
              "curves": [c.to_dict() for c in curves], "passkey": {k: g.to_dict() for k, g in grids.items()},
              "skipped": skipped, "trained_length": trained,
              "mlflow": {"tracking_uri": uri, "run_id": parent} if parent else None}
    (results_dir / "evaluation.json").write_text(json.dumps(record, indent=1))
    (results_dir / "summary.md").write_text(summary + "\n")
    if client is not None:
        log_loss_curves(curves, run_id=parent, tracking_uri=uri, trained_length=trained)
        client.log_text(parent, summary + "\n", "long_context/summary.md")
        client.log_artifact(parent, str(results_dir / "evaluation.json"), "long_context")
        for name in grids:
            client.log_artifact(parent, str(results_dir / f"passkey_{slug(name)}.png"), "passkey")
        if skipped:
            client.set_tag(parent, "skipped", "; ".join(skipped)[:5000])
        client.set_terminated(parent, "FINISHED")

    print(f"\n{summary}\n")
    print(f"results: {results_dir} ({', '.join(p.name for p in pictures)}, evaluation.json, summary.md)")
    if parent:
        print(f"mlflow: run {run_name!r} ({parent}) in experiment {cfg.tracking.experiment!r}: "
              f"mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
