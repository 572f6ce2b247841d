"""Attention scores between consecutive segments (the paper's Fig. 10): what layer n's queries of segment s give
to the memory keys (from y[s-1, n], its own output for the previous segment) and to the current keys.

    from condensation.evaluate.attention_maps import attention_scores, plot_attention_maps
    maps = attention_scores(model, input_ids, layers=[0, 1], segments=[1, 2])   # {(layer, segment): [B, H, r, m + r]}
    plot_attention_maps(maps, "attention.png", segment_length=model.config.segment_length)

The model computes attention inside fused cells and keeps no per-layer states, so the scores are recomputed here
from docs/model.md rules 2-4: every layer's outputs y[s, n] for the needed segments (`layer_outputs`, the model's
own cell code one layer at a time), then, with Llama's modules of layer n,
    Q = rope(q_proj(input_layernorm(x[s, n])))                      positions [l, l + r)
    K = rope(k_proj(input_layernorm([y[s-1, n]; x[s, n]])))          positions [0, m) then [l, l + r)
    scores = Q K^T / sqrt(D)  [B, H, r, m + r], -inf where the lower-right causal mask hides a key (rule 4).
With the options beyond the paper (docs/model.md) the memory keys are those the model uses: from s = 2 the attention
sink's first (memory_sink_tokens), the memory normalised by memory_layernorm (memory_norm="separate").
Grouped key/value heads are repeated to the query heads as the attention does. tests/evaluate/test_attention_maps.py
checks the result against the scores the model's eager attention computes during a forward.
"""

from __future__ import annotations

import copy
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..modeling import CondensationForCausalLM, run_segments


@torch.no_grad()
def layer_outputs(model: CondensationForCausalLM, input_ids: torch.Tensor, n_segments: int | None = None) -> list[torch.Tensor]:
    """[x0, y0, y1, ...]: the embeddings and every layer's outputs, each [B, N_s, l, d] (the last segment padded at
    its end, as the model pads it), for the first n_segments segments (default: all). Later segments cannot change
    earlier ones (rule 1), so stopping early is exact. Layer n runs over all segments given its inputs y[:, n-1]
    (rule 2's recurrence along s), with the model's own cell function."""
    cfg, l = copy.copy(model.config), model.config.segment_length
    cfg.compile_cells = False  # one pass, no grad: compiling the cells (a GPU training setting) would only cost time
    base = model.model
    if n_segments is not None:
        input_ids = input_ids[:, : n_segments * l]
    x = base.embed_tokens(input_ids)  # [B, L, d]
    B, L, d = x.shape
    n_seg = math.ceil(L / l)
    x = torch.nn.functional.pad(x, (0, 0, 0, n_seg * l - L)).view(B, n_seg, l, d)
    rope = base.rope(x)
    outs = [x]
    for layer in base.layers:
        inputs = outs[-1].unbind(1)  # N_s x [B, l, d]
        outs.append(run_segments([layer], inputs.__getitem__, n_seg, rope, cfg, "sequential", ckpt=False))
    return outs


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, c, D]; cos/sin [c, D] (Llama's rotate-half convention)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@torch.no_grad()
def attention_scores(
    model: CondensationForCausalLM,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    segments: Sequence[int],
) -> dict[tuple[int, int], torch.Tensor]:
    """Pre-softmax attention scores of layer n for segment s, for every n in layers and s in segments (s >= 1 has a
    memory; s = 0 attends to itself only). Returns {(n, s): float32 [B, H, r, m + r]}: r = the segment's real
    tokens, m = l memory keys (0 for s = 0; p + l from s = 2 with memory_sink_tokens = p, the sink's first); the first
    m columns are the memory keys, the rest the current ones; scores are scaled by 1/sqrt(head_dim) (what the softmax
    sees) and -inf where rule 4's mask hides the key."""
    cfg, l, p = model.config, model.config.segment_length, model.config.memory_sink_tokens
    n_layers, n_seg_all = cfg.num_hidden_layers, math.ceil(input_ids.shape[1] / l)
    for n in layers:
        if not 0 <= n < n_layers:
            raise ValueError(f"layer {n} out of range: the model has {n_layers} layers (0 .. {n_layers - 1})")
    for s in segments:
        if not 0 <= s < n_seg_all:
            raise ValueError(f"segment {s} out of range: {input_ids.shape[1]} tokens are {n_seg_all} segments of {l}")
    states = layer_outputs(model, input_ids, max(segments) + 1)
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = model.model.rope(states[0])
    cos, sin = rope.cos.float(), rope.sin.float()  # [p + 2l, D]: rows of the sink, the memory, the current segment
    B = input_ids.shape[0]
    out: dict[tuple[int, int], torch.Tensor] = {}
    for n in layers:
        layer = model.model.layers[n]
        attn = layer.self_attn
        memory_norm = layer.memory_layernorm or layer.input_layernorm  # memory_norm="separate": the memory's own
        for s in segments:
            r = min(l, input_ids.shape[1] - s * l)  # the last segment may be shorter: drop its padding
            x = states[n][:, s, :r]  # [B, r, d]: x[s, n] = y[s, n-1]
            h = layer.input_layernorm(x)
            memory, rows = [], []  # y[0, n][:, :p] (the sink, s >= 2), y[s-1, n]; their rows of the RoPE table
            if s >= 2 and p:
                memory, rows = [states[n + 1][:, 0, :p]], [torch.arange(p)]
            if s >= 1:
                memory, rows = memory + [states[n + 1][:, s - 1]], rows + [torch.arange(p, p + l)]
            kv_in = torch.cat([memory_norm(y) for y in memory] + [h], 1)  # [B, m + r, d]
            m = kv_in.shape[1] - r
            q = attn.q_proj(h).view(B, r, H, D).transpose(1, 2).float()  # [B, H, r, D]
            k = attn.k_proj(kv_in).view(B, m + r, Hkv, D).transpose(1, 2).float()  # [B, Hkv, m + r, D]
            q_rows = torch.arange(p + l, p + l + r)
            k_rows = torch.cat(rows + [q_rows]).to(cos.device)
            q = _rope(q, cos[q_rows.to(cos.device)], sin[q_rows.to(cos.device)])
            k = _rope(k, cos[k_rows], sin[k_rows])
            k = k.repeat_interleave(H // Hkv, dim=1)  # grouped heads: query head i reads key head i // (H / Hkv)
            scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, r, m + r]
            i = torch.arange(r, device=scores.device)[:, None]
            j = torch.arange(m + r, device=scores.device)[None, :]
            out[(n, s)] = scores.masked_fill(j > i + m, float("-inf"))
    return out


def minmax_scale(scores: torch.Tensor | np.ndarray) -> np.ndarray:
    """The paper's "Minmax scaling for visibility": visible entries to [0, 1] over the whole map; masked (-inf) ones
    become NaN, drawn blank. A constant map becomes all zeros."""
    a = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    a = np.where(np.isfinite(a), a, np.nan)
    lo, hi = np.nanmin(a), np.nanmax(a)
    return (a - lo) / (hi - lo) if hi > lo else np.where(np.isnan(a), np.nan, 0.0)


def head_mean_maps(scores: Mapping[tuple[int, int], torch.Tensor], batch_index: int = 0) -> dict[tuple[int, int], np.ndarray]:
    """{(layer, segment): [r, m + r]} min-max scaled maps of one example, averaged over heads (masked stays NaN)."""
    maps = {}
    for key, sc in scores.items():
        a = sc[batch_index].float()  # [H, r, m + r]
        visible = torch.isfinite(a)
        mean = torch.where(visible, a, 0.0).sum(0) / visible.sum(0).clamp(min=1)
        maps[key] = minmax_scale(mean.masked_fill(~visible.any(0), float("-inf")))
    return maps


def plot_attention_maps(
    maps: Mapping[tuple[int, int], np.ndarray | torch.Tensor],
    path: str | Path,
    segment_length: int | None = None,
    title: str | None = None,
) -> Path:
    """Fig. 10: one panel per (layer, segment) map, rows = layers, columns = segment pairs (s-1, s); x = keys (memory
    of segment s-1, then segment s, split by a white line), y = queries of segment s; colour = min-max scaled score
    (viridis, purple 0 to yellow 1); the masked upper-right triangle is blank. maps: [r, m + r] arrays (e.g.
    `head_mean_maps`), or [B, H, r, m + r] scores, which are head-averaged and scaled here (first example)."""
    from .plots import _figure, _save

    maps = {k: (head_mean_maps({k: v})[k] if isinstance(v, torch.Tensor) and v.dim() == 4 else minmax_scale(v))
            for k, v in maps.items()}
    if not maps:
        raise ValueError("plot_attention_maps: no maps")
    layers = sorted({n for n, _ in maps})
    segments = sorted({s for _, s in maps})
    width = 1.6 + 3.4 * max(len(segments), 2)  # room for the title and the colour bar beside a single column
    fig = _figure(width, 0.9 + 2.0 * len(layers), layout="constrained")
    axes = fig.subplots(len(layers), len(segments), squeeze=False)
    im = None
    for i, n in enumerate(layers):
        for j, s in enumerate(segments):
            ax = axes[i][j]
            if (n, s) not in maps:
                ax.set_visible(False)
                continue
            a = maps[(n, s)]
            r, total = a.shape
            m = total - r
            im = ax.imshow(a, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            if m:
                ax.axvline(m - 0.5, color="white", linewidth=1.0)
                ax.set_xticks([m / 2 - 0.5, m + r / 2 - 0.5], [f"memory K(s={s - 1})", f"current K(s={s})"], fontsize=7)
            else:
                ax.set_xticks([r / 2 - 0.5], [f"current K(s={s})"], fontsize=7)
            ax.tick_params(axis="y", labelsize=6)
            ax.set_title(f"layer {n}, segments {s - 1}-{s}" if m else f"layer {n}, segment {s}", fontsize=8)
            if j == 0:
                ax.set_ylabel("query (token in segment)", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="pre-softmax score, min-max scaled")
    l_text = f", segment length {segment_length}" if segment_length else ""
    text = title or f"Attention scores between consecutive segments (mean over heads{l_text})"
    fig.suptitle(textwrap.fill(text, width=int(12 * width)), fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# MLflow: the maps of one run, as `attention/attention_maps.npz` (head-mean, min-max scaled, float16: [r, m + r]
# each, 1 MiB per map at l = 512), `attention/attention_maps.json` (what input, which layers and segments) and the
# picture `attention/attention_maps.png`. dashboards/ reads them back with `load_attention_maps`.

ATTENTION_DIR = "attention"
MAPS_ARTIFACT = "attention_maps.npz"
MAPS_META = "attention_maps.json"
MAPS_PICTURE = "attention_maps.png"


def _key(layer: int, segment: int) -> str:
    return f"layer{layer}_segment{segment}"


def log_attention_maps(
    maps: Mapping[tuple[int, int], np.ndarray],
    *,
    run_id: str,
    tracking_uri: str | None = None,
    meta: Mapping | None = None,
    segment_length: int | None = None,
) -> None:
    """Log head-mean maps (`head_mean_maps`) into an MLflow run under `attention/`."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / MAPS_ARTIFACT
        np.savez_compressed(npz, **{_key(n, s): np.asarray(a, dtype=np.float16) for (n, s), a in maps.items()})
        plot_attention_maps(maps, Path(tmp) / MAPS_PICTURE, segment_length=segment_length)
        info = {"segment_length": segment_length, "maps": [[n, s] for n, s in sorted(maps)], **(meta or {})}
        (Path(tmp) / MAPS_META).write_text(json.dumps(info, indent=1))
        client.log_artifacts(run_id, tmp, ATTENTION_DIR)


def load_attention_maps(run_id: str, tracking_uri: str | None = None) -> tuple[dict[tuple[int, int], np.ndarray], dict] | None:
    """(maps, meta) logged by `log_attention_maps` in this run, or None when it has none."""
    import json
    import re
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    names = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, ATTENTION_DIR)}
    if f"{ATTENTION_DIR}/{MAPS_ARTIFACT}" not in names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ATTENTION_DIR, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        with np.load(local / MAPS_ARTIFACT) as z:
            maps = {}
            for name in z.files:
                n, s = map(int, re.fullmatch(r"layer(\d+)_segment(\d+)", name).groups())
                maps[(n, s)] = z[name].astype(np.float32)
        meta_path = local / MAPS_META
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return maps, meta
