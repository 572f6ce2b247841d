"""What runs a worker's forward, backward and optimizer step: DeepSpeed ZeRO, or plain torch (`schedule.engine`).

Both sit behind one small interface that `loop.py` drives, once per micro-batch:

    engine = make_engine(cfg, model, device, world)    # model: fp32, on the CPU, as build_model returns it
    out = engine.forward_backward(ids, labels, replay=False)  # MicroStep(loss [], segment_losses [n_seg]), detached
    ... the loop's finite-loss check before the boundary's update ...
    engine.step()                                      # after every micro-step; updates at the accumulation boundary

A step accumulates `schedule.micro_batches` micro-batches: grad_accum of train rows, then
`schedule.replay_micro_batches` of replay rows (`replay=True`); each backward is scaled by
`schedule.micro_batch_scale(replay)`: 1 / (grad_accum + w x replay_micro_batches), times w for a replay micro-batch
(w = `schedule.replay_weight`), so the update follows the weighted mean of their gradients (at w = 1, the plain
mean: 1 / micro_batches each). The returned losses are unscaled.
    engine.lr, engine.module                           # the lr of the coming update; the model (HF export, digest)
    state = engine.save(folder, rank); engine.load(folder)

`DeepSpeedEngine`: `deepspeed.initialize` with torch AdamW and the cosine schedule, ZeRO stage `schedule.zero_stage`,
bf16 with fp32 master weights; every rank writes its shard into a checkpoint. Its step reads the gradient norm on
the host, so it cannot be captured as a CUDA graph.

`TorchEngine`: the model in `schedule.precision` on the device, AdamW (fused on GPU) over fp32 master weights when
the model is bf16 (`schedule.master_weights`), clipping of the global gradient norm, the same cosine schedule, and
for several ranks one all-reduce of one flat gradient bucket (ranks stay identical: they all apply the same
all-reduced gradient to the same weights). Every rank holds the whole optimizer state; rank 0 alone writes it.
With `schedule.cuda_graph` a step is two CUDA graphs (`CUDAGraphStep`), both replayed by one host call each:
  A. forward + backward (+ folding bf16 gradients into the fp32 bucket), run by `forward_backward`;
  B. all-reduce (NCCL inside the graph) + clipping + AdamW + the bf16 copy of the master weights, run by `step`.
The loop reads its finite-loss flag between A and B, so a non-finite loss never reaches the weights, and the host
wait costs only B's launch: the next batch's host work overlaps B on the GPU. The learning rate lives in a device
tensor that the schedule fills between replays.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Protocol

import torch

from ..config import ConfigError, TrainConfig
from .checkpoints import DS_TAG, TORCH_DIR, TORCH_STATE, checkpoint_engine, newest_complete_checkpoint

# one all-reduce inside graph B (NCCL collectives are capturable once the communicator exists, which the eager
# warm-up steps ensure); False would run it eagerly between A and B
ALLREDUCE_IN_GRAPH = True


class MicroStep(NamedTuple):
    loss: torch.Tensor  # [] the micro-batch's loss (detached; NaN when poisoned for a test)
    segment_losses: torch.Tensor  # [n_seg] per-segment losses (detached)


class Engine(Protocol):
    name: str
    module: torch.nn.Module
    resolved: dict  # recorded in the resolved config and MLflow params

    @property
    def lr(self) -> float: ...

    def forward_backward(self, ids: torch.Tensor, labels: torch.Tensor, poison: bool = False,
                         replay: bool = False) -> MicroStep: ...

    def step(self) -> None: ...

    def save(self, path: str, rank: int) -> dict: ...

    def load(self, path: str) -> None: ...

    def close(self) -> None:
        """Called once training ended without an error, before Ray Train destroys the process group."""


def resolved(cfg: TrainConfig) -> dict:
    """What the engine of `cfg` resolves to, for the run's resolved config (the same on the driver and the workers)."""
    s = cfg.schedule
    if s.engine == "deepspeed":
        from .deepspeed_config import deepspeed_config

        return {"deepspeed_resolved": deepspeed_config(cfg)}
    master = s.bf16() and s.master_weights
    return {"torch_engine_resolved": {
        "model_dtype": "bfloat16" if s.bf16() else "float32",
        "optimizer": (f"AdamW(fused=True{', capturable=True' if s.cuda_graph else ''})" if s.use_gpu else "AdamW"),
        "optimizer_dtype": "float32" if master or not s.bf16() else "bfloat16",
        "master_weights": master,
        "grad_bucket": f"one flat {'float32' if master or not s.bf16() else 'bfloat16'} buffer",
        "grad_allreduce": ("none (one worker)" if s.num_workers == 1 else
                           f"{'nccl' if s.use_gpu else 'gloo'} all-reduce of the bucket, then / {s.num_workers}"),
        "grad_clip": cfg.optim.grad_clip,
        "micro_batches_per_step": (_replay_scaling(s) if s.replay_micro_batches else s.grad_accum),
        "cuda_graph": ("A: forward + backward; B: all-reduce + clipping + AdamW; finite-loss check between"
                       if s.cuda_graph else "off"),
    }}


def _replay_scaling(s) -> str:
    """How the torch engine scales each micro-batch's loss with replay (the resolved config's words)."""
    if s.replay_weight == 1:
        return f"{s.grad_accum} train + {s.replay_micro_batches} replay, each loss / {s.micro_batches}"
    d = s.grad_accum + s.replay_weight * s.replay_micro_batches
    return (f"{s.grad_accum} train (each loss / {d:g}) + {s.replay_micro_batches} replay (each loss x "
            f"{s.replay_weight:g} / {d:g}): replay_weight {s.replay_weight:g}")


def check_resume_engine(cfg: TrainConfig) -> None:
    """A run continues with the engine that wrote its checkpoints: their states differ (DeepSpeed's per-rank ZeRO
    shards, the torch engine's one file), so switching fails in `trainer.prepare`, before any worker starts."""
    newest = newest_complete_checkpoint(cfg.run.run_dir)
    engine = newest and checkpoint_engine(newest)
    if engine and engine != cfg.schedule.engine:
        raise ConfigError("schedule.engine", f"run {cfg.run.name!r} has checkpoints of the {engine!r} engine "
                                             f"({newest}); continue it with schedule.engine={engine}, or start a new "
                                             f"run.name")


def make_engine(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, world: int) -> Engine:
    if cfg.schedule.engine == "deepspeed":
        return DeepSpeedEngine(cfg, model, device)
    return TorchEngine(cfg, model, device, world)


def _optimizer_and_schedule(cfg: TrainConfig, params, device: torch.device, capturable: bool = False):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    s, o = cfg.schedule, cfg.optim
    extra = {"fused": True, "capturable": capturable} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  **extra)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, o.warmup_steps, s.total_steps, min_lr=o.min_lr)
    return optimizer, scheduler


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
        import deepspeed

        if getattr(model.config, "stacked_params", False):  # config.validate says so first; a model built elsewhere
            raise ConfigError("model.overrides.stacked_params", "needs schedule.engine=torch: its weight gradients "
                                                                "bypass the hooks DeepSpeed ZeRO reduces gradients from")
        s = cfg.schedule
        self.resolved = resolved(cfg)
        self.zero_stage = s.zero_stage
        # DeepSpeed divides every backward by gradient_accumulation_steps (= micro_batches): the plain mean. With a
        # replay weight the engine scales each loss itself (micro_batch_scale) and tells DeepSpeed not to
        self._scale = s.replay_scales()
        optimizer, scheduler = _optimizer_and_schedule(cfg, model.parameters(), device)
        self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.resolved["deepspeed_resolved"],
            dist_init_required=False)
        self.module = self._ds.module

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def forward_backward(self, ids, labels, poison: bool = False, replay: bool = False) -> MicroStep:
        out = self._ds(input_ids=ids, labels=labels, return_logits=False)
        loss = out.loss * float("nan") if poison else out.loss
        if self._scale is None:
            self._ds.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps (replay included) itself
        else:
            self._ds.backward(loss * self._scale[replay], scale_wrt_gas=False)
        return MicroStep(loss.detach(), out.segment_losses.detach())

    def step(self) -> None:
        self._ds.step()  # counts micro-steps; clips, steps AdamW and the schedule at the boundary

    def save(self, path: str, rank: int) -> dict:
        self._ds.save_checkpoint(path, tag=DS_TAG)  # every rank: its ZeRO shard (rank 0 also the model states)
        return {"engine": self.name, "zero_stage": self.zero_stage}

    def load(self, path: str) -> None:
        self._ds.load_checkpoint(path, tag=DS_TAG)

    def close(self) -> None:
        pass


class TorchEngine:
    """Plain torch on each worker; see the module docstring. Gradients of all parameters live in one flat buffer
    `grad_flat` [n_params] (fp32 with master weights, else the model's dtype) whose views are the optimizer
    parameters' `.grad`: one all-reduce, one norm, one clipping multiply."""

    name = "torch"

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device, world: int,
                 graph_warmup: int = 2):
        s = cfg.schedule
        self.resolved = resolved(cfg)
        # every micro-batch of a step, replay ones too, weighs 1 / micro_batches: the gradient is their mean; with a
        # replay weight w, train ones weigh 1 / (grad_accum + w x replay), replay ones w / (...) (micro_batch_scale)
        self.world, self.grad_accum, self.clip = world, s.micro_batches, float(cfg.optim.grad_clip)
        self._scale = s.replay_scales()
        self.graph = bool(s.cuda_graph)
        dtype = torch.bfloat16 if s.bf16() else torch.float32
        self.master = dtype != torch.float32 and s.master_weights
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        if self.master:  # from the fp32 weights before the cast, so that the model is always bf16(master)
            self.opt_params = [p.detach().to(device=device, dtype=torch.float32, copy=True) for _, p in named]
        self.module = model.to(device=device, dtype=dtype)
        self.params = [p for p in self.module.parameters() if p.requires_grad]  # the same order as `named`
        if not self.master:
            self.opt_params = self.params  # AdamW steps the model's own weights
        numels = [p.numel() for p in self.params]
        self.grad_flat = torch.zeros(sum(numels), dtype=self.opt_params[0].dtype, device=device)  # [n_params]
        self.grad_views = [g.view_as(p) for g, p in zip(self.grad_flat.split(numels), self.params)]
        for p, g in zip(self.opt_params, self.grad_views):
            p.grad = g  # backward accumulates into these in place when they are the model's own parameters
        self.optimizer, self.scheduler = _optimizer_and_schedule(cfg, self.opt_params, device, capturable=self.graph)
        self._float_lr = not self.graph
        if self.graph:
            # a captured AdamW reads its lr from a device tensor, which the schedule fills in place between replays
            # (set after the schedule is built, so that its base lrs stay host floats and never sync)
            for g in self.optimizer.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)
            self._lr_tensor = self.optimizer.param_groups[0]["lr"]
        # a test's NaN (debug.nan_at_step) rides on a device multiplier, so that a captured step can take it too
        self._poison = torch.ones((), device=device) if cfg.debug.nan_at_step is not None else None
        self._poisoned = False
        self._micro = 0
        self._grads_graph = self._update_graph = None
        if self.graph:
            from ..cuda_graph import CUDAGraphStep

            # A keeps no gradient of its own past the fold (master weights), and its bucket views must survive the
            # runner's zero_grad (no master weights: backward accumulates into them, A zeroes them first)
            a_zero = (lambda: self.module.zero_grad(set_to_none=True)) if self.master else (lambda: None)
            self._grads_graph = CUDAGraphStep(lambda b: self._grads(b["input_ids"], b["labels"], first=True),
                                              self.optimizer, warmup=graph_warmup, zero_grad=a_zero,
                                              capture_error_mode="thread_local")
            self._update_graph = CUDAGraphStep(lambda _: self._update(allreduce=ALLREDUCE_IN_GRAPH), self.optimizer,
                                               warmup=graph_warmup, zero_grad=lambda: None,
                                               capture_error_mode="thread_local")

    # ---- the two halves of a step (eager, or captured by A and B)

    def _grads(self, ids: torch.Tensor, labels: torch.Tensor, first: bool, replay: bool = False) -> MicroStep:
        """Forward and backward of one micro-batch [B, L] into the bucket (`first`: of its optimizer step; `replay`: a
        replay micro-batch, weighed by schedule.replay_weight)."""
        if first and not self.master:
            self.grad_flat.zero_()
        out = self.module(input_ids=ids, labels=labels, return_logits=False)
        loss = out.loss if self._poison is None else out.loss * self._poison
        if self._scale is not None:
            (loss * self._scale[replay]).backward()
        else:
            (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()
        if self.master:
            self._fold(first)
        return MicroStep(loss.detach(), out.segment_losses.detach())

    @torch.no_grad()
    def _fold(self, first: bool) -> None:
        """The model's bf16 gradients into the fp32 bucket (written on the first micro-step, added after), then
        dropped, so that bf16 gradients never accumulate over micro-steps."""
        pairs = [(v, p.grad) for v, p in zip(self.grad_views, self.params)]
        have = [(v, g) for v, g in pairs if g is not None]
        if first:
            for v, g in pairs:
                if g is None:  # a parameter without gradient this step: nothing stale in its slice
                    v.zero_()
            torch._foreach_copy_([v for v, _ in have], [g for _, g in have])
        else:
            torch._foreach_add_([v for v, _ in have], [g for _, g in have])
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def _allreduce(self) -> None:
        import torch.distributed as dist

        dist.all_reduce(self.grad_flat)  # sum over ranks; every rank ends with the same bucket
        self.grad_flat.div_(self.world)

    @torch.no_grad()
    def _update(self, allreduce: bool) -> None:
        if allreduce and self.world > 1:
            self._allreduce()
        if self.clip > 0:  # as clip_grad_norm_: scale by min(1, clip / (norm + 1e-6)), with no host sync
            norm = torch.linalg.vector_norm(self.grad_flat, dtype=torch.float32)
            self.grad_flat.mul_((self.clip / (norm + 1e-6)).clamp(max=1.0))
        self.optimizer.step()
        if self.master:
            torch._foreach_copy_(self.params, self.opt_params)  # fp32 -> bf16 model weights

    # ---- the interface

    @property
    def lr(self) -> float:
        """The lr of the coming update, computed on the host (the graph's lr is a device tensor)."""
        if self._float_lr:
            return self.optimizer.param_groups[0]["lr"]
        sch = self.scheduler
        return sch.base_lrs[0] * sch.lr_lambdas[0](sch.last_epoch)

    def forward_backward(self, ids: torch.Tensor, labels: torch.Tensor, poison: bool = False,
                         replay: bool = False) -> MicroStep:
        if poison and self._poison is None:
            raise RuntimeError("poison needs debug.nan_at_step set when the engine is built")
        if self._poison is not None and poison != self._poisoned:  # a fill only when it changes
            self._poison.fill_(float("nan") if poison else 1.0)
            self._poisoned = poison
        if self._grads_graph is not None:
            return self._grads_graph({"input_ids": ids, "labels": labels})
        return self._grads(ids, labels, first=self._micro == 0, replay=replay)

    def step(self) -> None:
        self._micro += 1
        if self._micro < self.grad_accum:
            return
        self._micro = 0
        if self._update_graph is not None:
            if not ALLREDUCE_IN_GRAPH and self.world > 1:
                self._allreduce()
            self._update_graph({})
        else:
            self._update(allreduce=True)
        self.scheduler.step()
        if self.graph and self.optimizer.param_groups[0]["lr"] is not self._lr_tensor:
            # a schedule that assigns a float instead of filling the tensor would freeze the captured lr silently
            raise RuntimeError("the lr schedule replaced the optimizer's lr tensor; a captured AdamW reads that tensor "
                               "(recent torch LRSchedulers fill a tensor lr in place)")

    def save(self, path: str, rank: int) -> dict:
        """Rank 0 writes weights (the optimizer's: fp32 masters when there are), AdamW's state and the schedule's
        into `path/torch/state.pt`; the ranks hold the same, so the others write nothing. Returns what rank 0 puts
        into trainer_state.json: the engine, and the file's size, by which a copy cut short is told apart."""
        if rank != 0:
            return {}
        opt = self.optimizer.state_dict()
        for g in opt["param_groups"]:
            g["lr"] = float(g["lr"])  # a host float in the file, whether or not this run kept it on the device
        sch = self.scheduler.state_dict()
        sch["_last_lr"] = [float(x) for x in sch.get("_last_lr", [])]
        state = {"params": {n: p.detach().cpu() for n, p in zip(self.names, self.opt_params)},
                 "optimizer": opt, "scheduler": sch,
                 "meta": {"master_weights": self.master, "dtype": str(self.opt_params[0].dtype)}}
        os.makedirs(os.path.join(path, TORCH_DIR), exist_ok=True)
        rel = os.path.join(TORCH_DIR, TORCH_STATE)
        torch.save(state, os.path.join(path, rel))
        return {"engine": self.name, "files": {rel: os.path.getsize(os.path.join(path, rel))}}

    def load(self, path: str) -> None:
        file = os.path.join(path, TORCH_DIR, TORCH_STATE)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: not a checkpoint of the torch engine (the {checkpoint_engine(path)!r} "
                                    "engine wrote it)")
        state = torch.load(file, map_location="cpu", weights_only=True)
        missing = set(self.names) - set(state["params"])
        if missing:
            raise KeyError(f"{file}: no weights for {sorted(missing)[:5]}")
        with torch.no_grad():
            for n, p in zip(self.names, self.opt_params):
                p.copy_(state["params"][n])
            if self.master:
                torch._foreach_copy_(self.params, self.opt_params)
        opt = state["optimizer"]
        # this run's own flags decide where AdamW keeps its step counts (device for fused/capturable)
        for saved, group in zip(opt["param_groups"], self.optimizer.param_groups):
            saved.update({k: group[k] for k in ("fused", "capturable", "foreach", "differentiable") if k in group})
        lr_tensors = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(opt)
        for g, old in zip(self.optimizer.param_groups, lr_tensors):
            if isinstance(old, torch.Tensor):  # keep the device tensor (a graph reads this one), with the saved value
                old.fill_(float(g["lr"]))
                g["lr"] = old
            else:
                g["lr"] = float(g["lr"])
        self.scheduler.load_state_dict(state["scheduler"])

    def close(self) -> None:
        """Frees the two CUDA graphs before Ray Train destroys the process group: graph B holds the NCCL all-reduce,
        and a live graph with a captured collective keeps the destroy waiting (pytorch/pytorch#115388)."""
        for graph in (self._grads_graph, self._update_graph):
            if graph is not None:
                graph.reset()
        self._grads_graph = self._update_graph = None

