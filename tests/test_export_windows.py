"""The export walks big chats in time windows: the rules as tables, then exact exports.

Every live test runs the real client against the emulator over loopback, in the three
formats; the evidence is the stored rows (exactly the server's, in the JSONL file's order too)
and the requests the emulator saw (windows walked at once, each resumed from its own cursor).
Interruptions are real: a stop event, a SIGINT and a SIGKILL of the command's process.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from test_export import (
    _meta,
    assert_exact,
    kill_mid_run,
    listings,
    read,
    start_cli,
)
from test_parquet import assert_parquet_is_server, every_part_is_whole, export_into, parquet_rows

from messages_async import _cli
from messages_async.export import (
    ExportOptions,
    ExportStats,
    JsonlStore,
    ParquetStore,
    SqliteStore,
    Store,
)
from messages_async.export._runner import (
    DEFAULT_WINDOW_THRESHOLD,
    JobFeed,
    _WindowedChat,
    _WindowJob,
    window_count,
)
from messages_async.export._state import ChatState, WindowState
from messages_async.testing import Fault, MessagesServer

FORMATS = ("sqlite", "jsonl", "parquet")
THRESHOLD = 300
#: Chat sizes of this seed: 178, 933, 267, 1096, 346 (three above the threshold).
SEED = 32


# --- the rules, no I/O -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "threshold", "concurrency", "windows"),
    [
        (None, 10_000, 8, 1),  # no total_count: one walk
        (10_000, 10_000, 8, 1),  # at the threshold: one walk
        (10_001, 10_000, 8, 2),
        (35_000, 10_000, 8, 4),
        (200_000, 10_000, 8, 8),  # at most the concurrency
        (200_000, 10_000, 1, 1),
        (200_000, 0, 8, 1),  # 0: never
        (0, 10_000, 8, 1),
    ],
)
def test_how_many_windows(
    total: int | None, threshold: int, concurrency: int, windows: int
) -> None:
    assert window_count(total, threshold=threshold, concurrency=concurrency) == windows


def _window_job(chat_id: int, index: int) -> _WindowJob:
    from messages_async.export._runner import _ChatJob

    return _WindowJob(_WindowedChat(_ChatJob(ChatState(chat_id)), left=1), index)


def test_windows_go_ahead_of_waiting_chats_and_the_feed_ends_after_the_last_chat() -> None:
    feed = JobFeed([1, 2, 3])
    assert feed.next() == 1
    assert feed.next() == 2
    windows = [_window_job(1, i) for i in range(3)]
    feed.add(windows)
    feed.chat_ended()  # chat 1 handed its windows over
    assert [feed.next() for _ in range(3)] == windows
    assert feed.next() == 3
    assert feed.next() is JobFeed.WAIT  # chats 2 and 3 may still hand windows back
    feed.chat_ended()
    assert feed.next() is JobFeed.WAIT
    late = _window_job(3, 0)
    feed.add([late])
    assert feed.next() is late
    feed.chat_ended()
    assert feed.next() is None


def test_a_window_checkpoint_round_trips_and_bad_ones_are_refused() -> None:
    from datetime import UTC, datetime

    window = WindowState(2, datetime(2024, 1, 1, tzinfo=UTC), None, cursor="c", top=9, low=3)
    state = ChatState(7, windows=[window])
    assert ChatState.from_json(state.to_json()) == state
    assert "windows" not in ChatState(7).to_json()  # a chat in one walk keeps its layout
    with pytest.raises(ValueError, match="offset"):
        WindowState.from_json({"index": 0, "from_": "2024-01-01T00:00:00"})
    with pytest.raises(ValueError, match="index"):
        WindowState.from_json({"from_": None})
    with pytest.raises(ValueError, match="window_threshold must be at least 0"):
        ExportOptions(window_threshold=-1)
    with pytest.raises(TypeError, match="window_threshold"):
        ExportOptions(window_threshold=1.5)  # type: ignore[arg-type]


# --- against the emulator ----------------------------------------------------------------------


def _out(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("out.sqlite" if fmt == "sqlite" else "out")


def _store(fmt: str, out: Path) -> Store:
    if fmt == "sqlite":
        return SqliteStore(str(out))
    if fmt == "jsonl":
        return JsonlStore(str(out))
    return ParquetStore(str(out), part_rows=120)  # several parts per window


Tap = Callable[[Store, asyncio.Event], None]


async def export(
    server: MessagesServer, fmt: str, out: Path, *, tap: Tap | None = None, **options: Any
) -> ExportStats:
    settings: dict[str, Any] = {
        "concurrency": 4,
        "page_size": 50,
        "window_threshold": THRESHOLD,
        **options,
    }
    return await export_into(server, _store(fmt, out), tap=tap, **settings)


def assert_complete(server: MessagesServer, fmt: str, out: Path) -> None:
    """Exactly the server's rows, and every windowed chat stored as if walked in one go."""
    if fmt == "parquet":
        assert_parquet_is_server(server, out)
        assert every_part_is_whole(out / "messages") == server.all_message_count()
        assert not [p for p in out.rglob("*") if p.name.startswith(".")], "window files left"
        for folder in (out / "messages").iterdir():
            names = sorted(p.name for p in folder.iterdir())
            assert names == [f"part-{n:05d}.parquet" for n in range(len(names))]
    else:
        assert_exact(server, fmt, out)  # JSONL: newest first, and .pending is empty
    if fmt == "sqlite":
        db = sqlite3.connect(out)
        try:
            assert db.execute("SELECT count(*) FROM export_windows").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM export_state WHERE done = 0").fetchone() == (0,)
        finally:
            db.close()


def stored(fmt: str, out: Path) -> Any:
    """What an export holds, comparable between two exports of the same data."""
    if fmt == "parquet":
        return sorted(parquet_rows(out))
    return read(fmt, out)


def window_starts(server: MessagesServer) -> list[Any]:
    """The first page of each window walk: a period, the page size, no cursor."""
    return [
        r
        for r in listings(server)
        if "cursor" not in r.query
        and r.query.get("limit") != "1"
        and ("period[from]" in r.query or "period[till]" in r.query)
    ]


def after_window_commits(n: int, then: Callable[[asyncio.Event], None]) -> Tap:
    """Run ``then(stop)`` once ``n`` window pages have been committed."""
    return after_window_commits_of(n, lambda stop, _chat_id: then(stop))


def after_window_commits_of(n: int, then: Callable[[asyncio.Event, int], None]) -> Tap:
    """Run ``then(stop, chat_id)`` once ``n`` window pages have been committed, with the chat
    of the ``n``-th."""

    def tap(store: Store, stop: asyncio.Event) -> None:
        original = store.commit_window
        seen = 0

        async def commit_window(state: ChatState, window: WindowState, messages: Any) -> Any:
            nonlocal seen
            stored = await original(state, window, messages)
            seen += 1
            if seen == n:
                then(stop, state.chat_id)
            return stored

        store.commit_window = commit_window  # type: ignore[method-assign]

    return tap


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(
        chats=5, messages_per_chat=(20, 1200), seed=SEED, extra_fields=True, latency=0.002
    ) as srv:
        yield srv


@pytest.mark.parametrize("fmt", FORMATS)
async def test_big_chats_are_walked_in_windows_at_once_and_stored_exactly(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    stats = await export(server, fmt, out)
    assert stats.failures == []
    assert stats.chats_done == 5
    assert stats.messages == server.all_message_count() == stats.stored_messages
    # 933 and 1096 messages: 4 windows each (at most the concurrency); 346: 2 windows.
    assert stats.windows == 10
    assert len(window_starts(server)) == 10
    assert server.max_in_flight >= 3
    assert_complete(server, fmt, out)
    # And exactly what one walk per chat stores, row for row (JSONL: line for line).
    serial = tmp_path / "serial"
    serial.mkdir()
    one_walk = await export(server, fmt, _out(serial, fmt), window_threshold=0)
    assert one_walk.windows == 0
    assert stored(fmt, out) == stored(fmt, _out(serial, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
async def test_messages_posted_during_the_walk_are_in_the_export_once(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    big = server.chat_ids()[3]
    posted: list[int] = []

    def post(_stop: asyncio.Event) -> None:
        posted.extend(server.post_message(big, f"during {i}")["id"] for i in range(70))

    out = _out(tmp_path, fmt)
    stats = await export(server, fmt, out, tap=after_window_commits(5, post))
    assert len(posted) == 70
    assert stats.messages == server.all_message_count()
    assert_complete(server, fmt, out)  # the chat's update after the join fetched them


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_stopped_windowed_export_resumes_every_window_from_its_own_cursor(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    # Pages of 20: each window takes a dozen pages, so a stop lands amid several of them.
    first = await export(
        server, fmt, out, page_size=20, tap=after_window_commits(14, lambda stop: stop.set())
    )
    assert first.interrupted
    store = _store(fmt, out)
    saved: list[WindowState] = []
    planned: set[int] = set()  # chats whose windows were saved
    under_way: set[int] = set()  # and at least one of them begun, not done
    try:
        await store.open(_meta(server, ExportOptions()), fresh=False)
        for chat_id in server.chat_ids():
            windows = (await store.load(chat_id)).windows
            if windows:
                planned.add(chat_id)
            if any(w.cursor is not None and not w.done for w in windows):
                under_way.add(chat_id)
            saved += windows
    finally:
        await store.close()
    # The emulator's cursors are URLs; their own cursor parameter is what a listing shows.
    begun = {
        parse_qs(urlsplit(w.cursor).query)["cursor"][0]
        for w in saved
        if w.cursor is not None and not w.done
    }
    assert len(begun) >= 2, "the stop should land while several windows are under way"
    server.reset_stats()
    # The windows' saved cursors may have expired meanwhile: the second listing of a chat
    # with windows under way is rejected, and its window starts again at its own newest page.
    # (Only such a chat: one not planned yet may have a second page in flight that windowing
    # then discards.)
    server.inject(
        Fault.invalid_cursor(), path="messages/", after=1, times=1, chat_id=min(under_way)
    )
    second = await export(server, fmt, out, page_size=20)
    assert second.failures == []
    assert second.cursor_restarts == 1
    followed = {r.query.get("cursor") for r in listings(server)}
    assert len(begun & followed) >= len(begun) - 1  # all but the expired one went on
    # Nothing planned twice: the windows were resumed, not planned again. (A chat whose
    # planning the stop came before is planned now.)
    replanned = {int(r.query["chat_id"]) for r in listings(server) if r.query.get("limit") == "1"}
    assert not replanned & planned
    assert_complete(server, fmt, out)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_window_whose_cursor_expires_mid_walk_loses_nothing(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)

    def expire(_stop: asyncio.Event, chat_id: int) -> None:
        # Only this chat's listings: it has been planned, and each of them is consumed (a
        # chat not planned yet may have a second page in flight that windowing discards).
        server.inject(Fault.invalid_cursor(), path="messages/", times=2, chat_id=chat_id)

    stats = await export(server, fmt, out, tap=after_window_commits_of(6, expire))
    assert stats.failures == []
    assert stats.cursor_restarts == 2
    assert sum(1 for r in listings(server) if r.status == 400) == 2
    assert_complete(server, fmt, out)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_windowed_chat_is_then_updated_with_only_what_is_newer(
    server: MessagesServer, fmt: str, tmp_path: Path
) -> None:
    out = _out(tmp_path, fmt)
    await export(server, fmt, out)
    big = server.chat_ids()[3]
    for i in range(120):
        server.post_message(big, f"new {i}")
    server.reset_stats()
    stats = await export(server, fmt, out)
    assert stats.messages == 120
    assert stats.windows == 0
    per_chat: dict[int, int] = {}
    for record in listings(server):
        assert "period[from]" not in record.query
        assert "period[till]" not in record.query
        chat = int(record.query["chat_id"])
        per_chat[chat] = per_chat.get(chat, 0) + 1
    # One request per chat; the chat with 120 new messages: three pages of 50.
    assert per_chat == {**dict.fromkeys(server.chat_ids(), 1), big: 3}
    assert_complete(server, fmt, out)


async def test_threshold_zero_walks_every_chat_in_one_go(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = _out(tmp_path, "sqlite")
    stats = await export(server, "sqlite", out, window_threshold=0)
    assert stats.windows == 0
    assert window_starts(server) == []
    assert_complete(server, "sqlite", out)


async def test_a_store_without_windows_walks_every_chat_in_one_go(
    server: MessagesServer, tmp_path: Path
) -> None:
    class Plain(SqliteStore):
        supports_windows = False  # a backend written before windows existed

    out = _out(tmp_path, "sqlite")
    stats = await export_into(
        server, Plain(str(out)), concurrency=4, page_size=50, window_threshold=THRESHOLD
    )
    assert stats.windows == 0
    assert window_starts(server) == []
    assert_complete(server, "sqlite", out)


async def test_a_window_that_fails_for_good_fails_its_chat_once_and_the_rest_goes_on(
    server: MessagesServer, tmp_path: Path
) -> None:
    big = server.chat_ids()[1]

    def forbid(_stop: asyncio.Event) -> None:
        server.inject(Fault.status(403), path="messages/", times=None, chat_id=big)
        server.inject(Fault.status(403), path="messages/", times=3)

    out = _out(tmp_path, "sqlite")
    stats = await export(server, "sqlite", out, tap=after_window_commits(3, forbid))
    assert big in {f.chat_id for f in stats.failures}
    assert len({f.chat_id for f in stats.failures}) == len(stats.failures)  # each failed once
    assert stats.chats_done + stats.chats_failed == 5  # the others were exported
    server.clear_faults()
    again = await export(server, "sqlite", out)
    assert again.failures == []
    assert_complete(server, "sqlite", out)


# --- a join interrupted half way -------------------------------------------------------------


async def test_a_jsonl_join_killed_after_its_rename_is_finished_by_the_next_run(
    server: MessagesServer, tmp_path: Path
) -> None:
    def tap(store: Store, _stop: asyncio.Event) -> None:
        assert isinstance(store, JsonlStore)
        original = store._joined

        def joined(state: ChatState) -> ChatState:
            if not getattr(store, "crashed", False):
                store.crashed = True  # type: ignore[attr-defined]
                raise OSError("killed between the rename and the checkpoint")
            return original(state)

        store._joined = joined  # type: ignore[method-assign]

    out = _out(tmp_path, "jsonl")
    with pytest.raises(OSError, match="killed between"):
        await export(server, "jsonl", out, tap=tap)
    stats = await export(server, "jsonl", out)
    assert stats.failures == []
    assert_complete(server, "jsonl", out)


async def test_a_parquet_join_killed_among_its_renames_is_finished_by_the_next_run(
    server: MessagesServer, tmp_path: Path
) -> None:
    def tap(store: Store, _stop: asyncio.Event) -> None:
        assert isinstance(store, ParquetStore)
        original = store._renames

        def renames(state: ChatState) -> list[tuple[str, str]]:
            pairs = original(state)
            if not getattr(store, "crashed", False) and len(pairs) >= 2:
                store.crashed = True  # type: ignore[attr-defined]
                for src, dst in pairs[: len(pairs) // 2]:
                    Path(src).replace(dst)
                raise OSError("killed among the renames")
            return pairs

        store._renames = renames  # type: ignore[method-assign]

    out = _out(tmp_path, "parquet")
    with pytest.raises(OSError, match="killed among"):
        await export(server, "parquet", out, tap=tap)
    stats = await export(server, "parquet", out)
    assert stats.failures == []
    assert_complete(server, "parquet", out)


# --- real processes: SIGINT and SIGKILL --------------------------------------------------------


def _args(fmt: str, out: Path) -> list[str]:
    return [
        "--out",
        str(out),
        "--format",
        fmt,
        "--concurrency",
        "4",
        "--window-threshold",
        str(THRESHOLD),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_sigint_and_sigkill_mid_windows_then_rerun_gives_exactly_the_full_set(
    fmt: str, tmp_path: Path
) -> None:
    rng = random.Random(f"windows-{fmt}")
    out = _out(tmp_path, fmt)
    args = _args(fmt, out)
    async with MessagesServer(
        chats=5, messages_per_chat=(20, 1200), seed=SEED, extra_fields=True, latency=0.02
    ) as srv:
        # Ctrl-C once several windows are under way: a clean stop.
        proc = await start_cli(srv, *args)
        while proc.returncode is None and len(window_starts(srv)) < 4:
            await asyncio.sleep(0.002)
        assert proc.returncode is None, "the export should still run"
        proc.send_signal(signal.SIGINT)
        await proc.communicate()
        assert proc.returncode == 130
        kills = 0
        for _ in range(3):
            kills += await kill_mid_run(srv, rng, args, max_listings=10)
        assert kills >= 2, "the kills should land while the export runs"
        proc = await start_cli(srv, *args)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert b"Export done" in stdout
        assert_complete(srv, fmt, out)


@pytest.mark.parametrize("value", ["-1", "many", "1e4", ""])
def test_a_bad_window_threshold_is_usage_error_2(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli.main(["export", "--window-threshold", value])
    assert exc.value.code == 2
    assert "--window-threshold" in capsys.readouterr().err


def test_the_window_threshold_flag_defaults_to_10000_and_takes_0() -> None:
    parser = _cli._parser()
    assert parser.parse_args(["export"]).window_threshold == DEFAULT_WINDOW_THRESHOLD == 10_000
    assert parser.parse_args(["export", "--window-threshold", "0"]).window_threshold == 0
