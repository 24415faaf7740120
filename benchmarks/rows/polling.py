"""Polling cost: ``client.messages.watch`` over many quiet chats (nothing is ever posted).

The naive bot polls every chat every ``interval``: ``chats / interval`` requests per second.
The watch backs a quiet chat off by a factor per empty poll up to ``max_interval`` (default
``10 × interval``), so once every chat has backed off the rate should settle near
``chats / max_interval``. The row counts the requests the client sent (``client.stats``
deltas: the server process records nothing) over a window that starts after the back-off has
had time to reach the cap, and over the first second, before it settles.
"""

from __future__ import annotations

import asyncio
from typing import Any

import messages_async as ma

from .._harness import Context, Line, ServerProcess, Target, fmt_rate
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "polling"
TARGET = Target("<=", 0.2)
CAP_FACTOR = 10  # watch()'s default max_interval, as a multiple of interval
# The back-off (×1.5 per quiet poll, ±10 % jitter) reaches the cap after ~2.2 × max_interval;
# the window opens later than that, and spans whole cap periods so every chat polls in it.
SETTLE_CAPS = 3
WINDOW_CAPS = 2


async def _consume(watch: ma.Watch) -> None:
    async for chat_id, message in watch:
        raise RuntimeError(f"a quiet chat got a message: chat {chat_id}, id {message.id}")
    raise RuntimeError("the watch ended")


async def _main(ctx: Context, info: dict[str, Any], chats: int, interval: float) -> list[Line]:
    cap = interval * CAP_FACTOR
    first = 1.0 if not ctx.quick else 5 * interval
    settle, window = SETTLE_CAPS * cap, WINDOW_CAPS * cap
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, int]] = []
    async with library_client(info) as client:
        watch = client.messages.watch(interval=interval)  # max_interval: the default
        start = loop.time()
        base = client.stats.requests
        consumer = asyncio.create_task(_consume(watch), name="polling consumer")
        try:
            step = cap / 6
            marks = sorted(
                {first, *(k * step for k in range(1, round((settle + window) / step) + 1))}
            )
            for mark in marks:
                await asyncio.wait({consumer}, timeout=max(0.0, start + mark - loop.time()))
                if consumer.done():
                    consumer.result()  # the watch failed: raise its error
                samples.append((loop.time() - start, client.stats.requests - base))
            watched = len(watch.chat_ids)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await watch.aclose()
    if watched != chats:
        raise RuntimeError(f"the watch followed {watched} chats, expected {chats}")

    def count_at(t: float) -> tuple[float, int]:
        return min(samples, key=lambda s: abs(s[0] - t))

    t_first, n_first = count_at(first)
    t0, n0 = count_at(settle)
    t1, n1 = count_at(settle + window)
    early = n_first / t_first
    settled = (n1 - n0) / (t1 - t0)
    naive = chats / interval
    floor = chats / cap
    previous = (0.0, 0)
    trace = []
    for t, n in samples:
        trace.append(f"{t:.1f}s:{(n - previous[1]) / (t - previous[0]):.0f}")
        previous = (t, n)
    ctx.log(f"polling: requests/s per step: {' '.join(trace)}")
    what = f"{chats} quiet chats, interval {interval:g} s, max_interval {cap:g} s"
    return [
        Line(
            NAME,
            f"watch() {what}: settled (t={t0:.1f}–{t1:.1f} s) vs naive chats/interval",
            fmt_rate(settled, "req"),
            fmt_rate(naive, "req"),
            settled / naive,
            TARGET,
        ),
        Line(
            NAME,
            f"watch() first {t_first:.1f} s (before it settles) vs naive chats/interval",
            fmt_rate(early, "req"),
            fmt_rate(naive, "req"),
            early / naive,
        ),
        Line(
            NAME,
            "watch() settled vs chats/max_interval (every quiet chat at the cap)",
            fmt_rate(settled, "req"),
            fmt_rate(floor, "req"),
            settled / floor,
        ),
    ]


def run(ctx: Context) -> list[Line]:
    chats, interval = (40, 0.05) if ctx.quick else (200, 0.2)
    with ServerProcess(chats=chats, messages_per_chat=100) as server:
        return asyncio.run(_main(ctx, server.info, chats, interval))
