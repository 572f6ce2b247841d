"""benchmarks/memory_breakdown.py's replay of the CUDA allocator history, on a synthetic trace (the script itself
needs a GPU)."""

SCRIPT = "memory_breakdown"  # conftest's `script` fixture


def _frames(path, line, name):
    return [{"filename": "/x/torch/autograd/function.py", "line": 1, "name": "apply"},
            {"filename": path, "line": line, "name": name}]


def test_peak_is_found_and_attributed_to_our_frames(script):
    mb = script
    model = _frames("/r/platform/condensation/modeling.py", 10, "cell_forward")
    loss = _frames("/r/platform/condensation/modeling.py", 20, "forward")
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": model},
        {"action": "alloc", "addr": 2, "size": 300, "frames": loss},
        {"action": "free_completed", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 3, "size": 250, "frames": model},
        {"action": "alloc", "addr": 4, "size": 100, "frames": []},  # the peak: 100 + 250 + 100 > 100 + 300
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 99, "size": 7},  # allocated before the recording: ignored
    ]
    res = mb.peak_breakdown(trace)
    assert res["peak_event"] == 4
    assert res["peak_in_step_gib"] * 2**30 == 450
    sites = {row["site"]: row["bytes"] for row in res["live_at_peak"]}
    assert sites["modeling.py:10 cell_forward"] == 350
    assert sites["other (no frames)"] == 100
    assert not any("modeling.py:20" in s for s in sites)  # freed before the peak
