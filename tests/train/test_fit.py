"""Ray Train on CPU (gloo), DeepSpeed ZeRO-2 and the torch engine, 1 and 2 workers: training, MLflow, recovery,
restart, NaN stop.

One Ray session for the module; every test has its own run folder and MLflow store.
"""

import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from condensation.tokenizer import load_tokenizer
from condensation.train import NonFiniteLossError, fit, param_digest

from .conftest import debug_cfg, mlflow_runs

def _loss_history(client, run_id):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def test_zero2_lowers_loss_keeps_ranks_identical_and_logs_one_mlflow_run(ray_session, tmp_path):
    from condensation import CondensationForCausalLM
    from condensation.train import local_text_rows, rows_dataset

    # the fast-path model options under ZeRO-2: layer weight gradients produced at the end of backward outside
    # autograd (weight_grads), and group checkpoints, whose embedding gradient comes from EmbeddingSink
    cfg = debug_cfg(tmp_path, "train", "model.overrides.weight_grads=deferred",
                    "model.overrides.checkpoint_group_steps=2")
    datasets = {"train": rows_dataset(local_text_rows(128, 64, seed=1))}  # any Dataset of the row schema
    res = fit(cfg, datasets, data_stats={"skipped_too_short": 3, "documents": 61})
    assert res.step == 8
    assert res.metrics["ranks_in_sync"] == 1.0
    assert res.metrics["param_digest_rank0"] == res.metrics["param_digest_rank1"]

    client, runs = mlflow_runs(res)
    assert len(runs) == 1 and runs[0].info.run_id == res.mlflow_run_id
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    hist = _loss_history(client, res.mlflow_run_id)
    assert [s for s, _ in hist] == list(range(1, 9))
    first, last = hist[0][1], hist[-1][1]
    assert last < first - 0.5, hist  # a few steps on real text lower the eq. 17 loss clearly
    for key in ("lr", "tokens_per_s", "peak_memory_gib", "segment_loss_0", "segment_loss_3", "step_time_s"):
        assert key in run.data.metrics, key
    assert run.data.metrics["data.skipped_too_short"] == 3
    p = run.data.params
    assert p["schedule.global_batch"] == "4" and p["model.size"] == "debug"
    assert p["deepspeed_resolved.zero_optimization.stage"] == "2"
    assert p["deepspeed_resolved.bf16.enabled"] == "False"  # fp32 on CPU
    assert p["grad_accum"] == "2"
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"resolved_config.yaml", "data_stats.json"} <= arts
    text = open(client.download_artifacts(res.mlflow_run_id, "resolved_config.yaml", str(tmp_path))).read()
    assert "deepspeed_resolved" in text and "train_batch_size: 4" in text
    assert "weight_grads: deferred" in text and "checkpoint_group_steps: 2" in text

    # the HF export loads with from_pretrained and holds the trained (rank-identical) weights
    model = CondensationForCausalLM.from_pretrained(res.hf_path)
    assert param_digest(model) == res.metrics["param_digest_rank0"]
    # and the run's tokenizer, as any HF checkpoint folder does
    sample = "def f(x):\n    return x + 1  # passkey 4721"
    assert AutoTokenizer.from_pretrained(res.hf_path)(sample).input_ids == load_tokenizer(None)(sample).input_ids
    ids = torch.tensor(local_text_rows(128, 1, seed=5))
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids, return_logits=False).loss)
    # Ray kept the newest checkpoints (keep=2), each with every rank's ZeRO shard
    ckpts = sorted(d for d in os.listdir(res.run_dir) if d.startswith("checkpoint_0"))
    assert ckpts == ["checkpoint_00000006", "checkpoint_00000008"]
    ds = os.listdir(os.path.join(res.checkpoint_path, "ds"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(ds)


def test_torch_engine_bf16_lowers_loss_keeps_ranks_identical_and_recovers(ray_session, tmp_path):
    from condensation import CondensationForCausalLM

    # bf16 weights with fp32 master weights (the GPU default, here on CPU), the gradient bucket all-reduced over gloo,
    # gradient accumulation (2 micro-batches); an exception after step 3 (resumed from checkpoint 2), then the last
    # worker's process killed with SIGKILL after step 5 (resumed from checkpoint 4): one run, two restarts
    cfg = debug_cfg(tmp_path, "torch", "schedule.engine=torch", "schedule.precision=bf16",
                    "model.overrides.weight_grads=deferred", "debug.fault_at_step=3", "debug.kill_at_step=5",
                    "checkpoint.max_failures=2")
    res = fit(cfg)
    assert res.step == 8 and res.metrics["ranks_in_sync"] == 1.0
    assert os.path.exists(os.path.join(res.run_dir, ".kill_injected_at_step_5"))
    client, runs = mlflow_runs(res)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    hist = _loss_history(client, res.mlflow_run_id)
    assert [s for s, _ in hist] == [1, 2, 3, 3, 4, 5, 5, 6, 7, 8]
    assert hist[-1][1] < hist[0][1] - 0.5, hist
    p = client.get_run(res.mlflow_run_id).data.params
    assert p["torch_engine_resolved.master_weights"] == "True" and p["schedule.engine"] == "torch"
    assert not any(k.startswith("deepspeed_resolved") for k in p)
    # rank 0's one state file, fp32 masters of the bf16 model; no DeepSpeed folder
    assert sorted(os.listdir(res.checkpoint_path)) == ["hf", "resolved_config.yaml", "torch", "trainer_state.json"]
    state = torch.load(os.path.join(res.checkpoint_path, "torch", "state.pt"), weights_only=True)
    assert {t.dtype for t in state["params"].values()} == {torch.float32}
    model = CondensationForCausalLM.from_pretrained(res.hf_path)  # the bf16 weights the ranks trained, identical
    assert param_digest(model) == res.metrics["param_digest_rank0"]


def test_fault_recovered_by_failure_config_to_same_final_step(ray_session, tmp_path):
    cfg = debug_cfg(tmp_path, "fault", "debug.fault_at_step=5", "checkpoint.max_failures=1")
    res = fit(cfg)
    assert res.step == 8 and os.path.exists(os.path.join(res.run_dir, ".fault_injected_at_step_5"))
    client, runs = mlflow_runs(res)
    assert len(runs) == 1  # the restarted workers resumed the same MLflow run
    steps = [s for s, _ in _loss_history(client, res.mlflow_run_id)]
    # steps 1-5 ran once before the fault; the new workers resumed from checkpoint 4, so 5 ran twice, 1-4 once
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert client.get_run(res.mlflow_run_id).info.status == "FINISHED"


def test_stopped_job_started_again_continues(ray_session, tmp_path):
    from ray.train import TrainingFailedError

    cfg = debug_cfg(tmp_path, "stop", "debug.fault_at_step=3", "checkpoint.max_failures=0", "checkpoint.keep=null")
    with pytest.raises(TrainingFailedError):
        fit(cfg)  # the job dies after step 3; checkpoint 2 is the last one
    res = fit(cfg)  # the same run started again: continues from step 2 (the fault fires once)
    assert res.step == 8
    client, runs = mlflow_runs(res)
    assert len(runs) == 1
    steps = [s for s, _ in _loss_history(client, res.mlflow_run_id)]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 7, 8]
    with open(os.path.join(res.checkpoint_path, "trainer_state.json")) as f:
        assert json.load(f)["step"] == 8


@pytest.mark.parametrize("engine,workers", [("deepspeed", 2), ("torch", 1)])
def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(ray_session, tmp_path, engine, workers):
    cfg = debug_cfg(tmp_path, "nan", "debug.nan_at_step=5", "checkpoint.max_failures=2", f"schedule.engine={engine}",
                    f"schedule.num_workers={workers}")
    with pytest.raises(NonFiniteLossError, match="at step 5") as err:
        fit(cfg)
    assert err.value.step == 5
    last = err.value.last_checkpoint
    assert last.endswith("checkpoint_00000004")
    with open(os.path.join(last, "trainer_state.json")) as f:
        assert json.load(f)["step"] == 4
    if engine == "deepspeed":
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "mp_rank_00_model_states.pt"} <= set(os.listdir(os.path.join(last, "ds")))
        weights = torch.load(os.path.join(last, "ds", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    else:
        weights = torch.load(os.path.join(last, "torch", "state.pt"), weights_only=True)["params"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    run_dir = os.path.dirname(last)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0")) == ["checkpoint_00000002", "checkpoint_00000004"]
    client, runs = mlflow_runs(type("R", (), {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["nonfinite_loss_step"] == "5"


def test_worker_killed_with_sigkill_resumes_to_same_final_step(ray_session, tmp_path):  # torch: test_torch_engine_...
    cfg = debug_cfg(tmp_path, "kill", "debug.kill_at_step=5", "checkpoint.max_failures=1")
    res = fit(cfg)
    assert res.step == 8 and os.path.exists(os.path.join(res.run_dir, ".kill_injected_at_step_5"))
    client, runs = mlflow_runs(res)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # the killed process logged step 5, then died before checkpoint 6: the new workers resumed from 4
    assert [s for s, _ in _loss_history(client, res.mlflow_run_id)] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert res.metrics["ranks_in_sync"] == 1.0


def test_error_repeating_at_the_same_step_fails_at_once(ray_session, tmp_path):
    from condensation.train import RepeatedFailureError

    cfg = debug_cfg(tmp_path, "bug", "debug.fault_at_step=3", "debug.fault_once=false", "checkpoint.max_failures=5")
    with pytest.raises(RepeatedFailureError, match="failed twice at step 3.*injected fault at step 3") as err:
        fit(cfg)
    assert err.value.step == 3 and err.value.error_type == "RuntimeError"
    client, runs = mlflow_runs(type("R", (), {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    # two attempts, not max_failures + 1: steps 1-3, then 3 again from checkpoint 2
    assert [s for s, _ in _loss_history(client, runs[0].info.run_id)] == [1, 2, 3, 3]


@pytest.mark.parametrize("prefix", ["", "bf16_"])
def test_newest_complete_checkpoint_needs_every_ranks_shard(tmp_path, prefix):
    from condensation.train.checkpoints import newest_complete_checkpoint

    def ckpt(step, ranks):
        d = tmp_path / f"checkpoint_{step:08d}"
        (d / "ds").mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 2}))
        for r in ranks:
            (d / "ds" / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_text("x")

    ckpt(4, [0, 1])
    ckpt(6, [0, 1])
    ckpt(8, [0])  # rank 1's shard never arrived
    (tmp_path / "checkpoint_00000010" / "ds").mkdir(parents=True)  # no trainer state yet
    assert newest_complete_checkpoint(str(tmp_path)).endswith("checkpoint_00000006")


def test_stop_file_ends_the_run_before_its_next_update(ray_session, tmp_path):
    from condensation.train.loop import STOP_FILE, STOPPED_FILE

    cfg = debug_cfg(tmp_path, "stopped", "checkpoint.every=0")
    run_dir = os.path.join(tmp_path, "stopped")
    os.makedirs(run_dir)
    open(os.path.join(run_dir, STOP_FILE), "w").close()  # asked before the first step: no step is taken
    res = fit(cfg)
    assert res.stopped and res.step == 0 and res.checkpoint_path is None
    assert not os.path.exists(os.path.join(run_dir, STOP_FILE))  # consumed: the next start trains
    assert json.load(open(os.path.join(run_dir, STOPPED_FILE)))["step"] == 0
    client, runs = mlflow_runs(res)
    assert len(runs) == 1 and runs[0].info.status == "KILLED" and runs[0].data.tags["stopped_at_step"] == "0"
    assert _loss_history(client, res.mlflow_run_id) == []


def test_replay_micro_batches_two_workers_log_replay_loss_and_stay_in_sync(ray_session, tmp_path):
    from condensation.train import local_text_rows, rows_dataset, synthetic_rows

    # train: text; replay: rows of random repeated patterns, a loss of their own
    cfg = debug_cfg(tmp_path, "replay", "schedule.replay_micro_batches=1", "checkpoint.every=0")
    datasets = {"train": rows_dataset(local_text_rows(128, 64, seed=1)),
                "replay": rows_dataset(synthetic_rows(128, 32, 256, seed=2))}
    res = fit(cfg, datasets)
    assert res.step == 8 and res.metrics["ranks_in_sync"] == 1.0
    client, _ = mlflow_runs(res)
    replay = sorted((m.step, m.value) for m in client.get_metric_history(res.mlflow_run_id, "replay_loss"))
    loss = _loss_history(client, res.mlflow_run_id)
    assert [s for s, _ in replay] == [s for s, _ in loss] == list(range(1, 9))
    assert replay[-1][1] < replay[0][1] and loss[-1][1] < loss[0][1] - 0.5, (replay, loss)  # both are learned
    assert [v for _, v in replay] != [v for _, v in loss]  # two streams, not one logged twice
    p = client.get_run(res.mlflow_run_id).data.params
    assert p["deepspeed_resolved.gradient_accumulation_steps"] == "3" and p["grad_accum"] == "2"
