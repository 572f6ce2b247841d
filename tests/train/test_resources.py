"""Workers and data tasks always fit the cluster; a config that cannot be scheduled fails at once, saying why
(issue 17: two workers at 0.9 CPU on 2 cores left no room for a 0.25-CPU read task and waited forever)."""

from __future__ import annotations

import json
import time

import pytest

from condensation.config import ConfigError, load_config
from condensation.train.resources import data_task_cpus, derive_cpus_per_worker, plan_resources

from .conftest import debug_cfg


def test_derived_share_leaves_room_for_data_tasks():
    cfg = load_config(overrides=["schedule.num_workers=2"])
    assert plan_resources(cfg, {"CPU": 2.0}, 0.25) == {"CPU": 0.75}
    assert plan_resources(cfg, {"CPU": 2.0}, 1.0) == {"CPU": 0.5}  # a data task of Ray's default one CPU
    assert derive_cpus_per_worker(16, 1, 0.25) == 15.0  # whole CPUs once a worker gets one
    gpu = load_config(overrides=["schedule.num_workers=8", "schedule.use_gpu=true", "schedule.global_batch=16"])
    assert plan_resources(gpu, {"CPU": 144.0, "GPU": 8.0}, 0.25, [(16, 0), (128, 8)]) == {"CPU": 15.0, "GPU": 1}
    # an autoscaling cluster before its GPU nodes exist (cluster/h100.yaml): not refused, one CPU per worker
    assert plan_resources(gpu, {"CPU": 16.0}, 0.25, [(16, 0)]) == {"CPU": 1.0, "GPU": 1}
    for cpus in (2, 3, 4, 8):
        for workers in (1, 2):
            per = derive_cpus_per_worker(cpus, workers, 0.25)
            assert 0 < per and workers * per + 0.25 <= cpus


def test_explicit_share_that_starves_the_data_tasks_is_an_error():
    cfg = load_config(overrides=["schedule.cpus_per_worker=0.9"])
    with pytest.raises(ConfigError, match="wait forever") as err:
        plan_resources(cfg, {"CPU": 2.0}, 0.25)
    assert err.value.key == "schedule.cpus_per_worker" and "at most 0.87" in str(err.value)
    assert plan_resources(cfg, {"CPU": 2.0}, 0.0) == {"CPU": 0.9}  # in-memory rows start no data task
    assert plan_resources(load_config(overrides=["schedule.cpus_per_worker=0.75"]), {"CPU": 2.0}, 0.25) == {"CPU": 0.75}
    with pytest.raises(ConfigError) as err:
        plan_resources(load_config(overrides=["schedule.num_workers=4"]), {"CPU": 0.5}, 0.25)
    assert err.value.key == "schedule.num_workers"


@pytest.fixture
def jsonl(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:40]))
    return str(path)


def test_data_task_cpus_read_from_the_plans(ray_session, jsonl):
    from condensation.data import pretraining_dataset
    from condensation.tokenizer import load_tokenizer
    from condensation.train import rows_dataset, synthetic_rows

    ds, _ = pretraining_dataset(jsonl, load_tokenizer(), 64)
    assert data_task_cpus({"train": ds}) == 0.25
    assert data_task_cpus({"train": ds.limit(10)}) == 0.25
    assert data_task_cpus({"train": ds.map_batches(lambda b: b)}) == 1.0  # Ray's default for an unset num_cpus
    items = rows_dataset(synthetic_rows(16, 4, 100))
    assert data_task_cpus({"train": items}) == 0.0
    assert data_task_cpus({"train": ds.limit(2).materialize()}) == 0.0


def test_unschedulable_fit_fails_within_a_minute(ray_session, tmp_path, jsonl):
    from condensation.train import fit

    # streamed (a materialized dataset starts no data tasks beside the workers)
    cfg = debug_cfg(tmp_path, "starved", f"data.source={jsonl}", "data.seq_len=64", "model.size=tiny-cpu",
                    "data.cache_rows=false", "schedule.cpus_per_worker=0.9")
    t0 = time.time()
    with pytest.raises(ConfigError, match="schedule.cpus_per_worker: 2 workers x 0.9 CPU"):
        fit(cfg)
    assert time.time() - t0 < 60
