"""Row 5, rate-limited fan-out: the emulator's token bucket of ``RATE`` requests/s with a burst of
a tenth of a second, answering 429 with ``Retry-After: 1`` beyond; ``iter_many(concurrency=32)``
with a new client's defaults, for 20 s at 20, 100 and 400 req/s (issue 13). Goodput is pages
answered 200 per second over the whole run, from the client's first request (its first second,
when it cannot know the server's rate, included) against the bucket's rate, or against what the
same walk gets from a server with no limit, measured in the same run, where that is lower (a
loaded machine's CPU, not the bucket, is then the ceiling).

The same scenarios run on a virtual clock in ``benchmarks/sim.py`` (row ``sim``); this row runs
them over sockets against the emulator's own limiter model.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .._harness import Context, Line, ServerProcess, Target, fmt_rate
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "ratelimit"
THROUGHPUT = Target(">=", 0.9)
SHARE_429 = Target("<=", 0.03)
LATENCY = 0.02
CONCURRENCY = 32
PAGE = 10
CHATS = 64


async def _one(info: dict[str, Any], seconds: float) -> tuple[float, int, int]:
    """Pages per second, requests and 429s of one run of ``seconds``."""
    async with library_client(info, max_concurrency=CONCURRENCY) as client:
        chat_ids = [c.chat_id for c in await client.messages.chats()]
        before = client.stats
        start = time.perf_counter()
        n = 0
        walk = client.messages.iter_many(chat_ids, concurrency=CONCURRENCY, limit=PAGE)
        async for _ in walk:
            n += 1
            if time.perf_counter() - start >= seconds:
                break
        await walk.aclose()
        elapsed = time.perf_counter() - start
        after = client.stats
    requests = after.requests - before.requests
    limited = after.rate_limited - before.rate_limited
    return (requests - limited) / elapsed, requests, limited


def _capacity(seconds: float) -> float:
    """Pages per second the same walk gets from a server that does not limit: on a loaded
    machine the client's CPU, not the server's bucket, may be the ceiling."""
    with ServerProcess(chats=CHATS, messages_per_chat=4000, latency=LATENCY) as server:
        return asyncio.run(_one(server.info, seconds))[0]


def run(ctx: Context) -> list[Line]:
    seconds = 3.0 if ctx.quick else 20.0
    rates = (100.0,) if ctx.quick else (20.0, 100.0, 400.0)
    capacity = _capacity(2.0 if ctx.quick else 5.0)
    lines: list[Line] = [
        Line(
            NAME,
            f"iter_many(concurrency={CONCURRENCY}) against no limit: what this machine allows",
            fmt_rate(capacity, "req"),
            "",
            None,
        )
    ]
    for rate in rates:
        burst = max(1, round(rate * 0.1))
        per_chat = int(rate * seconds * PAGE * 1.5 / CHATS) + PAGE
        with ServerProcess(
            chats=CHATS,
            messages_per_chat=per_chat,
            latency=LATENCY,
            rate_limit=rate,
            burst=burst,
        ) as server:
            goodput, requests, limited = asyncio.run(_one(server.info, seconds))
        ctx.log(f"ratelimit {rate:g}/s: {requests} requests, {limited} answered 429")
        ceiling = min(rate, capacity)
        lines.append(
            Line(
                NAME,
                f"iter_many(concurrency={CONCURRENCY}) {seconds:g} s, bucket {rate:g} req/s "
                f"burst {burst}, {LATENCY * 1000:g} ms: pages answered 200 vs "
                + ("the bucket" if ceiling == rate else "the no-limit run (CPU-bound)"),
                fmt_rate(goodput, "req"),
                fmt_rate(ceiling, "req"),
                goodput / ceiling,
                THROUGHPUT,
            )
        )
        lines.append(
            Line(
                NAME,
                f"  {rate:g} req/s: share of requests answered 429",
                f"{limited / max(1, requests):.1%}",
                f"{requests} requests",
                limited / max(1, requests),
                SHARE_429,
            )
        )
    return lines
