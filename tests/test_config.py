"""condensation.config: defaults <- YAML <- overrides, strict keys, coercion, validation naming the field."""

import glob
import os
import subprocess
import sys

import pytest

from condensation.config import PRESETS, ConfigError, TrainConfig, load_config, merge, parse_overrides, preset, to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_merge_order_defaults_yaml_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 6e-5\n  min_lr: 2e-5\nschedule:\n  total_steps: 30\nmodel:\n  overrides:\n    checkpoint_cells: true\n")
    cfg = load_config(TrainConfig(), y, ["schedule.total_steps=40", "model.overrides.segment_schedule=sequential"])
    assert cfg.optim.lr == 6e-5 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 6e-5 as a string: coerced
    assert cfg.schedule.total_steps == 40  # override beats YAML
    assert cfg.model.overrides == {"checkpoint_cells": True, "segment_schedule": "sequential"}  # deep merge
    assert cfg.schedule.global_batch == TrainConfig().schedule.global_batch  # default kept
    assert merge(TrainConfig(), TrainConfig.from_dict(cfg.to_dict()).to_dict()) == cfg  # round trip


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "d=null", "e=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": None, "e": [1, 2]}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["nonsense"])


@pytest.mark.parametrize("overrides, field", [
    (["optim.lrr=1"], "optim.lrr"),
    (["modell.size=debug"], "modell"),
    (["model.overrides.not_a_field=1"], "model.overrides.not_a_field"),
    (["model.segment_length=0"], "model.segment_length"),
    (["model.segment_length=-4"], "model.segment_length"),
    (["model.size=llama-9000"], "model.size"),
    (["schedule.global_batch=6"], "schedule.global_batch"),
    (["schedule.num_workers=3", "schedule.global_batch=8"], "schedule.global_batch"),
    (["schedule.total_steps=abc"], "schedule.total_steps"),
    (["schedule.total_steps=0"], "schedule.total_steps"),
    (["schedule.precision=fp8"], "schedule.precision"),
    (["optim.min_lr=1"], "optim.min_lr"),
    (["optim.lr=-1"], "optim.lr"),
    (["data.seq_len=0"], "data.seq_len"),
    (["run.name=a/b"], "run.name"),
    (["debug.nan_at_step=999"], "debug.nan_at_step"),
    (["deepspeed.train_batch_size=3"], "deepspeed.train_batch_size"),
    (["tracking.enabled=maybe"], "tracking.enabled"),
    (["schedule.engine=jax"], "schedule.engine"),
    (["schedule.cuda_graph=true"], "schedule.cuda_graph"),  # DeepSpeed's step is not capturable
    (["schedule.engine=torch", "schedule.cuda_graph=true"], "schedule.cuda_graph"),  # no GPU
    (["schedule.engine=torch", "schedule.cuda_graph=true", "schedule.use_gpu=true"], "schedule.cuda_graph"),  # accum 2
    (["schedule.engine=torch", "schedule.cuda_graph=true", "schedule.use_gpu=true", "schedule.global_batch=4",
      "model.overrides.compile_cells=reduce-overhead"], "model.overrides.compile_cells"),
    (["schedule.master_weights=false"], "schedule.master_weights"),
    (["schedule.engine=torch", "deepspeed.zero_optimization.stage=3"], "deepspeed"),
    # stacked_params: a bool, and the torch engine only (its weight gradients bypass ZeRO's gradient hooks)
    (["schedule.engine=torch", "model.overrides.stacked_params=maybe"], "model.overrides.stacked_params"),
    (["schedule.engine=torch", "model.overrides.stacked_params=2"], "model.overrides.stacked_params"),
    (["model.overrides.stacked_params=true"], "model.overrides.stacked_params"),  # the default engine: deepspeed
    (["schedule.engine=deepspeed", "model.init_from=/some/llama", "model.overrides.stacked_params=true"],
     "model.overrides.stacked_params"),
    # the memory options (typed, or in overrides, also with init_from) and random lengths
    (["model.memory_sink_tokens=-1"], "model.memory_sink_tokens"),
    (["model.memory_sink_tokens=abc"], "model.memory_sink_tokens"),
    (["model.memory_sink_tokens=33"], "model.memory_sink_tokens"),  # more than the debug size's segment (32)
    (["model.segment_length=8", "model.memory_sink_tokens=9"], "model.memory_sink_tokens"),
    (["model.memory_norm=bogus"], "model.memory_norm"),
    (["model.memory_grad_segments=-2"], "model.memory_grad_segments"),
    (["model.memory_grad_segments=1.5"], "model.memory_grad_segments"),
    (["model.overrides.memory_grad_segments=0"], "model.overrides.memory_grad_segments"),
    (["model.init_from=/some/llama", "model.overrides.memory_sink_tokens=-3"], "model.overrides.memory_sink_tokens"),
    (["model.init_from=/some/llama", "model.overrides.memory_norm=layer"], "model.overrides.memory_norm"),
    (["model.init_from=/some/llama", "model.overrides.not_a_field=1"], "model.overrides.not_a_field"),
    (["model.memory_norm=separate", "model.overrides.memory_norm=shared"], "model.overrides.memory_norm"),
    (["data.random_lengths=maybe"], "data.random_lengths"),
    (["schedule.engine=torch", "schedule.cuda_graph=true", "schedule.use_gpu=true", "schedule.global_batch=4",
      "data.random_lengths=true"], "data.random_lengths"),  # a graph replays one shape
    # text replay: extra micro-batches per step
    (["schedule.replay_micro_batches=-1"], "schedule.replay_micro_batches"),
    (["schedule.replay_micro_batches=1.5"], "schedule.replay_micro_batches"),
    (["schedule.engine=torch", "schedule.cuda_graph=true", "schedule.use_gpu=true", "schedule.global_batch=4",
      "schedule.replay_micro_batches=1"], "schedule.replay_micro_batches"),  # a graph takes one micro-batch a step
    (["schedule.replay_weight=0"], "schedule.replay_weight"),
    (["schedule.replay_weight=-1"], "schedule.replay_weight"),
    (["schedule.replay_weight=nan"], "schedule.replay_weight"),
    (["schedule.replay_weight=inf"], "schedule.replay_weight"),
    (["schedule.replay_weight=often"], "schedule.replay_weight"),
])
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert err.value.key == field and str(err.value).startswith(field)


def test_stacked_params_validate_with_the_torch_engine():
    cfg = load_config(overrides=["schedule.engine=torch", "model.overrides.stacked_params=true"])
    assert cfg.model.overrides["stacked_params"] is True


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("schedule:\n  totl_steps: 3\n")
    with pytest.raises(ConfigError, match="schedule.totl_steps: unknown key"):
        load_config(yaml_path=y)


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(TrainConfig(), path)
    assert cfg.schedule.global_batch % (cfg.schedule.per_worker_batch * cfg.schedule.num_workers) == 0
    assert to_yaml(cfg)


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"pretrain_cpu.yaml", "pretrain_paper.yaml", "pretrain_debug.yaml"} <= names


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate(name):
    preset(name).validate()


def test_paper_preset_matches_the_paper():
    from condensation.train import deepspeed_config

    cfg = preset("paper")
    assert (cfg.model.segment_length, cfg.data.seq_len) == (512, 4096)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.schedule.global_batch) == (6e-5, 2e-5, 64)
    assert cfg.schedule.use_gpu and cfg.schedule.bf16()
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["train_batch_size"] == 64
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 8 * ds["gradient_accumulation_steps"]
    assert load_config(TrainConfig(), os.path.join(ROOT, "configs", "pretrain_paper.yaml")) == cfg
    assert load_config(TrainConfig(), os.path.join(ROOT, "configs", "pretrain_cpu.yaml")) == preset("default")


def test_deepspeed_dict_merges_user_keys():
    from condensation.train import deepspeed_config

    cfg = load_config(overrides=["deepspeed.zero_optimization.reduce_bucket_size=1000", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False


def test_replay_micro_batches_count_in_deepspeeds_accumulation():
    from condensation.train import deepspeed_config

    cfg = load_config(overrides=["schedule.global_batch=8", "schedule.per_worker_batch=2", "schedule.num_workers=2",
                                 "schedule.replay_micro_batches=3"])
    assert cfg.schedule.grad_accum == 2 and cfg.schedule.micro_batches == 5
    ds = deepspeed_config(cfg)
    # DeepSpeed scales every backward by 1 / gradient_accumulation_steps and checks the batch product
    assert ds["gradient_accumulation_steps"] == 5 and ds["train_batch_size"] == 2 * 2 * 5
    assert deepspeed_config(load_config())["train_batch_size"] == TrainConfig().schedule.global_batch


def test_replay_weight_scales_each_micro_batch_loss():
    from condensation.train import deepspeed_config

    cfg = load_config(overrides=["schedule.global_batch=8", "schedule.per_worker_batch=2", "schedule.num_workers=2",
                                 "schedule.replay_micro_batches=3", "schedule.replay_weight=0.25"])
    s = cfg.schedule
    assert s.replay_weight == 0.25 and TrainConfig().schedule.replay_weight == 1.0
    # (2 train + 0.25 x 3 replay gradients) / 2.75: the loss scales sum to 1 over the step's micro-batches
    assert s.micro_batch_scale(False) == 1 / 2.75 and s.micro_batch_scale(True) == 0.25 / 2.75
    assert 2 * s.micro_batch_scale(False) + 3 * s.micro_batch_scale(True) == pytest.approx(1.0)
    # DeepSpeed still counts every micro-batch to find the step's boundary (the engine scales the losses itself)
    assert deepspeed_config(cfg)["gradient_accumulation_steps"] == 5
    plain = load_config(overrides=["schedule.replay_micro_batches=3"]).schedule
    assert plain.micro_batch_scale(False) == plain.micro_batch_scale(True) == 1 / plain.micro_batches
    assert load_config(overrides=["schedule.replay_weight=2"]).schedule.replay_weight == 2.0  # > 1 is allowed


def test_replay_dataset_and_replay_micro_batches_go_together(monkeypatch, tmp_path):
    import ray

    from condensation.train import fit

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was started")))
    base = merge(TrainConfig(), {"run": {"storage": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"^schedule\.replay_micro_batches: 1 replay micro-batches per step need"):
        fit(load_config(base, overrides=["schedule.replay_micro_batches=1"]))
    with pytest.raises(ConfigError, match=r"^schedule\.replay_micro_batches: a 'replay' dataset was given"):
        fit(base, {"train": object(), "replay": object()})
    assert not os.listdir(tmp_path)


def test_bad_config_fails_before_ray_starts(monkeypatch, tmp_path):
    import ray
    import ray.train.torch

    from condensation.train import fit

    def boom(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", boom)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", boom)
    was = ray.is_initialized()
    for ov, field in ((["model.segment_length=0"], "model.segment_length"), (["model.size=nope"], "model.size"),
                      (["schedule.global_batch=5"], "schedule.global_batch")):
        cfg = merge(TrainConfig(), {"run": {"storage": str(tmp_path)}})
        cfg = load_config(cfg, overrides=ov, validate_result=False)
        with pytest.raises(ConfigError, match=field):
            fit(cfg)
    assert ray.is_initialized() == was
    assert not os.listdir(tmp_path)  # not even the run folder was made


def test_workload_cli_rejects_bad_config_before_ray():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "workloads", "pretrain.py"), "schedule.global_batch=7"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "schedule.global_batch" in out.stderr and "not divisible" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout


# ----------------------------------------------------------------------------------------------------------------
# issue 17: a new user's errors are one line naming the field, before Ray starts


def test_config_file_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config: .*nope.yaml: no such file$"):
        load_config(yaml_path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"^--config: .*bad.yaml: not valid YAML at line \d+") as err:
        load_config(yaml_path=bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, field, text", [
    (["data.source=local", "data.dataset_options.path=/nonexistent.jsonl"], "data.dataset_options.path",
     "takes no dataset_options"),
    (["data.source=synthetic", "data.dataset_options.split=train"], "data.dataset_options.split", "takes no"),
    (["data.source=/x.jsonl", "data.dataset_options.textfield=body"], "data.dataset_options.textfield",
     "not an option"),
    (["data.source=/x.jsonl", "data.dataset_options.mode=glue"], "data.dataset_options.mode", "'cut' or 'pack'"),
    (["schedule.cpus_per_worker=0"], "schedule.cpus_per_worker", "positive"),
])
def test_dataset_options_a_source_does_not_take_are_errors(overrides, field, text):
    with pytest.raises(ConfigError, match=text) as err:
        load_config(overrides=overrides)
    assert err.value.key == field


def test_dataset_options_list_matches_the_data_layer():
    import inspect

    from condensation.config import DATA_LAYER_OPTIONS
    from condensation.data import pretraining_dataset

    params = list(inspect.signature(pretraining_dataset).parameters)
    assert params[:3] == ["source", "tokenizer", "seq_len"] and set(params[3:]) == set(DATA_LAYER_OPTIONS)
    cfg = load_config(overrides=["data.source=/x.jsonl", "data.dataset_options.text_field=body"])
    assert cfg.data.dataset_options == {"text_field": "body"}


def test_cpus_per_worker_defaults_to_derived():
    assert TrainConfig().schedule.cpus_per_worker is None
    assert load_config(overrides=["schedule.cpus_per_worker=0.75"]).schedule.cpus_per_worker == 0.75


def test_storage_under_a_ray_job_goes_to_a_stable_folder(tmp_path):
    from condensation.config import job_storage_base, rebase_storage, resolve

    home = str(tmp_path / "home")
    job_cwd = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_abc"
    assert job_storage_base(job_cwd, {}, home) == os.path.join(home, "condensation-runs")
    assert job_storage_base("/work/repo", {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, home) == os.path.join(home, "condensation-runs")
    assert job_storage_base("/work/repo", {"RAY_ADDRESS": "auto"}, home) is None  # plain driver: the cwd as before
    base = job_storage_base(job_cwd, {}, home)
    cfg = resolve(rebase_storage(TrainConfig(), base))
    assert cfg.run.storage == os.path.join(home, "condensation-runs", "runs")
    absolute = merge(TrainConfig(), {"run": {"storage": str(tmp_path / "mine")}})
    assert rebase_storage(absolute, base).run.storage == str(tmp_path / "mine")
    assert rebase_storage(TrainConfig(), None).run.storage == "runs"


def test_memory_options_reach_the_model_and_the_resolved_config():
    from condensation.train.model import build_model

    cfg = load_config(overrides=["model.memory_sink_tokens=4", "model.memory_norm=separate",
                                 "model.memory_grad_segments=2", "data.random_lengths=true"])
    assert cfg.model.model_kwargs() == {"memory_sink_tokens": 4, "memory_norm": "separate", "memory_grad_segments": 2}
    assert cfg.data.random_lengths is True
    text = to_yaml(cfg)  # what a run records (resolved_config.yaml, MLflow params)
    for line in ("memory_sink_tokens: 4", "memory_norm: separate", "memory_grad_segments: 2", "random_lengths: true"):
        assert line in text
    mc = build_model(cfg.model).config
    assert (mc.memory_sink_tokens, mc.memory_norm, mc.memory_grad_segments) == (4, "separate", 2)
    # unset: the size's (or checkpoint's) values, i.e. the paper's model; 0 asks for full backpropagation
    assert load_config().model.model_kwargs() == {}
    assert load_config(overrides=["model.memory_grad_segments=0"]).model.model_kwargs() == {"memory_grad_segments": None}
