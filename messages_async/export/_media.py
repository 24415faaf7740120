"""``messages-async export --media``: the attachment files of every stored message.

Where things go:

- files: ``export.media/`` beside an SQLite export (the ``--out`` path with its suffix
  replaced), ``DIR/media/`` for JSONL and Parquet. Each file is stored once, under its content
  address ``ab/ab12…<ext>`` (SHA-256 of the bytes; the extension from the first name, type or
  URL seen), however many messages attach it;
- what was fetched: the ``media`` table of the SQLite file, or ``DIR/media.jsonl`` (append-only,
  the last line for a URL wins), with ``url, sha256, size, path, content_type, status, error,
  fetched_at``; ``path`` is relative to the media folder and ``status`` is ``ok``,
  ``too_large``, ``refused``, the HTTP status of a file that is gone (``404``, ``410``, ...),
  or ``error`` (it failed this time); ``error``, ``401`` and ``403`` are tried again by
  the next run, every other status is final;
- downloads in progress: ``<media>/.partial/``, with the validator each resumes against.

What is fetched: every attachment of every stored message (also those stored by earlier runs
without ``--media``) whose URL has no final status yet, except ``link`` attachments, which
point at web pages rather than files. Files already fetched are never fetched again.

A download is renamed into place only when complete and hashed, and recorded after that: a
run killed mid-file leaves the bytes in ``.partial/`` and nothing where a reader looks, and the
next run resumes them with a ``Range`` request. The walks feed the downloads as they commit,
through a bounded queue that never holds a walk up: when it is full, the URLs that did not
fit are found again by a scan of the store once the walks are done.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import orjson

from .._checks import count, seconds
from .._client import Client
from .._download import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT, DownloadError, PartialFile
from .._download_policy import content_path, extension_for, show_url
from .._models import Message
from ._jsonl import JsonlStore
from ._parquet import ParquetStore, load_pyarrow
from ._runner import Exporter, ExportStats, unless_stopped
from ._sqlite import SqliteStore
from ._store import Store

__all__ = [
    "MediaFetcher",
    "MediaIndex",
    "MediaOptions",
    "MediaStats",
    "media_folder",
    "run_with_media",
]

logger = logging.getLogger("messages_async.export")

#: Statuses a later run tries again: a failure, and refusals that a new token may lift.
RETRIED = "error"
_RETRIED = (RETRIED, "401", "403")
_QUEUE = 1000
_SCAN_BATCH = 500
_PARTIAL = ".partial"

#: ``(url, name, type)`` of one attachment.
Wanted = tuple[str, str | None, str | None]


@attrs.frozen
class MediaOptions:
    """How attachment files are fetched.

    Attributes:
        concurrency: Files downloaded at once.
        max_bytes: Largest file kept (a file of exactly this size is kept).
        timeout: Seconds one file may take, retries included.
    """

    concurrency: int = 4
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT

    def __attrs_post_init__(self) -> None:
        count("media concurrency", self.concurrency, minimum=1)
        count("media max_bytes", self.max_bytes, minimum=0)
        seconds("media timeout", self.timeout)


@attrs.define
class MediaStats:
    """Live counters of the downloads, for the progress display and the summary."""

    fetched: int = 0
    stored: int = 0
    bytes: int = 0
    reused: int = 0
    gone: int = 0
    too_large: int = 0
    failed: int = 0
    active: int = 0
    queued: int = 0


def media_folder(store: Store) -> str:
    """Where an export's attachment files go."""
    if isinstance(store, SqliteStore):
        return os.path.splitext(store.path)[0] + ".media"
    return os.path.join(store.path, "media")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@attrs.frozen
class MediaRow:
    """One line of the media index."""

    url: str
    status: str
    sha256: str | None = None
    size: int | None = None
    path: str | None = None
    content_type: str | None = None
    error: str | None = None
    fetched_at: str = attrs.field(factory=_now)


_COLUMNS = tuple(a.name for a in attrs.fields(MediaRow))


class MediaIndex(abc.ABC):
    """What was fetched, per URL. Methods run on the fetcher's thread."""

    @abc.abstractmethod
    def final(self) -> set[str]:
        """URLs with a final status (never fetched again)."""

    @abc.abstractmethod
    def record(self, row: MediaRow) -> None: ...

    @abc.abstractmethod
    def attachments(self) -> Iterator[list[Wanted]]:
        """Every attachment of the stored messages, in batches."""

    @abc.abstractmethod
    def close(self) -> None: ...


def _wanted(items: object) -> Iterator[Wanted]:
    if not isinstance(items, dict):
        return
    found = items.get("items")
    if not isinstance(found, list):
        return
    for item in found:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            name, kind = item.get("name"), item.get("type")
            yield (
                item["url"],
                name if isinstance(name, str) else None,
                kind if isinstance(kind, str) else None,
            )


class SqliteMediaIndex(MediaIndex):
    """The ``media`` table, on a connection of its own to the export's file (WAL: the message
    writer and this one take turns; reads never wait)."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS media (
        url TEXT PRIMARY KEY, sha256 TEXT, size INTEGER, path TEXT, content_type TEXT,
        status TEXT NOT NULL, error TEXT, fetched_at TEXT NOT NULL
    )"""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(self._SCHEMA)

    def final(self) -> set[str]:
        query = "SELECT url FROM media WHERE status NOT IN (?, ?, ?)"
        return {u for (u,) in self._db.execute(query, _RETRIED)}

    def record(self, row: MediaRow) -> None:
        values = attrs.astuple(row)
        self._db.execute(
            f"INSERT INTO media ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
            " ON CONFLICT (url) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:]),
            values,
        )

    def attachments(self) -> Iterator[list[Wanted]]:
        cursor = self._db.execute(
            "SELECT json_extract(m.raw, '$.attachments') FROM messages m "
            "WHERE json_type(m.raw, '$.attachments.items') = 'array'"
        )
        while rows := cursor.fetchmany(_SCAN_BATCH):
            yield [w for (text,) in rows for w in _wanted(orjson.loads(text))]

    def close(self) -> None:
        self._db.close()


class JsonlMediaIndex(MediaIndex):
    """``DIR/media.jsonl``: one line per fetch, appended and ``fsync``-ed; the last line for a
    URL wins. A torn last line (a crash mid-append) is cut off when the index is opened."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._path = os.path.join(store.path, "media.jsonl")
        self._final: set[str] = set()
        good = 0
        with contextlib.suppress(FileNotFoundError), open(self._path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    break
                good += len(line)
                if obj.get("status") in _RETRIED:
                    self._final.discard(obj["url"])
                else:
                    self._final.add(obj["url"])
        self._file = open(self._path, "ab")  # noqa: SIM115 -- appended to for the whole run
        self._file.truncate(good)

    def final(self) -> set[str]:
        return set(self._final)

    def record(self, row: MediaRow) -> None:
        self._file.write(orjson.dumps(attrs.asdict(row)) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def attachments(self) -> Iterator[list[Wanted]]:
        if isinstance(self._store, ParquetStore):
            yield from self._parquet()
            return
        folder = os.path.join(self._store.path, "messages")
        for name in sorted(os.listdir(folder)):
            batch: list[Wanted] = []
            path = os.path.join(folder, name, "messages.jsonl")
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                for line in f:
                    if b'"attachments":{' not in line or not line.endswith(b"\n"):
                        continue
                    batch.extend(_wanted(orjson.loads(line).get("attachments")))
            yield batch

    def _parquet(self) -> Iterator[list[Wanted]]:
        _, pq = load_pyarrow()
        root = os.path.join(self._store.path, "messages")
        for folder, _dirs, names in os.walk(root):
            for name in sorted(names):
                if not name.endswith(".parquet") or name.startswith("."):
                    continue
                column = pq.read_table(os.path.join(folder, name), columns=["attachments"])
                yield [
                    (a["url"], a["name"], a["type"])
                    for items in column.column("attachments").to_pylist()
                    for a in items or ()
                ]

    def close(self) -> None:
        self._file.close()


def open_index(store: Store) -> MediaIndex:
    if isinstance(store, SqliteStore):
        return SqliteMediaIndex(store.path)
    if isinstance(store, (JsonlStore, ParquetStore)):
        return JsonlMediaIndex(store)
    raise TypeError(f"no media index for {type(store).__name__}")


class MediaFetcher:
    """Downloads the attachment files of an export, alongside its walks.

    Use: ``fetcher = MediaFetcher(client, store, options)``; give ``fetcher.offer`` to the
    :class:`Exporter` as ``on_commit``; ``await fetcher.run()`` concurrently with the export,
    and call :meth:`walks_done` when the walks have ended. ``run`` then drains the queue, scans
    the store for anything it missed, and returns.

    Args:
        client: The export's open client (its downloads follow its token rules).
        store: The open store whose messages' attachments are fetched.
        options: Concurrency, size cap and timeout.
    """

    def __init__(self, client: Client, store: Store, options: MediaOptions) -> None:
        self._client = client
        self._store = store
        self._options = options
        self.folder = media_folder(store)
        self.stats = MediaStats()
        self._queue: asyncio.Queue[Wanted] = asyncio.Queue(_QUEUE)
        self._seen: set[str] = set()
        self._overflow = False
        self._walks_done = asyncio.Event()
        # One thread for the index and the scans: an SQLite connection stays on its thread.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-media")
        self._index: MediaIndex | None = None
        self._shards: set[str] = set()  # folders known to exist: a makedirs costs a syscall

    async def _io(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def offer(self, messages: Sequence[Message]) -> None:
        """Queue the attachments of freshly committed messages; never waits."""
        for message in messages:
            for a in message.attachments:
                self._want((a.url, a.name, a.type))

    def _want(self, wanted: Wanted) -> bool:
        url, _, kind = wanted
        if url in self._seen or kind == "link":
            return True
        try:
            self._queue.put_nowait(wanted)
        except asyncio.QueueFull:
            self._overflow = True
            return False
        self._seen.add(url)
        self.stats.queued += 1
        return True

    def walks_done(self) -> None:
        self._walks_done.set()

    async def run(self) -> MediaStats:
        """Fetch until the walks are done and every stored attachment has been seen to."""
        os.makedirs(os.path.join(self.folder, _PARTIAL), exist_ok=True)
        self._index = index = await self._io(open_index, self._store)
        try:
            self._seen.update(await self._io(index.final))
            workers = [
                asyncio.create_task(self._worker(), name=f"export media {i}")
                for i in range(self._options.concurrency)
            ]
            try:
                await self._scan()  # messages stored by earlier runs
                while True:
                    await self._walks_done.wait()
                    await self._queue.join()
                    if not self._overflow:
                        break
                    self._overflow = False
                    await self._scan()
                await self._queue.join()
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        finally:
            await self._io(index.close)
            self._thread.shutdown(wait=False)
        return self.stats

    async def _scan(self) -> None:
        assert self._index is not None
        batches = iter(self._index.attachments())
        end = object()
        while (batch := await self._io(next, batches, end)) is not end:
            for wanted in batch:
                url, _, kind = wanted
                if url in self._seen or kind == "link":
                    continue
                self._seen.add(url)
                self.stats.queued += 1
                await self._queue.put(wanted)  # a scan may wait for room; a walk never does

    async def _worker(self) -> None:
        while True:
            wanted = await self._queue.get()
            self.stats.queued -= 1
            self.stats.active += 1
            try:
                await self._fetch(*wanted)
            finally:
                self.stats.active -= 1
                self._queue.task_done()

    async def _fetch(self, url: str, name: str | None, _kind: str | None) -> None:
        key = hashlib.sha256(url.encode()).hexdigest()[:32]
        # Off the loop: resuming reads (and hashes) what an earlier run wrote.
        part = await asyncio.to_thread(PartialFile, os.path.join(self.folder, _PARTIAL, key), url)
        stats = self.stats
        options = self._options
        try:
            got = await self._client._downloads.fetch(
                url, part, max_bytes=options.max_bytes, time_limit=options.timeout
            )
            await asyncio.to_thread(part.sync)
        except DownloadError as exc:
            if exc.reason == "failed":
                part.close()  # kept: the next run resumes it
                status, stats.failed = RETRIED, stats.failed + 1
            else:
                part.discard()
                if exc.reason == "too_large":
                    status, stats.too_large = "too_large", stats.too_large + 1
                elif exc.reason == "gone":
                    status, stats.gone = str(exc.status), stats.gone + 1
                else:
                    status, stats.failed = "refused", stats.failed + 1
            logger.info("media: %s", exc)
            await self._record(MediaRow(url=url, status=status, error=str(exc)))
            return
        except BaseException:
            part.close()
            raise
        path = self._place(part, got.sha256, extension_for(name, got.content_type, url))
        stats.fetched += 1
        stats.bytes += got.size
        await self._record(
            MediaRow(
                url=url,
                status="ok",
                sha256=got.sha256,
                size=got.size,
                path=path,
                content_type=got.content_type,
            )
        )

    def _place(self, part: PartialFile, sha256: str, extension: str) -> str:
        """Rename the complete file to its content address, unless those bytes are there."""
        wanted = content_path(sha256, extension)
        shard = os.path.join(self.folder, sha256[:2])
        if shard not in self._shards:
            os.makedirs(shard, exist_ok=True)
            self._shards.add(shard)
        for existing in os.listdir(shard):
            if existing.startswith(sha256) and not existing.endswith(".tmp"):
                part.discard()
                self.stats.reused += 1
                return f"{sha256[:2]}/{existing}"
        # No await between the look and the rename: no other download can slip in between.
        part.finish(os.path.join(self.folder, wanted))
        self.stats.stored += 1
        return wanted

    async def _record(self, row: MediaRow) -> None:
        assert self._index is not None
        try:
            await self._io(self._index.record, row)
        except (OSError, sqlite3.Error) as exc:
            raise OSError(f"cannot record {show_url(row.url)} in the media index: {exc}") from exc


async def run_with_media(
    exporter: Exporter, fetcher: MediaFetcher | None, stop: asyncio.Event
) -> ExportStats:
    """Run the export, with ``fetcher`` downloading alongside it (``None``: no downloads).

    The files still queued when the walks end are fetched after them; setting ``stop`` ends
    that too (a file stopped mid-way resumes next run). An error of the downloads themselves
    (the media index cannot be written) is raised once the export has ended.
    """
    if fetcher is None:
        return await exporter.run()
    media = asyncio.create_task(fetcher.run(), name="export media")
    try:
        stats = await exporter.run()
        if not stats.interrupted:
            fetcher.walks_done()

            async def drain() -> bool:
                await asyncio.wait({media})
                return True

            if await unless_stopped(drain(), stop) is None:
                stats.interrupted = True
    finally:
        if not media.done():
            media.cancel()
        await asyncio.wait({media})
    error = None if media.cancelled() else media.exception()
    if error is not None:
        raise error
    return stats
