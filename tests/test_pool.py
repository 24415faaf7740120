"""The one worker pool (``_pool.py``) on its own: bounds, failures and cancellation.

The pool does no I/O of its own, so these tests give it plain coroutines as jobs; what it
does with real requests is covered where it is used (test_fanout.py, test_watch.py,
test_export.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from messages_async._pool import Emit, Pool


def pool_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("test pool") and not t.done()]


async def drain(pool: Pool[Any, Any]) -> None:
    async for _ in pool:
        pass


async def test_items_flow_and_the_pool_ends_when_every_job_is_done() -> None:
    async def run(job: int, emit: Emit[int]) -> None:
        for k in range(3):
            await emit(job * 10 + k)

    pool: Pool[int, int] = Pool(run, workers=3, capacity=2, jobs=[1, 2, 3, 4], name="test pool")
    got = [item async for item in pool]
    assert sorted(got) == [10, 11, 12, 20, 21, 22, 30, 31, 32, 40, 41, 42]
    # Within a job, order is kept: one worker runs a job from start to end.
    for job in (1, 2, 3, 4):
        mine = [x for x in got if x // 10 == job]
        assert mine == sorted(mine)
    assert pool_tasks() == []


async def test_at_most_workers_jobs_run_and_a_slow_consumer_stops_them() -> None:
    running = peak = emitted = 0

    async def run(job: int, emit: Emit[int]) -> None:
        nonlocal running, peak, emitted
        running += 1
        peak = max(peak, running)
        try:
            for k in range(100):
                await emit(k)
                emitted += 1
        finally:
            running -= 1

    pool: Pool[int, int] = Pool(run, workers=4, capacity=3, jobs=list(range(10)), name="test pool")
    await anext(pool)
    for _ in range(20):
        await asyncio.sleep(0)
    # Nobody reads: the jobs wait to hand on their items instead of piling them up.
    assert emitted <= 3 + 1
    assert peak == 4
    await pool.aclose()
    assert pool_tasks() == []


async def test_submit_waits_while_every_worker_is_busy() -> None:
    release = asyncio.Event()

    async def run(job: int, emit: Emit[int]) -> None:
        await release.wait()
        await emit(job)

    pool: Pool[int, int] = Pool(run, workers=2, capacity=10, name="test pool")
    pool.start()
    for job in range(4):  # two running, two waiting
        await asyncio.wait_for(pool.submit(job), 1)
    blocked = asyncio.ensure_future(pool.submit(99))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    release.set()
    await asyncio.wait_for(blocked, 1)
    await pool.no_more_jobs()
    assert sorted([item async for item in pool]) == [0, 1, 2, 3, 99]


async def test_the_first_failure_is_raised_itself_after_the_others_are_cancelled() -> None:
    cancelled: list[int] = []

    async def run(job: int, emit: Emit[int]) -> None:
        if job == 3:
            raise KeyError(job)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(job)
            raise

    pool: Pool[int, int] = Pool(run, workers=4, capacity=2, jobs=[0, 1, 2, 3, 4], name="test pool")
    with pytest.raises(KeyError) as caught:
        await asyncio.wait_for(drain(pool), 5)
    assert type(caught.value) is KeyError  # its own exception, not an ExceptionGroup
    assert sorted(cancelled) == [0, 1, 2]
    assert pool_tasks() == []
    assert [x async for x in pool] == []  # raised once; then the pool is simply over


async def test_failed_item_takes_the_jobs_place_and_ends_pool_still_ends_it() -> None:
    async def run(job: int, emit: Emit[str]) -> None:
        if job == 2:
            raise ValueError("bad job")
        await emit(f"ok {job}")

    pool: Pool[int, str] = Pool(
        run,
        workers=2,
        capacity=2,
        jobs=[1, 2, 3],
        failed_item=lambda job, exc: f"failed {job}: {exc}",
        name="test pool",
    )
    assert sorted([x async for x in pool]) == ["failed 2: bad job", "ok 1", "ok 3"]

    ending: Pool[int, str] = Pool(
        run,
        workers=1,
        capacity=2,
        jobs=[1, 2, 3],
        failed_item=lambda job, exc: "never",
        ends_pool=lambda exc: isinstance(exc, ValueError),
        name="test pool",
    )
    with pytest.raises(ValueError, match="bad job"):
        await drain(ending)


async def test_a_cancelled_consumer_closes_the_pool() -> None:
    async def run(job: int, emit: Emit[int]) -> None:
        await asyncio.sleep(10)

    pool: Pool[int, int] = Pool(run, workers=3, capacity=2, jobs=[1, 2, 3], name="test pool")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(pool), 0.01)
    assert pool_tasks() == []


async def test_a_spawned_helper_fails_the_pool_and_is_cancelled_with_it() -> None:
    async def run(job: int, emit: Emit[int]) -> None:
        await asyncio.sleep(10)

    async def helper() -> None:
        await asyncio.sleep(0)
        raise LookupError("the helper broke")

    pool: Pool[int, int] = Pool(run, workers=2, capacity=2, name="test pool")
    pool.spawn(helper, "helper")
    with pytest.raises(LookupError):
        await asyncio.wait_for(anext(pool), 5)
    assert pool_tasks() == []


async def test_cancel_is_synchronous() -> None:
    async def run(job: int, emit: Emit[int]) -> None:
        await asyncio.sleep(10)

    pool: Pool[int, int] = Pool(run, workers=2, capacity=2, jobs=[1, 2], name="test pool")
    pool.start()
    await asyncio.sleep(0)
    pool.cancel()  # as a finalizer would: no await
    for _ in range(3):
        await asyncio.sleep(0)
    assert pool_tasks() == []
    await pool.aclose()


async def test_a_pool_closed_before_it_started_starts_nothing() -> None:
    async def run(job: int, emit: Emit[int]) -> None:
        await emit(job)

    pool: Pool[int, int] = Pool(run, workers=2, capacity=2, jobs=[1, 2], name="test pool")
    await pool.aclose()
    assert [x async for x in pool] == []
    assert pool_tasks() == []
