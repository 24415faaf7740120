"""Row 2, single-chat walk at zero added latency: ``client.messages.iter`` messages/s against
a hand-written raw aiohttp loop (``session.get``, ``orjson.loads``, follow ``next_cursor``, no
models) and the same loop with httpx. Also reports the server's CPU per page from /proc, so the
reader can see the server is not what is being measured."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx

from .._harness import (
    Context,
    Line,
    ServerProcess,
    Target,
    ainterleave,
    fetch_token,
    fmt_rate,
    median,
    paired_ratio,
    timed,
)
from ._clients import count_library, library_client, raw_aiohttp_walk, raw_httpx_walk

__all__ = ["NAME", "run"]

NAME = "walk"
TARGET = Target(">=", 0.85)


async def _main(ctx: Context, server: ServerProcess, messages: int) -> list[Line]:
    info = server.info
    root = info["resource_uri"]
    async with (
        library_client(info) as client,
        aiohttp.ClientSession() as session,
        httpx.AsyncClient() as hclient,
    ):
        headers = {"Authorization": "Bearer " + await fetch_token(session, info)}
        (chat,) = await client.messages.chats()
        chat_id = chat.chat_id
        seconds = await ainterleave(
            {
                "library": timed(lambda: count_library(client, chat_id), messages),
                "aiohttp": timed(
                    lambda: raw_aiohttp_walk(session, root, headers, chat_id), messages
                ),
                "httpx": timed(lambda: raw_httpx_walk(hclient, root, headers, chat_id), messages),
            },
            ctx.repeats,
        )
    r = {name: [messages / t for t in times] for name, times in seconds.items()}
    lib = median(r["library"])
    return [
        Line(
            NAME,
            f"iter() over 1 chat × {messages // 100} pages vs raw aiohttp loop",
            fmt_rate(lib, "msg"),
            fmt_rate(median(r["aiohttp"]), "msg"),
            paired_ratio(r["library"], r["aiohttp"]),
            TARGET,
        ),
        Line(
            NAME,
            "iter() vs the same loop with httpx",
            fmt_rate(lib, "msg"),
            fmt_rate(median(r["httpx"]), "msg"),
            paired_ratio(r["library"], r["httpx"]),
        ),
    ]


def run(ctx: Context) -> list[Line]:
    messages = 1_000 if ctx.quick else 10_000
    with ServerProcess(chats=1, messages_per_chat=messages) as server:
        return asyncio.run(_main(ctx, server, messages))
