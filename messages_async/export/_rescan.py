"""``messages-async export --rescan``: finding the edits and deletions of stored messages.

The API has no "changed since": an update that fetches only newer ids never sees an edit or a
deletion of an older message. A rescan walks a stored chat in full again, after its update,
and compares page by page:

- a message whose raw object changed: its earlier form (if not kept yet) and its new form go
  to the message's versions, and its current row (where the format has one) is updated;
- a stored message that the walk no longer returns, in the stretch of ids a page covers, is
  marked deleted (``deleted_at``), never removed;
- ids above the chat's watermark when the rescan began are the update's business, not the
  rescan's.

A page covers the ids from its oldest item up to the oldest item of the page before it (the
first page: up to the watermark; the last page: everything below), because a listing is
ordered by id and its cursors are keyset positions (docs/protocol.md §3). Each page's findings
and the rescan's checkpoint (its cursor and the lowest id compared so far) are committed
together, so a rescan killed at any point goes on from its last page, and an expired cursor
starts again at the newest page, skipping what was compared already.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import orjson

from .._client import Client
from .._errors import InvalidCursorError, UnsafeCursorError
from .._models import Message, Period
from ._jsonl import RESCAN_FOLDERS, JsonlStore, _append, _fsync_path, atomic_write, chat_file
from ._parquet import ParquetStore, load_pyarrow
from ._sqlite import SqliteStore, created_columns
from ._state import ChatState
from ._store import Store

__all__ = ["RescanState", "RescanStats", "Rescanner"]

logger = logging.getLogger("messages_async.export")

#: Restarts from the newest page after an expired cursor, per chat and run.
MAX_CURSOR_RESTARTS = 3


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@attrs.define
class RescanState:
    """A chat's rescan checkpoint.

    Attributes:
        top: Ids at or above this are not the rescan's (the watermark + 1 when it began).
        cursor: Where the rescan goes on (None: at the newest page).
        low: The lowest id compared so far; ids from here up to ``top`` are done.
    """

    chat_id: int
    top: int | None = None
    cursor: str | None = None
    low: int | None = None

    @property
    def in_progress(self) -> bool:
        return self.top is not None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class RescanStats:
    """What rescans found in this run."""

    chats: int = 0
    compared: int = 0
    edits: int = 0
    deletions: int = 0


class RescanBackend(abc.ABC):
    """A format's side of a rescan. Methods run on the store's threads."""

    @abc.abstractmethod
    def load(self, chat_id: int) -> RescanState: ...

    @abc.abstractmethod
    def commit(
        self, state: RescanState, messages: list[Message], low: int | None, top: int
    ) -> tuple[int, int]:
        """Compare ``messages`` (all ``< top``) with what is stored, mark the stored ids in
        ``[low, top)`` that are missing as deleted (``low`` None: no lower bound), save
        ``state``, all at once; returns ``(edits, deletions)``."""


class SqliteRescan(RescanBackend):
    """``message_versions(id, version, raw, seen_at)``, ``messages.deleted_at`` and a
    ``rescan_state`` table, written in the export's own transactions (its connection and
    thread), so a page's findings and the checkpoint land together."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS message_versions (
        id INTEGER NOT NULL, version INTEGER NOT NULL, raw TEXT NOT NULL, seen_at TEXT,
        PRIMARY KEY (id, version)
    );
    CREATE TABLE IF NOT EXISTS rescan_state (
        chat_id INTEGER PRIMARY KEY, top INTEGER, cursor TEXT, low INTEGER
    );
    """

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._ready = False

    def _prepare(self) -> None:
        if self._ready:
            return
        db = self._store.db
        columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
        if "deleted_at" not in columns:
            db.execute("ALTER TABLE messages ADD COLUMN deleted_at TEXT")
        db.executescript(self._SCHEMA)
        self._ready = True

    def load(self, chat_id: int) -> RescanState:
        self._prepare()
        row = self._store.db.execute(
            "SELECT top, cursor, low FROM rescan_state WHERE chat_id = ?", (chat_id,)
        ).fetchone()
        return RescanState(chat_id) if row is None else RescanState(chat_id, *row)

    def commit(
        self, state: RescanState, messages: list[Message], low: int | None, top: int
    ) -> tuple[int, int]:
        self._prepare()
        db = self._store.db
        now = _now()
        edits = deletions = 0
        db.execute("BEGIN")
        try:
            ids = [m.id for m in messages]
            stored = dict(
                db.execute(
                    "SELECT id, raw FROM messages WHERE id IN (SELECT value FROM json_each(?))",
                    (orjson.dumps(ids),),
                ).fetchall()
            )
            created_at = created_columns(messages, self._store.timestamps)
            for m, created in zip(messages, created_at, strict=True):
                old = stored.get(m.id)
                new = orjson.dumps(m.raw).decode()
                if old is None:
                    # Stored nowhere yet (say it was posted into the past): keep it now.
                    db.execute(
                        "INSERT OR IGNORE INTO messages (id, chat_id, raw, uid, message, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (m.id, state.chat_id, new, m.uid, m.message, created),
                    )
                    continue
                if orjson.loads(old) == m.raw:
                    db.execute(
                        "UPDATE messages SET deleted_at = NULL WHERE id = ? AND deleted_at "
                        "IS NOT NULL",
                        (m.id,),
                    )
                    continue
                edits += 1
                (latest,) = db.execute(
                    "SELECT max(version) FROM message_versions WHERE id = ?", (m.id,)
                ).fetchone()
                if latest is None:
                    # The form stored before versions were kept; when it was seen is unknown.
                    db.execute("INSERT INTO message_versions VALUES (?, 1, ?, NULL)", (m.id, old))
                    latest = 1
                db.execute(
                    "INSERT INTO message_versions VALUES (?, ?, ?, ?)", (m.id, latest + 1, new, now)
                )
                db.execute(
                    "UPDATE messages SET raw = ?, uid = ?, message = ?, created_at = ?, "
                    "deleted_at = NULL WHERE id = ?",
                    (new, m.uid, m.message, created, m.id),
                )
            deletions = db.execute(
                "UPDATE messages SET deleted_at = ? WHERE chat_id = ? AND id < ? AND id >= ? "
                "AND deleted_at IS NULL AND id NOT IN (SELECT value FROM json_each(?))",
                (now, state.chat_id, top, low if low is not None else -(2**63), orjson.dumps(ids)),
            ).rowcount
            db.execute(
                "INSERT INTO rescan_state (chat_id, top, cursor, low) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (chat_id) DO UPDATE SET top = excluded.top, "
                "cursor = excluded.cursor, low = excluded.low",
                (state.chat_id, state.top, state.cursor, state.low),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return edits, deletions


class FilesRescan(RescanBackend):
    """JSONL and Parquet, whose message files are never rewritten: append-only
    ``DIR/versions/<chat_id>.jsonl`` (``{"id", "version", "raw", "seen_at"}``, ``raw`` as an
    object) and ``DIR/deleted/<chat_id>.jsonl`` (``{"id", "deleted_at"}``), and the rescan's
    checkpoint in ``DIR/rescan/<chat_id>.json`` (with the two files' lengths: a tail past them
    is a page whose checkpoint never landed, cut off before the rescan goes on).

    The current form of a message is its last version, if it has one, else its stored line.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        # Per chat while it is rescanned: id -> current raw, and the ids marked deleted.
        self._current: dict[int, dict[int, Any]] = {}
        self._deleted: dict[int, set[int]] = {}
        self._versions: dict[int, dict[int, int]] = {}

    def _p(self, *parts: str) -> str:
        return os.path.join(self._store.path, *parts)

    def load(self, chat_id: int) -> RescanState:
        # Every folder and record file made here is named durably before any checkpoint
        # counts what it holds: a power cut cannot leave a checkpoint past a lost file.
        _made_durably(
            [self._p(sub) for sub in RESCAN_FOLDERS], lambda path: os.makedirs(path, exist_ok=True)
        )
        versions, deleted = (
            self._p("versions", f"{chat_id}.jsonl"),
            self._p("deleted", f"{chat_id}.jsonl"),
        )
        _made_durably([versions, deleted], lambda path: _append(path, 0, b""))
        state, lengths = RescanState(chat_id), (0, 0)
        with contextlib.suppress(FileNotFoundError):
            with open(self._p("rescan", f"{chat_id}.json"), "rb") as f:
                obj = orjson.loads(f.read())
            state = RescanState(chat_id, obj["top"], obj["cursor"], obj["low"])
            lengths = (obj["versions_length"], obj["deleted_length"])
        if _size(versions) < lengths[0] or _size(deleted) < lengths[1]:
            # A record the checkpoint counts is gone (removed by hand, or lost to a fault of
            # the disk): what the rescan found since the export is found again.
            logger.warning("chat %d: the rescan's records were lost; rescanning it", chat_id)
            state, lengths = RescanState(chat_id), (0, 0)
        for path, length in ((versions, lengths[0]), (deleted, lengths[1])):
            _append(path, length, b"")  # cut off what no checkpoint covers
        current = dict(self._stored(chat_id))
        counts: dict[int, int] = {}
        with open(versions, "rb") as f:
            for line in f:
                obj = orjson.loads(line)
                current[obj["id"]] = obj["raw"]
                counts[obj["id"]] = obj["version"]
        with open(deleted, "rb") as f:
            gone = {orjson.loads(line)["id"] for line in f}
        self._current[chat_id], self._deleted[chat_id] = current, gone
        self._versions[chat_id] = counts
        return state

    def _stored(self, chat_id: int) -> Any:
        if isinstance(self._store, ParquetStore):
            _, pq = load_pyarrow()
            folder = self._p("messages", f"chat_id={chat_id}")
            with contextlib.suppress(FileNotFoundError):
                for name in sorted(os.listdir(folder)):
                    if name.endswith(".parquet") and not name.startswith("."):
                        table = pq.read_table(os.path.join(folder, name), columns=["id", "raw"])
                        for mid, raw in zip(
                            table.column("id").to_pylist(),
                            table.column("raw").to_pylist(),
                            strict=True,
                        ):
                            yield mid, orjson.loads(raw)
            return
        with (
            contextlib.suppress(FileNotFoundError),
            open(chat_file(self._store.path, chat_id), "rb") as f,
        ):
            for line in f:
                if line.endswith(b"\n"):
                    obj = orjson.loads(line)
                    yield obj["id"], obj

    def commit(
        self, state: RescanState, messages: list[Message], low: int | None, top: int
    ) -> tuple[int, int]:
        chat_id = state.chat_id
        current, gone = self._current[chat_id], self._deleted[chat_id]
        counts = self._versions[chat_id]
        now = _now()
        version_lines: list[bytes] = []
        returned = set()
        edits = 0
        for m in messages:
            returned.add(m.id)
            old = current.get(m.id)
            if old is None or old == m.raw:
                continue
            edits += 1
            if m.id not in counts:
                version_lines.append(
                    orjson.dumps({"id": m.id, "version": 1, "raw": old, "seen_at": None})
                )
                counts[m.id] = 1
            counts[m.id] += 1
            version_lines.append(
                orjson.dumps({"id": m.id, "version": counts[m.id], "raw": m.raw, "seen_at": now})
            )
            current[m.id] = m.raw
        floor = low if low is not None else -(2**63)
        missing = sorted(
            (i for i in current if floor <= i < top and i not in returned and i not in gone),
            reverse=True,
        )
        gone.update(missing)
        deleted_lines = [orjson.dumps({"id": i, "deleted_at": now}) for i in missing]
        versions = self._p("versions", f"{chat_id}.jsonl")
        deleted = self._p("deleted", f"{chat_id}.jsonl")
        v_len = _append(versions, _size(versions), b"".join(x + b"\n" for x in version_lines))
        d_len = _append(deleted, _size(deleted), b"".join(x + b"\n" for x in deleted_lines))
        checkpoint = {**state.to_json(), "versions_length": v_len, "deleted_length": d_len}
        atomic_write(self._p("rescan", f"{chat_id}.json"), orjson.dumps(checkpoint))
        if not state.in_progress:
            _fsync_path(self._p("rescan"))
        return edits, len(missing)

    def forget(self, chat_id: int) -> None:
        self._current.pop(chat_id, None)
        self._deleted.pop(chat_id, None)
        self._versions.pop(chat_id, None)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _made_durably(paths: list[str], make: Callable[[str], object]) -> None:
    """``make`` each of ``paths`` that does not exist, then ``fsync`` the folders they were
    made in, so their names outlive a power cut. Chats are loaded at once on several
    threads: ``make`` must accept a path that another has just made."""
    made = [path for path in paths if not os.path.exists(path)]
    for path in made:
        make(path)
    for folder in sorted({os.path.dirname(path) for path in made}):
        _fsync_path(folder)


def backend_for(store: Store) -> RescanBackend:
    if isinstance(store, SqliteStore):
        return SqliteRescan(store)
    if isinstance(store, (JsonlStore, ParquetStore)):
        return FilesRescan(store)
    raise TypeError(f"no rescan for {type(store).__name__}")


class Rescanner:
    """Walks stored chats again and records their edits and deletions.

    Give :meth:`rescan` to the :class:`Exporter` as ``rescan``: it runs for each chat after
    the chat's update, in the same worker, with the same retry rules.

    Args:
        client: The export's open client.
        store: Its open store.
        page_size: Messages per request.
        query: The export's text filter.
        period: The export's date filter.
    """

    def __init__(
        self,
        client: Client,
        store: Store,
        *,
        page_size: int = 100,
        query: str | None = None,
        period: Period | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._backend = backend_for(store)
        self._page_size = page_size
        self._query = query
        self._period = period
        self._states: dict[int, RescanState] = {}
        self._lock = threading.Lock()
        self.stats = RescanStats()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._store._call_any(fn, *args)

    async def rescan(self, chat: ChatState) -> None:
        """Rescan one chat to its oldest message, from its rescan checkpoint."""
        chat_id = chat.chat_id
        state = self._states.get(chat_id)
        if state is None:
            state = await self._run(self._backend.load, chat_id)
        self._states[chat_id] = state
        if not state.in_progress:
            if chat.newest_id is None:
                return  # nothing stored, nothing to compare
            state.top = chat.newest_id + 1
        restarts = 0
        while True:
            try:
                await self._walk(state)
                break
            except (InvalidCursorError, UnsafeCursorError):
                if state.cursor is None or restarts >= MAX_CURSOR_RESTARTS:
                    raise
                restarts += 1
                logger.info("chat %d: rescan cursor refused; again from the newest page", chat_id)
                state.cursor = None
        self._states.pop(chat_id, None)
        if isinstance(self._backend, FilesRescan):
            self._backend.forget(chat_id)
        self.stats.chats += 1

    def _commit_counted(
        self, state: RescanState, messages: list[Message], low: int | None, top: int
    ) -> None:
        # Counted on the store's thread as the commit completes: a walk stopped while its
        # page was being committed still has that page's findings counted.
        edits, deletions = self._backend.commit(state, messages, low, top)
        with self._lock:
            self.stats.compared += len(messages)
            self.stats.edits += edits
            self.stats.deletions += deletions

    async def _walk(self, state: RescanState) -> None:
        top = state.top
        assert top is not None
        pages = self._client.messages.pages(
            state.chat_id,
            limit=self._page_size,
            cursor=state.cursor,
            query=self._query,
            period=self._period,
        )
        try:
            async for page in pages:
                bound: int = state.low if state.low is not None else top
                considered = [m for m in page.items if m.id < bound]
                final = page.next_cursor is None
                low = None if final else min([bound, *(m.id for m in page.items)])
                new = RescanState(
                    state.chat_id,
                    None if final else top,
                    None if final else page.next_cursor,
                    None if final else low,
                )
                await self._run(self._commit_counted, new, considered, low, bound)
                state.top, state.cursor, state.low = new.top, new.cursor, new.low
                if final:
                    return
        finally:
            await pages.aclose()
