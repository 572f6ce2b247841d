"""benchmarks/train_throughput.py off the GPU: every run it would start has a valid config, and its ratios and table
come out of a results dict as the GPU run fills it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "train_throughput"  # conftest's `script` fixture


@pytest.fixture(scope="module")
def tt(script):
    return script


@pytest.mark.parametrize("variant", ["deepspeed", "torch", "torch-graph"])
def test_every_run_config_validates(tt, tmp_path, variant):
    for L, B, W in ((4096, 1, 1), (16384, 4, 2)):
        cfg = tt.train_config(str(ROOT / "configs" / "table1_h200.yaml"), "table1", L, B, W, 20, str(tmp_path),
                              variant, 700.0, False, [])
        s = cfg.schedule
        assert (s.engine, s.cuda_graph) == {"deepspeed": ("deepspeed", False), "torch": ("torch", False),
                                            "torch-graph": ("torch", True)}[variant]
        assert s.grad_accum == 1 and cfg.data.num_rows >= 20 * B * W and cfg.tracking.log_every == 10
        assert cfg.model.overrides["compile_cells"] and not cfg.tracking.enabled


def test_ratios_and_table(tt):
    results = {"engines": ["torch-graph", "deepspeed"], "rows": [{
        "length": 4096, "batch": 4,
        "bench": {"eager": {"status": "ok", "tokens_per_s": 160e3, "peak_gib": 6.5},
                  "graph": {"status": "ok", "tokens_per_s": 320e3, "peak_gib": 6.6}},
        "train": {"torch-graph": {"1": {"tokens_per_s": 304e3, "peak_memory_gib": 8.0},
                                  "2": {"tokens_per_s": 578e3, "peak_memory_gib": 8.1}},
                  "deepspeed": {"1": {"skipped": "time budget"}}}}]}
    tt.add_ratios(results)
    r = results["rows"][0]["train"]["torch-graph"]
    assert r["1"]["vs_best_bench"] == pytest.approx(0.95) and r["1"]["vs_same_kind_bench"] == pytest.approx(0.95)
    assert r["2"]["scaling_vs_n_x_1gpu"] == pytest.approx(578 / 608)
    lines = tt.summarize(results)
    assert "304K 8.0G 0.95 (0.95)" in lines[1] and "time budget" in lines[1]
    assert "torch-graph on 2 GPUs: 578K = 0.95" in lines[2]
