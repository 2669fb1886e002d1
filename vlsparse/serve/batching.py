"""Dynamic batching, independent of HTTP: :class:`Batcher` groups concurrent requests into batches.

    batcher = Batcher(run_batch, max_batch=32, max_wait_s=0.005, max_queue=256)
    await batcher.start()                  # inside the running event loop
    answer = await batcher.submit(item)    # from any number of concurrent tasks
    await batcher.close()                  # stop accepting, finish what was queued

``run_batch(items) -> results`` (one result per item, in order) runs in a worker thread, so the event
loop keeps serving while a batch computes. A batch starts when ``max_batch`` items wait, or when the
oldest waiting item has waited ``max_wait_s`` seconds, or at once while draining (:meth:`drain_soon`,
:meth:`close`). At most ``workers`` batches run at a time; items that arrive meanwhile wait for the next
batch. Each item gets exactly its own result: results are matched to items by position. When
``run_batch`` raises on a batch of several items, each item is run again alone, so one bad item fails
only its own request; the exception then becomes that item's result (raised by its ``submit``).
An item whose future was cancelled before its batch started (a request that timed out) is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Optional, Sequence, TypeVar

__all__ = ["Batcher", "QueueFull", "BatcherClosed"]

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """``max_queue`` items already wait; ``retry_after_s`` (seconds) is a hint for the client."""

    def __init__(self, depth: int, retry_after_s: int = 1):
        super().__init__(f"{depth} requests are waiting (the queue limit); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BatcherClosed(RuntimeError):
    """The batcher is not running (not started yet, or closed)."""


class _Failed:
    """run_batch raised on this item alone: its exception."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Batcher(Generic[T, R]):
    """Group items submitted concurrently into batches for ``run_batch``.

    Args:
        run_batch: items -> results (same length and order); called in a worker thread.
        max_batch: most items per batch (>= 1).
        max_wait_s: seconds the oldest waiting item waits for a fuller batch (>= 0).
        max_queue: most items waiting for a batch; :meth:`submit` raises QueueFull beyond it (>= 1).
        workers: batches run at once, each in its own thread (>= 1).
        on_batch: called in the event loop with the size of every batch that starts (metrics).

    Attributes: ``depth`` (items waiting for a batch), ``in_flight`` (items in running batches),
    ``batches`` (batches started so far).

    Raises:
        ValueError: a limit out of range.
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], *, max_batch: int, max_wait_s: float,
                 max_queue: int, workers: int = 1, on_batch: Optional[Callable[[int], None]] = None):
        if max_batch < 1 or max_queue < 1 or workers < 1 or not max_wait_s >= 0:
            raise ValueError(f"Batcher needs max_batch, max_queue, workers >= 1 and max_wait_s >= 0; got {max_batch}, "
                             f"{max_queue}, {workers}, {max_wait_s}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, int(max_batch), float(max_wait_s)
        self.max_queue, self.workers, self.on_batch = int(max_queue), int(workers), on_batch
        self.in_flight = self.batches = 0
        self._queue: deque[tuple[T, asyncio.Future, float]] = deque()  # (item, its future, arrival time)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = self._draining = False
        self._running: set[asyncio.Task] = set()

    @property
    def draining(self) -> bool:
        """Whether the batcher runs waiting items at once (after :meth:`drain_soon` or :meth:`close`)."""
        return self._draining or self._closed

    @property
    def depth(self) -> int:
        """Items waiting for a batch (cancelled ones not counted). Read it in the event loop's thread."""
        self._prune()
        return len(self._queue)

    async def start(self) -> None:
        """Start collecting batches in the running event loop (once).

        Raises:
            BatcherClosed: the batcher was started before (and may be closed).
        """
        if self._loop is not None:
            raise BatcherClosed("a Batcher is started once")
        self._loop = asyncio.get_running_loop()
        self._wakeup, self._slots = asyncio.Event(), asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="vlsparse-batch")
        self._collector = self._loop.create_task(self._collect())
        self._collector.add_done_callback(self._collector_done)

    def submit(self, item: T) -> "asyncio.Future[R]":
        """Queue ``item``; the returned future gets its result (or the exception run_batch raised on it alone).
        Cancelling the future before its batch starts drops the item. Call from the event loop's thread.

        Raises:
            BatcherClosed: not started, or closed.
            QueueFull: ``max_queue`` items already wait.
        """
        if self._loop is None or self._closed:
            raise BatcherClosed("the server is not accepting requests (starting or shutting down)")
        depth = self.depth
        if depth >= self.max_queue:
            raise QueueFull(depth)
        future = self._loop.create_future()
        self._queue.append((item, future, self._loop.time()))
        self._wakeup.set()
        return future

    def drain_soon(self) -> None:
        """From now on run whatever waits at once, without waiting for fuller batches. Safe to call from any
        thread and from a signal handler (used on SIGTERM); new items are still accepted until :meth:`close`."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._set_draining)

    async def close(self) -> None:
        """Stop accepting items, run every item still waiting, wait for running batches, stop the threads."""
        if self._loop is None or self._closed:
            self._closed = True
            return
        self._closed = True
        self._wakeup.set()
        await self._collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)

    # -- the event loop side ------------------------------------------------------------------------------

    def _set_draining(self) -> None:
        self._draining = True
        self._wakeup.set()

    def _prune(self) -> None:
        if any(entry[1].done() for entry in self._queue):
            self._queue = deque(entry for entry in self._queue if not entry[1].done())

    async def _wait(self, timeout: Optional[float]) -> bool:
        """Wait for a submission or a drain/close request, at most ``timeout`` seconds; False on timeout."""
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _next_batch(self) -> Optional[list[tuple[T, asyncio.Future]]]:
        """The next batch (waiting for it): (item, future) pairs; None when closed with nothing left."""
        while not self.depth:
            if self._closed:
                return None
            await self._wait(None)
        while 0 < self.depth < self.max_batch and not (self._draining or self._closed):
            remaining = self._queue[0][2] + self.max_wait_s - self._loop.time()  # the oldest item's deadline
            if remaining <= 0 or not await self._wait(remaining):
                break
        self._prune()
        n = min(self.max_batch, len(self._queue))
        return [self._queue.popleft()[:2] for _ in range(n)]

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._next_batch()
            if batch is None:
                self._slots.release()
                return
            if not batch:  # every waiting item was cancelled meanwhile
                self._slots.release()
                continue
            self.batches += 1
            self.in_flight += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            task = self._loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            results = await self._loop.run_in_executor(self._executor, self._call, [item for item, _ in batch])
        except Exception as exc:  # the executor itself failed (e.g. shut down): every item gets the error
            results = [_Failed(exc)] * len(batch)
        finally:
            self.in_flight -= len(batch)
            self._slots.release()
        for (_, future), result in zip(batch, results):
            if future.done():  # cancelled meanwhile (the request timed out)
                continue
            if isinstance(result, _Failed):
                future.set_exception(result.exc)
            else:
                future.set_result(result)

    def _collector_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the batch collector stopped", exc_info=task.exception())

    # -- the worker thread side ---------------------------------------------------------------------------

    def _call(self, items: list[T]) -> list:
        """run_batch on all items; if that raises, on each item alone (its exception becomes its result)."""
        try:
            results = list(self.run_batch(items))
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            return results
        except Exception as exc:
            if len(items) == 1:
                return [_Failed(exc)]
        return [self._call([item])[0] for item in items]
