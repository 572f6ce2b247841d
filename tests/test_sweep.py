"""Ray Tune sweeps: config validation, and one small sweep that ASHA prunes, that is interrupted after its first
trial ends and resumed without running that trial again, with its MLflow parent, nested trial runs and picture.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from condensation.config import ConfigError
from condensation.sweep import PRESETS, TRIAL_DONE_FILE, load_sweep_config, run_sweep


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"h200"}))  # h200 needs the corpus and the SmolLM2 extra
def test_every_preset_validates(name):
    cfg = load_sweep_config(name)
    assert cfg.num_trials() >= 4
    assert cfg.asha.enabled and cfg.asha.grace_period < cfg.total_steps()


def test_h200_preset_packs_one_trial_per_gpu():
    cfg = PRESETS["h200"]()
    s = cfg.train.schedule
    assert s.use_gpu and s.num_workers == 1 and cfg.max_concurrent_trials == 4 and cfg.num_trials() >= 8
    assert cfg.search.segment_lengths == [256, 512, 1024] and cfg.heldout_text


@pytest.mark.parametrize("override,field", [
    ("search.segment_lengths=[]", "search.segment_lengths"),
    ("search.segment_lengths=[32,0]", "search.segment_lengths"),
    ("search.lr_min=0", "search.lr_min"),
    ("search.lr_max=1e-5", "search.lr_max"),
    ("search.lrs=[1e-3,-1]", "search.lrs"),
    ("search.num_samples=0", "search.num_samples"),
    ("objective=accuracy", "objective"),
    ("objective=loss", "objective"),  # the eq. 17 sum does not compare segment lengths
    ("mode=up", "mode"),
    ("asha.grace_period=100", "asha.grace_period"),
    ("asha.reduction_factor=1", "asha.reduction_factor"),
    ("asha.max_t=1000", "asha.max_t"),
    ("eval_every=0", "eval_every"),
    ("heldout_rows=100000", "heldout_rows"),
    ("heldout_text=/no/such/heldout.jsonl", "heldout_text"),
    ("max_concurrent_trials=0", "max_concurrent_trials"),
    ("stage=4", "stage"),
    ("train.schedule.global_batch=3", "train.schedule.global_batch"),
    ("train.schedule.zero_stage=3", "train.schedule.zero_stage"),
    ("train.data.source=/no/such/text.jsonl", "train.data.source"),
    ("train.model.size=huge", "train.model.size"),
    ("name=a/b", "name"),
    ("no_such_key=1", "no_such_key"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_sweep_config("debug", overrides=[override])
    assert err.value.key.startswith(field), (err.value.key, str(err.value))


def test_loss_objective_is_fine_with_token_mean_or_one_length():
    load_sweep_config("debug", overrides=["objective=loss", "train.model.overrides.loss_reduction=token_mean"])
    load_sweep_config("debug", overrides=["objective=loss", "search.segment_lengths=[32]"])


@pytest.mark.parametrize("argv,field", [
    (["search.lr_min=-1"], "search.lr_min"),
    (["search.segment_lengths=[32,32]"], "search.segment_lengths"),
    (["--config", "/no/such/sweep.yaml"], "--config"),
    (["--preset", "passkey", "curriculum.stages.3.steps=5"], "curriculum.stages.3"),
    (["--preset", "passkey", "objective=heldout_loss"], "heldout_text"),
])
def test_workload_config_error_is_one_line_before_ray(argv, field, capsys, monkeypatch, tmp_path):
    import importlib.util

    import ray

    def boom(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", boom)
    path = os.path.join(os.path.dirname(__file__), "..", "workloads", "sweep.py")
    spec = importlib.util.spec_from_file_location("sweep_workload", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(argv + [f"train.run.storage={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {field}"), err


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _loss_steps(client, run_id):
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def test_sweep_prunes_logs_nested_runs_and_resumes_after_interrupt(ray_session, tmp_path):
    from mlflow import MlflowClient

    # 4 trials: segment 32 / 64 x lr 3e-3 / 1e-6 (lr varies fastest), 2 at a time. At lr 1e-6 the model barely moves:
    # ASHA stops such a trial at a rung where a good one is recorded (the last one, (64, 1e-6), starts only after a
    # good one has passed step 2). Rungs from step 2: after the warmup's zero-lr first step every trial is alike.
    cfg = load_sweep_config("debug", overrides=[
        f"train.run.storage={tmp_path}", "name=sw", "search.segment_lengths=[32,64]", "search.lrs=[3e-3,1e-6]",
        "search.num_samples=1", "max_concurrent_trials=2", "train.schedule.num_workers=1",
        "train.schedule.global_batch=2", "train.schedule.per_worker_batch=2", "train.schedule.total_steps=8",
        "eval_every=1", "asha.grace_period=2", "heldout_rows=4"])
    assert cfg.num_trials() == 4

    # 1. interrupted (SIGINT, as Ctrl-C) as soon as the first trial has ended
    said, first = [], []

    def log(line):
        said.append(line)
        print(line, flush=True)

    def interrupt(trial):
        if not first:
            first.append(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)

    r1 = run_sweep(cfg, log=log, on_trial_complete=interrupt)
    assert r1.interrupted and not r1.resumed, said
    ended = {t.trial_id: t for t in r1.trials if t.status in ("completed", "stopped")}
    assert first[0] in ended, (first, r1.trials)
    record = os.path.join(ended[first[0]].run_dir, TRIAL_DONE_FILE)
    before = (os.path.getmtime(record), open(record).read())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    first_run = ended[first[0]].mlflow_run_id
    steps_before = _loss_steps(client, first_run)
    assert any("interrupted" in line for line in said), said

    # 2. started again: Tune's experiment is restored; the first trial is not run again
    said.clear()
    r2 = run_sweep(cfg, log=log)
    assert r2.resumed and not r2.interrupted, said
    assert len(r2.trials) == 4 and {t.status for t in r2.trials} <= {"completed", "stopped"}, r2.trials
    assert (os.path.getmtime(record), open(record).read()) == before
    assert _loss_steps(client, first_run) == steps_before
    assert not any(first[0].rsplit("_", 1)[-1] in line and "step" in line for line in said), said

    # ASHA stopped at least one lr 1e-6 trial early; the best trial trained to the end at lr 3e-3 (which of the lr 3e-3
    # trials gets through depends on the order their reports reach ASHA: l=64 is a little better at every step)
    stopped = [t for t in r2.trials if t.status == "stopped"]
    assert any(t.lr == pytest.approx(1e-6) for t in stopped) and all(t.step < 8 for t in stopped), r2.trials
    assert all(t.step == 8 for t in r2.trials if t.status == "completed"), r2.trials
    b = r2.best
    assert b.status == "completed" and b.lr == pytest.approx(3e-3) and os.path.isdir(b.hf_path), r2.trials
    assert all(t.objective is not None and t.curve for t in r2.trials)
    assert f"| {r2.best.trial_id.rsplit('_', 1)[-1]} |" in r2.format_table()

    # MLflow: one parent, one nested run per trial (with its outcome), the summary on the parent
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_name == "sw"
    parent = client.get_run(parents[0].info.run_id)
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_id for r in children) == sorted(t.mlflow_run_id for t in r2.trials)
    for r in children:
        t = next(t for t in r2.trials if t.mlflow_run_id == r.info.run_id)
        assert r.info.status == "FINISHED" and r.data.tags["sweep.status"] == t.status
        assert r.data.tags["sweep.segment_length"] == str(t.segment_length)
        assert "heldout_loss" in r.data.metrics and "sweep/objective" in r.data.metrics
        assert r.data.params["model.segment_length"] == str(t.segment_length)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"objective.png", "trials.md", "best_config.yaml", "best_trial.json", "sweep_config.yaml"} <= arts, arts
    png = client.download_artifacts(parent.info.run_id, "objective.png", str(tmp_path))
    assert os.path.getsize(png) > 5000
    best = json.loads(open(client.download_artifacts(parent.info.run_id, "best_trial.json", str(tmp_path))).read())
    assert best["trial_id"] == r2.best.trial_id and best["checkpoint_path"] == r2.best.checkpoint_path
    assert parent.data.tags["best.segment_length"] == str(r2.best.segment_length)
    best_cfg = open(client.download_artifacts(parent.info.run_id, "best_config.yaml", str(tmp_path))).read()
    assert f"segment_length: {r2.best.segment_length}" in best_cfg

    # a restored sweep's ASHA knows the ended trials: it records their results at its rungs again
    from ray.tune import ExperimentAnalysis

    from condensation.sweep import _asha_scheduler

    sched = _asha_scheduler(cfg)
    sched.set_search_properties(cfg.objective, "min")
    for t in ExperimentAnalysis(r2.experiment_path).trials:
        sched.on_trial_add(None, t)
    assert {tid for _, rec in sched._brackets[0]._rungs for tid in rec} == {t.trial_id for t in r2.trials}

    # no training run is left behind: the cluster's CPUs are all free again
    import ray

    free = ray.available_resources().get("CPU", 0)
    assert free == pytest.approx(ray.cluster_resources()["CPU"], abs=0.05), ray.available_resources()


@pytest.mark.parametrize("objective", ["heldout_loss", "passkey_answer_loss", "passkey_exact"])
def test_evaluator_objectives_on_a_small_model(objective):
    """What rank 0 computes every `eval_every` steps, here without Ray: a finite value, the model left as it was."""
    import torch

    from condensation import CondensationForCausalLM
    from condensation.sizes import build_config
    from condensation.sweep import make_evaluator, trial_train_config

    cfg = load_sweep_config("debug", overrides=[f"objective={objective}", "passkey_length=96", "passkey_n=2"])
    tcfg = trial_train_config(cfg, 32, 1e-3)
    torch.manual_seed(0)
    model = CondensationForCausalLM(build_config("debug", vocab_size=2048, segment_length=32)).train()
    ev = make_evaluator(cfg, tcfg)
    if objective == "heldout_loss":
        assert ev.rows.shape == (cfg.heldout_rows, tcfg.data.seq_len)
    import pickle

    ev = pickle.loads(pickle.dumps(ev))  # it travels to the workers in the train loop's config
    out = ev(model)
    assert objective in out and out[objective] == out[objective] and out[objective] >= 0
    assert model.training
