"""Rate-limit state shared by every request of one client.

Two mechanisms, both client-wide because a server's limits are per client, not per task:

- **A shared pause.** A ``Retry-After`` (429, or 503 with the header) pauses every request of
  the client until it has passed (PROTOCOL §7), not only the one that got it: otherwise the
  other tasks of a fan-out keep hammering a server that has asked everyone to wait.
- **An adaptive bound on requests in flight (AIMD).** It starts at the configured maximum,
  halves on a 429 and grows by about one per round of successes, never above the maximum.
  Requests already in flight when the bound was cut do not cut it again: one burst of 429s
  counts as one signal of congestion, as in TCP's congestion control.
- **A learned send rate.** A bound on requests in flight cannot express "50 requests a
  second" when each takes 20 ms, and every 429 costs the whole client a ``Retry-After``
  (seconds, however small the real wait). So after a 429 the client also paces itself: it
  estimates the rate the server allowed from the successes of the last two seconds it was
  not paused, sends at 95% of that, and probes upwards: quickly (x2.5 a second) while it has
  no reliable estimate, x1.15 a second while below 90% of one, and 0.5% a second near it.
  Until the first 429 a client is not paced at all.

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

from ._checks import count
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


#: Seconds of history that estimate what rate the server allows.
_WINDOW = 2.0
#: Send at this share of the estimated allowed rate.
_MARGIN = 0.95
#: Probing growth of the pace per second: without, and with, a reliable estimate.
_FAST_PROBE = 2.5
_CATCH_UP = 1.15
_SLOW_PROBE = 1.005
#: "Near" the estimated rate: within this share of it, probing slows to _SLOW_PROBE.
_NEAR = 0.9
#: Slowest pace, in requests per second: a client always makes progress.
_MIN_RATE = 0.5
#: Beyond this the pace is dropped: the server has stopped limiting this client.
_MAX_RATE = 10_000.0


class _Waiter:
    """A request waiting for its turn: its place in line and the future that lets it go."""

    __slots__ = ("future", "seq")

    def __init__(self, seq: int, future: asyncio.Future[int]) -> None:
        self.seq = seq
        self.future = future


class Limiter:
    """The gate every resource request passes through. One per client."""

    def __init__(self, max_concurrency: int, *, clock: Callable[[], float] = time.monotonic):
        count("max_concurrency", max_concurrency, minimum=1)
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
        self._rate: float | None = None
        self._ceiling: float | None = None
        self._next_send = 0.0
        self._last_probe = 0.0
        self._active_since = clock()
        self._stretch = (self._active_since, self._active_since)
        self._learn_pending = False
        self._successes: collections.deque[float] = collections.deque()
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0

    @property
    def concurrency(self) -> int:
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def count_attempt(self, *, retry: bool) -> None:
        self.requests += 1
        if retry:
            self.retries += 1

    def count_rate_limited(self) -> None:
        self.rate_limited += 1

    def paused_for(self) -> float:
        """Seconds left in the pause the server asked for (0 when not paused)."""
        return max(0.0, self._pause_until - self._clock())

    def stats(self) -> ClientStats:
        return ClientStats(
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            in_flight=self._in_flight,
            concurrency=self.concurrency,
            max_concurrency=self._max,
            paused_for=self.paused_for(),
            pace=self._rate,
        )

    def _ready_at(self) -> float:
        return max(self._pause_until, self._next_send)

    def _open(self) -> bool:
        return self._in_flight < int(self._limit) and self._clock() >= self._ready_at()

    def _grant(self) -> int:
        if self._learn_pending and self._clock() >= self._pause_until:
            self._learn_pending = False
            self._learn_rate()
        self._in_flight += 1
        if self._rate is not None:
            self._next_send = max(self._clock(), self._next_send) + 1.0 / self._rate
        return self._epoch

    async def acquire(self) -> int:
        """Wait for a slot; returns a ticket to hand back to :meth:`release`.

        Raises:
            ClientClosedError: the client was closed while this request waited.
        """
        if self._closed:
            raise ClientClosedError("the client was closed; create a new Client")
        if not self._waiters and self._open():
            return self._grant()
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
                self._learn_pending = True
        elif outcome is Outcome.OK:
            if self._limit < self._max:
                self._limit = min(float(self._max), self._limit + 1.0 / self._limit)
            now = self._clock()
            successes = self._successes
            successes.append(now)
            # Only one window is ever read: the last one, or while a lesson is pending the one
            # before the pause. Keep no more, or a client that never meets a 429 would keep a
            # timestamp for every request it ever made.
            horizon = (self._stretch[1] if self._learn_pending else now) - _WINDOW
            while successes[0] < horizon:
                successes.popleft()
            self._probe()
        self._wake()

    def _learn_rate(self) -> None:
        """Set the pace from the successes of the stretch the last pause ended.

        Run when that pause is over rather than at the 429 itself: a server answers 429s at
        once but successes only after their work, so at the moment of the first 429 of a burst
        the successes of that same burst have not arrived yet.
        """
        begin, end = self._stretch
        begin = max(begin, end - _WINDOW)
        while self._successes and self._successes[0] < begin:
            self._successes.popleft()
        count, span = len(self._successes), end - begin
        self._successes.clear()
        if count == 0:
            # Nothing got through: that says nothing about the rate. The pause and the halved
            # bound on requests in flight do the work until successes come back.
            if self._rate is not None:
                self._rate = max(_MIN_RATE, self._rate * _MARGIN)
            return
        if span >= _WINDOW / 2:
            # A real stretch of time: what the server let through is a floor of its rate (the
            # client may have sent less for part of it), and the pace that met the 429 is a
            # roof. Probing speeds up to somewhere between the two, then slows right down.
            allowed = count / span
            roof = self._rate if self._rate is not None and self._rate > allowed else allowed
            self._ceiling = (allowed * roof) ** 0.5
        else:
            # Too short to say (the first burst, say): assume no more than what got through
            # in a second, and probe upwards quickly from there.
            allowed = count / max(span, 1.0)
            self._ceiling = None
        rate = allowed * _MARGIN
        if self._rate is not None and self._ceiling is None:
            rate = min(rate, self._rate)
        self._rate = max(_MIN_RATE, rate)
        self._last_probe = self._clock()

    def _probe(self) -> None:
        if self._rate is None:
            return
        now = self._clock()
        elapsed = now - self._last_probe
        if elapsed <= 0:
            return
        self._last_probe = now
        if self._ceiling is None:
            growth = _FAST_PROBE
        elif self._rate >= self._ceiling * _NEAR:
            growth = _SLOW_PROBE
        else:
            growth = _CATCH_UP
        self._rate *= growth**elapsed
        if self._rate > _MAX_RATE:
            self._rate = self._ceiling = None

    def pause(self, seconds: float) -> None:
        """Hold every request that has not been sent yet for ``seconds`` from now."""
        now = self._clock()
        until = now + max(0.0, seconds)
        if until > self._pause_until:
            if self._pause_until <= now:  # a new pause ends the stretch that ran until now
                self._stretch = (self._active_since, now)
            self._pause_until = until
            self._active_since = until  # rates are learned from unpaused time only
            self._last_probe = max(self._last_probe, until)
            self._arm_timer()

    def _arm_timer(self) -> None:
        delay = self._ready_at() - self._clock()
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
            future.set_result(self._grant())
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
