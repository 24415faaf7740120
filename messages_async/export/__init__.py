"""Bulk export of chats into SQLite, JSONL or Parquet: crash-safe, resumable and incremental.

The ``messages-async export`` command is built from these parts, which can also be used from
Python::

    store = SqliteStore("export.sqlite")
    await store.open(ExportMeta(source=client.resource_uri or ""), fresh=False)
    try:
        stats = await Exporter(client, store, ExportOptions(concurrency=8)).run()
    finally:
        await store.close()

See ``_runner.py`` for what a run does, ``_state.py`` for the checkpoints, and ``_sqlite.py``,
``_jsonl.py`` and ``_parquet.py`` for the three formats.
"""

from ._jsonl import JsonlStore
from ._media import MediaFetcher, MediaOptions, MediaStats, media_folder, run_with_media
from ._parquet import ParquetStore
from ._progress import progress_line, show_progress, summary_lines
from ._runner import ChatFailure, Exporter, ExportOptions, ExportStats
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
    "ParquetStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "media_folder",
    "progress_line",
    "run_with_media",
    "show_progress",
    "summary_lines",
]
