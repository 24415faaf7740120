"""The export runner: a bounded pool of workers, each walking one chat at a time.

Every worker shares the one client, so the client's limiter paces all of them together (a
429 pauses everyone, PROTOCOL §7). A worker walks a chat with ``client.messages.pages`` and
commits each page with the chat's next cursor before it stores anything further, holding at
most the page it is storing and the one being fetched ahead: memory stays flat whatever the
size of the export.

What a walk does, from the chat's checkpoint (``_state.py``):

- a chat never finished: walk from the saved cursor (or the newest page) to the oldest; a
  walk resumed from an earlier run is followed by an update, so that the chat is current;
- a finished chat: an *update*, walking from the newest page until it reaches an id at or
  below the stored watermark; only the newer messages are stored (one request when nothing
  is new);
- a saved cursor that has expired (``invalid_cursor``), or that no longer points at this
  API (say the server moved): the walk starts again at the newest page and skips every id it
  has stored already, so there is neither a duplicate nor a gap;
- 429s and transient errors are retried by the client; if they persist past its retries,
  the worker waits and resumes the chat from its last checkpoint. A rate limit is never
  turned into a failed chat, however long the server asks to wait;
- an error that will not go away (404, 403, a server breaking the contract) marks the chat
  failed, with its error recorded, and the worker moves on to the next chat;
- a rejected token stops the whole export (every other chat would fail the same way).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

import attrs

from .._client import Client
from .._errors import (
    AuthError,
    InvalidCursorError,
    MessagesError,
    RateLimitError,
    ServerError,
    TransportError,
    UnsafeCursorError,
)
from .._models import Message, MessagesPage, Period
from ._state import ChatState
from ._store import Store

T = TypeVar("T")

__all__ = ["ChatFailure", "ExportOptions", "ExportStats", "Exporter"]

logger = logging.getLogger("messages_async.export")

#: Rounds of "wait, then resume from the checkpoint" after the client's own retries gave up
#: on a 5xx or a network error. Rate limits are not counted: they are always waited out.
MAX_TRANSIENT_ROUNDS = 5
#: Restarts from the newest page after an expired cursor, per chat and run.
MAX_CURSOR_RESTARTS = 3
#: Longest wait between transient rounds, in seconds.
MAX_ROUND_WAIT = 60.0


@attrs.frozen
class ExportOptions:
    """What to export.

    Attributes:
        chat_ids: The chats to export; ``None``: every chat the token can see.
        concurrency: Chats walked at once.
        query: Only messages whose text contains this (case-insensitive).
        since: Only messages at or after this instant (timezone-aware).
        until: Only messages before this instant (timezone-aware).
        page_size: Messages per request (the server caps it at 100).
    """

    chat_ids: tuple[int, ...] | None = None
    concurrency: int = 8
    query: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    page_size: int = 100

    def __attrs_post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if not 1 <= self.page_size <= 100:
            raise ValueError(f"page_size must be between 1 and 100, got {self.page_size}")
        # Period checks awareness and order, with messages that say what to fix.
        self.period()

    def period(self) -> Period | None:
        if self.since is None and self.until is None:
            return None
        return Period(from_=self.since, till=self.until)


@attrs.frozen
class ChatFailure:
    """A chat that failed for good in this run, and why."""

    chat_id: int
    error: str


@attrs.define
class ExportStats:
    """Live counters of a run, read by the progress display and the summary."""

    started: float = attrs.field(factory=time.monotonic)
    finished: float | None = None
    chats_total: int = 0
    chats_done: int = 0
    chats_failed: int = 0
    chats_active: int = 0
    messages: int = 0
    pages: int = 0
    cursor_restarts: int = 0
    resumed_rounds: int = 0
    stored_messages: int = 0
    waiting_until: float = 0.0
    interrupted: bool = False
    failures: list[ChatFailure] = attrs.field(factory=list)

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return max(1e-9, end - self.started)

    @property
    def rate(self) -> float:
        """New messages stored per second so far."""
        return self.messages / self.elapsed

    @property
    def waiting_for(self) -> float:
        """Seconds left in the runner's own wait after a rate limit outlasted the retries."""
        return max(0.0, self.waiting_until - time.monotonic())


class _Restart(Exception):
    """The walk's cursor cannot be followed any more: start again at the newest page."""


class Exporter:
    """Exports chats from ``client`` into ``store``. Use once: ``await exporter.run()``.

    Args:
        client: An open client (shared by every worker).
        store: An open store.
        options: What to export.
        stop: Set it to stop cleanly: workers are cancelled, and every committed page stays.
        on_commit: Called with each page's new messages once they are committed (it must not
            block: the export's ``--media`` queues their attachments).
        rescan: Run for each chat after its update, under the same retry rules (the
            export's ``--rescan``: it finds edits and deletions).
    """

    def __init__(
        self,
        client: Client,
        store: Store,
        options: ExportOptions,
        *,
        stop: asyncio.Event | None = None,
        on_commit: Callable[[Sequence[Message]], None] | None = None,
        rescan: Callable[[ChatState], Awaitable[None]] | None = None,
    ) -> None:
        self._on_commit = on_commit
        self._rescan = rescan
        self._client = client
        self._store = store
        self._options = options
        self._period = options.period()
        self._stop = stop if stop is not None else asyncio.Event()
        self._ids: Iterator[int] = iter(())
        self.stats = ExportStats()

    async def run(self) -> ExportStats:
        """Export every selected chat; returns the counters (``failures`` lists the failed).

        Raises:
            AuthError: the server rejected the credentials (nothing more can be exported).
            MessagesError: the chat list could not be fetched.
            OSError: the store could not be written.
        """
        stats = self.stats
        committed_before = self._store.committed_messages
        try:
            # Listing the chats may wait out a long Retry-After: a stop must not wait for it.
            ids = await unless_stopped(self._select(), self._stop)
            if ids is None:
                stats.interrupted = True
                return stats
            stats.chats_total = len(ids)
            self._ids = iter(ids)
            n = min(self._options.concurrency, len(ids))
            workers = [
                asyncio.create_task(self._worker(), name=f"export worker {i}") for i in range(n)
            ]
            await self._supervise(workers)
        finally:
            # A worker stopped while its page was being committed never counted that page,
            # but the page is stored: the summary takes the store's own count.
            await self._store.settle()
            stats.messages = self._store.committed_messages - committed_before
            stats.finished = time.monotonic()
        return stats

    async def _select(self) -> list[int]:
        chats = await self._client.messages.chats()
        wanted = self._options.chat_ids
        if wanted is None:
            ids = [c.chat_id for c in chats]
            raws = [c.raw for c in chats]
        else:
            ids = list(dict.fromkeys(wanted))  # repeated --chat: once, in the order given
            chosen = set(ids)
            # A chat the listing does not show is still tried: its walk reports why it fails.
            raws = [c.raw for c in chats if c.chat_id in chosen]
        await self._store.save_chats(raws)
        return ids

    async def _supervise(self, workers: list[asyncio.Task[None]]) -> None:
        stopper = asyncio.create_task(self._stop.wait(), name="export stop")
        try:
            pending: set[asyncio.Task[object]] = {*workers, stopper}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    self.stats.interrupted = True
                    break
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    break
                if pending == {stopper}:
                    break
        finally:
            for task in (*workers, stopper):
                task.cancel()
            results = await asyncio.gather(*workers, stopper, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    async def _worker(self) -> None:
        for chat_id in self._ids:
            self.stats.chats_active += 1
            try:
                await self._export_chat(chat_id)
            finally:
                self.stats.chats_active -= 1

    async def _export_chat(self, chat_id: int) -> None:
        stats = self.stats
        job = _ChatJob(await self._store.load(chat_id))
        # A walk stores the chat as it was when the walk began. One that began in an earlier
        # run (or began again after an expired cursor) may be long out of date when it ends,
        # so it is followed by an update: a finished run leaves every chat current.
        catch_up = job.state.in_progress
        # Failures in a row: a walk that stored anything since the last one starts the
        # count again, so a long chat on a flaky network is not failed for its length.
        restarts = rounds = 0
        while True:
            stored = job.state.messages
            try:
                if job.rescanning and self._rescan is not None:
                    await self._rescan(job.state)
                else:
                    await self._walk(job)
            except _Restart as exc:
                if job.state.messages > stored:
                    restarts = 0
                catch_up = True
                restarts += 1
                if restarts > MAX_CURSOR_RESTARTS:
                    await self._fail(job, f"cursor rejected {restarts} times in a row: {exc}")
                    return
                stats.cursor_restarts += 1
                logger.info("chat %d: %s; walking again from the newest page", chat_id, exc)
                job.state = attrs.evolve(job.state, cursor=None)
            except RateLimitError as exc:
                # Outlasted the client's retries (or asked for more than its cap): wait it
                # out here, with the wait on display, then go on from the checkpoint.
                stats.resumed_rounds += 1
                await self._wait(exc.retry_after or 5.0)
            except (ServerError, TransportError) as exc:
                if job.state.messages > stored:
                    rounds = 0
                rounds += 1
                if rounds > MAX_TRANSIENT_ROUNDS:
                    await self._fail(job, f"failed {rounds} times in a row: {exc}")
                    return
                stats.resumed_rounds += 1
                retry_after = getattr(exc, "retry_after", None)
                await self._wait(retry_after or min(MAX_ROUND_WAIT, 2.0**rounds))
            except AuthError:
                raise
            except MessagesError as exc:
                await self._fail(job, str(exc) or type(exc).__name__)
                return
            else:
                if catch_up:
                    catch_up = False
                    continue
                if self._rescan is not None and not job.rescanning:
                    job.rescanning = True
                    continue
                stats.chats_done += 1
                stats.stored_messages += job.state.messages
                return

    async def _wait(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        self.stats.waiting_until = max(self.stats.waiting_until, until)
        await asyncio.sleep(seconds)

    async def _fail(self, job: _ChatJob, error: str) -> None:
        chat_id = job.state.chat_id
        logger.warning("chat %d failed: %s", chat_id, error)
        job.state = await self._store.fail(job.state, error)
        self.stats.chats_failed += 1
        self.stats.failures.append(ChatFailure(chat_id, error))

    def _pages(self, state: ChatState) -> AsyncGenerator[MessagesPage, None]:
        options = self._options
        try:
            return self._client.messages.pages(
                state.chat_id,
                limit=options.page_size,
                cursor=state.cursor,
                query=options.query,
                period=self._period,
                # An update usually ends on its first page: fetching the second ahead would
                # be a wasted request per chat.
                prefetch=not state.updating,
            )
        except UnsafeCursorError as exc:
            if state.cursor is None:
                raise
            # A saved cursor that now points outside the API (the server moved, or the
            # demo emulator runs on another port): never followed, the chat restarts.
            raise _Restart(f"the saved cursor no longer points at this API ({exc})") from None

    async def _walk(self, job: _ChatJob) -> None:
        state = job.state
        update = state.updating
        high = state.newest_id if update else None
        pages = self._pages(state)
        try:
            async for page in pages:
                state = job.state
                low = state.walk_low
                writes = []
                finished = False
                for message in page.items:
                    if high is not None and message.id <= high:
                        finished = True
                        break
                    if low is not None and message.id >= low:
                        continue  # stored already, or newer than this walk (after a restart)
                    writes.append(message)
                if page.next_cursor is None:
                    finished = True
                new = attrs.evolve(state, cursor=None if finished else page.next_cursor)
                new.error = None
                if writes:
                    if new.walk_top is None:
                        new.walk_top = writes[0].id
                    new.walk_low = writes[-1].id
                if finished:
                    marks = [m for m in (state.newest_id, new.walk_top) if m is not None]
                    new.done = True
                    new.newest_id = max(marks) if marks else None
                    new.walk_top = new.walk_low = None
                before = state.messages
                job.state = await self._store.commit(new, writes, update=update)
                if self._on_commit is not None and writes:
                    self._on_commit(writes)
                self.stats.messages += job.state.messages - before
                self.stats.pages += 1
                if finished:
                    return
        except InvalidCursorError as exc:
            if job.state.cursor is None:
                raise  # the newest page itself was refused: nothing to restart from
            raise _Restart(str(exc)) from None
        finally:
            await pages.aclose()


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """``await work``, unless ``stop`` is set first: then ``work`` is cancelled, and None."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, stopper):
            pending.cancel()
        # Not gather: this wait must not cancel them again if it is itself cancelled.
        await asyncio.wait({task, stopper})
    if task.cancelled():
        return None
    return task.result()


@attrs.define
class _ChatJob:
    state: ChatState
    rescanning: bool = False
