"""Ray Tune sweeps of segment length x learning rate over the project's training runs, with ASHA early stopping.

Every trial is one run of the training layer (`condensation.train.fit`: a Ray Train `TorchTrainer` + DeepSpeed) at
one (segment length, learning rate). Ray Train V2 cannot be handed to a `Tuner` as a trainer, so each trial is a
function trainable that calls `fit`, which starts the trial's own Ray Train run. How the two talk:
- up (Train -> Tune): `fit(callbacks=[<TuneReportCallback>], evaluate=...)`. Rank 0 of the trial's workers evaluates
  the objective every `eval_every` steps (`evaluate`: held-out loss through `condensation.evaluate.long_context`, or
  passkey answer loss / accuracy through `condensation.curriculum.answer_loss` / `condensation.evaluate`), the
  workers report it with `ray.train.report`, and Ray Tune's `TuneReportCallback` in the Train controller hands rank
  0's metrics to the trial, where ASHA sees them (time = the optimizer `step`).
- down (Tune -> Train): a trial's Train controller and workers are owned by the trial's actor, so ending that actor
  would kill them mid-step, and Ray Train's placement-group cleaner (which needs the dashboard's state API) would
  be all that frees their resources. So a trial is stopped cooperatively: when ASHA stops it (the sweep's Tune
  callback, `on_trial_complete`), when Tune cleans up its actor (`cleanup`), or when the sweep is interrupted
  (`on_step_end`), a `stop` file goes into the trial's run folder (`condensation.train.loop.STOP_FILE`); every
  worker ends before its next update, `fit` returns `stopped=True`, and only then does Tune end the actor.
Search points: the sweep draws every trial's (segment length, lr, grid values) itself (`search_points`: stratified
log-uniform rates, a grid over any further config keys in `search.grid`, checked against the config schema) and
hands Tune one grid over them, so the plan is printed before anything starts and any trial count covers every
length and the whole lr range.

Resources: Ray Tune reserves only a trial's driver (`TRIAL_DRIVER_CPUS`); the trial's Ray Train run reserves its
workers (`train.schedule.num_workers` x (`cpus_per_worker` CPUs + `gpus_per_worker` GPU when `use_gpu`)), so a sweep
packs a GPU machine with one trial per GPU (num_workers=1), N, or several per GPU (`gpus_per_trial` 0.25: four
one-worker runs share one GPU). `max_concurrent_trials` (None: as many as the cluster holds) caps the trials that
run at once.

Resume: the Tune experiment lives in `<storage>/<name>/tune`; started again with the same name and storage, the
sweep restores it (`Tuner.restore`): finished and stopped trials stay as they are (a trial whose run had finished
is not trained again), unfinished and errored ones go on (their training run continues from its newest checkpoint,
as any run of the training layer does), and ASHA first records every restored trial's results at its rungs again
(Tune does not save a scheduler's state). The number of trials at once is the current start's.

MLflow: a parent run `name` with one nested run per trial (the training layer's run: config, curves, the objective
at every evaluation, the final `sweep/objective`, tags `sweep.status`, `sweep.segment_length`, `sweep.lr`), and at the
end on the parent: `trials.md` (the table), `objective.png` (the objective over segment length x learning rate and
its curves), `best_config.yaml`, `best_trial.json` (checkpoint and HF export paths).

    from condensation.sweep import load_sweep_config, run_sweep
    result = run_sweep(load_sweep_config("default"))      # Ray must be initialised by the caller
    result.best.segment_length, result.best.lr, result.best.checkpoint_path
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .config import ConfigError, TrainConfig, _merge_into, load_yaml, merge, parse_overrides, to_yaml
from .curriculum import CurriculumConfig, StageConfig

PARENT_ID_FILE = "mlflow_parent_run_id"
CONFIG_FILE = "sweep_config.yaml"
TRIAL_DONE_FILE = "trial_done.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# what a trial's own actor reserves in Ray Tune: it only waits on its Ray Train run, which reserves the workers
TRIAL_DRIVER_CPUS = 0.01
OBJECTIVES = {"heldout_loss": "min", "loss": "min", "passkey_answer_loss": "min", "passkey_exact": "max"}
# what an objective's evaluation reports beside it, kept per trial (its last value) and shown in the trials table
SIDE_METRICS = {"heldout_loss": ("heldout_loss_tail",), "passkey_exact": ("passkey_digit",)}


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class SearchConfig:
    """The search space: segment length x learning rate, optionally x a grid over any other config keys.

    segment_lengths: segment lengths `l` to try (`model.segment_length`).
    lr_min, lr_max: bounds of the log-uniform learning rate (`optim.lr`; `optim.min_lr` keeps its ratio to it).
        Draws are stratified: n rates fall one into each of n equal slices of [log lr_min, log lr_max] (in a
        shuffled order), so even a few trials cover the range.
    lrs: fixed learning rates instead of sampling: a grid of every segment length x every rate; None samples.
    num_samples: learning rates drawn per segment length (a full grid of lengths x draws); must be 1 with `lrs`.
    trials: None runs the full grid above. A number runs that many (segment length, lr) trials instead: trial i
        takes segment_lengths[i % len(segment_lengths)] and the i-th of `trials` stratified draws, e.g. 8 trials
        over 3 lengths (a grid would need 3, 6 or 9). Not with `lrs`.
    grid: further axes, crossed with every (segment length, lr) point: a config key of the trials' training config
        (as under `train.`, e.g. `model.memory_grad_segments`) -> the list of values to try, e.g.
        `{model.memory_sink_tokens: [0, 4]}`; several keys give every combination. For comparing a change with the
        paper's recipe at the same points (set asha.enabled=false to train each to the end). Keys are checked
        against the config schema (`CondensationConfig` fields under model.overrides) before anything starts. On
        the command line: `search.grid.model.memory_grad_segments=[0,2]`.
    seed: seed of the draws: the same seed draws the same learning rates.
    """

    segment_lengths: list = field(default_factory=lambda: [32, 64])
    lr_min: float = 1e-4
    lr_max: float = 1e-2
    lrs: list | None = None
    num_samples: int = 2
    trials: int | None = None
    grid: dict = field(default_factory=dict)
    seed: int = 0


@dataclass
class AshaConfig:
    """ASHA early stopping (`ray.tune.schedulers.ASHAScheduler`) on the objective, in optimizer steps.

    enabled: False runs every trial to its end.
    grace_period: steps every trial trains before it can be stopped (the first rung).
    reduction_factor: at each rung (grace_period x reduction_factor^k steps), a trial whose objective is not within
        the best 1/reduction_factor of the trials recorded there so far stops.
    max_t: the last rung lies below this many steps (None: the trials' `schedule.total_steps`). A trial is never
        stopped by ASHA at its last step; it finishes by itself.
    """

    enabled: bool = True
    grace_period: int = 10
    reduction_factor: float = 2.0
    max_t: int | None = None


@dataclass
class SweepConfig:
    """A whole sweep.

    name: the sweep's name: MLflow parent run name and its folder `<train.run.storage>/<name>` (Tune's experiment,
        the trials' run folders, the summary). Started again with the same name and storage, the sweep resumes.
    train: the base training config of every trial (model, data, optimizer, schedule, storage, tracking); a trial
        sets its segment length, learning rate, run name and MLflow parent.
    stage: None trains `train` on its data; an index trains that passkey stage of `curriculum` instead (its rows,
        total length, steps and depth range, from `train` as the base config; the stage's own lr is replaced).
    curriculum: where the stage comes from (`stages`, `train_rows`, `full_lm_loss`, `cache_rows`; its `train` is
        not used).
    init_from: a HF folder, hub id or `condensation.pretrained` name every trial starts from (e.g. a continual
        pretraining export); None: `train.model.init_from`.
    search: the search space; asha: early stopping.
    objective: what is optimised, evaluated by rank 0 every `eval_every` steps: "heldout_loss" (token-mean
        next-token loss on held-out text: rows of the built-in local text never trained on, fresh synthetic rows, or
        `heldout_text`), "loss" (the training loss the training layer reports; with several segment lengths only
        under `model.overrides.loss_reduction=token_mean`, since the eq. 17 sum grows with the number of
        segments), "passkey_answer_loss" (teacher-forced loss of the passkey digits, `curriculum.answer_loss`) or
        "passkey_exact" (greedy exact-match accuracy, `condensation.evaluate.passkey_grid`).
    mode: "min" or "max"; None: min for the losses, max for passkey_exact.
    eval_every: steps between evaluations (= the trials' `tracking.log_every`: one report to Tune per evaluation).
    heldout_text: a .jsonl file or folder (`text` field) of held-out documents for heldout_loss; needed when the
        data is not "local" or "synthetic".
    heldout_rows: held-out rows (windows of `heldout_tokens` tokens) per evaluation.
    heldout_tokens: the length of the held-out windows for objective "heldout_loss" (None: `train.data.seq_len`);
        at least the longest segment length searched, not necessarily a multiple of it. The evaluation also reports
        `heldout_loss_tail`, the mean loss over the windows' last quarter: with windows longer than the training
        length (e.g. 4x), whether the model holds up past the length it was trained on.
    passkey_length: total tokens of the passkey examples (None: the stage's length, else `data.seq_len`).
    passkey_n: passkey examples per evaluation (passkey_exact: per depth of 0, 0.5, 1).
    gpus_per_trial: GPUs one trial reserves (with train.schedule.use_gpu): None gives each of its
        `train.schedule.num_workers` workers a whole GPU; a fraction packs several one-worker trials onto one GPU
        (0.25: four at once, each worker reserving {"GPU": 0.25}); a whole number must equal num_workers.
    max_concurrent_trials: trials running at once; None: as many as the cluster holds when the sweep starts (GPUs
        / gpus_per_trial; on CPUs, one trial unless `train.schedule.cpus_per_worker` is set). When
        `cpus_per_worker` is None, each trial's workers get an even share of the CPUs left beside the data tasks.
    """

    name: str = "sweep"
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: int | None = None
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    init_from: str | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    asha: AshaConfig = field(default_factory=AshaConfig)
    objective: str = "heldout_loss"
    mode: str | None = None
    eval_every: int = 5
    heldout_text: str | None = None
    heldout_rows: int = 16
    heldout_tokens: int | None = None
    passkey_length: int | None = None
    passkey_n: int = 16
    gpus_per_trial: float | None = None
    max_concurrent_trials: int | None = None

    @property
    def metric_mode(self) -> str:
        return self.mode or OBJECTIVES.get(self.objective, "min")

    @property
    def folder(self) -> str:
        return os.path.join(self.train.run.storage, self.name)

    def total_steps(self) -> int:
        return self.curriculum.stages[self.stage].steps if self.stage is not None else self.train.schedule.total_steps

    def num_trials(self) -> int:
        return len(search_points(self))

    def validate(self) -> "SweepConfig":
        validate_sweep(self)
        return self


def _stage_curriculum(cfg: SweepConfig) -> CurriculumConfig:
    """The curriculum whose stage `cfg.stage` the trials train, with the sweep's `train` as its base."""
    stages = [s if isinstance(s, StageConfig) else merge(StageConfig(), s) for s in cfg.curriculum.stages]
    return dataclasses.replace(cfg.curriculum, name=cfg.name, stages=stages, train=cfg.train)


# ----------------------------------------------------------------------------------------------------------------
# The search points: every trial's (segment length, lr, grid values), drawn here rather than by Tune, so the plan is
# known (and printed) before anything starts and a sweep of any size covers every length and the whole lr range


def stratified_loguniform(rng: np.random.Generator, n: int, lo: float, hi: float) -> list[float]:
    """n log-uniform draws in [lo, hi], one in each of n equal slices of the log range, in a shuffled order."""
    u = (rng.permutation(n) + rng.random(n)) / n
    return [float(lo * (hi / lo) ** x) for x in u]


def grid_axes(search: SearchConfig) -> dict[str, list]:
    """`search.grid` as {dotted key: values}; nested mappings (what `search.grid.a.b=[..]` on the command line gives)
    are flattened down to their lists."""
    from .config import flatten

    return {k: v for k, v in flatten(search.grid).items()}


def search_points(cfg: SweepConfig) -> list[dict]:
    """Every trial's point, in the order trials start: {"segment_length", "lr", "params": {grid key: value}}.
    Grid combinations vary fastest, so the variants of one (segment length, lr) run side by side."""
    import itertools

    s = cfg.search
    rng = np.random.default_rng(s.seed)
    lengths = list(s.segment_lengths)
    if s.lrs:
        base = [(l, float(lr)) for l in lengths for lr in s.lrs]
    elif s.trials is not None:
        draws = stratified_loguniform(rng, s.trials, s.lr_min, s.lr_max)
        base = [(lengths[i % len(lengths)], draws[i]) for i in range(s.trials)]
    else:
        per = {l: stratified_loguniform(rng, s.num_samples, s.lr_min, s.lr_max) for l in lengths}
        base = [(l, per[l][j]) for j in range(s.num_samples) for l in lengths]
    axes = grid_axes(s)
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else [{}]
    return [{"segment_length": int(l), "lr": lr, "params": dict(c)} for l, lr in base for c in combos]


def _value_tag(v) -> str:
    text = "None" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    return "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in text)[:24]


def trial_run_name(name: str, trial_id: str, point: dict) -> str:
    """A trial's run folder and MLflow run name: the sweep, the trial's number, its segment length, lr and grid
    values (each as the key's last part and the value)."""
    extra = "".join(f"-{k.rsplit('.', 1)[-1]}{_value_tag(v)}" for k, v in (point.get("params") or {}).items())
    return f"{name}-{trial_id.rsplit('_', 1)[-1]}-l{point['segment_length']}-lr{point['lr']:.1e}{extra}"


def _nested(key: str, value) -> dict:
    out: dict = {}
    d = out
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value
    return out


def trial_train_config(cfg: SweepConfig, segment_length: int, lr: float, run_name: str = "trial",
                       parent_run_id: str | None = None, params: dict | None = None) -> TrainConfig:
    """The training config of one trial: the base (or the stage's) config at this segment length and learning rate
    (min_lr scaled with it) with the grid values `params`, reporting every `eval_every` steps, in
    `<storage>/<name>/trials/<run_name>`, logging to the sweep's MLflow store under its parent run, reserving
    `gpus_per_trial`."""
    from .train.tracking import artifact_location, tracking_uri

    base = cfg.train
    if cfg.stage is not None:
        from .curriculum import stage_train_config

        base = stage_train_config(_stage_curriculum(cfg), cfg.stage)
    for key, value in (params or {}).items():
        base = merge(base, _nested(key, value))
    ratio = base.optim.min_lr / base.optim.lr
    model = dataclasses.replace(base.model, segment_length=int(segment_length),
                                init_from=cfg.init_from if cfg.init_from is not None else base.model.init_from)
    tracking = dataclasses.replace(base.tracking, log_every=cfg.eval_every, parent_run_id=parent_run_id,
                                   tracking_uri=tracking_uri(cfg.train), artifact_location=artifact_location(cfg.train))
    schedule = base.schedule
    if cfg.gpus_per_trial is not None and schedule.use_gpu:
        schedule = dataclasses.replace(schedule, gpus_per_worker=cfg.gpus_per_trial / schedule.num_workers)
    return dataclasses.replace(
        base, model=model, optim=dataclasses.replace(base.optim, lr=float(lr), min_lr=float(lr) * ratio),
        tracking=tracking, schedule=schedule,
        run=dataclasses.replace(base.run, name=run_name, storage=os.path.join(cfg.folder, TRIALS_DIR)))


# grid keys a sweep cannot vary, and why
_FIXED_KEYS = {
    "model.segment_length": "the segment length is search.segment_lengths",
    "model.overrides.segment_length": "the segment length is search.segment_lengths",
    "optim.lr": "the learning rate is search.lr_min / lr_max / lrs",
    "optim.min_lr": "it follows the trial's learning rate (same ratio as the base config's)",
    # data.random_lengths (an issue-12 idea) changes only how batches are cut, so it may vary
    **{f"data.{k}": "every trial trains and is scored on the same data, or the objective does not compare"
       for k in ("source", "seq_len", "num_rows", "tokenizer", "dataset_options", "seed", "cache_rows")},
    "run": "the sweep names and places its trials",
    "tracking": "the sweep sets where and how often trials report",
    "schedule.total_steps": "ASHA's rungs and the trials' last step are the same for all trials",
    "schedule.num_workers": "what a trial reserves is the same for all trials (gpus_per_trial, max_concurrent_trials)",
    "schedule.use_gpu": "what a trial reserves is the same for all trials",
    "schedule.gpus_per_worker": "what a trial reserves is set by gpus_per_trial",
    "schedule.cpus_per_worker": "what a trial reserves is the same for all trials",
}


def _check_grid_key(key: str) -> None:
    """`key` names a field of the trials' training config (or a CondensationConfig field under model.overrides, or a
    key inside a free-form mapping such as deepspeed), and not one the sweep owns; else ConfigError naming it."""
    from .modeling import CondensationConfig

    where = f"search.grid.{key}"
    for fixed, why in _FIXED_KEYS.items():
        if key == fixed or key.startswith(fixed + "."):
            raise ConfigError(where, f"a sweep cannot vary {fixed}: {why}")
    obj: Any = TrainConfig()
    parts = key.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                hint = ""
                if path.startswith("model.") and part in {f.name for f in dataclasses.fields(CondensationConfig)}:
                    hint = f"; CondensationConfig fields go under model.overrides: search.grid.model.overrides.{part}"
                raise ConfigError(where, f"unknown config key {path!r} (known keys here: {sorted(names)}){hint}")
            obj = getattr(obj, part)
            continue
        if path.rsplit(".", 1)[0] == "model.overrides":
            known = {f.name for f in dataclasses.fields(CondensationConfig)}
            if part not in known or i != len(parts) - 1:
                own = sorted(CondensationConfig.__annotations__)  # the segment memory's own; Llama's also count
                raise ConfigError(where, f"{path!r} is not a CondensationConfig field (its own: {own}, and "
                                         f"LlamaConfig's, e.g. rope_parameters)")
        return  # inside a free-form mapping (deepspeed, model.overrides): any key
    if dataclasses.is_dataclass(obj):
        raise ConfigError(where, f"{key!r} is a section, not a value: name one of its keys "
                                 f"({sorted(f.name for f in dataclasses.fields(obj))})")


def _check_grid_value(key: str, value) -> None:
    """A value a CondensationConfig field cannot take fails here (init_from checkpoints skip the config's own check
    of model.overrides until a worker builds the model)."""
    if not key.startswith("model.overrides."):
        return
    from .modeling import CondensationConfig

    try:
        CondensationConfig(**{key.rsplit(".", 1)[-1]: value})
    except Exception as e:
        raise ConfigError(f"search.grid.{key}", f"value {value!r}: {e}") from None


def validate_sweep(cfg: SweepConfig) -> None:
    """Every error a sweep can know before Ray starts, as a ConfigError naming the field."""
    from .config import validate as validate_train

    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError("name", f"must be a plain folder name, got {cfg.name!r}")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError("objective", f"one of {sorted(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.mode not in (None, "min", "max"):
        raise ConfigError("mode", f"'min', 'max' or null, got {cfg.mode!r}")
    s = cfg.search
    if not s.segment_lengths or not all(isinstance(l, int) and not isinstance(l, bool) and l > 0 for l in s.segment_lengths):
        raise ConfigError("search.segment_lengths", f"a list of positive ints, got {s.segment_lengths!r}")
    if len(set(s.segment_lengths)) != len(s.segment_lengths):
        raise ConfigError("search.segment_lengths", f"repeats a length: {s.segment_lengths}")
    if s.lrs is not None:
        try:  # YAML 1.1 reads 3e-3 as a string
            lrs = [float(v) for v in s.lrs if not isinstance(v, bool)]
        except (TypeError, ValueError):
            lrs = []
        if not s.lrs or len(lrs) != len(s.lrs) or not all(v > 0 for v in lrs):
            raise ConfigError("search.lrs", f"a list of positive learning rates or null, got {s.lrs!r}")
        if len(set(lrs)) != len(lrs):
            raise ConfigError("search.lrs", f"repeats a rate: {s.lrs}")
        s.lrs = lrs
    else:
        if not s.lr_min > 0:
            raise ConfigError("search.lr_min", f"must be positive, got {s.lr_min}")
        if not s.lr_max >= s.lr_min:
            raise ConfigError("search.lr_max", f"must be >= search.lr_min ({s.lr_min}), got {s.lr_max}")
    if s.num_samples < 1:
        raise ConfigError("search.num_samples", f"must be at least 1, got {s.num_samples}")
    if s.lrs is not None and s.num_samples != 1:
        raise ConfigError("search.num_samples", f"must be 1 with search.lrs (a repeat would train the same trial "
                                                f"again), got {s.num_samples}")
    if s.trials is not None:
        if s.lrs is not None:
            raise ConfigError("search.trials", "draws learning rates: with fixed search.lrs, leave it null (a grid)")
        if s.trials < 1:
            raise ConfigError("search.trials", f"must be positive or null, got {s.trials}")
    if not isinstance(s.grid, dict):
        raise ConfigError("search.grid", f"a mapping of config key -> list of values, got {s.grid!r}")
    for key, values in grid_axes(s).items():
        _check_grid_key(key)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search.grid.{key}", f"a non-empty list of values to try, got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"search.grid.{key}", f"repeats a value: {values}")
        for v in values:
            _check_grid_value(key, v)
    if cfg.gpus_per_trial is not None:
        g, sch = cfg.gpus_per_trial, cfg.train.schedule
        if not sch.use_gpu:
            raise ConfigError("gpus_per_trial", "needs train.schedule.use_gpu=true")
        if g <= 0:
            raise ConfigError("gpus_per_trial", f"must be positive, got {g:g}")
        if g < 1 and sch.num_workers != 1:
            raise ConfigError("gpus_per_trial", f"a fraction of a GPU ({g:g}) is for one-worker trials "
                                                f"(train.schedule.num_workers=1, got {sch.num_workers}): NCCL cannot "
                                                f"place two ranks of one run on one GPU")
        if g >= 1 and g != sch.num_workers:
            raise ConfigError("gpus_per_trial", f"a whole number of GPUs must equal train.schedule.num_workers "
                                                f"({sch.num_workers}: one GPU per worker), got {g:g}")
    if cfg.max_concurrent_trials is not None and cfg.max_concurrent_trials < 1:
        raise ConfigError("max_concurrent_trials", f"must be positive or null, got {cfg.max_concurrent_trials}")
    if cfg.heldout_rows < 1:
        raise ConfigError("heldout_rows", f"must be positive, got {cfg.heldout_rows}")
    if cfg.heldout_tokens is not None:
        h = cfg.heldout_tokens
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise ConfigError("heldout_tokens", f"a positive number of tokens or null, got {h!r}")
        if h < max(s.segment_lengths):
            raise ConfigError("heldout_tokens", f"({h}) is shorter than the longest segment length searched "
                                                f"({max(s.segment_lengths)}): a held-out window holds whole segments")
    if cfg.passkey_n < 1:
        raise ConfigError("passkey_n", f"must be positive, got {cfg.passkey_n}")
    if cfg.passkey_length is not None and cfg.passkey_length < 32:
        raise ConfigError("passkey_length", f"must be at least 32 tokens (the passkey prompt), got {cfg.passkey_length}")

    if cfg.stage is not None:
        cur = _stage_curriculum(cfg)
        if not 0 <= cfg.stage < len(cur.stages):
            raise ConfigError("stage", f"no stage {cfg.stage} in curriculum.stages (there are {len(cur.stages)})")
        try:  # its stages, rows and every stage's training config (on the sweep's base)
            cur.validate()
        except ConfigError as e:
            raise ConfigError(f"curriculum.{e.key}", str(e).split(": ", 1)[-1]) from None
    total = cfg.total_steps()
    a = cfg.asha
    max_t = a.max_t if a.max_t is not None else total
    if cfg.eval_every < 1 or cfg.eval_every > total:
        raise ConfigError("eval_every", f"must be within [1, {total}] (the trials' steps), got {cfg.eval_every}")
    if a.grace_period < 1:
        raise ConfigError("asha.grace_period", f"must be positive, got {a.grace_period}")
    if a.reduction_factor <= 1:
        raise ConfigError("asha.reduction_factor", f"must be > 1, got {a.reduction_factor}")
    if max_t < 1 or max_t > total:
        raise ConfigError("asha.max_t", f"must be within [1, {total}] (the trials' steps), got {max_t}")
    if a.enabled and a.grace_period > max_t:
        raise ConfigError("asha.grace_period", f"({a.grace_period}) exceeds asha.max_t / the trials' steps ({max_t})")

    # every trial's training config must be valid: the smallest and largest rate at every length, with every grid
    # combination (a grid value's error names its search.grid key)
    import itertools

    axes = grid_axes(s)
    combos = [dict(zip(axes, vs)) for vs in itertools.product(*axes.values())] if axes else [{}]
    lrs = s.lrs or [s.lr_min, s.lr_max]
    for l in s.segment_lengths:
        for combo in combos:
            for lr in (min(lrs), max(lrs)):
                try:
                    tcfg = trial_train_config(cfg, l, lr, params=combo)
                    validate_train(tcfg)
                except ConfigError as e:
                    axis = next((k for k in combo if e.key == k or e.key.startswith(k + ".")), None)
                    where = f"search.grid.{axis}" if axis else \
                        "search.segment_lengths" if e.key.startswith("model.segment_length") else \
                        "search.lrs" if e.key.startswith("optim.") and s.lrs else \
                        "search.lr_min" if e.key.startswith("optim.") else f"train.{e.key}"
                    at = ", ".join([f"l={l}", f"lr={lr:g}", *(f"{k}={v!r}" for k, v in combo.items())])
                    raise ConfigError(where, f"({at}) {str(e).split(': ', 1)[-1]}") from None
    if cfg.stage is None:
        from .train.data import check_train_data

        try:
            check_train_data(trial_train_config(cfg, s.segment_lengths[0], lrs[0], params=combos[0]))
        except ConfigError as e:
            raise ConfigError(f"train.{e.key}", str(e).split(": ", 1)[-1]) from None

    t = cfg.train
    red = t.model.overrides.get("loss_reduction", "segment_sum")
    if cfg.objective == "loss" and len(s.segment_lengths) > 1 and red != "token_mean":
        raise ConfigError("objective", "'loss' is the eq. 17 sum of segment means, which grows with the number of "
                                       "segments, so it does not compare segment lengths: use heldout_loss, or set "
                                       "train.model.overrides.loss_reduction=token_mean")
    if cfg.objective != "loss" and t.schedule.zero_stage == 3:
        raise ConfigError("train.schedule.zero_stage", f"objective {cfg.objective!r} is evaluated on rank 0's whole "
                                                       "weights, which ZeRO-3 partitions: use zero_stage <= 2 or "
                                                       "objective=loss")
    if cfg.objective == "heldout_loss":
        if cfg.heldout_text is not None:
            if not os.path.exists(os.path.expanduser(cfg.heldout_text)):
                raise ConfigError("heldout_text", f"{cfg.heldout_text}: no such file or folder (held-out .jsonl text; "
                                                  "`python workloads/make_corpus.py` builds data/corpus/heldout.jsonl)")
        elif cfg.stage is not None or t.data.source not in ("local", "synthetic"):
            what = "passkey rows" if cfg.stage is not None else f"data.source={t.data.source!r}"
            raise ConfigError("heldout_text", f"heldout_loss on {what} needs held-out text: set heldout_text to a "
                                              ".jsonl file of documents never trained on"
                                              + (", or use objective=passkey_answer_loss" if cfg.stage is not None else ""))
        elif t.data.source == "local":
            from .train.data import local_text_tokens

            avail = len(local_text_tokens()) // t.data.seq_len
            used = t.data.num_rows if t.data.num_rows is not None else avail
            length = cfg.heldout_tokens or t.data.seq_len
            if length != t.data.seq_len and cfg.heldout_rows * length > max(avail - used, 0) * t.data.seq_len:
                raise ConfigError("heldout_tokens", f"the local text holds {avail} rows of {t.data.seq_len} tokens; "
                                                    f"train.data.num_rows={used} leave {max(avail - used, 0)} held "
                                                    f"out, fewer tokens than heldout_rows={cfg.heldout_rows} "
                                                    f"windows of heldout_tokens={length}")
            if length == t.data.seq_len and used + cfg.heldout_rows > avail:
                raise ConfigError("heldout_rows", f"the local text holds {avail} rows of {t.data.seq_len} tokens; "
                                                  f"train.data.num_rows={used} leave {max(avail - used, 0)} held out, "
                                                  f"fewer than heldout_rows={cfg.heldout_rows}")


def load_sweep_config(preset: str = "default", yaml_path: str | None = None,
                      overrides: list[str] | None = None) -> SweepConfig:
    """preset <- YAML file <- `key.sub=value` overrides, validated (raises ConfigError naming the field).
    `curriculum.stages.N.key=value` addresses one stage."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if yaml_path:
        cfg = merge(cfg, load_yaml(yaml_path))
    upd = parse_overrides(overrides)
    cur = upd.get("curriculum")
    if isinstance(cur, dict) and isinstance(cur.get("stages"), dict):
        stages = [dataclasses.asdict(s) if isinstance(s, StageConfig) else dict(s) for s in cfg.curriculum.stages]
        for idx, change in cur.pop("stages").items():
            if not str(idx).isdigit() or int(idx) >= len(stages):
                raise ConfigError(f"curriculum.stages.{idx}", f"no such stage (there are {len(stages)})")
            if not isinstance(change, dict):
                raise ConfigError(f"curriculum.stages.{idx}", f"expected a mapping, got {change!r}")
            stages[int(idx)].update(change)
        cfg = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, stages=stages))
    cfg = merge(cfg, upd)
    stages = []
    for i, st in enumerate(cfg.curriculum.stages):
        if not isinstance(st, (StageConfig, dict)):
            raise ConfigError(f"curriculum.stages.{i}", f"expected a mapping, got {st!r}")
        stages.append(st if isinstance(st, StageConfig) else _merge_into(StageConfig(), st, f"curriculum.stages.{i}."))
    cfg = dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, stages=stages))
    return cfg.validate()


def _absolute(path: str | None) -> str | None:
    """A path that exists relative to the current folder, made absolute; anything else (a hub id, a name) as is."""
    from .config import BUILTIN_SOURCES

    if path in (*BUILTIN_SOURCES, "builtin"):
        return path
    if path and "://" not in path and os.path.exists(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return path


def resolve_sweep(cfg: SweepConfig) -> SweepConfig:
    """Validated copy with the storage and every local path absolute: Ray Tune runs each trial in a folder of its own
    (its working directory), where a relative path would point elsewhere."""
    cfg.validate()
    t = cfg.train
    storage = t.run.storage if "://" in t.run.storage else os.path.abspath(os.path.expanduser(t.run.storage))
    train = dataclasses.replace(
        t, run=dataclasses.replace(t.run, storage=storage),
        data=dataclasses.replace(t.data, source=_absolute(t.data.source), tokenizer=_absolute(t.data.tokenizer)),
        model=dataclasses.replace(t.model, init_from=_absolute(t.model.init_from)))
    return dataclasses.replace(cfg, train=train, init_from=_absolute(cfg.init_from),
                               heldout_text=_absolute(cfg.heldout_text))


# ----------------------------------------------------------------------------------------------------------------
# Presets


def default_preset() -> SweepConfig:
    """The embedded CPU default: 4 trials (segment 32 and 64 x 2 log-uniform learning rates) of the debug model on
    the built-in local text, 40 steps each, one trial at a time on 2 workers; held-out loss every 5 steps, ASHA from
    step 10. A few minutes on 2 cores."""
    train = merge(TrainConfig(), {
        "model": {"size": "debug"},
        "data": {"source": "local", "seq_len": 128, "num_rows": 512},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
        "schedule": {"total_steps": 40, "global_batch": 8, "per_worker_batch": 4, "num_workers": 2},
        "checkpoint": {"every": 0, "keep": 1},
        "run": {"name": "sweep-cpu", "storage": "runs"},
    })
    return SweepConfig(name="sweep-cpu", train=train,
                       search=SearchConfig(segment_lengths=[32, 64], lr_min=3e-4, lr_max=3e-2, num_samples=2, seed=0),
                       asha=AshaConfig(grace_period=10, reduction_factor=2.0), objective="heldout_loss", eval_every=5,
                       heldout_rows=16, max_concurrent_trials=1)


def debug_preset() -> SweepConfig:
    """Seconds per trial: for tests of the machinery (Tune, ASHA, resume, MLflow), not of learning."""
    cfg = default_preset()
    train = merge(cfg.train, {"data": {"num_rows": 64}, "schedule": {"total_steps": 8, "global_batch": 4,
                                                                      "per_worker_batch": 2, "num_workers": 2},
                              "optim": {"warmup_steps": 1}})
    return dataclasses.replace(cfg, name="sweep-debug", train=train, eval_every=2, heldout_rows=4,
                               asha=AshaConfig(grace_period=2, reduction_factor=2.0))


def passkey_preset() -> SweepConfig:
    """Stage 0 of the passkey curriculum's CPU default (96 tokens), scored by the passkey answer loss: which segment
    length and learning rate teach retrieval fastest."""
    from .curriculum import default_preset as curriculum_default

    cur = curriculum_default()
    train = merge(cur.train, {"checkpoint": {"every": 0, "keep": 1}})
    stage = dataclasses.replace(cur.stages[0], steps=200)
    return SweepConfig(name="sweep-passkey", train=train, stage=0,
                       curriculum=dataclasses.replace(cur, stages=[stage], train_rows=2048),
                       search=SearchConfig(segment_lengths=[32, 64], lr_min=3e-4, lr_max=3e-3, num_samples=2),
                       asha=AshaConfig(grace_period=50, reduction_factor=2.0), objective="passkey_answer_loss",
                       eval_every=25, passkey_n=16, max_concurrent_trials=1)


def _smollm2_train() -> TrainConfig:
    """SmolLM2-135M-Instruct as Condensation, continually pretrained on the offline corpus (`python
    workloads/make_corpus.py` writes data/corpus/) on one GPU share: rows of 4096 tokens (16, 8 and 4 segments of
    256, 512 and 1024), 8 rows a step in micro-batches of 4 (about 20 GiB a trial, so 4 fit on one H200), 30 steps
    (1M tokens). Token-mean loss, so that segment lengths compare."""
    return merge(TrainConfig(), {
        "model": {"init_from": "smollm2-135m-instruct", "segment_length": 512,
                  "overrides": {"loss_reduction": "token_mean"}},
        "data": {"source": "data/corpus/train.jsonl", "seq_len": 4096, "num_rows": None,
                 "tokenizer": "smollm2-135m-instruct", "dataset_options": {"mode": "pack", "min_tokens": 256}},
        "optim": {"lr": 1e-4, "min_lr": 3e-5, "warmup_steps": 3, "weight_decay": 0.0},
        "schedule": {"total_steps": 30, "global_batch": 8, "per_worker_batch": 4, "num_workers": 1, "use_gpu": True,
                     "precision": "bf16", "torch_threads": None},
        "checkpoint": {"every": 0, "keep": 1},
        # trials share the GPU: a matmul peak measured by each at its start would be measured against the others
        # (the H200's measured bf16 peak, benchmarks/results); GPU utilisation sampled often enough for 2-minute trials
        "tracking": {"peak_tflops": 800.0, "system_metrics_interval_s": 5.0},
        "run": {"name": "sweep-h200", "storage": "runs"},
    })


def h200_preset() -> SweepConfig:
    """One H200, about 5 minutes (266 s measured, seventh session): SmolLM2-135M-Instruct (`_smollm2_train`), 8 trials
    over segment length 256 / 512 / 1024 (round robin) x learning rate log-uniform in [1e-5, 1e-3], 4 at a time on
    the one GPU (gpus_per_trial 0.25, each a one-worker Ray Train run), held-out loss on data/corpus/heldout.jsonl
    (documents never trained on) every 5 steps, ASHA from step 10. With 4 GPUs: gpus_per_trial=1 (one GPU per trial,
    4 at a time)."""
    return SweepConfig(name="sweep-h200", train=_smollm2_train(),
                       search=SearchConfig(segment_lengths=[256, 512, 1024], lr_min=1e-5, lr_max=1e-3, trials=8),
                       asha=AshaConfig(grace_period=10, reduction_factor=2.0), objective="heldout_loss", eval_every=5,
                       heldout_text="data/corpus/heldout.jsonl", heldout_rows=8, gpus_per_trial=0.25,
                       max_concurrent_trials=4)


def h200_ideas_preset() -> SweepConfig:
    """One H200, about 3 minutes (184 s measured, seventh session): two issue-12 ideas against the paper's recipe at one
    point (segment 512, lr 1e-4), crossed: an attention sink in every memory (`model.memory_sink_tokens` 0 = the
    paper, 4) x the memory's own norm (`model.memory_norm` shared = the paper, separate); 4 trials at once, each
    trained to the end (no ASHA), held-out loss. Other ideas are other `search.grid` keys
    (`model.memory_grad_segments`, `data.random_lengths`)."""
    cfg = h200_preset()
    return dataclasses.replace(
        cfg, name="sweep-h200-ideas",
        search=SearchConfig(segment_lengths=[512], lrs=[1e-4], num_samples=1,
                            grid={"model.memory_sink_tokens": [0, 4], "model.memory_norm": ["shared", "separate"]}),
        asha=AshaConfig(enabled=False))


def h200_ideas_bptt_preset() -> SweepConfig:
    """One H200, about 3 minutes (153 s measured, eighth session): two issue-12 training ideas against the paper's recipe at the h200-ideas point
    (segment 512, lr 1e-4, SmolLM2 rows of 4096 tokens), crossed: random sequence lengths (`data.random_lengths`
    False = the paper, True: each micro-batch a random number of whole segments) x truncated backpropagation through
    the memory (`model.memory_grad_segments` 0 = full backpropagation = the paper, 2: the memory's gradient cut every
    2 segments); 4 trials at once, each trained to the end (no ASHA). Held-out loss on windows of 16384 tokens (4x
    the training length, `heldout_tokens`), with `heldout_loss_tail` (the windows' last quarter, positions
    12288-16384) showing whether a variant holds up past the trained length. The h200 training config leaves
    `schedule.cuda_graph` off, so random_lengths is allowed as it is. Measured (benchmarks/results/h200_s8/ideas-bptt):
    the paper's recipe 2.443 (tail 2.563), random lengths 2.498 (2.615), the gradient cut every 2 segments 5.899 and
    6.842 (tails 9.97 and 9.90: the memory collapses past ~17 segments unless trained through them).

        python workloads/sweep.py --preset h200-ideas-bptt
    """
    cfg = h200_ideas_preset()
    return dataclasses.replace(
        cfg, name="sweep-h200-ideas-bptt", heldout_tokens=4 * cfg.train.data.seq_len,
        search=dataclasses.replace(cfg.search, grid={"data.random_lengths": [False, True],
                                                     "model.memory_grad_segments": [0, 2]}))


PRESETS: dict[str, Callable[[], SweepConfig]] = {
    "default": default_preset, "debug": debug_preset, "passkey": passkey_preset, "h200": h200_preset,
    "h200-ideas": h200_ideas_preset, "h200-ideas-bptt": h200_ideas_bptt_preset,
}


# ----------------------------------------------------------------------------------------------------------------
# The objective, evaluated on rank 0 of a trial's workers


@dataclass
class Evaluator:
    """`evaluate` for `fit`: picklable, so it travels to the workers in the train loop's config. Held-out rows are
    built on the driver (small int arrays); a tokenizer is loaded in the worker on first use."""

    objective: str
    rows: np.ndarray | None = None
    tokenizer: str | None = None
    passkey_length: int = 128
    passkey_n: int = 16
    seed: int = 99

    def __call__(self, model) -> dict:
        was = model.training
        try:
            return self._evaluate(model)
        finally:
            model.train(was)

    def _evaluate(self, model) -> dict:
        if self.objective == "heldout_loss":
            from .evaluate.long_context import loss_by_position

            # bins of a quarter window (rounded up): the last bin is the window's last quarter
            length = self.rows.shape[1]
            curve = loss_by_position(model, self.rows, bin_tokens=-(-length // 4), batch_size=len(self.rows),
                                     name="heldout")
            return {"heldout_loss": curve.mean_loss(), "heldout_loss_tail": curve.bin_loss[-1]}
        tok = self._tokenizer()
        if self.objective == "passkey_answer_loss":
            from .curriculum import answer_loss

            return {"passkey_answer_loss": answer_loss(model, tok, self.passkey_length, n=self.passkey_n, seed=self.seed)}
        if self.objective == "passkey_exact":
            from .evaluate import passkey_grid

            grid = passkey_grid(model, tok, [self.passkey_length], [0.0, 0.5, 1.0], n_per_cell=self.passkey_n,
                                seed=self.seed, batch_size=min(16, self.passkey_n), progress=False)
            return {"passkey_exact": float(grid.mean_exact), "passkey_digit": float(grid.mean_digit)}
        return {}

    def _tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from .tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer)
        return self._tok

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_tok", None)
        return state


def heldout_rows(cfg: SweepConfig, tcfg: TrainConfig) -> np.ndarray:
    """[heldout_rows, heldout_tokens] int64 rows never trained on (heldout_tokens None: seq_len): the local text's
    rows after the training ones in the same shuffled order, fresh synthetic rows (another seed), or windows of
    `heldout_text`. Local text with heldout_tokens != seq_len: the rows never trained on, put back in text order and
    joined, cut into windows of heldout_tokens."""
    d, n = tcfg.data, cfg.heldout_rows
    length = cfg.heldout_tokens or d.seq_len
    if cfg.heldout_text:
        from .evaluate.long_context import token_windows
        from .tokenizer import load_tokenizer

        import warnings

        with warnings.catch_warnings():  # short documents are concatenated: fine for a mean loss
            warnings.simplefilter("ignore", UserWarning)
            return token_windows(load_tokenizer(d.tokenizer), cfg.heldout_text, length, n, seed=d.seed)
    if d.source == "synthetic":
        from .train.data import synthetic_rows
        from .train.trainer import _vocab_size

        return synthetic_rows(length, n, _vocab_size(tcfg), seed=d.seed + 10_000)
    from .train.data import local_text_heldout, local_text_rows

    if length != d.seq_len:
        text = local_text_heldout(d.seq_len, d.num_rows, d.seed)
        if n * length > len(text):
            raise ValueError(f"the local text's {len(text)} held-out tokens hold fewer than {n} windows of {length}")
        return np.ascontiguousarray(text[: n * length].reshape(n, length), dtype=np.int64)
    avail = local_text_rows(d.seq_len, None, d.seed)  # every row, in the training order; training takes the first
    used = d.num_rows if d.num_rows is not None else len(avail)
    return np.ascontiguousarray(avail[used: used + n])


def make_evaluator(cfg: SweepConfig, tcfg: TrainConfig) -> Evaluator | None:
    if cfg.objective == "loss":
        return None
    length = cfg.passkey_length or (cfg.curriculum.stages[cfg.stage].total_tokens if cfg.stage is not None
                                    else tcfg.data.seq_len)
    rows = heldout_rows(cfg, tcfg) if cfg.objective == "heldout_loss" else None
    return Evaluator(cfg.objective, rows=rows, tokenizer=tcfg.data.tokenizer, passkey_length=length,
                     passkey_n=cfg.passkey_n)


# ----------------------------------------------------------------------------------------------------------------
# The trial: a function trainable that runs the training layer


STOPPING_FILE = "tune_stopping"  # in a trial's run folder while Tune stops the trial: no one reads its reports now


def _tune_report_callback(stopping_path: str):
    """Ray Tune's `TuneReportCallback` (it runs in the trial's Ray Train controller and hands rank 0's metrics to the
    trial through a queue of one), except that it gives up on a report while the trial is being stopped: the trial
    no longer takes reports then, and a blocked hand-over would keep the controller from seeing its workers end."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
    from ray.util.queue import Full

    class TuneReport(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self._stopping_path = stopping_path

        def after_report(self, run_context, metrics, checkpoint):
            item = dict(metrics[0])
            if checkpoint:
                item[CHECKPOINT_PATH_KEY] = checkpoint.path
            while not os.path.exists(self._stopping_path):
                try:
                    self._training_actor_item_queue.put(item, timeout=1.0)
                    return
                except Full:
                    continue
                except Exception:  # the queue went with the trial's actor
                    return

    return TuneReport()


class _TrialState:
    """The trial running in this process (a Tune trial actor runs one trial: actors are not reused)."""

    stop_requested = None  # threading.Event, set by the trial's cleanup when Tune stops it
    finished = None  # threading.Event, set when `_trial` returns
    run_dir: str | None = None


def data_key(tcfg: TrainConfig) -> str:
    """What makes two trials' training rows the same: their data config but for how batches are cut
    (`random_lengths`), with the model's vocabulary for synthetic rows (drawn below it). The segment length is not
    part of it: it does not change tokenization or packing."""
    d = {k: v for k, v in dataclasses.asdict(tcfg.data).items() if k != "random_lengths"}
    if tcfg.data.source == "synthetic":
        from .train.trainer import _vocab_size

        d["vocab_size"] = _vocab_size(tcfg)
    return json.dumps(d, sort_keys=True, default=str)


def shared_datasets(cfg: SweepConfig, log: Callable[[str], None] = print) -> dict:
    """{data_key: ({"train": Dataset}, data stats)}: each distinct training data of the sweep's trials, built once
    here on the sweep's driver and held in Ray's object store, so that every trial trains on the same blocks instead
    of reading and tokenizing the text again (`data.cache_rows`; "local" and "synthetic" rows always). The stats are
    the data layer's counts (complete: the rows were computed once), logged into every trial's run. Sources that
    stream (a hub corpus, `data.cache_rows=false`) and passkey stages are left out: each trial builds its own."""
    from .config import resolve
    from .train.data import rows_cached, train_datasets
    from .train.trainer import _vocab_size

    if cfg.stage is not None:
        return {}
    out: dict = {}
    for point in search_points(cfg):
        tcfg = resolve(trial_train_config(cfg, point["segment_length"], point["lr"], params=point["params"]))
        key = data_key(tcfg)
        if key in out or not rows_cached(tcfg.data):
            continue
        datasets, stats = train_datasets(tcfg.data, _vocab_size(tcfg))
        if stats is not None and hasattr(stats, "counts"):  # a DataReport: complete, since the rows are materialized
            stats = stats.counts()
        if tcfg.data.source not in ("local", "synthetic"):
            log(f"  data: {tcfg.data.source} tokenized once for every trial: {datasets['train'].count()} rows of "
                f"{tcfg.data.seq_len} tokens in Ray's object store")
        out[key] = (datasets, stats)
    return out


def _trial(config: dict, sweep: dict, parent_run_id: str | None, evaluator: "Evaluator | None",
           shared: dict | None = None) -> None:
    """One Tune trial: `fit` at its point (config["point"]: segment length, lr, grid values), its metrics passed to
    Tune through TuneReportCallback, `evaluator` (built once by the sweep: the held-out rows are the same for every
    trial) scoring it, its training rows from `shared` (`shared_datasets`, built once by the sweep) when they are
    there; records its outcome in `<run_dir>/trial_done.json`."""
    import threading

    import ray.tune

    from .config import resolve
    from .train import NonFiniteLossError, fit
    from .train.loop import STOP_FILE
    from .train.runtime import quiet_driver_logs
    from .train.tracking import ensure_run

    quiet_driver_logs()  # this trial's process is the driver of its Ray Train run
    _TrialState.finished = _TrialState.finished or threading.Event()
    _TrialState.stop_requested = _TrialState.stop_requested or threading.Event()
    rec: dict = {"status": "error"}
    tcfg = None
    try:
        cfg = _from_dict(sweep)
        trial_id = ray.tune.get_context().get_trial_id()
        point = config["point"]
        seg, lr, params = int(point["segment_length"]), float(point["lr"]), dict(point.get("params") or {})
        tcfg = resolve(trial_train_config(cfg, seg, lr, trial_run_name(cfg.name, trial_id, point), parent_run_id, params))
        os.makedirs(tcfg.run.run_dir, exist_ok=True)
        _TrialState.run_dir = tcfg.run.run_dir
        prev = _read_json(os.path.join(tcfg.run.run_dir, TRIAL_DONE_FILE))
        if (prev and prev.get("status") == "completed" and prev.get("objective") is not None
                and os.path.isdir(prev.get("checkpoint_path") or "")):
            # its run finished before the sweep was interrupted: report that, train nothing again
            rec = {**prev, "status": "kept"}
            ray.tune.report({"step": prev["step"], cfg.objective: prev["objective"], **(prev.get("metrics") or {})})
            return
        for stale in (STOP_FILE, STOPPING_FILE, TRIAL_DONE_FILE):  # left by an earlier attempt of this trial
            if os.path.exists(os.path.join(tcfg.run.run_dir, stale)):
                os.remove(os.path.join(tcfg.run.run_dir, stale))
        if _TrialState.stop_requested.is_set():
            rec = {"status": "unfinished", "step": None}
            return
        run_id = None
        if tcfg.tracking.enabled:  # the training layer's run, created here first to carry the trial's tags
            run_id = ensure_run(tcfg)
            client = _client(cfg)
            for k, v in (("sweep", cfg.name), ("sweep.trial_id", trial_id), ("sweep.segment_length", seg),
                         ("sweep.lr", f"{lr:.4g}"), ("sweep.status", "running"),
                         *((f"sweep.{key}", value) for key, value in params.items())):
                client.set_tag(run_id, k, str(v))
        datasets, data_stats = (shared or {}).get(data_key(tcfg), (None, None))
        if cfg.stage is not None:
            from .curriculum import stage_dataset
            from .tokenizer import load_tokenizer

            datasets = {"train": stage_dataset(_stage_curriculum(cfg), cfg.stage, load_tokenizer(tcfg.data.tokenizer))}
        rec = {"trial_id": trial_id, "run_name": tcfg.run.name, "run_id": run_id, "status": "error"}
        try:
            res = fit(tcfg, datasets, data_stats=data_stats,
                      callbacks=[_tune_report_callback(os.path.join(tcfg.run.run_dir, STOPPING_FILE))], evaluate=evaluator)
        except NonFiniteLossError as e:  # too high a learning rate is an outcome of the search, not a failed trial
            worst = math.inf if cfg.metric_mode == "min" else 0.0
            rec.update(status="diverged", step=e.step, objective=worst, checkpoint_path=e.last_checkpoint)
            _write_json(os.path.join(tcfg.run.run_dir, TRIAL_DONE_FILE), rec)  # before Tune sees the report
            ray.tune.report({"step": e.step, cfg.objective: worst, "diverged": 1.0})
        else:
            if res.stopped:  # Tune stopped the trial (ASHA, or the sweep was interrupted): its cleanup asked
                rec.update(status="stopped", step=res.step, checkpoint_path=res.checkpoint_path)
            else:
                m = res.metrics or {}
                rec.update(status="completed", step=res.step, objective=m.get(cfg.objective),
                           metrics={k: m[k] for k in SIDE_METRICS.get(cfg.objective, ()) if m.get(k) is not None},
                           checkpoint_path=res.checkpoint_path, hf_path=res.hf_path)
    finally:
        if tcfg is not None and rec.get("status") not in ("unfinished", "diverged", "kept"):
            _write_json(os.path.join(tcfg.run.run_dir, TRIAL_DONE_FILE), rec)
        _await_reports_taken()
        _TrialState.finished.set()


def _await_reports_taken(timeout_s: float = 10.0, quiet_s: float = 0.5) -> None:
    """Before a trial's function returns: wait (at most timeout_s) until the trial actor's main thread has taken and
    passed on the last report that the Train controller handed over. Ray 2.60's `_TrainSession.get_next` reads that
    hand-over queue (one item) before its own result queue (one item) and moves what it read with a blocking put. If
    the function returned in between, Tune's closing report (RESULT_DUPLICATE) fills the result queue first, nothing
    empties it again, and the trial actor and the sweep hang (seen once in CI: the resumed sweep's trial stopped by
    ASHA). Both queues empty for quiet_s means the main thread is past that point."""
    import time

    from ray.train._internal.session import get_session

    session = get_session()
    queues = [getattr(session, "_inter_actor_queue", None), getattr(session, "result_queue", None)]
    if queues[0] is None:  # no report was ever handed over
        return
    deadline, quiet_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            empty = all(q is None or q.empty() for q in queues)
        except Exception:  # the hand-over queue's actor is gone with its trial
            return
        now = time.monotonic()
        quiet_since = (quiet_since or now) if empty else None
        if quiet_since is not None and now - quiet_since >= quiet_s:
            return
        time.sleep(0.02)


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, default=str)
    os.replace(path + ".tmp", path)


def _stop_trial_run(timeout_s: float = 300.0) -> None:
    """Tune is stopping this process's trial (ASHA, the end of an interrupted sweep): ask its Ray Train run to end
    (a stop file its workers see at the next step) and wait until `fit` returns, so that the workers end and free
    their placement group before Tune ends the trial's actor, which would kill them mid-step."""
    import threading

    from .train.loop import STOP_FILE

    _TrialState.stop_requested = _TrialState.stop_requested or threading.Event()
    _TrialState.stop_requested.set()
    done = _TrialState.finished
    if done is None or done.is_set() or _TrialState.run_dir is None:
        return  # never started here, or already over
    for name in (STOPPING_FILE, STOP_FILE):  # reports are dropped from now on; the workers end at the next step
        with open(os.path.join(_TrialState.run_dir, name), "w") as f:
            f.write("stopped by Ray Tune\n")
    done.wait(timeout_s)


def _from_dict(d: dict) -> SweepConfig:
    cfg = merge(SweepConfig(), d)
    stages = [s if isinstance(s, StageConfig) else merge(StageConfig(), s) for s in cfg.curriculum.stages]
    return dataclasses.replace(cfg, curriculum=dataclasses.replace(cfg.curriculum, stages=stages))


def _point(trial) -> dict:
    """A Tune trial's search point (its config's "point")."""
    p = (trial.config or {}).get("point") or {}
    return {"segment_length": int(p.get("segment_length", 0)), "lr": float(p.get("lr", 0.0)),
            "params": dict(p.get("params") or {})}


def point_label(point: dict, lr_digits: int = 2) -> str:
    """"l=512, lr=3.00e-04, memory_grad_segments=2": a point in a line of text."""
    extra = "".join(f", {k.rsplit('.', 1)[-1]}={v}" for k, v in (point.get("params") or {}).items())
    return f"l={point['segment_length']}, lr={point['lr']:.{lr_digits}e}{extra}"


def _client(cfg: SweepConfig):
    from mlflow import MlflowClient

    from .train.tracking import tracking_uri

    return MlflowClient(tracking_uri(cfg.train))


# ----------------------------------------------------------------------------------------------------------------
# Running it


@dataclass
class TrialRecord:
    """One trial as the sweep leaves it. status: "completed" (trained to the end), "stopped" (by ASHA), "diverged"
    (non-finite loss), "error", or "unfinished" (an interrupted sweep)."""

    trial_id: str
    segment_length: int
    lr: float
    status: str
    step: int | None
    objective: float | None
    run_name: str | None = None
    run_dir: str | None = None
    mlflow_run_id: str | None = None
    checkpoint_path: str | None = None
    hf_path: str | None = None
    curve: list = field(default_factory=list)  # [(step, objective)] as reported to Tune
    error: str | None = None
    params: dict = field(default_factory=dict)  # its values of the search.grid keys
    gpu_util: float | None = None  # mean GPU utilisation (%) of its MLflow system metrics, on GPUs
    metrics: dict = field(default_factory=dict)  # the last values of the objective's SIDE_METRICS

    @property
    def point(self) -> dict:
        return {"segment_length": self.segment_length, "lr": self.lr, "params": self.params}


@dataclass
class SweepResult:
    trials: list[TrialRecord]
    best: TrialRecord | None
    objective: str
    mode: str
    experiment_path: str
    folder: str
    parent_run_id: str | None
    tracking_uri: str | None
    resumed: bool
    interrupted: bool
    wall_s: float
    reported: int = 0  # results the trials reported during this call (0: a finished sweep started again)
    gpu_util: dict | None = None  # GPU utilisation from the trials' MLflow system metrics (`gpu_utilization`)

    def format_table(self) -> str:
        return format_trials_table(self.trials, self.objective, self.best)


class _Listeners:
    """What the sweep's Tune callback calls in this process, and its state during one `run_sweep`. Tune pickles its
    callbacks with the experiment and restores them with it, so the callback itself holds no function of a
    particular call of `run_sweep`; the current call registers its own here."""

    log: Callable[[str], None] = print
    on_trial_complete: list = []
    tune_sigint_handler: Any = None  # Tune's SIGINT handler while the sweep runs (it restores the old one on SIGINT)
    interrupted: bool = False
    results: int = 0  # results reported by trials in this call

    @classmethod
    def reset(cls, log: Callable[[str], None] = print, hooks: list | None = None) -> None:
        cls.log, cls.on_trial_complete = log, list(hooks or [])
        cls.tune_sigint_handler, cls.interrupted, cls.results = None, False, 0


def _sweep_callback_cls():
    from ray.tune import Callback

    class SweepProgress(Callback):
        """One line per result a trial reports, one when a trial ends; then the hooks of the current `run_sweep`."""

        def __init__(self, objective: str, total_steps: int, name: str, folder: str):
            self.objective, self.total_steps, self.name, self.folder = objective, total_steps, name, folder

        def _run_dir(self, trial) -> str:
            return os.path.join(self.folder, TRIALS_DIR, trial_run_name(self.name, trial.trial_id, _point(trial)))

        def on_step_begin(self, iteration, trials, **info):
            if _Listeners.tune_sigint_handler is None:
                _Listeners.tune_sigint_handler = signal.getsignal(signal.SIGINT)

        @staticmethod
        def _interrupt_seen() -> bool:
            """Whether Tune's SIGINT / SIGUSR1 handler has fired: the event it sets lives in its closure (Ray 2.60,
            `ray.tune.tune._setup_signal_catching`); without one, the handler it put back on SIGINT tells."""
            import threading

            h = _Listeners.tune_sigint_handler
            if h is None or not callable(h):
                return False
            for cell in getattr(h, "__closure__", None) or ():
                try:
                    if isinstance(cell.cell_contents, threading.Event):
                        return cell.cell_contents.is_set()
                except ValueError:  # an empty cell
                    continue
            return signal.getsignal(signal.SIGINT) is not h

        def on_step_end(self, iteration, trials, **info):
            """Ctrl-C (SIGINT) or SIGUSR1: Tune's handler ends the loop after this step, then gives each trial's actor
            seconds to stop before it kills it. End the running trials' training runs here first, so none is killed
            mid-step; Tune has saved them as unfinished, and the next start resumes them (each from its run's newest
            checkpoint)."""
            if _Listeners.interrupted or not self._interrupt_seen():
                return
            _Listeners.interrupted = True
            running = [self._run_dir(t) for t in trials if t.status == "RUNNING"]
            running = [d for d in running if os.path.isdir(d) and not os.path.exists(os.path.join(d, TRIAL_DONE_FILE))]
            _Listeners.log(f"interrupted: ending the training runs of {len(running)} running trial(s); the same "
                           f"sweep started again resumes them")
            stop_runs(running, wait_s=120.0)

        def _label(self, trial) -> str:
            return f"trial {trial.trial_id.rsplit('_', 1)[-1]} ({point_label(_point(trial))})"

        def on_trial_result(self, iteration, trials, trial, result, **info):
            _Listeners.results += 1
            value = result.get(self.objective)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            _Listeners.log(f"{self._label(trial)} step {result.get('step', '?')}/{self.total_steps}: "
                           f"{self.objective} {shown}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            step = last.get("step")
            run_dir = self._run_dir(trial)
            running = os.path.isdir(run_dir) and not os.path.exists(os.path.join(run_dir, TRIAL_DONE_FILE))
            last_step = step is not None and step >= self.total_steps
            if last.get("diverged"):
                _Listeners.log(f"{self._label(trial)} diverged (non-finite loss)")
            elif running and not last_step:
                # stopped by ASHA while its run trains: end the run now and wait for it, before Tune ends the trial's
                # actor (at the end of the sweep Tune kills an actor that takes more than 10 s to stop)
                _Listeners.log(f"{self._label(trial)} stopped early by ASHA at step {step}; ending its run")
                stop_runs([run_dir], wait_s=120.0)
            else:
                _Listeners.log(f"{self._label(trial)} finished" if last_step or not running else
                               f"{self._label(trial)} stopped early by ASHA at step {step}")
                if running:  # its last report is in: the run is saving and closing; let it
                    stop_runs([run_dir], wait_s=120.0, ask=False)
            self._hooks(trial)

        def _hooks(self, trial):
            for hook in list(_Listeners.on_trial_complete):
                hook(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            _Listeners.log(f"{self._label(trial)} failed: {str(trial.error_msg or '')[:300]}")

    return SweepProgress


def stop_runs(run_dirs: list[str], wait_s: float = 120.0, ask: bool = True) -> bool:
    """Ask trials' training runs to end (their workers look for the stop file at every step; their reports to Tune
    are dropped from now on) and wait until each trial has recorded its end; True if all did within `wait_s`.
    `ask=False` only waits (a run that is finishing by itself)."""
    import time

    from .train.loop import STOP_FILE

    for run_dir in run_dirs if ask else []:
        for name in (STOPPING_FILE, STOP_FILE):
            with open(os.path.join(run_dir, name), "w") as f:
                f.write("stopped by Ray Tune\n")
    deadline = time.monotonic() + wait_s
    pending = [os.path.join(d, TRIAL_DONE_FILE) for d in run_dirs]
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if not os.path.exists(p)]
        if pending:
            time.sleep(0.2)
    return not pending


def ensure_parent_run(cfg: SweepConfig) -> str:
    """The sweep's MLflow parent run, created once and found again from its id file in the sweep's folder."""
    from .train.tracking import artifact_location, ensure_experiment, reopen_parent_run

    os.makedirs(cfg.folder, exist_ok=True)
    id_file = os.path.join(cfg.folder, PARENT_ID_FILE)
    client = _client(cfg)
    if (run_id := reopen_parent_run(client, id_file)) is not None:
        return run_id
    exp_id = ensure_experiment(client, cfg.train.tracking.experiment, artifact_location(cfg.train))
    run = client.create_run(exp_id, run_name=cfg.name, tags={"sweep": cfg.name, "sweep.role": "parent"})
    client.log_text(run.info.run_id, to_yaml(cfg), "sweep_config.yaml")
    s = cfg.search
    params = {"objective": cfg.objective, "mode": cfg.metric_mode, "segment_lengths": s.segment_lengths,
              "lr_range": s.lrs if s.lrs else [s.lr_min, s.lr_max], "num_samples": s.num_samples,
              "trials": cfg.num_trials(), "total_steps": cfg.total_steps(), "eval_every": cfg.eval_every,
              "asha": f"grace {cfg.asha.grace_period}, factor {cfg.asha.reduction_factor:g}" if cfg.asha.enabled else "off",
              "model": cfg.init_from or cfg.train.model.init_from or cfg.train.model.size,
              "stage": cfg.stage if cfg.stage is not None else "none",
              "gpus_per_trial": cfg.gpus_per_trial if cfg.gpus_per_trial is not None else "per worker",
              **{f"grid.{k}": v for k, v in grid_axes(s).items()}}
    for k, v in params.items():
        client.log_param(run.info.run_id, k, str(v)[:500])
    with open(id_file + ".tmp", "w") as f:
        f.write(run.info.run_id)
    os.replace(id_file + ".tmp", id_file)
    return run.info.run_id


def plan_trial_resources(cfg: SweepConfig, cluster: dict) -> tuple[SweepConfig, int, dict]:
    """(config with each trial's worker CPU share fixed, trials at once, what one trial reserves) on a cluster of
    `cluster` resources (`ray.cluster_resources()`). On GPUs a trial reserves `gpus_per_trial` (a fraction packs
    several onto one GPU) and its workers an even share of the CPUs left beside the trials' data tasks."""
    from .train.resources import MIN_DATA_ROOM, derive_cpus_per_worker

    s = cfg.train.schedule
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    k = cfg.max_concurrent_trials
    if s.use_gpu:
        per_trial = cfg.gpus_per_trial if cfg.gpus_per_trial is not None else s.num_workers * s.gpus_per_worker
        k = k or max(1, int(gpus / per_trial + 1e-9))
        per = s.cpus_per_worker
        if per is None:
            per = float(max(1, math.floor((cpus - MIN_DATA_ROOM * k) / max(k * s.num_workers, 1))))
        need = {"CPU": s.num_workers * per, "GPU": per_trial}
    else:
        if s.cpus_per_worker is not None:
            per = s.cpus_per_worker
            k = k or max(1, int(cpus // (s.num_workers * per + MIN_DATA_ROOM)))
        else:
            k = k or 1
            per = derive_cpus_per_worker(cpus / k, s.num_workers, 0.0)
            if per <= 0:
                raise ConfigError("max_concurrent_trials", f"{k} trials of {s.num_workers} workers do not fit on "
                                                           f"{cpus:g} CPUs beside their data tasks; run fewer at once")
        need = {"CPU": s.num_workers * per}
    train = dataclasses.replace(cfg.train, schedule=dataclasses.replace(s, cpus_per_worker=per))
    return dataclasses.replace(cfg, train=train, max_concurrent_trials=k), k, need


def _trial_results(trial) -> list[dict]:
    """The results a trial reported, from its `result.json` in Tune's experiment folder (`trial.path`, on the storage;
    `local_path` is a staging folder of the Ray session, which a restored sweep does not have)."""
    try:
        path = os.path.join(trial.path or "", "result.json")
    except Exception:
        return []
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def _asha_scheduler(cfg: SweepConfig):
    """ASHA on the objective by optimizer step, which after `Tuner.restore` first records every restored trial's
    results at its rungs again: Ray Tune saves no scheduler state, so without this a resumed sweep would compare its
    remaining trials only among themselves, and a resumed trial's first report (say step 6, from its checkpoint)
    would be recorded at the rungs below it as if it were its step-2 value, stopping a fair trial there. A new trial
    has no results, so nothing is replayed for it. `max_t` is one past the last step, so that ASHA's own "reached
    max_t" stop never comes before the run's last report; a rung may still fall on the last step, where a stop only
    ends a trial that is saving and closing anyway (its cleanup waits for the run)."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def on_trial_add(self, tune_controller, trial):
            super().on_trial_add(tune_controller, trial)
            bracket = self._trial_info.get(trial.trial_id)
            for r in _trial_results(trial):
                t, v = r.get(self._time_attr), r.get(self._metric)
                if bracket is not None and isinstance(t, (int, float)) and isinstance(v, (int, float)):
                    bracket.on_result(trial, t, self._metric_op * v)

    return ResumableASHA(time_attr="step", max_t=(cfg.asha.max_t or cfg.total_steps()) + 1,
                         grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)


def _point_searcher_cls():
    from ray.tune.search.basic_variant import BasicVariantGenerator

    class PointSearcher(BasicVariantGenerator):
        """Tune's grid over the sweep's points, whose `max_concurrent` stays the current start's: `Tuner.restore`
        restores a searcher's whole saved state, so a resumed sweep would otherwise keep its first start's number of
        trials at once, whatever `max_concurrent_trials` (or the machine) says now."""

        def set_state(self, state):
            keep = self.max_concurrent
            super().set_state(state)
            self.max_concurrent = keep

    return PointSearcher


def _trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id (the default spells out the whole point, grid values included)."""
    return f"trial_{trial.trial_id}"


def _search_yaml(text: str) -> dict:
    """A saved sweep config without what may change between the starts of one sweep (how many trials run at once)."""
    import yaml

    d = yaml.safe_load(text) or {}
    d.pop("max_concurrent_trials", None)
    return d


def _param_space(cfg: SweepConfig) -> dict:
    """One Tune grid over the sweep's own points (`search_points`): Tune runs them in order, one trial each."""
    from ray import tune

    return {"point": tune.grid_search(search_points(cfg))}


def _trainable(cfg: SweepConfig, parent: str | None, evaluator: Evaluator | None, shared: dict | None = None):
    """The Tune trainable: the function trainable of `_trial`, whose cleanup (Tune stopping the trial) first stops the
    trial's Ray Train run; it reserves only the trial's driver. `shared`: `shared_datasets` (in the object store once,
    through `tune.with_parameters`; their blocks stay owned by this driver)."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(tune.with_parameters(_trial, sweep=dataclasses.asdict(cfg), parent_run_id=parent,
                                              evaluator=evaluator, shared=shared or {}), name="condensation_trial")

    class CondensationTrial(base):
        def cleanup(self):
            try:
                _stop_trial_run()
            finally:
                super().cleanup()

    return tune.with_resources(CondensationTrial, {"cpu": TRIAL_DRIVER_CPUS})


def run_sweep(cfg: SweepConfig, *, log: Callable[[str], None] = print,
              on_trial_complete: Callable | None = None) -> SweepResult:
    """Run (or resume) the sweep; Ray must be initialised by the caller. `on_trial_complete(trial)`: called in this
    process when a trial ends (finished or stopped), e.g. to interrupt a test. Raises ConfigError for a config that
    cannot run, or when a sweep of the same name and storage was started with a different config."""
    import time

    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from .train.tracking import tracking_uri

    t0 = time.time()
    cfg = resolve_sweep(cfg)
    try:
        from ray.train.v2._internal.constants import is_v2_enabled

        if not is_v2_enabled():
            raise RuntimeError("the sweep needs Ray Train V2 (Ray's default); unset RAY_TRAIN_V2_ENABLED=0")
    except ImportError:
        pass
    os.makedirs(cfg.folder, exist_ok=True)
    saved = os.path.join(cfg.folder, CONFIG_FILE)
    experiment = os.path.join(cfg.folder, TUNE_DIR)
    resumed = tune.Tuner.can_restore(experiment)
    if resumed and os.path.exists(saved) and _search_yaml(open(saved).read()) != _search_yaml(to_yaml(cfg)):
        raise ConfigError("name", f"a sweep named {cfg.name!r} with a different config is in {cfg.folder}; give this "
                                  f"one a new name (name=...) or delete that folder")
    with open(saved, "w") as f:
        f.write(to_yaml(cfg))

    cfg, k, need = plan_trial_resources(cfg, ray.cluster_resources())
    s, search = cfg.train.schedule, cfg.search
    axes = grid_axes(search)
    lr_text = (f"lr {search.lrs}" if search.lrs else
               f"lr log-uniform in [{search.lr_min:g}, {search.lr_max:g}]"
               + (f", {search.trials} trials" if search.trials is not None else f" x {search.num_samples}"))
    gpu = f" + {need['GPU']:g} GPU" if s.use_gpu else ""
    log(f"sweep {cfg.name!r}: {cfg.num_trials()} trials (segment lengths {search.segment_lengths}, {lr_text}"
        + "".join(f", x {key} {values}" for key, values in axes.items())
        + f"), {cfg.total_steps()} steps each, {cfg.objective} ({cfg.metric_mode}) every {cfg.eval_every} steps; "
        f"{k} at a time, each {s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU{gpu}"
        + (f"; ASHA from step {cfg.asha.grace_period}, factor {cfg.asha.reduction_factor:g}" if cfg.asha.enabled else "")
        + (f"; resuming {experiment}" if resumed else ""))
    if not resumed:
        for i, point in enumerate(search_points(cfg)):
            log(f"  trial {i:05d}: {point_label(point)}")

    tracking = cfg.train.tracking.enabled
    parent = ensure_parent_run(cfg) if tracking else None
    first = search_points(cfg)[0]
    evaluator = make_evaluator(cfg, trial_train_config(cfg, first["segment_length"], first["lr"],
                                                       params=first["params"]))
    trainable = _trainable(cfg, parent, evaluator, shared_datasets(cfg, log))
    _Listeners.reset(log, [on_trial_complete] if on_trial_complete else [])
    try:
        if resumed:
            tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
            # this start's trials at once (the restored searcher keeps it through its saved state: PointSearcher)
            searcher = getattr(getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None), "search_alg", None)
            if searcher is not None and hasattr(searcher, "max_concurrent"):
                searcher.max_concurrent = k
        else:
            total = cfg.total_steps()
            scheduler = _asha_scheduler(cfg) if cfg.asha.enabled else FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(cfg),
                tune_config=tune.TuneConfig(
                    metric=cfg.objective, mode=cfg.metric_mode, scheduler=scheduler,
                    search_alg=_point_searcher_cls()(max_concurrent=k), num_samples=1,
                    trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=TUNE_DIR, storage_path=cfg.folder,
                    failure_config=tune.FailureConfig(max_failures=0),  # the training layer retries itself
                    callbacks=[_sweep_callback_cls()(cfg.objective, total, cfg.name, cfg.folder)],
                    verbose=0),
            )
        tuner.fit()
    finally:
        interrupted_here, reported = _Listeners.interrupted, _Listeners.results
        _Listeners.reset()

    trials = collect_trials(cfg, experiment)
    interrupted = interrupted_here or any(t.status == "unfinished" for t in trials)
    best = best_trial(trials, cfg.metric_mode)
    uri = tracking_uri(cfg.train) if tracking else None
    result = SweepResult(trials=trials, best=best, objective=cfg.objective, mode=cfg.metric_mode,
                         experiment_path=experiment, folder=cfg.folder, parent_run_id=parent, tracking_uri=uri,
                         resumed=resumed, interrupted=interrupted, wall_s=time.time() - t0, reported=reported)
    if tracking and cfg.train.schedule.use_gpu:
        result.gpu_util = gpu_utilization(_client(cfg), trials)
    write_summary(cfg, result)
    if tracking:
        close_trial_runs(cfg, trials, interrupted)
        log_summary(cfg, result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# After the trials: what each one did, the best one, the summary


def collect_trials(cfg: SweepConfig, experiment: str) -> list[TrialRecord]:
    """One record per trial of Tune's experiment as saved in `experiment` (the state Tune writes before it ends the
    trials of an interrupted sweep, so their status there is still RUNNING or PENDING), with each trial's own record
    from its run folder."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment)
    frames = getattr(analysis, "trial_dataframes", {}) or {}
    total = cfg.total_steps()
    out = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        point = _point(trial)
        seg, lr = point["segment_length"], point["lr"]
        curve = []
        df = frames.get(trial.trial_id)
        if df is not None and cfg.objective in df and "step" in df:
            curve = [(int(a), float(b)) for a, b in zip(df["step"], df[cfg.objective]) if b == b and a == a]
        run_name = trial_run_name(cfg.name, trial.trial_id, point)
        run_dir = os.path.join(cfg.folder, TRIALS_DIR, run_name)
        done = _read_json(os.path.join(run_dir, TRIAL_DONE_FILE))
        run_id_file = os.path.join(run_dir, "mlflow_run_id")
        run_id = open(run_id_file).read().strip() if os.path.exists(run_id_file) else None
        step, value = last.get("step"), last.get(cfg.objective)
        if trial.status == "ERROR":
            status = "error"
        elif trial.status != "TERMINATED":  # RUNNING / PENDING / PAUSED: the sweep was interrupted
            status = "unfinished"
        elif done is not None and done.get("status") in ("completed", "stopped", "diverged"):
            status = done["status"]
            if done.get("objective") is not None:
                value = done["objective"]
            if status != "stopped" and done.get("step") is not None:
                step = done["step"]
        else:
            status = "completed" if step is not None and step >= total else "stopped"
        err = getattr(trial, "error_msg", None)
        side = {k: float(last[k]) for k in SIDE_METRICS.get(cfg.objective, ()) if last.get(k) is not None}
        if done is not None and done.get("status") == "completed":
            side.update(done.get("metrics") or {})
        out.append(TrialRecord(
            trial_id=trial.trial_id, segment_length=seg, lr=lr, status=status, step=step,
            objective=None if value is None else float(value), run_name=run_name, run_dir=run_dir,
            mlflow_run_id=run_id, checkpoint_path=(done or {}).get("checkpoint_path"),
            hf_path=(done or {}).get("hf_path"), curve=curve, params=point["params"],
            error=str(err)[:500] if status == "error" and err else None, metrics=side))
    out.sort(key=lambda t: t.trial_id)
    return out


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def best_trial(trials: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The best objective among the trials that trained to the end (those ASHA let through), else among all."""
    scored = [t for t in trials if t.objective is not None and math.isfinite(t.objective)]
    pool = [t for t in scored if t.status == "completed"] or scored
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda t: t.objective)


def format_trials_table(trials: list[TrialRecord], objective: str, best: TrialRecord | None = None) -> str:
    """The trials as a Markdown table: point (and grid values), outcome, objective, the metrics reported beside it
    (e.g. heldout_loss_tail), GPU utilisation if measured."""
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    side = list(dict.fromkeys(k for t in trials for k in t.metrics))
    gpu = any(t.gpu_util is not None for t in trials)
    head = ["trial", "segment length", "lr", *(k.rsplit(".", 1)[-1] for k in keys), "status", "steps", objective,
            *side, *(["GPU util %"] if gpu else [])]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        value = "-" if t.objective is None else f"{t.objective:.4f}"
        mark = " **best**" if best is not None and t.trial_id == best.trial_id else ""
        cells = [t.trial_id.rsplit("_", 1)[-1], str(t.segment_length), f"{t.lr:.2e}",
                 *(str(t.params.get(k, "-")) for k in keys), t.status, str(t.step if t.step is not None else "-"),
                 value + mark, *(f"{t.metrics[k]:.4f}" if t.metrics.get(k) is not None else "-" for k in side),
                 *([f"{t.gpu_util:.0f}" if t.gpu_util is not None else "-"] if gpu else [])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_sweep(trials: list[TrialRecord], path: str, objective: str, mode: str, title: str = "") -> str:
    """Left: the final objective of every trial over learning rate (log axis) x segment length, coloured by value,
    marker by status, the best ringed. Right: each trial's objective by step (ASHA's rungs show as curves that end)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    from .evaluate.plots import _figure, _save

    # one row per segment length, or per (segment length, grid values) when the sweep has grid axes
    def row(t: TrialRecord) -> str:
        extra = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in t.params.items())
        return f"{t.segment_length}" + (f"\n{extra}" if extra else "")

    order = list(dict.fromkeys(row(t) for t in trials))  # grid values in the order of the search
    rows = sorted(order, key=lambda r: (int(r.split("\n")[0]), order.index(r)))
    ypos = {r: i for i, r in enumerate(rows)}
    fig = _figure(12.0, max(4.6, 1.0 + 0.7 * len(rows)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    vals = [t.objective for t in trials if t.objective is not None and math.isfinite(t.objective)]
    cmap = colormaps["viridis" if mode == "max" else "viridis_r"]
    norm = Normalize(min(vals), max(vals) if max(vals) > min(vals) else min(vals) + 1e-9) if vals else Normalize(0, 1)
    markers = {"completed": "o", "stopped": "s", "diverged": "X", "error": "X", "unfinished": "d"}
    best = best_trial(trials, mode)
    for t in trials:
        v = t.objective if t.objective is not None and math.isfinite(t.objective) else None
        colour = cmap(norm(v)) if v is not None else "lightgrey"
        ax.scatter([t.lr], [ypos[row(t)]], s=180, c=[colour], marker=markers.get(t.status, "o"),
                   edgecolors="red" if best is not None and t is best else "black",
                   linewidths=2.5 if best is not None and t is best else 0.8, zorder=3)
        text = f"{v:.3f}" if v is not None else "diverged" if t.status == "diverged" else "-"
        ax.annotate(text, (t.lr, ypos[row(t)]), textcoords="offset points",
                    xytext=(0, 11), ha="center", fontsize=8)
        points = [(x, y) for x, y in t.curve if math.isfinite(y)]
        if points:
            steps, ys = zip(*points)
            ax2.plot(steps, ys, marker=".", color=colour,
                     linestyle="-" if t.status == "completed" else "--",
                     label=f"{point_label(t.point, 1)} ({t.status})")
    ax.set_xscale("log")
    # a range under one decade gets labelled minor ticks (2x10^-5, 3x10^-5, ...) that run into each other
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(rows)), rows, fontsize=8 if len(rows) > len({t.segment_length for t in trials}) else None)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    lrs = [t.lr for t in trials if t.lr > 0]
    if lrs:
        ax.set_xlim(min(lrs) / 1.6, max(lrs) * 1.6)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("segment length" + (", grid values" if any(t.params for t in trials) else ""))
    ax.set_title(f"final {objective} ({mode}; red ring: best)")
    ax.grid(True, which="both", alpha=0.3)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=objective)
    shown = sorted({t.status for t in trials})
    ax.legend(handles=[Line2D([], [], linestyle="", marker=markers.get(s, "o"), color="grey", label=s) for s in shown],
              loc="lower right", fontsize=8)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel(objective)
    ax2.set_title(f"{objective} by step (dashed: stopped early)")
    ax2.grid(True, alpha=0.3)
    if ax2.lines:
        ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return str(_save(fig, path))


def gpu_utilization(client, trials: list[TrialRecord]) -> dict | None:
    """GPU utilisation while the trials ran, from MLflow's system metrics that each trial's rank 0 logs
    (`system/gpu_<i>_utilization_percentage`, every `tracking.system_metrics_interval_s`): each trial's mean (set on
    the records), the mean over all samples, and the mean by how many trials' runs were open when a sample was
    taken ({"by_running": {"4": {"mean": 87.0, "samples": 40}}}). Trials sharing a GPU sample the same device, so
    "by_running" answers how busy the GPUs were while k trials ran at once. None without such metrics."""
    spans, samples = {}, []
    for t in trials:
        if not t.mlflow_run_id:
            continue
        try:
            run = client.get_run(t.mlflow_run_id)
        except Exception:
            continue
        keys = [k for k in run.data.metrics if k.startswith("system/gpu_") and k.endswith("_utilization_percentage")]
        values = []
        for key in keys:
            for m in client.get_metric_history(t.mlflow_run_id, key):
                values.append(m.value)
                samples.append((m.timestamp, m.value))
        if values:
            t.gpu_util = float(np.mean(values))
        spans[t.trial_id] = (run.info.start_time or 0, run.info.end_time or float("inf"))
    if not samples:
        return None
    by: dict = {}
    for ts, v in samples:
        k = sum(lo <= ts <= hi for lo, hi in spans.values())
        by.setdefault(str(k), []).append(v)
    return {"mean": float(np.mean([v for _, v in samples])), "samples": len(samples),
            "by_running": {k: {"mean": float(np.mean(v)), "samples": len(v)} for k, v in sorted(by.items())}}


def write_summary(cfg: SweepConfig, result: SweepResult) -> None:
    """`trials.md`, `results.json` and `objective.png` in the sweep's folder (also for an interrupted sweep)."""
    with open(os.path.join(cfg.folder, "trials.md"), "w") as f:
        f.write(result.format_table())
        if result.gpu_util:
            f.write(f"\nGPU utilisation (MLflow system metrics): {format_gpu_util(result.gpu_util)}\n")
    with open(os.path.join(cfg.folder, "results.json"), "w") as f:
        json.dump({"objective": cfg.objective, "mode": cfg.metric_mode, "gpu_util": result.gpu_util,
                   "best": dataclasses.asdict(result.best) if result.best else None,
                   "trials": [dataclasses.asdict(t) for t in result.trials]}, f, indent=1, default=str)
    if result.trials:
        plot_sweep(result.trials, os.path.join(cfg.folder, "objective.png"), cfg.objective, cfg.metric_mode,
                   title=f"sweep {cfg.name}: {cfg.objective} over segment length x learning rate")


def format_gpu_util(u: dict) -> str:
    by = "; ".join(f"{v['mean']:.0f}% with {k} trial(s) running ({v['samples']} samples)"
                   for k, v in u["by_running"].items() if k != "0")
    return f"mean {u['mean']:.0f}% over {u['samples']} samples" + (f"; {by}" if by else "")


def close_trial_runs(cfg: SweepConfig, trials: list[TrialRecord], interrupted: bool) -> None:
    """Each trial's MLflow run gets its outcome: `sweep.status`, the final `sweep/objective`, and a terminal status.
    A trial ASHA stopped is FINISHED (the training layer ends a run stopped from outside as KILLED, but here
    stopping is an outcome of the search); an unfinished trial of an interrupted sweep is KILLED (RUNNING again on
    resume); a diverged one stays FAILED, as the training layer left it."""
    client = _client(cfg)
    for t in trials:
        if not t.mlflow_run_id:
            continue
        try:
            run = client.get_run(t.mlflow_run_id)
        except Exception:
            continue
        client.set_tag(t.mlflow_run_id, "sweep.status", t.status)
        if t.objective is not None and math.isfinite(t.objective):
            client.log_metric(t.mlflow_run_id, "sweep/objective", t.objective, step=t.step or 0)
        if t.step is not None:
            client.log_metric(t.mlflow_run_id, "sweep/steps", t.step)
        want = {"completed": "FINISHED", "stopped": "FINISHED", "unfinished": "KILLED", "error": "FAILED"}.get(t.status)
        if want and run.info.status != want and (run.info.status == "RUNNING" or t.status == "stopped"):
            client.set_terminated(t.mlflow_run_id, want)


def log_summary(cfg: SweepConfig, result: SweepResult) -> None:
    """On the parent run: the table, the picture, the results, the best trial's config and checkpoint."""
    client = _client(cfg)
    parent = result.parent_run_id
    client.log_artifact(parent, os.path.join(cfg.folder, "trials.md"))
    client.log_artifact(parent, os.path.join(cfg.folder, "results.json"))
    if os.path.exists(os.path.join(cfg.folder, "objective.png")):
        client.log_artifact(parent, os.path.join(cfg.folder, "objective.png"))
    counts = {s: sum(t.status == s for t in result.trials) for s in ("completed", "stopped", "diverged", "error", "unfinished")}
    for s, n in counts.items():
        client.log_metric(parent, f"trials_{s}", n)
    if result.gpu_util:
        client.log_metric(parent, "gpu_util/mean", result.gpu_util["mean"])
        for k, v in result.gpu_util["by_running"].items():
            client.log_metric(parent, f"gpu_util/with_{k}_trials", v["mean"])
    b = result.best
    if b is not None:
        best_cfg = trial_train_config(cfg, b.segment_length, b.lr, b.run_name or "best", parent, b.params)
        client.log_text(parent, to_yaml(best_cfg), "best_config.yaml")
        client.log_text(parent, json.dumps(dataclasses.asdict(b), indent=1, default=str), "best_trial.json")
        client.log_metric(parent, "best_objective", b.objective)
        for k, v in {"best.trial_id": b.trial_id, "best.segment_length": b.segment_length, "best.lr": f"{b.lr:.4g}",
                     **{f"best.{key}": value for key, value in b.params.items()},
                     "best.checkpoint_path": b.checkpoint_path, "best.hf_path": b.hf_path,
                     "best.mlflow_run_id": b.mlflow_run_id}.items():
            client.set_tag(parent, k, str(v))
    client.set_terminated(parent, "KILLED" if result.interrupted else "FINISHED")


def end_runs(cfg: SweepConfig, status: str = "KILLED") -> list[str]:
    """End the sweep's MLflow runs still RUNNING (its parent and its trials') with `status`, e.g. after Ctrl-C."""
    from .train.tracking import end_run_id, tracking_uri

    if not cfg.train.tracking.enabled:
        return []
    uri, ended = tracking_uri(cfg.train), []
    trials_dir = os.path.join(cfg.folder, TRIALS_DIR)
    ids = []
    if os.path.isdir(trials_dir):
        for name in sorted(os.listdir(trials_dir)):
            p = os.path.join(trials_dir, name, "mlflow_run_id")
            if os.path.exists(p):
                ids.append(open(p).read().strip())
    p = os.path.join(cfg.folder, PARENT_ID_FILE)
    if os.path.exists(p):
        ids.append(open(p).read().strip())
    for run_id in ids:
        ended.append(end_run_id(uri, run_id, status))
    return [r for r in ended if r]
