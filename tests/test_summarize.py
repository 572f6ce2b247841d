"""The summarization comparison (issue 14): presets and config errors, the prompts, the full-attention baseline as one
segment, stub models scoring 1 and 0, and one small end-to-end run of `workloads/summarize.py` whose MLflow runs hold
the table, the predictions and the pictures.

What the data and evaluation layers already test is not repeated here: the Appendix D template and the label mask of
each row (tests/data/test_summarization.py), ROUGE against hand-computed values and bucket edges
(tests/evaluate/test_eval_rouge.py).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from condensation.config import ConfigError
from condensation.data.summarization import format_summary_prompt
from condensation.summarize import (
    PRESETS,
    EvalExample,
    evaluate_model,
    instruct_prompts,
    load_summarize_config,
    model_train_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workload():
    spec = importlib.util.spec_from_file_location("workload_summarize", os.path.join(ROOT, "workloads", "summarize.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def installed(monkeypatch):
    """Presets that name smollm2-135m-instruct validate on a machine without its extra (CI)."""
    from condensation import pretrained

    monkeypatch.setattr(pretrained, "is_converted", lambda name, cache_dir=None: True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name, installed, tmp_path, monkeypatch):
    from condensation import summarize

    # h200-manpages reads the built data/summaries/manpages/ (tests/data/test_manpages.py builds it from fake .debs)
    monkeypatch.setattr(summarize, "MANPAGES_DIR", tmp_path)
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps({"article": "a", "highlights": "b"}) + "\n")
    cfg = load_summarize_config(name)
    assert cfg.models and cfg.generation.max_new_tokens > 0


def test_paper_preset_is_table_ii_and_iii(installed):
    cfg = load_summarize_config("paper")
    t = cfg.train
    assert (t.data.seq_len, t.model.segment_length, t.optim.lr, t.optim.min_lr) == (3072, 512, 6e-6, 6e-7)
    assert t.model.init_from == "meta-llama/Llama-3.2-3B" and t.schedule.global_batch == 64 and t.schedule.zero_stage == 2
    assert (cfg.generation.temperature, cfg.generation.max_new_tokens) == (0.3, 256) and cfg.buckets == [512, 1024]
    assert model_train_config(cfg, "condensation").schedule.total_steps == 3700
    assert model_train_config(cfg, "full_finetuned").schedule.total_steps == 112
    assert cfg.data.train_sources == ["cnn_dailymail"] and cfg.instruct.model == "meta-llama/Llama-3.2-3B-Instruct"
    assert cfg.label("condensation") == "Condensation (3K)" and cfg.label("full_finetuned") == "Full-Finetuned (3K)"
    booksum = load_summarize_config("paper-booksum")
    assert booksum.data.train_sources == ["cnn_dailymail", "booksum"] and booksum.label("condensation") == "Condensation (5.5K)"


def test_default_leaves_out_a_missing_instruction_model_and_says_why(monkeypatch):
    """Without the smollm2 extra the CPU default still runs (the model is left out with the install command); a
    preset that needs the model fails before Ray, naming the field."""
    from condensation import pretrained
    from condensation.summarize import instruct_available

    def missing(name):
        raise pretrained.MissingExtraError("pretrained checkpoint 'smollm2-135m-instruct' needs gguf: pip install ...")

    monkeypatch.setattr(pretrained, "check_installed", missing)
    monkeypatch.setattr(pretrained, "is_converted", lambda name, cache_dir=None: False)
    cfg = load_summarize_config("default")
    assert "pip install" in instruct_available(cfg)
    with pytest.raises(ConfigError, match=r"^instruct\.model: .*pip install"):
        load_summarize_config("default", overrides=["instruct.optional=false"])


def test_full_finetuned_is_the_same_run_in_one_segment(tmp_path):
    """The baseline differs from Condensation only in its segment (the whole row: exactly Llama, rule 10), and its
    export loads as a plain LlamaForCausalLM that computes the same logits."""
    from transformers import LlamaForCausalLM

    from condensation import CondensationForCausalLM
    from condensation.sizes import build_config

    cfg = load_summarize_config("default")
    cond, full = model_train_config(cfg, "condensation"), model_train_config(cfg, "full_finetuned")
    assert cond.model.segment_length == 64 and full.model.segment_length == cfg.train.data.seq_len
    same = lambda c: (c.optim, c.schedule, c.data, c.model.init_from, c.model.size, c.model.overrides)  # noqa: E731
    assert same(cond) == same(full) and cond.run.name != full.run.name

    torch.manual_seed(0)
    model = CondensationForCausalLM(build_config("debug", segment_length=48)).eval()
    model.save_pretrained(tmp_path)
    llama = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, atol=1e-4, rtol=1e-4)


BAD = [
    (["models=[condensation,bogus]"], "models"),
    (["buckets=[512,100]"], "buckets"),
    (["data.train_sources=[/no/such/cnn.jsonl]"], "data.train_sources.0"),
    (["data.train_sources=[{source: x.jsonl, fields: [article]}]"], "data.train_sources.0.fields"),
    (["data.eval_length_mode=cut"], "data.eval_length_mode"),
    (["generation.temperature=-1"], "generation.temperature"),
    (["condensation.steps=0"], "condensation.steps"),
    (["train.schedule.global_batch=3"], "train.schedule.global_batch"),
    (["instruct.model=/no/such/folder", "instruct.optional=false"], "instruct.model"),
    (["--config", "{tmp}/missing.yaml"], "--config"),
]


@pytest.mark.parametrize("argv, field", BAD, ids=[b[1] for b in BAD])
def test_bad_config_is_one_line_before_ray(argv, field, tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was started")))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + [f"train.run.storage={tmp_path}/runs"]
    assert _workload().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: {field}: ") and "\n" not in err, err
    assert not os.path.exists(tmp_path / "runs")


def test_local_file_without_the_fields_names_them(tmp_path, capsys):
    rows = tmp_path / "books.jsonl"
    rows.write_text(json.dumps({"chapter": "text " * 50, "summary_text": "short"}) + "\n")
    argv = [f"data.train_sources=[{rows}]", f"data.eval_source={rows}", f"train.run.storage={tmp_path}/runs"]
    assert _workload().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: data.train_sources.0: ") and "no field 'article'" in err and "fields:" in err


def test_synthetic_data_is_reproducible_and_its_facts_are_in_the_article(tmp_path):
    from condensation.data.synthetic_summaries import synthetic_records, write_synthetic_summaries

    a, b = synthetic_records(20, seed=3, max_filler=6), synthetic_records(20, seed=3, max_filler=6)
    assert a == b and a != synthetic_records(20, seed=4, max_filler=6)
    for r in a:
        first, second = r["highlights"].split(". ", 1)
        assert first in r["article"]  # the people and what they did: copied from the article
        assert second.split(" cost ")[1].split(" ")[0] in r["article"]  # the number too
        assert r["synthetic"] is True and not r["article"].endswith(second)  # a closing sentence without facts
    paths = write_synthetic_summaries(tmp_path, 5, 3, seed=1)
    train = [json.loads(line) for line in open(paths["train"])]
    test = [json.loads(line) for line in open(paths["test"])]
    assert len(train) == 5 and len(test) == 3 and not {r["article"] for r in train} & {r["article"] for r in test}
    assert "SYNTHETIC" in (tmp_path / "README.txt").read_text()


# ------------------------------------------------------------------------------------------------------------------
# Prompts and stub models


@pytest.fixture(scope="module")
def tok():
    from condensation.tokenizer import load_tokenizer

    return load_tokenizer()


ARTICLES = ["Clara Novak, a baker from Selby, opened a new library on Monday. Traffic was slow.",
            "The council will meet again next month. Hugo Lang, a pilot from Wells, won a national prize."]


def test_instruct_prompt_is_the_papers_inside_the_chat_template(tok):
    examples = [EvalExample(i, [], a, "", 0) for i, a in enumerate(ARTICLES)]
    plain, how = instruct_prompts(examples, tok, use_chat_template=True)  # the builtin tokenizer has no template
    assert how == "paper prompt"
    for ids, a in zip(plain, ARTICLES):
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids[1:], clean_up_tokenization_spaces=False) == format_summary_prompt(a)
    tok.chat_template = "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}" \
                        "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
    try:
        chat, how = instruct_prompts(examples, tok, use_chat_template=True)
        assert how == "chat template"
        text = tok.decode(chat[0], clean_up_tokenization_spaces=False)
        assert text == f"<|bos|>user\n{format_summary_prompt(ARTICLES[0]).rstrip()}<|eos|>\n<|bos|>assistant\n"
        assert instruct_prompts(examples, tok, use_chat_template=False)[1] == "paper prompt"
    finally:
        tok.chat_template = None


class ReferenceStub(torch.nn.Module):
    """A `generate` that writes each prompt's reference (found by the prompt's tokens, padding removed) or nothing
    at all (eos at once)."""

    def __init__(self, tok, answers: dict, empty: bool = False):
        super().__init__()
        self.tok, self.answers, self.empty, self.calls = tok, answers, empty, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=20, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        rows = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(t for t, m in zip(row, mask) if m)
            new = [] if self.empty else self.tok.encode(self.answers[prompt], add_special_tokens=False)
            rows.append(row + (new + [self.tok.eos_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


@pytest.mark.parametrize("padded", [False, True])
def test_copying_stub_scores_one_and_silent_stub_zero(tok, padded):
    from condensation.evaluate import generate_summaries, rouge_by_length

    refs = ["Clara Novak opened a new library.", "Hugo Lang won a national prize.", "Rosa Berg planted trees."]
    prompts = [tok.encode(format_summary_prompt(a)) for a in ARTICLES + ["Short."]]
    answers = {tuple(p): r for p, r in zip(prompts, refs)}
    lengths = [len(p) for p in prompts]
    for empty, score in ((False, 1.0), (True, 0.0)):
        stub = ReferenceStub(tok, answers, empty)
        preds = generate_summaries(stub, tok, prompts, max_new_tokens=32, batch_size=4, padded=padded, progress=False)
        assert preds == (["", "", ""] if empty else refs)
        res = rouge_by_length(preds, refs, lengths, buckets=((0, 25), (25, None)))
        for row in res.values():
            if row["count"]:
                assert {row["rouge1"], row["rouge2"], row["rougeL"]} == {score}
        assert len(stub.calls) == (1 if padded else 3)  # three lengths: one batch only when padded


def test_full_finetuned_evaluation_generates_with_full_attention(tok, tmp_path):
    """The baseline's export is evaluated as a plain Llama in left-padded batches; the predictions file holds every
    prediction beside its reference and bucket; the same settings again reuse the result."""
    from condensation import CondensationForCausalLM
    from condensation.data.summarization import _template_ids
    from condensation.sizes import build_config

    torch.manual_seed(0)
    CondensationForCausalLM(build_config("debug", vocab_size=2048, segment_length=256)).save_pretrained(tmp_path / "hf")
    cfg = load_summarize_config("debug", overrides=[f"train.run.storage={tmp_path}", "generation.temperature=0"])
    head, tail = _template_ids(tok)
    examples = [EvalExample(i, head + tok.encode(a, add_special_tokens=False) + tail, a, f"reference {i}", 0)
                for i, a in enumerate(ARTICLES)]
    for ex in examples:
        ex.input_length = len(ex.prompt_ids)
    said = []
    result, path, evaluated, _ = evaluate_model(cfg, "full_finetuned", examples, str(tmp_path / "hf"), said.append)
    assert evaluated and result["overall"]["count"] == 2
    rows = [json.loads(line) for line in open(path)]
    assert [r["reference"] for r in rows] == ["reference 0", "reference 1"]
    assert all(r["bucket"] == ("0-128" if r["input_length"] < 128 else "128-160") and "prediction" in r for r in rows)
    again = evaluate_model(cfg, "full_finetuned", examples, str(tmp_path / "hf"), said.append)
    assert not again[2] and again[0] == result and "already evaluated" in said[-1]


# ------------------------------------------------------------------------------------------------------------------
# End to end: the workload on the debug preset, with Ray


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory):
    """A small random Llama with the builtin tokenizer and a chat template: a stand-in for an instruction model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from condensation.tokenizer import load_tokenizer

    t = load_tokenizer()
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}\n{% endif %}"
    folder = tmp_path_factory.mktemp("tiny-instruct")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(t), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, bos_token_id=t.bos_token_id,
                                 eos_token_id=t.eos_token_id, tie_word_embeddings=True)).save_pretrained(folder)
    t.save_pretrained(folder)
    return str(folder)


def test_workload_end_to_end(ray_session, tiny_instruct, tok, tmp_path, capsys):
    from mlflow import MlflowClient

    from condensation.data.pipeline import IGNORE_INDEX
    from condensation.data.summarization import _template_ids
    from condensation.evaluate import rouge_by_length, rouge_from_metrics
    from condensation.summarize import training_data

    argv = ["--preset", "debug", f"train.run.storage={tmp_path}", "models=[condensation,instruct_zero_shot]",
            f"instruct.model={tiny_instruct}"]
    assert _workload().main(argv) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "| Condensation (256) | overall |" in out and "| Instruction model | 0-128 |" in out

    cfg = load_summarize_config("debug", overrides=argv[2:])
    folder = tmp_path / cfg.name
    # the rows the model trained on: the prompt masked, the summary + eos the only targets
    rows = training_data(cfg, tok)[0].take(4)
    references = {json.loads(line)["highlights"] for line in open(folder / "synthetic" / "train.jsonl")}
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        first = int(np.argmax(labels != IGNORE_INDEX))
        assert tok.decode(ids[:first], clean_up_tokenization_spaces=False).endswith("\n\n----Summary:\n\n")
        assert labels[first:][labels[first:] != IGNORE_INDEX][-1] == tok.eos_token_id
        assert tok.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True) in references

    # every prediction beside its reference; buckets by the prompt's token count; the table recomputes
    eval_set = [json.loads(line) for line in open(folder / "eval_set.jsonl")]
    assert len(eval_set) == cfg.data.eval_examples
    head, tail = _template_ids(tok)
    for ex in eval_set:  # the prompt as the data layer builds it: bos + template and article, each encoded alone
        assert len(head) + len(tok.encode(ex["article"], add_special_tokens=False)) + len(tail) == ex["input_length"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("summarization")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("summarize") == cfg.name)
    children = {r.data.tags["summarize.model"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"condensation", "instruct_zero_shot"}
    for model, run in children.items():
        preds = [json.loads(line) for line in open(folder / "eval" / model / "predictions.jsonl")]
        assert [p["reference"] for p in preds] == [e["reference"] for e in eval_set]
        again = rouge_by_length([p["prediction"] for p in preds], [p["reference"] for p in preds],
                                [p["input_length"] for p in preds], buckets=((0, 128), (128, 160), (160, None)))
        logged = rouge_from_metrics(run.data.metrics)
        assert list(logged) == ["overall", "0-128", "128-160", "160+"]
        for bucket, row in again.items():
            assert logged[bucket]["count"] == row["count"]
            if row["count"]:
                assert logged[bucket]["rouge1"] == pytest.approx(row["rouge1"])
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "summaries")}
        assert {"summaries/predictions.jsonl", "summaries/rouge.json", "summaries/rouge_table.md"} <= arts, arts
        assert run.info.status == "FINISHED"
    assert "loss" in children["condensation"].data.metrics  # the model's run is its training run
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "summaries")}
    assert {"summaries/rouge_table.md", "summaries/rouge_overall.png", "summaries/rouge_by_length.png"} <= arts
    assert any(k.startswith("rouge/condensation-256/overall/") for k in client.get_run(parent.info.run_id).data.metrics)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # again: nothing is trained or generated twice
    assert _workload().main(argv) == 0
    out = capsys.readouterr().out
    assert "training already finished" in out and out.count("already evaluated") == 2

    # one command compares the runs of the experiment: the table and the pictures
    cmp = tmp_path / "cmp"
    assert _workload().main(["--compare", "--experiment", "summarization", "--tracking-uri",
                             f"sqlite:///{tmp_path}/mlflow.db", "--out", str(cmp)]) == 0
    table = (cmp / "rouge_comparison.md").read_text()
    assert "| Condensation (256) | overall |" in table and "| Instruction model | overall |" in table
    assert (cmp / "rouge_overall.png").stat().st_size > 1000 and (cmp / "rouge_by_length.png").stat().st_size > 1000
