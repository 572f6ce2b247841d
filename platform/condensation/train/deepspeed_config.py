"""The DeepSpeed config (DeepSpeed's own JSON schema) derived from a `TrainConfig`.

Batch: train_batch_size = per_worker_batch x num_workers x grad_accum. bf16 on GPU (precision "auto"), fp32 on
CPU. The optimizer (torch AdamW) and the cosine schedule are built in Python and passed to
`deepspeed.initialize`, so they are not in this dict. `cfg.deepspeed` is deep-merged last.
"""

from __future__ import annotations

from ..config import TrainConfig, _deep_update


def deepspeed_config(cfg: TrainConfig) -> dict:
    s = cfg.schedule
    ds = {
        "train_batch_size": s.global_batch,
        "train_micro_batch_size_per_gpu": s.per_worker_batch,
        "gradient_accumulation_steps": s.grad_accum,
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
