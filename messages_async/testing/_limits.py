"""Server-side rate limiters, as pure models over an injected clock.

The emulator answers 429 with what these say, and the simulation in ``benchmarks/sim.py`` runs
the client's rate controller against the very same models on a virtual clock, so a scenario
measured in simulation can be run again over sockets.

Every model answers :meth:`Limit.admit` with 0.0 (the request passes) or the seconds until one
would pass (the server's ``Retry-After``, which it rounds up to whole seconds, at least 1), and is
told :meth:`Limit.finish` when a request it let through is answered (only a concurrency limit
cares). Times are seconds on whatever clock the caller uses; nothing here reads a clock.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = [
    "ConcurrencyLimit",
    "FixedWindow",
    "FromFirstRequest",
    "Limit",
    "PerCredential",
    "Schedule",
    "SlidingWindow",
    "Storm",
    "TokenBucket",
    "Unlimited",
    "default_burst",
]


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class Limit(Protocol):
    def admit(self, now: float) -> float:
        """0.0: this request passes. Else the seconds until one would (the Retry-After)."""
        ...

    def finish(self, now: float) -> None:
        """A request this limit let through has been answered."""
        ...


class Unlimited:
    def admit(self, now: float) -> float:
        return 0.0

    def finish(self, now: float) -> None:
        pass


class TokenBucket:
    """``rate`` requests per second, bursts of up to ``burst``; full at the start."""

    def __init__(self, rate: float, burst: float, *, now: float = 0.0) -> None:
        _positive("rate", rate)
        _positive("burst", burst)
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def admit(self, now: float) -> float:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def finish(self, now: float) -> None:
        pass

    def change(self, now: float, rate: float, burst: float) -> None:
        """A new rate and burst from ``now`` on; the tokens already there stay (up to the burst)."""
        self._refill(now)
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = min(self.tokens, self.burst)


class FixedWindow:
    """At most ``limit`` requests in each window of ``seconds``, windows aligned to the clock's 0.

    A 429 says to wait until the window turns over.
    """

    def __init__(self, limit: int, seconds: float = 1.0) -> None:
        _positive("limit", limit)
        _positive("seconds", seconds)
        self.limit = limit
        self.seconds = seconds
        self._window = -1
        self._count = 0

    def admit(self, now: float) -> float:
        window = math.floor(now / self.seconds)
        if window != self._window:
            self._window, self._count = window, 0
        if self._count < self.limit:
            self._count += 1
            return 0.0
        return (window + 1) * self.seconds - now

    def finish(self, now: float) -> None:
        pass


class SlidingWindow:
    """At most ``limit`` requests in any ``seconds`` (a log of the requests let through)."""

    def __init__(self, limit: int, seconds: float = 1.0) -> None:
        _positive("limit", limit)
        _positive("seconds", seconds)
        self.limit = limit
        self.seconds = seconds
        self._log: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> float:
        log = self._log
        while log and log[0] + self.seconds <= now:
            log.popleft()
        if len(log) < self.limit:
            log.append(now)
            return 0.0
        return log[0] + self.seconds - now

    def finish(self, now: float) -> None:
        pass


class ConcurrencyLimit:
    """At most ``limit`` requests being handled at once; beyond, 429 with ``retry_after``."""

    def __init__(self, limit: int, retry_after: float = 1.0) -> None:
        _positive("limit", limit)
        _positive("retry_after", retry_after)
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0

    def admit(self, now: float) -> float:
        if self.in_flight < self.limit:
            self.in_flight += 1
            return 0.0
        return self.retry_after

    def finish(self, now: float) -> None:
        self.in_flight -= 1


class Storm:
    """From ``start`` on, the next ``count`` requests get 429 (``retry_after``); then ``after``."""

    def __init__(
        self,
        count: int,
        *,
        start: float = 0.0,
        retry_after: float = 1.0,
        after: Limit | None = None,
    ) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.left = count
        self.start = start
        self.retry_after = retry_after
        self.after: Limit = after if after is not None else Unlimited()
        self.last: float | None = None  # when the last 429 of the storm was answered

    def admit(self, now: float) -> float:
        if now >= self.start and self.left > 0:
            self.left -= 1
            self.last = now
            return self.retry_after
        return self.after.admit(now)

    def finish(self, now: float) -> None:
        self.after.finish(now)


class Schedule:
    """A token bucket whose rate changes at set times: ``steps`` of (from, rate), the first
    from 0; each step's burst is ``burst_seconds`` of its rate (at least 1 request)."""

    def __init__(self, steps: Sequence[tuple[float, float]], *, burst_seconds: float) -> None:
        if not steps or steps[0][0] != 0:
            raise ValueError("steps must start with one at time 0")
        if any(b[0] <= a[0] for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must be in increasing order of time")
        _positive("burst_seconds", burst_seconds)
        self.steps = tuple((float(at), float(rate)) for at, rate in steps)
        self.burst_seconds = burst_seconds
        self._step = 0
        rate = self.steps[0][1]
        self.bucket = TokenBucket(rate, self._burst(rate))

    def _burst(self, rate: float) -> float:
        return max(1.0, rate * self.burst_seconds)

    def rate_at(self, now: float) -> float:
        rate = self.steps[0][1]
        for at, step_rate in self.steps:
            if at <= now:
                rate = step_rate
        return rate

    def admit(self, now: float) -> float:
        while self._step + 1 < len(self.steps) and self.steps[self._step + 1][0] <= now:
            self._step += 1
            at, rate = self.steps[self._step]
            self.bucket.change(at, rate, self._burst(rate))
        return self.bucket.admit(now)

    def finish(self, now: float) -> None:
        pass


def default_burst(rate: float, burst: int | None) -> int:
    """A token bucket's capacity: ``burst``, or one second of ``rate`` (at least 1)."""
    return burst if burst is not None else max(1, int(rate))


class FromFirstRequest:
    """``inner`` on a clock that starts at its first request, so a schedule or a storm given in
    seconds "from the start" runs from when a client first calls, not from when the server
    started."""

    def __init__(self, inner: Limit) -> None:
        self.inner = inner
        self.origin: float | None = None

    def admit(self, now: float) -> float:
        if self.origin is None:
            self.origin = now
        return self.inner.admit(now - self.origin)

    def finish(self, now: float) -> None:
        self.inner.finish(now - (self.origin if self.origin is not None else now))


def parse_schedule(spec: str) -> list[tuple[float, float]]:
    """``"0:200,20:100,40:200"`` (from seconds: requests/s) as :class:`Schedule` steps."""
    steps = []
    for part in spec.split(","):
        at, sep, rate = part.partition(":")
        try:
            step = (float(at), float(rate))
        except ValueError:
            step = None
        if not sep or step is None or step[0] < 0 or not step[1] > 0:
            raise ValueError(
                f"a rate schedule is steps of SECONDS:RATE separated by commas, e.g. "
                f"0:200,20:100,40:200; got {part!r}"
            )
        steps.append(step)
    return steps


def parse_storm(spec: str) -> tuple[int, float]:
    """``"10@5"``: the next 10 requests from 5 s on are answered 429."""
    count, sep, start = spec.partition("@")
    try:
        value = (int(count), float(start))
    except ValueError:
        value = None
    if not sep or value is None or value[0] < 1 or value[1] < 0:
        raise ValueError(f"a storm is COUNT@SECONDS, e.g. 10@5 (COUNT >= 1); got {spec!r}")
    return value


class PerCredential:
    """One limit per credential (client id), each made by ``make`` when first needed: a
    server's limits are counted per credential (docs/protocol.md §5)."""

    def __init__(self, make: Callable[[], Limit]) -> None:
        self._make = make
        self._limits: dict[str, Limit] = {}

    def of(self, credential: str) -> Limit:
        limit = self._limits.get(credential)
        if limit is None:
            limit = self._limits[credential] = self._make()
        return limit
