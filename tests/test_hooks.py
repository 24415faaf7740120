"""Event hooks: once per attempt, read-only views, nothing secret, and never in the way.

Real calls against the emulator; every fault is injected by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
from helpers import client_for, make_client

import messages_async as ma
from messages_async.testing import Fault, MessagesServer


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=2, messages_per_chat=30, seed=4) as srv:
        yield srv


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def hooks(self) -> dict[str, list[Any]]:
        return {
            "request": [lambda v: self.seen.append(("request", v))],
            "response": [lambda v: self.seen.append(("response", v))],
            "error": [lambda v: self.seen.append(("error", v))],
        }

    def of(self, event: str) -> list[Any]:
        return [view for name, view in self.seen if name == event]


async def test_each_attempt_calls_the_hooks_once_in_order(server: MessagesServer) -> None:
    recorder = Recorder()
    async with client_for(server, event_hooks=recorder.hooks()) as client:
        chat_id = server.chat_ids()[0]
        server.inject(Fault.status(503), path="messages/")
        # Twice: aiohttp itself sends a GET again once when a kept-alive connection drops.
        server.inject(Fault.drop(), path="messages/", times=2)
        page = await client.messages.list(chat_id, limit=5, query="e")
        assert page.items
        stats = client.stats

    events = [
        (name, view.request.attempt if name != "request" else view.attempt)
        for name, view in recorder.seen
    ]
    assert events == [
        ("request", 1),
        ("response", 1),
        ("request", 2),
        ("error", 2),
        ("request", 3),
        ("response", 3),
    ]
    assert len(recorder.of("request")) == stats.requests == len(server.resource_requests()) - 1
    first, _, third = recorder.of("request")
    assert first == ma.RequestView("list", "GET", server.resource_uri + "messages/", 1)
    assert third.url == first.url  # the query (chat, limit, search text) is never shown
    responses = recorder.of("response")
    assert [r.status for r in responses] == [503, 200]
    assert responses[1].headers["Content-Type"].startswith("application/json")
    assert all(0 < r.elapsed < 5 for r in responses)
    (failure,) = recorder.of("error")
    assert failure.error in {"ServerDisconnectedError", "ClientOSError"}
    assert failure.elapsed >= 0


async def test_views_are_read_only(server: MessagesServer) -> None:
    recorder = Recorder()
    async with client_for(server, event_hooks=recorder.hooks()) as client:
        await client.messages.chats()
    request, response = recorder.of("request")[0], recorder.of("response")[0]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.url = "http://elsewhere/"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        response.status = 200
    with pytest.raises(TypeError):
        response.headers["X-Injected"] = "1"


async def test_a_hook_never_sees_the_token_or_a_query(server: MessagesServer) -> None:
    recorder = Recorder()
    async with client_for(server, event_hooks=recorder.hooks()) as client:
        chat_id = server.chat_ids()[0]
        server.inject(Fault.expire_token(), path="messages/")
        walked = [m async for m in client.messages.iter(chat_id, limit=4, query="a")]
        assert walked
        # A redirect's Location within the API: shown without its query string.
        cursor_url = server.resource_uri + "messages/?chat_id=1&cursor=abc&query=needle"
        server.inject(Fault.redirect(cursor_url), path="messages/chats/")
        with contextlib.suppress(ma.MessagesError):  # followed: the API's origin and path
            await client.messages.chats()
        server.inject(Fault.status(200, headers={"Set-Cookie": "session=s3cr3t"}), path="messages/")
        with contextlib.suppress(ma.MessagesError):
            await client.messages.list(chat_id)
    tokens = {r.token for r in server.requests if r.token}
    assert len(tokens) == 2  # the one revoked by the 401, and the renewed one
    shown = repr(recorder.seen)
    for secret in [
        *tokens,
        "Bearer at_",
        "uthorization",
        "needle",
        "cursor=",
        "chat_id=",
        "s3cr3t",
    ]:
        assert secret not in shown, secret
    (redirect,) = [r for r in recorder.of("response") if 300 <= r.status < 400]
    assert redirect.headers["Location"] == server.resource_uri + "messages/"


async def test_a_failing_hook_is_logged_and_the_call_goes_on(
    server: MessagesServer, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    def broken(view: ma.ResponseView) -> None:
        raise RuntimeError("bug in a metrics callback")

    async def slow_but_fine(view: ma.ResponseView) -> None:
        await asyncio.sleep(0)
        seen.append(view.status)

    hooks = {"request": [broken], "response": [broken, slow_but_fine], "error": [broken]}
    with caplog.at_level(logging.WARNING, logger="messages_async"):
        async with client_for(server, event_hooks=hooks) as client:
            chats = await client.messages.chats()
    assert len(chats) == 2
    assert seen == [200]  # the hook after the broken one still ran, and was awaited
    warnings = [r for r in caplog.records if "event hook" in r.getMessage()]
    assert len(warnings) == 2
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in warnings)


async def test_a_cancelled_hook_cancels_the_call_and_frees_its_slot(
    server: MessagesServer,
) -> None:
    started = asyncio.Event()

    async def waits_forever(view: ma.RequestView) -> None:
        started.set()
        await asyncio.Event().wait()

    async with client_for(server, event_hooks={"request": [waits_forever]}) as client:
        task = asyncio.create_task(client.messages.chats())
        await started.wait()
        assert client.stats.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.stats.in_flight == 0
    assert server.resource_requests() == []


def test_hook_arguments_are_checked_before_anything_is_sent(server: MessagesServer) -> None:
    with pytest.raises(TypeError, match="dict of event name"):
        make_client(server, event_hooks=[print])
    with pytest.raises(ValueError, match="unknown event_hooks 'answer'"):
        make_client(server, event_hooks={"answer": [print]})
    with pytest.raises(TypeError, match="must be a list of functions"):
        make_client(server, event_hooks={"response": print})
    with pytest.raises(TypeError, match="holds str, not a function"):
        make_client(server, event_hooks={"response": ["print"]})
    make_client(server, event_hooks={})  # no hooks at all is fine
