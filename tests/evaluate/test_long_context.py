"""Long-context evaluation (issue 12): loss by token position against an independent per-token loop, Condensation
equal to Llama within one segment (docs/model.md rule 10), token windows from real text, the curve's arithmetic,
its picture and MLflow record, and workloads/evaluate.py end to end on a tiny saved Llama.

The tiny models draw weights with std 0.2 (initializer_range), so that an off-by-one in the targets, a wrong bin or
a missing window moves the numbers far beyond float64 round-off; a negative control shows the comparison sees it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from condensation import CondensationForCausalLM
from condensation.evaluate import LossCurve, format_curves_table, log_loss_curves, loss_by_position, token_windows
from condensation.evaluate.long_context import position_ranges, slug
from condensation.evaluate.plots import plot_loss_by_position
from condensation.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = dict(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=128)


def tiny_llama(dtype=torch.float64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**ARCH)).to(dtype).eval()


def condensation_like(llama: LlamaForCausalLM, segment_length: int, tmp_path) -> CondensationForCausalLM:
    """The same weights as a CondensationForCausalLM, through a saved folder (the path users take)."""
    folder = tmp_path / "llama"
    if not folder.exists():
        llama.save_pretrained(folder)
    return CondensationForCausalLM.from_pretrained(folder, segment_length=segment_length,
                                                   dtype=llama.dtype).eval()


def windows_of(n: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, ARCH["vocab_size"], (n, length))


@torch.no_grad()
def reference_bins(model, windows: np.ndarray, bin_tokens: int, shift: int = 1):
    """Full [L, V] logits of each window, one cross-entropy per predicted token, and per bin the plain mean of the
    losses whose predicted token falls in it. shift=0 is the off-by-one mistake (a position predicting itself)."""
    per_bin: dict[int, list[float]] = {}
    per_window = []
    for row in windows:
        ids = torch.as_tensor(row)[None]
        logits = model(ids).logits[0].double()  # [L, V]
        losses = []
        for t in range(1, len(row)):  # token t predicted from the logits of position t - 1
            ce = F.cross_entropy(logits[t - shift][None], ids[0, t][None]).item()
            per_bin.setdefault(t // bin_tokens, []).append(ce)
            losses.append(ce)
        per_window.append(sum(losses) / len(losses))
    bins = [sum(v) / len(v) for _, v in sorted(per_bin.items())]
    return bins, [len(v) for _, v in sorted(per_bin.items())], per_window


# ----------------------------------------------------------------------------------------------------------------
# (a) loss_by_position against the reference loop


def test_loss_by_position_equals_full_logits_loop():
    llama = tiny_llama()
    w = windows_of(3, 45)  # 3 windows: an uneven last batch; 45 tokens: a short last bin
    curve = loss_by_position(llama, w, bin_tokens=8, batch_size=2, chunk_tokens=7, name="llama")  # chunks off-grid
    bins, counts, per_window = reference_bins(llama, w, 8)
    assert curve.length == 45 and curve.bin_tokens == 8 and curve.bin_count == counts == [21, 24, 24, 24, 24, 15]
    np.testing.assert_allclose(curve.bin_loss, bins, rtol=0, atol=1e-10)
    np.testing.assert_allclose(curve.window_loss, per_window, rtol=0, atol=1e-10)
    assert curve.tokens == 3 * 44 and curve.windows == 3
    assert curve.loss == pytest.approx(np.mean(per_window), abs=1e-10)
    assert curve.meta["dtype"] == "float64" and curve.name == "llama"
    # the comparison is not vacuous: the off-by-one target differs by far more than the tolerance
    wrong, _, _ = reference_bins(llama, w, 8, shift=0)
    assert np.abs(np.asarray(wrong) - np.asarray(curve.bin_loss)).min() > 0.1
    # spread of the random weights: losses well away from the uniform log(V), so mistakes cannot hide in it
    assert abs(curve.loss - math.log(ARCH["vocab_size"])) > 0.2


def test_loss_by_position_rejects_bad_windows():
    llama = tiny_llama(torch.float32)
    with pytest.raises(ValueError, match="vocabulary"):
        loss_by_position(llama, np.full((1, 8), ARCH["vocab_size"]))
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        loss_by_position(llama, np.zeros(8, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# (b) rule 10: one segment is Llama; shorter segments are not


def test_condensation_one_segment_equals_llama_and_short_segments_differ(tmp_path):
    llama = tiny_llama()
    w = windows_of(2, 48, seed=1)
    full = loss_by_position(llama, w, bin_tokens=8)
    one = loss_by_position(condensation_like(llama, 48, tmp_path), w, bin_tokens=8)
    assert one.name == "Condensation l=48" and full.name == "llama full attention"
    # float64 weights; both models build their RoPE tables in float32, Condensation at positions shifted by l
    # (docs/model.md rule 6), hence 1e-6 and not round-off
    np.testing.assert_allclose(one.bin_loss, full.bin_loss, rtol=0, atol=1e-6)

    short_model = condensation_like(llama, 16, tmp_path)
    short = loss_by_position(short_model, w, bin_tokens=8, batch_size=2)
    # the first segment (positions 0-15, bins 0-1) sees exactly what Llama sees; later ones see memory instead
    np.testing.assert_allclose(short.bin_loss[:2], full.bin_loss[:2], rtol=0, atol=1e-6)
    assert min(abs(a - b) for a, b in zip(short.bin_loss[2:], full.bin_loss[2:])) > 1e-3
    # and it is the model's own loss: token_mean over the same windows
    short_model.config.loss_reduction = "token_mean"
    with torch.no_grad():
        own = short_model(torch.as_tensor(w), labels=torch.as_tensor(w)).loss.item()
    assert short.loss == pytest.approx(own, abs=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# (c) token windows from a jsonl file


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def write_jsonl(path, texts, extra_lines=()):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "id": 0}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def doc_text(i: int, words: int) -> str:
    return " ".join(f"word{i}x{k % 37}" for k in range(words))


def encoded(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]


def test_windows_from_long_documents(tokenizer, tmp_path):
    texts = [doc_text(i, 120 + 40 * i) for i in range(6)]
    src = write_jsonl(tmp_path / "docs.jsonl", texts, extra_lines=["not json", json.dumps({"body": "x"}), ""])
    docs = [encoded(tokenizer, t) for t in texts]
    length = 200
    assert sum(len(d) >= length for d in docs) >= 4
    w, info = token_windows(tokenizer, src, length, 3, seed=0, return_info=True)
    assert w.shape == (3, length) and w.dtype == np.int64
    assert info["concatenated"] is False and info["skipped_rows"] == 2 and info["documents"] == 6
    # one window per document, each a document's first `length` tokens (from its bos)
    assert len({i for i, _ in info["windows"]}) == 3
    for row, (i, offset) in zip(w, info["windows"]):
        assert offset == 0 and row[0] == tokenizer.bos_token_id and row.tolist() == docs[i][:length]
    again = token_windows(tokenizer, src, length, 3, seed=0)
    assert np.array_equal(w, again)
    other = token_windows(tokenizer, tmp_path / "docs.jsonl", length, 3, seed=5, return_info=True)[1]
    assert {i for i, _ in other["windows"]} != {i for i, _ in info["windows"]}
    # more windows than long documents: second windows at offset `length` of the longest documents
    n_slots = sum(len(d) // length for d in docs)
    w2, info2 = token_windows(tokenizer, src, length, n_slots, seed=1, return_info=True)
    assert sorted(info2["windows"]) == sorted([i, k * length] for i, d in enumerate(docs) for k in range(len(d) // length))
    for row, (i, offset) in zip(w2, info2["windows"]):
        assert row.tolist() == docs[i][offset : offset + length]


def test_windows_concatenate_short_documents(tokenizer, tmp_path):
    folder = tmp_path / "heldout"
    folder.mkdir()
    texts = [doc_text(i, 12) for i in range(12)]  # about 70 tokens each
    write_jsonl(folder / "a.jsonl", texts[:7])
    write_jsonl(folder / "b.jsonl", texts[7:])  # a folder: files in sorted order
    stream = [t for text in texts for t in encoded(tokenizer, text) + [tokenizer.eos_token_id]]
    length = 100
    assert max(len(encoded(tokenizer, t)) for t in texts) < length
    with pytest.warns(UserWarning, match="concatenated in file order, separated by eos"):
        w, info = token_windows(tokenizer, folder, length, 4, seed=3, return_info=True)
    assert w.shape == (4, length) and info["concatenated"] is True and info["long_documents"] == 0
    for row, (doc, offset) in zip(w, info["windows"]):
        assert doc == -1 and offset % length == 0 and row.tolist() == stream[offset : offset + length]
    assert any(tokenizer.eos_token_id in row for row in w.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(w, token_windows(tokenizer, folder, length, 4, seed=3))


def test_windows_error_names_the_file(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "small.jsonl", [doc_text(0, 20), doc_text(1, 20)])
    with pytest.raises(ValueError, match=r"small\.jsonl: not enough text for 5 windows of 64 tokens"):
        token_windows(tokenizer, src, 64, 5)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        token_windows(tokenizer, tmp_path / "missing.jsonl", 64, 1)
    empty = write_jsonl(tmp_path / "empty.jsonl", [], extra_lines=[json.dumps({"body": "no text field"})])
    with pytest.raises(ValueError, match=r"empty\.jsonl: no documents with a non-empty string field 'text'"):
        token_windows(tokenizer, empty, 64, 1)


# ----------------------------------------------------------------------------------------------------------------
# (d) the curve's arithmetic, storage, table and picture


def hand_curve(name="m", meta=None) -> LossCurve:
    # 10 tokens, bins of 4: [1, 4) has 3 predictions per window, [4, 8) 4, [8, 10) 2; two windows
    return LossCurve(name, 10, 4, [1.0, 2.0, 4.0], [6, 8, 4], 18, (6 * 1 + 8 * 2 + 4 * 4) / 18, [2.0, 2.2],
                     meta or {"source": "/data/heldout.jsonl"})


def test_perplexity_arithmetic():
    c = hand_curve()
    assert c.perplexity(0, 4) == pytest.approx(math.e)
    assert c.perplexity(4, 10) == pytest.approx(math.exp((8 * 2 + 4 * 4) / 12))
    assert c.perplexity() == pytest.approx(math.exp(38 / 18)) == pytest.approx(c.ppl)
    assert c.mean_loss(8) == pytest.approx(4.0)
    for lo, hi in [(0, 5), (2, 8), (0, 11), (4, 4)]:
        with pytest.raises(ValueError, match="bin"):
            c.perplexity(lo, hi)
    assert position_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert position_ranges(65536, 512)[-2:] == [(16384, 32768), (32768, 65536)]
    assert [r["ppl"] for r in c.ranges()] == pytest.approx([math.e, math.exp(2), math.exp(4)])
    with pytest.raises(ValueError, match="bin"):
        LossCurve("bad", 10, 4, [1.0, 2.0], [1, 1], 2, 1.5)


def test_curve_storage_and_tables():
    c = LossCurve("empty first bin", 6, 1, [math.nan, 1, 2, 3, 4, 5], [0, 2, 2, 2, 2, 2], 10, 3.0)
    text = c.to_json()
    assert "NaN" not in text and json.loads(text)["bin_loss"][0] is None  # strict JSON
    back = LossCurve.from_json(text)
    assert math.isnan(back.bin_loss[0]) and back.bin_loss[1:] == c.bin_loss[1:] and back.loss == 3.0
    table = hand_curve("Condensation l=4").format_table()
    assert "| 4-8 | 2.000 | 7.39 |" in table and "| all |" in table
    both = format_curves_table([hand_curve("a"), LossCurve("b", 8, 4, [1.0, 1.0], [3, 4], 7, 1.0)])
    assert "| 8-10 | 54.60 | - |" in both and both.splitlines()[1] == "| positions | a | b |"
    assert slug("Condensation l=512") == "condensation-l512" and slug("SmolLM2 full attention") == "smollm2-full-attention"


def test_loss_picture(tmp_path):
    from PIL import Image

    a = hand_curve("full attention")
    b = LossCurve("Condensation l=4", 10, 4, [1.0, 1.5, 1.2], [6, 8, 4], 18, 1.3, [1.3, 1.3], a.meta)
    marked = plot_loss_by_position({"full attention": a, "Condensation l=4": b}, tmp_path / "sub" / "m.png",
                                   trained_length=8)
    plain = plot_loss_by_position([a, b], tmp_path / "p.png")

    def red(path):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (800, 460)
            img = np.asarray(im.convert("RGB")).astype(int)
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank
        return ((img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)).sum()

    assert red(marked) > red(plain) + 100  # the dashed trained-context line


def test_curves_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("lc", artifact_location=str(tmp_path / "art"))).info.run_id
    long = LossCurve("Condensation l=512", 4096, 1024, [3.0, 2.5, 2.4, 2.3], [1023, 1024, 1024, 1024], 4095, 2.55)
    log_loss_curves([hand_curve("full"), long], run_id=run, tracking_uri=uri, trained_length=8)
    metrics = client.get_run(run).data.metrics
    assert metrics["lc/condensation-l512/len_4096/ppl_2k"] == pytest.approx(long.perplexity(0, 2048))
    assert "lc/full/len_10/ppl_2k" not in metrics  # a window shorter than 2K has no such range
    history = client.get_metric_history(run, "lc/condensation-l512/len_4096/loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1024, 2.5), (2048, 2.4), (3072, 2.3)]
    assert [m.step for m in client.get_metric_history(run, "lc/full/len_10/ppl_range")] == [4, 8, 10]
    arts = {a.path for a in client.list_artifacts(run, "long_context")}
    assert arts == {"long_context/loss_curves.json", "long_context/loss_by_position_len_10.png",
                    "long_context/loss_by_position_len_4096.png"}
    with pytest.raises(ValueError, match="same metric names"):
        log_loss_curves([hand_curve("x"), hand_curve("x")], run_id=run, tracking_uri=uri)


# ----------------------------------------------------------------------------------------------------------------
# (e) workloads/evaluate.py end to end


def _workload():
    spec = importlib.util.spec_from_file_location("workload_evaluate", os.path.join(ROOT, "workloads", "evaluate.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses (and the config's type hints) look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def saved(tmp_path):
    """A tiny Llama folder holding the builtin tokenizer (the workload's default tokenizer is the model's), and
    held-out text of real documents long enough for 256-token windows."""
    import transformers
    from pydoc_data.topics import topics

    verbosity = transformers.logging.get_verbosity()
    llama = tiny_llama(torch.float32)
    llama.save_pretrained(tmp_path / "llama")
    load_tokenizer().save_pretrained(tmp_path / "llama")
    write_jsonl(tmp_path / "heldout.jsonl", [topics[k] for k in sorted(topics)[:30]])
    yield tmp_path
    transformers.logging.set_verbosity(verbosity)  # the workload quiets transformers for the whole process


def test_workload_end_to_end(saved, capsys):
    from mlflow.tracking import MlflowClient

    argv = [f"model={saved / 'llama'}", f"text={saved / 'heldout.jsonl'}", "lengths=[256]", "n=2", "bin_tokens=64",
            "segment_lengths=[32,256]", "condensation_overrides.segment_schedule=sequential", "passkey.lengths=[96]", "passkey.depths=[0.5]", "passkey.n_per_cell=1",
            f"out={saved / 'runs'}", "tracking.run_name=tiny"]
    assert _workload().main(argv) == 0
    out = capsys.readouterr().out
    assert "llama full attention" in out and "Condensation l=32" in out and "perplexity by token position" in out
    folder = saved / "runs" / "long-context" / "tiny"
    assert (folder / "loss_by_position_len_256.png").stat().st_size > 10_000
    record = json.loads((folder / "evaluation.json").read_text())
    curves = {c["name"]: LossCurve.from_dict(c) for c in record["curves"]}
    assert list(curves) == ["llama full attention", "Condensation l=32", "Condensation l=256"]
    assert record["windows"]["256"]["concatenated"] is False and record["trained_length"] == 128
    # rule 10 through the whole workload (fp32 on CPU): one segment over the window is the full-attention model
    np.testing.assert_allclose(curves["Condensation l=256"].bin_loss, curves["llama full attention"].bin_loss, atol=1e-4)
    assert abs(curves["Condensation l=32"].loss - curves["llama full attention"].loss) > 1e-3
    assert set(record["passkey"]) == set(curves)

    client = MlflowClient(f"sqlite:///{saved / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("long-context").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tiny")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(curves) and all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["lc/condensation-l32/len_256/ppl"] == pytest.approx(curves["Condensation l=32"].ppl)
    l32 = children["Condensation l=32"].data.metrics
    assert "lc/condensation-l32/len_256/loss" in l32 and "passkey/exact/len_96/mean" in l32
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "long_context")}
    assert {"long_context/loss_by_position_len_256.png", "long_context/evaluation.json"} <= arts
    child_arts = {a.path for a in client.list_artifacts(children["Condensation l=32"].info.run_id, "passkey")}
    assert "passkey/passkey_heatmap.png" in child_arts


def test_workload_condensation_checkpoint_as_baseline(saved, capsys):
    """A Condensation checkpoint folder: the baseline loads its (Llama-named) weights as a LlamaForCausalLM; no
    segment_lengths given evaluates at the checkpoint's own; windows over baseline_max_tokens skip the baseline."""
    CondensationForCausalLM.from_pretrained(saved / "llama", segment_length=16).save_pretrained(saved / "cond")
    load_tokenizer().save_pretrained(saved / "cond")
    argv = [f"model={saved / 'cond'}", f"text={saved / 'heldout.jsonl'}", "lengths=[64,128]", "n=1", "bin_tokens=16",
            "baseline_max_tokens=64", f"out={saved / 'runs'}", "tracking.enabled=false", "label=cond"]
    assert _workload().main(argv) == 0
    out = capsys.readouterr().out
    assert "cond full attention: skipped at 128 tokens: more than baseline_max_tokens=64" in out
    record = json.loads((saved / "runs" / "long-context" / "lc-cond" / "evaluation.json").read_text())
    got = [(c["name"], c["length"]) for c in record["curves"]]
    assert got == [("cond full attention", 64), ("Condensation l=16", 64), ("Condensation l=16", 128)]
    assert record["mlflow"] is None and not (saved / "runs" / "mlflow.db").exists()


@pytest.mark.parametrize("args, field, text", [
    (["n=abc"], "n", "expected an int"),
    (["lenghts=[1024]"], "lenghts", "unknown key"),
    (["segment_lengths=[512,-1]"], "segment_lengths", "list of ints"),
    (["passkey.depths=[0.5,2]"], "passkey.depths", "in [0, 1]"),
    (["dtype=bf32"], "dtype", "'auto', 'bf16'"),
    (["condensation_overrides.segment_schedule=diagonal"], "condensation_overrides", "segment_schedule must be"),
    (["condensation_overrides.segment_lenght=64"], "condensation_overrides.segment_lenght", "not a CondensationConfig"),
    (["text=None"], "text", "required"),
    (["text={tmp}/nope.jsonl"], "text", "no such file"),
    (["model={tmp}/nope"], "model", "no such folder"),
    (["lengths=[100000]"], "text", "not enough text for 8 windows of 100000 tokens"),
    (["tokenizer=builtin", "model={tmp}/big"], "tokenizer", "more than the model's vocab_size 512"),
])
def test_workload_config_errors_before_any_model_loads(args, field, text, saved, capsys, monkeypatch):
    work = _workload()

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(work, "load_model", boom)
    LlamaConfig(**{**ARCH, "vocab_size": 512}).save_pretrained(saved / "big")  # a config, no weights: never loaded
    argv = [f"model={saved / 'llama'}", f"text={saved / 'heldout.jsonl'}", f"out={saved / 'runs'}"]
    assert work.main(argv + [a.format(tmp=saved) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"config error: {field}: ") and "\n" not in err, err
    assert text in err
    assert not (saved / "runs").exists()


def test_smollm2_docstring_relength_command_loads(tmp_path):
    """The evaluation that smollm2_preset's docstring gives for reading the chain's export at longer segments: its
    overrides load as a valid config (its model folder and held-out text stand in as empty ones here)."""
    import shlex

    from condensation.curriculum import smollm2_preset

    doc = smollm2_preset.__doc__
    cmd = next(c for c in doc.replace("\\\n", " ").split("\n\n") if "workloads/evaluate.py" in c)
    (tmp_path / "hf").mkdir()
    (tmp_path / "heldout_long.jsonl").write_text("")
    cmd = cmd.replace("<stage 2's hf folder>", str(tmp_path / "hf"))
    assert "text=data/corpus/heldout_long.jsonl" in cmd
    cmd = cmd.replace("text=data/corpus/heldout_long.jsonl", f"text={tmp_path / 'heldout_long.jsonl'}")
    args = shlex.split(cmd)
    assert args[:2] == ["python", "workloads/evaluate.py"]
    cfg = _workload().load_eval_config(None, args[2:])
    assert cfg.segment_lengths == [512, 1024, 2048] and cfg.baseline is False
    assert cfg.passkey.lengths == [8192, 16384, 32768, 65536]
