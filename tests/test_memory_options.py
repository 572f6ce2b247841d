"""The memory options beyond the paper (docs/model.md, "Options beyond the paper"): `memory_sink_tokens` (an attention
sink in every memory) and `memory_norm="separate"` (the memory's own RMSNorm), checked against an independent plain
loop over transformers' Llama modules that extends the rules of docs/model.md with them, in float64.

Weights are drawn with std 0.15 and norm weights around 1 +- 0.2 (the memory norm drawn apart from the input norm), so
that a sink at the wrong position, a duplicated or missing sink, or the wrong norm moves the logits far beyond
round-off; negative controls show each such mistake is caught by the same comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb, repeat_kv

import condensation  # noqa: F401  (registers the model type with the Auto classes)
from condensation import CondensationCache, CondensationConfig, CondensationForCausalLM

ARCH = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096)


def make(segment_length: int, seed: int = 0, dtype=torch.float64, **options) -> CondensationForCausalLM:
    model = CondensationForCausalLM(CondensationConfig(**ARCH, segment_length=segment_length, **options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


class Reference(torch.nn.Module):
    """The same weights as a LlamaForCausalLM plus, for memory_norm="separate", one LlamaRMSNorm per layer."""

    def __init__(self, model: CondensationForCausalLM):
        super().__init__()
        self.llama = LlamaForCausalLM(LlamaConfig(**ARCH)).to(model.dtype)
        state = model.state_dict()
        self.llama.load_state_dict({k: v for k, v in state.items() if "memory_layernorm" not in k})
        self.memory_norms = None
        if model.config.memory_norm == "separate":
            self.memory_norms = torch.nn.ModuleList(LlamaRMSNorm(ARCH["hidden_size"], ARCH["rms_norm_eps"])
                                                    for _ in range(ARCH["num_hidden_layers"])).to(model.dtype)
            for n, norm in enumerate(self.memory_norms):
                norm.weight.data.copy_(state[f"model.layers.{n}.memory_layernorm.weight"])

    def grads(self) -> dict[str, torch.Tensor]:
        out = {f"{k}": p.grad for k, p in self.llama.named_parameters()}
        if self.memory_norms is not None:
            out.update({f"model.layers.{n}.memory_layernorm.weight": m.weight.grad
                        for n, m in enumerate(self.memory_norms)})
        return out

    def logits(self, input_ids, l, sink=0, positions="cache", sink_at="s>=2", norm="memory", trunc=None):
        """One segment and one layer at a time (rules 1-5), the memory of segment s >= 2 prefixed by the layer's outputs
        for the first `sink` tokens of the sequence.

        positions: "cache" (sink [-k, 0), memory [0, l), segment [l, ...)), or "global" (the paper's global
            positions for memory and segment, the sink right before the memory): the same attention (Rule 6);
            the mistake "sink_at_0" (the sink at its global positions [0, k), the rest global).
        sink_at: "s>=2" (the option), or the mistakes "s>=1" (segment 1 sees the first tokens twice) and "never".
        norm: "memory" (memory_layernorm when the model has it, else input_layernorm), or the mistake "input".
        trunc: memory_grad_segments (memory detached when s % trunc == 0, the sink when s >= trunc).
        """
        m, cfg = self.llama.model, self.llama.config
        B, L = input_ids.shape
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        emb = m.embed_tokens(input_ids)
        mems, sinks, outs = [None] * cfg.num_hidden_layers, [None] * cfg.num_hidden_layers, []
        for s, start in enumerate(range(0, L, l)):
            x = emb[:, start : start + l]
            r = x.shape[1]
            for n, layer in enumerate(m.layers):
                attn = layer.self_attn
                mnorm = layer.input_layernorm if self.memory_norms is None or norm == "input" else self.memory_norms[n]
                h = layer.input_layernorm(x)
                parts, pos = [], []
                with_sink = sink and (s >= 2 if sink_at == "s>=2" else s >= 1 if sink_at == "s>=1" else False)
                if with_sink:
                    sk = sinks[n].detach() if trunc is not None and s >= trunc else sinks[n]
                    parts.append(mnorm(sk))
                    pos.append(torch.arange(-sink, 0) if positions == "cache" else torch.arange(sink)
                               if positions == "sink_at_0" else torch.arange((s - 1) * l - sink, (s - 1) * l))
                if mems[n] is not None:
                    mem = mems[n].detach() if trunc is not None and s % trunc == 0 else mems[n]
                    parts.append(mnorm(mem))
                    pos.append(torch.arange(l) if positions == "cache" else torch.arange((s - 1) * l, s * l))
                pos_q = torch.arange(l, l + r) if positions == "cache" else torch.arange(start, start + r)
                kv_in = torch.cat(parts + [h], 1)
                pos_k = torch.cat(pos + [pos_q])
                n_prefix = kv_in.shape[1] - r
                q = attn.q_proj(h).view(B, r, H, D).transpose(1, 2)
                k = attn.k_proj(kv_in).view(B, n_prefix + r, Hkv, D).transpose(1, 2)
                v = attn.v_proj(kv_in).view(B, n_prefix + r, Hkv, D).transpose(1, 2)
                cq, sq = m.rotary_emb(x, pos_q[None])
                ck, sk_ = m.rotary_emb(x, pos_k[None])
                q, _ = apply_rotary_pos_emb(q, q, cq, sq)
                k, _ = apply_rotary_pos_emb(k, k, ck, sk_)
                k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
                scores = q @ k.transpose(-1, -2) / math.sqrt(D)
                i, j = torch.arange(r)[:, None], torch.arange(n_prefix + r)[None]
                scores = scores.masked_fill(j > i + n_prefix, float("-inf"))  # every prefix key, causal within
                o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, r, H * D)
                x_mid = x + attn.o_proj(o)
                y = x_mid + layer.mlp(layer.post_attention_layernorm(x_mid))
                mems[n] = y
                if s == 0:
                    sinks[n] = y[:, :sink]
                x = y
            outs.append(x)
        return self.llama.lm_head(m.norm(torch.cat(outs, 1)))


def max_diff(a, b):
    return (a - b).abs().max().item()


def ids_for(B, L, seed=0):
    return torch.randint(0, ARCH["vocab_size"], (B, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("schedule", ["wavefront", "sequential"])
@pytest.mark.parametrize("B,L,l,sink,norm", [(2, 45, 8, 2, "shared"), (1, 40, 8, 8, "shared"), (2, 29, 6, 1, "separate"),
                                             (2, 37, 8, 3, "separate"), (1, 30, 8, 0, "separate")])
def test_matches_reference(schedule, B, L, l, sink, norm):
    model = make(l, memory_sink_tokens=sink, memory_norm=norm, segment_schedule=schedule)
    ref = Reference(model)
    ids = ids_for(B, L, seed=L)
    with torch.no_grad():
        ours = model(ids).logits
        assert max_diff(ours, ref.logits(ids, l, sink)) < 1e-9
        # the paper's global positions with the sink right before the memory: the same attention up to the float32
        # RoPE table's rounding (Rule 6)
        assert max_diff(ours, ref.logits(ids, l, sink, positions="global")) < 1e-5


def test_negative_controls_are_caught():
    l, sink = 8, 2
    model = make(l, memory_sink_tokens=sink, memory_norm="separate")
    ref = Reference(model)
    ids = ids_for(2, 40, seed=1)
    with torch.no_grad():
        ours = model(ids).logits
        assert max_diff(ours, ref.logits(ids, l, sink)) < 1e-9
        for wrong, first_changed in ((dict(sink_at="never"), 2), (dict(positions="sink_at_0"), 2),
                                     (dict(sink_at="s>=1"), 1), (dict(norm="input"), 1)):
            other = ref.logits(ids, l, sink, **wrong)
            assert max_diff(ours[:, first_changed * l :], other[:, first_changed * l :]) > 1e-2, wrong
            # (global positions round differently in the float32 RoPE table)
            assert max_diff(ours[:, : first_changed * l], other[:, : first_changed * l]) < 1e-5, wrong


def test_options_off_or_at_their_initial_values_are_the_paper_model():
    """memory_norm="separate" with memory_layernorm = input_layernorm (as loaded from a Llama) computes the paper's
    model exactly, and so does a sink of 0; a sink does not touch segments 0 and 1."""
    l = 8
    base = make(l)
    ids = ids_for(2, 37, seed=2)
    separate = make(l, memory_norm="separate")
    state = base.state_dict()
    state.update({f"model.layers.{n}.memory_layernorm.weight": state[f"model.layers.{n}.input_layernorm.weight"]
                  for n in range(ARCH["num_hidden_layers"])})
    separate.load_state_dict(state)
    sink = make(l, memory_sink_tokens=3)
    sink.load_state_dict(base.state_dict())
    with torch.no_grad():
        expected = base(ids).logits
        assert max_diff(separate(ids).logits, expected) == 0
        assert max_diff(sink(ids).logits[:, : 2 * l], expected[:, : 2 * l]) < 1e-9
        assert max_diff(sink(ids).logits[:, 2 * l :], expected[:, 2 * l :]) > 1e-2


def test_one_segment_is_still_llama():
    model = make(16, dtype=torch.float32, memory_sink_tokens=4, memory_norm="separate")
    ref = Reference(model)
    ids = ids_for(2, 13, seed=3)
    with torch.no_grad():
        assert max_diff(model(ids).logits, ref.llama(ids).logits) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Gradients: every path against autograd through the reference loop


def _model_grads(model, ids, **kw):
    model.zero_grad()
    (4.0 * model(ids, labels=ids, return_logits=False).loss).backward()  # a power of two: norms run in float32
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference_grads(ref, ids, l, sink, trunc=None):
    ref.zero_grad()
    logits = ref.logits(ids, l, sink, trunc=trunc)
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none").view(ids.shape)
    n_seg = math.ceil(ids.shape[1] / l)
    loss = sum(ce[:, s * l : (s + 1) * l].sum() / (targets[:, s * l : (s + 1) * l] != -100).sum()
               for s in range(n_seg))  # eq. 17
    (4.0 * loss).backward()
    return ref.grads()


VARIANTS = [dict(), dict(segment_schedule="sequential"), dict(segment_schedule="sequential", checkpoint_cells=True),
            dict(checkpoint_cells=True), dict(checkpoint_group_steps=2), dict(checkpoint_group_steps=3, checkpoint_cells=True),
            dict(weight_grads="accumulate"), dict(weight_grads="deferred", checkpoint_cells=True),
            dict(weight_grads="deferred", checkpoint_group_steps=2),
            dict(memory_grad_segments=2), dict(memory_grad_segments=3, checkpoint_group_steps=2, weight_grads="deferred"),
            dict(memory_grad_segments=3, segment_schedule="sequential"),
            # 3 layers in steps of 2 cells: sinks, memories and the segment-0 cell split across steps
            dict(max_step_cells=2, checkpoint_group_steps=2, checkpoint_cells=True, weight_grads="accumulate"),
            # the depth-chosen plans: 3 layers <= 6 (groups of 2 diagonals, no per-step checkpoints); 3 > 2 (per-step
            # checkpoints, auto groups, steps of 2 cells)
            dict(checkpoint_budget_cells=6), dict(checkpoint_budget_cells=2, weight_grads="accumulate")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_reference(variant):
    l, sink = 6, 2
    model = make(l, memory_sink_tokens=sink, memory_norm="separate", **variant)
    ref = Reference(model)
    ids = ids_for(2, 33, seed=4)  # 6 segments, the last partial
    ours = _model_grads(model, ids)
    expected = _reference_grads(ref, ids, l, sink, trunc=variant.get("memory_grad_segments"))
    assert ours.keys() == expected.keys()
    for name, g in expected.items():
        assert g.abs().max() > 0, name
        assert max_diff(ours[name], g) < 1e-9 * max(1.0, g.abs().max().item()), (name, variant)


def test_checkpoint_budget_plans_by_depth():
    from condensation.modeling import CheckpointPlan, checkpoint_plan
    from condensation.sizes import build_config

    def plan(size, k):
        cfg = build_config(size, checkpoint_budget_cells=k)
        return checkpoint_plan(cfg, cfg.num_hidden_layers)

    assert plan("table1", 12) == CheckpointPlan(False, 3, 4)  # 4 layers: 3 diagonals of 4 cells
    assert plan("table1", 16) == CheckpointPlan(False, 4, 4)
    assert plan("smollm2-135m", 12) == CheckpointPlan(True, "auto", 10)  # 30 layers: 3 steps of 10 a diagonal
    assert plan("smollm2-135m", 16) == CheckpointPlan(True, "auto", 15)
    assert plan("llama-3.2-1b", 12) == CheckpointPlan(True, "auto", 8)  # 16 layers: 2 steps of 8
    assert plan("table1", 0) == CheckpointPlan(False, 0, 4)  # off: the fields as set
    for bad in (dict(checkpoint_cells=True), dict(checkpoint_group_steps=4), dict(max_step_cells=2)):
        with pytest.raises(Exception, match="checkpoint_budget_cells"):  # transformers wraps the ValueError
            build_config("table1", checkpoint_budget_cells=12, **bad)
    with pytest.raises(Exception, match="checkpoint_budget_cells must be an int"):
        build_config("table1", checkpoint_budget_cells=-1)


def test_checkpoint_budget_runs_its_plan(monkeypatch):
    """The model runs what the plan says: the same checkpoints, step by step, as the explicit fields it stands for."""
    import condensation.modeling as modeling

    calls = []
    real = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda fn, *a, **kw: calls.append(fn.__name__) or real(fn, *a, **kw))

    def checkpoints(**options):
        calls.clear()
        model = make(6, **options)
        model(input_ids=ids_for(1, 33, seed=1), labels=ids_for(1, 33, seed=1)).loss.backward()
        return list(calls)

    shallow = checkpoints(checkpoint_budget_cells=6)  # 3 layers <= 6: groups of 2 diagonals only
    assert shallow == checkpoints(checkpoint_group_steps=2) and set(shallow) == {"steps"}
    deep = checkpoints(checkpoint_budget_cells=2)  # per-step checkpoints, steps of 2 cells, auto groups
    assert deep == checkpoints(checkpoint_cells=True, checkpoint_group_steps="auto", max_step_cells=2)
    assert deep.count("step") > 0 and deep.count("steps") > 0


def test_truncation_also_cuts_the_sink():
    """memory_grad_segments=4: the loss of segment 5 reaches segments 4 and 5 only, not segment 0 through the sink;
    the loss of segment 3 reaches segment 0 (through memory and sink alike)."""
    l = 4
    model = make(l, memory_sink_tokens=2, memory_grad_segments=4)
    ids = ids_for(1, 24, seed=5)
    for seg, reached in ((5, {4, 5}), (3, {0, 1, 2, 3})):
        emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb, labels=ids).segment_losses[seg].backward()
        got = {s for s in range(6) if emb.grad[:, s * l : (s + 1) * l].abs().max() > 0}
        assert got == reached, (seg, got)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(checkpoint_group_steps=3, checkpoint_cells=True, compile_cells=True),
                                     dict(weight_grads="deferred", compile_cells=True)])
def test_compiled_cells_match_reference(variant):
    l, sink = 6, 2
    model = make(l, memory_sink_tokens=sink, memory_norm="separate", **variant)
    ref = Reference(model)
    ids = ids_for(2, 33, seed=4)
    ours, expected = _model_grads(model, ids), _reference_grads(ref, ids, l, sink)
    for name, g in expected.items():  # inductor reorders the float32 norm arithmetic: float32 round-off
        assert max_diff(ours[name], g) < 1e-5 * max(1.0, g.abs().max().item()), name


# ---------------------------------------------------------------------------------------------------------------
# Generation with the bounded cache


def _cache_kwarg(cache):
    from condensation.modeling import _CACHE_FIELD

    return {_CACHE_FIELD: cache}


def test_incremental_generation_matches_full_forward():
    l, sink = 6, 2
    model = make(l, memory_sink_tokens=sink, memory_norm="separate")
    prompt = torch.randint(3, ARCH["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(11))
    cache = CondensationCache(ARCH["num_hidden_layers"])
    out = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, **_cache_kwarg(cache))
    seq = out.sequences  # 29 tokens: segments 2-4 see the sink
    with torch.no_grad():
        full = model(seq).logits
        assert max_diff(full, Reference(model).logits(seq, l, sink)) < 1e-9
    for step, step_logits in enumerate(out.logits):
        assert max_diff(step_logits, full[:, prompt.shape[1] + step - 1].float()) < 1e-5, step
    assert cache.peak_keys == 2 * l + sink and cache.segments_done == 4


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and config


def test_separate_norm_from_a_llama_checkpoint_and_round_trip(tmp_path):
    base = make(8, dtype=torch.float32)
    llama = Reference(base).llama
    llama.save_pretrained(tmp_path / "llama")
    model = CondensationForCausalLM.from_pretrained(tmp_path / "llama", segment_length=8, memory_norm="separate",
                                                    memory_sink_tokens=2)
    for layer in model.model.layers:  # initialised as a copy of the loaded input norm, not ones
        assert torch.equal(layer.memory_layernorm.weight, layer.input_layernorm.weight)
        assert not torch.equal(layer.memory_layernorm.weight, torch.ones_like(layer.memory_layernorm.weight))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.memory_layernorm.weight.mul_(1.5)  # as training would move it
    model.save_pretrained(tmp_path / "cond")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "cond")
    assert isinstance(back, CondensationForCausalLM)
    assert (back.config.memory_norm, back.config.memory_sink_tokens) == ("separate", 2)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "cond")  # the Llama weights, without the memory norms
    assert torch.equal(plain.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    shared = CondensationConfig(**ARCH, segment_length=8)
    assert not any("memory_layernorm" in n for n, _ in CondensationForCausalLM(shared).named_parameters())


@pytest.mark.parametrize("field,value", [("memory_sink_tokens", -1), ("memory_sink_tokens", 9),
                                         ("memory_sink_tokens", "4"), ("memory_norm", "bogus")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(Exception, match=field):
        CondensationConfig(**ARCH, segment_length=8, **{field: value})
