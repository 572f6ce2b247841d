"""The model against the rules of docs/model.md, checked with an independent plain loop over transformers' Llama modules.

Weights are drawn with std 0.15 (norm weights around 1 +- 0.2) so that a wrong mask, a memory taken from the
layer's input, or a missing memory moves the logits far beyond float64 round-off; negative controls show each
such mistake is caught by the same comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from condensation import (
    SEGMENT_ATTENTION,
    CondensationCache,
    CondensationConfig,
    CondensationForCausalLM,
    attention_unavailable_reason,
)

ARCH = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_pair(segment_length: int, dtype=torch.float64, seed: int = 0, **overrides):
    """A Condensation model and a LlamaForCausalLM holding the same random weights."""
    cfg = CondensationConfig(**ARCH, segment_length=segment_length, **overrides)
    model = CondensationForCausalLM(cfg)
    randomize_(model, seed)
    llama = LlamaForCausalLM(LlamaConfig(**ARCH))
    llama.load_state_dict(model.state_dict())
    return model.to(dtype).eval(), llama.to(dtype).eval()


@torch.no_grad()
def reference_logits(llama: LlamaForCausalLM, input_ids, l, memory="output", mask="lower_right", positions="local"):
    """Plain loop over docs/model.md rules 1-6 with transformers' own Llama modules, one segment and layer at a time.

    memory: "output" (Rule 2), or the mistakes "input" (Transformer-XL style) and "none".
    mask: "lower_right" (Rule 4) or the mistake "top_left" (SDPA's is_causal).
    positions: "global" (the paper's) or "local" (memory at [0, l), segment at [l, l + r)).
    """
    cfg = llama.config
    m = llama.model
    B, L = input_ids.shape
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    emb = m.embed_tokens(input_ids)
    mems = [None] * cfg.num_hidden_layers
    outs = []
    for start in range(0, L, l):
        x = emb[:, start : start + l]
        r = x.shape[1]
        for n, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            kv_in = h if mems[n] is None else torch.cat([layer.input_layernorm(mems[n]), h], 1)
            mlen = kv_in.shape[1] - r
            base = start if positions == "global" else l
            pos_q = torch.arange(base, base + r)[None]
            pos_k = torch.arange(base - mlen, base + r)[None]
            q = attn.q_proj(h).view(B, r, H, D).transpose(1, 2)
            k = attn.k_proj(kv_in).view(B, mlen + r, Hkv, D).transpose(1, 2)
            v = attn.v_proj(kv_in).view(B, mlen + r, Hkv, D).transpose(1, 2)
            cq, sq = m.rotary_emb(x, pos_q)
            ck, sk = m.rotary_emb(x, pos_k)
            q, _ = apply_rotary_pos_emb(q, q, cq, sq)
            k, _ = apply_rotary_pos_emb(k, k, ck, sk)
            k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)
            scores = q @ k.transpose(-1, -2) / math.sqrt(D)
            i, j = torch.arange(r)[:, None], torch.arange(mlen + r)[None]
            visible = j <= i + mlen if mask == "lower_right" else j <= i
            scores = scores.masked_fill(~visible, float("-inf"))
            o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, r, H * D)
            x_mid = x + attn.o_proj(o)
            y = x_mid + layer.mlp(layer.post_attention_layernorm(x_mid))
            mems[n] = {"output": y, "input": x, "none": None}[memory]
            x = y
        outs.append(x)
    return llama.lm_head(m.norm(torch.cat(outs, 1)))


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Rules 1-6: the forward pass


@pytest.mark.parametrize("schedule", ["wavefront", "sequential"])
@pytest.mark.parametrize("B,L,l", [(1, 32, 8), (2, 29, 8), (3, 40, 16), (2, 7, 3)])
def test_matches_reference_loop(schedule, B, L, l):
    model, llama = make_pair(l, segment_schedule=schedule)
    ids = torch.randint(0, ARCH["vocab_size"], (B, L), generator=torch.Generator().manual_seed(L))
    with torch.no_grad():
        ours = model(ids).logits
    assert ours.shape == (B, L, ARCH["vocab_size"])
    assert max_diff(ours, reference_logits(llama, ids, l, positions="local")) < 1e-9
    # global positions agree up to the float32 RoPE table's rounding (transformers builds it in float32)
    assert max_diff(ours, reference_logits(llama, ids, l, positions="global")) < 1e-5


def test_negative_controls_are_caught():
    """Each classic mistake changes the logits of later segments by orders of magnitude more than round-off."""
    model, llama = make_pair(8)
    ids = torch.randint(0, ARCH["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    assert max_diff(ours, reference_logits(llama, ids, 8)) < 1e-9
    for wrong in (dict(memory="input"), dict(memory="none"), dict(mask="top_left")):
        diff = max_diff(ours[:, 8:], reference_logits(llama, ids, 8, **wrong)[:, 8:])
        assert diff > 1e-2, wrong
        # the first segment has no memory, so only the memory/mask mistakes' segments differ
        assert max_diff(ours[:, :8], reference_logits(llama, ids, 8, **wrong)[:, :8]) < 1e-9


def test_global_positions_equal_local_positions():
    """Rule 6: the paper's global position ids and segment-local ones give the same logits."""
    _, llama = make_pair(8)
    ids = torch.randint(0, ARCH["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(2))
    glob = reference_logits(llama, ids, 8, positions="global")
    loc = reference_logits(llama, ids, 8, positions="local")
    assert max_diff(glob, loc) < 1e-5


@pytest.mark.parametrize("L", [1, 13, 16])
def test_one_segment_is_llama(L):
    """Rule 10: with L <= l the model is exactly LlamaForCausalLM."""
    model, llama = make_pair(16, dtype=torch.float32)
    ids = torch.randint(0, ARCH["vocab_size"], (2, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert max_diff(model(ids).logits, llama(ids).logits) < 1e-4


def test_memory_carries_information_across_segments():
    """Changing only the first segment changes the last segment's logits (information flows through memory)."""
    model, _ = make_pair(8)
    ids = torch.randint(0, ARCH["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(4))
    other = ids.clone()
    other[:, :8] = (other[:, :8] + 1) % ARCH["vocab_size"]
    with torch.no_grad():
        assert max_diff(model(ids).logits[:, 32:], model(other).logits[:, 32:]) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Rule 7: the loss


def manual_segment_losses(logits, labels, l):
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    losses = []
    for start in range(0, labels.shape[1], l):
        lg, t = logits[:, start : start + l].flatten(0, 1), targets[:, start : start + l].flatten()
        keep = t != -100
        losses.append(F.cross_entropy(lg[keep], t[keep]) if keep.any() else torch.zeros((), dtype=logits.dtype))
    return torch.stack(losses)


@pytest.mark.parametrize("return_logits", [True, False])
def test_loss_is_sum_of_segment_means(return_logits):
    model, llama = make_pair(8, loss_chunk_tokens=7)  # chunks that straddle segments and rows
    ids = torch.randint(0, ARCH["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, 3:12] = -100  # masked targets change each segment's mean differently
    out = model(ids, labels=labels, return_logits=return_logits)
    expected = manual_segment_losses(reference_logits(llama, ids, 8), labels, 8)
    assert out.segment_losses.shape == (4,)
    assert max_diff(out.segment_losses, expected) < 1e-9
    assert abs(out.loss.item() - expected.sum().item()) < 1e-9
    assert (out.logits is None) != return_logits


@pytest.mark.parametrize("reduction", ["segment_sum", "token_mean"])
def test_fused_loss_gradients_equal_autograd_through_logits(reduction):
    """NormLinearCrossEntropy computes its gradients in the forward pass; they must equal plain autograd through the
    full logits (final norm, tied lm-head/embedding), with masked targets and chunks straddling segments and rows."""
    model, _ = make_pair(8, loss_chunk_tokens=5, loss_reduction=reduction)
    ids = torch.randint(0, ARCH["vocab_size"], (2, 27), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[1, 10:20] = -100
    grads, losses = [], []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(ids, labels=labels, return_logits=return_logits)
        (4.0 * out.loss).backward()  # a non-unit upstream gradient (a power of two: the norm runs in float32) scales all
        losses.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) < 1e-10
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        assert max_diff(g, grads[1][name]) < 1e-10 * max(1.0, g.abs().max().item()), name


def test_token_mean_option():
    model, llama = make_pair(8, loss_reduction="token_mean")
    ids = torch.randint(0, ARCH["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(6))
    out = model(ids, labels=ids, return_logits=False)
    ref = reference_logits(llama, ids, 8)
    expected = F.cross_entropy(ref[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(out.loss.item() - expected.item()) < 1e-9


# ---------------------------------------------------------------------------------------------------------------
# Rule 8: gradients through memory, schedules and checkpointing agree


def grads_of_last_segment_wrt_embeddings(model, ids, l):
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, labels=ids, return_logits=True)
    out.segment_losses[-1].backward()  # differentiable on the logits path
    n_seg = math.ceil(ids.shape[1] / l)
    return [emb.grad[:, s * l : (s + 1) * l].abs().max().item() for s in range(n_seg)]


def test_last_segment_loss_reaches_first_segment():
    model, _ = make_pair(8)
    ids = torch.randint(0, ARCH["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(7))
    g = grads_of_last_segment_wrt_embeddings(model, ids, 8)
    assert all(x > 1e-6 for x in g), g


def test_truncation_stops_gradient():
    """memory_grad_segments=2: the memory entering segment 2 is detached, so segment 3's loss reaches
    segments 2 and 3 only."""
    model, _ = make_pair(8, memory_grad_segments=2)
    ids = torch.randint(0, ARCH["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(7))
    g = grads_of_last_segment_wrt_embeddings(model, ids, 8)
    assert g[0] == 0 and g[1] == 0 and g[2] > 1e-6 and g[3] > 1e-6, g
    # forward values are unchanged by truncation
    full, _ = make_pair(8)
    with torch.no_grad():
        assert max_diff(model(ids).logits, full(ids).logits) == 0


def all_grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids, return_logits=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_group_checkpoints_keep_the_padding_row_without_gradient():
    """Under group checkpoints the embedding's gradient is gathered outside nn.Embedding: its padding_idx row must
    still get none, and every other row what nn.Embedding gives."""
    base, _ = make_pair(8, pad_token_id=3)
    other, _ = make_pair(8, pad_token_id=3, checkpoint_group_steps=2)
    ids = torch.randint(0, ARCH["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(8))
    ids[:, ::5] = 3
    ga, gb = all_grads(base, ids), all_grads(other, ids)
    emb = "model.embed_tokens.weight"
    assert ga[emb][3].abs().max() == 0 and ga[emb].abs().max() > 0  # nn.Embedding's rule, and rows that learn
    for name in ga:
        assert max_diff(ga[name], gb[name]) < 1e-9 * max(1.0, ga[name].abs().max().item()), name


@pytest.mark.parametrize("variant", [dict(segment_schedule="sequential"), dict(checkpoint_cells=True),
                                     dict(segment_schedule="sequential", checkpoint_cells=True),
                                     dict(checkpoint_group_steps=2), dict(checkpoint_group_steps=3, checkpoint_cells=True),
                                     dict(checkpoint_group_steps=2, memory_grad_segments=2),
                                     # compiled cells inside nested checkpoints: forward and recomputation must
                                     # run the same compiled variant for every number of cells per step
                                     dict(checkpoint_group_steps=3, checkpoint_cells=True, compile_cells=True),
                                     # layer weight gradients outside autograd: summed by baddbmm, or one GEMM per
                                     # layer at the end of backward (also under both kinds of checkpoint)
                                     dict(weight_grads="accumulate"), dict(weight_grads="deferred"),
                                     dict(weight_grads="deferred", checkpoint_cells=True),
                                     dict(weight_grads="accumulate", checkpoint_group_steps=3, checkpoint_cells=True),
                                     dict(weight_grads="deferred", checkpoint_group_steps=2, memory_grad_segments=2),
                                     dict(weight_grads="deferred", compile_cells=True),
                                     # diagonals split into batched steps of at most 1 or 2 cells (3 layers: the
                                     # segment-0 cell alone or beside others), also under both kinds of checkpoint
                                     dict(max_step_cells=1), dict(max_step_cells=2, checkpoint_cells=True),
                                     dict(max_step_cells=2, weight_grads="accumulate", checkpoint_group_steps=3,
                                          checkpoint_cells=True)])
def test_schedules_and_checkpointing_give_same_gradients(variant):
    base, _ = make_pair(8, memory_grad_segments=variant.get("memory_grad_segments"))
    other, _ = make_pair(8, **variant)
    ids = torch.randint(0, ARCH["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(8))
    ga, gb = all_grads(base, ids), all_grads(other, ids)
    # inductor's fused kernels reorder the float32 RMSNorm arithmetic: equal to float32 round-off, not bit for bit
    tol = 1e-5 if variant.get("compile_cells") else 1e-9
    for name in ga:
        assert max_diff(ga[name], gb[name]) < tol * max(1.0, ga[name].abs().max().item()), name


def test_compiled_pieces_keep_few_variants(monkeypatch):
    """compile_cells with a weight sink compiles a cell's elementwise pieces (fast_train.compiled_pointwise), which a
    deep wavefront calls with every number of cells k = 1 .. layers, with segments, memories and sinks of different
    lengths, with q's and k's head counts, RoPE taken or not. Each piece must keep a few compiled variants, fewer than
    dynamo's default recompile limit (8): on the Llama-3.2-1B shape (16 layers, 32 / 8 heads) _heads reached it and
    ran eagerly from there. Guards and recompiles are dynamo's whatever the backend: aot_eager keeps this fast."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from condensation import fast_train, modeling

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(fast_train, "_COMPILED_POINTWISE", {})  # pieces compiled anew, with aot_eager
    arch = dict(ARCH, hidden_size=64, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=4)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for n_seg, variant in ((18, dict(weight_grads="deferred")),  # every diagonal size, k = 1 .. 16
                                   (9, dict(weight_grads="accumulate", memory_sink_tokens=2, memory_norm="separate",
                                            checkpoint_cells=True, checkpoint_group_steps=3, max_step_cells=5))):
                model = CondensationForCausalLM(CondensationConfig(**arch, segment_length=4, compile_cells=True,
                                                                   **variant))
                ids = torch.randint(0, arch["vocab_size"], (2, 4 * n_seg - 1), generator=torch.Generator().manual_seed(0))
                model(ids, labels=ids, return_logits=False).loss.backward()
            training = {f.__name__: len(_debug_get_cache_entry_list(f.__code__)) for f in modeling._EAGER_POINTWISE}
            # the same process then evaluates and generates (no grad, chunks of 1 token): more variants, all compiled
            with torch.no_grad():
                model.eval()(ids, labels=ids)
                model.generate(ids[:1, :6], max_new_tokens=3, do_sample=False, pad_token_id=-1, eos_token_id=None)
            variants = {f.__name__: len(_debug_get_cache_entry_list(f.__code__)) for f in modeling._EAGER_POINTWISE}
    finally:
        torch._dynamo.reset()  # no aot_eager entries left for the inductor-compiled pieces of other tests
    assert max(training.values()) <= 5, training
    assert max(variants.values()) <= 16, variants  # compiled all the same, under the pieces' own limit (32)


# ---------------------------------------------------------------------------------------------------------------
# Attention implementations


@pytest.mark.parametrize("name", sorted(SEGMENT_ATTENTION))
def test_attention_implementations_agree(name):
    reason = attention_unavailable_reason(name, "cpu")
    if reason:
        pytest.skip(reason)
    ref, _ = make_pair(8, dtype=torch.float32, segment_attention="eager")
    other, _ = make_pair(8, dtype=torch.float32, segment_attention=name)
    ids = torch.randint(0, ARCH["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert max_diff(ref(ids).logits, other(ids).logits) < 1e-4
    if attention_unavailable_reason(name, "cpu", backward=True):
        return  # forward checked; backward cannot run on this device (reason in attention_unavailable_reason)
    ga, gb = all_grads(ref, ids), all_grads(other, ids)
    for n in ga:
        assert max_diff(ga[n], gb[n]) < 1e-4, n


def test_attention_functions_match_explicit_mask():
    """Each function against a dense softmax with Rule 4's mask, for m = 0 and m > 0, grouped-query heads."""
    g = torch.Generator().manual_seed(10)
    for m in (0, 5):
        q = torch.randn(3, 6, 4, 8, generator=g)
        k, v = torch.randn(3, 2, m + 4, 8, generator=g), torch.randn(3, 2, m + 4, 8, generator=g)
        kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
        i, j = torch.arange(4)[:, None], torch.arange(m + 4)[None]
        dense = ((q @ kk.transpose(-1, -2)) * 8**-0.5).masked_fill(j > i + m, float("-inf")).softmax(-1) @ vv
        for name, fn in SEGMENT_ATTENTION.items():
            if attention_unavailable_reason(name, "cpu"):
                continue
            assert max_diff(fn(q, k, v, 8**-0.5), dense) < 1e-5, (name, m)


# ---------------------------------------------------------------------------------------------------------------
# Generation with the bounded cache


def _cache_kwarg(cache):
    import inspect

    from transformers import GenerationMixin

    name = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"
    return {name: cache}


@pytest.mark.parametrize("sample", [False, True])
def test_incremental_generation_matches_full_forward(sample):
    l = 6
    model, _ = make_pair(l, dtype=torch.float64)
    prompt = torch.randint(3, ARCH["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(11))
    cache = CondensationCache(ARCH["num_hidden_layers"])
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=sample, temperature=0.7, top_p=0.9,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
                         **_cache_kwarg(cache))
    seq = out.sequences
    assert seq.shape == (2, 29)  # crosses segment boundaries at 12, 18, 24
    with torch.no_grad():
        full = model(seq).logits
    for step, step_logits in enumerate(out.logits):
        pos = prompt.shape[1] + step - 1  # logits at this position chose token pos + 1
        assert max_diff(step_logits, full[:, pos].float()) < 1e-5, step  # generate returns float32 logits
    assert cache.peak_keys <= 2 * l
    assert cache.seen_tokens == seq.shape[1] - 1  # the last sampled token was never fed back
    if sample:  # seeded sampling is reproducible
        torch.manual_seed(0)
        again = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=True, temperature=0.7,
                               top_p=0.9, pad_token_id=0, eos_token_id=None)
        assert torch.equal(again, seq)


def test_generate_stops_at_eos_and_greedy_is_argmax():
    model, _ = make_pair(5, dtype=torch.float64)
    prompt = torch.randint(3, ARCH["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(12))
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        full = model(greedy).logits
    assert torch.equal(full[:, 6:-1].argmax(-1), greedy[:, 7:])
    eos = int(greedy[0, 9])
    stopped = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert stopped.shape[1] <= 10 and int(stopped[0, -1]) == eos


def test_padding_mask_is_rejected():
    model, _ = make_pair(4)
    ids = torch.randint(0, ARCH["vocab_size"], (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Rule 9: checkpoints


def test_checkpoint_round_trip(tmp_path):
    _, llama = make_pair(8, dtype=torch.float32)
    llama.save_pretrained(tmp_path / "llama")
    model = CondensationForCausalLM.from_pretrained(tmp_path / "llama", segment_length=8)
    assert model.config.segment_length == 8
    for (n1, t1), (n2, t2) in zip(llama.state_dict().items(), model.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)

    model.save_pretrained(tmp_path / "cond")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "cond")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "cond")
    assert isinstance(auto, CondensationForCausalLM) and auto.config.segment_length == 8
    for name, t in llama.state_dict().items():
        assert torch.equal(back.state_dict()[name], t) and torch.equal(auto.state_dict()[name], t)


def test_tied_embeddings_stay_tied(tmp_path):
    cfg = CondensationConfig(**ARCH, segment_length=4, tie_word_embeddings=True)
    model = CondensationForCausalLM(cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    again = CondensationForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("field,value", [("segment_length", 0), ("segment_attention", "bogus"),
                                         ("segment_schedule", "diagonal"), ("loss_reduction", "max"),
                                         ("memory_grad_segments", 0), ("compile_cells", "fastest"),
                                         ("checkpoint_group_steps", -1), ("weight_grads", "later"),
                                         ("max_step_cells", -1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(Exception, match=field):
        CondensationConfig(**ARCH, **{field: value})
