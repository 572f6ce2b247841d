"""Random numbers of segments per batch (`data.random_lengths`, `stages.N.random_lengths`): lengths in whole
segments within bounds, one length per micro-batch (no padding reaches the model), deterministic in the seed.
Pure functions and a stand-in shard: no Ray."""

from __future__ import annotations

import numpy as np
import torch

from condensation.data.passkey import PasskeyTemplate, _passkey_batch, min_passkey_tokens, passkey_example, row_length
from condensation.data.pipeline import IGNORE_INDEX, draw_length, segment_multiples, uniform_length_batches


def test_segment_multiples():
    assert segment_multiples(2048, 512) == [512, 1024, 1536, 2048]
    assert segment_multiples(1000, 512) == [512, 1000]  # the stage length itself when it is not a multiple
    assert segment_multiples(300, 512) == [300]
    assert segment_multiples(2048, 512, min_tokens=600) == [1024, 1536, 2048]
    assert segment_multiples(2048, 512, min_tokens=4000) == [2048]  # the stage length is always possible


def test_draw_length_is_a_function_of_seed_and_key():
    lengths = [64, 128, 192, 256]
    draws = [draw_length(lengths, 7, 0, i) for i in range(400)]
    assert draws == [draw_length(lengths, 7, 0, i) for i in range(400)]
    assert draws != [draw_length(lengths, 8, 0, i) for i in range(400)]
    counts = np.bincount([lengths.index(n) for n in draws], minlength=4)
    assert counts.min() > 60  # every length drawn, about uniformly (100 expected each)


def _rows(tokenizer, seed, n=24, group_size=4, total=256, l=64):
    template = PasskeyTemplate.from_tokenizer(tokenizer)
    lengths = segment_multiples(total, l, min_tokens=min_passkey_tokens(tokenizer, template))
    out = _passkey_batch({"id": np.arange(n)}, tokenizer, template, total, seed, None, True, lengths, group_size)
    return out, lengths


def test_passkey_rows_at_random_lengths(tokenizer):
    total, l, group = 256, 64, 4
    out, lengths = _rows(tokenizer, seed=3, total=total, l=l, group_size=group)
    assert lengths[0] >= min_passkey_tokens(tokenizer) and lengths[-1] == total
    assert all(n % l == 0 for n in lengths) and 128 <= lengths[0]  # the builtin tokenizer's prompt needs > 64
    sizes = out["length"]
    assert set(sizes) <= set(lengths) and len(set(sizes)) > 1  # they vary
    assert out["input_ids"].shape == out["labels"].shape == (24, total)
    for g in range(0, 24, group):  # a micro-batch's worth of consecutive rows shares one length
        assert len(set(sizes[g : g + group])) == 1
    for i, n in enumerate(sizes):
        # the row is the passkey example of its length, padded after it; nothing after it is trained on
        ex = passkey_example(tokenizer, int(n), float(out["depth"][i]), out["answer"][i])
        assert np.array_equal(out["input_ids"][i, :n], ex["input_ids"])
        assert np.array_equal(out["labels"][i, :n], ex["labels"])
        assert (out["labels"][i, n:] == IGNORE_INDEX).all()
        assert n == row_length(3, i, total, lengths, group)
    # reproducible from the seed alone; another seed draws other lengths
    again, _ = _rows(tokenizer, seed=3, total=total, l=l, group_size=group)
    assert all(np.array_equal(out[k], again[k]) for k in ("input_ids", "labels", "length"))
    other, _ = _rows(tokenizer, seed=4, total=total, l=l, group_size=group)
    assert not np.array_equal(out["length"], other["length"])


def test_without_lengths_rows_are_unchanged(tokenizer):
    template = PasskeyTemplate.from_tokenizer(tokenizer)
    out = _passkey_batch({"id": np.arange(3)}, tokenizer, template, 200, 1, None, True)
    assert "length" not in out and out["input_ids"].shape == (3, 200)


def _as_batches(rows: dict, batch_size: int, epochs: int = 1):
    """What a shard hands a worker: batches of stored rows (any grouping), as int64 tensors."""
    n = len(rows["length"])
    for epoch in range(epochs):
        for i in range(0, n - batch_size + 1, batch_size):
            yield epoch, {k: torch.as_tensor(rows[k][i : i + batch_size]) for k in ("input_ids", "labels", "length")}


def test_uniform_length_batches_regroup_rows_of_split_groups(tokenizer):
    out, _ = _rows(tokenizer, seed=5, n=48, group_size=4)
    # shift by one row: every stored batch straddles two groups, as a split between workers can leave them
    shifted = {k: v[1:] for k, v in out.items() if k in ("input_ids", "labels", "length")}
    got = list(uniform_length_batches(_as_batches(shifted, 4, epochs=2), 4))
    assert got
    seen = []
    for _, b in got:
        assert set(b) == {"input_ids", "labels"}
        ids, labels = b["input_ids"], b["labels"]
        assert ids.shape[0] == 4 and ids.shape == labels.shape
        assert (labels[:, -1] != IGNORE_INDEX).all()  # cut at the length: every row ends in its answer's eos
        seen += [tuple(r.tolist()) for r in ids]
    stored = {tuple(out["input_ids"][i, : out["length"][i]].tolist()) for i in range(1, 48)}
    assert set(seen) <= stored and len(set(seen)) >= 40  # the rows themselves, cut, nearly all used


def test_training_loop_cuts_text_rows_deterministically():
    """Text rows (no `length` column): micro-batch j of a worker is cut to draw_length(seed, rank, first + j)."""
    from condensation.train.loop import _batches

    class Shard:
        def iter_torch_batches(self, batch_size, **kw):
            for i in range(3):
                yield {"input_ids": torch.arange(512).repeat(2, 1) + i, "labels": torch.arange(512).repeat(2, 1)}

    lengths = segment_multiples(512, 64)
    def take(first, n=7):
        it = _batches(Shard(), 2, torch.device("cpu"), lengths, seed=11, rank=1, first=first)
        return [next(it)[1]["input_ids"].shape[1] for _ in range(n)]

    got = take(0)
    assert got == [draw_length(lengths, 11, 1, j) for j in range(7)] and len(set(got)) > 1
    assert take(5, 2) == got[5:7]  # after a resume at micro-batch 5, the same lengths as without one
    assert all(n % 64 == 0 and 64 <= n <= 512 for n in got)
