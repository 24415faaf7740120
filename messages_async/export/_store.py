"""The interface both storage backends implement, and the thread they write from.

Whatever waits for the disk happens on a worker thread, never on the event loop: an ``fsync``
or a SQLite commit takes milliseconds, and the loop meanwhile keeps the other chats' requests
moving. Each runner worker awaits its own commit before it stores the chat's next page, so at
most one commit per worker is queued: the queue in front of the writer is bounded by the
concurrency.

A backend whose pages wait for a grouped sync anyway (JSONL) may instead keep a page in
memory, on the loop, and write it with the page that makes the sync due (``_defer``): a
hand-over to a thread costs as much as the write itself, and a killed run loses such a page
whether it sat in memory or unsynced in the page cache (its checkpoint never claimed it).
Such a backend may also begin the due write on the loop, into the page cache, and leave only
the waits for the disk (``fsync``) to its threads: a thread's every system call is a hand-over
of the GIL, and while the loop is busy each one costs about as much CPU as the write itself
(benchmarks/README.md, "export").

A store opened on an output that holds no chat yet (``_new``) answers :meth:`load` from
memory for every chat it is not already handling: the answer is a new checkpoint, with no
file to read and nothing to repair.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, Self, TypeVar

from .._models import Message
from .._pagination import retrieve_outcome
from ._state import ChatState, ExportMeta, WindowState

__all__ = ["Store", "StoreError"]

logger = logging.getLogger("messages_async.export")

T = TypeVar("T")


class Kept(enum.Enum):
    """What ``_defer`` answers for a page that waits in memory: nothing to do on a thread yet."""

    KEPT = "kept"


KEPT = Kept.KEPT

#: The rest of a write that the loop began, for a store thread (see ``_defer``).
Finish = Callable[[], None]


class StoreError(Exception):
    """The output cannot be used as asked (not an export, other filters, unreadable, ...)."""


class Store(abc.ABC):
    """Where an export goes. Methods are coroutines; what waits for the disk runs on the
    store's threads (a backend may begin a write on the loop, see ``_defer``)."""

    #: The output's path, for messages.
    path: str

    def __init__(self, path: str, *, threads: int = 1) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="export-io")
        self._closed = False
        # Work handed to the threads and not finished yet. A caller cancelled while its work
        # runs does not stop the thread: the write still happens, and settle() waits for it.
        # Work that had not started yet is dropped with its caller (nothing is written),
        # unless it must run: the rest of a write the loop began.
        self._running: set[Future[Any]] = set()
        self._committed = 0
        self._committed_lock = threading.Lock()
        # Set by ``_open`` when the output holds no chat: a chat not in ``_handled`` then has
        # a new checkpoint, and ``load`` needs no thread. Every chat loaded or written is
        # added, so that from then on its checkpoint is read from the output.
        self._new = False
        self._handled: set[int] = set()

    async def _call(self, fn: Callable[..., T], *args: Any, must_run: bool = False) -> T:
        """``fn(*args)`` on a store thread. ``must_run``: it runs even if the caller is
        cancelled before it starts (the rest of a write the loop began)."""
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError:
            if not must_run:
                raise
            # The threads refuse work (shut down, or the interpreter is exiting): what must
            # run runs here, or a begun write would leak its descriptors and never land.
            return fn(*args)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        result = asyncio.wrap_future(future)
        if not must_run:
            return await result
        result.add_done_callback(retrieve_outcome)
        return await asyncio.shield(result)

    async def _call_any(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a store thread, for work that may write any chat (a merge, a
        rescan) outside the public methods: from then on, ``load`` reads every chat's
        checkpoint from the output."""
        self._new = False
        return await self._call(fn, *args)

    def _handling(self, chat_id: int) -> None:
        """Before a write for ``chat_id``: the store must be open; it knows the chat from now."""
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed; nothing more can be stored")
        self._handled.add(chat_id)

    def _count(self, messages: int) -> None:
        """Called once ``messages`` new messages are committed: on a store thread, or on the
        loop for a page the backend keeps for a later write."""
        with self._committed_lock:
            self._committed += messages

    @property
    def committed_messages(self) -> int:
        """New messages this store has committed since it was created.

        Counted on the store's thread as each commit completes (or when the backend keeps the
        page for a later write, which :meth:`close` makes at the latest), so a page whose walk
        was stopped while its commit ran is counted too; exact once :meth:`settle` (or
        :meth:`close`) has returned.
        """
        with self._committed_lock:
            return self._committed

    async def settle(self) -> None:
        """Wait until every write already started has finished (its caller may be gone).

        Cancelling the wait does not cancel the writes.
        """
        running = [asyncio.wrap_future(f) for f in list(self._running)]
        for waited in running:
            # Its outcome belongs to the write's caller: seen here, not reported again.
            waited.add_done_callback(retrieve_outcome)
        if running:
            await asyncio.wait(running)

    async def open(self, meta: ExportMeta, *, fresh: bool) -> None:
        """Create the output, or check that the one there is this export and repair it.

        Raises:
            StoreError: the path holds something else, or an export with other filters.
        """
        await self._call(self._open, meta, fresh)

    async def save_chats(self, chats: Sequence[Mapping[str, Any]]) -> None:
        """Store the chat objects exactly as received (replacing older copies)."""
        await self._call(self._save_chats, list(chats))

    async def load(self, chat_id: int) -> ChatState:
        """The chat's last checkpoint (after repairing anything a crash left behind).

        Not while one of the chat's commits is under way: a chat is written by one caller at
        a time (the exporter loads a chat before it walks it).
        """
        if self._new and chat_id not in self._handled:
            self._handling(chat_id)
            return ChatState(chat_id)
        self._handled.add(chat_id)
        return await self._call(self._load, chat_id)

    async def commit(
        self, state: ChatState, messages: Sequence[Message], *, update: bool
    ) -> ChatState:
        """Store ``messages`` and ``state`` together, atomically; return the stored state.

        A backend that syncs in groups (JSONL) may keep the page in memory when this returns:
        it is written with the chat's next sync, at the latest by :meth:`close`, and a crash
        before that loses it and its checkpoint together (the next run fetches it again).

        Args:
            state: The chat's checkpoint after this page (the store fills in its own fields).
            messages: The page's messages still to store, newest first.
            update: Whether the walk is an update of a chat exported before (its messages are
                newer than everything stored).
        """
        self._handling(state.chat_id)
        page = list(messages)
        taken = self._defer(state, page, update)
        return await self._written(page, taken, state, self._commit_counted, state, page, update)

    async def _written(
        self,
        page: list[Message],
        taken: Finish | Literal[Kept.KEPT] | None,
        stored: T,
        write: Callable[..., T],
        *args: Any,
    ) -> T:
        """A page's commit, as ``_defer`` answered: ``stored`` is returned once the rest of
        the write is done on a store thread, or at once for a page ``KEPT`` in memory (either
        is counted then); None: ``write(*args)`` commits it on a store thread."""
        if taken is None:
            return await self._call(write, *args)
        if taken is KEPT:
            self._count(len(page))
        else:
            await self._call(self._finish_counted, taken, len(page), must_run=True)
        return stored

    def _finish_counted(self, finish: Finish, messages: int) -> None:
        finish()
        self._count(messages)

    def _defer(
        self, state: ChatState, messages: list[Message], update: bool
    ) -> Finish | Literal[Kept.KEPT] | None:
        """On the loop: a backend may take the page here (and update ``state`` as
        ``_commit`` would). ``KEPT``: it waits in memory, to be written with a later page
        or at the latest by ``_close``. A function: the write has begun, and the function
        finishes it on a store thread. None (the default): a store thread commits the page
        with ``_commit``."""
        return None

    def _commit_counted(self, state: ChatState, messages: list[Message], update: bool) -> ChatState:
        # On the store's thread: counted as soon as the backend's commit returns, whether or
        # not the caller is still waiting for it.
        stored = self._commit(state, messages, update)
        self._count(len(messages))
        return stored

    # --- windows: one chat walked in time windows at once (see _state.py) --------------------

    #: Whether this backend keeps per-window checkpoints; the runner never windows a chat of
    #: a store that does not (a backend written before windows existed keeps working).
    supports_windows: bool = False

    async def start_windows(self, state: ChatState, windows: Sequence[WindowState]) -> ChatState:
        """Record that the fresh chat ``state`` is to be walked in ``windows`` (its plan)."""
        self._handling(state.chat_id)
        state.windows = list(windows)
        return await self._call(self._start_windows, state)

    async def commit_window(
        self, state: ChatState, window: WindowState, messages: Sequence[Message]
    ) -> WindowState:
        """Store one page of a window and the window's checkpoint after it, atomically.

        Windows of one chat commit concurrently: each writes only its own checkpoint.
        ``messages`` are newest first and new to the chat.
        """
        self._handling(state.chat_id)
        page = list(messages)
        taken = self._defer_window(state, window, page)
        return await self._written(
            page, taken, window, self._commit_window_counted, state, window, page
        )

    def _defer_window(
        self, state: ChatState, window: WindowState, messages: list[Message]
    ) -> Finish | Literal[Kept.KEPT] | None:
        """``_defer`` for a window's page (it then updated ``window``)."""
        return None

    def _commit_window_counted(
        self, state: ChatState, window: WindowState, messages: list[Message]
    ) -> WindowState:
        stored = self._commit_window(state, window, messages)
        self._count(len(messages))
        return stored

    async def finish_windows(self, state: ChatState) -> ChatState:
        """Join a chat whose every window is walked: afterwards it is ``done``, its
        ``windows`` empty and its layout that of a chat walked in one go."""
        self._handling(state.chat_id)
        return await self._call(self._finish_windows, state)

    def _start_windows(self, state: ChatState) -> ChatState:
        raise NotImplementedError(f"{type(self).__name__} does not walk chats in windows")

    def _commit_window(
        self, state: ChatState, window: WindowState, messages: list[Message]
    ) -> WindowState:
        raise NotImplementedError(f"{type(self).__name__} does not walk chats in windows")

    def _finish_windows(self, state: ChatState) -> ChatState:
        raise NotImplementedError(f"{type(self).__name__} does not walk chats in windows")

    async def fail(self, state: ChatState, error: str) -> ChatState:
        """Record that the chat failed with ``error`` (its stored data is kept)."""
        self._handling(state.chat_id)
        return await self._call(self._fail, state, error)

    async def close(self) -> None:
        """Finish every write that was started, then close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            # A commit that was under way when its worker was cancelled completes first.
            await self.settle()
            await self._call(self._close, must_run=True)
        finally:
            shutdown = functools.partial(self._executor.shutdown, wait=True)
            try:
                await loop.run_in_executor(None, shutdown)
            except RuntimeError:  # the loop's own threads refuse work too
                shutdown()

    async def __aenter__(self) -> Self:
        """``async with SqliteStore(path) as store:`` closes the store however the block ends.

        Entering does not open it: call :meth:`open` inside the block.
        """
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- implemented by the backends, run on the store's threads ----------------------------

    @abc.abstractmethod
    def _open(self, meta: ExportMeta, fresh: bool) -> None: ...

    @abc.abstractmethod
    def _save_chats(self, chats: list[Mapping[str, Any]]) -> None: ...

    @abc.abstractmethod
    def _load(self, chat_id: int) -> ChatState: ...

    @abc.abstractmethod
    def _commit(self, state: ChatState, messages: list[Message], update: bool) -> ChatState: ...

    @abc.abstractmethod
    def _fail(self, state: ChatState, error: str) -> ChatState: ...

    @abc.abstractmethod
    def _close(self) -> None: ...


def each_of(calls: Iterable[Callable[[], object]]) -> None:
    """Make every call, even after one fails, then raise the first failure: at a close, one
    file that cannot be written must not keep the others from being made durable."""
    failed: Exception | None = None
    for call in calls:
        try:
            call()
        except Exception as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


def mismatch(path: str, stored: ExportMeta, wanted: ExportMeta) -> StoreError:
    return StoreError(
        f"{path} holds an export made with {stored.describe()}; this run asks for "
        f"{wanted.describe()}. Run with the same options to resume, add --fresh to start "
        "over, or choose another --out"
    )
