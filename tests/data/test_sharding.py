"""Sharding for Ray Train workers: two workers get disjoint rows and the same number of full batches, both
with an explicit trim (`shard_for_workers(batch_size=...)`) and with Ray Train's own split (equal=True +
drop_last) on a row count that does not divide evenly."""

from __future__ import annotations

import threading

import pytest

from condensation.data import passkey_dataset, shard_for_workers, torch_batches

COLUMNS = ("input_ids", "labels", "index")


def consume(iterators, batch_size):
    """Drain each worker's iterator in its own thread, as Ray Train workers would (concurrently)."""
    results: list[list] = [[] for _ in iterators]
    errors: list[BaseException] = []

    def run(i):
        try:
            for batch in torch_batches(iterators[i], batch_size, columns=COLUMNS):
                results[i].append(batch)
        except BaseException as error:  # a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker's iterator hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("trim", [True, False])
def test_two_workers_disjoint_equal_batches(ray_session, tokenizer, trim):
    n, batch = 37, 4
    ds = passkey_dataset(tokenizer, 96, n=n, seed=3).materialize()
    shards = shard_for_workers(ds, 2, batch_size=batch if trim else None)
    results = consume(shards, batch)
    counts = [len(r) for r in results]
    assert counts[0] == counts[1] == (n // 2) // batch == 4
    seen = [{int(i) for b in r for i in b["index"]} for r in results]
    assert not seen[0] & seen[1]
    assert all(len(s) == counts[0] * batch for s in seen)
    for r in results:
        for b in r:
            assert tuple(b["input_ids"].shape) == (batch, 96) and tuple(b["labels"].shape) == (batch, 96)


def test_too_small_for_one_batch_per_worker(ray_session, tokenizer):
    ds = passkey_dataset(tokenizer, 96, n=5, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        shard_for_workers(ds, 2, batch_size=4)
