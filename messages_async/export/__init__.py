"""Bulk export of chats into SQLite, JSONL or Parquet: crash-safe, resumable and incremental.

The ``messages-async export`` command is built from these parts, which work the same from
Python::

    from messages_async.export import Exporter, ExportMeta, ExportOptions, SqliteStore

    async with SqliteStore("export.sqlite") as store:  # closed on leaving, writes finished
        options = ExportOptions(concurrency=8)
        await store.open(ExportMeta(source=client.resource_uri or ""), fresh=False)
        stats = await Exporter(client, store, options).run()

Stores (where an export goes; all their methods are coroutines, and anything that waits for
the disk runs on the store's own threads, never on the event loop):

- ``SqliteStore(path)``: one SQLite file with the tables ``chats(chat_id, raw, type, name,
  picture_url, members_count)``, ``messages(id, chat_id, raw, uid, message, created_at)``
  (``created_at`` a UTC ``TIMESTAMP``; indexed on ``id`` and ``(chat_id, id)``),
  ``export_state`` (one checkpoint per chat), ``export_windows`` (a big chat's windows while
  they are walked) and ``meta``, plus ``media`` and ``message_versions`` when ``--media`` or
  ``--rescan`` ran. ``raw`` is the object exactly as
  received, unknown fields included, as JSON text. One transaction per page: the page and the
  chat's checkpoint are stored together.
- ``JsonlStore(path, threads=4, sync_pages=8, sync_seconds=1.0)``: a directory with ``chats.jsonl``,
  ``messages/chat_id=<id>/messages.jsonl`` (one raw object per line, newest first; hive
  partitions DuckDB joins on), ``state.json`` and ``state/<chat_id>.json`` (the checkpoints).
  A chat's checkpoint is atomically replaced after its file is ``fsync``-ed, every
  ``sync_pages`` pages (default 8), every ``sync_seconds`` (default 1) and at its end, so no
  line is ever lost, torn or duplicated; a killed run fetches what followed it again. The
  pages and the checkpoint go into the page cache from the event loop, and only the
  ``fsync`` and the rename wait on a thread (after three writes on the loop slower than 2 ms,
  on a network mount say, the threads do all of the writing).
- ``ParquetStore(path, threads=4, part_rows=10000)``: a hive-partitioned dataset,
  ``messages/chat_id=<id>/part-<n>.parquet`` and ``chats.parquet`` with typed columns (needs
  the ``parquet`` extra); a part is renamed into place only when complete.
- ``Store``: the base class, for another backend (implement ``_open``, ``_save_chats``,
  ``_load``, ``_commit``, ``_fail`` and ``_close``, which run on the store's threads).

Every store is an async context manager that closes it on leaving (``close()`` finishes
every write already started; closing twice does nothing). ``await store.open(meta,
fresh=False)`` creates the output, or checks that the one there is the same export and
repairs what a crash left behind; ``fresh=True`` discards it first. It raises
``StoreError`` when the path holds something else, or an export of another ``ExportMeta``.

``ExportMeta(source, query=None, since=None, until=None)`` is what makes two runs the same
export: where the data comes from (the command uses the API's URI) and the filters, the same
as in the options (``since``/``until`` as ISO 8601 text; equal instants match whatever their
offset). Resuming with other filters would mix two selections in one output, so it is refused.

``ExportOptions(chat_ids=None, concurrency=8, query=None, since=None, until=None,
page_size=100, shard=None, window_threshold=10000)``: which chats (``None``: every chat the
token can see), how many are walked at once (each with a page fetched ahead), the filters
(``since`` inclusive, ``until`` exclusive, timezone-aware datetimes), and the size above which
a chat exported for the first time is walked in time windows at once (0: never; see
``_runner.py``).

``Exporter(client, store, options, stop=None, on_commit=None, rescan=None)`` with an open
client and an open store (``on_commit`` gets each page's new messages once they are
committed, which is how ``MediaFetcher.offer`` queues their files; ``rescan`` is run for each
chat after its update, e.g. ``Rescanner.rescan`` to find edits and deletions);
``await exporter.run()`` (once) returns ``ExportStats``. A chat never finished is walked from
its saved cursor to its oldest message; a finished one is updated (only what is newer than
its newest stored message: about one request when nothing is new); an expired cursor restarts
the chat from its newest page without a duplicate or a gap. Rate limits are waited out,
transient errors retried from the last checkpoint; a chat that fails for good (404, 403) is
recorded with its error and the others go on. ``run()`` raises ``AuthError`` when the
credentials are refused, a ``MessagesError`` when the chat list cannot be fetched and
``OSError`` when the store cannot be written. Set ``stop`` (an ``asyncio.Event``) to stop
cleanly, as Ctrl-C does: every committed page stays, and a later run resumes.

``ExportStats``: ``chats_total``, ``chats_done`` (complete in the store), ``chats_failed``
and ``failures`` (``ChatFailure(chat_id, error)``), ``messages`` (new in this run),
``stored_messages`` (held for the complete chats), ``pages``, ``cursor_restarts``, ``windows``,
``elapsed``, ``rate`` and ``interrupted``. After a stop, the chat counts are read from the
store's checkpoints. ``ChatState`` is one chat's checkpoint, as ``store.load(chat_id)``
returns it.

``await merge_exports(out, parts)`` joins the exports of an export's shards (``--shard``), or
whole copies of it, into the export at ``out``, in their format: what one process would have
exported, idempotent and additive, crash-safe (``_merge.py``); it returns ``MergeStats``
(``parts``, ``chats``, ``messages``, ``files`` copied, and ``skipped``: the chats that could
not be joined yet, with why) and raises ``StoreError`` for parts that are not one export.

``export_shard(shard, path, credentials, options)`` runs one shard of a sharded export as a
plain blocking call (its own event loop, its own ``ShardCredentials``, its own store;
resumable; what it returns or raises pickles), for an engine to run on its workers, and
``merge_shards(out, paths)`` joins the stores (``_sharded.py``; ``messages_async.export.dask``
does both on a Dask cluster).

``show_progress``, ``progress_line`` and ``summary_lines`` are the command's progress display
and summary, for programs that want the same output.

See ``_runner.py`` for what a run does, ``_state.py`` for the checkpoints, and ``_sqlite.py``,
``_jsonl.py`` and ``_parquet.py`` for the three formats' layouts and crash safety.
"""

from ._jsonl import JsonlStore
from ._media import MediaFetcher, MediaOptions, MediaStats, media_folder, run_with_media
from ._merge import MergeStats, merge_exports
from ._parquet import ParquetStore
from ._progress import progress_line, show_progress, summary_lines
from ._runner import ChatFailure, Exporter, ExportOptions, ExportStats
from ._shard import Shard, shard_of
from ._sharded import ShardCredentials, ShardError, ShardReport, export_shard, merge_shards
from ._sqlite import SqliteStore
from ._state import ChatState, ExportMeta
from ._store import Store, StoreError

__all__ = [
    "ChatFailure",
    "ChatState",
    "ExportMeta",
    "ExportOptions",
    "ExportStats",
    "Exporter",
    "JsonlStore",
    "MediaFetcher",
    "MediaOptions",
    "MediaStats",
    "MergeStats",
    "ParquetStore",
    "Shard",
    "ShardCredentials",
    "ShardError",
    "ShardReport",
    "SqliteStore",
    "Store",
    "StoreError",
    "export_shard",
    "media_folder",
    "merge_exports",
    "merge_shards",
    "progress_line",
    "run_with_media",
    "shard_of",
    "show_progress",
    "summary_lines",
]
