"""The passkey curriculum: config validation, stage chaining, resume between and inside stages, MLflow layout.

The accuracy grid itself (always-right / never-right stub models) is tested in tests/evaluate.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from condensation.config import ConfigError
from condensation.curriculum import PRESETS, STAGE_DONE_TAG, load_curriculum_config, run_curriculum, stage_name


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"smollm2", "smollm2-replay"}))  # data/corpus: below
def test_every_preset_validates(name):
    cfg = load_curriculum_config(name)
    assert cfg.stages and all(s.steps > 0 for s in cfg.stages)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A small random Llama with the builtin tokenizer saved beside it: a stand-in for SmolLM2 (same kind of folder
    as the converted checkpoint), with weights large enough that a stage starting from the wrong one would show."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from condensation.tokenizer import load_tokenizer

    tok = load_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text in the corpus schema: pydoc topics, one document per topic; the held-out file joins the rest."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    names = sorted(topics)
    with open(folder / "train.jsonl", "w") as f:
        for n in names[::2]:
            f.write(json.dumps({"text": topics[n], "source": "pydoc-topics", "name": n}) + "\n")
    with open(folder / "heldout_long.jsonl", "w") as f:
        f.write(json.dumps({"text": "\n\n".join(topics[n] for n in names[1::2]), "source": "pydoc-topics",
                            "name": "odd topics"}) + "\n")
    return folder


def smollm2_small(tiny_llama, corpus, storage, *more, preset="smollm2"):
    """The smollm2 preset with its model, text, lengths and steps scaled down to seconds on a CPU."""
    return load_curriculum_config(preset, overrides=[*_small_overrides(tiny_llama, corpus, storage), *more])


def _small_overrides(tiny_llama, corpus, storage):
    return [
        f"train.model.init_from={tiny_llama}", f"train.data.tokenizer={tiny_llama}", "train.model.segment_length=32",
        "train.model.overrides.loss_reduction=token_mean", f"train.run.storage={storage}",
        "train.schedule.use_gpu=false", "train.schedule.num_workers=1", "train.schedule.cpus_per_worker=1",
        "train.schedule.global_batch=4", "train.schedule.per_worker_batch=2", "train.schedule.precision=fp32",
        "train.schedule.torch_threads=1", "train.optim.warmup_steps=1", "train.checkpoint.every=2", "train.tracking.log_every=1", "train_rows=8",
        f"pretraining.source={corpus / 'train.jsonl'}", "pretraining.total_tokens=128", "pretraining.steps=2",
        "pretraining.per_worker_batch=2", "pretraining.dataset_options={mode: pack}",
        "stages=[{total_tokens: 96, steps: 2, per_worker_batch: 4}]",
        "evaluation.lengths=[96, 128, 256]", "evaluation.depths=[0.0, 1.0]", "evaluation.n_per_cell=2",
        "evaluation.batch_size=2", f"long_context.text={corpus / 'heldout_long.jsonl'}", "long_context.length=256",
        "long_context.windows=2", "long_context.bin_tokens=64"]


def test_smollm2_preset_is_the_chain(monkeypatch, tiny_llama, corpus, tmp_path):
    cfg = smollm2_small(tiny_llama, corpus, tmp_path)
    full = PRESETS["smollm2"]()
    assert full.train.model.init_from == full.train.data.tokenizer == "smollm2-135m-instruct"
    assert full.pretraining.steps > 0 and full.train.model.segment_length == 512
    assert [s.total_tokens for s in full.stages] == [2048, 4096, 8192]
    # evaluated up to 8x the last trained length, at least 20 prompts per cell
    assert max(full.evaluation.lengths) == 8 * full.stages[-1].total_tokens and full.evaluation.n_per_cell >= 20
    assert full.evaluation.final_only and full.long_context.text
    assert cfg.pretraining.steps == 2 and cfg.stages[0].per_worker_batch == 4


def test_smollm2_replay_preset_is_the_chain_with_weighted_replay():
    plain, replay = PRESETS["smollm2"](), PRESETS["smollm2-replay"]()
    assert [s.replay_micro_batches for s in plain.stages] == [0, 0, 0] and plain.train.schedule.replay_weight == 1
    assert [s.replay_micro_batches for s in replay.stages] == [1, 1, 2] and replay.train.schedule.replay_weight == 0.2
    assert replay.name != plain.name  # its finished stages are not mistaken for the plain chain's
    # everything else is the plain chain
    for s in replay.stages:
        s.replay_micro_batches = 0
    replay.train.schedule.replay_weight, replay.name = 1, plain.name
    assert replay == plain


def test_final_only_scores_earlier_stages_at_their_own_length():
    from condensation.curriculum import stage_eval_lengths

    cfg = PRESETS["smollm2"]()
    assert [stage_eval_lengths(cfg, i) for i in range(3)] == [[2048], [4096], cfg.evaluation.lengths]
    cfg.evaluation.final_only = False
    assert all(stage_eval_lengths(cfg, i) == cfg.evaluation.lengths for i in range(3))


@pytest.mark.parametrize("override,field", [
    ("pretraining.steps=-1", "pretraining.steps"),
    ("pretraining.source=/no/such/text.jsonl", "pretraining.source"),
    ("long_context.text=/no/such/heldout.jsonl", "long_context.text"),
    ("long_context.windows=0", "long_context.windows"),
    ("evaluation.device=tpu", "evaluation.device"),
])
def test_chain_config_errors_name_the_field(tiny_llama, corpus, tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        smollm2_small(tiny_llama, corpus, tmp_path, override)


def test_smollm2_preset_takes_the_idea_options(tiny_llama, corpus, tmp_path):
    """Issue 12's ideas as overrides of the preset: they reach every stage's training config (which a run records),
    pretraining can keep fixed lengths, and a stage's passkey rows take whole segments up to its length."""
    from condensation.curriculum import pretraining_train_config, stage_lengths, stage_train_config
    from condensation.tokenizer import load_tokenizer

    cfg = smollm2_small(tiny_llama, corpus, tmp_path, "train.model.memory_sink_tokens=4",
                        "train.model.memory_norm=separate", "train.model.memory_grad_segments=2",
                        "train.data.random_lengths=true", "pretraining.random_lengths=false",
                        "stages=[{total_tokens: 256, steps: 2}, {total_tokens: 96, steps: 2, random_lengths: false}]")
    s0, s1, pre = stage_train_config(cfg, 0), stage_train_config(cfg, 1), pretraining_train_config(cfg)
    for t in (s0, s1, pre):
        assert t.model.model_kwargs() == {"segment_length": 32, "loss_reduction": "token_mean", "memory_sink_tokens": 4,
                                          "memory_norm": "separate", "memory_grad_segments": 2}
    assert (s0.data.random_lengths, s1.data.random_lengths, pre.data.random_lengths) == (True, False, False)
    tok = load_tokenizer(tiny_llama)
    lengths = stage_lengths(cfg, 0, tok)
    assert lengths[-1] == 256 and all(n % 32 == 0 for n in lengths) and len(lengths) > 2
    assert stage_lengths(cfg, 1, tok) is None


@pytest.mark.parametrize("override,field", [
    ("train.model.memory_sink_tokens=40", "train.model.memory_sink_tokens"),  # more than segment_length=32
    ("train.model.memory_norm=layer", "train.model.memory_norm"),
    ("stages.0.random_lengths=maybe", "stages.0.random_lengths"),
    ("pretraining.random_lengths=2", "pretraining.random_lengths"),
])
def test_idea_option_errors_name_the_field(tiny_llama, corpus, tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        smollm2_small(tiny_llama, corpus, tmp_path, override)


def test_smollm2_preset_without_the_extra_names_the_install(monkeypatch, tmp_path):
    """On a machine without the extra (CI), the preset fails before Ray with the install command."""
    from condensation import pretrained

    def missing(name):
        raise pretrained.MissingExtraError("pretrained checkpoint 'smollm2-135m-instruct' needs gguf: pip install ...")

    monkeypatch.setattr(pretrained, "check_installed", missing)
    monkeypatch.setattr(pretrained, "is_converted", lambda name, cache_dir=None: False)
    with pytest.raises(ConfigError, match="train.model.init_from.*pip install"):
        load_curriculum_config("smollm2", overrides=["pretraining.steps=0", "long_context.text=null"])


def test_paper_preset_is_table_iii():
    cfg = load_curriculum_config("paper")
    assert [s.total_tokens for s in cfg.stages] == [2048, 4096, 8192, 16384]
    assert [s.steps for s in cfg.stages] == [500, 300, 1000, 1000]
    assert {s.lr for s in cfg.stages} == {6e-5}
    assert cfg.train.model.segment_length == 512 and cfg.train.schedule.global_batch == 64
    assert cfg.train.schedule.zero_stage == 2 and cfg.evaluation.lengths[-1] == 65536


@pytest.mark.parametrize("override,field", [
    ("stages.0.steps=0", "stages.0.steps"),
    ("stages.1.total_tokens=-5", "stages.1.total_tokens"),
    ("stages.4.steps=3", "stages.4"),
    ("evaluation.depths=[0.5, 1.5]", "evaluation.depths"),
    ("train.schedule.global_batch=15", "train.schedule.global_batch"),
    ("bogus=1", "bogus"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_curriculum_config("default", overrides=[override])


def test_stage_override_type_error_names_the_stage():
    with pytest.raises(ConfigError) as err:
        load_curriculum_config("default", overrides=["stages.0.steps=abc"])
    assert err.value.key == "stages.0.steps" and str(err.value).startswith("stages.0.steps: expected an int")


def test_stage_override_reaches_one_stage():
    cfg = load_curriculum_config("default", overrides=["stages.1.steps=177", "evaluation.n_per_cell=3"])
    assert cfg.stages[1].steps == 177 and cfg.stages[0].steps != 177 and cfg.evaluation.n_per_cell == 3


def test_default_preset_is_two_workers_one_micro_batch():
    cfg = load_curriculum_config("default")
    s = cfg.train.schedule
    assert s.num_workers == 2 and s.global_batch == 2 * s.per_worker_batch and s.grad_accum == 1
    assert [st.total_tokens for st in cfg.stages] == [96, 192] and cfg.train.model.segment_length == 64
    assert cfg.train.optim.warmup_steps < min(st.steps for st in cfg.stages)


def test_answer_loss_stacks_arrays():
    """Rows come as numpy arrays: a tensor made from a list of them is slow, and torch warns about it."""
    import warnings

    from condensation.curriculum import answer_loss
    from condensation.modeling import CondensationForCausalLM
    from condensation.sizes import build_config
    from condensation.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = CondensationForCausalLM(build_config("debug", vocab_size=2048))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*list of numpy.ndarrays.*")
        loss = answer_loss(model, load_tokenizer(), 96, n=2)
    assert 0 < loss < 20


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_stages_chain_resume_and_log_nested_runs(ray_session, tmp_path):
    from mlflow import MlflowClient

    # stage 1 at a vanishing learning rate: its export must equal stage 0's weights if (and only if) it started there
    cfg = load_curriculum_config("debug", overrides=[f"train.run.storage={tmp_path}", "stages.1.lr=1e-12",
                                                     "stages.1.min_lr=0"])
    # 1. an interruption between stages: only stage 0 ran
    first = run_curriculum(dataclasses.replace(cfg, stages=cfg.stages[:1]))
    assert len(first) == 1 and not first[0].skipped

    # 2. an interruption inside stage 1: a worker dies at step 3 (after the checkpoint of step 2), no failure tolerated
    faulty = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, debug=dataclasses.replace(cfg.train.debug, fault_at_step=3),
        checkpoint=dataclasses.replace(cfg.train.checkpoint, max_failures=0)))
    with pytest.raises(Exception):
        run_curriculum(faulty)
    stage1_dir = os.path.join(tmp_path, stage_name(cfg, 1))
    assert "checkpoint_00000002" in os.listdir(stage1_dir) and "checkpoint_00000004" not in os.listdir(stage1_dir)

    # 3. started again: stage 0 is found finished, stage 1 continues from its checkpoint, and says so
    said = []
    results = run_curriculum(cfg, log=said.append)
    assert [r.skipped for r in results] == [True, False]
    assert any("resuming stage 1 from checkpoint 2" in line for line in said), said
    assert not any("stage 1" in line and "from scratch" in line for line in said)
    s0, s1 = results
    assert s0.hf_path == first[0].hf_path
    resolved = open(os.path.join(stage1_dir, "resolved_config.yaml")).read()
    assert f"init_from: {s0.hf_path}" in resolved

    w0, w1 = _tensors(s0.hf_path), _tensors(s1.hf_path)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.allclose(w0[k], w1[k], atol=1e-6), k
    fresh = torch.nn.init.normal_(torch.empty_like(w0["model.embed_tokens.weight"]), std=0.02)
    assert not torch.allclose(w0["model.embed_tokens.weight"], fresh, atol=1e-3)
    state = json.load(open(os.path.join(s1.hf_path, "..", "trainer_state.json")))
    assert state["step"] == cfg.stages[1].steps

    # MLflow: one parent, exactly one nested run per stage despite the restarts, grids and heat maps logged
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.data.tags.get("curriculum") == cfg.name]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [stage_name(cfg, 0), stage_name(cfg, 1)]
    for child in children:
        assert child.data.tags[STAGE_DONE_TAG] == "finished"
        assert any(k.startswith("passkey/exact/len_") for k in child.data.metrics)
        arts = {a.path for a in client.list_artifacts(child.info.run_id, "passkey")}
        assert {"passkey/passkey_heatmap.png", "passkey/passkey_grid.json"} <= arts
    parent_arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "stage_summary.png", "curriculum_config.yaml"} <= parent_arts
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # 4. a finished curriculum run again: nothing to do, and how to start over
    said = []
    assert all(r.skipped for r in run_curriculum(cfg, log=said.append))
    assert any("already finished: nothing to do" in line and "name=" in line for line in said), said
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_chain_pretrains_then_runs_stages_then_evaluates_long_context(ray_session, tiny_llama, corpus, tmp_path):
    from mlflow import MlflowClient

    from condensation.curriculum import pretraining_name

    cfg = smollm2_small(tiny_llama, corpus, tmp_path)
    said = []
    results = run_curriculum(cfg, log=said.append)
    pre_dir = os.path.join(tmp_path, pretraining_name(cfg))
    pre_hf = json.load(open(os.path.join(pre_dir, "stage_done.json")))["hf_path"]
    assert any(line.startswith("continual pretraining:") and tiny_llama in line for line in said), said
    # stage 0 started from the continual pretraining's export, not from the base model
    assert f"init_from: {pre_hf}" in open(os.path.join(tmp_path, stage_name(cfg, 0), "resolved_config.yaml")).read()
    w_base, w_pre = _tensors(tiny_llama), _tensors(pre_hf)
    assert not torch.allclose(w_base["model.layers.0.mlp.up_proj.weight"], w_pre["model.layers.0.mlp.up_proj.weight"])
    pre_resolved = open(os.path.join(pre_dir, "resolved_config.yaml")).read()
    assert "seq_len: 128" in pre_resolved and "per_worker_batch: 2" in pre_resolved
    assert "per_worker_batch: 4" in open(os.path.join(tmp_path, stage_name(cfg, 0), "resolved_config.yaml")).read()

    from condensation.evaluate import PasskeyGrid

    (stage,) = results
    assert PasskeyGrid.from_json(stage.grid_json).lengths == [96, 128, 256]  # the last stage: the whole grid

    # loss by position: the final model, the start as Condensation and the start with full attention
    lc = json.load(open(os.path.join(tmp_path, cfg.name, "long_context.json")))
    assert len(lc) == 3 and any("full attention" in k for k in lc)
    assert os.path.getsize(os.path.join(tmp_path, cfg.name, "loss_by_position.png")) > 1000

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parent = next(r for r in runs if r.data.tags.get("curriculum") == cfg.name)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted([pretraining_name(cfg), stage_name(cfg, 0)])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "long_context")}
    assert {"long_context/loss_curves.json", "long_context/loss_by_position_len_256.png"} <= arts, arts
    assert any(k.startswith("lc/") for k in client.get_run(parent.info.run_id).data.metrics)

    # again: the pretraining and both stages are found finished
    said = []
    assert all(r.skipped for r in run_curriculum(cfg, log=said.append))
    assert any("continual pretraining" in line and "already finished" in line for line in said), said


REPLAY_STAGE = "stages=[{total_tokens: 96, steps: 2, per_worker_batch: 4, replay_micro_batches: 1}]"


@pytest.mark.parametrize("overrides,field", [
    (["stages=[{total_tokens: 96, steps: 2, replay_micro_batches: -1}]"], "stages.0.replay_micro_batches"),
    (["stages=[{total_tokens: 96, steps: 2, replay_micro_batches: often}]"], "stages.0.replay_micro_batches"),
    ([REPLAY_STAGE, "replay.source=/no/such/text.jsonl"], "replay.source"),
    ([REPLAY_STAGE, "replay.source=synthetic"], "replay.source"),
    ([REPLAY_STAGE, "replay.dataset_options={bogus: 1}"], "replay.dataset_options.bogus"),
    ([REPLAY_STAGE, "replay.dataset_options={text_field: body}"], "replay.dataset_options.text_field"),
    ([REPLAY_STAGE, "replay.bogus=1"], "replay.bogus"),
    # the weight of the replay micro-batches: per stage, or the schedule's for every stage
    (["stages=[{total_tokens: 96, steps: 2, replay_micro_batches: 1, replay_weight: 0}]"], "stages.0.replay_weight"),
    (["stages=[{total_tokens: 96, steps: 2, replay_micro_batches: 1, replay_weight: -1}]"], "stages.0.replay_weight"),
    (["stages=[{total_tokens: 96, steps: 2, replay_micro_batches: 1, replay_weight: .nan}]"], "stages.0.replay_weight"),
    (["stages=[{total_tokens: 96, steps: 2, replay_micro_batches: 1, replay_weight: often}]"],
     "stages.0.replay_weight"),
    ([REPLAY_STAGE, "train.schedule.replay_weight=0"], "stages.0 -> train.schedule.replay_weight"),
    ([REPLAY_STAGE, "train.schedule.replay_weight=often"], "train.schedule.replay_weight"),
    # a CUDA graph replays one micro-batch a step
    ([REPLAY_STAGE, "train.schedule.engine=torch", "train.schedule.cuda_graph=true", "train.schedule.use_gpu=true",
      "pretraining.steps=0"], "stages.0.replay_micro_batches"),
])
def test_replay_config_errors_name_the_field(tiny_llama, corpus, tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        smollm2_small(tiny_llama, corpus, tmp_path, *overrides)
    assert err.value.key == field and str(err.value).startswith(field), str(err.value)


def test_replay_text_defaults_to_the_pretraining_text(tiny_llama, corpus, tmp_path):
    from condensation.curriculum import replay_source, replay_train_config, stage_train_config

    cfg = smollm2_small(tiny_llama, corpus, tmp_path, REPLAY_STAGE)
    assert replay_source(cfg) == (str(corpus / "train.jsonl"), dict(cfg.pretraining.dataset_options))
    assert stage_train_config(cfg, 0).schedule.replay_micro_batches == 1
    d = replay_train_config(cfg, 0).data
    assert (d.source, d.seq_len, d.num_rows) == (str(corpus / "train.jsonl"), 96, None)
    other = smollm2_small(tiny_llama, corpus, tmp_path, REPLAY_STAGE, "replay.source=local")
    assert replay_source(other) == ("local", {})  # another source: the pretraining's options do not apply
    # the preset leaves it off
    assert all(st.replay_micro_batches == 0 for st in PRESETS["smollm2"]().stages)


def test_replay_weight_reaches_the_stages_train_config(tiny_llama, corpus, tmp_path):
    from condensation.curriculum import stage_train_config

    two = "stages=[{total_tokens: 96, steps: 2, replay_micro_batches: 1}, {total_tokens: 96, steps: 2}]"
    weights = lambda cfg: [stage_train_config(cfg, i).schedule.replay_weight for i in range(len(cfg.stages))]
    assert weights(smollm2_small(tiny_llama, corpus, tmp_path, two)) == [1.0, 1.0]  # the schedule's default
    cfg = smollm2_small(tiny_llama, corpus, tmp_path, two, "train.schedule.replay_weight=0.2")
    assert cfg.stages[0].replay_weight is None and weights(cfg) == [0.2, 0.2]  # None: the schedule's, every stage
    own = ("stages=[{total_tokens: 96, steps: 2, replay_micro_batches: 1, replay_weight: 0.5}, "
           "{total_tokens: 96, steps: 2}]")
    cfg = smollm2_small(tiny_llama, corpus, tmp_path, own, "train.schedule.replay_weight=0.2")
    assert weights(cfg) == [0.5, 0.2]  # a stage's own weight, the schedule's for the other


def test_smollm2_replay_docstring_command_loads(tiny_llama, corpus, tmp_path):
    """The command that smollm2_replay_preset's docstring gives: its preset loads, and every stage replays text at
    weight 0.2 (here with the three stages scaled down field by field, which keeps their replay settings)."""
    import shlex

    from condensation.curriculum import smollm2_replay_preset, stage_train_config

    line = next(x for x in smollm2_replay_preset.__doc__.splitlines() if "workloads/curriculum.py" in x)
    args = shlex.split(line.split("&&")[-1])
    assert args == ["python", "workloads/curriculum.py", "--preset", "smollm2-replay"]
    scaled = [f"stages.{i}.{k}={v}" for i, b in enumerate((4, 4, 2))
              for k, v in (("total_tokens", 96), ("steps", 2), ("per_worker_batch", b))]
    small = [o for o in _small_overrides(tiny_llama, corpus, tmp_path) if not o.startswith("stages=")]
    cfg = load_curriculum_config(args[3], overrides=small + scaled)
    assert [st.replay_micro_batches for st in cfg.stages] == [1, 1, 2]
    assert [stage_train_config(cfg, i).schedule.replay_weight for i in range(3)] == [0.2, 0.2, 0.2]


def test_stage_with_replay_trains_on_text_and_passkey_and_logs_replay_loss(ray_session, tiny_llama, corpus, tmp_path):
    from mlflow import MlflowClient

    from condensation.curriculum import stage_datasets
    from condensation.tokenizer import load_tokenizer

    # text weighing half a passkey micro-batch (the stage's own replay_weight)
    weighted = REPLAY_STAGE.replace("replay_micro_batches: 1", "replay_micro_batches: 1, replay_weight: 0.5")
    cfg = smollm2_small(tiny_llama, corpus, tmp_path, weighted, "pretraining.steps=0", "long_context.text=null")
    data = stage_datasets(cfg, 0, load_tokenizer(tiny_llama))
    assert sorted(data) == ["replay", "train"]
    text, passkey = data["replay"].take(8), data["train"].take(8)
    assert all(len(r["input_ids"]) == 96 == len(r["labels"]) for r in text + passkey)
    # replay rows: text with next-token labels everywhere; train rows: passkey, labels on the answer only
    assert all((r["labels"] == r["input_ids"]).all() for r in text)
    assert all(0 < (r["labels"] != -100).sum() <= 8 for r in passkey)

    said = []
    (stage,) = run_curriculum(cfg, log=said.append)
    assert any("1 replay micro-batch(es) a step of" in line and "(weight 0.5)" in line for line in said), said
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(stage.run_id)
    replay = sorted((m.step, m.value) for m in client.get_metric_history(stage.run_id, "replay_loss"))
    loss = sorted((m.step, m.value) for m in client.get_metric_history(stage.run_id, "loss"))
    assert [s for s, _ in replay] == [s for s, _ in loss] == [1, 2]
    assert all(0 < v < 20 for _, v in replay + loss)
    assert [v for _, v in replay] != [v for _, v in loss]  # two streams, not one logged twice
    p = run.data.params
    assert p["schedule.replay_micro_batches"] == "1" and p["grad_accum"] == "1" and p["schedule.replay_weight"] == "0.5"
    assert p["deepspeed_resolved.gradient_accumulation_steps"] == "2"
