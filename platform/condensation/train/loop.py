"""The Ray Train worker function: reads only its config, builds the model, wraps it in DeepSpeed, trains.

Per optimizer step: `grad_accum` micro-batches from `get_dataset_shard("train")`, each `engine(...)` with
`return_logits=False` (chunked loss), `engine.backward`, `engine.step` (DeepSpeed clips, steps AdamW and the cosine
schedule at the accumulation boundary). Losses are all-reduced so every rank sees the same value: a non-finite loss
stops every rank at the same step, before its backward, and the last good checkpoint stays as it was.

Checkpoints: every rank calls `engine.save_checkpoint` into its own local folder and reports it with the same
`checkpoint_dir_name`; Ray Train merges them into one checkpoint (model states + every rank's ZeRO shard), plus
`trainer_state.json` and (last step, or every checkpoint if asked) an `hf/` export from rank 0.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time

import torch

from ..config import TrainConfig, to_yaml
from .deepspeed_config import deepspeed_config
from .model import build_model
from .tracking import make_logger

DS_TAG = "ds"
STATE_FILE = "trainer_state.json"
HF_DIR = "hf"
NONFINITE_FILE = "nonfinite_loss.json"


def fault_marker(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run.run_dir, f".fault_injected_at_step_{cfg.debug.fault_at_step}")


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB; the process's peak RSS


def param_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter's bytes (for checking that the ranks hold identical weights)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _batches(shard, batch_size: int):
    """Micro-batches forever, epoch after epoch."""
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.long):
            n += 1
            yield epoch, b
        if n == 0:
            raise RuntimeError(f"the training shard holds fewer than per_worker_batch={batch_size} rows")
        epoch += 1


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    cfg = TrainConfig.from_dict(config["cfg"])
    run_id = config.get("mlflow_run_id")
    s, o = cfg.schedule, cfg.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    device = ray.train.torch.get_device() if s.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    torch.manual_seed(s.seed)
    model = build_model(cfg.model)
    model.train()
    seq_cfg = model.config
    ds_cfg = deepspeed_config(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, o.warmup_steps, s.total_steps, min_lr=o.min_lr)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_cfg, dist_init_required=False)

    logger = make_logger(cfg, run_id, rank)
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            with open(os.path.join(d, STATE_FILE)) as f:
                step = json.load(f)["step"]
        if rank == 0:
            print(f"[condensation.train] resumed from {ckpt.path} at step {step}", flush=True)
    resolved = {**cfg.to_dict(), "deepspeed_resolved": ds_cfg, "model_config": seq_cfg.to_dict(), "world_size": world}
    if step == 0:
        logger.log_params({**cfg.to_dict(), "deepspeed_resolved": ds_cfg, "world_size": world,
                           "grad_accum": s.grad_accum, "n_params": sum(p.numel() for p in model.parameters())})
        logger.log_text(to_yaml(resolved), "resolved_config.yaml")
        if config.get("data_stats"):
            stats = config["data_stats"]
            logger.log_metrics({f"data.{k}": v for k, v in stats.items() if isinstance(v, (int, float))}, step=0)
            logger.log_text(json.dumps(stats, indent=2, default=str), "data_stats.json")

    shard = ray.train.get_dataset_shard("train")
    batches = _batches(shard, s.per_worker_batch)
    n_seg = -(-cfg.data.seq_len // seq_cfg.segment_length)
    bar = None
    if rank == 0 and cfg.tracking.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=s.total_steps, initial=step, desc=cfg.run.name, file=sys.stdout)

    def save(step: int, metrics: dict, final: bool) -> None:
        tmp = tempfile.mkdtemp(prefix=f"condensation-ckpt-r{rank}-")
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump({"step": step, "mlflow_run_id": run_id, "total_steps": s.total_steps}, f)
                with open(os.path.join(tmp, "resolved_config.yaml"), "w") as f:
                    f.write(to_yaml(resolved))
                if cfg.checkpoint.export_hf and (final or cfg.checkpoint.export_hf_every):
                    engine.module.save_pretrained(os.path.join(tmp, HF_DIR), safe_serialization=True)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"checkpoint_{step:08d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    metrics: dict = {}
    while step < s.total_steps:
        step += 1
        t0 = time.perf_counter()
        stats = torch.zeros(1 + n_seg, dtype=torch.float64)
        lr = optimizer.param_groups[0]["lr"]
        nonfinite = False
        tokens = 0
        for _ in range(s.grad_accum):
            epoch, b = next(batches)
            ids = b["input_ids"].to(device, non_blocking=True)
            labels = b["labels"].to(device, non_blocking=True)
            out = engine(input_ids=ids, labels=labels, return_logits=False)
            loss = out.loss
            if cfg.debug.nan_at_step == step:
                loss = loss * float("nan")
            seg = out.segment_losses.detach().double().cpu()[:n_seg]
            seg = torch.nn.functional.pad(seg, (0, n_seg - seg.numel()))  # rows of another length: fixed width
            micro = torch.cat([loss.detach().double().cpu().reshape(1), seg])
            tokens += ids.numel() * world
            dist.all_reduce(micro)  # sum over ranks: a NaN on any rank is a NaN everywhere
            if not torch.isfinite(micro).all():
                nonfinite = True
                bad = float(micro[0]) / world
                break
            stats += micro / world
            engine.backward(loss)
            engine.step()
        if nonfinite:
            msg = (f"non-finite loss ({bad}) at step {step} of run {cfg.run.name!r}; training stopped before this step's "
                   f"update; the last good checkpoint is kept")
            if rank == 0:
                print(f"[condensation.train] ERROR: {msg}", flush=True)
                with open(os.path.join(cfg.run.run_dir, NONFINITE_FILE), "w") as f:
                    json.dump({"step": step, "loss": str(bad), "message": msg}, f)
                logger.set_tags({"nonfinite_loss_step": step})
                logger.finish("FAILED")
            return
        dt = time.perf_counter() - t0
        stats /= s.grad_accum
        metrics = {
            "step": step,
            "loss": float(stats[0]),
            "lr": lr,
            "tokens_per_s": tokens / dt,
            "step_time_s": dt,
            "peak_memory_gib": _peak_memory_gib(device),
            "epoch": epoch,
            **{f"segment_loss_{i}": float(v) for i, v in enumerate(stats[1:])},
        }
        if step % cfg.tracking.log_every == 0 or step == s.total_steps:
            logger.log_metrics(metrics, step=step)
            if rank == 0 and bar is None:
                print(f"[condensation.train] step {step}/{s.total_steps} loss {metrics['loss']:.4f} lr {lr:.3g} "
                      f"tok/s {metrics['tokens_per_s']:.0f} peak {metrics['peak_memory_gib']:.2f} GiB", flush=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2g}")

        if cfg.debug.fault_at_step == step and rank == world - 1 and not os.path.exists(fault_marker(cfg)):
            open(fault_marker(cfg), "w").close()
            raise RuntimeError(f"injected fault at step {step} (debug.fault_at_step)")

        final = step == s.total_steps
        if final or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            if final:
                digests = [None] * world
                dist.all_gather_object(digests, param_digest(engine.module))
                metrics.update({f"param_digest_rank{r}": d for r, d in enumerate(digests)})
                metrics["ranks_in_sync"] = float(len(set(digests)) == 1)
            save(step, metrics, final)
    if bar is not None:
        bar.close()
    logger.finish("FINISHED")
