"""Row: one huge chat walked in W time windows at once vs one serial walk, by
``iter_windows`` and by the export itself.

A chat of 200,000 messages at 50 ms server latency: the serial walk (``iter()``, its cursors a
chain) takes one round trip per page whatever the concurrency. ``iter_windows(windows=W)``
plans W windows of about equal count (``limit=1`` probes on ``total_count``; its time is
included) and walks them at once through the same client, whose concurrency is 8. Target:
a speed-up of at least 0.8 × W; each line also checks that the windowed walk handed out
exactly the serial walk's ids, in the same order once the windows are put newest first.
The serial walk takes minutes at this size, so it runs once; each windowed walk runs once too.

The export lines do the same with ``Exporter`` into SQLite, as the command runs it
(``ExportOptions(concurrency=8)``, a client of ``max_concurrency`` 16): one export with
``window_threshold=0`` (one walk) against one with the threshold at ``total // W``, so that
the export plans W windows by itself. Its time includes the first page (which tells the
chat's size and is not stored), the plan, the join and the update after it; each line checks
that the windowed export stored exactly the serial export's rows (ids and raw text, hashed).
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import tempfile
import time
from pathlib import Path

import messages_async as ma
from messages_async.export import Exporter, ExportMeta, ExportOptions, SqliteStore

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


async def _main(ctx: Context, server: ServerProcess, messages: int, latency: float) -> list[Line]:
    async with library_client(server.info, max_concurrency=CONCURRENCY) as client:
        (chat,) = await client.messages.chats()
        chat_id = chat.chat_id
        ctx.log(f"serial walk of {messages} messages at {latency * 1000:.0f} ms ...")
        serial_s, serial_ids = await _serial(client, chat_id)
        lines = []
        for w in _windows(ctx):
            ctx.log(f"{w} windows ...")
            seconds, ids, used = await _windowed(client, chat_id, w)
            speedup = serial_s / seconds
            exact = "exact" if ids == serial_ids else "ROWS DIFFER"
            lines.append(
                Line(
                    NAME,
                    f"{messages // 1000}k msgs, {latency * 1000:.0f} ms, {used} windows: "
                    f"speed-up {speedup:.2f}× ÷ W ({exact})",
                    fmt_seconds(seconds),
                    fmt_seconds(serial_s),
                    speedup / w if ids == serial_ids else 0.0,
                    TARGET,
                )
            )
        return lines


def _rows(path: Path) -> tuple[int, str]:
    """How many message rows the export holds, and a hash of them in id order."""
    digest = hashlib.sha256()
    db = sqlite3.connect(path)
    try:
        n = 0
        for mid, chat_id, raw in db.execute("SELECT id, chat_id, raw FROM messages ORDER BY id"):
            digest.update(f"{mid} {chat_id} {raw}\n".encode())
            n += 1
        return n, digest.hexdigest()
    finally:
        db.close()


async def _export(server: ServerProcess, path: Path, threshold: int) -> tuple[float, int]:
    """One export into a new SQLite file; its wall time and the windows it walked."""
    options = ExportOptions(concurrency=CONCURRENCY, window_threshold=threshold)
    async with (
        library_client(server.info, max_concurrency=2 * CONCURRENCY) as client,
        SqliteStore(str(path)) as store,
    ):
        await store.open(ExportMeta(source="benchmark"), fresh=True)
        start = time.perf_counter()
        stats = await Exporter(client, store, options).run()
        seconds = time.perf_counter() - start
    if stats.failures or stats.chats_done != 1:
        raise RuntimeError(f"the benchmark export failed: {stats.failures}")
    return seconds, stats.windows


def _export_lines(ctx: Context, server: ServerProcess, messages: int, latency: float) -> list[Line]:
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-windows-") as tmp:
        serial_path = Path(tmp) / "serial.sqlite"
        ctx.log(f"export of {messages} messages in one walk ...")
        serial_s, _ = asyncio.run(_export(server, serial_path, 0))
        serial_rows = _rows(serial_path)
        for w in _windows(ctx):
            ctx.log(f"export in {w} windows ...")
            path = Path(tmp) / f"windows-{w}.sqlite"
            seconds, used = asyncio.run(_export(server, path, messages // w))
            exact = _rows(path) == serial_rows
            speedup = serial_s / seconds
            lines.append(
                Line(
                    NAME,
                    f"export {messages // 1000}k msgs, {latency * 1000:.0f} ms, {used} windows: "
                    f"speed-up {speedup:.2f}× ÷ W ({'exact' if exact else 'ROWS DIFFER'})",
                    fmt_seconds(seconds),
                    fmt_seconds(serial_s),
                    speedup / w if exact else 0.0,
                    TARGET,
                )
            )
            path.unlink()
    return lines


def _windows(ctx: Context) -> tuple[int, ...]:
    return WINDOWS[:1] if ctx.quick else WINDOWS


def run(ctx: Context) -> list[Line]:
    # --quick only shows that the row runs: a small chat at a short latency, two windows.
    messages, latency = (5_000, 0.01) if ctx.quick else (200_000, LATENCY)
    with ServerProcess(chats=1, messages_per_chat=messages, latency=latency) as server:
        lines = asyncio.run(_main(ctx, server, messages, latency))
        return lines + _export_lines(ctx, server, messages, latency)
