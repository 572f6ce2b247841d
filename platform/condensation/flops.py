"""Model FLOPs of a training step and the device's measured matmul peak: model FLOP utilisation (MFU) for the
benchmark and the training layer alike.

    flops = training_flops(model.config, seq_len=4096, batch=4)                 # forward + backward, one step
    mfu = flops / step_seconds / 1e12 / matmul_peak_tflops(torch.device("cuda"), torch.bfloat16)
"""

from __future__ import annotations

import time

import torch


def matmul_params(config) -> int:
    """Parameters that take part in matmuls: every projection of every layer plus the lm-head (the embedding
    lookup is not a matmul; a tied lm-head still is one)."""
    d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return L * (attn + 3 * d * f) + config.vocab_size * d


def training_flops(config, seq_len: int, batch: int = 1, segment_length: int | None = None) -> float:
    """FLOPs of one forward + backward over `batch` rows of `seq_len` tokens: 6 per matmul parameter and token,
    plus the attention scores and values (12 per layer, head, head dim and attended key). A Condensation query
    attends to its segment's earlier keys and the whole memory segment, i.e. l/2 + l keys past the first segment;
    `segment_length=None` counts a plain causal Llama (L/2 keys per query)."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if segment_length is None:
        kv_per_query = seq_len / 2
    else:
        kv_per_query = min(seq_len, segment_length) * (1.5 if seq_len > segment_length else 0.5)
    attn = 12 * config.num_hidden_layers * config.num_attention_heads * hd * kv_per_query
    return batch * seq_len * (6 * matmul_params(config) + attn)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float | None:
    """Measured dense matmul TFLOP/s of this device (what MFU is reported against); None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    peak = 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12
    del a, b
    return peak
