"""The shared limiter on its own: fairness, priorities, the client-wide pause, cancellation.

No server here: these drive ``Limiter`` directly, the way the transport does (acquire, send,
release with an outcome, pause on a ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import time

import pytest

import messages_async as ma
from messages_async._limiter import Limiter, Outcome, Priority


async def _settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_bad_arguments_say_what_to_fix() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Limiter(0)
    with pytest.raises(TypeError, match="int"):
        Limiter(True)
    with pytest.raises(TypeError, match="int"):
        Limiter(2.5)  # type: ignore[arg-type]


async def test_waiters_are_served_first_come_first_served() -> None:
    limiter = Limiter(1)
    held = await limiter.acquire()
    order: list[int] = []

    async def take(n: int) -> None:
        ticket = await limiter.acquire()
        order.append(n)
        await asyncio.sleep(0)
        limiter.release(ticket, Outcome.OK)

    tasks = []
    for n in range(6):
        tasks.append(asyncio.create_task(take(n)))
        await asyncio.sleep(0)  # each one queues before the next is created
    assert order == []
    limiter.release(held, Outcome.OK)
    await asyncio.gather(*tasks)
    assert order == list(range(6))
    assert limiter.in_flight == 0


async def test_a_newcomer_does_not_jump_the_line() -> None:
    limiter = Limiter(1)
    held = await limiter.acquire()
    queued = asyncio.create_task(limiter.acquire())
    await _settle()
    # The slot frees up and is handed to the waiter; a request arriving right now must wait
    # behind it even though the waiter has not run yet.
    limiter.release(held, Outcome.OK)
    newcomer = asyncio.create_task(limiter.acquire())
    await _settle()
    assert queued.done()
    assert not newcomer.done()
    limiter.release(queued.result(), Outcome.OK)
    ticket = await asyncio.wait_for(newcomer, 5)
    limiter.release(ticket, Outcome.OK)
    assert limiter.in_flight == 0


async def test_in_flight_never_exceeds_the_bound() -> None:
    limiter = Limiter(3)
    peak = 0
    current = 0

    async def request() -> None:
        nonlocal peak, current
        ticket = await limiter.acquire()
        current += 1
        peak = max(peak, current)
        await asyncio.sleep(0.001)
        current -= 1
        limiter.release(ticket, Outcome.OK)

    await asyncio.gather(*(request() for _ in range(30)))
    assert peak == 3
    assert limiter.in_flight == 0


async def test_a_pause_holds_every_request_until_it_has_passed() -> None:
    limiter = Limiter(8)
    limiter.pause(0.3)
    deadline = time.monotonic() + 0.3
    released_at: list[float] = []

    async def request() -> None:
        ticket = await limiter.acquire()
        released_at.append(time.monotonic())
        limiter.release(ticket, Outcome.OK)

    tasks = [asyncio.create_task(request()) for _ in range(5)]
    await asyncio.sleep(0.1)
    assert released_at == []
    assert limiter.stats().paused_for > 0
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert len(released_at) == 5
    # Allow for the event loop's clock resolution: a timer may fire a hair early, and then
    # the limiter re-arms it rather than letting anyone through.
    assert all(t >= deadline - 0.01 for t in released_at)


async def test_a_slot_granted_just_before_a_pause_is_not_used_during_it() -> None:
    # The transport releases the throttled request's slot (which hands it to the next waiter)
    # and only then applies the Retry-After pause, in the same step. The waiter must not go
    # out inside the server's window: it was not in flight when the 429 came.
    limiter = Limiter(1)
    ticket = await limiter.acquire()
    started_at: list[float] = []

    async def request() -> None:
        t = await limiter.acquire()
        started_at.append(time.monotonic())
        limiter.release(t, Outcome.OK)

    waiter = asyncio.create_task(request())
    await _settle()
    limiter.release(ticket, Outcome.THROTTLED)
    limiter.pause(0.3)
    deadline = time.monotonic() + 0.3
    await asyncio.wait_for(waiter, 5)
    assert started_at[0] >= deadline - 0.01
    assert limiter.in_flight == 0


async def test_requeued_waiters_keep_their_place_in_line() -> None:
    limiter = Limiter(2)
    first = await limiter.acquire()
    second = await limiter.acquire()
    order: list[int] = []

    async def request(n: int) -> None:
        t = await limiter.acquire()
        order.append(n)
        limiter.release(t, Outcome.OK)

    tasks = []
    for n in range(4):
        tasks.append(asyncio.create_task(request(n)))
        await asyncio.sleep(0)
    # Both slots go to waiters 0 and 1, then a pause starts before they run: they must go
    # back to the head of the line, in their order, ahead of 2 and 3.
    limiter.release(first, Outcome.OK)
    limiter.release(second, Outcome.OK)
    limiter.pause(0.1)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3]
    assert limiter.in_flight == 0


async def test_cancelling_a_waiter_frees_nothing_wrongly() -> None:
    limiter = Limiter(1)
    held = await limiter.acquire()
    a = asyncio.create_task(limiter.acquire())
    b = asyncio.create_task(limiter.acquire())
    c = asyncio.create_task(limiter.acquire())
    await _settle()
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    # A cancelled waiter gives up nothing it did not have: still one slot, still taken.
    assert limiter.in_flight == 1
    assert not a.done()
    assert not c.done()
    limiter.release(held, Outcome.OK)
    ticket_a = await asyncio.wait_for(a, 5)
    await _settle()
    assert not c.done()
    assert limiter.in_flight == 1
    limiter.release(ticket_a, Outcome.OK)
    ticket_c = await asyncio.wait_for(c, 5)
    assert limiter.in_flight == 1
    limiter.release(ticket_c, Outcome.OK)
    assert limiter.in_flight == 0


async def test_a_waiter_cancelled_after_its_slot_was_granted_hands_it_on() -> None:
    limiter = Limiter(1)
    held = await limiter.acquire()
    a = asyncio.create_task(limiter.acquire())
    b = asyncio.create_task(limiter.acquire())
    await _settle()
    limiter.release(held, Outcome.OK)  # granted to a, which has not run yet
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    ticket_b = await asyncio.wait_for(b, 5)
    assert limiter.in_flight == 1
    limiter.release(ticket_b, Outcome.OK)
    assert limiter.in_flight == 0


async def test_a_full_window_holds_new_requests_until_one_finishes() -> None:
    limiter = Limiter(2)
    tickets = [await limiter.acquire() for _ in range(2)]
    waiter = asyncio.create_task(limiter.acquire())
    await _settle()
    assert not waiter.done()
    limiter.release(tickets.pop(), Outcome.FAILED)  # a failure frees its slot too
    ticket = await asyncio.wait_for(waiter, 5)
    assert limiter.in_flight == 2
    for t in (ticket, tickets.pop()):
        limiter.release(t, Outcome.OK)
    assert limiter.in_flight == 0
    assert limiter.stats().max_concurrency == 2


async def test_single_calls_go_ahead_of_bulk_pages_waiting_for_a_slot() -> None:
    limiter = Limiter(1)
    held = await limiter.acquire()
    order: list[str] = []

    async def take(name: str, priority: Priority) -> None:
        ticket = await limiter.acquire(priority=priority)
        order.append(name)
        await asyncio.sleep(0)
        limiter.release(ticket, Outcome.OK)

    tasks = []
    for name, priority in [("page1", Priority.BULK), ("page2", Priority.BULK)]:
        tasks.append(asyncio.create_task(take(name, priority)))
        await _settle()
    tasks.append(asyncio.create_task(take("add", Priority.INTERACTIVE)))
    await _settle()
    tasks.append(asyncio.create_task(take("page3", Priority.BULK)))
    tasks.append(asyncio.create_task(take("get", Priority.INTERACTIVE)))
    await _settle()
    limiter.release(held, Outcome.OK)
    await asyncio.gather(*tasks)
    # Interactive calls first, in their order of arrival; then the pages in theirs.
    assert order == ["add", "get", "page1", "page2", "page3"]


async def test_a_paced_client_spaces_its_requests_on_the_clock() -> None:
    # After a 429 the controller paces: the limiter lets requests go only at its slots.
    now = [0.0]
    limiter = Limiter(8, clock=lambda: now[0])
    first = [await limiter.acquire() for _ in range(3)]
    limiter.release(first[2], Outcome.THROTTLED)
    limiter.pause(1.0)
    for t in first[:2]:
        limiter.release(t, Outcome.OK)
    assert limiter.paused_for() == 1.0
    now[0] = 1.0
    pace = limiter.stats().pace
    assert pace is not None
    assert 0 < pace < 10
    await limiter.acquire()
    second = asyncio.create_task(limiter.acquire())
    await _settle()
    assert not second.done()  # the next slot is 1/pace away on the clock
    now[0] += 1.0 / pace
    limiter._on_timer()  # the timer the limiter armed, fired by hand on this fake clock
    await asyncio.wait_for(second, 5)


async def test_closing_fails_the_waiters_instead_of_leaving_them_hanging() -> None:
    limiter = Limiter(1)
    limiter.pause(60)
    waiter = asyncio.create_task(limiter.acquire())
    await _settle()
    limiter.close()
    with pytest.raises(ma.ClientClosedError):
        await asyncio.wait_for(waiter, 5)
    with pytest.raises(ma.ClientClosedError):
        await limiter.acquire()


async def test_send_history_is_bounded() -> None:
    # A client that never meets a 429 must not keep a timestamp per request forever.
    now = [0.0]
    limiter = Limiter(4, clock=lambda: now[0])
    for _ in range(20_000):
        limiter.release(await limiter.acquire(), Outcome.OK)
        now[0] += 0.001
    assert len(limiter.controller._sends) <= 8192
