"""ROUGE by input length against values worked out by hand, and summary generation through a real tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from condensation.evaluate import format_rouge_table, generate_summaries, rouge_by_length, rouge_metrics


def test_identical_and_disjoint():
    same = rouge_by_length(["the cat sat on the mat"], ["the cat sat on the mat"], [10])
    assert same["overall"] == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "count": 1}
    apart = rouge_by_length(["alpha beta gamma"], ["delta epsilon zeta"], [10])
    assert apart["overall"] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "count": 1}


def test_hand_computed():
    # prediction "the cat sat", reference "the cat ran away":
    # unigrams: 2 shared, P = 2/3, R = 2/4 -> F = 4/7; bigrams: "the cat" shared, P = 1/2, R = 1/3 -> F = 2/5;
    # LCS "the cat" = 2 -> the ROUGE-1 numbers, 4/7
    r = rouge_by_length(["the cat sat"], ["the cat ran away"], [0])["overall"]
    assert r["rouge1"] == pytest.approx(4 / 7)
    assert r["rouge2"] == pytest.approx(2 / 5)
    assert r["rougeL"] == pytest.approx(4 / 7)
    # stemming: "cats" ~ "cat" (Porter), as with rouge-score's use_stemmer=True
    assert rouge_by_length(["cats"], ["cat"], [0])["overall"]["rouge1"] == 1.0
    assert rouge_by_length(["cats"], ["cat"], [0], use_stemmer=False)["overall"]["rouge1"] == 0.0


def test_buckets_by_input_length():
    same, apart = ("a b c d", "a b c d"), ("a b c d", "w x y z")
    pairs = [same, same, apart, apart, same, apart]
    lengths = [0, 511, 512, 1023, 1024, 100_000]  # half-open buckets: 512 -> 512-1024, 1024 -> 1024+
    r = rouge_by_length([p for p, _ in pairs], [q for _, q in pairs], lengths)
    assert list(r) == ["overall", "0-512", "512-1024", "1024+"]
    assert r["0-512"] == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "count": 2}
    assert r["512-1024"] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "count": 2}
    assert r["1024+"]["rouge1"] == 0.5 and r["1024+"]["count"] == 2
    assert r["overall"]["rouge1"] == 0.5 and r["overall"]["count"] == 6

    m = rouge_metrics(r)
    assert m["rouge/overall/rouge1"] == 0.5 and m["rouge/len_1024-inf/count"] == 2 and m["rouge/len_0-512/rougeL"] == 1.0
    assert not any("+" in k for k in m)  # '+' is not a legal MLflow metric character


def test_empty_bucket_and_errors():
    r = rouge_by_length(["a b"], ["a b"], [5], buckets=((0, 10), (10, None)))
    assert r["10+"]["count"] == 0 and math.isnan(r["10+"]["rouge1"])
    assert not any(k.startswith("rouge/len_10-inf/rouge") for k in rouge_metrics(r))
    with pytest.raises(ValueError):
        rouge_by_length(["a"], ["a", "b"], [1, 2])
    table = format_rouge_table({"toy": r})
    assert "| toy | 0-10 | 1.0000 / 1.0000 / 1.0000 | 1 |" in table and "| toy | 10+ | - / - / - | 0 |" in table


def test_generate_summaries_tiny_model(tok, tiny_model):
    """End to end through CondensationForCausalLM.generate: prompts over a segment (32 tokens), sampling at 0.3."""
    prompts = ["Summarize this text:\n\nThe grass is green. The sky is blue. The sun is yellow.\n\n----Summary:\n",
               "Summarize this text:\n\nShort one.\n\n----Summary:\n"]
    state = torch.get_rng_state()
    a = generate_summaries(tiny_model, tok, prompts, max_new_tokens=12, seed=3, progress=False)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    b = generate_summaries(tiny_model, tok, prompts, max_new_tokens=12, seed=3, progress=False)
    assert a == b and len(a) == 2 and all(isinstance(s, str) for s in a)
    assert all(0 < len(s) <= 12 for s in a)  # char tokens: at most 12 characters (eos/pad dropped)
    ids = [tok.encode(p) for p in prompts]
    assert generate_summaries(tiny_model, tok, ids, max_new_tokens=12, seed=3, progress=False) == a  # ids work too


def test_greedy_batches_match_single(tok, tiny_model):
    """Equal-length prompts share a generate call; greedy output must not depend on that."""
    prompts = ["abcdefghij" * 5, "jihgfedcba" * 5, "short"]
    one = generate_summaries(tiny_model, tok, prompts, max_new_tokens=6, do_sample=False, batch_size=1, progress=False)
    many = generate_summaries(tiny_model, tok, prompts, max_new_tokens=6, do_sample=False, batch_size=4, progress=False)
    assert one == many


def test_equals_rouge_score_on_fixed_strings():
    """The same F1 as Google's rouge-score with stemming, example by example, and their mean per bucket."""
    from rouge_score import rouge_scorer

    preds = ["The cats were sitting on mats all day.", "Police arrested two men in London on Friday.", "", "a b"]
    refs = ["A cat sat on the mat.", "Two men were arrested by police in London.", "Something happened.", "a b"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = [{k: s.fmeasure for k, s in scorer.score(r, p).items()} for p, r in zip(preds, refs)]
    r = rouge_by_length(preds, refs, [100, 700, 700, 5000])
    for rt in ("rouge1", "rouge2", "rougeL"):
        assert r["overall"][rt] == pytest.approx(sum(e[rt] for e in expected) / 4, abs=1e-12)
        assert r["0-512"][rt] == pytest.approx(expected[0][rt], abs=1e-12)
        assert r["512-1024"][rt] == pytest.approx((expected[1][rt] + expected[2][rt]) / 2, abs=1e-12)
        assert r["1024+"][rt] == 1.0
    assert expected[0]["rouge1"] > 0.5  # stemming: cats ~ cat, sitting ~ sat is not, mats ~ mat


def test_buckets_from_edges_and_metrics_round_trip():
    from condensation.evaluate import buckets_from_edges, rouge_from_metrics
    from condensation.evaluate.rouge import bucket_of

    buckets = buckets_from_edges([512, 1024])
    assert buckets == ((0, 512), (512, 1024), (1024, None))
    assert [bucket_of(n, buckets) for n in (0, 511, 512, 1023, 1024, 10**6)] == \
        ["0-512", "0-512", "512-1024", "512-1024", "1024+", "1024+"]
    with pytest.raises(ValueError):
        buckets_from_edges([512, 256])
    r = rouge_by_length(["a b c", "a x", "q"], ["a b c", "a b", "z"], [10, 600, 700], buckets=buckets)
    r["1024+"] = {"rouge1": math.nan, "rouge2": math.nan, "rougeL": math.nan, "count": 0}
    back = rouge_from_metrics({**rouge_metrics(r), "loss": 1.0, "rouge/other/x/rouge1": 3.0})
    assert list(back) == ["overall", "0-512", "512-1024", "1024+"]
    for bucket, row in r.items():
        assert back[bucket]["count"] == row["count"]
        for rt in ("rouge1", "rouge2", "rougeL"):
            assert back[bucket][rt] == pytest.approx(row[rt]) or (math.isnan(row[rt]) and math.isnan(back[bucket][rt]))


def test_left_padded_batches_match_single_prompts(tok):
    """A plain transformers Llama in left-padded batches (padded=True) writes what it writes for each prompt alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                         bos_token_id=2, eos_token_id=1)).eval()
    prompts = ["abcdefghij" * 3, "short one", "medium sized prompt"]
    one = generate_summaries(llama, tok, prompts, max_new_tokens=8, do_sample=False, batch_size=1, progress=False)
    padded = generate_summaries(llama, tok, prompts, max_new_tokens=8, do_sample=False, batch_size=3, padded=True,
                                progress=False)
    assert one == padded and all(one)
