"""Row 5, rate-limited fan-out: the emulator's token bucket of ``RATE`` requests/s with a burst of
a tenth of a second, answering 429 with ``Retry-After: 1`` beyond; ``iter_many(concurrency=32)``
with a new client's defaults, for 20 s at 20, 100 and 400 req/s (issue 13). Goodput is pages
answered 200 per second over the whole run, from the client's first request (its first second,
when it cannot know the server's rate, included) against the bucket's rate, or against what the
same walk gets from a server with no limit, measured in the same run, where that is lower (a
loaded machine's CPU, not the bucket, is then the ceiling).

Two more scenarios over sockets, each from a new client at 20 ms: a **transient storm** (the
next 10 requests from 5 s on answered 429, then no limit): seconds from the end of the last
pause until a half second of goodput is back at 90% of what the same run did before the storm;
and a **ceiling that halves and comes back** (200, then 100 from 15 s, then 200 from 30 s, bursts
of 0.1 s): seconds after each change until a second of goodput holds 0.85x of the ceiling then
in force, and the share of 429s over the run. The times come from the client's own timeline of
answers (an event hook: the status and when it came), the changes from the emulator's schedule,
which starts at the credential's first request.

The same scenarios run on a virtual clock in ``benchmarks/sim.py`` (row ``sim``); this row runs
them over sockets against the emulator's own limiter models.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .._harness import Context, Line, ServerProcess, Target, fmt_rate
from ..sim import TICK, constant, first_reaching, rate_between
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "ratelimit"
THROUGHPUT = Target(">=", 0.9)
#: The bucket at which a client told the rate (``Client(rate_limit=...)``) is also measured.
TOLD = 100.0
SHARE_429 = Target("<=", 0.03)
RECOVERY = Target("<=", 1.0)
SETTLE = Target("<=", 5.0)
CHANGE_429 = Target("<=", 0.05)
STORM_AT, STORM = 5.0, 10
STEPS = ((0.0, 200.0), (15.0, 100.0), (30.0, 200.0))
LATENCY = 0.02
CONCURRENCY = 32
PAGE = 10
CHATS = 64


async def _walk(client: Any, chat_ids: list[int], seconds: float, since: float) -> None:
    """The row's walk: ``iter_many`` over ``chat_ids`` until ``seconds`` after ``since``."""
    walk = client.messages.iter_many(chat_ids, concurrency=CONCURRENCY, limit=PAGE)
    try:
        async for _ in walk:
            if time.perf_counter() - since >= seconds:
                break
    finally:
        await walk.aclose()


async def _one(
    info: dict[str, Any], seconds: float, rate_limit: float | None = None
) -> tuple[float, int, int]:
    """Pages per second, requests and 429s of one run of ``seconds``."""
    async with library_client(info, max_concurrency=CONCURRENCY, rate_limit=rate_limit) as client:
        chat_ids = [c.chat_id for c in await client.messages.chats()]
        before = client.stats
        start = time.perf_counter()
        await _walk(client, chat_ids, seconds, start)
        elapsed = time.perf_counter() - start
        after = client.stats
    requests = after.requests - before.requests
    limited = after.rate_limited - before.rate_limited
    return (requests - limited) / elapsed, requests, limited


async def _timeline(info: dict[str, Any], seconds: float) -> tuple[list[int], list[float], int]:
    """Answers 200 per ``TICK`` from the first request on, the times of the 429s, requests."""
    start: list[float] = []
    ok = [0] * (int(seconds / TICK) + 1)
    limited: list[float] = []
    requests = 0

    def on_request(_view: object) -> None:
        nonlocal requests
        requests += 1
        if not start:
            start.append(time.perf_counter())

    def on_response(view: Any) -> None:
        at = time.perf_counter() - start[0]
        if view.status == 429:
            limited.append(at)
        elif view.status == 200 and at < seconds:
            ok[int(at / TICK)] += 1

    hooks = {"request": [on_request], "response": [on_response]}
    async with library_client(info, max_concurrency=CONCURRENCY, event_hooks=hooks) as client:
        chat_ids = [c.chat_id for c in await client.messages.chats()]
        await _walk(client, chat_ids, seconds, start[0])
    return ok, limited, requests


def _storm(seconds: float) -> list[Line]:
    per_chat = 4000
    with ServerProcess(
        chats=CHATS, messages_per_chat=per_chat, latency=LATENCY, storm=f"{STORM}@{STORM_AT:g}"
    ) as server:
        ok, limited, _ = asyncio.run(_timeline(server.info, seconds))
    before = rate_between(ok, 1.0, STORM_AT)
    end = (max(limited) + 1.0) if limited else STORM_AT  # Retry-After: 1
    took = first_reaching(ok, end, 0.5, constant(0.9 * before))
    label = (
        f"storm of {STORM} 429s at {STORM_AT:g} s, {LATENCY * 1000:g} ms: s from the end of "
        f"the last pause to 90% of the goodput before ({before:.0f} req/s)"
    )
    return [_seconds_line(label, took, "1 s", RECOVERY)]


def _seconds_line(label: str, took: float | None, bound: str, target: Target) -> Line:
    """A line of seconds until something happened; ``never`` counts as 99 s."""
    shown = "never" if took is None else f"{took:.1f} s"
    return Line(NAME, label, shown, bound, took if took is not None else 99.0, target)


def _halving(seconds: float) -> list[Line]:
    schedule = ",".join(f"{at:g}:{rate:g}" for at, rate in STEPS)
    per_chat = int(200 * seconds * PAGE * 1.5 / CHATS) + PAGE
    with ServerProcess(
        chats=CHATS, messages_per_chat=per_chat, latency=LATENCY, rate_schedule=schedule
    ) as server:
        ok, limited, requests = asyncio.run(_timeline(server.info, seconds))
    lines = []
    for (at, rate), (until, _) in zip(STEPS[1:], (*STEPS[2:], (seconds, 0.0)), strict=True):
        took = first_reaching(ok, at, 1.0, constant(0.85 * rate))
        held = rate_between(ok, at + 5.0, until) / rate
        label = (
            f"ceiling {STEPS[0][1]:g}→{STEPS[1][1]:g}→{STEPS[2][1]:g} req/s: s to 0.85× of "
            f"{rate:g} after the change at {at:g} s (then {held:.2f}× till {until:g} s)"
        )
        lines.append(_seconds_line(label, took, "5 s", SETTLE))
    lines.append(
        Line(
            NAME,
            "  ceiling change: share of requests answered 429",
            f"{len(limited) / max(1, requests):.1%}",
            f"{requests} requests",
            len(limited) / max(1, requests),
            CHANGE_429,
        )
    )
    return lines


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
            told = None
            if rate == TOLD and not ctx.quick:
                told = asyncio.run(_one(server.info, seconds, rate))
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
        if told is not None:
            lines.append(
                Line(
                    NAME,
                    f"  {rate:g} req/s, the same with Client(rate_limit={rate:g}): pages "
                    f"answered 200 vs the bucket ({told[2]} 429s)",
                    fmt_rate(told[0], "req"),
                    fmt_rate(ceiling, "req"),
                    told[0] / ceiling,
                    None,
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
    if not ctx.quick:
        lines += _storm(STORM_AT + 10.0)
        lines += _halving(STEPS[-1][0] + 15.0)
    return lines
