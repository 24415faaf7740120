"""Row 5, rate-limited fan-out: a server that allows ``RATE`` requests/s (a token bucket of
``BURST``) and answers 429 with ``Retry-After`` beyond. ``iter_many`` messages/s against the
ceiling ``RATE × page size``, and the share of requests answered 429.

The bucket is kept small next to the run (a burst of ``BURST`` requests against ``RATE`` per
second over several seconds), so the ceiling is what the server allows in steady state; the
burst adds about ``BURST / duration`` requests/s on top, which the row's note states. Each
repeat uses a new client, as a one-off job would, and waits for the bucket to refill first.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from .._harness import Context, Line, ServerProcess, Target, fmt_rate, median, paired_ratio
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "ratelimit"
THROUGHPUT = Target(">=", 0.85)
SHARE_429 = Target("<=", 0.05)
LATENCY = 0.02
CONCURRENCY = 20
PAGE = 100


async def _main(
    ctx: Context, info: dict[str, Any], rate: float, burst: int, chats: int, per_chat: int
) -> list[Line]:
    total = chats * per_chat
    ceiling = rate * PAGE
    rates: list[float] = []
    shares: list[float] = []
    durations: list[float] = []
    for _ in range(1 if ctx.quick else 2):
        await asyncio.sleep(max(1.0, burst / rate) + 0.1)  # a full bucket, no pause pending
        # The client's defaults (max_retries=3): what a user gets without tuning anything.
        async with library_client(info, max_concurrency=CONCURRENCY) as client:
            chat_ids = [c.chat_id for c in await client.messages.chats()]
            before = client.stats
            start = time.perf_counter()
            n = 0
            async for _ in client.messages.iter_many(chat_ids, concurrency=CONCURRENCY, limit=PAGE):
                n += 1
            elapsed = time.perf_counter() - start
            after = client.stats
        if n != total:
            raise RuntimeError(f"iter_many yielded {n} messages, expected {total}")
        requests = after.requests - before.requests
        limited = after.rate_limited - before.rate_limited
        rates.append(n / elapsed)
        shares.append(limited / requests)
        durations.append(elapsed)
        ctx.log(
            f"ratelimit: {requests} requests, {limited} answered 429, {elapsed:.2f} s, "
            f"{after.retries - before.retries} retries"
        )
    pages = math.ceil(per_chat / PAGE)
    what = (
        f"{chats}×{pages} pages, {rate:g} req/s bucket of {burst}, "
        f"{LATENCY * 1000:g} ms, {median(durations):.0f} s"
    )
    return [
        Line(
            NAME,
            f"iter_many {what} vs ceiling {rate:g} req/s × {PAGE} msg "
            f"(burst adds ~{burst / median(durations) / rate:.0%})",
            fmt_rate(median(rates), "msg"),
            fmt_rate(ceiling, "msg"),
            paired_ratio(rates, [ceiling] * len(rates)),
            THROUGHPUT,
        ),
        Line(
            NAME,
            "share of requests answered 429",
            f"{median(shares):.1%}",
            "all requests",
            median(shares),
            SHARE_429,
        ),
    ]


def run(ctx: Context) -> list[Line]:
    if ctx.quick:
        rate, burst, chats, per_chat = 50.0, 5, 6, 200
    else:
        # Long enough (about 30 s) that the first second, when the client cannot know the
        # server's rate yet, does not decide the row.
        rate, burst, chats, per_chat = 50.0, 10, 150, 1000
    with ServerProcess(
        chats=chats, messages_per_chat=per_chat, latency=LATENCY, rate_limit=rate, burst=burst
    ) as server:
        return asyncio.run(_main(ctx, server.info, rate, burst, chats, per_chat))
