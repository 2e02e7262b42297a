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
