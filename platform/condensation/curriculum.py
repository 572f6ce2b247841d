"""The passkey curriculum of the paper (Table III): finetuning stages at growing total lengths, each starting from the
previous stage's weights, with a passkey accuracy grid (lengths x needle depths) after every stage.

MLflow: one parent run for the curriculum, one nested run per stage (its training metrics come from the training
layer, then the grid as metrics, a Fig. 8-style heat map and the grid JSON), and a summary table + picture on the
parent. Idempotent: started again with the same name and storage, finished stages (tagged on their MLflow run, with
their HF export on disk) are skipped, and an interrupted stage resumes from its last checkpoint (the training layer
continues a run folder it finds).

    from condensation.curriculum import PRESETS, run_curriculum
    run_curriculum(PRESETS["default"]())
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable

from .config import (ConfigError, TrainConfig, _is_positive_float, _merge_into, merge, parse_overrides, load_yaml,
                     to_yaml)

STAGE_DONE_TAG = "curriculum.stage_status"
PARENT_ID_FILE = "mlflow_parent_run_id"


@dataclass
class StageConfig:
    """One finetuning stage.

    total_tokens: length of every training example (the paper: 2K, 4K, 8K, 16K).
    steps: optimizer steps of the stage (the paper: 500, 300, 1000, 1000).
    lr: peak learning rate (the paper: 6e-5); min_lr: final learning rate of the stage's cosine decay.
    depth_range: needle depths drawn uniformly from [lo, hi] for training rows (1.0 = just before the question),
        so a stage can first teach retrieval from nearby segments.
    per_worker_batch: sequences per micro-batch in this stage (None: the base config's); shorter stages can take
        larger micro-batches for the same memory.
    random_lengths: every micro-batch's rows are generated at a random number of whole segments, from one segment
        (or the shortest passkey prompt, if longer) up to total_tokens, one length per micro-batch (no padding);
        deterministic in train.data.seed. None (default): `train.data.random_lengths` (off unless set there).
    replay_micro_batches: text replay: per optimizer step and worker, this many micro-batches of text rows
        (`CurriculumConfig.replay`, total_tokens long, next-token loss everywhere) beside the step's passkey
        micro-batches (`train.schedule.replay_micro_batches`), so that a stage whose loss is only the ~5 answer tokens
        keeps the language modelling the continual pretraining taught. Each micro-batch weighs the same in the step's
        gradient: with one passkey micro-batch per step, 1 makes it half passkey, half text. 0 (default): passkey only.
    replay_weight: the weight w of each replay micro-batch against a passkey micro-batch's 1
        (`train.schedule.replay_weight`): the step's gradient is (sum of passkey gradients + w x sum of text
        gradients) / (passkey micro-batches + w x replay_micro_batches). None (default): the schedule's (1 unless set
        there, e.g. train.schedule.replay_weight=0.2 for every stage).
    """

    total_tokens: int = 128
    steps: int = 100
    lr: float = 6e-5
    min_lr: float = 6e-6
    depth_range: list = field(default_factory=lambda: [0.0, 1.0])
    per_worker_batch: int | None = None
    random_lengths: bool | None = None
    replay_micro_batches: int = 0
    replay_weight: float | None = None


@dataclass
class PretrainingConfig:
    """Continual pretraining on long text before the passkey stages: the paper's step that turns a pretrained Llama
    into a Condensation model (Table III: FineWeb-edu documents over 4K tokens, 6491 steps, lr 6e-5 -> 2e-5).

    steps: optimizer steps; 0 skips it (the curriculum starts from `train.model.init_from` as it is).
    source: the text (`data.source` of the training config: a hub id, a known name or a local jsonl/parquet path).
    total_tokens: tokens per training sequence; documents shorter than this are skipped, longer ones cut.
    lr, min_lr: peak and final learning rate of its cosine decay.
    dataset_options: options of the data source (`data.dataset_options`, e.g. {"mode": "pack"} to join documents).
    per_worker_batch: sequences per micro-batch (None: the base config's).
    random_lengths: every micro-batch cut to a random number of whole segments up to total_tokens
        (`data.random_lengths`); None (default): `train.data.random_lengths`.
    """

    steps: int = 0
    source: str = "fineweb-edu"
    total_tokens: int = 4096
    lr: float = 6e-5
    min_lr: float = 2e-5
    dataset_options: dict = field(default_factory=dict)
    per_worker_batch: int | None = None
    random_lengths: bool | None = None


@dataclass
class ReplayConfig:
    """The text of the stages' replay micro-batches (`StageConfig.replay_micro_batches`): rows of the stage's
    total_tokens, cut or packed from documents as `dataset_options` say, streamed epoch after epoch.

    source: the text (a `data.source`: a hub id, a known name or a local jsonl/parquet path; not "passkey" or
        "synthetic"); None (default): `pretraining.source`, the text the continual pretraining trained on (whether
        or not pretraining.steps is 0).
    dataset_options: its options (`data.dataset_options`, e.g. {"mode": "pack"}); None (default):
        `pretraining.dataset_options` when the source is the pretraining's, else none.
    """

    source: str | None = None
    dataset_options: dict | None = None


@dataclass
class EvalConfig:
    """The accuracy grid after each stage (greedy generation of the answer, exact match of the digits).

    lengths: total prompt lengths (the paper: 2K ... 64K); depths: needle depths in [0, 1].
    n_per_cell: prompts per (length, depth) cell; batch_size: prompts per generate call; seed: passkeys.
    final_only: the whole grid after the last stage only; earlier stages are scored at their own length (all
        depths), which costs a fraction of a 64K grid.
    device: where the grid runs: "auto" (the first GPU when the stages train on GPUs, else the CPU), "cpu", "cuda".
    """

    lengths: list = field(default_factory=lambda: [128, 256])
    depths: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    n_per_cell: int = 8
    batch_size: int = 16
    seed: int = 1234
    final_only: bool = False
    device: str = "auto"


@dataclass
class LongContextConfig:
    """Loss by position on held-out long text after the last stage, for the final model and the model the curriculum
    started from (as a plain Llama with full attention, and as Condensation), as `workloads/evaluate.py` computes it.

    text: a local jsonl of held-out documents (`text` field), never trained on; None skips this evaluation.
    length: tokens per window; windows: how many windows; bin_tokens: width of a position bin.
    baseline_max_tokens: the full-attention baseline runs on windows up to this length (its memory grows with it).
    """

    text: str | None = None
    length: int = 65536
    windows: int = 4
    bin_tokens: int = 1024
    batch_size: int = 1
    baseline_max_tokens: int = 65536


@dataclass
class CurriculumConfig:
    """A whole curriculum. `train` is the base training config every stage derives from (model, optimizer,
    schedule, checkpoints, tracking, storage); a stage sets the data, steps and learning rates.

    name: the curriculum's name: MLflow parent run name and the prefix of every stage's run folder.
    train_rows: passkey training rows generated per stage (cycled when steps need more).
    full_lm_loss: also train on the prompt tokens (next-token loss everywhere), not only on the answer. From
        scratch this is what lets a small model form the copying circuits the answer needs; the paper finetunes a
        pretrained model on the answer.
    cache_rows: generate a stage's rows once and keep them in Ray's object store for every epoch (small stages);
        False streams them again each epoch (stages whose rows would not fit in memory).
    pretraining: continual pretraining on long text before the first stage (off unless its steps > 0).
    replay: where the text of the stages' replay micro-batches comes from (used by stages whose
        replay_micro_batches > 0).
    stages: the stages in order; evaluation: the grid after each stage; long_context: loss by position on held-out
        text after the last stage.
    """

    name: str = "passkey-curriculum"
    train_rows: int = 2048
    full_lm_loss: bool = True
    cache_rows: bool = True
    pretraining: PretrainingConfig = field(default_factory=PretrainingConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    stages: list = field(default_factory=lambda: [StageConfig()])
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    long_context: LongContextConfig = field(default_factory=LongContextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "CurriculumConfig":
        from .config import validate as validate_train

        if not self.stages:
            raise ConfigError("stages", "at least one stage is needed")
        stages = []
        for i, st in enumerate(self.stages):
            st = st if isinstance(st, StageConfig) else _merge_into(StageConfig(), _mapping(st, f"stages.{i}"), f"stages.{i}.")
            if st.total_tokens <= 0:
                raise ConfigError(f"stages.{i}.total_tokens", f"must be positive, got {st.total_tokens}")
            if st.steps <= 0:
                raise ConfigError(f"stages.{i}.steps", f"must be positive, got {st.steps}")
            lo, hi = st.depth_range
            if not 0 <= lo <= hi <= 1:
                raise ConfigError(f"stages.{i}.depth_range", f"needs 0 <= lo <= hi <= 1, got {st.depth_range}")
            if st.replay_micro_batches < 0:
                raise ConfigError(f"stages.{i}.replay_micro_batches", f"must be >= 0, got {st.replay_micro_batches}")
            if st.replay_weight is not None and not _is_positive_float(st.replay_weight):
                raise ConfigError(f"stages.{i}.replay_weight", f"must be a finite number > 0 or None, got "
                                                               f"{st.replay_weight!r}")
            stages.append(st)
        self.stages = stages
        pre = self.pretraining
        if pre.steps < 0:
            raise ConfigError("pretraining.steps", f"must be >= 0, got {pre.steps}")
        if pre.steps and pre.total_tokens < 2:
            raise ConfigError("pretraining.total_tokens", f"must be at least 2, got {pre.total_tokens}")
        if self.evaluation.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("evaluation.device", f"one of auto, cpu, cuda; got {self.evaluation.device!r}")
        lc = self.long_context
        if lc.text is not None:
            if not os.path.exists(os.path.expanduser(lc.text)):
                raise ConfigError("long_context.text", f"{lc.text}: no such file or folder (held-out jsonl text; "
                                                       "`python workloads/make_corpus.py` builds one)")
            for key in ("length", "windows", "bin_tokens", "batch_size"):
                if getattr(lc, key) <= 0:
                    raise ConfigError(f"long_context.{key}", f"must be positive, got {getattr(lc, key)}")
        if any(not 0 <= d <= 1 for d in self.evaluation.depths):
            raise ConfigError("evaluation.depths", f"depths must lie in [0, 1], got {self.evaluation.depths}")
        if any(int(n) <= 0 for n in self.evaluation.lengths):
            raise ConfigError("evaluation.lengths", f"lengths must be positive, got {self.evaluation.lengths}")
        if self.train_rows < self.train.schedule.global_batch:
            raise ConfigError("train_rows", f"must be at least schedule.global_batch ({self.train.schedule.global_batch})")
        for i, st in enumerate(self.stages):  # every stage's training config must be valid before anything starts
            try:
                validate_train(stage_train_config(self, i))
            except ConfigError as e:
                key = {"schedule.replay_micro_batches": "replay_micro_batches",
                       "schedule.replay_weight": "replay_weight" if st.replay_weight is not None else None}.get(e.key)
                raise ConfigError(f"stages.{i}.{key}" if key else f"stages.{i} -> train.{e.key}",
                                  str(e).split(": ", 1)[-1]) from None
        self._validate_replay()
        if pre.steps:
            from .train.data import check_train_data

            try:
                pre_cfg = pretraining_train_config(self)
                validate_train(pre_cfg)
                check_train_data(pre_cfg)
            except ConfigError as e:
                key = e.key.replace("data.source", "source").replace("data.dataset_options", "dataset_options")
                where = f"pretraining.{key}" if not key.startswith(("model.", "schedule.", "optim.")) else f"pretraining -> train.{key}"
                raise ConfigError(where, str(e).split(": ", 1)[-1]) from None
        return self

    def _validate_replay(self) -> None:
        """The replay text of the first stage that replays (the others differ only in length): a source that is
        text, options it takes, a local file that is there with the text field, a tokenizer that fits the model."""
        from .config import validate as validate_train
        from .train.data import check_train_data

        replaying = [i for i, st in enumerate(self.stages) if st.replay_micro_batches]
        if not replaying:
            return
        source = replay_source(self)[0]
        if source in ("passkey", "synthetic"):
            raise ConfigError("replay.source", f"must be text to replay (a data source such as a jsonl path or a hub "
                                               f"id), got {source!r}")
        try:
            rcfg = replay_train_config(self, replaying[0])
            validate_train(rcfg)
            check_train_data(rcfg)
        except ConfigError as e:
            key = e.key.replace("data.source", "replay.source")
            key = key.replace("data.dataset_options", "replay.dataset_options")
            where = key if key.startswith("replay.") else f"replay -> train.{key}"
            raise ConfigError(where, str(e).split(": ", 1)[-1]) from None


def _mapping(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {value!r}")
    return value


def stage_name(cfg: CurriculumConfig, i: int) -> str:
    return f"{cfg.name}-stage{i}-{cfg.stages[i].total_tokens}"


def pretraining_name(cfg: CurriculumConfig) -> str:
    return f"{cfg.name}-pretrain-{cfg.pretraining.total_tokens}"


def pretraining_train_config(cfg: CurriculumConfig) -> TrainConfig:
    """The training config of the continual pretraining: the base config on the long text, next-token loss
    everywhere, with its own length, steps, rates and run folder."""
    pre, t = cfg.pretraining, cfg.train
    return dataclasses.replace(
        t,
        data=dataclasses.replace(t.data, source=pre.source, seq_len=pre.total_tokens, num_rows=None,
                                 dataset_options=dict(pre.dataset_options),
                                 random_lengths=t.data.random_lengths if pre.random_lengths is None else pre.random_lengths),
        optim=dataclasses.replace(t.optim, lr=pre.lr, min_lr=pre.min_lr),
        schedule=dataclasses.replace(t.schedule, total_steps=pre.steps,
                                     per_worker_batch=pre.per_worker_batch or t.schedule.per_worker_batch),
        run=dataclasses.replace(t.run, name=pretraining_name(cfg)),
    )


def stage_train_config(cfg: CurriculumConfig, i: int) -> TrainConfig:
    """The training config of stage i: the base config with this stage's length, steps, rates and run folder."""
    st, t = cfg.stages[i], cfg.train
    return dataclasses.replace(
        t,
        data=dataclasses.replace(t.data, source="passkey", seq_len=st.total_tokens, num_rows=cfg.train_rows,
                                 random_lengths=t.data.random_lengths if st.random_lengths is None else st.random_lengths),
        optim=dataclasses.replace(t.optim, lr=st.lr, min_lr=st.min_lr),
        schedule=dataclasses.replace(t.schedule, total_steps=st.steps,
                                     per_worker_batch=st.per_worker_batch or t.schedule.per_worker_batch,
                                     replay_micro_batches=st.replay_micro_batches,
                                     replay_weight=(t.schedule.replay_weight if st.replay_weight is None
                                                    else st.replay_weight)),
        run=dataclasses.replace(t.run, name=stage_name(cfg, i)),
    )


def replay_source(cfg: CurriculumConfig) -> tuple[str, dict]:
    """(source, dataset_options) of the replay text: `replay`'s, defaulting to the continual pretraining's."""
    r, pre = cfg.replay, cfg.pretraining
    source = r.source or pre.source
    if r.dataset_options is not None:
        return source, dict(r.dataset_options)
    return source, dict(pre.dataset_options) if source == pre.source else {}


def replay_train_config(cfg: CurriculumConfig, i: int) -> TrainConfig:
    """Stage i's training config with its data the replay text (rows of the stage's length, all of them): what
    `stage_replay_dataset` builds and validation checks."""
    t = stage_train_config(cfg, i)
    source, options = replay_source(cfg)
    return dataclasses.replace(t, data=dataclasses.replace(t.data, source=source, num_rows=None,
                                                           dataset_options=options))


# ----------------------------------------------------------------------------------------------------------------
# Presets: small functions over the defaults


def default_preset() -> CurriculumConfig:
    """The embedded default: a tiny model from scratch on a laptop CPU (2 cores) in minutes, lengths and segment
    length scaled down so that the first stage needs memory across 2 segments and the second across 3."""
    train = merge(TrainConfig(), {
        "model": {"size": "tiny-cpu", "segment_length": 64, "overrides": {"loss_reduction": "token_mean"}},
        # lr 2e-3 after 20 warmup steps (batch 16) left some seeds for 1000+ steps on the loss plateau (~0.30) where
        # the model has not yet learned to copy the digits; at 1e-3 after 100 steps every seed tried left it within
        # a few hundred steps (20 runs of a single-process replica: 4 seeds x batch 16/32, stage lengths and rates)
        "optim": {"warmup_steps": 100, "weight_decay": 0.0},
        # 2 x 0.75 CPU for the workers leaves half a CPU for the Ray Data tasks that generate rows meanwhile
        "schedule": {"global_batch": 32, "per_worker_batch": 16, "num_workers": 2, "cpus_per_worker": 0.75},
        "checkpoint": {"every": 100, "keep": 1},
        "tracking": {"log_every": 25},
        "run": {"storage": "runs"},
    })
    return CurriculumConfig(
        name="passkey-cpu",
        train_rows=4096,
        # exact 1.00 at 96 tokens after stage 0 and 0.74-1.00 at 192 after stage 1 on every seed tried (replica and
        # 6 runs of this workload); at 192 the needle at depth 0, two segments before the question, is missed most
        stages=[StageConfig(total_tokens=96, steps=500, lr=1e-3, min_lr=1e-4),
                StageConfig(total_tokens=192, steps=400, lr=1e-3, min_lr=1e-4)],
        evaluation=EvalConfig(lengths=[96, 192, 384], depths=[0.0, 0.25, 0.5, 0.75, 1.0], n_per_cell=10),
        train=train,
    )


def debug_preset() -> CurriculumConfig:
    """Seconds: for tests of the machinery (chaining, resume, MLflow), not of learning."""
    cfg = default_preset()
    train = merge(cfg.train, {"model": {"size": "debug", "segment_length": 32, "overrides": {"vocab_size": 2048}},
                              "optim": {"warmup_steps": 1},
                              "schedule": {"global_batch": 4, "per_worker_batch": 2},
                              "checkpoint": {"every": 2, "keep": 2}, "tracking": {"log_every": 1}})
    return dataclasses.replace(
        cfg, name="passkey-debug", train_rows=16, train=train,
        stages=[StageConfig(total_tokens=96, steps=4, lr=1e-3, min_lr=1e-4),
                StageConfig(total_tokens=128, steps=4, lr=1e-3, min_lr=1e-4)],
        evaluation=EvalConfig(lengths=[96, 128], depths=[0.0, 1.0], n_per_cell=2, batch_size=4),
    )


def paper_preset() -> CurriculumConfig:
    """Table III's passkey runs: Llama-3.2-1B (or a continual-pretraining export via train.model.init_from),
    segment 512, stages 2K/4K/8K/16K for 500/300/1000/1000 steps at lr 6e-5, global batch 64, ZeRO-2, bf16 on GPUs;
    evaluation at 2K-64K and depths 0..1 (Fig. 8)."""
    train = merge(TrainConfig(), {
        # the fast path of the 1B shape: compiled cells and one weight-gradient GEMM per layer; group checkpoints keep
        # the 16K stage's activations flat in length
        "model": {"init_from": "meta-llama/Llama-3.2-1B", "segment_length": 512,
                  "overrides": {"compile_cells": True, "weight_grads": "deferred", "checkpoint_group_steps": 8}},
        "data": {"tokenizer": "meta-llama/Llama-3.2-1B"},
        "optim": {"warmup_steps": 20, "weight_decay": 0.0},
        "schedule": {"global_batch": 64, "per_worker_batch": 1, "num_workers": 8, "use_gpu": True,
                     "cpus_per_worker": 8, "precision": "bf16", "torch_threads": None},
        "checkpoint": {"every": 100, "keep": 2},
        "tracking": {"log_every": 10, "progress_bar": True},
        "run": {"storage": "runs"},
    })
    lengths = [2048, 4096, 8192, 16384]
    steps = [500, 300, 1000, 1000]
    return CurriculumConfig(
        name="passkey-paper", train_rows=64 * 1000, full_lm_loss=False, cache_rows=False, train=train,
        stages=[StageConfig(total_tokens=n, steps=s, lr=6e-5, min_lr=2e-5) for n, s in zip(lengths, steps)],
        evaluation=EvalConfig(lengths=[2048, 4096, 8192, 16384, 32768, 65536],
                              depths=[round(0.1 * i, 1) for i in range(11)], n_per_cell=10, batch_size=8),
    )


def h200_preset() -> CurriculumConfig:
    """One H200: the paper's stages from Llama-3.2-1B with per-cell checkpointing (16K tokens fit easily), global
    batch 16 by gradient accumulation; evaluation up to 32K."""
    cfg = paper_preset()
    train = merge(cfg.train, {"schedule": {"global_batch": 16, "num_workers": 1}})
    return dataclasses.replace(cfg, name="passkey-h200", train=train, train_rows=16 * 1000,
                               evaluation=dataclasses.replace(cfg.evaluation, lengths=[2048, 4096, 8192, 16384, 32768],
                                                              depths=[round(0.25 * i, 2) for i in range(5)]))


def smollm2_preset() -> CurriculumConfig:
    """The paper's passkey experiment on a real pretrained Llama that installs offline (SmolLM2-135M-Instruct, trained
    context 8K), scaled to one H200 and minutes: continual pretraining as Condensation (segment 512) on real long
    text, then passkey stages at 2K, 4K and 8K, then the grid at 1K-64K (up to 8x the last trained length) and loss by
    position on held-out text. The text comes from `python workloads/make_corpus.py` (data/corpus). With N GPUs:
    train.schedule.num_workers=N (the global batch stays the same; per_worker_batch may then be lowered).

    Micro-batches hold 64K tokens (about 70 GiB on an H200 with full backpropagation through the memory): SmolLM2's
    30 layers of width 576 make every cell small, so the step is bound by launches unless many rows share them.

    Text replay, off here (the paper's recipe; `smollm2_replay_preset` is this chain with it): the passkey stages'
    loss is the ~5 answer tokens of synthetic rows, and after them the perplexity of held-out text's first 2K tokens was
    13.2 against the base model's 8.7. `stages.N.replay_micro_batches=k` adds k micro-batches of the continual
    pretraining's text (packed to the stage's length, next-token loss everywhere) to each optimizer step of stage N,
    each weighing `train.schedule.replay_weight` (or `stages.N.replay_weight`) against a passkey micro-batch's 1. Stages
    0 and 1 take one passkey micro-batch a step (16 rows), stage 2 two (8 rows), so 1, 1, 2 make every step half text.
    Measured on an H200 with 1, 1, 2: at weight 1 (session 8) perplexity 13.2 -> 6.7 but exact match at 8K 1.00 ->
    0.61 (~2000 text labels a row drown the 5 answer tokens); at weight 0.2 (session 10) 1.00 in every cell to 8K and
    perplexity 6.9 (benchmarks/results/h200_s10/smollm2-replay-w02).

    Past the trained length the needle fades after ~15-24 segments of 512 (session 7), whatever the length. The final
    export (its HF folder carries the tokenizer) can be read at longer segments, fewer hops through the memory for the
    same prompt, with SmolLM2's pretrained positions (8K) still covering memory plus segment up to l = 4096:

        python workloads/evaluate.py model=<stage 2's hf folder> text=data/corpus/heldout_long.jsonl \
            segment_lengths=[512,1024,2048] baseline=false passkey.lengths=[8192,16384,32768,65536]

    (`benchmarks/gpu_session.sh relength` after the chain, in the same sequence of commands)."""
    train = merge(TrainConfig(), {
        "model": {"init_from": "smollm2-135m-instruct", "segment_length": 512,
                  "overrides": {"loss_reduction": "token_mean"}},
        "data": {"tokenizer": "smollm2-135m-instruct"},
        "optim": {"warmup_steps": 10, "weight_decay": 0.0},
        "schedule": {"global_batch": 16, "per_worker_batch": 8, "num_workers": 1, "use_gpu": True,
                     "cpus_per_worker": 4, "precision": "bf16", "torch_threads": None},
        "checkpoint": {"every": 20, "keep": 1},
        "tracking": {"log_every": 10},
        "run": {"storage": "runs"},
    })
    return CurriculumConfig(
        # as many rows as the longest stage's steps x batch: no row trained on twice in a stage
        name="passkey-smollm2", train_rows=16 * 240, full_lm_loss=False, cache_rows=True, train=train,
        # 3.3M tokens of text: 60 steps of 16 x 8K are about 2.4 epochs; documents are packed (eos between them),
        # so the library's short files count too
        pretraining=PretrainingConfig(steps=60, source="data/corpus/train.jsonl", total_tokens=8192, lr=1e-4,
                                      min_lr=3e-5, dataset_options={"mode": "pack", "min_tokens": 256}),
        # session 5 trained 60/60/70 steps: the needle was found from the question's segment and the one before, never
        # from two or more segments back. 2K rows (4 segments, half of them with the needle 2-3 segments back) teach
        # carrying it through a segment at a quarter of an 8K row's cost, so the added steps go there first
        stages=[StageConfig(total_tokens=2048, steps=240, lr=1e-4, min_lr=3e-5, per_worker_batch=16),
                StageConfig(total_tokens=4096, steps=120, lr=1e-4, min_lr=3e-5, per_worker_batch=16),
                StageConfig(total_tokens=8192, steps=80, lr=1e-4, min_lr=3e-5, per_worker_batch=8)],
        evaluation=EvalConfig(lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                              depths=[0.0, 0.25, 0.5, 0.75, 1.0], n_per_cell=20, batch_size=20, final_only=True),
        long_context=LongContextConfig(text="data/corpus/heldout_long.jsonl", length=65536, windows=4, bin_tokens=1024),
    )


def smollm2_replay_preset() -> CurriculumConfig:
    """The smollm2 chain with text replay in every passkey stage (1, 1, 2 micro-batches of the continual pretraining's
    text a step beside the passkey's, each weighing 0.2 of a passkey micro-batch): the run of the committed results.

        python workloads/make_corpus.py && python workloads/curriculum.py --preset smollm2-replay

    Measured on one H200 (session 10, benchmarks/results/h200_s10/smollm2-replay-w02; about 19 minutes in three
    commands, each continuing the last): passkey exact match 1.00 in every cell at 1K-8K (20 prompts a cell), 0.89 /
    0.54 / 0.26 at 16K / 32K / 64K; perplexity of held-out text's first 2K tokens 6.90 (the base model 8.67, the chain
    without replay 13.25); the loss flat from 8K to 64K (2.3% apart). A replay micro-batch has the passkey micro-batch's
    shape and runs after it, so peak memory stays that of a passkey micro-batch (31.9 / 62.5 / 64.1 GiB) while a stage
    takes about twice its time; MLflow shows `replay_loss` beside `loss`."""
    cfg = smollm2_preset()
    cfg.name = "passkey-smollm2-replay-w02"
    for stage, k in zip(cfg.stages, (1, 1, 2)):
        stage.replay_micro_batches = k
    cfg.train.schedule.replay_weight = 0.2
    return cfg


PRESETS: dict[str, Callable[[], CurriculumConfig]] = {
    "default": default_preset, "debug": debug_preset, "paper": paper_preset, "h200": h200_preset,
    "smollm2": smollm2_preset, "smollm2-replay": smollm2_replay_preset,
}


def load_curriculum_config(preset: str = "default", yaml_path: str | None = None,
                           overrides: list[str] | None = None) -> CurriculumConfig:
    """preset <- YAML file <- `key.sub=value` overrides, validated (raises ConfigError naming the field)."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if yaml_path:
        cfg = merge(cfg, load_yaml(yaml_path))
    upd = parse_overrides(overrides)
    if "stages" in upd and isinstance(upd["stages"], dict):  # stages.1.steps=50 addresses one stage
        stages = [dataclasses.asdict(s) if isinstance(s, StageConfig) else dict(s) for s in cfg.stages]
        for idx, change in upd.pop("stages").items():
            if not str(idx).isdigit() or int(idx) >= len(stages):
                raise ConfigError(f"stages.{idx}", f"no such stage (there are {len(stages)})")
            stages[int(idx)].update(_mapping(change, f"stages.{idx}"))
        cfg = dataclasses.replace(cfg, stages=stages)
    cfg = merge(cfg, upd)
    return cfg.validate()


# ----------------------------------------------------------------------------------------------------------------
# Data for a stage


def stage_lengths(cfg: CurriculumConfig, i: int, tokenizer, init_from: str | None = None) -> list[int] | None:
    """The row lengths stage i draws from (random_lengths: whole segments from one segment, or the shortest passkey
    prompt, up to the stage length), or None for rows of the stage length. init_from: the checkpoint the stage starts
    from (its segment length counts when train.model does not set one)."""
    from .data.passkey import min_passkey_tokens
    from .data.pipeline import segment_multiples

    if not stage_train_config(cfg, i).data.random_lengths:
        return None
    l = _segment_length(cfg, init_from)
    return segment_multiples(cfg.stages[i].total_tokens, l, min_tokens=min_passkey_tokens(tokenizer))


def _segment_length(cfg: CurriculumConfig, init_from: str | None) -> int:
    """The segment length the stages train with: train.model's, else the checkpoint's (a Llama's: the default), else
    the named size's."""
    m = cfg.train.model
    if m.model_kwargs().get("segment_length"):
        return m.model_kwargs()["segment_length"]
    if init_from:
        from transformers import AutoConfig

        from .modeling import CondensationConfig
        from .pretrained import resolve_pretrained

        return getattr(AutoConfig.from_pretrained(resolve_pretrained(init_from)), "segment_length",
                       CondensationConfig.segment_length)
    from .sizes import MODEL_SIZES

    return MODEL_SIZES[m.size]["segment_length"]


def stage_dataset(cfg: CurriculumConfig, i: int, tokenizer, init_from: str | None = None):
    """Ray Dataset of passkey training rows for stage i: {"input_ids", "labels"} int64[total_tokens] (with random
    lengths also "length": each row padded after it, the training loop cuts every micro-batch to one length)."""
    import numpy as np

    from .data.passkey import passkey_dataset
    from .data.pipeline import train_view

    st = cfg.stages[i]
    lo, hi = st.depth_range
    depths = [lo + (hi - lo) * k / 20 for k in range(21)] if (lo, hi) != (0.0, 1.0) else None
    lengths = stage_lengths(cfg, i, tokenizer, init_from)
    ds = passkey_dataset(tokenizer, st.total_tokens, cfg.train_rows, seed=cfg.train.data.seed + 1000 * i,
                         depths=depths, train=True, lengths=lengths,
                         group_size=st.per_worker_batch or cfg.train.schedule.per_worker_batch)
    ds = train_view(ds, with_length=lengths is not None)
    if cfg.full_lm_loss:
        def everywhere(batch: dict) -> dict:
            labels = batch["labels"]
            batch["labels"] = np.where(labels == -100, batch["input_ids"], labels)
            return batch

        ds = ds.map_batches(everywhere, batch_format="numpy", num_cpus=0.25)
    return ds.materialize() if cfg.cache_rows else ds


def stage_replay_dataset(cfg: CurriculumConfig, i: int):
    """Ray Dataset of stage i's replay rows: text of `replay_source`, {"input_ids", "labels"} int64[total_tokens],
    labels everywhere (next-token loss), streamed (epochs re-read it, so that no text has to fit in memory)."""
    from .train.data import data_layer_datasets, local_text_rows, rows_dataset

    d = replay_train_config(cfg, i).data
    if d.source == "local":
        return rows_dataset(local_text_rows(d.seq_len, seed=d.seed))
    return data_layer_datasets(d)[0]["train"]


def stage_datasets(cfg: CurriculumConfig, i: int, tokenizer, init_from: str | None = None) -> dict:
    """The datasets `fit` takes for stage i: its passkey rows as "train", and its text as "replay" when it
    replays."""
    out = {"train": stage_dataset(cfg, i, tokenizer, init_from=init_from)}
    if cfg.stages[i].replay_micro_batches:
        out["replay"] = stage_replay_dataset(cfg, i)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running it


@dataclass
class StageResult:
    index: int
    total_tokens: int
    hf_path: str
    run_id: str | None
    grid_json: str
    exact: float
    digit: float
    answer_loss: float
    skipped: bool = False


def answer_loss(model, tokenizer, total_tokens: int, n: int = 16, seed: int = 99) -> float:
    """Teacher-forced mean cross-entropy of the answer tokens of n fresh passkey examples at one length."""
    import random

    import numpy as np
    import torch

    from .data.passkey import passkey_example

    rng = random.Random(seed)
    rows = [passkey_example(tokenizer, total_tokens, rng.random(), rng.randint(1000, 9999), train=True) for _ in range(n)]
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows])).to(device)
    labels = torch.from_numpy(np.stack([r["labels"] for r in rows])).to(device)
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=labels, return_logits=False)  # chunked: no [n, L, V] logits at long lengths
    # the loss is a mean over the answer tokens unless the model sums segment means (eq. 17); recount as a mean
    seg = out.segment_losses.float()
    l = model.config.segment_length
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    counts = torch.nn.functional.pad(targets, (0, (-ids.shape[1]) % l)).view(n, -1, l).sum((0, 2)).float()
    return float((seg * counts).sum() / counts.sum())


def _client(cfg: CurriculumConfig):
    from mlflow import MlflowClient

    from .train.tracking import tracking_uri

    return MlflowClient(tracking_uri(cfg.train))


def ensure_parent_run(cfg: CurriculumConfig) -> str:
    """The curriculum's MLflow parent run, created once and found again from its id file in the storage folder."""
    from .train.tracking import artifact_location, ensure_experiment, reopen_parent_run

    folder = os.path.join(cfg.train.run.storage, cfg.name)
    os.makedirs(folder, exist_ok=True)
    id_file = os.path.join(folder, PARENT_ID_FILE)
    client = _client(cfg)
    if (run_id := reopen_parent_run(client, id_file)) is not None:
        return run_id
    exp_id = ensure_experiment(client, cfg.train.tracking.experiment, artifact_location(cfg.train))
    run = client.create_run(exp_id, run_name=cfg.name, tags={"curriculum": cfg.name})
    client.log_text(run.info.run_id, to_yaml(cfg), "curriculum_config.yaml")
    for k, v in {"stages": len(cfg.stages), "stage_lengths": ",".join(str(s.total_tokens) for s in cfg.stages),
                 "stage_steps": ",".join(str(s.steps) for s in cfg.stages), "full_lm_loss": cfg.full_lm_loss,
                 "stage_replay_micro_batches": ",".join(str(s.replay_micro_batches) for s in cfg.stages),
                 "stage_replay_weights": ",".join(f"{stage_train_config(cfg, i).schedule.replay_weight:g}"
                                                  for i in range(len(cfg.stages)))}.items():
        client.log_param(run.info.run_id, k, v)
    with open(id_file + ".tmp", "w") as f:
        f.write(run.info.run_id)
    os.replace(id_file + ".tmp", id_file)
    return run.info.run_id


def _finished_stage(cfg: CurriculumConfig, i: int) -> dict | None:
    """The record of stage i if it finished: its MLflow run carries the done tag and its HF export exists."""
    rec = _stage_record(os.path.join(cfg.train.run.storage, stage_name(cfg, i)))
    if rec is None or not os.path.isdir(rec["hf_path"]):
        return None
    if rec.get("run_id"):
        try:
            if _client(cfg).get_run(rec["run_id"]).data.tags.get(STAGE_DONE_TAG) != "finished":
                return None
        except Exception:
            return None
    return rec


def stage_eval_lengths(cfg: CurriculumConfig, i: int) -> list[int]:
    """The grid's lengths after stage i: all of them, or with `final_only` the stage's own length before the last."""
    if cfg.evaluation.final_only and i < len(cfg.stages) - 1:
        return [cfg.stages[i].total_tokens]
    return [int(n) for n in cfg.evaluation.lengths]


def eval_device(cfg: CurriculumConfig) -> str:
    """Where the evaluations run: the first GPU when the stages train on GPUs (the workers have finished and freed it
    by then), else the CPU."""
    import torch

    want = cfg.evaluation.device
    if want == "auto":
        want = "cuda" if cfg.train.schedule.use_gpu and torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluation.device", "cuda asked for, but this process sees no GPU")
    return want


def load_for_eval(path: str, device: str, segment_length: int | None = None, **options):
    """A stage's export for evaluation: bf16 on a GPU, float32 on the CPU. options: further CondensationConfig fields
    (the memory options the curriculum trains with, for the model it started from)."""
    import torch

    from .modeling import CondensationForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs = {"segment_length": segment_length} if segment_length else {}
    return CondensationForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **options).to(device).eval()


# CondensationConfig fields that change what a model computes (not how fast): the start model is measured with them
ARCHITECTURE_OPTIONS = ("memory_sink_tokens", "memory_norm")


def _stage_record(folder: str) -> dict | None:
    path = os.path.join(folder, "stage_done.json")
    return json.loads(open(path).read()) if os.path.exists(path) else None


def run_pretraining(cfg: CurriculumConfig, init_from: str | None, parent: str | None, client,
                    log: Callable[[str], None] = print) -> str:
    """Continual pretraining (once: a finished run is found again by its record and its export); returns the HF
    export the first stage starts from."""
    from .train import fit
    from .train.checkpoints import resume_point

    pre = cfg.pretraining
    tcfg = pretraining_train_config(cfg)
    folder = os.path.join(tcfg.run.storage, tcfg.run.name)
    done = _stage_record(folder)
    if done is not None and os.path.isdir(done["hf_path"]):
        log(f"continual pretraining ({pre.total_tokens} tokens, {pre.steps} steps): already finished; continuing from it")
        return done["hf_path"]
    if parent:
        tcfg = dataclasses.replace(tcfg, tracking=dataclasses.replace(tcfg.tracking, parent_run_id=parent))
    ckpt = resume_point(folder)
    log(f"continual pretraining: {pre.source}, {pre.total_tokens} tokens, {pre.steps} steps, lr {pre.lr:g} -> "
        f"{pre.min_lr:g}, from {init_from or 'scratch'}" + (f"; resuming from checkpoint {ckpt[0]}" if ckpt else ""))
    res = fit(tcfg, init_from=init_from)
    if res.hf_path is None:
        raise RuntimeError("continual pretraining left no HF export (checkpoint.export_hf is off?)")
    if res.mlflow_run_id and client is not None:
        client.set_tag(res.mlflow_run_id, "stage", f"pretrain: {pre.total_tokens}")
        client.set_tag(res.mlflow_run_id, "hf_path", res.hf_path)
        client.set_tag(res.mlflow_run_id, STAGE_DONE_TAG, "finished")
    with open(os.path.join(res.run_dir, "stage_done.json"), "w") as f:
        json.dump({"hf_path": res.hf_path, "run_id": res.mlflow_run_id, "step": res.step}, f)
    return res.hf_path


def long_context_evaluation(cfg: CurriculumConfig, base: str | None, final: str, device: str, parent: str | None,
                            client, log: Callable[[str], None] = print) -> dict:
    """Loss by position on held-out text: the final model as Condensation, and the model the curriculum started from
    as Condensation (no training) and as a plain Llama with full attention. Logged on the parent run."""
    import tempfile

    import torch

    from .evaluate.long_context import LossCurve, loss_by_position, token_windows
    from .evaluate.plots import plot_loss_by_position
    from .evaluate.tracking import log_loss_curves
    from .pretrained import resolve_pretrained
    from .tokenizer import load_tokenizer

    lc, l = cfg.long_context, cfg.train.model.segment_length
    tokenizer = load_tokenizer(cfg.train.data.tokenizer)
    windows = token_windows(tokenizer, lc.text, lc.length, lc.windows, seed=cfg.evaluation.seed)
    curves: dict[str, LossCurve] = {}

    def measure(name: str, model) -> None:
        curve = loss_by_position(model, windows, bin_tokens=lc.bin_tokens, batch_size=lc.batch_size, name=name)
        curves[name] = curve
        by_range = ", ".join(f"{r['lo'] // 1024}-{r['hi'] // 1024}K {r['ppl']:.1f}" for r in curve.ranges())
        log(f"long-context perplexity by position, {name}: {by_range}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    measure(f"after curriculum (l={l})", load_for_eval(final, device))
    if base is not None:
        base_path = resolve_pretrained(base)
        options = {k: v for k, v in cfg.train.model.model_kwargs().items() if k in ARCHITECTURE_OPTIONS}
        sink = f", sink {options['memory_sink_tokens']}" if options.get("memory_sink_tokens") else ""
        measure(f"start (l={l}{sink}, no training)", load_for_eval(base_path, device, segment_length=l, **options))
        if lc.length <= lc.baseline_max_tokens:
            from transformers import LlamaForCausalLM

            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            llama = LlamaForCausalLM.from_pretrained(base_path, dtype=dtype, attn_implementation="sdpa").to(device)
            measure("start, full attention", llama.eval())
    out = {name: c.to_dict() for name, c in curves.items()}
    folder = os.path.join(cfg.train.run.storage, cfg.name)
    with open(os.path.join(folder, "long_context.json"), "w") as f:
        json.dump(out, f, indent=1)
    trained = cfg.stages[-1].total_tokens
    plot_loss_by_position(curves, os.path.join(folder, "loss_by_position.png"), trained_length=trained,
                          title=f"{cfg.name}: loss by position on held-out text ({os.path.basename(lc.text)})")
    if parent and client is not None:
        from .train.tracking import tracking_uri

        log_loss_curves(list(curves.values()), run_id=parent, tracking_uri=tracking_uri(cfg.train),
                        trained_length=trained)
    return out


def run_curriculum(cfg: CurriculumConfig, init_from: str | None = None, log: Callable[[str], None] = print) -> list[StageResult]:
    """Run (or continue) every stage, evaluating after each. Ray must be initialised by the caller."""
    import torch

    from .evaluate import PasskeyGrid, log_passkey_grid, passkey_grid
    from .modeling import CondensationForCausalLM
    from .tokenizer import load_tokenizer
    from .train import fit
    from .train.checkpoints import resume_point

    cfg.validate()
    tokenizer = load_tokenizer(cfg.train.data.tokenizer)
    tracking = cfg.train.tracking.enabled
    parent = ensure_parent_run(cfg) if tracking else None
    client = _client(cfg) if tracking else None
    base = prev = init_from or cfg.train.model.init_from
    if cfg.pretraining.steps:
        prev = run_pretraining(cfg, prev, parent, client, log)
    device = eval_device(cfg)
    results: list[StageResult] = []
    for i, st in enumerate(cfg.stages):
        done = _finished_stage(cfg, i)
        if done is not None:
            log(f"stage {i} ({st.total_tokens} tokens): already finished, exact {done['exact']:.2f}; continuing from it")
            results.append(StageResult(**{**done, "skipped": True}))
            prev = done["hf_path"]
            continue
        tcfg = stage_train_config(cfg, i)
        if parent:
            tcfg = dataclasses.replace(tcfg, tracking=dataclasses.replace(tcfg.tracking, parent_run_id=parent))
        ckpt = resume_point(os.path.join(tcfg.run.storage, tcfg.run.name))
        if ckpt is not None:  # the training layer continues the stage's own run folder, whatever `prev` says
            log(f"stage {i}: {st.total_tokens} tokens, {st.steps} steps: resuming stage {i} from checkpoint "
                f"{ckpt[0]} ({ckpt[1]}){ckpt[2]}")
        else:
            replay = (f", {st.replay_micro_batches} replay micro-batch(es) a step of {replay_source(cfg)[0]} "
                      f"(weight {tcfg.schedule.replay_weight:g})" if st.replay_micro_batches else "")
            log(f"stage {i}: {st.total_tokens} tokens, {st.steps} steps, lr {st.lr:g} -> {st.min_lr:g}{replay}, "
                f"from {prev or 'scratch (' + tcfg.model.size + ')'}")
        res = fit(tcfg, stage_datasets(cfg, i, tokenizer, init_from=prev), init_from=prev)
        if res.hf_path is None:
            raise RuntimeError(f"stage {i} left no HF export (checkpoint.export_hf is off?)")

        model = load_for_eval(res.hf_path, device)
        e = cfg.evaluation
        grid: PasskeyGrid = passkey_grid(model, tokenizer, stage_eval_lengths(cfg, i), [float(d) for d in e.depths],
                                         n_per_cell=e.n_per_cell, seed=e.seed, batch_size=e.batch_size,
                                         progress=False, meta={"stage": i, "trained_length": st.total_tokens})
        loss = answer_loss(model, tokenizer, st.total_tokens)
        at_len = grid.summary().get(st.total_tokens, {})
        exact = float(at_len.get("exact", grid.mean_exact))
        digit = float(at_len.get("digit", grid.mean_digit))
        log(f"stage {i} done: at {st.total_tokens} tokens exact {exact:.2f}, per digit {digit:.2f}, "
            f"answer loss {loss:.3f}\n{grid.format_table()}")
        grid_path = os.path.join(res.run_dir, "passkey_grid.json")
        grid.to_json(grid_path)
        if res.mlflow_run_id:
            log_passkey_grid(grid, run_id=res.mlflow_run_id, tracking_uri=res.tracking_uri, step=st.steps,
                             trained_length=st.total_tokens)
            client.log_metric(res.mlflow_run_id, "passkey/answer_loss", loss, step=st.steps)
            client.set_tag(res.mlflow_run_id, "stage", f"{i}: {st.total_tokens}")
            client.set_tag(res.mlflow_run_id, "hf_path", res.hf_path)
            client.set_tag(res.mlflow_run_id, STAGE_DONE_TAG, "finished")
            client.log_metric(parent, "stage_exact", exact, step=i)
            client.log_metric(parent, "stage_digit", digit, step=i)
        rec = dict(index=i, total_tokens=st.total_tokens, hf_path=res.hf_path, run_id=res.mlflow_run_id,
                   grid_json=grid_path, exact=exact, digit=digit, answer_loss=loss)
        with open(os.path.join(res.run_dir, "stage_done.json"), "w") as f:
            json.dump(rec, f)
        results.append(StageResult(**rec))
        prev = res.hf_path

    if cfg.long_context.text and results:
        long_context_evaluation(cfg, base, results[-1].hf_path, device, parent, client, log)
    if parent:
        _log_summary(cfg, parent, results, client)
    if results and all(r.skipped for r in results):
        log(f"curriculum {cfg.name!r} had already finished: nothing to do. To start over, give it a new name "
            f"(name=...) or delete its folders {os.path.join(cfg.train.run.storage, cfg.name)}* ")
    return results


def end_runs(cfg: CurriculumConfig, status: str = "KILLED") -> list[str]:
    """End the curriculum's MLflow runs that are still RUNNING (its parent and any stage's) with `status`, e.g.
    after Ctrl-C; the ids ended. Started again, the curriculum marks them RUNNING as it continues."""
    from .train.tracking import end_run, end_run_id, tracking_uri

    if not cfg.train.tracking.enabled:
        return []
    ended = [end_run(stage_train_config(cfg, i), status) for i in range(len(cfg.stages))]
    id_file = os.path.join(cfg.train.run.storage, cfg.name, PARENT_ID_FILE)
    if os.path.exists(id_file):
        ended.append(end_run_id(tracking_uri(cfg.train), open(id_file).read().strip(), status))
    return [r for r in ended if r]


def _log_summary(cfg: CurriculumConfig, parent: str, results: list[StageResult], client) -> None:
    import tempfile

    from .evaluate import PasskeyGrid, plot_stage_summary

    grids = [PasskeyGrid.from_json(r.grid_json) for r in results]
    rows = ["| stage | trained length | exact at trained length | per digit | answer loss | exact over grid |",
            "|---|---|---|---|---|---|"]
    for r, g in zip(results, grids):
        rows.append(f"| {r.index} | {r.total_tokens} | {r.exact:.2f} | {r.digit:.2f} | {r.answer_loss:.3f} | {g.mean_exact:.2f} |")
    client.log_text(parent, "\n".join(rows) + "\n", "summary.md")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stage_summary.png")
        names = [f"stage {r.index} ({r.total_tokens})" for r in results]
        plot_stage_summary(dict(zip(names, grids)), path,
                           trained_lengths={n: r.total_tokens for n, r in zip(names, results)})
        client.log_artifact(parent, path)
    client.log_metric(parent, "final_exact", results[-1].exact)
    client.set_terminated(parent, "FINISHED")
