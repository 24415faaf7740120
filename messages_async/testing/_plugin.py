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
- ``messages_wait_polled``: ``await messages_wait_polled(chat_ids=None)`` waits until the
  bot's ``watch()`` has its starting point in every chat (it awaits ``Watch.ready()``; for a
  bot that polls by itself, until each chat has been listed), so what a test posts next
  counts as new.
- ``messages_wait_for``: ``await messages_wait_for(chat_id, predicate)`` waits until the chat
  holds a message (a raw dict, as the server sends it) for which ``predicate`` is true.

The fixtures are async; they run under pytest-asyncio (``asyncio_mode = "auto"``, or mark the
tests with ``@pytest.mark.asyncio``). Setting ``asyncio_default_fixture_loop_scope =
"function"`` as well silences pytest-asyncio's warning that it is unset.
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


def _check_chats(server: MessagesServer, chat_ids: Iterable[object], helper: str) -> set[int]:
    """The chat ids, refused with a message that helps when the emulator has no such chat."""
    wanted: set[int] = set()
    for chat_id in chat_ids:
        if isinstance(chat_id, bool) or not isinstance(chat_id, int):
            raise TypeError(f"{helper}: a chat id is an int, got {chat_id!r}")
        wanted.add(chat_id)
    known = server.chat_ids()
    unknown = sorted(wanted - set(known))
    if unknown:
        shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
        raise LookupError(
            f"{helper}: the emulator has no chat {', '.join(map(str, unknown))}; its chats are "
            f"{shown} (messages_server.chat_ids())"
        )
    return wanted


WaitPolled = Callable[..., Awaitable[None]]
WaitFor = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def messages_wait_polled(
    messages_server: MessagesServer, monkeypatch: pytest.MonkeyPatch
) -> WaitPolled:
    """``await messages_wait_polled(chat_ids=None)``.

    Waits until the bot's watch has its starting point in every chat, so any message posted
    afterwards is new to it. Exact for bots that use ``client.messages.watch()``: every watch
    made during the test is awaited with :meth:`Watch.ready` (and ``LookupError`` if one of
    ``chat_ids`` is watched by none). For a bot that polls by itself, it waits until each chat
    (default: every chat of the server) has had a listing answered with 200 after the call.
    ``TimeoutError`` after ``WAIT_TIMEOUT`` seconds, saying which chats are missing;
    ``LookupError`` at once for a chat the emulator does not have.
    """
    watches: list[ma.Watch] = []
    original = ma.Messages.watch

    def recording_watch(self: ma.Messages, *args: Any, **kwargs: Any) -> ma.Watch:
        watch = original(self, *args, **kwargs)
        watches.append(watch)
        return watch

    monkeypatch.setattr(ma.Messages, "watch", recording_watch)

    async def wait(chat_ids: Iterable[int] | None = None) -> None:
        wanted = _check_chats(
            messages_server,
            messages_server.chat_ids() if chat_ids is None else chat_ids,
            "messages_wait_polled",
        )
        missing = wanted
        # Without a watch, only listings answered from now on count: the test's own calls
        # made before it started the bot must not pass for the bot's polls.
        since = len(messages_server.resource_requests())
        try:
            async with asyncio.timeout(WAIT_TIMEOUT):
                # One step first: a bot task created just before this call makes its watch now.
                await asyncio.sleep(_POLL)
                while not watches:
                    polled = {
                        int(r.query["chat_id"])
                        for r in messages_server.resource_requests()[since:]
                        if r.path == "messages/" and r.status == 200 and "chat_id" in r.query
                    }
                    missing = wanted - polled
                    if not missing:
                        return
                    await asyncio.sleep(_POLL)
                for watch in list(watches):
                    try:
                        await watch.ready()
                    except RuntimeError as exc:
                        if type(exc) is not RuntimeError:  # ClientClosedError and the like
                            raise
                        # "this watch was closed": one the test closed, not the bot's.
        except TimeoutError:
            raise TimeoutError(
                f"chats {sorted(missing)} were not polled within {WAIT_TIMEOUT:g} s: is the "
                "bot running, and does it watch these chats? (pass chat_ids=... for a subset)"
            ) from None

        if chat_ids is not None:
            missing = wanted - {c for w in watches for c in w.watermarks}
            if missing:
                raise LookupError(f"the bot's watch does not watch chats {sorted(missing)}")

    return wait


@pytest.fixture
def messages_wait_for(messages_server: MessagesServer) -> WaitFor:
    """``await messages_wait_for(chat_id, predicate)`` → the message dict.

    Waits until the chat holds a message for which ``predicate(message)`` is true (newest
    first), e.g. ``lambda m: m["message"].startswith("echo:")``. ``TimeoutError`` after
    ``WAIT_TIMEOUT`` seconds (wrap the call in ``asyncio.timeout(...)`` to give up sooner);
    ``LookupError`` at once for a chat the emulator does not have.
    """

    async def wait(chat_id: int, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        _check_chats(messages_server, [chat_id], "messages_wait_for")
        if not callable(predicate):
            raise TypeError(
                "messages_wait_for: predicate must be a function of the message dict, e.g. "
                f"lambda m: m['message'] == 'hi'; got {predicate!r}"
            )
        try:
            async with asyncio.timeout(WAIT_TIMEOUT):
                while True:
                    for message in messages_server.messages(chat_id):
                        if predicate(message):
                            return message
                    await asyncio.sleep(_POLL)
        except TimeoutError:
            newest = [m.get("message") for m in messages_server.messages(chat_id)[:3]]
            raise TimeoutError(
                f"no message in chat {chat_id} matched within {WAIT_TIMEOUT:g} s; its newest "
                f"texts: {newest}"
            ) from None

    return wait
