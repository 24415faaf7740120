"""``iter_many`` against the emulator: bounded fan-out, the shared pause, failures, cleanup.

The server's own observations are the evidence: its request log (who asked for what, when,
with which answer) and its in-flight maximum.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import assert_nothing_left as _assert_nothing_left
from helpers import client_for as _client
from helpers import listings as _listings

import messages_async as ma
from messages_async.testing import Fault, MessagesServer

UNKNOWN_CHAT = 987_654_321


def _expected(server: MessagesServer, chat_ids: list[int]) -> dict[int, list[int]]:
    return {c: [m["id"] for m in server.messages(c)] for c in chat_ids}


async def _collect(
    walk: AsyncIterator[tuple[int, ma.Message]],
) -> dict[int, list[int]]:
    got: dict[int, list[int]] = defaultdict(list)
    async for chat_id, message in walk:
        got[chat_id].append(message.id)
    return dict(got)


async def test_forty_chats_complete_in_order_within_the_concurrency() -> None:
    async with MessagesServer(
        chats=40, messages_per_chat=(0, 45), seed=21, latency=0.005
    ) as server:
        chat_ids = server.chat_ids()
        assert len(chat_ids) == 40
        expected = _expected(server, chat_ids)
        async with _client(server) as client:
            got = await _collect(client.messages.iter_many(chat_ids, concurrency=8, limit=10))
            await _assert_nothing_left(client)
        assert got == {c: ids for c, ids in expected.items() if ids}
        assert server.max_in_flight <= 8
        assert server.max_in_flight >= 4  # the chats really were walked side by side


async def test_results_stream_as_they_arrive_interleaving_chats() -> None:
    async with MessagesServer(chats=6, messages_per_chat=30, seed=2, latency=0.01) as server:
        chat_ids = server.chat_ids()
        async with _client(server) as client:
            order = [c async for c, _m in client.messages.iter_many(chat_ids, limit=5)]
        # Not chat after chat: items of different chats alternate as pages come in.
        switches = sum(a != b for a, b in itertools.pairwise(order))
        assert switches > len(chat_ids)


async def test_a_429_storm_pauses_the_whole_fan_out() -> None:
    async with MessagesServer(chats=40, messages_per_chat=(10, 30), seed=5, latency=0.01) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        # Let the fan-out get going, then answer a burst of requests with 429 + Retry-After.
        server.inject(Fault.rate_limited(retry_after="1"), path="messages/", after=20, times=6)
        async with _client(server, max_concurrency=8) as client:
            got = await _collect(client.messages.iter_many(chat_ids, concurrency=8, limit=10))
            stats = client.stats
        assert got == expected
        assert server.max_in_flight <= 8
        records = server.resource_requests()
        limited = [r for r in records if r.status == 429]
        assert len(limited) == 6
        first = min(limited, key=lambda r: r.started)
        assert first.finished is not None
        # Requests the client had already sent when the 429 came may still arrive (allow a
        # generous 0.2 s for them to land); after that nothing, until Retry-After is over.
        quiet_from, quiet_till = first.finished + 0.2, first.finished + 0.8
        during = [r for r in records if quiet_from <= r.started <= quiet_till]
        assert during == [], [(r.started - first.finished, r.query) for r in during]
        # The counters agree with what the server saw.
        assert stats.requests == len(records)
        assert stats.rate_limited == 6
        assert stats.retries == 6


async def test_429s_make_the_client_pace_itself_never_above_the_maximum() -> None:
    async with MessagesServer(chats=40, messages_per_chat=(10, 30), seed=6) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        server.inject(Fault.rate_limited(retry_after="0"), path="messages/", after=10, times=4)
        seen: list[float | None] = []
        got: dict[int, list[int]] = defaultdict(list)
        async with _client(server, max_concurrency=8) as client:
            assert client.stats.concurrency == 8
            async for chat_id, message in client.messages.iter_many(
                chat_ids, concurrency=8, limit=5
            ):
                got[chat_id].append(message.id)
                seen.append(client.stats.pace)
            stats = client.stats
        assert dict(got) == expected
        assert any(pace is not None for pace in seen), "the 429s must make the client pace"
        assert stats.max_concurrency == stats.concurrency == 8
        records = server.resource_requests()
        assert server.max_in_flight <= 8
        assert stats.requests == len(records)
        assert stats.rate_limited == sum(r.status == 429 for r in records) == 4
        assert stats.retries == 4


async def test_one_missing_chat_raises_its_own_error_and_stops_the_rest() -> None:
    async with MessagesServer(chats=12, messages_per_chat=40, seed=3, latency=0.01) as server:
        chat_ids = server.chat_ids()
        assert UNKNOWN_CHAT not in chat_ids
        ids = [*chat_ids[:3], UNKNOWN_CHAT, *chat_ids[3:]]
        async with _client(server) as client:
            with pytest.raises(ma.NotFoundError) as caught:
                async for _chat_id, _message in client.messages.iter_many(
                    ids, concurrency=4, limit=5
                ):
                    pass
            # The chat's own exception, not an ExceptionGroup, and nothing left behind.
            assert type(caught.value) is ma.NotFoundError
            await _assert_nothing_left(client)
            # Requests the other workers had sent when the 404 came may still land; after
            # that, nothing more arrives: nobody is still fetching.
            await asyncio.sleep(0.05)
            count = len(server.resource_requests())
            await asyncio.sleep(0.05)
            assert len(server.resource_requests()) == count
            assert (await asyncio.wait_for(client.messages.list(chat_ids[0], limit=1), 5)).items
        # The other chats were cancelled, not walked to the end.
        walked = len(_listings(server))
        assert walked < sum(-(-len(server.messages(c)) // 5) for c in chat_ids)


async def test_on_error_yield_reports_the_chat_and_finishes_the_others() -> None:
    async with MessagesServer(chats=10, messages_per_chat=(5, 25), seed=4) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        ids = [*chat_ids[:5], UNKNOWN_CHAT, *chat_ids[5:]]
        got: dict[int, list[int]] = defaultdict(list)
        failed: list[tuple[int, ma.ChatFailed]] = []
        async with _client(server) as client:
            async for chat_id, item in client.messages.iter_many(
                ids, concurrency=3, limit=4, on_error="yield"
            ):
                if isinstance(item, ma.ChatFailed):
                    failed.append((chat_id, item))
                else:
                    got[chat_id].append(item.id)
            await _assert_nothing_left(client)
        assert len(failed) == 1
        chat_id, failure = failed[0]
        assert chat_id == failure.chat_id == UNKNOWN_CHAT
        assert isinstance(failure.error, ma.NotFoundError)
        assert dict(got) == expected


async def test_a_transient_failure_in_one_chat_is_retried_not_reported() -> None:
    async with MessagesServer(chats=8, messages_per_chat=30, seed=4) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        server.inject(Fault.status(503), path="messages/", chat_id=chat_ids[2], after=2, times=2)
        server.inject(Fault.drop(), path="messages/", chat_id=chat_ids[5], after=1)
        async with _client(server) as client:
            got = await _collect(client.messages.iter_many(chat_ids, concurrency=4, limit=7))
        assert got == expected


async def test_a_stalled_consumer_stops_the_producers() -> None:
    concurrency = 4
    async with MessagesServer(chats=20, messages_per_chat=50, seed=8) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        got: dict[int, list[int]] = defaultdict(list)
        async with _client(server) as client:
            walk = client.messages.iter_many(chat_ids, concurrency=concurrency, limit=5)
            chat_id, message = await anext(walk)
            got[chat_id].append(message.id)
            # The consumer stops here. The producers fill the bounded queue, then stop too.
            await asyncio.sleep(0.2)
            fetched = len(_listings(server))
            await asyncio.sleep(0.2)
            assert len(_listings(server)) == fetched, "requests went on with nobody reading"
            # The queue's slots, one page held by each blocked worker, the consumer's page.
            assert fetched <= 2 * concurrency + 2
            async for chat_id, message in walk:
                got[chat_id].append(message.id)
        assert dict(got) == expected


async def test_max_items_bounds_each_chat() -> None:
    async with MessagesServer(chats=6, messages_per_chat=(12, 30), seed=1) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        async with _client(server) as client:
            got = await _collect(
                client.messages.iter_many(chat_ids, concurrency=3, limit=5, max_items=7)
            )
            assert [x async for x in client.messages.iter_many(chat_ids, max_items=0)] == []
        assert got == {c: ids[:7] for c, ids in expected.items()}
        # Two pages of five hold seven; no chat was walked further.
        counts: dict[str | None, int] = defaultdict(int)
        for record in _listings(server):
            counts[record.query.get("chat_id")] += 1
        assert all(n == 2 for n in counts.values())
        assert len(counts) == len(chat_ids)


async def test_bad_arguments_raise_before_anything_is_sent() -> None:
    async with MessagesServer(chats=2, messages_per_chat=5) as server:
        chat_ids = server.chat_ids()
        async with _client(server) as client:
            server.reset_stats()
            with pytest.raises(ValueError, match="concurrency"):
                client.messages.iter_many(chat_ids, concurrency=0)
            with pytest.raises(ValueError, match="on_error"):
                client.messages.iter_many(chat_ids, on_error="ignore")  # type: ignore[call-overload]
            with pytest.raises(TypeError, match="chat_ids"):
                client.messages.iter_many("12")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="limit"):
                client.messages.iter_many(chat_ids, limit=0)
            assert server.requests == []


# --- leaving a fan-out early ---------------------------------------------------------------------


async def test_break_out_of_iter_many_leaves_nothing_running() -> None:
    async with MessagesServer(chats=10, messages_per_chat=40, seed=1, latency=0.1) as server:
        chat_ids = server.chat_ids()
        async with _client(server) as client:
            async for _chat_id, _message in client.messages.iter_many(chat_ids, concurrency=4):
                break  # the other workers are mid-request
            await _assert_nothing_left(client, rounds=20)
            server.latency = 0.0
            assert (await asyncio.wait_for(client.messages.list(chat_ids[0], limit=1), 5)).items


async def test_aclosing_iter_many_cleans_up_at_once() -> None:
    async with MessagesServer(chats=10, messages_per_chat=40, seed=1, latency=0.1) as server:
        chat_ids = server.chat_ids()
        async with _client(server) as client:
            async with contextlib.aclosing(
                client.messages.iter_many(chat_ids, concurrency=4, limit=5)  # type: ignore[type-var]
            ) as walk:
                async for _item in walk:
                    break
            await _assert_nothing_left(client)
            server.latency = 0.0
            assert (await asyncio.wait_for(client.messages.list(chat_ids[0], limit=1), 5)).items


async def test_cancelling_the_consumer_of_iter_many_propagates_and_cleans_up() -> None:
    async with MessagesServer(chats=10, messages_per_chat=40, seed=1, latency=0.1) as server:
        chat_ids = server.chat_ids()
        count = 0
        async with _client(server) as client:

            async def consume() -> None:
                nonlocal count
                async for _item in client.messages.iter_many(chat_ids, concurrency=4, limit=5):
                    count += 1

            task = asyncio.create_task(consume())
            for _ in range(500):
                if count >= 3:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _assert_nothing_left(client, rounds=20)
            server.latency = 0.0
            assert (await asyncio.wait_for(client.messages.list(chat_ids[0], limit=1), 5)).items


async def test_closing_the_client_under_a_fan_out_ends_it_with_an_error() -> None:
    async with MessagesServer(chats=10, messages_per_chat=40, seed=1, latency=0.05) as server:
        chat_ids = server.chat_ids()
        client = ma.Client(
            token_url=server.token_url,
            client_id=server.client_id,
            client_secret=server.client_secret,
            backoff_base=0.01,
        )
        await client.open()
        walk = client.messages.iter_many(chat_ids, concurrency=4, limit=5)
        await anext(walk)
        await client.aclose()
        # Whatever the workers were doing, the walk ends with an error instead of hanging.
        with pytest.raises(ma.MessagesError):
            await asyncio.wait_for(_drain(walk), 5)


async def _drain(walk: AsyncIterator[Any]) -> None:
    async for _item in walk:
        pass


async def test_requests_queued_in_the_client_wait_out_the_pause_too() -> None:
    # One request at a time: while one chat's request gets the 429, the other chats' requests
    # wait in the client's line. The 429 frees its slot before the pause is known; none of
    # those waiting may use it inside the Retry-After window.
    async with MessagesServer(chats=4, messages_per_chat=20, seed=5, latency=0.01) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        server.inject(Fault.rate_limited(retry_after="1"), path="messages/", after=3)
        async with _client(server, max_concurrency=1) as client:
            got = await _collect(client.messages.iter_many(chat_ids, concurrency=4, limit=5))
        assert got == expected
        assert server.max_in_flight == 1
        records = server.resource_requests()
        (limited,) = [r for r in records if r.status == 429]
        assert limited.finished is not None
        after = [r for r in records if r.started > limited.finished]
        assert after[0].started - limited.finished >= 0.9


async def test_a_429_that_ends_a_call_still_counts_and_still_pauses_the_client() -> None:
    async with MessagesServer(chats=2, messages_per_chat=10, seed=5) as server:
        chat_ids = server.chat_ids()
        server.inject(Fault.rate_limited(retry_after="1"), path="messages/")
        async with _client(server, max_retries=0) as client:
            with pytest.raises(ma.RateLimitError) as caught:
                await client.messages.list(chat_ids[0], limit=5)
            assert caught.value.retry_after == 1
            # Another call of the same client honours the server's Retry-After too.
            page = await asyncio.wait_for(client.messages.list(chat_ids[1], limit=5), 5)
            assert page.items
            stats = client.stats
        limited, ok = server.resource_requests()
        assert limited.status == 429
        assert limited.finished is not None
        assert ok.started - limited.finished >= 0.9
        assert stats.rate_limited == 1
        assert stats.requests == 2
        assert stats.retries == 0


async def test_a_chat_named_twice_is_walked_once() -> None:
    async with MessagesServer(chats=3, messages_per_chat=12, seed=5) as server:
        chat_ids = server.chat_ids()
        expected = _expected(server, chat_ids)
        async with _client(server) as client:
            got = await _collect(
                client.messages.iter_many([*chat_ids, chat_ids[0], *chat_ids], limit=5)
            )
        assert got == expected


async def test_closing_the_client_ends_a_yielding_fan_out_once_not_per_chat() -> None:
    async with MessagesServer(chats=10, messages_per_chat=40, seed=1, latency=0.05) as server:
        chat_ids = server.chat_ids()
        client = ma.Client(
            token_url=server.token_url,
            client_id=server.client_id,
            client_secret=server.client_secret,
            backoff_base=0.01,
        )
        await client.open()
        walk = client.messages.iter_many(chat_ids, concurrency=2, limit=5, on_error="yield")
        await anext(walk)
        await client.aclose()
        failed: list[ma.ChatFailed] = []

        async def drain() -> None:
            async for _chat_id, item in walk:
                if isinstance(item, ma.ChatFailed):
                    failed.append(item)

        with pytest.raises(ma.ClientClosedError):
            await asyncio.wait_for(drain(), 5)
        # At most the chats that were mid-request when the client closed are reported one by
        # one; the chats not yet started are not each turned into a failure.
        assert len(failed) <= 2


async def test_a_rate_limited_fan_out_learns_the_servers_rate() -> None:
    # A token bucket of 40 requests a second (burst 5): after its first 429s the client paces
    # itself near that rate instead of bouncing off the limit, so 429s stay rare.
    async with MessagesServer(
        chats=30, messages_per_chat=60, seed=5, latency=0.01, rate_limit=40, burst=5
    ) as server:
        chat_ids = server.chat_ids()
        async with _client(server, max_concurrency=10, max_retries=10) as client:
            got = [m async for m in client.messages.iter_many(chat_ids, limit=20)]
            stats = client.stats
        assert len(got) == 30 * 60
        answered = [r for r in _listings(server) if r.status is not None]
        limited = [r for r in answered if r.status == 429]
        assert len(answered) >= 90
        assert stats.pace is not None
        assert 10 <= stats.pace <= 60
        # Without pacing every window after a pause starts with a burst of 429s; learned, the
        # late part of the run hardly meets the limit.
        late = answered[len(answered) // 2 :]
        assert sum(r.status == 429 for r in late) <= max(3, len(late) // 10)
        assert stats.rate_limited == len(limited)
