"""The SQLite store's writer: many rows a statement, and pages written behind the walk."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from test_export import export

from messages_async.export import SqliteStore, Store
from messages_async.export._sqlite import (
    _WRITE_BEHIND_PAGES,
    _most_rows_per_insert,
    _row_counts,
)
from messages_async.export._state import ChatState
from messages_async.testing import MessagesServer


@pytest.mark.parametrize(
    ("rows", "most", "counts"),
    [
        (0, 256, []),
        (1, 256, [1]),
        (100, 256, [64, 32, 4]),
        (256, 256, [256]),
        (257, 256, [256, 1]),
        (800, 256, [256, 256, 256, 32]),
        (255, 256, [128, 64, 32, 16, 8, 4, 2, 1]),
        (300, 128, [128, 128, 32, 8, 4]),
        (5, 1, [1, 1, 1, 1, 1]),
    ],
)
def test_rows_go_in_statements_of_a_few_sizes(rows: int, most: int, counts: list[int]) -> None:
    assert list(_row_counts(rows, most)) == counts


@pytest.mark.parametrize(
    ("limit", "most"), [(32766, 256), (999, 128), (6 * 64, 64), (6 * 64 - 1, 32), (6, 1)]
)
def test_rows_per_statement_fit_the_builds_parameter_limit(limit: int, most: int) -> None:
    db = sqlite3.connect(":memory:")
    try:
        db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
        assert _most_rows_per_insert(db) == most
    finally:
        db.close()


def _stored(out: Path) -> tuple[dict[int, tuple[int, int | None, int | None]], list[int]]:
    """``({chat_id: (messages, walk_low, done)}, every stored message id)``."""
    db = sqlite3.connect(out)
    try:
        states = {
            chat_id: (messages, low, done)
            for chat_id, messages, low, done in db.execute(
                "SELECT chat_id, messages, walk_low, done FROM export_state"
            )
        }
        ids = [i for (i,) in db.execute("SELECT id FROM messages")]
    finally:
        db.close()
    return states, ids


def _every_checkpoint_claims_what_is_stored(out: Path) -> None:
    db = sqlite3.connect(out)
    try:
        for chat_id, messages, low in db.execute(
            "SELECT chat_id, messages, walk_low FROM export_state"
        ).fetchall():
            count, lowest = db.execute(
                "SELECT count(*), min(id) FROM messages WHERE chat_id = ?", (chat_id,)
            ).fetchone()
            assert count == messages, chat_id
            if low is not None:
                assert lowest == low, chat_id
    finally:
        db.close()


async def test_a_page_that_cannot_be_stored_stops_the_export_and_no_checkpoint_claims_it(
    tmp_path: Path,
) -> None:
    async with MessagesServer(chats=3, messages_per_chat=(450, 600), seed=5) as server:
        chat_id = server.chat_ids()[0]
        refused = server.messages(chat_id)[250]["id"]  # newest first: the third page
        out = tmp_path / "out.sqlite"

        def tap(store: Store, stop: asyncio.Event) -> None:
            assert isinstance(store, SqliteStore)
            original = store._open

            def _open(*args: Any) -> None:
                # A real SQLite error in the middle of a commit, like a full disk.
                original(*args)
                store.db.execute(
                    f"CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.id = {refused} "
                    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )

            store._open = _open  # type: ignore[method-assign]

        with pytest.raises(OSError, match="disk full"):
            await export(server, "sqlite", out, tap=tap, concurrency=2)

        _every_checkpoint_claims_what_is_stored(out)
        states, ids = _stored(out)
        assert refused not in ids
        assert not states[chat_id][2], "the chat of the lost page is marked complete"
        db = sqlite3.connect(out)
        db.execute("DROP TRIGGER refuse")
        db.commit()
        db.close()

        await export(server, "sqlite", out, concurrency=2)

        states, ids = _stored(out)
        expected = [m["id"] for c in server.chat_ids() for m in server.messages(c)]
        assert sorted(ids) == sorted(expected)
        assert all(done for _, _, done in states.values())


async def test_the_walk_goes_on_while_the_writer_stores_and_never_runs_far_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concurrency = 4
    original = SqliteStore._commit_queued

    def slow(self: SqliteStore, batch: Any) -> None:
        time.sleep(0.02)  # a slow disk: the walk must neither wait for it nor outrun it
        original(self, batch)

    monkeypatch.setattr(SqliteStore, "_commit_queued", slow)
    unstored: list[int] = []

    def tap(store: Store, stop: asyncio.Event) -> None:
        assert isinstance(store, SqliteStore)
        commit = store.commit

        async def watched(state: ChatState, messages: Any, *, update: bool) -> ChatState:
            stored = await commit(state, messages, update=update)
            unstored.append(store._waiting)
            return stored

        store.commit = watched  # type: ignore[method-assign]

    async with MessagesServer(chats=8, messages_per_chat=(1500, 2500), seed=9) as server:
        out = tmp_path / "out.sqlite"
        stats = await export(server, "sqlite", out, tap=tap, concurrency=concurrency)

        expected = [m["id"] for c in server.chat_ids() for m in server.messages(c)]
        _, ids = _stored(out)
        assert sorted(ids) == sorted(expected)
        assert stats.messages == len(expected)
    _every_checkpoint_claims_what_is_stored(out)
    assert max(unstored) > concurrency, "every commit waited for its page to be stored"
    assert max(unstored) <= _WRITE_BEHIND_PAGES + concurrency
