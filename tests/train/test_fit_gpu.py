"""The training platform on CUDA GPUs: Ray Train + DeepSpeed ZeRO-2 over NCCL in bf16, with the model's fast options
(compiled cells, deferred weight gradients, group checkpoints, the fused loss). Skipped without a GPU; run on the
GPU machine with

    python -m pytest -q -m gpu tests/train/test_fit_gpu.py

What CPU runs with gloo cannot catch is caught here: a collective on a CPU tensor under NCCL, a device mismatch in
the prefetched batches, a compiled cell under DeepSpeed's hooks.
"""

import json
import os

import pytest
import torch

from condensation.train import NonFiniteLossError, RepeatedFailureError, fit, param_digest

from .conftest import debug_cfg, local_ray, mlflow_runs

N_GPUS = torch.cuda.device_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPUS == 0, reason="needs a CUDA GPU")]

# the fast configuration the GPU presets use, on a model small enough for seconds per run
FAST = ["model.overrides.compile_cells=true", "model.overrides.weight_grads=deferred",
        "model.overrides.checkpoint_group_steps=2"]


def gpu_cfg(tmp_path, name, workers, *overrides):
    return debug_cfg(tmp_path, name, "schedule.use_gpu=true", f"schedule.num_workers={workers}",
                     "schedule.cpus_per_worker=1", "schedule.precision=bf16", "schedule.torch_threads=null",
                     f"schedule.global_batch={2 * workers}", "schedule.per_worker_batch=1",
                     "data.seq_len=256", "data.num_rows=128", "schedule.total_steps=12", "checkpoint.every=4",
                     "tracking.system_metrics_interval_s=1", *overrides)


@pytest.fixture(scope="module")
def ray_gpus():
    yield from local_ray(8, N_GPUS)


def _steps(client, run_id, key="loss"):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("workers", [1, 2])
def test_pretrain_nccl_zero2_bf16_fast_path(ray_gpus, tmp_path, workers):
    if workers > N_GPUS:
        pytest.skip(f"needs {workers} GPUs")
    res = fit(gpu_cfg(tmp_path, f"gpu{workers}", workers, *FAST))
    assert res.step == 12 and res.metrics["ranks_in_sync"] == 1.0
    assert len({v for k, v in res.metrics.items() if k.startswith("param_digest_rank")}) == 1
    client, runs = mlflow_runs(res)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    hist = _steps(client, res.mlflow_run_id)
    assert [s for s, _ in hist] == list(range(1, 13))
    assert hist[-1][1] < hist[0][1] - 0.5, hist
    metrics = client.get_run(res.mlflow_run_id).data.metrics
    for key in ("tokens_per_s", "mfu", "peak_memory_gib", "step_time_s"):
        assert key in metrics and metrics[key] > 0, key
    assert 0 < metrics["mfu"] < 1
    # MLflow's system metrics: GPU utilisation and memory over time, sampled by rank 0 for its node
    assert any(k.startswith("system/gpu_0_utilization") for k in metrics), sorted(metrics)
    assert any(k.startswith("system/gpu_0_memory") for k in metrics), sorted(metrics)
    params = client.get_run(res.mlflow_run_id).data.params
    assert params["deepspeed_resolved.bf16.enabled"] == "True" and params["world_size"] == str(workers)
    assert params["model.overrides.weight_grads"] == "deferred"


def test_checkpoint_hf_export_loads_and_generates_on_gpu(ray_gpus, tmp_path):
    from condensation import CondensationForCausalLM

    res = fit(gpu_cfg(tmp_path, "export", 1, "schedule.total_steps=4"))
    model = CondensationForCausalLM.from_pretrained(res.hf_path, dtype=torch.bfloat16).cuda().eval()
    assert param_digest(model.float()) == res.metrics["param_digest_rank0"]
    model = model.to(torch.bfloat16)
    prompt = torch.randint(1, 256, (2, 100), device="cuda")
    out = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert out.shape == (2, 120) and out.device.type == "cuda"
    assert torch.equal(out[:, :100], prompt)


def test_nan_loss_stops_on_gpu_and_keeps_last_good_checkpoint(ray_gpus, tmp_path):
    workers = min(2, N_GPUS)
    with pytest.raises(NonFiniteLossError, match="at step 6") as err:
        fit(gpu_cfg(tmp_path, "nan", workers, "debug.nan_at_step=6", "checkpoint.max_failures=2"))
    assert err.value.last_checkpoint.endswith("checkpoint_00000004")
    state = torch.load(os.path.join(err.value.last_checkpoint, "ds", "mp_rank_00_model_states.pt"), weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["module"].values())
    client, runs = mlflow_runs(type("R", (), {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_worker_killed_with_sigkill_resumes_on_gpu(ray_gpus, tmp_path):
    workers = min(2, N_GPUS)
    res = fit(gpu_cfg(tmp_path, "kill", workers, *FAST, "debug.kill_at_step=6", "checkpoint.max_failures=1"))
    assert res.step == 12 and res.metrics["ranks_in_sync"] == 1.0
    assert os.path.exists(os.path.join(res.run_dir, ".kill_injected_at_step_6"))
    client, runs = mlflow_runs(res)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # the killed worker logged steps 5 and 6, then died before checkpoint 8: the new workers resumed from 4
    assert [s for s, _ in _steps(client, res.mlflow_run_id)] == sorted([*range(1, 13), 5, 6])
    with open(os.path.join(res.checkpoint_path, "trainer_state.json")) as f:
        assert json.load(f)["step"] == 12


def test_repeated_error_fails_at_once_on_gpu(ray_gpus, tmp_path):
    cfg = gpu_cfg(tmp_path, "bug", 1, "debug.fault_at_step=3", "debug.fault_once=false", "checkpoint.max_failures=5")
    with pytest.raises(RepeatedFailureError, match="failed twice at step 3"):
        fit(cfg)


def test_curriculum_debug_preset_on_gpu(ray_gpus, tmp_path):
    from condensation.curriculum import load_curriculum_config, run_curriculum

    cfg = load_curriculum_config("debug", overrides=[
        f"train.run.storage={tmp_path}", "train.schedule.use_gpu=true", "train.schedule.num_workers=1",
        "train.schedule.cpus_per_worker=1", "train.schedule.torch_threads=null"])
    results = run_curriculum(cfg)
    assert [r.total_tokens for r in results] == [96, 128]
    assert all(os.path.isdir(r.hf_path) for r in results)
    client, runs = mlflow_runs(type("R", (), {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    assert len(runs) == 3  # the parent and one run per stage
