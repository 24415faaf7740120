"""Row 4, prefetch: one chat of 50 pages, 20 ms server latency, a consumer that spends 20 ms
on each page: ``client.messages.pages(prefetch=True)`` wall time against ``prefetch=False``.

The consumer's 20 ms are an ``await asyncio.sleep`` (work that waits, like a database write).
A second line, for information, uses a consumer that holds the CPU for 20 ms instead."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .._harness import Context, Line, ServerProcess, Target, fmt_seconds, median, paired_ratio
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "prefetch"
TARGET = Target("<=", 0.6)
LATENCY = 0.02
WORK = 0.02


async def _sleep_consumer() -> None:
    await asyncio.sleep(WORK)


async def _cpu_consumer() -> None:
    end = time.perf_counter() + WORK
    while time.perf_counter() < end:
        pass


async def _main(ctx: Context, info: dict[str, Any], pages: int) -> list[Line]:
    lines: list[Line] = []
    async with library_client(info) as client:
        (chat,) = await client.messages.chats()
        for consumer, label, target in (
            (_sleep_consumer, "awaits", TARGET),
            (_cpu_consumer, "holds the CPU", None),
        ):

            async def walk(prefetch: bool, consume: Any = consumer) -> float:
                start = time.perf_counter()
                n = 0
                async for _ in client.messages.pages(chat.chat_id, limit=100, prefetch=prefetch):
                    n += 1
                    await consume()
                if n != pages:
                    raise RuntimeError(f"walked {n} pages, expected {pages}")
                return time.perf_counter() - start

            await walk(True)
            on: list[float] = []
            off: list[float] = []
            for _ in range(min(ctx.repeats, 3)):
                on.append(await walk(True))
                off.append(await walk(False))
            lines.append(
                Line(
                    NAME,
                    f"{pages} pages, {LATENCY * 1000:g} ms latency, consumer {label} "
                    f"{WORK * 1000:g} ms/page: on vs off",
                    fmt_seconds(median(on)),
                    fmt_seconds(median(off)),
                    paired_ratio(on, off),
                    target,
                )
            )
    return lines


def run(ctx: Context) -> list[Line]:
    pages = 5 if ctx.quick else 50
    with ServerProcess(chats=1, messages_per_chat=pages * 100, latency=LATENCY) as server:
        return asyncio.run(_main(ctx, server.info, pages))
