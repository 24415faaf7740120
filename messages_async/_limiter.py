"""The gate every resource request of one client passes through: the asyncio side of the rate
controller (``_rate.py``), which makes every decision.

Client-wide, because a server's limits are per credential, not per task: a ``Retry-After``
(429, or 503 with the header) pauses every request of the client until it has passed
(docs/protocol.md §7), and the controller's pace and window bind all of them.

Waiters are served by priority, then first come, first served: a single call or a watch poll
(:attr:`Priority.INTERACTIVE`) goes ahead of every page of a bulk walk waiting at the same time
(:attr:`Priority.BULK`), so a bot's reply is never queued behind an export sharing the client;
within a priority no task starves while others keep slipping in. A waiter handed a slot checks
the pause again when it runs: the throttled request frees its slot (waking the next waiter) a
moment before it sets the pause, and a request that was not in flight when the 429 came must
not go out inside the window. Closing the client fails every waiter with
:class:`ClientClosedError` rather than leaving it parked on a timer that is gone.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import attrs

from ._checks import count
from ._errors import ClientClosedError
from ._rate import Outcome, Priority, RateController, Ticket

__all__ = ["ClientStats", "Limiter", "Outcome", "Priority", "Ticket"]


@attrs.frozen
class ClientStats:
    """Counters of one client, for progress displays and tests.

    Attributes:
        requests: Resource requests sent (every attempt counts).
        retries: Attempts that were retries of an earlier one.
        rate_limited: 429 answers received.
        in_flight: Requests being sent or awaiting an answer right now.
        concurrency: The current bound on requests in flight (between 1 and max).
        max_concurrency: The configured maximum.
        paused_for: Seconds left in a pause that the server asked for, or 0.
        pace: Requests per second the client holds itself to since a 429, or ``None``.
        paused_total: Seconds the server has held this client's requests back so far
            (``Retry-After`` pauses, each counted once however many calls waited it out).
    """

    requests: int
    retries: int
    rate_limited: int
    in_flight: int
    concurrency: int
    max_concurrency: int
    paused_for: float
    pace: float | None = None
    paused_total: float = 0.0


class _Waiter:
    """A request waiting for its turn: its place in line and the future that lets it go."""

    __slots__ = ("future", "priority", "seq")

    def __init__(self, seq: int, priority: Priority, future: asyncio.Future[Ticket]) -> None:
        self.seq = seq
        self.priority = priority
        self.future = future


class Limiter:
    """The gate every resource request passes through. One per client."""

    def __init__(
        self,
        max_concurrency: int,
        *,
        max_rate: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        count("max_concurrency", max_concurrency, minimum=1)
        self._clock = clock
        self._max = max_concurrency
        self.controller = RateController(max_concurrency, now=clock(), max_rate=max_rate)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._queues: dict[Priority, collections.deque[_Waiter]] = {
            p: collections.deque() for p in Priority
        }
        self._seq = 0
        self._closed = False
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0

    @property
    def concurrency(self) -> int:
        return int(self.controller.window)

    @property
    def in_flight(self) -> int:
        return self.controller.in_flight

    def count_attempt(self, *, retry: bool) -> None:
        self.requests += 1
        if retry:
            self.retries += 1

    def count_rate_limited(self) -> None:
        self.rate_limited += 1

    def paused_for(self) -> float:
        """Seconds left in the pause the server asked for (0 when not paused)."""
        return self.controller.paused_for(self._clock())

    def stats(self) -> ClientStats:
        return ClientStats(
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            in_flight=self.in_flight,
            concurrency=self.concurrency,
            max_concurrency=self._max,
            paused_for=self.paused_for(),
            pace=self.controller.pace,
        )

    def _ready_at(self) -> float | None:
        return self.controller.next_send(self._clock())

    def _open(self) -> bool:
        at = self._ready_at()
        return at is not None and at <= self._clock()

    def _head(self) -> _Waiter | None:
        for queue in self._queues.values():
            while queue and queue[0].future.done():  # cancelled while queued
                queue.popleft()
            if queue:
                return queue[0]
        return None

    def _ahead_of(self, priority: Priority) -> bool:
        """Whether a waiter of this priority or a more urgent one is already in line."""
        return any(self._queues[p] for p in Priority if p <= priority)

    async def acquire(self, *, priority: Priority = Priority.INTERACTIVE) -> Ticket:
        """Wait for a slot; returns a ticket to hand back to :meth:`release`.

        Raises:
            ClientClosedError: the client was closed while this request waited.
        """
        if self._closed:
            raise ClientClosedError("the client was closed; create a new Client")
        if not self._ahead_of(priority) and self._open():
            return self.controller.sent(self._clock())
        self._seq += 1
        waiter = _Waiter(self._seq, priority, asyncio.get_running_loop().create_future())
        self._queues[priority].append(waiter)
        self._wake()
        while True:
            try:
                ticket = await waiter.future
            except asyncio.CancelledError:
                future = waiter.future
                if future.done() and not future.cancelled() and future.exception() is None:
                    # The slot was granted just as we were cancelled: hand it on.
                    self.controller.unsent(future.result())
                elif waiter in self._queues[priority]:
                    self._queues[priority].remove(waiter)
                self._wake()  # we may have been the head that held the others back
                raise
            if self.controller.paused_for(self._clock()) <= 0:
                return ticket
            # A pause began after this slot was granted but before this task ran (the 429
            # that caused it released its own slot first, which woke us). Sending now would
            # hit the server inside its Retry-After window, so hand the slot back and wait
            # again in our original place in the line.
            self.controller.unsent(ticket)
            waiter.future = asyncio.get_running_loop().create_future()
            self._requeue(waiter)
            self._wake()

    def _requeue(self, waiter: _Waiter) -> None:
        # Keep first-come, first-served: re-insert by arrival number, not at the end.
        queue = self._queues[waiter.priority]
        for index, other in enumerate(queue):
            if other.seq > waiter.seq:
                queue.insert(index, waiter)
                break
        else:
            queue.append(waiter)

    def release(self, ticket: Ticket, outcome: Outcome) -> None:
        self.controller.answered(ticket, self._clock(), outcome)
        self._wake()

    def pause(self, seconds: float) -> None:
        """Hold every request that has not been sent yet for ``seconds`` from now."""
        self.controller.pause(self._clock(), seconds)
        self._wake()

    def _wake(self) -> None:
        while (waiter := self._head()) is not None and self._open():
            self._queues[waiter.priority].popleft()
            waiter.future.set_result(self.controller.sent(self._clock()))
        if self._head() is not None:
            self._arm_timer()

    def _arm_timer(self) -> None:
        at = self._ready_at()
        if at is None:
            return  # the window is full: a release wakes the line
        if self._timer is not None:
            if self._timer_at <= at:
                return  # an earlier wake-up is already set; it re-arms when it fires
            self._timer.cancel()
        delay = max(0.0, at - self._clock())
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def close(self) -> None:
        """Stop the timer and fail every waiting request: nothing would ever wake them."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for queue in self._queues.values():
            while queue:
                future = queue.popleft().future
                if not future.done():
                    future.set_exception(
                        ClientClosedError("the client was closed while this request waited")
                    )
