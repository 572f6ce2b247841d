"""Folded Context Condensation: a Llama whose every layer also attends to its own output for the previous segment.

Read top to bottom: the config, the attention functions (eager reference beside sdpa / flex / flash), the
(segment, layer) cell, the schedules over cells (sequential as in the paper, and the wavefront), the bounded
generation cache, the loss (eq. 17), and the HF model classes. The rules referenced below are those of
docs/model.md (Rules 1-10). How it is made fast to train (stacked weights and their sinks, the fused chunked loss,
the embedding sink of group checkpoints, torch.compile of the cells) lives beside it in fast_train.py; none of it
changes what is computed.

Shapes: B batch, L tokens, l segment length, c tokens of a chunk (<= l), d hidden, H query heads, Hkv key/value
heads, D head dim, k cells processed together (one per layer on a wavefront diagonal), V vocab.

Positions (Rule 6): the memory always sits at [0, l) and the current segment at [l, l + c). RoPE scores depend
only on i - j, so this gives exactly the attention of the paper's global positions with one small RoPE table.

Two options beyond the paper, off by default (docs/model.md, "Options beyond the paper"): `memory_sink_tokens=k`
prefixes every memory from segment 2 on with the layer's outputs for the sequence's first k tokens (an attention
sink) at positions [-k, 0), right before the memory (which stays at [0, l), the current segment at [l, l + c));
`memory_norm="separate"` normalises the memory with its own RMSNorm weight per layer (`memory_layernorm`).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, LlamaConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding

# the training-speed machinery (stacked weights, weight and embedding sinks, the fused loss, compiled cells):
# fast_train.py
from .fast_train import (
    EmbeddingSink,
    LayerWeights,
    NormLinearCrossEntropy,
    SlicedWeight,  # noqa: F401  (re-exported)
    StackedLayers,
    WeightSink,  # noqa: F401  (re-exported)
    deferred_stacking,
    stack_layer_parameters,
    _at_least_fp32,
    _GradFromEmbeddingSink,
    _linear,
    norm_of_stack,
    swiglu_linear,
    _SinkEmbedding,
    compiled_pointwise,
    compiled_step,
)

# ----------------------------------------------------------------------------------------------------------------
# Config


@strict
class CondensationConfig(LlamaConfig):
    r"""A `LlamaConfig` plus the segment recurrence. Every Llama checkpoint's config loads into it unchanged.

    segment_length: tokens per segment `l`; memory and attention span are bounded by it.
    memory_grad_segments: if set to k, the gradient through the memory is cut every k segments (the memory
        entering segment s is detached when s % k == 0). None (default) backpropagates through all segments,
        as the paper trains.
    segment_attention: attention kernel for a cell: "sdpa" (default), "eager" (the reference), "flex"
        (FlexAttention; no backward on CPU), "flash" (flash-attn, when importable).
    segment_schedule: "wavefront" (default) runs every anti-diagonal s + n = t of independent cells together;
        "sequential" runs cells one at a time in the paper's order. Both compute the same thing.
    checkpoint_cells: recompute each scheduled step (a cell or a diagonal of cells) in backward instead of
        keeping its activations: memory O(L * d * layers) instead of O(L * (d + intermediate) * layers).
    loss_reduction: "segment_sum" (eq. 17: sum over segments of each segment's mean token loss) or
        "token_mean" (mean over all target tokens).
    checkpoint_group_steps: with the wavefront, also checkpoint groups of this many diagonal steps, keeping only
        each group's frontier (one segment per layer): activation memory O(L * d) with a small constant, at the cost
        of one more forward. 0 (default) is off. "auto": the group size that holds the fewest cell outputs at once in
        backward (frontiers kept, one per group, against the outputs a group's recomputation holds, one per step of
        the group; near sqrt(diagonals), counted cell by cell: group_steps); the computation and its cost are the
        same for every group size.
    max_step_cells: with the wavefront, run each diagonal's cells in batched steps of at most this many cells
        (0, the default: a whole diagonal, up to one cell per layer, in one step). With checkpoint_cells, a step's
        activations are what backward holds beyond the checkpoints: on deep models (SmolLM2's 30 layers, 0.5 GB a
        diagonal of 512-token cells in bf16) a cap bounds them, at the cost of smaller batched matmuls. Same
        computation; best with weight_grads="accumulate" (with "autograd" each partial step stacks a copy of its
        layers' weights).
    checkpoint_budget_cells: k > 0 chooses the three fields above from the model's depth, so that one setting suits
        shallow and deep models alike (checkpoint_plan): with at most k layers, groups of k // layers diagonals and no
        per-step checkpoints (each cell runs forward twice, a group's backward holds at most k cells' activations);
        deeper, per-step checkpoints inside "auto" groups, each diagonal in steps of ceil(layers / ceil(layers / k))
        cells (a third forward, at most k cells' activations at once). Table I's 4 layers with k = 12: groups of 3;
        SmolLM2's 30: steps of 10 cells. 0 (default): the three fields as set; with k > 0 they must keep their
        defaults.
    weight_grads: how the wavefront's batched matmuls produce layer weight gradients. "autograd" (default): each
        step's bmm gives its layers' gradients (K = l tokens) and autograd sums them. "accumulate": each step adds
        into one buffer per projection with baddbmm (no per-step gradient tensors, no separate sums). "deferred":
        each step keeps its matmul inputs and output gradients, and every layer's gradient is one GEMM over all its
        tokens at the end of backward (K = L, as in a plain Llama layer): the fastest for large models, at the cost
        of holding those inputs and gradients until then. With the last two, compile_cells compiles a cell's
        elementwise pieces (norms, RoPE, SwiGLU) and leaves its matmuls eager.
    stacked_params: keep all layers' weights as one parameter per kind of weight (`model.layer_stack`: q, k, v, o,
        gate, up, down as [layers, in, out], the norms as [layers, d]; fast_train.LayerStack), the layout the
        wavefront's batched matmuls read, instead of stacking a copy of them in every forward. Each layer's modules
        keep their `weight` as a view of their slice, and state_dict() / load_state_dict() keep a HF Llama's
        per-layer keys (model.layers.N.self_attn.q_proj.weight, ...; from_pretrained stacks after loading). Saves
        the per-forward copy of the layer weights and, with weight_grads "accumulate" or "deferred", the stacked
        gradient buffer: those add into the stacked parameters' own .grad, outside autograd (no AccumulateGrad
        hooks fire for them: not for DeepSpeed ZeRO). For the wavefront: the sequential schedule and generation read
        each layer's slice, whose backward writes a zero-padded gradient of the whole stack per layer. Off by default;
        the computation is the same.
    memory_sink_tokens: k > 0 keeps an attention sink in every memory (not in the paper; 0, the default, is the
        paper's model). Pretrained Llamas put much of their attention on the first tokens of a sequence; from segment 2
        on the paper's memory no longer holds them. With k, layer n's memory for every segment s >= 2 is
        [y[0, n][:, :k]; y[s-1, n]]: its own outputs for the sequence's first k tokens, then the previous segment's
        (segment 1's memory y[0, n] starts with them already; segment 0 has no memory). Positions as StreamingLLM's
        cache positions: the sink right before the memory whatever s is, at [-k, 0), memory and current segment where
        they are without it ([0, l) and [l, l + r)). Every query sees all sink and memory keys (Rule 4's mask, with
        k + l keys of memory). Under memory_grad_segments=t the sink is detached for segments s >= t, so no gradient
        crosses a truncation boundary through it. At most segment_length.
    memory_norm: how a layer normalises its memory before k_proj / v_proj. "shared" (default, the paper's eq. 16):
        input_layernorm, as the current segment. "separate": each layer's own RMSNorm weight `memory_layernorm`
        (parameter `model.layers.N.memory_layernorm.weight`), initialised as a copy of input_layernorm's weight when
        it is not in the checkpoint (a Llama checkpoint), so the model starts as the paper's and training can scale
        the memory's channels apart from the current segment's: the memory is a layer's *output*, one residual block
        further along the stream than the input the pretrained norm was fitted to. Saved and loaded with the
        checkpoint; LlamaForCausalLM ignores it when loading such a checkpoint.
    compile_cells: run each scheduled step through torch.compile (fewer, fused kernels; compiles once per number
        of cells in a step). True uses torch.compile's default mode; a mode name such as "reduce-overhead" (CUDA
        graphs: one replay per step instead of its ~100 launches) selects that mode. With weight_grads other than
        "autograd", only a cell's elementwise pieces are compiled (default mode).
    loss_chunk_tokens: when logits are not returned, the final norm, lm-head and cross-entropy run over chunks of
        this many tokens with their gradients computed on the spot (NormLinearCrossEntropy): peak memory holds one
        chunk's [c, V] logits (on a GPU in bf16, 0.5 GiB at 2048 tokens and a 128K vocabulary).
    """

    model_type = "condensation"

    segment_length: int = 512
    memory_grad_segments: int | None = None
    segment_attention: str = "sdpa"
    segment_schedule: str = "wavefront"
    checkpoint_cells: bool = False
    loss_reduction: str = "segment_sum"
    loss_chunk_tokens: int = 2048
    compile_cells: bool | str = False
    checkpoint_group_steps: int | str = 0
    max_step_cells: int = 0
    checkpoint_budget_cells: int = 0
    weight_grads: str = "autograd"
    memory_sink_tokens: int = 0
    memory_norm: str = "shared"
    stacked_params: bool = False

    def validate_architecture(self):
        super().validate_architecture()
        if not isinstance(self.segment_length, int) or self.segment_length <= 0:
            raise ValueError(f"segment_length must be a positive int, got {self.segment_length!r}")
        if self.memory_grad_segments is not None and self.memory_grad_segments <= 0:
            raise ValueError(f"memory_grad_segments must be None or positive, got {self.memory_grad_segments!r}")
        if self.segment_attention not in SEGMENT_ATTENTION:
            raise ValueError(f"segment_attention must be one of {sorted(SEGMENT_ATTENTION)}, got {self.segment_attention!r}")
        if self.segment_schedule not in ("wavefront", "sequential"):
            raise ValueError(f"segment_schedule must be 'wavefront' or 'sequential', got {self.segment_schedule!r}")
        if self.loss_reduction not in ("segment_sum", "token_mean"):
            raise ValueError(f"loss_reduction must be 'segment_sum' or 'token_mean', got {self.loss_reduction!r}")
        if self.checkpoint_group_steps != "auto" and (not isinstance(self.checkpoint_group_steps, int)
                                                      or isinstance(self.checkpoint_group_steps, bool)
                                                      or self.checkpoint_group_steps < 0):
            raise ValueError(f"checkpoint_group_steps must be an int >= 0 or 'auto', got {self.checkpoint_group_steps!r}")
        if not isinstance(self.max_step_cells, int) or isinstance(self.max_step_cells, bool) or self.max_step_cells < 0:
            raise ValueError(f"max_step_cells must be an int >= 0, got {self.max_step_cells!r}")
        k = self.checkpoint_budget_cells
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"checkpoint_budget_cells must be an int >= 0, got {k!r}")
        if k and (self.checkpoint_cells or self.checkpoint_group_steps or self.max_step_cells):
            raise ValueError("checkpoint_budget_cells chooses checkpoint_cells, checkpoint_group_steps and "
                             "max_step_cells: leave them at their defaults when it is set, got "
                             f"checkpoint_cells={self.checkpoint_cells!r}, checkpoint_group_steps="
                             f"{self.checkpoint_group_steps!r}, max_step_cells={self.max_step_cells!r}")
        if self.loss_chunk_tokens <= 0:
            raise ValueError(f"loss_chunk_tokens must be positive, got {self.loss_chunk_tokens!r}")
        if self.compile_cells not in (False, True, "default", "reduce-overhead", "max-autotune",
                                      "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_cells must be a bool or a torch.compile mode, got {self.compile_cells!r}")
        if self.weight_grads not in ("autograd", "accumulate", "deferred"):
            raise ValueError(f"weight_grads must be 'autograd', 'accumulate' or 'deferred', got {self.weight_grads!r}")
        if (not isinstance(self.memory_sink_tokens, int) or isinstance(self.memory_sink_tokens, bool)
                or not 0 <= self.memory_sink_tokens <= self.segment_length):
            raise ValueError(f"memory_sink_tokens must be an int in [0, segment_length={self.segment_length}], "
                             f"got {self.memory_sink_tokens!r}")
        if self.memory_norm not in ("shared", "separate"):
            raise ValueError(f"memory_norm must be 'shared' or 'separate', got {self.memory_norm!r}")
        if not isinstance(self.stacked_params, bool):
            raise ValueError(f"stacked_params must be a bool, got {self.stacked_params!r}")
        if self.attention_bias or self.mlp_bias:
            raise ValueError("attention_bias / mlp_bias are not supported (no Llama checkpoint uses them)")


# ----------------------------------------------------------------------------------------------------------------
# Attention functions. One signature: q [N, H, c, D], k/v [N, Hkv, m + c, D] -> [N, H, c, D], with the
# bottom-right aligned causal mask of Rule 4: query i (of c) sees every key j <= i + m, so all m memory keys and
# the current keys up to itself. With m = 0 it is the ordinary causal mask.


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: explicit scores, explicit mask, float32 softmax."""
    c, kv_len = q.shape[-2], k.shape[-2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [N, H, c, m + c]
    i = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(kv_len, device=q.device)[None, :]
    scores = scores.masked_fill(j > i + (kv_len - c), float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    c, kv_len = q.shape[-2], k.shape[-2]
    if kv_len == c:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # SDPA's is_causal is top-left aligned, which would hide most memory keys: use the lower-right bias.
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(c, kv_len), scale=scale, enable_gqa=True)


_FLEX: dict = {}


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention as _flex

    c, kv_len = q.shape[-2], k.shape[-2]
    key = (c, kv_len, q.device)
    if key not in _FLEX:
        offset = kv_len - c

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        _FLEX[key] = create_block_mask(mask_mod, None, None, c, kv_len, device=q.device)
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(_flex, dynamic=False)
    return _FLEX["fn"](q, k, v, block_mask=_FLEX[key], scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_func  # flash-attn's causal=True is bottom-right aligned when c != kv_len

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True)
    return out.transpose(1, 2)


SEGMENT_ATTENTION: dict[str, Callable[..., torch.Tensor]] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "flash": flash_attention,
}


def attention_unavailable_reason(name: str, device: torch.device | str = "cpu", backward: bool = False) -> str | None:
    """Why an attention implementation cannot run here, or None if it can."""
    device = torch.device(device)
    if name == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn is not installed (optional extra; needs CUDA to build)"
        if device.type != "cuda":
            return "flash-attn runs on CUDA only"
    if name == "flex" and backward and device.type == "cpu":
        return "FlexAttention has no backward on CPU"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The (segment, layer) cell. Weights of k consecutive layers come stacked (fast_train.LayerWeights) so that one
# batched matmul serves a whole wavefront diagonal; a single layer is a [1, ...] view (no copy).


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x [k, ..., d], weight [k, d]; float32 statistics as LlamaRMSNorm
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.view(weight.shape[0], *([1] * (x.dim() - 2)), -1) * xf.to(x.dtype)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., D] with its first half negated: rotate_half(x) * sin == x.roll(D / 2, -1) * _signed_sin(sin), bit
    for bit ((-a) * b == a * (-b) in floating point)."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x [..., c, D]; cos [c, D], sin_signed [c, D] (_signed_sin). x * cos + rotate_half(x) * sin (HF's apply_rotary_pos_emb)
    # with the rotation as one roll: rotate_half's neg + cat (and in backward neg + cat) were two kernels each, on all
    # of q and k, three times a cell
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _heads(x: torch.Tensor, n: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
           apply_rope: Callable[..., torch.Tensor] = _rope) -> torch.Tensor:
    # [k, B, c, n*D] -> [k, B, n, c, D]; RoPE (cos, signed sin [c, D]: _rope) is applied before the transpose, while
    # the tensor is contiguous, so its elementwise kernels run vectorised
    k, B, c, _ = x.shape
    x = x.view(k, B, c, n, -1)
    if rope is not None:
        x = apply_rope(x, rope[0][:, None], rope[1][:, None])
    return x.transpose(2, 3)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    return ACT2FN[act](gate) * up


class Pointwise(NamedTuple):
    """A cell's elementwise pieces, between its matmuls."""

    rms_norm: Callable[..., torch.Tensor]
    rope: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]

    def heads(self, x: torch.Tensor, n: int, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """_heads with this RoPE. The piece is the RoPE, not _heads: the split into heads and the transpose are views,
        and compiled whole, _heads compiled a variant per head count and per RoPE taken or not (fast_train)."""
        return _heads(x, n, rope, self.rope)


_EAGER_POINTWISE = Pointwise(_rms_norm, _rope, _swiglu)


def _pointwise(cfg: CondensationConfig) -> Pointwise:
    """The pieces as written, or compiled when a cell is compiled piecewise (fast_train.compiled_pointwise)."""
    return compiled_pointwise(cfg, _EAGER_POINTWISE)


class Rope(NamedTuple):
    """cos/sin [p + 2l, D] for positions -p ... 2l - 1 (memory_sink_tokens = p, usually 0): rows [0, p) the attention
    sink (positions [-p, 0)), rows [p, p + l) the memory (positions [0, l)), rows [p + l, p + 2l) the current segment
    (positions [l, 2l)). Memory and segment thus get the same rotations with or without a sink."""

    cos: torch.Tensor
    sin: torch.Tensor
    sin_signed: torch.Tensor  # _signed_sin(sin), made once per forward (Rope.of)

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> "Rope":
        return cls(cos, sin, _signed_sin(sin))

    def rows(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) of rows [start, start + n), as _rope takes them."""
        return self.cos[start : start + n], self.sin_signed[start : start + n]


def memory_kv(w: LayerWeights, y: torch.Tensor, rope: Rope, cfg: CondensationConfig, start: int):
    """Rules 2-3: keys/values of layer n's memory from its own outputs y ([k, B, p, d]: y[s-1, n] from Rope row
    start = memory_sink_tokens, i.e. positions [0, l), or the sink y[0, n][:, :p] from row 0, positions [-p, 0)),
    normalised by the memory's norm (input_norm unless memory_norm="separate")."""
    pw = _pointwise(cfg)
    m = pw.rms_norm(y, w.memory_norm_weight(), cfg.rms_norm_eps)
    n_mem = y.shape[2]
    k = pw.heads(_linear(m, w.k), cfg.num_key_value_heads, rope.rows(start, n_mem))  # [k, B, Hkv, p, D]
    v = pw.heads(_linear(m, w.v), cfg.num_key_value_heads)
    return k, v


def _kv_groups(kc: int, prefix_kv, sink_kv) -> list[tuple[int, int, list]]:
    """Cells [a, b) of a step that attend to the same kinds of keys before their own: the first ms cells to the sink
    and the prefix, the next m - ms to the prefix, the rest (segment 0) to none."""
    m = 0 if prefix_kv is None else prefix_kv[0].shape[0]
    ms = 0 if sink_kv is None else sink_kv[0].shape[0]
    groups = [(0, ms, [sink_kv, prefix_kv]), (ms, m, [prefix_kv]), (m, kc, [])]
    return [(a, b, parts) for a, b, parts in groups if b > a]


def _cells(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Cells [a, b) of t [k, ...]: t itself when that is all of them. A slice's backward allocates a zero tensor of
    t's size and copies the gradient into it (two kernels per slice, five slices a diagonal), even for a full range."""
    return t if a == 0 and b == t.shape[0] else t[a:b]


def cell_forward(
    w: LayerWeights,
    x: torch.Tensor,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None,
    offset: int,
    rope: Rope,
    cfg: CondensationConfig,
    attention: Callable[..., torch.Tensor],
    sink_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    memory: torch.Tensor | None = None,
    inputs: list[torch.Tensor] | None = None,
):
    """Rules 3-5 for k cells at once: x [k, B, c, d] at positions [l + offset, l + offset + c) (Rope rows from
    p + l + offset, p = memory_sink_tokens), attending to prefix_kv ([m, B, Hkv, P, D]: memory keys, then keys of the
    segment's earlier tokens) and to itself causally. prefix_kv may cover only the first m < k cells: the rest (a
    wavefront's segment-0 cell) have no memory. sink_kv ([ms, B, Hkv, p, D], ms <= m) puts the attention sink's keys
    before the prefix of the first ms cells. Returns y [k, B, c, d] and this chunk's (k, v) for a generation cache.

    memory ([k, B, l, d], offset 0, no prefix_kv or sink_kv): every cell's memory y[s-1, n] as outputs. Its keys and
    values (memory_kv's) and the segment's come from one matmul each over both, with one RoPE over rows [p, p + l + c)
    (the memory's positions, then the segment's), and need no concatenation: the same computation in fewer kernels
    (memory_kv then the segment's own k / v took two matmuls, two RoPEs and two cats).

    inputs: the k tensors x was stacked from (a wavefront step's), which its norm's backward then stacks again instead
    of keeping x (fast_train.norm_of_stack; with compiled pointwise pieces)."""
    kc, B, c, _ = x.shape
    start = cfg.memory_sink_tokens + cfg.segment_length + offset
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos_sin = rope.rows(start, c)

    pw = _pointwise(cfg)
    h = norm_of_stack(x, inputs, w.input_norm, pw.rms_norm, cfg.rms_norm_eps)  # x = stack(inputs): not saved
    q = pw.heads(_linear(h, w.q), H, cos_sin)  # [k, B, H, c, D]
    if memory is not None:
        n_mem = memory.shape[2]
        assert prefix_kv is None and sink_kv is None and start - n_mem == cfg.memory_sink_tokens
        hm = torch.cat([pw.rms_norm(memory, w.memory_norm_weight(), cfg.rms_norm_eps), h], 2)  # [k, B, l + c, d]
        keys = pw.heads(_linear(hm, w.k), Hkv, rope.rows(start - n_mem, n_mem + c))  # [k, B, Hkv, l + c, D]
        values = pw.heads(_linear(hm, w.v), Hkv)
        k, v = keys[:, :, :, n_mem:], values[:, :, :, n_mem:]
        outs = [attention(q.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), D**-0.5)]
    else:
        k = pw.heads(_linear(h, w.k), Hkv, cos_sin)  # [k, B, Hkv, c, D]
        v = pw.heads(_linear(h, w.v), Hkv)
        outs = []
    for a, b, parts in ([] if memory is not None else _kv_groups(kc, prefix_kv, sink_kv)):  # one attention call per
        # kind of keys
        keys = torch.cat([_cells(p[0], a, b) for p in parts] + [_cells(k, a, b)], 3) if parts else _cells(k, a, b)
        values = torch.cat([_cells(p[1], a, b) for p in parts] + [_cells(v, a, b)], 3) if parts else _cells(v, a, b)
        outs.append(attention(_cells(q, a, b).flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), D**-0.5))
    # [k*B, c, H, D]: several calls' outputs are concatenated token-major, so that the o-projection reads the
    # concatenation itself; concatenated head-major, the reshape copied it once more (one kernel more; the same
    # bytes kept, the copy instead of the concatenation)
    o = outs[0].transpose(1, 2) if len(outs) == 1 else torch.cat([t.transpose(1, 2) for t in outs])
    o = o.reshape(kc, B, c, H * D)
    x = x + _linear(o, w.o)

    h = pw.rms_norm(x, w.post_norm, cfg.rms_norm_eps)
    # the SwiGLU output is not saved with a weight sink (fast_train._SwiGLUDown)
    y = x + swiglu_linear(_linear(h, w.gate), _linear(h, w.up), w.down, pw.swiglu, cfg.hidden_act)
    return y, (k, v)


# ----------------------------------------------------------------------------------------------------------------
# Schedules over cells (Rule 1). Cell (s, n) needs y[s, n-1] (its input) and y[s-1, n] (its memory), so all cells
# on an anti-diagonal s + n = t are independent.


def _cells_step(xs, mems, sinks, w: LayerWeights, rope: Rope, cfg: CondensationConfig, attention) -> torch.Tensor:
    """k cells: inputs xs (k tensors [B, l, d]), memories mems (m <= k tensors y[s-1, n] for the first m cells; the
    rest have none; or already stacked, one tensor [m, B, l, d]) and attention sinks (ms <= m tensors y[0, n][:, :p]
    for the first ms cells) -> [k, B, l, d]."""
    x = torch.stack(xs)  # [k, B, l, d]
    m, ms = len(mems), len(sinks)
    if m:
        mems = mems if isinstance(mems, torch.Tensor) else torch.stack(mems)  # [m, B, l, d]
    if m == len(xs) and ms == 0:  # every cell has a memory (a full diagonal): its k / v with the segment's
        return cell_forward(w, x, None, 0, rope, cfg, attention, memory=mems, inputs=xs)[0]
    prefix = None if m == 0 else memory_kv(w if m == len(xs) else w.first(m), mems, rope, cfg,
                                           start=cfg.memory_sink_tokens)
    sink = None if ms == 0 else memory_kv(w.first(ms), torch.stack(sinks), rope, cfg, start=0)
    return cell_forward(w, x, prefix, 0, rope, cfg, attention, sink, inputs=xs)[0]


def _run_step(w: LayerWeights, xs, mems, sinks, rope, cfg, attention, ckpt) -> torch.Tensor:
    """One scheduled step (mems: a list of tensors, or one stacked tensor; _cells_step). Under checkpointing the saved
    inputs are the cell outputs themselves (each y[s, n] is the input of (s, n+1) and the memory of (s+1, n), and is
    kept once), not stacked copies."""
    fn = compiled_step(cfg, _cells_step)  # _cells_step itself unless compile_cells
    if not ckpt:
        return fn(xs, mems, sinks, w, rope, cfg, attention)
    stacked = isinstance(mems, torch.Tensor)
    mems = [mems] if stacked else list(mems)
    k, m, ms = len(xs), len(mems), len(sinks)

    def step(*tensors):
        mem = tensors[k] if stacked else list(tensors[k : k + m])
        return fn(list(tensors[:k]), mem, list(tensors[k + m : k + m + ms]),
                  LayerWeights(*tensors[k + m + ms :]), rope, cfg, attention)

    return checkpoint(step, *xs, *mems, *sinks, *w.present(), use_reentrant=False, preserve_rng_state=False)  # no RNG


class CheckpointPlan(NamedTuple):
    """How the wavefront checkpoints: per-step checkpoints, diagonal steps per group checkpoint (int or "auto"; 0:
    none) and cells per batched step."""
    cells: bool
    group_steps: int | str
    step_cells: int


def checkpoint_plan(cfg: CondensationConfig, n_layers: int) -> CheckpointPlan:
    """The checkpoint fields as set, or as checkpoint_budget_cells chooses them from the depth (see its docstring)."""
    k = cfg.checkpoint_budget_cells
    if not k:
        return CheckpointPlan(cfg.checkpoint_cells, cfg.checkpoint_group_steps, cfg.max_step_cells or n_layers)
    if n_layers <= k:
        return CheckpointPlan(False, k // n_layers, n_layers)
    return CheckpointPlan(True, "auto", math.ceil(n_layers / math.ceil(n_layers / k)))


def group_steps(option: int | str, n_seg: int, n_layers: int) -> int:
    """Diagonal steps per group checkpoint (checkpoint_group_steps; 0: none) for a wavefront of n_seg segments over
    n_layers layers. "auto": the group size that keeps the fewest cell outputs at once in backward. While a step of
    group j is backpropagated, memory holds the frontier of every earlier group (the outputs of its last diagonal)
    and the outputs of the steps of group j recomputed before it, besides that step's own activations: with groups of
    g, about n_steps / g + g diagonals' outputs, least near g = sqrt(n_steps), here counted cell by cell on the
    wavefront (ramps included). The cells computed are the same for every g (each runs forward three times under
    per-step checkpoints, twice without). SmolLM2's 30 layers at 16K (61 diagonals): 5, where 16 held 345 cell
    outputs (0.2 GB) at the peak, 5 at most 197."""
    if option == "auto":
        return _least_held_group(n_seg, n_layers)
    return option


@functools.lru_cache(maxsize=256)
def _least_held_group(n_seg: int, n_layers: int) -> int:
    n = n_seg + n_layers - 1
    cells = [min(t, n_layers - 1) - max(0, t - n_seg + 1) + 1 for t in range(n)]
    before = [0]  # before[t]: cells of diagonals 0 .. t-1
    for c in cells:
        before.append(before[-1] + c)
    best = (before[-1] + 1, 1)
    for g in range(1, n + 1):
        front = worst = 0
        for t0 in range(0, n, g):
            t1 = min(n, t0 + g)
            worst = max(worst, front + before[t1 - 1] - before[t0])  # the group's last step: all its earlier outputs
            front += cells[t1 - 1]
        if worst <= best[0]:  # ties: the larger groups (fewer checkpoints)
            best = (worst, g)
    return best[1]


def run_segments(layers, segment: Callable[[int], torch.Tensor], n_seg: int, rope: Rope, cfg: CondensationConfig,
                 schedule: str, ckpt: bool):
    """Run all (segment, layer) cells. segment(s) gives segment s's input embeddings [B, l, d] (the last segment
    padded at its end; padding sits after every real token, so the causal mask keeps it out of every real token's
    computation). Returns the last layer's outputs [B, N_s, l, d]."""
    attention = SEGMENT_ATTENTION[cfg.segment_attention]
    n_layers = len(layers)
    trunc = cfg.memory_grad_segments
    p = cfg.memory_sink_tokens

    def mem_for(y_prev, s):
        # Rule 8: gradient through memory, optionally cut every `trunc` segments
        return y_prev.detach() if trunc is not None and s % trunc == 0 else y_prev

    def sinks_for(sink, s):
        # the attention sink y[0, n][:, :p] for segments s >= 2 (segment 1's memory holds it already); past the first
        # truncation boundary its gradient is cut as well
        if sink is None or s < 2:
            return []
        return [sink.detach() if trunc is not None and s >= trunc else sink]

    def sink_of(y):  # the sink kept from segment 0's output (a copy: not a view pinning the whole segment)
        return y[:, :p].clone() if p else None

    if schedule == "sequential":
        outs = [None] * n_seg
        ws = [LayerWeights.of([layer]) for layer in layers]
        mem = [None] * n_layers  # mem[n] = y[s-1, n]
        sinks = [None] * n_layers  # sinks[n] = y[0, n][:, :p]
        for s in range(n_seg):
            x = segment(s)  # [B, l, d]
            for n in range(n_layers):
                m = [] if mem[n] is None else [mem_for(mem[n], s)]
                x = _run_step(ws[n], [x], m, sinks_for(sinks[n], s), rope, cfg, attention, ckpt)[0]
                mem[n] = x
                if s == 0:
                    sinks[n] = sink_of(x)
            outs[s] = x
        return torch.stack(outs, 1)

    w_all = StackedLayers(layers, cfg.weight_grads)
    n_steps = n_seg + n_layers - 1
    plan = checkpoint_plan(cfg, n_layers)
    group = group_steps(plan.group_steps, n_seg, n_layers)
    grouped = bool(group and torch.is_grad_enabled())
    cap = plan.step_cells  # cells per batched step

    def steps(t0: int, t1: int, *state):
        """Diagonals t0 .. t1-1 from the frontier prev (prev[n] = y[t0-1-n, n]) and the attention sinks (None while
        unset or off); returns the new frontier, the sinks and the last layer's outputs of the segments finished
        meanwhile."""
        prev, sinks, done = list(state[:n_layers]), list(state[n_layers:]), []
        # source[n] = (y, i) when prev[n] is y.unbind(0)[i] of a step output y of the previous diagonal: a step whose
        # memories are all of y, in order, reads y itself instead of stacking a copy of its cells (one stack less per
        # step, and in backward y's memory gradient arrives whole: no add of it into every cell's gradient)
        source = {}
        for t in range(t0, t1):
            # cells (t - n, n) for layers lo .. hi in batched steps of at most `cap` cells (layers a .. b); those with
            # s >= 1 have a memory (layers a .. min(b, t - 1)), those with s >= 2 also the sink (layers
            # a .. min(b, t - 2)), the segment-0 cell (layer t, on the first n_layers diagonals) has none and comes
            # last. Every step reads the previous diagonal's outputs: the frontier is updated after all of them.
            lo, hi = max(0, t - n_seg + 1), min(t, n_layers - 1)
            ys = []
            for a in range(lo, hi + 1, cap):
                b = min(hi, a + cap - 1)
                xs = [segment(t) if n == 0 else prev[n - 1] for n in range(a, b + 1)]
                ms = [mem_for(prev[n], t - n) for n in range(a, min(b, t - 1) + 1)]
                y_src = source.get(a, (None,))[0]
                if (ms and y_src is not None and y_src.shape[0] == len(ms)
                        and all(mm is prev[n] and n in source and source[n][0] is y_src and source[n][1] == n - a
                                for n, mm in enumerate(ms, start=a))):
                    ms = y_src  # [m, B, l, d]: the memories' own stacked tensor
                ss = [sk for n in range(a, min(b, t - 2) + 1) for sk in sinks_for(sinks[n], t - n)]
                ys.append((a, _run_step(w_all.range(a, b + 1), xs, ms, ss, rope, cfg, attention, ckpt)))
            source = {}
            for a, y in ys:
                # unbind, not y[i]: each index's backward would allocate and add a zero tensor the size of the whole
                # step (k cells), k times over; unbind's is one stack of the k gradients
                for n, y_n in enumerate(y.unbind(0), start=a):
                    prev[n] = y_n
                    source[n] = (y, n - a)
                    if n == t:  # segment 0
                        sinks[n] = sink_of(prev[n])
            if hi == n_layers - 1:
                # under group checkpoints a finished segment's output is kept to the end of the forward: a copy, not a
                # view pinning its whole diagonal (n_layers cells: 4.5 GB of views at 128K on SmolLM2's 30 layers)
                done.append(prev[hi].clone() if grouped else prev[hi])
            # layer n's last output y[n_seg - 1, n] (diagonal n_seg - 1 + n) is read by the next layer's last cell on
            # the diagonal after it, and by nothing else: dropped then. Kept in the frontier, that view pinned its whole
            # diagonal's output until its group's backward (344 cells, 0.2 GB, in the 16K SmolLM2 frontier of t = 47
            # with groups of 16)
            for n in range(min(t - n_seg + 1, n_layers - 1)):
                prev[n] = None
        return (*prev, *sinks, *done)

    if not grouped:
        return torch.stack(list(steps(0, n_steps, *[None] * (2 * n_layers))[2 * n_layers :]), 1)
    # Checkpoints over groups of diagonals keep only each group's frontier (n_layers cell outputs, and the sinks) and
    # the finished segments' outputs; a group's cells are recomputed in backward (the per-step checkpoints, if on,
    # nest inside).
    state, outs = [None] * (2 * n_layers), []
    for t0 in range(0, n_steps, group):
        res = checkpoint(steps, t0, min(n_steps, t0 + group), *state, use_reentrant=False, preserve_rng_state=False)
        state, done = list(res[: 2 * n_layers]), res[2 * n_layers :]
        outs.extend(done)
    return torch.stack(outs, 1)


# ----------------------------------------------------------------------------------------------------------------
# Generation cache: bounded per layer by one segment of memory keys/values plus the current partial segment.


class CondensationCache:
    """State of incremental decoding. Per layer: memory K/V (from y[s-1, n], positions [0, l)), K/V of the current
    partial segment (positions [l, l + r)), and the layer outputs of that partial segment, which become the next
    memory once it reaches l tokens; with memory_sink_tokens = p > 0 also the sink's K/V (from y[0, n][:, :p],
    positions [-p, 0)), used from segment 2 on. Never larger than p + 2 l keys per layer."""

    # attributes transformers' generate inspects on any cache
    is_compileable = False
    is_linear = (False,)

    def __init__(self, num_layers: int):
        self.memory: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers  # [1, B, Hkv, l, D] each
        self.current: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers  # [1, B, Hkv, r, D]
        self.outputs: list[torch.Tensor | None] = [None] * num_layers  # [1, B, r, d]
        self.sink: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers  # [1, B, Hkv, p, D]
        self.segments_done = 0  # completed segments: the current one is segment `segments_done`
        self.seen_tokens = 0
        self.peak_keys = 0  # most keys any layer attended to, for checking the bound

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def current_length(self) -> int:
        return 0 if self.outputs[0] is None else self.outputs[0].shape[2]



def decode_chunk(layers, x: torch.Tensor, cache: CondensationCache, rope: Rope, cfg: CondensationConfig) -> torch.Tensor:
    """Advance the cache by x [B, c, d] (c <= l - current length). Returns the last layer's outputs [B, c, d]."""
    attention = SEGMENT_ATTENTION[cfg.segment_attention]
    r0 = cache.current_length()
    h = x[None]
    for n, layer in enumerate(layers):
        w = LayerWeights.of([layer])
        parts = [p for p in (cache.memory[n], cache.current[n]) if p is not None]
        prefix = None if not parts else (torch.cat([p[0] for p in parts], 3), torch.cat([p[1] for p in parts], 3))
        sink = cache.sink[n] if cache.segments_done >= 2 else None  # segment 1's memory holds the sink already
        y, (k, v) = cell_forward(w, h, prefix, r0, rope, cfg, attention, sink)
        n_keys = sum(0 if t is None else t[0].shape[3] for t in (sink, prefix)) + k.shape[3]
        cache.peak_keys = max(cache.peak_keys, n_keys)
        cur = cache.current[n]
        cache.current[n] = (k, v) if cur is None else (torch.cat([cur[0], k], 3), torch.cat([cur[1], v], 3))
        cache.outputs[n] = y if cache.outputs[n] is None else torch.cat([cache.outputs[n], y], 2)
        h = y
    cache.seen_tokens += x.shape[1]
    if cache.current_length() == cfg.segment_length:  # the segment is complete: its outputs become the memory
        p = cfg.memory_sink_tokens
        for n, layer in enumerate(layers):
            w = LayerWeights.of([layer])
            if p and cache.segments_done == 0:
                cache.sink[n] = memory_kv(w, cache.outputs[n][:, :, :p], rope, cfg, start=0)
            cache.memory[n] = memory_kv(w, cache.outputs[n], rope, cfg, start=p)
            cache.current[n], cache.outputs[n] = None, None
        cache.segments_done += 1
    return h[0]


# ----------------------------------------------------------------------------------------------------------------
# Loss (Rule 7, eq. 17)


def condensation_loss(
    labels: torch.Tensor,
    segment_length: int,
    reduction: str,
    logits: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    norm: LlamaRMSNorm | None = None,
    lm_head: nn.Linear | None = None,
    chunk_tokens: int = 2048,
):
    """Eq. 17 from logits [B, L, V], or from the last layer's pre-norm outputs `hidden` [B, L, d] through the final
    norm and lm_head by NormLinearCrossEntropy (chunked; the segment losses then carry no gradient, the loss does).
    Labels are shifted by one over the whole sequence. Returns (loss, segment_losses [N_s])."""
    B, L = labels.shape
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, L]: position p predicts token p + 1
    valid = targets != -100
    n_seg = math.ceil(L / segment_length)
    pad = n_seg * segment_length - L

    def per_segment(x):  # [B, L] -> [N_s] sums over the batch and each segment's tokens
        return F.pad(x, (0, pad)).view(B, n_seg, segment_length).sum((0, 2))

    seg_count = per_segment(valid).clamp(min=1)  # a segment with no targets contributes 0
    if logits is not None:
        ce = F.cross_entropy(_at_least_fp32(logits).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        ce = ce.view(B, L)
        segment_losses = per_segment(ce) / seg_count
        loss = ce.sum() / valid.sum().clamp(min=1) if reduction == "token_mean" else segment_losses.sum()
        return loss, segment_losses
    # each token's weight in the loss: 1 / (its segment's target count), or 1 / (all targets)
    weights = valid.to(torch.promote_types(hidden.dtype, torch.float32))
    if reduction == "token_mean":
        weights = weights / valid.sum().clamp(min=1)
    else:
        weights = weights / seg_count.repeat_interleave(segment_length)[:L]  # [B, L] / [L]
    loss, ce = NormLinearCrossEntropy.apply(hidden.flatten(0, 1), norm.weight, lm_head.weight, targets.flatten(),
                                            weights.flatten(), norm.variance_epsilon, chunk_tokens)
    return loss, per_segment(ce.view(B, L)) / seg_count


# ----------------------------------------------------------------------------------------------------------------
# Models


# transformers 5.24 renamed past_key_values to cache (GenerationMixin reads the one its version knows)
_CACHE_FIELD = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


@dataclass
class CondensationCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    segment_losses: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    # the generation cache, under the one name this transformers version's GenerationMixin reads
    __annotations__[_CACHE_FIELD] = CondensationCache | None
    locals()[_CACHE_FIELD] = None


class MemoryRMSNorm(LlamaRMSNorm):
    """The memory's own RMSNorm (memory_norm="separate"), initialised as a copy of its layer's input_layernorm."""

    def __init__(self, input_layernorm: LlamaRMSNorm):
        super().__init__(input_layernorm.weight.shape[0], eps=input_layernorm.variance_epsilon)
        self._copy_of = (input_layernorm,)  # in a tuple: not registered as a submodule


class CondensationDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (same modules and parameter names); with memory_norm="separate" also the memory's own
    RMSNorm, `memory_layernorm` (None otherwise). The cells of this file read its weights (LayerWeights.params)."""

    def __init__(self, config: CondensationConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.memory_layernorm = MemoryRMSNorm(self.input_layernorm) if config.memory_norm == "separate" else None


class CondensationPreTrainedModel(LlamaPreTrainedModel):
    config_class = CondensationConfig
    config: CondensationConfig
    _no_split_modules = ["LlamaDecoderLayer", "CondensationDecoderLayer"]
    _can_record_outputs = {}
    # a Llama checkpoint has no memory_layernorm: it starts as a copy of input_layernorm (_init_weights), not a warning
    _keys_to_ignore_on_load_missing = [r"memory_layernorm"]

    def _init_weights(self, module):
        super()._init_weights(module)
        # called for a memory_layernorm missing from the checkpoint (a loaded one is marked initialised and left
        # alone), after its layer's input_layernorm was loaded or initialised (registered first)
        if isinstance(module, MemoryRMSNorm):
            init.copy_(module.weight, module._copy_of[0].weight)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # HF's loader sets each layer's weights by name: stacked_params stacks them once they are loaded
        with deferred_stacking():
            model = super().from_pretrained(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, CondensationModel) and m.config.stacked_params:
                stack_layer_parameters(m)
        return model


class CondensationModel(CondensationPreTrainedModel):
    """Llama's decoder stack (same modules and parameter names) run segment after segment (Rules 1-6)."""

    def __init__(self, config: CondensationConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([CondensationDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()
        if config.stacked_params:  # the layers' weights become views of model.layer_stack (fast_train.py)
            stack_layer_parameters(self)

    def rope(self, like: torch.Tensor) -> Rope:
        p, l = self.config.memory_sink_tokens, self.config.segment_length
        positions = torch.arange(-p, 2 * l, device=like.device)[None]  # see Rope
        cos, sin = self.rotary_emb(like, positions)
        return Rope.of(cos[0], sin[0])

    def forward(self, input_ids=None, inputs_embeds=None, cache: CondensationCache | None = None,
                final_norm: bool = True, keep_last: int = 0) -> torch.Tensor:
        """Final-norm hidden states [B, L, d] (the last layer's outputs with final_norm=False). With a cache, advances
        it by these tokens (generation) and returns only the last `keep_last` positions when keep_last > 0."""
        if cache is not None:
            return self.advance_cache(input_ids, inputs_embeds, cache, final_norm, keep_last)
        cfg, l = self.config, self.config.segment_length
        # Under group checkpoints each group embeds its own segments (recomputed in backward): no [L, d] embeddings
        # are kept, and each group's gradient rows are added into one [V, d] buffer (EmbeddingSink) instead of being
        # gathered into an [L, d] tensor at the end of backward (2-3 GiB at 1M tokens on the Table I model) or
        # costing a dense [V, d] embedding gradient per group.
        plan = checkpoint_plan(cfg, len(self.layers))
        embed_in_groups = (inputs_embeds is None and bool(plan.group_steps)
                           and cfg.segment_schedule == "wavefront" and torch.is_grad_enabled())
        if embed_in_groups:
            x = None
            (B, L), d = input_ids.shape, cfg.hidden_size
        else:
            x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, d]
            B, L, d = x.shape
        rope = self.rope(self.embed_tokens.weight if x is None else x)
        n_seg = math.ceil(L / l)
        if embed_in_groups:
            sink = EmbeddingSink(self.embed_tokens)
            weight = _GradFromEmbeddingSink.apply(self.embed_tokens.weight, sink)

            def segment(s: int) -> torch.Tensor:
                e = _SinkEmbedding.apply(input_ids[:, s * l : (s + 1) * l], weight, sink)  # [B, <= l, d]
                return e if e.shape[1] == l else F.pad(e, (0, 0, 0, l - e.shape[1]))
        else:
            if n_seg * l != L:  # F.pad copies even when there is nothing to pad (1 GiB at 1M tokens)
                x = F.pad(x, (0, 0, 0, n_seg * l - L))
            # unbind, not x[:, s]: a slice's backward allocates a zero tensor the size of x, N_s times over
            segment = x.view(B, n_seg, l, d).unbind(1).__getitem__  # N_s x [B, l, d]
        ckpt = plan.cells and torch.is_grad_enabled()
        if cfg.compile_cells == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous forward's graphs may be reused
        y = run_segments(self.layers, segment, n_seg, rope, cfg, cfg.segment_schedule, ckpt)
        y = y.reshape(B, n_seg * l, d)
        if n_seg * l != L:  # even a full-length slice's backward allocates and copies a [B, L, d] gradient
            y = y[:, :L]
        return self.norm(y) if final_norm else y

    def advance_cache(self, input_ids, inputs_embeds, cache: CondensationCache, final_norm: bool = True,
                      keep_last: int = 0) -> torch.Tensor:
        """Generation: advance the cache by these tokens (a prompt or new tokens) one segment-bounded chunk at a time.
        Each chunk is embedded only when it is processed and only the outputs of the last `keep_last` positions are
        kept (all with 0), so that a prefill's working memory does not grow with the prompt. Returns [B, min(keep_last,
        L) or L, d]."""
        L = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        start = 0 if keep_last <= 0 else max(0, L - keep_last)  # first position returned
        rope = self.rope(self.embed_tokens.weight if inputs_embeds is None else inputs_embeds)
        kept, i = [], 0
        while i < L:  # split at segment boundaries
            c = min(L - i, self.config.segment_length - cache.current_length())
            x = self.embed_tokens(input_ids[:, i : i + c]) if inputs_embeds is None else inputs_embeds[:, i : i + c]
            y = decode_chunk(self.layers, x, cache, rope, self.config)  # [B, c, d]
            if i + c > start:
                kept.append(y[:, max(0, start - i) :])
            i += c
        y = torch.cat(kept, 1)  # [B, L - start, d]
        return self.norm(y) if final_norm else y


class CondensationForCausalLM(CondensationPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CondensationConfig):
        super().__init__(config)
        self.model = CondensationModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: CondensationCache | None = None,
        use_cache: bool | None = None,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CondensationCausalLMOutput:
        """logits [B, L, V] (or the last `logits_to_keep`), loss (eq. 17) and segment_losses [N_s] when labels are
        given. return_logits=False with labels computes the loss in chunks without materialising the logits
        (NormLinearCrossEntropy; its segment_losses are values only, the loss carries the gradient)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "attention_mask with padding is not supported: segments are cut by position, so a padded row would "
                "be segmented differently from the same text unpadded. Batch equal-length rows or use batch size 1."
            )
        cache = cache if cache is not None else kwargs.get("past_key_values")  # transformers < 5.24
        if cache is None and use_cache and labels is None and not self.training:
            cache = CondensationCache(self.config.num_hidden_layers)
        # the loss without logits runs the final norm inside the fused lm-head + cross-entropy
        fused = labels is not None and not return_logits
        # a prefill through the cache then returns only the hidden states that get logits
        keep_last = logits_to_keep if cache is not None and labels is None else 0
        hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, final_norm=not fused,
                            keep_last=keep_last)

        logits = loss = segment_losses = None
        if fused:
            loss, segment_losses = condensation_loss(
                labels, self.config.segment_length, self.config.loss_reduction, hidden=hidden, norm=self.model.norm,
                lm_head=self.lm_head, chunk_tokens=self.config.loss_chunk_tokens,
            )
        else:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # [B, L, V]
            if labels is not None:
                loss, segment_losses = condensation_loss(
                    labels, self.config.segment_length, self.config.loss_reduction,
                    logits=self.lm_head(hidden) if logits_to_keep else logits,
                )
        return CondensationCausalLMOutput(loss=loss, logits=logits, segment_losses=segment_losses, **{_CACHE_FIELD: cache})

    # --- generation: transformers' GenerationMixin drives decoding; the cache is ours

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, past_key_values=None, attention_mask=None, inputs_embeds=None, **kwargs
    ):
        cache = cache if cache is not None else past_key_values
        if cache is None:
            cache = CondensationCache(self.config.num_hidden_layers)
        inputs = {"cache": cache, "use_cache": True, "logits_to_keep": 1}
        if inputs_embeds is not None and cache.seen_tokens == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, cache.seen_tokens :]
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs
