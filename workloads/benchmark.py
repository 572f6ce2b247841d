"""Training-step and generation benchmark: Condensation against transformers' LlamaForCausalLM, in one process.

On a GPU (the paper's Table I model, bf16, AdamW), every case:
    python workloads/benchmark.py --out benchmarks/results/h200.json
    ray job submit --working-dir . -- python workloads/benchmark.py --out benchmarks/results/h200.json
Issue 16 on one H200 (liger-kernel from the GPU bundle), three runs in two commands of under 5 minutes each; each
prints the summary of ratios against the baseline of the same run (kept in the JSON under "summary"):
    export PYTHONPATH=/tmp/site:$PWD/platform
    # 1: Llama-3.2-1B shape at 16K (MFU, against Llama + Liger), then generation at 32K and 128K (Table I shape)
    timeout 130 python workloads/benchmark.py --out $OUT/issue16_1b_generation.json --budget-s 90 \
        --sizes llama-3.2-1b --lengths 16384 --cases llama-liger,llama-sdpa,cond-sdpa-l512-deferred-compile-graph \
        --target cond-sdpa-l512-deferred-compile-graph --baseline llama-liger --generation 32768,131072
    timeout 160 python workloads/benchmark.py --out $OUT/issue16_table1.json --budget-s 120 --steps 3 --warmup 1 \
        --sizes table1 --lengths 16384,32768,65536,131072 --cases llama-liger-ckpt,cond-sdpa-l512-group8-compile-graph
    # 2: SmolLM2-135M shape (30 layers: compiled cells take longest to compile here; the uncompiled case first)
    timeout 290 python workloads/benchmark.py --out $OUT/issue16_smollm2.json --budget-s 230 --steps 3 --warmup 1 \
        --sizes smollm2-135m --lengths 16384,32768,65536,131072 \
        --cases llama-liger-ckpt,cond-sdpa-l512-groupckpt-accumulate-graph,cond-sdpa-l512-group8-compile-graph
    # 2b: stacked_params (benchmarks/gpu_session.sh bench-stacked; not yet run on a GPU): Table I's fastest case
    # stacked, and on both shapes the groupckpt-accumulate case stacked with the loss over 512-token chunks
    timeout 200 python workloads/benchmark.py --out $OUT/issue16_stacked_table1.json --budget-s 170 --steps 3 \
        --warmup 1 --sizes table1 --lengths 16384,32768,131072 --cases llama-liger-ckpt,\
cond-sdpa-l512-group8-stacked-compile-graph,cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph,\
cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-graph \
        --target cond-sdpa-l512-group8-stacked-compile-graph
    timeout 200 python workloads/benchmark.py --out $OUT/issue16_stacked_smollm2.json --budget-s 170 --steps 3 \
        --warmup 1 --sizes smollm2-135m --lengths 16384,32768,131072 --cases llama-liger-ckpt,\
cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph,\
cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-graph,cond-sdpa-l512-groupckpt-accumulate-stacked-graph \
        --target cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph
A JSON cut short by `timeout` holds every finished measurement; `--replot FILE` adds its summary and pictures
(`--replot FILE --target cond-sdpa-l512-group8-graph` summarises another case of it).
The fastest configurations against the baseline, with kernel-time profiles:
    python workloads/benchmark.py --out /tmp/fast.json --profile \
        --cases llama-sdpa,cond-sdpa-l512-compile-graph,cond-sdpa-l512-group8-compile-graph --lengths 4096,32768
    python workloads/benchmark.py --out /tmp/1b.json --profile --lengths 16384 \
        --cases llama-1b-sdpa,cond-1b-l512-deferred-compile-graph
CPU smoke run (tiny sizes, seconds; Liger cases are skipped without CUDA):
    python workloads/benchmark.py --smoke --out /tmp/bench.json --generation 80

Training: every configuration runs a full training step (forward, backward, gradient clipping, AdamW step) at each
total length until it runs out of memory; "-graph" cases replay the whole step as one CUDA graph
(condensation.cuda_graph). Peak memory is torch.cuda.max_memory_allocated from after the first step (a graph's
capture included), step time the median of CUDA-synchronised steps after warm-up. Llama baselines: transformers'
sdpa (and flash-attn when importable), with HF gradient checkpointing ("-ckpt"), and with Liger kernels ("-liger":
fused linear cross-entropy, RMSNorm, RoPE, SwiGLU; `pip install -e ".[liger]"`, CUDA only). `--sizes` runs the
chosen cases on each named shape of condensation.sizes (table1, smollm2-135m, llama-3.2-1b, ...), as "case@size".

Generation (`--generation` prompt lengths): prefill + `--new-tokens` greedy tokens, batch 1, through each model's
own `generate`: Condensation with its bounded cache, Llama (sdpa) with transformers' KV cache. Prefill and decode
are timed apart from the moments generate hands the prompt and each new token to a streamer.

Ratios against Llama-sdpa (and against `--baseline`, Llama + Liger + checkpointing by default) are measured in the
same run. Pictures like the paper's Fig. 5-7 are written beside the JSON, and everything is logged to MLflow when
--mlflow-uri is given. `--budget-s` stops starting new measurements once that many seconds have passed, so that a
command under a time limit still ends with its JSON, summary and pictures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import platform as _platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from condensation import CondensationForCausalLM, attention_unavailable_reason
from condensation.flops import matmul_peak_tflops, training_flops
from condensation.sizes import MODEL_SIZES, build_config


@dataclass
class Case:
    name: str
    kind: str  # "llama" or "condensation"
    attention: str
    segment_length: int | None = None
    schedule: str = "wavefront"
    checkpoint_cells: bool = False
    compile_cells: bool | str = False
    checkpoint_group_steps: int | str = 0  # CondensationConfig.checkpoint_group_steps (or "auto")
    max_step_cells: int = 0  # CondensationConfig.max_step_cells (0: a whole diagonal per step)
    checkpoint_budget_cells: int = 0  # CondensationConfig.checkpoint_budget_cells (k > 0: the three above from depth)
    weight_grads: str = "autograd"  # CondensationConfig.weight_grads
    stacked_params: bool = False  # CondensationConfig.stacked_params (layer weights stored stacked)
    loss_chunk_tokens: int = 0  # CondensationConfig.loss_chunk_tokens (0: the model's default, 2048)
    graph: bool = False  # the whole step (forward, backward, AdamW) as one CUDA graph (condensation.cuda_graph)
    liger: bool = False  # Llama only: Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU)
    grad_ckpt: bool = False  # Llama only: transformers' gradient checkpointing (each decoder layer recomputed)
    size: str = "table1"  # condensation.sizes.MODEL_SIZES
    batch: int = 1
    lengths: list[int] = field(default_factory=list)


# the lengths of issue 16's targets (Table I and SmolLM2 shapes, batch 1)
LONG_CONTEXT = [16384, 32768, 65536, 131072]


def default_cases(smoke: bool) -> list[Case]:
    if smoke:
        L = [64, 128, 256]
        return [
            Case("llama-sdpa", "llama", "sdpa", lengths=L),
            Case("llama-sdpa-ckpt", "llama", "sdpa", grad_ckpt=True, lengths=L),
            Case("llama-liger", "llama", "sdpa", liger=True, lengths=L),  # skipped without CUDA
            Case("llama-liger-ckpt", "llama", "sdpa", liger=True, grad_ckpt=True, lengths=L),
            Case("cond-sdpa-l32", "condensation", "sdpa", 32, lengths=L),
            Case("cond-sdpa-l32-seq", "condensation", "sdpa", 32, schedule="sequential", lengths=L),
            Case("cond-sdpa-l32-ckpt", "condensation", "sdpa", 32, checkpoint_cells=True, lengths=L),
            Case("cond-sdpa-l32-graph", "condensation", "sdpa", 32, graph=True, lengths=L),  # eager off CUDA
            Case("cond-sdpa-l32-deferred", "condensation", "sdpa", 32, weight_grads="deferred", lengths=L),
            Case("cond-sdpa-l32-accumulate-stacked", "condensation", "sdpa", 32, weight_grads="accumulate",
                 stacked_params=True, loss_chunk_tokens=16, lengths=L),
        ]
    short = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    long = [4096, 16384, 65536, 262144, 1048576]
    return [
        Case("llama-sdpa", "llama", "sdpa", lengths=short),
        Case("llama-sdpa-graph", "llama", "sdpa", graph=True, lengths=short[2:6]),
        Case("llama-sdpa-b4", "llama", "sdpa", batch=4, lengths=short[:5]),
        Case("llama-eager", "llama", "eager", lengths=short[:4]),
        Case("llama-flash", "llama", "flash_attention_2", lengths=short),
        # the recipes a long-context user runs (issue 16): checkpointing, Liger kernels, both
        Case("llama-sdpa-ckpt", "llama", "sdpa", grad_ckpt=True, lengths=LONG_CONTEXT),
        Case("llama-liger", "llama", "sdpa", liger=True, lengths=LONG_CONTEXT),
        Case("llama-liger-ckpt", "llama", "sdpa", liger=True, grad_ckpt=True, lengths=LONG_CONTEXT),
        Case("llama-liger-flash-ckpt", "llama", "flash_attention_2", liger=True, grad_ckpt=True,
             lengths=LONG_CONTEXT),
        Case("cond-sdpa-l256", "condensation", "sdpa", 256, lengths=short[:6]),
        Case("cond-sdpa-l512", "condensation", "sdpa", 512, lengths=short[:6]),
        Case("cond-sdpa-l512-b4", "condensation", "sdpa", 512, batch=4, lengths=short[:5]),
        Case("cond-sdpa-l256-graph", "condensation", "sdpa", 256, graph=True, lengths=short[:6]),
        Case("cond-sdpa-l512-graph", "condensation", "sdpa", 512, graph=True, lengths=short[:6]),
        Case("cond-sdpa-l512-ckpt-graph", "condensation", "sdpa", 512, checkpoint_cells=True, graph=True,
             lengths=long[:4]),
        Case("cond-sdpa-l512-groupckpt", "condensation", "sdpa", 512, checkpoint_cells=True, checkpoint_group_steps=16,
             lengths=long),
        Case("cond-sdpa-l512-groupckpt-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps=16, graph=True, lengths=long),
        Case("cond-flex-l512", "condensation", "flex", 512, lengths=[4096, 16384]),
        Case("cond-flash-l512", "condensation", "flash", 512, lengths=[4096, 16384]),
        Case("cond-eager-l512", "condensation", "eager", 512, lengths=[4096, 16384]),
        Case("cond-sdpa-l512-seq", "condensation", "sdpa", 512, schedule="sequential", lengths=[4096, 16384]),
        Case("cond-sdpa-l512-compile-graph", "condensation", "sdpa", 512, compile_cells=True, graph=True,
             lengths=short[:6]),
        Case("cond-sdpa-l512-ckpt-compile-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             compile_cells=True, graph=True, lengths=long),
        Case("cond-sdpa-l512-groupckpt-compile-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps=16, compile_cells=True, graph=True, lengths=long),
        # group checkpoints alone: a group's recomputation keeps its activations for its backward, so every cell
        # runs forward twice (as with per-step checkpoints, not three times as nested), and memory holds the group
        # frontiers plus one group's activations
        Case("cond-sdpa-l512-deferred-compile-graph", "condensation", "sdpa", 512, weight_grads="deferred",
             compile_cells=True, graph=True, lengths=short[:6]),
        # the same with the layer weights stored stacked: no copy of them stacked in every forward (7.5 ms a step on
        # the 1B shape in session 13's profile), the deferred gradients added straight into the stacked .grad
        Case("cond-sdpa-l512-deferred-stacked-compile-graph", "condensation", "sdpa", 512, weight_grads="deferred",
             stacked_params=True, compile_cells=True, graph=True, lengths=short[:6]),
        Case("cond-sdpa-l512-group8-compile-graph", "condensation", "sdpa", 512, checkpoint_group_steps=8,
             compile_cells=True, graph=True, lengths=long),
        # the same with the layer weights stored stacked (stacked_params): Table I's fastest case without its per-forward
        # copy of the layer weights and their stacked gradients (CPU: -0.24 GB at 16K, cpu_stacked_params_s9.md)
        Case("cond-sdpa-l512-group8-stacked-compile-graph", "condensation", "sdpa", 512, checkpoint_group_steps=8,
             stacked_params=True, compile_cells=True, graph=True, lengths=long),
        # the same with groups of 4 (a group's recomputed activations, the backward's peak once the fused loss holds one
        # chunk of logits, halved), or with the loss over 512-token chunks, or both with auto groups (6 at 16K on
        # Table I, but 20 at 128K: without per-step checkpoints a group keeps all its cells' activations)
        # (benchmarks/results/cpu_peak_table1_s11.md)
        Case("cond-sdpa-l512-group4-stacked-compile-graph", "condensation", "sdpa", 512, checkpoint_group_steps=4,
             stacked_params=True, compile_cells=True, graph=True, lengths=long),
        Case("cond-sdpa-l512-group8-stacked-chunk512-compile-graph", "condensation", "sdpa", 512,
             checkpoint_group_steps=8, stacked_params=True, loss_chunk_tokens=512, compile_cells=True, graph=True,
             lengths=long),
        Case("cond-sdpa-l512-groupauto-stacked-chunk512-compile-graph", "condensation", "sdpa", 512,
             checkpoint_group_steps="auto", stacked_params=True, loss_chunk_tokens=512, compile_cells=True, graph=True,
             lengths=long),
        # issue 16 on SmolLM2 (benchmarks/results/cpu_peak_smollm2_s12.md): between group4-stacked (2 forwards a cell,
        # 1.82x but 2.64 GiB at 16K: a group's 4 diagonals of up to 30 cells keep all their activations for its
        # backward) and groupauto-accumulate-stacked-chunk512 (1.59 GiB, 3 forwards and piecewise compile, 1.40x).
        # Smaller groups without per-step checkpoints: still 2 forwards, half / three quarters of a group's
        # activations, more group frontiers (one diagonal's outputs each)
        Case("cond-sdpa-l512-group2-stacked-compile-graph", "condensation", "sdpa", 512, checkpoint_group_steps=2,
             stacked_params=True, compile_cells=True, graph=True, lengths=long),
        Case("cond-sdpa-l512-group3-stacked-compile-graph", "condensation", "sdpa", 512, checkpoint_group_steps=3,
             stacked_params=True, compile_cells=True, graph=True, lengths=long),
        # per-step checkpoints inside auto groups (one diagonal's activations at a time, as groupauto-accumulate) with
        # the whole step compiled and autograd's weight gradients (the fast path of group4-stacked): 3 forwards a cell,
        # but each a whole compiled step; the default 2048-token loss chunks, or 512
        Case("cond-sdpa-l512-ckpt-groupauto-stacked-compile-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps="auto", stacked_params=True, compile_cells=True, graph=True, lengths=long),
        Case("cond-sdpa-l512-ckpt-groupauto-stacked-chunk512-compile-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps="auto", stacked_params=True, loss_chunk_tokens=512,
             compile_cells=True, graph=True, lengths=long),
        # the same with diagonals run 10 cells at a time: a third of a 30-cell step's activations at the peak, smaller
        # batched matmuls (with stacked_params a step's weights are views of the stack: no copy)
        Case("cond-sdpa-l512-ckpt-groupauto-cells10-stacked-compile-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps="auto", max_step_cells=10, stacked_params=True,
             compile_cells=True, graph=True, lengths=long),
        # 15 cells at a time: two steps a 30-cell diagonal (fewer, larger matmuls than cells10), half its activations
        Case("cond-sdpa-l512-ckpt-groupauto-cells15-stacked-compile-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps="auto", max_step_cells=15, stacked_params=True,
             compile_cells=True, graph=True, lengths=long),
        # one setting for every depth (checkpoint_budget_cells=12): at most 12 cells' activations held at once in
        # backward. Table I's 4 layers: groups of 3 diagonals, no per-step checkpoints (as group4-stacked, a quarter
        # fewer activations); SmolLM2's 30: per-step checkpoints in auto groups, steps of 10 cells (as
        # ckpt-groupauto-cells10-stacked)
        Case("cond-sdpa-l512-budget12-stacked-compile-graph", "condensation", "sdpa", 512, checkpoint_budget_cells=12,
             stacked_params=True, compile_cells=True, graph=True, lengths=long),
        # groupauto-accumulate-stacked with the default loss chunk (2048 tokens): fewer, larger lm-head GEMMs and a
        # quarter of the float32 lm-head gradient's read-modify-writes, if the loss is not the peak
        Case("cond-sdpa-l512-groupauto-accumulate-stacked-compile-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps="auto", weight_grads="accumulate", stacked_params=True,
             compile_cells=True, graph=True, lengths=long),
        # groups of 4 diagonals: the backward of one group's recomputed cells is the step's peak (tests/test_loss_memory.py's
        # attribution), so halving the group lowers the constant part of the memory; cells still run forward twice
        Case("cond-sdpa-l512-group4-compile-graph", "condensation", "sdpa", 512, checkpoint_group_steps=4,
             compile_cells=True, graph=True, lengths=long),
        # the same without compiled cells: on deep models (SmolLM2's 30 layers) compile_cells compiles one graph per
        # (cells in a diagonal, with or without memory), about 60 forward + backward graphs, minutes on a bare machine
        Case("cond-sdpa-l512-group8-graph", "condensation", "sdpa", 512, checkpoint_group_steps=8, graph=True,
             lengths=long),
        # deep models (SmolLM2's 30 layers) at issue 16's lengths: per-step checkpoints inside groups of 16 diagonals
        # keep one diagonal's activations at a time, not a whole group's (30 cells a diagonal: 0.5 GB each), and
        # weight_grads="accumulate" serves every diagonal views of the one weight stack, where "autograd" stacks a
        # copy of the weights of each partial diagonal and keeps it for that group's backward (up to 212 MB each);
        # cells run forward three times. benchmarks/results/cpu_smollm2_memory_s8.md
        Case("cond-sdpa-l512-groupckpt-accumulate-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps=16, weight_grads="accumulate", graph=True, lengths=long),
        # the same with diagonals run 10 cells at a time: a third of a diagonal's activations (SmolLM2), more launches
        Case("cond-sdpa-l512-groupckpt-accumulate-cells10-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps=16, weight_grads="accumulate", max_step_cells=10, graph=True, lengths=long),
        # the same with the layer weights stored stacked (stacked_params): no per-step copy of the weights, and the
        # weight gradients added into the stacked parameters' own .grad, not a second stacked buffer (2 x 212 MB on
        # SmolLM2; benchmarks/results/cpu_stacked_params_s9.md)
        Case("cond-sdpa-l512-groupckpt-accumulate-stacked-graph", "condensation", "sdpa", 512, checkpoint_cells=True,
             checkpoint_group_steps=16, weight_grads="accumulate", stacked_params=True, graph=True, lengths=long),
        Case("cond-sdpa-l512-groupckpt-accumulate-cells10-stacked-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps=16, weight_grads="accumulate", max_step_cells=10,
             stacked_params=True, graph=True, lengths=long),
        # the same with the fused loss over 512 tokens at a time: once the model's own activations are this small the
        # loss's bf16 [chunk, V] logits are the peak (2048 x 128256 x 2 B = 525 MB on Table I, 201 MB on SmolLM2;
        # Liger's fused loss takes ~128-256 tokens at a time on these shapes). Same sums; more, smaller lm-head GEMMs
        Case("cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps=16, weight_grads="accumulate", stacked_params=True,
             loss_chunk_tokens=512, graph=True, lengths=long),
        # and with compiled elementwise pieces (norms, RoPE, SwiGLU: with weight_grads="accumulate" only these compile,
        # shapes dynamic, ~9 graphs, not one per diagonal size): on SmolLM2's 576-wide cells they move as many bytes
        # as the small GEMMs
        Case("cond-sdpa-l512-groupckpt-accumulate-stacked-chunk512-compile-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps=16, weight_grads="accumulate", stacked_params=True,
             loss_chunk_tokens=512, compile_cells=True, graph=True, lengths=long),
        # the same with checkpoint_group_steps="auto" (the group size holding the fewest cell outputs in backward: 5 at 16K,
        # 8 at 32K, 14 at 128K on SmolLM2), not 16: the same cells computed, fewer diagonal outputs held while a group
        # is recomputed (benchmarks/results/cpu_peak_smollm2_s10.md)
        Case("cond-sdpa-l512-groupauto-accumulate-stacked-chunk512-compile-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps="auto", weight_grads="accumulate", stacked_params=True,
             loss_chunk_tokens=512, compile_cells=True, graph=True, lengths=long),
        Case("cond-sdpa-l512-groupckpt-accumulate-cells10-stacked-chunk512-graph", "condensation", "sdpa", 512,
             checkpoint_cells=True, checkpoint_group_steps=16, weight_grads="accumulate", max_step_cells=10,
             stacked_params=True, loss_chunk_tokens=512, graph=True, lengths=long),
        # a Llama-3.2-1B-shaped model (random weights): model FLOP utilisation at 16K
        Case("llama-1b-sdpa", "llama", "sdpa", size="llama-3.2-1b", lengths=[4096, 16384]),
        Case("llama-1b-liger", "llama", "sdpa", liger=True, size="llama-3.2-1b", lengths=[4096, 16384]),
        Case("llama-1b-liger-ckpt", "llama", "sdpa", liger=True, grad_ckpt=True, size="llama-3.2-1b",
             lengths=[4096, 16384]),
        Case("cond-1b-l512", "condensation", "sdpa", 512, size="llama-3.2-1b", lengths=[4096, 16384]),
        Case("cond-1b-l512-graph", "condensation", "sdpa", 512, size="llama-3.2-1b", graph=True,
             lengths=[4096, 16384]),
        Case("cond-1b-l512-compile-graph", "condensation", "sdpa", 512, size="llama-3.2-1b", compile_cells=True,
             graph=True, lengths=[4096, 16384]),
        # weight gradients as one GEMM per layer over all tokens (K = L), or accumulated by baddbmm
        Case("cond-1b-l512-deferred-graph", "condensation", "sdpa", 512, size="llama-3.2-1b", weight_grads="deferred",
             graph=True, lengths=[4096, 16384]),
        Case("cond-1b-l512-deferred-compile-graph", "condensation", "sdpa", 512, size="llama-3.2-1b",
             weight_grads="deferred", compile_cells=True, graph=True, lengths=[4096, 16384]),
        Case("cond-1b-l512-accumulate-graph", "condensation", "sdpa", 512, size="llama-3.2-1b",
             weight_grads="accumulate", graph=True, lengths=[4096, 16384]),
        Case("cond-1b-l512-ckpt-compile-graph", "condensation", "sdpa", 512, size="llama-3.2-1b",
             checkpoint_cells=True, compile_cells=True, graph=True, lengths=[16384, 65536]),
    ]


def select_cases(cases: list[Case], wanted: list[str], sizes: list[str]) -> list[Case]:
    """The cases to run, in the order asked for (all when none is named), each once per size when sizes are given
    ("llama-liger-ckpt@smollm2-135m"): a case's own size otherwise."""
    by_name = {c.name: c for c in cases}
    chosen = [by_name[n] for n in wanted] if wanted else cases
    if not sizes:
        return chosen
    return [dataclasses.replace(c, name=f"{c.name}@{s}", size=s) for s in sizes for c in chosen]


def base_name(name: str) -> str:
    return name.split("@")[0]


# ----------------------------------------------------------------------------------------------------------------
# Models


def liger_unavailable_reason(device) -> str | None:
    """Why the Liger-kernel baselines cannot run here, or None. Its kernels are Triton: CUDA only."""
    if torch.device(device).type != "cuda":
        return "liger-kernel needs a CUDA GPU (Triton kernels): skipped on this machine"
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
    except Exception as e:  # ImportError, or triton failing to find a driver
        return f"liger-kernel is not importable ({type(e).__name__}: {e}); pip install -e '.[liger]'"
    return None


def case_unavailable_reason(case: Case, device) -> str | None:
    if case.kind == "condensation":
        return attention_unavailable_reason(case.attention, device, backward=True)
    if case.attention == "flash_attention_2":
        reason = attention_unavailable_reason("flash", device)
        if reason:
            return reason
    return liger_unavailable_reason(device) if case.liger else None


def llama_config(cfg, attention: str):
    """transformers' LlamaConfig of the same shape as a CondensationConfig."""
    from transformers import LlamaConfig

    llama_cfg = LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k in LlamaConfig().to_dict()})
    llama_cfg._attn_implementation = attention
    return llama_cfg


@contextlib.contextmanager
def llama_module_restored():
    """Undo what Liger patches module-wide: with `model=` it rebinds modeling_llama.apply_rotary_pos_emb for the
    whole process (the instance's norms, MLPs and forward are patched in place). Later Llama cases of the same run
    must measure transformers' own code."""
    from transformers.models.llama import modeling_llama as ml

    saved = (ml.apply_rotary_pos_emb, ml.LlamaRMSNorm, ml.LlamaMLP, ml.LlamaForCausalLM.forward)
    try:
        yield
    finally:
        ml.apply_rotary_pos_emb, ml.LlamaRMSNorm, ml.LlamaMLP, ml.LlamaForCausalLM.forward = saved


def build_model(case: Case, smoke: bool, device, dtype):
    size = "debug" if smoke else case.size
    cfg = build_config(size, segment_length=case.segment_length or 256, segment_attention=case.attention
                       if case.kind == "condensation" else "sdpa", segment_schedule=case.schedule,
                       checkpoint_cells=case.checkpoint_cells, compile_cells=case.compile_cells,
                       checkpoint_group_steps=case.checkpoint_group_steps, weight_grads=case.weight_grads,
                       max_step_cells=case.max_step_cells,
                       checkpoint_budget_cells=case.checkpoint_budget_cells, stacked_params=case.stacked_params,
                       **({"loss_chunk_tokens": case.loss_chunk_tokens} if case.loss_chunk_tokens else {}))
    # built on the device itself: random init of a 1B model on the host takes longer than its measurement
    with torch.device(device):
        if case.kind == "llama":
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(llama_config(cfg, case.attention))
        else:
            model = CondensationForCausalLM(cfg)
    model = model.to(dtype=dtype).train()  # HF checkpointing and Liger's fused loss act in training mode only
    if case.grad_ckpt:  # transformers >= 5.24 renamed it (the GPU image has 5.17)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    return model


def flops_per_step(model, case: Case, L: int) -> float:
    return training_flops(model.config, L, case.batch, None if case.kind == "llama" else case.segment_length)


# ----------------------------------------------------------------------------------------------------------------
# Training step


def train_step(model, opt, ids, case):
    if case.kind == "llama":
        # no KV cache in training (transformers would keep one per layer); Liger's loss never builds [L, V] logits
        extra = {"skip_logits": True} if case.liger else {}
        loss = model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
    else:
        loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)  # as training does; no host sync
    opt.step()
    return loss


def make_runner(case: Case, model, device):
    """A callable running one training step on {"input_ids": ids}; eager, or replaying a captured CUDA graph."""
    graph = case.graph and device.type == "cuda"
    # fused on a GPU, as training does (train/engines.py): with capturable=True, foreach AdamW divides every
    # parameter by its own bias-correction tensor in a broadcast kernel of its own (10 ms a step on the 1B shape)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda, foreach=not cuda, capturable=graph)

    def step(batch):
        return train_step(model, opt, batch["input_ids"], case)

    if graph:
        from condensation.cuda_graph import CUDAGraphStep

        return CUDAGraphStep(step, opt, warmup=1)

    def eager(batch):
        opt.zero_grad(set_to_none=True)
        return step(batch)

    return eager


def free_device_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(case: Case, L: int, smoke: bool, device, dtype, steps: int, warmup: int, profile: bool = False,
            min_measure_s: float = 0.0, trace: Path | None = None) -> dict:
    cuda = device.type == "cuda"
    model = run = batch = None
    t_case = time.perf_counter()
    try:
        with llama_module_restored():
            model = build_model(case, smoke, device, dtype)
            run = make_runner(case, model, device)
            batch = {"input_ids": torch.randint(0, model.config.vocab_size, (case.batch, L), device=device)}
            n_steps = 2 if L >= 262144 else steps
            # peak memory counts from after the first (eager) step: optimizer state exists, and a graphed case's
            # capture, which allocates every activation of the step in the graph's pool, falls inside the window
            t0 = time.perf_counter()
            loss = run(batch)
            first_loss = float(loss.detach())  # waits for the step: first_step_s includes any compilation
            first_step_s = time.perf_counter() - t0
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(max(warmup - 1, 1 if case.graph else 0)):  # a graphed case captures on its second call
                loss = run(batch)
            if cuda:
                torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
            times = []
            # at least n_steps, and more while they add up to less than min_measure_s: a median of three 0.1 s steps
            # moved a 16K baseline by 20% between runs of the same command
            while len(times) < n_steps or (sum(times) < min_measure_s and len(times) < 50 * n_steps):
                t0 = time.perf_counter()
                loss = run(batch)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            out = {"status": "ok", "step_s": step, "tokens_per_s": case.batch * L / step, "first_loss": first_loss,
                   "loss": float(loss.detach()), "first_step_s": first_step_s, "warmup_s": warmup_s,
                   "steps": len(times), "step_s_min": min(times), "step_s_max": max(times)}
            out["flops"] = flops_per_step(model, case, L)
            if cuda:
                out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                out["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if profile:
                out["profile"] = profile_step(run, batch, trace)
    except torch.OutOfMemoryError:
        out = {"status": "oom", "error": "out of memory"}
    except RuntimeError as e:  # e.g. a capture that failed: recorded, and the remaining cases still run
        out = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        del model, run, batch
        free_device_memory(device)
    out["wall_s"] = time.perf_counter() - t_case  # build, compilation and every step: for planning time limits
    return out


# kernel families by name, first match wins: where a step's device time goes beyond its GEMMs
KERNEL_KINDS = (("attention", r"flash|fmha|sdpa|attention"), ("gemm", r"nvjet|gemm|cutlass|xmma|sm90_|sm80_"),
                ("optimizer", r"multi_tensor|adam"), ("copy / cat", r"copy|Cat|memcpy|memset|fill"),
                ("triton (compiled)", r"^triton_"), ("reduce", r"reduce|norm|softmax|sum"),
                ("elementwise", r"elementwise|Functor"))


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.I)), "other")


def profile_step(run, batch, trace: Path | None = None) -> dict:
    """GPU kernel time inside one step against its wall time, by kernel family, and the kernels that take the most;
    with `trace`, the step's Chrome trace (gzipped) for a closer look (chrome://tracing, Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run(batch)
        sync()
        wall = time.perf_counter() - t0
    # device events, less the annotations of host ranges (Optimizer.step#AdamW.step spans its kernels: counted twice)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)
               and not e.name.startswith("Optimizer.")]
    by_name: dict[str, list] = {}
    for e in kernels:
        acc = by_name.setdefault(e.name, [0.0, 0])
        acc[0] += e.device_time
        acc[1] += 1
    kinds: dict[str, float] = {}
    for name, (us, _) in by_name.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))  # a .gz path: the profiler gzips it
    return {"wall_ms": wall * 1e3, "kernel_ms": sum(us for us, _ in by_name.values()) / 1e3, "kernels": len(kernels),
            "by_kind_ms": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [(name[:120], round(us / 1e3, 3), n) for name, (us, n) in top]}


# ----------------------------------------------------------------------------------------------------------------
# Generation: prefill + decode through each model's own generate, batch 1, greedy


GENERATION_MODELS = ("llama-sdpa", "condensation")


class TokenClock(BaseStreamer):
    """A streamer that stamps the time of everything generate hands it: the prompt once, before prefill, then each
    new token as soon as it is chosen. A token reaches the host by a device-to-host copy, which waits for the
    device, so each stamp is a synchronised time."""

    def __init__(self):
        self.stamps: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > 1:  # the first call is the prompt
            self.tokens.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def generate_timed(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, dict]:
    """Greedy `new_tokens` tokens after ids [1, P] with the model's own generate and cache. Returns the new tokens
    [1, n] and the prefill / decode times (prefill: prompt to first token; decode: the remaining n - 1 tokens)."""
    clock = TokenClock()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                         streamer=clock)
    new = out[:, ids.shape[1]:]
    n = len(clock.stamps) - 1
    prefill_s = clock.stamps[1] - clock.stamps[0]
    decode_s = clock.stamps[-1] - clock.stamps[1]
    timing = {"new_tokens": n, "prefill_s": prefill_s, "prefill_tokens_per_s": ids.shape[1] / prefill_s,
              "decode_tokens": n - 1, "decode_s": decode_s,
              "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
              "total_s": clock.stamps[-1] - clock.stamps[0]}
    if clock.tokens != new[0].tolist():  # the stamps must be the tokens generate returned
        raise RuntimeError(f"streamed {len(clock.tokens)} tokens, generate returned {new.shape[1]}")
    return new, timing


def build_generation_model(model: str, size: str, segment_length: int, device, dtype):
    cfg = build_config(size, segment_length=segment_length)
    with torch.device(device):
        if model == "condensation":
            m = CondensationForCausalLM(cfg)
        else:
            from transformers import LlamaForCausalLM

            m = LlamaForCausalLM(llama_config(cfg, "sdpa"))
    return m.to(dtype=dtype).eval()


@torch.no_grad()
def measure_generation(model_name: str, size: str, prompt_len: int, new_tokens: int, segment_length: int,
                       device, dtype) -> dict:
    """Prefill a random prompt of prompt_len tokens, then decode new_tokens greedily; tokens/s of each phase and the
    peak memory of the whole generate (weights included; state_gib = peak - weights)."""
    cuda = device.type == "cuda"
    row = {"model": model_name, "size": size, "prompt_tokens": prompt_len, "requested_new_tokens": new_tokens}
    if model_name == "condensation":
        row["segment_length"] = segment_length
    model = ids = None
    t_case = time.perf_counter()
    try:
        model = build_generation_model(model_name, size, segment_length, device, dtype)
        ids = torch.randint(1, model.config.vocab_size, (1, prompt_len), device=device)  # no pad id (0)
        # a short generate first, so that one-time costs (lazy initialisation, the first kernels of each shape
        # family) fall outside the timed prefill of the first model measured
        generate_timed(model, ids[:, : 2 * segment_length + 1], 2)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            weights = torch.cuda.memory_allocated()
        _, timing = generate_timed(model, ids, new_tokens)
        row.update(status="ok", **timing)
        row["tokens_per_s"] = (prompt_len + timing["new_tokens"]) / timing["total_s"]
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_gib=peak / 2**30, weights_gib=weights / 2**30, state_gib=(peak - weights) / 2**30)
    except torch.OutOfMemoryError:
        row.update(status="oom", error="out of memory")
    except RuntimeError as e:
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        del model, ids
        free_device_memory(device)
    row["wall_s"] = time.perf_counter() - t_case
    return row


# ----------------------------------------------------------------------------------------------------------------
# Ratios, issue 16's targets, pictures


def ratios_against_llama(results: dict) -> None:
    """Add speed and memory ratios against Llama-sdpa at the same length and batch (measured in the same run)."""
    configs = results["case_configs"]

    def baseline(cfg):  # the plain (eager, not graphed, no Liger, no checkpoints) Llama-sdpa of the same size, batch
        for name, c in configs.items():
            if (c["kind"], c["attention"], c.get("graph", False), c.get("liger", False),
                    c.get("grad_ckpt", False)) == ("llama", "sdpa", False, False, False) and \
                    c.get("size", "table1") == cfg.get("size", "table1") and c["batch"] == cfg["batch"]:
                return name
        return None

    for name, rows in results["cases"].items():
        base_name_ = baseline(configs.get(name, {"batch": 1}))
        if base_name_ in (None, name) or "skipped" in rows:
            continue
        base = results["cases"][base_name_]
        for L, r in rows.items():
            b = base.get(L)
            if r.get("status") == "ok" and b and b.get("status") == "ok":
                r["baseline"] = base_name_
                r["speed_vs_llama_sdpa"] = r["tokens_per_s"] / b["tokens_per_s"]
                if "peak_gib" in r:
                    r["llama_sdpa_memory_ratio"] = b["peak_gib"] / r["peak_gib"]


# Issue 16 (H200, batch 1, each ratio against a baseline of the same run, one Condensation configuration)
TARGETS = {
    "memory_ratio_max": 1.0,  # Table I / SmolLM2, 16K..128K: peak memory at most Llama + Liger + checkpointing's
    "speed_ratio_min": 1.5,  # ... and tokens/s at least 1.5x its
    "speed_ratio_min_128k": 5.0,  # ... at 128K at least 5x
    "mfu_min_1b": 0.55,  # Llama-3.2-1B shape at 16K: model FLOP utilisation, and ahead of Llama-1B + Liger
    "decode_speed_ratio_min": 1.0,  # generation at a 128K prompt: decode tokens/s at least Llama's
    "generation_memory_ratio_max": 0.1,  # ... with at most 1/10 of its memory
}


def _ok(r) -> bool:
    return isinstance(r, dict) and r.get("status") == "ok"


def summarize(results: dict, target: str, baseline: str) -> dict:
    """The chosen Condensation case against the baseline case of the same size at every length, against every
    Llama case of that size (speed), and generation's Condensation against Llama; with issue 16's targets."""
    configs, cases = results["case_configs"], results["cases"]
    summary = {"target": target, "baseline": baseline, "targets": TARGETS, "training": {}, "generation": {}}
    for name, cfg in configs.items():
        if base_name(name) != target:
            continue
        size, batch = cfg.get("size", "table1"), cfg["batch"]
        same = {n: c for n, c in configs.items() if c.get("size", "table1") == size and c["batch"] == batch}
        base = next((n for n in same if base_name(n) == baseline), None)
        llamas = [n for n, c in same.items() if c["kind"] == "llama"]
        rows = {}
        for L, r in cases.get(name, {}).items():
            b = cases.get(base, {}).get(L) if base else None
            row = {"target_status": r.get("status"), "baseline_status": b.get("status") if b else "not measured"}
            if _ok(r):
                row.update(target_tokens_per_s=r["tokens_per_s"], target_peak_gib=r.get("peak_gib"),
                           target_mfu=r.get("mfu"))
                row["speed_vs"] = {n: r["tokens_per_s"] / cases[n][L]["tokens_per_s"] for n in llamas
                                   if _ok(cases.get(n, {}).get(L))}
            if _ok(b):
                row.update(baseline_tokens_per_s=b["tokens_per_s"], baseline_peak_gib=b.get("peak_gib"))
            if _ok(r) and _ok(b):
                row["speed_ratio"] = r["tokens_per_s"] / b["tokens_per_s"]
                if r.get("peak_gib") and b.get("peak_gib"):
                    row["memory_ratio"] = r["peak_gib"] / b["peak_gib"]  # at most 1.0 meets the target
            row["met"] = _training_target_met(size, int(L), row)
            rows[L] = row
        summary["training"][f"{size}:b{batch}" if batch != 1 else size] = rows
    # (older JSONs hold Condensation-only generation rows without a "model")
    by_key = {(g["model"], g["size"], g["prompt_tokens"]): g for g in results.get("generation", []) if "model" in g}
    for (model, size, P), g in by_key.items():
        if model != "condensation":
            continue
        ll = by_key.get(("llama-sdpa", size, P))
        row = {"condensation_status": g.get("status"), "llama_status": ll.get("status") if ll else "not measured"}
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_gib"):
            row[f"condensation_{key}"] = g.get(key)
            row[f"llama_{key}"] = ll.get(key) if ll else None
        if _ok(g) and _ok(ll):
            if g.get("decode_tokens_per_s") and ll.get("decode_tokens_per_s"):
                row["decode_speed_ratio"] = g["decode_tokens_per_s"] / ll["decode_tokens_per_s"]
            row["prefill_speed_ratio"] = g["prefill_tokens_per_s"] / ll["prefill_tokens_per_s"]
            if g.get("peak_gib") and ll.get("peak_gib"):
                row["memory_ratio"] = g["peak_gib"] / ll["peak_gib"]
        if P >= 131072:  # the target is stated at a 128K prompt
            row["met"] = ("decode_speed_ratio" in row and "memory_ratio" in row
                          and row["decode_speed_ratio"] >= TARGETS["decode_speed_ratio_min"]
                          and row["memory_ratio"] <= TARGETS["generation_memory_ratio_max"])
        summary["generation"].setdefault(size, {})[str(P)] = row
    return summary


def _training_target_met(size: str, L: int, row: dict) -> bool | None:
    """Issue 16's training target for this shape and length; None where the issue sets none."""
    if size == "llama-3.2-1b":
        if L != 16384:
            return None
        liger = [v for n, v in row.get("speed_vs", {}).items() if "liger" in n]
        return (row.get("target_mfu") is not None and row["target_mfu"] >= TARGETS["mfu_min_1b"]
                and bool(liger) and min(liger) > 1.0)
    if size not in ("table1", "smollm2-135m") or not 16384 <= L <= 131072:
        return None
    if "speed_ratio" not in row or "memory_ratio" not in row:
        return False
    need = TARGETS["speed_ratio_min_128k"] if L >= 131072 else TARGETS["speed_ratio_min"]
    return row["memory_ratio"] <= TARGETS["memory_ratio_max"] and row["speed_ratio"] >= need


def _tokens(n) -> str:
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def summary_lines(summary: dict) -> list[str]:
    """The summary as a few readable lines (printed at the end of a run)."""
    fmt = lambda x, f="{:.2f}": "-" if x is None else f.format(x)  # noqa: E731
    lines = [f"issue 16: {summary['target']} against {summary['baseline']} (same run; memory ratio <= 1.0, "
             f"speed >= 1.5x, >= 5x at 128K; 1B: MFU >= 55% and faster than Llama + Liger)"]
    for size, rows in summary["training"].items():
        lines.append(f"  {size}:  length | tokens/s target / baseline = ratio | peak GiB target / baseline = ratio "
                     f"| MFU | met")
        for L, r in sorted(rows.items(), key=lambda kv: int(kv[0])):
            if r.get("target_status") != "ok" or r.get("baseline_status") != "ok":
                lines.append(f"    {_tokens(L)}  target {r['target_status']}, baseline {r['baseline_status']}"
                             f"  met={r['met']}")
                continue
            lines.append(
                f"    {_tokens(L)}  {fmt(r['target_tokens_per_s'], '{:,.0f}')} / "
                f"{fmt(r['baseline_tokens_per_s'], '{:,.0f}')} = {fmt(r['speed_ratio'])}x | "
                f"{fmt(r['target_peak_gib'])} / {fmt(r['baseline_peak_gib'])} = {fmt(r.get('memory_ratio'))} | "
                f"{fmt(r['target_mfu'], '{:.1%}')} | {r['met']}")
    for size, rows in summary["generation"].items():
        lines.append(f"  generation {size}: prompt | decode tok/s Condensation / Llama = ratio | peak GiB = ratio "
                     f"| prefill tok/s | met")
        for P, r in sorted(rows.items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"    {_tokens(P)}  {fmt(r['condensation_decode_tokens_per_s'], '{:,.1f}')} / "
                f"{fmt(r['llama_decode_tokens_per_s'], '{:,.1f}')} = {fmt(r.get('decode_speed_ratio'))}x | "
                f"{fmt(r['condensation_peak_gib'])} / {fmt(r['llama_peak_gib'])} = {fmt(r.get('memory_ratio'), '{:.3f}')}"
                f" | {fmt(r['condensation_prefill_tokens_per_s'], '{:,.0f}')} / "
                f"{fmt(r['llama_prefill_tokens_per_s'], '{:,.0f}')} | {r.get('met')}"
                + ("" if r["condensation_status"] == r["llama_status"] == "ok"
                   else f"  ({r['condensation_status']}, llama {r['llama_status']})"))
    return lines


def plot(results: dict, path_prefix: Path) -> list[Path]:
    """Speed and memory against length, one panel per model size; generation's prefill / decode speed and memory
    against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results.get("case_configs", {})
    sizes = sorted({c.get("size", "table1") for c in configs.values()}) or ["table1"]
    paths = []
    for metric, label, fname in (("peak_gib", "peak memory (GiB)", "memory"), ("tokens_per_s", "tokens / s", "speed")):
        if not any(isinstance(r, dict) and metric in r for rows in results["cases"].values() for r in rows.values()):
            continue  # no memory off CUDA
        fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 4.5), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            for name, rows in results["cases"].items():
                if configs.get(name, {}).get("size", "table1") != size:
                    continue
                pts = [(int(L), r[metric]) for L, r in rows.items() if _ok(r) and metric in r]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    llama = name.startswith("llama")
                    ax.plot(xs, ys, marker="s" if llama else "o", label=base_name(name), linestyle="--" if llama else "-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("total sequence length (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"{label}, {size}: Condensation vs Llama ({results['machine']['device']})", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = path_prefix.with_name(f"{path_prefix.stem}_{fname}.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    gen = [g for g in results.get("generation", []) if _ok(g) and "model" in g]
    if gen:
        panels = [("prefill_tokens_per_s", "prefill tokens / s"), ("decode_tokens_per_s", "decode tokens / s")]
        if any("peak_gib" in g for g in gen):
            panels.append(("peak_gib", "peak memory (GiB)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for model, size in sorted({(g["model"], g["size"]) for g in gen}):
                pts = sorted((g["prompt_tokens"], g[key]) for g in gen
                             if (g["model"], g["size"]) == (model, size) and g.get(key) is not None)
                if pts:
                    xs, ys = zip(*pts)
                    llama = model.startswith("llama")
                    ax.plot(xs, ys, marker="s" if llama else "o", linestyle="--" if llama else "-",
                            label=f"{model} ({size})")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"generation, batch 1, greedy ({results['machine']['device']})", fontsize=10)
        fig.tight_layout()
        p = path_prefix.with_name(f"{path_prefix.stem}_generation.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The run


def machine_info(device, dtype, argv: list[str]) -> dict:
    import transformers

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else _platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": _platform.python_version(), "dtype": str(dtype), "cuda": torch.version.cuda,
            "liger_kernel": version("liger-kernel"), "triton": version("triton"), "flash_attn": version("flash-attn"),
            "command": " ".join(["workloads/benchmark.py", *argv])}
    if device.type == "cuda":
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def log_to_mlflow(uri: str, results: dict, out: Path, pictures: list[Path]) -> None:
    import mlflow

    def metric(*parts):  # MLflow names take no "@": case@size is logged as case:size
        return "/".join(parts).replace("@", ":")

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("benchmark")
    with mlflow.start_run(run_name=out.stem):
        mlflow.log_params({k: v for k, v in results["machine"].items() if k != "command"})
        for name, rows in results["cases"].items():
            for L, r in rows.items():
                if _ok(r):
                    mlflow.log_metric(metric(name, "tokens_per_s"), r["tokens_per_s"], step=int(L))
                    if "peak_gib" in r:
                        mlflow.log_metric(metric(name, "peak_gib"), r["peak_gib"], step=int(L))
        for size, rows in results["summary"]["training"].items():
            for L, r in rows.items():
                for key in ("speed_ratio", "memory_ratio"):
                    if key in r:
                        mlflow.log_metric(metric("issue16", size, key), r[key], step=int(L))
        for g in results["generation"]:
            if _ok(g):
                for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_gib"):
                    if g.get(key) is not None:
                        mlflow.log_metric(metric("generation", f"{g['model']}@{g['size']}", key), g[key],
                                          step=g["prompt_tokens"])
        mlflow.log_artifact(str(out))
        for p in pictures:
            mlflow.log_artifact(str(p))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    ap.add_argument("--out", default="benchmarks/results/benchmark.json")
    ap.add_argument("--cases", default="", help="comma-separated case names to run, in this order (default all)")
    ap.add_argument("--sizes", default="", help="comma-separated model sizes (condensation.sizes); every chosen "
                    "case runs on each, named case@size (default: each case's own size)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-measure-s", type=float, default=1.0, help="measured steps continue past --steps until "
                    "they add up to this many seconds (at most 50x --steps; not in --smoke)")
    ap.add_argument("--generation", default="", help="comma-separated prompt lengths for prefill + generate")
    ap.add_argument("--generation-sizes", default="table1", help="model sizes of the generation benchmark")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated after each prompt (256; 16 smoke)")
    ap.add_argument("--generation-segment", type=int, default=None, help="Condensation's segment length in "
                    "generation (512; 32 smoke)")
    ap.add_argument("--target", default="cond-sdpa-l512-group8-compile-graph",
                    help="the Condensation case the summary holds against --baseline")
    ap.add_argument("--baseline", default="llama-liger-ckpt", help="the Llama case of the summary's ratios")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no measurement after this many seconds (recorded as skipped); the run still ends "
                    "with its JSON, summary and pictures")
    ap.add_argument("--mlflow-uri", default=None)
    ap.add_argument("--lengths", default="", help="comma-separated lengths overriding every case's own")
    ap.add_argument("--profile", action="store_true", help="add one step's GPU kernel time, by kernel family and its top kernels, and "
                    "write its Chrome trace beside --out (<out>_<case>_<L>.trace.json.gz)")
    ap.add_argument("--replot", default=None, help="only redraw pictures (and ratios) from an existing JSON")
    args = ap.parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        ratios_against_llama(results)
        results["summary"] = summarize(results, args.target, args.baseline)
        Path(args.replot).write_text(json.dumps(results, indent=1))
        print("\n".join(summary_lines(results["summary"])))
        return plot(results, Path(args.replot))

    t_start = time.monotonic()
    known = [c.name for c in default_cases(args.smoke)]
    wanted = list(dict.fromkeys(filter(None, args.cases.split(","))))
    unknown = [n for n in wanted if n not in known]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; known: {known}")
    sizes = list(dict.fromkeys(filter(None, args.sizes.split(","))))
    gen_sizes = ["debug"] if args.smoke else list(dict.fromkeys(filter(None, args.generation_sizes.split(","))))
    bad = [s for s in sizes + gen_sizes if s not in MODEL_SIZES]
    if bad:
        ap.error(f"unknown model sizes {bad}; known: {sorted(MODEL_SIZES)}")
    if args.smoke and sizes:
        ap.error("--smoke runs the tiny debug size only; leave out --sizes")
    new_tokens = args.new_tokens or (16 if args.smoke else 256)
    gen_segment = args.generation_segment or (32 if args.smoke else 512)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {
        "machine": machine_info(device, dtype, sys.argv[1:] if argv is None else list(argv)),
        "model": "debug" if args.smoke else "table1 (cases may name another size)",
        "matmul_peak_tflops": matmul_peak_tflops(device, dtype),
        "cases": {}, "case_configs": {}, "generation": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def out_of_time() -> bool:
        return args.budget_s is not None and time.monotonic() - t_start > args.budget_s

    for case in select_cases(default_cases(args.smoke), wanted, sizes):
        reason = case_unavailable_reason(case, device)
        if reason:
            results["cases"][case.name] = {"skipped": reason}
            print(json.dumps({"case": case.name, "skipped": reason}), flush=True)
            continue
        results["case_configs"][case.name] = asdict(case)
        rows = results["cases"].setdefault(case.name, {})
        lengths = [int(x) for x in args.lengths.split(",") if x] or case.lengths
        for L in lengths:
            if out_of_time():
                r = {"status": "skipped", "error": f"time budget of {args.budget_s:.0f} s spent"}
            else:
                r = measure(case, L, args.smoke, device, dtype, args.steps, args.warmup, args.profile,
                            0.0 if args.smoke else args.min_measure_s,
                            out.with_name(f"{out.stem}_{case.name}_{L}.trace.json.gz") if args.profile else None)
            if r["status"] == "ok" and results["matmul_peak_tflops"]:
                r["mfu"] = r["flops"] / r["step_s"] / 1e12 / results["matmul_peak_tflops"]
            rows[str(L)] = r
            print(json.dumps({"case": case.name, "L": L, **r}), flush=True)
            out.write_text(json.dumps(results, indent=1))  # a crash or timeout later keeps what was measured
            if r["status"] != "ok":
                break
    ratios_against_llama(results)
    for size in gen_sizes:
        for p in filter(None, args.generation.split(",")):
            for model in GENERATION_MODELS:
                if out_of_time():
                    g = {"model": model, "size": size, "prompt_tokens": int(p), "status": "skipped",
                         "error": f"time budget of {args.budget_s:.0f} s spent"}
                else:
                    g = measure_generation(model, size, int(p), new_tokens, gen_segment, device, dtype)
                results["generation"].append(g)
                print(json.dumps({"generation": g}), flush=True)
                out.write_text(json.dumps(results, indent=1))

    results["summary"] = summarize(results, args.target, args.baseline)
    results["wall_s"] = time.monotonic() - t_start
    out.write_text(json.dumps(results, indent=1))
    pictures = plot(results, out)
    print("\n".join(summary_lines(results["summary"])))
    print(f"wrote {out} and {', '.join(map(str, pictures))} in {results['wall_s']:.0f} s")
    if args.mlflow_uri:
        log_to_mlflow(args.mlflow_uri, results, out, pictures)
    return results


if __name__ == "__main__":
    main()
