"""The library client and the hand-written loops it is measured against, over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import httpx
import orjson

import messages_async as ma

__all__ = [
    "count_library",
    "library_client",
    "raw_aiohttp_fan_out",
    "raw_aiohttp_walk",
    "raw_httpx_walk",
]


def library_client(info: dict[str, Any], **options: Any) -> ma.Client:
    return ma.Client(
        token_url=info["token_url"],
        client_id=info["client_id"],
        client_secret=info["client_secret"],
        **options,
    )


async def count_library(client: ma.Client, chat_id: int, **options: Any) -> int:
    """``client.messages.iter`` over one chat, as a user would write it."""
    n = 0
    async for _ in client.messages.iter(chat_id, limit=100, **options):
        n += 1
    return n


async def raw_aiohttp_walk(
    session: aiohttp.ClientSession, root: str, headers: dict[str, str], chat_id: int
) -> int:
    """The fastest walk a user could write by hand: no models, no checks, no retries. It
    still visits every message, as the library's ``iter`` hands each one over."""
    n = 0
    url = f"{root}messages/?chat_id={chat_id}&limit=100"
    while url:
        async with session.get(url, headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"raw aiohttp walk: HTTP {r.status}")
            data = orjson.loads(await r.read())
        for _ in data["items"]:
            n += 1
        url = data["next_cursor"] or ""
    return n


async def raw_aiohttp_fan_out(
    session: aiohttp.ClientSession,
    root: str,
    headers: dict[str, str],
    chat_ids: list[int],
    concurrency: int,
) -> int:
    """The fastest fan-out a user could write by hand: ``concurrency`` tasks, each taking the
    next chat and walking it with :func:`raw_aiohttp_walk`; no models, no checks, no queue."""
    pending = list(reversed(chat_ids))
    counts: list[int] = []

    async def worker() -> None:
        while pending:
            counts.append(await raw_aiohttp_walk(session, root, headers, pending.pop()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sum(counts)


async def raw_httpx_walk(
    client: httpx.AsyncClient, root: str, headers: dict[str, str], chat_id: int
) -> int:
    """The same loop written with httpx."""
    n = 0
    url = f"{root}messages/?chat_id={chat_id}&limit=100"
    while url:
        r = await client.get(url, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"raw httpx walk: HTTP {r.status_code}")
        data = orjson.loads(r.content)
        for _ in data["items"]:
            n += 1
        url = data["next_cursor"] or ""
    return n
