"""Watching chats for new messages: id watermarks, adaptive polling, bounded concurrency.

The API has no push channel, so a watch polls. What it promises (PROTOCOL §7):

- **Exactly once, in order.** Per chat it keeps a watermark, the largest id seen there. A poll
  reads the newest page; when every item on it is above the watermark and the page has a
  ``next_cursor``, more arrived than a page holds, so it follows ``next_cursor`` back until it
  reaches the watermark. Only then are the new messages handed on, oldest first, and only once
  they are handed on does the poller's watermark move. A poll that fails halfway hands on
  nothing and moves nothing, so the next poll fetches the same burst again: no message is
  skipped and none is yielded twice.
- **Watermarks for chats not seen before.** A chat present when the watch starts begins at its
  newest id then (or at ``since[chat_id]``). A chat that appears later (when watching every
  chat) begins at the largest id seen in *any* chat when the watch started: ids grow
  server-wide (PROTOCOL §2), so everything posted in it after the start is yielded.
- **Cheap.** A quiet chat's interval grows by half per empty poll up to ``max_interval``; one
  with news goes back to ``interval``. Polls run on at most ``concurrency`` workers and go
  through the client's normal request path, so they share its rate limiter, its pause on
  ``Retry-After`` and its bound on requests in flight: a thousand watched chats cost roughly
  ``chats / max_interval`` requests per second once they are quiet, not ``chats / interval``.
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
import math
import random
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

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


class _Dropped(Exception):
    """The chat is gone; raised inside a poll to stop watching it."""


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


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value}")
    return float(value)


class _ChatState:
    __slots__ = ("failures", "interval")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.failures = 0


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
        # The poller's side: the largest id handed to the queue, per chat being watched.
        self.fetched: dict[int, int] = {}
        # The consumer's side: the largest id handed to the consumer (plus starting points).
        self.public: dict[int, int] = {}
        self.chats: dict[int, _ChatState] = {}
        # (due, tie-breaker, chat id, state): a state that is no longer the chat's current one
        # (dropped, then listed again) is skipped, so a chat is never polled twice at once.
        self.heap: list[tuple[float, int, int, _ChatState]] = []
        self.seq = 0
        self.first_round: set[int] = set()
        self.start_max = 0
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
            self.fetched[chat_id] = watermark
            self.public[chat_id] = watermark
        self._schedule(chat_id, state, 0.0)

    def _drop(self, chat_id: int, why: str) -> None:
        if self.chats.pop(chat_id, None) is None:
            return
        self.fetched.pop(chat_id, None)
        self.public.pop(chat_id, None)
        logger.warning("watch: stopped watching chat %d: %s", chat_id, why)
        self._first_polled(chat_id, None)

    def _first_polled(self, chat_id: int, newest: int | None) -> None:
        if chat_id not in self.first_round:
            return
        self.first_round.discard(chat_id)
        if newest is not None:
            self.start_max = max(self.start_max, newest)
        if not self.first_round:
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
        self.first_round = set(chat_ids)
        for chat_id in chat_ids:
            self._add_chat(chat_id, self.since.get(chat_id))
        self.set_up = True
        self.wake.set()
        if not chat_ids:
            self.ready.set()
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
                    # PROTOCOL §7: a chat not seen before starts at the largest id seen in any
                    # chat when the watch started, so what was posted in it since is yielded.
                    logger.info("watch: new chat %d", chat_id)
                    self._add_chat(chat_id, self.since.get(chat_id, self.start_max))
            for chat_id in [c for c in self.chats if c not in present]:
                self._drop(chat_id, "no longer in the chat list")

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
            state.failures += 1
            delay = self._backoff(state.failures, exc)
            log = logger.warning if state.failures == 1 else logger.debug
            log(
                "watch: polling chat %d failed (%s: %s); trying again in %.2f s",
                chat_id,
                type(exc).__name__,
                exc,
                delay,
            )
            if self.chats.get(chat_id) is state:
                self._schedule(chat_id, state, delay)
            return
        state.failures = 0
        if got_new:
            state.interval = self.interval
        else:
            state.interval = min(self.max_interval, state.interval * _GROWTH)
        if self.chats.get(chat_id) is state:
            # A little jitter, so chats that started together do not poll in lockstep forever.
            self._schedule(chat_id, state, state.interval * self.rng.uniform(0.9, 1.1))

    async def _emit(self, chat_id: int, state: _ChatState, batch: list[Message]) -> None:
        if not batch or self.chats.get(chat_id) is not state:
            return
        await self.out.put((chat_id, batch))
        # Only now: had the put been cancelled, the next poll fetches the batch again.
        self.fetched[chat_id] = batch[-1].id

    async def _fetch(self, chat_id: int, state: _ChatState) -> bool:
        """Poll one chat; hand on what is new, oldest first. Whether anything was new."""
        watermark = self.fetched.get(chat_id)
        if watermark is None:
            # A chat seen for the first time without a starting point: it starts now.
            page = await self.messages.list(chat_id, limit=1)
            newest = page.items[0].id if page.items else 0
            self.fetched[chat_id] = newest
            self.public.setdefault(chat_id, newest)
            self._first_polled(chat_id, newest)
            return False

        held: list[list[Message]] = []
        overflow = False
        last: MessagesPage | None = None
        last_new: list[Message] = []
        pages = self.messages.pages(chat_id, limit=self.limit, prefetch=False)
        try:
            async for page in pages:
                if last is None:
                    self._first_polled(chat_id, page.items[0].id if page.items else None)
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
            await pages.aclose()  # type: ignore[attr-defined]
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
                mark = self.fetched.get(chat_id, watermark)
                await self._emit(chat_id, state, [m for m in reversed(page.items) if m.id > mark])
        finally:
            await forward.aclose()  # type: ignore[attr-defined]
        return True


class Watch(AsyncIterator[tuple[int, Message]]):
    """New messages in one or more chats, as ``(chat_id, message)``, from ``messages.watch()``.

    Iterate it with ``async for``; each message posted after the watch started is yielded
    once, oldest first within its chat. Polling starts at the first iteration (or on entering
    ``async with``, or at :meth:`ready`). Stop it with ``break``, :meth:`aclose` or by leaving
    ``async with``: every polling task is cancelled and waited for.

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
        interval = _number("interval", interval)
        if max_interval is None:
            max_interval = interval * _DEFAULT_CAP_FACTOR
        max_interval = _number("max_interval", max_interval)
        if max_interval < interval:
            raise ValueError(
                f"max_interval ({max_interval}) must be at least interval ({interval})"
            )
        checked_limit = check_limit(limit)
        if checked_limit is None:
            raise TypeError("limit must be an int page size, got None")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise TypeError(f"concurrency must be an int, got {type(concurrency).__name__}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        rediscover = _number("rediscover", rediscover)
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
        """A copy of ``{chat_id: largest message id handed to you}`` for every watched chat.

        A chat with nothing yielded yet shows where the watch started it. Pass the dict back
        as ``since=`` to resume right after the last message you received.
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
        """Start polling if needed, and wait until every chat has been polled once.

        From then on, every message posted is yielded. Raises the watch's error if it failed
        before getting there.
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
