"""Time windows of one chat: the plan as tables (no sockets), then the wiring on the emulator.

The tables drive :class:`WindowPlanner` with counts computed from a list of timestamps, the
way a server's ``total_count`` of a ``period`` listing would answer: the evidence is that the
windows tile time exactly (every message in exactly one window) and hold about equal counts.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from helpers import assert_nothing_left, client_for, listings

import messages_async as ma
from messages_async._window_plan import MAX_ROUNDS, Window, WindowPlanner, advance, unseen
from messages_async.testing import Fault, MessagesServer
from messages_async.testing._dataset import format_instant

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _plan(
    stamps: Sequence[datetime],
    windows: int,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    counter: Any = None,
) -> tuple[list[Window], int]:
    """Run the planner against sorted ``stamps``; the windows and the probes it sent."""
    inside = sorted(
        s for s in stamps if (since is None or s >= since) and (until is None or s < until)
    )

    def before(at: datetime) -> int:
        return bisect.bisect_left(inside, at) - (
            0 if since is None else bisect.bisect_left(inside, since)
        )

    planner = WindowPlanner(
        total=len(inside),
        windows=windows,
        newest=inside[-1] if inside else None,
        since=since,
        until=until,
    )
    sent = 0
    while probes := planner.probes():
        sent += len(probes)
        for at in probes:
            planner.answer(at, (counter or before)(at))
    return planner.windows(), sent


def _members(window: Window, stamps: Sequence[datetime]) -> list[datetime]:
    return [
        s
        for s in stamps
        if (window.from_ is None or s >= window.from_) and (window.till is None or s < window.till)
    ]


def _assert_tiles(
    plan: list[Window], stamps: Sequence[datetime], since: datetime | None = None
) -> None:
    assert [w.index for w in plan] == list(range(len(plan)))
    for newer, older in itertools.pairwise(plan):  # newest first
        assert older.till == newer.from_  # no gap, no overlap
        assert older.till is not None
    assert plan[-1].from_ == since
    hits = [sum(1 for w in plan if w in _windows_of(s, plan)) for s in stamps]
    assert set(hits) <= {1}


def _windows_of(stamp: datetime, plan: list[Window]) -> list[Window]:
    return [w for w in plan if _members(w, [stamp])]


def _sizes(plan: list[Window], stamps: Sequence[datetime]) -> list[int]:
    return [len(_members(w, stamps)) for w in plan]


def _uniform(n: int, span: timedelta, seed: int = 1) -> list[datetime]:
    rng = random.Random(seed)
    return sorted(T0 + span * rng.random() for _ in range(n))


def _busy_now(n: int, seed: int = 2) -> list[datetime]:
    """Years of quiet, then most of the traffic in the last weeks."""
    rng = random.Random(seed)
    now = T0 + timedelta(days=5 * 365)
    return sorted(now - timedelta(seconds=rng.expovariate(1 / 86400 / 20)) for _ in range(n))


@pytest.mark.parametrize(
    ("stamps", "windows"),
    [
        (_uniform(10_000, timedelta(days=365)), 8),
        (_uniform(10_000, timedelta(days=365)), 3),
        (_uniform(2_000, timedelta(hours=1)), 16),
        (_busy_now(20_000), 8),
        (_uniform(100, timedelta(days=3000)), 4),
    ],
    ids=["year-8", "year-3", "one-hour-16", "busy-now-8", "sparse-4"],
)
def test_windows_tile_time_and_hold_about_equal_counts(
    stamps: list[datetime], windows: int
) -> None:
    plan, sent = _plan(stamps, windows)
    _assert_tiles(plan, stamps)
    assert plan[0].till is None  # the newest window is open-ended
    sizes = _sizes(plan, stamps)
    assert sum(sizes) == len(stamps)
    assert len(plan) == windows
    share = len(stamps) / windows
    assert max(sizes) <= 1.1 * share + 1
    assert min(sizes) >= 0.9 * share - 1
    assert [w.estimate for w in plan] == sizes
    assert sent < 40 * windows  # cheap next to the walk it splits


def test_many_messages_at_one_instant_stay_in_one_window() -> None:
    spread = _uniform(3_000, timedelta(days=30))
    instant = T0 + timedelta(days=10, microseconds=5)
    stamps = sorted([*spread, *([instant] * 5_000)])
    plan, _ = _plan(stamps, 8)
    _assert_tiles(plan, stamps)
    holders = _windows_of(instant, plan)
    assert len(holders) == 1
    (holder,) = holders
    assert len(_members(holder, stamps)) >= 5_000
    # Coinciding boundaries were merged: fewer windows than asked, none empty of time.
    assert len(plan) < 8
    assert sum(_sizes(plan, stamps)) == len(stamps)


def test_a_chat_all_at_one_instant_is_one_window() -> None:
    stamps = [T0] * 500
    plan, _ = _plan(stamps, 4)
    assert [(w.from_, w.till) for w in plan] == [(None, None)]
    assert sum(_sizes(plan, stamps)) == 500
    assert max(_sizes(plan, stamps)) == 500


@pytest.mark.parametrize(("total", "windows", "most"), [(0, 4, 1), (1, 4, 1), (3, 8, 3), (9, 1, 1)])
def test_never_more_windows_than_messages(total: int, windows: int, most: int) -> None:
    stamps = _uniform(total, timedelta(days=1))
    plan, _ = _plan(stamps, windows)
    assert 1 <= len(plan) <= most
    _assert_tiles(plan, stamps)
    assert sum(_sizes(plan, stamps)) == total


def test_a_selection_s_own_period_bounds_the_outer_windows() -> None:
    stamps = _uniform(5_000, timedelta(days=100))
    since, until = T0 + timedelta(days=20), T0 + timedelta(days=60)
    plan, _ = _plan(stamps, 4, since=since, until=until)
    assert plan[-1].from_ == since
    assert plan[0].till == until
    inside = [s for s in stamps if since <= s < until]
    _assert_tiles(plan, inside, since=since)
    assert sum(_sizes(plan, inside)) == len(inside)
    assert max(_sizes(plan, inside)) <= 1.1 * len(inside) / 4 + 1


def test_counts_that_make_no_sense_still_end_and_still_tile() -> None:
    rng = random.Random(7)
    stamps = _uniform(1_000, timedelta(days=10))
    plan, sent = _plan(stamps, 6, counter=lambda at: rng.randint(0, 1_000))
    _assert_tiles(plan, stamps)
    assert sum(_sizes(plan, stamps)) == len(stamps)
    assert sent <= 18 + MAX_ROUNDS * 6


def test_windows_before_the_plan_is_made_is_an_error() -> None:
    planner = WindowPlanner(total=100, windows=4, newest=T0)
    with pytest.raises(RuntimeError, match="answer every probe"):
        planner.windows()


def _msg(i: int) -> ma.Message:
    return ma.Message(id=i, uid=1, message="m", attachments=[])


def _page(ids: list[int], next_cursor: str | None) -> ma.MessagesPage:
    return ma.MessagesPage(items=[_msg(i) for i in ids], next_cursor=next_cursor)


@pytest.mark.parametrize(
    ("low", "ids", "cursor", "fresh", "after"),
    [
        (None, [9, 8, 7], "c1", [9, 8, 7], ("c1", 7)),
        (None, [9, 8, 7], None, [9, 8, 7], None),
        (8, [9, 8, 7], "c2", [7], ("c2", 7)),
        (5, [9, 8, 7], "c3", [], ("c3", 5)),  # a restart still above the window's low
        (5, [], "c4", [], ("c4", 5)),
        (None, [], None, [], None),
    ],
)
def test_a_window_checkpoint_after_each_page(
    low: int | None,
    ids: list[int],
    cursor: str | None,
    fresh: list[int],
    after: tuple[str, int] | None,
) -> None:
    window = Window(0, T0, None, cursor="c0", low=low)
    page = _page(ids, cursor)
    assert [m.id for m in unseen(window, page.items)] == fresh
    moved = advance(window, page)
    assert (None if moved is None else (moved.cursor, moved.low)) == after
    if moved is not None:
        assert (moved.from_, moved.till, moved.index) == (T0, None, 0)


# --- against the emulator ------------------------------------------------------------------


async def _walk_windowed(
    client: ma.Client, chat_id: int, windows: int | list[Window], **options: Any
) -> tuple[list[int], dict[int, list[int]]]:
    by_window: dict[int, list[int]] = {}
    async for item in client.messages.iter_windows(chat_id, windows=windows, **options):
        by_window.setdefault(item.window.index, []).extend(m.id for m in item.page.items)
    ordered = [i for w in sorted(by_window) for i in by_window[w]]
    return ordered, by_window


async def test_a_windowed_walk_yields_exactly_the_serial_walk_in_parallel() -> None:
    async with MessagesServer(chats=1, messages_per_chat=3_000, seed=4, latency=0.01) as server:
        (chat_id,) = server.chat_ids()
        serial = [m["id"] for m in server.messages(chat_id)]
        async with client_for(server) as client:
            plan = await client.messages.plan_windows(chat_id, windows=4)
            assert len(plan) == 4
            server.reset_stats()
            ordered, by_window = await _walk_windowed(client, chat_id, list(plan), limit=50)
            await assert_nothing_left(client)
        assert ordered == serial  # newest window first, each newest first: the serial order
        assert max(len(v) for v in by_window.values()) <= 1.1 * 3_000 / 4 + 1
        assert 2 <= server.max_in_flight <= 4


async def test_an_instant_shared_by_many_messages_is_never_split() -> None:
    async with MessagesServer(chats=1, messages_per_chat=1_200, seed=8) as server:
        (chat_id,) = server.chat_ids()
        store = server._store
        ids = store.ids(chat_id)
        stamps = cast(dict[int, float], store.stamps)
        shared = stamps[ids[300]]
        for i in ids[300:900]:  # half the chat at one instant
            stamps[i] = shared
            store.by_id[i]["created_at"] = format_instant(shared)
        serial = list(reversed(ids))
        async with client_for(server) as client:
            plan = await client.messages.plan_windows(chat_id, windows=6)
            ordered, by_window = await _walk_windowed(client, chat_id, list(plan), limit=100)
        assert ordered == serial
        holders = [w for w, got in by_window.items() if set(ids[300:900]) & set(got)]
        assert len(holders) == 1
        assert set(ids[300:900]) <= set(by_window[holders[0]])


async def test_messages_posted_after_the_plan_land_in_the_open_newest_window() -> None:
    async with MessagesServer(chats=1, messages_per_chat=1_000, seed=9, latency=0.005) as server:
        (chat_id,) = server.chat_ids()
        before = [m["id"] for m in server.messages(chat_id)]
        async with client_for(server) as client:
            plan = await client.messages.plan_windows(chat_id, windows=4)
            posted = [server.post_message(chat_id, "late")["id"] for _ in range(5)]
            ordered, by_window = await _walk_windowed(client, chat_id, list(plan), limit=20)
        assert ordered == sorted(posted, reverse=True) + before
        assert set(posted) <= set(by_window[0])


async def test_messages_posted_during_the_walk_never_disturb_it() -> None:
    async with MessagesServer(chats=1, messages_per_chat=1_000, seed=9, latency=0.005) as server:
        (chat_id,) = server.chat_ids()
        before = [m["id"] for m in server.messages(chat_id)]
        async with client_for(server) as client:
            by_window: dict[int, list[int]] = {}
            posted: list[int] = []
            async for item in client.messages.iter_windows(chat_id, windows=4, limit=20):
                if not posted:  # the plan is made and the walk under way: post now
                    posted = [server.post_message(chat_id, "late")["id"] for _ in range(5)]
                by_window.setdefault(item.window.index, []).extend(m.id for m in item.page.items)
        ordered = [i for w in sorted(by_window) for i in by_window[w]]
        # Window 0 began before the posts: they are newer than its first page, so only a
        # walk of window 0 that began after them would see them; the rest is exact.
        assert [i for i in ordered if i not in posted] == before
        assert set(ordered) - set(before) <= set(posted)
        assert all(i in by_window[0] for i in set(ordered) & set(posted))


async def test_a_window_whose_cursor_expires_starts_again_and_loses_nothing() -> None:
    async with MessagesServer(chats=1, messages_per_chat=800, seed=10) as server:
        (chat_id,) = server.chat_ids()
        serial = [m["id"] for m in server.messages(chat_id)]
        async with client_for(server) as client:
            plan = await client.messages.plan_windows(chat_id, windows=3)
            # The three windows' first pages go out first; the next listing follows a cursor.
            server.inject(Fault.invalid_cursor(), path="messages/", after=3, times=1)
            ordered, _ = await _walk_windowed(client, chat_id, list(plan), limit=25)
            await assert_nothing_left(client)
        assert ordered == serial
        assert sum(1 for r in listings(server) if r.status == 400) == 1


async def test_a_window_resumes_from_its_saved_checkpoint() -> None:
    async with MessagesServer(chats=1, messages_per_chat=600, seed=11) as server:
        (chat_id,) = server.chat_ids()
        serial = [m["id"] for m in server.messages(chat_id)]
        async with client_for(server) as client:
            plan = list(await client.messages.plan_windows(chat_id, windows=3))
            seen: dict[int, list[int]] = {}
            saved: dict[int, Window | None] = {w.index: w for w in plan}
            walk = client.messages.iter_windows(chat_id, windows=plan, limit=20, concurrency=3)
            async for item in walk:
                seen.setdefault(item.window.index, []).extend(m.id for m in item.page.items)
                saved[item.window.index] = item.next
                if sum(map(len, seen.values())) >= 200:
                    break  # the consumer stops: every window is where its checkpoint says
            await walk.aclose()
            left = [w for w in saved.values() if w is not None]
            # One saved cursor has expired meanwhile: that window starts again at its top.
            server.inject(Fault.invalid_cursor(), path="messages/", times=1)
            async for item in client.messages.iter_windows(chat_id, windows=left, limit=20):
                seen.setdefault(item.window.index, []).extend(m.id for m in item.page.items)
            await assert_nothing_left(client)
        assert [i for w in sorted(seen) for i in seen[w]] == serial


async def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    async with MessagesServer(chats=1, messages_per_chat=10) as server:
        (chat_id,) = server.chat_ids()
        async with client_for(server) as client:
            server.reset_stats()
            with pytest.raises(ValueError, match="windows must be at least 1"):
                await client.messages.plan_windows(chat_id, windows=0)
            with pytest.raises(TypeError, match="windows must be"):
                client.messages.iter_windows(chat_id, windows=cast(Any, "4"))
            with pytest.raises(TypeError, match="windows must be an int"):
                client.messages.iter_windows(chat_id, windows=cast(Any, True))
            with pytest.raises(ValueError, match="concurrency"):
                client.messages.iter_windows(chat_id, windows=2, concurrency=0)
            assert listings(server) == []


async def test_a_window_rejected_on_every_request_fails_instead_of_looping() -> None:
    async with MessagesServer(chats=1, messages_per_chat=300, seed=12) as server:
        (chat_id,) = server.chat_ids()
        async with client_for(server) as client:
            plan = await client.messages.plan_windows(chat_id, windows=2)
            server.inject(Fault.invalid_cursor(), path="messages/", after=2, times=None)
            with pytest.raises(ma.InvalidCursorError):
                async for _ in client.messages.iter_windows(chat_id, windows=plan, limit=20):
                    pass
            await assert_nothing_left(client)


async def test_an_empty_first_page_with_a_cursor_does_not_stop_the_plan() -> None:
    async with MessagesServer(chats=1, messages_per_chat=2_000, seed=4) as server:
        (chat_id,) = server.chat_ids()
        serial = [m["id"] for m in server.messages(chat_id)]
        server.inject(Fault.empty_page(), path="messages/", times=1)
        async with client_for(server) as client:
            plan = await client.messages.plan_windows(chat_id, windows=4)
            assert len(plan) == 4
            ordered, _ = await _walk_windowed(client, chat_id, list(plan), limit=100)
        assert ordered == serial
