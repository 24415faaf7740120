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
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable

import attrs

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
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()
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
        """Wait for a slot; returns a ticket to hand back to :meth:`release`."""
        if not self._waiters and self._open():
            self._in_flight += 1
            return self._epoch
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._arm_timer()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # The slot was granted just as we were cancelled: hand it on.
                self._in_flight -= 1
                self._wake()
            elif future in self._waiters:
                self._waiters.remove(future)
            raise

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
            future = self._waiters.popleft()
            if future.done():  # cancelled while queued; its task removes nothing more
                continue
            self._in_flight += 1
            future.set_result(self._epoch)
        if self._waiters:
            self._arm_timer()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
