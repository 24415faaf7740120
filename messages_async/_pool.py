"""The one bounded worker pool: ``iter_many``, the watch's polls and the export all run on it.

A pool runs jobs on at most ``workers`` tasks and hands what they emit to one consumer:

- **Jobs** come from a sequence given up front (a worker takes the next one when it is free),
  or are handed in one by one with :meth:`Pool.submit`, which waits while every worker is busy
  and ``workers`` jobs already wait: the producer (the watch's scheduler) is held back, not
  a queue grown.
- **Items** a job emits travel to the consumer through ``capacity`` slots; ``emit`` waits
  while they are full, so a slow consumer stops the jobs and memory stays bounded by about
  ``capacity + workers`` items.
- **Failures.** By default the first job that raises ends the pool: the other
  workers are cancelled at once, and the consumer's next ``anext`` raises that very exception
  (not an ``ExceptionGroup``, docs/protocol.md §7), before any item still queued and after
  every task of the pool has finished. Given ``failed_item``, a failure instead arrives as
  the item ``failed_item(job, error)`` in the job's place and the other jobs go on, except for
  an error that ``ends_pool`` picks out (a closed client): that ends the pool as without it.
- **Cancellation, one protocol.** :meth:`Pool.cancel` cancels every task of the pool at once,
  synchronously (a finalizer may call it); :meth:`Pool.aclose` cancels and waits. A consumer
  whose ``anext`` is cancelled (its task cancelled, ``asyncio.wait_for``) closes the pool as
  an async generator would be closed: whatever stops the consumer stops the workers, even
  while something still holds the consumer's frames (a traceback kept for logging).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Generic, Self, TypeVar

from ._pagination import retrieve_outcome

__all__ = ["Emit", "Pool"]

J = TypeVar("J")
T = TypeVar("T")

#: How a job hands an item to the consumer: ``await emit(item)`` (waits while the slots are full).
Emit = Callable[[T], Awaitable[None]]


class _Wake(enum.Enum):
    WAKE = "WAKE"  # a worker ended or the pool failed: the consumer looks again


class _NoMore(enum.Enum):
    NO_MORE = "NO_MORE"  # no more submitted jobs: the worker that takes it ends


_WAKE = _Wake.WAKE
_NO_MORE = _NoMore.NO_MORE


class Pool(Generic[J, T]):
    """Run ``run(job, emit)`` for every job on at most ``workers`` tasks; iterate the items.

    Args:
        run: The work of one job; ``await emit(item)`` hands an item to the consumer.
        workers: The most jobs running at once.
        capacity: Items held for the consumer before ``emit`` waits.
        jobs: Every job, up front; ``None``: jobs come through :meth:`submit`.
        failed_item: The item that takes a failed job's place; ``None``: the first failure
            ends the pool.
        ends_pool: With ``failed_item``, errors that still end the whole pool.
        name: The tasks' name prefix (workers are "<name> worker <n>").
    """

    def __init__(
        self,
        run: Callable[[J, Emit[T]], Awaitable[None]],
        *,
        workers: int,
        capacity: int,
        jobs: Sequence[J] | None = None,
        failed_item: Callable[[J, Exception], T] | None = None,
        ends_pool: Callable[[Exception], bool] = lambda exc: False,
        name: str,
    ) -> None:
        self._run = run
        self._name = name
        self._failed_item = failed_item
        self._ends_pool = ends_pool
        self._given = iter(jobs) if jobs is not None else None
        self._size = workers if jobs is None else min(workers, len(jobs))
        # Submitted jobs: bounded, so submit() waits while every worker is busy.
        self._jobs: asyncio.Queue[J | _NoMore] = asyncio.Queue(maxsize=max(1, workers))
        # Unbounded for signals; items are bounded by the slots instead, so a worker that ends
        # (or fails) can always wake the consumer without waiting for room.
        self._out: asyncio.Queue[T | _Wake] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max(1, capacity))
        self._tasks: list[asyncio.Task[None]] = []
        self._running = 0
        self._error: BaseException | None = None
        self._started = False
        self._closed = False
        self._raised = False

    # -- producing ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (the first ``anext`` does it too). Idempotent; a closed pool
        starts nothing."""
        if self._started or self._closed:
            return
        self._started = True
        for n in range(self._size):
            self._running += 1
            self._tasks.append(asyncio.create_task(self._worker(), name=f"{self._name} worker {n}"))

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run ``work()`` alongside the workers: it fails the pool if it raises, and it is
        cancelled with the pool. (A function, not a coroutine: a task cancelled before its
        first step would leave that coroutine never awaited.)"""

        async def guarded() -> None:
            try:
                await work()
            except Exception as exc:
                self.fail(exc)

        self._tasks.append(asyncio.create_task(guarded(), name=f"{self._name} {name}"))

    async def submit(self, job: J) -> None:
        """Queue a job; waits while every worker is busy and ``workers`` jobs already wait."""
        await self._jobs.put(job)

    async def no_more_jobs(self) -> None:
        """No job will be submitted any more: once the queued ones are done, the items end."""
        for _ in range(self._size):
            await self._jobs.put(_NO_MORE)

    async def _put(self, item: T) -> None:
        await self._slots.acquire()
        self._out.put_nowait(item)

    async def _next_job(self) -> J | _NoMore:
        if self._given is not None:
            return next(self._given, _NO_MORE)
        return await self._jobs.get()

    async def _worker(self) -> None:
        try:
            while (job := await self._next_job()) is not _NO_MORE:
                try:
                    await self._run(job, self._put)
                except Exception as exc:  # one job's failure; CancelledError is not caught
                    if self._failed_item is None or self._ends_pool(exc):
                        self.fail(exc)
                        return
                    await self._put(self._failed_item(job, exc))
        finally:
            self._running -= 1
            self._out.put_nowait(_WAKE)

    def fail(self, exc: BaseException) -> None:
        """End the pool with ``exc`` (the first failure wins): every task is cancelled now,
        and the consumer's next ``anext`` raises it."""
        if self._error is not None:
            return
        self._error = exc
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._out.put_nowait(_WAKE)

    @property
    def error(self) -> BaseException | None:
        """The failure that ended the pool, if any."""
        return self._error

    # -- consuming ----------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        self.start()
        while True:
            await self.check()
            if self._closed or (not self._running and self._out.empty()):
                await self.aclose()
                raise StopAsyncIteration
            try:
                item = await self._out.get()
            except BaseException:
                # The consumer was cancelled (or its wait interrupted): it is not coming back
                # for more, so nothing may go on polling or fetching on its behalf.
                await self.aclose()
                raise
            if item is _WAKE:
                continue
            self._slots.release()
            return item

    async def check(self) -> None:
        """Raise the pool's failure, if it has one, once every task of it has finished."""
        if self._error is not None and not self._raised:
            self._raised = True
            await self.aclose()
            raise self._error

    def cancel(self) -> None:
        """Cancel every task of the pool now (synchronous: also usable from a finalizer)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every task of the pool and wait for them. Idempotent."""
        self.cancel()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.add_done_callback(retrieve_outcome)
        if tasks:
            # Not gather: a CancelledError aimed at the caller must still reach it. If this
            # wait is itself cancelled, it goes on up; the callbacks collect the rest.
            await asyncio.wait(tasks)
