"""A client's rate control against a server's limiter, on a virtual clock.

``python -m benchmarks.sim`` runs the matrix of issue 13 (token buckets from 5 to 1,000 req/s with
bursts from one request to a second's worth, a fixed window, a sliding window, a concurrency
limit answering 429, a transient storm, a ceiling that halves and comes back; latencies from 1 to
200 ms; a fan-out from 1 to 64) against three controllers side by side:

- ``controller``: the client's own (``messages_async._rate.RateController``);
- ``v0``: the limiter the client had before it (shared pause, AIMD and a learned pace), ported to
  the same event interface;
- ``cubic``: the AWS SDKs' adaptive retry mode (botocore ``retries/adaptive.py``: CUBIC on a
  token bucket, send rate measured in 0.5 s buckets, β 0.7, scale 0.4), written again here.

Every controller is given the same shared pause on a ``Retry-After`` (docs/protocol.md §7): the
SDK itself has none, but a client of this API must honour it, so all are measured with it. The
servers are the emulator's own models (``messages_async.testing._limits``).

Each worker of the fan-out sends one request after another, for ever; a 429'd request is sent
again. A success is answered after the latency (±10%, seeded), a 429 at once, as the emulator
does. Goodput is successes per second over the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from messages_async._rate import Outcome, RateController
from messages_async.testing._limits import (
    ConcurrencyLimit,
    FixedWindow,
    Limit,
    Schedule,
    SlidingWindow,
    Storm,
    TokenBucket,
    Unlimited,
)

__all__ = ["Result", "Scenario", "matrix", "meets", "run"]


class Policy(Protocol):
    def next_send(self, now: float) -> float | None: ...
    def sent(self, now: float) -> Any: ...
    def done(self, ticket: Any, now: float, outcome: Outcome) -> None: ...
    def pause(self, now: float, seconds: float) -> None: ...


# -- the controllers --------------------------------------------------------------------------


class Controller:
    """The client's controller, as the transport drives it."""

    def __init__(self, max_concurrency: int, now: float) -> None:
        self.c = RateController(max_concurrency, now=now)

    def next_send(self, now: float) -> float | None:
        return self.c.next_send(now)

    def sent(self, now: float) -> Any:
        return self.c.sent(now)

    def done(self, ticket: Any, now: float, outcome: Outcome) -> None:
        self.c.answered(ticket, now, outcome)

    def pause(self, now: float, seconds: float) -> None:
        self.c.pause(now, seconds)


class V0:
    """The previous limiter's rules on the same interface (its constants unchanged)."""

    WINDOW, MARGIN, FAST, CATCH_UP, SLOW, NEAR, MIN_RATE, MAX_RATE = (
        2.0,
        0.95,
        2.5,
        1.15,
        1.005,
        0.9,
        0.5,
        10_000.0,
    )

    def __init__(self, max_concurrency: int, now: float) -> None:
        self.max = max_concurrency
        self.limit = float(max_concurrency)
        self.in_flight = 0
        self.epoch = 0
        self.pause_until = 0.0
        self.rate: float | None = None
        self.ceiling: float | None = None
        self.next_at = 0.0
        self.last_probe = 0.0
        self.active_since = now
        self.stretch = (now, now)
        self.learn_pending = False
        self.successes: list[float] = []

    def next_send(self, now: float) -> float | None:
        if self.in_flight >= int(self.limit):
            return None
        return max(self.pause_until, self.next_at, now)

    def sent(self, now: float) -> Any:
        if self.learn_pending and now >= self.pause_until:
            self.learn_pending = False
            self._learn(now)
        self.in_flight += 1
        if self.rate is not None:
            self.next_at = max(now, self.next_at) + 1.0 / self.rate
        return self.epoch

    def done(self, ticket: Any, now: float, outcome: Outcome) -> None:
        self.in_flight -= 1
        if outcome is Outcome.THROTTLED:
            if ticket == self.epoch:
                self.limit = max(1.0, self.limit / 2)
                self.epoch += 1
                self.learn_pending = True
        elif outcome is Outcome.OK:
            if self.limit < self.max:
                self.limit = min(float(self.max), self.limit + 1.0 / self.limit)
            self.successes.append(now)
            horizon = (self.stretch[1] if self.learn_pending else now) - self.WINDOW
            if self.successes[0] < horizon:
                self.successes = [s for s in self.successes if s >= horizon]
            self._probe(now)

    def _learn(self, now: float) -> None:
        begin, end = self.stretch
        begin = max(begin, end - self.WINDOW)
        kept = [s for s in self.successes if s >= begin]
        count, span = len(kept), end - begin
        self.successes = []
        if count == 0:
            if self.rate is not None:
                self.rate = max(self.MIN_RATE, self.rate * self.MARGIN)
            return
        if span >= self.WINDOW / 2:
            allowed = count / span
            roof = self.rate if self.rate is not None and self.rate > allowed else allowed
            self.ceiling = (allowed * roof) ** 0.5
        else:
            allowed = count / max(span, 1.0)
            self.ceiling = None
        rate = allowed * self.MARGIN
        if self.rate is not None and self.ceiling is None:
            rate = min(rate, self.rate)
        self.rate = max(self.MIN_RATE, rate)
        self.last_probe = now

    def _probe(self, now: float) -> None:
        if self.rate is None:
            return
        elapsed = now - self.last_probe
        if elapsed <= 0:
            return
        self.last_probe = now
        if self.ceiling is None:
            growth = self.FAST
        elif self.rate >= self.ceiling * self.NEAR:
            growth = self.SLOW
        else:
            growth = self.CATCH_UP
        self.rate *= growth**elapsed
        if self.rate > self.MAX_RATE:
            self.rate = self.ceiling = None

    def pause(self, now: float, seconds: float) -> None:
        until = now + seconds
        if until > self.pause_until:
            if self.pause_until <= now:
                self.stretch = (self.active_since, now)
            self.pause_until = until
            self.active_since = until
            self.last_probe = max(self.last_probe, until)


class Cubic:
    """botocore's adaptive mode: a client-side token bucket whose rate CUBIC sets, enabled by
    the first throttle; send rate measured in 0.5 s buckets (smoothing 0.8); β 0.7, C 0.4; the
    bucket's rate at most twice the measured rate; at most one second of tokens."""

    BETA, SCALE, SMOOTHING, BUCKET, MIN_RATE = 0.7, 0.4, 0.8, 0.5, 0.5

    def __init__(self, max_concurrency: int, now: float) -> None:
        self.max = max_concurrency
        self.in_flight = 0
        self.pause_until = 0.0
        self.enabled = False
        self.w_max = 0.0
        self.k = 0.0
        self.last_fail = now
        self.fill = 1.0
        self.capacity = 1.0
        self.tokens = 0.0
        self.stamp: float | None = None
        self.measured = 0.0
        self.last_bucket = float(math.floor(now))
        self.count = 0

    def _refill(self, now: float) -> None:
        if self.stamp is None:
            self.stamp = now
            return
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.fill)
        self.stamp = now

    def _set_rate(self, now: float, value: float) -> None:
        self._refill(now)
        self.fill = max(value, self.MIN_RATE)
        self.capacity = max(value, 1.0)
        self.tokens = min(self.tokens, self.capacity)

    def next_send(self, now: float) -> float | None:
        if self.in_flight >= self.max:
            return None
        at = max(self.pause_until, now)
        if self.enabled:
            self._refill(now)
            if self.tokens < 1.0:
                at = max(at, now + (1.0 - self.tokens) / self.fill)
        return at

    def sent(self, now: float) -> Any:
        self.in_flight += 1
        if self.enabled:
            self._refill(now)
            self.tokens -= 1.0
        return None

    def _record(self, now: float) -> float:
        scale = 1 / self.BUCKET
        bucket = math.floor(now * scale) / scale
        self.count += 1
        if bucket > self.last_bucket:
            current = self.count / (bucket - self.last_bucket)
            self.measured = current * self.SMOOTHING + self.measured * (1 - self.SMOOTHING)
            self.count = 0
            self.last_bucket = bucket
        return self.measured

    def done(self, ticket: Any, now: float, outcome: Outcome) -> None:
        self.in_flight -= 1
        measured = self._record(now)
        if outcome is Outcome.THROTTLED:
            rate = measured if not self.enabled else min(measured, self.fill)
            self.w_max = rate
            self.k = (self.w_max * (1 - self.BETA) / self.SCALE) ** (1 / 3)
            self.last_fail = now
            new = rate * self.BETA
            self.enabled = True
        else:
            new = self.SCALE * (now - self.last_fail - self.k) ** 3 + self.w_max
        self._set_rate(now, min(new, 2.0 * measured))

    def pause(self, now: float, seconds: float) -> None:
        self.pause_until = max(self.pause_until, now + seconds)


POLICIES: dict[str, Callable[[int, float], Policy]] = {
    "controller": Controller,
    "v0": V0,
    "cubic": Cubic,
}


# -- scenarios ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One server, one latency, one fan-out. ``ceiling(t)``: requests/s the server allows then."""

    name: str
    make: Callable[[], Limit]
    latency: float
    fan_out: int
    ceiling: Callable[[float], float]
    duration: float = 60.0

    def ideal(self, t: float) -> float:
        return min(self.ceiling(t), self.fan_out / self.latency)


@dataclasses.dataclass
class Result:
    scenario: Scenario
    policy: str
    successes: int
    throttled: int
    sent: int
    #: Successes per 0.1 s of virtual time.
    timeline: list[int]
    pauses: list[tuple[float, float]]

    @property
    def goodput(self) -> float:
        return self.successes / self.scenario.duration

    @property
    def share_429(self) -> float:
        return self.throttled / self.sent if self.sent else 0.0

    def ideal_mean(self) -> float:
        n = len(self.timeline)
        return sum(self.scenario.ideal((i + 0.5) * TICK) for i in range(n)) / n

    @property
    def ratio(self) -> float:
        return self.goodput / self.ideal_mean()

    def rate_between(self, start: float, end: float) -> float:
        return rate_between(self.timeline, start, end)

    def first_reaching(self, share: float, start: float, window: float = 1.0) -> float | None:
        """Seconds after ``start`` until a ``window`` of goodput first holds ``share`` of ideal."""
        return first_reaching(
            self.timeline, start, window, lambda t: share * self.scenario.ideal(t)
        )


#: Seconds of a timeline's slot: a timeline counts the successes of each.
TICK = 0.1


def rate_between(timeline: Sequence[int], start: float, end: float) -> float:
    """Successes per second of ``timeline`` from ``start`` to ``end`` (seconds)."""
    a, b = round(start / TICK), round(end / TICK)
    return sum(timeline[a:b]) / max(end - start, TICK)


def first_reaching(
    timeline: Sequence[int], start: float, window: float, wanted: Callable[[float], float]
) -> float | None:
    """Seconds after ``start`` until a ``window`` of ``timeline`` first holds ``wanted(t)``
    successes per second (``t``: the window's middle); None if it never does."""
    t = start
    while t + window <= len(timeline) * TICK + 1e-9:
        if rate_between(timeline, t, t + window) >= wanted(t + window / 2):
            return t - start
        t += TICK
    return None


def run(scenario: Scenario, policy_name: str, *, seed: int = 0) -> Result:
    """Run one scenario against one controller; everything on a virtual clock."""
    rng = random.Random(seed)
    limit = scenario.make()
    policy = POLICIES[policy_name](scenario.fan_out, 0.0)
    duration = scenario.duration
    latency = scenario.latency
    timeline = [0] * math.ceil(duration / TICK)
    events: list[tuple[float, int, int, Any, Outcome, float]] = []
    seq = 0
    waiting = scenario.fan_out
    wake_at = math.inf
    sent = throttled = successes = 0
    pauses: list[tuple[float, float]] = []

    def dispatch(now: float) -> None:
        nonlocal waiting, seq, sent, wake_at
        while waiting:
            at = policy.next_send(now)
            if at is None:
                return
            if at > now:
                if at < wake_at:
                    wake_at = at
                    seq += 1
                    heapq.heappush(events, (at, seq, 0, None, Outcome.OK, 0.0))
                return
            ticket = policy.sent(now)
            waiting -= 1
            sent += 1
            wait = limit.admit(now)
            seq += 1
            if wait > 0:
                ra = float(max(1, math.ceil(wait)))
                heapq.heappush(events, (now + 0.0005, seq, 1, ticket, Outcome.THROTTLED, ra))
            else:
                took = latency * (0.9 + 0.2 * rng.random())
                heapq.heappush(events, (now + took, seq, 1, ticket, Outcome.OK, 0.0))

    dispatch(0.0)
    while events:
        now, _, kind, ticket, outcome, ra = heapq.heappop(events)
        if now >= duration:
            break
        if kind == 0:
            if now >= wake_at:
                wake_at = math.inf
        else:
            waiting += 1
            if outcome is Outcome.OK:
                limit.finish(now)
                successes += 1
                timeline[int(now / TICK)] += 1
            else:
                throttled += 1
            policy.done(ticket, now, outcome)
            if outcome is Outcome.THROTTLED:
                policy.pause(now, ra)
                if not pauses or pauses[-1][1] < now:
                    pauses.append((now, now + ra))
        dispatch(now)
    return Result(scenario, policy_name, successes, throttled, sent, timeline, pauses)


# -- the matrix ---------------------------------------------------------------------------------

RATES = (5.0, 20.0, 100.0, 400.0, 1000.0)
BURSTS = ("1 request", "0.1 s", "1 s")
LATENCIES = (0.001, 0.02, 0.2)
FAN_OUTS = (1, 8, 32, 64)


def _burst(rate: float, burst: str) -> float:
    if burst == "1 request":
        return 1.0
    return max(1.0, rate * float(burst.split()[0]))


def constant(value: float) -> Callable[[float], float]:
    return lambda _t: value


def matrix(*, quick: bool = False) -> Iterator[Scenario]:
    """The scenarios of issue 13; ``quick``: a few of each kind."""
    rates = (20.0, 400.0) if quick else RATES
    latencies = (0.02,) if quick else LATENCIES
    fan_outs = (32,) if quick else FAN_OUTS
    for rate in rates:
        for burst in BURSTS:
            b = _burst(rate, burst)
            for latency in latencies:
                for fan_out in fan_outs:
                    yield Scenario(
                        f"bucket {rate:g}/s burst {burst}",
                        functools.partial(TokenBucket, rate, b),
                        latency,
                        fan_out,
                        constant(rate),
                    )
    for rate in rates:
        for latency in latencies:
            for fan_out in fan_outs:
                n = int(rate)
                yield Scenario(
                    f"fixed window {n}/1 s",
                    functools.partial(FixedWindow, n, 1.0),
                    latency,
                    fan_out,
                    constant(rate),
                )
                yield Scenario(
                    f"sliding window {n}/1 s",
                    functools.partial(SlidingWindow, n, 1.0),
                    latency,
                    fan_out,
                    constant(rate),
                )
    for limit in (1, 4, 16) if not quick else (4,):
        for latency in latencies:
            for fan_out in fan_outs:
                yield Scenario(
                    f"concurrency {limit}",
                    functools.partial(ConcurrencyLimit, limit),
                    latency,
                    fan_out,
                    constant(limit / latency),
                )


def storm(count: int, latency: float, fan_out: int, start: float = 5.0) -> Scenario:
    return Scenario(
        f"storm of {count} 429s at {start:g} s",
        lambda: Storm(count, start=start),
        latency,
        fan_out,
        constant(math.inf),
        duration=start + count + 10.0,
    )


#: The ceiling-change scenario: 200 req/s, 100 from 20 s, 200 again from 40 s; 0.1 s bursts.
HALVING_STEPS = ((0.0, 200.0), (20.0, 100.0), (40.0, 200.0))


def halving(latency: float = 0.02, fan_out: int = 32) -> Scenario:
    steps = HALVING_STEPS

    def ceiling(t: float) -> float:
        rate = steps[0][1]
        for at, r in steps:
            if at <= t:
                rate = r
        return rate

    return Scenario(
        "ceiling 200 → 100 → 200 req/s",
        lambda: Schedule(steps, burst_seconds=0.1),
        latency,
        fan_out,
        ceiling,
        duration=60.0,
    )


#: The cap-drop scenario: 16 requests at once, then 4 from 20 s on, at 200 ms a request.
CAP_DROP = (16, 4, 20.0)


class _DroppingCap(ConcurrencyLimit):
    def __init__(self, before: int, after: int, at: float) -> None:
        super().__init__(before)
        self._after, self._at = after, at

    def admit(self, now: float) -> float:
        if now >= self._at:
            self.limit = self._after
        return super().admit(now)


def cap_drop(
    latency: float = 0.2,
    fan_out: int = 32,
    duration: float = 140.0,
    *,
    before: int = CAP_DROP[0],
    after: int = CAP_DROP[1],
    at: float = CAP_DROP[2],
) -> Scenario:
    """A server that lowers its limit on requests at once from ``before`` to ``after`` at
    ``at`` seconds, for good."""
    return Scenario(
        f"concurrency {before} → {after} at {at:g} s",
        functools.partial(_DroppingCap, before, after, at),
        latency,
        fan_out,
        lambda t: (before if t < at else after) / latency,
        duration=duration,
    )


def unlimited(latency: float, fan_out: int) -> Scenario:
    return Scenario("no limit", Unlimited, latency, fan_out, constant(math.inf), duration=20.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES))
    parser.add_argument("--only", help="scenarios whose name contains this")
    parser.add_argument("--misses", action="store_true", help="print only misses")
    parser.add_argument(
        "--summary", action="store_true", help="then a markdown table per kind of server"
    )
    args = parser.parse_args(argv)
    results: list[Result] = []
    policies = args.policy or list(POLICIES)
    started = time.perf_counter()
    simulated = 0.0
    for scenario in matrix(quick=args.quick):
        if args.only and args.only not in scenario.name:
            continue
        cells = []
        miss = False
        for name in policies:
            result = run(scenario, name)
            results.append(result)
            simulated += scenario.duration
            ok = meets(result)
            if name == "controller" and not ok:
                miss = True
            cells.append(f"{name} {result.ratio:.3f} {result.share_429:6.2%}")
        if args.misses and not miss:
            continue
        print(
            f"{scenario.name:28} {scenario.latency * 1000:5g} ms ×{scenario.fan_out:<3} "
            + "  ".join(cells)
            + ("  MISS" if miss else "")
        )
    elapsed = time.perf_counter() - started
    if args.summary:
        print(summary(results, policies))
    print(f"{simulated:.0f} simulated s in {elapsed:.1f} s", file=sys.stderr)
    return 0


def _kind(name: str) -> str:
    if name.startswith("bucket"):
        return "bucket R/s burst " + name.split(" burst ")[1]
    if name.startswith(("fixed", "sliding")):
        return name.rsplit(" ", 2)[0] + " R/1 s"
    return name.split(" ")[0] + " limit"


def meets(result: Result) -> bool:
    """Issue 13's target for one scenario: goodput >= 0.95x of ideal with < 3% 429s."""
    return result.ratio >= 0.95 and result.share_429 < 0.03


def summary(results: list[Result], policies: list[str]) -> str:
    """Per kind of server: each controller's worst and median goodput ratio, its worst share of
    429s, and how many scenarios miss the target (>= 0.95x with < 3% 429s)."""
    kinds: dict[str, dict[str, list[Result]]] = {}
    for result in results:
        kinds.setdefault(_kind(result.scenario.name), {}).setdefault(result.policy, []).append(
            result
        )
    head = "| scenarios | n | " + " | ".join(
        f"{p}: min / median, max 429s, misses" for p in policies
    )
    lines = [head + " |", "|---|---|" + "---|" * len(policies)]
    for kind, by_policy in kinds.items():
        cells = []
        for policy in policies:
            group = by_policy[policy]
            ratios = sorted(r.ratio for r in group)
            median = ratios[len(ratios) // 2]
            worst = max(r.share_429 for r in group)
            misses = sum(not meets(r) for r in group)
            cells.append(f"{ratios[0]:.2f} / {median:.2f}, {worst:.1%}, {misses}")
        n = len(by_policy[policies[0]])
        lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    totals = ", ".join(
        f"{p} {sum(not meets(r) for r in results if r.policy == p)}" for p in policies
    )
    count = sum(1 for r in results if r.policy == policies[0])
    lines.append("")
    lines.append(f"Scenarios missing the target, of {count}: {totals}.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
