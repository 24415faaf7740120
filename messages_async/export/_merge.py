"""``messages-async merge --out OUT PART...``: the exports of an export's shards joined into one.

Chat ids are global and each shard exports whole chats (``_shard.py``), so a merge copies
what the parts hold and never has to reconcile two versions of a message. ``OUT`` is an
ordinary export of the same source and filters without a shard, in the parts' format (the
parts must all be of one format, and of one export: the same source and filters, their
``--shard`` aside); a later ``messages-async export`` on ``OUT`` resumes and updates it.

SQLite: one transaction per part (a merge killed midway leaves ``OUT`` as it was before that
part). Each chat of the part gets its rule from the same table as the folder formats
(``_merge_folders.decide``, over the chat's message ids, versions and deletions): a part that
holds more replaces ``OUT``'s rows of the chat by their keys (``messages`` by ``id``, the
chat, its checkpoint and rescan state by ``chat_id``, versions by ``(id, version)``); one that
holds less, or the same, leaves them untouched (an older copy never takes a checkpoint back);
two settled copies that each hold what the other lacks are joined (the one with the higher
watermark wins equal keys, and the checkpoint counts the union); a walk in progress that
cannot be joined is reported. The media index takes, per ``url``, a final status over one to
be retried, then the later fetch; any other table is copied by its key. Raw objects are copied
as stored, byte for byte.

JSONL and Parquet: chat by chat, each chat's files swapped in together through a journal
(``_merge_folders.py`` and ``_swap.py``): a merge killed midway leaves every chat of ``OUT``
wholly as it was or wholly merged, and the next merge or export finishes the swap.

Every format: merging the same parts again changes nothing; merging a part again after it ran
further adds what it gained; a subset of the shards, or a whole export given as a part, adds
only what ``OUT`` lacks. The media files beside each part (content-addressed, ``ab/ab12…``)
are copied into ``OUT``'s media folder when missing. Nothing else may write ``OUT`` while a
merge runs (an export into it, another merge); the parts are only read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

import attrs
import orjson

from ._jsonl import JsonlStore
from ._media import _RETRIED
from ._merge_folders import Action, Held, Standing, copy_media, decide, merge_folder
from ._merge_folders import joined as joined_relations
from ._parquet import ParquetStore
from ._sqlite import SqliteStore
from ._state import ExportMeta
from ._store import Store, StoreError
from ._swap import unfinished_swaps

__all__ = ["MergeStats", "merge_exports", "merged_meta", "plan", "read_part"]


@attrs.define
class MergeStats:
    """What a merge did.

    Attributes:
        parts: Parts merged.
        chats: Chats in ``OUT`` afterwards.
        messages: Messages in ``OUT`` afterwards.
        files: Media files copied.
        taken: JSONL/Parquet: chats whose copy came whole from a part.
        joined: JSONL/Parquet: chats whose two copies were joined.
        skipped: JSONL/Parquet: why some chats of the parts were left as ``OUT`` had them.
    """

    parts: int = 0
    chats: int = 0
    messages: int = 0
    files: int = 0
    taken: int = 0
    joined: int = 0
    skipped: list[str] = attrs.Factory(list)


def merged_meta(path_metas: Sequence[tuple[str, ExportMeta]]) -> ExportMeta:
    """What ``OUT`` is an export of; ``StoreError`` when the parts are not one export."""
    if not path_metas:
        raise StoreError("merge needs at least one part")
    first_path, first = path_metas[0]
    whole = attrs.evolve(first, shard=None)
    for path, meta in path_metas[1:]:
        if attrs.evolve(meta, shard=None) != whole:
            raise StoreError(
                f"{path} is another export than {first_path}: {meta.describe()} against "
                f"{first.describe()}; only shards of one export can be merged"
            )
    counts = {m.shard.split("/")[1] for _, m in path_metas if m.shard is not None}
    if len(counts) > 1:
        raise StoreError(f"the parts are shards of different splits ({', '.join(sorted(counts))})")
    return whole


def read_meta(path: str) -> ExportMeta:
    if not os.path.isfile(path):
        raise StoreError(f"{path} is not a file; merge takes SQLite exports")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'export'").fetchone()
        if row is None:
            raise StoreError(f"{path} is not a messages-async export")
        return ExportMeta.from_json(orjson.loads(row[0]))
    except (sqlite3.DatabaseError, ValueError, KeyError) as exc:
        raise StoreError(f"{path} is not a messages-async export ({exc})") from None
    finally:
        db.close()


def media_folder_of(path: str) -> str:
    return os.path.splitext(path)[0] + ".media"


def read_part(path: str) -> tuple[str, ExportMeta]:
    """The format (``sqlite``, ``jsonl`` or ``parquet``) and identity of the export at ``path``."""
    if os.path.isfile(path):
        return "sqlite", read_meta(path)
    if not os.path.isdir(path):
        raise StoreError(
            f"{path} is not a file or a directory; merge takes exports (an SQLite file, or a "
            "JSONL or Parquet directory)"
        )
    for fmt, name in (("jsonl", "state.json"), ("parquet", "export.json")):
        header = os.path.join(path, name)
        if os.path.exists(header):
            try:
                with open(header, "rb") as f:
                    obj = orjson.loads(f.read())
                if fmt == "parquet" and obj.get("format") != "parquet":
                    raise ValueError("not a Parquet export")
                meta = ExportMeta.from_json(obj)
            except (ValueError, KeyError, AttributeError, OSError) as exc:
                raise StoreError(f"{path} is not a messages-async export ({exc})") from None
            if unfinished_swaps(path):
                raise StoreError(
                    f"{path} was being merged into when that merge stopped; merge into it "
                    "again (or resume its export) before merging it elsewhere"
                )
            return fmt, meta
    raise StoreError(f"{path} is a directory without a messages-async export")


def plan(out: str, parts: Sequence[str]) -> tuple[str, ExportMeta]:
    """The format of the merge and what ``OUT`` is an export of; ``StoreError`` if the parts
    are not of one format and one export, or ``OUT`` is one of them or of another format."""
    if out in parts:
        raise StoreError(f"--out {out} is one of the parts; merge into a new or merged export")
    found = [(p, *read_part(p)) for p in parts]
    meta = merged_meta([(p, m) for p, _, m in found])
    formats = {fmt for _, fmt, _ in found}
    if len(formats) > 1:
        listed = ", ".join(f"{p} ({_NAMES[fmt]})" for p, fmt, _ in found)
        raise StoreError(
            f"the parts are in different formats: {listed}; merge the parts of one format "
            "at a time, each into an OUT of that format"
        )
    (fmt,) = formats
    out_fmt = None
    with contextlib.suppress(StoreError):  # not an export (yet): the store says what is wrong
        out_fmt, _ = read_part(out)
    if out_fmt is not None and out_fmt != fmt:
        raise StoreError(
            f"--out {out} is a {_NAMES[out_fmt]} export and the parts are {_NAMES[fmt]}: "
            "OUT must be in the parts' format"
        )
    return fmt, meta


_NAMES = {"sqlite": "SQLite", "jsonl": "JSONL", "parquet": "Parquet"}


def _store(fmt: str, out: str) -> Store:
    if fmt == "jsonl":
        return JsonlStore(out, threads=1)
    if fmt == "parquet":
        return ParquetStore(out, threads=1)
    return SqliteStore(out)


async def merge_exports(out: str, parts: Sequence[str]) -> MergeStats:
    """Merge the exports at ``parts`` (the shards of one export, or whole copies of it) into
    the export at ``out``, created if missing; see the module docstring.

    Raises:
        StoreError: the parts are not of one export and one format, or ``out`` cannot hold
            their merge (another export, another format, not an export); nothing was written.
        OSError: reading a part or writing ``out`` failed (what was merged before stays).
    """
    out, parts = await asyncio.to_thread(_absolute, out, parts)
    fmt, meta = await asyncio.to_thread(plan, out, parts)
    store = _store(fmt, out)
    async with store:
        await store.open(meta, fresh=False)  # the layout, the identity, a crash's repairs
        if fmt != "sqlite":
            folder = await store._call_any(merge_folder, store, parts, fmt)
            stats = MergeStats(
                parts=len(parts),
                files=folder.files,
                taken=folder.taken,
                joined=folder.joined,
                skipped=folder.skipped,
            )
            stats.chats, stats.messages = await store._call_any(_count_folder, out)
            return stats
    return await asyncio.to_thread(merge_sqlite, out, parts)


def _absolute(out: str, parts: Sequence[str]) -> tuple[str, list[str]]:
    return os.path.abspath(out), list(dict.fromkeys(os.path.abspath(p) for p in parts))


def _count_folder(root: str) -> tuple[int, int]:
    chats = messages = 0
    for name in os.listdir(os.path.join(root, "state")):
        if name.endswith(".json"):
            with open(os.path.join(root, "state", name), "rb") as f:
                chats += 1
                messages += int(orjson.loads(f.read()).get("messages", 0))
    return chats, messages


def merge_sqlite(out: str, parts: Sequence[str]) -> MergeStats:
    """Copy every part into ``out`` (an export opened before by ``SqliteStore``)."""
    stats = MergeStats()
    db = sqlite3.connect(out, isolation_level=None)
    try:
        for part in parts:
            _merge_one(db, part, stats)
            stats.parts += 1
            stats.files += copy_media(media_folder_of(part), media_folder_of(out))
        stats.chats = db.execute("SELECT count(*) FROM chats").fetchone()[0]
        stats.messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        db.close()
    return stats


def _merge_one(db: sqlite3.Connection, part: str, stats: MergeStats) -> None:
    db.execute("ATTACH DATABASE ? AS part", (f"file:{part}?mode=ro",))
    try:
        db.execute("BEGIN")
        try:
            schema = db.execute(
                "SELECT type, name, sql FROM part.sqlite_master WHERE sql IS NOT NULL "
                "ORDER BY type DESC"  # tables before their indexes
            ).fetchall()
            tables = [name for kind, name, _ in schema if kind == "table" and name != "meta"]
            have = {r[0] for r in db.execute("SELECT name FROM main.sqlite_master")}
            for _kind, name, sql in schema:
                if name not in have and name != "meta":
                    db.execute(sql)  # a table (or index) the part has and OUT not yet
            columns: dict[str, list[str]] = {}
            for table in tables:
                ours = {r[1] for r in db.execute(f"PRAGMA main.table_info({table})")}
                columns[table] = [r[1] for r in db.execute(f"PRAGMA part.table_info({table})")]
                for column in columns[table]:
                    if column not in ours:
                        db.execute(f"ALTER TABLE main.{table} ADD COLUMN {column}")
            joined = _decide_chats(db, columns, stats)
            for table in tables:
                _copy_table(db, table, columns[table])
            # A joined chat's checkpoint (its leading copy's) counts the union's messages.
            db.executemany(
                "UPDATE main.export_state SET messages = (SELECT count(*) FROM main.messages "
                "WHERE chat_id = ?) WHERE chat_id = ?",
                [(c, c) for c in joined],
            )
            db.execute("DROP TABLE temp.merge_rule")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.execute("DETACH DATABASE part")


def _count(db: sqlite3.Connection, query: str, *args: object) -> int:
    return int(db.execute(query, args).fetchone()[0])


def _decide_chats(
    db: sqlite3.Connection, columns: dict[str, list[str]], stats: MergeStats
) -> list[int]:
    """Each chat's rule for this part, by the table of ``_merge_folders.decide``, into
    ``temp.merge_rule``: ``replace`` (the part's rows win), ``ignore`` (only what ``OUT``
    lacks is added) or ``keep`` (untouched). Returns the chats that are joined."""
    db.execute("CREATE TEMP TABLE merge_rule (chat_id INTEGER PRIMARY KEY, rule TEXT NOT NULL)")
    joined: list[int] = []
    query = "SELECT done, cursor, walk_top, newest_id FROM {}.export_state WHERE chat_id = ?"
    for (chat,) in db.execute("SELECT chat_id FROM part.export_state").fetchall():
        out = db.execute(query.format("main"), (chat,)).fetchone()
        part = db.execute(query.format("part"), (chat,)).fetchone()
        rule = "replace"
        if out is not None:
            relation = joined_relations(_sqlite_relations(db, columns, chat))
            action = decide(
                relation,
                _sqlite_standing(db, columns, "main", chat, out),
                _sqlite_standing(db, columns, "part", chat, part),
            )
            if action is Action.SKIP:
                stats.skipped.append(
                    f"chat {chat}: the part and OUT hold different messages of it and one of "
                    "them is in the middle of a walk; run that export to its end and merge again"
                )
            if action is Action.UNION:
                joined.append(chat)
                stats.joined += 1
                # The copy with the higher watermark leads: its rows, its checkpoint.
                ahead = (part[3] or -1) >= (out[3] or -1)
                rule = "replace" if ahead else "ignore"
            else:
                rule = {Action.TAKE: "replace"}.get(action, "keep")
                stats.taken += action is Action.TAKE
        db.execute("INSERT INTO temp.merge_rule VALUES (?, ?)", (chat, rule))
    return joined


def _sqlite_standing(
    db: sqlite3.Connection, columns: dict[str, list[str]], where: str, chat: int, row: Any
) -> Standing:
    done, cursor, walk_top, _ = row
    busy = cursor is not None or walk_top is not None
    if not busy and "rescan_state" in columns:
        query = f"SELECT count(*) FROM {where}.rescan_state WHERE chat_id = ? AND top IS NOT NULL"
        busy = bool(_count(db, query, chat))
    return Standing(done=bool(done), settled=not busy)


#: What a chat holds, as ``(table, alias, join, which rows, the same row elsewhere)``.
_CONTENT = {
    "messages": ("messages", "m", "", "m.chat_id = ?", "o.id = m.id"),
    "message_versions": (
        "message_versions",
        "v",
        "JOIN {db}.messages m ON m.id = v.id",
        "m.chat_id = ?",
        "o.id = v.id AND o.version = v.version",
    ),
    "deleted_at": (
        "messages",
        "m",
        "",
        "m.chat_id = ? AND m.deleted_at IS NOT NULL",
        "o.id = m.id AND o.deleted_at IS NOT NULL",
    ),
}


def _sqlite_relations(
    db: sqlite3.Connection, columns: dict[str, list[str]], chat: int
) -> list[Held]:
    """How ``OUT``'s messages, versions and deletions of the chat relate to the part's."""
    present = {
        "messages": True,
        "message_versions": "message_versions" in columns,
        "deleted_at": "deleted_at" in columns.get("messages", []),
    }
    found = []
    for name, (table, alias, join, rows, same) in _CONTENT.items():
        if not present[name]:
            continue  # the part has none: OUT's decide alone, as with the messages

        piece = (table, alias, join, rows, same)
        out_only, part_only = (
            _only(db, a, b, piece, chat) for a, b in (("main", "part"), ("part", "main"))
        )
        if not out_only and not part_only:
            found.append(Held.SAME)
        elif not part_only:
            found.append(Held.OUT_HOLDS_PART)
        else:
            found.append(Held.PART_HOLDS_OUT if not out_only else Held.DIVERGED)
    return found


def _only(db: sqlite3.Connection, here: str, there: str, piece: tuple[str, ...], chat: int) -> int:
    """How many of the chat's rows of ``piece`` (see ``_CONTENT``) ``here`` has and
    ``there`` lacks."""
    table, alias, join, rows, same = piece
    return _count(
        db,
        f"SELECT count(*) FROM {here}.{table} {alias} {join.format(db=here)} "
        f"WHERE {rows} AND NOT EXISTS (SELECT 1 FROM {there}.{table} o WHERE {same})",
        chat,
    )


def _copy_table(db: sqlite3.Connection, table: str, columns: list[str]) -> None:
    cols = ", ".join(columns)
    into = f"INTO main.{table} ({cols}) SELECT {cols} FROM part.{table}"
    rule = "SELECT chat_id FROM temp.merge_rule WHERE rule"
    owner = None
    if "chat_id" in columns:
        owner = "chat_id"
    elif table == "message_versions":
        owner = "(SELECT chat_id FROM part.messages pm WHERE pm.id = part.message_versions.id)"
    if owner is not None:
        # A chat's rows follow the chat's rule. Every row is keyed (see the module
        # docstring): one already there is replaced or kept, never doubled.
        db.execute(f"INSERT OR REPLACE {into} WHERE {owner} IN ({rule} = 'replace') ORDER BY rowid")
        db.execute(
            f"INSERT OR IGNORE {into} WHERE {owner} NOT IN ({rule} IN ('replace', 'keep')) "
            "ORDER BY rowid"
        )
    elif table == "media":
        # Per URL the better row: a final status over one to be retried, then the later.
        better = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "url")
        retried = ", ".join(f"'{s}'" for s in _RETRIED)
        db.execute(
            f"INSERT {into} WHERE true ON CONFLICT (url) DO UPDATE SET {better} "
            f"WHERE (excluded.status NOT IN ({retried}), excluded.fetched_at) > "
            f"(media.status NOT IN ({retried}), media.fetched_at)"
        )
    else:
        db.execute(f"INSERT OR REPLACE {into} ORDER BY rowid")
