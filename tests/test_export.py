"""The bulk export against the emulator: exact data, crash safety, resume and updates.

Everything runs the real client over loopback sockets against `MessagesServer`; every
failure is injected through the emulator's faults, or is a real SIGKILL of a real process.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sqlite3
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from yarl import URL

import messages_async as ma
from messages_async._wire import parse_page
from messages_async.export import (
    Exporter,
    ExportMeta,
    ExportOptions,
    ExportStats,
    JsonlStore,
    ParquetStore,
    SqliteStore,
    Store,
    StoreError,
    _jsonl,
    _runner,
    progress_line,
)
from messages_async.export._jsonl import read_window
from messages_async.export._state import ChatState, WindowState
from messages_async.testing import Fault, MessagesServer

FORMATS = ("sqlite", "jsonl")
Raw = dict[str, Any]


# --- helpers -------------------------------------------------------------------------------------


def _out(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("out.sqlite" if fmt == "sqlite" else "out")


def _store(fmt: str, out: Path) -> Store:
    return SqliteStore(str(out)) if fmt == "sqlite" else JsonlStore(str(out))


def _client(server: MessagesServer, **options: Any) -> ma.Client:
    return ma.Client(
        token_url=server.token_url,
        client_id=server.client_id,
        client_secret=server.client_secret,
        backoff_base=0.01,
        **options,
    )


def _meta(server: MessagesServer, options: ExportOptions) -> ExportMeta:
    return ExportMeta(
        source=server.resource_uri,
        query=options.query,
        since=options.since.isoformat() if options.since else None,
        until=options.until.isoformat() if options.until else None,
    )


async def export(
    server: MessagesServer,
    fmt: str,
    out: Path,
    *,
    fresh: bool = False,
    client_options: dict[str, Any] | None = None,
    tap: Callable[[Store, asyncio.Event], None] | None = None,
    watch: Callable[[Exporter], None] | None = None,
    **options: Any,
) -> ExportStats:
    opts = ExportOptions(**options)
    store = _store(fmt, out)
    stop = asyncio.Event()
    if tap is not None:
        tap(store, stop)
    async with _client(server, **(client_options or {})) as client:
        try:
            await store.open(_meta(server, opts), fresh=fresh)
            exporter = Exporter(client, store, opts, stop=stop)
            if watch is not None:
                watch(exporter)
            return await exporter.run()
        finally:
            await store.close()


def read_sqlite(out: Path) -> tuple[dict[int, Raw], dict[int, list[Raw]]]:
    db = sqlite3.connect(out)
    try:
        chats = {
            cid: orjson.loads(raw) for cid, raw in db.execute("SELECT chat_id, raw FROM chats")
        }
        messages: dict[int, list[Raw]] = {}
        for chat_id, raw, mid, uid, text in db.execute(
            "SELECT chat_id, raw, id, uid, message FROM messages ORDER BY chat_id, id DESC"
        ):
            obj = orjson.loads(raw)
            assert (obj["id"], obj["uid"], obj["message"]) == (mid, uid, text)
            messages.setdefault(chat_id, []).append(obj)
        for (chat_id,) in db.execute("SELECT chat_id FROM export_state WHERE done = 1"):
            messages.setdefault(chat_id, [])
        return chats, messages
    finally:
        db.close()


def read_jsonl(out: Path) -> tuple[dict[int, Raw], dict[int, list[Raw]]]:
    chats = {}
    for line in (out / "chats.jsonl").read_bytes().splitlines():
        obj = orjson.loads(line)
        chats[obj["chat_id"]] = obj
    messages = {}
    for path in (out / "messages").glob("*/messages.jsonl"):
        folder = path.parent
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path} ends in a torn line"
        messages[int(folder.name.removeprefix("chat_id="))] = [
            orjson.loads(line) for line in data.splitlines()
        ]
    assert not list((out / ".pending").iterdir()), "update segments left behind"
    return chats, messages


def read(fmt: str, out: Path) -> tuple[dict[int, Raw], dict[int, list[Raw]]]:
    return read_sqlite(out) if fmt == "sqlite" else read_jsonl(out)


def assert_exact(
    server: MessagesServer, fmt: str, out: Path, chat_ids: list[int] | None = None
) -> None:
    """The export holds exactly the server's data: same ids, same raw objects, newest first."""
    chats, messages = read(fmt, out)
    ids = server.chat_ids() if chat_ids is None else chat_ids
    by_id = {c["chat_id"]: c for c in server.chats()}
    assert set(messages) == set(ids)
    for chat_id in ids:
        assert chats[chat_id] == by_id[chat_id]
        expected = server.messages(chat_id)
        got = messages[chat_id]
        assert [m["id"] for m in got] == [m["id"] for m in expected], f"chat {chat_id}"
        assert got == expected, f"chat {chat_id}: raw objects differ"


def listings(server: MessagesServer) -> list[Any]:
    return [r for r in server.resource_requests() if r.path == "messages/" and r.method == "GET"]


def _chat_of(record: Any) -> int:
    if "chat_id" in record.query:
        return int(record.query["chat_id"])
    raise AssertionError(f"a listing without chat_id: {record.query}")


def stop_after_commits(n: int) -> Callable[[Store, asyncio.Event], None]:
    """Stop the export (as Ctrl-C does) once ``n`` pages have been committed."""

    def tap(store: Store, stop: asyncio.Event) -> None:
        original = store.commit
        count = 0

        async def commit(state: ChatState, messages: Any, *, update: bool) -> ChatState:
            nonlocal count
            result = await original(state, messages, update=update)
            count += 1
            if count >= n:
                stop.set()
            return result

        store.commit = commit  # type: ignore[method-assign]

    return tap


def _thread_part(store: Store) -> str:
    """What of a page's commit runs on the store's thread: SQLite commits its queued pages
    there; JSONL begins a sync's write on the loop and finishes it there."""
    return "_commit_batch" if isinstance(store, SqliteStore) else "_finish_counted"


def stop_during_commits() -> Callable[[Store, asyncio.Event], None]:
    """Stop the export (as Ctrl-C does) while a commit is running on the store's thread.

    The commit is held for a moment after the stop is signalled, so the worker that waits
    for it is cancelled before the commit finishes: the page is stored all the same.
    """

    def tap(store: Store, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        name = _thread_part(store)
        original = getattr(store, name)

        def commit(*args: Any) -> Any:
            loop.call_soon_threadsafe(stop.set)
            time.sleep(0.2)
            return original(*args)

        setattr(store, name, commit)

    return tap


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(
        chats=7, messages_per_chat=(0, 260), seed=11, extra_fields=True
    ) as srv:
        srv.add_chat(type="group", name="empty")
        yield srv


# --- full export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_full_export_equals_server_data(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    stats = await export(server, fmt, out, concurrency=3)
    assert stats.failures == []
    assert stats.chats_done == stats.chats_total == len(server.chat_ids())
    assert stats.messages == server.all_message_count() == stats.stored_messages
    assert_exact(server, fmt, out)
    # Unknown fields were kept, and the empty chat has its (empty) file or done state.
    _, messages = read(fmt, out)
    some = next(m for msgs in messages.values() for m in msgs)
    assert set(some) - {"id", "uid", "message", "attachments", "created_at"}
    assert any(not msgs for msgs in messages.values())
    # Every listing asked for full pages, and the walks never overlapped themselves.
    assert all(r.query.get("limit") == "100" for r in listings(server) if "limit" in r.query)
    assert server.max_in_flight <= 2 * 3


@pytest.mark.parametrize("fmt", FORMATS)
async def test_text_past_a_nul_and_a_lone_surrogate_is_exported_whole(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    chat_id = server.chat_ids()[0]
    nul = server.post_message(chat_id, "before\x00after")["id"]
    cut = server.post_message(chat_id, "cut \ud83d")["id"]
    out = _out(tmp_path, fmt)
    stats = await export(server, fmt, out, chat_ids=(chat_id,))
    assert stats.failures == []
    _, messages = read(fmt, out)  # read_sqlite checks the message column against raw
    texts = {m["id"]: m["message"] for m in messages[chat_id]}
    assert texts[nul] == "before\x00after"
    assert texts[cut] == "cut \ufffd"
    if fmt == "sqlite":
        db = sqlite3.connect(out)
        try:
            (whole,) = db.execute("SELECT message FROM messages WHERE id = ?", (nul,)).fetchone()
            (created,) = db.execute(
                "SELECT created_at FROM messages WHERE id = ?", (nul,)
            ).fetchone()
        finally:
            db.close()
        assert whole == "before\x00after"
        sent = datetime.fromisoformat(server.messages(chat_id)[1]["created_at"])
        assert created == sent.astimezone(UTC).isoformat(sep=" ")[:-6]  # a UTC TIMESTAMP


@pytest.mark.parametrize("fmt", FORMATS)
async def test_incremental_update_fetches_only_new_messages(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    await export(server, fmt, out)
    busy, quiet = server.chat_ids()[0], server.chat_ids()[1]
    new_ids = [server.post_message(busy, f"new {i}")["id"] for i in range(150)]
    new_ids.append(server.post_message(quiet, "one more")["id"])
    server.reset_stats()

    stats = await export(server, fmt, out)

    assert stats.messages == 151
    assert_exact(server, fmt, out)
    per_chat: dict[int, int] = {}
    for record in listings(server):
        per_chat[_chat_of(record)] = per_chat.get(_chat_of(record), 0) + 1
    # One request per chat, two for the chat with 150 new messages (pages of 100).
    expected = dict.fromkeys(server.chat_ids(), 1)
    expected[busy] = 2
    assert per_chat == expected

    server.reset_stats()
    again = await export(server, fmt, out)
    assert again.messages == 0
    assert len(listings(server)) == len(server.chat_ids())
    assert_exact(server, fmt, out)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_stop_during_a_commit_counts_what_was_stored(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    stats = await export(server, fmt, out, concurrency=3, tap=stop_during_commits())
    assert stats.interrupted
    _, stored = read(fmt, out)
    saved = sum(len(messages) for messages in stored.values())
    assert saved > 0  # the commit under way when the stop came was finished ...
    assert stats.messages == saved  # ... and counted, though its worker was cancelled


@pytest.mark.parametrize("fmt", FORMATS)
async def test_cancelling_settle_does_not_cancel_the_writes_it_waits_for(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    # One thread each, so the second page waits behind the first, which is held up.
    store = SqliteStore(str(out)) if fmt == "sqlite" else JsonlStore(str(out), threads=1)
    name = _thread_part(store)
    original = getattr(store, name)

    def slow(*args: Any) -> Any:
        time.sleep(0.2)
        return original(*args)

    setattr(store, name, slow)
    async with _client(server) as client:
        await store.open(_meta(server, ExportOptions()), fresh=True)
        await store.save_chats([chat.raw for chat in await client.messages.chats()])
        chat_ids = server.chat_ids()[:2]
        states = [await store.load(chat_id) for chat_id in chat_ids]
        lists = [await client.messages.list(chat_id, limit=10) for chat_id in chat_ids]
        sent = sum(len(page.items) for page in lists)
        pages = [
            asyncio.create_task(
                store.commit(attrs.evolve(state, cursor=p.next_cursor), p.items, update=False)
            )
            for state, p in zip(states, lists, strict=True)
        ]
        await asyncio.sleep(0.05)  # the first commit runs, the second waits for it
        settling = asyncio.create_task(store.settle())
        await asyncio.sleep(0.05)
        settling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await settling
        await asyncio.gather(*pages)  # neither commit was cancelled with it
        await store.close()
    _, stored = read(fmt, out)
    assert sent > 0
    assert sum(len(m) for m in stored.values()) == store.committed_messages == sent


async def test_an_export_in_the_earlier_sqlite_layout_resumes(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = _out(tmp_path, "sqlite")
    first = await export(server, "sqlite", out, concurrency=2, tap=stop_after_commits(3))
    assert first.interrupted
    # The layout before message rows were appended: the message id as the table's key.
    db = sqlite3.connect(out)
    try:
        db.executescript(
            """
            BEGIN;
            CREATE TABLE old_messages (
                id INTEGER PRIMARY KEY, chat_id INTEGER NOT NULL, raw TEXT NOT NULL,
                uid INTEGER, message TEXT, created_at TEXT
            );
            INSERT INTO old_messages SELECT * FROM messages;
            DROP TABLE messages;
            ALTER TABLE old_messages RENAME TO messages;
            CREATE INDEX messages_chat_id ON messages (chat_id, id);
            COMMIT;
            """
        )
    finally:
        db.close()

    second = await export(server, "sqlite", out)

    assert second.failures == []
    assert_exact(server, "sqlite", out)


async def test_a_stop_while_listing_the_chats_does_not_wait_out_a_retry_after(
    server: MessagesServer, tmp_path: Path
) -> None:
    server.inject(Fault.rate_limited(retry_after="30"), path="messages/chats/")

    def stop_soon(store: Store, stop: asyncio.Event) -> None:
        asyncio.get_running_loop().call_later(0.2, stop.set)

    loop = asyncio.get_running_loop()
    started = loop.time()
    stats = await export(server, "sqlite", _out(tmp_path, "sqlite"), tap=stop_soon)
    assert stats.interrupted
    assert stats.chats_total == 0
    assert loop.time() - started < 5  # not the 30 s the server asked for
    assert len(server.resource_requests()) == 1


def fail_after_each_commit(server: MessagesServer, chat_id: int, times: int) -> Any:
    """After each of the first ``times`` commits, the chat's next listing gets a 503."""

    def tap(store: Store, stop: asyncio.Event) -> None:
        original = store.commit
        left = times

        async def commit(state: ChatState, messages: Any, *, update: bool) -> ChatState:
            nonlocal left
            result = await original(state, messages, update=update)
            if left > 0 and messages:
                left -= 1
                server.inject(Fault.status(503, retry_after="1"), path="messages/", chat_id=chat_id)
            return result

        store.commit = commit  # type: ignore[method-assign]

    return tap


async def test_failures_that_each_follow_progress_do_not_fail_a_long_chat(
    tmp_path: Path,
) -> None:
    async with MessagesServer(chats=1, messages_per_chat=90, seed=2) as srv:
        chat = srv.chat_ids()[0]
        out = _out(tmp_path, "sqlite")
        rounds = _runner.MAX_TRANSIENT_ROUNDS + 1  # more than a chat may fail in a row
        stats = await export(
            srv,
            "sqlite",
            out,
            page_size=10,
            client_options={"max_retries": 0},
            tap=fail_after_each_commit(srv, chat, rounds),
        )
        assert stats.failures == []
        assert stats.resumed_rounds == rounds
        assert_exact(srv, "sqlite", out)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_expired_cursor_on_resume_restarts_without_duplicate_or_gap(
    fmt: str, tmp_path: Path
) -> None:
    async with MessagesServer(chats=2, messages_per_chat=450, seed=3, extra_fields=True) as srv:
        chat = srv.chat_ids()[0]
        out = _out(tmp_path, fmt)
        # The first run stops (like Ctrl-C) after two pages of the chat are committed.
        first = await export(
            srv, fmt, out, chat_ids=(chat,), concurrency=1, tap=stop_after_commits(2)
        )
        assert first.interrupted
        _, stored = read(fmt, out)
        first_ids = [m["id"] for m in stored[chat]]
        assert 200 <= len(first_ids) < 450
        # Meanwhile the chat gets new messages, and the saved cursor has expired.
        for i in range(5):
            srv.post_message(chat, f"while away {i}")
        srv.reset_stats()
        srv.inject(Fault.invalid_cursor(), path="messages/", chat_id=chat)

        second = await export(srv, fmt, out, chat_ids=(chat,), concurrency=1)

        assert second.failures == []
        assert second.cursor_restarts == 1
        requests = listings(srv)
        assert "cursor" in requests[0].query  # the saved cursor was tried first ...
        assert requests[0].status == 400
        assert "cursor" not in requests[1].query  # ... then the walk restarted at the top
        _, stored = read(fmt, out)
        ids = [m["id"] for m in stored[chat]]
        assert len(ids) == len(set(ids)) == 455
        # The restarted walk skipped what was stored and what was newer than its first run;
        # the update that follows a resumed walk fetched the messages posted meanwhile.
        assert second.messages == 455 - len(first_ids)
        assert_exact(srv, fmt, out, [chat])
        assert "cursor" not in requests[-1].query

        srv.reset_stats()
        third = await export(srv, fmt, out, chat_ids=(chat,), concurrency=1)
        assert third.messages == 0
        assert len(listings(srv)) == 1
        assert_exact(srv, fmt, out, [chat])


@pytest.mark.parametrize("fmt", FORMATS)
async def test_failing_chats_are_recorded_and_the_rest_exported(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    a, forbidden, c = server.chat_ids()[:3]
    unknown = 987_654_321
    handle = server.inject(Fault.status(403), path="messages/", chat_id=forbidden, times=None)

    stats = await export(server, fmt, out, chat_ids=(a, unknown, forbidden, c), concurrency=2)

    failed = {f.chat_id: f.error for f in stats.failures}
    assert set(failed) == {unknown, forbidden}
    assert "404" in failed[unknown]
    assert "403" in failed[forbidden]
    assert stats.chats_done == 2
    _, stored = read(fmt, out)
    assert set(stored) == {a, c}
    for chat_id in (a, c):
        assert stored[chat_id] == server.messages(chat_id)
    # The error is recorded with the chat's state.
    store = _store(fmt, out)
    await store.open(_meta(server, ExportOptions()), fresh=False)
    try:
        assert "403" in ((await store.load(forbidden)).error or "")
        assert "404" in ((await store.load(unknown)).error or "")
    finally:
        await store.close()

    # Once the server lets it, the next run exports the chat and clears the error.
    handle.cancel()
    again = await export(server, fmt, out, chat_ids=(a, forbidden, c))
    assert again.failures == []
    assert_exact(server, fmt, out, [a, forbidden, c])


@pytest.mark.parametrize("fmt", FORMATS)
async def test_filters_select_exactly_the_matching_messages(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    since = datetime(2025, 3, 1, tzinfo=UTC)
    until = datetime(2025, 8, 1, tzinfo=UTC)
    stats = await export(server, fmt, out, query="The", since=since, until=until)
    assert stats.failures == []
    _, stored = read(fmt, out)
    total = 0
    for chat_id in server.chat_ids():
        expected = [
            m
            for m in server.messages(chat_id)
            if "the" in m["message"].lower()
            and since <= datetime.fromisoformat(m["created_at"]) < until
        ]
        total += len(expected)
        assert stored.get(chat_id, []) == expected
    assert 0 < total < server.all_message_count()
    for record in listings(server):
        if "cursor" not in record.query:
            assert record.query["query"] == "The"
            assert datetime.fromisoformat(record.query["period[from]"]) == since

    # Resuming with other filters would mix two selections in one export: refused.
    with pytest.raises(StoreError, match="--fresh"):
        await export(server, fmt, out, query="other")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_fresh_starts_over(server: MessagesServer, fmt: str, tmp_path: Path) -> None:
    out = _out(tmp_path, fmt)
    await export(server, fmt, out, query="the")
    server.reset_stats()
    stats = await export(server, fmt, out, fresh=True)
    assert stats.messages == server.all_message_count()
    assert_exact(server, fmt, out)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_output_that_is_not_an_export_is_refused(fmt: str, tmp_path: Path) -> None:
    if fmt == "sqlite":
        out = tmp_path / "notes.txt"
        out.write_text("my notes\n")
    else:
        out = tmp_path / "home"
        out.mkdir()
        (out / "notes.txt").write_text("my notes\n")
    for fresh in (False, True):
        store = _store(fmt, out)
        with pytest.raises(StoreError, match="choose"):
            await store.open(ExportMeta(source="x"), fresh=fresh)
        await store.close()
    assert "my notes" in (out if fmt == "sqlite" else out / "notes.txt").read_text()


async def test_a_long_retry_after_is_waited_out_and_shown(tmp_path: Path) -> None:
    async with MessagesServer(chats=2, messages_per_chat=30, seed=5) as srv:
        chat = srv.chat_ids()[0]
        srv.inject(Fault.rate_limited(retry_after="1"), path="messages/", chat_id=chat)
        running: list[Exporter] = []
        out = _out(tmp_path, "sqlite")
        task = asyncio.create_task(
            # The client's own cap is below the server's Retry-After, so the client gives up
            # at once: the export must wait it out itself, on display, not fail the chat.
            export(
                srv,
                "sqlite",
                out,
                client_options={"max_retry_after": 0.2},
                watch=running.append,
                concurrency=1,
            )
        )
        seen: list[str] = []
        while not task.done():
            await asyncio.sleep(0.05)
            if running:
                seen.append(progress_line(running[0].stats, _IDLE))
        stats = await task
        assert stats.failures == []
        assert stats.resumed_rounds == 1
        assert any("waiting" in line and "as the server asked" in line for line in seen)
        assert_exact(srv, "sqlite", out)


_IDLE = ma.ClientStats(
    requests=0,
    retries=0,
    rate_limited=0,
    in_flight=0,
    concurrency=1,
    max_concurrency=1,
    paused_for=0.0,
)


# --- crash safety: real processes, really killed --------------------------------------------------


def cli_env(server: MessagesServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_")}
    env.update(
        MESSAGES_TOKEN_URL=server.token_url,
        MESSAGES_CLIENT_ID=server.client_id,
        MESSAGES_CLIENT_SECRET=server.client_secret,
    )
    return env


async def start_cli(
    server: MessagesServer,
    *args: str,
    script: str | None = None,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """``messages-async export ARGS`` in a child process; or ``script`` run as ``-c`` with
    them (a wrapper that runs the command line itself)."""
    runner = ("-m", "messages_async") if script is None else ("-c", script)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *runner,
        "export",
        *args,
        env=cli_env(server) if env is None else env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def kill_mid_run(
    server: MessagesServer, rng: random.Random, args: list[str], *, max_listings: int
) -> bool:
    """Start an export and SIGKILL it after a random number of its listings; True if killed."""
    listed = rng.randint(1, max_listings)
    return await kill_after_listings(server, args, listed, then=rng.uniform(0, 0.03))


async def kill_after_listings(
    server: MessagesServer, args: list[str], listed: int, *, then: float = 0.0
) -> bool:
    """Start an export and SIGKILL it ``then`` seconds after the server has answered ``listed``
    more listings; True if it was still running to be killed."""
    before = len(listings(server))
    proc = await start_cli(server, *args)
    # Polling what the server has seen: the process gives no other signal of progress.
    while proc.returncode is None and len(listings(server)) - before < listed:
        await asyncio.sleep(0.002)
    await asyncio.sleep(then)
    killed = proc.returncode is None
    if killed:
        proc.kill()
    await proc.communicate()
    return killed


@pytest.mark.parametrize("fmt", FORMATS)
async def test_sigkill_at_random_moments_then_rerun_gives_exactly_the_full_set(
    fmt: str, tmp_path: Path
) -> None:
    rng = random.Random(f"sigkill-{fmt}")
    out = _out(tmp_path, fmt)
    args = ["--out", str(out), "--format", fmt, "--concurrency", "3"]
    async with MessagesServer(
        chats=5, messages_per_chat=(150, 420), seed=21, extra_fields=True, latency=0.01
    ) as srv:
        kills = 0
        for _ in range(3):
            kills += await kill_mid_run(srv, rng, args, max_listings=8)
        # New messages arrive; the update that fetches them is killed too (it writes update
        # segments and merges them into the JSONL files).
        for chat_id in srv.chat_ids()[:3]:
            for i in range(rng.randint(101, 180)):
                srv.post_message(chat_id, f"later {i}")
        kills += await kill_mid_run(srv, rng, args, max_listings=4)
        assert kills >= 3, "the kills should land while the export runs"

        proc = await start_cli(srv, *args)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert b"Export done" in stdout
        assert_exact(srv, fmt, out)


# --- JSONL repair paths --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
async def test_a_folder_export_syncs_every_folder_it_changed_when_it_closes(
    server: MessagesServer, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file's fsync keeps its bytes, not its name: the folders that got new files (each
    # chat's, messages/, state/) are synced before the export returns, after the last write.
    out = tmp_path / "out"
    synced: list[tuple[str, bool]] = []  # each path synced, and whether it is a folder
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))

    monkeypatch.setattr(os, "fsync", fsync)
    store: Store = JsonlStore(str(out)) if fmt == "jsonl" else ParquetStore(str(out))
    async with _client(server) as client:
        await store.open(_meta(server, ExportOptions()), fresh=False)
        stats = await Exporter(client, store, ExportOptions(concurrency=3)).run()
        await store.close()
    assert stats.chats_done == len(server.chat_ids())
    chats = {str(out / "messages" / f"chat_id={chat}") for chat in server.chat_ids()}
    last_file = max(i for i, (_, folder) in enumerate(synced) if not folder)
    at_close = {path for path, _ in synced[last_file + 1 :]}
    assert {str(out / "messages"), str(out / "state"), str(out)} <= at_close
    if fmt == "jsonl":
        assert chats <= at_close
    else:  # each chat's folder with each part written into it; none for a chat of no messages
        empty = {
            str(out / "messages" / f"chat_id={c}")
            for c in server.chat_ids()
            if not server.messages(c)
        }
        assert chats - empty <= {path for path, folder in synced if folder}


async def test_jsonl_torn_tail_is_cut_back_to_the_checkpoint(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = _out(tmp_path, "jsonl")
    await export(server, "jsonl", out)
    chat = server.chat_ids()[0]
    path = out / "messages" / f"chat_id={chat}" / "messages.jsonl"
    # A page whose checkpoint never landed: a torn line past the checkpointed length.
    path.write_bytes(path.read_bytes() + b'{"id": 1, "uid": 2, "mess')
    await export(server, "jsonl", out)
    assert_exact(server, "jsonl", out)


@pytest.mark.parametrize("renamed", [False, True])
async def test_jsonl_merge_interrupted_before_or_after_the_rename_completes(
    server: MessagesServer, tmp_path: Path, renamed: bool
) -> None:
    out = _out(tmp_path, "jsonl")
    await export(server, "jsonl", out)
    chat = server.chat_ids()[0]
    for i in range(3):
        server.post_message(chat, f"new {i}")
    new = server.messages(chat)[:3]
    main = out / "messages" / f"chat_id={chat}" / "messages.jsonl"
    old = main.read_bytes()
    segment = b"".join(orjson.dumps(m) + b"\n" for m in new)
    # Recreate the moment a run was killed during the merge: segment written, checkpoint
    # says "merging", and the rename of the merged file either happened or did not.
    (out / ".pending" / f"{chat}.jsonl").write_bytes(segment)
    state = orjson.loads((out / "state" / f"{chat}.json").read_bytes())
    state.update(merging=True, pending_length=len(segment), newest_id=new[0]["id"])
    state["messages"] += 3
    (out / "state" / f"{chat}.json").write_bytes(orjson.dumps(state))
    if renamed:
        main.write_bytes(segment + old)
    server.reset_stats()

    stats = await export(server, "jsonl", out)

    assert stats.messages == 0  # nothing fetched again: the merge was finished locally
    assert_exact(server, "jsonl", out)


# --- JSONL grouped syncs -------------------------------------------------------------------------


def _page_of(ids: range) -> list[ma.Message]:
    body = orjson.dumps({"items": [{"id": i, "uid": 1, "message": f"m{i}"} for i in ids]})
    return list(parse_page(body).items)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
async def test_jsonl_keeps_a_message_a_line_from_a_server_that_indents_its_json(
    tmp_path: Path, newline: bytes
) -> None:
    objects = [
        {"id": 3, "uid": 1, "message": "two\nlines", "extra": {"k": [1, 2]}},
        {"id": 2, "uid": 1, "message": "plain"},
        {"id": 1, "uid": 1, "message": "a\r\nb"},
    ]
    body = orjson.dumps({"items": objects}, option=orjson.OPT_INDENT_2).replace(b"\n", newline)
    out = tmp_path / "out"
    async with JsonlStore(str(out), sync_pages=2) as store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        state = await store.load(7)
        # The first page waits for its sync; the second, the chat's last, writes both.
        for page in (body, orjson.dumps({"items": objects})):
            done = page is not body
            new = attrs.evolve(state, cursor=None if done else "c", done=done)
            state = await store.commit(new, list(parse_page(page).items), update=False)
    lines = (out / "messages" / "chat_id=7" / "messages.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert [orjson.loads(line) for line in lines[:-1]] == objects * 2
    assert all(b"\r" not in line for line in lines)


def _checkpoint(out: Path, chat_id: int) -> ChatState:
    """The chat's checkpoint on disk (none yet: a fresh chat)."""
    path = out / "state" / f"{chat_id}.json"
    return (
        ChatState.from_json(orjson.loads(path.read_bytes()))
        if path.exists()
        else ChatState(chat_id)
    )


class _Disk:
    """What a power cut would keep: per file, the bytes written before its last ``fsync``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.written: dict[str, int] = {}
        self.durable: dict[str, int] = {}
        self.events: list[tuple[str, str]] = []
        self._fds: dict[int, str] = {}
        real_open, real_pwrite, real_fsync, real_ftruncate = (
            os.open,
            os.pwrite,
            os.fsync,
            os.ftruncate,
        )

        def open_(path: Any, flags: int, *args: Any, **kw: Any) -> int:
            fd = real_open(path, flags, *args, **kw)
            self._fds[fd] = os.fspath(path)
            return fd

        def pwrite(fd: int, data: Any, pos: int) -> int:
            n = real_pwrite(fd, data, pos)
            path = self._fds.get(fd)
            if path is not None:
                self.written[path] = max(self.written.get(path, 0), pos + n)
            return n

        def ftruncate(fd: int, length: int) -> None:
            real_ftruncate(fd, length)
            path = self._fds.get(fd)
            if path is not None:
                self.written[path] = length

        def fsync(fd: int) -> None:
            real_fsync(fd)
            path = self._fds.get(fd)
            if path is not None:
                self.durable[path] = self.written.get(path, 0)
                self.events.append(("fsync", path))

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(os, "fsync", fsync)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    # (sync_pages, sync_seconds, seconds between pages, pages, the commits after which the
    #  checkpoint on disk is written: 1-based; the last page always)
    ("sync_pages", "sync_seconds", "gap", "pages", "checkpointed"),
    [
        (1, 1.0, 0.0, 4, [1, 2, 3, 4]),
        (3, 1.0, 0.0, 7, [3, 6, 7]),
        (8, 1.0, 0.0, 5, [5]),
        (8, 1.0, 0.4, 7, [4, 7]),  # the 4th page comes 1.2 s after the first waiting one
        (8, 0.0, 0.0, 3, [1, 2, 3]),
    ],
)
async def test_jsonl_writes_a_chats_checkpoint_every_few_pages_and_at_its_end(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sync_pages: int,
    sync_seconds: float,
    gap: float,
    pages: int,
    checkpointed: list[int],
) -> None:
    clock = _Clock()
    store = JsonlStore(
        str(tmp_path / "out"), sync_pages=sync_pages, sync_seconds=sync_seconds, clock=clock
    )
    disk = _Disk(monkeypatch)
    async with store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        state = await store.load(7)
        main = tmp_path / "out" / "messages" / "chat_id=7" / "messages.jsonl"
        written_at = []
        top = 10_000
        for n in range(1, pages + 1):
            clock.now += gap if n > 1 else 0.0
            last = n == pages
            new = attrs.evolve(state, cursor=None if last else f"c{n}", done=last)
            state = await store.commit(new, _page_of(range(top, top - 10, -1)), update=False)
            top -= 10
            on_disk = _checkpoint(tmp_path / "out", 7)
            if on_disk.messages == 10 * n:
                written_at.append(n)
            # The pages after the checkpoint wait in memory: the file ends where the checkpoint
            # says, and the checkpoint never claims a byte a power cut could take (its file
            # was synced first).
            assert (main.stat().st_size if main.exists() else 0) == on_disk.length
            assert on_disk.length <= disk.durable.get(str(main), 0)
            if n > 1 and n not in checkpointed:
                assert on_disk.cursor != new.cursor  # behind: a later page writes it
    assert written_at[-len(checkpointed) :] == checkpointed
    assert sorted(set(written_at)) == checkpointed


async def test_jsonl_close_and_failure_write_the_checkpoints_waiting_for_a_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    disk = _Disk(monkeypatch)
    store = JsonlStore(str(out), sync_pages=100, sync_seconds=100.0, clock=_Clock())
    async with store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        a, b = await store.load(1), await store.load(2)
        for top in (100, 90):
            a = await store.commit(
                attrs.evolve(a, cursor=f"a{top}"), _page_of(range(top, top - 10, -1)), update=False
            )
            b = await store.commit(
                attrs.evolve(b, cursor=f"b{top}"), _page_of(range(top, top - 10, -1)), update=False
            )
        assert _checkpoint(out, 1).messages == 0
        b = await store.fail(b, "the server said no")
        failed = _checkpoint(out, 2)
        assert (failed.messages, failed.cursor, failed.error) == (20, "b90", "the server said no")
        chat_2 = str(out / "messages" / "chat_id=2" / "messages.jsonl")
        assert disk.durable[chat_2] == failed.length
        # A load (a rerun of the chat, or counting what is stored) sees the latest checkpoint
        # rather than cutting the file back to an older one.
        assert (await store.load(1)).messages == 20
        a = await store.commit(
            attrs.evolve(a, cursor="a80"), _page_of(range(80, 70, -1)), update=False
        )
    closed = _checkpoint(out, 1)
    assert (closed.messages, closed.cursor) == (30, "a80")
    assert disk.durable[str(out / "messages" / "chat_id=1" / "messages.jsonl")] == closed.length
    assert len((out / "messages" / "chat_id=1" / "messages.jsonl").read_bytes().splitlines()) == 30


@pytest.mark.parametrize("where", ["write", "fsync", "threads"])
async def test_jsonl_pages_kept_for_a_sync_that_fails_are_written_by_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # A full disk, say, at the third page's sync: the commit raises, and the two pages kept
    # before it must not be lost, nor leave a hole that a later checkpoint would claim.
    # Whether the write into the page cache fails (on the loop), or the wait for the disk (on
    # the thread), or the whole write of a store that writes from its threads.
    out = tmp_path / "out"
    # (A store writing from its threads makes the same write as the loop, on the thread.)
    owner, name = (os, "fsync") if where == "fsync" else (_jsonl, "_unsynced_append")
    real = getattr(owner, name)
    failures: list[OSError] = []

    def failing(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args)

    monkeypatch.setattr(owner, name, failing)
    async with JsonlStore(str(out), sync_pages=3, sync_seconds=100.0, clock=_Clock()) as store:
        if where == "threads":
            store._loop_writes.slow = store._loop_writes.strikes
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        state = await store.load(7)
        for n, top in enumerate((100, 90)):
            new = attrs.evolve(state, cursor=f"c{n}")
            state = await store.commit(new, _page_of(range(top, top - 10, -1)), update=False)
        third = _page_of(range(80, 70, -1))
        failures.append(OSError(28, "No space left on device"))
        with pytest.raises(OSError, match="No space left"):
            await store.commit(attrs.evolve(state, cursor="c2"), third, update=False)
        assert not failures
        await store.commit(attrs.evolve(state, cursor="c2"), third, update=False)  # the retry
    data = (out / "messages" / "chat_id=7" / "messages.jsonl").read_bytes()
    assert b"\0" not in data
    assert [orjson.loads(line)["id"] for line in data.splitlines()] == list(range(100, 70, -1))
    stored = _checkpoint(out, 7)
    assert (stored.messages, stored.length, stored.cursor) == (30, len(data), "c2")
    assert store.committed_messages == 30
    assert not list(out.rglob("*.tmp"))


async def test_jsonl_syncs_move_to_the_threads_once_writes_on_the_loop_are_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock on which each write on the loop takes 10 ms, as on a slow network mount.
    clock = _Clock()
    real = _jsonl._unsynced_append

    def slow(*args: Any) -> Any:
        clock.now += 0.010
        return real(*args)

    monkeypatch.setattr(_jsonl, "_unsynced_append", slow)
    on_thread: list[int] = []
    async with JsonlStore(str(tmp_path / "out"), sync_pages=1, clock=clock) as store:
        original = store._commit

        def commit(state: ChatState, messages: list[Any], update: bool) -> ChatState:
            on_thread.append(state.chat_id)
            return original(state, messages, update)

        monkeypatch.setattr(store, "_commit", commit)
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        state = await store.load(7)
        for n in range(5):
            new = attrs.evolve(state, cursor=f"c{n}")
            top = 100 - 10 * n
            state = await store.commit(new, _page_of(range(top, top - 10, -1)), update=False)
    # Three slow writes on the loop, then the last two pages written on the thread.
    assert on_thread == [7, 7]
    assert _checkpoint(tmp_path / "out", 7).messages == 50


@pytest.mark.parametrize(
    ("durations", "allowed"),
    [
        ([], True),
        ([0.0001] * 100, True),
        ([0.01, 0.0001, 0.01], True),  # two slow writes: not yet
        ([0.01, 0.0001, 0.01, 0.0001, 0.01], False),  # the third, however far apart
        ([0.002] * 3, True),  # at the limit is not over it
        ([0.01] * 3 + [0.0001] * 10, False),  # and for good
    ],
)
def test_loop_writes_policy(durations: list[float], allowed: bool) -> None:
    policy = _jsonl.LoopWrites(limit=0.002, strikes=3)
    for seconds in durations:
        policy.took(seconds)
    assert policy.allowed is allowed


@pytest.mark.parametrize("fmt", ["jsonl", "sqlite"])
async def test_a_new_export_loads_its_chats_without_reading_and_a_resumed_one_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    out = _out(tmp_path, fmt)
    read: list[int] = []

    def opened(fmt: str) -> Store:
        store: Store = SqliteStore(str(out)) if fmt == "sqlite" else JsonlStore(str(out))
        original = store._load

        def load(chat_id: int) -> ChatState:
            read.append(chat_id)
            return original(chat_id)

        monkeypatch.setattr(store, "_load", load)
        return store

    async with opened(fmt) as store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=True)
        state = await store.load(8)
        assert (state.messages, state.cursor, read) == (0, None, [])
        page = _page_of(range(10, 0, -1))
        await store.commit(attrs.evolve(state, cursor="c"), page, update=False)
        # A chat the store has handled is read back: from now on its checkpoint says.
        assert ((await store.load(8)).messages, read) == (10, [8])
        assert ((await store.load(7)).messages, read) == (0, [8])
    read.clear()
    async with opened(fmt) as store:  # resumed: every chat is read
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        assert ((await store.load(8)).messages, (await store.load(7)).messages) == (10, 0)
        assert read == [8, 7]


async def test_a_sync_that_fails_after_its_caller_left_leaves_no_unretrieved_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fsync fails while nobody waits for it any more: close() (and settle()) must not
    # leave "exception was never retrieved" behind. The page is not stored, as when the
    # caller sees the failure: the checkpoint does not claim it, the next run fetches it.
    out = tmp_path / "out"
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
    real_fsync = os.fsync
    failures = [OSError(5, "Input/output error")]

    def fsync(fd: int) -> None:
        time.sleep(0.1)
        if failures:
            raise failures.pop()
        real_fsync(fd)

    try:
        store = JsonlStore(str(out), threads=1, sync_pages=1)
        async with store:
            await store.open(ExportMeta(source="https://api.example/"), fresh=True)
            state = attrs.evolve(await store.load(1), cursor="c")
            monkeypatch.setattr(os, "fsync", fsync)
            commit = asyncio.create_task(
                store.commit(state, _page_of(range(10, 0, -1)), update=False)
            )
            await asyncio.sleep(0.02)
            commit.cancel()
            with pytest.raises(asyncio.CancelledError):
                await commit
            await store.settle()
        del commit
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not [m for m in reported if "never retrieved" in m], reported
    assert store.committed_messages == 0
    stored = _checkpoint(out, 1)
    assert (stored.messages, stored.length, stored.cursor) == (0, 0, None)
    async with JsonlStore(str(out)) as again:  # resumed: cut back to the checkpoint
        await again.open(ExportMeta(source="https://api.example/"), fresh=False)
        assert (await again.load(1)).messages == 0
    assert (out / "messages" / "chat_id=1" / "messages.jsonl").read_bytes() == b""


async def test_work_for_any_chat_makes_a_new_store_read_its_checkpoints(tmp_path: Path) -> None:
    # A merge or a rescan writes chats outside commit(): after it, nothing is answered from
    # memory.
    out = tmp_path / "out"
    async with JsonlStore(str(out), sync_pages=1) as store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=True)
        state = attrs.evolve(await store.load(5), cursor=None, done=True)
        await store._call_any(store._commit, state, _page_of(range(10, 0, -1)), False)
        assert (await store.load(6)).messages == 0
        assert (await store.load(5)).messages == 10


async def test_a_jsonl_sync_whose_caller_is_cancelled_is_still_finished(tmp_path: Path) -> None:
    # One thread, held up by a first sync: the second chat's sync waits behind it when its
    # worker is cancelled. Its pages are in the page cache already; the thread must still
    # make them durable and put the checkpoint in place.
    out = tmp_path / "out"
    store = JsonlStore(str(out), threads=1, sync_pages=1)
    original = store._finish_counted

    def slow(*args: Any) -> Any:
        time.sleep(0.2)
        return original(*args)

    store._finish_counted = slow  # type: ignore[method-assign]
    async with store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=True)
        commits = []
        for chat_id in (1, 2):
            state = attrs.evolve(await store.load(chat_id), cursor="c")
            page = _page_of(range(10 * chat_id, 10 * chat_id - 10, -1))
            commits.append(asyncio.create_task(store.commit(state, page, update=False)))
        await asyncio.sleep(0.05)
        commits[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await commits[1]
        await commits[0]
    for chat_id in (1, 2):
        stored = _checkpoint(out, chat_id)
        data = (out / "messages" / f"chat_id={chat_id}" / "messages.jsonl").read_bytes()
        assert (stored.messages, stored.length) == (10, len(data))
    assert store.committed_messages == 20
    assert not list(out.rglob("*.tmp"))


async def test_a_jsonl_sync_begun_when_the_threads_are_gone_is_finished_on_the_loop(
    tmp_path: Path,
) -> None:
    # At interpreter exit the store's threads refuse new work: the rest of a write the loop
    # began (the fsync, the checkpoint's rename) runs where it is, and no descriptor leaks.
    out = tmp_path / "out"
    store = JsonlStore(str(out), sync_pages=1)
    await store.open(ExportMeta(source="https://api.example/"), fresh=True)
    state = attrs.evolve(await store.load(1), cursor="c")
    fds = len(os.listdir("/proc/self/fd"))
    store._executor.shutdown()  # what submit then raises is what it raises at exit
    with pytest.raises(RuntimeError):
        await store.save_chats([])  # work that need not run is refused as before
    await store.commit(state, _page_of(range(10, 0, -1)), update=False)
    assert len(os.listdir("/proc/self/fd")) == fds
    stored = _checkpoint(out, 1)
    assert (stored.messages, stored.cursor) == (10, "c")
    assert not list(out.rglob("*.tmp"))


async def test_a_file_that_cannot_be_written_at_close_does_not_keep_the_others_from_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real = _jsonl._unsynced_append

    def full_for_chat_1(path: str, *args: Any) -> int:
        if "chat_id=1" in path:
            raise OSError(28, "No space left on device")
        return real(path, *args)

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    store = JsonlStore(str(out), sync_pages=100, sync_seconds=100.0, clock=_Clock())
    await store.open(ExportMeta(source="https://api.example/"), fresh=True)
    for chat_id in (1, 2):
        state = attrs.evolve(await store.load(chat_id), cursor="c")
        await store.commit(state, _page_of(range(10, 0, -1)), update=False)  # kept in memory
    monkeypatch.setattr(_jsonl, "_unsynced_append", full_for_chat_1)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        await store.close()
    assert (_checkpoint(out, 2).messages, _checkpoint(out, 1).messages) == (10, 0)
    assert {str(out / "messages" / "chat_id=2"), str(out / "state"), str(out)} <= set(synced)


async def test_a_close_when_the_threads_are_gone_still_writes_what_waits(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = JsonlStore(str(out), sync_pages=100, sync_seconds=100.0, clock=_Clock())
    await store.open(ExportMeta(source="https://api.example/"), fresh=True)
    state = attrs.evolve(await store.load(3), cursor="c")
    await store.commit(state, _page_of(range(10, 0, -1)), update=False)  # kept in memory
    store._executor.shutdown()
    await store.close()
    assert (_checkpoint(out, 3).messages, _checkpoint(out, 3).cursor) == (10, "c")


async def test_jsonl_window_pages_kept_for_their_sync_are_written_at_close(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    windows = [WindowState(0, till=datetime(2026, 1, 2, tzinfo=UTC)), WindowState(1)]
    async with JsonlStore(str(out), sync_pages=100, sync_seconds=100.0, clock=_Clock()) as store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        state = await store.start_windows(await store.load(7), windows)
        for window, top in (
            (state.windows[0], 100),
            (state.windows[0], 90),
            (state.windows[1], 50),
        ):
            window.cursor = f"w{window.index}-{top}"
            await store.commit_window(state, window, _page_of(range(top, top - 10, -1)))
        assert read_window(str(out / ".pending" / "7.window-0.json"), windows[0]).messages == 0
    for index, messages in ((0, 20), (1, 10)):
        segment = out / ".pending" / f"7.window-{index}.jsonl"
        stored = read_window(str(out / ".pending" / f"7.window-{index}.json"), windows[index])
        assert (stored.messages, stored.length) == (messages, segment.stat().st_size)
        assert len(segment.read_bytes().splitlines()) == messages


async def test_a_commit_after_close_is_refused(tmp_path: Path) -> None:
    store = JsonlStore(str(tmp_path / "out"), sync_pages=8)
    async with store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=False)
        state = await store.load(7)
    with pytest.raises(StoreError, match="the store is closed"):
        await store.commit(
            attrs.evolve(state, cursor="c"), _page_of(range(10, 0, -1)), update=False
        )
    assert store.committed_messages == 0


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"sync_pages": 0}, ValueError, "sync_pages must be at least 1, got 0"),
        ({"sync_pages": 1.5}, TypeError, "sync_pages must be an int of pages, got float 1.5"),
        ({"sync_pages": True}, TypeError, "sync_pages must be an int of pages, got bool True"),
        ({"sync_seconds": -0.5}, ValueError, "sync_seconds must be a non-negative number"),
        ({"sync_seconds": float("nan")}, ValueError, "sync_seconds must be a non-negative"),
        ({"sync_seconds": "1"}, TypeError, "sync_seconds must be a number of seconds, got str"),
    ],
)
def test_jsonl_sync_options_are_checked_before_anything_is_written(
    tmp_path: Path, options: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        JsonlStore(str(tmp_path / "out"), **options)
    assert not (tmp_path / "out").exists()


def _jsonl_args(tmp_path: Path) -> tuple[Path, list[str]]:
    out = _out(tmp_path, "jsonl")
    return out, ["--out", str(out), "--format", "jsonl", "--concurrency", "2"]


def _two_long_chats() -> MessagesServer:
    """Two chats of 30 pages, a page every few milliseconds: a kill lands mid-walk."""
    return MessagesServer(chats=2, messages_per_chat=3000, seed=5, latency=0.005)


async def _rerun_exactly(server: MessagesServer, args: list[str], out: Path) -> None:
    """Run the JSONL export to its end: it must then hold exactly the server's messages."""
    proc = await start_cli(server, *args)
    _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert_exact(server, "jsonl", out)


def _cursors(server: MessagesServer, chat_id: int, since: int) -> list[str | None]:
    """The cursors of the chat's listings after the server's first ``since``, in the order
    they came (``None``: the chat's first page). A chat's pages are asked for one at a time."""
    return [r.query.get("cursor") for r in listings(server)[since:] if _chat_of(r) == chat_id]


async def test_sync_pages_on_the_command_line_is_how_far_a_killed_jsonl_run_falls_back(
    tmp_path: Path,
) -> None:
    # With --sync-pages 1000 and pages every few milliseconds, neither the page count nor the
    # one-second clock makes a checkpoint due before the kill: the rerun fetches every page
    # again (the default, 8, would have written a checkpoint after page 8).
    out, args = _jsonl_args(tmp_path)
    async with _two_long_chats() as srv:
        killed = await kill_after_listings(srv, [*args, "--sync-pages", "1000"], 30)
        assert killed, "the export should still be running at the kill"
        fetched = {chat_id: _cursors(srv, chat_id, 0) for chat_id in srv.chat_ids()}
        assert all(len(cursors) > 8 for cursors in fetched.values()), fetched
        stored = [_checkpoint(out, chat_id) for chat_id in fetched]
        assert all(st.messages == 0 for st in stored), stored
        rerun = len(listings(srv))
        await _rerun_exactly(srv, [*args, "--sync-pages", "1"], out)
        for chat_id, cursors in fetched.items():
            assert _cursors(srv, chat_id, rerun)[: len(cursors)] == cursors


async def test_a_jsonl_export_killed_between_syncs_fetches_those_pages_again_exactly(
    tmp_path: Path,
) -> None:
    out, args = _jsonl_args(tmp_path)
    async with _two_long_chats() as srv:
        # The pages of a chat the killed run asked for from its checkpoint's cursor on: three
        # or more means one of them waited for its sync (the third is asked for only once the
        # first is stored, and the page after a checkpoint always waits for the next one).
        behind: dict[int, list[str | None]] = {}
        for target in (22, 18, 26):
            # Two chats at once: some 11 pages of each, past one sync (8 pages), short of two.
            run = len(listings(srv))
            await kill_after_listings(srv, args, target)
            for chat_id in srv.chat_ids():
                stored, cursors = _checkpoint(out, chat_id), _cursors(srv, chat_id, run)
                if stored.done or stored.cursor is None:  # none written yet, or done
                    continue
                # The checkpoint keeps the next page's link; a listing's query has its cursor.
                resume = URL(stored.cursor).query.get("cursor")
                if resume in cursors:
                    past = cursors[cursors.index(resume) :]
                    if len(past) >= 3:
                        behind[chat_id] = past
            if behind:
                break
        assert behind, "a kill should land while a chat's pages wait for their sync"
        rerun = len(listings(srv))
        await _rerun_exactly(srv, args, out)
        # Fetched again from the checkpoint: at most the 8 pages of a sync and the one
        # prefetched, and each exactly once (the export holds no duplicate).
        for chat_id, past in behind.items():
            assert len(past) <= 8 + 1, past
            assert _cursors(srv, chat_id, rerun)[: len(past)] == past
