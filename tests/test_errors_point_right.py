"""Errors that name the right cause, and give up in time (issue 12, bugs 2 and 4).

The command runs as a real process, as a user would run it; the TLS case runs a real TLS server
on loopback with a certificate nobody trusts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from helpers import make_client

import messages_async as ma
from messages_async.testing import Fault, MessagesServer


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=2, messages_per_chat=5, seed=2) as srv:
        yield srv


def _refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_")}
    env.update(values)
    return env


async def export(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "messages_async",
        "export",
        "--out",
        str(tmp_path / "x.sqlite"),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    text = err.decode()
    assert "Traceback" not in text, text
    return proc.returncode, text


# --- the command -------------------------------------------------------------------------------


async def test_an_unreachable_token_endpoint_says_so_while_waiting_and_exits_1(
    tmp_path: Path,
) -> None:
    env = _env(
        MESSAGES_TOKEN_URL=f"http://127.0.0.1:{_refused_port()}/oauth/token",
        MESSAGES_CLIENT_ID="someone",
        MESSAGES_CLIENT_SECRET="s3cr3t-never-shown",
    )
    code, err = await export(tmp_path, env, "--max-unreachable", "1.5")
    assert code == 1, err
    lines = err.splitlines()
    waits = [line for line in lines if "retrying in" in line]
    assert waits, err  # the wait is shown while it happens, with its cause
    assert all("could not connect (ClientConnectorError" in line for line in waits), err
    assert "refused the credentials" not in err
    assert "could not reach the token endpoint" in lines[-1]
    assert "would pass max_unreachable (1.5 s)" in lines[-1]
    assert "s3cr3t-never-shown" not in err


async def test_refused_credentials_still_exit_2(server: MessagesServer, tmp_path: Path) -> None:
    env = _env(
        MESSAGES_TOKEN_URL=server.token_url,
        MESSAGES_CLIENT_ID=server.client_id,
        MESSAGES_CLIENT_SECRET="wrong",
    )
    code, err = await export(tmp_path, env)
    assert code == 2
    assert "the server refused the credentials" in err
    assert "invalid_client" in err


async def test_a_wrong_token_url_path_is_called_a_wrong_url(
    server: MessagesServer, tmp_path: Path
) -> None:
    env = _env(
        MESSAGES_TOKEN_URL=server.token_origin + "/oauth/tokn",
        MESSAGES_CLIENT_ID=server.client_id,
        MESSAGES_CLIENT_SECRET=server.client_secret,
    )
    code, err = await export(tmp_path, env)
    assert code == 2
    assert "refused the credentials" not in err
    assert "HTTP 404: that URL looks wrong" in err
    assert "check token_url" in err


async def test_a_wrong_resource_uri_says_check_resource_uri(
    server: MessagesServer, tmp_path: Path
) -> None:
    env = _env(
        MESSAGES_ACCESS_TOKEN=server.issue_token(),
        MESSAGES_RESOURCE_URI=server.resource_origin + "/wrong/",
    )
    code, err = await export(tmp_path, env)
    assert code == 1
    assert "check resource_uri" in err
    assert "check the chat or message id" not in err


async def test_a_url_without_an_http_scheme_gets_our_own_message(tmp_path: Path) -> None:
    # The other shapes of the mistake are in test_wire.py; this is what the user sees.
    env = _env(
        MESSAGES_TOKEN_URL="auth.example.com/oauth/token",
        MESSAGES_CLIENT_ID="c",
        MESSAGES_CLIENT_SECRET="s",
    )
    code, err = await export(tmp_path, env)
    assert code == 2
    assert "token_url must be an absolute http(s) URL such as https://host/path" in err
    assert "does not start with https:// or http://" in err
    assert "replacement is not allowed" not in err


# --- the library -------------------------------------------------------------------------------


async def test_an_unreachable_api_host_is_a_transport_error_that_names_the_cause(
    server: MessagesServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="messages_async")
    client = ma.Client(
        access_token=server.issue_token(),
        resource_uri=f"http://127.0.0.1:{_refused_port()}/api/v1/",
        max_retries=50,
        backoff_base=0.05,
        backoff_max=0.2,
        max_unreachable=0.5,
    )
    async with client:
        with pytest.raises(ma.TransportError) as info:
            await client.messages.chats()
    text = str(info.value)
    assert "could not connect (ClientConnectorError" in text
    assert "would pass max_unreachable (0.5 s)" in text
    waits = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert waits
    assert all(w.startswith("chats: could not connect") for w in waits)
    assert len(waits) < 50  # given up on by time, long before max_retries


async def test_an_unreachable_token_endpoint_is_a_connection_error_not_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = ma.Client(
        token_url=f"http://127.0.0.1:{_refused_port()}/oauth/token",
        client_id="c",
        client_secret="s",
        max_retries=1,
        backoff_base=0.01,
    )
    with pytest.raises(ConnectionError) as info:
        await client.open()
    exc = info.value
    assert isinstance(exc, ma.TokenEndpointUnreachableError)
    assert isinstance(exc, ma.AuthError)
    assert isinstance(exc, ma.TransportError)
    assert exc.status is None
    assert exc.error is None
    assert "after 2 attempts" in str(exc)


async def test_one_attempt_is_one_attempt(server: MessagesServer) -> None:
    server.inject(Fault.drop(), path="oauth/token")
    client = make_client(server, max_retries=0)
    with pytest.raises(ma.TransportError, match="after 1 attempt in") as info:
        await client.open()
    assert "attempts" not in str(info.value)


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrusted_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_origin(untrusted_cert: tuple[Path, Path]) -> AsyncIterator[tuple[str, list[int]]]:
    cert, key = untrusted_cert
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handshakes: list[int] = []

    async def anything(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    original = context.wrap_bio

    def counted(*args: object, **kwargs: object) -> ssl.SSLObject:
        handshakes.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    context.wrap_bio = counted  # type: ignore[method-assign]
    try:
        yield f"https://127.0.0.1:{port}", handshakes
    finally:
        await runner.cleanup()


async def test_a_certificate_failure_is_not_retried(tls_origin: tuple[str, list[int]]) -> None:
    origin, handshakes = tls_origin
    client = ma.Client(
        token_url=origin + "/oauth/token",
        client_id="c",
        client_secret="s",
        max_retries=10,
        backoff_base=0.01,
    )
    with pytest.raises(ma.TokenEndpointUnreachableError) as info:
        await client.open()
    assert "TLS certificate or handshake failure" in str(info.value)
    assert "after 1 attempt in" in str(info.value)
    assert "certificate problem is not retried" in str(info.value)
    assert client.token_exchanges == 1
    assert len(handshakes) == 1

    api = ma.Client(access_token="tok", resource_uri=origin + "/api/", max_retries=10)
    async with api:
        with pytest.raises(ma.TransportError, match="after 1 attempt: TLS certificate"):
            await api.messages.chats()
    assert len(handshakes) == 2


async def test_a_failing_token_endpoint_is_an_outage_for_the_command(
    server: MessagesServer, tmp_path: Path
) -> None:
    server.inject(Fault.status(503, retry_after="0"), path="oauth/token", times=None)
    env = _env(
        MESSAGES_TOKEN_URL=server.token_url,
        MESSAGES_CLIENT_ID=server.client_id,
        MESSAGES_CLIENT_SECRET=server.client_secret,
    )
    code, err = await export(tmp_path, env)
    assert code == 1, err
    assert "unreachable or failing" in err
    assert "HTTP 503" in err
    assert "refused the credentials" not in err
    assert server.token_request_count == 11  # the export's max_retries of 10, then it stops


async def test_the_token_exchange_waits_out_retry_after(server: MessagesServer) -> None:
    server.inject(Fault.rate_limited(retry_after="0.4"), path="oauth/token")
    async with make_client(server, backoff_base=0.0, backoff_max=0.0) as client:
        assert client.scopes is not None
    sent = [r.started for r in server.requests if r.origin == "token"]
    assert len(sent) == 2
    assert sent[1] - sent[0] >= 0.35  # as the endpoint asked, not the (zero) backoff


async def test_an_unreachable_api_host_names_the_cause_and_exits_1(tmp_path: Path) -> None:
    env = _env(
        MESSAGES_ACCESS_TOKEN="at_unused",
        MESSAGES_RESOURCE_URI=f"http://127.0.0.1:{_refused_port()}/api/v1/",
    )
    code, err = await export(tmp_path, env, "--max-unreachable", "1")
    assert code == 1, err
    lines = err.splitlines()
    assert any(line.endswith("(retry 1 of 10)") for line in lines), err
    assert "could not export, the server is unreachable or failing" in lines[-1]
    assert "could not connect (ClientConnectorError" in lines[-1]
    assert "would pass max_unreachable (1 s)" in lines[-1]
