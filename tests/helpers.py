"""Helpers shared by the test modules: a client for an emulator, and what was left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import messages_async as ma
from messages_async.testing import MessagesServer, RequestRecord


def make_client(server: MessagesServer, **options: Any) -> ma.Client:
    """A client of ``server`` that backs off for milliseconds, not seconds."""
    settings: dict[str, Any] = {
        "token_url": server.token_url,
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    settings.update(options)
    return ma.Client(**settings)


@contextlib.asynccontextmanager
async def client_for(server: MessagesServer, **options: Any) -> AsyncIterator[ma.Client]:
    async with make_client(server, **options) as client:
        yield client


def listings(server: MessagesServer) -> list[RequestRecord]:
    return [r for r in server.resource_requests() if r.path == "messages/"]


def acquired(client: ma.Client) -> int:
    # Private on purpose: aiohttp's TCPConnector keeps the connections handed out to requests
    # in ``_acquired``; zero means every connection went back to the pool or was closed.
    connector = client._sessions.session.connector
    assert connector is not None
    return len(connector._acquired)


def client_side_tasks() -> set[asyncio.Task[Any]]:
    """Tasks besides this one, leaving out the emulator's own per-connection server tasks."""
    return {
        task
        for task in asyncio.all_tasks() - {asyncio.current_task()}
        if "aiohttp/web_" not in getattr(task.get_coro(), "cr_code", _NO_CODE).co_filename
    }


_NO_CODE = client_side_tasks.__code__


async def assert_nothing_left(client: ma.Client, *, rounds: int = 0) -> None:
    """No task besides this one, and no connection still handed out.

    ``rounds`` lets the event loop run a few steps first: a generator left by ``break`` is
    closed by asyncio's finalizer, which schedules its ``aclose()`` at once but as a task.
    """
    for _ in range(rounds):
        if not client_side_tasks():
            break
        await asyncio.sleep(0)
    others = client_side_tasks()
    assert not others, f"still running: {others}"
    assert acquired(client) == 0
