"""How the Condensation model is made fast to train, kept apart from the model (modeling.py), as torchtitan keeps
its model apart from its parallelisms and kernels. None of this changes what the model computes.

- Stacked weights: LayerWeights holds k layers' weights stacked ([k, in, out] projections) so that one batched matmul
  serves a whole wavefront diagonal of cells; StackedLayers stacks them once per forward and serves layer ranges.
- Stacked parameters (stacked_params): LayerStack makes the stack the parameters' own storage (one nn.Parameter per
  LayerWeights field, [N, in, out] projections); each layer's modules see their weight as a view of it, and the
  state dict keeps the per-layer keys of a HF Llama. No per-forward copy, and weight sinks add into the stacked
  parameters' own .grad.
- Weight sinks (weight_grads="accumulate" | "deferred"): SlicedWeight / _SlicedBmm hand each step's (x, g) to a
  WeightSink instead of autograd; _StackWeights returns the sink's gradients to the per-layer parameters.
- Compiled cells (compile_cells): compiled_step compiles a whole scheduled step, compiled_pointwise only a cell's
  elementwise pieces (with weight_grads other than "autograd", whose matmuls stay eager).
- The fused loss: NormLinearCrossEntropy (final norm + lm-head + cross-entropy in chunks, gradients computed in the
  forward pass; loss_chunk_tokens).
- The embedding sink: inside group checkpoints each group embeds its own segments (_SinkEmbedding) and their
  gradient rows go into one [V, d] buffer (EmbeddingSink), returned as the weight's gradient by
  _GradFromEmbeddingSink.

Shapes as in modeling.py: k layers (cells) of a step, M rows, d hidden, V vocab.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cross_entropy_grad_

# ----------------------------------------------------------------------------------------------------------------
# Stacked weights. Weights of k consecutive layers are stacked so that one batched matmul serves a whole wavefront
# diagonal; a single layer is a [1, ...] view (no copy).


class LayerWeights(NamedTuple):
    """Weights of k layers, projections stored transposed ([k, in, out]) so that a cell's weight gradients come out
    of bmm contiguous; with [k, out, in] they are transposed views, and every scheduled step then paid a strided
    copy of all its weights' gradients (the largest kernel of a 1B-size step)."""

    input_norm: torch.Tensor  # [k, d]
    q: torch.Tensor  # [k, d, H*D]
    k: torch.Tensor  # [k, d, Hkv*D]
    v: torch.Tensor  # [k, d, Hkv*D]
    o: torch.Tensor  # [k, H*D, d]
    post_norm: torch.Tensor  # [k, d]
    gate: torch.Tensor  # [k, d, I]
    up: torch.Tensor  # [k, d, I]
    down: torch.Tensor  # [k, I, d]
    memory_norm: torch.Tensor | None = None  # [k, d] with memory_norm="separate"; None: the memory uses input_norm

    @staticmethod
    def params(layer) -> list[torch.Tensor]:
        """A decoder layer's parameters in field order (projections as stored: [out, in]); memory_layernorm last, when
        the layer has one."""
        params = [layer.input_layernorm.weight, layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                  layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                  layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
        if getattr(layer, "memory_layernorm", None) is not None:
            params.append(layer.memory_layernorm.weight)
        return params

    @classmethod
    def of(cls, layers) -> "LayerWeights":
        tensors = [[t.T if t.dim() == 2 else t for t in cls.params(layer)] for layer in layers]
        if len(tensors) == 1:
            return cls(*(t.unsqueeze(0) for t in tensors[0]))
        return cls(*(torch.stack(ts) for ts in zip(*tensors)))

    def present(self) -> tuple:
        """The fields that hold weights (memory_norm, the one optional field, is last)."""
        return tuple(self) if self.memory_norm is not None else tuple(self)[:-1]

    def first(self, m: int) -> "LayerWeights":
        """The first m layers."""
        return LayerWeights(*(t[:m] for t in self.present()))

    def memory_norm_weight(self) -> torch.Tensor:
        return self.input_norm if self.memory_norm is None else self.memory_norm


class StackedLayers:
    """All layers' weights stacked once per forward, served to scheduled steps as layer ranges [lo, hi).

    weight_grads="autograd": the full range is the stack itself; a partial one is stacked from per-layer views.
    (Slicing the stack instead would make each step's backward allocate and fill a gradient the size of all layers.)
    Otherwise projections are served as SlicedWeight (a view of the stack; the gradient goes to a WeightSink).
    Layers of a LayerStack (stacked_params) are not stacked again: ranges are views of its parameters, and a sink adds
    into their own .grad; under "autograd" each range's gradient is added into one full-size buffer per backward
    (_StackRange), which reaches the parameters through autograd."""

    def __init__(self, layers, weight_grads: str = "autograd"):
        self.n = len(layers)
        self.sink = None
        self.offset = 0  # with a LayerStack: index of layers[0] in it
        self._stacked = False  # a LayerStack under "autograd": ranges are served by _StackRange
        found = LayerStack.of(layers)
        if found is not None:
            stack, self.offset = found
            self._stack = stack
            if weight_grads == "autograd":
                self._grads: dict[int, torch.Tensor] = {}  # field index -> the ranges' summed gradient (_StackRange)
                self.all = LayerWeights(*_StackGrads.apply(self._grads, *stack.fields()))
                self._stacked = True
            else:
                self.sink = WeightSink(weight_grads, params=stack.projections())
                self.all = LayerWeights(*_StackedParamGrads.apply(self.sink, *stack.fields()))
        elif weight_grads == "autograd":
            self.all = LayerWeights.of(layers)
            self._layers = list(zip(*(t.unbind(0) for t in self.all.present())))  # per layer: contiguous views
        else:
            self.sink = WeightSink(weight_grads)
            n_fields = len(LayerWeights.params(layers[0]))
            params = (t for layer in layers for t in LayerWeights.params(layer))
            self.all = LayerWeights(*_StackWeights.apply(self.sink, n_fields, *params))

    def range(self, lo: int, hi: int) -> LayerWeights:
        lo, hi = lo + self.offset, hi + self.offset
        if self.sink is not None:
            # the norms whole when the range is all of them: a slice's backward would allocate and fill a zero [N, d]
            # gradient to copy its own into, for every step
            return LayerWeights(*((t if (lo, hi) == (0, t.shape[0]) else t[lo:hi]) if name.endswith("norm")
                                  else SlicedWeight(t, lo, hi, self.sink, name)
                                  for name, t in zip(LayerWeights._fields, self.all.present())))
        if self._stacked:  # a LayerStack: views of _StackGrads' outputs, never the Parameters themselves (a compiled
            # step given Parameters recompiled differently in a checkpoint's recomputation: saved tensors out of order).
            # Each range adds its gradient into one stack-sized buffer (self._grads), where a slice's backward would allocate and fill a
            # zero gradient the size of the stack for every step, for autograd to add them (212 MB a step on
            # SmolLM2). The whole-stack ranges too: their gradients summed by autograd apart from the buffer held a
            # second stack-sized tensor to the end of backward (+212 MB at SmolLM2's 16K peak)
            return LayerWeights(*_StackRange.apply(self._grads, lo, hi, *self.all.present()))
        if (lo, hi) == (0, self.n):
            return self.all
        if hi - lo == 1:
            return LayerWeights(*(t.unsqueeze(0) for t in self._layers[lo]))
        return LayerWeights(*(torch.stack(ts) for ts in zip(*self._layers[lo:hi])))


class SlicedWeight:
    """Layers [lo, hi) of one projection stacked over all layers (full [N, in, out]); _linear's weight gradient goes
    to the sink instead of through autograd."""

    __slots__ = ("full", "lo", "hi", "sink", "name")

    def __init__(self, full: torch.Tensor, lo: int, hi: int, sink: "WeightSink", name: str):
        self.full, self.lo, self.hi, self.sink, self.name = full, lo, hi, sink, name

    def __getitem__(self, item: slice) -> "SlicedWeight":  # w[:m]: the first m layers of the range
        if not (isinstance(item, slice) and item.start is None and item.step is None and item.stop is not None):
            raise TypeError(f"SlicedWeight supports [:m] only, got {item!r}")
        return SlicedWeight(self.full, self.lo, self.lo + min(item.stop, self.hi - self.lo), self.sink, self.name)


class WeightSink:
    """Weight gradients of a forward's SlicedWeight matmuls (StackedLayers with weight_grads != "autograd").

    "accumulate": x^T g of each step goes into one [N, in, out] buffer per projection with baddbmm.
    "deferred": each step's (x, g) is kept per layer; at the end of backward, layer n's gradient is one GEMM over all
    its rows, cat(g)^T cat(x), in the parameter's own [out, in] layout.
    With `params` (stacked_params: a LayerStack's projections, [N, in, out]) the buffer is the parameter's own .grad
    (created as zeros when None, else added to, as autograd would): no second stacked buffer; "deferred" writes
    there in flush()."""

    def __init__(self, mode: str, params: dict[str, torch.Tensor] | None = None):
        self.mode = mode
        self.params = params
        self.buffers: dict[str, torch.Tensor] = {}
        self.rows: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _buffer(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if self.params is None:
            if name not in self.buffers:
                self.buffers[name] = torch.zeros_like(full)
            return self.buffers[name]
        p = self.params[name]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return p.grad

    def add(self, name: str, lo: int, x: torch.Tensor, g: torch.Tensor, full: torch.Tensor) -> None:
        # x [k, M, in], g [k, M, out]: layers lo .. lo + k - 1
        if self.mode == "accumulate":
            self._buffer(name, full)[lo : lo + x.shape[0]].baddbmm_(x.transpose(1, 2), g)
        else:
            for i in range(x.shape[0]):
                self.rows.setdefault((name, lo + i), []).append((x[i], g[i]))

    def _rows(self, name: str, n: int, cache: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer n's `name` rows, concatenated: x [T, in], g [T, out]; None if it had none."""
        rows = self.rows.pop((name, n), None)
        if rows is None:
            return None
        # q, k and v share their input rows: concatenate them once
        key = tuple((x.data_ptr(), x.shape[0]) for x, _ in rows)
        if key not in cache:
            cache.clear()
            cache[key] = rows[0][0] if len(rows) == 1 else torch.cat([x for x, _ in rows])
        g = rows[0][1] if len(rows) == 1 else torch.cat([g for _, g in rows])
        return cache[key], g

    def grad(self, name: str, n: int, cache: dict) -> torch.Tensor | None:
        """The gradient of layer n's `name` projection weight ([out, in]), or None if it had none."""
        if self.mode == "accumulate":
            return None if name not in self.buffers else self.buffers[name][n].T
        xg = self._rows(name, n, cache)
        return None if xg is None else xg[1].T @ xg[0]  # [out, T] @ [T, in]

    def flush(self) -> None:
        """"deferred" with `params`: every layer's products added into the parameters' .grad ([in, out] slices)."""
        cache = {}
        for n in sorted({n for _, n in self.rows}):
            for name in LayerWeights._fields:  # q, k, v in a row: they share their inputs (the cache)
                xg = self._rows(name, n, cache)
                if xg is not None:
                    self._buffer(name, None)[n].addmm_(xg[0].T, xg[1])  # [in, T] @ [T, out]


class _StackWeights(torch.autograd.Function):
    """Per-layer parameters -> LayerWeights stacked over layers (projections transposed to [N, in, out]). In
    backward, the projections' gradients come from the sink; the norms' flow in through autograd."""

    @staticmethod
    def forward(ctx, sink: WeightSink, n_fields: int, *params):
        per_field = [params[j::n_fields] for j in range(n_fields)]
        ctx.sink, ctx.n_layers = sink, len(params) // n_fields
        ctx.set_materialize_grads(False)
        return tuple(torch.stack([t.T if t.dim() == 2 else t for t in ts]) for ts in per_field)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        out, cache = [], {}
        for n in range(ctx.n_layers):
            for name, g in zip(LayerWeights._fields, grads):
                if name.endswith("norm"):  # served as plain slices: autograd brings their gradients
                    out.append(None if g is None else g[n])
                else:
                    gw = ctx.sink.grad(name, n, cache)
                    if g is not None:  # not reached by _linear, but counted all the same
                        gw = g[n].T if gw is None else gw + g[n].T
                    out.append(gw)
        return (None, None, *out)


class _StackIdentity(torch.autograd.Function):
    """Identity on a LayerStack's parameters, whose backward runs after that of every op that used its outputs
    (autograd runs a node once all its consumers have); `state` is what the subclass's backward finishes."""

    @staticmethod
    def forward(ctx, state, *params):
        ctx.state = state
        ctx.set_materialize_grads(False)
        return tuple(p.view_as(p) for p in params)


class _StackedParamGrads(_StackIdentity):
    """stacked_params with weight_grads != "autograd", state a WeightSink: after every _SlicedBmm, "deferred" writes
    the layers' products into the parameters' .grad (WeightSink.flush); "accumulate" already added them there. The
    norms' gradients come through autograd and pass on."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        ctx.state.flush()
        return (None, *grads)


class _StackGrads(_StackIdentity):
    """stacked_params with weight_grads="autograd", state the ranges' buffers (one per field, made in backward by the
    first range to need it; StackedLayers._grads): serves StackedLayers' ranges; after every
    range's backward, the ranges' buffer goes on through autograd, so AccumulateGrad and its hooks (DeepSpeed ZeRO's)
    see the parameters' gradient as from any other op."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gs):
        # popped, not kept: the next backward of the same forward (retain_graph) starts from zeros, and
        # AccumulateGrad can take the buffer as .grad without a copy
        out = []
        for i, g in enumerate(gs):
            buf = ctx.state.pop(i, None)
            out.append(g if buf is None else buf if g is None else buf.add_(g))
        return (None, *out)


class _StackRange(torch.autograd.Function):
    """Layers [lo, hi) of _StackGrads' outputs, as views; backward adds each gradient into its rows of the buffer
    (zeros made by the first range's backward) and passes nothing on: _StackGrads returns the buffer. Only the backward
    of the forward's own nodes touches the buffer: a checkpoint's recomputation makes nodes that never run backward."""

    @staticmethod
    def forward(ctx, grads: dict[int, torch.Tensor], lo: int, hi: int, *full):
        ctx.grads, ctx.lo, ctx.hi = grads, lo, hi
        ctx.set_materialize_grads(False)
        ctx.like = [(t.shape, t.dtype, t.device) for t in full]
        return tuple(t[lo:hi] for t in full)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gs):
        bufs = ctx.grads
        for i, g in enumerate(gs):
            if g is None:
                continue
            if i not in bufs:
                shape, dtype, device = ctx.like[i]
                bufs[i] = torch.zeros(shape, dtype=dtype, device=device)
            bufs[i][ctx.lo : ctx.hi].add_(g)
        return (None, None, None, *[None] * len(gs))


class _SlicedBmm(torch.autograd.Function):
    """x [k, M, in] @ w.full[lo:hi]; backward returns the input gradient and hands (x, g) to the sink."""

    @staticmethod
    def forward(ctx, x, full, w: SlicedWeight):
        ctx.save_for_backward(x, full)
        ctx.w = w
        return torch.bmm(x, full[w.lo : w.hi])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, full = ctx.saved_tensors
        w = ctx.w
        w.sink.add(w.name, w.lo, x, g, full)
        return torch.bmm(g, full[w.lo : w.hi].transpose(1, 2)), None, None


def _linear(x: torch.Tensor, w: torch.Tensor | SlicedWeight) -> torch.Tensor:
    # x [k, ..., in], w [k, in, out] -> [k, ..., out]
    shape = x.shape
    x = x.reshape(shape[0], -1, shape[-1])
    y = _SlicedBmm.apply(x, w.full, w) if isinstance(w, SlicedWeight) else torch.bmm(x, w)
    return y.view(*shape[:-1], y.shape[2])



# bytes of gate / up gradient computed at once in _SwiGLUDown's backward (a few cells of a step at a time)
SWIGLU_GRAD_CHUNK_BYTES = 16 << 20


def _values(fn: Callable, a: torch.Tensor, b: torch.Tensor, *args) -> torch.Tensor:
    """fn(a, b, *args) as computed when a and b require grad (a compiled fn runs its training graph, as in the step
    it replaces), without keeping the graph."""
    with torch.enable_grad():
        return fn(a.detach().requires_grad_(), b.detach().requires_grad_(), *args).detach()


def _silu_mul_grads_(gate: torch.Tensor, up: torch.Tensor, g: torch.Tensor) -> None:
    """In place, for out = silu(gate) * up and its gradient g: gate <- d out/d gate * g, up <- d out/d up * g. In
    (at least) float32 and in the order of the compiled training graph's backward (silu_backward(g * up, gate) and g * silu(gate)),
    so that compiled it gives that graph's bits."""
    x, u, gf = _at_least_fp32(gate), _at_least_fp32(up), _at_least_fp32(g)
    s = torch.sigmoid(x)
    d_gate, d_up = gf * u * (s * (1 + x * (1 - s))), gf * (x * s)  # both before either write: x may be gate itself
    gate.copy_(d_gate)
    up.copy_(d_up)


_SWIGLU_IN_PLACE = [True]  # False: the chunked autograd loop below for SiLU too (the tests' reference)


@functools.cache
def _silu_mul_grads_compiled() -> Callable:
    return _compiled_piece(_silu_mul_grads_)


class _SwiGLUDown(torch.autograd.Function):
    """down(swiglu(gate, up)) for a SlicedWeight `down`: the SwiGLU output ([k, M, I], as large as gate) is not saved
    for the down weight's gradient but recomputed from gate and up in backward, and the gradients of gate and up are
    computed a few cells at a time (SWIGLU_GRAD_CHUNK_BYTES) into gate's and up's own storage, which nothing needs
    after. Autograd's SwiGLU backward held gate, up, their output's gradient and both new gradients at once: on a
    30-cell SmolLM2 step at the peak of a training step, 2 x 47 MB above this. The same ops on the same values
    (elementwise, so the same per element whatever the chunk), the down matmul and its sink as _SlicedBmm's: the
    same bits."""

    @staticmethod
    def forward(ctx, gate, up, full, w: SlicedWeight, swiglu: Callable, act: str):
        sw = _values(swiglu, gate, up, act)
        ctx.save_for_backward(gate, up, full)
        ctx.w, ctx.swiglu, ctx.act = w, swiglu, act
        out = torch.bmm(sw.reshape(sw.shape[0], -1, sw.shape[-1]), full[w.lo : w.hi])
        return out.view(*sw.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        gate, up, full = ctx.saved_tensors
        w, k = ctx.w, gate.shape[0]
        g = g.reshape(k, -1, g.shape[-1])
        cells = max(1, SWIGLU_GRAD_CHUNK_BYTES // max(1, gate[0].numel() * gate.element_size()))
        if cells >= k:  # one chunk: the recomputed SwiGLU serves the sink and its own backward
            with torch.enable_grad():
                gi, ui = gate.detach().requires_grad_(), up.detach().requires_grad_()
                sw = ctx.swiglu(gi, ui, ctx.act)
            w.sink.add(w.name, w.lo, sw.detach().reshape(k, -1, sw.shape[-1]), g, full)
            grad_sw = torch.bmm(g, full[w.lo : w.hi].transpose(1, 2)).view(gate.shape)
            return (*torch.autograd.grad(sw, (gi, ui), grad_sw), None, None, None, None)
        sw = _values(ctx.swiglu, gate, up, ctx.act)
        w.sink.add(w.name, w.lo, sw.reshape(k, -1, sw.shape[-1]), g, full)
        del sw
        grad_sw = torch.bmm(g, full[w.lo : w.hi].transpose(1, 2)).view(gate.shape)
        if ctx.act == "silu" and _is_compiled(ctx.swiglu) and _SWIGLU_IN_PLACE[0]:
            # one compiled kernel writes both gradients over gate and up: no chunk's SwiGLU recomputed for autograd,
            # no chunk's gradients copied back (on the 1B shape, 630 copies and 290 kernels, 8 ms a step)
            _silu_mul_grads_compiled()(gate, up, grad_sw)
            return gate, up, None, None, None, None
        for a in range(0, k, cells):
            b = min(k, a + cells)
            with torch.enable_grad():
                gi, ui = gate[a:b].detach().requires_grad_(), up[a:b].detach().requires_grad_()
                si = ctx.swiglu(gi, ui, ctx.act)
            gg, gu = torch.autograd.grad(si, (gi, ui), grad_sw[a:b])
            del si, gi, ui
            gate[a:b].copy_(gg)  # gate and up are needed no more once their cells' gradients exist
            up[a:b].copy_(gu)
            del gg, gu
        return gate, up, None, None, None, None


class _NormOfStack(torch.autograd.Function):
    """rms_norm(x, weight) for x = stack(parts) (a step's inputs, kept anyway as its checkpoint's inputs) saving the
    parts, not x: the norm's own backward needs x, so autograd kept the stacked copy of the step's inputs to the end
    of the step's backward (17.7 MB on a 30-cell SmolLM2 step). Backward stacks the parts again and runs the norm's
    backward on them: the same graph (a compiled norm's training graph) on the same values, the same bits."""

    @staticmethod
    def forward(ctx, x, weight, rms_norm: Callable, eps: float, *parts):
        ctx.save_for_backward(weight, *parts)
        ctx.rms_norm, ctx.eps = rms_norm, eps
        return _values(rms_norm, x, weight, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        weight, *parts = ctx.saved_tensors
        with torch.enable_grad():
            x = torch.stack([p.detach() for p in parts]).requires_grad_()
            w = weight.detach().requires_grad_()
            h = ctx.rms_norm(x, w, ctx.eps)
        gx, gw = torch.autograd.grad(h, (x, w), gh)
        return (gx, gw if ctx.needs_input_grad[1] else None, None, None, *([None] * len(parts)))


def norm_of_stack(x: torch.Tensor, parts: list[torch.Tensor] | None, weight: torch.Tensor, rms_norm: Callable,
                  eps: float) -> torch.Tensor:
    """rms_norm(x, weight, eps) for x = torch.stack(parts); through _NormOfStack (x not saved) when parts are given
    and the norm is compiled (one kernel to recompute; eager, its ops would be as many again)."""
    if parts is not None and torch.is_grad_enabled() and x.requires_grad and _is_compiled(rms_norm):
        return _NormOfStack.apply(x, weight, rms_norm, eps, *parts)
    return rms_norm(x, weight, eps)


def _is_compiled(fn: Callable) -> bool:
    return any(fn is c for pieces in _COMPILED_POINTWISE.values() for c in pieces)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor | SlicedWeight, swiglu: Callable,
                  act: str) -> torch.Tensor:
    """_linear(swiglu(gate, up, act), w); with a SlicedWeight through _SwiGLUDown (no saved SwiGLU output)."""
    if isinstance(w, SlicedWeight) and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUDown.apply(gate, up, w.full, w, swiglu, act)
    return _linear(swiglu(gate, up, act), w)

# ----------------------------------------------------------------------------------------------------------------
# Stacked parameters (stacked_params). Stacking per forward (StackedLayers over per-layer parameters) costs a copy of
# all layer weights, and with weight sinks a stacked gradient buffer beside the per-layer .grads: ~2 x 212 MB on
# SmolLM2-135M. Here the stack is the parameters' storage: nothing to copy, and gradients go into its own .grad.

# LayerWeights field -> the layer's module holding that weight
_LAYER_PATHS = {"input_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                "v": "self_attn.v_proj", "o": "self_attn.o_proj", "post_norm": "post_attention_layernorm",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                "memory_norm": "memory_layernorm"}

_DEFER_STACKING = [0]


@contextmanager
def deferred_stacking():
    """stack_layer_parameters does nothing inside: HF's from_pretrained builds the model (on the meta device) and then
    sets each layer's weights by name, so it stacks them after loading."""
    _DEFER_STACKING[0] += 1
    try:
        yield
    finally:
        _DEFER_STACKING[0] -= 1


class _WeightView:
    """Mixin of a layer's nn.Linear / RMSNorm under stacked_params: `weight` is its slice of the LayerStack parameter,
    taken anew on every access, so it follows `.to()`, optimizer steps and any replacement of the parameter's data
    (never a stale view). Setting `weight` (HF's loaders and initialisers do) copies into the stack."""

    @property
    def weight(self) -> torch.Tensor:
        stack, name, i = self._stack_slot
        w = getattr(stack, name)[i]
        return w.T if w.dim() == 2 else w  # a Linear's [out, in], as nn.Linear holds it

    def __setattr__(self, name, value):
        if name == "weight":
            with torch.no_grad():
                self.weight.copy_(value)
        else:
            super().__setattr__(name, value)


_VIEW_CLASSES: dict[type, type] = {}


def _as_view(module: nn.Module, stack: "LayerStack", name: str, i: int) -> None:
    cls = type(module)
    if cls not in _VIEW_CLASSES:
        _VIEW_CLASSES[cls] = type(f"Stacked{cls.__name__}", (_WeightView, cls), {})
    del module._parameters["weight"]
    module.__class__ = _VIEW_CLASSES[cls]
    module._stack_slot = (stack, name, i)  # a tuple: the stack is not registered as the layer's submodule


class LayerStack(nn.Module):
    """All decoder layers' weights as one nn.Parameter per LayerWeights field, in the layout the wavefront's batched
    matmuls read: projections [N, in, out], norms [N, d] (memory_norm only with memory_norm="separate"). The layers
    keep their modules, each `weight` a view of its slice (_WeightView)."""

    def __init__(self, layers):
        super().__init__()
        self.n = len(layers)
        for name, path in _LAYER_PATHS.items():
            if name == "memory_norm" and getattr(layers[0], "memory_layernorm", None) is None:
                continue
            mods = [layer.get_submodule(path) for layer in layers]
            ws = [m.weight.detach() for m in mods]
            stacked = torch.stack([w.T if w.dim() == 2 else w for w in ws])  # [N, in, out] or [N, d]
            self.register_parameter(name, nn.Parameter(stacked, requires_grad=mods[0].weight.requires_grad))
            for i, m in enumerate(mods):
                _as_view(m, self, name, i)
        self.paths = {name: path for name, path in _LAYER_PATHS.items() if name in self._parameters}

    def fields(self) -> tuple[torch.Tensor, ...]:
        """The parameters in LayerWeights field order (LayerWeights.present())."""
        return tuple(self._parameters[name] for name in self.paths)

    def projections(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self._parameters.items() if not name.endswith("norm")}

    @staticmethod
    def of(layers) -> tuple["LayerStack", int] | None:
        """(the stack, the index of layers[0] in it) when `layers` are consecutive layers of one LayerStack."""
        slots = [getattr(layer.input_layernorm, "_stack_slot", None) for layer in layers]
        if not slots or slots[0] is None:
            return None
        stack, _, first = slots[0]
        if all(s is not None and s[0] is stack and s[2] == first + j for j, s in enumerate(slots)):
            return stack, first
        return None


def _stack_state_dict_hook(module, state_dict, prefix, local_metadata):
    """The stacked parameters as the per-layer keys of a HF Llama (model.layers.{i}.self_attn.q_proj.weight, ...), in
    the order and layout ([out, in]) an unstacked model has. Each value is a copy (all layers' weights once more while
    a state dict is held): views of one storage would read as tied weights to HF's save_pretrained."""
    stack = module.layer_stack
    fields = {name: state_dict.pop(f"{prefix}layer_stack.{name}") for name in stack.paths}
    # a layer's weights in an unstacked model's order: its modules' registration order
    modules = [n for n, _ in module.layers[0].named_modules()]
    in_order = sorted(stack.paths.items(), key=lambda kv: modules.index(kv[1]))
    per_layer = {}
    for i in range(stack.n):
        for name, path in in_order:
            w = fields[name][i]
            per_layer[f"{prefix}layers.{i}.{path}.weight"] = torch.clone(w.T if w.dim() == 2 else w,
                                                                         memory_format=torch.contiguous_format)
    # where the unstacked model has them: after the children registered before `layers`
    later = list(module._modules)[list(module._modules).index("layers") + 1 :]
    items = list(state_dict.items())
    at = next((j for j, (k, _) in enumerate(items)
               if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0] in later), len(items))
    state_dict.clear()
    state_dict.update(items[:at] + list(per_layer.items()) + items[at:])


def _stack_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
    """Per-layer keys (a HF Llama's or an unstacked model's state dict) -> the stacked parameters' keys. A field none
    of whose layer keys is given stays missing (reported per layer by _stack_load_post_hook); one given for some layers
    only keeps its current weights for the others, which are reported missing."""
    stack = module.layer_stack
    module._stack_missing = []
    for name, path in stack.paths.items():
        keys = [f"{prefix}layers.{i}.{path}.weight" for i in range(stack.n)]
        if not any(k in state_dict for k in keys):
            continue
        current = getattr(stack, name).detach()
        ws = []
        for i, k in enumerate(keys):
            if k in state_dict:
                w = state_dict.pop(k)
                ws.append(w.T if w.dim() == 2 else w)
            else:
                ws.append(current[i])
                module._stack_missing.append(k)
        state_dict[f"{prefix}layer_stack.{name}"] = torch.stack(ws)  # [N, in, out] or [N, d]


def _stack_load_post_hook(module, incompatible_keys):
    stack = module.layer_stack
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        head, _, name = key.rpartition("layer_stack.")
        if name in stack.paths and (head == "" or head.endswith(".")):
            missing.remove(key)
            missing.extend(f"{head}layers.{i}.{stack.paths[name]}.weight" for i in range(stack.n))
    missing.extend(getattr(module, "_stack_missing", []))
    module._stack_missing = []


def stack_layer_parameters(model: nn.Module) -> nn.Module:
    """Makes `model.layers`' weights views of one LayerStack, `model.layer_stack` (stacked_params), with state-dict
    hooks that keep the per-layer keys. Once per model; nothing inside deferred_stacking()."""
    if _DEFER_STACKING[0] or hasattr(model, "layer_stack"):
        return model
    model.layer_stack = LayerStack(model.layers)
    model.register_state_dict_post_hook(_stack_state_dict_hook)
    model.register_load_state_dict_pre_hook(_stack_load_pre_hook)
    model.register_load_state_dict_post_hook(_stack_load_post_hook)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Compiled cells (compile_cells)


_COMPILED_POINTWISE: dict[tuple, tuple] = {}


def compiled_pointwise(cfg, eager: tuple) -> tuple:
    """A cell's elementwise pieces (modeling.Pointwise), compiled (fused kernels, shapes dynamic: _compiled_piece)
    when a cell is compiled piecewise: compile_cells with weight_grads other than "autograd", whose matmuls stay eager.
    Otherwise plain: either eager, or traced inside the compiled step."""
    if not cfg.compile_cells or cfg.weight_grads == "autograd":
        return eager
    if eager not in _COMPILED_POINTWISE:
        _COMPILED_POINTWISE[eager] = type(eager)(*(_compiled_piece(f) for f in eager))
    return _COMPILED_POINTWISE[eager]


# Variants one compiled piece may keep (torch.compile's own recompile_limit: for these functions only, not dynamo's
# global one). With its sizes dynamic (_compiled_piece), what is left to specialise on are facts of two values each: a
# size of 1 or more (cells, tokens, batch; dynamo specialises 0 and 1 whatever the marks), a RoPE row slice at storage
# offset 0 or not, an input that is a view or not, grad mode, requires_grad: a handful per process, not a number that
# grows with depth or length: at most 5 per piece while training the Llama-3.2-1B shape, 13 once the same process also
# evaluates and generates (tests/test_modeling.py). Over dynamo's default of 8 then, but bounded: 32 still stops a
# runaway.
_PIECE_RECOMPILE_LIMIT = 32
_PER_FUNCTION_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


def _compiled_piece(fn: Callable) -> Callable:
    """fn through torch.compile, every dim of its tensor arguments but the last dynamic from the first call.

    A piece is called with all the sizes of a wavefront: k = 1 .. layers cells, c = l tokens of a segment, l + c of a
    memory and its segment, p of an attention sink, H or Hkv heads. Left to dynamo's automatic dynamic shapes, a dim
    was compiled static first and recompiled dynamic at its first change, once for each variant the piece had
    otherwise: with the head split and the RoPE, taken or not, in one compiled function, the Llama-3.2-1B shape hit the
    recompile limit (8) at its ninth variant of _heads and ran eagerly from there. The last dim (hidden, head dim,
    intermediate) is fixed by the model and stays static, so that the kernels' index arithmetic keeps it a constant
    (RoPE's roll by D / 2). A view's base is marked as well: dynamo guards its sizes too."""
    # torch.compile's per-function recompile_limit is recent (2.13 has it); without it, dynamo's default (8) still
    # holds a training process's variants (<= 5), and evaluation or generation past it runs those variants eager
    compiled = torch.compile(fn, **({"recompile_limit": _PIECE_RECOMPILE_LIMIT} if _PER_FUNCTION_LIMIT else {}))

    @functools.wraps(fn)
    def piece(*args):
        for a in args:
            if isinstance(a, torch.Tensor):
                for t in (a, a._base) if a._base is not None else (a,):
                    for dim in range(t.dim() - 1):
                        torch._dynamo.maybe_mark_dynamic(t, dim)
        return compiled(*args)

    return piece


_COMPILED: dict[tuple, Callable] = {}


def compiled_step(cfg, step: Callable) -> Callable:
    """A scheduled step (modeling._cells_step) through torch.compile when compile_cells and weight_grads="autograd";
    otherwise step itself (the latter compiles only the pieces: compiled_pointwise)."""
    if not cfg.compile_cells or cfg.weight_grads != "autograd":
        return step
    mode = None if cfg.compile_cells is True else cfg.compile_cells
    # k takes every value 1..layers on the wavefront's ramps, each with and without memory. Past dynamo's default
    # limit of 8 variants it silently runs the rest eagerly, and a checkpoint's recomputation can then differ from its
    # forward (one compiled, one eager): allow them all, for the deepest model seen so far. With an attention sink,
    # cells with and without a sink double the variants; memories given stacked (one tensor) or as a list double them.
    per_k = 8 if cfg.memory_sink_tokens == 0 else 16
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, per_k * cfg.num_hidden_layers + 8)
    if (step, mode) not in _COMPILED:  # one compiled function per mode; dynamo re-specialises on k and on memory
        _COMPILED[step, mode] = torch.compile(step, mode=mode, dynamic=False)  # presence
    return _COMPILED[step, mode]


# ----------------------------------------------------------------------------------------------------------------
# The fused loss (the training path of eq. 17 in modeling.condensation_loss)


# rows of the lm-head weight gradient computed per matmul in NormLinearCrossEntropy's forward (see there)
_LM_GRAD_ROWS = 16384


_ADDMM_OUT_DTYPE = [True]  # cleared once torch.addmm(..., out_dtype=) is found missing or refused


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32 and a, b in bf16 / fp16. On a GPU one GEMM that adds into acc in float32 (addmm with
    out_dtype: no product rounded to 16 bits, no [m, n] temporary, no separate add kernel: 9 ms a step on the 1B
    shape's 128K-vocabulary lm-head gradient). Elsewhere the product in row slices of _LM_GRAD_ROWS, each added into
    acc without a temporary the size of acc (131 MB in bf16 on the Table I model)."""
    if acc.is_cuda and acc.dtype != a.dtype and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):  # an older torch: the first (eager) step finds out
            _ADDMM_OUT_DTYPE[0] = False
    for v in range(0, a.shape[0], _LM_GRAD_ROWS):
        acc[v : v + _LM_GRAD_ROWS] += a[v : v + _LM_GRAD_ROWS] @ b


def _final_rms_norm(y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # y [c, d], weight [d]: float32 statistics, exactly LlamaRMSNorm (and modeling._rms_norm for one layer)
    yf = y.float()
    yf = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * yf.to(y.dtype)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class NormLinearCrossEntropy(torch.autograd.Function):
    """loss = sum_t w_t * CE(lm_head(final_norm(y_t)), target_t), and each token's CE (no gradient).

    Runs over chunks of tokens and computes the gradients of y, the norm weight and the lm-head weight inside the
    forward pass, chunk by chunk; backward only scales them. So [n, V] logits never exist beyond one chunk, the
    lm-head matmul is not recomputed (checkpointing it costs a third more lm-head FLOPs), and nothing of size
    [n, d] is saved but the gradient of y. With the paper's 128K vocabulary the lm-head is half the model's FLOPs."""

    @staticmethod
    def forward(ctx, y, norm_weight, lm_weight, targets, token_weights, eps: float, chunk: int):
        # y [n, d] (pre-norm), targets [n] (-100 ignored), token_weights [n]
        acc = torch.promote_types(lm_weight.dtype, torch.float32)
        grad_y = torch.empty_like(y)
        grad_norm = torch.zeros(norm_weight.shape, dtype=acc, device=y.device)
        grad_lm = torch.zeros(lm_weight.shape, dtype=acc, device=y.device)
        ce = torch.empty(y.shape[0], dtype=acc, device=y.device)
        for i in range(0, y.shape[0], chunk):
            t = targets[i : i + chunk]
            with torch.enable_grad():
                yc, nw = y[i : i + chunk].detach().requires_grad_(), norm_weight.detach().requires_grad_()
                h = _final_rms_norm(yc, nw, eps)  # [c, d], exactly LlamaRMSNorm
            g = h.detach() @ lm_weight.T  # [c, V] logits, then in place d loss / d logits = w_t * (softmax - onehot)
            ce[i : i + chunk] = cross_entropy_grad_(g, t, token_weights[i : i + chunk])
            _add_matmul_(grad_lm, g.T, h.detach())  # the lm-head gradient g^T h
            with torch.enable_grad():
                gy, gn = torch.autograd.grad(h, (yc, nw), g @ lm_weight)
            grad_y[i : i + chunk] = gy
            grad_norm += gn
            # this chunk's logits freed before the next chunk's matmul: held by `g`, they were alive beside the next
            # chunk's, two [c, V] chunks at once (2 x 525 MB at 2048 tokens and a 128K vocabulary in bf16)
            del g
        ctx.save_for_backward(grad_y, grad_norm, grad_lm)
        ctx.dtypes, ctx.used = (norm_weight.dtype, lm_weight.dtype), False
        ctx.mark_non_differentiable(ce)
        return (ce * token_weights.to(acc)).sum(), ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, g_ce):
        grad_y, grad_norm, grad_lm = ctx.saved_tensors
        if ctx.used:
            raise RuntimeError("NormLinearCrossEntropy's saved gradients were scaled in place by a first backward; "
                               "it cannot run backward twice (retain_graph=True)")
        ctx.used = True
        # in place: a second [n, d] buffer would be 1 GiB at 1M tokens, a second float32 [V, d] one 263 MB at 128K vocab
        return (grad_y.mul_(g_loss.to(grad_y.dtype)), grad_norm.mul_(g_loss).to(ctx.dtypes[0]),
                grad_lm.mul_(g_loss).to(ctx.dtypes[1]), None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# Embedding inside group checkpoints


class EmbeddingSink:
    """An nn.Embedding's weight gradient, gathered from many small lookups (the groups of a checkpointed forward) and
    summed in float32; the padding_idx row gets none (nn.Embedding's rule).

    The rows each lookup's backward brings are kept as they come and summed into the float32 [V, d] buffer only when
    the gradient is taken (the end of backward), when every group's recomputed activations are gone. Adding each
    group's rows on arrival kept that buffer alive through the whole backward, beside the activations of the group
    being recomputed: 263 MB on the Table I model (128K vocabulary), while all rows of 16K tokens are 16 MB. Past
    `row_bytes_limit` bytes of rows (default: the buffer's own size, 256K tokens of that model in bf16) the rows are
    summed on arrival as before, so that rows never take more memory than the buffer would. Either way each element
    is the same float32 sum in the same order."""

    def __init__(self, embedding: nn.Embedding, row_bytes_limit: int | None = None):
        self.weight, self.padding_idx = embedding.weight, embedding.padding_idx
        self.dtype = torch.promote_types(self.weight.dtype, torch.float32)
        self.row_bytes_limit = (self.weight.numel() * self.dtype.itemsize if row_bytes_limit is None
                                else row_bytes_limit)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids [r], gradient rows [r, d])
        self.row_bytes = 0
        self.grad: torch.Tensor | None = None  # the float32 sum, once rows were summed

    def add(self, ids: torch.Tensor, g: torch.Tensor) -> None:
        g = g.reshape(-1, g.shape[-1])
        if g.untyped_storage().nbytes() > g.numel() * g.element_size():
            g = g.clone()  # a view would keep its whole base (e.g. a stack of several cells' gradients) alive
        self.rows.append((ids.flatten(), g))
        self.row_bytes += g.numel() * g.element_size()
        if self.grad is not None or self.row_bytes > self.row_bytes_limit:
            self._sum_rows()

    def _sum_rows(self) -> None:
        if self.grad is None:
            self.grad = torch.zeros(self.weight.shape, dtype=self.dtype, device=self.weight.device)
        while self.rows:  # popped one by one: each is freed once summed
            ids, g = self.rows.pop(0)
            self.grad.index_add_(0, ids, g.to(self.dtype))
        self.row_bytes = 0

    def take(self, other: torch.Tensor | None) -> torch.Tensor | None:
        """The weight's gradient in its dtype: the rows' float32 sum (padding row zero) plus `other` (the gradient of
        the weight's other uses, or None), added in float32 before the one rounding; None if no rows came."""
        if not self.rows and self.grad is None:
            return other
        self._sum_rows()
        grad, self.grad = self.grad, None
        if self.padding_idx is not None:
            grad[self.padding_idx] = 0
        if other is not None:
            grad += other
        return grad.to(self.weight.dtype)


class _SinkEmbedding(torch.autograd.Function):
    """F.embedding(ids, weight) whose weight gradient rows go to the sink (returned by _GradFromEmbeddingSink)."""

    @staticmethod
    def forward(ctx, ids, weight, sink: EmbeddingSink):
        ctx.save_for_backward(ids)
        ctx.sink = sink
        return F.embedding(ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        ctx.sink.add(ctx.saved_tensors[0], g)
        return None, None, None


class _GradFromEmbeddingSink(torch.autograd.Function):
    """Identity on the embedding weight; in backward (after every _SinkEmbedding that used its output) it returns the
    sink's rows as the weight's gradient, with nn.Embedding's padding_idx row kept at zero."""

    @staticmethod
    def forward(ctx, weight, sink: EmbeddingSink):
        ctx.sink = sink
        ctx.set_materialize_grads(False)
        return weight.view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return ctx.sink.take(g), None
