"""Peak CPU allocator bytes of a call, for the tests that show a working set is bounded (generation's prefill, the
fused loss and embedding gradient): the CPU profiler's allocation events, summed in time order."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def peak_live_bytes(fn) -> int:
    """Most bytes the CPU allocator held at once while fn ran, beyond what was allocated before it (so the inputs and
    weights are not counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak
