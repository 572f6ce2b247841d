"""The DeepSpeed config (DeepSpeed's own JSON schema) derived from a `TrainConfig`.

Batch: train_batch_size = per_worker_batch x num_workers x micro-batches per step (grad_accum, plus
schedule.replay_micro_batches: DeepSpeed scales each backward by 1 / gradient_accumulation_steps, which must count the
replay micro-batches for the step's gradient to be their mean; with schedule.replay_weight != 1 the engine scales
each loss itself and turns DeepSpeed's scaling off: `DeepSpeedEngine.forward_backward`). bf16 on GPU (precision
"auto"), fp32 on CPU. The optimizer (torch AdamW) and the cosine schedule are built in Python and passed to
`deepspeed.initialize`, so they are not in this dict. `cfg.deepspeed` is deep-merged last.
"""

from __future__ import annotations

from ..config import TrainConfig, _deep_update


def deepspeed_config(cfg: TrainConfig) -> dict:
    s = cfg.schedule
    ds = {
        "train_batch_size": s.per_worker_batch * s.num_workers * s.micro_batches,
        "train_micro_batch_size_per_gpu": s.per_worker_batch,
        "gradient_accumulation_steps": s.micro_batches,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": {
            "stage": s.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": bool(s.use_gpu),
            "reduce_scatter": True,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": s.bf16()},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_update(ds, cfg.deepspeed)
