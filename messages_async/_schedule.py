"""The watch's decisions, as a state machine: which chat to poll when, and where each chat starts.

Nothing here does I/O, reads a clock or draws an unseeded random number: the asyncio layer
(``_watch.py``) feeds it events with the time they happened (``now``, in seconds on any
monotonic clock) and carries out the actions it answers, in h11's style. Tests drive it event
by event on a made-up clock.

Events: the chats were listed (or listing them failed), a poll saw a chat's newest id for the
first time, a poll fetched a batch, a poll ended (with or without news) or failed, a message
was handed to the consumer. Actions, from :meth:`WatchSchedule.next_action`: poll this chat,
list the chats, the watch is over; or the time at which to ask again.

**Where a chat starts** (docs/protocol.md §7: a message is new when its id is above the chat's
watermark, or, for a chat not seen before, above the largest id seen in any chat when the
watch started). The watch starts with its first round: one poll of every chat present then.
The *start mark* is the largest id those polls saw in any chat. A chat begins at
``since[chat_id]`` when given (watching every chat, a chat missing from a given ``since``
appeared after it was saved, and begins after its largest id), else at its newest id in its
first poll. If that poll fails, the chat begins at the start mark as known at that moment, not
at "newest when it first succeeds", so nothing posted in it during the outage is skipped. Ids
grow server-wide (docs/protocol.md §2), so every message posted later has a larger id; the
price: if that chat held messages newer than every id seen so far, they are yielded as well.
If no id was seen yet, the chat is pinned at the first id the first round sees; if the round
sees none (every chat empty or failing), the chat begins at its newest id in the first poll
that succeeds, as there is nothing to compare with. With explicit ``chat_ids``, ``since`` says
nothing about the other chats: they start from now, and one whose first poll fails never starts
at an old saved mark.

**Chats listed later** (watching every chat) begin at the start mark, so everything posted in
them after the start is yielded (a new chat's whole history when no chat held a message at the
start). A chat present at the start but never read (its first poll got a 404) is not new: when
listed again it begins like a chat whose first poll failed. A chat dropped (404, 403, missing
from a listing) keeps its watermark; listed again, it goes on from there.

**Cadence.** A quiet chat's interval grows by half per empty poll up to ``max_interval``; one
with news goes back to ``interval``. Each wait is jittered by ±10 %, but never beyond
``max_interval``: a message in a quiet chat is seen within ``max_interval`` of being posted.
A chat that reaches ``max_interval`` first waits a random time up to it (at least
``interval``, or half the cap if that is shorter), so chats that went quiet together poll
evenly spread over the cap instead of in one burst per cycle. Watching
every chat, the chats are listed again every ``rediscover`` seconds (by default
``max_interval``: a new chat is noticed about as soon as a quiet chat's next message).

**Failures** are classified once, by ``_retry.after_failed_call``: a gone chat (404, 403
``forbidden``) is dropped; an outage (``AGAIN``) or an expired cursor (``RESTART``: the next
poll starts from the newest page anyway) backs the chat off exponentially, from ``interval``
up to ``max(max_interval, 60 s)`` (or the server's ``Retry-After``), so a chat that stays
unreadable costs one request per backoff, however long the outage; everything else
(``GIVE_UP``: a body that breaks the contract, refused credentials, a missing scope, a closed
client) is raised to the consumer, once. A misbehaving listing (``PaginationError``: a cursor
cycle, a page going backwards) is ``AGAIN`` as it may be a server mid-deploy, but only for
``MAX_MISBEHAVING_ROUNDS`` polls in a row: then it is raised too, so no broken chat is polled
without end. Listing the chats is retried the same way until the
first listing succeeds; a later listing that fails keeps the chat list as it is.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Iterable, Sequence

import attrs

from ._errors import NotFoundError, PaginationError, PermissionDeniedError
from ._models import Message
from ._retry import RoundVerdict, after_failed_call

__all__ = [
    "END",
    "FailedPoll",
    "ListChats",
    "Listed",
    "PollChat",
    "WatchSchedule",
]

#: Factor by which a quiet chat's polling interval grows after each empty poll.
GROWTH = 1.5
#: Longest a chat waits after repeated transient errors, when ``max_interval`` is shorter.
MAX_ERROR_BACKOFF = 60.0
#: Polls in a row that end in a misbehaving listing (``PaginationError``) before it is raised.
MAX_MISBEHAVING_ROUNDS = 5


@attrs.frozen
class PollChat:
    """Action: poll ``chat_id``. ``stint`` tells this stint of the chat from a later one (after
    it was dropped and listed again): events about an older stint change nothing."""

    chat_id: int
    stint: int


@attrs.frozen
class ListChats:
    """Action: list the chats (``first``: the watch's first listing, retried until it works)."""

    first: bool


class _End(enum.Enum):
    END = "END"


#: Action: nothing is left to watch (every chat of an explicit ``chat_ids`` is gone).
END = _End.END

Action = PollChat | ListChats | _End


@attrs.frozen
class FailedPoll:
    """What a failed poll or listing means: ``raise_it``, ``dropped``, or tried again after
    ``delay`` seconds (``count``: failures in a row, for the log)."""

    raise_it: bool = False
    dropped: bool = False
    delay: float = 0.0
    count: int = 0


@attrs.frozen
class Listed:
    """What a listing changed: chats newly watched and chats dropped."""

    added: list[int]
    dropped: list[int]


@attrs.define
class _Chat:
    stint: int
    interval: float
    failures: int = 0
    misbehaved: int = 0  # PaginationErrors in a row
    # Whether the chat got its random phase since it last reached max_interval.
    phased: bool = False


class WatchSchedule:
    """The state of one watch. See the module docstring for the rules.

    Args:
        chat_ids: The chats to watch; ``None``: every chat, listed first.
        since: ``{chat_id: watermark}`` to resume after (checked by the caller).
        interval: Seconds between polls of a chat with news.
        max_interval: Longest interval of a quiet chat.
        rediscover: Seconds between listings of the chats (watching every chat).
        rng: Draws the jitter and the phases (seed it for a reproducible schedule).
        now: The time the watch starts.
    """

    def __init__(
        self,
        chat_ids: Sequence[int] | None,
        *,
        since: dict[int, int],
        interval: float,
        max_interval: float,
        rediscover: float,
        rng: random.Random,
        now: float,
    ) -> None:
        self.explicit = chat_ids is not None
        self.since = since
        self.interval = interval
        self.max_interval = max_interval
        self.rediscover = rediscover
        self.rng = rng
        # The poller's side: the largest id fetched, per chat. Kept when a chat is dropped, so
        # a chat that is listed again goes on from there without repeats.
        self.fetched: dict[int, int] = {}
        # The consumer's side: the largest id handed to the consumer (plus starting points).
        self.public: dict[int, int] = {}
        self.chats: dict[int, _Chat] = {}
        self._heap: list[tuple[float, int, int, int]] = []  # (due, seq, chat id, stint)
        self._seq = 0
        # Chats present at the start (explicit, or in the first listing).
        self.initial: set[int] = set()
        # Chats whose first poll has not ended yet; the start mark is final once it is empty.
        self._first_round: set[int] = set()
        # The start mark: the largest id the first polls saw in any chat.
        self.start_max = 0
        # Chats present at the start whose first poll failed while no id had been seen yet:
        # pinned at the first start mark the round sees.
        self._unanchored: set[int] = set()
        self.set_up = False
        self.ready = False
        self._ended = False
        self._listing_due: float | None = None if chat_ids is not None else now
        self._listing_busy = False
        self._listing_failures = 0
        if chat_ids is not None:
            self._set_up(list(chat_ids), now)

    # -- actions ------------------------------------------------------------------------------

    def next_action(self, now: float) -> Action | float | None:
        """The next thing to do now; else the time to ask again (None: after the next event)."""
        if self.set_up and self.explicit and not self.chats and not self._ended:
            self._ended = True
            return END
        if self._ended:
            return None
        while self._heap and self._heap[0][0] <= now:
            _, _, chat_id, stint = heapq.heappop(self._heap)
            if self.is_current(chat_id, stint):
                return PollChat(chat_id, stint)
        due = self._listing_due
        # Listed again only once the watch is ready (its first round is over).
        if due is not None and not self._listing_busy and (self.ready or not self.set_up):
            if due <= now:
                self._listing_busy = True
                return ListChats(first=not self.set_up)
        else:
            due = None
        if self._heap and (due is None or self._heap[0][0] < due):
            due = self._heap[0][0]
        return due

    def is_current(self, chat_id: int, stint: int) -> bool:
        chat = self.chats.get(chat_id)
        return chat is not None and chat.stint == stint

    def watermark(self, poll: PollChat) -> int | None:
        """Where the poll starts: new messages are above it; None: the chat's first read (its
        newest id becomes its starting point)."""
        return self.fetched.get(poll.chat_id)

    # -- events: listing ----------------------------------------------------------------------

    def chats_listed(self, now: float, chat_ids: Iterable[int]) -> Listed:
        self._listing_busy = False
        self._listing_failures = 0
        self._listing_due = now + self.rediscover
        listed = list(dict.fromkeys(chat_ids))
        if not self.set_up:
            self._set_up(listed, now)
            return Listed(added=[], dropped=[])
        added = [c for c in listed if c not in self.chats]
        for chat_id in added:
            self._add(chat_id, self._start_for(chat_id), now)
        present = set(listed)
        dropped = [c for c in self.chats if c not in present]
        for chat_id in dropped:
            self._drop(chat_id, now)
        return Listed(added=added, dropped=dropped)

    def listing_failed(self, now: float, exc: BaseException) -> FailedPoll:
        self._listing_busy = False
        if after_failed_call(exc) is RoundVerdict.GIVE_UP:
            return FailedPoll(raise_it=True)
        if not self.set_up:
            self._listing_failures += 1
            delay = self._backoff(self._listing_failures, exc)
            self._listing_due = now + delay
            return FailedPoll(delay=delay, count=self._listing_failures)
        # The chat list is kept as it is until the next listing.
        self._listing_due = now + self.rediscover
        return FailedPoll(delay=self.rediscover, count=1)

    # -- events: polls ------------------------------------------------------------------------

    def first_read(self, now: float, poll: PollChat, newest: int) -> None:
        """The chat's first read succeeded: ``newest`` is its newest id (0: it is empty)."""
        if self.is_current(poll.chat_id, poll.stint):
            self._pin(poll.chat_id, newest)
            self._unanchored.discard(poll.chat_id)
        self._first_poll_done(poll.chat_id, newest, now)
        self._check_ready(now)

    def fetched_batch(self, poll: PollChat, batch: Sequence[Message]) -> list[Message]:
        """New messages a poll fetched, oldest first: what of them to hand on (the watermark
        moves with them; nothing when the poll's stint is over)."""
        if not self.is_current(poll.chat_id, poll.stint):
            return []  # dropped meanwhile: if listed again, it is read again from its watermark
        mark = self.fetched.get(poll.chat_id, -1)
        new = [m for m in batch if m.id > mark]
        if new:
            # Moved before the batch is handed on, while this poll is still the chat's current
            # one: handing it on may wait for a slow consumer past a drop and a new listing of
            # the chat, and the new poll must not fetch this batch again. That wait is only
            # ever cancelled when the whole watch stops, so moving early never loses a batch.
            self.fetched[poll.chat_id] = new[-1].id
        return new

    def poll_done(self, now: float, poll: PollChat, *, got_new: bool) -> None:
        chat = self.chats.get(poll.chat_id)
        if chat is None or chat.stint != poll.stint:
            return
        chat.failures = chat.misbehaved = 0
        if got_new:
            chat.interval = self.interval
            chat.phased = False
        else:
            chat.interval = min(self.max_interval, chat.interval * GROWTH)
        if chat.interval >= self.max_interval and not chat.phased:
            # Reaching the cap. Chats that went quiet together would poll in one burst per
            # cycle from now on (a small jitter takes many cycles to spread them): a random
            # phase within the cap spreads them evenly at once.
            chat.phased = True
            delay = self.rng.uniform(min(self.interval, self.max_interval / 2), self.max_interval)
        else:
            # A little jitter keeps the phases from drifting back together; never past the
            # cap, which bounds how long a message in a quiet chat waits to be seen.
            delay = min(self.max_interval, chat.interval * self.rng.uniform(0.9, 1.1))
        self._schedule(poll.chat_id, chat.stint, now + delay)

    def poll_failed(self, now: float, poll: PollChat, exc: BaseException) -> FailedPoll:
        chat_id = poll.chat_id
        if isinstance(exc, (NotFoundError, PermissionDeniedError)):
            if self.is_current(chat_id, poll.stint):
                self._drop(chat_id, now)
            return FailedPoll(dropped=True)
        if after_failed_call(exc) is RoundVerdict.GIVE_UP:
            return FailedPoll(raise_it=True)
        if chat_id not in self.fetched:
            # No starting point yet, and "its newest id when a poll first succeeds" would skip
            # what is posted during the outage: start at the start mark as known now.
            if self.start_max > 0:
                self._pin(chat_id, self.start_max)
            elif chat_id in self.initial:
                self._unanchored.add(chat_id)
        self._first_poll_done(chat_id, None, now)
        chat = self.chats.get(chat_id)
        if chat is None or chat.stint != poll.stint:
            return FailedPoll()
        chat.failures += 1
        if isinstance(exc, PaginationError):
            # A listing that misbehaves (cycles, goes backwards) is no outage: after a few
            # rounds in a row it is taken for what it is, a server breaking the contract.
            chat.misbehaved += 1
            if chat.misbehaved >= MAX_MISBEHAVING_ROUNDS:
                return FailedPoll(raise_it=True)
        delay = self._backoff(chat.failures, exc)
        self._schedule(chat_id, chat.stint, now + delay)
        return FailedPoll(delay=delay, count=chat.failures)

    def delivered(self, chat_id: int, message_id: int) -> None:
        """A message was handed to the consumer: the consumer's watermark moves."""
        if message_id > self.public.get(chat_id, -1):
            self.public[chat_id] = message_id

    # -- the rules ----------------------------------------------------------------------------

    def _set_up(self, chat_ids: list[int], now: float) -> None:
        self.initial = set(chat_ids)
        fresh = [c for c in chat_ids if c not in self.since]
        if self.since and not self.explicit:
            # Watching every chat, resumed from saved watermarks: a chat missing from them
            # appeared after they were saved, so it starts after the largest saved id. What
            # was posted in it meanwhile is yielded; nothing can be a repeat.
            self.start_max = max(self.start_max, *self.since.values())
            for chat_id in fresh:
                self._add(chat_id, self.start_max, now)
            fresh = []
        # Readiness waits for these first polls only. They hand nothing on, and they go
        # before the resumed chats, whose polls may wait for a consumer not reading yet.
        self._first_round = set(fresh)
        for chat_id in fresh:
            self._add(chat_id, None, now)
        for chat_id in chat_ids:
            if chat_id in self.since:
                self._add(chat_id, self.since[chat_id], now)
        self.set_up = True
        self._check_ready(now)

    def _start_for(self, chat_id: int) -> int | None:
        """Where a chat listed after the start begins; None: at its newest id when first read."""
        # Watched before (dropped, now listed again): on from its watermark, so nothing is
        # repeated. fetched starts at since[chat_id] and only grows, so it covers since too.
        known = self.fetched.get(chat_id, self.since.get(chat_id))
        if known is not None:
            return known
        if chat_id in self.initial and self.start_max == 0:
            # Present at the start but never read, and no id seen anywhere: 0 would replay its
            # whole history, which predates the watch.
            return None
        # docs/protocol.md §7: a chat not seen before starts at the start mark, so what was
        # posted in it since the start is yielded (all of it when no chat held a message).
        return self.start_max

    def _add(self, chat_id: int, watermark: int | None, now: float) -> None:
        self._seq += 1
        self.chats[chat_id] = chat = _Chat(stint=self._seq, interval=self.interval)
        if watermark is not None:
            self._pin(chat_id, watermark)
        self._schedule(chat_id, chat.stint, now)

    def _pin(self, chat_id: int, watermark: int) -> None:
        """Give a chat its starting point (never moving a watermark it already has back)."""
        self.fetched[chat_id] = max(self.fetched.get(chat_id, watermark), watermark)
        # The consumer may still be handed messages of an earlier stint of the chat (dropped,
        # listed again); its own watermark moves only when they are.
        self.public.setdefault(chat_id, watermark)

    def _drop(self, chat_id: int, now: float) -> None:
        if self.chats.pop(chat_id, None) is None:
            return
        # The watermarks stay: should the chat be listed again, it goes on from there.
        self._unanchored.discard(chat_id)
        self._first_round.discard(chat_id)
        self._check_ready(now)

    def _first_poll_done(self, chat_id: int, newest: int | None, now: float) -> None:
        """A chat's first poll ended: ``newest`` is its newest id then, None if it failed."""
        if chat_id not in self._first_round:
            return  # not a first poll: what it saw came after the start
        self._first_round.discard(chat_id)
        if newest is not None and newest > self.start_max:
            self.start_max = newest
            for waiting in self._unanchored:
                self._pin(waiting, newest)
            self._unanchored.clear()
        self._check_ready(now)

    def _check_ready(self, now: float) -> None:
        # From here on every chat present at the start has a starting point, so every message
        # posted from now on will be yielded. The chats are listed again from then on.
        if self.ready or not self.set_up or self._first_round or self._unanchored:
            return
        self.ready = True
        if not self.explicit:
            self._listing_due = now + self.rediscover

    def _schedule(self, chat_id: int, stint: int, due: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, chat_id, stint))

    def _backoff(self, failures: int, exc: BaseException) -> float:
        cap = max(self.max_interval, MAX_ERROR_BACKOFF)
        step = min(cap, self.interval * 2.0 ** min(failures, 16))
        delay = step * self.rng.uniform(0.5, 1.0)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after > 0:
            delay = max(delay, float(retry_after))
        return delay
