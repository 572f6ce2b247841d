"""Typed configs for training runs: defaults <- YAML file <- `key.sub=value` overrides, merged once, strictly.

    cfg = load_config(TrainConfig(), yaml_path="configs/pretrain_paper.yaml", overrides=["optim.lr=1e-4"])
    cfg.validate()            # raises ConfigError naming the field; call it before Ray starts

Every field carries its meaning in the docstring of its dataclass. Unknown keys (in YAML or on the command line)
are errors that name the full dotted key. Values from YAML / the command line are coerced to the field's type
(`6e-5` is a float even though YAML 1.1 reads it as a string) and rejected when they do not fit.

Presets are small functions (`PRESETS`) over the defaults; the shipped YAML files in `configs/` are partial
overrides of the defaults and load through the same path.

The library never reads argv or the environment: workloads pass what they parsed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or key is invalid; the message starts with the dotted field name."""

    def __init__(self, key: str, message: str):
        self.key = key
        # one line: workloads print it as `config error: <key>: <message>` and scripts grep for that
        super().__init__(" ".join(f"{key}: {message}".split()))


# ----------------------------------------------------------------------------------------------------------------
# Schema


@dataclass
class ModelConfig:
    """Which model to train.

    size: named size of `condensation.sizes.MODEL_SIZES` ("debug", "tiny-cpu", "table1", "smollm2-135m",
        "llama-3.2-1b", "llama-3.2-3b"); the architecture when `init_from` is not set.
    init_from: a HF folder (a Llama or Condensation checkpoint, e.g. a previous stage's `hf` export), hub id, or a
        `condensation.pretrained` name ("smollm2-135m-instruct") to load weights and architecture from; `size` is
        then ignored. None trains from random init.
    segment_length: tokens per segment `l`; None keeps the size's (or checkpoint's) value.
    memory_grad_segments: truncated backpropagation through the memory: k > 0 cuts its gradient every k segments, 0
        backpropagates through all segments (the paper); None keeps the size's (or checkpoint's) value (full for a
        Llama checkpoint).
    memory_sink_tokens: k > 0 keeps the layer outputs of the sequence's first k tokens (an attention sink) before
        every memory from segment 2 on (`CondensationConfig.memory_sink_tokens`; not in the paper); 0 is the paper's
        model; None keeps the checkpoint's value (0 for a Llama checkpoint).
    memory_norm: "shared" (the paper: the memory is normalised by input_layernorm) or "separate" (each layer's own
        memory_layernorm, starting as a copy of input_layernorm); None keeps the checkpoint's value ("shared" for a
        Llama checkpoint).
    overrides: further `CondensationConfig` fields (e.g. segment_schedule, checkpoint_cells, loss_reduction,
        segment_attention, loss_chunk_tokens). The fields above are set above, not here.
    """

    size: str = "debug"
    init_from: str | None = None
    segment_length: int | None = None
    memory_grad_segments: int | None = None
    memory_sink_tokens: int | None = None
    memory_norm: str | None = None
    overrides: dict = field(default_factory=dict)

    def model_kwargs(self) -> dict:
        """The `CondensationConfig` fields this config sets (overrides, then the typed fields that are not None)."""
        kw = dict(self.overrides)
        if self.segment_length is not None:
            kw["segment_length"] = self.segment_length
        if self.memory_grad_segments is not None:
            kw["memory_grad_segments"] = self.memory_grad_segments or None  # 0: full backpropagation
        for key in ("memory_sink_tokens", "memory_norm"):
            if getattr(self, key) is not None:
                kw[key] = getattr(self, key)
        return kw


@dataclass
class DataConfig:
    """Where the rows `{"input_ids": int64[seq_len], "labels": int64[seq_len]}` come from.

    source: "local" (the built-in byte-level text of CPython's pydoc topics; no downloads), "synthetic" (random
        repeated patterns), or a source name understood by `condensation.data` (e.g. "fineweb-edu").
    seq_len: tokens per row (the paper's "total" length, e.g. 4096).
    num_rows: rows to build for "local"/"synthetic" (cycled over epochs); for other sources, a cap (None = all).
    tokenizer: tokenizer name or path for `condensation.data` (None = the project's built-in one; a
        `condensation.pretrained` name gives that checkpoint's tokenizer).
    dataset_options: extra keyword arguments for the `condensation.data` source (`DATA_LAYER_OPTIONS`: e.g.
        text_field, split, min_tokens); "local", "synthetic" and "passkey" take none.
    seed: data order / generation seed.
    random_lengths: every micro-batch takes a random number of whole segments: its length is drawn uniformly from
        l, 2l, ... up to seq_len (l = the model's segment_length; seq_len itself too when it is not a multiple), all
        its rows that length, so nothing is padded. Text rows are cut to it (drawn from seed, worker rank, step and
        micro-step); passkey rows (the curriculum) are generated at it (drawn from seed and the row's group). Peak
        memory is that of seq_len; tokens per step vary. Not with schedule.cuda_graph (a graph replays one shape).
        False (default): every row seq_len tokens.
    cache_rows: tokenize and pack the rows of a `condensation.data` text source once per run and keep them in Ray's
        object store (`Dataset.materialize()`, in file order), so that later epochs read them instead of reading and
        tokenizing the text again; False streams them from the source every epoch (a corpus too large for the object
        store); None (default) decides by size: local files whose rows are estimated at most
        `train.data.CACHE_ROWS_AUTO_BYTES` (1 GiB: 16 bytes of int64 input_ids + labels per token, at most one token
        per byte of jsonl/json and four per byte of compressed parquet, capped by num_rows x seq_len) are cached,
        hub corpora are streamed. True on a hub corpus needs a bound (num_rows or dataset_options.limit_documents).
        A sweep builds the cached rows once on its driver and every trial reads the same blocks. "local" and
        "synthetic" rows are built in memory anyway; the passkey curriculum has its own `cache_rows`.
    """

    source: str = "local"
    seq_len: int = 128
    num_rows: int | None = 256
    tokenizer: str | None = None
    dataset_options: dict = field(default_factory=dict)
    seed: int = 0
    random_lengths: bool = False
    cache_rows: bool | None = None


@dataclass
class OptimConfig:
    """AdamW with cosine decay from `lr` to `min_lr` after a linear warmup, and gradient clipping.

    lr: peak learning rate (paper: 6e-5).
    min_lr: learning rate at the last step (paper: 2e-5); 0 decays to zero.
    warmup_steps: linear warmup optimizer steps.
    weight_decay: AdamW weight decay.
    betas: AdamW betas.
    eps: AdamW epsilon.
    grad_clip: max global gradient norm (DeepSpeed's gradient_clipping; the torch engine clips alike); 0 disables.
    """

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """Steps, batch sizes, workers, precision. Global batch = per_worker_batch x num_workers x grad_accum.

    total_steps: optimizer steps of the run (a resumed run continues to this same count).
    global_batch: sequences per optimizer step over all workers (paper: 64).
    per_worker_batch: sequences per micro-batch on each worker.
    num_workers: Ray Train workers (one per GPU on GPU).
    use_gpu: one GPU per worker, NCCL; False runs on CPU with gloo.
    gpus_per_worker: the GPU each worker reserves with `use_gpu`: 1, or a fraction (e.g. 0.25) so that several
        one-worker runs share one GPU (a sweep's trials packed 4 to a GPU); a fraction needs num_workers=1, since
        NCCL cannot place two ranks of one run on one GPU.
    cpus_per_worker: CPUs reserved per worker; None derives it from the cluster's CPUs when `fit` starts, leaving
        room for the data tasks (`condensation.train.resources`). An explicit value that leaves no CPU for the
        data tasks is an error at fit time.
    precision: "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32".
    engine: what runs the optimizer step (`condensation.train.engines`). "deepspeed": DeepSpeed ZeRO (`zero_stage`,
        the `deepspeed` keys; optimizer state sharded over workers). "torch": plain torch, the model in `precision`
        on each worker, every worker holding the whole optimizer state, gradients all-reduced as one flat bucket;
        the only engine whose step can be a CUDA graph (`cuda_graph`).
    cuda_graph: torch engine on GPU with one micro-batch per optimizer step (global_batch = per_worker_batch x
        num_workers): each step replays two CUDA graphs (forward + backward, then all-reduce + clipping + AdamW),
        and the host checks the finite-loss flag between them. Rows must have one length (they do: data.seq_len).
    master_weights: torch engine in bf16: AdamW steps fp32 master weights from fp32 gradients (bf16 only in the
        model), as DeepSpeed's bf16 mode does. False steps the bf16 weights themselves, as workloads/benchmark.py does:
        less memory and traffic, but an update smaller than bf16's resolution of a weight (2^-8 of it, e.g. lr 6e-5 on
        weights of 0.02) is lost, so it is for throughput comparisons, not for training.
    zero_stage: DeepSpeed ZeRO stage (the paper: 2); deepspeed engine only.
    torch_threads: torch intra-op threads per worker; None leaves torch's default.
    seed: model init / dropout seed.
    replay_micro_batches: per optimizer step and worker, this many more micro-batches of per_worker_batch rows
        from the "replay" dataset given to `fit` (e.g. plain text during the passkey stages, so that they keep the
        language modelling the answer-only loss would wear away), after the step's grad_accum micro-batches of
        "train" rows. The step's gradient is the mean over all its micro-batches, each micro-batch weighing the same
        whatever its number of labelled tokens (the loss is a token mean per micro-batch, so rows mixed into one
        micro-batch would let ~2000 text tokens drown a passkey's ~5 answer tokens). Metrics: `loss` stays the
        train rows', `replay_loss` the replay rows'. 0 (default): train rows only.
    replay_weight: the weight w of each replay micro-batch against a train micro-batch's 1: the step's gradient is
        (sum of train micro-batch gradients + w x sum of replay micro-batch gradients) / (grad_accum + w x
        replay_micro_batches), each micro-batch's gradient that of its own loss (a token mean, as above). 1 (default):
        the plain mean; w -> 0 approaches train rows only (e.g. 0.2, so that ~2000 text labels a row do not drown a
        passkey's ~5 answer tokens). Finite and > 0 (> 1 weighs text more); `loss` and `replay_loss` stay unweighted.
    """

    total_steps: int = 20
    global_batch: int = 8
    per_worker_batch: int = 2
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float | None = None
    precision: str = "auto"
    engine: str = "deepspeed"
    cuda_graph: bool = False
    master_weights: bool = True
    zero_stage: int = 2
    torch_threads: int | None = 1
    seed: int = 0
    replay_micro_batches: int = 0
    replay_weight: float = 1.0

    @property
    def grad_accum(self) -> int:
        """Micro-batches of train rows per optimizer step and worker."""
        return self.global_batch // (self.per_worker_batch * self.num_workers)

    @property
    def micro_batches(self) -> int:
        """All micro-batches of an optimizer step on a worker (train and replay): what the engines accumulate."""
        return self.grad_accum + self.replay_micro_batches

    def micro_batch_scale(self, replay: bool) -> float:
        """What a micro-batch's loss is multiplied by before its backward, so that the summed gradients are the step's
        weighted mean (`replay_weight`): 1 / (grad_accum + w x replay_micro_batches) for train rows, w / (...) for
        replay rows; 1 / micro_batches for both at w = 1."""
        w = self.replay_weight
        return (w if replay else 1.0) / (self.grad_accum + w * self.replay_micro_batches)

    def replay_scales(self) -> dict[bool, float] | None:
        """micro_batch_scale for train (False) and replay (True) micro-batches where a replay weight sets them; None
        where every micro-batch of a step weighs the same (the engines' plain mean)."""
        if self.replay_weight == 1 or not self.replay_micro_batches:
            return None
        return {r: self.micro_batch_scale(r) for r in (False, True)}

    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)


@dataclass
class CheckpointConfig:
    """Checkpoints (the engine's state: DeepSpeed's of every rank, or the torch engine's from rank 0, through
    `ray.train.report`) and the HF export.

    every: save every this many optimizer steps (the last step is always saved); 0 saves only the last.
    keep: checkpoints kept by Ray (the newest); None keeps all.
    export_hf: also write a `hf/` folder (save_pretrained, safetensors) into the last checkpoint.
    export_hf_every: write `hf/` into every checkpoint, not only the last.
    max_failures: worker-group failures Ray Train recovers from (restoring the last checkpoint); -1 = forever.
    """

    every: int = 10
    keep: int | None = 2
    export_hf: bool = True
    export_hf_every: bool = False
    max_failures: int = 2


@dataclass
class TrackingConfig:
    """MLflow, from rank 0 only; exactly one MLflow run per (storage, run name), resumed across restarts.

    enabled: log to MLflow.
    tracking_uri: MLflow tracking URI (e.g. http://host:5000); None = `sqlite:///<storage>/mlflow.db`.
    experiment: MLflow experiment name.
    artifact_location: artifact root for a newly created experiment; None = `<storage>/mlartifacts` with the
        default local store, the server's default otherwise.
    log_every: log metrics / print a progress line every this many steps.
    progress_bar: a tqdm bar on rank 0 (else one log line per `log_every` steps).
    parent_run_id: nest this run's MLflow run under that run (a curriculum's stages under the curriculum).
    system_metrics: on GPU workers, MLflow's system metrics (GPU utilisation and memory, CPU, host memory) beside
        the training metrics, sampled every `system_metrics_interval_s` seconds by rank 0 for its node.
    system_metrics_interval_s: seconds between system-metric samples.
    peak_tflops: the matmul TFLOP/s that MFU is reported against; None measures the device once at start.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "condensation"
    artifact_location: str | None = None
    log_every: int = 1
    progress_bar: bool = False
    parent_run_id: str | None = None
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    peak_tflops: float | None = None


@dataclass
class RunConfig:
    """Where a run lives. The run folder is `<storage>/<name>`; starting again with the same pair continues it.

    name: run name (Ray Train run name, MLflow run name).
    storage: Ray Train storage path (local folder or shared filesystem); relative paths resolve against the
        current directory when the config is resolved.
    """

    name: str = "pretrain-debug"
    storage: str = "runs"

    @property
    def run_dir(self) -> str:
        return os.path.join(self.storage, self.name)


@dataclass
class DebugConfig:
    """Fault injection for tests.

    fault_at_step: the last worker raises once after this optimizer step (before its checkpoint), to test
        recovery through FailureConfig; a marker in the run folder makes it fire only once.
    nan_at_step: the loss of this optimizer step becomes NaN, to test the non-finite-loss stop.
    fault_once: the injected fault fires in the first attempt only (a transient failure); False fires it in every
        attempt, as a bug would.
    kill_at_step: the last worker's process kills itself with SIGKILL once after this optimizer step (a lost
        worker, not an exception), to test recovery from a dead process.
    """

    fault_at_step: int | None = None
    nan_at_step: int | None = None
    fault_once: bool = True
    kill_at_step: int | None = None


@dataclass
class TrainConfig:
    """A whole training run. `deepspeed` holds extra keys deep-merged into the generated DeepSpeed config (its own
    JSON schema, https://www.deepspeed.ai/docs/config-json/; schedule.engine=deepspeed only); the resolved dict is
    saved with the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    deepspeed: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        validate(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return merge(cls(), d)


# ----------------------------------------------------------------------------------------------------------------
# Merge: defaults <- YAML <- overrides, strict about keys, coercing to the field types


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(key, f"{value!r} does not fit {tp}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(key, f"expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(key, f"expected an int, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(key, f"expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return copy.deepcopy(value)
    return value


def _deep_update(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_into(obj: Any, upd: dict, prefix: str) -> Any:
    if not isinstance(upd, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {upd!r}")
    hints = _type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for k, v in upd.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(key, f"unknown key (known keys here: {sorted(names)})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            changes[k] = _merge_into(cur, v if v is not None else {}, key + ".")
        elif isinstance(cur, dict) and isinstance(v, dict):
            changes[k] = _deep_update(cur, v)  # free-form mappings (model.overrides, deepspeed) merge deeply
        else:
            changes[k] = _coerce(v, hints[k], key)
    return dataclasses.replace(obj, **changes)


def merge(base: Any, updates: dict | None) -> Any:
    """A copy of dataclass `base` with the nested mapping `updates` applied (strict keys, coerced types)."""
    return _merge_into(base, updates or {}, "")


def parse_overrides(overrides: list[str] | None) -> dict:
    """`["optim.lr=1e-4", "model.overrides.segment_schedule=sequential"]` -> a nested mapping. Values are YAML."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(key or item, "empty key in override")
        value = yaml.safe_load(raw) if raw.strip() else ""
        d = nested
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(key, "conflicting overrides")
        d[parts[-1]] = value
    return nested


def load_yaml(path: str | os.PathLike, key: str = "--config") -> dict:
    """The mapping in a YAML file; a missing file or a syntax error is a ConfigError under `key`."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(key, f"{path}: is a folder, not a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(key, f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path}: a config file must hold a mapping at the top level")
    return data


def load_config(base: Any = None, yaml_path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                validate_result: bool = True) -> TrainConfig:
    """defaults (`base`, default `TrainConfig()`) <- YAML file <- `key.sub=value` overrides; then validated."""
    cfg = base if base is not None else TrainConfig()
    if yaml_path is not None:
        cfg = merge(cfg, load_yaml(yaml_path))
    cfg = merge(cfg, parse_overrides(overrides))
    if validate_result:
        validate(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value} (lists kept as values); for MLflow params."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Validation: before Ray starts, naming the field


def _check_pretrained_installed(key: str, name: str | None) -> None:
    """A registered pretrained name whose optional extra is missing fails here, before Ray, not in every worker."""
    from .pretrained import MissingExtraError, check_installed, is_converted, is_registered

    if is_registered(name) and not is_converted(name):  # once converted, the folder is all a run reads
        try:
            check_installed(name)
        except MissingExtraError as e:
            raise ConfigError(key, str(e)) from None


def validate(cfg: TrainConfig) -> None:
    from .sizes import MODEL_SIZES

    m, d, o, s, c, t, r, dbg = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.checkpoint, cfg.tracking, cfg.run, cfg.debug

    if s.total_steps <= 0:
        raise ConfigError("schedule.total_steps", f"must be positive, got {s.total_steps}")
    if m.init_from is None and m.size not in MODEL_SIZES:
        raise ConfigError("model.size", f"unknown model size {m.size!r}; known sizes: {sorted(MODEL_SIZES)}")
    if m.init_from is not None and (not isinstance(m.init_from, str) or not m.init_from.strip()):
        raise ConfigError("model.init_from", "must be a folder, hub id or condensation.pretrained name")
    _check_pretrained_installed("model.init_from", m.init_from)
    _check_pretrained_installed("data.tokenizer", d.tokenizer)
    if m.segment_length is not None and m.segment_length <= 0:
        raise ConfigError("model.segment_length", f"must be a positive int, got {m.segment_length}")
    seg = m.segment_length
    if seg is None and m.init_from is None:
        seg = m.overrides.get("segment_length", MODEL_SIZES[m.size].get("segment_length"))
    if "segment_length" in m.overrides and (not isinstance(m.overrides["segment_length"], int) or m.overrides["segment_length"] <= 0):
        raise ConfigError("model.overrides.segment_length", f"must be a positive int, got {m.overrides['segment_length']!r}")
    from .modeling import CondensationConfig

    known = {f.name for f in dataclasses.fields(CondensationConfig)}
    for k in m.overrides:
        if k not in known:
            raise ConfigError(f"model.overrides.{k}", "not a CondensationConfig field")
    stacked = m.overrides.get("stacked_params")
    if stacked is not None and not isinstance(stacked, bool):
        raise ConfigError("model.overrides.stacked_params", f"must be true or false, got {stacked!r}")
    _validate_memory_options(m, seg)
    if m.init_from is None:
        from .sizes import build_config

        try:
            mc = build_config(m.size, **m.model_kwargs())
        except Exception as e:  # unknown or invalid CondensationConfig field
            raise ConfigError("model.overrides", f"not a valid CondensationConfig for size {m.size!r}: {e}") from None
        if d.source in ("local", "synthetic") and mc.vocab_size < 257:
            raise ConfigError("model.size", f"data.source={d.source!r} needs a vocabulary of >= 257 tokens (bytes + eos), "
                                            f"size {m.size!r} has {mc.vocab_size}")
    schedule_ = m.overrides.get("segment_schedule")
    if schedule_ is not None and schedule_ not in ("wavefront", "sequential"):
        raise ConfigError("model.overrides.segment_schedule", f"must be 'wavefront' or 'sequential', got {schedule_!r}")
    red = m.overrides.get("loss_reduction")
    if red is not None and red not in ("segment_sum", "token_mean"):
        raise ConfigError("model.overrides.loss_reduction", f"must be 'segment_sum' or 'token_mean', got {red!r}")

    if d.seq_len <= 0:
        raise ConfigError("data.seq_len", f"must be positive, got {d.seq_len}")
    if d.num_rows is not None and d.num_rows <= 0:
        raise ConfigError("data.num_rows", f"must be positive or None, got {d.num_rows}")
    if not d.source:
        raise ConfigError("data.source", "must name a source")
    if seg is not None and isinstance(seg, int) and seg > 0 and d.seq_len < 1:
        raise ConfigError("data.seq_len", "must hold at least one token")
    _validate_dataset_options(d)
    if d.cache_rows is not None and not isinstance(d.cache_rows, bool):
        raise ConfigError("data.cache_rows", f"must be true, false or null (decided by size), got {d.cache_rows!r}")

    if o.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {o.lr}")
    if o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError("optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.warmup_steps > s.total_steps:
        raise ConfigError("optim.warmup_steps", f"({o.warmup_steps}) exceeds schedule.total_steps ({s.total_steps})")
    if o.weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    if o.eps <= 0:
        raise ConfigError("optim.eps", f"must be positive, got {o.eps}")
    if o.grad_clip < 0:
        raise ConfigError("optim.grad_clip", f"must be >= 0, got {o.grad_clip}")

    if s.num_workers <= 0:
        raise ConfigError("schedule.num_workers", f"must be positive, got {s.num_workers}")
    if s.per_worker_batch <= 0:
        raise ConfigError("schedule.per_worker_batch", f"must be positive, got {s.per_worker_batch}")
    if s.global_batch <= 0 or s.global_batch % (s.per_worker_batch * s.num_workers) != 0:
        raise ConfigError(
            "schedule.global_batch",
            f"{s.global_batch} is not divisible by per_worker_batch x num_workers = "
            f"{s.per_worker_batch} x {s.num_workers} = {s.per_worker_batch * s.num_workers}",
        )
    if not 0 < s.gpus_per_worker <= 1:
        raise ConfigError("schedule.gpus_per_worker", f"must be in (0, 1], got {s.gpus_per_worker}")
    if s.gpus_per_worker < 1 and s.num_workers > 1:
        raise ConfigError("schedule.gpus_per_worker", f"a fraction of a GPU ({s.gpus_per_worker:g}) needs "
                                                      f"schedule.num_workers=1, got {s.num_workers}: NCCL cannot place "
                                                      "two ranks of one run on one GPU")
    if s.cpus_per_worker is not None and s.cpus_per_worker <= 0:
        raise ConfigError("schedule.cpus_per_worker", f"must be positive, got {s.cpus_per_worker}")
    if s.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError("schedule.precision", f"must be 'auto', 'bf16' or 'fp32', got {s.precision!r}")
    if s.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("schedule.zero_stage", f"must be 0, 1, 2 or 3, got {s.zero_stage}")
    _validate_engine(cfg)
    if s.torch_threads is not None and s.torch_threads <= 0:
        raise ConfigError("schedule.torch_threads", f"must be positive or None, got {s.torch_threads}")
    if not _is_int(s.replay_micro_batches) or s.replay_micro_batches < 0:
        raise ConfigError("schedule.replay_micro_batches", f"must be an int >= 0, got {s.replay_micro_batches!r}")
    if not _is_positive_float(s.replay_weight):
        raise ConfigError("schedule.replay_weight", f"must be a finite number > 0, got {s.replay_weight!r}")

    if c.every < 0:
        raise ConfigError("checkpoint.every", f"must be >= 0, got {c.every}")
    if c.keep is not None and c.keep <= 0:
        raise ConfigError("checkpoint.keep", f"must be positive or None, got {c.keep}")
    if c.max_failures < -1:
        raise ConfigError("checkpoint.max_failures", f"must be >= -1, got {c.max_failures}")

    if t.system_metrics_interval_s <= 0:
        raise ConfigError("tracking.system_metrics_interval_s", f"must be positive, got {t.system_metrics_interval_s}")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError("tracking.peak_tflops", f"must be positive or None, got {t.peak_tflops}")
    if t.log_every <= 0:
        raise ConfigError("tracking.log_every", f"must be positive, got {t.log_every}")
    if not t.experiment:
        raise ConfigError("tracking.experiment", "must not be empty")

    if not r.name or "/" in r.name or r.name in (".", ".."):
        raise ConfigError("run.name", f"must be a plain folder name, got {r.name!r}")
    if not r.storage:
        raise ConfigError("run.storage", "must not be empty")

    for k in ("fault_at_step", "nan_at_step", "kill_at_step"):
        v = getattr(dbg, k)
        if v is not None and not (1 <= v <= s.total_steps):
            raise ConfigError(f"debug.{k}", f"must be within [1, schedule.total_steps={s.total_steps}], got {v}")

    if not isinstance(cfg.deepspeed, dict):
        raise ConfigError("deepspeed", "must be a mapping (DeepSpeed's own config keys)")
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if k in cfg.deepspeed:
            raise ConfigError(f"deepspeed.{k}", "is derived from schedule.*; set the batch there")


ENGINES = ("deepspeed", "torch")


def _validate_engine(cfg: TrainConfig) -> None:
    s, m = cfg.schedule, cfg.model
    if s.engine not in ENGINES:
        raise ConfigError("schedule.engine", f"must be one of {list(ENGINES)}, got {s.engine!r}")
    if s.engine != "torch":
        if s.cuda_graph:
            raise ConfigError("schedule.cuda_graph", "needs schedule.engine=torch: DeepSpeed's ZeRO step reads the "
                                                     "gradient norm on the host, which a CUDA graph cannot capture")
        if not s.master_weights:
            raise ConfigError("schedule.master_weights", "only the torch engine can drop them (DeepSpeed's bf16 mode "
                                                         "always keeps fp32 master weights)")
    if m.overrides.get("stacked_params") and s.engine != "torch":
        # ZeRO flattens the parameters into its own buffers and reduces gradients from AccumulateGrad hooks; the
        # stacked parameters' weight gradients are added into .grad outside autograd, where no hook sees them
        raise ConfigError("model.overrides.stacked_params", f"needs schedule.engine=torch (got {s.engine!r}): its "
                                                            "weight gradients bypass the hooks DeepSpeed ZeRO reduces "
                                                            "gradients from")
    if s.engine == "torch" and cfg.deepspeed:
        raise ConfigError("deepspeed", "DeepSpeed's own keys apply to schedule.engine=deepspeed only "
                                       f"(got {sorted(cfg.deepspeed)} with schedule.engine=torch)")
    if s.cuda_graph:
        if not s.use_gpu:
            raise ConfigError("schedule.cuda_graph", "needs schedule.use_gpu=true (CUDA graphs)")
        if s.grad_accum != 1:
            raise ConfigError("schedule.cuda_graph", f"needs one micro-batch per optimizer step (global_batch = "
                                                     f"per_worker_batch x num_workers); global_batch {s.global_batch} "
                                                     f"over {s.per_worker_batch} x {s.num_workers} is grad_accum "
                                                     f"{s.grad_accum}")
        if s.replay_micro_batches:
            # graph A always starts the step's gradient (it zeroes or overwrites the bucket), so a second micro-batch
            # would need a second captured forward + backward with a memory pool of its own
            raise ConfigError("schedule.replay_micro_batches", "schedule.cuda_graph replays one micro-batch per "
                                                               "optimizer step; replay micro-batches add more. Use "
                                                               "schedule.cuda_graph=false with replay")
        if cfg.data.random_lengths:
            raise ConfigError("data.random_lengths", "a CUDA graph replays one batch shape (schedule.cuda_graph); random "
                                                     "lengths change it every micro-batch")
        if m.overrides.get("compile_cells") == "reduce-overhead":
            raise ConfigError("model.overrides.compile_cells", "'reduce-overhead' replays CUDA graphs of its own, "
                                                               "which cannot be captured inside schedule.cuda_graph's; "
                                                               "use true")


MEMORY_NORMS = ("shared", "separate")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_float(v) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _validate_memory_options(m: ModelConfig, seg: int | None) -> None:
    """The memory options, typed (model.X) or in model.overrides.X (not both), whatever init_from is: a bad value fails
    here, before Ray starts, not in every worker."""
    for key in ("memory_grad_segments", "memory_sink_tokens", "memory_norm"):
        if getattr(m, key) is not None and key in m.overrides:
            raise ConfigError(f"model.overrides.{key}", f"set twice: use model.{key} only")
    g = m.memory_grad_segments
    if g is not None and (not _is_int(g) or g < 0):
        raise ConfigError("model.memory_grad_segments", f"must be an int >= 0 (0: full backpropagation), got {g!r}")
    g = m.overrides.get("memory_grad_segments")
    if g is not None and (not _is_int(g) or g <= 0):
        raise ConfigError("model.overrides.memory_grad_segments", f"must be a positive int or None, got {g!r}")
    for where, k in (("model.memory_sink_tokens", m.memory_sink_tokens),
                     ("model.overrides.memory_sink_tokens", m.overrides.get("memory_sink_tokens"))):
        if k is None:
            continue
        if not _is_int(k) or k < 0:
            raise ConfigError(where, f"must be an int >= 0, got {k!r}")
        if _is_int(seg) and k > seg:
            raise ConfigError(where, f"({k}) must be at most the segment length ({seg})")
    for where, v in (("model.memory_norm", m.memory_norm), ("model.overrides.memory_norm", m.overrides.get("memory_norm"))):
        if v is not None and v not in MEMORY_NORMS:
            raise ConfigError(where, f"must be one of {list(MEMORY_NORMS)}, got {v!r}")


# Keyword arguments of `condensation.data.pretraining_dataset` beyond (source, tokenizer, seq_len); a test keeps the
# two in step. Spelled out here so validation needs no Ray import.
DATA_LAYER_OPTIONS = ("min_tokens", "mode", "split", "config", "text_field", "limit_documents", "batch_size", "num_cpus")
BUILTIN_SOURCES = ("local", "synthetic", "passkey")


def _validate_dataset_options(d: DataConfig) -> None:
    if not isinstance(d.dataset_options, dict):
        raise ConfigError("data.dataset_options", f"expected a mapping, got {d.dataset_options!r}")
    for k in d.dataset_options:
        key = f"data.dataset_options.{k}"
        if d.source in BUILTIN_SOURCES:
            hint = (" (to train on your own file set data.source=/path/to/file.jsonl)" if d.source == "local" else "")
            raise ConfigError(key, f"data.source={d.source!r} takes no dataset_options{hint}")
        if k not in DATA_LAYER_OPTIONS:
            raise ConfigError(key, f"not an option of data.source={d.source!r}; known: {list(DATA_LAYER_OPTIONS)}")
    mode = d.dataset_options.get("mode")
    if mode is not None and mode not in ("cut", "pack"):
        raise ConfigError("data.dataset_options.mode", f"must be 'cut' or 'pack', got {mode!r}")


def rebase_storage(cfg: TrainConfig, base_dir: str | os.PathLike | None) -> TrainConfig:
    """A relative `run.storage` placed under `base_dir` instead of the current directory (None: unchanged).

    Workloads pass a base when the current directory is not a place to keep runs, e.g. the throw-away folder
    that `ray job submit --working-dir` unpacks a job into."""
    storage = cfg.run.storage
    if base_dir is None or "://" in storage or os.path.isabs(os.path.expanduser(storage)):
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, storage=os.path.join(str(base_dir), storage)))


JOB_STORAGE_DIR = "condensation-runs"


def job_storage_base(cwd: str, env: dict, home: str) -> str | None:
    """Where relative storage paths go when this process is a `ray job submit` driver: `<home>/condensation-runs`
    (None otherwise, i.e. the current directory). A job runs in a folder Ray unpacks for it under
    `.../runtime_resources/working_dir_files/` (or the job server's own folder without --working-dir) and may
    delete; runs, checkpoints and mlflow.db there could not be found by `mlflow ui` nor resumed by the next job.
    The workload passes its cwd, environment and home, since the library reads neither."""
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in env or (
        f"{os.sep}runtime_resources{os.sep}" in cwd and f"{os.sep}working_dir_files{os.sep}" in cwd)
    return os.path.join(home, JOB_STORAGE_DIR) if in_job else None


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Validated copy with the storage path made absolute (so workers and drivers agree on the run folder)."""
    validate(cfg)
    storage = cfg.run.storage
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, storage=storage))


# ----------------------------------------------------------------------------------------------------------------
# Presets: small functions over the defaults


def debug_preset() -> TrainConfig:
    """Tiny model, generated local text, 2 CPU workers: tests and smoke runs (seconds)."""
    return TrainConfig()


def cpu_pretrain_preset() -> TrainConfig:
    """The embedded default of workloads/pretrain.py: a tiny model on local text, CPU, a few minutes at most."""
    return merge(TrainConfig(), {
        "model": {"size": "tiny-cpu", "segment_length": 64},
        "data": {"source": "local", "seq_len": 256, "num_rows": 512},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 5},
        "schedule": {"total_steps": 60, "global_batch": 8, "per_worker_batch": 2, "num_workers": 2},
        "checkpoint": {"every": 20},
        "tracking": {"log_every": 5},
        "run": {"name": "pretrain-cpu"},
    })


def paper_pretrain_preset() -> TrainConfig:
    """The paper's continual pretraining (Table III, passkey): Llama-3.2-1B, FineWeb-edu over 4K tokens, segment
    512, lr 6e-5 -> 2e-5 cosine, global batch 64, bf16, ZeRO-2, GPU workers, 6491 steps."""
    return merge(TrainConfig(), {
        "model": {"size": "llama-3.2-1b", "init_from": "meta-llama/Llama-3.2-1B", "segment_length": 512,
                  "overrides": {"compile_cells": True, "weight_grads": "deferred"}},
        "data": {"source": "fineweb-edu", "seq_len": 4096, "num_rows": None, "tokenizer": "meta-llama/Llama-3.2-1B"},
        "optim": {"lr": 6e-5, "min_lr": 2e-5, "warmup_steps": 100, "weight_decay": 0.0},
        "schedule": {"total_steps": 6491, "global_batch": 64, "per_worker_batch": 1, "num_workers": 8,
                     "use_gpu": True, "cpus_per_worker": 8, "precision": "bf16", "torch_threads": None},
        "checkpoint": {"every": 500, "keep": 3},
        "tracking": {"log_every": 10, "progress_bar": False},
        "run": {"name": "pretrain-paper-1b"},
    })


PRESETS = {"debug": debug_preset, "default": cpu_pretrain_preset, "cpu": cpu_pretrain_preset, "paper": paper_pretrain_preset}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
