"""``messages-async merge --out OUT PART...``: shard stores joined into one export.

Chat ids are global and each shard exports whole chats (``_shard.py``), so a merge copies
rows and never reconciles them: every table of every part is copied into ``OUT`` by its key
(``messages`` by ``id``, ``chats`` and the checkpoints by ``chat_id``, versions by ``(id,
version)``, the media index by ``url``), a row already there being replaced by the part's.
Merging the same parts again changes nothing; merging a part again after it ran further adds
what it gained. Raw objects are copied as stored, byte for byte. The media files beside each
part (content-addressed, ``ab/ab12…``) are copied into ``OUT``'s media folder when missing.

The parts must be the same export: the same source and filters (their ``--shard`` aside);
``OUT`` is an export of that, without a shard. SQLite only for now.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Sequence

import attrs
import orjson

from ._state import ExportMeta
from ._store import StoreError

__all__ = ["MergeStats", "merge_sqlite", "merged_meta"]


@attrs.define
class MergeStats:
    parts: int = 0
    chats: int = 0
    messages: int = 0
    files: int = 0


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


def merge_sqlite(out: str, parts: Sequence[str]) -> MergeStats:
    """Copy every part into ``out`` (an export opened before by ``SqliteStore``)."""
    stats = MergeStats()
    db = sqlite3.connect(out, isolation_level=None)
    try:
        for part in parts:
            _merge_one(db, part, stats)
            stats.parts += 1
            stats.files += _copy_media(media_folder_of(part), media_folder_of(out))
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
            for table in tables:
                ours = {r[1] for r in db.execute(f"PRAGMA main.table_info({table})")}
                theirs = [r[1] for r in db.execute(f"PRAGMA part.table_info({table})")]
                for column in theirs:
                    if column not in ours:
                        db.execute(f"ALTER TABLE main.{table} ADD COLUMN {column}")
                cols = ", ".join(theirs)
                # Every table has a key (see the module docstring): a row already merged
                # is replaced by the part's current one, never doubled.
                db.execute(
                    f"INSERT OR REPLACE INTO main.{table} ({cols}) "
                    f"SELECT {cols} FROM part.{table} ORDER BY rowid"
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        db.execute("DETACH DATABASE part")


def _copy_media(source: str, target: str) -> int:
    copied = 0
    if not os.path.isdir(source):
        return 0
    for folder, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # partial downloads stay behind
        for name in files:
            src = os.path.join(folder, name)
            dst = os.path.join(target, os.path.relpath(src, source))
            if os.path.exists(dst):
                continue  # content-addressed: the same name is the same bytes
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
            copied += 1
    return copied
