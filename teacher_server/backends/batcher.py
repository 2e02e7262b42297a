"""Micro-batcher: packs jobs from many concurrent requests into forward batches under a token budget.

Requests ``submit`` jobs and await their futures. One worker task waits a short collection window after the
first job arrives, takes what is queued, sorts it by length (less padding), cuts it into batches whose
padded size ``rows * longest`` fits the budget, and runs each batch in a single worker thread so the event
loop is never blocked by the model.
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
        pending = [_Pending(job, n, loop.create_future()) for job, n in zip(jobs, lengths, strict=True)]
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
            for batch in plan_batches([p.length for p in taken], self._max_batch_tokens):
                items = [taken[i] for i in batch]
                await self._run(loop, items)
            if self._queue:
                self._wakeup.set()

    def _take(self) -> list[_Pending]:
        """Everything queued, up to a few budgets' worth (so sorting by length has choice, bounded)."""
        taken, tokens = [], 0
        while self._queue and (not taken or tokens + self._queue[0].length <= 4 * self._max_batch_tokens):
            item = self._queue.popleft()
            taken.append(item)
            tokens += item.length
        self.queued_tokens -= tokens
        return [p for p in taken if not p.future.done()]  # a cancelled request's jobs are skipped

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
