"""workloads/benchmark.py's CPU smoke mode: every case runs a real training step and the report holds what the GPU
run's does (timings, FLOPs, ratios against Llama-sdpa of the same run, pictures)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "workloads" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # its dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_json_ratios_and_pictures(benchmark, tmp_path):
    out = tmp_path / "bench.json"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = benchmark.main(["--smoke", "--out", str(out), "--steps", "1", "--warmup", "1", "--mlflow-uri", uri])
    saved = json.loads(out.read_text())
    assert set(saved["cases"]) == {c.name for c in benchmark.default_cases(smoke=True)}
    for name, rows in saved["cases"].items():
        for L, r in rows.items():
            assert r["status"] == "ok", (name, L, r)
            assert r["step_s"] > 0 and r["flops"] > 0 and r["loss"] == r["loss"]  # not NaN
            if name != "llama-sdpa":
                assert r["baseline"] == "llama-sdpa" and r["speed_vs_llama_sdpa"] > 0
    assert results["cases"] == saved["cases"]
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pictures == ["bench_speed.png"]  # no memory picture without CUDA
    assert (tmp_path / "bench_speed.png").stat().st_size > 1000

    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("benchmark").experiment_id])
    assert run.data.params["torch"] == saved["machine"]["torch"]
    history = client.get_metric_history(run.info.run_id, "cond-sdpa-l32/tokens_per_s")
    assert sorted(m.step for m in history) == [64, 128, 256]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bench.json", "bench_speed.png"} <= artifacts


def test_ratios_pick_the_plain_llama_of_the_same_size_and_batch(benchmark):
    cfg = lambda **kw: {"kind": "condensation", "attention": "sdpa", "graph": False, "size": "table1", "batch": 1, **kw}
    results = {
        "case_configs": {"llama-sdpa": cfg(kind="llama"), "llama-sdpa-graph": cfg(kind="llama", graph=True),
                         "llama-1b": cfg(kind="llama", size="llama-3.2-1b"), "cond": cfg(),
                         "cond-1b": cfg(size="llama-3.2-1b")},
        "cases": {name: {"4096": {"status": "ok", "tokens_per_s": tps, "peak_gib": mem}}
                  for name, tps, mem in [("llama-sdpa", 100.0, 8.0), ("llama-sdpa-graph", 120.0, 8.0),
                                         ("llama-1b", 10.0, 40.0), ("cond", 150.0, 2.0), ("cond-1b", 5.0, 10.0)]},
    }
    benchmark.ratios_against_llama(results)
    assert results["cases"]["cond"]["4096"]["speed_vs_llama_sdpa"] == 1.5
    assert results["cases"]["cond"]["4096"]["llama_sdpa_memory_ratio"] == 4.0
    assert results["cases"]["cond-1b"]["4096"]["baseline"] == "llama-1b"
    assert results["cases"]["llama-sdpa-graph"]["4096"]["baseline"] == "llama-sdpa"



def test_unknown_case_fails_before_any_measurement(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--smoke", "--cases", "cond-sdpa-l32,cond-typo"])
    assert "unknown ['cond-typo']" in capsys.readouterr().err
