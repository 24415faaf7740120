"""The JSONL store: plain files that ``grep``, ``jq`` and a text editor can read.

Layout of ``DIR``::

    state.json                  what this export is (source and filters)
    chats.jsonl                 one chat object per line, exactly as received
    messages/chat_id=<id>/messages.jsonl
                                one message object per line, exactly as received, newest first
                                (one file per exported chat; empty if the chat has none); the
                                folder names are hive partitions, so DuckDB's
                                ``read_json('DIR/messages/*/*.jsonl', hive_partitioning=true)``
                                gives each message its ``chat_id`` (an export begun with the
                                earlier ``messages/<chat_id>.jsonl`` is moved over when opened)
    state/<chat_id>.json        the chat's checkpoint (see _state.py)
    .pending/                   update segments and merge files, see below

Crash safety. A page is appended to the chat's file at the length its checkpoint records,
then the chat's checkpoint, which records the file's length after that page, is written to a
temporary file, ``fsync``-ed and renamed over the old one (an atomic replace). The file is
``fsync``-ed before every checkpoint written, so no checkpoint ever claims a byte that a power
cut could lose. Syncs are grouped: a chat's pages wait in memory (on the event loop, with no
hand-over to a thread) until its checkpoint is due: with every ``sync_pages``-th page, with
the first page ``sync_seconds`` after the first one waiting, when the chat ends or fails and
when the store closes. Then they are appended in one write, the file is synced and the
checkpoint written (a write that fails leaves them waiting, for the next sync or the
close). The write of a sync due with a page begins on the loop: the pages and the new
checkpoint go into the page cache there (about 0.2 ms on ext4), and a store thread waits for
the disk (the two ``fsync``) and renames the checkpoint into place. A thread's every system
call hands the GIL over and back, which costs the busy loop more than the write itself; a
file system slow enough to hold up the loop gets all of its writing done on the threads
(``LoopWrites``). Memory holds at most ``sync_pages`` pages per chat (or window) being
walked. A run killed in between loses the waiting pages (perhaps leaving a torn line of the
write under way past the checkpoint); the next run truncates the file back to the checkpoint
and fetches those pages again from the cursor it records, so no line is ever lost,
duplicated or torn, and a killed run costs at most ``sync_pages`` pages a chat again. Each
chat has its own checkpoint file, so a checkpoint costs the same with ten chats or a hundred
thousand. The folders whose entries the run changed (each chat's it wrote, ``messages/``,
``state/``, ``.pending/``, the rescan's) are ``fsync``-ed when the store closes
(``sync_entries``), so an export that returned keeps its new files' names through a power cut
too.

Updates. A file is newest first, but an update fetches messages *newer* than everything in
it, which belong at the top. An update therefore writes its pages, with the same
checkpoints, to a segment ``.pending/<chat_id>.jsonl``; when the update walk is complete, the
segment and the old file are copied (streamed, never held in memory) into
``.pending/<chat_id>.merge``, which is ``fsync``-ed and renamed over the chat's file. The
checkpoint says ``merging`` (with both lengths) before the rename and is cleared after it, so
a run killed in between finds out from the file's length whether the rename happened and
finishes or repeats the merge. Readers never see a half-updated file; an update rewrites the
chat's file once, costing a sequential copy of it.

Windows. A chat walked in time windows at once (``_state.py``) writes each window's pages to
a segment ``.pending/<chat_id>.window-<n>.jsonl`` with the window's own checkpoint
``.pending/<chat_id>.window-<n>.json`` (the segment's length after each page, as above), and
the chat's checkpoint lists the plan. The chat's file stays empty meanwhile. Once every
window is walked, the segments are copied, newest window first, into
``.pending/<chat_id>.merge``, which is ``fsync``-ed and renamed over the chat's file: the file
is newest first, as if the chat had been walked in one go. The window files are removed only
after the chat's checkpoint says done, so a run killed in between sees from the file's length
whether the rename happened, and finishes or repeats the join.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import msgspec
import orjson

from .._checks import count, seconds
from .._models import Message
from ._state import ChatState, ExportMeta, WindowState
from ._store import KEPT, Finish, Kept, Store, StoreError, each_of, mismatch

__all__ = [
    "RESCAN_FOLDERS",
    "JsonlStore",
    "atomic_write",
    "chat_file",
    "read_window",
    "remove_export",
    "write_window",
]

logger = logging.getLogger("messages_async.export")

_META = "state.json"
_CHATS = "chats.jsonl"
_MESSAGES = "messages"
_STATE = "state"
_PENDING = ".pending"
#: Folders ``--rescan`` writes (see _rescan.py), in JSONL and Parquet exports alike.
RESCAN_FOLDERS = ("versions", "deleted", "rescan")
_OURS = (_META, _CHATS, _MESSAGES, _STATE, _PENDING, *RESCAN_FOLDERS)
_COPY_CHUNK = 1 << 20


def chat_file(root: str, chat_id: int) -> str:
    """A chat's messages file in the JSONL export at ``root``."""
    return os.path.join(root, _MESSAGES, f"chat_id={chat_id}", "messages.jsonl")


def remove_export(root: str, names: tuple[str, ...]) -> None:
    """Remove what an export in ``root`` consists of (``names``); anything else there stays."""
    for name in names:
        target = os.path.join(root, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.unlink(target)


def open_folder_export(
    root: str,
    meta: ExportMeta,
    fresh: bool,
    *,
    stored_meta: Callable[[], ExportMeta | None],
    meta_file: str,
    ours: tuple[str, ...],
    folders: tuple[str, ...],
    header: Mapping[str, Any],
) -> bool:
    """Open (or create) an export kept in the directory ``root``, as JSONL and Parquet are;
    True if it is new (it holds no chat).

    ``stored_meta`` reads what ``root`` holds (``StoreError``: something else, or unreadable);
    with ``fresh``, an unreadable export of ours is discarded rather than refused. A new
    export gets ``folders`` and its ``header`` (written to ``meta_file`` atomically).
    """
    from ._swap import finish_swaps  # (it builds on this module)

    if os.path.isdir(root):
        finish_swaps(root)  # a merge killed midway: each chat wholly old or wholly new
    try:
        stored = stored_meta()
    except StoreError:
        if not (fresh and os.path.exists(os.path.join(root, meta_file))):
            raise
        stored = None
    if fresh and os.path.isdir(root):
        remove_export(root, ours)
        stored = None
    if stored is not None and stored != meta:
        raise mismatch(root, stored, meta)
    for sub in folders:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    if stored is None:
        atomic_write(
            os.path.join(root, meta_file), orjson.dumps(header, option=orjson.OPT_INDENT_2)
        )
        _fsync_path(root)
    return stored is None


def _fsync_path(path: str) -> None:
    """``fsync`` a file or a directory (its entries: a rename in it, a file made)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_entries(root: str, folders: Iterable[str]) -> None:
    """``fsync`` the ``folders`` of the export at ``root`` whose entries a run may have
    changed, then ``root``: the export is then durable as a whole. Every folder is tried;
    the first failure is raised.

    A file's own ``fsync`` keeps its bytes, not its name in its folder: until the folder is
    synced, a power cut can lose a file the run made (a chat's folder, its first checkpoint)
    or a rename, and the next run finds less than the checkpoints say and walks those chats
    again. Done once, when the store closes, rather than with every new file: on ext4 every
    other ``fsync`` commits the folders' entries too, and elsewhere one sync per folder per
    run is the least that holds.
    """

    def sync(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            _fsync_path(path)

    paths = [*(os.path.join(root, folder) for folder in folders), root]
    each_of(functools.partial(sync, path) for path in paths)


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader (or a crash) sees the old or the new file."""
    _installed(path, _unsynced_replacement(path, data))


def _unsynced_replacement(path: str, data: bytes) -> int:
    """``data`` written to ``path``'s temporary file (in the page cache): its descriptor."""
    fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_at(fd, data, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _installed(path: str, fd: int) -> None:
    """The replacement of ``path`` that ``fd`` holds, made durable and then put in place."""
    _synced(fd)
    os.replace(f"{path}.tmp", path)


def _synced(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_window(path: str, window: WindowState) -> None:
    """Replace a window's checkpoint file (atomically)."""
    atomic_write(path, orjson.dumps(window.to_json()))


def read_window(path: str, planned: WindowState) -> WindowState:
    """A window's checkpoint file; ``planned`` (the plan's entry) if there is none yet.

    Raises:
        ValueError, TypeError: the file is unreadable.
    """
    try:
        with open(path, "rb") as f:
            return WindowState.from_json(orjson.loads(f.read()))
    except FileNotFoundError:
        return planned


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return None


def _truncate(path: str, length: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(length)
        f.flush()
        os.fsync(f.fileno())


def _append(path: str, offset: int, data: bytes) -> int:
    """Write ``data`` at ``offset`` (the checkpointed end), durably; the new end."""
    _synced(_unsynced_append(path, offset, data))
    return offset + len(data)


def _unsynced_append(path: str, offset: int, data: bytes) -> int:
    """``data`` written at ``offset`` (in the page cache), the file cut after it: its descriptor.

    The file's folder is made if need be (a chat of a new export gets it with its first page).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        # At the checkpointed offset, not O_APPEND: the file's end is where the checkpoint
        # says, whatever a crashed run may have left beyond it.
        _write_at(fd, data, offset)
        os.ftruncate(fd, offset + len(data))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


#: Which file a chat's pages go to: ``(chat_id, _MAIN)`` its own, ``(chat_id, n)`` window n's
#: segment.
_Key = tuple[int, int]
_MAIN = -1


class _Waiting:
    """One file's pages kept in memory until their sync is due, and the checkpoint after them."""

    __slots__ = ("checkpoint", "pages", "since", "start")

    def __init__(self, start: int, since: float) -> None:
        self.start = start  # where the first of them goes: the file's checkpointed end
        self.since = since
        self.pages: list[bytes] = []
        self.checkpoint = b""  # the checkpoint as of the last of them, serialized


class LoopWrites:
    """Whether a due write still begins on the event loop (see ``JsonlStore._begin``).

    Into the page cache of a local disk, a sync's write takes about 0.2 ms (ext4: 0.23 ms
    median and 0.8 ms at most in the benchmark's export, most of it making the checkpoint's
    temporary file), less CPU than handing its system calls to a thread costs. Slower ones
    hold up every chat: after ``strikes`` writes slower than ``limit`` seconds, the store's
    threads do all of the writing for the rest of the run. A slow file system does that (a
    network mount, a disk under writeback), and so does a loop that other threads keep
    waiting for the GIL (each system call waits for it again).
    """

    __slots__ = ("limit", "slow", "strikes")

    def __init__(self, *, limit: float = 0.002, strikes: int = 3) -> None:
        self.limit = limit
        self.strikes = strikes
        self.slow = 0

    @property
    def allowed(self) -> bool:
        return self.slow < self.strikes

    def took(self, seconds: float) -> None:
        if seconds > self.limit:
            self.slow += 1
            if self.slow == self.strikes:
                logger.info(
                    "writes on the event loop took over %.0f ms %d times; the export's "
                    "threads write from now on",
                    self.limit * 1000,
                    self.strikes,
                )


def _copy_into(out: Any, path: str, length: int) -> None:
    """Copy the first ``length`` bytes of ``path`` into ``out`` (streamed)."""
    with open(path, "rb") as src:
        left = length
        while left > 0:
            chunk = src.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"{path} ended early while merging")
            out.write(chunk)
            left -= len(chunk)


def _count_lines(path: str, length: int) -> int:
    count = 0
    with open(path, "rb") as f:
        left = length
        while left > 0:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


def _one_line(raw: msgspec.Raw) -> bytes:
    # A string never holds a raw line break (RFC 8259 §7), but the space between tokens may:
    # a server that indents its JSON. Only such a message is encoded again, compactly.
    data = bytes(raw)
    if b"\n" in data or b"\r" in data:
        return msgspec.json.encode(msgspec.json.decode(data))
    return data


def _lines(messages: list[Message]) -> bytes:
    """The page's messages, each its JSON as received on a line of its own (no re-encode)."""
    if not messages:
        return b""
    raws = [m.raw_json for m in messages]
    flat = b"".join(raws)  # two joins and two byte searches cost less than counting lines
    if b"\n" in flat or b"\r" in flat:
        return b"".join([_one_line(raw) + b"\n" for raw in raws])
    return b"\n".join(raws) + b"\n"


def _advance(progress: ChatState | WindowState, messages: list[Message]) -> bytes:
    """The page's lines; ``progress`` (a chat's or a window's checkpoint) now counts them."""
    data = _lines(messages)
    progress.length += len(data)
    progress.messages += len(messages)
    return data


class JsonlStore(Store):
    """An export into a directory of JSONL files (see the module docstring for the layout)."""

    supports_windows = True

    def __init__(
        self,
        path: str,
        *,
        threads: int = 4,
        sync_pages: int = 8,
        sync_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        Args:
            path: The export's directory.
            threads: Writer threads: chats are separate files, so their syncs can overlap
                (a chat's own commits stay in order because its worker awaits each one).
            sync_pages: A chat's checkpoint is written (after an ``fsync`` of its file) at
                least every this many pages; 1 syncs every page. A killed run fetches at
                most this many pages a chat again.
            sync_seconds: ... and at least this often while the chat's pages arrive.
            clock: Monotonic seconds, for ``sync_seconds`` and to time the writes made on
                the loop (``LoopWrites``).
        """
        self._sync_pages = count("sync_pages", sync_pages, minimum=1, what="an int of pages")
        self._sync_seconds = seconds("sync_seconds", sync_seconds, allow_zero=True)
        super().__init__(path, threads=threads)
        self._clock = clock
        # Each file is written by one chat's (or window's) commits at a time. Filled on the
        # loop, emptied on the store's threads.
        self._waiting: dict[_Key, _Waiting] = {}
        self._waiting_lock = threading.Lock()
        self._loop_writes = LoopWrites()
        self._wrote: set[int] = set()  # chats whose own file this run wrote

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def _main(self, chat_id: int) -> str:
        return chat_file(self.path, chat_id)

    def _place(self, chat_id: int) -> None:
        """Make the chat's folder, moving a file of the earlier flat layout into it."""
        main = self._main(chat_id)
        os.makedirs(os.path.dirname(main), exist_ok=True)
        flat = self._p(_MESSAGES, f"{chat_id}.jsonl")
        if os.path.exists(flat) and not os.path.exists(main):
            os.replace(flat, main)
            _fsync_path(self._p(_MESSAGES))

    def _pending(self, chat_id: int) -> str:
        return self._p(_PENDING, f"{chat_id}.jsonl")

    def _merge_file(self, chat_id: int) -> str:
        return self._p(_PENDING, f"{chat_id}.merge")

    def _state_file(self, chat_id: int) -> str:
        return self._p(_STATE, f"{chat_id}.json")

    def _window_segment(self, chat_id: int, index: int) -> str:
        return self._p(_PENDING, f"{chat_id}.window-{index}.jsonl")

    def _window_file(self, chat_id: int, index: int) -> str:
        return self._p(_PENDING, f"{chat_id}.window-{index}.json")

    def _files(self, key: _Key) -> tuple[str, str]:
        """The file a chat's (or a window's) pages go to, and its checkpoint file."""
        chat_id, index = key
        if index == _MAIN:
            return self._main(chat_id), self._state_file(chat_id)
        return self._window_segment(chat_id, index), self._window_file(chat_id, index)

    def _remove_windows(self, chat_id: int) -> None:
        prefix = f"{chat_id}.window-"
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self._p(_PENDING)):
                if name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._p(_PENDING, name))

    # --- opening ------------------------------------------------------------------------------

    def _stored_meta(self) -> ExportMeta | None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StoreError(f"{self.path} is a file; the JSONL format needs a directory for --out")
        if not os.path.isdir(self.path):
            return None
        meta_path = self._p(_META)
        if not os.path.exists(meta_path):
            if os.listdir(self.path):
                raise StoreError(
                    f"{self.path} is not empty and holds no messages-async export; choose a "
                    "new or empty directory for --out"
                )
            return None
        try:
            with open(meta_path, "rb") as f:
                return ExportMeta.from_json(orjson.loads(f.read()))
        except (ValueError, KeyError, OSError) as exc:
            raise StoreError(
                f"{meta_path} is unreadable ({exc}); use --fresh to start over"
            ) from None

    def _open(self, meta: ExportMeta, fresh: bool) -> None:
        self._new = open_folder_export(
            self.path,
            meta,
            fresh,
            stored_meta=self._stored_meta,
            meta_file=_META,
            ours=_OURS,
            folders=(_MESSAGES, _STATE, _PENDING),
            header=meta.to_json(),
        )

    def _save_chats(self, chats: list[Mapping[str, Any]]) -> None:
        # Chats exported by earlier runs (say with other --chat options) stay listed.
        merged: dict[int, bytes] = {}
        path = self._p(_CHATS)
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    obj = orjson.loads(line)
                    merged[int(obj["chat_id"])] = line.rstrip(b"\n")
        for chat in chats:
            merged[int(chat["chat_id"])] = orjson.dumps(chat)
        atomic_write(path, b"".join(line + b"\n" for line in merged.values()))

    # --- checkpoints --------------------------------------------------------------------------

    def _write_state(self, state: ChatState) -> None:
        self._sync((state.chat_id, _MAIN))  # the checkpoint may claim what it holds
        atomic_write(self._state_file(state.chat_id), orjson.dumps(state.to_json()))

    def _defer(
        self, state: ChatState, messages: list[Message], update: bool
    ) -> Finish | Literal[Kept.KEPT] | None:
        if update:
            return None
        return self._keep((state.chat_id, _MAIN), state, messages, last=not state.in_progress)

    def _defer_window(
        self, state: ChatState, window: WindowState, messages: list[Message]
    ) -> Finish | Literal[Kept.KEPT] | None:
        return self._keep((state.chat_id, window.index), window, messages, last=window.done)

    def _keep(
        self,
        key: _Key,
        progress: ChatState | WindowState,
        messages: list[Message],
        *,
        last: bool,
    ) -> Finish | Literal[Kept.KEPT] | None:
        """On the loop: keep a page for ``key``'s file in memory unless its sync is due, or
        else begin the due write (``_begin``); ``progress`` (the checkpoint's state) then
        includes the page. None: the write is left to the store's threads (``_commit``).
        ``last``: nothing follows in that file, so the sync is due now."""
        now = self._clock()
        with self._waiting_lock:
            waiting = self._waiting.get(key)
            pages, since = (0, now) if waiting is None else (len(waiting.pages), waiting.since)
            due = last or pages + 1 >= self._sync_pages or now - since >= self._sync_seconds
            if not due:
                if waiting is None:
                    waiting = self._waiting[key] = _Waiting(progress.length, now)
                waiting.pages.append(_advance(progress, messages))
                # The checkpoint as of this page, serialized now: the state objects change later.
                waiting.checkpoint = orjson.dumps(progress.to_json())
                return KEPT
        if not self._loop_writes.allowed:
            return None
        began = self._clock()
        try:
            return self._begin(key, progress, messages)
        finally:
            self._loop_writes.took(self._clock() - began)

    def _begin(
        self, key: _Key, progress: ChatState | WindowState, messages: list[Message]
    ) -> Finish:
        """The due write of a page to ``key``'s file, after the pages waiting for it, begun
        (see ``_begin_write``); ``progress`` then includes the page."""
        offset = progress.length
        data = _advance(progress, messages)
        checkpoint = orjson.dumps(progress.to_json())
        waiting = self._take(key)
        if waiting is None:
            return self._begin_write(key, None, offset, [data], checkpoint)
        return self._begin_write(key, waiting, waiting.start, [*waiting.pages, data], checkpoint)

    def _begin_write(
        self,
        key: _Key,
        waiting: _Waiting | None,
        start: int,
        pages: list[bytes],
        checkpoint: bytes,
    ) -> Finish:
        """Write ``pages`` at ``start`` in ``key``'s file, and the ``checkpoint`` after them,
        into the page cache; the rest, for a store thread: wait for the disk, then put the
        checkpoint in place. A write that fails, here or in the rest, leaves the pages that
        were ``waiting`` waiting again, where the state already counts them: the next sync of
        the file (or the store's close) writes them, at the same offset."""
        path, checkpoint_path = self._files(key)
        if key[1] == _MAIN:
            self._wrote.add(key[0])
        try:
            fd = _unsynced_append(path, start, b"".join(pages))
            try:
                replacement = _unsynced_replacement(checkpoint_path, checkpoint)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            self._put_back(key, waiting)
            raise

        def finish() -> None:
            try:
                try:
                    _synced(fd)  # durable before the checkpoint claims it
                except BaseException:
                    os.close(replacement)
                    raise
                _installed(checkpoint_path, replacement)
            except BaseException:
                self._put_back(key, waiting)
                raise

        return finish

    def _sync_chat(self, chat_id: int) -> None:
        """Write every page of the chat's that waits for a sync, and its checkpoint."""
        with self._waiting_lock:
            keys = [key for key in self._waiting if key[0] == chat_id]
        for key in keys:
            self._sync(key)

    def _sync(self, key: _Key) -> None:
        """Write the pages waiting for ``key``'s file, durably, then their checkpoint."""
        waiting = self._take(key)
        if waiting is not None:
            self._begin_write(key, waiting, waiting.start, waiting.pages, waiting.checkpoint)()

    def _take(self, key: _Key) -> _Waiting | None:
        with self._waiting_lock:
            return self._waiting.pop(key, None)

    def _put_back(self, key: _Key, waiting: _Waiting | None) -> None:
        """After a write that failed: the pages it took wait again, at the same offset."""
        if waiting is not None:
            with self._waiting_lock:
                self._waiting.setdefault(key, waiting)

    def _reset(self, chat_id: int, why: str) -> ChatState:
        logger.warning("chat %d: %s; exporting this chat again from the start", chat_id, why)
        for path in (self._pending(chat_id), self._merge_file(chat_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._remove_windows(chat_id)
        state = ChatState(chat_id)
        _append(self._main(chat_id), 0, b"")
        self._write_state(state)
        return state

    def _load(self, chat_id: int) -> ChatState:
        self._sync_chat(chat_id)  # what is on disk is then the chat's latest checkpoints
        self._place(chat_id)
        try:
            with open(self._state_file(chat_id), "rb") as f:
                state = ChatState.from_json(orjson.loads(f.read()))
        except FileNotFoundError:
            state = ChatState(chat_id)
        except (ValueError, TypeError) as exc:
            return self._reset(chat_id, f"its checkpoint is unreadable ({exc})")
        main, pending = self._main(chat_id), self._pending(chat_id)
        if state.merging:
            return self._finish_merge(state)
        if state.windows and not state.done:
            return self._load_windows(state)
        self._remove_windows(chat_id)  # a plan never recorded: the chat starts afresh
        size = _size(main)
        if size is None:
            if state.length:
                return self._reset(chat_id, f"{main} is missing")
        elif size < state.length:
            return self._reset(chat_id, f"{main} is shorter than its checkpoint")
        elif size > state.length:
            # The tail of a page whose checkpoint never landed: it will be fetched again.
            _truncate(main, state.length)
        if state.done and state.in_progress:
            psize = _size(pending) or 0
            if psize < state.pending_length:
                # Only possible after a power cut lost an fsync-ed segment: redo the update.
                logger.warning("chat %d: the update in progress was lost; redoing it", chat_id)
                state.cursor = state.walk_top = state.walk_low = None
                state.pending_length = 0
                state.messages = _count_lines(main, state.length)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pending)
                self._write_state(state)
            elif psize > state.pending_length:
                _truncate(pending, state.pending_length)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pending)
        return state

    def _commit(self, state: ChatState, messages: list[Message], update: bool) -> ChatState:
        chat_id = state.chat_id
        if not update:
            self._begin((chat_id, _MAIN), state, messages)()
            return state
        data = _lines(messages)
        if data or state.pending_length:
            state.pending_length = _append(self._pending(chat_id), state.pending_length, data)
        state.messages += len(messages)
        finished = not state.in_progress
        if finished and state.pending_length:
            state.merging = True
            self._write_state(state)
            _fsync_path(self._p(_STATE))
            return self._finish_merge(state)
        if finished:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._pending(chat_id))
        self._write_state(state)
        return state

    # --- windows ------------------------------------------------------------------------------

    def _write_window(self, chat_id: int, window: WindowState) -> None:
        write_window(self._window_file(chat_id, window.index), window)

    def _start_windows(self, state: ChatState) -> ChatState:
        chat_id = state.chat_id
        self._place(chat_id)  # for the join's rename: a new export's chat may have no folder
        self._remove_windows(chat_id)
        for window in state.windows:
            _append(self._window_segment(chat_id, window.index), 0, b"")
            self._write_window(chat_id, window)
        _fsync_path(self._p(_PENDING))
        # The chat's checkpoint last: until it lists the plan, the window files are strays.
        self._write_state(state)
        return state

    def _load_windows(self, state: ChatState) -> ChatState:
        """A windowed chat's checkpoints, each window cut back to its own (or redone)."""
        chat_id = state.chat_id
        windows = []
        for planned in state.windows:
            try:
                window = read_window(self._window_file(chat_id, planned.index), planned)
            except (ValueError, TypeError) as exc:
                return self._reset(chat_id, f"a window's checkpoint is unreadable ({exc})")
            segment = self._window_segment(chat_id, window.index)
            size = _size(segment) or 0
            if size < window.length:
                # Only possible after a power cut lost an fsync-ed segment: redo the window.
                logger.warning(
                    "chat %d: window %d was lost; walking it again", chat_id, window.index
                )
                window = WindowState(
                    planned.index, planned.from_, planned.till, estimate=planned.estimate
                )
                _append(segment, 0, b"")
                self._write_window(chat_id, window)
            elif size > window.length:
                _truncate(segment, window.length)
            windows.append(window)
        state.windows = windows
        total = sum(w.length for w in windows)
        size = _size(self._main(chat_id)) or 0
        if all(w.done for w in windows) and size == total:
            return self._joined(state)  # killed after the join's rename
        if size:
            # The chat's file holds nothing while its windows are walked (no rename yet).
            _truncate(self._main(chat_id), 0)
        return state

    def _commit_window(
        self, state: ChatState, window: WindowState, messages: list[Message]
    ) -> WindowState:
        self._begin((state.chat_id, window.index), window, messages)()
        return window

    def _finish_windows(self, state: ChatState) -> ChatState:
        chat_id = state.chat_id
        main, merged = self._main(chat_id), self._merge_file(chat_id)
        self._sync_chat(chat_id)
        with open(merged, "wb") as out:
            for window in state.windows:  # newest first
                _copy_into(out, self._window_segment(chat_id, window.index), window.length)
            out.flush()
            os.fsync(out.fileno())
        os.replace(merged, main)
        _fsync_path(os.path.dirname(main))
        return self._joined(state)

    def _joined(self, state: ChatState) -> ChatState:
        joined = state.joined()
        self._write_state(joined)
        _fsync_path(self._p(_STATE))
        self._remove_windows(state.chat_id)
        return joined

    def _finish_merge(self, state: ChatState) -> ChatState:
        """Put the update segment on top of the chat's file (see the module docstring)."""
        chat_id = state.chat_id
        main, pending = self._main(chat_id), self._pending(chat_id)
        merged = self._merge_file(chat_id)
        total = state.length + state.pending_length
        size = _size(main)
        if size != total:
            # The rename has not happened: the file is still exactly the old one. Anything
            # else means files were lost or changed behind the export's back.
            if size != state.length or (_size(pending) or 0) < state.pending_length:
                return self._reset(chat_id, "an update was interrupted and its files changed")
            with open(merged, "wb") as out:
                for path, length in ((pending, state.pending_length), (main, state.length)):
                    _copy_into(out, path, length)
                out.flush()
                os.fsync(out.fileno())
            os.replace(merged, main)
            _fsync_path(os.path.dirname(main))
        state.length = total
        state.pending_length = 0
        state.merging = False
        self._write_state(state)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pending)
        return state

    def _fail(self, state: ChatState, error: str) -> ChatState:
        state.error = error
        self._write_state(state)
        return state

    def _close(self) -> None:
        # A stop (or the end) leaves every checkpoint at the last page kept. One file that
        # cannot be written does not keep the others' pages from theirs.
        with self._waiting_lock:
            keys = list(self._waiting)
        each_of([*(functools.partial(self._sync, key) for key in keys), self._sync_entries])

    def _sync_entries(self) -> None:
        chats = [os.path.dirname(self._main(chat_id)) for chat_id in self._wrote]
        sync_entries(self.path, [*chats, _MESSAGES, _STATE, _PENDING, *RESCAN_FOLDERS])
