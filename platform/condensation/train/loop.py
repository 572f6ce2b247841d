"""The Ray Train worker function: reads only its config, builds the model, hands it to its engine, trains.

The engine (`engines.py`, `schedule.engine`) is DeepSpeed ZeRO or plain torch; the torch engine's step can be two
CUDA graphs split at the finite-loss flag below, so that the host's wait for it costs one graph launch.
Per optimizer step: `grad_accum` micro-batches from `get_dataset_shard("train")` (prefetched onto the device by
Ray Data), each `engine.forward_backward` (the fused chunked loss, `return_logits=False`), then `engine.step`
(at the accumulation boundary: clipping, AdamW and the cosine schedule). With `schedule.replay_micro_batches` the
step then takes that many more micro-batches from `get_dataset_shard("replay")` (e.g. text during passkey stages):
the update follows the mean gradient over all the step's micro-batches (each replay micro-batch weighed by
`schedule.replay_weight` against a train micro-batch's 1), `loss` and the segment losses stay the train rows', and
`replay_loss` is the replay rows' unweighted mean (tokens/s and MFU count both kinds of micro-batch: both are work).

The host waits on the GPU once per optimizer step, not per micro-step: the loss and segment losses are summed on
the device and all-reduced there (NCCL needs device tensors), and before the boundary `engine.step` one flag says
whether every rank's losses were finite. A non-finite loss therefore stops every rank at the same step before its
update, and the last good checkpoint stays as it was. DeepSpeed's ZeRO-2 step itself reads the gradient norm on the
host (`.item()`), so this flag costs no extra stall, and it is also why the step cannot be captured as a CUDA graph.
Metrics (loss, tokens/s, MFU, peak memory) are read by the host once per `tracking.log_every` steps; an optional
`evaluate(model)` from `fit` adds rank 0's evaluation to them, and with `report_every_log` (a run with Ray Train
callbacks, e.g. inside a Ray Tune trial) every interval's metrics are also reported through `ray.train.report`.

Stopping from outside: a file `stop` (STOP_FILE) in the run folder ends every rank before the current step's update
(rank 0 looks for it at each step and the flag rides on the step's all-reduce, so it costs no extra wait).

Failures: the attempt's first exception raised here is recorded in `<run_dir>/last_error.json` (step, rank, message)
before it propagates, so the driver (`trainer.fit`) can tell a bug that repeats at the same step from a lost worker.

Checkpoints: every rank calls `engine.save` into its own local folder and reports it with the same
`checkpoint_dir_name` (a rank that wrote nothing, as under the torch engine all but rank 0, reports no folder); Ray
Train merges them into one checkpoint (DeepSpeed: model states + every rank's ZeRO shard; torch: rank 0's state
file), plus `trainer_state.json` and (last step, or every checkpoint if asked) an `hf/` export from rank 0.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time

import torch

from ..config import TrainConfig, to_yaml
from .checkpoints import STATE_FILE, checkpoint_step
from .engines import make_engine
from .model import build_model
from .tracking import make_logger

HF_DIR = "hf"
NONFINITE_FILE = "nonfinite_loss.json"
# written by anyone who wants the run to end (e.g. a Ray Tune trial that ASHA stops); rank 0 checks for it at every
# optimizer step, and every rank ends before that step's update; the run then records STOPPED_FILE
STOP_FILE = "stop"
STOPPED_FILE = "stopped.json"
ERROR_FILE = "last_error.json"


def fault_marker(cfg: TrainConfig, kind: str = "fault") -> str:
    step = cfg.debug.kill_at_step if kind == "kill" else cfg.debug.fault_at_step
    return os.path.join(cfg.run.run_dir, f".{kind}_injected_at_step_{step}")


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


def _say(line: str) -> None:
    """A progress line from rank 0, written once: Ray Train's patched `print` in a worker also logs every line through
    the root logger, so each printed line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _batches(shard, batch_size: int, device: torch.device, lengths: list[int] | None = None, seed: int = 0,
             rank: int = 0, first: int = 0):
    """Micro-batches forever, epoch after epoch, already on `device` (Ray Data copies the next batches there while
    the current one trains). With `lengths` (data.random_lengths) every micro-batch has one of them, see
    `_length_batches`."""
    if lengths is not None:
        yield from _length_batches(_batches(shard, batch_size, torch.device("cpu")), batch_size, device, lengths, seed,
                                   rank, first)
        return
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.long, device=device,
                                          prefetch_batches=2):
            n += 1
            yield epoch, b
        if n == 0:
            raise RuntimeError(f"the training shard holds fewer than per_worker_batch={batch_size} rows")
        epoch += 1


def _length_batches(batches, batch_size: int, device: torch.device, lengths: list[int], seed: int, rank: int,
                    first: int):
    """Rows that carry a `length` (passkey rows generated at random lengths) regrouped on the host into micro-batches
    of one length (`uniform_length_batches`); text rows cut, micro-batch j of this worker to draw_length(lengths, seed,
    rank, first + j) tokens (any prefix of a text row is one). `first`: micro-batches of the steps before a resume."""
    from ..data.pipeline import draw_length, uniform_length_batches

    head = next(batches)
    stream = itertools.chain([head], batches)
    if "length" in head[1]:
        stream = uniform_length_batches(stream, batch_size)
    else:
        stream = ((epoch, {k: v[:, : draw_length(lengths, seed, rank, first + j)] for k, v in b.items()})
                  for j, (epoch, b) in enumerate(stream))
    for epoch, b in stream:
        yield epoch, {k: v.to(device, non_blocking=True) for k, v in b.items()}


def _record_error(cfg: TrainConfig, step: int, rank: int, exc: BaseException) -> None:
    """What the driver compares between attempts: the same step and message twice is a bug, not bad luck. The
    attempt's first error is kept (exclusive create): when one rank fails, Ray Train tears the group down and the
    other ranks fail after it with errors of that teardown (e.g. DeepSpeed's "backend not set" a step later), which
    must not replace the cause."""
    try:
        rec = {"step": step, "rank": rank, "type": type(exc).__name__, "message": str(exc)[:2000]}
        with open(os.path.join(cfg.run.run_dir, ERROR_FILE), "x") as f:
            json.dump(rec, f)
    except OSError:  # another rank's error came first (FileExistsError), or the record is lost: it is advice to the
        pass  # driver, never masking the real error


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = TrainConfig.from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    progress = {"step": 0}
    try:
        _train(cfg, config, progress)
    except Exception as e:
        _record_error(cfg, progress["step"], rank, e)
        raise
    # before Ray Train destroys the process group (TorchEngine.close); not after an error, where a peer's collective
    # may never end and the graphs' synchronize would wait for it
    progress["engine"].close()


def _quiet_worker_logs() -> None:
    """One progress line per interval from rank 0: Ray Train's per-report INFO line (every rank's metrics) and
    deprecation notices from inside DeepSpeed/torch.distributed would otherwise repeat in the driver's log."""
    import logging
    import warnings

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray 2.60 logs "Reporting training result ..." through a logger named by its file path, which neither
        # LoggingConfig nor the "ray.train" logger reaches
        from ray.train.v2._internal.execution import context as ray_train_context

        logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars of every HF export
    except ImportError:
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _train(cfg: TrainConfig, config: dict, progress: dict) -> None:
    _quiet_worker_logs()
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from ..data.pipeline import segment_multiples
    from ..flops import matmul_peak_tflops, training_flops

    run_id = config.get("mlflow_run_id")
    evaluate, report_every_log = config.get("evaluate"), config.get("report_every_log", False)
    s = cfg.schedule
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
    engine = make_engine(cfg, model, device, world)
    progress["engine"] = engine

    logger = make_logger(cfg, run_id, rank, system_metrics=device.type == "cuda")
    step = 0
    ckpt = ray.train.get_checkpoint()
    resume = config.get("resume_from")  # the newest complete checkpoint on disk, which Ray may not know of yet
    if ckpt is not None or resume:
        with (ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(resume)) as d:
            if resume and checkpoint_step(resume) > checkpoint_step(d):
                d = resume
            engine.load(d)
            step = checkpoint_step(d)
        if rank == 0:
            _say(f"[condensation.train] resumed from {d} at step {step}")
    progress["step"] = step
    resolved = {**cfg.to_dict(), **engine.resolved, "model_config": seq_cfg.to_dict(), "world_size": world}
    if step == 0:
        logger.log_params({**cfg.to_dict(), **engine.resolved, "world_size": world,
                           "grad_accum": s.grad_accum, "n_params": sum(p.numel() for p in model.parameters())})
        logger.log_text(to_yaml(resolved), "resolved_config.yaml")
        if config.get("data_stats"):
            stats = config["data_stats"]
            logger.log_metrics({f"data.{k}": v for k, v in stats.items() if isinstance(v, (int, float))}, step=0)
            logger.log_text(json.dumps(stats, indent=2, default=str), "data_stats.json")

    shard = ray.train.get_dataset_shard("train")
    n_seg = -(-cfg.data.seq_len // seq_cfg.segment_length)
    lengths = segment_multiples(cfg.data.seq_len, seq_cfg.segment_length) if cfg.data.random_lengths else None
    batches = _batches(shard, s.per_worker_batch, device, lengths, cfg.data.seed, rank, step * s.grad_accum)
    n_replay = s.replay_micro_batches
    replay = None
    if n_replay:
        # seed + 1: replay text cut to random lengths draws them apart from train text's (the same keys otherwise)
        replay = _batches(ray.train.get_dataset_shard("replay"), s.per_worker_batch, device, lengths,
                          cfg.data.seed + 1, rank, step * n_replay)
    replay_epoch = 0
    peak_tflops = None
    if rank == 0 and device.type == "cuda":
        peak_tflops = cfg.tracking.peak_tflops or matmul_peak_tflops(device, torch.bfloat16 if s.bf16() else torch.float32)
    bar = None
    if rank == 0 and cfg.tracking.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=s.total_steps, initial=step, desc=cfg.run.name, file=sys.stdout, mininterval=10)

    # the export carries the run's tokenizer, so AutoTokenizer.from_pretrained(hf) works as for any HF checkpoint
    export_tokenizer = None
    if rank == 0 and cfg.checkpoint.export_hf:
        from ..tokenizer import load_tokenizer

        export_tokenizer = load_tokenizer(cfg.data.tokenizer)

    def save(step: int, metrics: dict, final: bool) -> None:
        tmp = tempfile.mkdtemp(prefix=f"condensation-ckpt-r{rank}-")
        try:
            engine_state = engine.save(tmp, rank)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump({"step": step, "mlflow_run_id": run_id, "total_steps": s.total_steps, "world_size": world,
                               **engine_state}, f)
                with open(os.path.join(tmp, "resolved_config.yaml"), "w") as f:
                    f.write(to_yaml(resolved))
                if cfg.checkpoint.export_hf and (final or cfg.checkpoint.export_hf_every):
                    engine.module.save_pretrained(os.path.join(tmp, HF_DIR), safe_serialization=True)
                    export_tokenizer.save_pretrained(os.path.join(tmp, HF_DIR))
            checkpoint = Checkpoint.from_directory(tmp) if os.listdir(tmp) else None  # nothing of this rank's to add
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # [loss, segment losses..., micro-batches that had each segment..., non-finite flag, replay loss, stop flag]
    # summed over micro-steps and ranks, on the device until logged; the stop flag is rank 0's: a STOP_FILE in the run
    # folder. The non-finite flag counts replay micro-batches too: their gradient reaches the same update
    window = torch.zeros(4 + 2 * n_seg, dtype=torch.float64, device=device)
    window_steps, window_tokens, window_flops, t_window = 0, 0, 0.0, time.perf_counter()
    seg_index = torch.arange(n_seg, device=device)
    stop_path = os.path.join(cfg.run.run_dir, STOP_FILE)
    metrics: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < s.total_steps:
        step += 1
        progress["step"] = step
        lr = engine.lr
        acc = torch.zeros(4 + 2 * n_seg, dtype=torch.float64, device=device)
        for micro in range(s.micro_batches):
            if micro < s.grad_accum:
                epoch, b = next(batches)
            else:
                replay_epoch, b = next(replay)
            ids, labels = b["input_ids"], b["labels"]
            # debug.nan_at_step poisons the train rows only; the flag below treats a replay NaN the same way
            poison = cfg.debug.nan_at_step == step and micro < s.grad_accum
            out = engine.forward_backward(ids, labels, poison=poison, replay=micro >= s.grad_accum)  # losses detached
            l64 = out.loss.detach().double().reshape(1)
            bad = (~torch.isfinite(l64)).double()
            if micro < s.grad_accum:
                seg = out.segment_losses.detach().double()[:n_seg]
                present = (seg_index < seg.numel()).double()  # rows of another length: fixed width, counted apart
                seg = torch.nn.functional.pad(seg, (0, n_seg - seg.numel()))
                acc[:-2] += torch.cat([l64, seg, present, bad])
            else:
                acc[-3:-1] += torch.cat([bad, l64])
            window_tokens += ids.numel() * world
            window_flops += training_flops(seq_cfg, ids.shape[1], ids.shape[0], seq_cfg.segment_length)
            if micro == s.micro_batches - 1:
                if rank == 0 and os.path.exists(stop_path):
                    acc[-1] += 1.0
                dist.all_reduce(acc)  # sum over ranks, on the device: a NaN on any rank is a NaN everywhere
                # the one host wait per optimizer step, before the update
                nonfinite, replay_sum, stop = acc[-3:].tolist()
                if nonfinite > 0:
                    bad_loss = float(acc[0]) / (world * s.grad_accum)
                    if n_replay and math.isfinite(bad_loss):
                        bad_loss = f"{replay_sum / (world * n_replay)} (replay rows)"
                    return _stop_nonfinite(cfg, step, bad_loss, rank, logger)
                if stop > 0:
                    return _stop_requested(cfg, step - 1, rank, logger)
            engine.step()
        window += acc
        window_steps += 1

        log_now = step % cfg.tracking.log_every == 0 or step == s.total_steps
        final = step == s.total_steps
        ckpt_now = final or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        if log_now or ckpt_now:
            vals = (window / (world * s.grad_accum * window_steps)).tolist()  # waits for the GPU: once per interval
            seg_means = [v / c if c else 0.0 for v, c in zip(vals[1 : 1 + n_seg], vals[1 + n_seg : 1 + 2 * n_seg])]
            dt = time.perf_counter() - t_window
            metrics = {
                "step": step,
                "loss": vals[0],
                # vals are per train micro-batch; the replay loss sums n_replay micro-batches a step
                **({"replay_loss": vals[-2] * s.grad_accum / n_replay, "replay_epoch": replay_epoch}
                   if n_replay else {}),
                "lr": lr,
                "tokens_per_s": window_tokens / dt,
                "step_time_s": dt / window_steps,
                "peak_memory_gib": _peak_memory_gib(device),
                "epoch": epoch,
                **{f"segment_loss_{i}": v for i, v in enumerate(seg_means)},
            }
            if peak_tflops:
                metrics["mfu"] = window_flops / dt / 1e12 / peak_tflops
            if evaluate is not None and rank == 0:  # the other ranks wait for it at the next step's all-reduce
                metrics.update(_evaluate(evaluate, engine.module))
            logger.log_metrics(metrics, step=step)
            if rank == 0 and bar is None:
                mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                rl = f" replay_loss {metrics['replay_loss']:.4f}" if n_replay else ""
                _say(f"[condensation.train] step {step}/{s.total_steps} loss {metrics['loss']:.4f}{rl} lr {lr:.3g} "
                     f"tok/s {metrics['tokens_per_s']:.0f}{mfu} peak {metrics['peak_memory_gib']:.2f} GiB")
            if report_every_log and not ckpt_now:  # with a checkpoint, `save` reports these metrics
                ray.train.report(dict(metrics))
            window.zero_()
            window_steps, window_tokens, window_flops = 0, 0, 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if bar is not None:
            bar.update(1)
            if metrics:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2g}", refresh=False)

        if cfg.debug.fault_at_step == step and rank == world - 1 and not (cfg.debug.fault_once and os.path.exists(fault_marker(cfg))):
            open(fault_marker(cfg), "w").close()
            raise RuntimeError(f"injected fault at step {step} (debug.fault_at_step)")
        if cfg.debug.kill_at_step == step and rank == world - 1 and not os.path.exists(fault_marker(cfg, "kill")):
            open(fault_marker(cfg, "kill"), "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # a lost worker, as the OOM killer or a dead node leaves it

        if ckpt_now:
            if final:
                digests = [None] * world
                dist.all_gather_object(digests, param_digest(engine.module))
                metrics.update({f"param_digest_rank{r}": d for r, d in enumerate(digests)})
                metrics["ranks_in_sync"] = float(len(set(digests)) == 1)
            save(step, metrics, final)
        if log_now or ckpt_now:
            t_window = time.perf_counter()  # a checkpoint's time does not count against the next interval's speed
    if bar is not None:
        bar.close()
    logger.finish("FINISHED")


def _evaluate(fn, module: torch.nn.Module) -> dict:
    """`fn(module)` in eval mode without gradients, the module's training mode restored; float values only."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = fn(module)
    finally:
        module.train(was)
    return {k: float(v) for k, v in (out or {}).items()}


def _stop_requested(cfg: TrainConfig, step: int, rank: int, logger) -> None:
    """A STOP_FILE appeared: every rank ends after `step` completed steps, without a checkpoint; rank 0 consumes the
    file, records STOPPED_FILE for the driver and ends the MLflow run as KILLED (stopped from outside)."""
    if rank == 0:
        _say(f"[condensation.train] stopped on request after step {step} of run {cfg.run.name!r}")
        with open(os.path.join(cfg.run.run_dir, STOPPED_FILE), "w") as f:
            json.dump({"step": step}, f)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(cfg.run.run_dir, STOP_FILE))
        logger.set_tags({"stopped_at_step": step})
        logger.finish("KILLED")


def _stop_nonfinite(cfg: TrainConfig, step: int, bad: float | str, rank: int, logger) -> None:
    msg = (f"non-finite loss ({bad}) at step {step} of run {cfg.run.name!r}; training stopped before this step's "
           f"update; the last good checkpoint is kept")
    if rank == 0:
        _say(f"[condensation.train] ERROR: {msg}")
        with open(os.path.join(cfg.run.run_dir, NONFINITE_FILE), "w") as f:
            json.dump({"step": step, "loss": str(bad), "message": msg}, f)
        logger.set_tags({"nonfinite_loss_step": step})
        logger.finish("FAILED")
