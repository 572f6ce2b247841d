"""The passkey accuracy grid: scored right on stub models that answer right, wrong or partly right; cells land in
the right (length, depth) place; batching, determinism, storage; and a real tiny model through `generate`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from condensation.evaluate import PasskeyGrid, cell_passkeys, digit_accuracy, parse_digits, passkey_grid

from eval_stubs import OracleModel, toy_passkey_example

LENGTHS = [120, 200]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def grid_for(model, tok, n=3, **kw):
    kw.setdefault("lengths", LENGTHS)
    kw.setdefault("depths", DEPTHS)
    return passkey_grid(model, tok, n_per_cell=n, seed=0, batch_size=2, progress=False, example_fn=toy_passkey_example, **kw)


@pytest.mark.parametrize("text, digits", [
    (" 9054.", "9054"), ("9054 is the passkey", "9054"), (" 9 0 5 4", "9054"), ("abc", ""), ("", ""),
    (" 12. 34", "12"), ("x7y", "7"),
])
def test_parse_digits(text, digits):
    assert parse_digits(text) == digits


def test_digit_accuracy():
    assert digit_accuracy("9054", "9054") == 1.0
    assert digit_accuracy("9000", "9054") == 0.5
    assert digit_accuracy("90", "9054") == 0.5  # missing digits are wrong
    assert digit_accuracy("", "9054") == 0.0
    assert digit_accuracy("905411", "9054") == 1.0  # per-digit looks at the answer's positions; exact match does not


def test_always_right(tok):
    model = OracleModel(tok, "right")
    grid = grid_for(model, tok)
    assert grid.exact.shape == (2, 5)
    np.testing.assert_array_equal(grid.exact, 1.0)
    np.testing.assert_array_equal(grid.digit, 1.0)
    np.testing.assert_array_equal(grid.counts, 3)
    assert grid.mean_exact == 1.0
    m = grid.to_metrics()
    assert m["passkey/exact/len_120/depth_0.50"] == 1.0
    assert m["passkey/digit/len_200/depth_1.00"] == 1.0
    assert m["passkey/exact/len_200/mean"] == 1.0 and m["passkey/exact/mean"] == 1.0
    assert len(m) == 2 * (2 * 5 + 2 + 1)
    assert all(e["prediction"] == e["answer"] and len(e["answer"]) == 4 for e in grid.examples)


def test_never_right(tok):
    grid = grid_for(OracleModel(tok, "wrong"), tok)
    np.testing.assert_array_equal(grid.exact, 0.0)
    np.testing.assert_array_equal(grid.digit, 0.0)
    np.testing.assert_array_equal(grid.counts, 3)
    assert grid.summary() == {120: {"exact": 0.0, "digit": 0.0, "count": 15}, 200: {"exact": 0.0, "digit": 0.0, "count": 15}}


def test_half_the_digits(tok):
    grid = grid_for(OracleModel(tok, "half"), tok)
    np.testing.assert_array_equal(grid.exact, 0.0)
    np.testing.assert_allclose(grid.digit, 0.5)
    assert grid.to_metrics()["passkey/digit/mean"] == pytest.approx(0.5)


def test_cells_in_their_place(tok):
    """A model right only for shallow needles gives 1 at small depths and 0 at large ones on every length; a model
    right only on short prompts gives 1 on the short row only: neither transposed nor shifted."""
    shallow = grid_for(OracleModel(tok, "shallow"), tok)
    np.testing.assert_array_equal(shallow.exact, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])
    short = grid_for(OracleModel(tok, "short", limit=150), tok)
    np.testing.assert_array_equal(short.exact, [[1] * 5, [0] * 5])
    assert short.cell(120, 0.5) == {"exact": 1.0, "digit": 1.0, "count": 3}
    assert short.summary()[200]["exact"] == 0.0


def test_generate_calls(tok):
    """Greedy, answer digits + 1 new tokens, an all-ones mask, model in eval mode, rows batched per cell."""
    model = OracleModel(tok, "right")
    model.train()
    grid_for(model, tok, n=5, lengths=[120], depths=[0.5])
    assert [c["shape"][0] for c in model.calls] == [2, 2, 1]
    for c in model.calls:
        assert c["max_new_tokens"] == 5 and c["do_sample"] is False and not c["training"]
        assert torch.equal(c["attention_mask"], torch.ones(c["shape"], dtype=torch.long))
        assert c["pad_token_id"] == tok.pad_token_id
    assert model.training  # handed back in the mode it came in


def test_unequal_prompt_lengths_never_share_a_batch(tok):
    """A tokenizer may spell passkeys in different token counts: such prompts go to separate generate calls."""

    def ragged(tokenizer, total_tokens, depth, passkey, train=False):
        ex = toy_passkey_example(tokenizer, total_tokens, depth, passkey, train)
        if passkey % 2:
            ex["input_ids"] = ex["input_ids"][1:]
        return ex

    model = OracleModel(tok, "right")
    grid = passkey_grid(model, tok, [120], [0.5], n_per_cell=8, batch_size=8, progress=False, example_fn=ragged)
    assert grid.counts[0, 0] == 8 and grid.exact[0, 0] == 1.0
    odd = sum(k % 2 for k in cell_passkeys(0, 120, 0.5, 8, 4))
    assert 0 < odd < 8  # both lengths occur with seed 0
    assert sorted(c["shape"] for c in model.calls) == sorted([(odd, 114), (8 - odd, 115)])

def test_passkeys_deterministic_per_cell(tok):
    a = cell_passkeys(0, 2048, 0.5, 10, 4)
    assert a == cell_passkeys(0, 2048, 0.5, 10, 4) and a != cell_passkeys(1, 2048, 0.5, 10, 4)
    assert all(1000 <= k <= 9999 for k in a) and len(set(a)) > 1
    one = grid_for(OracleModel(tok, "right"), tok, lengths=[120])
    two = grid_for(OracleModel(tok, "right"), tok, lengths=[200, 120])
    assert [e["answer"] for e in one.examples] == [e["answer"] for e in two.examples if e["length"] == 120]


def test_json_roundtrip(tok, tmp_path):
    grid = grid_for(OracleModel(tok, "shallow"), tok, meta={"trained_length": 120})
    back = PasskeyGrid.from_json(grid.to_json(tmp_path / "g.json"))
    for other in (back, PasskeyGrid.from_json(tmp_path / "g.json"), PasskeyGrid.from_json(str(tmp_path / "g.json"))):
        assert other.lengths == grid.lengths and other.depths == grid.depths
        np.testing.assert_array_equal(other.exact, grid.exact)
        np.testing.assert_array_equal(other.counts, grid.counts)
        assert other.meta["trained_length"] == 120 and other.meta["n_per_cell"] == 3
        assert other.to_metrics() == grid.to_metrics()
    assert "| 120 |" in grid.format_table() and "0.40" in grid.format_table()


def test_empty_cells_and_metric_names():
    grid = PasskeyGrid([2048, 4096], [0.125, 0.5], [[1, 0], [0, 0]], [[1, 0.5], [0, 0]], [[2, 2], [0, 0]])
    m = grid.to_metrics()
    assert "passkey/exact/len_2048/depth_0.125" in m and "passkey/exact/len_2048/depth_0.50" in m
    assert not any("len_4096" in k for k in m)  # no prompts there: nothing logged rather than a fake 0
    assert math.isnan(grid.summary()[4096]["exact"])
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-./ ") for k in m)


def test_real_tiny_model(tok, tiny_model):
    """CondensationForCausalLM's own generate, prompts longer than a segment (32): runs and is scored."""
    grid = passkey_grid(tiny_model, tok, [100, 150], [0.0, 1.0], n_per_cell=2, batch_size=2, progress=False,
                        example_fn=toy_passkey_example)
    np.testing.assert_array_equal(grid.counts, 2)
    assert ((0 <= grid.digit) & (grid.digit <= 1)).all() and ((0 <= grid.exact) & (grid.exact <= grid.digit)).all()
    # same answers as a direct greedy generate of one prompt
    ex = grid.examples[0]
    ids = toy_passkey_example(tok, 100, 0.0, int(ex["answer"]))["input_ids"]
    t = torch.tensor(ids)[None]
    out = tiny_model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=5, do_sample=False, pad_token_id=0,
                              eos_token_id=1)
    assert tok.decode(out[0, t.shape[1]:].tolist(), skip_special_tokens=True) == ex["text"]


def test_with_the_data_layer():
    """The default prompt builder (condensation.data.passkey) and the shipped tokenizer."""
    from condensation.data import passkey
    from condensation.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    lengths = [256, 384]
    grid = passkey_grid(OracleModel(tokenizer, "right"), tokenizer, lengths, [0.0, 0.5, 1.0], n_per_cell=2, progress=False)
    np.testing.assert_array_equal(grid.exact, 1.0)
    wrong = passkey_grid(OracleModel(tokenizer, "wrong"), tokenizer, lengths, [0.5], n_per_cell=2, progress=False)
    np.testing.assert_array_equal(wrong.exact, 0.0)
    ex = passkey.passkey_example(tokenizer, 256, 0.5, 1234, train=False)
    assert len(ex["input_ids"]) < 256
    # and a real model of the shipped tokenizer's vocab through the default prompt builder
    from condensation import CondensationForCausalLM
    from condensation.sizes import build_config

    torch.manual_seed(0)
    model = CondensationForCausalLM(build_config("debug", vocab_size=len(tokenizer)))
    real = passkey_grid(model, tokenizer, [160], [0.0, 1.0], n_per_cell=2, progress=False)
    np.testing.assert_array_equal(real.counts, 2)
    assert all(len(e["answer"]) == 4 and e["prompt_tokens"] < 160 for e in real.examples)
