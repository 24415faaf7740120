"""A pytest plugin for testing code that uses messages_async (bots above all).

Installed with the package and loaded by pytest through the ``pytest11`` entry point
``messages_async``, so its fixtures are simply there; without the entry point, load it with
``pytest -p messages_async.testing._plugin``. The fixtures:

- ``messages_server``: a running, seeded :class:`MessagesServer` (fault injection through
  ``messages_server.inject(...)``, messages from other users through
  ``messages_server.post_message(chat_id, text, uid=...)``). Configure it with the
  ``@pytest.mark.messages_server(chats=..., latency=...)`` marker, or by overriding the
  ``messages_server_options`` fixture; both take :class:`MessagesServer` keyword arguments.
- ``messages_client``: an open :class:`messages_async.Client` connected to it, closed after
  the test; ``messages_client_options`` overrides its keyword arguments.
- ``messages_wait_polled``: ``await messages_wait_polled(chat_ids=None)`` waits until every
  given chat (default: every chat) has been listed successfully, e.g. by a bot's watch, so
  what a test posts next counts as new.
- ``messages_wait_for``: ``await messages_wait_for(chat_id, predicate)`` waits until the chat
  holds a message (a raw dict, as the server sends it) for which ``predicate`` is true.

The fixtures are async; they run under pytest-asyncio (``asyncio_mode = "auto"``, or mark the
tests with ``@pytest.mark.asyncio``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest

import messages_async as ma

from ._server import MessagesServer

try:
    # pytest-asyncio's own decorator: the async fixtures then work in its strict mode too.
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # pragma: no cover - without pytest-asyncio another async plugin must run them
    _async_fixture = pytest.fixture  # type: ignore[assignment]

__all__ = [
    "messages_client",
    "messages_client_options",
    "messages_server",
    "messages_server_options",
    "messages_wait_for",
    "messages_wait_polled",
]

#: The server a test gets unless it asks for another: small, fast and always the same data.
DEFAULT_SERVER_OPTIONS: dict[str, Any] = {"chats": 3, "messages_per_chat": 10, "seed": 0}

_POLL = 0.01
#: Seconds the wait helpers wait before raising ``TimeoutError``.
WAIT_TIMEOUT = 10.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "messages_server(**options): MessagesServer keyword arguments for the messages_server "
        "fixture (e.g. chats=10, latency=0.01, rate_limit=50)",
    )


@pytest.fixture
def messages_server_options() -> dict[str, Any]:
    """Keyword arguments for the ``messages_server`` fixture's MessagesServer; override it."""
    return {}


@pytest.fixture
def messages_client_options() -> dict[str, Any]:
    """Keyword arguments for the ``messages_client`` fixture's Client; override it."""
    return {}


@_async_fixture
async def messages_server(
    request: pytest.FixtureRequest, messages_server_options: dict[str, Any]
) -> AsyncIterator[MessagesServer]:
    """A running, seeded emulator of the Messages API, closed after the test."""
    options = {**DEFAULT_SERVER_OPTIONS, **messages_server_options}
    marker = request.node.get_closest_marker("messages_server")
    if marker is not None:
        if marker.args:
            raise TypeError(
                "the messages_server marker takes keyword arguments only, e.g. "
                "@pytest.mark.messages_server(chats=10)"
            )
        options.update(marker.kwargs)
    async with MessagesServer(**options) as server:
        yield server


@_async_fixture
async def messages_client(
    messages_server: MessagesServer, messages_client_options: dict[str, Any]
) -> AsyncIterator[ma.Client]:
    """An open client of ``messages_server``, acting as its default user; closed afterwards."""
    options: dict[str, Any] = {
        "token_url": messages_server.token_url,
        "client_id": messages_server.client_id,
        "client_secret": messages_server.client_secret,
        # Retries that wait milliseconds, not seconds: tests with injected faults stay fast.
        "backoff_base": 0.01,
        "backoff_max": 0.1,
    }
    options.update(messages_client_options)
    async with ma.Client(**options) as client:
        yield client


WaitPolled = Callable[..., Awaitable[None]]
WaitFor = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def messages_wait_polled(messages_server: MessagesServer) -> WaitPolled:
    """``await messages_wait_polled(chat_ids=None)``.

    Waits until each chat (default: every chat of the server) has had a listing answered
    with 200. A watch takes the newest message of that answer as its starting point, so any
    message posted afterwards is new to it. ``TimeoutError`` after ``WAIT_TIMEOUT`` seconds
    (wrap the call in ``asyncio.timeout(...)`` to give up sooner).
    """

    async def wait(chat_ids: Iterable[int] | None = None) -> None:
        wanted = {str(c) for c in (messages_server.chat_ids() if chat_ids is None else chat_ids)}
        async with asyncio.timeout(WAIT_TIMEOUT):
            while True:
                polled = {
                    r.query.get("chat_id")
                    for r in messages_server.resource_requests()
                    if r.path == "messages/" and r.status == 200
                }
                if wanted <= polled:
                    return
                await asyncio.sleep(_POLL)

    return wait


@pytest.fixture
def messages_wait_for(messages_server: MessagesServer) -> WaitFor:
    """``await messages_wait_for(chat_id, predicate)`` → the message dict.

    Waits until the chat holds a message for which ``predicate(message)`` is true (newest
    first), e.g. ``lambda m: m["message"].startswith("echo:")``. ``TimeoutError`` after
    ``WAIT_TIMEOUT`` seconds (wrap the call in ``asyncio.timeout(...)`` to give up sooner).
    """

    async def wait(chat_id: int, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_TIMEOUT):
            while True:
                for message in messages_server.messages(chat_id):
                    if predicate(message):
                        return message
                await asyncio.sleep(_POLL)

    return wait
