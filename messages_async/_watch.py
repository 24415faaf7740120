"""Watching chats for new messages: id watermarks, adaptive polling, bounded concurrency.

The API has no push channel, so a watch polls. What it promises (PROTOCOL §7):

- **Exactly once, in order.** Per chat it keeps a watermark, the largest id seen there. A poll
  reads the newest page; when every item on it is above the watermark and the page has a
  ``next_cursor``, more arrived than a page holds, so it follows ``next_cursor`` back until it
  reaches the watermark. Only then are the new messages handed on, oldest first, and the
  poller's watermark moves with them. A poll that fails halfway hands on nothing and moves
  nothing, so the next poll fetches the same burst again: no message is skipped and none is
  yielded twice.
- **Where a chat starts.** The watch starts with its first round: one poll of every chat
  present then. The *start mark* is the largest id those polls saw in any chat. A chat begins
  at ``since[chat_id]`` when given (watching every chat, a chat missing from a given ``since``
  appeared after it was saved, and begins after its largest id), else at its newest id in
  its first poll. If that poll
  fails, the chat begins at the start mark as known at that moment, not at "newest when it
  first succeeds", so nothing posted in it during the outage is skipped. Ids grow server-wide
  (PROTOCOL §2), so every message posted later has a larger id. The price: if that chat held
  messages newer than every id seen so far, they are yielded as well. If no id was seen yet,
  the chat is pinned at the first id the first round sees. If the round sees none (every chat
  empty or failing), the chat begins at its newest id in the first poll that succeeds, as
  there is nothing to compare with.
- **Chats that appear later** (when watching every chat) begin at the start mark (PROTOCOL §7),
  so everything posted in them after the start is yielded. With a start mark of 0 (no chat
  held a message at the start) that is a new chat's whole history. That is right for a chat
  created after the start, but it replays the history of an old chat the user is added to later.
  A chat that was present at the start but never read (its first poll got a 404) is not new:
  when listed again it begins like a chat whose first poll failed.
- **Dropped and listed again.** A chat that is dropped (404, or missing from a listing) keeps
  its watermark. If it is listed again it goes on from there: nothing is repeated, and what
  was posted in between is yielded.
- **Cheap.** A quiet chat's interval grows by half per empty poll up to ``max_interval``; one
  with news goes back to ``interval``. A chat that reaches ``max_interval`` first waits a
  random time up to it (at least ``interval``, or half the cap if that is shorter). Chats
  that went quiet together then poll evenly spread over the cap, not in one burst per cycle
  that a rate-limited server would answer with 429s. Polls run on at most ``concurrency``
  workers and go through the client's normal request path, so they share its rate limiter,
  its pause on ``Retry-After`` and its bound on requests in flight: a thousand watched chats
  cost roughly ``chats / max_interval`` requests per second once they are quiet, not
  ``chats / interval``.
- **Bounded memory.** Up to ``_MAX_HELD_PAGES`` pages of a burst are held to be handed on
  oldest first. A longer backlog (a ``since=`` far in the past) is walked back to the
  watermark without holding pages, then forward again with ``prev_cursor``, one page at a
  time. Between the pollers and the consumer is a bounded queue: a slow consumer stops the
  polling instead of piling up messages.
- **Never ended by a transient error.** 5xx, 429, dropped connections, timeouts, an expired
  cursor or an undecodable answer back off that chat and poll it again later. A chat that is
  gone (404, or 403 ``forbidden``) is dropped with a log line. Anything else (revoked
  credentials, a missing scope, an unsafe cursor, a closed client) is raised to the consumer.

The consumer-side watermark (:attr:`Watch.watermarks`) moves when a message is handed to the
consumer, so saving it after handling a message and passing it back as ``since=`` resumes
right after that message.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from ._checks import count, seconds
from ._errors import (
    AuthError,
    DecodeError,
    InvalidCursorError,
    NotFoundError,
    PaginationError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TransportError,
)
from ._models import Message, MessagesPage
from ._wire import check_chat_id, check_limit

if TYPE_CHECKING:
    from ._client import Messages

__all__ = ["Watch"]

logger = logging.getLogger("messages_async.watch")

#: Factor by which a quiet chat's polling interval grows after each empty poll.
_GROWTH = 1.5
#: Pages of one burst held in memory before switching to the walk back and forth.
_MAX_HELD_PAGES = 10
#: Default ``max_interval`` as a multiple of ``interval`` (2 s → 30 s).
_DEFAULT_CAP_FACTOR = 15.0
#: Longest a chat waits after repeated transient errors, when ``max_interval`` is shorter.
_MAX_ERROR_BACKOFF = 60.0


class _End(enum.Enum):
    END = "END"


_END = _End.END


class _Failure:
    """A fatal error travelling from a worker to the consumer."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_Item = tuple[int, list[Message]] | _Failure | _End


def _transient(exc: BaseException) -> bool:
    """Whether polling that chat again later may well succeed."""
    if isinstance(
        exc,
        (
            ServerError,
            RateLimitError,
            TransportError,
            DecodeError,
            # The walk is simply started again from the newest page.
            InvalidCursorError,
            # A misbehaving listing: nothing was handed on; try again later.
            PaginationError,
        ),
    ):
        return True
    if isinstance(exc, AuthError):
        # The token endpoint unreachable or failing is an outage, not revoked credentials.
        return exc.status is None or exc.status >= 500 or exc.status == 429
    return False


class _ChatState:
    __slots__ = ("failures", "interval", "phased")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.failures = 0
        # Whether the chat got its random phase since it last reached max_interval.
        self.phased = False


class _Core:
    """The machinery behind a :class:`Watch`; it never refers back to the Watch.

    Keeping the tasks' references away from the public object lets a Watch that is dropped
    (``break`` out of ``async for ... in client.messages.watch()``) be collected, and its
    finalizer cancel every task at once.
    """

    def __init__(
        self,
        messages: Messages,
        chat_ids: list[int] | None,
        *,
        interval: float,
        since: dict[int, int],
        limit: int,
        max_interval: float,
        concurrency: int,
        rediscover: float,
    ) -> None:
        self.messages = messages
        self.explicit = chat_ids
        self.interval = interval
        self.since = since
        self.limit = limit
        self.max_interval = max_interval
        self.concurrency = concurrency
        self.rediscover = rediscover
        self.rng = random.Random()
        # The poller's side: the largest id handed to the queue, per chat. Kept when a chat is
        # dropped, so a chat that is listed again goes on from there without repeats.
        self.fetched: dict[int, int] = {}
        # The consumer's side: the largest id handed to the consumer (plus starting points).
        self.public: dict[int, int] = {}
        self.chats: dict[int, _ChatState] = {}
        # (due, tie-breaker, chat id, state): a state that is no longer the chat's current one
        # (dropped, then listed again) is skipped, so a chat is never polled twice at once.
        self.heap: list[tuple[float, int, int, _ChatState]] = []
        self.seq = 0
        # Chats present at the start (explicit, or in the first listing).
        self.initial: set[int] = set()
        # Chats whose first poll has not finished yet; the start mark is final once it is empty.
        self.first_round: set[int] = set()
        # The start mark: the largest id the first polls saw in any chat (PROTOCOL §7).
        self.start_max = 0
        # Chats present at the start whose first poll failed while no id had been seen yet:
        # they are pinned at the first start mark the round sees.
        self.unanchored: set[int] = set()
        self.ready = asyncio.Event()
        self.fatal: BaseException | None = None
        self.wake = asyncio.Event()
        self.work: asyncio.Queue[tuple[int, _ChatState]] = asyncio.Queue(maxsize=concurrency)
        self.out: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max(2, concurrency))
        self.tasks: list[asyncio.Task[None]] = []
        self.set_up = False  # the first chats are registered
        self.ended = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        # Every task is created here and kept in one list, so cancel() reaches all of them at
        # once, synchronously (a finalizer cannot await).
        spawn = asyncio.create_task
        self.tasks.append(spawn(self._guard(self._main), name="messages_async watch setup"))
        self.tasks.append(
            spawn(self._guard(self._scheduler), name="messages_async watch scheduler")
        )
        for n in range(self.concurrency):
            self.tasks.append(
                spawn(self._guard(self._worker), name=f"messages_async watch worker {n}")
            )

    def cancel(self) -> None:
        """Cancel every task now (synchronous: also usable from a finalizer)."""
        for task in self.tasks:
            task.cancel()

    async def stop(self) -> None:
        self.cancel()
        tasks, self.tasks = self.tasks, []
        if tasks:
            # Not gather: a CancelledError aimed at the caller must still reach it afterwards.
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # retrieved: the error, if any, already went to the queue

    async def _fail(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.ready.set()
        await self.out.put(_Failure(exc))

    # -- scheduling ---------------------------------------------------------------------------

    def _schedule(self, chat_id: int, state: _ChatState, delay: float) -> None:
        self.seq += 1
        due = asyncio.get_running_loop().time() + delay
        heapq.heappush(self.heap, (due, self.seq, chat_id, state))
        self.wake.set()

    def _add_chat(self, chat_id: int, watermark: int | None) -> None:
        state = self.chats[chat_id] = _ChatState(self.interval)
        if watermark is not None:
            self._pin(chat_id, watermark)
        self._schedule(chat_id, state, 0.0)

    def _pin(self, chat_id: int, watermark: int) -> None:
        """Give a chat its starting point (never moving a watermark it already has back)."""
        self.fetched[chat_id] = max(self.fetched.get(chat_id, watermark), watermark)
        # The consumer may still be handed messages of an earlier stint of the chat (dropped,
        # listed again); its own watermark moves only when they are.
        self.public.setdefault(chat_id, watermark)

    def _drop(self, chat_id: int, why: str) -> None:
        if self.chats.pop(chat_id, None) is None:
            return
        # The watermarks stay: should the chat be listed again, it goes on from there.
        self.unanchored.discard(chat_id)
        logger.warning("watch: stopped watching chat %d: %s", chat_id, why)
        self._first_poll_done(chat_id, None)
        self._check_ready()

    def _poll_failed(self, chat_id: int) -> None:
        """A poll failed transiently (maybe the chat's first one)."""
        if chat_id not in self.fetched:
            # No starting point yet, and "its newest id when a poll first succeeds" would skip
            # what is posted during the outage: start at the start mark as known now.
            if self.start_max > 0:
                self._pin(chat_id, self.start_max)
            elif chat_id in self.initial:
                self.unanchored.add(chat_id)
        self._first_poll_done(chat_id, None)

    def _first_poll_done(self, chat_id: int, newest: int | None) -> None:
        """A chat's first poll ended: ``newest`` is its newest id then, None if it failed."""
        if chat_id not in self.first_round:
            return  # not a first poll: what it saw came after the start
        self.first_round.discard(chat_id)
        if newest is not None and newest > self.start_max:
            self.start_max = newest
            for waiting in self.unanchored:
                self._pin(waiting, newest)
            self.unanchored.clear()
        self._check_ready()

    def _check_ready(self) -> None:
        # From here on every chat present at the start has a starting point, so every message
        # posted from now on will be yielded.
        if self.set_up and not self.first_round and not self.unanchored:
            self.ready.set()

    async def _guard(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # Takes the function, not a coroutine: a task cancelled before its first step would
        # otherwise leave that coroutine never awaited.
        try:
            await work()
        except Exception as exc:
            # Workers send their fatal errors themselves; this catches the machinery's own
            # (the first chat listing failing for good, or a bug), so none is lost silently.
            await self._fail(exc)

    async def _main(self) -> None:
        if self.explicit is not None:
            chat_ids = self.explicit
        else:
            chat_ids = await self._list_chats(first=True)
        self.initial = set(chat_ids)
        fresh = [c for c in chat_ids if c not in self.since]
        if self.since and self.explicit is None:
            # Watching every chat, resumed from saved watermarks: a chat missing from them
            # appeared after they were saved, so it starts after the largest saved id. What
            # was posted in it meanwhile is yielded; nothing can be a repeat. (With explicit
            # chat_ids, since says nothing about other chats: they start from now, and one
            # whose first poll fails must not start at an old mark.)
            self.start_max = max(self.start_max, *self.since.values())
            for chat_id in fresh:
                self._add_chat(chat_id, self.start_max)
            fresh = []
        # Readiness waits for these first polls only. They hand nothing on, and they are
        # scheduled before the resumed chats, whose polls may wait for a consumer that has
        # not started reading yet.
        self.first_round = set(fresh)
        for chat_id in fresh:
            self._add_chat(chat_id, None)
        for chat_id in chat_ids:
            if chat_id in self.since:
                self._add_chat(chat_id, self.since[chat_id])
        self.set_up = True
        self.wake.set()
        self._check_ready()
        if self.explicit is None:
            await self._rediscover()

    async def _scheduler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.wake.clear()
            while self.heap and self.heap[0][0] <= loop.time():
                _, _, chat_id, state = heapq.heappop(self.heap)
                if self.chats.get(chat_id) is state:
                    # Blocks while every worker is busy: the chat stays due and goes first.
                    await self.work.put((chat_id, state))
            if self.set_up and self.explicit is not None and not self.chats and not self.ended:
                self.ended = True
                logger.warning("watch: no chat left to watch; the watch ends")
                await self.out.put(_END)
            delay = self.heap[0][0] - loop.time() if self.heap else None
            try:
                async with asyncio.timeout(delay):
                    await self.wake.wait()
            except TimeoutError:
                pass

    async def _worker(self) -> None:
        while True:
            chat_id, state = await self.work.get()
            if self.chats.get(chat_id) is state:
                await self._poll(chat_id, state)

    # -- chat discovery -----------------------------------------------------------------------

    async def _list_chats(self, *, first: bool) -> list[int]:
        failures = 0
        while True:
            try:
                return [chat.chat_id for chat in await self.messages.chats()]
            except Exception as exc:
                if not _transient(exc) or not first:
                    raise
                failures += 1
                delay = self._backoff(failures, exc)
                logger.warning(
                    "watch: listing the chats failed (%s); trying again in %.1f s",
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _rediscover(self) -> None:
        await self.ready.wait()
        while True:
            await asyncio.sleep(self.rediscover)
            try:
                listed = await self._list_chats(first=False)
            except Exception as exc:
                if not _transient(exc):
                    await self._fail(exc)
                    return
                logger.warning(
                    "watch: listing the chats failed (%s); the chat list is kept as it is",
                    type(exc).__name__,
                )
                continue
            present = set(listed)
            for chat_id in listed:
                if chat_id not in self.chats:
                    logger.info("watch: new chat %d", chat_id)
                    self._add_chat(chat_id, self._start_for(chat_id))
            for chat_id in [c for c in self.chats if c not in present]:
                self._drop(chat_id, "no longer in the chat list")

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
        # PROTOCOL §7: a chat not seen before starts at the start mark, so what was posted in
        # it since the start is yielded (all of it when no chat held a message at the start).
        return self.start_max

    # -- polling ------------------------------------------------------------------------------

    def _backoff(self, failures: int, exc: BaseException) -> float:
        cap = max(self.max_interval, _MAX_ERROR_BACKOFF)
        step = min(cap, self.interval * 2.0 ** min(failures, 16))
        delay = step * self.rng.uniform(0.5, 1.0)
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after > 0:
            delay = max(delay, float(retry_after))
        return delay

    async def _poll(self, chat_id: int, state: _ChatState) -> None:
        try:
            got_new = await self._fetch(chat_id, state)
        except (NotFoundError, PermissionDeniedError) as exc:
            self._drop(chat_id, f"{type(exc).__name__}: {exc}")
            self.wake.set()  # let the scheduler notice an explicit watch with no chat left
            return
        except Exception as exc:
            if not _transient(exc):
                await self._fail(exc)
                return
            self._poll_failed(chat_id)
            state.failures += 1
            delay = self._backoff(state.failures, exc)
            # Warned at the 1st, 10th, 100th... failure in a row: a blip is said once, and a
            # chat that stays unreadable keeps being said, without a line per poll.
            count = state.failures
            log = logger.warning if count == 10 ** (len(str(count)) - 1) else logger.debug
            log(
                "watch: polling chat %d failed (%s: %s), %d time%s in a row; trying again "
                "in %.2f s",
                chat_id,
                type(exc).__name__,
                exc,
                count,
                "" if count == 1 else "s",
                delay,
            )
            if self.chats.get(chat_id) is state:
                self._schedule(chat_id, state, delay)
            return
        state.failures = 0
        if got_new:
            state.interval = self.interval
            state.phased = False
        else:
            state.interval = min(self.max_interval, state.interval * _GROWTH)
        if state.interval >= self.max_interval and not state.phased:
            # Reaching the cap. Chats that went quiet together would poll in one burst per
            # cycle from now on (a small jitter takes many cycles to spread them): a random
            # phase within the cap spreads them evenly at once.
            state.phased = True
            delay = self.rng.uniform(min(self.interval, self.max_interval / 2), self.max_interval)
        else:
            # A little jitter keeps the phases from drifting back together.
            delay = state.interval * self.rng.uniform(0.9, 1.1)
        if self.chats.get(chat_id) is state:
            self._schedule(chat_id, state, delay)

    async def _emit(self, chat_id: int, state: _ChatState, batch: list[Message]) -> None:
        if self.chats.get(chat_id) is not state:
            return  # dropped meanwhile: if listed again, it is read again from its watermark
        mark = self.fetched.get(chat_id, -1)
        batch = [m for m in batch if m.id > mark]
        if not batch:
            return
        # The watermark moves before the put, while this poll is still the chat's current one:
        # a put that waits for a slow consumer may outlast a drop and a new listing of the
        # chat, and the new poll must not fetch this batch again. A put is only ever cancelled
        # when the whole watch stops, so moving the mark early never loses a batch.
        self.fetched[chat_id] = batch[-1].id
        await self.out.put((chat_id, batch))

    async def _fetch(self, chat_id: int, state: _ChatState) -> bool:
        """Poll one chat; hand on what is new, oldest first. Whether anything was new."""
        watermark = self.fetched.get(chat_id)
        if watermark is None:
            # A chat present at the start, read for the first time: it starts at its newest
            # id. (Only a first poll gets here; one that failed pinned the chat at the start
            # mark, unless no id has been seen anywhere: see the module docs.)
            page = await self.messages.list(chat_id, limit=1)
            newest = page.items[0].id if page.items else 0
            if self.chats.get(chat_id) is state:
                self._pin(chat_id, newest)
                self.unanchored.discard(chat_id)
            self._first_poll_done(chat_id, newest)
            self._check_ready()
            return False

        held: list[list[Message]] = []
        overflow = False
        last: MessagesPage | None = None
        last_new: list[Message] = []
        pages = self.messages.pages(chat_id, limit=self.limit, prefetch=False)
        try:
            async for page in pages:
                if last is None:
                    self._first_poll_done(chat_id, page.items[0].id if page.items else None)
                last = page
                last_new = [m for m in page.items if m.id > watermark]
                reached = len(last_new) < len(page.items) or not page.next_cursor
                if reached:
                    break
                if not overflow:
                    held.append(last_new)
                    if len(held) >= _MAX_HELD_PAGES:
                        # A long backlog: stop holding it; it is read forward again below.
                        overflow = True
                        held = []
        finally:
            await pages.aclose()
        if last is None:
            return False
        if not overflow:
            held.append(last_new)
            batch = [m for new in reversed(held) for m in reversed(new)]
            await self._emit(chat_id, state, batch)
            return bool(batch)

        logger.info("watch: chat %d has a long backlog; reading it forward", chat_id)
        await self._emit(chat_id, state, last_new[::-1])
        if not last.prev_cursor:
            return True
        forward = self.messages.pages(
            chat_id, limit=self.limit, cursor=last.prev_cursor, direction="newer", prefetch=False
        )
        try:
            async for page in forward:
                if self.chats.get(chat_id) is not state:
                    break
                await self._emit(chat_id, state, page.items[::-1])
        finally:
            await forward.aclose()
        return True


class Watch(AsyncIterator[tuple[int, Message]]):
    """New messages in one or more chats, as ``(chat_id, message)``, from ``messages.watch()``.

    Iterate it with ``async for``; each message posted after the watch started is yielded
    once, oldest first within its chat. Polling starts at the first iteration (or on entering
    ``async with``, or at :meth:`ready`). Stop it with :meth:`aclose` or by leaving
    ``async with``: every polling task is cancelled and waited for. A bare ``break`` out of
    ``async for`` cancels them once the watch is freed (at once in CPython) but cannot wait
    for them, so prefer ``async with``.

    :attr:`watermarks` tells where each chat stands; save it after handling a message and pass
    it back as ``since=`` to resume after a restart without repeats.
    """

    def __init__(
        self,
        messages: Messages,
        chat_ids: Iterable[int] | None,
        *,
        interval: float,
        since: Mapping[int, int] | None,
        limit: int,
        max_interval: float | None,
        concurrency: int,
        rediscover: float,
    ) -> None:
        ids: list[int] | None = None
        if chat_ids is not None:
            if isinstance(chat_ids, (str, bytes)) or not isinstance(chat_ids, Iterable):
                raise TypeError("chat_ids must be an iterable of int chat ids, or None for all")
            ids = list(dict.fromkeys(check_chat_id(c) for c in chat_ids))
            if not ids:
                raise ValueError("chat_ids is empty: give chat ids, or None to watch every chat")
        interval = seconds("interval", interval, finite=True)
        if max_interval is None:
            max_interval = interval * _DEFAULT_CAP_FACTOR
        max_interval = seconds("max_interval", max_interval, finite=True)
        if max_interval < interval:
            raise ValueError(
                f"max_interval ({max_interval}) must be at least interval ({interval})"
            )
        checked_limit = check_limit(limit)
        if checked_limit is None:
            raise TypeError("limit must be an int page size, got None")
        count("concurrency", concurrency, minimum=1)
        rediscover = seconds("rediscover", rediscover, finite=True)
        marks: dict[int, int] = {}
        if since is not None:
            if not isinstance(since, Mapping):
                raise TypeError("since must be a mapping {chat_id: last_seen_message_id}")
            for key, value in since.items():
                chat_id = check_chat_id(key)
                marks[chat_id] = count(f"since[{chat_id}]", value, what="an int message id")
            if ids is not None:
                unknown = sorted(set(marks) - set(ids))
                if unknown:
                    raise ValueError(
                        f"since names chats that are not in chat_ids: {unknown}; add them to "
                        "chat_ids or leave them out of since"
                    )
        self._core = _Core(
            messages,
            ids,
            interval=interval,
            since=marks,
            limit=checked_limit,
            max_interval=max_interval,
            concurrency=concurrency,
            rediscover=rediscover,
        )
        self._pending: deque[Message] = deque()
        self._pending_chat = 0
        self._started = False
        self._closed = False
        # Dropped without aclose() (``break`` out of ``async for ... in messages.watch()``):
        # cancel the tasks at once. They refer to the core only, never to this object.
        self._finalizer = weakref.finalize(self, self._core.cancel)

    @property
    def watermarks(self) -> dict[int, int]:
        """A copy of ``{chat_id: largest message id handed to you}`` per chat.

        A chat with nothing yielded yet shows where the watch started it. A chat whose first
        poll has not succeeded yet may be missing. A chat the watch stopped watching (gone,
        or no longer listed) keeps its entry. Pass the dict back as ``since=`` to resume
        right after the last message you received.
        """
        return dict(self._core.public)

    @property
    def chat_ids(self) -> list[int]:
        """The chats being watched right now."""
        return list(self._core.chats)

    def _start(self) -> None:
        if self._closed:
            raise RuntimeError("this watch was closed; start a new one with messages.watch()")
        if not self._started:
            self._started = True
            self._core.start()

    async def ready(self) -> None:
        """Start polling if needed, and wait until every chat has its starting point.

        That is once every chat present at the start has been polled once. For a chat whose
        first poll failed, a start mark from the others is enough. From then on, every message
        posted is yielded. Raises the watch's error if it failed before getting there.
        """
        self._start()
        await self._core.ready.wait()
        if self._core.fatal is not None:
            raise self._core.fatal

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[int, Message]:
        if self._closed:
            raise StopAsyncIteration
        self._start()
        while not self._pending:
            item = await self._core.out.get()
            if isinstance(item, _Failure):
                await self.aclose()
                raise item.error
            if item is _END:
                await self.aclose()
                raise StopAsyncIteration
            self._pending_chat, batch = item
            self._pending.extend(batch)
        message = self._pending.popleft()
        chat_id = self._pending_chat
        # The consumer's watermark moves as the message is handed over (see module docs).
        if message.id > self._core.public.get(chat_id, -1):
            self._core.public[chat_id] = message.id
        return chat_id, message

    async def aclose(self) -> None:
        """Stop polling: cancel every task of the watch and wait for them. Idempotent."""
        self._closed = True
        self._pending.clear()
        await self._core.stop()

    async def __aenter__(self) -> Self:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "not started"
        return f"<Watch chats={len(self._core.chats)} {state}>"
