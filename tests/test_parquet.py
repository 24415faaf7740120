"""The Parquet export against the emulator: read back by pyarrow and DuckDB, equal to the
SQLite export of the same data, resumable after a real SIGKILL without a duplicate."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_export import _client, _meta, assert_exact, cli_env, kill_mid_run, listings, start_cli

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
)
from messages_async.export._parquet import INSTALL_HINT
from messages_async.testing import MessagesServer

Raw = dict[str, Any]
Row = tuple[int, int, int, str, datetime | None, str]


async def export_into(
    server: MessagesServer,
    store: Store,
    *,
    fresh: bool = False,
    tap: Callable[[Store, asyncio.Event], None] | None = None,
    **options: Any,
) -> ExportStats:
    opts = ExportOptions(**options)
    stop = asyncio.Event()
    if tap is not None:
        tap(store, stop)
    async with _client(server) as client:
        try:
            await store.open(_meta(server, opts), fresh=fresh)
            return await Exporter(client, store, opts, stop=stop).run()
        finally:
            await store.close()


def _instant(text: str | None) -> datetime | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _attachments(raw: Raw) -> list[Raw]:
    found = raw.get("attachments") or {}
    return [
        {"type": a["type"], "url": a["url"], "name": a.get("name"), "size": a.get("size")}
        for a in found.get("items", [])
    ]


def sqlite_rows(out: Path) -> set[Row]:
    db = sqlite3.connect(out)
    try:
        return {
            (chat_id, mid, uid, text, _instant(created), orjson.dumps(orjson.loads(raw)).decode())
            for chat_id, mid, uid, text, created, raw in db.execute(
                "SELECT chat_id, id, uid, message, created_at, raw FROM messages"
            )
        }
    finally:
        db.close()


def parquet_rows(out: Path) -> list[Row]:
    """Every message row of the dataset, checking each typed column against its raw object."""
    table = pq.read_table(out / "messages")
    rows = []
    for r in table.to_pylist():
        raw = orjson.loads(r["raw"])
        assert (r["id"], r["uid"], r["message"]) == (raw["id"], raw["uid"], raw["message"])
        assert r["created_at"] == _instant(raw.get("created_at"))
        assert r["attachments"] == _attachments(raw)
        rows.append((int(r["chat_id"]), r["id"], r["uid"], r["message"], r["created_at"], r["raw"]))
    return rows


def assert_parquet_is_server(server: MessagesServer, out: Path) -> None:
    rows = parquet_rows(out)
    ids = [r[1] for r in rows]
    assert len(ids) == len(set(ids)), "a message is stored twice"
    expected = {
        (chat_id, m["id"]): orjson.dumps(m).decode()
        for chat_id in server.chat_ids()
        for m in server.messages(chat_id)
    }
    assert {(r[0], r[1]): r[5] for r in rows} == expected


def every_part_is_whole(out: Path) -> int:
    """Each file a ``*.parquet`` glob finds is a complete Parquet file; the number of rows."""
    total = 0
    for path in out.rglob("*.parquet"):
        total += pq.ParquetFile(path).metadata.num_rows  # raises on a torn file
    return total


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(
        chats=6, messages_per_chat=(0, 260), seed=11, extra_fields=True
    ) as srv:
        srv.add_chat(type="group", name="empty")
        yield srv


async def test_parquet_read_by_pyarrow_and_duckdb_equals_the_sqlite_export(
    server: MessagesServer, tmp_path: Path
) -> None:
    sqlite_out, out = tmp_path / "out.sqlite", tmp_path / "pq"
    await export_into(server, SqliteStore(str(sqlite_out)), concurrency=3)
    stats = await export_into(server, ParquetStore(str(out), part_rows=37), concurrency=3)
    assert stats.failures == []
    assert stats.messages == server.all_message_count()

    rows = parquet_rows(out)
    assert len(rows) == server.all_message_count()
    assert set(rows) == sqlite_rows(sqlite_out)
    assert_parquet_is_server(server, out)
    # Small parts, as asked (a part holds whole pages): the largest chat is in several files.
    assert max(len(list(d.iterdir())) for d in (out / "messages").iterdir()) >= 3
    # chat_id is the partition key, not a column inside the files.
    some_part = next((out / "messages").rglob("*.parquet"))
    assert "chat_id" not in pq.read_schema(some_part).names
    assert pq.read_schema(some_part).field("created_at").type == pa.timestamp("us", tz="UTC")

    chats = pq.read_table(out / "chats.parquet").to_pylist()
    by_id = {c["chat_id"]: c for c in server.chats()}
    assert {c["chat_id"] for c in chats} == set(by_id)
    for chat in chats:
        raw = by_id[chat["chat_id"]]
        assert orjson.loads(chat["raw"]) == raw
        assert chat["type"] == raw["type"]
        assert chat["name"] == raw.get("name")
        members = raw.get("members_count")
        assert chat["members_count"] == (int(members) if members is not None else None)

    # DuckDB reads it as it is, and joins messages to their chat through the partition key.
    glob = f"{out}/messages/**/*.parquet"
    db = duckdb.connect()
    try:
        (count,) = db.execute(
            f"select count(*) from read_parquet('{glob}', hive_partitioning=true)"
        ).fetchone()
        assert count == server.all_message_count()
        per_type = db.execute(
            f"select c.type, count(*) from read_parquet('{glob}', hive_partitioning=true) m "
            f"join '{out}/chats.parquet' c using (chat_id) group by c.type order by c.type"
        ).fetchall()
        oldest = db.execute(
            f"select chat_id, min(created_at), max(id) "
            f"from read_parquet('{glob}', hive_partitioning=true) group by chat_id"
        ).fetchall()
    finally:
        db.close()
    expected_types: dict[str, int] = {}
    for chat_id in server.chat_ids():
        kind = by_id[chat_id]["type"]
        n = len(server.messages(chat_id))
        if n:
            expected_types[kind] = expected_types.get(kind, 0) + n
    assert per_type == sorted(expected_types.items())
    for chat_id, first, newest in oldest:
        messages = server.messages(chat_id)
        assert newest == messages[0]["id"]
        assert first == _instant(messages[-1]["created_at"])


async def test_an_update_adds_parts_and_never_rewrites_or_repeats(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "pq"
    await export_into(server, ParquetStore(str(out)))
    chat = server.chat_ids()[1]
    folder = out / "messages" / f"chat_id={chat}"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    for i in range(130):
        server.post_message(chat, f"later {i}")
    server.reset_stats()

    stats = await export_into(server, ParquetStore(str(out)))

    assert stats.messages == 130
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(after) == len(before) + 1
    assert all(after[name] == mtime for name, mtime in before.items())
    assert_parquet_is_server(server, out)
    # One listing per unchanged chat (its newest page), two for the chat with 130 new.
    assert len(listings(server)) == len(server.chat_ids()) + 1


async def test_a_clean_stop_writes_what_was_buffered_and_the_next_run_goes_on(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "pq"

    def stop_after(n: int) -> Callable[[Store, asyncio.Event], None]:
        def tap(store: Store, stop: asyncio.Event) -> None:
            original = store.commit
            count = 0

            async def commit(*args: Any, **kwargs: Any) -> Any:
                nonlocal count
                result = await original(*args, **kwargs)
                count += 1
                if count >= n:
                    stop.set()
                return result

            store.commit = commit  # type: ignore[method-assign]

        return tap

    chat = max(server.chat_ids(), key=lambda c: len(server.messages(c)))
    first = await export_into(
        server, ParquetStore(str(out)), chat_ids=(chat,), concurrency=1, tap=stop_after(1)
    )
    assert first.interrupted
    # The pages of the unfinished walk were not lost: its buffer went out on close. (The
    # page fetched ahead may have been committed before the stop reached the worker.)
    assert first.messages in (100, 200)
    assert len(parquet_rows(out)) == first.messages
    checkpoint = orjson.loads((out / "state" / f"{chat}.json").read_bytes())
    assert checkpoint["cursor"]
    assert checkpoint["parts"] == 1
    server.reset_stats()

    second = await export_into(server, ParquetStore(str(out)), concurrency=2)

    assert first.messages + second.messages == server.all_message_count()
    # The chat went on from its cursor: its first page was not fetched again.
    first_pages = [r for r in listings(server) if r.query.get("chat_id") == str(chat)]
    assert first_pages
    assert "cursor" in first_pages[0].query
    assert_parquet_is_server(server, out)


async def test_leftovers_of_a_killed_write_are_removed_and_refetched(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "pq"
    await export_into(server, ParquetStore(str(out), part_rows=50))
    chat = max(server.chat_ids(), key=lambda c: len(server.messages(c)))
    folder = out / "messages" / f"chat_id={chat}"
    state_file = out / "state" / f"{chat}.json"
    state = orjson.loads(state_file.read_bytes())
    parts = sorted(folder.iterdir())
    assert state["parts"] == len(parts) > 2
    # A run killed after renaming its last part but before its checkpoint landed, while a
    # second part was half written: the checkpoint is the one from before the last part.
    last = parts[-1]
    rows_in_last = pq.ParquetFile(last).metadata.num_rows
    (folder / ".part-99999.parquet.tmp").write_bytes(b"PAR1 torn")
    low = min(r["id"] for r in pq.read_table(parts[-2], columns=["id"]).to_pylist())
    older = next(m for m in server.messages(chat) if m["id"] < low)
    state.update(
        parts=len(parts) - 1,
        done=False,
        messages=state["messages"] - rows_in_last,
        walk_top=server.messages(chat)[0]["id"],
        walk_low=low,
        newest_id=None,
        cursor=None,
    )
    state_file.write_bytes(orjson.dumps(state))
    assert older["id"] < low
    server.reset_stats()

    stats = await export_into(server, ParquetStore(str(out), part_rows=50))

    assert stats.messages == rows_in_last
    assert not (folder / ".part-99999.parquet.tmp").exists()
    assert_parquet_is_server(server, out)


async def test_a_missing_part_exports_the_chat_again(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "pq"
    await export_into(server, ParquetStore(str(out), part_rows=50))
    chat = max(server.chat_ids(), key=lambda c: len(server.messages(c)))
    folder = out / "messages" / f"chat_id={chat}"
    sorted(folder.iterdir())[1].unlink()

    stats = await export_into(server, ParquetStore(str(out), part_rows=50))

    assert stats.messages == len(server.messages(chat))
    assert_parquet_is_server(server, out)


async def test_other_outputs_are_refused_and_fresh_starts_over(
    server: MessagesServer, tmp_path: Path
) -> None:
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "state.json").write_bytes(b"{}")
    (jsonl / "messages").mkdir()
    with pytest.raises(StoreError, match="JSONL export"):
        await export_into(server, ParquetStore(str(jsonl)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        await export_into(server, ParquetStore(str(other)), fresh=True)
    assert (other / "notes.txt").read_text() == "mine"

    out = tmp_path / "pq"
    await export_into(server, ParquetStore(str(out)), query="a")
    with pytest.raises(StoreError, match="--fresh"):
        await export_into(server, ParquetStore(str(out)))
    (out / "mine.txt").write_text("kept")
    await export_into(server, ParquetStore(str(out)), fresh=True)
    assert (out / "mine.txt").read_text() == "kept"
    assert_parquet_is_server(server, out)


async def test_sigkill_at_random_moments_leaves_only_whole_parts_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    rng = random.Random("sigkill-parquet")
    out = tmp_path / "pq"
    args = ["--out", str(out), "--format", "parquet", "--concurrency", "3"]
    args += ["--parquet-part-rows", "120"]
    async with MessagesServer(
        chats=5, messages_per_chat=(150, 420), seed=21, extra_fields=True, latency=0.01
    ) as srv:
        kills = 0
        for _ in range(3):
            kills += await kill_mid_run(srv, rng, args, max_listings=10)
            every_part_is_whole(out)
        for chat_id in srv.chat_ids()[:3]:
            for i in range(rng.randint(101, 180)):
                srv.post_message(chat_id, f"later {i}")
        kills += await kill_mid_run(srv, rng, args, max_listings=4)
        every_part_is_whole(out)
        assert kills >= 3, "the kills should land while the export runs"

        proc = await start_cli(srv, *args)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert b"Export done" in stdout
        assert_parquet_is_server(srv, out)
        assert not [p for p in out.rglob("*") if p.name.startswith(".")]


async def test_without_pyarrow_the_command_says_what_to_install(
    server: MessagesServer, tmp_path: Path
) -> None:
    # pyarrow made unimportable in a real child process, as on a machine without it.
    code = (
        "import sys; sys.modules['pyarrow'] = None; from messages_async._cli import main; "
        "raise SystemExit(main(sys.argv[1:]))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "export",
        "--format",
        "parquet",
        "--out",
        str(tmp_path / "pq"),
        env=cli_env(server),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == 2
    assert INSTALL_HINT in stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert not server.token_requests, "it signed in before saying pyarrow is missing"
    assert not (tmp_path / "pq").exists()


async def test_the_sqlite_export_has_typed_timestamps_and_chat_columns(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "out.sqlite"
    await export_into(server, SqliteStore(str(out)))
    db = sqlite3.connect(out, detect_types=sqlite3.PARSE_DECLTYPES)
    try:
        types = {row[1]: row[2] for row in db.execute("PRAGMA table_info(messages)")}
        rows = db.execute("SELECT id, created_at, raw FROM messages").fetchall()
        chats = db.execute(
            "SELECT chat_id, type, name, picture_url, members_count, raw FROM chats"
        ).fetchall()
    finally:
        db.close()
    assert types["created_at"] == "TIMESTAMP"
    assert len(rows) == server.all_message_count()
    duck = duckdb.connect()
    try:
        for _, created, raw in rows:
            # Python's sqlite3 hands back a datetime (naive, in UTC) from the declared type.
            assert isinstance(created, datetime)
            expected = _instant(orjson.loads(raw)["created_at"])
            assert created.replace(tzinfo=UTC) == expected
            # DuckDB reads the stored text as a TIMESTAMP as it is.
            text = created.isoformat(sep=" ")
            (cast,) = duck.execute("select ?::timestamp", [text]).fetchone()
            assert cast == created
    finally:
        duck.close()
    by_id = {c["chat_id"]: c for c in server.chats()}
    assert {c[0] for c in chats} == set(by_id)
    for chat_id, kind, name, picture, members, raw in chats:
        expected_raw = by_id[chat_id]
        assert orjson.loads(raw) == expected_raw
        assert (kind, name, picture) == (
            expected_raw["type"],
            expected_raw.get("name"),
            expected_raw.get("picture_url"),
        )
        count = expected_raw.get("members_count")
        assert members == (int(count) if count is not None else None)
        assert isinstance(members, (int, type(None)))


async def test_duckdb_joins_the_jsonl_export_to_its_chats_through_the_folders(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "jsonl"
    await export_into(server, JsonlStore(str(out)))
    db = duckdb.connect()
    try:
        per_chat = dict(
            db.execute(
                f"select c.chat_id, count(*) from read_json('{out}/messages/*/*.jsonl', "
                f"hive_partitioning=true) m join read_json('{out}/chats.jsonl') c "
                "using (chat_id) group by c.chat_id"
            ).fetchall()
        )
    finally:
        db.close()
    expected = {c: len(server.messages(c)) for c in server.chat_ids() if server.messages(c)}
    assert per_chat == expected


async def test_a_jsonl_export_in_the_flat_layout_is_moved_into_folders(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "jsonl"
    await export_into(server, JsonlStore(str(out)))
    # The layout exports had before: messages/<chat_id>.jsonl.
    for folder in list((out / "messages").iterdir()):
        (folder / "messages.jsonl").rename(out / "messages" / f"{folder.name[8:]}.jsonl")
        folder.rmdir()
    chat = server.chat_ids()[0]
    server.post_message(chat, "after the move")
    server.reset_stats()

    stats = await export_into(server, JsonlStore(str(out)))

    assert stats.messages == 1
    assert len(listings(server)) == len(server.chat_ids())
    assert not list((out / "messages").glob("*.jsonl"))
    assert_exact(server, "jsonl", out)


async def test_the_raw_column_holds_each_message_as_received(tmp_path: Path) -> None:
    # The server's own spelling (an escape, a space, a trailing zero, a field the client does
    # not know) is kept: the stored text is the item's bytes, not a parse encoded again.
    items = [
        b'{"id": 2, "uid": 7, "message": "caf\\u00e9", "created_at": "2026-01-01T00:00:01Z"}',
        b'{"id":1,"uid":7,"message":"x","score":1.50,"created_at":"2026-01-01T00:00:00Z"}',
    ]
    page = parse_page(b'{"items": [' + b", ".join(items) + b"]}")
    out = tmp_path / "out"
    async with ParquetStore(str(out)) as store:
        await store.open(ExportMeta(source="https://api.example/"), fresh=True)
        state = attrs.evolve(await store.load(5), done=True)
        await store.commit(state, page.items, update=False)
    raws = pq.read_table(out / "messages", columns=["raw"]).column("raw").to_pylist()
    assert raws == [item.decode() for item in items]


# Runs the command line and prints the allocator pyarrow used, as the process exits.
_WITH_POOL = """
import atexit, runpy, sys

def pool():
    import pyarrow  # loaded by the export by now: its choice, not this script's
    print("POOL", pyarrow.default_memory_pool().backend_name, file=sys.stderr)

atexit.register(pool)
sys.argv = ["messages-async", *sys.argv[1:]]
runpy.run_module("messages_async", run_name="__main__")
"""


@pytest.mark.parametrize(("named", "used"), [(None, "system"), ("jemalloc", "jemalloc")])
async def test_the_parquet_export_command_allocates_with_malloc_unless_told_otherwise(
    server: MessagesServer, tmp_path: Path, named: str | None, used: str
) -> None:
    env = cli_env(server)
    env.pop("ARROW_DEFAULT_MEMORY_POOL", None)
    if named is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = named
    out = str(tmp_path / "out")
    proc = await start_cli(server, "--format", "parquet", "--out", out, script=_WITH_POOL, env=env)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert f"POOL {used}" in err.decode()
