"""``export --rescan`` against the emulator: edits and deletions between runs are found, kept
as versions and marked deleted (never removed), resumably and crash-safely."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from helpers import make_client
from test_export import _Disk, _meta, kill_mid_run, listings, start_cli

from messages_async.export import (
    Exporter,
    ExportOptions,
    ExportStats,
    JsonlStore,
    ParquetStore,
    SqliteStore,
    Store,
)
from messages_async.export._rescan import Rescanner, RescanState, RescanStats
from messages_async.testing import MessagesServer

FORMATS = ("sqlite", "jsonl", "parquet")
Raw = dict[str, Any]


def _out(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("out.sqlite" if fmt == "sqlite" else f"out-{fmt}")


def _store(fmt: str, out: Path) -> Store:
    if fmt == "sqlite":
        return SqliteStore(str(out))
    return JsonlStore(str(out)) if fmt == "jsonl" else ParquetStore(str(out))


async def export(
    server: MessagesServer,
    fmt: str,
    out: Path,
    *,
    rescan: bool = True,
    stop_mid_rescan: bool = False,
) -> tuple[ExportStats, RescanStats | None]:
    options = ExportOptions(concurrency=2)
    store = _store(fmt, out)
    latency = server.latency
    async with make_client(server) as client:
        try:
            await store.open(_meta(server, options), fresh=False)
            rescanner = Rescanner(client, store) if rescan else None
            stop = asyncio.Event()
            if rescanner is not None and stop_mid_rescan:
                _stop_at_the_first_checkpoint_with_a_cursor(rescanner, stop, server)
            exporter = Exporter(
                client, store, options, stop=stop, rescan=rescanner.rescan if rescanner else None
            )
            stats = await exporter.run()
            return stats, rescanner.stats if rescanner else None
        finally:
            server.latency = latency
            await store.close()


def _stop_at_the_first_checkpoint_with_a_cursor(
    rescanner: Rescanner, stop: asyncio.Event, server: MessagesServer
) -> None:
    """Stop the export (as Ctrl-C does) once a rescan has committed a page that is not its
    chat's last, so that a checkpoint with a cursor is left behind.

    The stop is set before that commit returns, and every answer takes 50 ms until the run
    ends, so the next page of any rescan (its request already made by the walk's read-ahead)
    cannot arrive and be committed before the workers are cancelled.
    """
    loop = asyncio.get_running_loop()
    backend = rescanner._backend
    original = backend.commit

    async def set_stop() -> None:
        stop.set()

    def commit(state: RescanState, *args: Any) -> Any:
        result = original(state, *args)
        if state.cursor is not None and not stop.is_set():
            asyncio.run_coroutine_threadsafe(set_stop(), loop).result(timeout=30)
        return result

    server.latency = 0.05
    backend.commit = commit  # type: ignore[method-assign]


def current_view(fmt: str, out: Path) -> tuple[dict[int, Raw], set[int], dict[int, list[Raw]]]:
    """What the export says now: ``({id: current raw}, deleted ids, {id: versions})``."""
    versions: dict[int, list[Raw]] = {}
    if fmt == "sqlite":
        db = sqlite3.connect(out)
        try:
            current = {i: orjson.loads(r) for i, r in db.execute("SELECT id, raw FROM messages")}
            tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
            if "message_versions" not in tables:  # added by the first --rescan
                return current, set(), versions
            deleted = {
                i for (i,) in db.execute("SELECT id FROM messages WHERE deleted_at IS NOT NULL")
            }
            for i, version, raw, seen in db.execute(
                "SELECT id, version, raw, seen_at FROM message_versions ORDER BY id, version"
            ):
                versions.setdefault(i, []).append(
                    {"v": version, "raw": orjson.loads(raw), "seen": seen}
                )
        finally:
            db.close()
        return current, deleted, versions
    current = {}
    if fmt == "jsonl":
        for path in (out / "messages").glob("*/messages.jsonl"):
            for line in path.read_bytes().splitlines():
                obj = orjson.loads(line)
                current[obj["id"]] = obj
    else:
        table = pq.read_table(out / "messages", columns=["id", "raw"])
        for i, raw in zip(
            table.column("id").to_pylist(), table.column("raw").to_pylist(), strict=True
        ):
            current[i] = orjson.loads(raw)
    deleted: set[int] = set()
    if not (out / "versions").exists():  # made by the first --rescan
        return current, deleted, versions
    for path in sorted((out / "versions").iterdir()):
        for line in path.read_bytes().splitlines():
            obj = orjson.loads(line)
            versions.setdefault(obj["id"], []).append(
                {"v": obj["version"], "raw": obj["raw"], "seen": obj["seen_at"]}
            )
            current[obj["id"]] = obj["raw"]
    for path in (out / "deleted").iterdir():
        for line in path.read_bytes().splitlines():
            i = orjson.loads(line)["id"]
            assert i not in deleted, f"{i} marked deleted twice"
            deleted.add(i)
    return current, deleted, versions


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(
        chats=4, messages_per_chat=(120, 330), seed=31, extra_fields=True
    ) as srv:
        yield srv


def change(server: MessagesServer, rng: random.Random) -> tuple[dict[int, Raw], set[int]]:
    """Edit and delete messages across the chats, newest and oldest pages included."""
    edited: dict[int, Raw] = {}
    deleted: set[int] = set()
    for chat_id in server.chat_ids():
        messages = server.messages(chat_id)
        picks = rng.sample(range(1, len(messages) - 1), 4)
        for i in (0, *picks[:2]):
            m = messages[i]
            edited[m["id"]] = server.edit_message(m["id"], f"edited: {m['message']}")
        for i in (len(messages) - 1, *picks[2:]):
            server.delete_message(messages[i]["id"])
            deleted.add(messages[i]["id"])
    return edited, deleted


@pytest.mark.parametrize("fmt", FORMATS)
async def test_rescan_finds_edits_and_deletions_and_keeps_every_version(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    await export(server, fmt, out, rescan=False)
    before, _, _ = current_view(fmt, out)
    edited, deleted = change(server, random.Random(fmt))
    new = server.post_message(server.chat_ids()[0], "posted after the first run")

    stats, found = await export(server, fmt, out)

    assert found is not None
    assert stats.failures == []
    assert (found.edits, found.deletions) == (len(edited), len(deleted))
    assert found.chats == len(server.chat_ids())
    current, gone, versions = current_view(fmt, out)
    assert gone == deleted
    assert deleted <= set(current), "a deleted message was removed"
    assert current[new["id"]] == new
    for chat_id in server.chat_ids():
        for m in server.messages(chat_id):
            assert current[m["id"]] == m
    assert set(versions) == set(edited)
    for mid, kept in versions.items():
        assert [k["v"] for k in kept] == [1, 2]
        assert kept[0]["raw"] == before[mid]
        assert kept[0]["seen"] is None  # stored before versions were kept
        assert kept[1]["raw"] == edited[mid]
        assert kept[1]["seen"]

    # Nothing changed: nothing found, nothing written twice. Then a second edit: version 3.
    _, again = await export(server, fmt, out)
    assert again is not None
    assert (again.edits, again.deletions) == (0, 0)
    mid = next(iter(edited))
    third = server.edit_message(mid, "edited twice")
    _, last = await export(server, fmt, out)
    assert last is not None
    assert (last.edits, last.deletions) == (1, 0)
    current, gone, versions = current_view(fmt, out)
    assert [k["v"] for k in versions[mid]] == [1, 2, 3]
    assert versions[mid][2]["raw"] == current[mid] == third
    assert gone == deleted


async def test_a_stopped_rescan_goes_on_from_its_checkpoint(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = _out(tmp_path, "sqlite")
    await export(server, "sqlite", out, rescan=False)
    edited, deleted = change(server, random.Random("stop"))
    first, found = await export(server, "sqlite", out, stop_mid_rescan=True)
    assert first.interrupted
    assert found is not None
    db = sqlite3.connect(out)
    saved = db.execute(
        "SELECT chat_id, cursor FROM rescan_state WHERE cursor IS NOT NULL"
    ).fetchall()
    db.close()
    assert saved, "the stopped rescan left no checkpoint"
    server.reset_stats()

    _, rest = await export(server, "sqlite", out)

    assert rest is not None
    assert found.edits + rest.edits == len(edited)
    assert found.deletions + rest.deletions == len(deleted)
    _, gone, versions = current_view("sqlite", out)
    assert gone == deleted
    assert set(versions) == set(edited)
    for chat_id, cursor in saved:
        mine = [r for r in listings(server) if r.query.get("chat_id") == str(chat_id)]
        # The update's newest page, then the rescan from its saved cursor, not from the top.
        assert any(cursor.endswith(r.query.get("cursor", "\0")) for r in mine), chat_id


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
async def test_rescan_record_files_are_named_durably_before_a_checkpoint_counts_them(
    fmt: str, server: MessagesServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _out(tmp_path, fmt)
    await export(server, fmt, out, rescan=False)
    change(server, random.Random("durable"))
    disk = _Disk(monkeypatch)

    await export(server, fmt, out)

    synced = [path for event, path in disk.events if event == "fsync"]
    checkpoints = [i for i, path in enumerate(synced) if path.startswith(str(out / "rescan"))]
    assert checkpoints, "no rescan checkpoint was written"
    before = synced[: checkpoints[0]]
    for folder in (out, out / "versions", out / "deleted"):
        assert str(folder) in before, f"{folder} was not synced before the first checkpoint"


async def test_rescan_records_that_were_lost_are_found_again(
    server: MessagesServer, tmp_path: Path
) -> None:
    # A record file gone (removed by hand, or lost to a fault of the disk) while the
    # checkpoint that counts its bytes is kept: the next run finds the same edits and
    # deletions again instead of failing.
    out = _out(tmp_path, "jsonl")
    await export(server, "jsonl", out, rescan=False)
    edited, deleted = change(server, random.Random("lost"))
    await export(server, "jsonl", out)
    lost = [p for p in (out / "versions").iterdir() if p.stat().st_size]
    assert lost
    for path in lost:
        path.unlink()

    await export(server, "jsonl", out)

    _, gone, versions = current_view("jsonl", out)
    assert gone == deleted
    assert set(versions) == set(edited)
    assert all(len(v) == 2 for v in versions.values())


async def test_an_expired_rescan_cursor_starts_at_the_newest_page_without_repeating(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = _out(tmp_path, "jsonl")
    await export(server, "jsonl", out, rescan=False)
    edited, deleted = change(server, random.Random("expired"))
    await export(server, "jsonl", out, stop_mid_rescan=True)
    expired = 0
    for path in (out / "rescan").iterdir():
        state = orjson.loads(path.read_bytes())
        if state["cursor"]:
            state["cursor"] = "expired-cursor-token"
            path.write_bytes(orjson.dumps(state))
            expired += 1
    assert expired
    server.reset_stats()

    await export(server, "jsonl", out)

    assert any(r.status == 400 for r in listings(server)), "the expired cursor was not tried"
    _, gone, versions = current_view("jsonl", out)
    assert gone == deleted
    assert set(versions) == set(edited)
    assert all(len(v) == 2 for v in versions.values())


@pytest.mark.parametrize("fmt", ["sqlite", "parquet"])
async def test_kill_9_during_rescans_then_rerun_records_each_change_once(
    fmt: str, tmp_path: Path
) -> None:
    rng = random.Random(f"rescan-kill-{fmt}")
    out = _out(tmp_path, fmt)
    args = ["--out", str(out), "--format", fmt, "--concurrency", "2"]
    async with MessagesServer(
        chats=3, messages_per_chat=(250, 400), seed=41, extra_fields=True, latency=0.01
    ) as srv:
        proc = await start_cli(srv, *args)
        await proc.communicate()
        assert proc.returncode == 0
        edited, deleted = change(srv, rng)
        kills = 0
        for _ in range(2):
            kills += await kill_mid_run(srv, rng, [*args, "--rescan"], max_listings=10)
        assert kills >= 1
        proc = await start_cli(srv, *args, "--rescan")
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert b"rescan:" in stdout
        current, gone, versions = current_view(fmt, out)
        assert gone == deleted
        assert set(versions) == set(edited)
        assert all(len(v) == 2 for v in versions.values()), "a change recorded twice"
        for chat_id in srv.chat_ids():
            for m in srv.messages(chat_id):
                assert current[m["id"]] == m
