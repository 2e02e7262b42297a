"""Micro-batcher: packs jobs from many concurrent requests into forward batches under a token budget.

Requests ``submit`` jobs and await their futures. One worker task waits a short collection window after the
first job arrives, takes from the queue, sorts what it took by length (less padding), cuts it into batches
whose padded size ``rows * longest`` fits the budget, and runs each batch in a single worker thread so the
event loop is never blocked by the model.

Fairness (no head-of-line blocking): when several requests are queued, the worker takes their jobs
round-robin, one job per request in turn, up to ONE budget, and comes back to the queue after running it.
With a single request queued it takes up to four budgets, so sorting by length has choice (less padding);
when another request arrives meanwhile, the taken jobs not yet run go back to the head of the queue after the
current batch. A small request that arrives behind a request of a million tokens therefore waits for at most
the batch being run plus one more (two batches of ``max_batch_tokens``), not for the whole large request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: Any
    length: int
    future: asyncio.Future
    request: int  # which submit() call it came from (round-robin across requests)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group indices into batches with ``len(batch) * max(lengths in batch) <= max_batch_tokens``.

    Indices are visited longest first, so each batch holds sequences of similar length. A single sequence
    longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class MicroBatcher:
    """Collects jobs and runs ``run_batch(jobs) -> results`` (blocking) on one worker thread."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        max_batch_tokens: int,
        window_s: float = 0.002,
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch_tokens = max_batch_tokens
        self._window_s = window_s
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-forward")
        self._task: asyncio.Task | None = None
        self.queued_tokens = 0
        self._requests = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="micro-batcher")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RuntimeError("server shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def queued_jobs(self) -> int:
        return len(self._queue)

    async def submit(self, jobs: Sequence[Any], lengths: Sequence[int]) -> list[Any]:
        """Queue jobs (with their token lengths) and wait for all their results, in order."""
        loop = asyncio.get_running_loop()
        self._requests += 1
        pending = [
            _Pending(job, n, loop.create_future(), self._requests)
            for job, n in zip(jobs, lengths, strict=True)
        ]
        self._queue.extend(pending)
        self.queued_tokens += sum(lengths)
        self._wakeup.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if self._window_s > 0 and self.queued_tokens < self._max_batch_tokens:
                await asyncio.sleep(self._window_s)
            self._wakeup.clear()
            taken = self._take()
            batches = plan_batches([p.length for p in taken], self._max_batch_tokens)
            for k, batch in enumerate(batches):
                await self._run(loop, [taken[i] for i in batch])
                if self._queue and k + 1 < len(batches):  # a request arrived: share the next batch with it
                    self._requeue([taken[i] for i in sorted(i for b in batches[k + 1 :] for i in b)])
                    break
            if self._queue:
                self._wakeup.set()

    def _take(self) -> list[_Pending]:
        """The next jobs to run: round-robin across the queued requests (in arrival order), one job per
        request in turn, until the next would pass the window (one budget when several requests wait, four
        when one does); the rest stay queued in their order."""
        by_request: dict[int, deque[_Pending]] = {}
        for item in self._queue:
            by_request.setdefault(item.request, deque()).append(item)
        window = (4 if len(by_request) == 1 else 1) * self._max_batch_tokens
        taken: list[_Pending] = []
        tokens = 0
        while by_request:
            for request in list(by_request):
                item = by_request[request][0]
                if taken and tokens + item.length > window:
                    by_request.clear()
                    break
                by_request[request].popleft()
                if not by_request[request]:
                    del by_request[request]
                taken.append(item)
                tokens += item.length
        chosen = {id(p) for p in taken}
        self._queue = deque(p for p in self._queue if id(p) not in chosen)
        self.queued_tokens -= tokens
        return [p for p in taken if not p.future.done()]  # a cancelled request's jobs are skipped

    def _requeue(self, items: list[_Pending]) -> None:
        """Put taken-but-not-run jobs back at the head of the queue, in their order."""
        self._queue.extendleft(reversed(items))
        self.queued_tokens += sum(p.length for p in items)

    async def _run(self, loop: asyncio.AbstractEventLoop, items: list[_Pending]) -> None:
        if not items:
            return
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [p.job for p in items])
        except Exception as exc:  # a failed batch fails its own jobs, never the worker
            log.exception("forward batch of %d sequences failed", len(items))
            for p in items:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if self._on_batch:
            self._on_batch(len(items), sum(p.length for p in items), time.perf_counter() - start)
        for p, res in zip(items, results, strict=True):
            if not p.future.done():
                p.future.set_result(res)
