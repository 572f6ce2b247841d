"""Fig. 10's attention scores against the scores the model itself computes: the eager attention function is wrapped
during a forward (sequential schedule: calls come segment by segment, layer by layer) and its q k^T / sqrt(D),
masked, is recorded. Weights are drawn with std 0.15 so that a memory taken from the wrong segment or from the
layer's input moves the scores far beyond float64 round-off (negative controls below)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import condensation.modeling as modeling
from condensation import CondensationConfig, CondensationForCausalLM
from condensation.evaluate.attention_maps import (
    attention_scores,
    head_mean_maps,
    layer_outputs,
    minmax_scale,
    plot_attention_maps,
)

L_SEG = 8
ARCH = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096)


def make_model(segment_length: int = L_SEG, **options) -> CondensationForCausalLM:
    cfg = CondensationConfig(**ARCH, segment_length=segment_length, segment_attention="eager",
                             segment_schedule="sequential", **options)
    model = CondensationForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.15 * torch.randn(p.shape, generator=g))
    return model.double().eval()


def recorded_scores(model, ids) -> dict[tuple[int, int], torch.Tensor]:
    """{(layer, segment): [B, H, c, kv]} as the model's eager attention computes them in a forward (-inf masked)."""
    calls = []
    eager = modeling.SEGMENT_ATTENTION["eager"]

    def recording(q, k, v, scale):
        c, kv = q.shape[-2], k.shape[-2]
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q @ kk.transpose(-1, -2)) * scale  # the dtype of the model (float64 here)
        i, j = torch.arange(c)[:, None], torch.arange(kv)[None, :]
        calls.append(s.masked_fill(j > i + (kv - c), float("-inf")))
        return eager(q, k, v, scale)

    modeling.SEGMENT_ATTENTION["eager"] = recording
    try:
        with torch.no_grad():
            model(ids)
    finally:
        modeling.SEGMENT_ATTENTION["eager"] = eager
    n_layers = model.config.num_hidden_layers
    assert len(calls) == n_layers * math.ceil(ids.shape[1] / model.config.segment_length)
    return {(i % n_layers, i // n_layers): s for i, s in enumerate(calls)}


@pytest.mark.parametrize("options", [{}, {"memory_sink_tokens": 3, "memory_norm": "separate"}])
def test_scores_equal_the_models_own_attention(options):
    model = make_model(**options)
    sink = options.get("memory_sink_tokens", 0)
    B, L = 2, 4 * L_SEG + 5  # a short last segment: its padding must not appear in the scores
    ids = torch.randint(0, ARCH["vocab_size"], (B, L), generator=torch.Generator().manual_seed(1))
    seen = recorded_scores(model, ids)
    layers, segments = [0, 1, 2], [0, 1, 3, 4]
    got = attention_scores(model, ids, layers, segments)
    assert set(got) == {(n, s) for n in layers for s in segments}
    for (n, s), sc in got.items():
        r = min(L_SEG, L - s * L_SEG)
        m = 0 if s == 0 else L_SEG + (sink if s >= 2 else 0)  # with a sink from segment 2 on, its keys first
        assert sc.shape == (B, ARCH["num_attention_heads"], r, m + r) and sc.dtype == torch.float32
        ref = seen[(n, s)][:, :, :r, : m + r]  # the model pads the last segment at its end
        assert torch.equal(torch.isinf(sc), torch.isinf(ref)), (n, s)
        finite = torch.isfinite(ref)
        assert (sc.double()[finite] - ref[finite]).abs().max() < 1e-5, (n, s)  # float32 scores of float64 states
        # rule 4: every query sees all memory keys and the current keys up to itself
        assert torch.isfinite(sc[..., :m]).all()
        assert torch.equal(torch.isinf(sc[0, 0, :, m:]), torch.ones(r, r, dtype=torch.bool).triu(1))


def test_negative_controls_off_by_one_segment_and_layer_input():
    """The same comparison catches a memory from segment s-2 or from the layer's input (Transformer-XL)."""
    model = make_model()
    ids = torch.randint(0, ARCH["vocab_size"], (1, 4 * L_SEG), generator=torch.Generator().manual_seed(2))
    seen = recorded_scores(model, ids)
    states = layer_outputs(model, ids)
    n, s = 1, 3
    ref = seen[(n, s)]
    layer, cfg = model.model.layers[n], model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = model.model.rope(states[0])

    def scores_with_memory(mem):  # the plain formula of docs/model.md rule 3 with a chosen memory
        h = layer.input_layernorm(states[n][:, s])
        kv = torch.cat([layer.input_layernorm(mem), h], 1)
        q = layer.self_attn.q_proj(h).view(1, L_SEG, H, D).transpose(1, 2)
        k = layer.self_attn.k_proj(kv).view(1, 2 * L_SEG, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        rot = lambda x: torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)
        cq, sq = rope.cos[L_SEG:], rope.sin[L_SEG:]
        q, k = q * cq + rot(q) * sq, k * rope.cos + rot(k) * rope.sin
        return (q @ k.transpose(-1, -2)) / math.sqrt(D)

    finite = torch.isfinite(ref)
    with torch.no_grad():
        right = scores_with_memory(states[n + 1][:, s - 1])
        wrong_segment = scores_with_memory(states[n + 1][:, s - 2])
        layer_input = scores_with_memory(states[n][:, s - 1])
    assert (right[finite] - ref[finite]).abs().max() < 1e-10
    assert (wrong_segment[finite] - ref[finite]).abs().max() > 0.1
    assert (layer_input[finite] - ref[finite]).abs().max() > 0.1


def test_layer_outputs_end_in_the_models_hidden_states():
    model = make_model()
    ids = torch.randint(0, ARCH["vocab_size"], (1, 3 * L_SEG + 3), generator=torch.Generator().manual_seed(3))
    states = layer_outputs(model, ids)
    assert len(states) == ARCH["num_hidden_layers"] + 1 and states[-1].shape == (1, 4, L_SEG, ARCH["hidden_size"])
    with torch.no_grad():
        full = model.model(ids, final_norm=False)  # the wavefront schedule of the config's default is not used here
    assert torch.allclose(states[-1].flatten(1, 2)[:, : ids.shape[1]], full, atol=1e-10)
    two = layer_outputs(model, ids, n_segments=2)  # later segments do not change earlier ones (rule 1)
    assert torch.allclose(two[-1], states[-1][:, :2], atol=1e-12)


def test_bad_layer_or_segment_names_the_range():
    model = make_model()
    ids = torch.zeros(1, 2 * L_SEG, dtype=torch.long)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        attention_scores(model, ids, [3], [1])
    with pytest.raises(ValueError, match="segment 2 out of range"):
        attention_scores(model, ids, [0], [2])


def test_minmax_and_plot(tmp_path):
    a = np.array([[1.0, 3.0, -np.inf], [2.0, 5.0, 3.0]])
    scaled = minmax_scale(a)
    assert np.isnan(scaled[0, 2]) and scaled[0, 0] == 0.0 and scaled[1, 1] == 1.0 and scaled[1, 0] == 0.25
    model = make_model()
    ids = torch.randint(0, ARCH["vocab_size"], (1, 3 * L_SEG), generator=torch.Generator().manual_seed(4))
    scores = attention_scores(model, ids, [0, 2], [1, 2])
    maps = head_mean_maps(scores)
    assert maps[(0, 1)].shape == (L_SEG, 2 * L_SEG) and np.nanmin(maps[(0, 1)]) == 0 and np.nanmax(maps[(0, 1)]) == 1
    assert np.isnan(maps[(0, 1)][0, L_SEG + 1]) and not np.isnan(maps[(0, 1)][0, L_SEG])
    png = plot_attention_maps(maps, tmp_path / "att.png", segment_length=L_SEG)
    from matplotlib.image import imread

    img = imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400 and img[..., :3].std() > 0.05  # panels, not a blank page
