"""The SQLite store: one file, one writer thread, a page and its checkpoint in one transaction.

Layout (queries welcome; the ``raw`` columns hold every field exactly as received, unknown ones
included, as JSON text)::

    meta(key TEXT PRIMARY KEY, value TEXT)                       -- what this export is
    chats(chat_id INTEGER PRIMARY KEY, raw TEXT, type TEXT, name TEXT, picture_url TEXT,
          members_count INTEGER)
    messages(id INTEGER NOT NULL UNIQUE, chat_id INTEGER NOT NULL, raw TEXT NOT NULL,
             uid INTEGER, message TEXT, created_at TIMESTAMP)    -- index on (chat_id, id)
    export_state(chat_id INTEGER PRIMARY KEY, done, newest_id, cursor, walk_top, walk_low,
                 error, messages, updated_at)                    -- see _state.py
    export_windows(chat_id INTEGER, idx INTEGER, checkpoint TEXT, PRIMARY KEY (chat_id, idx))
                                                  -- a windowed chat's windows while it is walked

``created_at`` is UTC as ``YYYY-MM-DD HH:MM:SS[.ffffff]`` (see ``_columns.utc_timestamp``);
an export begun before that column was typed keeps the server's text there.

Message rows are stored in the order they arrive, and found through the unique index on ``id``
and the index on ``(chat_id, id)``. Ids grow across all chats, so a table keyed on ``id`` put
each page's rows on as many different table pages as it had messages, and every commit wrote
all of them again: appending is about twice as fast to export (benchmarks/README.md), and an
export made with the older layout still resumes as before.

A page's messages and the chat's new checkpoint go in one transaction, so the file always
holds exactly the pages its checkpoints say; ``INSERT OR IGNORE`` on the message id makes a
replayed page harmless besides. A chat walked in time windows (``_state.py``) commits each
window's page with that window's row of ``export_windows`` (its checkpoint as JSON) instead;
the rows are deleted in the transaction that marks the chat done, so a completed chat is
stored exactly as one walked in one go.

One writer commits the pages in groups (all that queued while the last group was written, in
one transaction), and a walk goes on while its pages wait for it, up to a bound
(``_WRITE_BEHIND_PAGES``): a killed process loses the pages still queued together with their
checkpoints, and the next run fetches them again. A group that cannot be stored stops the
store: nothing queued after it is written, every later call raises, and so does ``close()``.
WAL mode with ``synchronous=NORMAL``: a killed process loses
nothing that was committed; a power cut may lose the last few commits, but never leaves the
file inconsistent, and the next run simply fetches those pages again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import orjson

from .._models import Message
from .._pagination import retrieve_outcome
from ._columns import chat_columns, raw_text, utc_timestamps
from ._state import ChatState, ExportMeta, WindowState
from ._store import Store, StoreError, mismatch

__all__ = ["SqliteStore", "created_columns"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chats (
    chat_id INTEGER PRIMARY KEY, raw TEXT, type TEXT, name TEXT, picture_url TEXT,
    members_count INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER NOT NULL UNIQUE,
    chat_id INTEGER NOT NULL,
    raw TEXT NOT NULL,
    uid INTEGER,
    message TEXT,
    created_at TIMESTAMP
);
CREATE INDEX IF NOT EXISTS messages_chat_id ON messages (chat_id, id);
CREATE TABLE IF NOT EXISTS export_state (
    chat_id INTEGER PRIMARY KEY,
    done INTEGER NOT NULL DEFAULT 0,
    newest_id INTEGER,
    cursor TEXT,
    walk_top INTEGER,
    walk_low INTEGER,
    error TEXT,
    messages INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT
);
CREATE TABLE IF NOT EXISTS export_windows (
    chat_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    checkpoint TEXT NOT NULL,
    PRIMARY KEY (chat_id, idx)
);
"""

_STATE_COLUMNS = (
    "chat_id",
    "done",
    "newest_id",
    "cursor",
    "walk_top",
    "walk_low",
    "error",
    "messages",
)
_UPSERT_STATE = (
    f"INSERT INTO export_state ({', '.join(_STATE_COLUMNS)}, updated_at) "
    f"VALUES ({', '.join('?' * len(_STATE_COLUMNS))}, ?) "
    "ON CONFLICT (chat_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in (*_STATE_COLUMNS[1:], "updated_at"))
)
# Message rows are bound as they are: ``raw`` is each message's JSON text as received (nothing
# parsed or encoded again) and ``message`` the whole text (SQLite's JSON functions would cut it
# at a U+0000). Measured on the store's thread, 100-message pages: about 0.8 ms of CPU a page
# bound this way, 1.3 ms through one JSON array unpacked by json_each (the way checkpoints go
# in below).
#
# Many rows go in one statement (``VALUES (...), (...), ...``) rather than one statement a row
# (``executemany``): the sqlite3 module lets go of the GIL around every statement it steps,
# and while the event loop is busy each row's taking it back is a wait and two context
# switches. 100k rows beside a busy thread: 3.3 s with ``executemany``, 0.35-0.5 s this way
# (benchmarks/README.md, export). A statement is prepared once per row count and cached, so
# the counts are powers of two (a batch of any size takes a few of at most nine statements).
_MESSAGE_COLUMNS = "(id, chat_id, raw, uid, message, created_at)"
_MESSAGE_VALUES = "(?, ?, ?, ?, ?, ?)"
_MAX_ROWS_PER_INSERT = 256
#: Pages a walk may leave queued for the writer before it waits for them (see commit()).
_WRITE_BEHIND_PAGES = 32


@functools.cache
def _insert_messages(count: int) -> str:
    return f"INSERT OR IGNORE INTO messages {_MESSAGE_COLUMNS} VALUES " + ", ".join(
        [_MESSAGE_VALUES] * count
    )


def _row_counts(rows: int, most: int) -> Iterator[int]:
    """Split ``rows`` into statements of ``most`` rows, then powers of two below it."""
    while rows >= most:
        yield most
        rows -= most
    size = most
    while rows:
        size //= 2
        if size <= rows:
            yield size
            rows -= size


def _most_rows_per_insert(db: sqlite3.Connection) -> int:
    """The largest power of two of rows, up to 256, whose parameters the SQLite build takes
    in one statement (999 before SQLite 3.32, 32766 since)."""
    limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _MESSAGE_VALUES.count("?")
    most = _MAX_ROWS_PER_INSERT
    while most > limit:
        most //= 2
    return most


# Checkpoints go in as one JSON array, which SQLite unpacks itself. (json_extract rather than
# the ->> operators, which need SQLite 3.38; many systems' Pythons have older.)
_STATE_VALUES = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(_STATE_COLUMNS) + 1))
_UPSERT_STATES = (
    f"INSERT INTO export_state ({', '.join(_STATE_COLUMNS)}, updated_at) "
    f"SELECT {_STATE_VALUES} "
    "FROM json_each(?) WHERE true "  # WHERE: lets SQLite parse the ON CONFLICT that follows
    "ON CONFLICT (chat_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in (*_STATE_COLUMNS[1:], "updated_at"))
)
_UPSERT_WINDOW = (
    "INSERT INTO export_windows (chat_id, idx, checkpoint) VALUES (?, ?, ?) "
    "ON CONFLICT (chat_id, idx) DO UPDATE SET checkpoint = excluded.checkpoint"
)
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


#: Columns added to ``chats`` after the first layout: added to older exports when opened.
_CHAT_COLUMNS = (
    ("type", "TEXT"),
    ("name", "TEXT"),
    ("picture_url", "TEXT"),
    ("members_count", "INTEGER"),
)


def created_columns(messages: list[Message], timestamps: bool) -> list[str | None]:
    """The ``created_at`` column of each message: a UTC timestamp, or (in an export begun
    before the column was typed) the server's text as it was stored then."""
    if timestamps:
        return utc_timestamps([m.created_at for m in messages])
    texts = [m.raw.get("created_at") for m in messages]
    return [created if isinstance(created, str) else None for created in texts]


def _message_rows(
    chat_id: int, messages: list[Message], into: list[tuple[Any, ...]], timestamps: bool
) -> None:
    into += [
        (m.id, chat_id, raw_text(m), m.uid, m.message, created)
        for m, created in zip(messages, created_columns(messages, timestamps), strict=True)
    ]


def _state_row(state: ChatState, now: str) -> tuple[Any, ...]:
    return (
        state.chat_id,
        int(state.done),
        state.newest_id,
        state.cursor,
        state.walk_top,
        state.walk_low,
        state.error,
        state.messages,
        now,
    )


#: One page to commit: the chat's checkpoint, the window's (for a windowed chat), the rows.
_Write = tuple[ChatState, WindowState | None, list[Message]]


class SqliteStore(Store):
    """An export into one SQLite file (see the module docstring for the schema)."""

    supports_windows = True

    def __init__(self, path: str) -> None:
        # One thread: a SQLite connection belongs to the thread that made it, and one writer
        # is all SQLite allows at a time anyway.
        super().__init__(path, threads=1)
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[_Write, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        # Pages queued and not committed yet, the future of the last one, and the first
        # commit that failed (see commit()).
        self._waiting = 0
        self._last_queued: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        #: Whether ``messages.created_at`` holds UTC timestamps (see the module docstring).
        self.timestamps = True
        self._rows_per_insert = _MAX_ROWS_PER_INSERT

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return self._db

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun and committed explicitly below, so the
        # page and its checkpoint are visibly one unit.
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Message ids grow across all chats, so a chat's page lands all over the id-ordered
            # table and every commit dirties many pages. Checkpointing the WAL less often lets
            # repeated writes of a page collapse into one copy; the cache stays small and
            # fixed, so memory does not grow with the size of the export. 2 MiB exported as
            # fast as 8 MiB did (benchmarks/README.md, export) with 6 MiB less at the peak.
            db.execute("PRAGMA wal_autocheckpoint=16384")
            db.execute("PRAGMA cache_size=-2048")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"{self.path} is not an SQLite export ({exc})") from None
        try:
            db.execute("SELECT json_extract(value, '$[0]') FROM json_each('[[1]]')").fetchall()
        except sqlite3.OperationalError:
            db.close()
            raise StoreError(
                f"this Python's SQLite ({sqlite3.sqlite_version}) has no JSON functions, which "
                "the SQLite export needs; use --format jsonl"
            ) from None
        return db

    def _stored_meta(self, db: sqlite3.Connection) -> ExportMeta | None:
        """The export's identity; None for an empty database. StoreError: not an export."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return None
        if "meta" not in tables or "export_state" not in tables:
            raise StoreError(
                f"{self.path} is an SQLite database but not a messages-async export; "
                "choose another --out"
            )
        row = db.execute("SELECT value FROM meta WHERE key = 'export'").fetchone()
        try:
            return ExportMeta.from_json(orjson.loads(row[0])) if row else None
        except (ValueError, KeyError) as exc:
            raise StoreError(f"{self.path} has an unreadable export header ({exc})") from None

    def _open(self, meta: ExportMeta, fresh: bool) -> None:
        if os.path.isdir(self.path):
            raise StoreError(f"{self.path} is a directory; SQLite needs a file path for --out")
        exists = os.path.exists(self.path)
        if exists and os.path.getsize(self.path) > 0:
            # Check the header before connecting: sqlite3 would happily start a journal next
            # to some unrelated file before noticing it is not a database.
            with open(self.path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise StoreError(
                        f"{self.path} exists and is not an SQLite database; choose another --out"
                    )
        db = self._connect()
        try:
            stored = self._stored_meta(db)
            if fresh and exists:
                # Only an export is ever deleted: _stored_meta refused anything else.
                db.close()
                for suffix in ("", *_SIDE_FILES):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path + suffix)
                db = self._connect()
                stored = None
            if stored is not None and stored != meta:
                raise mismatch(self.path, stored, meta)
            db.executescript(_SCHEMA)
            self._upgrade(db)
            if stored is None:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('export', ?)",
                    (orjson.dumps(meta.to_json()).decode(),),
                )
            self._new = db.execute("SELECT 1 FROM export_state LIMIT 1").fetchone() is None
        except BaseException:
            db.close()
            raise
        self._db = db
        self._rows_per_insert = _most_rows_per_insert(db)

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Add what later layouts have to an export begun with an earlier one."""
        have = {row[1] for row in db.execute("PRAGMA table_info(chats)")}
        for name, kind in _CHAT_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE chats ADD COLUMN {name} {kind}")
        types = {row[1]: row[2] for row in db.execute("PRAGMA table_info(messages)")}
        self.timestamps = types.get("created_at", "").upper() == "TIMESTAMP"

    def _save_chats(self, chats: list[Mapping[str, Any]]) -> None:
        db = self.db
        rows = [(*chat_columns(c), orjson.dumps(c).decode()) for c in chats]
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO chats (chat_id, type, name, picture_url, members_count, raw) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (chat_id) DO UPDATE SET "
                "raw = excluded.raw, type = excluded.type, name = excluded.name, "
                "picture_url = excluded.picture_url, members_count = excluded.members_count",
                rows,
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _load(self, chat_id: int) -> ChatState:
        row = self.db.execute(
            f"SELECT {', '.join(_STATE_COLUMNS)} FROM export_state WHERE chat_id = ?", (chat_id,)
        ).fetchone()
        if row is None:
            return ChatState(chat_id)
        values = dict(zip(_STATE_COLUMNS, row, strict=True))
        values["done"] = bool(values["done"])
        state = ChatState(**values)
        if not state.done:
            state.windows = [
                WindowState.from_json(orjson.loads(text))
                for (text,) in self.db.execute(
                    "SELECT checkpoint FROM export_windows WHERE chat_id = ? ORDER BY idx",
                    (chat_id,),
                )
            ]
        return state

    def _write_state(self, state: ChatState) -> None:
        self.db.execute(_UPSERT_STATE, _state_row(state, _now()))

    async def commit(
        self, state: ChatState, messages: Sequence[Message], *, update: bool
    ) -> ChatState:
        """Queue the page for the writer, which commits every queued page in one transaction.

        Group commit: while one transaction runs, the pages that arrive wait and go together
        in the next, so the cost of a commit is shared. Each page and its checkpoint are still
        in the same transaction, which is all that crash safety needs.

        Write-behind: a page that does not end its chat returns once queued, while fewer than
        ``_WRITE_BEHIND_PAGES`` wait, so the walk fetches on while the writer stores. A crash
        loses those pages with their checkpoints (the next run fetches them again), and a
        commit that fails is raised by every later call, and by :meth:`close`.
        """
        self._handling(state.chat_id)
        page = list(messages)
        state.messages += len(page)
        done = self._queued((state, None, page))
        if state.done or self._waiting > _WRITE_BEHIND_PAGES:
            await asyncio.shield(done)  # a cancelled walk leaves its page to the writer
        return state

    async def commit_window(
        self, state: ChatState, window: WindowState, messages: Sequence[Message]
    ) -> WindowState:
        """A window's page goes through the same group commit as every other page."""
        self._handling(state.chat_id)
        page = list(messages)
        window.messages += len(page)
        await asyncio.shield(self._queued((state, window, page)))
        return window

    def _queued(self, write: _Write) -> asyncio.Future[None]:
        """Queue ``write`` for the writer: the future of its commit."""
        self._raise_a_failed_commit()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.add_done_callback(retrieve_outcome)  # a write-behind page has no one waiting
        self._queue.append((write, done))
        self._waiting += 1
        self._last_queued = done
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_queued(), name="export sqlite writer")
        return done

    async def _write_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                # Pages queued behind one that was lost are not stored either.
                self._raise_a_failed_commit()
                await super()._call(self._commit_queued, [write for write, _ in batch])
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError) and self._failure is None:
                    self._failure = exc
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
            finally:
                self._waiting -= len(batch)

    def _raise_a_failed_commit(self) -> None:
        # Nothing is stored after a page that was lost: its chat's later checkpoint would
        # claim it.
        if self._failure is not None:
            raise OSError(f"{self.path}: a page could not be stored ({self._failure})")

    async def _call(self, fn: Callable[..., T], *args: Any, must_run: bool = False) -> T:
        """Every other store call waits for the pages queued before it (a chat's failure or
        join must not overtake its pages), then runs as usual."""
        if self._last_queued is not None:
            await asyncio.wait([self._last_queued])  # waiting, not cancelling it
        if fn != self._close:  # the file is closed whatever happened; _close raises then
            self._raise_a_failed_commit()
        return await super()._call(fn, *args, must_run=must_run)

    def _commit_queued(self, batch: list[_Write]) -> None:
        # Counted here, on the store's thread, whether or not a walk still waits for it.
        self._count(self._commit_batch(batch))

    def _commit_batch(self, batch: list[_Write]) -> int:
        """Commit the pages and their checkpoints in one transaction; the new rows stored."""
        db = self.db
        now = _now()
        rows: list[tuple[Any, ...]] = []
        states = []
        windows = []
        for state, window, messages in batch:
            _message_rows(state.chat_id, messages, rows, self.timestamps)
            # The walk skips every id it stored before, so each row here is new; OR IGNORE
            # only guards the file against a server that repeats itself.
            if window is None:
                states.append(_state_row(state, now))
            else:
                windows.append((state.chat_id, window.index, orjson.dumps(window.to_json())))
        inserted = 0
        with self._transaction():
            if rows:
                inserted = self._insert(rows)
            if states:
                db.execute(_UPSERT_STATES, (orjson.dumps(states),))
            if windows:
                db.executemany(_UPSERT_WINDOW, windows)
        return inserted

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        """Insert the message rows, a few statements of many rows each; the rows stored."""
        db, start, inserted = self.db, 0, 0
        for count in _row_counts(len(rows), self._rows_per_insert):
            values = [value for row in rows[start : start + count] for value in row]
            inserted += db.execute(_insert_messages(count), values).rowcount
            start += count
        return inserted

    def _commit(self, state: ChatState, messages: list[Message], update: bool) -> ChatState:
        # The Store interface's one-page commit; commit() above groups pages instead.
        state.messages += len(messages)
        self._commit_batch([(state, None, messages)])
        return state

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction around the block; an SQLite error is an ``OSError`` (the store
        could not be written), after the rollback."""
        db = self.db
        try:
            db.execute("BEGIN")
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise OSError(f"SQLite error in {self.path}: {exc}") from exc

    def _in_transaction(self, *statements: tuple[str, Sequence[Any]]) -> None:
        with self._transaction():
            for sql, params in statements:
                self.db.execute(sql, params)

    def _start_windows(self, state: ChatState) -> ChatState:
        self._in_transaction(
            ("DELETE FROM export_windows WHERE chat_id = ?", (state.chat_id,)),
            *(
                (_UPSERT_WINDOW, (state.chat_id, w.index, orjson.dumps(w.to_json())))
                for w in state.windows
            ),
            (_UPSERT_STATE, _state_row(state, _now())),
        )
        return state

    def _commit_window(
        self, state: ChatState, window: WindowState, messages: list[Message]
    ) -> WindowState:
        window.messages += len(messages)
        self._commit_batch([(state, window, messages)])
        return window

    def _finish_windows(self, state: ChatState) -> ChatState:
        joined = state.joined()
        # The chat's rows are in the messages table already: marking it done and dropping
        # the windows' rows in one transaction is the whole join.
        self._in_transaction(
            (_UPSERT_STATE, _state_row(joined, _now())),
            ("DELETE FROM export_windows WHERE chat_id = ?", (state.chat_id,)),
        )
        return joined

    def _fail(self, state: ChatState, error: str) -> ChatState:
        state.error = error
        self._write_state(state)  # autocommit: a single statement is its own transaction
        return state

    async def settle(self) -> None:
        """Wait for the queued commits too: the writer stores them after their walks stop."""
        if self._writer is not None:
            await asyncio.wait([self._writer])  # waiting, not cancelling, if we are cancelled
        await super().settle()

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._raise_a_failed_commit()
