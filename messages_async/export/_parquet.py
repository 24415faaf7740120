"""The Parquet store: a hive-partitioned dataset for pandas, polars, DuckDB and Spark.

Layout of ``DIR``::

    export.json                               what this export is (source and filters)
    chats.parquet                             one row per chat (typed columns and raw)
    messages/chat_id=<id>/part-<n>.parquet    a chat's messages, a part per row group
    state/<chat_id>.json                      the chat's checkpoint (see _state.py), with
                                              ``parts``: how many parts it has written

``chat_id`` is the partition key: it is in the directory names, not a column inside the files,
so that ``pyarrow.parquet.read_table(DIR + "/messages")`` and DuckDB's
``read_parquet('DIR/messages/**/*.parquet', hive_partitioning=true)`` agree on it. The
columns of a part are :data:`MESSAGE_COLUMNS`; ``raw`` holds the object exactly as received,
unknown fields included, as JSON text.

Crash safety. A Parquet file cannot be appended to, so a chat's pages are buffered in memory
(at most ``part_rows`` rows or ``part_bytes`` of raw JSON per chat, so memory stays bounded
by the concurrency, never by the size of the export) and written as one part when the buffer
is full or the walk ends. A part is written as ``.part-<n>.parquet.tmp`` (a name no
``*.parquet`` glob matches, and hidden from Spark and pyarrow's discovery besides),
``fsync``-ed and renamed into place; then the chat's checkpoint, which records the cursor after
the part's last page and ``parts = n + 1``, replaces the old one atomically. A run killed at
any point leaves every ``*.parquet`` file complete. The next run deletes a leftover ``.tmp``
and any part numbered at or past its checkpoint's ``parts`` (renamed, but never checkpointed),
and fetches those pages again from the checkpoint's cursor: no duplicate, no gap. A clean stop
(Ctrl-C) writes every buffer out first.

Updates simply add parts: rows are not ordered across parts, so nothing is ever rewritten.

Windows. A chat walked in time windows at once (``_state.py``) buffers and writes each
window's pages the same way, as ``messages/chat_id=<id>/.window-<n>-<k>.part`` (Parquet files
under a hidden name no reader's glob takes), with the window's own checkpoint
``.window-<n>.json`` beside them (its ``length`` is the parts it has written). Once every
window is walked, the parts are renamed, newest window first, to the chat's
``part-<k>.parquet`` and the chat's checkpoint says done with their count: the chat is then
stored exactly as one walked in one go. The renames follow from the checkpoints alone, so a
run killed among them finishes them.

pyarrow is an optional dependency (``pip install 'messages-async[parquet]'``); it is imported
when a store is opened, and its absence is a :class:`StoreError` that says how to install it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
from collections.abc import Mapping
from typing import Any

import orjson

from .._checks import count
from .._models import Message
from ._columns import chat_columns, raw_text
from ._jsonl import (
    RESCAN_FOLDERS,
    _fsync_path,
    atomic_write,
    open_folder_export,
    read_window,
    sync_entries,
    write_window,
)
from ._state import ChatState, ExportMeta, WindowState
from ._store import Store, StoreError, each_of

__all__ = ["INSTALL_HINT", "MESSAGE_COLUMNS", "ParquetStore", "load_pyarrow"]

logger = logging.getLogger("messages_async.export")

INSTALL_HINT = "pip install 'messages-async[parquet]'"
#: The columns of every message part, in order (``chat_id`` is the partition key).
MESSAGE_COLUMNS = ("id", "uid", "message", "created_at", "attachments", "raw")

_META = "export.json"
_CHATS = "chats.parquet"
_MESSAGES = "messages"
_STATE = "state"
_OURS = (_META, _CHATS, _MESSAGES, _STATE, *RESCAN_FOLDERS)
_FORMAT = "parquet"
_PART = re.compile(r"part-(\d+)\.parquet")
_WINDOW = ".window-"
_WINDOW_PART = re.compile(r"\.window-(\d+)-(\d+)\.part")
_COMPRESSION = "zstd"


def load_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``; StoreError naming the install command if missing."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise StoreError(
            f"--format parquet needs pyarrow, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    return pyarrow, pyarrow.parquet


def message_schema(pa: Any) -> Any:
    attachment = pa.struct(
        [
            ("type", pa.string()),
            ("url", pa.string()),
            ("name", pa.string()),
            ("size", pa.int64()),
        ]
    )
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            ("uid", pa.int64()),
            ("message", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
            ("attachments", pa.list_(attachment)),
            pa.field("raw", pa.string(), nullable=False),
        ]
    )


def chat_schema(pa: Any) -> Any:
    return pa.schema(
        [
            pa.field("chat_id", pa.int64(), nullable=False),
            ("type", pa.string()),
            ("name", pa.string()),
            ("picture_url", pa.string()),
            ("members_count", pa.int64()),
            pa.field("raw", pa.string(), nullable=False),
        ]
    )


def part_name(n: int) -> str:
    return f"part-{n:05d}.parquet"


def _write_parquet(pq: Any, table: Any, path: str) -> None:
    """Write ``table`` to ``path`` through a hidden temporary name, durably, then rename."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression=_COMPRESSION, row_group_size=max(1, table.num_rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(folder)


class _Buffer:
    """A chat's pages not yet written, as columns, and the checkpoint after the last one."""

    __slots__ = ("attachments", "created", "ids", "raw_bytes", "raws", "state", "texts", "uids")

    def __init__(self, state: ChatState) -> None:
        self.state = state
        self.ids: list[int] = []
        self.uids: list[int] = []
        self.texts: list[str] = []
        self.created: list[Any] = []
        self.attachments: list[list[dict[str, Any]]] = []
        self.raws: list[str] = []
        self.raw_bytes = 0

    def add(self, messages: list[Message]) -> None:
        for m in messages:
            raw = raw_text(m)
            self.ids.append(m.id)
            self.uids.append(m.uid)
            self.texts.append(m.message)
            self.created.append(m.created_at)
            self.attachments.append(
                [
                    {"type": a.type, "url": a.url, "name": a.name, "size": a.size}
                    for a in m.attachments
                ]
            )
            self.raws.append(raw)
            self.raw_bytes += len(raw)

    def table(self, pa: Any) -> Any:
        columns = (self.ids, self.uids, self.texts, self.created, self.attachments, self.raws)
        return pa.Table.from_pydict(
            dict(zip(MESSAGE_COLUMNS, columns, strict=True)), schema=message_schema(pa)
        )


class ParquetStore(Store):
    """An export into a hive-partitioned Parquet dataset (see the module docstring).

    pyarrow's default allocator (mimalloc) keeps what each writer thread freed, which made a
    long export's peak memory about 1.7× what it needs; ``ARROW_DEFAULT_MEMORY_POOL=system``,
    set before pyarrow is imported, avoids that. The command line sets it; a library does not
    choose its process's allocator, so this class leaves it to the application.

    Args:
        path: The directory.
        threads: Writer threads (chats are separate files, so their writes can overlap).
        part_rows: Most rows buffered per chat before a part is written.
        part_bytes: Most bytes of raw JSON buffered per chat before a part is written.
    """

    supports_windows = True

    def __init__(
        self, path: str, *, threads: int = 4, part_rows: int = 10_000, part_bytes: int = 8 << 20
    ) -> None:
        count("part_rows", part_rows, minimum=1)
        count("part_bytes", part_bytes, minimum=1)
        super().__init__(path, threads=threads)
        self.part_rows = part_rows
        self.part_bytes = part_bytes
        self._pa: Any = None
        self._pq: Any = None
        self._buffers: dict[int, _Buffer] = {}
        self._parts: dict[int, int] = {}
        # Windows' pages not yet written, by (chat_id, window index), with the window's
        # checkpoint after the last one.
        self._window_buffers: dict[tuple[int, int], tuple[_Buffer, WindowState]] = {}

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def _chat_dir(self, chat_id: int) -> str:
        return self._p(_MESSAGES, f"chat_id={chat_id}")

    def _state_file(self, chat_id: int) -> str:
        return self._p(_STATE, f"{chat_id}.json")

    def _window_file(self, chat_id: int, index: int) -> str:
        return os.path.join(self._chat_dir(chat_id), f"{_WINDOW}{index}.json")

    def _window_part(self, chat_id: int, index: int, n: int) -> str:
        return os.path.join(self._chat_dir(chat_id), f"{_WINDOW}{index}-{n}.part")

    def _window_names(self, chat_id: int) -> list[str]:
        prefixes = (_WINDOW, f".{_WINDOW}")  # the second: temporary names
        try:
            return [n for n in os.listdir(self._chat_dir(chat_id)) if n.startswith(prefixes)]
        except FileNotFoundError:
            return []

    def _remove_windows(self, chat_id: int) -> None:
        for name in self._window_names(chat_id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._chat_dir(chat_id), name))

    # --- opening ------------------------------------------------------------------------------

    def _stored_meta(self) -> ExportMeta | None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StoreError(
                f"{self.path} is a file; the Parquet format needs a directory for --out"
            )
        if not os.path.isdir(self.path):
            return None
        meta_path = self._p(_META)
        if not os.path.exists(meta_path):
            if os.path.exists(self._p("state.json")):
                raise StoreError(
                    f"{self.path} holds a JSONL export; choose another --out for Parquet"
                )
            if os.listdir(self.path):
                raise StoreError(
                    f"{self.path} is not empty and holds no messages-async export; choose a "
                    "new or empty directory for --out"
                )
            return None
        try:
            with open(meta_path, "rb") as f:
                obj = orjson.loads(f.read())
            if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
                raise ValueError("not a Parquet export")
            return ExportMeta.from_json(obj)
        except (ValueError, KeyError, OSError) as exc:
            raise StoreError(
                f"{meta_path} is unreadable ({exc}); use --fresh to start over"
            ) from None

    def _open(self, meta: ExportMeta, fresh: bool) -> None:
        self._pa, self._pq = load_pyarrow()
        open_folder_export(
            self.path,
            meta,
            fresh,
            stored_meta=self._stored_meta,
            meta_file=_META,
            ours=_OURS,
            folders=(_MESSAGES, _STATE),
            header={**meta.to_json(), "format": _FORMAT},
        )

    def _save_chats(self, chats: list[Mapping[str, Any]]) -> None:
        # Chats exported by earlier runs (say with other --chat options) stay listed.
        pa, pq = self._pa, self._pq
        path = self._p(_CHATS)
        merged: dict[int, str] = {}
        if os.path.exists(path):
            old = pq.read_table(path, columns=["chat_id", "raw"]).to_pydict()
            merged.update(zip(old["chat_id"], old["raw"], strict=True))
        for chat in chats:
            merged[int(chat["chat_id"])] = orjson.dumps(chat).decode()
        rows = [(*chat_columns(orjson.loads(raw)), raw) for raw in merged.values()]
        names = chat_schema(pa).names
        columns = {name: [row[i] for row in rows] for i, name in enumerate(names)}
        _write_parquet(pq, pa.Table.from_pydict(columns, schema=chat_schema(pa)), path)

    # --- checkpoints --------------------------------------------------------------------------

    def _write_state(self, state: ChatState, parts: int) -> None:
        atomic_write(
            self._state_file(state.chat_id), orjson.dumps({**state.to_json(), "parts": parts})
        )

    def _reset(self, chat_id: int, why: str) -> ChatState:
        logger.warning("chat %d: %s; exporting this chat again from the start", chat_id, why)
        shutil.rmtree(self._chat_dir(chat_id), ignore_errors=True)
        self._remove_windows(chat_id)
        state = ChatState(chat_id)
        self._parts[chat_id] = 0
        self._write_state(state, 0)
        return state

    def _load(self, chat_id: int) -> ChatState:
        buffered = self._buffers.get(chat_id)
        if buffered is not None:
            return buffered.state
        try:
            with open(self._state_file(chat_id), "rb") as f:
                obj = orjson.loads(f.read())
            state = ChatState.from_json(obj)
            parts = obj.get("parts", 0)
            if isinstance(parts, bool) or not isinstance(parts, int) or parts < 0:
                raise ValueError(f"parts is {parts!r}")
        except FileNotFoundError:
            state, parts = ChatState(chat_id), 0
        except (ValueError, TypeError) as exc:
            return self._reset(chat_id, f"its checkpoint is unreadable ({exc})")
        if state.windows and not state.done:
            return self._load_windows(state)
        self._remove_windows(chat_id)  # a plan never recorded: the chat starts afresh
        found: set[int] = set()
        folder = self._chat_dir(chat_id)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                match = _PART.fullmatch(name)
                if match is not None and int(match.group(1)) < parts:
                    found.add(int(match.group(1)))
                elif match is not None or name.startswith("."):
                    # A part renamed after its checkpoint was last replaced, or one never
                    # finished: its pages are fetched again from the checkpoint.
                    os.unlink(os.path.join(folder, name))
        if found != set(range(parts)):
            return self._reset(chat_id, f"parts of {folder} are missing")
        self._parts[chat_id] = parts
        return state

    def _commit(self, state: ChatState, messages: list[Message], update: bool) -> ChatState:
        chat_id = state.chat_id
        if chat_id not in self._parts:
            self._load(chat_id)
        buffer = self._buffers.get(chat_id)
        if buffer is None:
            buffer = self._buffers[chat_id] = _Buffer(state)
        buffer.add(messages)
        state.messages += len(messages)
        buffer.state = state
        full = len(buffer.ids) >= self.part_rows or buffer.raw_bytes >= self.part_bytes
        if full or not state.in_progress:
            self._flush(chat_id)
        return state

    def _flush(self, chat_id: int) -> None:
        """Write the chat's buffer as its next part, then its checkpoint."""
        buffer = self._buffers.pop(chat_id, None)
        if buffer is None:
            return
        parts = self._parts.get(chat_id, 0)
        if buffer.ids:
            folder = self._chat_dir(chat_id)
            os.makedirs(folder, exist_ok=True)
            _write_parquet(self._pq, buffer.table(self._pa), os.path.join(folder, part_name(parts)))
            parts += 1
            self._parts[chat_id] = parts
        self._write_state(buffer.state, parts)

    # --- windows ------------------------------------------------------------------------------

    def _write_window(self, chat_id: int, window: WindowState) -> None:
        write_window(self._window_file(chat_id, window.index), window)

    def _start_windows(self, state: ChatState) -> ChatState:
        chat_id = state.chat_id
        self._remove_windows(chat_id)
        os.makedirs(self._chat_dir(chat_id), exist_ok=True)
        for window in state.windows:
            self._write_window(chat_id, window)
        _fsync_path(self._chat_dir(chat_id))
        # The chat's checkpoint last: until it lists the plan, the window files are strays.
        self._write_state(state, 0)
        self._parts[chat_id] = 0
        return state

    def _renames(self, state: ChatState) -> list[tuple[str, str]]:
        """Each window part and the chat part it becomes: newest window first, in order."""
        folder = self._chat_dir(state.chat_id)
        pairs: list[tuple[str, str]] = []
        for window in state.windows:
            for n in range(window.length):
                pairs.append(
                    (
                        self._window_part(state.chat_id, window.index, n),
                        os.path.join(folder, part_name(len(pairs))),
                    )
                )
        return pairs

    def _load_windows(self, state: ChatState) -> ChatState:
        """A windowed chat's checkpoints, each window's parts cut back to its own."""
        chat_id = state.chat_id
        windows = []
        folder = self._chat_dir(chat_id)
        names = set(self._window_names(chat_id))
        for name in names:
            if name.endswith(".tmp"):  # a write never finished
                os.unlink(os.path.join(folder, name))
        for planned in state.windows:
            try:
                window = read_window(self._window_file(chat_id, planned.index), planned)
            except (ValueError, TypeError) as exc:
                return self._reset(chat_id, f"a window's checkpoint is unreadable ({exc})")
            for name in names:
                match = _WINDOW_PART.fullmatch(name)
                ours = match is not None and int(match.group(1)) == window.index
                if ours and match is not None and int(match.group(2)) >= window.length:
                    # Written after the window's checkpoint: its pages are fetched again.
                    os.unlink(os.path.join(folder, name))
            windows.append(window)
        state.windows = windows
        renames = self._renames(state)
        if all(w.done for w in windows):
            if all(os.path.exists(a) or os.path.exists(b) for a, b in renames):
                return state  # the join (perhaps begun) is finished by finish_windows
            return self._reset(chat_id, "parts of its windows are missing")
        if any(not os.path.exists(a) for a, _ in renames):
            return self._reset(chat_id, "parts of its windows are missing")
        # No rename has begun: a part of the chat's own was never checkpointed.
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                if _PART.fullmatch(name) is not None:
                    os.unlink(os.path.join(folder, name))
        return state

    def _commit_window(
        self, state: ChatState, window: WindowState, messages: list[Message]
    ) -> WindowState:
        key = (state.chat_id, window.index)
        buffer = self._window_buffers.get(key, (None, window))[0] or _Buffer(state)
        buffer.add(messages)
        window.messages += len(messages)
        self._window_buffers[key] = (buffer, window)
        full = len(buffer.ids) >= self.part_rows or buffer.raw_bytes >= self.part_bytes
        if full or window.done:
            self._flush_window(key)
        return window

    def _flush_window(self, key: tuple[int, int]) -> None:
        """Write the window's buffer as its next part, then its checkpoint."""
        entry = self._window_buffers.pop(key, None)
        if entry is None:
            return
        buffer, window = entry
        chat_id, index = key
        if buffer.ids:
            _write_parquet(
                self._pq, buffer.table(self._pa), self._window_part(chat_id, index, window.length)
            )
            window.length += 1
        self._write_window(chat_id, window)

    def _finish_windows(self, state: ChatState) -> ChatState:
        chat_id = state.chat_id
        for window in state.windows:
            self._flush_window((chat_id, window.index))
        renames = self._renames(state)
        if renames:
            os.makedirs(self._chat_dir(chat_id), exist_ok=True)
            for src, dst in renames:
                if os.path.exists(src):  # else renamed by a run killed during the join
                    os.replace(src, dst)
            _fsync_path(self._chat_dir(chat_id))
        joined = state.joined()
        joined.length = 0  # parts are counted in the checkpoint's own "parts"
        self._parts[chat_id] = len(renames)
        self._write_state(joined, len(renames))
        _fsync_path(self._p(_STATE))
        self._remove_windows(chat_id)
        return joined

    def _fail(self, state: ChatState, error: str) -> ChatState:
        state.error = error
        if state.chat_id in self._buffers:
            self._buffers[state.chat_id].state = state
            self._flush(state.chat_id)
        else:
            self._write_state(state, self._parts.get(state.chat_id, 0))
        return state

    def _close(self) -> None:
        # A clean stop keeps every page fetched: each buffer is written with its checkpoint,
        # even if another cannot be. Then the folders that hold the chats' folders and the
        # checkpoints are synced (a chat's own folder is, with each part written into it).
        calls = [
            *(functools.partial(self._flush, chat_id) for chat_id in list(self._buffers)),
            *(functools.partial(self._flush_window, key) for key in list(self._window_buffers)),
            functools.partial(sync_entries, self.path, (_MESSAGES, _STATE, *RESCAN_FOLDERS)),
        ]
        each_of(calls)
