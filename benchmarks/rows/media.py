"""Media: ``export --media`` against two file hosts with 20 ms of latency.

The emulator and two `FileHost` origins run in this process; the export (walks and downloads,
the same ``Exporter`` + ``MediaFetcher`` the command runs) too. Every attachment is a distinct
64 KiB file, except one in ten that repeats another's bytes on the other host (stored once).

- **Downloads against their ceiling.** With ``--media-concurrency C`` and a host latency of
  L, no fetcher can do better than C / L files per second (each file costs at least one round
  trip of L). The line gives files per second against that ceiling. The servers share this
  process's CPU with the export, so on a busy machine the ratio says as much about the CPU
  left as about the fetcher (about 4 ms of CPU per 64 KiB file, both sides together).
- **The export with --media against the export alone**, same data, measured back to back: how
  much longer the archive takes than the messages.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from messages_async.export import (
    Exporter,
    ExportMeta,
    ExportOptions,
    MediaFetcher,
    MediaOptions,
    SqliteStore,
    run_with_media,
)
from messages_async.testing import FileHost, MessagesServer

from .._harness import Context, Line, fmt_rate, fmt_seconds, median, paired_ratio
from ._clients import library_client

__all__ = ["NAME", "run"]

NAME = "media"
LATENCY = 0.02
CONCURRENCY = 8
SIZE = 64 * 1024


async def _export(server: MessagesServer, out: Path, media: bool) -> tuple[float, int]:
    """One fresh export; (seconds, files fetched)."""
    info = {
        "token_url": server.token_url,
        "client_id": server.client_id,
        "client_secret": server.client_secret,
    }
    store = SqliteStore(str(out))
    async with library_client(info, max_concurrency=2 * CONCURRENCY) as client:
        try:
            await store.open(ExportMeta(source=server.resource_uri), fresh=True)
            fetcher = (
                MediaFetcher(client, store, MediaOptions(concurrency=CONCURRENCY))
                if media
                else None
            )
            stop = asyncio.Event()
            exporter = Exporter(
                client,
                store,
                ExportOptions(concurrency=CONCURRENCY),
                stop=stop,
                on_commit=fetcher.offer if fetcher else None,
            )
            start = time.perf_counter()
            stats = await run_with_media(exporter, fetcher, stop)
            elapsed = time.perf_counter() - start
        finally:
            await store.close()
    if stats.failures:
        raise RuntimeError(f"the export failed: {stats.failures}")
    fetched = fetcher.stats.fetched if fetcher else 0
    return elapsed, fetched


async def _main(ctx: Context) -> list[Line]:
    chats, files = (10, 80) if ctx.quick else (40, 800)
    async with (
        MessagesServer(chats=chats, messages_per_chat=0, seed=5, compress=False) as server,
        FileHost(latency=LATENCY) as host_a,
        FileHost(latency=LATENCY) as host_b,
    ):
        ids = server.chat_ids()
        for i in range(files):
            host = host_a if i % 2 else host_b
            if i % 10 == 9:
                data = host_b.files[f"/f/{i - 1}.bin"].data  # the same bytes, another host
                url = host_a.add(f"f/{i}.bin", data)
            else:
                url = host.add(f"f/{i}.bin", os.urandom(SIZE))
            server.post_message(
                ids[i % len(ids)], f"file {i}", attachments=[{"type": "file", "url": url}]
            )
        for i in range(files * 4):
            server.post_message(ids[i % len(ids)], f"text {i}")
        with tempfile.TemporaryDirectory(prefix="messages-bench-media-") as tmp:
            work = Path(tmp)
            with_media: list[float] = []
            without: list[float] = []
            rates: list[float] = []
            for r in range(min(ctx.repeats, 3)):
                elapsed, fetched = await _export(server, work / f"m{r}.sqlite", True)
                if fetched != files:
                    raise RuntimeError(f"fetched {fetched} files, expected {files}")
                with_media.append(elapsed)
                rates.append(fetched / elapsed)
                without.append((await _export(server, work / f"p{r}.sqlite", False))[0])
    ceiling = CONCURRENCY / LATENCY
    ctx.log(f"media: {files} files, {median(rates):.0f} files/s against a ceiling of {ceiling:.0f}")
    return [
        Line(
            NAME,
            f"--media: {files} × 64 KiB on 2 hosts at {LATENCY * 1000:.0f} ms, "
            f"concurrency {CONCURRENCY} vs the latency ceiling C/L",
            fmt_rate(median(rates), "file"),
            fmt_rate(ceiling, "file"),
            median(rates) / ceiling,
        ),
        Line(
            NAME,
            f"export with --media vs without ({files * 5} messages, {files} attachments)",
            fmt_seconds(median(with_media)),
            fmt_seconds(median(without)),
            paired_ratio(with_media, without),
        ),
    ]


def run(ctx: Context) -> list[Line]:
    return asyncio.run(_main(ctx))
