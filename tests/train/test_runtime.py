"""init_ray's private local Ray answers Ray's state API itself, whatever /tmp/ray/ray_current_cluster names: a killed
`ray start --head --block` leaves that file naming its dead GCS, and Ray Train's placement-group cleaner (a detached
actor asking the state API whether its controller lives) then waited 40 s per training stage and died with an RpcError
traceback. The joining path (`ray job submit`, an explicit address) is left as the cluster has it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from condensation.train import runtime


@pytest.mark.slow
def test_private_ray_state_api_ignores_a_stale_cluster_pointer(monkeypatch):
    import ray
    from ray.util.state import get_actor  # what Train's cleaner calls (ray.train.v2._internal.state.util.is_actor_alive)

    assert not ray.is_initialized()
    # Ray's default temp dir (where the state API reads ray_current_cluster, and this Ray's session goes) redirected to
    # a short folder of the test's own (a socket path under pytest's tmp_path would be too long), never the real /tmp/ray
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    for name in ("RAY_ADDRESS", runtime.API_SERVER_ENV):  # neither may hide the file from the state API
        monkeypatch.delenv(name, raising=False)
    os.makedirs(os.path.join(tmp, "ray"))
    with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:1")  # a cluster that is gone
    try:
        runtime.init_ray(None, joining=False, use_gpu=False)

        @ray.remote(num_cpus=0)
        class Probe:
            def ask(self, actor_id):  # as the cleaner does, from a worker
                start = time.time()
                return get_actor(actor_id, timeout=5).state, time.time() - start

        probe = Probe.remote()
        actor_id = probe._actor_id.hex()
        # a state API reading the stale file waits 40 s for the dead GCS (then an RpcError): fails here at 20 s
        state, seconds = ray.get(probe.ask.remote(actor_id), timeout=20)
        assert (state, seconds < 10) == ("ALIVE", True), seconds
        start = time.time()  # and from the driver
        assert get_actor(actor_id, timeout=5).state == "ALIVE"
        assert time.time() - start < 10
    finally:
        runtime.shutdown_ray()
        shutil.rmtree(tmp, ignore_errors=True)
    assert runtime.API_SERVER_ENV not in os.environ  # nothing left naming the stopped Ray's dashboard


def test_joining_a_cluster_sets_nothing(monkeypatch):
    """Under `ray job submit` or with an explicit address, ray.init gets the address alone: the job's runtime env and
    state API address are the cluster's, and the driver's env is left as it is."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv(runtime.API_SERVER_ENV, raising=False)
    runtime.init_ray(None, joining=True, use_gpu=False)
    runtime.init_ray("ray://head:10001", joining=False, use_gpu=False)
    assert calls == [{"address": "auto"}, {"address": "ray://head:10001"}]
    assert runtime.API_SERVER_ENV not in os.environ
