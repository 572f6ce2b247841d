"""Ray Tune sweeps: config validation, and one small sweep that ASHA prunes, that is interrupted after its first
trial ends and resumed without running that trial again, with its MLflow parent, nested trial runs and picture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from dataclasses import dataclass

import pytest
from private_ray import private_ray

from condensation.config import ConfigError
from condensation.sweep import PRESETS, TRIAL_DONE_FILE, format_trials_table, load_sweep_config, run_sweep


GPU_PRESETS = {"h200", "h200-ideas", "h200-ideas-bptt"}  # SmolLM2 (the extra) and data/corpus: validated below with stand-ins


@pytest.mark.parametrize("name", sorted(set(PRESETS) - GPU_PRESETS))
def test_every_preset_validates(name):
    cfg = load_sweep_config(name)
    assert cfg.num_trials() >= 4
    assert cfg.asha.enabled and cfg.asha.grace_period < cfg.total_steps()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Two .jsonl files of real text in the corpus schema (pydoc topics): train and held-out."""
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("corpus")
    names = sorted(topics)
    for part, chosen in (("train", names[:40]), ("heldout", names[40:])):
        with open(folder / f"{part}.jsonl", "w") as f:
            for n in chosen:
                f.write(json.dumps({"text": topics[n]}) + "\n")
    return folder


def _gpu_preset(name, corpus, tmp_path, *more):
    """A GPU preset as it validates on this machine: the debug-size model and builtin tokenizer in place of SmolLM2,
    the small corpus in place of data/corpus; everything else (schedule, GPUs, search, ASHA) as shipped."""
    return load_sweep_config(name, overrides=[
        "train.model.init_from=null", "train.model.size=tiny-cpu", "train.data.tokenizer=null",
        f"train.data.source={corpus / 'train.jsonl'}", f"heldout_text={corpus / 'heldout.jsonl'}",
        f"train.run.storage={tmp_path}", *more])


def test_h200_preset_packs_four_trials_on_one_gpu(small_corpus, tmp_path):
    from condensation.sweep import plan_trial_resources, search_points, trial_train_config
    from condensation.train.resources import plan_resources

    full = PRESETS["h200"]()
    assert full.train.model.init_from == full.train.data.tokenizer == "smollm2-135m-instruct"
    assert full.heldout_text == "data/corpus/heldout.jsonl" and full.objective == "heldout_loss"
    cfg = _gpu_preset("h200", small_corpus, tmp_path)
    points = search_points(cfg)
    assert len(points) == 8 and [p["segment_length"] for p in points[:3]] == [256, 512, 1024]
    assert {p["segment_length"] for p in points} == {256, 512, 1024}
    # stratified log-uniform: one rate in each eighth of the log range
    import math

    u = sorted((math.log(p["lr"]) - math.log(1e-5)) / (math.log(1e-3) - math.log(1e-5)) for p in points)
    assert all(i / 8 <= x < (i + 1) / 8 for i, x in enumerate(u)), u
    # one H200 (16 CPUs): 4 trials at once, each one worker of a quarter GPU and an even share of the CPUs
    planned, k, need = plan_trial_resources(cfg, {"CPU": 16.0, "GPU": 1.0})
    assert k == 4 and need == {"CPU": 3.0, "GPU": 0.25}
    tcfg = trial_train_config(planned, 512, 1e-4)
    assert tcfg.schedule.num_workers == 1 and tcfg.schedule.gpus_per_worker == 0.25
    assert plan_resources(tcfg, {"CPU": 16.0, "GPU": 1.0}, 0.25, [(16, 1)]) == {"CPU": 3.0, "GPU": 0.25}
    # 4 H200s: one GPU per trial
    cfg4 = _gpu_preset("h200", small_corpus, tmp_path, "gpus_per_trial=1", "max_concurrent_trials=null")
    _, k4, need4 = plan_trial_resources(cfg4, {"CPU": 64.0, "GPU": 4.0})
    assert k4 == 4 and need4 == {"CPU": 15.0, "GPU": 1}


def test_ideas_preset_is_a_grid_at_one_point(small_corpus, tmp_path):
    from condensation.sweep import search_points, trial_run_name, trial_train_config

    cfg = _gpu_preset("h200-ideas", small_corpus, tmp_path)
    points = search_points(cfg)
    assert not cfg.asha.enabled and len(points) == 4
    assert [(p["params"]["model.memory_sink_tokens"], p["params"]["model.memory_norm"]) for p in points] == [
        (0, "shared"), (0, "separate"), (4, "shared"), (4, "separate")]  # (0, shared): the paper's recipe
    assert {(p["segment_length"], p["lr"]) for p in points} == {(512, 1e-4)}
    tcfg = trial_train_config(cfg, 512, 1e-4, params=points[3]["params"])
    assert tcfg.model.memory_sink_tokens == 4 and tcfg.model.memory_norm == "separate"
    names = {trial_run_name(cfg.name, f"x_{i:05d}", p) for i, p in enumerate(points)}
    assert len(names) == 4 and any(n.endswith("-memory_sink_tokens4-memory_normseparate") for n in names), names


def test_ideas_bptt_preset_crosses_random_lengths_and_truncation(small_corpus, tmp_path):
    from condensation.sweep import search_points, trial_train_config

    full = PRESETS["h200-ideas-bptt"]()
    assert full.train.data.seq_len == 4096 and full.heldout_tokens == 16384 and not full.train.schedule.cuda_graph
    cfg = _gpu_preset("h200-ideas-bptt", small_corpus, tmp_path)
    points = search_points(cfg)
    assert not cfg.asha.enabled and len(points) == 4 and cfg.heldout_tokens == 16384
    assert [(p["params"]["data.random_lengths"], p["params"]["model.memory_grad_segments"]) for p in points] == [
        (False, 0), (False, 2), (True, 0), (True, 2)]  # (False, 0): the paper's recipe
    tcfg = trial_train_config(cfg, 512, 1e-4, params=points[3]["params"])
    assert tcfg.data.random_lengths and tcfg.model.memory_grad_segments == 2


@pytest.mark.parametrize("value", [16, 0, -64])
def test_heldout_tokens_shorter_than_a_segment_is_refused(value):
    with pytest.raises(ConfigError) as err:
        load_sweep_config("debug", overrides=[f"heldout_tokens={value}"])  # segments 32 and 64
    assert err.value.key == "heldout_tokens", str(err.value)
    load_sweep_config("debug", overrides=["heldout_tokens=64"])  # the longest segment: fine, and so is 100
    load_sweep_config("debug", overrides=["heldout_tokens=100"])


def test_grid_on_the_command_line_crosses_every_point():
    from condensation.sweep import search_points, trial_train_config

    cfg = load_sweep_config("debug", overrides=["search.grid.model.memory_grad_segments=[null,2]",
                                                "search.grid.model.memory_sink_tokens=[0,4]",
                                                "search.grid.data.random_lengths=[false,true]"])
    points = search_points(cfg)
    assert cfg.num_trials() == len(points) == 4 * 8
    assert len({(p["segment_length"], p["lr"]) for p in points}) == 4  # each (l, lr) with all 8 combinations
    t = trial_train_config(cfg, 32, 1e-3, params=points[7]["params"])
    assert t.model.memory_grad_segments == 2 and t.model.memory_sink_tokens == 4 and t.data.random_lengths


@pytest.mark.parametrize("override,key,words", [
    ("search.grid.model.loss_chunk_tokens=[1024,2048]", "search.grid.model.loss_chunk_tokens",
     "search.grid.model.overrides.loss_chunk_tokens"),  # the right spelling is in the message
    ("search.grid.model.overrides.memory_sink=[0,4]", "search.grid.model.overrides.memory_sink",
     "not a CondensationConfig field"),
    ("search.grid.model.overrides.memory_grad_segments=[null,-2]", "search.grid.model.overrides.memory_grad_segments",
     "must be None or positive"),
    ("search.grid.model.memory_sink_tokens=[0,-1]", "search.grid.model.memory_sink_tokens", "must be an int >= 0"),
    ("search.grid.model.memory_norm=[shared,own]", "search.grid.model.memory_norm", "must be one of"),
    ("search.grid.data.seq_len=[64,128]", "search.grid.data.seq_len", "same data"),
    ("search.grid.optim.nope=[1,2]", "search.grid.optim.nope", "unknown config key"),
    ("search.grid.optim.weight_decay=[0.0,abc]", "search.grid.optim.weight_decay", "expected a float"),
    ("search.grid.optim.warmup_steps=[1,100]", "search.grid.optim.warmup_steps", "exceeds schedule.total_steps"),
    ("search.grid.optim.lr=[1e-3,1e-4]", "search.grid.optim.lr", "search.lr_min"),
    ("search.grid.optim=[1,2]", "search.grid.optim", "a section"),
    ("search.grid.optim.weight_decay=[]", "search.grid.optim.weight_decay", "non-empty list"),
    ("search.grid.optim.weight_decay=[0.1,0.1]", "search.grid.optim.weight_decay", "repeats"),
])
def test_grid_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_sweep_config("debug", overrides=[override])
    assert err.value.key == key and words in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides,key", [
    (["gpus_per_trial=0.25"], "gpus_per_trial"),  # a CPU sweep
    (["train.schedule.use_gpu=true", "gpus_per_trial=0"], "gpus_per_trial"),
    (["train.schedule.use_gpu=true", "train.schedule.num_workers=2", "gpus_per_trial=0.5"], "gpus_per_trial"),
    (["train.schedule.use_gpu=true", "train.schedule.num_workers=1", "train.schedule.global_batch=2",
      "gpus_per_trial=2"], "gpus_per_trial"),
    (["train.schedule.use_gpu=true", "train.schedule.gpus_per_worker=0.5"], "train.schedule.gpus_per_worker"),
    (["train.schedule.gpus_per_worker=1.5"], "train.schedule.gpus_per_worker"),
    (["search.trials=4", "search.lrs=[1e-3]", "search.num_samples=1"], "search.trials"),
    (["search.lrs=[1e-3]"], "search.num_samples"),  # the debug preset's 2 samples would repeat one trial
])
def test_resource_and_search_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_sweep_config("debug", overrides=overrides)
    assert err.value.key == key, str(err.value)


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


def _loss_steps(client, run_id):
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.fixture(scope="module")
def ray_session():
    """This module's local Ray (2 CPUs, as CI), as tests/conftest.py's (its own dashboard, so that each trial's Ray
    Train run ends without waiting; the controller polls its workers every 0.25 s, so that an ASHA stop reaches a run
    that takes milliseconds a step: tests/private_ray.py), with DeepSpeed told it runs on CPU."""
    with private_ray(2, env_vars={"DS_ACCELERATOR": "cpu"}) as ray:
        yield ray


@dataclass
class Swept:
    cfg: object
    first: str  # the trial whose end interrupted the first start
    r1: object  # the interrupted start's result
    r2: object  # the resumed start's result
    said1: list
    said2: list
    record_before: tuple  # (mtime, text) of the first trial's trial_done.json after the first start
    steps_before: list  # its MLflow loss steps after the first start
    client: object
    tmp: str


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    """One small sweep for the module (the expensive part: every trial is a Ray Train run), started one trial at a
    time and interrupted with SIGINT (as Ctrl-C) when its first trial ends, then started again 2 at a time (the
    number at once may change between starts). 4 trials: segment 32 / 64 x lr 3e-3 / 1e-6 (lr varies fastest), 8
    steps, the objective every 2. At lr 1e-6 the model barely moves: ASHA stops both lr 1e-6 trials at their first
    rung (step 2), where the resumed ASHA knows the first trial's (replayed) and, for the last one, two more; their
    runs, milliseconds a step, end before step 8 because a worker's report waits until the previous one is
    collected. Each start is thus 4 Ray Train runs in all, none of them repeated."""
    from mlflow import MlflowClient

    tmp = str(tmp_path_factory.mktemp("sweep"))
    cfg = load_sweep_config("debug", overrides=[
        f"train.run.storage={tmp}", "name=sw", "search.segment_lengths=[32,64]", "search.lrs=[3e-3,1e-6]",
        "search.num_samples=1", "max_concurrent_trials=1", "train.schedule.num_workers=1",
        "train.schedule.global_batch=2", "train.schedule.per_worker_batch=2", "train.schedule.total_steps=8",
        "eval_every=2", "asha.grace_period=2", "heldout_rows=4"])
    said1, said2, first = [], [], []

    def interrupt(trial):
        if not first:
            first.append(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)

    r1 = run_sweep(cfg, log=lambda line: (said1.append(line), print(line, flush=True)), on_trial_complete=interrupt)
    done = next(t for t in r1.trials if t.trial_id == first[0])
    record = os.path.join(done.run_dir, TRIAL_DONE_FILE)
    record_before = (os.path.getmtime(record), open(record).read())
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    steps_before = _loss_steps(client, done.mlflow_run_id)
    r2 = run_sweep(dataclasses.replace(cfg, max_concurrent_trials=2),
                   log=lambda line: (said2.append(line), print(line, flush=True)))
    return Swept(cfg, first[0], r1, r2, said1, said2, record_before, steps_before, client, tmp)


def test_interrupted_sweep_resumes_without_rerunning_its_first_trial(swept):
    r1, r2 = swept.r1, swept.r2
    assert r1.interrupted and not r1.resumed, swept.said1
    assert any("interrupted" in line for line in swept.said1), swept.said1
    assert {t.trial_id: t.status for t in r1.trials}[swept.first] in ("completed", "stopped"), r1.trials
    # Tune creates trials as it starts them: the others are unfinished or not created yet
    assert sum(t.status != "unfinished" for t in r1.trials) == 1, r1.format_table()
    assert r2.resumed and not r2.interrupted, swept.said2
    assert "2 at a time" in swept.said2[0] and "1 at a time" in swept.said1[0]
    assert len(r2.trials) == 4 and {t.status for t in r2.trials} <= {"completed", "stopped"}, r2.trials
    ended = next(t for t in r2.trials if t.trial_id == swept.first)
    record = os.path.join(ended.run_dir, TRIAL_DONE_FILE)
    assert (os.path.getmtime(record), open(record).read()) == swept.record_before  # not run again
    assert _loss_steps(swept.client, ended.mlflow_run_id) == swept.steps_before
    assert not any(f"trial {swept.first.rsplit('_', 1)[-1]} " in line and "step" in line for line in swept.said2)


def test_asha_stops_some_trials_early_and_the_best_trained_to_the_end(swept):
    r2 = swept.r2
    stopped = [t for t in r2.trials if t.status == "stopped"]
    assert {(t.segment_length, t.lr) for t in stopped} == {(32, 1e-6), (64, 1e-6)}, r2.format_table()
    assert all(t.step < 8 for t in stopped) and all(t.step == 8 for t in r2.trials if t.status == "completed")
    b = r2.best
    assert b.status == "completed" and b.lr == pytest.approx(3e-3) and os.path.isdir(b.hf_path), r2.format_table()
    assert all(t.objective is not None and t.curve for t in r2.trials)
    assert f"| {b.trial_id.rsplit('_', 1)[-1]} |" in r2.format_table()
    # a restored sweep's ASHA knows the ended trials: it records their results at its rungs again
    from ray.tune import ExperimentAnalysis

    from condensation.sweep import _asha_scheduler

    sched = _asha_scheduler(swept.cfg)
    sched.set_search_properties(swept.cfg.objective, "min")
    for t in ExperimentAnalysis(r2.experiment_path).trials:
        sched.on_trial_add(None, t)
    assert {tid for _, rec in sched._brackets[0]._rungs for tid in rec} == {t.trial_id for t in r2.trials}


def test_mlflow_holds_parent_nested_trials_best_and_picture(swept):
    client, r2, tmp = swept.client, swept.r2, swept.tmp
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
    png = client.download_artifacts(parent.info.run_id, "objective.png", tmp)
    assert os.path.getsize(png) > 5000
    best = json.loads(open(client.download_artifacts(parent.info.run_id, "best_trial.json", tmp)).read())
    assert best["trial_id"] == r2.best.trial_id and best["checkpoint_path"] == r2.best.checkpoint_path
    assert parent.data.tags["best.segment_length"] == str(r2.best.segment_length)
    best_cfg = open(client.download_artifacts(parent.info.run_id, "best_config.yaml", tmp)).read()
    assert f"segment_length: {r2.best.segment_length}" in best_cfg


def test_no_training_run_is_left_behind(swept):
    import ray

    free = ray.available_resources().get("CPU", 0)
    assert free == pytest.approx(ray.cluster_resources()["CPU"], abs=0.05), ray.available_resources()


def test_gpu_utilisation_by_trials_running():
    """From the trials' MLflow system metrics (what rank 0 logs on a GPU): each trial's mean, and the mean by how
    many trials' runs were open at each sample (two trials sharing GPU 0 here)."""
    from types import SimpleNamespace as NS

    from condensation.sweep import TrialRecord, format_gpu_util, gpu_utilization

    key = "system/gpu_0_utilization_percentage"
    runs = {"a": (0, 100, [(10, 40.0), (60, 90.0)]), "b": (50, 200, [(60, 90.0), (150, 30.0)])}

    class Client:
        def get_run(self, run_id):
            start, end, _ = runs[run_id]
            return NS(info=NS(start_time=start, end_time=end), data=NS(metrics={key: 0.0, "loss": 1.0}))

        def get_metric_history(self, run_id, k):
            return [NS(timestamp=t, value=v) for t, v in runs[run_id][2]] if k == key else []

    trials = [TrialRecord(trial_id=f"x_{i}", segment_length=64, lr=1e-3, status="completed", step=8, objective=1.0,
                          mlflow_run_id=r) for i, r in enumerate(runs)]
    u = gpu_utilization(Client(), trials)
    assert [t.gpu_util for t in trials] == [65.0, 60.0]
    assert u["samples"] == 4 and u["by_running"] == {"1": {"mean": 35.0, "samples": 2},
                                                      "2": {"mean": 90.0, "samples": 2}}
    assert "90% with 2 trial(s) running" in format_gpu_util(u)
    assert "GPU util %" in format_trials_table(trials, "heldout_loss")


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


def _tokenize_tasks() -> set:
    """Ray tasks of this cluster that ran the data layer's tokenize-and-pack stage (Ray's task records, from every
    process: the sweep's driver, the trials' drivers, their Ray Data executions)."""
    import time

    import ray
    from ray.util.state import list_tasks

    address = ray.get_runtime_context().gcs_address  # this module's Ray (its dashboard), not the newest on the host
    seen, last = None, -1
    for _ in range(15):  # task events reach the state API within a second or two
        seen = {t.task_id for t in list_tasks(address=address, limit=10_000, raise_on_missing_output=False)
                if "tokenize_and_pack" in (t.name or "")}
        if len(seen) == last:
            break
        last = len(seen)
        time.sleep(2)
    return seen


def test_sweep_tokenizes_its_text_once_for_every_trial(ray_session, small_corpus, tmp_path):
    """2 trials (segment 32 and 64) of 2 epochs each on a tokenized jsonl corpus: the sweep's driver tokenizes and
    packs it once (as many tokenize tasks as one materialization runs), not once per trial and epoch (4 executions
    before), and every trial's run logs the counts of that one pass over the 40 documents."""
    from mlflow import MlflowClient

    from condensation.train.data import data_layer_datasets

    cfg = load_sweep_config("debug", overrides=[
        f"train.run.storage={tmp_path}", "name=tok", "train.model.size=tiny-cpu", "train.data.tokenizer=null",
        f"train.data.source={small_corpus / 'train.jsonl'}", "train.data.seq_len=64", "train.data.num_rows=8",
        "train.data.dataset_options.mode=pack", "train.data.dataset_options.min_tokens=8",
        f"heldout_text={small_corpus / 'heldout.jsonl'}", "heldout_rows=2", "search.segment_lengths=[32,64]",
        "search.lrs=[1e-3]", "search.num_samples=1", "max_concurrent_trials=1", "train.schedule.num_workers=1",
        "train.schedule.global_batch=4", "train.schedule.per_worker_batch=4", "train.schedule.total_steps=4",
        "eval_every=2", "asha.enabled=false"])
    before = _tokenize_tasks()
    result = run_sweep(cfg)
    assert [t.status for t in result.trials] == ["completed", "completed"], result.format_table()
    in_sweep = _tokenize_tasks() - before
    data_layer_datasets(dataclasses.replace(cfg.train.data, source=str(small_corpus / "train.jsonl")))
    once = _tokenize_tasks() - before - in_sweep
    assert once and len(in_sweep) == len(once), (len(in_sweep), len(once))
    client = MlflowClient(result.tracking_uri)
    for t in result.trials:
        metrics = client.get_run(t.mlflow_run_id).data.metrics
        assert metrics["data.rows_read"] == 40 and metrics["epoch"] == 1, metrics


@pytest.mark.parametrize("source", ["local", "synthetic"])
def test_heldout_windows_of_heldout_tokens_and_their_tail(source):
    """heldout_tokens = 4x the training length: windows of that length (local: text never trained on), and
    heldout_loss_tail = the mean per-token loss over the last quarter, checked against a plain loop over the logits."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from condensation import CondensationForCausalLM
    from condensation.sizes import build_config
    from condensation.sweep import make_evaluator, trial_train_config
    from condensation.train.data import local_text_rows

    cfg = load_sweep_config("debug", overrides=["heldout_tokens=512", "heldout_rows=2", f"train.data.source={source}"])
    tcfg = trial_train_config(cfg, 64, 1e-3)
    ev = make_evaluator(cfg, tcfg)
    assert tcfg.data.seq_len == 128 and ev.rows.shape == (2, 512) and ev.rows.dtype == np.int64
    if source == "local":  # no training row's text among the held-out tokens
        train = local_text_rows(128, tcfg.data.num_rows, tcfg.data.seed)
        seen = {r.tobytes() for r in train}
        assert not seen & {c.tobytes() for c in ev.rows.reshape(-1, 128)}
    torch.manual_seed(0)
    vocab = int(ev.rows.max()) + 1 if source == "synthetic" else 2048
    model = CondensationForCausalLM(build_config("debug", vocab_size=max(vocab, 2048), segment_length=64)).eval()
    out = ev(model)
    ids = torch.as_tensor(ev.rows)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # [2, 512, V]
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # predicts 1..511
    tail = per_token[:, 384 - 1:]  # predictions of positions 384..511, the last quarter
    assert out["heldout_loss_tail"] == pytest.approx(float(tail.mean()), abs=1e-5)
    assert out["heldout_loss"] == pytest.approx(float(per_token.mean()), abs=1e-5)
    # the tolerance tells the last quarter from the whole window and from the quarter before it
    assert abs(float(tail.mean()) - float(per_token.mean())) > 1e-4
    assert abs(float(tail.mean()) - float(per_token[:, 256 - 1: 384 - 1].mean())) > 1e-4
    from condensation.sweep import TrialRecord

    table = format_trials_table([TrialRecord(trial_id="x_0", segment_length=64, lr=1e-3, status="completed", step=8,
                                             objective=out["heldout_loss"], metrics={"heldout_loss_tail": 1.5})],
                                "heldout_loss")
    assert "heldout_loss_tail" in table.splitlines()[0] and "1.5000" in table


def test_trial_returns_only_after_its_last_handed_over_report_is_taken(monkeypatch):
    """Ray 2.60's trial actor moves a report handed over by Train's controller from a queue of one to its result
    queue of one with a blocking put: a trial function returning before that move lets Tune's closing report take
    the result queue, and the actor hangs. _await_reports_taken holds the function until both queues stay empty."""
    import queue
    import threading
    import time
    from types import SimpleNamespace

    import ray.train._internal.session as ray_session

    from condensation import sweep

    session = SimpleNamespace(_inter_actor_queue=queue.Queue(1), result_queue=queue.Queue(1))
    session._inter_actor_queue.put({"step": 4})
    monkeypatch.setattr(ray_session, "get_session", lambda: session)
    moved = threading.Event()

    def main_thread():  # the actor's get_next: late, then take, move, and hand the result to Tune
        time.sleep(0.3)
        item = session._inter_actor_queue.get()
        time.sleep(0.05)
        session.result_queue.put(item)
        time.sleep(0.2)
        session.result_queue.get()
        moved.set()

    threading.Thread(target=main_thread, daemon=True).start()
    t0 = time.monotonic()
    sweep._await_reports_taken(timeout_s=5, quiet_s=0.2)
    assert moved.is_set() and time.monotonic() - t0 < 3

    # nobody takes the report (Tune no longer asks for results): it gives up after timeout_s
    session._inter_actor_queue.put({"step": 6})
    t0 = time.monotonic()
    sweep._await_reports_taken(timeout_s=0.5, quiet_s=0.2)
    assert 0.5 <= time.monotonic() - t0 < 2
    # no report was ever handed over: it returns at once
    monkeypatch.setattr(ray_session, "get_session", lambda: SimpleNamespace(_inter_actor_queue=None))
    t0 = time.monotonic()
    sweep._await_reports_taken()
    assert time.monotonic() - t0 < 0.1
