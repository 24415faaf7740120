"""Watching chats for new messages: the asyncio layer that carries out ``_schedule.py``.

The API has no push channel, so a watch polls. What it promises (docs/protocol.md §7):

- **Exactly once, in order.** Per chat it keeps a watermark, the largest id seen there. A poll
  reads the newest page; when every item on it is above the watermark and the page has a
  ``next_cursor``, more arrived than a page holds, so it follows ``next_cursor`` back until it
  reaches the watermark. Only then are the new messages handed on, oldest first, and the
  poller's watermark moves with them. A poll that fails halfway hands on nothing and moves
  nothing, so the next poll fetches the same burst again: no message is skipped and none is
  yielded twice.
- **Where each chat starts, when it is polled, what a failure means**: the rules live in
  ``_schedule.py``, a state machine with no I/O; this module only carries out its actions.
- **Cheap.** Polls run as jobs of the one worker pool (``_pool.py``) on at most
  ``concurrency`` workers and go through the client's normal request path, so they share its
  rate limiter, its pause on ``Retry-After`` and its bound on requests in flight.
- **Bounded memory.** Up to ``_MAX_HELD_PAGES`` pages of a burst are held to be handed on
  oldest first. A longer backlog (a ``since=`` far in the past) is walked back to the
  watermark without holding pages, then forward again with ``prev_cursor``, one page at a
  time. The pool's slots between the pollers and the consumer are bounded: a slow consumer
  stops the polling instead of piling up messages, and the scheduler waits for a free worker
  rather than queueing polls.

The consumer-side watermark (:attr:`Watch.watermarks`) moves when a message is handed to the
consumer, so saving it after handling a message and passing it back as ``since=`` resumes
right after that message.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Protocol, Self

from ._checks import count, seconds
from ._models import Chat, Message, MessagesPage
from ._pagination import Direction
from ._pool import Emit, Pool
from ._schedule import END, FailedPoll, ListChats, PollChat, WatchSchedule
from ._wire import check_chat_id, check_limit

__all__ = ["ChatSource", "Watch"]

logger = logging.getLogger("messages_async.watch")

#: Pages of one burst held in memory before switching to the walk back and forth.
_MAX_HELD_PAGES = 10
#: Default ``max_interval`` as a multiple of ``interval`` (1 s → 10 s).
_DEFAULT_CAP_FACTOR = 10.0

_Batch = tuple[int, list[Message]]
_Job = PollChat | ListChats


class ChatSource(Protocol):
    """What a watch reads: the client's ``messages`` resource."""

    async def chats(self) -> list[Chat]: ...

    async def list(self, chat_id: int, *, limit: int | None = ...) -> MessagesPage: ...

    def pages(
        self,
        chat_id: int,
        *,
        limit: int | None = ...,
        cursor: str | None = ...,
        direction: Direction = ...,
        prefetch: bool = ...,
    ) -> AsyncGenerator[MessagesPage, None]: ...


def _log_failure(what: str, exc: BaseException, failed: FailedPoll) -> None:
    # Warned at the 1st, 10th, 100th... failure in a row: a blip is said once, and a chat
    # that stays unreadable keeps being said, without a line per poll.
    count = failed.count
    log = logger.warning if count == 10 ** (len(str(count)) - 1) else logger.debug
    log(
        "watch: %s failed (%s: %s), %d time%s in a row; trying again in %.2f s",
        what,
        type(exc).__name__,
        exc,
        count,
        "" if count == 1 else "s",
        failed.delay,
    )


def _note(exc: BaseException, note: str) -> None:
    # Once: an error the client shares between callers (a failed token renewal) may reach
    # several polls of the same watch.
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


class _Core:
    """Carries out a :class:`WatchSchedule`'s actions; it never refers back to the Watch.

    Keeping the tasks' references away from the public object lets a Watch that is dropped
    (``break`` out of ``async for ... in client.messages.watch()``) be collected, and its
    finalizer cancel every task at once.
    """

    def __init__(
        self, source: ChatSource, schedule: WatchSchedule, *, limit: int, concurrency: int
    ) -> None:
        self.source = source
        self.schedule = schedule
        self.limit = limit
        self.ready = asyncio.Event()
        self.wake = asyncio.Event()
        self.pool: Pool[_Job, _Batch] = Pool(
            self._run,
            workers=concurrency,
            capacity=max(2, concurrency),
            name="messages_async watch",
        )

    def start(self) -> None:
        self.pool.spawn(self._drive, "scheduler")
        self.pool.start()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _changed(self) -> None:
        if self.schedule.ready:
            self.ready.set()
        self.wake.set()

    async def _drive(self) -> None:
        try:
            while True:
                self.wake.clear()
                action = self.schedule.next_action(self._now())
                if isinstance(action, (PollChat, ListChats)):
                    # Waits while every worker is busy: the action stays first in line.
                    await self.pool.submit(action)
                    continue
                if action is END:
                    logger.warning("watch: no chat left to watch; the watch ends")
                    await self.pool.no_more_jobs()
                    return
                timeout = None if action is None else max(0.0, action - self._now())
                try:
                    async with asyncio.timeout(timeout):
                        await self.wake.wait()
                except TimeoutError:
                    pass
        except Exception:
            self.ready.set()  # ready() raises the pool's error
            raise

    async def _run(self, job: _Job, emit: Emit[_Batch]) -> None:
        try:
            if isinstance(job, ListChats):
                await self._list(job)
            elif self.schedule.is_current(job.chat_id, job.stint):
                await self._poll(job, emit)
        except Exception:
            self.ready.set()  # the pool fails with this error; ready() raises it
            raise
        finally:
            self._changed()

    async def _list(self, job: ListChats) -> None:
        try:
            listed = [chat.chat_id for chat in await self.source.chats()]
        except Exception as exc:
            failed = self.schedule.listing_failed(self._now(), exc)
            if failed.raise_it:
                _note(exc, "watch() stopped: raised listing the chats")
                raise
            if job.first:
                _log_failure("listing the chats", exc, failed)
            else:
                logger.warning(
                    "watch: listing the chats failed (%s); the chat list is kept as it is",
                    type(exc).__name__,
                )
            return
        changes = self.schedule.chats_listed(self._now(), listed)
        for chat_id in changes.added:
            logger.info("watch: new chat %d", chat_id)
        for chat_id in changes.dropped:
            logger.warning("watch: stopped watching chat %d: no longer in the chat list", chat_id)

    async def _poll(self, poll: PollChat, emit: Emit[_Batch]) -> None:
        try:
            got_new = await self._fetch(poll, emit)
        except Exception as exc:
            failed = self.schedule.poll_failed(self._now(), poll, exc)
            if failed.raise_it:
                # Raised to the consumer once, saying where: the watch never asks again.
                _note(exc, f"watch() stopped: raised polling chat {poll.chat_id}")
                raise
            if failed.dropped:
                logger.warning(
                    "watch: stopped watching chat %d: %s: %s", poll.chat_id, type(exc).__name__, exc
                )
            elif failed.count:
                _log_failure(f"polling chat {poll.chat_id}", exc, failed)
            return
        self.schedule.poll_done(self._now(), poll, got_new=got_new)

    async def _hand_on(self, poll: PollChat, emit: Emit[_Batch], batch: list[Message]) -> bool:
        new = self.schedule.fetched_batch(poll, batch)
        if new:
            await emit((poll.chat_id, new))
        return bool(batch)

    async def _fetch(self, poll: PollChat, emit: Emit[_Batch]) -> bool:
        """Poll one chat; hand on what is new, oldest first. Whether anything was new."""
        chat_id = poll.chat_id
        watermark = self.schedule.watermark(poll)
        if watermark is None:
            # The chat's first read: it starts at its newest id (a first poll that failed
            # pinned the chat at the start mark instead, see _schedule.py).
            page = await self.source.list(chat_id, limit=1)
            self.schedule.first_read(self._now(), poll, page.items[0].id if page.items else 0)
            return False

        held: list[list[Message]] = []
        overflow = False
        last: MessagesPage | None = None
        last_new: list[Message] = []
        pages = self.source.pages(chat_id, limit=self.limit, prefetch=False)
        try:
            async for page in pages:
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
            return await self._hand_on(
                poll, emit, [m for new in reversed(held) for m in reversed(new)]
            )

        logger.info("watch: chat %d has a long backlog; reading it forward", chat_id)
        await self._hand_on(poll, emit, last_new[::-1])
        if not last.prev_cursor:
            return True
        forward = self.source.pages(
            chat_id, limit=self.limit, cursor=last.prev_cursor, direction="newer", prefetch=False
        )
        try:
            async for page in forward:
                if not self.schedule.is_current(chat_id, poll.stint):
                    break
                await self._hand_on(poll, emit, page.items[::-1])
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
    for them, so prefer ``async with``. Like an async generator, a watch whose wait for the
    next message is cancelled (its task cancelled, ``asyncio.wait_for``) is closed.

    :attr:`watermarks` tells where each chat stands; save it after handling a message and pass
    it back as ``since=`` to resume after a restart without repeats.
    """

    def __init__(
        self,
        source: ChatSource,
        chat_ids: Iterable[int] | None,
        *,
        interval: float,
        since: Mapping[int, int] | None,
        limit: int,
        max_interval: float | None,
        concurrency: int,
        rediscover: float | None,
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
        rediscover = (
            max_interval if rediscover is None else seconds("rediscover", rediscover, finite=True)
        )
        checked_limit = check_limit(limit)
        if checked_limit is None:
            raise TypeError("limit must be an int page size, got None")
        count("concurrency", concurrency, minimum=1)
        marks: dict[int, int] = {}
        if since is not None:
            if not isinstance(since, Mapping):
                raise TypeError("since must be a mapping {chat_id: last_seen_message_id}")
            for key, value in since.items():
                chat_id = check_chat_id(key)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(
                        f"since[{chat_id}] must be an int message id, got {type(value).__name__}"
                    )
                if value < 0:
                    raise ValueError(f"since[{chat_id}] must be a message id >= 0, got {value}")
                marks[chat_id] = value
            if ids is not None:
                unknown = sorted(set(marks) - set(ids))
                if unknown:
                    raise ValueError(
                        f"since names chats that are not in chat_ids: {unknown}; add them to "
                        "chat_ids or leave them out of since"
                    )
        self._source = source
        self._ids = ids
        self._settings = (marks, interval, max_interval, rediscover)
        self._limit = checked_limit
        self._concurrency = concurrency
        self._core: _Core | None = None
        self._pending: deque[Message] = deque()
        self._pending_chat = 0
        self._closed = False

    def _started(self) -> _Core:
        if self._closed:
            raise RuntimeError("this watch was closed; start a new one with messages.watch()")
        if self._core is None:
            # The schedule starts on the running loop's clock, so it is made here, not in
            # __init__ (a watch may be made before its loop runs).
            marks, interval, max_interval, rediscover = self._settings
            schedule = WatchSchedule(
                self._ids,
                since=marks,
                interval=interval,
                max_interval=max_interval,
                rediscover=rediscover,
                rng=random.Random(),
                now=asyncio.get_running_loop().time(),
            )
            self._core = _Core(
                self._source, schedule, limit=self._limit, concurrency=self._concurrency
            )
            self._core.start()
            # Dropped without aclose() (``break`` out of ``async for ... in watch()``): cancel
            # the tasks at once. They refer to the core only, never to this object.
            weakref.finalize(self, self._core.pool.cancel)
        return self._core

    @property
    def watermarks(self) -> dict[int, int]:
        """A copy of ``{chat_id: largest message id handed to you}`` per chat.

        A chat with nothing yielded yet shows where the watch started it. A chat whose first
        poll has not succeeded yet may be missing. A chat the watch stopped watching (gone,
        or no longer listed) keeps its entry. Pass the dict back as ``since=`` to resume
        right after the last message you received.
        """
        return {} if self._core is None else dict(self._core.schedule.public)

    @property
    def chat_ids(self) -> list[int]:
        """The chats being watched right now."""
        return [] if self._core is None else list(self._core.schedule.chats)

    async def ready(self) -> None:
        """Start polling if needed, and wait until every chat has its starting point.

        That is once every chat present at the start has been polled once. For a chat whose
        first poll failed, a start mark from the others is enough. From then on, every message
        posted is yielded. Raises the watch's error if it failed before getting there.
        """
        core = self._started()
        await core.ready.wait()
        if core.pool.error is not None:
            raise core.pool.error

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[int, Message]:
        if self._closed:
            raise StopAsyncIteration
        core = self._started()
        while not self._pending:
            try:
                self._pending_chat, batch = await anext(core.pool)
            except BaseException:
                # The watch failed, ended, or the wait was cancelled: the pool has stopped
                # every task already, and this watch is over.
                self._closed = True
                raise
            self._pending.extend(batch)
        message = self._pending.popleft()
        chat_id = self._pending_chat
        # The consumer's watermark moves as the message is handed over (see module docs).
        core.schedule.delivered(chat_id, message.id)
        return chat_id, message

    async def aclose(self) -> None:
        """Stop polling: cancel every task of the watch and wait for them. Idempotent."""
        self._closed = True
        self._pending.clear()
        if self._core is not None:
            await self._core.pool.aclose()

    async def __aenter__(self) -> Self:
        self._started()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._core is not None else "not started"
        return f"<Watch chats={len(self.chat_ids)} {state}>"
