"""Micro-batcher planning and packing (pure logic + a real asyncio run with a plain function)."""

from __future__ import annotations

import asyncio
import threading

from teacher_server.backends.batcher import MicroBatcher, plan_batches


def test_plan_batches_respects_budget_and_covers_all():
    lengths = [5, 100, 7, 60, 60, 3, 200, 1]
    batches = plan_batches(lengths, max_batch_tokens=200)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 200 or len(b) == 1


def test_plan_batches_oversized_sequence_alone():
    assert plan_batches([500, 10], max_batch_tokens=100) == [[0], [1]]


def test_concurrent_submits_are_packed_and_ordered():
    calls: list[int] = []
    threads: set[str] = set()

    def run_batch(jobs):
        calls.append(len(jobs))
        threads.add(threading.current_thread().name)
        return [j * 10 for j in jobs]

    async def main():
        b = MicroBatcher(run_batch, max_batch_tokens=1000, window_s=0.01)
        b.start()
        outs = await asyncio.gather(*(b.submit([i, i + 100], [3, 3]) for i in range(20)))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert outs == [[i * 10, (i + 100) * 10] for i in range(20)]
    assert max(calls) > 2  # requests were packed together, not run one by one
    assert threads == {t for t in threads if t.startswith("teacher-forward")}  # never on the event loop


def test_failed_batch_fails_only_its_jobs():
    def run_batch(jobs):
        if any(j < 0 for j in jobs):
            raise RuntimeError("boom")
        return jobs

    async def main():
        b = MicroBatcher(run_batch, max_batch_tokens=4, window_s=0)
        b.start()
        bad = asyncio.ensure_future(b.submit([-1], [4]))
        good = asyncio.ensure_future(b.submit([1], [4]))
        res = await asyncio.gather(bad, good, return_exceptions=True)
        await b.close()
        return res

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and good == [1]


def _served_order(max_batch_tokens, requests):
    """Run ``requests`` (each a list of (job, length)) through a batcher whose forward is held until all
    are queued; returns the batches' jobs in the order they ran."""
    batches: list[list] = []
    gate = threading.Event()

    def run_batch(jobs):
        gate.wait(10)
        batches.append(list(jobs))
        return jobs

    async def main():
        b = MicroBatcher(run_batch, max_batch_tokens=max_batch_tokens, window_s=0)
        b.start()
        futs = []
        for req in requests:
            futs.append(asyncio.ensure_future(b.submit([j for j, _ in req], [n for _, n in req])))
            await asyncio.sleep(0.01)  # arrival order: the worker has taken the first request already
        gate.set()
        outs = await asyncio.gather(*futs)
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert outs == [[j for j, _ in req] for req in requests]  # every job answered, in order
    return batches


def test_small_request_is_not_stuck_behind_a_large_one():
    """A large request of 40 budgets' worth, then a small one: the small one runs in the second or third
    batch (at most two batches of wait), not after all 40 budgets of the large one (first in, first out)."""
    big = [(f"big{i}", 10) for i in range(400)]  # 4000 tokens, budget 100 -> 40 batches
    batches = _served_order(100, [big, [("small", 10)]])
    where = next(i for i, b in enumerate(batches) if "small" in b)
    assert where <= 2, f"the small request ran in batch {where} of {len(batches)}"
    assert all(sum(10 for _ in b) <= 100 for b in batches)


def test_round_robin_shares_batches_between_large_requests():
    """Two large requests queued together: each batch holds jobs of both (neither waits for the other)."""
    a = [(f"a{i}", 10) for i in range(50)]
    b = [(f"b{i}", 10) for i in range(50)]
    batches = _served_order(100, [[("first", 10)], a, b])
    mixed = [
        bt for bt in batches if any(j.startswith("a") for j in bt) and any(j.startswith("b") for j in bt)
    ]
    assert len(mixed) >= len(batches) - 3
