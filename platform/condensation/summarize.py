"""The paper's summarization experiment (Table II, Fig. 9): finetune, generate, ROUGE by input length, baselines.

Three models, chosen by `models`, all evaluated on the same examples:
- `condensation`: a checkpoint finetuned as Condensation (segment `train.model.segment_length`) on summarization rows of
  `train.data.seq_len` tokens (the paper: 3K, segment 512, lr 6e-6 -> 6e-7), loss on the summary only.
- `full_finetuned` (the paper's "Full-Finetuned"): the same checkpoint finetuned the same way as a plain
  full-attention Llama. How: the training layer trains a `CondensationForCausalLM` whose segment is the whole row
  (`segment_length = train.data.seq_len`). With one segment there is no memory and the mask is Llama's causal mask,
  so the model *is* Llama (docs/model.md, rule 10; `tests/test_modeling.py` checks it against transformers' Llama).
  The same data, optimizer, schedule, DeepSpeed and MLflow code serve both models and nothing else differs. Its
  export loads as a plain `LlamaForCausalLM` (the weights keep Llama's names), and that is how it generates: full
  attention (sdpa) over the prompt and everything it writes.
- `instruct_zero_shot` (the paper's "Instruction model"): an instruction-tuned model with no finetuning (the paper:
  Llama-3.2-3B-Instruct; offline: SmolLM2-135M-Instruct), given the paper's prompt inside its chat template when its
  tokenizer has one, else the paper's prompt as it is.

Evaluation as in the paper: sampling at temperature 0.3, 256 new tokens, no beam search, seeded
(`condensation.evaluate.generate_summaries`); ROUGE-1/2/L F1 with Google's rouge-score (Porter stemming) overall and
by input length (0-512, 512-1024, 1024+ prompt tokens in the finetuned models' tokenizer), every prediction saved
beside its reference. MLflow: a parent run for the comparison (Table II, the Fig. 9 picture, the scores by length),
one nested run per model (a finetuned model's is its training run) with its table as metrics and its predictions.

    from condensation.summarize import load_summarize_config, run_summarization
    result = run_summarization(load_summarize_config("default"))   # Ray must be initialised by the caller
    print(result.table)

Idempotent: started again with the same name and storage, a finetuned model whose training finished is not trained
again (an interrupted one resumes from its checkpoint), and a model already evaluated with the same settings on the
same checkpoint is not evaluated again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ConfigError, TrainConfig, load_yaml, merge, parse_overrides, to_yaml

MODELS = ("condensation", "full_finetuned", "instruct_zero_shot")
FINETUNED = ("condensation", "full_finetuned")
SYNTHETIC = "synthetic"
PARENT_ID_FILE = "mlflow_parent_run_id"
DONE_FILE = "summarize_done.json"


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class SyntheticDataConfig:
    """The generated data behind the source name "synthetic" (`condensation.data.synthetic_summaries`): news-like
    reports whose reference summary is a template over facts that sit anywhere in the article.

    train_examples / test_examples: records written to `<storage>/<name>/synthetic/{train,test}.jsonl`.
    min_filler / max_filler: filler sentences per article (uniform), which set the input lengths.
    seed: the generator's seed (the test file uses another, so no test article is a training one).
    """

    train_examples: int = 4000
    test_examples: int = 200
    min_filler: int = 0
    max_filler: int = 11
    seed: int = 0


@dataclass
class SummaryDataConfig:
    """What the models train and are evaluated on.

    train_sources: what the finetuned models train on, one or several (mixed, e.g. [cnn_dailymail, booksum], the
        paper's 5.5K experiment): "synthetic" (generated, see `synthetic`), "cnn_dailymail" (abisee/cnn_dailymail
        3.0.0, streamed from the hub), "booksum" (kmfoda/booksum), another hub id, a local .jsonl/.json/.parquet file
        or folder in CNN/DailyMail's schema (`article`, `highlights`), or a mapping {source: <path or id>, fields:
        [<article field>, <summary field>]} for another schema (BookSum's is [chapter, summary_text]).
    eval_source: what every model is evaluated on (the same forms); None = the first training source's
        `eval_split` (for "synthetic": its generated test file; a local training file needs an eval_source).
    train_split / eval_split: hub splits (CNN/DailyMail and BookSum have train, validation, test); local files have none.
    train_examples: a cap on the training rows read (after the length filter); None = all of them.
    eval_examples: how many evaluation examples (the first of the source whose prompt fits `max_input_tokens`).
    max_input_tokens: evaluation prompts (the paper's format, in `train.data.tokenizer`) longer than this are
        skipped ("filter") or cut at the end of the article ("truncate"); None = train.data.seq_len -
        generation.max_new_tokens, so the full-attention baseline never reads past the length it was trained at.
    eval_length_mode: "filter" or "truncate".
    length_multiple: cut each evaluation article by the fewest tokens (< this many) that make its prompt a multiple
        of this many tokens; 1 = no cut. Condensation refuses padding, so only prompts of equal length share a
        `generate` call, and real articles (each of its own length) would otherwise go one at a time. Every model
        reads the same cut articles, and the input-length buckets use the cut lengths.
    cache_rows: tokenize the training rows once and keep them in Ray's object store for every epoch and both
        finetuned models (small data); False streams them from the source (hub-sized data).
    synthetic: size and lengths of the generated data.
    """

    train_sources: list = field(default_factory=lambda: [SYNTHETIC])
    eval_source: str | dict | None = None
    train_split: str = "train"
    eval_split: str = "test"
    train_examples: int | None = None
    eval_examples: int = 100
    max_input_tokens: int | None = None
    eval_length_mode: str = "filter"
    length_multiple: int = 1
    cache_rows: bool = True
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class FinetuneConfig:
    """One finetuned model of the comparison (`condensation` or `full_finetuned`).

    label: its name in tables and pictures; None = the paper's, with the trained length ("Condensation (3K)",
        "Full-Finetuned (3K)").
    init_from: the checkpoint it starts from (HF folder, hub id, `condensation.pretrained` name); None =
        `train.model.init_from` (None there too: random init of `train.model.size`). The paper's Condensation starts
        from its continual-pretraining export (`workloads/pretrain.py`), its baseline from Llama-3.2-3B itself.
    steps: optimizer steps; None = `train.schedule.total_steps`.
    """

    label: str | None = None
    init_from: str | None = None
    steps: int | None = None


@dataclass
class InstructConfig:
    """The zero-shot instruction model (`instruct_zero_shot`).

    model: a HF folder, hub id or `condensation.pretrained` name (offline: "smollm2-135m-instruct"; the paper:
        "meta-llama/Llama-3.2-3B-Instruct").
    label: its name in tables and pictures; None = "Instruction model".
    tokenizer: None = the model's own.
    chat_template: wrap the paper's prompt in the tokenizer's chat template (a user turn, then the assistant's turn
        opened) when it has one; False, or a tokenizer without one, gives the paper's prompt as it is.
    optional: when the model is a `condensation.pretrained` name whose optional extra is not installed, leave the
        model out with a note instead of a config error (the CPU default: its comparison runs anywhere).
    """

    model: str = "smollm2-135m-instruct"
    label: str | None = None
    tokenizer: str | None = None
    chat_template: bool = True
    optional: bool = False


@dataclass
class GenerationConfig:
    """How every model writes its summaries (the paper: temperature 0.3, 256 new tokens, no beam search).

    max_new_tokens: tokens generated at most (generation stops at the tokenizer's eos).
    temperature: sampling temperature; 0 = greedy decoding.
    seed: sampling seed (each batch draws from its own RNG seeded from it: the same config gives the same text).
    batch_size: prompts per `generate` call (Condensation: of equal length; the others: left-padded).
    device: "auto" (the first GPU when there is one, else the CPU), "cpu" or "cuda".
    dtype: "auto" (bf16 on a GPU, fp32 on the CPU), "bf16" or "fp32".
    """

    max_new_tokens: int = 256
    temperature: float = 0.3
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class SummarizeConfig:
    """A whole comparison. `train` is the training config both finetuned models derive from: the base checkpoint
    (`model.init_from`, or `model.size` from scratch), the Condensation segment length (`model.segment_length`), the
    total length of a training row (`data.seq_len`, the paper's 3K), the tokenizer (`data.tokenizer`, also the one
    whose token counts place an example in a bucket), the optimizer (the paper: lr 6e-6 -> 6e-7 cosine), the
    schedule, the storage and the MLflow experiment (`tracking.experiment`).

    name: the comparison's name: the MLflow parent run's name, its folder `<train.run.storage>/<name>`, and the prefix
        of the finetuned models' run folders (`<name>-condensation`, `<name>-full_finetuned`).
    models: which of "condensation", "full_finetuned", "instruct_zero_shot" to run, in the table's order.
    buckets: inner edges of the input-length buckets in tokens: [512, 1024] gives 0-512, 512-1024, 1024+ (Table II).
    data, generation, condensation, full_finetuned, instruct: see their classes.
    """

    name: str = "summarize"
    models: list = field(default_factory=lambda: list(MODELS))
    buckets: list = field(default_factory=lambda: [512, 1024])
    data: SummaryDataConfig = field(default_factory=SummaryDataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    condensation: FinetuneConfig = field(default_factory=FinetuneConfig)
    full_finetuned: FinetuneConfig = field(default_factory=FinetuneConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- derived -------------------------------------------------------------------------------------------------

    @property
    def folder(self) -> str:
        return os.path.join(self.train.run.storage, self.name)

    @property
    def max_input_tokens(self) -> int:
        d = self.data
        return d.max_input_tokens if d.max_input_tokens is not None else self.train.data.seq_len - self.generation.max_new_tokens

    @property
    def eval_spec(self):
        """The evaluation source: `data.eval_source`, else the first training source."""
        return self.data.eval_source if self.data.eval_source is not None else (self.data.train_sources or [None])[0]

    @property
    def synthetic(self) -> bool:
        """True when any of the data is generated (the output says so wherever it shows a score)."""
        return any(_source_name(s) == SYNTHETIC for s in [*self.data.train_sources, self.eval_spec] if s is not None)

    def label(self, model: str) -> str:
        if model == "instruct_zero_shot":
            return self.instruct.label or "Instruction model"
        own = getattr(self, model).label
        return own or f"{'Condensation' if model == 'condensation' else 'Full-Finetuned'} ({length_label(self.train.data.seq_len)})"

    def validate(self) -> "SummarizeConfig":
        validate(self)
        return self


def length_label(n: int) -> str:
    """3072 -> '3K', 5632 -> '5.5K' (the paper's labels), 384 -> '384'."""
    return f"{n / 1024:g}K" if n >= 1024 and n % 512 == 0 else str(n)


def _source_name(spec) -> str:
    return spec.get("source", "") if isinstance(spec, dict) else str(spec)


def validate(cfg: SummarizeConfig) -> None:
    """Raise ConfigError naming the first bad field; reads no weights, no tokenizer, starts nothing."""
    from .config import validate as validate_train
    from .evaluate.rouge import buckets_from_edges

    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError("name", f"must be a plain folder name, got {cfg.name!r}")
    if not cfg.models:
        raise ConfigError("models", f"at least one of {list(MODELS)}")
    for m in cfg.models:
        if m not in MODELS:
            raise ConfigError("models", f"unknown model {m!r}; known: {list(MODELS)}")
    if len(set(cfg.models)) != len(cfg.models):
        raise ConfigError("models", f"each model once, got {cfg.models}")
    try:
        buckets_from_edges(cfg.buckets)
    except (TypeError, ValueError):
        raise ConfigError("buckets", f"must be positive increasing ints (inner edges, e.g. [512, 1024]), got "
                                     f"{cfg.buckets!r}") from None
    d, g = cfg.data, cfg.generation
    if not d.train_sources and any(m in FINETUNED for m in cfg.models):
        raise ConfigError("data.train_sources", "at least one source to finetune on")
    for i, spec in enumerate(d.train_sources):
        _check_source(spec, f"data.train_sources.{i}")
    if d.eval_source is not None:
        _check_source(d.eval_source, "data.eval_source")
    elif d.train_sources:
        first = d.train_sources[0]
        name = _source_name(first)
        from .data.sources import looks_local

        if name != SYNTHETIC and looks_local(name):
            raise ConfigError("data.eval_source", f"required when the first training source is a local file "
                                                  f"({name}): the examples to evaluate on, e.g. its test split's file")
    else:
        raise ConfigError("data.eval_source", "required when there is no training source")
    if d.train_examples is not None and d.train_examples <= 0:
        raise ConfigError("data.train_examples", f"must be positive or None, got {d.train_examples}")
    if d.eval_examples <= 0:
        raise ConfigError("data.eval_examples", f"must be positive, got {d.eval_examples}")
    if d.eval_length_mode not in ("filter", "truncate"):
        raise ConfigError("data.eval_length_mode", f"must be 'filter' or 'truncate', got {d.eval_length_mode!r}")
    if d.length_multiple < 1:
        raise ConfigError("data.length_multiple", f"must be >= 1, got {d.length_multiple}")
    if d.max_input_tokens is not None and d.max_input_tokens < 16:
        raise ConfigError("data.max_input_tokens", f"must be at least 16 tokens, got {d.max_input_tokens}")
    s = d.synthetic
    if s.train_examples <= 0 or s.test_examples <= 0:
        raise ConfigError("data.synthetic", "train_examples and test_examples must be positive")
    if not 0 <= s.min_filler <= s.max_filler:
        raise ConfigError("data.synthetic.max_filler", f"needs 0 <= min_filler <= max_filler, got "
                                                       f"{s.min_filler}, {s.max_filler}")
    if g.max_new_tokens <= 0:
        raise ConfigError("generation.max_new_tokens", f"must be positive, got {g.max_new_tokens}")
    if g.temperature < 0:
        raise ConfigError("generation.temperature", f"must be >= 0 (0: greedy), got {g.temperature}")
    if g.batch_size <= 0:
        raise ConfigError("generation.batch_size", f"must be positive, got {g.batch_size}")
    if g.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("generation.device", f"one of auto, cpu, cuda; got {g.device!r}")
    if g.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("generation.device", "cuda asked for, but this process sees no GPU")
    if g.dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError("generation.dtype", f"one of auto, bf16, fp32; got {g.dtype!r}")
    if cfg.max_input_tokens < 16:
        raise ConfigError("data.max_input_tokens", f"train.data.seq_len - generation.max_new_tokens = "
                                                   f"{cfg.max_input_tokens} leaves no room for a prompt; set it")
    for m in FINETUNED:
        ft = getattr(cfg, m)
        if ft.steps is not None and ft.steps <= 0:
            raise ConfigError(f"{m}.steps", f"must be positive or None, got {ft.steps}")
    for m in (m for m in cfg.models if m in FINETUNED):
        try:
            validate_train(model_train_config(cfg, m))
        except ConfigError as e:  # name the field the user sets, not the derived config's
            where = {"model.init_from": f"{m}.init_from", "schedule.total_steps": f"{m}.steps"}.get(e.key, f"train.{e.key}")
            raise ConfigError(where, str(e).split(": ", 1)[-1]) from None
    if "instruct_zero_shot" in cfg.models:
        _check_instruct(cfg)


def _check_source(spec, key: str) -> None:
    from .data.sources import LOCAL_SUFFIXES, looks_local

    if isinstance(spec, dict):
        unknown = set(spec) - {"source", "fields"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key (a source mapping has: source, fields)")
        if not isinstance(spec.get("source"), str) or not spec["source"]:
            raise ConfigError(f"{key}.source", "must name a local path or hub id")
        fields = spec.get("fields")
        if fields is not None and (not isinstance(fields, (list, tuple)) or len(fields) != 2
                                   or not all(isinstance(f, str) and f for f in fields)):
            raise ConfigError(f"{key}.fields", f"must be [<article field>, <summary field>], got {fields!r}")
        source = spec["source"]
    elif isinstance(spec, str) and spec:
        source = spec
    else:
        raise ConfigError(key, f"must be a source name, hub id, local path or a mapping {{source, fields}}, got {spec!r}")
    if source == SYNTHETIC:
        return
    if looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            hint = next((f"; {h}" for part, h in _BUILD_HINTS.items() if part in path.as_posix()), "")
            raise ConfigError(key, f"{source}: no such file or folder{hint}")
        if path.is_dir() and not any(p.suffix in LOCAL_SUFFIXES for p in path.rglob("*") if p.is_file()):
            raise ConfigError(key, f"{source}: no .jsonl/.json/.parquet files there")
    elif "/" not in source:
        from .data.sources import KNOWN_DATASETS

        if source not in KNOWN_DATASETS:
            raise ConfigError(key, f"unknown source {source!r}: not a local path, not a hub id owner/name, not one of "
                                   f"{[SYNTHETIC, *KNOWN_DATASETS]}")


def _check_instruct(cfg: SummarizeConfig) -> None:
    from .pretrained import MissingExtraError, check_installed, is_converted, is_registered

    name = cfg.instruct.model
    if not name or not name.strip():
        raise ConfigError("instruct.model", "must be a folder, hub id or condensation.pretrained name")
    if is_registered(name) and not is_converted(name):
        try:
            check_installed(name)
        except MissingExtraError as e:
            if not cfg.instruct.optional:
                raise ConfigError("instruct.model", str(e)) from None
    elif name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise ConfigError("instruct.model", f"{name}: no such folder")


def instruct_available(cfg: SummarizeConfig) -> str | None:
    """None when the instruction model can run here; else why not (only an `optional` one gets this far)."""
    from .pretrained import MissingExtraError, check_installed, is_converted, is_registered

    name = cfg.instruct.model
    if is_registered(name) and not is_converted(name):
        try:
            check_installed(name)
        except MissingExtraError as e:
            return str(e)
    return None


def model_train_config(cfg: SummarizeConfig, model: str) -> TrainConfig:
    """The training config of a finetuned model: the base config with its run folder, steps and checkpoint, and for
    `full_finetuned` one segment per row (segment_length = data.seq_len: exactly Llama, rule 10)."""
    t, ft = cfg.train, getattr(cfg, model)
    seg = t.data.seq_len if model == "full_finetuned" else t.model.segment_length
    # a label for the resolved config and MLflow only: the rows come from `training_data`, passed to `fit` directly
    sources = "summarization:" + "+".join(_source_name(s) for s in cfg.data.train_sources)
    return dataclasses.replace(
        t,
        model=dataclasses.replace(t.model, segment_length=seg, init_from=ft.init_from or t.model.init_from),
        data=dataclasses.replace(t.data, source=sources, num_rows=None, dataset_options={}),
        schedule=dataclasses.replace(t.schedule, total_steps=ft.steps or t.schedule.total_steps),
        run=dataclasses.replace(t.run, name=f"{cfg.name}-{model}"),
    )


def _eval_device(cfg: SummarizeConfig):
    import torch

    want = cfg.generation.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = cfg.generation.dtype
    if dtype == "auto":
        dtype = "bf16" if want == "cuda" else "fp32"
    return torch.device(want), {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


# ----------------------------------------------------------------------------------------------------------------
# Presets: small functions over the defaults


def default_preset() -> SummarizeConfig:
    """The embedded default: the paper's setting scaled down to a tiny model trained from scratch on 2 CPU cores in
    minutes, on SYNTHETIC data (generated reports with templated summaries, `condensation.data.synthetic_summaries`):
    rows of 384 tokens (the paper's 3K / 8) in segments of 64 (512 / 8), buckets at 128 and 256 prompt tokens (2 and 4
    segments: a generated article is never shorter than one), 48 new tokens (a reference is about 46). The
    instruction model is SmolLM2-135M-Instruct when its extra is installed, else left out with a note."""
    train = merge(TrainConfig(), {
        "model": {"size": "tiny-cpu", "segment_length": 64, "overrides": {"loss_reduction": "token_mean"}},
        "data": {"seq_len": 384},
        "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 10, "weight_decay": 0.0},
        "schedule": {"total_steps": 200, "global_batch": 8, "per_worker_batch": 4, "num_workers": 2,
                     "cpus_per_worker": 0.75},
        "checkpoint": {"every": 100, "keep": 1},
        "tracking": {"log_every": 25, "experiment": "summarization"},
        "run": {"storage": "runs"},
    })
    return SummarizeConfig(
        name="summarize-cpu",
        buckets=[128, 256],
        data=SummaryDataConfig(train_sources=[SYNTHETIC], eval_examples=48, length_multiple=16),
        generation=GenerationConfig(max_new_tokens=48, batch_size=8),
        instruct=InstructConfig(model="smollm2-135m-instruct", optional=True),
        train=train,
    )


def debug_preset() -> SummarizeConfig:
    """Seconds: the machinery (training both models, generation, ROUGE, MLflow) for tests, not learning."""
    cfg = default_preset()
    train = merge(cfg.train, {"model": {"size": "debug", "segment_length": 32, "overrides": {"vocab_size": 2048}},
                              "data": {"seq_len": 256}, "optim": {"warmup_steps": 1},
                              "schedule": {"total_steps": 2, "global_batch": 2, "per_worker_batch": 2, "num_workers": 1,
                                           "cpus_per_worker": 1},
                              "checkpoint": {"every": 0, "keep": 1}, "tracking": {"log_every": 1}})
    return dataclasses.replace(
        cfg, name="summarize-debug", buckets=[128, 160], train=train,
        data=dataclasses.replace(cfg.data, eval_examples=6, length_multiple=1,
                                 synthetic=SyntheticDataConfig(train_examples=16, test_examples=12, max_filler=3)),
        generation=GenerationConfig(max_new_tokens=8, batch_size=4),
    )


def paper_preset() -> SummarizeConfig:
    """Table II / III: Llama-3.2-3B finetuned on CNN/DailyMail (hub) at 3K total length, segment 512, lr 6e-6 -> 6e-7
    cosine, global batch 64, bf16, ZeRO-2, 8 GPUs; Condensation for 3700 steps, the full-attention baseline for 112
    (Table III's counts); Llama-3.2-3B-Instruct zero-shot; evaluation on the test split at temperature 0.3 with 256
    new tokens. The paper's Condensation starts from its continual pretraining on FineWeb-edu over 6K (9426 steps):
    set `condensation.init_from` to that export (`workloads/pretrain.py`); by default it starts from Llama-3.2-3B."""
    train = merge(TrainConfig(), {
        "model": {"size": "llama-3.2-3b", "init_from": "meta-llama/Llama-3.2-3B", "segment_length": 512,
                  "overrides": {"compile_cells": True, "weight_grads": "deferred", "loss_reduction": "token_mean"}},
        "data": {"seq_len": 3072, "tokenizer": "meta-llama/Llama-3.2-3B"},
        "optim": {"lr": 6e-6, "min_lr": 6e-7, "warmup_steps": 20, "weight_decay": 0.0},
        "schedule": {"total_steps": 3700, "global_batch": 64, "per_worker_batch": 1, "num_workers": 8, "use_gpu": True,
                     "cpus_per_worker": 8, "precision": "bf16", "torch_threads": None},
        "checkpoint": {"every": 200, "keep": 2},
        "tracking": {"log_every": 10, "experiment": "summarization"},
        "run": {"storage": "runs"},
    })
    return SummarizeConfig(
        name="summarize-paper",
        data=SummaryDataConfig(train_sources=["cnn_dailymail"], eval_split="test", eval_examples=2000,
                               length_multiple=32, cache_rows=False),
        generation=GenerationConfig(max_new_tokens=256, temperature=0.3, batch_size=16),
        full_finetuned=FinetuneConfig(steps=112),
        instruct=InstructConfig(model="meta-llama/Llama-3.2-3B-Instruct"),
        train=train,
    )


def paper_booksum_preset() -> SummarizeConfig:
    """The paper's second experiment: CNN/DailyMail + BookSum filtered to 5.5K (3855 steps); no full-attention
    baseline at that length (the paper's could not fit), evaluated on CNN/DailyMail's test split."""
    cfg = paper_preset()
    train = merge(cfg.train, {"data": {"seq_len": 5632}, "schedule": {"total_steps": 3855},
                              "model": {"overrides": {"checkpoint_group_steps": 8}}})
    return dataclasses.replace(cfg, name="summarize-paper-5.5k", models=["condensation", "instruct_zero_shot"],
                               train=train, data=dataclasses.replace(cfg.data, train_sources=["cnn_dailymail", "booksum"],
                                                                     eval_source="cnn_dailymail", max_input_tokens=2816))


def h200_preset() -> SummarizeConfig:
    """One H200 with a real pretrained Llama that installs offline (SmolLM2-135M-Instruct): both finetuned models start
    from it, it is also the zero-shot instruction model, and CNN/DailyMail comes from the hub or, offline, from local
    files in its schema (`data.train_sources=[/data/cnn/train.jsonl] data.eval_source=/data/cnn/test.jsonl`). The
    paper's lengths (3K, segment 512, 256 new tokens); a learning rate for a 135M model (untested on a GPU here)."""
    train = merge(TrainConfig(), {
        "model": {"init_from": "smollm2-135m-instruct", "segment_length": 512,
                  "overrides": {"loss_reduction": "token_mean"}},
        "data": {"seq_len": 3072, "tokenizer": "smollm2-135m-instruct"},
        "optim": {"lr": 3e-5, "min_lr": 3e-6, "warmup_steps": 20, "weight_decay": 0.0},
        "schedule": {"total_steps": 500, "global_batch": 32, "per_worker_batch": 16, "num_workers": 1, "use_gpu": True,
                     "cpus_per_worker": 4, "precision": "bf16", "torch_threads": None},
        "checkpoint": {"every": 100, "keep": 1},
        "tracking": {"log_every": 10, "experiment": "summarization"},
        "run": {"storage": "runs"},
    })
    return SummarizeConfig(
        name="summarize-smollm2",
        data=SummaryDataConfig(train_sources=["cnn_dailymail"], eval_split="test", eval_examples=1000,
                               length_multiple=32, train_examples=32 * 500, cache_rows=True),
        generation=GenerationConfig(max_new_tokens=256, temperature=0.3, batch_size=32),
        instruct=InstructConfig(model="smollm2-135m-instruct"),
        train=train,
    )


# The man-page summaries of `workloads/make_summaries.py` (condensation.data.manpages), in the checkout's data/ folder.
MANPAGES_DIR = Path(__file__).resolve().parents[2] / "data" / "summaries" / "manpages"
_BUILD_HINTS = {"summaries/manpages": "build it with `python workloads/make_summaries.py` (condensation.data.manpages)"}


def h200_manpages_preset() -> SummarizeConfig:
    """The `h200` preset on real data that needs no hub: Linux man pages summarized by their NAME line
    (`condensation.data.manpages`; `python workloads/make_summaries.py` builds `data/summaries/manpages/` from the
    manpages and manpages-dev .debs: ~970 training and ~125 test pages, a prompt of 75 to 49K SmolLM2 tokens, median
    ~690; references of 2-23 words, median 6 tokens). Sized for about 5 minutes on one H200 for the whole comparison
    (an estimate from the SmolLM2 passkey run's throughput, not yet measured):

    - rows of 3K tokens, segment 512 (the paper's; ~88% of the training pages fit, the longer are skipped), global
      batch 16 (49K padded tokens a step, ~0.5 s at SmolLM2-135M's ~100K tokens/s), 80 steps per finetuned model
      (~1.5 epochs of the 857 pages that fit; ~1.5 min each with worker start and export), lr 1e-4 -> 1e-5 after 8
      warmup steps (what the SmolLM2 passkey run used: `h200`'s 3e-5 is for 500 steps);
    - every test page whose prompt fits (3072 - 64 = 3008 tokens; ~114: about 57 / 36 / 21 in the 0-512 /
      512-1024 / 1024+ buckets, the paper's), generated at temperature 0.3 like the paper but with 64 new tokens,
      not 256: the references are one line (median 6 tokens, longest 68), so 64 lets every reference be written
      in full while a model that never stops (the zero-shot one) costs a quarter of the time; the paper's 256
      is `generation.max_new_tokens=256`.
    """
    cfg = h200_preset()
    train = merge(cfg.train, {"optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 8},
                              "schedule": {"total_steps": 80, "global_batch": 16, "per_worker_batch": 16},
                              "checkpoint": {"every": 0, "keep": 1}})
    return dataclasses.replace(
        cfg, name="summarize-manpages", train=train,
        data=dataclasses.replace(cfg.data, train_sources=[str(MANPAGES_DIR / "train.jsonl")],
                                 eval_source=str(MANPAGES_DIR / "test.jsonl"), eval_split="test", eval_examples=1000,
                                 train_examples=None),
        generation=dataclasses.replace(cfg.generation, max_new_tokens=64),
    )


PRESETS: dict[str, Callable[[], SummarizeConfig]] = {
    "default": default_preset, "debug": debug_preset, "paper": paper_preset, "paper-booksum": paper_booksum_preset,
    "h200": h200_preset, "h200-manpages": h200_manpages_preset,
}


def load_summarize_config(preset: str = "default", yaml_path: str | None = None,
                          overrides: list[str] | None = None) -> SummarizeConfig:
    """preset <- YAML file <- `key.sub=value` overrides, validated (raises ConfigError naming the field)."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if yaml_path:
        cfg = merge(cfg, load_yaml(yaml_path))
    return merge(cfg, parse_overrides(overrides)).validate()


def check_inputs(cfg: SummarizeConfig) -> None:
    """What can be known before Ray starts, beyond `validate`: the tokenizer loads and fits the finetuned models'
    vocabulary, and the first row of every local source has the fields it is read with. Raises ConfigError."""
    from .data.sources import hub_spec, looks_local
    from .data.summarization import CNN_FIELDS
    from .tokenizer import load_tokenizer
    from .train.data import _first_row
    from .train.trainer import _vocab_size

    try:
        n_tokens = len(load_tokenizer(cfg.train.data.tokenizer))
    except OSError as e:
        raise ConfigError("train.data.tokenizer", str(e)) from None
    for m in (m for m in cfg.models if m in FINETUNED):
        try:
            vocab = _vocab_size(model_train_config(cfg, m))
        except OSError as e:
            raise ConfigError(f"{m}.init_from", f"cannot read its config: {e}") from None
        if n_tokens > vocab:
            raise ConfigError("train.data.tokenizer", f"{cfg.train.data.tokenizer or 'the builtin tokenizer'} has "
                                                      f"{n_tokens} tokens, more than {m}'s vocab_size {vocab}")
    specs = [(f"data.train_sources.{i}", s) for i, s in enumerate(cfg.data.train_sources)]
    if cfg.data.eval_source is not None:
        specs.append(("data.eval_source", cfg.data.eval_source))
    for key, spec in specs:
        source = _source_name(spec)
        if source == SYNTHETIC or not looks_local(source):
            continue
        fields = tuple(spec["fields"]) if isinstance(spec, dict) and spec.get("fields") else None
        fields = fields or ((hub_spec(source).fields[:2]) if hub_spec(source) else CNN_FIELDS)
        path = Path(source).expanduser()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json", ".parquet"))
        row = _first_row(str(files[0])) if files else None
        missing = [f for f in fields if row is not None and f not in row]
        if missing:
            raise ConfigError(key, f"the first row of {files[0]} has no field {missing[0]!r} (its fields: {list(row)}); "
                                   f"give the schema as {{source: {source}, fields: [<article field>, <summary field>]}}")


# ----------------------------------------------------------------------------------------------------------------
# Data


def _resolve_spec(cfg: SummarizeConfig, spec, split: str):
    """A config source -> what `summarization_dataset` takes: a path / id, or (path, (article, summary) fields)."""
    from .data.synthetic_summaries import write_synthetic_summaries

    source = _source_name(spec)
    if source == SYNTHETIC:
        s = cfg.data.synthetic
        paths = write_synthetic_summaries(os.path.join(cfg.folder, SYNTHETIC), s.train_examples, s.test_examples,
                                          seed=s.seed, max_filler=s.max_filler, min_filler=s.min_filler)
        return paths["train" if split == "train" else "test"]
    if isinstance(spec, dict) and spec.get("fields"):
        return (source, tuple(spec["fields"]))
    return source


def training_data(cfg: SummarizeConfig, tokenizer):
    """(Ray Dataset of {"input_ids", "labels"} int64[seq_len] rows, its DataReport): the paper's format, loss on the
    summary only, examples longer than the total length skipped."""
    from .data import summarization_dataset
    from .data.pipeline import train_view

    d = cfg.data
    specs = [_resolve_spec(cfg, s, d.train_split) for s in d.train_sources]
    ds, report = summarization_dataset(specs if len(specs) > 1 else specs[0], tokenizer, cfg.train.data.seq_len,
                                       train=True, mode="filter", split=d.train_split)
    if d.train_examples is not None:
        ds = ds.limit(d.train_examples)
    ds = train_view(ds)
    if not d.cache_rows:
        return ds, report
    ds = ds.materialize()
    n, need = ds.count(), cfg.train.schedule.global_batch
    if n < need:  # a config mistake (lengths), not something a worker restart would fix
        raise ConfigError("train.data.seq_len", f"only {n} training rows fit {cfg.train.data.seq_len} tokens (prompt + "
                                                f"summary; {report.counts().get('skipped_too_long', 0)} were longer), "
                                                f"fewer than one global batch of {need}")
    return ds, report


@dataclass
class EvalExample:
    """One evaluation example: the prompt in the paper's format (ids in the training tokenizer), the article it
    holds (text, as cut), the reference summary and the prompt's length in tokens (what places it in a bucket)."""

    index: int
    prompt_ids: list
    article: str
    reference: str
    input_length: int


def evaluation_set(cfg: SummarizeConfig, tokenizer) -> list[EvalExample]:
    """The first `data.eval_examples` examples of the evaluation source whose prompt fits `max_input_tokens`
    (or is cut to it), each cut to a multiple of `data.length_multiple` tokens."""
    from .data import summarization_dataset
    from .data.summarization import _template_ids

    import ray.data

    d = cfg.data
    options = ray.data.DataContext.get_current().execution_options
    was, options.preserve_order = options.preserve_order, True  # the first N in file order, the same every run
    try:
        ds, _ = summarization_dataset(_resolve_spec(cfg, cfg.eval_spec, d.eval_split), tokenizer,
                                      cfg.max_input_tokens, train=False, mode=d.eval_length_mode, split=d.eval_split)
        rows = ds.limit(d.eval_examples).take_all()
    finally:
        options.preserve_order = was
    head, tail = _template_ids(tokenizer)
    out = []
    for i, row in enumerate(rows):
        ids = [int(t) for t in row["input_ids"]]
        n_art = int(row["article_tokens"])
        article = ids[len(head):len(head) + n_art]
        cut = len(ids) % d.length_multiple
        if cut and n_art > cut:
            article = article[:-cut]
        prompt = head + article + tail
        out.append(EvalExample(i, prompt, tokenizer.decode(article, clean_up_tokenization_spaces=False),
                               str(row["reference"]), len(prompt)))
    if not out:
        raise ConfigError("data.eval_source", f"no evaluation example fits max_input_tokens={cfg.max_input_tokens}")
    return out


def instruct_prompts(examples: list[EvalExample], tokenizer, use_chat_template: bool) -> tuple[list[list[int]], str]:
    """The instruction model's prompts: the paper's prompt as the user's turn of the chat template, the assistant's
    turn opened (when the tokenizer has a template and it is wanted), else the paper's prompt as the finetuned
    models read it (bos + template + article, each piece encoded on its own). Returns (ids, how)."""
    from .data.pipeline import encode_texts
    from .data.summarization import _template_ids, format_summary_prompt

    if use_chat_template and getattr(tokenizer, "chat_template", None):
        out = []
        for ex in examples:
            text = tokenizer.apply_chat_template([{"role": "user", "content": format_summary_prompt(ex.article).rstrip()}],
                                                 tokenize=False, add_generation_prompt=True)
            out.append(encode_texts(tokenizer, [text])[0])
        return out, "chat template"
    head, tail = _template_ids(tokenizer)
    return [head + a + tail for a in encode_texts(tokenizer, [ex.article for ex in examples])], "paper prompt"


# ----------------------------------------------------------------------------------------------------------------
# MLflow


def _client(cfg: SummarizeConfig):
    from mlflow import MlflowClient

    from .train.tracking import tracking_uri

    return MlflowClient(tracking_uri(cfg.train))


def ensure_parent_run(cfg: SummarizeConfig) -> str:
    """The comparison's MLflow parent run, created once and found again from its id file in `<storage>/<name>`."""
    from .train.tracking import artifact_location, ensure_experiment, reopen_parent_run

    os.makedirs(cfg.folder, exist_ok=True)
    id_file = os.path.join(cfg.folder, PARENT_ID_FILE)
    client = _client(cfg)
    if (run_id := reopen_parent_run(client, id_file)) is not None:
        return run_id
    exp_id = ensure_experiment(client, cfg.train.tracking.experiment, artifact_location(cfg.train))
    data = "synthetic" if cfg.synthetic else ",".join(_source_name(s) for s in cfg.data.train_sources)
    run = client.create_run(exp_id, run_name=cfg.name, tags={"summarize": cfg.name, "summarize.data": data})
    if cfg.synthetic:
        from .data.synthetic_summaries import SYNTHETIC_NOTE

        client.set_tag(run.info.run_id, "mlflow.note.content", SYNTHETIC_NOTE)
    client.log_text(run.info.run_id, to_yaml(cfg), "summarize_config.yaml")
    for k, v in {"models": ",".join(cfg.models), "total_length": cfg.train.data.seq_len,
                 "segment_length": cfg.train.model.segment_length, "buckets": ",".join(map(str, cfg.buckets)),
                 "max_new_tokens": cfg.generation.max_new_tokens, "temperature": cfg.generation.temperature,
                 "eval_examples": cfg.data.eval_examples, "data": data}.items():
        client.log_param(run.info.run_id, k, v)
    with open(id_file + ".tmp", "w") as f:
        f.write(run.info.run_id)
    os.replace(id_file + ".tmp", id_file)
    return run.info.run_id


def end_runs(cfg: SummarizeConfig, status: str = "KILLED") -> list[str]:
    """End the comparison's MLflow runs still RUNNING (parent, training runs, the instruction model's) with `status`,
    e.g. after Ctrl-C; started again, the comparison marks them RUNNING as it continues."""
    from .train.tracking import end_run, end_run_id, tracking_uri

    if not cfg.train.tracking.enabled:
        return []
    ended = [end_run(model_train_config(cfg, m), status) for m in cfg.models if m in FINETUNED]
    uri = tracking_uri(cfg.train)
    for path in (os.path.join(cfg.folder, "eval", "instruct_zero_shot", "mlflow_run_id"),
                 os.path.join(cfg.folder, PARENT_ID_FILE)):
        if os.path.exists(path):
            ended.append(end_run_id(uri, open(path).read().strip(), status))
    return [r for r in ended if r]


# ----------------------------------------------------------------------------------------------------------------
# Running it


@dataclass
class ModelOutcome:
    """What one model of the comparison left: its scores, where its predictions are, its checkpoint and MLflow run."""

    model: str
    label: str
    result: dict
    predictions_path: str
    run_id: str | None
    hf_path: str | None = None
    trained: bool = False
    evaluated: bool = False
    seconds: float = 0.0


@dataclass
class SummarizeResult:
    """The comparison: per model its outcome, Table II as markdown, the folder with the files, the parent run."""

    outcomes: dict
    table: str
    folder: str
    parent_run_id: str | None
    synthetic: bool
    skipped: dict = field(default_factory=dict)

    @property
    def results(self) -> dict:
        return {o.label: o.result for o in self.outcomes.values()}


def finetune(cfg: SummarizeConfig, model: str, datasets: dict, report, parent: str | None,
             log: Callable[[str], None] = print) -> tuple[str, str | None, bool]:
    """Train one finetuned model (once: a finished run is found again by its record and export); returns
    (HF export, MLflow run id, trained now)."""
    from .train import fit
    from .train.checkpoints import resume_point

    tcfg = model_train_config(cfg, model)
    run_dir = os.path.join(tcfg.run.storage, tcfg.run.name)
    done = _read_json(os.path.join(run_dir, DONE_FILE))
    if done is not None and os.path.isdir(done["hf_path"]):
        log(f"{model}: training already finished ({done['hf_path']}); not training again")
        return done["hf_path"], done.get("run_id"), False
    if parent:
        tcfg = dataclasses.replace(tcfg, tracking=dataclasses.replace(tcfg.tracking, parent_run_id=parent))
    ckpt = resume_point(run_dir)
    how = (f"segment {tcfg.model.segment_length}" if model == "condensation"
           else f"one segment of {tcfg.data.seq_len} = full attention")
    log(f"{model}: finetuning {tcfg.schedule.total_steps} steps at {tcfg.data.seq_len} tokens ({how}), lr "
        f"{tcfg.optim.lr:g} -> {tcfg.optim.min_lr:g}, from {tcfg.model.init_from or 'scratch (' + tcfg.model.size + ')'}"
        + (f"; resuming from checkpoint {ckpt[0]}" if ckpt else ""))
    res = fit(tcfg, datasets, data_stats=report)
    if res.hf_path is None:
        raise RuntimeError(f"{model}: training left no HF export (checkpoint.export_hf is off?)")
    if res.mlflow_run_id and cfg.train.tracking.enabled:
        from .evaluate.tracking import MODEL_TAG

        client = _client(cfg)
        client.set_tag(res.mlflow_run_id, MODEL_TAG, model)
        client.set_tag(res.mlflow_run_id, "hf_path", res.hf_path)
    _write_json(os.path.join(res.run_dir, DONE_FILE), {"hf_path": res.hf_path, "run_id": res.mlflow_run_id,
                                                       "step": res.step})
    return res.hf_path, res.mlflow_run_id, True


def load_model(model: str, cfg: SummarizeConfig, hf_path: str | None, device, dtype):
    """(model, tokenizer, padded batches?) for generation: Condensation as `CondensationForCausalLM`, the full-attention
    baseline and the instruction model as plain transformers models (sdpa)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from .modeling import CondensationForCausalLM
    from .pretrained import resolve_pretrained
    from .tokenizer import load_tokenizer

    if model == "condensation":
        net = CondensationForCausalLM.from_pretrained(hf_path, dtype=dtype)
        return net.to(device).eval(), load_tokenizer(cfg.train.data.tokenizer), False
    if model == "full_finetuned":
        net = LlamaForCausalLM.from_pretrained(hf_path, dtype=dtype, attn_implementation="sdpa")
        return net.to(device).eval(), load_tokenizer(cfg.train.data.tokenizer), True
    folder = resolve_pretrained(cfg.instruct.model)
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return net.to(device).eval(), load_tokenizer(cfg.instruct.tokenizer or folder), True


def eval_signature(cfg: SummarizeConfig, model: str, checkpoint: str | None, examples: list[EvalExample]) -> str:
    """A hash of everything an evaluation's numbers depend on (settings, checkpoint, the examples themselves): a
    result with the same one is reused."""
    keep = {"examples": hashlib.sha256(json.dumps([(e.prompt_ids, e.reference) for e in examples]).encode()).hexdigest(),"data": dataclasses.asdict(cfg.data), "generation": dataclasses.asdict(cfg.generation),
            "buckets": cfg.buckets, "max_input_tokens": cfg.max_input_tokens, "checkpoint": checkpoint,
            "tokenizer": cfg.train.data.tokenizer, "model": model,
            "instruct": dataclasses.asdict(cfg.instruct) if model == "instruct_zero_shot" else None}
    keep["data"].pop("cache_rows")
    keep["data"].pop("train_examples")
    keep["generation"].pop("batch_size")  # equal-length batches give the same text whatever their size
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_model(cfg: SummarizeConfig, model: str, examples: list[EvalExample], hf_path: str | None,
                   log: Callable[[str], None] = print) -> tuple[dict, str, bool, float]:
    """Generate and score one model (or reuse its result when the signature matches); writes
    `<folder>/eval/<model>/predictions.jsonl` (one row per example: index, input_length, bucket, reference,
    prediction) and `rouge.json`. Returns (result, predictions path, evaluated now, seconds)."""
    import torch

    from .evaluate.rouge import bucket_of, buckets_from_edges, generate_summaries, rouge_by_length

    out_dir = Path(cfg.folder) / "eval" / model
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path, rouge_path = out_dir / "predictions.jsonl", out_dir / "rouge.json"
    sig = eval_signature(cfg, model, hf_path or cfg.instruct.model, examples)
    old = _read_json(rouge_path)
    if old is not None and old.get("signature") == sig and pred_path.is_file():
        log(f"{model}: already evaluated with these settings ({rouge_path}); not generating again")
        return _nan_from_none(old["result"]), str(pred_path), False, float(old.get("seconds", 0.0))
    device, dtype = _eval_device(cfg)
    t0 = time.time()
    net, tokenizer, padded = load_model(model, cfg, hf_path, device, dtype)
    how = "paper prompt"
    if model == "instruct_zero_shot":
        prompts, how = instruct_prompts(examples, tokenizer, cfg.instruct.chat_template)
    else:
        prompts = [ex.prompt_ids for ex in examples]
    g = cfg.generation
    preds = generate_summaries(net, tokenizer, prompts, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                               do_sample=g.temperature > 0, seed=g.seed, batch_size=g.batch_size, progress=False,
                               padded=padded)
    seconds = time.time() - t0
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    buckets = buckets_from_edges(cfg.buckets)
    refs, lengths = [ex.reference for ex in examples], [ex.input_length for ex in examples]
    result = rouge_by_length(preds, refs, lengths, buckets)
    with open(str(pred_path) + ".tmp", "w") as f:
        for ex, pred, ids in zip(examples, preds, prompts):
            f.write(json.dumps({"index": ex.index, "input_length": ex.input_length,
                                "bucket": bucket_of(ex.input_length, buckets), "model_prompt_tokens": len(ids),
                                "reference": ex.reference, "prediction": pred}) + "\n")
    os.replace(str(pred_path) + ".tmp", pred_path)
    _write_json(rouge_path, {"signature": sig, "model": model, "label": cfg.label(model), "prompt": how,
                             "seconds": round(seconds, 1), "result": _nan_to_none(result)})
    log(f"{model}: {len(examples)} summaries in {seconds:.0f} s ({how}); overall ROUGE-1/2/L "
        f"{result['overall']['rouge1']:.4f} / {result['overall']['rouge2']:.4f} / {result['overall']['rougeL']:.4f}")
    return result, str(pred_path), True, seconds


def _instruct_run(cfg: SummarizeConfig, parent: str, client) -> str:
    """The instruction model's MLflow run (nested under the parent), created once."""
    from .evaluate.tracking import MODEL_TAG

    id_file = os.path.join(cfg.folder, "eval", "instruct_zero_shot", "mlflow_run_id")
    if os.path.exists(id_file):
        run_id = open(id_file).read().strip()
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:
            pass
    exp_id = client.get_run(parent).info.experiment_id
    run = client.create_run(exp_id, run_name=f"{cfg.name}-instruct_zero_shot",
                            tags={"mlflow.parentRunId": parent, MODEL_TAG: "instruct_zero_shot"})
    for k, v in {"model": cfg.instruct.model, "tokenizer": cfg.instruct.tokenizer or "the model's own",
                 "chat_template": cfg.instruct.chat_template}.items():
        client.log_param(run.info.run_id, k, v)
    os.makedirs(os.path.dirname(id_file), exist_ok=True)
    with open(id_file, "w") as f:
        f.write(run.info.run_id)
    return run.info.run_id


def table_title(cfg: SummarizeConfig) -> str:
    data = ("SYNTHETIC data (generated reports, templated summaries)" if cfg.synthetic else
            _source_name(cfg.eval_spec) + f" ({cfg.data.eval_split})")
    return (f"{cfg.name}: ROUGE F1 on {data}; trained at {length_label(cfg.train.data.seq_len)} tokens, segment "
            f"{cfg.train.model.segment_length}; temperature {cfg.generation.temperature:g}, "
            f"{cfg.generation.max_new_tokens} new tokens")


def run_summarization(cfg: SummarizeConfig, log: Callable[[str], None] = print) -> SummarizeResult:
    """Finetune, generate and score every model of `cfg.models`; log the comparison. Ray must be initialised by the
    caller (the data layer and the training layer run on it)."""
    from .evaluate.plots import plot_rouge_by_length, plot_rouge_overall
    from .evaluate.rouge import format_rouge_table
    from .evaluate.tracking import MODEL_TAG, log_rouge, log_rouge_comparison
    from .tokenizer import load_tokenizer
    from .train.tracking import tracking_uri

    cfg.validate()
    skipped: dict[str, str] = {}
    models = list(cfg.models)
    if "instruct_zero_shot" in models and (why := instruct_available(cfg)):
        skipped["instruct_zero_shot"] = why
        models.remove("instruct_zero_shot")
        log(f"instruct_zero_shot: left out (instruct.optional): {why}")
    if cfg.synthetic:
        from .data.synthetic_summaries import SYNTHETIC_NOTE

        log(f"data: {SYNTHETIC_NOTE}")
    tracking = cfg.train.tracking.enabled
    parent = ensure_parent_run(cfg) if tracking else None
    client = _client(cfg) if tracking else None
    uri = tracking_uri(cfg.train)
    tokenizer = load_tokenizer(cfg.train.data.tokenizer)

    hf: dict[str, tuple[str, str | None, bool]] = {}
    todo = [m for m in models if m in FINETUNED]
    if todo:
        datasets, report = None, None
        for m in todo:
            done = _read_json(os.path.join(cfg.train.run.storage, f"{cfg.name}-{m}", DONE_FILE))
            if done is None or not os.path.isdir(done["hf_path"]):
                if datasets is None:
                    ds, report = training_data(cfg, tokenizer)
                    datasets = {"train": ds}
            hf[m] = finetune(cfg, m, datasets, report, parent, log)

    examples = evaluation_set(cfg, tokenizer)
    from .evaluate.rouge import bucket_name, bucket_of, buckets_from_edges

    counts = {bucket_name(b): 0 for b in buckets_from_edges(cfg.buckets)}
    for ex in examples:
        counts[bucket_of(ex.input_length, buckets_from_edges(cfg.buckets))] += 1
    log(f"evaluation: {len(examples)} examples, prompts of {min(e.input_length for e in examples)}-"
        f"{max(e.input_length for e in examples)} tokens; by bucket: "
        + ", ".join(f"{b} {n}" for b, n in counts.items()))

    outcomes: dict[str, ModelOutcome] = {}
    for m in models:
        hf_path, run_id, trained = hf.get(m, (None, None, False))
        if m == "instruct_zero_shot" and tracking:
            run_id = _instruct_run(cfg, parent, client)
        try:
            result, pred_path, evaluated, seconds = evaluate_model(cfg, m, examples, hf_path, log)
        except BaseException:
            if m == "instruct_zero_shot" and client is not None and run_id:
                client.set_terminated(run_id, "FAILED")
            raise
        label = cfg.label(m)
        if tracking and run_id:
            log_rouge(result, label=label, run_id=run_id, tracking_uri=uri, predictions_path=pred_path)
            client.set_tag(run_id, MODEL_TAG, m)
            client.set_tag(run_id, "summarize.data", "synthetic" if cfg.synthetic else "real")
            client.log_metric(run_id, "generation_seconds", seconds)
            if m == "instruct_zero_shot":
                client.set_terminated(run_id, "FINISHED")
        outcomes[m] = ModelOutcome(m, label, result, pred_path, run_id, hf_path, trained, evaluated, seconds)

    results = {o.label: o.result for o in outcomes.values()}
    title = table_title(cfg)
    table = format_rouge_table(results)
    folder = Path(cfg.folder)
    (folder / "rouge_table.md").write_text(f"{title}\n\n{table}\n")
    _write_json(folder / "results.json", {"title": title, "synthetic": cfg.synthetic, "skipped": skipped,
                                          "results": {k: _nan_to_none(v) for k, v in results.items()},
                                          "models": {m: {"label": o.label, "hf_path": o.hf_path, "run_id": o.run_id,
                                                         "predictions": o.predictions_path} for m, o in outcomes.items()}})
    plot_rouge_overall(results, folder / "rouge_overall.png", title=title)
    plot_rouge_by_length(results, folder / "rouge_by_length.png", title=title)
    with open(folder / "eval_set.jsonl", "w") as f:
        for ex in examples:
            f.write(json.dumps({"index": ex.index, "input_length": ex.input_length, "article": ex.article,
                                "reference": ex.reference}) + "\n")
    if tracking:
        log_rouge_comparison(results, run_id=parent, tracking_uri=uri, title=title)
        client.log_artifact(parent, str(folder / "eval_set.jsonl"), "summaries")
        if skipped:
            client.set_tag(parent, "skipped", "; ".join(f"{k}: {v}" for k, v in skipped.items())[:5000])
        client.set_terminated(parent, "FINISHED")
    return SummarizeResult(outcomes, table, str(folder), parent, cfg.synthetic, skipped)


# ----------------------------------------------------------------------------------------------------------------
# Comparing the runs of an experiment


def compare_runs(tracking_uri: str, experiment: str, out_dir: str | os.PathLike, parent: str | None = None,
                 ) -> tuple[str, list[Path]]:
    """Table II and Fig. 9 from the model runs of an MLflow experiment (every run tagged `summarize.model`, or those
    under the parent run `parent`, by name or id). Models are named by their label, prefixed with their comparison's
    name when the runs come from several. Writes `<out_dir>/rouge_comparison.md`, `rouge_overall.png` and
    `rouge_by_length.png`; returns (the markdown, the pictures)."""
    from .evaluate.plots import plot_rouge_by_length, plot_rouge_overall
    from .evaluate.rouge import format_rouge_table
    from .evaluate.tracking import load_rouge_runs

    runs = load_rouge_runs(tracking_uri, experiment, parent)
    if not runs:
        raise ValueError(f"no runs with ROUGE results in experiment {experiment!r}"
                         + (f" under parent {parent!r}" if parent else ""))
    several = len({r["parent_run_id"] for r in runs}) > 1
    results: dict[str, dict] = {}
    for r in runs:
        name = f"{r['parent_name']}: {r['label']}" if several and r["parent_name"] else r["label"]
        if name in results:  # the same model evaluated twice under one name: keep the newest, say which
            name = f"{name} [{r['run_id'][:8]}]"
        results[name] = r["result"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"experiment {experiment}" + (f", {parent}" if parent else "") + f": {len(results)} model runs"
    table = format_rouge_table(results)
    lines = [title, "", table, "", "| run | model | MLflow run id | status |", "|---|---|---|---|"]
    lines += [f"| {r['parent_name'] or '-'} | {r['model']} | {r['run_id']} | {r['status']} |" for r in runs]
    (out / "rouge_comparison.md").write_text("\n".join(lines) + "\n")
    pictures = [plot_rouge_overall(results, out / "rouge_overall.png", title=title),
                plot_rouge_by_length(results, out / "rouge_by_length.png", title=title)]
    return "\n".join(lines), pictures


# ----------------------------------------------------------------------------------------------------------------


def _read_json(path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path, obj) -> None:
    path = str(path)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _nan_to_none(result: dict) -> dict:
    return {b: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for b, row in result.items()}


def _nan_from_none(result: dict) -> dict:
    return {b: {k: (math.nan if v is None else v) for k, v in row.items()} for b, row in result.items()}
