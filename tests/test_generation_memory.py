"""Prefill through the generation cache (issue 16): the prompt goes through segment by segment, so its working memory
does not grow with the prompt, and the results are those of a plain full forward.

Weights as in test_modeling (std 0.15, float64), so that any difference in what is computed shows far above round-off.
"""

from __future__ import annotations

import pytest
import torch

from condensation import CondensationCache, CondensationConfig, CondensationForCausalLM
from condensation.modeling import _CACHE_FIELD, decode_chunk
from memory_probe import peak_live_bytes
from test_modeling import ARCH, max_diff, randomize_

OPTIONS = {
    "paper": {},
    "sink": {"memory_sink_tokens": 2},
    "sink_separate_norm": {"memory_sink_tokens": 3, "memory_norm": "separate"},
}


def make(segment_length: int, **options) -> CondensationForCausalLM:
    model = CondensationForCausalLM(CondensationConfig(**ARCH, segment_length=segment_length, **options))
    randomize_(model)
    return model.to(torch.float64).eval()


def prompt_of(B: int, L: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, ARCH["vocab_size"], (B, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, CondensationCache]:
    """The prefill call generate makes (prepare_inputs_for_generation's inputs): last-position logits [B, 1, V]."""
    out = model(**model.prepare_inputs_for_generation(ids))
    return out.logits, getattr(out, _CACHE_FIELD)


@torch.no_grad()
def whole_prompt_prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, CondensationCache]:
    """The prefill before issue 16's fix: all L tokens embedded at once and all [B, L, d] hidden states returned."""
    cfg, m = model.config, model.model
    cache = CondensationCache(cfg.num_hidden_layers)
    x = m.embed_tokens(ids)  # [B, L, d]
    rope = m.rope(x)
    outs, i = [], 0
    while i < ids.shape[1]:
        c = min(ids.shape[1] - i, cfg.segment_length - cache.current_length())
        outs.append(decode_chunk(m.layers, x[:, i : i + c], cache, rope, cfg))
        i += c
    return model.lm_head(m.norm(torch.cat(outs, 1))[:, -1:]), cache


def cache_tensors(cache: CondensationCache) -> list[torch.Tensor]:
    out = []
    for part in (cache.memory, cache.current, cache.sink):
        out += [t for kv in part if kv is not None for t in kv]
    return out + [t for t in cache.outputs if t is not None]


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("L", [1, 5, 12, 16, 23, 24])  # l = 4: within, at and past segment boundaries
def test_prefill_matches_full_forward_and_the_whole_prompt_prefill(options, L):
    l = 4
    model = make(l, **OPTIONS[options])
    ids = prompt_of(2, L)
    logits, cache = prefill(model, ids)
    assert logits.shape == (2, 1, ARCH["vocab_size"])
    with torch.no_grad():
        full = model(ids).logits  # the training forward: no cache, all segments at once
    assert max_diff(logits[:, 0], full[:, -1]) < 1e-10
    before, before_cache = whole_prompt_prefill(model, ids)
    assert max_diff(logits, before) < 1e-12
    assert (cache.seen_tokens, cache.segments_done, cache.current_length()) == (L, L // l, L % l)
    now, then = cache_tensors(cache), cache_tensors(before_cache)
    assert len(now) == len(then) and all(torch.equal(a, b) for a, b in zip(now, then))


@pytest.mark.parametrize("options", ["paper", "sink_separate_norm"])
def test_cached_forward_returns_every_position_when_asked(options):
    model = make(4, **OPTIONS[options])
    ids = prompt_of(2, 14)
    with torch.no_grad():
        full = model(ids).logits
        cached = model(ids, use_cache=True).logits  # logits_to_keep=0: all positions, through the cache
        last3 = model(ids, use_cache=True, logits_to_keep=3).logits
    assert cached.shape == full.shape and max_diff(cached, full) < 1e-10
    assert last3.shape == (2, 3, ARCH["vocab_size"]) and max_diff(last3, full[:, -3:]) < 1e-10


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("L", [8, 11])
def test_greedy_generation_equals_full_forward_argmax(options, L):
    l = 4
    model = make(l, **OPTIONS[options])
    ids = prompt_of(1, L, seed=6)
    out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    seq, expected = out.sequences, ids
    with torch.no_grad():
        for step in range(10):  # greedy decoding by full forwards over the whole sequence so far
            full = model(expected).logits[:, -1]
            assert max_diff(out.logits[step], full.float()) < 1e-5, step  # generate returns float32 logits
            expected = torch.cat([expected, full.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, expected)


@pytest.mark.parametrize("options", ["paper", "sink"])
def test_prefill_working_memory_does_not_grow_with_the_prompt(options):
    l = 8
    model = make(l, **OPTIONS[options])
    short, long = prompt_of(1, 2 * l + 3), prompt_of(1, 8 * (2 * l + 3))
    peak_short = peak_live_bytes(lambda: prefill(model, short))
    peak_long = peak_live_bytes(lambda: prefill(model, long))
    # the whole-prompt prefill kept about five [B, L, d] tensors alive (embeddings, outputs, their cat, the final
    # norm's): 4.7x here
    assert peak_long < 1.5 * peak_short, (peak_short, peak_long)
