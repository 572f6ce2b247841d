"""Appendix C passkey examples: exact lengths, the needle at the requested depth, the answer round-trips,
evaluation prompts are the training examples minus the answer, and the Ray source is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from condensation.data.passkey import (
    PASSKEY_FILLER,
    PASSKEY_INSTRUCTION,
    PASSKEY_QUESTION,
    PasskeyTemplate,
    needle_token_start,
    passkey_dataset,
    passkey_example,
    row_depth,
    row_passkey,
)
from condensation.data.pipeline import IGNORE_INDEX, torch_batches, train_view

LENGTHS = [120, 257, 512, 2048]
DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def test_prompt_pieces_are_the_papers():
    assert PASSKEY_INSTRUCTION == (
        "There is a critical piece of information hidden within a large amount of irrelevant text. Your task is "
        "to locate it and remember it carefully. I will test your ability to recall this information.")
    assert PASSKEY_FILLER == ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                              "There and back again.")
    assert PASSKEY_QUESTION == "What is the passkey? The passkey is"


@pytest.mark.parametrize("total", LENGTHS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_exact_length_depth_and_answer(tokenizer, total, depth):
    ex = passkey_example(tokenizer, total, depth, 9054)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.dtype == np.int64 and labels.dtype == np.int64 and len(ids) == len(labels) == total
    # loss only on the digits and eos; they decode to the answer
    answer_ids = ids[labels != IGNORE_INDEX]
    assert np.array_equal(answer_ids, labels[labels != IGNORE_INDEX])
    assert answer_ids[-1] == tokenizer.eos_token_id and len(answer_ids) == 5  # 4 single-digit tokens + eos
    assert tokenizer.decode(answer_ids, skip_special_tokens=True) == ex["answer"] == "9054"
    assert np.all(labels[:-5] == IGNORE_INDEX)
    # the needle starts where reported and sits at the requested fraction of the filler
    start = needle_token_start(ex)
    needle = "\n\nThe passkey is 9054. Remember it carefully. 9054 is the passkey."
    assert _decode(tokenizer, ids[start:]).startswith(needle)
    sentence = max(len(s) for s in PasskeyTemplate.from_tokenizer(tokenizer).next_sentence) + 2
    realised = ex["filler_tokens_before"] / max(ex["filler_tokens"], 1)
    assert abs(realised - depth) * ex["filler_tokens"] <= sentence
    if depth == 0.0:
        assert ex["filler_tokens_before"] == 0
    # the text reads as Appendix C
    text = _decode(tokenizer, ids[1:])
    assert ids[0] == tokenizer.bos_token_id
    assert text.startswith(PASSKEY_INSTRUCTION + "\n\n")
    assert text.endswith("\n\n" + PASSKEY_QUESTION + " 9054<|eos|>")


def test_filler_is_whole_sentences_before_needle(tokenizer):
    ex = passkey_example(tokenizer, 1024, 0.5, 1234)
    text = _decode(tokenizer, ex["input_ids"][1:ex["needle_token_start"]])
    filler = text[len(PASSKEY_INSTRUCTION) + 2:]
    assert filler.endswith(".") and " ".join([PASSKEY_FILLER] * 100).startswith(filler)


def test_tokenization_matches_whole_text(tokenizer):
    """Piecewise encoding equals encoding the decoded text, through the needle (whole sentences only there)."""
    for total in LENGTHS:
        for depth in (0.0, 0.5, 1.0):
            ex = passkey_example(tokenizer, total, depth, 4321)
            ids = ex["input_ids"].tolist()
            needle_len = len(tokenizer.encode("\n\nThe passkey is 4321. Remember it carefully. 4321 is the passkey.",
                                              add_special_tokens=False))
            end = ex["needle_token_start"] + needle_len
            assert tokenizer.encode(_decode(tokenizer, ids[1:end]), add_special_tokens=False) == ids[1:end]


def test_eval_prompt_is_training_prefix(tokenizer):
    train = passkey_example(tokenizer, 512, 0.3, 5678)
    evaluation = passkey_example(tokenizer, 512, 0.3, 5678, train=False)
    n = len(evaluation["input_ids"])
    assert n == 512 - 5 and np.array_equal(evaluation["input_ids"], train["input_ids"][:n])
    assert np.all(evaluation["labels"] == IGNORE_INDEX) and evaluation["answer"] == "5678"
    assert _decode(tokenizer, evaluation["input_ids"]).endswith(PASSKEY_QUESTION + " ")


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        passkey_example(tokenizer, 40, 0.5, 1234)
    with pytest.raises(ValueError, match="depth"):
        passkey_example(tokenizer, 512, 1.5, 1234)


def test_ray_source_is_deterministic(ray_session, tokenizer):
    ds = passkey_dataset(tokenizer, 256, n=24, seed=7)
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    again = sorted(passkey_dataset(tokenizer, 256, n=24, seed=7).take_all(), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(24))
    for a, b in zip(rows, again):
        assert np.array_equal(a["input_ids"], b["input_ids"]) and a["answer"] == b["answer"]
    row = rows[5]
    ref = passkey_example(tokenizer, 256, row_depth(7, 5, None), row_passkey(7, 5))
    assert np.array_equal(row["input_ids"], ref["input_ids"]) and np.array_equal(row["labels"], ref["labels"])
    assert len({r["answer"] for r in rows}) > 15 and len({round(r["depth"], 3) for r in rows}) > 15
    other = passkey_dataset(tokenizer, 256, n=24, seed=8).take_all()
    assert {r["answer"] for r in other} != {r["answer"] for r in rows}


def test_ray_source_eval_grid_and_batches(ray_session, tokenizer):
    ds = passkey_dataset(tokenizer, 300, n=6, seed=0, depths=[0.0, 0.5, 1.0], train=False)
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    assert [r["depth"] for r in rows] == [0.0, 0.5, 1.0] * 2
    assert all(len(r["input_ids"]) == 300 - 5 for r in rows)
    batches = list(torch_batches(train_view(passkey_dataset(tokenizer, 128, n=8, seed=1)), batch_size=4))
    assert len(batches) == 2 and tuple(batches[0]["input_ids"].shape) == (4, 128)
    assert str(batches[0]["labels"].dtype) == "torch.int64"
