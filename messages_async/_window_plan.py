"""Splitting one chat into time windows of about equal count: the plan, with no I/O.

A chat's cursors form a chain, so one chat is walked one page at a time. A ``period`` filter
(docs/protocol.md §2: ``from`` inclusive, ``till`` exclusive) cuts the chat into windows that
can be walked at once, and ``total_count`` (§3) of a ``limit=1`` listing tells how many
messages lie before an instant: the planner finds the boundaries by searching on that count.

How the search goes (:class:`WindowPlanner`, driven by ``_windows.plan_windows``):

- It knows the chat's total and its newest message's ``created_at``. Every point it learns is
  an instant ``t`` and ``before(t)``, the number of messages of the selection older than ``t``.
- Round one asks, all at once, for instants going back from the newest message in steps that
  grow fourfold (a second, four, sixteen, ... about 500 years): the counts bracket every
  boundary whatever the chat's history looks like (busy now, quiet for years before).
- Each further round asks, for each boundary not yet found, one instant inside its bracket:
  interpolated on the counts, and every other round the midpoint, so a lopsided history cannot
  slow the search to a crawl. All the probes of a round go out together.
- A boundary is found when an instant's count is within ``slack`` of a window's share of its
  target, or when its bracket has shrunk to one microsecond: then one instant holds more than
  the slack allows, and the boundary goes on whichever side of it lands closer to the target.
  **A boundary never splits an instant**: the messages sharing one timestamp all fall in one
  window, which is then larger than the others (a chat whose messages all share one instant
  is one window). Boundaries that coincide are merged, so a plan may have fewer windows than
  asked for.
- After ``MAX_ROUNDS`` rounds (counts that change under the search, a server that answers
  inconsistently) the closest instant seen is taken: the windows may be uneven, never wrong.

The windows tile the selection exactly whatever the counts were: the oldest starts at the
selection's own ``from`` (or is open), each ``till`` is the next one's ``from``, and the newest
is open-ended (or ends at the selection's ``till``), so messages posted during the walk are
not lost. Counts only decide *where* the boundaries go, never whether a message is walked.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import attrs

from ._models import Message, MessagesPage, Period

__all__ = ["MAX_ROUNDS", "Window", "WindowPlanner", "advance", "tile", "unseen"]

#: Rounds of probes after which the closest instant seen is taken for each boundary left.
MAX_ROUNDS = 64
#: The finest step of the search: ``period`` instants are written to the microsecond.
RESOLUTION = timedelta(microseconds=1)
#: Round one: probes this many seconds back from the newest message, growing fourfold.
_GALLOP = tuple(4**i for i in range(18))  # 1 s ... about 545 years
_EPOCH_FLOOR = datetime(1970, 1, 1, tzinfo=UTC)


@attrs.frozen
class Window:
    """One time window of a chat, and where its walk stands (its checkpoint).

    Attributes:
        index: 0 for the newest window, counting towards older ones.
        from_: Inclusive start; ``None``: open (the oldest window of an unbounded selection).
        till: Exclusive end; ``None``: open-ended (the newest window).
        cursor: Where the walk of this window goes on; ``None``: at its newest page.
        low: The oldest message id of this window already handed out, so a walk whose
            cursor expired starts the window again and skips every id at or above it.
        estimate: About how many messages the plan expected in it (for progress displays).
    """

    index: int
    from_: datetime | None
    till: datetime | None
    cursor: str | None = None
    low: int | None = None
    estimate: int = 0

    def period(self) -> Period | None:
        """The ``period`` filter that selects this window."""
        if self.from_ is None and self.till is None:
            return None
        return Period(from_=self.from_, till=self.till)


def tile(
    boundaries: Sequence[datetime],
    *,
    since: datetime | None,
    until: datetime | None,
    estimates: Sequence[int] = (),
) -> list[Window]:
    """Windows newest first from ascending ``boundaries`` inside ``[since, until)``.

    Boundaries outside the selection, or equal to another, are dropped: no window is empty
    by construction, and consecutive windows share their boundary (no gap, no overlap).
    """
    cuts = sorted(
        {b for b in boundaries if (since is None or b > since) and (until is None or b < until)}
    )
    edges: list[datetime | None] = [since, *cuts, until]
    shares = list(estimates) if len(estimates) == len(edges) - 1 else [0] * (len(edges) - 1)
    spans = [(lo, hi, n) for (lo, hi), n in zip(itertools.pairwise(edges), shares, strict=True)]
    spans.reverse()
    return [Window(i, lo, hi, estimate=n) for i, (lo, hi, n) in enumerate(spans)]


class WindowPlanner:
    """The search for ``windows - 1`` boundaries (see the module docstring).

    Use: while ``probes()`` is not empty, answer each probe with :meth:`answer`; then read
    :meth:`windows`.

    Args:
        total: Messages in the selection (``total_count`` of the whole listing).
        windows: Windows wanted (fewer when the chat is small, one when it is empty).
        newest: ``created_at`` of the selection's newest message; ``None`` (empty selection,
            or a server that does not send it, docs/protocol.md §4): one window.
        since: The selection's own ``from`` (inclusive), if any.
        until: The selection's own ``till`` (exclusive), if any.
        slack: A boundary is good when its count is within this share of a window's size.
    """

    def __init__(
        self,
        *,
        total: int,
        windows: int,
        newest: datetime | None,
        since: datetime | None = None,
        until: datetime | None = None,
        slack: float = 0.05,
    ) -> None:
        self._since = since
        self._until = until
        self._total = total
        wanted = max(1, min(windows, total)) if newest is not None else 1
        self._share = total / wanted
        self._tolerance = int(self._share * slack)
        self._targets = [round(self._share * j) for j in range(1, wanted)]
        self._found: dict[int, datetime] = {}
        self._rounds: dict[int, int] = dict.fromkeys(range(len(self._targets)), 0)
        # Known points, ascending by instant, with their counts.
        self._at: list[datetime] = []
        self._count: list[int] = []
        self._round = 0
        self._top: datetime | None = until
        self._first: list[datetime] = []
        if not self._targets:
            return
        assert newest is not None
        top = newest + RESOLUTION
        if until is not None and top > until:
            top = until
        self._top = top
        self._learn(top, total)
        self._learn(since if since is not None else _EPOCH_FLOOR, 0)
        self._first = [
            t
            for t in (newest - timedelta(seconds=s) for s in _GALLOP)
            if t > (since if since is not None else _EPOCH_FLOOR)
        ]

    # -- the search ---------------------------------------------------------------------------

    def _learn(self, at: datetime, before: int) -> None:
        i = bisect.bisect_left(self._at, at)
        if i < len(self._at) and self._at[i] == at:
            self._count[i] = before
            return
        self._at.insert(i, at)
        self._count.insert(i, before)

    def answer(self, at: datetime, before: int) -> None:
        """``before`` messages of the selection are older than ``at`` (a probe's answer)."""
        self._learn(at, before)

    def _bracket(self, target: int) -> tuple[int, int]:
        """Indexes of the known points around ``target``: the last below, the first above."""
        lo = 0
        for i, c in enumerate(self._count):
            if c < target:
                lo = i
        hi = len(self._at) - 1
        for i in range(len(self._at) - 1, lo, -1):
            if self._count[i] > target:
                hi = i
        return lo, hi

    def _settle(self, j: int) -> datetime | None:
        """Boundary ``j`` if the known points decide it."""
        target = self._targets[j]
        best = min(range(len(self._at)), key=lambda i: (abs(self._count[i] - target), self._at[i]))
        if abs(self._count[best] - target) <= self._tolerance:
            return self._at[best]
        lo, hi = self._bracket(target)
        if hi <= lo or self._at[hi] - self._at[lo] <= RESOLUTION or self._round >= MAX_ROUNDS:
            return self._at[best]
        return None

    def _probe(self, j: int) -> datetime:
        target = self._targets[j]
        lo, hi = self._bracket(target)
        t_lo, t_hi = self._at[lo], self._at[hi]
        c_lo, c_hi = self._count[lo], self._count[hi]
        span = t_hi - t_lo
        self._rounds[j] += 1
        if self._rounds[j] % 2 == 0 or c_hi <= c_lo:
            step = span / 2
        else:
            step = span * ((target - c_lo) / (c_hi - c_lo))
            step = min(max(step, span / 16), span - span / 16)
        at = t_lo + step
        # Strictly inside the bracket, so every probe narrows it.
        return min(max(at, t_lo + RESOLUTION), t_hi - RESOLUTION)

    def probes(self) -> list[datetime]:
        """The instants whose counts the next round needs; empty once the plan is made."""
        if self._first:
            first, self._first = self._first, []
            return first
        wanted: list[datetime] = []
        for j in range(len(self._targets)):
            if j in self._found:
                continue
            settled = self._settle(j)
            if settled is not None:
                self._found[j] = settled
                continue
            at = self._probe(j)
            if at not in wanted:
                wanted.append(at)
        self._round += 1
        return wanted

    @property
    def rounds(self) -> int:
        return self._round

    def windows(self) -> list[Window]:
        """The plan, newest window first. Call once :meth:`probes` came back empty."""
        if len(self._found) < len(self._targets):
            raise RuntimeError("the plan is not made yet: answer every probe first")
        floor = self._since if self._since is not None else _EPOCH_FLOOR
        # A cut at the top would only split off a window for messages posted later: the
        # newest window is open-ended anyway.
        top = self._top
        cuts = sorted({b for b in self._found.values() if b > floor and (top is None or b < top)})
        counts = [0, *(self._count[self._at.index(c)] for c in cuts), self._total]
        shares = [max(0, b - a) for a, b in itertools.pairwise(counts)]
        return tile(cuts, since=self._since, until=self._until, estimates=shares)


def unseen(window: Window, items: Sequence[Message]) -> list[Message]:
    """The items of a page of ``window`` not handed out yet: after a restart at the window's
    newest page, every id at or above ``low`` was (ids fall as a walk goes, §3)."""
    if window.low is None:
        return list(items)
    return [m for m in items if m.id < window.low]


def advance(window: Window, page: MessagesPage) -> Window | None:
    """The window's checkpoint after ``page`` (its new items handed out); ``None``: done."""
    if not page.next_cursor:
        return None
    low = page.items[-1].id if page.items else window.low
    if window.low is not None and low is not None:
        low = min(low, window.low)
    return attrs.evolve(window, cursor=page.next_cursor, low=low)
