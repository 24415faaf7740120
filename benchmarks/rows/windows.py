"""Row: one huge chat walked in W time windows at once (``iter_windows``) vs one serial walk.

A chat of 200,000 messages at 50 ms server latency: the serial walk (``iter()``, its cursors a
chain) takes one round trip per page whatever the concurrency. ``iter_windows(windows=W)``
plans W windows of about equal count (``limit=1`` probes on ``total_count``; its time is
included) and walks them at once through the same client, whose concurrency is 8. Target:
a speed-up of at least 0.8 × W; each line also checks that the windowed walk handed out
exactly the serial walk's ids, in the same order once the windows are put newest first.
The serial walk takes minutes at this size, so it runs once; each windowed walk runs once too.
"""

from __future__ import annotations

import asyncio
import time

import messages_async as ma

from .._harness import Context, Line, ServerProcess, Target, fmt_seconds
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "windows"
TARGET = Target(">=", 0.8)
LATENCY = 0.05
CONCURRENCY = 8
WINDOWS = (2, 4, 8)


async def _serial(client: ma.Client, chat_id: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = [m.id async for m in client.messages.iter(chat_id, limit=100)]
    return time.perf_counter() - start, ids


async def _windowed(client: ma.Client, chat_id: int, windows: int) -> tuple[float, list[int], int]:
    start = time.perf_counter()
    by_window: dict[int, list[int]] = {}
    async for item in client.messages.iter_windows(
        chat_id, windows=windows, limit=100, concurrency=CONCURRENCY
    ):
        by_window.setdefault(item.window.index, []).extend(m.id for m in item.page.items)
    seconds = time.perf_counter() - start
    return seconds, [i for w in sorted(by_window) for i in by_window[w]], len(by_window)


async def _main(ctx: Context, server: ServerProcess, messages: int) -> list[Line]:
    async with library_client(server.info, max_concurrency=CONCURRENCY) as client:
        (chat,) = await client.messages.chats()
        chat_id = chat.chat_id
        ctx.log(f"serial walk of {messages} messages at {LATENCY * 1000:.0f} ms ...")
        serial_s, serial_ids = await _serial(client, chat_id)
        lines = []
        for w in WINDOWS:
            ctx.log(f"{w} windows ...")
            seconds, ids, used = await _windowed(client, chat_id, w)
            speedup = serial_s / seconds
            exact = "exact" if ids == serial_ids else "ROWS DIFFER"
            lines.append(
                Line(
                    NAME,
                    f"{messages // 1000}k msgs, {LATENCY * 1000:.0f} ms, {used} windows: "
                    f"speed-up {speedup:.2f}× ÷ W ({exact})",
                    fmt_seconds(seconds),
                    fmt_seconds(serial_s),
                    speedup / w if ids == serial_ids else 0.0,
                    TARGET,
                )
            )
        return lines


def run(ctx: Context) -> list[Line]:
    messages = 20_000 if ctx.quick else 200_000
    with ServerProcess(chats=1, messages_per_chat=messages, latency=LATENCY) as server:
        return asyncio.run(_main(ctx, server, messages))
