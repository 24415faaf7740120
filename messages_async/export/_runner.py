"""The export runner: chats as jobs of the one worker pool (``_pool.py``), one walk per worker.

Every worker shares the one client, so the client's limiter paces all of them together (a
429 pauses everyone, docs/protocol.md §7). A worker walks a chat with ``client.messages.pages`` and
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
  has stored already, so there is neither a duplicate nor a gap.

What a failure means is decided by ``_retry.after_failed_call``, the one classification of a
call that failed after the client's own retries, and counted in :class:`Rounds` (plain code):

- ``AGAIN`` (an outage: 5xx, the network, the token endpoint down, a misbehaving listing):
  the worker waits and resumes the chat from its last checkpoint, at most
  ``MAX_TRANSIENT_ROUNDS`` times in a row. A rate limit is waited out and never counted, so it
  never turns into a failed chat, however long the server asks to wait;
- ``RESTART`` (an expired cursor): the walk starts again at the newest page, at most
  ``MAX_CURSOR_RESTARTS`` times in a row;
- ``GIVE_UP`` (404, 403, a body that breaks the contract): the chat is marked failed, once,
  with its error recorded, and the worker moves on to the next chat; never asked again in
  this run. A rejected token stops the whole export (every other chat would fail the same
  way), as does an error that is not the API's (the store could not be written).

A walk that stored anything since the last failure starts the counts again, so a long chat on
a flaky network is not failed for its length.

Big chats in time windows. A chat's cursors form a chain, so one chat is one page at a time
however many workers sit idle. A chat never walked before whose first page says
``total_count`` > ``window_threshold`` is instead planned into :func:`window_count` time
windows of about equal count (``client.messages.plan_windows``; the first page is not
stored) and each window becomes a job of the same pool, ahead of the chats still waiting
(:class:`JobFeed`). A window is walked like a chat (the same rounds, its own checkpoint in
the store, an expired cursor restarts it at its own newest page skipping what it stored);
the worker that completes a chat's last window has the store join them and goes on with the
chat as with any other: an update (what arrived during the walk) and a rescan if asked. A
chat resumed with windows goes on with them, whatever the threshold of this run.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

import attrs

from .._checks import count
from .._client import Client
from .._errors import AuthError, MessagesError, RateLimitError, UnsafeCursorError
from .._models import Message, MessagesPage, Period
from .._pool import Emit, Pool
from .._retry import RoundVerdict, after_failed_call
from ._shard import Shard
from ._state import ChatState, WindowState
from ._store import Store

T = TypeVar("T")

__all__ = [
    "DEFAULT_WINDOW_THRESHOLD",
    "ChatFailure",
    "ExportOptions",
    "ExportStats",
    "Exporter",
    "JobFeed",
    "window_count",
]

logger = logging.getLogger("messages_async.export")

#: Rounds of "wait, then resume from the checkpoint" after the client's own retries gave up
#: on a 5xx or a network error. Rate limits are not counted: they are always waited out.
MAX_TRANSIENT_ROUNDS = 5
#: Restarts from the newest page after an expired cursor, per chat and run.
MAX_CURSOR_RESTARTS = 3
#: Longest wait between transient rounds, in seconds.
MAX_ROUND_WAIT = 60.0
#: A chat with more messages than this is walked in time windows (README: planning one costs
#: about twenty ``limit=1`` requests and a few round trips; at 10,000 messages, 100 pages,
#: the walk it shortens is long enough to repay that many times over).
DEFAULT_WINDOW_THRESHOLD = 10_000


def window_count(total: int | None, *, threshold: int, concurrency: int) -> int:
    """How many windows a chat of ``total`` messages is walked in (1: in one go).

    About ``total / threshold`` (rounded up), at most ``concurrency``; ``threshold`` 0
    never windows, nor does a server that sends no ``total_count``.
    """
    if threshold <= 0 or total is None or total <= threshold:
        return 1
    return max(1, min(concurrency, -(-total // threshold)))


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
        shard: Only the chats of this shard (``--shard I/N``; see ``_shard.py``), of the
            listing or of ``chat_ids``.
        window_threshold: A chat never exported before with more messages than this is
            walked in about ``total / window_threshold`` time windows at once (at most
            ``concurrency``); 0: every chat in one walk.
    """

    chat_ids: tuple[int, ...] | None = None
    concurrency: int = 8
    query: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    page_size: int = 100
    shard: Shard | None = None
    window_threshold: int = DEFAULT_WINDOW_THRESHOLD

    def __attrs_post_init__(self) -> None:
        count("concurrency", self.concurrency, minimum=1)
        count("window_threshold", self.window_threshold, minimum=0)
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
    #: Time windows walked (or resumed) in this run, over every windowed chat.
    windows: int = 0
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


@attrs.frozen
class Round:
    """What to do after a failed walk: ``restart`` at the newest page, ``wait`` then resume
    from the checkpoint, ``fail`` the chat (with ``why``), or ``raise`` (stop the export)."""

    action: Literal["restart", "wait", "fail", "raise"]
    wait: float = 0.0
    why: str = ""


@attrs.define
class Rounds:
    """One chat's failed walks in a row, and what the next one means (no I/O, no clock)."""

    restarts: int = 0
    transient: int = 0

    def after(self, exc: BaseException, *, progressed: bool) -> Round:
        """``exc`` ended a walk; ``progressed``: the walk stored something first."""
        if progressed:
            self.restarts = self.transient = 0
        verdict = RoundVerdict.RESTART if isinstance(exc, _Restart) else after_failed_call(exc)
        if verdict is RoundVerdict.RESTART:
            self.restarts += 1
            if self.restarts > MAX_CURSOR_RESTARTS:
                return Round("fail", why=f"cursor rejected {self.restarts} times in a row: {exc}")
            return Round("restart")
        if verdict is RoundVerdict.AGAIN:
            retry_after = getattr(exc, "retry_after", None)
            if isinstance(exc, RateLimitError):
                # Outlasted the client's retries (or asked for more than its cap): waited out
                # here, with the wait on display, and never counted.
                return Round("wait", wait=retry_after or 5.0)
            self.transient += 1
            if self.transient > MAX_TRANSIENT_ROUNDS:
                return Round("fail", why=f"failed {self.transient} times in a row: {exc}")
            return Round("wait", wait=retry_after or min(MAX_ROUND_WAIT, 2.0**self.transient))
        if isinstance(exc, AuthError) or not isinstance(exc, MessagesError):
            return Round("raise")
        return Round("fail", why=str(exc) or type(exc).__name__)


class Exporter:
    """Exports chats from ``client`` into ``store``. Use once: ``await exporter.run()``.

    Args:
        client: An open client (shared by every worker).
        store: An open store.
        options: What to export.
        stop: Set it to stop cleanly: workers are cancelled, and every committed page stays.
        on_commit: Called with each page's new messages once the store has taken them (it
            must not block: the export's ``--media`` queues their attachments).
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
        self._feed = JobFeed(())
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
        ids: list[int] | None = None
        try:
            # Listing the chats may wait out a long Retry-After: a stop must not wait for it.
            ids = await unless_stopped(self._select(), self._stop)
            if ids is None:
                stats.interrupted = True
                return stats
            stats.chats_total = len(ids)
            self._feed = JobFeed(ids)
            pool: Pool[_Job, None] = Pool(
                self._run_job, workers=self._options.concurrency, capacity=1, name="export"
            )
            pool.spawn(lambda: self._feed.run(pool), "jobs")
            try:
                # The pool's first failure (a rejected token, a store that cannot be
                # written) is raised here, after every other worker was cancelled.
                if await unless_stopped(_drain(pool), self._stop) is None:
                    stats.interrupted = True
            finally:
                await pool.aclose()
        finally:
            # A worker stopped while its page was being committed never counted that page,
            # but the page is stored: the summary takes the store's own count.
            await self._store.settle()
            stats.messages = self._store.committed_messages - committed_before
            stats.finished = time.monotonic()
        if stats.interrupted and ids is not None:
            await self._count_what_is_stored(ids)
        return stats

    async def _count_what_is_stored(self, ids: list[int]) -> None:
        """Take the chat counts of a stopped run from the store's checkpoints.

        A worker stopped while its chat's last commit ran, or while it caught up a chat it
        had just completed, never counted that chat, which the store holds complete.
        """
        stats = self.stats
        stats.chats_done = stats.chats_failed = stats.stored_messages = 0
        stats.failures = []
        for chat_id in ids:
            state = await self._store.load(chat_id)
            if state.error is not None:
                stats.chats_failed += 1
                stats.failures.append(ChatFailure(chat_id, state.error))
            elif state.done:
                stats.chats_done += 1
                stats.stored_messages += state.messages

    async def _select(self) -> list[int]:
        chats = await self._client.messages.chats()
        wanted, shard = self._options.chat_ids, self._options.shard
        # A repeated --chat is exported once, in the order given.
        ids = [c.chat_id for c in chats] if wanted is None else list(dict.fromkeys(wanted))
        if shard is not None:
            ids = [i for i in ids if shard.owns(i)]
        chosen = set(ids)
        # A chat the listing does not show is still tried: its walk reports why it fails.
        await self._store.save_chats([c.raw for c in chats if c.chat_id in chosen])
        return ids

    async def _run_job(self, job: _Job, emit: Emit[None]) -> None:
        if isinstance(job, _WindowJob):
            await self._export_window(job)
            return
        stats = self.stats
        stats.chats_active += 1
        handed_over = False
        try:
            chat = _ChatJob(await self._store.load(job))
            if chat.state.windows and not chat.state.done:
                handed_over = self._hand_over(chat)
                if not handed_over:  # every window walked: a run stopped before the join
                    chat.state = await self._store.finish_windows(chat.state)
                    await self._export_chat(chat, catch_up=False)
                return
            # A walk stores the chat as it was when the walk began. One that began in an
            # earlier run (or began again after an expired cursor) may be long out of date
            # when it ends, so it is followed by an update: a finished run leaves every chat
            # current.
            handed_over = await self._export_chat(chat, catch_up=chat.state.in_progress)
        finally:
            if not handed_over:
                stats.chats_active -= 1
            self._feed.chat_ended()

    async def _export_chat(self, job: _ChatJob, *, catch_up: bool) -> bool:
        """Walk (update, rescan) the chat to its end; True: handed over to its windows."""
        stats = self.stats
        chat_id = job.state.chat_id
        rounds = Rounds()
        while True:
            stored = job.state.messages
            windows = 1
            try:
                if job.rescanning and self._rescan is not None:
                    await self._rescan(job.state)
                else:
                    windows = await self._walk(job)
                    if windows > 1 and await self._start_windows(job, windows):
                        return True
            except Exception as exc:
                progressed = job.state.messages > stored
                step = await self._after(rounds, exc, progressed=progressed, what=f"chat {chat_id}")
                if step.action == "raise":
                    raise
                if step.action == "fail":
                    await self._fail(job, step.why)
                    return False
                if step.action == "restart":
                    catch_up = True
                    job.state = attrs.evolve(job.state, cursor=None)
                continue
            if windows > 1:
                continue  # the plan came out as one window: walked in one go after all
            if catch_up:
                catch_up = False
                continue
            if self._rescan is not None and not job.rescanning:
                job.rescanning = True
                continue
            stats.chats_done += 1
            stats.stored_messages += job.state.messages
            return False

    # --- windows -------------------------------------------------------------------------------

    async def _start_windows(self, job: _ChatJob, windows: int) -> bool:
        """Plan the fresh chat's windows and hand them to the pool; False: one window."""
        state = job.state
        plan = await self._client.messages.plan_windows(
            state.chat_id,
            windows=windows,
            query=self._options.query,
            period=self._period,
            concurrency=self._options.concurrency,
        )
        if len(plan) < 2:
            job.windowless = True  # one instant holds (nearly) all of it
            return False
        checkpoints = [WindowState(w.index, w.from_, w.till, estimate=w.estimate) for w in plan]
        job.state = await self._store.start_windows(state, checkpoints)
        logger.info("chat %d: walking %d time windows at once", state.chat_id, len(plan))
        return self._hand_over(job)

    def _hand_over(self, job: _ChatJob) -> bool:
        """Queue the chat's windows not walked yet; False if there is none."""
        chat = _WindowedChat(job, left=sum(not w.done for w in job.state.windows))
        if not chat.left:
            return False
        assert [w.index for w in job.state.windows] == list(range(len(job.state.windows)))
        self.stats.windows += chat.left
        self._feed.add(_WindowJob(chat, w.index) for w in job.state.windows if not w.done)
        return True

    async def _export_window(self, job: _WindowJob) -> None:
        """Walk one window under the chat's rules; the last one joins and finishes the chat."""
        chat, stats = job.chat, self.stats
        windows = chat.job.state.windows
        rounds = Rounds()
        while not windows[job.index].done:
            if chat.failed:
                return  # another window failed the chat: the next run goes on from here
            stored = windows[job.index].messages
            try:
                await self._walk_window(chat, job.index)
            except Exception as exc:
                progressed = windows[job.index].messages > stored
                what = f"chat {chat.job.state.chat_id} window {job.index}"
                step = await self._after(rounds, exc, progressed=progressed, what=what)
                if step.action == "raise":
                    raise
                if step.action == "fail":
                    if not chat.failed:
                        chat.failed = True
                        stats.chats_active -= 1
                        await self._fail(chat.job, step.why)
                    return
                if step.action == "restart":
                    windows[job.index] = attrs.evolve(windows[job.index], cursor=None)
        chat.left -= 1
        if chat.left or chat.failed:
            return
        try:
            chat.job.state = await self._store.finish_windows(chat.job.state)
            # Its first walk is now an update: what was posted while the windows were walked.
            await self._export_chat(chat.job, catch_up=False)
        finally:
            stats.chats_active -= 1

    async def _walk_window(self, chat: _WindowedChat, index: int) -> None:
        state = chat.job.state
        window = state.windows[index]
        pages = self._list(state.chat_id, window.cursor, window.period(), prefetch=True)
        try:
            async for page in pages:
                if chat.failed:
                    return
                window = state.windows[index]
                low = window.low
                # After a restart at the window's newest page: every id at or above ``low``
                # is stored already, or newer than the walk (the chat's update gets those).
                writes = [m for m in page.items if low is None or m.id < low]
                new = attrs.evolve(window, cursor=page.next_cursor, done=not page.next_cursor)
                if writes:
                    new.top = writes[0].id if window.top is None else window.top
                    new.low = writes[-1].id
                state.windows[index] = await self._store.commit_window(state, new, writes)
                if self._on_commit is not None and writes:
                    self._on_commit(writes)
                self.stats.messages += len(writes)
                self.stats.pages += 1
                if new.done:
                    return
        finally:
            await pages.aclose()

    async def _after(self, rounds: Rounds, exc: Exception, *, progressed: bool, what: str) -> Round:
        """What a failed walk of ``what`` leads to; a wait is waited here (the caller
        restarts, fails or raises)."""
        step = rounds.after(exc, progressed=progressed)
        if step.action == "restart":
            self.stats.cursor_restarts += 1
            logger.info("%s: %s; walking again from the newest page", what, exc)
        elif step.action == "wait":
            self.stats.resumed_rounds += 1
            await self._wait(step.wait)
        return step

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

    def _list(
        self, chat_id: int, cursor: str | None, period: Period | None, *, prefetch: bool
    ) -> AsyncGenerator[MessagesPage, None]:
        options = self._options
        try:
            return self._client.messages.pages(
                chat_id,
                limit=options.page_size,
                cursor=cursor,
                query=options.query,
                period=period,
                prefetch=prefetch,
                bulk=True,
            )
        except UnsafeCursorError as exc:
            if cursor is None:
                raise
            # A saved cursor that now points outside the API (the server moved, or the
            # demo emulator runs on another port): never followed, the chat restarts.
            raise _Restart(f"the saved cursor no longer points at this API ({exc})") from None

    async def _walk(self, job: _ChatJob) -> int:
        """Walk the chat from its checkpoint; more than 1: it is to be walked in that many
        windows instead (its first page said how big it is; nothing was stored)."""
        state = job.state
        update = state.updating
        high = state.newest_id if update else None
        # An update usually ends on its first page: fetching the second ahead would be a
        # wasted request per chat.
        pages = self._list(state.chat_id, state.cursor, self._period, prefetch=not update)
        may_window = state.fresh and self._store.supports_windows and not job.windowless
        try:
            async for page in pages:
                if may_window:
                    may_window = False
                    windows = window_count(
                        page.total_count,
                        threshold=self._options.window_threshold,
                        concurrency=self._options.concurrency,
                    )
                    if windows > 1:
                        return windows
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
                    return 1
            return 1
        finally:
            await pages.aclose()


async def _drain(pool: Pool[_Job, None]) -> bool:
    """Run the pool to its end; True (``unless_stopped`` answers None when stopped)."""
    async for _ in pool:
        pass
    return True


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
    #: Planned once already in this run (or found too small): walked in one go.
    windowless: bool = False


@attrs.define(eq=False)
class _WindowedChat:
    """A chat whose windows are being walked: their checkpoints are ``job.state.windows``."""

    job: _ChatJob
    left: int
    failed: bool = False


@attrs.frozen(eq=False)
class _WindowJob:
    chat: _WindowedChat
    index: int


_Job = int | _WindowJob


class _Wait(enum.Enum):
    WAIT = "WAIT"


class JobFeed:
    """The order of the export's jobs (plain code; :meth:`run` hands them to the pool).

    Chats go in their listing's order; a chat found big hands back its windows, which go
    ahead of the chats still waiting, so that the chat is walked in about as many windows
    at once as it was planned in. The feed ends once every chat was handed out and no chat
    job is still running (one that may yet hand back windows).
    """

    WAIT = _Wait.WAIT

    def __init__(self, chat_ids: Iterable[int]) -> None:
        self._chats = collections.deque(chat_ids)
        self._windows: collections.deque[_WindowJob] = collections.deque()
        self._running = 0
        self._changed = asyncio.Event()

    def add(self, windows: Iterable[_WindowJob]) -> None:
        self._windows.extend(windows)
        self._changed.set()

    def chat_ended(self) -> None:
        self._running -= 1
        self._changed.set()

    def next(self) -> _Job | _Wait | None:
        """The next job; ``WAIT``: none until a running chat ends; None: no more, ever."""
        if self._windows:
            return self._windows.popleft()
        if self._chats:
            self._running += 1
            return self._chats.popleft()
        return self.WAIT if self._running > 0 else None

    async def run(self, pool: Pool[_Job, None]) -> None:
        while (job := self.next()) is not None:
            if job is self.WAIT:
                await self._changed.wait()
                self._changed.clear()
                continue
            assert not isinstance(job, _Wait)
            await pool.submit(job)
        await pool.no_more_jobs()
