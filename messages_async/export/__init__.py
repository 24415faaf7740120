"""Bulk export of chats into SQLite or JSONL: crash-safe, resumable and incremental.

The ``messages-async export`` command is built from these parts, which work the same from
Python::

    from messages_async.export import Exporter, ExportMeta, ExportOptions, SqliteStore

    async with SqliteStore("export.sqlite") as store:  # closed on leaving, writes finished
        options = ExportOptions(concurrency=8)
        await store.open(ExportMeta(source=client.resource_uri or ""), fresh=False)
        stats = await Exporter(client, store, options).run()

Stores (where an export goes; all their methods are coroutines, the work runs on the store's
own threads, never on the event loop):

- ``SqliteStore(path)``: one SQLite file with the tables ``chats(chat_id, raw)``,
  ``messages(id, chat_id, raw, uid, message, created_at)`` (indexed on ``id`` and
  ``(chat_id, id)``), ``export_state`` (one checkpoint per chat) and ``meta``. ``raw`` is the
  object exactly as received, unknown fields included, as JSON text. One transaction per
  page: the page and the chat's checkpoint are stored together.
- ``JsonlStore(path, threads=4)``: a directory with ``chats.jsonl``,
  ``messages/<chat_id>.jsonl`` (one raw object per line, newest first), ``state.json`` and
  ``state/<chat_id>.json`` (the checkpoints). A page is appended and ``fsync``-ed before its
  checkpoint is atomically replaced, so no line is ever torn or duplicated.
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
page_size=100)``: which chats (``None``: every chat the token can see), how many are walked at
once (each with a page fetched ahead), and the filters (``since`` inclusive, ``until``
exclusive, timezone-aware datetimes).

``Exporter(client, store, options, stop=None)`` with an open client and an open store;
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
``stored_messages`` (held for the complete chats), ``pages``, ``cursor_restarts``,
``elapsed``, ``rate`` and ``interrupted``. After a stop, the chat counts are read from the
store's checkpoints. ``ChatState`` is one chat's checkpoint, as ``store.load(chat_id)``
returns it.

``show_progress``, ``progress_line`` and ``summary_lines`` are the command's progress display
and summary, for programs that want the same output.
"""

from ._jsonl import JsonlStore
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
    "SqliteStore",
    "Store",
    "StoreError",
    "progress_line",
    "show_progress",
    "summary_lines",
]
