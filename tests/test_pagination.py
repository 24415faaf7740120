"""Cursor walks against the emulator over loopback: ``pages()`` and ``iter()``.

Every fault here is injected for real through the emulator; the checks compare what the walk
yielded with the server's own data (``server.messages``) and read the server's request log to
see what was sent, when, and with which cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any, Literal

import pytest
from helpers import assert_nothing_left as _assert_nothing_left
from helpers import client_for as _client
from helpers import client_side_tasks as _client_side_tasks
from helpers import listings as _listings
from yarl import URL

import messages_async as ma
from messages_async import _pagination
from messages_async._wire import parse_page
from messages_async.testing import Fault, MessagesServer, OriginRecorder

CursorMode = Literal["url", "token"]
CURSOR_MODES: list[CursorMode] = ["url", "token"]


def _ids(messages: list[dict[str, Any]]) -> list[int]:
    return [m["id"] for m in messages]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _pairwise(items: list[Any]) -> Iterator[tuple[Any, Any]]:
    return itertools.pairwise(items)


async def _flatten(pages: AsyncIterator[ma.MessagesPage]) -> AsyncIterator[ma.Message]:
    async for page in pages:
        for message in page.items:
            yield message


async def _drain_ids(walk: AsyncIterator[ma.Message], into: list[int]) -> None:
    async for message in walk:
        into.append(message.id)


def _assert_strictly_descending(ids: list[int]) -> None:
    assert all(a > b for a, b in _pairwise(ids)), ids


# --- whole walks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
@pytest.mark.parametrize("limit", [1, 7, 100])
async def test_full_walk_yields_the_chat_exactly_newest_first(
    cursor_mode: CursorMode, limit: int
) -> None:
    async with MessagesServer(
        chats=2, messages_per_chat=43, seed=3, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        expected = server.messages(chat_id)
        async with _client(server) as client:
            got = [m async for m in client.messages.iter(chat_id, limit=limit)]
        assert [m.id for m in got] == _ids(expected)
        assert [dict(m.raw) for m in got] == expected
        listings = _listings(server)
        pages = -(-len(expected) // limit)
        assert len(listings) == pages
        # Every page after the first followed the previous page's cursor, and the filters the
        # walk started with went along (in the URL, or next to a bare token).
        assert "cursor" not in listings[0].query
        for record in listings[1:]:
            assert record.query["cursor"]
            assert record.query["chat_id"] == str(chat_id)
            assert record.query["limit"] == str(limit)


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
async def test_absolute_cursor_urls_are_followed_as_given(cursor_mode: CursorMode) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=30, seed=5, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            cursors = [p.next_cursor async for p in client.messages.pages(chat_id, limit=10)]
        assert cursors[-1] is None
        listings = _listings(server)
        for cursor, record in zip(cursors[:-1], listings[1:], strict=True):
            assert cursor is not None
            if cursor_mode == "url":
                # The URL as given: its own query (filters, limit, token), nothing added.
                url = URL(cursor)
                assert cursor.startswith(server.resource_uri)
                assert dict(url.query) == dict(record.query)
            else:
                assert "://" not in cursor
                assert record.query["cursor"] == cursor
                assert record.query["chat_id"] == str(chat_id)


def _matches(message: dict[str, Any], query: str | None, period: ma.Period | None) -> bool:
    # Independent of the server's own filter: PROTOCOL §2 (case-insensitive substring; ``from``
    # inclusive, ``till`` exclusive).
    if query is not None and query.casefold() not in message["message"].casefold():
        return False
    if period is not None:
        created = _at(message["created_at"])
        if period.from_ is not None and created < period.from_:
            return False
        if period.till is not None and created >= period.till:
            return False
    return True


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
async def test_query_and_period_filters_hold_across_pages(cursor_mode: CursorMode) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=150, seed=11, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        everything = server.messages(chat_id)
        words = Counter(w for m in everything for w in set(m["message"].lower().split()))
        # A word in a fair share of the messages, so the filtered walk spans several pages;
        # sent in another case, since the match is case-insensitive.
        word = min(words, key=lambda w: abs(words[w] - len(everything) // 3))
        query = word.upper()
        times = sorted(_at(m["created_at"]) for m in everything)
        period = ma.Period(from_=times[len(times) // 5], till=times[len(times) * 4 // 5])
        cases: list[tuple[str | None, ma.Period | None]] = [
            (query, None),
            (None, period),
            (query, period),
        ]
        async with _client(server) as client:
            for q, p in cases:
                expected = [m["id"] for m in everything if _matches(m, q, p)]
                assert len(expected) > 4, "the filter must span several pages"
                got = [
                    m.id async for m in client.messages.iter(chat_id, limit=4, query=q, period=p)
                ]
                assert got == expected, (q, p)
        for record in _listings(server)[1:]:
            # The filters travel with every page, whichever way the cursor is given.
            assert record.query.get("query") in (None, query)


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
async def test_a_saved_cursor_resumes_exactly_where_the_walk_stopped(
    cursor_mode: CursorMode,
) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=47, seed=7, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        async with _client(server) as client:
            first: list[int] = []
            saved: str | None = None
            # pages() is typed as an AsyncIterator, which does not promise aclose(); it is an
            # async generator, so it has one.
            walk = client.messages.pages(chat_id, limit=6)
            async with contextlib.aclosing(walk) as pages:  # type: ignore[type-var]
                async for page in pages:
                    first += [m.id for m in page.items]
                    saved = page.next_cursor
                    if len(first) >= 18:
                        break
            assert saved is not None
            rest = [
                m.id
                async for page in client.messages.pages(chat_id, limit=6, cursor=saved)
                for m in page.items
            ]
        assert first + rest == expected


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
async def test_direction_newer_walks_up_from_a_saved_prev_cursor(cursor_mode: CursorMode) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=40, seed=9, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        async with _client(server) as client:
            pages = [p async for p in client.messages.pages(chat_id, limit=6)]
            deep = pages[4]
            assert deep.prev_cursor is not None
            newest_of_deep = deep.items[0].id
            upward = [
                p
                async for p in client.messages.pages(
                    chat_id, limit=6, cursor=deep.prev_cursor, direction="newer"
                )
            ]
        for page in upward:
            _assert_strictly_descending([m.id for m in page.items])
        # Pages climb: each one lies wholly above the one before.
        for lower, upper in _pairwise([p for p in upward if p.items]):
            assert upper.items[-1].id > lower.items[0].id
        got = sorted((m.id for p in upward for m in p.items), reverse=True)
        assert got == [i for i in expected if i > newest_of_deep]
        assert upward[-1].prev_cursor is None


# --- a misbehaving server ------------------------------------------------------------------------


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
async def test_a_cursor_on_another_origin_is_refused_before_anything_is_sent(
    cursor_mode: CursorMode,
) -> None:
    async with (
        OriginRecorder() as other,
        MessagesServer(chats=1, messages_per_chat=40, seed=1, cursor_mode=cursor_mode) as server,
    ):
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        server.inject(Fault.foreign_cursor(other.origin), path="messages/", after=1)
        got: list[int] = []
        async with _client(server) as client:
            with pytest.raises(ma.UnsafeCursorError) as caught:
                await _drain_ids(client.messages.iter(chat_id, limit=5), got)
            await _assert_nothing_left(client)
        assert other.requests == []
        assert not other.saw_authorization
        # The two good pages arrived whole, in order; nothing more was asked of anyone.
        assert got == expected[:10]
        assert len(_listings(server)) == 2
        assert other.origin.removeprefix("http://") in str(caught.value)


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
@pytest.mark.parametrize("after", [0, 2])
async def test_a_repeating_cursor_stops_the_walk_with_bounded_requests(
    cursor_mode: CursorMode, after: int
) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=60, seed=2, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        server.inject(Fault.repeat_cursor(), path="messages/", after=after)
        got: list[int] = []
        async with _client(server) as client:
            with pytest.raises(ma.PaginationError):
                await _drain_ids(client.messages.iter(chat_id, limit=5), got)
            await _assert_nothing_left(client)
        assert len(got) == len(set(got))
        _assert_strictly_descending(got)
        assert len(_listings(server)) <= after + 3


@pytest.mark.parametrize("after", [0, 2])
async def test_a_page_that_goes_backwards_raises(after: int) -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=4) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        server.inject(Fault.backwards_page(), path="messages/", after=after)
        got: list[int] = []
        async with _client(server) as client:
            with pytest.raises(ma.PaginationError):
                await _drain_ids(client.messages.iter(chat_id, limit=5), got)
            await _assert_nothing_left(client)
        # Only the good pages before the bad one, each message once.
        assert got == expected[: 5 * after]


async def test_a_page_read_ahead_that_breaks_the_contract_is_raised_not_yielded() -> None:
    # Its cursor reads fine, so the next request goes out before the page is decoded; the
    # decoding then fails, the walk raises, and that request is cancelled with nothing left.
    async with MessagesServer(chats=1, messages_per_chat=60, seed=4) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        bad = json.dumps({"items": [{"id": "x1", "uid": 1, "message": "m"}], "next_cursor": "c"})
        server.inject(Fault.malformed(body=bad.encode()), path="messages/", after=2)
        got: list[int] = []
        async with _client(server) as client:
            with pytest.raises(ma.DecodeError, match=r"\$\.items\[0\]\.id"):
                await _drain_ids(client.messages.iter(chat_id, limit=5), got)
            await _assert_nothing_left(client)
        assert got == expected[:10]  # the two good pages, each message once
        assert len(_listings(server)) <= 4  # the bad page's cursor asked for at most once


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
async def test_empty_pages_with_a_cursor_are_followed(cursor_mode: CursorMode) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=33, seed=6, empty_page_every=2, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        async with _client(server) as client:
            pages = [p async for p in client.messages.pages(chat_id, limit=5)]
        assert [m.id for p in pages for m in p.items] == expected
        empties = [p for p in pages if not p.items]
        assert empties, "the server was set up to send empty pages"
        assert all(p.next_cursor for p in empties)


async def test_a_long_run_of_empty_pages_does_not_end_the_walk() -> None:
    # A filtered walk over a long history can see hundreds of empty pages in a row; only an
    # empty cursor ends a walk (PROTOCOL §3).
    async with MessagesServer(chats=1, messages_per_chat=30, seed=6) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        server.inject(Fault.empty_page(), path="messages/", after=2, times=250)
        async with _client(server) as client:
            got = [m.id async for m in client.messages.iter(chat_id, limit=10)]
        assert got == expected
        assert len(_listings(server)) == 3 + 250


async def test_a_server_stuck_on_empty_pages_stops_the_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each empty page's cursor carries a fresh nonce, so no cycle shows: only the backstop
    # (10,000 in a row by default, lowered here) ends the walk.
    monkeypatch.setattr("messages_async._pagination.MAX_EMPTY_PAGES", 30)
    async with MessagesServer(chats=1, messages_per_chat=30, seed=6) as server:
        chat_id = server.chat_ids()[0]
        server.inject(Fault.empty_page(), path="messages/", times=None)
        async with _client(server) as client:
            with pytest.raises(ma.PaginationError, match="30 empty pages in a row"):
                async for _ in client.messages.iter(chat_id, limit=10, prefetch=False):
                    pass
        assert len(_listings(server)) == 30


# --- faults in the middle of a walk --------------------------------------------------------------


MID_WALK_FAULTS = {
    "503": Fault.status(503),
    "500": Fault.status(500),
    "502": Fault.status(502),
    "drop": Fault.drop(),
    "429": Fault.rate_limited(retry_after="0"),
}


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
@pytest.mark.parametrize("fault", list(MID_WALK_FAULTS))
@pytest.mark.parametrize("prefetch", [True, False])
async def test_a_failed_page_is_retried_and_the_walk_goes_on(
    cursor_mode: CursorMode, fault: str, prefetch: bool
) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=50, seed=8, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        server.inject(MID_WALK_FAULTS[fault], path="messages/", after=3, times=2)
        async with _client(server) as client:
            got = [m.id async for m in client.messages.iter(chat_id, limit=7, prefetch=prefetch)]
            stats = client.stats
        assert got == expected
        listings = _listings(server)
        if fault == "drop":
            # aiohttp re-sends a GET once on its own after a dropped keep-alive connection
            # (PROTOCOL §7: not one of ours), so the server may see more than the client sent.
            assert 1 <= stats.retries <= 2
        else:
            assert stats.requests == len(listings)
            assert stats.retries == 2
            assert stats.rate_limited == (2 if fault == "429" else 0)
        failed = [i for i, r in enumerate(listings) if r.fault is not None]
        assert len(failed) == 2
        # The failed page was asked for again with the same cursor; the walk never went back
        # to page 1 (only the very first request has no cursor).
        index = failed[0]
        assert listings[index].query.get("cursor")
        retried = [r for r in listings[index + 1 :] if r.fault is None]
        assert retried[0].query == listings[index].query
        assert sum("cursor" not in r.query for r in listings) == 1
        assert len(listings) == -(-len(expected) // 7) + 2


async def test_a_429_pauses_the_walk_for_retry_after() -> None:
    async with MessagesServer(chats=1, messages_per_chat=30, seed=8) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        server.inject(Fault.rate_limited(retry_after="1"), path="messages/", after=2)
        async with _client(server) as client:
            got = [m.id async for m in client.messages.iter(chat_id, limit=5)]
            assert client.stats.rate_limited == 1
        assert got == expected
        listings = _listings(server)
        (limited,) = [r for r in listings if r.status == 429]
        assert limited.finished is not None
        later = [r for r in listings if r.started > limited.started]
        # The retry waited for Retry-After (margin for clock granularity), same cursor.
        assert later[0].started - limited.finished >= 0.9
        assert later[0].query == limited.query


async def test_retries_exhausted_mid_walk_raises_after_the_good_pages() -> None:
    async with MessagesServer(chats=1, messages_per_chat=30, seed=8) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        server.inject(Fault.status(503), path="messages/", after=2, times=None)
        got: list[int] = []
        async with _client(server, max_retries=2) as client:
            with pytest.raises(ma.ServerError):
                await _drain_ids(client.messages.iter(chat_id, limit=5), got)
            await _assert_nothing_left(client)
        assert got == expected[:10]
        assert len(_listings(server)) == 2 + 3


# --- prefetch ------------------------------------------------------------------------------------


async def _timed_walk(
    client: ma.Client, chat_id: int, *, prefetch: bool, work: float
) -> list[tuple[float, float]]:
    """Walk with a consumer that works ``work`` seconds per page; (received, finished) times."""
    stamps: list[tuple[float, float]] = []
    async for _page in client.messages.pages(chat_id, limit=10, prefetch=prefetch):
        received = time.monotonic()
        await asyncio.sleep(work)
        stamps.append((received, time.monotonic()))
    return stamps


async def test_prefetch_requests_the_next_page_while_the_consumer_works() -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=1, latency=0.05) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            stamps = await _timed_walk(client, chat_id, prefetch=True, work=0.06)
        listings = _listings(server)
        assert len(stamps) == len(listings) == 6
        for n in range(len(stamps) - 1):
            # Page n+1 was already on its way while the consumer worked on page n ...
            assert listings[n + 1].started < stamps[n][1]
        for n in range(len(stamps) - 2):
            # ... but never more than one page ahead: n+2 waits until n is done.
            assert listings[n + 2].started >= stamps[n][1]


@contextlib.contextmanager
def _server_in_a_thread(**options: Any) -> Iterator[MessagesServer]:
    """An emulator on its own event loop in another thread, so it keeps answering while the
    test's loop is blocked by a consumer that never awaits."""
    loop = asyncio.new_event_loop()
    server = MessagesServer(**options)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(server.close())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def test_prefetch_overlaps_a_consumer_that_never_awaits() -> None:
    # A consumer that holds the CPU (parsing, say) gives the event loop no turn; the next
    # request must still be on the wire before the consumer starts working.
    with _server_in_a_thread(chats=1, messages_per_chat=40, seed=1, latency=0.05) as server:
        chat_id = server.chat_ids()[0]
        received: list[float] = []
        async with _client(server) as client:
            async for _page in client.messages.pages(chat_id, limit=10):
                received.append(time.monotonic())
                time.sleep(0.1)  # noqa: ASYNC251 - blocking on purpose: CPU-bound work
        listings = _listings(server)
    assert len(listings) == len(received) == 4
    for n in range(len(received) - 1):
        # The server saw page n+1 asked for while the consumer was still busy with page n.
        assert listings[n + 1].started < received[n] + 0.05


@pytest.mark.parametrize("max_items", [None, 35])
async def test_the_next_page_is_asked_for_before_this_one_is_decoded(
    monkeypatch: pytest.MonkeyPatch, max_items: int | None
) -> None:
    # Decoding made slow (50 ms of CPU): the cursor is read first, so the server sees the next
    # request while the page is still being decoded. With max_items the walk must count the
    # page's messages before it asks for more, so it decodes first.
    decoded: list[float] = []

    def slow_parse(body: bytes) -> ma.MessagesPage:
        time.sleep(0.05)
        page = parse_page(body)
        decoded.append(time.monotonic())
        return page

    monkeypatch.setattr(_pagination, "parse_page", slow_parse)
    with _server_in_a_thread(chats=1, messages_per_chat=40, seed=1) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            got = [m.id async for m in client.messages.iter(chat_id, limit=10, max_items=max_items)]
        listings = _listings(server)
    assert got == _ids(server.messages(chat_id))[:max_items]
    for n in range(len(listings) - 1):
        if max_items is None:
            assert listings[n + 1].started < decoded[n] - 0.03  # asked for while decoding
        else:
            assert listings[n + 1].started >= decoded[n]


async def test_without_prefetch_requests_wait_for_the_consumer() -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=1, latency=0.02) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            stamps = await _timed_walk(client, chat_id, prefetch=False, work=0.03)
        listings = _listings(server)
        assert len(stamps) == len(listings) == 6
        for n in range(len(stamps) - 1):
            assert listings[n + 1].started >= stamps[n][1]


# --- limits and arguments ------------------------------------------------------------------------


async def test_max_items_is_a_total_and_limit_a_page_size() -> None:
    async with MessagesServer(chats=1, messages_per_chat=50, seed=1) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        async with _client(server) as client:
            got = [m.id async for m in client.messages.iter(chat_id, limit=3, max_items=7)]
            assert got == expected[:7]
            assert [m async for m in client.messages.iter(chat_id, max_items=0)] == []
            await _assert_nothing_left(client)
        listings = _listings(server)
        assert all(r.query["limit"] == "3" for r in listings)
        # Three pages hold the seven: nothing is fetched ahead past what was asked for.
        assert len(listings) == 3


async def test_max_items_within_the_first_page_sends_one_request() -> None:
    async with MessagesServer(chats=1, messages_per_chat=50, seed=1) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            got = [m.id async for m in client.messages.iter(chat_id, limit=100, max_items=10)]
        assert got == _ids(server.messages(chat_id))[:10]
        assert len(_listings(server)) == 1


async def test_bad_arguments_raise_before_anything_is_sent() -> None:
    async with MessagesServer(chats=1, messages_per_chat=5) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            server.reset_stats()
            with pytest.raises(ValueError, match="direction"):
                client.messages.pages(chat_id, direction="up")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="cursor"):
                client.messages.pages(chat_id, cursor=5)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="max_items"):
                client.messages.iter(chat_id, max_items=-1)
            with pytest.raises(ma.UnsafeCursorError):
                client.messages.pages(chat_id, cursor="https://elsewhere.example/messages/?c=1")
            assert server.requests == []


# --- leaving a walk early ------------------------------------------------------------------------


async def test_break_out_of_iter_leaves_nothing_running() -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=1, latency=0.2) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            async for message in client.messages.iter(chat_id, limit=5):
                assert message.id
                break  # the next page is being fetched ahead right now
            await _assert_nothing_left(client, rounds=20)
            server.latency = 0.0
            page = await asyncio.wait_for(client.messages.list(chat_id, limit=1), 5)
            assert page.items


async def test_break_out_of_pages_leaves_nothing_running() -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=1, latency=0.2) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            async for page in client.messages.pages(chat_id, limit=5):
                assert page.items
                break
            await _assert_nothing_left(client, rounds=20)
            server.latency = 0.0
            assert (await asyncio.wait_for(client.messages.list(chat_id, limit=1), 5)).items


@pytest.mark.parametrize("which", ["iter", "pages"])
async def test_aclosing_cleans_up_at_once(which: str) -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=1, latency=0.2) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            walk: AsyncIterator[object] = (
                client.messages.iter(chat_id, limit=5)
                if which == "iter"
                else client.messages.pages(chat_id, limit=5)
            )
            async with contextlib.aclosing(walk) as items:  # type: ignore[type-var]
                async for _item in items:
                    break
            # No loop steps allowed: aclose() itself waited for the prefetch to go.
            await _assert_nothing_left(client)
            server.latency = 0.0
            assert (await asyncio.wait_for(client.messages.list(chat_id, limit=1), 5)).items


async def test_explicit_aclose_cancels_the_prefetch() -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=1, latency=0.2) as server:
        chat_id = server.chat_ids()[0]
        async with _client(server) as client:
            walk = client.messages.pages(chat_id, limit=5)
            await anext(walk)
            assert len(_client_side_tasks()) == 1  # the prefetch
            await walk.aclose()  # type: ignore[attr-defined]
            await _assert_nothing_left(client)


async def test_cancelling_the_consumer_propagates_and_cleans_up() -> None:
    async with MessagesServer(chats=1, messages_per_chat=60, seed=1, latency=0.2) as server:
        chat_id = server.chat_ids()[0]
        got: list[int] = []
        async with _client(server) as client:

            async def consume() -> None:
                async for message in client.messages.iter(chat_id, limit=5):
                    got.append(message.id)

            task = asyncio.create_task(consume())
            for _ in range(500):  # until the first page is in and the second in flight
                if len(got) >= 5:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _assert_nothing_left(client, rounds=20)
            server.latency = 0.0
            assert (await asyncio.wait_for(client.messages.list(chat_id, limit=1), 5)).items


@pytest.mark.parametrize("cursor_mode", CURSOR_MODES)
async def test_a_resumed_walk_whose_cursor_comes_back_stops_at_once(
    cursor_mode: CursorMode,
) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=40, seed=2, cursor_mode=cursor_mode
    ) as server:
        chat_id = server.chat_ids()[0]
        expected = _ids(server.messages(chat_id))
        async with _client(server) as client:
            first = await client.messages.list(chat_id, limit=5)
            assert first.next_cursor is not None
            server.reset_stats()
            server.inject(Fault.repeat_cursor(), path="messages/")
            got: list[int] = []
            walk = client.messages.pages(chat_id, limit=5, cursor=first.next_cursor)
            with pytest.raises(ma.PaginationError):
                await _drain_ids(_flatten(walk), got)
        # The page itself was good and is delivered; its cursor is the one the walk started
        # from, so following it would loop: not one request more.
        assert got == expected[5:10]
        assert len(_listings(server)) == 1


async def test_closing_the_client_during_a_pause_ends_the_walk() -> None:
    async with MessagesServer(chats=1, messages_per_chat=30, seed=1) as server:
        chat_id = server.chat_ids()[0]
        server.inject(Fault.rate_limited(retry_after="1"), path="messages/", after=1)
        client = ma.Client(
            token_url=server.token_url,
            client_id=server.client_id,
            client_secret=server.client_secret,
            backoff_base=0.01,
        )
        await client.open()
        got: list[int] = []

        async def consume() -> None:
            async for message in client.messages.iter(chat_id, limit=5):
                got.append(message.id)

        task = asyncio.create_task(consume())
        for _ in range(500):
            if client.stats.paused_for > 0:
                break
            await asyncio.sleep(0.01)
        assert client.stats.paused_for > 0
        await client.aclose()
        # The walk was waiting for Retry-After to pass; it ends with an error, not a hang.
        with pytest.raises(ma.ClientClosedError):
            await asyncio.wait_for(task, 5)
        assert got == [m["id"] for m in server.messages(chat_id)][:5]


# --- text that stdlib json accepts and strict parsers refuse ------------------------------------

CUT_EMOJI = "cut \ud83d"  # what a JavaScript server sends when it cuts a text mid-emoji


async def test_a_lone_surrogate_is_delivered_by_iter_and_watch_as_u_fffd() -> None:
    async with MessagesServer(chats=1, messages_per_chat=5) as server:
        chat_id = server.chat_ids()[0]
        cut = server.post_message(chat_id, CUT_EMOJI)["id"]
        async with _client(server) as client:
            got = {m.id: m for m in [m async for m in client.messages.iter(chat_id)]}
            assert len(got) == 6
            assert got[cut].message == got[cut].raw["message"] == "cut \ufffd"
            # Posted after the watch started, then one more after it: both are delivered.
            since = {chat_id: max(got)}
            later = server.post_message(chat_id, "after " + CUT_EMOJI)["id"]
            last = server.post_message(chat_id, "fine")["id"]
            seen = []
            async with asyncio.timeout(10):
                async for _, message in client.messages.watch(
                    [chat_id], since=since, interval=0.02
                ):
                    seen.append((message.id, message.message))
                    if message.id == last:
                        break
            assert seen == [(later, "after cut \ufffd"), (last, "fine")]
