"""The emulator's own cost: server CPU per page request (from /proc, user + system time of
the server process) against the client CPU that ``client.messages.iter`` spends per page in
the same walk. Unless the first is well below the second, the other rows measure the server."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .._harness import Context, Line, ServerProcess, fetch_token, fmt_seconds, median
from ._clients import count_library, library_client, raw_aiohttp_walk

__all__ = ["NAME", "run"]

NAME = "server"


async def _main(ctx: Context, server: ServerProcess, messages: int) -> list[Line]:
    info = server.info
    pages = messages // 100
    server_cpu: list[float] = []
    client_cpu: list[float] = []
    raw_wall: list[float] = []
    async with library_client(info) as client, aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer " + await fetch_token(session, info)}
        (chat,) = await client.messages.chats()
        root = info["resource_uri"]
        # Warm the server's page cache: every later request is served from it, as in the rows.
        await raw_aiohttp_walk(session, root, headers, chat.chat_id)
        await count_library(client, chat.chat_id)
        for _ in range(ctx.repeats):
            before = server.cpu_seconds()
            start = time.perf_counter()
            await raw_aiohttp_walk(session, root, headers, chat.chat_id)
            raw_wall.append((time.perf_counter() - start) / pages)
            after = server.cpu_seconds()
            if before is not None and after is not None:
                server_cpu.append((after - before) / pages)
            cpu = time.process_time()
            await count_library(client, chat.chat_id)
            client_cpu.append((time.process_time() - cpu) / pages)
    if not server_cpu:
        return [Line(NAME, "server CPU per page request", "n/a (no /proc)", "—", None)]
    server_per, client_per = median(server_cpu), median(client_cpu)
    return [
        Line(
            NAME,
            "emulator CPU per 100-message page vs iter() client CPU per page",
            fmt_seconds(server_per),
            fmt_seconds(client_per),
            server_per / client_per,
        ),
        Line(
            NAME,
            "raw aiohttp round trip per page, wall (server + minimal client)",
            fmt_seconds(median(raw_wall)),
            "—",
            None,
        ),
    ]


def run(ctx: Context) -> list[Line]:
    # Enough pages that the 10 ms resolution of /proc CPU times is small next to the total.
    messages = 2_000 if ctx.quick else 20_000
    with ServerProcess(chats=1, messages_per_chat=messages) as server:
        return asyncio.run(_main(ctx, server, messages))
