"""A bot's reply latency against the requests its watch costs, for several watch settings.

A bot watches its chats and answers each ``ping`` with a ``pong``. Once every chat has gone
quiet (each polled every ``max_interval``), a user writes the first message in a chat: how long
until the bot's answer is stored? That wait is what the settings trade against the requests
per second quiet chats cost (about ``chats / max_interval``). Each setting runs in its own
client over its own chats, side by side against one server process, with one ping per chat at
a random moment.

Each run is sped up (every interval divided by the setting's ``interval / SCALED_INTERVAL``),
and the latencies and rates are scaled back to the setting's own seconds, so minutes of
watching fit in seconds. What is not sped up (round trips, the bot's own work: milliseconds)
is magnified by the same factor, which only makes the latencies look worse than a bot would
see them; the speed-up is chosen per setting so that an interval is never shorter than
``SCALED_INTERVAL`` of real time, where that magnification stays small.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from typing import Any

import messages_async as ma

from .._harness import Context, Line, ServerProcess, Target
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "reply"
#: The first message in a quiet chat is answered within max_interval (plus a round trip).
TARGET = Target("<=", 1.1)
#: Real seconds an interval takes in the sped-up runs.
SCALED_INTERVAL = 0.2
#: watch()'s defaults: interval, and max_interval as a multiple of it.
DEFAULT_INTERVAL = 1.0
DEFAULT_CAP_FACTOR = 10.0
#: (interval, max_interval, what) in seconds, as a bot would set them.
SETTINGS: tuple[tuple[float, float, str], ...] = (
    (DEFAULT_INTERVAL, DEFAULT_INTERVAL * DEFAULT_CAP_FACTOR, "defaults"),
    (2.0, 30.0, "previous defaults"),
    (1.0, 5.0, "tighter"),
    (0.5, 2.0, "tightest"),
)


async def _bot(client: ma.Client, watch: ma.Watch, pongs: dict[int, float]) -> None:
    loop = asyncio.get_running_loop()
    async for chat_id, message in watch:
        if message.message.startswith("ping"):
            await client.messages.add(chat_id, "pong")
            pongs[chat_id] = loop.time()


async def _measure(
    info: dict[str, Any], chats: list[int], interval: float, cap: float, speedup: float, seed: int
) -> tuple[list[float], float]:
    """Reply latencies and quiet requests/s per chat, in the setting's own seconds."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    step = cap / speedup
    pings: dict[int, float] = {}
    pongs: dict[int, float] = {}
    async with (
        library_client(info) as bot,
        library_client(info) as user,
        bot.messages.watch(chats, interval=interval / speedup, max_interval=step) as watch,
    ):
        consumer = asyncio.create_task(_bot(bot, watch, pongs), name="reply bot")
        try:
            await watch.ready()
            # Growth by half per quiet poll plus the random phase: every chat is at the cap
            # after about three caps. The cost is counted over the fourth, before any ping.
            await asyncio.sleep(3 * step)
            quiet_from, base = loop.time(), bot.stats.requests
            await asyncio.sleep(step)
            cost = (bot.stats.requests - base) / (loop.time() - quiet_from) / len(chats)
            start = loop.time()
            for at, chat_id in sorted((rng.uniform(0, 2 * step), c) for c in chats):
                await asyncio.sleep(max(0.0, start + at - loop.time()))
                await user.messages.add(chat_id, f"ping {chat_id}")
                pings[chat_id] = loop.time()
            async with asyncio.timeout(3 * step + 10):
                while len(pongs) < len(chats):
                    if consumer.done():
                        consumer.result()  # the bot failed: raise its error
                        raise RuntimeError("the bot stopped")
                    await asyncio.sleep(step / 50)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    latencies = [(pongs[c] - pings[c]) * speedup for c in chats]
    return latencies, cost / speedup


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _main(ctx: Context, info: dict[str, Any], per: int, scaled: float) -> list[Line]:
    settings = SETTINGS[:2] if ctx.quick else SETTINGS
    async with library_client(info) as lister:
        ids = sorted(c.chat_id for c in await lister.messages.chats())
    groups = [ids[k * per : (k + 1) * per] for k in range(len(settings))]
    results = await asyncio.gather(
        *(
            _measure(info, group, interval, cap, interval / scaled, seed)
            for seed, (group, (interval, cap, _)) in enumerate(zip(groups, settings, strict=True))
        )
    )
    lines: list[Line] = []
    p50s = []
    for (interval, cap, what), (latencies, cost) in zip(settings, results, strict=True):
        p50, p95 = statistics.median(latencies), _quantile(latencies, 0.95)
        p50s.append(p50)
        ctx.log(
            f"reply: {what}: latencies {' '.join(f'{x:.1f}' for x in sorted(latencies))} s; "
            f"cost {cost * 100:.2f} req/s per 100 quiet chats"
        )
        lines.append(
            Line(
                NAME,
                f"{what} (interval {interval:g} s, max_interval {cap:g} s): first message in "
                f"a quiet chat, p95 reply (p50 {p50:.1f} s) vs max_interval",
                f"{p95:.1f} s",
                f"{cap:g} s",
                p95 / cap,
                TARGET,
            )
        )
        lines.append(
            Line(
                NAME,
                f"{what}: quiet chats' cost per 100 chats vs 100 / max_interval",
                f"{cost * 100:.1f} req/s",
                f"{100 / cap:.1f} req/s",
                cost * cap,
            )
        )
    lines.append(
        Line(
            NAME,
            "defaults vs previous defaults: p50 reply to a quiet chat",
            f"{p50s[0]:.1f} s",
            f"{p50s[1]:.1f} s",
            p50s[0] / p50s[1],
        )
    )
    return lines


def run(ctx: Context) -> list[Line]:
    per, scaled = (6, 0.02) if ctx.quick else (30, SCALED_INTERVAL)
    chats = per * (2 if ctx.quick else len(SETTINGS))
    with ServerProcess(chats=chats, messages_per_chat=5) as server:
        return asyncio.run(_main(ctx, server.info, per, scaled))
