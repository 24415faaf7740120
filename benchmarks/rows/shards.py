"""Row ``shards``: the point of ``--shard``, against a server that limits each credential.

The emulator's token bucket is per client id (docs/protocol.md §5): ``RATE`` requests/s each,
burst a tenth of a second, ``Retry-After: 1``, 20 ms latency. The same dataset is exported
once by one process with one credential, then by 4 shards at once, each with a credential of
its own and its own SQLite store (the export API, as the command runs it). The row reports
messages per second of the 4 shards together against the one, and checks that the shards
together hold exactly what the single export holds.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import messages_async as ma
from messages_async.export import Exporter, ExportMeta, ExportOptions, Shard, SqliteStore
from messages_async.testing import MessagesServer

from .._harness import Context, Line, Target, fmt_rate

__all__ = ["NAME", "run"]

NAME = "shards"
SPEED_UP = Target(">=", 3.5)
SHARDS = 4
RATE = 40.0
LATENCY = 0.02
CHATS = 256


async def _export(
    server: MessagesServer,
    credential: str,
    out: Path,
    shard: Shard | None,
    rate_limit: float | None,
) -> None:
    async with (
        ma.Client(
            token_url=server.token_url,
            client_id=credential,
            client_secret=f"{credential}-secret",
            scopes=("messages_read",),
            rate_limit=rate_limit,
        ) as client,
        SqliteStore(str(out)) as store,
    ):
        await store.open(
            ExportMeta(source="bench", shard=None if shard is None else str(shard)), fresh=True
        )
        stats = await Exporter(client, store, ExportOptions(concurrency=8, shard=shard)).run()
        if stats.failures:
            raise RuntimeError(f"the export failed chats: {stats.failures}")


def _rows(paths: list[Path]) -> set[tuple[int, int, str]]:
    rows: set[tuple[int, int, str]] = set()
    for path in paths:
        with sqlite3.connect(path) as db:
            rows |= set(db.execute("SELECT id, chat_id, raw FROM messages"))
    return rows


async def _measure(
    chats: int, per_chat: int, folder: Path, rate_limit: float | None = None
) -> tuple[float, float, int, bool, float]:
    async with MessagesServer(
        chats=chats,
        messages_per_chat=per_chat,
        latency=LATENCY,
        rate_limit=RATE,
        burst=max(1, round(RATE * 0.1)),
    ) as server:
        for k in range(SHARDS + 1):
            server.register_client(f"c{k}", f"c{k}-secret", scopes=("messages_read",))
        start = time.perf_counter()
        await _export(server, f"c{SHARDS}", folder / "one.sqlite", None, rate_limit)
        one = time.perf_counter() - start
        parts = [folder / f"shard-{i}.sqlite" for i in range(SHARDS)]
        start = time.perf_counter()
        await asyncio.gather(
            *(
                _export(server, f"c{i}", parts[i], Shard(i, SHARDS), rate_limit)
                for i in range(SHARDS)
            )
        )
        sharded = time.perf_counter() - start
    whole = _rows([folder / "one.sqlite"])
    sizes = [len(_rows([part])) for part in parts]
    balance = max(sizes) / (sum(sizes) / SHARDS)  # the largest shard bounds the speed-up
    return one, sharded, len(whole), _rows(parts) == whole, balance


def run(ctx: Context) -> list[Line]:
    chats, per_chat = (32, 20) if ctx.quick else (CHATS, 1000)
    with TemporaryDirectory() as folder:
        one, sharded, messages, exact, balance = asyncio.run(
            _measure(chats, per_chat, Path(folder))
        )
    ctx.log(
        f"shards: {messages:,} messages, one credential {one:.1f} s, "
        f"{SHARDS} shards {sharded:.1f} s, exact: {exact}"
    )
    if not exact:
        raise RuntimeError("the shards together do not hold what the single export holds")
    told: list[Line] = []
    if not ctx.quick:
        # The same with every client told the bucket's rate: no shard spends its first
        # seconds finding it, so what is left is the split's own balance.
        with TemporaryDirectory() as folder:
            one_told, sharded_told, _, exact_told, _ = asyncio.run(
                _measure(chats, per_chat, Path(folder), rate_limit=RATE)
            )
        if not exact_told:
            raise RuntimeError("told the rate, the shards do not hold what the single one holds")
        told.append(
            Line(
                NAME,
                f"  the same, every client told the rate (--rate-limit {RATE:g}): "
                f"{one_told:.1f} s vs {sharded_told:.1f} s",
                fmt_rate(messages / sharded_told, "msg"),
                fmt_rate(messages / one_told, "msg"),
                one_told / sharded_told,
                None,
            )
        )
    return [
        Line(
            NAME,
            f"{SHARDS} shards × own credential vs one, {chats} chats × {per_chat} msgs, "
            f"bucket {RATE:g} req/s per credential, {LATENCY * 1000:g} ms (rows exact)",
            fmt_rate(messages / sharded, "msg"),
            fmt_rate(messages / one, "msg"),
            one / sharded,
            SPEED_UP,
        ),
        Line(
            NAME,
            f"  the largest shard's messages vs the mean: at most {SHARDS / balance:.2f}× "
            "with no other cost",
            f"{balance:.3f}×",
            "1",
            balance,
        ),
        *told,
    ]
