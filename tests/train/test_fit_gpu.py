"""The training platform on CUDA GPUs: Ray Train + DeepSpeed ZeRO-2 or the torch engine (eager, or two CUDA graphs a
step) over NCCL in bf16, with the model's fast options (compiled cells, deferred weight gradients, group checkpoints,
the fused loss). Skipped without a GPU; run on the GPU machine with

    python -m pytest -q -m gpu tests/train/test_fit_gpu.py

What CPU runs with gloo cannot catch is caught here: a collective on a CPU tensor under NCCL, a device mismatch in
the prefetched batches, a compiled cell under DeepSpeed's hooks, the torch engine's graphs captured while Ray Data's
thread copies batches onto the GPU, an NCCL all-reduce inside a graph (2 GPUs), a NaN inside a replayed graph.
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


# engine variants; a graph takes one micro-batch per step, so its per-worker batch holds the same 2 rows per worker
ENGINES = {"deepspeed": [], "torch": ["schedule.engine=torch"],
           "torch-graph": ["schedule.engine=torch", "schedule.cuda_graph=true", "schedule.per_worker_batch=2"]}


def gpu_cfg(tmp_path, name, workers, *overrides, engine="deepspeed"):
    return debug_cfg(tmp_path, name, "schedule.use_gpu=true", f"schedule.num_workers={workers}",
                     "schedule.cpus_per_worker=1", "schedule.precision=bf16", "schedule.torch_threads=null",
                     f"schedule.global_batch={2 * workers}", "schedule.per_worker_batch=1",
                     "data.seq_len=256", "data.num_rows=128", "schedule.total_steps=12", "checkpoint.every=4",
                     "tracking.system_metrics_interval_s=1", *ENGINES[engine], *overrides)


def _weights(checkpoint):
    """The weights a checkpoint holds, whichever engine wrote it."""
    if os.path.isdir(os.path.join(checkpoint, "torch")):
        return torch.load(os.path.join(checkpoint, "torch", "state.pt"), weights_only=True)["params"]
    return torch.load(os.path.join(checkpoint, "ds", "mp_rank_00_model_states.pt"), weights_only=False)["module"]


@pytest.fixture(scope="module")
def ray_gpus():
    yield from local_ray(8, N_GPUS)


def _steps(client, run_id, key="loss"):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.parametrize("engine,workers", [("deepspeed", 1), ("deepspeed", 2), ("torch", 1), ("torch-graph", 1),
                                            ("torch-graph", 2)])
def test_pretrain_nccl_bf16_fast_path(ray_gpus, tmp_path, engine, workers):
    if workers > N_GPUS:
        pytest.skip(f"needs {workers} GPUs")
    res = fit(gpu_cfg(tmp_path, f"gpu{workers}", workers, *FAST, engine=engine))
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
    assert params["world_size"] == str(workers) and params["model.overrides.weight_grads"] == "deferred"
    if engine == "deepspeed":
        assert params["deepspeed_resolved.bf16.enabled"] == "True"
    else:
        assert params["torch_engine_resolved.model_dtype"] == "bfloat16"
        assert params["torch_engine_resolved.master_weights"] == "True"
        assert params["schedule.cuda_graph"] == str(engine == "torch-graph")


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_weighted_replay_on_gpu(ray_gpus, tmp_path, engine):
    """schedule.replay_weight != 1 under bf16 on CUDA: the engine scales each micro-batch's loss itself (DeepSpeed's
    backward with scale_wrt_gas=False inside ZeRO-2), every step takes 2 train + 1 replay micro-batches, the train
    loss is learned and the replay loss is logged apart."""
    from condensation.train import local_text_rows, rows_dataset, synthetic_rows

    cfg = gpu_cfg(tmp_path, f"replay-{engine}", 1, *FAST, "schedule.replay_micro_batches=1",
                  "schedule.replay_weight=0.25", engine=engine)
    datasets = {"train": rows_dataset(local_text_rows(256, 128, seed=1)),
                "replay": rows_dataset(synthetic_rows(256, 64, 256, seed=2))}
    res = fit(cfg, datasets)
    assert res.step == 12
    client, _ = mlflow_runs(res)
    loss, replay = _steps(client, res.mlflow_run_id), _steps(client, res.mlflow_run_id, "replay_loss")
    assert [s for s, _ in replay] == [s for s, _ in loss] == list(range(1, 13))
    assert loss[-1][1] < loss[0][1] - 0.5, loss
    assert all(v == v for _, v in replay) and [v for _, v in replay] != [v for _, v in loss], replay
    params = client.get_run(res.mlflow_run_id).data.params
    assert params["schedule.replay_weight"] == "0.25"
    if engine == "deepspeed":
        assert params["deepspeed_resolved.gradient_accumulation_steps"] == "3"


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


@pytest.mark.parametrize("engine", ["deepspeed", "torch-graph"])
def test_nan_loss_stops_on_gpu_and_keeps_last_good_checkpoint(ray_gpus, tmp_path, engine):
    workers = min(2, N_GPUS)
    with pytest.raises(NonFiniteLossError, match="at step 6") as err:
        fit(gpu_cfg(tmp_path, "nan", workers, "debug.nan_at_step=6", "checkpoint.max_failures=2", engine=engine))
    assert err.value.last_checkpoint.endswith("checkpoint_00000004")
    assert all(torch.isfinite(v).all() for v in _weights(err.value.last_checkpoint).values())
    client, runs = mlflow_runs(type("R", (), {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


@pytest.mark.parametrize("engine", ["deepspeed", "torch-graph"])
def test_worker_killed_with_sigkill_resumes_on_gpu(ray_gpus, tmp_path, engine):
    workers = min(2, N_GPUS)
    res = fit(gpu_cfg(tmp_path, "kill", workers, *FAST, "debug.kill_at_step=6", "checkpoint.max_failures=1",
                      engine=engine))
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


def test_torch_engine_graphs_train_like_eager_steps_and_skip_a_nan_update(tmp_path):
    """In-process, one GPU, no Ray: the torch engine's two captured graphs against its eager steps on the same batches
    (bf16 model, fp32 masters, the fast options), while another thread keeps copying tensors onto the GPU as Ray
    Data's does (capture_error_mode="thread_local"); a NaN in a replayed graph leaves the weights as they were."""
    import dataclasses
    import threading

    from condensation.train.engines import TorchEngine
    from condensation.train.model import build_model

    base = debug_cfg(tmp_path, "x", "schedule.engine=torch", "schedule.use_gpu=true", "schedule.precision=bf16",
                     "schedule.num_workers=1", "schedule.per_worker_batch=2", "schedule.global_batch=2",
                     "data.seq_len=256", "debug.nan_at_step=5", *FAST)
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2, 256), generator=g).to(device) for _ in range(8)]

    def run(graph):
        cfg = dataclasses.replace(base, schedule=dataclasses.replace(base.schedule, cuda_graph=graph))
        torch.manual_seed(0)
        eng = TorchEngine(cfg, build_model(cfg.model), device, world=1)
        start = [p.clone() for p in eng.opt_params]
        losses = []
        for step, b in enumerate(batches, 1):
            out = eng.forward_backward(b, b, poison=step == 5)
            losses.append(float(out.loss))
            if step != 5:  # the loop stops before step 5's update; here the run goes on, and its NaN gradients
                eng.step()  # must not reach step 6's (the bucket is rewritten, not added to)
        torch.cuda.synchronize()
        assert all(torch.isfinite(p).all() for p in eng.opt_params)
        assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(eng.params, eng.opt_params))
        if graph:
            assert eng._grads_graph.graph is not None and eng._update_graph.graph is not None  # replayed, not eager
        return losses, start, [p.clone() for p in eng.opt_params]

    stop = threading.Event()

    def copier():  # a data loader's thread: host-to-device copies while the main thread captures (no RNG use)
        while not stop.is_set():
            torch.ones(1 << 16).to(device)

    t = threading.Thread(target=copier, daemon=True)
    t.start()
    try:
        eager, graphed = run(False), run(True)
    finally:
        stop.set()
        t.join()
    le, lg = eager[0], graphed[0]
    assert torch.isnan(torch.tensor(le[4])) and torch.isnan(torch.tensor(lg[4]))
    assert all(abs(a - b) <= 1e-2 * abs(a) for i, (a, b) in enumerate(zip(le, lg)) if i != 4), (le, lg)
    assert le[-1] < le[0] and lg[-1] < lg[0]
    # the graphs moved the weights as eager steps did: differences small against how far training moved them
    moved = max((q - p).abs().max().item() for p, q in zip(eager[1], eager[2]))
    diff = max((p - q).abs().max().item() for p, q in zip(eager[2], graphed[2]))
    assert moved > 0 and diff < 0.1 * moved, (diff, moved)
