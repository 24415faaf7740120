"""The rate controller: when the next request of a client may go, and how many may be in flight.

A pure state machine over an injected clock (no asyncio, no I/O): events in (a request was sent,
succeeded, was throttled with a 429, failed; the server asked for a pause), answers out
(:meth:`RateController.next_send`). ``_limiter.py`` drives it for the transport, and the
simulation in ``benchmarks/sim.py`` drives the same code on a virtual clock.

Why it works the way it does. Every 429 costs the whole client a ``Retry-After`` pause
(docs/protocol.md §7), a second or more however little the client overshot, so a controller that
probes by overshooting (AIMD, CUBIC) pays a pause per probe. This one overshoots as rarely as it
can and learns as much as it can from each overshoot:

- **Slow start.** A new client sends up to ``initial_window`` requests at once and widens the
  window by one per success (doubling per round trip, as TCP does) up to ``max_concurrency``.
  It does not pace at all until a server throttles it.
- **Reading the limit off a 429.** A token bucket of rate R and capacity B, full at the start of
  a stretch, answers its first 429 at the moment T when, for some earlier t, the client's sends
  in [t, T) exceed B + R·(T − t). Given the send times of the stretch and B, the lowest R that
  explains the 429 is ``max over t of (sent(t, T) − B) / (T − t)``: one pass, no search. B
  comes from two stretches together (two equations, two unknowns); until there are two, the
  client paces at what it has seen get through (a floor, assuming a burst of at most a second)
  and ramps up tenfold a second until the next 429 gives the second equation.
- **Holding.** It then paces at ``margin`` of the rate it read, and does not probe upward for
  ``probe_after`` seconds: a failed probe costs a pause, so probes are rare.
- **Probing.** After that, the pace ramps up slowly until a 429 reads the limit again; each
  probe that finds no higher limit doubles the wait before the next. A limit that has just
  *dropped* is probed for its return much sooner (``recall_after``), straight back at the old
  rate, because such a drop is usually a server shedding load for a while; only a limit held
  for ``recall_after`` seconds is gone back to, not one read too high off a short stretch.
- **A limit on requests at once.** A server that counts requests in flight answers 429 when
  one more than it allows is sent, whatever the pace. Two 429s in a row at the same count, with
  nothing let in at that count for a minute (``_EVIDENCE``), say so: the window is held one
  below it, unpaced, and the cap is probed upward as rarely as a rate. A 429 within the cap
  says it was a rate after all, for as long. Evidence ages because servers change their
  limits: one that lowers its cap for good is read as a cap again a minute later, not paced
  as a rate forever.
- **A 429 with nothing let through** says nothing about the rate (a transient storm): the pause
  does the work and the pace is left as it was.
- **The server stopped limiting.** A pace that has ramped far above what the window lets through
  is dropped: the client is unpaced again.
"""

from __future__ import annotations

import collections
import enum
import itertools
import math

__all__ = ["Outcome", "Priority", "RateController", "Ticket"]


class Outcome(enum.Enum):
    OK = "ok"
    THROTTLED = "throttled"  # 429: the server is telling this client to slow down
    FAILED = "failed"  # anything else; says nothing about the server's rate limit


class Priority(enum.IntEnum):
    """Who goes first when requests wait for a slot: lower values first."""

    INTERACTIVE = 0  # a single call (get, add, edit, delete) or a watch poll
    BULK = 1  # a page of a walk over many chats (iter_many, export)


class Ticket:
    """What the controller needs back about one sent request."""

    __slots__ = ("epoch", "in_flight", "sent_at", "seq")

    def __init__(self, epoch: int, seq: int, sent_at: float, in_flight: int) -> None:
        self.epoch = epoch
        self.seq = seq  # sends of this client before this one
        self.sent_at = sent_at
        self.in_flight = in_flight


class _Phase(enum.Enum):
    START = "slow start"  # unpaced, window growing
    RAMP = "ramp"  # paced, growing fast: the limit is not known yet
    HOLD = "hold"  # paced just below the limit read off the last 429
    PROBE = "probe"  # paced, growing slowly: looking for a higher limit


#: Send times kept for reading the limit off a 429; older ones only ever lower the estimate.
_HISTORY = 8192
#: Shortest stretch a rate is computed over when nothing better says.
_MIN_SPAN = 0.05
#: Slowest pace, in requests per second: a client always makes progress.
_MIN_RATE = 0.5
#: A burst is assumed to be at most this many seconds of the rate (for the first estimate).
_MAX_BURST_SECONDS = 1.0
#: A pace this many times what the window lets through binds nothing and is dropped.
_UNBOUND = 4.0
#: A reading of fewer than _FEW sends this close to the pace that met the 429 says only
#: "too fast": cut the pace to _BETA of it.
_NO_NEWS = 0.99
_FEW = 8
_BETA = 0.7
#: Rounds of refining the burst from two stretches.
_ROUNDS = 30
#: One 429 cuts the pace to no less than this share of the pace that met it.
_FLOOR = 0.5
#: A new limit below this share of the old one is a drop that may come back.
_DROP = 0.8
#: A probe that reads a limit above this share of the old one has found a higher limit.
_RISE = 1.05
#: Seconds that what showed a count in flight is no concurrency limit is believed: long
#: enough to tell a bucket's bursts after pauses from a cap, short enough for a cap that a
#: server lowers to be read as one.
_EVIDENCE = 60.0


def _ceiling(sends: tuple[float, ...], throttled_at: float, burst: float) -> float:
    """The highest token-bucket rate under which ``sends`` meet a 429 at ``throttled_at``.

    A bucket of rate R and capacity B that was full when the stretch began has fewer than one
    token at T when, for some t, B + R·(T − t) − sent[t, T) < 1: so R is below
    ``max over t of (sent[t, T) + 1 − B) / (T − t)``, over the send times before T (the sends of
    one stretch, oldest first). 0.0 when nothing says.
    """
    best = 0.0
    for count, sent_at in enumerate(reversed(sends), 1):
        span = throttled_at - sent_at
        if span > 0.0:
            rate = (count + 1.0 - burst) / span
            if rate > best:
                best = rate
    return best


def _excess(sends: tuple[float, ...], throttled_at: float, rate: float) -> float:
    """The burst a bucket of ``rate`` must at least have had to let every one of ``sends`` in:
    the most they ran ahead of the rate over an interval ending at the 429."""
    best = 0.0
    for count, sent_at in enumerate(reversed(sends), 1):
        value = count - rate * (throttled_at - sent_at)
        if value > best:
            best = value
    return best


class RateController:
    """The pacing and window decisions of one client. Times are in the caller's clock's seconds.

    Args:
        max_concurrency: most requests in flight at once.
        now: the clock's reading when the client was created.
        initial_window: requests in flight allowed before any has succeeded (slow start).
        margin: share of the rate read off a 429 that the client then paces at.
        ramp: growth of the pace per second while the limit is unknown.
        probe_growth: growth of the pace per second while probing for a higher limit.
        probe_after: seconds held at a limit before the first probe for a higher one.
        recall_after: seconds after a drop before probing whether the old limit is back.
        max_probe_after: the wait before a probe doubles after each probe that finds nothing,
            up to this.
        max_rate: requests per second never exceeded (a limit the caller knows): the client
            is paced at it from the first request, and a 429 still slows it further.
    """

    def __init__(
        self,
        max_concurrency: int,
        *,
        now: float,
        initial_window: int = 8,
        margin: float = 0.995,
        ramp: float = 10.0,
        probe_growth: float = 1.1,
        probe_after: float = 60.0,
        recall_after: float = 4.0,
        max_probe_after: float = 600.0,
        max_rate: float | None = None,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.margin = margin
        self.ramp = ramp
        self.probe_growth = probe_growth
        self.probe_after = probe_after
        self.recall_after = recall_after
        self.max_probe_after = max_probe_after
        self.max_rate = max_rate

        self.phase = _Phase.START
        self.in_flight = 0
        self.window = float(min(max_concurrency, initial_window))
        self.pace: float | None = None
        self.paused_until = now
        self.limit: float | None = None  # the rate read off the last 429
        self.burst: float | None = None  # the server's burst, once two stretches told it
        self._epoch = 0
        self._next_send = now
        self._grown_at = now  # the pace has grown up to this time
        self._quiet_since = now  # start of the current stretch without a 429
        self._wait = probe_after  # before the next probe
        self._recall: tuple[float, float] | None = None  # a limit that dropped, and until when
        self._sends: collections.deque[float] = collections.deque(maxlen=_HISTORY)
        self._count = 0  # sends ever
        self._retry_after = 1.0  # the last pause the server asked for
        self._first: tuple[tuple[float, ...], float] | None = None  # the first stretch
        self._fastest = 0.0  # best success latency seen: what the window lets through
        self.cap: int | None = None  # a concurrency limit the server enforces, once told
        self._capped_at = now  # when the cap was last set or raised
        # When a request let in at each count in flight was last answered: a count let in
        # lately cannot be a concurrency limit (one let in long ago may be: limits change).
        self._admitted_at = [-math.inf] * (max_concurrency + 1)
        self._last_count = 0  # in flight at the 429 before
        self._refuted = (0, -math.inf)  # a count a 429 showed is not a concurrency limit, and when
        self._confirmed: float | None = None  # the last limit held for a while
        if max_rate is not None:
            self._set_pace(max_rate, now, _Phase.HOLD)
            self.limit = max_rate

    # -- answers --------------------------------------------------------------------------------

    def next_send(self, now: float) -> float | None:
        """When the next request may go (``now`` or later); ``None`` while the window is full:
        the answer changes only when a request finishes."""
        if self.in_flight >= int(self.window):
            return None
        self._grow(now)
        return max(self.paused_until, self._next_send, now)

    def paused_for(self, now: float) -> float:
        return max(0.0, self.paused_until - now)

    # -- events ---------------------------------------------------------------------------------

    def sent(self, now: float) -> Ticket:
        """A request goes now (the caller checked :meth:`next_send`)."""
        self._grow(now)
        self.in_flight += 1
        if self.pace is not None:
            # Pace from the later of the slot and now, minus a little slack for a late timer,
            # so a wake-up a millisecond late does not lower the rate for good.
            # A bucket lets at most its burst through at once, so never catch up by more.
            slack = min(1.0 / self.pace, 0.005)
            if self.burst is not None:
                slack = min(slack, (self.burst - 1.0) / self.pace)
            self._next_send = max(self._next_send, now - slack) + 1.0 / self.pace
        self._sends.append(now)
        self._count += 1
        return Ticket(self._epoch, self._count - 1, now, self.in_flight)

    def answered(self, ticket: Ticket, now: float, outcome: Outcome) -> None:
        """The answer to a sent request, whatever it was."""
        if outcome is Outcome.OK:
            self.succeeded(ticket, now)
        elif outcome is Outcome.THROTTLED:
            self.throttled(ticket, now)
        else:
            self.failed(ticket, now)

    def unsent(self, ticket: Ticket) -> None:
        """A granted request was never sent (its caller was cancelled)."""
        self.in_flight -= 1

    def succeeded(self, ticket: Ticket, now: float) -> None:
        self.in_flight -= 1
        latency = now - ticket.sent_at
        if latency > 0 and (self._fastest == 0.0 or latency < self._fastest):
            self._fastest = latency
        if ticket.epoch == self._epoch:
            # (Sent before a 429 came back, its count may include requests already refused.)
            self._admitted_at[min(ticket.in_flight, self.max_concurrency)] = now
        top = self.max_concurrency
        if self.cap is not None:
            if now - self._capped_at >= self._wait:
                # Probe whether the server allows one more at once now.
                self.cap = min(top, self.cap + 1)
                self._capped_at = now
                self._wait = min(self._wait * 2.0, self.max_probe_after)
            top = self.cap
            self.window = min(self.window, float(top))
        if self.phase is _Phase.START and self.window < top:
            self.window = min(float(top), self.window + 1.0)

    def failed(self, ticket: Ticket, now: float) -> None:
        self.in_flight -= 1

    def throttled(self, ticket: Ticket, now: float) -> None:
        """A 429. The first of each stretch is read; the rest of the same burst are echoes."""
        self.in_flight -= 1
        if ticket.epoch != self._epoch:
            return
        self._epoch += 1
        self._grow(now)
        if not self._concurrency_limited(ticket, now):
            self._learn(ticket, now)
        self._sends.clear()

    def pause(self, now: float, seconds: float) -> None:
        """The server asked for ``seconds`` of silence (``Retry-After``): nothing goes till then."""
        until = now + max(0.0, seconds)
        if seconds > 0:
            self._retry_after = seconds
        if until > self.paused_until:
            self._grow(now)
            self.paused_until = until
            self._quiet_since = until
            self._grown_at = max(self._grown_at, until)  # no growth while silent
            self._next_send = max(self._next_send, until)
            self._sends.clear()

    # -- the decisions --------------------------------------------------------------------------

    def _learn(self, ticket: Ticket, now: float) -> None:
        throttled_at = ticket.sent_at
        # The sends of this stretch that went before the throttled one: the server let them in.
        before = ticket.seq - (self._count - len(self._sends))
        sends = tuple(itertools.islice(self._sends, max(0, before)))
        if not sends:
            return  # nothing got through: says nothing about the rate
        if self.burst is None and (self.pace is None or self._first is None):
            # The first reading: one equation, two unknowns. Pace at a floor (what got through,
            # over the stretch plus the longest burst assumed) and ramp up until the next 429.
            self._first = (sends, throttled_at)
            floor = len(sends) / (throttled_at - sends[0] + _MAX_BURST_SECONDS)
            self._set_pace(max(_MIN_RATE, floor), now, _Phase.RAMP)
            return
        if self.limit is not None and throttled_at - self._quiet_since >= self.recall_after:
            # Only a limit the client held for a while is worth going back to after a drop:
            # one read off a short stretch may just have been read too high.
            self._confirmed = self.limit
        pace_then = self.pace
        floor = 0.0
        if self.burst is None:
            self.burst = self._solve_burst(sends, throttled_at)
            if self._first is not None:
                first, first_at = self._first
                floor = len(first) / (first_at - first[0] + _MAX_BURST_SECONDS)
        elif pace_then is not None:
            floor = pace_then * _FLOOR
        # Below what got through in the first stretch, or a sharp cut in one step, the
        # reading is not a token bucket's (a fixed or sliding window is refilled in steps):
        # those bounds hold until the next 429 says more.
        # The 429 bounds the rate from above; the last send let in, from below.
        roof = _ceiling(sends, throttled_at, self.burst)
        ground = _ceiling(sends[:-1], sends[-1], self.burst) if len(sends) > 1 else 0.0
        reading = (roof + ground) / 2 if 0.0 < ground < roof else roof
        floor = max(floor, self.burst / self._retry_after)
        limit = max(reading, floor)
        if pace_then is not None and self.phase is _Phase.HOLD:
            # Held below the limit read last time and throttled anyway: the burst was read
            # too small. At a constant pace p a bucket of rate R and burst B runs dry after
            # (B - 1) / (p - R) s, so with B at most one more than read, R is at least this:
            held = max(throttled_at - self._quiet_since, _MIN_SPAN)
            lower = pace_then - self.burst / held
            limit = min(limit, max(lower, pace_then * _BETA) / self.margin)
        if pace_then is not None and limit >= pace_then * _NO_NEWS:
            # The pace that met the 429 is a roof; a short stretch that says only "too
            # fast" cuts it as CUBIC would.
            limit = pace_then * (_BETA if len(sends) < _FEW else _NO_NEWS)
        limit = max(_MIN_RATE, limit)
        old, self.limit = self.limit, limit
        if self._recall is not None and (now > self._recall[1] or limit > self._recall[0] * _DROP):
            self._recall = None  # came back, or gone for too long to wait for
        confirmed = self._confirmed
        if confirmed is not None and limit < confirmed * _DROP and self.phase is not _Phase.RAMP:
            self._recall = (confirmed, now + self.max_probe_after / 10)
        if self._recall is not None:
            self._wait = self.recall_after
        elif self.phase is _Phase.PROBE and old is not None and limit <= old * _RISE:
            self._wait = min(self._wait * 2.0, self.max_probe_after)
        else:
            self._wait = self.probe_after
        self._set_pace(limit * self.margin, now, _Phase.HOLD)

    def _concurrency_limited(self, ticket: Ticket, now: float) -> bool:
        """Whether 429s come from a limit on requests at once rather than on their rate.

        Such a server answers 429 exactly when one more than it allows is in flight, whatever
        the pace: two 429s in a row at the same count, none let in at that count or more
        lately (``_shown_not_a_cap``), say so. The client then keeps the window below the
        count, unpaced, and probes it upward as rarely as a paced client probes its rate.
        """
        count = ticket.in_flight
        if self.cap is not None:
            if count > self.cap:
                return True  # the probe's answer, or requests sent before the cap was set
            # Throttled within the cap: it is the rate that is limited after all.
            self._refuted = (self.cap + 1, now)
            self.cap = None
            self._last_count = 0
            return False
        let_in = ticket.seq - (self._count - len(self._sends))  # sent before it this stretch
        if count <= 1 or let_in <= 0 or self._shown_not_a_cap(count, now):
            return False
        if self.cap is None and self._last_count != count:
            self._last_count = count
            return False
        was = self.cap
        self.cap = count - 1
        self._capped_at = now
        if was is None or self.cap < was:
            self._wait = self.probe_after
        self.pace = self.max_rate
        self.phase = _Phase.START
        self.window = float(self.cap)
        self._next_send = now
        return True

    def _shown_not_a_cap(self, count: int, now: float) -> bool:
        """Whether the last ``_EVIDENCE`` seconds showed that ``count`` in flight is not the
        server's limit: a request let in at ``count`` or more, or a 429 within a cap at or
        above it (the rate was limited after all).

        That long, because a bucket's burst after a pause looks like a cap (the same count
        refused stretch after stretch) and only what came between the bursts tells the two
        apart; no longer, because servers change their limits, and one that lowers its cap
        must be read as one.
        """
        since = now - _EVIDENCE
        refuted, refuted_at = self._refuted
        if count <= refuted and refuted_at > since:
            return True
        return max(self._admitted_at[count:], default=-math.inf) > since

    def _solve_burst(self, sends: tuple[float, ...], throttled_at: float) -> float:
        """The burst B that makes the first stretch and this one agree on one rate R.

        Each stretch that started with a full bucket and ended in a 429 ties B to R: the
        first (a burst, mostly) says B = excess(R), this one says R = ceiling(B). Starting
        from all of the first stretch as the burst (too much: it includes what refilled
        meanwhile), each round lowers B and raises R, so every guess errs on the slow side.
        """
        if self._first is None:
            return 1.0
        first, first_at = self._first
        burst = float(len(first))
        for _ in range(_ROUNDS):
            rate = _ceiling(sends, throttled_at, burst)
            # A bucket holds whole requests: B is the least whole number not below the excess.
            lower = max(1.0, math.ceil(_excess(first, first_at, rate) - 1e-6))
            if lower >= burst:
                break
            burst = lower
        return burst

    def _set_pace(self, pace: float, now: float, phase: _Phase) -> None:
        self.pace = pace if self.max_rate is None else min(pace, self.max_rate)
        self.phase = phase
        self._grown_at = max(now, self.paused_until)
        self.window = float(self.max_concurrency)

    def _grow(self, now: float) -> None:
        """Advance the pace to ``now``: ramping or probing grows it, holding starts a probe."""
        if self.pace is None or now <= self._grown_at:
            return
        if self.phase is _Phase.HOLD:
            if now - self._quiet_since < self._wait:
                self._grown_at = now
                return
            self.phase = _Phase.PROBE
            if self._recall is not None:
                self.pace = max(self.pace, self._recall[0] * self.margin)
        growth = self.ramp if self.phase is _Phase.RAMP else self.probe_growth
        self.pace *= growth ** (now - self._grown_at)
        self._grown_at = now
        if self.max_rate is not None:
            self.pace = min(self.pace, self.max_rate)
        elif self._fastest > 0 and self.pace > _UNBOUND * self.max_concurrency / self._fastest:
            # Far above anything the window could use: the server has stopped limiting.
            self.pace = None
            self.phase = _Phase.START
            self._next_send = now
        elif not math.isfinite(self.pace):
            self.pace = None
            self.phase = _Phase.START
