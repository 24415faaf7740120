"""Row 3, fan-out: many chats × 5 pages, 20 ms server latency, concurrency 20.

``client.messages.iter_many`` wall time against the latency bound
``ceil(chats / concurrency) × pages × latency``, against a naive ``asyncio.gather`` of
``client.messages.iter`` over every chat at once (no bound), and against walking the chats one
after another. The sequential walk would take ``chats × pages × latency`` (tens of seconds), so
it runs on a subset of the chats and is extrapolated linearly; the row says so.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from .._harness import Context, Line, ServerProcess, Target, fmt_seconds, median, paired_ratio
from ._clients import count_library, library_client

__all__ = ["NAME", "run"]

NAME = "fanout"
TARGET = Target("<=", 1.15)
LATENCY = 0.02
CONCURRENCY = 20


async def _main(
    ctx: Context, info: dict[str, Any], chats: int, per_chat: int, subset: int
) -> list[Line]:
    pages = math.ceil(per_chat / 100)
    total = chats * per_chat
    async with (
        library_client(info, max_concurrency=CONCURRENCY) as client,
        library_client(info, max_concurrency=chats) as unbounded,
    ):
        chat_ids = [c.chat_id for c in await client.messages.chats()]
        assert len(chat_ids) == chats

        async def fan_out() -> float:
            start = time.perf_counter()
            n = 0
            async for _ in client.messages.iter_many(chat_ids, concurrency=CONCURRENCY, limit=100):
                n += 1
            elapsed = time.perf_counter() - start
            if n != total:
                raise RuntimeError(f"iter_many yielded {n} messages, expected {total}")
            return elapsed

        async def naive() -> float:
            start = time.perf_counter()
            counts = await asyncio.gather(*(count_library(unbounded, c) for c in chat_ids))
            elapsed = time.perf_counter() - start
            if sum(counts) != total:
                raise RuntimeError(f"gather walked {sum(counts)} messages, expected {total}")
            return elapsed

        async def sequential() -> float:
            start = time.perf_counter()
            for c in chat_ids[:subset]:
                await count_library(client, c)
            return (time.perf_counter() - start) * chats / subset

        await fan_out()  # warm-up: connections, server page cache
        await naive()
        requests_before = client.stats.requests
        results: dict[str, list[float]] = {"fan_out": [], "naive": [], "sequential": []}
        for _ in range(min(ctx.repeats, 3)):
            results["fan_out"].append(await fan_out())
            results["naive"].append(await naive())
            results["sequential"].append(await sequential())
        sent = client.stats.requests - requests_before
    ctx.log(f"fanout: {sent} requests by the bounded client (fan-out + sequential subset)")
    bound = math.ceil(chats / CONCURRENCY) * pages * LATENCY
    measured = median(results["fan_out"])
    what = f"{chats}×{pages} pages, {LATENCY * 1000:g} ms, concurrency {CONCURRENCY}"
    return [
        Line(
            NAME,
            f"iter_many {what} vs latency bound",
            fmt_seconds(measured),
            fmt_seconds(bound),
            measured / bound,
            TARGET,
        ),
        Line(
            NAME,
            "iter_many vs naive gather of iter() over all chats, no bound",
            fmt_seconds(measured),
            fmt_seconds(median(results["naive"])),
            paired_ratio(results["fan_out"], results["naive"]),
        ),
        Line(
            NAME,
            f"iter_many vs sequential iter() (estimated: {subset} chats × {chats // subset})",
            fmt_seconds(measured),
            fmt_seconds(median(results["sequential"])),
            paired_ratio(results["fan_out"], results["sequential"]),
        ),
    ]


def run(ctx: Context) -> list[Line]:
    chats, per_chat, subset = (20, 200, 4) if ctx.quick else (200, 500, 10)
    with ServerProcess(chats=chats, messages_per_chat=per_chat, latency=LATENCY) as server:
        return asyncio.run(_main(ctx, server.info, chats, per_chat, subset))
