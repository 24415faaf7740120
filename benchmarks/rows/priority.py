"""Row ``priority``: a bot's reply while the same client exports at the server's ceiling.

One client, one server process with a token bucket of ``RATE`` requests/s (burst a tenth of
a second, ``Retry-After: 1``) and 20 ms latency. A bulk walk, ``iter_many(concurrency=32)``,
keeps the client at the ceiling with requests queued for a slot; meanwhile, every 0.25 s, the
bot answers: ``messages.add`` (a single call, so :attr:`Priority.INTERACTIVE`). The row
reports the reply's latency (median and p95) against the same call on an idle client of the
same server, and, as the control that shows what the priority buys, a request of the same
cost queued as bulk (``pages(..., bulk=True)``: a one-message first page) in the same run.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import messages_async as ma

from .._harness import Context, Line, ServerProcess
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "priority"
RATE = 100.0
LATENCY = 0.02
CONCURRENCY = 32
CHATS = 64


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


async def _timed(calls: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    took = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        took.append(time.perf_counter() - start)
        await asyncio.sleep(0.25)
    return took


async def _first_message(client: ma.Client, chat_id: int, *, bulk: bool) -> None:
    pages = client.messages.pages(chat_id, limit=1, prefetch=False, bulk=bulk)
    try:
        await anext(pages)
    finally:
        await pages.aclose()


async def _measure(info: dict[str, Any], calls: int, warm_up: float) -> dict[str, list[float]]:
    async with library_client(info, max_concurrency=CONCURRENCY) as client:
        chat_ids = [c.chat_id for c in await client.messages.chats()]
        reply_to = chat_ids[0]

        async def reply() -> None:
            await client.messages.add(reply_to, "pong")

        idle = await _timed(calls, reply)
        walk = client.messages.iter_many(chat_ids[1:], concurrency=CONCURRENCY, limit=10)

        async def export() -> None:
            async for _ in walk:
                pass

        task = asyncio.create_task(export())
        try:
            await asyncio.sleep(warm_up)  # the controller has read the ceiling by then
            busy = await _timed(calls, reply)
            queued_as_bulk = await _timed(
                calls, lambda: _first_message(client, reply_to, bulk=True)
            )
            stats = client.stats
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await walk.aclose()
    if stats.in_flight == 0 and stats.pace is None:
        raise RuntimeError("the export never reached the server's ceiling: nothing was measured")
    return {"idle": idle, "busy": busy, "bulk": queued_as_bulk}


def run(ctx: Context) -> list[Line]:
    calls, warm_up = (6, 2.0) if ctx.quick else (40, 5.0)
    per_chat = int(RATE * (warm_up + calls * 0.6) * 10 * 2 / CHATS) + 10
    with ServerProcess(
        chats=CHATS,
        messages_per_chat=per_chat,
        latency=LATENCY,
        rate_limit=RATE,
        burst=max(1, round(RATE * 0.1)),
    ) as server:
        took = asyncio.run(_measure(server.info, calls, warm_up))
    idle, busy, bulk = (statistics.median(took[k]) for k in ("idle", "busy", "bulk"))
    ctx.log(
        f"priority: reply p50 {busy * 1000:.0f} ms under the export, {idle * 1000:.0f} ms idle, "
        f"{bulk * 1000:.0f} ms for the same request queued as bulk"
    )
    what = f"bucket {RATE:g} req/s, {LATENCY * 1000:g} ms, iter_many(concurrency={CONCURRENCY})"
    return [
        Line(
            NAME,
            f"a bot's add (p50) while the client exports at the ceiling ({what}) vs idle",
            f"{busy * 1000:.0f} ms",
            f"{idle * 1000:.0f} ms",
            busy / idle,
        ),
        Line(
            NAME,
            "  the same, p95",
            f"{_p95(took['busy']) * 1000:.0f} ms",
            f"{_p95(took['idle']) * 1000:.0f} ms",
            _p95(took["busy"]) / _p95(took["idle"]),
        ),
        Line(
            NAME,
            "  control: a request of the same cost queued as bulk, same run (p50)",
            f"{bulk * 1000:.0f} ms",
            f"{busy * 1000:.0f} ms",
            bulk / busy,
        ),
    ]
