"""The core client against the emulator over loopback: auth, scopes, retries, safety, lifecycle.

Every fault is injected for real by the emulator; assertions are on what the server observed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import traceback
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from helpers import make_client
from test_hardening import leaks

import messages_async as ma
from messages_async.testing import Fault, MessagesServer, OriginRecorder


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=4, messages_per_chat=30, seed=3) as srv:
        yield srv


@pytest.fixture
async def client(server: MessagesServer) -> AsyncIterator[ma.Client]:
    async with make_client(server) as c:
        yield c


def statuses(server: MessagesServer) -> list[int | None]:
    return [r.status for r in server.resource_requests()]


# --- the six endpoints -------------------------------------------------------------------------


async def test_endpoints_round_trip(server: MessagesServer, client: ma.Client) -> None:
    chats = await client.messages.chats()
    assert [c.chat_id for c in chats] == server.chat_ids()
    chat_id = chats[0].chat_id
    page = await client.messages.list(chat_id, limit=7)
    expected = server.messages(chat_id)
    assert [m.id for m in page.items] == [m["id"] for m in expected[:7]]
    assert page.limit == 7
    assert page.total_count == len(expected)
    assert page.next_cursor is not None
    second = await client.messages.list(chat_id, limit=7, cursor=page.next_cursor)
    assert [m.id for m in second.items] == [m["id"] for m in expected[7:14]]

    got = await client.messages.get(expected[0]["id"])
    assert got.raw == expected[0]

    new = await client.messages.add(
        chat_id,
        "hello",
        attachments=[ma.NewAttachment(type="link", url="https://x.test/", name="x")],
        is_whisper=True,
    )
    assert new.uid == client.user_id == server.user_id
    assert new.message == "hello"
    assert new.attachments[0].url == "https://x.test/"
    assert server.messages(chat_id)[0]["id"] == new.id
    add_body = server.resource_requests()[-1].body
    assert b'"is_whisper":true' in add_body

    edited = await client.messages.edit(new.id, chat_id=chat_id, message="edited")
    assert edited.id == new.id
    assert edited.message == "edited"
    assert server.messages(chat_id)[0]["message"] == "edited"

    await client.messages.delete(new.id)
    assert all(m["id"] != new.id for m in server.messages(chat_id))
    with pytest.raises(ma.NotFoundError) as info:
        await client.messages.get(new.id)
    assert info.value.status == 404


async def test_filters_are_sent_and_applied(server: MessagesServer, client: ma.Client) -> None:
    chat_id = server.chat_ids()[0]
    everything = server.messages(chat_id)
    middle = datetime.fromisoformat(everything[len(everything) // 2]["created_at"])
    page = await client.messages.list(
        chat_id, limit=100, period=ma.Period(from_=middle, till=middle + timedelta(days=3650))
    )
    expected = [m["id"] for m in everything if datetime.fromisoformat(m["created_at"]) >= middle]
    assert [m.id for m in page.items] == expected
    word = everything[0]["message"].split()[0].upper()
    page = await client.messages.list(chat_id, limit=100, query=word)
    assert [m.id for m in page.items] == [
        m["id"] for m in everything if word.lower() in m["message"].lower()
    ]
    assert server.resource_requests()[-1].query["query"] == word


async def test_resource_uri_with_path_without_trailing_slash() -> None:
    async with MessagesServer(chats=1, messages_per_chat=3, resource_path="/deep/api/v2") as srv:
        uri = srv.resource_uri.rstrip("/")
        token = srv.issue_token()
        async with ma.Client(access_token=token, resource_uri=uri) as c:
            chats = await c.messages.chats()
            assert len(chats) == 1
            assert c.scopes is None  # a pre-issued token: unknown until the server says
        assert srv.resource_requests()[0].path == "messages/chats/"


async def test_bad_input_sends_nothing(server: MessagesServer, client: ma.Client) -> None:
    chat_id = server.chat_ids()[0]
    cases: list[tuple[type[Exception], Any]] = [
        (ValueError, client.messages.list(chat_id, limit=0)),
        (TypeError, client.messages.list("1")),  # type: ignore[arg-type]
        (ValueError, client.messages.get(-5)),
        (TypeError, client.messages.get(1.5)),  # type: ignore[arg-type]
        (ValueError, client.messages.add(chat_id, "")),
        (ValueError, client.messages.add(chat_id, "x" * 4097)),
        (
            ValueError,
            client.messages.add(
                chat_id, "x", attachments=[ma.NewAttachment(type="link", url="u")] * 11
            ),
        ),
        (ValueError, client.messages.edit(1, chat_id=chat_id)),
    ]
    for error, call in cases:
        with pytest.raises(error):
            await call
    with pytest.raises(TypeError):
        client.messages.iter_many("123")
    with pytest.raises(ValueError, match="concurrency"):
        client.messages.iter_many([1], concurrency=0)
    assert server.resource_requests() == []


# --- token exchange ----------------------------------------------------------------------------


async def test_exchange_on_open_gives_scopes_and_user(server: MessagesServer) -> None:
    server.register_client("reader", "reader-secret", scopes=["messages_read"], user_id=77)
    async with make_client(server, client_id="reader", client_secret="reader-secret") as c:
        assert c.scopes == frozenset({"messages_read"})
        assert c.user_id == 77
        form = server.token_requests[-1]
        assert form["grant_type"] == "client_credentials"
        assert set(form["scope"].split()) == {"messages_read", "messages_write"}


async def test_missing_scope_raises_before_any_request(server: MessagesServer) -> None:
    server.register_client("reader", "reader-secret", scopes=["messages_read"])
    async with make_client(server, client_id="reader", client_secret="reader-secret") as c:
        with pytest.raises(ma.ScopeError, match="messages_write") as info:
            await c.messages.add(server.chat_ids()[0], "hi")
        assert info.value.required == "messages_write"
        with pytest.raises(ma.ScopeError):
            await c.messages.delete(1)
        assert server.resource_requests() == []
        await c.messages.chats()  # reading is allowed
    assert len(server.resource_requests()) == 1


async def test_server_insufficient_scope_is_scope_error_without_refresh(
    server: MessagesServer,
) -> None:
    token = server.issue_token(scopes=["messages_read"])
    async with ma.Client(access_token=token, resource_uri=server.resource_uri) as c:
        with pytest.raises(ma.ScopeError) as info:
            await c.messages.add(server.chat_ids()[0], "hi")
    assert info.value.required == "messages_write"
    assert statuses(server) == [403]
    assert server.token_request_count == 0


async def test_bad_credentials_fail_open_cleanly(server: MessagesServer) -> None:
    c = make_client(server, client_secret="wrong-secret-value")
    with pytest.raises(ma.AuthError, match="invalid_client") as info:
        await c.open()
    assert "wrong-secret-value" not in str(info.value)
    with pytest.raises(ma.ClientClosedError):
        await c.messages.chats()


@pytest.mark.parametrize("calls", [40, 200])
async def test_concurrent_calls_with_expired_token_cause_one_exchange(
    server: MessagesServer, client: ma.Client, calls: int
) -> None:
    server.expire_tokens()
    before = server.token_request_count
    chat_id = server.chat_ids()[0]
    pages = await asyncio.gather(*(client.messages.list(chat_id, limit=1) for _ in range(calls)))
    assert len(pages) == calls
    assert server.token_request_count - before == 1
    assert server.token_requests[-1]["grant_type"] == "refresh_token"
    # The emulator records the form with its secrets redacted: never the refresh token itself.
    assert server.token_requests[-1]["refresh_token"] != ""
    assert not any(
        r.token and r.token in server.token_requests[-1].values()
        for r in server.resource_requests()
    )
    ok = [r for r in server.resource_requests() if r.status == 200]
    assert len(ok) == calls
    assert len({r.token for r in ok}) == 1  # every retry used the one new token


async def test_token_is_renewed_ahead_of_expiry() -> None:
    async with MessagesServer(chats=1, messages_per_chat=3, token_ttl=1.0) as srv:
        async with make_client(srv) as c:
            await c.messages.chats()
            await asyncio.sleep(0.6)  # past half of the token's life
            await c.messages.chats()
            await c.messages.chats()
        assert [r.status for r in srv.resource_requests()] == [200, 200, 200]
        assert [f["grant_type"] for f in srv.token_requests] == [
            "client_credentials",
            "refresh_token",
        ]


async def test_dead_refresh_token_falls_back_to_client_credentials(
    server: MessagesServer, client: ma.Client
) -> None:
    server.expire_tokens()
    server.revoke_refresh_tokens()
    await client.messages.chats()
    assert [f["grant_type"] for f in server.token_requests] == [
        "client_credentials",
        "refresh_token",
        "client_credentials",
    ]
    assert statuses(server) == [401, 200]


async def test_401_after_renewal_raises_auth_error_without_looping(
    server: MessagesServer, client: ma.Client
) -> None:
    server.inject(Fault.status(401), path="messages/chats/", times=2)
    before = server.token_request_count
    with pytest.raises(ma.AuthError):
        await client.messages.chats()
    assert statuses(server) == [401, 401]
    assert server.token_request_count - before == 1


async def test_refresh_failure_reaches_every_waiter(
    server: MessagesServer, client: ma.Client
) -> None:
    server.expire_tokens()
    server.inject(Fault.status(400, "invalid_client"), path="oauth/token", times=None)
    results = await asyncio.wait_for(
        asyncio.gather(*(client.messages.chats() for _ in range(20)), return_exceptions=True),
        timeout=10,
    )
    assert all(isinstance(r, ma.AuthError) for r in results)
    assert server.token_request_count == 2  # the first exchange, then one failed refresh


async def test_a_refused_renewal_is_not_asked_again_by_later_callers(
    server: MessagesServer, client: ma.Client
) -> None:
    # More callers than the client's 32 slots: the later ones meet their 401 only after the
    # renewal has failed, and must get its error rather than ask the endpoint again.
    server.expire_tokens()
    server.inject(Fault.status(400, "invalid_client"), path="oauth/token", times=None)
    results = await asyncio.wait_for(
        asyncio.gather(*(client.messages.chats() for _ in range(200)), return_exceptions=True),
        timeout=20,
    )
    assert all(isinstance(r, ma.AuthError) and r.error == "invalid_client" for r in results)
    assert server.token_request_count == 2  # the first exchange, then one failed refresh


async def test_a_renewal_ahead_of_expiry_holds_no_call_up() -> None:
    async with MessagesServer(chats=1, messages_per_chat=3, token_ttl=2.0) as srv:
        async with make_client(srv) as c:
            await c.messages.chats()
            await asyncio.sleep(1.1)  # past half of the token's life, not past its end
            srv.inject(Fault.delay(1.0), path="oauth/token")  # a slow token endpoint
            # The renewal runs in the background: a call with a short deadline still works.
            await c.with_options(deadline=0.3).messages.chats()
            async with asyncio.timeout(5):
                while c.token_exchanges < 2 or c._sessions._renewal is not None:
                    await asyncio.sleep(0.01)
            await c.messages.chats()
        first, during, after = srv.resource_requests()
        assert first.token == during.token != after.token


async def test_a_failed_early_renewal_keeps_the_valid_token_in_use() -> None:
    async with MessagesServer(chats=1, messages_per_chat=3, token_ttl=2.0) as srv:
        async with make_client(srv) as c:
            await c.messages.chats()
            await asyncio.sleep(1.1)  # past half of the token's life, not past its end
            srv.inject(Fault.status(503), path="oauth/token", times=None)
            await c.messages.chats()  # the renewal fails in the background, the call does not
            async with asyncio.timeout(5):  # the endpoint's own retries (max_retries=3)
                while srv.token_request_count < 1 + 4:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            await c.messages.chats()  # and the next call does not try again at once
        assert srv.token_request_count == 1 + 4
        sent = srv.resource_requests()
        assert [r.status for r in sent] == [200, 200, 200]
        assert len({r.token for r in sent}) == 1  # the first token throughout


async def test_cancelled_waiter_does_not_cancel_the_refresh(
    server: MessagesServer, client: ma.Client
) -> None:
    server.expire_tokens()
    server.inject(Fault.delay(0.3), path="oauth/token")
    chat_id = server.chat_ids()[0]
    first = asyncio.create_task(client.messages.list(chat_id, limit=1))
    second = asyncio.create_task(client.messages.list(chat_id, limit=1))
    await asyncio.sleep(0.1)  # both are waiting on the one renewal now
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    page = await second
    assert len(page.items) == 1
    assert server.token_request_count == 2


async def test_pre_issued_token_refused_is_auth_error(server: MessagesServer) -> None:
    token = server.issue_token()
    server.expire_tokens()
    async with ma.Client(access_token=token, resource_uri=server.resource_uri) as c:
        with pytest.raises(ma.AuthError, match="pre-issued"):
            await c.messages.chats()
    assert statuses(server) == [401]


# --- retries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
async def test_get_is_retried_on_transient_status(
    server: MessagesServer, client: ma.Client, status: int
) -> None:
    server.inject(Fault.status(status, retry_after="0" if status == 429 else None), times=2)
    chats = await client.messages.chats()
    assert len(chats) == 4
    assert statuses(server) == [status, status, 200]
    assert client.stats.retries == 2


async def test_get_is_retried_after_dropped_connection(
    server: MessagesServer, client: ma.Client
) -> None:
    server.inject(Fault.drop(), path="messages/chats/", times=2)
    assert len(await client.messages.chats()) == 4
    assert statuses(server) == [None, None, 200]


@pytest.mark.parametrize(("max_retries", "attempts"), [(0, 1), (3, 4)])
async def test_max_retries_counts_retries_after_the_first_attempt(
    server: MessagesServer, max_retries: int, attempts: int
) -> None:
    server.inject(Fault.status(503), times=None)
    async with make_client(server, max_retries=max_retries) as c:
        with pytest.raises(ma.ServerError) as info:
            await c.messages.chats()
    assert info.value.status == 503
    assert len(server.resource_requests()) == attempts


async def test_insufficient_scope_does_not_renew_a_renewable_token(
    server: MessagesServer, client: ma.Client
) -> None:
    server.inject(Fault.status(403, "insufficient_scope"))
    with pytest.raises(ma.ScopeError):
        await client.messages.chats()
    assert statuses(server) == [403]
    assert server.token_request_count == 1  # the exchange at open(), and no renewal


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (400, "invalid_request", ma.BadRequestError),
        (403, "forbidden", ma.PermissionDeniedError),
        (404, "not_found", ma.NotFoundError),
        (413, "too_large", ma.BadRequestError),
    ],
)
async def test_non_retryable_statuses_send_once(
    server: MessagesServer, client: ma.Client, status: int, code: str, error: type
) -> None:
    server.inject(Fault.status(status, code))
    with pytest.raises(error) as info:
        await client.messages.chats()
    assert info.value.code == code
    assert len(server.resource_requests()) == 1
    assert server.token_request_count == 1


def _http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_is_waited_out(
    server: MessagesServer, client: ma.Client, form: str
) -> None:
    value = "1" if form == "seconds" else _http_date(2)
    server.inject(Fault.rate_limited(retry_after=value))
    await client.messages.chats()
    limited, ok = server.resource_requests()
    assert limited.status == 429
    assert ok.status == 200
    # HTTP dates have one-second resolution: the wait is at least 1 s either way, and at
    # most the 2 s asked for (plus a generous margin for a busy machine).
    assert 0.9 <= ok.started - limited.finished < 3.5
    assert client.stats.rate_limited == 1


@pytest.mark.parametrize("value", ["garbage", "-1", "nan", "inf", "Wed, 01 Jan 2020 00:00:00 GMT"])
async def test_unreadable_retry_after_falls_back_to_backoff(
    server: MessagesServer, client: ma.Client, value: str
) -> None:
    server.inject(Fault.rate_limited(retry_after=value))
    await client.messages.chats()
    limited, ok = server.resource_requests()
    assert ok.started - limited.finished < 1.0  # backoff_max is 0.05 s


async def test_retry_after_beyond_the_cap_raises_at_once(server: MessagesServer) -> None:
    server.inject(Fault.rate_limited(retry_after="120"))
    async with make_client(server, max_retry_after=10) as c:
        with pytest.raises(ma.RateLimitError) as info:
            await c.messages.chats()
    assert info.value.retry_after == 120
    assert len(server.resource_requests()) == 1


async def test_retry_after_pauses_every_request_of_the_client(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_ids = server.chat_ids()
    server.inject(Fault.rate_limited(retry_after="1"), path="messages/chats/")
    first = asyncio.create_task(client.messages.chats())
    await asyncio.sleep(0.1)  # the 429 has been answered and the pause set
    others = await asyncio.gather(*(client.messages.list(c, limit=1) for c in chat_ids))
    await first
    assert len(others) == len(chat_ids)
    limited = server.resource_requests()[0]
    assert limited.status == 429
    later = server.resource_requests()[1:]
    assert all(r.started - limited.finished >= 0.85 for r in later)


async def test_html_error_from_a_proxy_is_an_api_error(
    server: MessagesServer, client: ma.Client
) -> None:
    html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    server.inject(Fault.status(502, body=html, content_type="text/html"), times=None)
    with pytest.raises(ma.ServerError) as info:
        await client.messages.chats()
    assert info.value.status == 502
    assert info.value.code is None
    assert "text/html" in str(info.value)


@pytest.mark.parametrize("fault", [Fault.malformed(), Fault.wrong_shape()])
async def test_malformed_bodies_are_decode_errors(
    server: MessagesServer, client: ma.Client, fault: Fault
) -> None:
    server.inject(fault, path="messages/")
    with pytest.raises(ma.DecodeError, match="message page"):
        await client.messages.list(server.chat_ids()[0])
    assert len(await client.messages.chats()) == 4  # the client is still usable


async def test_oversized_answer_is_cut_off(server: MessagesServer) -> None:
    server.inject(Fault.oversized(size=4 * 1024 * 1024), path="messages/chats/")
    async with make_client(server, max_response_bytes=256 * 1024) as c:
        with pytest.raises(ma.DecodeError, match="max_response_bytes"):
            await c.messages.chats()
        assert len(await c.messages.chats()) == 4


async def test_timeout_is_retried_then_raised(server: MessagesServer) -> None:
    server.inject(Fault.delay(1.0), path="messages/chats/", times=1)
    async with make_client(server, timeout=0.3) as c:
        assert len(await c.messages.chats()) == 4
        server.inject(Fault.delay(1.0), path="messages/chats/", times=None)
        with pytest.raises(ma.RequestTimeoutError) as info:
            await c.messages.chats()
    assert isinstance(info.value, TimeoutError)


async def test_a_deadline_bounds_a_request_across_retries(server: MessagesServer) -> None:
    server.inject(Fault.delay(1.0), path="messages/chats/", times=None)
    async with make_client(server, timeout=0.3, max_retries=10, deadline=0.8) as c:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ma.RequestTimeoutError):
            await c.messages.chats()
        took = loop.time() - started
    sent = server.resource_requests()
    # Two whole attempts and a shorter one, not the eleven that max_retries alone allows.
    assert 2 <= len(sent) <= 4
    assert sent[-1].started - sent[0].started < 0.8
    assert took < 0.8 + 0.4  # the deadline, and a generous margin for a busy machine


async def test_a_deadline_cuts_an_attempt_short_of_its_own_timeout(
    server: MessagesServer,
) -> None:
    server.inject(Fault.delay(3.0), path="messages/chats/")
    async with make_client(server, timeout=10, deadline=0.5) as c:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ma.RequestTimeoutError, match="not retried"):
            await c.messages.chats()
        assert loop.time() - started < 0.5 + 0.4
    assert len(server.resource_requests()) == 1


async def test_a_deadline_bounds_the_token_renewal_after_a_401(server: MessagesServer) -> None:
    async with make_client(server, deadline=0.5) as c:
        server.inject(Fault.expire_token(), path="messages/chats/")
        server.inject(Fault.delay(3.0), path="oauth/token")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ma.RequestTimeoutError, match="renewing the refused token") as info:
            await c.messages.chats()
        assert loop.time() - started < 0.5 + 0.4
    assert "after 1 attempt; nothing more was sent" in str(info.value)
    assert len(server.resource_requests()) == 1


async def test_a_deadline_bounds_the_wait_for_a_free_slot(server: MessagesServer) -> None:
    server.inject(Fault.delay(1.0), path="messages/chats/")
    async with make_client(server, max_concurrency=1) as c:
        slow = asyncio.create_task(c.messages.chats())  # holds the client's only slot
        await asyncio.sleep(0.1)
        hurried = c.with_options(deadline=0.3)
        with pytest.raises(ma.RequestTimeoutError, match=r"free slot.*nothing was sent"):
            await hurried.messages.chats()
        assert len(server.resource_requests()) == 1  # only the slow one reached the server
        assert len(await slow) == 4


async def test_a_wait_beyond_the_deadline_raises_the_servers_error_at_once(
    server: MessagesServer,
) -> None:
    server.inject(Fault.rate_limited(retry_after="5"), path="messages/chats/")
    async with make_client(server, deadline=1.0, max_retry_after=60) as c:
        with pytest.raises(ma.RateLimitError) as info:
            await c.messages.chats()
        assert info.value.retry_after == 5
        assert len(server.resource_requests()) == 1
        # The pause still binds the client: the next call sends nothing and says why.
        with pytest.raises(ma.RateLimitError, match="deadline"):
            await c.messages.chats()
    assert len(server.resource_requests()) == 1


async def test_with_options_overrides_retries_per_call_and_shares_the_rest(
    server: MessagesServer, client: ma.Client
) -> None:
    once = client.with_options(max_retries=0)
    server.inject(Fault.status(503), path="messages/chats/")
    with pytest.raises(ma.ServerError):
        await once.messages.chats()
    assert len(server.resource_requests()) == 1
    server.inject(Fault.status(503), path="messages/chats/")
    assert len(await client.messages.chats()) == 4  # the client's own 3 retries still apply
    assert len(server.resource_requests()) == 3
    # One limiter, one set of counters, one token, one lifecycle.
    assert once.stats.requests == client.stats.requests == 3
    assert client.token_exchanges == 1
    assert "view(timeout=30, deadline=None, max_retries=0)" in repr(once)
    # A view does not own the client: it can neither close it nor be used to scope it.
    with pytest.raises(TypeError, match="does not own"):
        async with once:
            pass
    with pytest.raises(TypeError, match="does not own"):
        await once.aclose()
    assert len(await once.messages.chats()) == 4  # still open
    await client.aclose()
    with pytest.raises(ma.ClientClosedError):
        await once.messages.chats()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"timeout": 0}, ValueError),
        ({"timeout": "5"}, TypeError),
        ({"deadline": -1}, ValueError),
        ({"deadline": float("nan")}, ValueError),
        ({"max_retries": -1}, ValueError),
        ({"max_retries": 1.5}, TypeError),
    ],
)
async def test_with_options_checks_its_arguments(
    server: MessagesServer, client: ma.Client, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        client.with_options(**options)
    if "deadline" in options:
        with pytest.raises(error):
            make_client(server, **options)
    assert server.resource_requests() == []


# --- writes are never repeated where the server may have acted ---------------------------------


async def test_add_is_not_retried_after_a_500(server: MessagesServer, client: ma.Client) -> None:
    chat_id = server.chat_ids()[0]
    before = len(server.messages(chat_id))
    server.inject(Fault.status(500), path="messages/add/")
    with pytest.raises(ma.ServerError):
        await client.messages.add(chat_id, "once")
    assert len(server.resource_requests()) == 1
    assert len(server.messages(chat_id)) == before


async def test_add_lost_after_commit_leaves_exactly_one_message(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]
    before = len(server.messages(chat_id))
    server.inject(Fault.drop_after_commit(), path="messages/add/")
    with pytest.raises(ma.TransportError, match="may have stored it"):
        await client.messages.add(chat_id, "exactly once")
    assert len(server.resource_requests()) == 1
    texts = [m["message"] for m in server.messages(chat_id)]
    assert len(texts) == before + 1
    assert texts.count("exactly once") == 1


@pytest.mark.parametrize(
    "fault", [Fault.rate_limited(retry_after="0"), Fault.status(503, retry_after="0")]
)
async def test_add_is_retried_where_the_server_did_not_act(
    server: MessagesServer, client: ma.Client, fault: Fault
) -> None:
    chat_id = server.chat_ids()[0]
    server.inject(fault, path="messages/add/")
    message = await client.messages.add(chat_id, "after a pause")
    assert [m["message"] for m in server.messages(chat_id)].count("after a pause") == 1
    assert server.messages(chat_id)[0]["id"] == message.id
    assert len(server.resource_requests()) == 2


async def test_add_is_retried_when_the_connection_was_refused() -> None:
    with socket.socket() as sock:  # find a free port, then let the server come up on it late
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = MessagesServer(chats=1, messages_per_chat=1, port=port)
    token = srv.issue_token()
    chat_id = srv.chat_ids()[0]
    async with ma.Client(
        access_token=token,
        resource_uri=f"http://127.0.0.1:{port}/api/v1/",
        backoff_base=0.2,
        max_retries=8,
    ) as c:
        starter = asyncio.get_running_loop().call_later(
            0.3, lambda: asyncio.ensure_future(srv.start())
        )
        try:
            message = await c.messages.add(chat_id, "refused, then delivered")
        finally:
            starter.cancel()
            await srv.close()
    assert c.stats.retries >= 1
    assert [m["message"] for m in srv.messages(chat_id)].count("refused, then delivered") == 1
    assert message.message == "refused, then delivered"


async def test_delete_whose_answer_was_lost_succeeds(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]
    mine = await client.messages.add(chat_id, "to delete")
    server.reset_stats()
    server.inject(Fault.drop_after_commit(), path=f"messages/{mine.id}/delete/")
    await client.messages.delete(mine.id)  # the retry meets a 404: the deletion happened
    assert statuses(server) == [None, 404]
    assert all(m["id"] != mine.id for m in server.messages(chat_id))


async def test_edit_whose_answer_was_lost_is_retried(
    server: MessagesServer, client: ma.Client
) -> None:
    chat_id = server.chat_ids()[0]
    mine = await client.messages.add(chat_id, "before")
    server.reset_stats()
    server.inject(Fault.drop_after_commit(), path=f"messages/{mine.id}/edit/")
    edited = await client.messages.edit(mine.id, chat_id=chat_id, message="after")
    assert edited.message == "after"
    assert statuses(server) == [None, 200]


# --- where the token goes ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_cross_origin_redirect_is_refused(
    server: MessagesServer, client: ma.Client, status: int
) -> None:
    async with OriginRecorder() as attacker:
        server.inject(Fault.redirect(attacker.url("/steal"), status=status))
        with pytest.raises(ma.UnsafeCursorError, match="redirect"):
            await client.messages.chats()
        server.inject(Fault.redirect(attacker.url("/steal"), status=status))
        with pytest.raises(ma.UnsafeCursorError):
            await client.messages.add(server.chat_ids()[0], "secret body")
        assert attacker.request_count == 0


async def test_redirect_to_another_port_on_the_same_host_is_refused(
    server: MessagesServer, client: ma.Client
) -> None:
    server.inject(Fault.redirect(server.token_origin + "/api/v1/messages/chats/"))
    with pytest.raises(ma.UnsafeCursorError):
        await client.messages.chats()
    assert not any(r.token for r in server.requests if r.origin == "token")


async def test_same_origin_redirect_of_a_get_is_followed(
    server: MessagesServer, client: ma.Client
) -> None:
    server.inject(Fault.redirect(server.resource_uri + "messages/chats/", status=307))
    assert len(await client.messages.chats()) == 4


async def test_token_goes_only_to_the_resource_origin(
    server: MessagesServer, client: ma.Client
) -> None:
    await client.messages.chats()
    for record in server.requests:
        if record.origin == "token":
            assert record.token is None
            assert "authorization" not in {k.lower() for k in record.headers}
        else:
            assert record.token is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token_url": "http://auth.example.test/token", "client_id": "a", "client_secret": "b"},
        {"access_token": "t", "resource_uri": "http://api.example.test/v1/"},
        {"access_token": "t", "resource_uri": "ftp://api.example.test/"},
        {"access_token": "t", "resource_uri": "https://u:p@api.example.test/"},
    ],
)
def test_insecure_configuration_is_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ma.ConfigurationError):
        ma.Client(**kwargs)  # type: ignore[arg-type]


def test_insecure_http_can_be_allowed_explicitly() -> None:
    ma.Client(
        access_token="t", resource_uri="http://api.example.test/v1/", allow_insecure_http=True
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, ma.ConfigurationError),
        ({"token_url": "https://a.test/t", "client_id": "x"}, ma.ConfigurationError),
        ({"access_token": "t"}, ma.ConfigurationError),
        ({"access_token": "t", "resource_uri": "https://a.test/", "client_id": "x"}, ValueError),
        ({"access_token": "t", "resource_uri": "https://a.test/", "timeout": 0}, ValueError),
        ({"access_token": "t", "resource_uri": "https://a.test/", "max_retries": -1}, ValueError),
        (
            {"access_token": "t", "resource_uri": "https://a.test/", "scopes": "messages_read"},
            TypeError,
        ),
        ({"access_token": "t", "resource_uri": "https://a.test/", "session": object()}, TypeError),
    ],
)
def test_bad_configuration_says_what_to_fix(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        ma.Client(**kwargs)


# --- secrets -----------------------------------------------------------------------------------


async def test_secrets_never_leak(server: MessagesServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="messages_async")
    async with make_client(server) as c:
        await c.messages.chats()
        server.expire_tokens()
        await c.messages.chats()  # a 401 and a refresh
        errors: list[BaseException] = []
        faults = (
            Fault.status(500),
            Fault.drop(),
            Fault.status(401),
            Fault.malformed(),
            Fault.delay(1.0),  # with timeout=0.2 below: a timeout, the path through aiohttp
        )
        once = c.with_options(max_retries=0, timeout=0.2)
        for fault in faults:
            server.inject(fault, times=None)
            try:
                await once.messages.chats()
            except ma.MessagesError as exc:
                errors.append(exc)
            server.clear_faults()
        tokens = {r.token for r in server.resource_requests() if r.token}
        needles = [server.client_secret, *tokens]
        assert len(tokens) >= 2
        for text in (repr(c), str(c), caplog.text, repr(c.stats)):
            assert not [n for n in needles if n in text]
        assert len(errors) == len(faults)
        for exc in errors:
            assert not leaks(exc, needles), type(exc)
        assert caplog.records, "one debug line per request is expected"
        assert any("GET /api/v1/messages/chats/ -> 200" in r.getMessage() for r in caplog.records)
    bad = make_client(server, client_secret="s3cr3t-value-xyz")
    with pytest.raises(ma.AuthError) as info:
        await bad.open()
    assert not leaks(info.value, ["s3cr3t-value-xyz"])


# --- lifecycle ---------------------------------------------------------------------------------


async def test_lifecycle_states(server: MessagesServer) -> None:
    c = make_client(server)
    with pytest.raises(ma.ClientClosedError, match="not open"):
        await c.messages.chats()
    async with c:
        await c.messages.chats()
    await c.aclose()  # closing twice is a no-op
    with pytest.raises(ma.ClientClosedError, match="closed"):
        await c.messages.chats()
    with pytest.raises(ma.ClientClosedError):
        await c.open()


async def test_caller_owned_session_is_left_open(server: MessagesServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with make_client(server, session=session) as c:
            await c.messages.chats()
        assert not session.closed
        async with session.get(server.resource_uri + "messages/chats/") as response:
            assert response.status == 401  # the caller's session carries no token of ours


async def test_cancellation_propagates_and_releases_the_connection(
    server: MessagesServer, client: ma.Client
) -> None:
    server.inject(Fault.delay(5.0), path="messages/chats/")
    task = asyncio.create_task(client.messages.chats())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.stats.in_flight == 0
    assert len(await client.messages.chats()) == 4


async def test_retry_budget_caps_a_retry_storm(server: MessagesServer) -> None:
    server.inject(Fault.status(503), times=None)
    async with make_client(server, max_retries=3, retry_budget=10) as c:
        results = await asyncio.gather(
            *(c.messages.chats() for _ in range(100)), return_exceptions=True
        )
        assert all(isinstance(r, ma.ServerError) for r in results)
        # 100 first attempts are never held back; retries stop when the budget is spent.
        assert len(server.resource_requests()) == 100 + 10
        server.clear_faults()
        server.reset_stats()
        for _ in range(20):  # successes earn the budget back, a tenth of a retry each
            await c.messages.chats()
        server.inject(Fault.status(503), times=2)
        assert len(await c.messages.chats()) == 4
    assert [r.status for r in server.resource_requests()][-3:] == [503, 503, 200]


async def test_cancellation_during_backoff_is_prompt(server: MessagesServer) -> None:
    server.inject(Fault.status(503), times=None)
    async with make_client(server, backoff_base=30.0, backoff_max=30.0) as c:
        task = asyncio.create_task(c.messages.chats())
        while not server.resource_requests():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # now in the backoff sleep
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=2)
        assert c.stats.in_flight == 0


@pytest.mark.parametrize(
    "fault",
    [
        Fault.oversized(size=8 * 1024 * 1024, declare_length=True),
        Fault.oversized(size=64 * 1024 * 1024, gzip=True),
    ],
)
async def test_declared_and_compressed_oversized_answers_are_cut_off(
    server: MessagesServer, fault: Fault
) -> None:
    server.inject(fault, path="messages/chats/")
    async with make_client(server, max_response_bytes=256 * 1024) as c:
        with pytest.raises(ma.DecodeError, match="max_response_bytes"):
            await c.messages.chats()
        assert len(await c.messages.chats()) == 4


# --- found in review ---------------------------------------------------------------------------


async def test_a_cursor_of_another_chat_is_refused(
    server: MessagesServer, client: ma.Client
) -> None:
    first, second = server.chat_ids()[:2]
    page = await client.messages.list(first, limit=5)
    assert page.next_cursor is not None
    with pytest.raises(ValueError, match="belongs to chat"):
        await client.messages.list(second, cursor=page.next_cursor)
    with pytest.raises(ValueError, match="belongs to chat"):
        client.messages.pages(second, cursor=page.next_cursor)
    with pytest.raises(ValueError, match="newer"):
        client.messages.pages(first, direction="newer")
    assert len(server.resource_requests()) == 1


async def test_a_refresh_answer_without_user_or_scope_keeps_them(server: MessagesServer) -> None:
    # A token endpoint of our own (loopback) whose refresh answers leave out user_id and scope,
    # as RFC 6749 allows: neither may be forgotten nor widened.
    from aiohttp import web

    grants: list[str] = []

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        grants.append(str(form["grant_type"]))
        body: dict[str, Any] = {
            "access_token": server.issue_token(["messages_read"], user_id=77),
            "token_type": "Bearer",
            "expires_in": 3600,
            "refresh_token": f"rt-{len(grants)}",
            "resource_uri": server.resource_uri,
        }
        if form["grant_type"] == "client_credentials":
            body |= {"scope": "messages_read", "user_id": 77}
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with make_client(server, token_url=f"http://127.0.0.1:{port}/token") as c:
            assert (c.user_id, c.scopes) == (77, frozenset({"messages_read"}))
            server.expire_tokens()
            await c.messages.chats()  # a 401, then a refresh that omits user_id and scope
            assert grants == ["client_credentials", "refresh_token"]
            assert (c.user_id, c.scopes) == (77, frozenset({"messages_read"}))
            with pytest.raises(ma.ScopeError):
                await c.messages.add(server.chat_ids()[0], "still read-only")
    finally:
        await runner.cleanup()


async def test_closing_during_a_renewal_ends_waiters_with_client_closed(
    server: MessagesServer, client: ma.Client
) -> None:
    server.expire_tokens()
    server.inject(Fault.delay(2.0), path="oauth/token")
    calls = [asyncio.create_task(client.messages.chats()) for _ in range(3)]
    while not server.token_requests[1:]:
        await asyncio.sleep(0.01)
    await client.aclose()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, ma.ClientClosedError) for r in results), results


async def test_a_delete_done_behind_a_gateway_error_is_success(server: MessagesServer) -> None:
    async with make_client(server) as c:
        chat_id = server.chat_ids()[0]
        mine = await c.messages.add(chat_id, "to delete")
        server.reset_stats()
        server.inject(Fault.status(504), path=f"messages/{mine.id}/delete/")
        # The retry waits at the server long enough for the "upstream" below to have acted.
        server.inject(Fault.delay(0.5), path=f"messages/{mine.id}/delete/")

        async def upstream_deletes_anyway() -> None:
            while not server.resource_requests():
                await asyncio.sleep(0.005)
            server.delete_message(mine.id)  # the gateway timed out; the upstream did the work

        helper = asyncio.create_task(upstream_deletes_anyway())
        await c.messages.delete(mine.id)
        await helper
    assert statuses(server) == [504, 404]


async def test_a_retry_after_beyond_the_cap_holds_later_calls_too(server: MessagesServer) -> None:
    server.inject(Fault.rate_limited(retry_after="120"))
    async with make_client(server, max_retry_after=10) as c:
        with pytest.raises(ma.RateLimitError):
            await c.messages.chats()
        with pytest.raises(ma.RateLimitError, match="nothing was sent") as info:
            await c.messages.chats()
        assert info.value.retry_after is not None
        assert info.value.retry_after > 100
    assert len(server.resource_requests()) == 1


@pytest.mark.parametrize(
    "location",
    ["http://user:pw@{host}/api/v1/messages/chats/", "http://{host}/elsewhere/"],
)
async def test_same_origin_redirects_outside_the_api_are_refused(
    server: MessagesServer, client: ma.Client, location: str
) -> None:
    host = server.resource_origin.split("://")[1]
    server.inject(Fault.redirect(location.format(host=host)))
    with pytest.raises(ma.UnsafeCursorError):
        await client.messages.chats()
    assert len(server.resource_requests()) == 1


def test_configuration_errors_keep_secrets_out_of_tracebacks() -> None:
    for kwargs in (
        {"token_url": "http://auth.example.test/t", "client_id": "a", "client_secret": "S3CR3T-1"},
        {"access_token": "S3CR3T-2", "resource_uri": "http://api.example.test/"},
    ):
        with pytest.raises(ma.ConfigurationError) as info:
            ma.Client(**kwargs)
        assert not leaks(info.value, ["S3CR3T-1", "S3CR3T-2"])
        # A formatter that shows locals (and so reprs the half-built client) works too.
        summary = traceback.TracebackException.from_exception(info.value, capture_locals=True)
        library = [f for f in summary.stack if "messages_async" in f.filename]
        assert library
        assert not ["" for f in library for v in (f.locals or {}).values() if "S3CR3T" in v]
