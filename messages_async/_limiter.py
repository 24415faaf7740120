"""Rate-limit state shared by every request of one client.

Two mechanisms, both client-wide because a server's limits are per client, not per task:

- **A shared pause.** A ``Retry-After`` (429, or 503 with the header) pauses every request of
  the client until it has passed (PROTOCOL §7), not only the one that got it: otherwise the
  other tasks of a fan-out keep hammering a server that has asked everyone to wait.
- **An adaptive bound on requests in flight (AIMD).** It starts at the configured maximum,
  halves on a 429 and grows by about one per round of successes, never above the maximum.
  Requests already in flight when the bound was cut do not cut it again: one burst of 429s
  counts as one signal of congestion, as in TCP's congestion control.

Waiters are served first come, first served, so no task starves while others keep slipping in.
A waiter handed a slot checks the pause again when it runs: the throttled request frees its
slot (waking the next waiter) a moment before it sets the pause, and a request that was not in
flight when the 429 came must not go out inside the window. Closing the client fails every
waiter with :class:`ClientClosedError` rather than leaving it parked on a timer that is gone.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable

import attrs

from ._errors import ClientClosedError

__all__ = ["ClientStats", "Limiter", "Outcome"]


class Outcome(enum.Enum):
    OK = "ok"
    THROTTLED = "throttled"  # 429: the server is telling this client to slow down
    FAILED = "failed"  # anything else; says nothing about the server's rate limit


@attrs.frozen
class ClientStats:
    """Counters of one client, for progress displays and tests.

    Attributes:
        requests: Resource requests sent (every attempt counts).
        retries: Attempts that were retries of an earlier one.
        rate_limited: 429 answers received.
        in_flight: Requests being sent or awaiting an answer right now.
        concurrency: The current bound on requests in flight (adapts between 1 and max).
        max_concurrency: The configured maximum.
        paused_for: Seconds left in a pause that the server asked for, or 0.
    """

    requests: int
    retries: int
    rate_limited: int
    in_flight: int
    concurrency: int
    max_concurrency: int
    paused_for: float


class _Waiter:
    """A request waiting for its turn: its place in line and the future that lets it go."""

    __slots__ = ("future", "seq")

    def __init__(self, seq: int, future: asyncio.Future[int]) -> None:
        self.seq = seq
        self.future = future


class Limiter:
    """The gate every resource request passes through. One per client."""

    def __init__(self, max_concurrency: int, *, clock: Callable[[], float] = time.monotonic):
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise TypeError("max_concurrency must be an int")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._clock = clock
        self._max = max_concurrency
        self._limit = float(max_concurrency)
        self._in_flight = 0
        self._epoch = 0
        self._pause_until = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._seq = 0
        self._closed = False
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0

    @property
    def concurrency(self) -> int:
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> ClientStats:
        return ClientStats(
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            in_flight=self._in_flight,
            concurrency=self.concurrency,
            max_concurrency=self._max,
            paused_for=max(0.0, self._pause_until - self._clock()),
        )

    def _open(self) -> bool:
        return self._in_flight < int(self._limit) and self._clock() >= self._pause_until

    async def acquire(self) -> int:
        """Wait for a slot; returns a ticket to hand back to :meth:`release`.

        Raises:
            ClientClosedError: the client was closed while this request waited.
        """
        if self._closed:
            raise ClientClosedError("the client was closed; create a new Client")
        if not self._waiters and self._open():
            self._in_flight += 1
            return self._epoch
        self._seq += 1
        waiter = _Waiter(self._seq, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._arm_timer()
        while True:
            try:
                ticket = await waiter.future
            except asyncio.CancelledError:
                future = waiter.future
                if future.done() and not future.cancelled() and future.exception() is None:
                    # The slot was granted just as we were cancelled: hand it on.
                    self._in_flight -= 1
                    self._wake()
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                    self._wake()  # we may have been the head that held the others back
                raise
            if self._clock() >= self._pause_until:
                return ticket
            # A pause began after this slot was granted but before this task ran (the 429
            # that caused it released its own slot first, which woke us). Sending now would
            # hit the server inside its Retry-After window, so hand the slot back and wait
            # again in our original place in the line.
            self._in_flight -= 1
            waiter.future = asyncio.get_running_loop().create_future()
            self._requeue(waiter)
            self._wake()

    def _requeue(self, waiter: _Waiter) -> None:
        # Keep first-come, first-served: re-insert by arrival number, not at the end.
        for index, other in enumerate(self._waiters):
            if other.seq > waiter.seq:
                self._waiters.insert(index, waiter)
                break
        else:
            self._waiters.append(waiter)
        self._arm_timer()

    def release(self, ticket: int, outcome: Outcome) -> None:
        self._in_flight -= 1
        if outcome is Outcome.THROTTLED:
            if ticket == self._epoch:
                self._limit = max(1.0, self._limit / 2)
                self._epoch += 1
        elif outcome is Outcome.OK and self._limit < self._max:
            self._limit = min(float(self._max), self._limit + 1.0 / self._limit)
        self._wake()

    def pause(self, seconds: float) -> None:
        """Hold every request that has not been sent yet for ``seconds`` from now."""
        until = self._clock() + max(0.0, seconds)
        if until > self._pause_until:
            self._pause_until = until
            self._arm_timer()

    def _arm_timer(self) -> None:
        delay = self._pause_until - self._clock()
        if delay <= 0 or not self._waiters:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._open():
            future = self._waiters.popleft().future
            if future.done():  # cancelled while queued; its task removes nothing more
                continue
            self._in_flight += 1
            future.set_result(self._epoch)
        if self._waiters:
            self._arm_timer()

    def close(self) -> None:
        """Stop the timer and fail every waiting request: nothing would ever wake them."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            future = self._waiters.popleft().future
            if not future.done():
                future.set_exception(
                    ClientClosedError("the client was closed while this request waited")
                )
