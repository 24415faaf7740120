"""``messages.watch()`` against the emulator: exactly once and in order, bursts, faults, new
chats, resuming, stopping, and what polling costs.

Every fault is injected for real by the emulator, and every "exactly once" check ends with a
sentinel message posted after everything else: whatever the watch yields before the sentinel
is compared as a whole, so a duplicate or a gap cannot hide behind a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import make_client

import messages_async as ma
from messages_async._schedule import MAX_MISBEHAVING_ROUNDS
from messages_async._watch import Watch
from messages_async.testing import Fault, MessagesServer

OTHER = 7  # a user id that is not the client's


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=4, messages_per_chat=12, seed=5) as srv:
        yield srv


@pytest.fixture
async def client(server: MessagesServer) -> AsyncIterator[ma.Client]:
    async with make_client(server) as c:
        yield c


def watch_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith("messages_async watch") and not t.done()
    ]


async def no_watch_tasks_left() -> None:
    for _ in range(20):
        if not watch_tasks():
            return
        await asyncio.sleep(0)
    assert not watch_tasks(), watch_tasks()


async def until_sentinels(watch: Watch, sentinels: dict[int, int]) -> dict[int, list[ma.Message]]:
    """Everything yielded, per chat, until every chat's sentinel id has been yielded."""
    seen: dict[int, list[ma.Message]] = defaultdict(list)
    waiting = dict(sentinels)
    async with asyncio.timeout(15):
        while waiting:
            chat_id, message = await anext(watch)
            seen[chat_id].append(message)
            if waiting.get(chat_id) == message.id:
                del waiting[chat_id]
    return seen


async def drain(watch: Watch) -> list[tuple[int, ma.Message]]:
    async with asyncio.timeout(10):
        return [item async for item in watch]


def post_sentinels(server: MessagesServer, chat_ids: list[int]) -> dict[int, int]:
    return {c: server.post_message(c, "sentinel", uid=OTHER)["id"] for c in chat_ids}


# --- exactly once, in order ----------------------------------------------------------------------


async def test_bursts_across_chats_with_faults_are_yielded_once_in_order(
    server: MessagesServer,
) -> None:
    chats = server.chat_ids()[:3]
    # No retries inside the client: every injected fault reaches the watch itself.
    async with (
        make_client(server, max_retries=0) as client,
        client.messages.watch(chats, interval=0.02, limit=10) as watch,
    ):
        await watch.ready()
        start = watch.watermarks
        assert start == {c: server.messages(c)[0]["id"] for c in chats}

        expected: dict[int, list[int]] = defaultdict(list)
        # A burst of 35 in one chat: 4 pages of 10, so the poll must follow next_cursor back.
        for i in range(35):
            expected[chats[0]].append(server.post_message(chats[0], f"burst {i}", uid=OTHER)["id"])
        # The first page of the burst comes back, the cursor walk then fails halfway. No
        # other fault is live until it has struck, so it is a cursor request that fails.
        mid_walk = server.inject(Fault.status(503), path="messages/", chat_id=chats[0], after=1)
        async with asyncio.timeout(5):
            while mid_walk.hits == 0:
                await asyncio.sleep(0.01)
        (failed,) = [r for r in server.resource_requests() if r.status == 503]
        assert "cursor" in failed.query
        for round_ in range(3):
            for chat_id in chats:
                msg = server.post_message(chat_id, f"round {round_}", uid=OTHER)
                expected[chat_id].append(msg["id"])
        faults = [
            server.inject(Fault.status(500), path="messages/", times=2),
            server.inject(Fault.rate_limited(None), path="messages/", times=2),
            server.inject(Fault.drop(), path="messages/", times=1),
        ]
        sentinels = post_sentinels(server, chats)
        for chat_id, sentinel in sentinels.items():
            expected[chat_id].append(sentinel)

        seen = await until_sentinels(watch, sentinels)

    assert {c: [m.id for m in ms] for c, ms in seen.items()} == expected
    assert mid_walk.hits == 1
    assert all(f.hits == f.times for f in faults)
    statuses = {r.status for r in server.resource_requests()}
    assert {500, 503, 429, None} <= statuses  # None: the dropped connection
    await no_watch_tasks_left()


async def test_own_messages_are_yielded_and_can_be_filtered_by_user_id(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]
    assert client.user_id == server.user_id
    async with client.messages.watch([chat_id], interval=0.02) as watch:
        await watch.ready()
        mine = await client.messages.add(chat_id, "from the bot")
        theirs = server.post_message(chat_id, "from someone else", uid=OTHER)
        sentinel = post_sentinels(server, [chat_id])
        seen = (await until_sentinels(watch, sentinel))[chat_id]
    assert [m.id for m in seen] == [mine.id, theirs["id"], sentinel[chat_id]]
    assert [m.message for m in seen if m.uid != client.user_id] == [
        "from someone else",
        "sentinel",
    ]


async def test_replies_with_whisper_and_attachments(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[1]
    async with client.messages.watch([chat_id], interval=0.02) as watch:
        await watch.ready()
        server.post_message(
            chat_id, "see file", uid=OTHER, attachments=[{"type": "file", "url": "https://f/x"}]
        )
        async for got_chat, msg in watch:
            assert msg.uid == OTHER
            reply = await client.messages.add(
                got_chat,
                f"got {len(msg.attachments)} attachment(s)",
                attachments=[ma.NewAttachment(a.type, a.url, a.name) for a in msg.attachments],
                is_whisper=True,
            )
            break
    assert reply.attachments[0].url == "https://f/x"
    assert server.messages(chat_id)[0]["id"] == reply.id
    add = [r for r in server.resource_requests() if r.path == "messages/add/"]
    assert b'"is_whisper":true' in add[-1].body


async def test_long_backlog_from_since_is_read_forward_in_order(server: MessagesServer) -> None:
    chat_id = server.chat_ids()[0]
    for i in range(60):
        server.post_message(chat_id, f"backlog {i}", uid=OTHER)
    ids = [m["id"] for m in reversed(server.messages(chat_id))]
    # limit 5: 71 new messages are 15 pages, more than a burst is ever held in memory.
    async with (
        make_client(server) as client,
        client.messages.watch([chat_id], since={chat_id: ids[0]}, interval=0.02, limit=5) as w,
    ):
        sentinel = post_sentinels(server, [chat_id])
        seen = (await until_sentinels(w, sentinel))[chat_id]
    assert [m.id for m in seen] == [*ids[1:], sentinel[chat_id]]
    # It went back with next_cursor and forward again with prev_cursor: a single walk over
    # 15 pages follows 14 cursors; both together follow about twice as many.
    cursors = [r.query.get("cursor", "") for r in server.resource_requests()]
    assert sum(1 for c in cursors if c) >= 2 * 13


async def test_message_posted_while_a_chats_first_poll_backs_off_is_yielded(
    server: MessagesServer,
) -> None:
    a, x = server.chat_ids()[:2]
    # Chat a holds the largest id on the server when the watch starts: the start mark.
    server.post_message(a, "before the watch", uid=OTHER)
    # x's first three polls fail; the fourth is its first success.
    outage = server.inject(Fault.status(503), path="messages/", chat_id=x, times=3)
    async with (
        make_client(server, max_retries=0) as client,
        client.messages.watch([a, x], interval=0.02) as watch,
    ):
        async with asyncio.timeout(10):
            while outage.hits < 1:
                await asyncio.sleep(0.002)
        # After the watch started and before x was ever read successfully.
        meanwhile = server.post_message(x, "while x backs off", uid=OTHER)
        await watch.ready()
        sentinels = post_sentinels(server, [a, x])
        seen = await until_sentinels(watch, sentinels)
    assert outage.hits == 3
    assert [m.id for m in seen[x]] == [meanwhile["id"], sentinels[x]]
    assert [m.id for m in seen[a]] == [sentinels[a]]


# --- chats appearing and disappearing --------------------------------------------------------


async def test_watching_all_picks_up_a_chat_created_mid_watch(server: MessagesServer) -> None:
    # The first chat listing fails twice: the watch starts anyway.
    listing = server.inject(Fault.status(503), path="messages/chats/", times=2)
    async with (
        make_client(server, max_retries=0) as client,
        client.messages.watch(interval=0.02, rediscover=0.05) as watch,
    ):
        await watch.ready()
        assert listing.hits == 2
        assert set(watch.chat_ids) == set(server.chat_ids())
        new_chat = server.add_chat(name="fresh")
        # Posted before the watch has even seen the chat: still after the watch started.
        early = server.post_message(new_chat, "hello new chat", uid=OTHER)
        old_chat = server.chat_ids()[0]
        other = server.post_message(old_chat, "meanwhile", uid=OTHER)
        sentinels = post_sentinels(server, [new_chat, old_chat])
        seen = await until_sentinels(watch, sentinels)
        assert new_chat in watch.chat_ids
        assert watch.watermarks[new_chat] == sentinels[new_chat]
    assert [m.id for m in seen[new_chat]] == [early["id"], sentinels[new_chat]]
    assert [m.id for m in seen[old_chat]] == [other["id"], sentinels[old_chat]]


async def test_unknown_chat_is_dropped_with_a_log_line_and_the_rest_go_on(
    server: MessagesServer, client: ma.Client, caplog: pytest.LogCaptureFixture
) -> None:
    chat_id = server.chat_ids()[0]
    caplog.set_level(logging.WARNING, logger="messages_async.watch")
    async with client.messages.watch([chat_id, 999_999], interval=0.02) as watch:
        await watch.ready()
        assert watch.chat_ids == [chat_id]
        sentinel = post_sentinels(server, [chat_id])
        seen = await until_sentinels(watch, sentinel)
    assert [m.id for m in seen[chat_id]] == [sentinel[chat_id]]
    assert any("999999" in r.getMessage() for r in caplog.records)


async def test_watch_ends_when_no_listed_chat_exists(
    server: MessagesServer, client: ma.Client
) -> None:
    assert await drain(client.messages.watch([999_998, 999_999], interval=0.02)) == []
    await no_watch_tasks_left()


async def test_fatal_error_is_raised_and_stops_everything(server: MessagesServer) -> None:
    async with make_client(server, scopes=["messages_write"]) as client:
        watch = client.messages.watch(interval=0.02)
        with pytest.raises(ma.ScopeError):
            await drain(watch)
        await no_watch_tasks_left()
    assert server.resource_requests() == []  # refused before sending


async def test_chat_dropped_after_a_404_and_listed_again_is_not_repeated(
    server: MessagesServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="messages_async.watch")
    x = server.chat_ids()[0]
    async with (
        make_client(server, max_retries=0) as client,
        client.messages.watch(interval=0.02, rediscover=0.05) as watch,
    ):
        await watch.ready()
        before = server.post_message(x, "before the 404", uid=OTHER)
        assert (await until_sentinels(watch, {x: before["id"]}))[x][-1].id == before["id"]
        gone = server.inject(Fault.status(404), path="messages/", chat_id=x)
        async with asyncio.timeout(10):
            while gone.hits < 1:
                await asyncio.sleep(0.002)
        # Posted while x is not watched: yielded once it is listed again.
        while_gone = server.post_message(x, "while dropped", uid=OTHER)
        sentinels = post_sentinels(server, [x])
        seen = await until_sentinels(watch, sentinels)
        assert x in watch.chat_ids
        assert watch.watermarks[x] == sentinels[x]
    assert [m.id for m in seen[x]] == [while_gone["id"], sentinels[x]]
    assert any(f"stopped watching chat {x}" in r.getMessage() for r in caplog.records)
    assert any(f"new chat {x}" in r.getMessage() for r in caplog.records)


async def test_chat_present_at_start_listed_again_after_a_404_does_not_replay_history() -> None:
    # One chat, with history; its first poll gets a 404, so the watch saw no id at the start.
    async with MessagesServer(chats=1, messages_per_chat=12, seed=3) as server:
        (x,) = server.chat_ids()
        gone = server.inject(Fault.status(404), path="messages/", chat_id=x)
        async with (
            make_client(server, max_retries=0) as client,
            client.messages.watch(interval=0.02, rediscover=0.05) as watch,
        ):
            await watch.ready()
            assert gone.hits == 1
            assert watch.chat_ids == []
            # Wait until x is listed again and read once more: that is where it starts.
            async with asyncio.timeout(10):
                while not [
                    r
                    for r in server.resource_requests()
                    if r.path == "messages/" and r.status == 200
                ]:
                    await asyncio.sleep(0.002)
            sentinels = post_sentinels(server, [x])
            seen = await until_sentinels(watch, sentinels)
    assert [m.id for m in seen[x]] == [sentinels[x]]


async def test_without_any_message_at_the_start_a_new_chat_is_yielded_from_its_first() -> None:
    # No message anywhere when the watch starts: every message of a chat created later was
    # added after the start, so all of it is yielded (PROTOCOL §7 with a start mark of 0).
    async with MessagesServer(chats=2, messages_per_chat=0, seed=4) as server:
        empty = server.chat_ids()[0]
        async with (
            make_client(server) as client,
            client.messages.watch(interval=0.02, rediscover=0.05) as watch,
        ):
            await watch.ready()
            assert watch.watermarks == dict.fromkeys(server.chat_ids(), 0)
            new_chat = server.add_chat(name="later")
            first = server.post_message(new_chat, "first ever", uid=OTHER)
            in_empty = server.post_message(empty, "hello", uid=OTHER)
            sentinels = post_sentinels(server, [new_chat, empty])
            seen = await until_sentinels(watch, sentinels)
    assert [m.id for m in seen[new_chat]] == [first["id"], sentinels[new_chat]]
    assert [m.id for m in seen[empty]] == [in_empty["id"], sentinels[empty]]


# --- resuming ----------------------------------------------------------------------------------


async def test_since_resumes_after_the_last_message_handed_over(
    server: MessagesServer, client: ma.Client
) -> None:
    chats = server.chat_ids()[:2]
    a, b = chats
    async with client.messages.watch(chats, interval=0.02) as watch:
        await watch.ready()
        first = [server.post_message(a, f"a{i}", uid=OTHER)["id"] for i in range(5)]
        got = [await anext(watch) for _ in range(2)]
        assert [m.id for _, m in got] == first[:2]
        saved = watch.watermarks
    # Handed over: two. Fetched but not handed over: three, which the resumed watch must yield.
    assert saved[a] == first[1]
    # Posted while the bot is down.
    down = [server.post_message(b, f"b{i}", uid=OTHER)["id"] for i in range(3)]
    async with client.messages.watch(chats, since=saved, interval=0.02) as watch:
        sentinels = post_sentinels(server, chats)
        seen = await until_sentinels(watch, sentinels)
    assert [m.id for m in seen[a]] == [*first[2:], sentinels[a]]
    assert [m.id for m in seen[b]] == [*down, sentinels[b]]


async def test_a_resumed_watch_is_ready_before_anyone_reads() -> None:
    # More chats with news than workers: their polls wait for a consumer, and readiness
    # must not wait for them (it used to hang here).
    async with MessagesServer(chats=20, messages_per_chat=3, seed=5) as srv:
        chats = srv.chat_ids()
        saved = {c: srv.messages(c)[0]["id"] for c in chats}
        for c in chats:
            srv.post_message(c, "while the bot was down", uid=OTHER)
        async with (
            make_client(srv) as c,
            c.messages.watch(since=saved, interval=0.02, concurrency=2) as watch,
        ):
            async with asyncio.timeout(5):
                await watch.ready()


async def test_a_chat_created_while_the_bot_was_down_loses_nothing(
    server: MessagesServer, client: ma.Client
) -> None:
    async with client.messages.watch(interval=0.02) as watch:
        await watch.ready()
        server.post_message(server.chat_ids()[0], "before the restart", uid=OTHER)
        await anext(watch)
        saved = watch.watermarks
    new_chat = server.add_chat(type="group", name="made while down")
    missed = server.post_message(new_chat, "hello bot, are you there?", uid=OTHER)["id"]
    async with client.messages.watch(since=saved, interval=0.02) as watch:
        sentinels = post_sentinels(server, [new_chat])
        seen = await until_sentinels(watch, sentinels)
    assert [m.id for m in seen[new_chat]] == [missed, sentinels[new_chat]]


async def test_with_chat_ids_a_chat_missing_from_since_starts_from_now(
    server: MessagesServer, client: ma.Client
) -> None:
    a, b = server.chat_ids()[:2]
    since = {a: server.messages(a)[-1]["id"]}  # a's oldest message: the rest of a is new
    async with client.messages.watch([a, b], since=since, interval=0.02) as watch:
        await watch.ready()
        sentinels = post_sentinels(server, [a, b])
        seen = await until_sentinels(watch, sentinels)
    assert [m.id for m in seen[b]] == [sentinels[b]]  # nothing of b's history
    assert len(seen[a]) == len(server.messages(a)) - 1


async def test_with_chat_ids_a_failed_first_poll_does_not_start_at_an_old_mark(
    server: MessagesServer,
) -> None:
    a, b = server.chat_ids()[:2]
    since = {a: server.messages(a)[-1]["id"]}
    server.inject(Fault.status(503), path="messages/", chat_id=b)  # b's first poll fails
    async with (
        make_client(server, max_retries=0) as client,
        client.messages.watch([a, b], since=since, interval=0.02) as watch,
    ):
        await watch.ready()
        sentinels = post_sentinels(server, [a, b])
        seen = await until_sentinels(watch, sentinels)
    # b starts at its newest id once a poll of it succeeds, never at a's old mark.
    assert [m.id for m in seen[b]] == [sentinels[b]]


# --- stopping ----------------------------------------------------------------------------------


async def test_break_stops_every_task(server: MessagesServer, client: ma.Client) -> None:
    chat_id = server.chat_ids()[0]
    server.post_message(chat_id, "x", uid=OTHER)
    since = {chat_id: server.messages(chat_id)[1]["id"]}
    async for _ in client.messages.watch([chat_id], since=since, interval=0.02):
        assert watch_tasks()
        break
    await no_watch_tasks_left()
    # The client is unharmed and nothing is still being sent.
    await client.messages.list(chat_id, limit=1)


async def test_cancel_propagates_and_stops_every_task(
    server: MessagesServer, client: ma.Client
) -> None:
    consumed = asyncio.Event()

    async def bot() -> None:
        async with client.messages.watch(interval=0.02) as watch:
            await watch.ready()
            consumed.set()
            async for _ in watch:
                pass

    task = asyncio.create_task(bot())
    async with asyncio.timeout(10):
        await consumed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await no_watch_tasks_left()


async def test_aclose_mid_burst_and_iterating_a_closed_watch(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]
    watch = client.messages.watch([chat_id], interval=0.02, limit=5)
    await watch.ready()
    for i in range(30):
        server.post_message(chat_id, f"m{i}", uid=OTHER)
    await anext(watch)
    await watch.aclose()
    await watch.aclose()  # twice is fine
    await no_watch_tasks_left()
    assert [item async for item in watch] == []
    with pytest.raises(RuntimeError, match="closed"):
        await watch.ready()


async def test_closing_right_after_starting_leaves_nothing_behind(
    server: MessagesServer, client: ma.Client
) -> None:
    async with client.messages.watch(interval=0.02):
        pass
    watch = client.messages.watch(interval=0.02)
    task = asyncio.create_task(watch.ready())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await watch.aclose()
    await no_watch_tasks_left()


# --- cost ----------------------------------------------------------------------------------------


async def test_quiet_chats_back_off_and_polls_share_the_clients_bound() -> None:
    # The cadence itself is tested on a made-up clock (test_schedule.py); this checks the
    # wiring: what the emulator saw once quiet chats reached the cap, and the in-flight bound.
    chats, interval, max_interval, concurrency = 40, 0.02, 0.2, 4
    async with (
        MessagesServer(chats=chats, messages_per_chat=3, seed=9) as server,
        make_client(server) as client,
        client.messages.watch(
            interval=interval, max_interval=max_interval, concurrency=concurrency
        ) as watch,
    ):
        await watch.ready()
        # 0.02 s growing by half per poll reaches the cap after about 0.5 s.
        await asyncio.sleep(1.0)
        window_start = time.monotonic()
        await asyncio.sleep(3 * max_interval)
        window_end = time.monotonic()
    window = [
        r
        for r in server.resource_requests()
        if r.path == "messages/" and window_start <= r.started < window_end
    ]
    rate = len(window) / (window_end - window_start)
    assert rate < chats / interval / 4  # generous: settled, it is chats / max_interval
    assert {r.query["chat_id"] for r in window} == {str(c) for c in server.chat_ids()}
    assert server.max_in_flight <= concurrency


async def test_a_new_chat_is_noticed_at_the_rediscover_cadence() -> None:
    async with (
        MessagesServer(chats=2, messages_per_chat=3, seed=9) as server,
        make_client(server) as client,
        client.messages.watch(interval=0.02, max_interval=0.1) as watch,  # rediscover: 0.1
    ):
        await watch.ready()
        await asyncio.sleep(0.5)
    listings = [r.started for r in server.resource_requests() if r.path == "messages/chats/"]
    gaps = [b - a for a, b in itertools.pairwise(listings)]
    # Listed again every max_interval by default (with generous margins for a busy machine).
    assert len(listings) >= 3
    assert all(g >= 0.09 for g in gaps), gaps


# --- contract breaks and cancellation ----------------------------------------------------------


async def test_a_body_that_breaks_the_contract_is_raised_once_not_polled_forever(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]
    watch = client.messages.watch([chat_id], interval=0.02)
    await watch.ready()
    broken = server.inject(Fault.malformed(), path="messages/", chat_id=chat_id, times=None)
    with pytest.raises(ma.DecodeError, match="message page") as caught:
        await drain(watch)
    assert caught.value.__notes__ == [f"watch() stopped: raised polling chat {chat_id}"]
    await no_watch_tasks_left()
    await asyncio.sleep(0.1)
    assert broken.hits == 1  # neither the transport nor the watch asked again


async def test_a_listing_that_keeps_misbehaving_is_raised_after_a_few_polls(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]
    watch = client.messages.watch([chat_id], interval=0.005, limit=5)
    await watch.ready()
    for i in range(12):  # more than a page: the poll follows next_cursor back
        server.post_message(chat_id, f"burst {i}", uid=OTHER)
    backwards = server.inject(Fault.backwards_page(), path="messages/", times=None)
    with pytest.raises(ma.PaginationError):
        await drain(watch)
    await no_watch_tasks_left()
    assert backwards.hits == MAX_MISBEHAVING_ROUNDS  # one cursor request per poll, then raised


async def test_a_cancelled_consumer_stops_the_polls_while_its_traceback_is_kept(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]

    async def bot() -> None:
        async for _ in client.messages.watch([chat_id], interval=0.01):
            pass

    kept: list[BaseException] = []
    try:
        await asyncio.wait_for(bot(), 0.2)
    except TimeoutError as exc:
        # Kept for a log, say: its cause's traceback holds the frames, and the watch in them,
        # so no finalizer will ever stop the watch.
        kept.append(exc)
    assert kept
    assert kept[0].__cause__ is not None
    assert kept[0].__cause__.__traceback__
    await no_watch_tasks_left()
    await asyncio.sleep(0.05)
    count = len(server.resource_requests())
    await asyncio.sleep(0.1)
    assert len(server.resource_requests()) == count  # nothing polls any more


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"chat_ids": "12"}, TypeError),
        ({"chat_ids": []}, ValueError),
        ({"chat_ids": [1, -2]}, ValueError),
        ({"interval": 0}, ValueError),
        ({"interval": "2"}, TypeError),
        ({"interval": float("nan")}, ValueError),
        ({"max_interval": 0.5, "interval": 1.0}, ValueError),
        ({"limit": 0}, ValueError),
        ({"limit": 2.5}, TypeError),
        ({"concurrency": 0}, ValueError),
        ({"concurrency": True}, TypeError),
        ({"rediscover": -1}, ValueError),
        ({"since": [(1, 2)]}, TypeError),
        ({"since": {1: "5"}}, TypeError),
        ({"since": {1: -5}}, ValueError),
        ({"chat_ids": [1], "since": {2: 5}}, ValueError),
    ],
)
async def test_bad_arguments_raise_before_anything_is_sent(
    server: MessagesServer, client: ma.Client, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    before = len(server.resource_requests())
    with pytest.raises(error):
        client.messages.watch(**kwargs)
    assert len(server.resource_requests()) == before


async def test_watch_on_a_closed_client_raises_at_once(server: MessagesServer) -> None:
    client = make_client(server)
    with pytest.raises(ma.ClientClosedError):
        client.messages.watch()
