"""Every benchmark row, in table order. Adding a row: write a module with ``NAME`` and
``run(ctx) -> list[Line]``, and list it here."""

from __future__ import annotations

from .._harness import Row
from . import (
    decode,
    export,
    fanout,
    media,
    polling,
    prefetch,
    priority,
    ratelimit,
    reply,
    server,
    shards,
    simulated,
    tracing,
    walk,
    windows,
)

__all__ = ["ROWS"]

ROWS: tuple[Row, ...] = (
    Row(server.NAME, server.run, "the emulator's own CPU per request, next to the client's"),
    Row(decode.NAME, decode.run, "page bytes → MessagesPage vs orjson.loads and stdlib json"),
    Row(walk.NAME, walk.run, "one chat, no latency: iter() vs raw aiohttp and httpx loops"),
    Row(tracing.NAME, tracing.run, "the same walk with OpenTelemetry providers set vs none"),
    Row(windows.NAME, windows.run, "one 200k chat at 50 ms: iter_windows(W) vs a serial walk"),
    Row(fanout.NAME, fanout.run, "200 chats × 5 pages, 20 ms: iter_many vs bound, gather, serial"),
    Row(prefetch.NAME, prefetch.run, "50 pages, 20 ms latency and consumer: prefetch on vs off"),
    Row(ratelimit.NAME, ratelimit.run, "fan-out against a token-bucket server vs its ceiling"),
    Row(priority.NAME, priority.run, "a bot's reply while the same client exports at the ceiling"),
    Row(simulated.NAME, simulated.run, "rate controllers vs server limiter models, virtual clock"),
    Row(
        export.NAME,
        export.run,
        "messages-async export into SQLite/JSONL/Parquet: rate vs iter_many, RSS",
    ),
    Row(media.NAME, media.run, "export --media against two file hosts at 20 ms: files/s vs C/L"),
    Row(
        shards.NAME,
        shards.run,
        "export --shard: 4 shards with 4 credentials vs one, per-credential limit",
    ),
    Row(polling.NAME, polling.run, "watch() over 200 quiet chats: requests/s vs chats/interval"),
    Row(reply.NAME, reply.run, "a bot's reply to a quiet chat vs what its watch costs, 4 settings"),
)
