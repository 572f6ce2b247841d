"""The fused loss and the embedding sink under group checkpoints (issue 16): the embedding's float32 [V, d] gradient
buffer is not alive during the groups' backward, the lm-head gradient has no [V, d] temporaries, and the gradients
are those of plain autograd through the full logits (float64, tied and untied embeddings)."""

from __future__ import annotations

import pytest
import torch

from condensation import CondensationConfig, CondensationForCausalLM
from condensation import fast_train
from memory_probe import peak_live_bytes, row_chunked_cross_entropy_grad_
from test_modeling import ARCH, max_diff, randomize_


def grads_of(model, ids, return_logits: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (2.0 * model(ids, labels=ids, return_logits=return_logits).loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("group", [0, 2])
@pytest.mark.parametrize("row_bytes_limit", [None, 0, 3000])  # rows summed at the end / on arrival / switching over
def test_fused_loss_and_sink_gradients_equal_autograd_through_logits(tied, group, row_bytes_limit, monkeypatch):
    monkeypatch.setattr(fast_train, "_LM_GRAD_ROWS", 10)  # lm-head gradient in 10 slices of the 97-row vocabulary
    if row_bytes_limit is not None:
        init = fast_train.EmbeddingSink.__init__
        monkeypatch.setattr(fast_train.EmbeddingSink, "__init__",
                            lambda self, emb, limit=None: init(self, emb, row_bytes_limit))
    cfg = CondensationConfig(**ARCH, segment_length=8, tie_word_embeddings=tied, pad_token_id=3,
                             checkpoint_group_steps=group, loss_chunk_tokens=11)
    model = CondensationForCausalLM(cfg)
    randomize_(model)
    model = model.to(torch.float64)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.randint(0, ARCH["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(4))
    ids[:, ::7] = 3
    ref, fused = grads_of(model, ids, True), grads_of(model, ids, False)
    assert ref["model.embed_tokens.weight"][3].abs().max() == 0 or tied  # padding row: no embedding gradient
    for name, g in ref.items():
        assert g.abs().max() > 0, name
        assert max_diff(g, fused[name]) < 1e-10 * max(1.0, g.abs().max().item()), name


def test_group_backward_runs_without_the_float32_embedding_buffer(monkeypatch):
    """A vocabulary-heavy toy (V = 32000, d = 64, tied, float32: [V, d] is 8.2 MB) whose peak falls in the groups'
    backward. The old sink (rows summed on arrival: row_bytes_limit=0, the old code path) held the float32 [V, d]
    buffer there; the new one holds only the rows (4 KB here), so its peak is lower by about that buffer."""
    cfg = CondensationConfig(vocab_size=32000, hidden_size=64, intermediate_size=4096, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, segment_length=16,
                             tie_word_embeddings=True, checkpoint_group_steps=4, loss_chunk_tokens=16)
    model = CondensationForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # as in a graphed training step: the gradients exist before it

    def step():
        model(ids, labels=ids, return_logits=False).loss.backward()

    buffer = cfg.vocab_size * cfg.hidden_size * 4
    new = peak_live_bytes(step)
    init = fast_train.EmbeddingSink.__init__
    monkeypatch.setattr(fast_train.EmbeddingSink, "__init__", lambda self, emb, limit=None: init(self, emb, 0))
    old = peak_live_bytes(step)
    assert old - new >= 0.9 * buffer, (old, new, buffer)


def test_group_forward_keeps_finished_segments_not_their_diagonals():
    """Under group checkpoints each finished segment's last-layer output is kept until the end of the forward. A view
    of its diagonal's stacked output pinned all n_layers cells of that diagonal (8 here; 30 on SmolLM2: 4.5 GB at
    128K); a copy holds one segment. The forward's peak then grows per segment by that output, the final stack of
    them and the group frontiers (n_layers outputs per group of 4 diagonals): 4 segment outputs, not n_layers + 3."""
    cfg = CondensationConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                             num_attention_heads=4, num_key_value_heads=2, segment_length=16, checkpoint_group_steps=4)
    model = CondensationForCausalLM(cfg).train()
    out = {}

    def peak(L):
        ids = torch.randint(0, cfg.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
        return peak_live_bytes(lambda: out.__setitem__("y", model.model(ids, final_norm=False)))

    segment_bytes = cfg.segment_length * cfg.hidden_size * 4
    per_segment = (peak(1024) - peak(512)) / (512 // cfg.segment_length)
    assert per_segment <= 4 * segment_bytes, (per_segment, segment_bytes)  # the views: 8 x segment_bytes


def test_wavefront_backward_takes_a_steps_cells_apart_without_zero_tensors_per_cell():
    """A wavefront step computes k cells as one [k, B, l, d] tensor and hands each cell's output on. Indexing it per
    cell (y[i]) makes backward allocate a zero tensor the size of the whole step for each cell and add k of them: on
    SmolLM2's 30 layers ~12 GB of zeros per 16K-token backward. unbind's backward stacks the k gradients once."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    cfg = CondensationConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, segment_length=8)
    model = CondensationForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 8 * 9), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids, return_logits=False).loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    ops = Counter(e.name for e in prof.events())
    assert ops["aten::unbind_backward"] + ops["aten::stack"] > 0, ops.most_common(20)  # the profile sees backward ops
    assert ops["aten::select_backward"] == 0, ops["aten::select_backward"]


def test_fused_loss_forward_holds_one_chunk_of_logits_at_a_time(monkeypatch):
    """NormLinearCrossEntropy's forward keeps one chunk's [c, V] logits at a time: the previous chunk's are freed
    before the next chunk's lm-head matmul. Held by the loop variable, they stayed alive through it: two chunks of
    logits at once (2 x 525 MB at 2048 tokens of the Table I model's 128K vocabulary in bf16, the fused loss's forward
    peak on a GPU). The cross-entropy gradient runs in place a few rows at a time here, as the GPU's Triton kernel does
    (the CPU torch path's float32 copy of a whole chunk would be the peak otherwise)."""
    monkeypatch.setattr(fast_train, "cross_entropy_grad_", row_chunked_cross_entropy_grad_)
    monkeypatch.setattr(fast_train, "_LM_GRAD_ROWS", 4000)
    c, n, V, d = 128, 3 * 128, 32000, 32
    g = torch.Generator().manual_seed(0)
    y, lm = torch.randn(n, d, generator=g), torch.randn(V, d, generator=g) * 0.1
    norm_w, targets, weights = torch.ones(d), torch.randint(0, V, (n,), generator=g), torch.full((n,), 1.0 / n)
    out = {}
    peak = peak_live_bytes(lambda: out.__setitem__("loss", fast_train.NormLinearCrossEntropy.apply(
        y, norm_w, lm, targets, weights, 1e-5, c)))
    logits, grad_lm = c * V * 4, V * d * 4  # float32: 16.4 MB a chunk, 4.1 MB
    assert peak - grad_lm < 1.5 * logits, (peak, logits, grad_lm)
    assert out["loss"][0].isfinite()
