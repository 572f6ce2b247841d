"""The log a user reads: `python workloads/pretrain.py` prints one line per logged step, once, and none of the noise
issue 17 listed (Ray Train's per-rank report echo, Ray Data's "Total Progress: 0/?" banner, the token-auth notice)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pretrain_log_has_one_line_per_step_and_no_echo(tmp_path):
    out = subprocess.run(
        [sys.executable, "workloads/pretrain.py", "--preset", "debug", f"run.storage={tmp_path}", "run.name=log",
         "schedule.total_steps=4", "checkpoint.every=2", "tracking.log_every=1", "data.num_rows=16", "data.seq_len=64",
         "schedule.global_batch=2", "schedule.per_worker_batch=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    steps = [line for line in log.splitlines() if "[condensation.train] step " in line]
    assert len(steps) == 4, steps  # printed once each (Ray Train's patched print had logged every line twice)
    for noise in ("Reporting training result", "Total Progress", "Token authentication is enabled",
                  "Writing model shards"):
        assert noise not in log, noise
