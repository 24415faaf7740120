"""Holes a hostile server, a careless caller and a closing client used to find (issue 11).

Each fault is injected for real against the emulator over loopback; assertions are on what the
client raised and what the server observed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from helpers import make_client

import messages_async as ma
from messages_async._secret import Secret
from messages_async.testing import Fault, MessagesServer

ROOT = Path(__file__).resolve().parent.parent
#: Frames whose locals must never hold a secret: the library's, and aiohttp's below it (they
#: hold the request headers, the bearer token among them).
_LIBRARY = (str(Path(ma.__file__).resolve().parent), str(Path(aiohttp.__file__).resolve().parent))


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=3, messages_per_chat=10, seed=5) as srv:
        yield srv


def _token_answer(server: MessagesServer, access_token: str, **more: Any) -> Fault:
    body = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": 3600,
        "resource_uri": server.resource_uri,
        **more,
    }
    return Fault.malformed(orjson.dumps(body))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: connecting to it is refused


# --- secrets in frames -------------------------------------------------------------------------


def _holds(value: object, needles: list[str], depth: int, seen: set[int]) -> list[str]:
    """The needles found in ``value`` or in what it holds (containers, attributes)."""
    if id(value) in seen or depth < 0 or isinstance(value, Secret):
        return []  # a Secret is the one place a secret may live
    seen.add(id(value))
    if isinstance(value, (str, bytes, bytearray)):
        text = value if isinstance(value, str) else bytes(value).decode("latin-1")
        return [n for n in needles if n in text]
    found = [n for n in needles if n in repr(value)] if depth == 4 else []
    children: list[object] = []
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = list(value)
    else:
        children = list(getattr(value, "__dict__", {}).values())
        for slot in getattr(type(value), "__slots__", ()):
            children.append(getattr(value, slot, None))
    for child in children:
        found += _holds(child, needles, depth - 1, seen)
    return found


def leaks(exc: BaseException, needles: list[str]) -> list[str]:
    """Secrets in the exception's chain: messages, reprs, and its frames' locals (deeply)."""
    found: list[str] = []
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current) + repr(current) + "".join(getattr(current, "__notes__", []))
        found += [n for n in needles if n in text]
        for frame, _ in traceback.walk_tb(current.__traceback__):
            if frame.f_code.co_filename.startswith(_LIBRARY):
                found += _holds(frame.f_locals, needles, 4, set())
        todo += [current.__cause__, current.__context__]
    return found


# --- 1. every body is capped -------------------------------------------------------------------

_RSS_CHILD = textwrap.dedent(
    """
    import asyncio, json, resource, sys
    import messages_async as ma
    from messages_async.testing import Fault, MessagesServer

    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    async def main():
        results = {}
        async with MessagesServer(chats=1, messages_per_chat=1) as server:
            for name, fault in (
                ("plain", Fault.oversized(size=200 * 2**20)),
                ("gzip", Fault.oversized(size=200 * 2**20, gzip=True)),
            ):
                server.inject(fault, path="oauth/token")
                before = rss_mib()
                client = ma.Client(
                    token_url=server.token_url,
                    client_id=server.client_id,
                    client_secret=server.client_secret,
                    max_retries=0,
                )
                try:
                    await client.open()
                    outcome = "opened"
                except ma.MessagesError as exc:
                    outcome = type(exc).__name__
                finally:
                    await client.aclose()
                results[name] = {"outcome": outcome, "grew_mib": rss_mib() - before}
        print(json.dumps(results))

    asyncio.run(main())
    """
)


def test_a_200_mb_token_answer_is_cut_off_with_flat_memory() -> None:
    # In a child process, so that the peak RSS is this scenario's alone.
    result = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    for name, run in runs.items():
        assert run["outcome"] == "AuthError", (name, run)
        # Read whole, 200 MB is 200+ MiB of peak RSS; capped, the answer costs nothing
        # measurable next to the interpreter (the gzip run's own compressed payload aside).
        assert run["grew_mib"] < 40, (name, run)


async def test_an_oversized_token_answer_says_what_is_wrong(server: MessagesServer) -> None:
    server.inject(Fault.oversized(size=2 * 2**20), path="oauth/token")
    client = make_client(server, max_retries=0)
    with pytest.raises(ma.AuthError, match=r"more than 65536 bytes.*check token_url"):
        await client.open()


async def test_an_error_body_is_read_no_further_than_64_kib(server: MessagesServer) -> None:
    server.inject(Fault.status(500, body=b"<html>" + b"x" * (8 * 2**20), content_type="text/html"))
    async with make_client(server, max_retries=0) as client:
        with pytest.raises(ma.ServerError, match="more than 65536 bytes") as info:
            await client.messages.chats()
    assert info.value.status == 500


# --- 3. a token that is not RFC 6750 syntax ----------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["at_good\r\nX-Injected: 1", "at with spaces", "at_\x00nul", "at_é_non_ascii"],
    ids=["crlf", "space", "nul", "non-ascii"],
)
async def test_a_token_with_control_characters_is_refused_at_the_exchange(
    server: MessagesServer, bad: str
) -> None:
    server.inject(_token_answer(server, bad), path="oauth/token")
    client = make_client(server)
    with pytest.raises(ma.AuthError, match="not RFC 6750 token syntax") as info:
        await client.open()
    assert not leaks(info.value, [bad, "at_good", server.client_secret])
    assert not server.resource_requests()  # it was never sent


def test_a_pre_issued_token_with_control_characters_is_refused_at_once() -> None:
    with pytest.raises(ma.ConfigurationError, match="RFC 6750") as info:
        ma.Client(access_token="zq9\r\nzq9", resource_uri="http://127.0.0.1:1/api/")
    assert not leaks(info.value, ["zq9"])


async def test_no_error_path_carries_a_secret(server: MessagesServer) -> None:
    errors: list[BaseException] = []
    secret = server.client_secret

    async def expect(call: Any) -> None:
        try:
            await call
        except ma.MessagesError as exc:
            errors.append(exc)
        else:
            raise AssertionError("expected an error")

    async with make_client(server) as client:
        await client.messages.chats()
        once = client.with_options(max_retries=0, timeout=0.3)
        for fault in (
            Fault.status(500),
            Fault.status(503, retry_after="0"),
            Fault.drop(),
            Fault.drop_after_commit(),
            Fault.malformed(),
            Fault.wrong_shape(),
            Fault.oversized(size=40 * 2**20),
            Fault.delay(2.0),
            Fault.expire_token(),
        ):
            server.inject(fault, times=None)
            await expect(once.messages.chats())
            server.clear_faults()
        server.inject(Fault.status(500), path="oauth/token", times=None)
        server.expire_tokens()
        await expect(once.messages.chats())  # the renewal fails
        server.clear_faults()
    tokens = {r.token for r in server.resource_requests() if r.token}
    for fault in (Fault.status(401), Fault.status(503), Fault.drop(), Fault.malformed()):
        server.inject(fault, path="oauth/token", times=None)
        await expect(make_client(server, max_retries=1).open())
        server.clear_faults()
    await expect(
        ma.Client(
            token_url=f"http://127.0.0.1:{_free_port()}/oauth/token",
            client_id="c",
            client_secret=secret,
            max_retries=1,
            backoff_base=0.01,
        ).open()
    )
    assert len(errors) == 15, [str(e) for e in errors]
    assert len(tokens) >= 2, [str(e) for e in errors]
    for exc in errors:
        assert not leaks(exc, [secret, *tokens]), (type(exc), str(exc))


# --- 4. closing with calls in flight -----------------------------------------------------------


async def test_every_call_cut_short_by_aclose_raises_client_closed() -> None:
    async with MessagesServer(chats=2, messages_per_chat=5) as server:
        client = make_client(server, max_concurrency=100)
        await client.open()
        # A new client widens its window with each success (slow start): open it all the way.
        await asyncio.gather(*(client.messages.chats() for _ in range(100)))
        assert client.stats.concurrency == 100
        server.latency = 0.5
        calls = [asyncio.create_task(client.messages.chats()) for _ in range(100)]
        async with asyncio.timeout(10):
            while server.in_flight < 100:
                await asyncio.sleep(0.01)
        await client.aclose()
        results = await asyncio.gather(*calls, return_exceptions=True)
    kinds = {type(r).__name__ for r in results}
    assert kinds == {"ClientClosedError"}, kinds
    assert all("closed while chats was in flight" in str(r) for r in results)


async def test_a_call_waiting_for_a_slot_when_the_client_closes_raises_client_closed(
    server: MessagesServer,
) -> None:
    server.latency = 0.3
    client = make_client(server, max_concurrency=1)
    await client.open()
    calls = [asyncio.create_task(client.messages.chats()) for _ in range(5)]
    while server.in_flight < 1:
        await asyncio.sleep(0.01)
    await client.aclose()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert {type(r) for r in results} == {ma.ClientClosedError}


# --- 5. another event loop ---------------------------------------------------------------------


async def test_a_call_from_another_event_loop_is_refused_before_sending(
    server: MessagesServer,
) -> None:
    async with make_client(server) as client:
        await client.messages.chats()
        sent = len(server.resource_requests())

        def elsewhere() -> BaseException | None:
            async def call() -> None:
                await client.messages.chats()

            try:
                asyncio.run(call())
            except BaseException as exc:
                return exc
            return None

        exc = await asyncio.to_thread(elsewhere)
        assert isinstance(exc, ma.EventLoopError), repr(exc)
        assert isinstance(exc, RuntimeError)
        assert "opened in another event loop" in str(exc)
        assert "nothing was sent" in str(exc)
        assert len(server.resource_requests()) == sent
        await client.messages.chats()  # the client still works in its own loop


# --- answers that are not readable HTTP --------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"HTTP/1.1 two-hundred OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Encoding: gzip\r\n\r\nnot-gzip!!",
    ],
    ids=["header-too-big", "bad-status-line", "not-http", "bad-gzip"],
)
async def test_an_unreadable_answer_is_a_transport_error_that_keeps_no_token(
    answer: bytes,
) -> None:
    seen: list[bytes] = []

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    token = "at_hostile-answers-must-not-see-this"
    try:
        async with ma.Client(
            access_token=token,
            resource_uri=f"http://127.0.0.1:{port}/api/",
            max_retries=1,
            backoff_base=0.0,
        ) as client:
            with pytest.raises(ma.TransportError) as info:
                await client.messages.chats()
    finally:
        server.close()
        await server.wait_closed()
    assert len(seen) == 2  # a GET whose answer was lost is retried, once here
    assert "after 2 attempts" in str(info.value)
    assert not leaks(info.value, [token])


async def test_a_caller_session_closed_behind_the_clients_back_is_client_closed(
    server: MessagesServer,
) -> None:
    session = aiohttp.ClientSession()
    async with make_client(server, session=session) as client:
        await client.messages.chats()
        await session.close()
        with pytest.raises(ma.ClientClosedError, match=r"Client\(session=\.\.\.\) is closed"):
            await client.messages.chats()
    unopened = make_client(server, session=session)
    with pytest.raises(ma.ClientClosedError, match="is closed"):
        await unopened.open()


async def test_a_call_waiting_to_retry_is_ended_by_aclose_at_once(server: MessagesServer) -> None:
    server.inject(Fault.status(500), times=None)
    client = make_client(server, backoff_base=1000.0, backoff_max=1000.0)
    await client.open()
    call = asyncio.create_task(client.messages.chats())
    while not server.resource_requests():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the 500 is in, the call sleeps its backoff (up to 1000 s)
    await client.aclose()
    with pytest.raises(ma.ClientClosedError, match="waited to retry"):
        await asyncio.wait_for(call, timeout=10)
    assert len(server.resource_requests()) == 1
