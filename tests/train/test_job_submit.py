"""`ray job submit --working-dir . -- python workloads/pretrain.py` against a local `ray start --head` (auth off,
Ray 2.60 turns token auth on by default; a head on this machine only): the debug preset trains to its last step and exports a HF folder. A relative
run.storage lands under ~/condensation-runs, not in the job's unpacked copy of the working dir, so a resubmitted
job finds the run (issue 17)."""

import json
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
    port, dash, agent = _free_port(), _free_port(), _free_port()
    ray_bin = os.path.join(bindir, "ray")
    # --block keeps `ray start` in the foreground, in its own process group: the test stops exactly this cluster
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus=2", f"--port={port}",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                             # its own job agent port: another Ray on this machine may hold the default 52365, and
                             # then jobs are refused with "No available agent" for as long as it runs
                             f"--dashboard-agent-listen-port={agent}",
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
        home = tmp_path / "home"  # the job's ~ (set through its runtime env), so the test writes nothing in the real one
        home.mkdir()
        runtime_env = json.dumps({"env_vars": {"HOME": str(home)}})

        def submit():
            deadline = time.time() + 240
            while True:  # the head's job agent comes up a little after its HTTP server
                out = subprocess.run(
                    [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                     "--runtime-env-json", runtime_env, "--",
                     "python", "workloads/pretrain.py", "--preset", "debug", "run.storage=runs", "run.name=job",
                     "schedule.total_steps=3", "checkpoint.every=0", "data.num_rows=16", "data.seq_len=64",
                     "schedule.global_batch=2", "schedule.per_worker_batch=1"],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                )
                if "No available agent" not in out.stderr + out.stdout or time.time() > deadline:
                    return out
                time.sleep(2)

        out = submit()
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "succeeded" in out.stdout + out.stderr
        assert "done: step 3" in out.stdout
        storage = home / "condensation-runs" / "runs"
        assert f"run folder: {storage / 'job'}" in out.stdout
        assert f"mlflow ui --backend-store-uri sqlite:///{storage / 'mlflow.db'}" in out.stdout
        assert os.path.isdir(storage / "job" / "checkpoint_00000003" / "hf")
        assert os.path.isfile(storage / "mlflow.db")
        # submitted again: the same run folder, already finished, so it returns at once without training
        again = submit()
        assert again.returncode == 0 and "done: step 3" in again.stdout, again.stdout[-4000:] + again.stderr[-4000:]
        assert "[condensation.train] step 1/3" not in again.stdout
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # ...but, unlike `ray stop`, leaves /tmp/ray/ray_current_cluster naming it. Ray's state API reads that file
        # (Ray Train's placement-group cleaner asks it whether its controller lives), so every later run on this
        # machine printed a 40 s timeout's traceback from that thread
        from ray._common.utils import get_ray_address_file

        address_file = get_ray_address_file(None)
        if os.path.exists(address_file) and open(address_file).read().strip().endswith(f":{port}"):
            os.remove(address_file)
