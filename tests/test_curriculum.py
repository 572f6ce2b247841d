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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = load_curriculum_config(name)
    assert cfg.stages and all(s.steps > 0 for s in cfg.stages)


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


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


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
