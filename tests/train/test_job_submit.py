"""`ray job submit --working-dir . -- python workloads/pretrain.py` against a local `ray start --head` (auth off,
as STACK.md says for Ray 2.60): the debug preset trains to its last step and exports a HF folder."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_pretrain(tmp_path):
    import ray

    assert not ray.is_initialized()
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": bindir + os.pathsep + os.environ["PATH"],
           "RAY_TMPDIR": "/tmp"}
    port, dash = _free_port(), _free_port()
    ray_bin = os.path.join(bindir, "ray")
    # --block keeps `ray start` in the foreground, in its own process group: the test stops exactly this cluster
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus=2", f"--port={port}",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:  # the job server answers a few seconds after the head starts
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "ray start --head did not come up"
                time.sleep(1)
        storage = tmp_path / "runs"
        deadline = time.time() + 120
        while True:  # the head's job agent comes up a little after its HTTP server
            out = subprocess.run(
            [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".", "--",
             "python", "workloads/pretrain.py", "--preset", "debug", f"run.storage={storage}", "run.name=job",
             "schedule.total_steps=3", "checkpoint.every=0", "data.num_rows=16", "data.seq_len=64",
             "schedule.global_batch=2", "schedule.per_worker_batch=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
            )
            if "No available agent" not in out.stderr + out.stdout or time.time() > deadline:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "succeeded" in out.stdout + out.stderr
        assert "done: step 3" in out.stdout
        assert os.path.isdir(storage / "job" / "checkpoint_00000003" / "hf")
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
