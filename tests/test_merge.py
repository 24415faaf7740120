"""``messages-async merge``: shards' exports joined into what one process would have exported.

The rules first (which copy of a chat wins, as a table), then real exports of the emulator in
every format, merged and compared file by file with a single-process export of the same data.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import make_client
from test_export import cli_env
from test_export_windows import after_window_commits

from messages_async.export import (
    Exporter,
    ExportMeta,
    ExportOptions,
    JsonlStore,
    MediaFetcher,
    MediaOptions,
    ParquetStore,
    Shard,
    SqliteStore,
    Store,
    StoreError,
    merge_exports,
    run_with_media,
)
from messages_async.export._merge import merged_meta
from messages_async.export._merge_folders import Action, Held, Standing, decide, held, joined
from messages_async.export._rescan import Rescanner
from messages_async.testing import FileHost, MessagesServer

FOLDERS = ("jsonl", "parquet")
FORMATS = ("sqlite", *FOLDERS)

# --- the rules, without I/O ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "part", "relation"),
    [
        ({1, 2}, {1, 2}, Held.SAME),
        ({1, 2, 3}, {1, 2}, Held.OUT_HOLDS_PART),
        ({1}, {1, 2}, Held.PART_HOLDS_OUT),
        (set(), {1}, Held.PART_HOLDS_OUT),
        ({1, 3}, {1, 2}, Held.DIVERGED),
    ],
)
def test_how_two_contents_relate(out: set[int], part: set[int], relation: Held) -> None:
    assert held(out, part) is relation


@pytest.mark.parametrize(
    ("pieces", "whole"),
    [
        ([Held.SAME, Held.SAME], Held.SAME),
        ([Held.SAME, Held.PART_HOLDS_OUT], Held.PART_HOLDS_OUT),
        ([Held.OUT_HOLDS_PART, Held.SAME, Held.OUT_HOLDS_PART], Held.OUT_HOLDS_PART),
        # More messages in one copy, more versions in the other: neither holds the other.
        ([Held.PART_HOLDS_OUT, Held.OUT_HOLDS_PART], Held.DIVERGED),
    ],
)
def test_messages_versions_and_deletions_relate_together(pieces: list[Held], whole: Held) -> None:
    assert joined(pieces) is whole


DONE = Standing(done=True, settled=True)
WALKING = Standing(done=False, settled=False)  # a first walk in progress
UPDATING = Standing(done=True, settled=False)  # an update (or rescan) in progress


@pytest.mark.parametrize(
    ("relation", "out", "part", "action"),
    [
        (None, None, WALKING, Action.TAKE),  # OUT lacks the chat: whatever the part has
        (None, None, DONE, Action.TAKE),
        (Held.SAME, DONE, DONE, Action.KEEP),  # the same part again: nothing rewritten
        (Held.SAME, WALKING, DONE, Action.TAKE),  # the part finished the walk OUT is in
        (Held.SAME, DONE, UPDATING, Action.KEEP),
        (Held.OUT_HOLDS_PART, DONE, DONE, Action.KEEP),  # an older copy adds nothing
        (Held.OUT_HOLDS_PART, UPDATING, DONE, Action.KEEP),
        (Held.PART_HOLDS_OUT, DONE, DONE, Action.TAKE),  # the part ran further
        (Held.PART_HOLDS_OUT, DONE, UPDATING, Action.TAKE),  # taken with its walk, resumable
        (Held.DIVERGED, DONE, DONE, Action.UNION),  # both updated on their own
        (Held.DIVERGED, DONE, UPDATING, Action.SKIP),  # a walk cannot be joined without a gap
        (Held.DIVERGED, WALKING, DONE, Action.SKIP),
    ],
)
def test_which_copy_of_a_chat_wins(
    relation: Held | None, out: Standing | None, part: Standing, action: Action
) -> None:
    assert decide(relation, out, part) is action


@pytest.mark.parametrize(
    ("metas", "says"),
    [
        ([ExportMeta("s", shard="0/2"), ExportMeta("s", query="x", shard="1/2")], "another export"),
        ([ExportMeta("s", shard="0/2"), ExportMeta("t", shard="1/2")], "another export"),
        ([ExportMeta("s", shard="0/2"), ExportMeta("s", shard="1/3")], "different splits"),
        ([], "at least one part"),
    ],
)
def test_only_shards_of_one_export_are_merged(metas: list[ExportMeta], says: str) -> None:
    with pytest.raises(StoreError, match=says):
        merged_meta([(f"part{i}", m) for i, m in enumerate(metas)])


def test_the_merged_export_is_the_unsharded_one() -> None:
    metas = [ExportMeta("s", query="q", shard=f"{i}/3") for i in range(3)]
    assert merged_meta([(str(i), m) for i, m in enumerate(metas)]) == ExportMeta("s", query="q")


# --- helpers -------------------------------------------------------------------------------------


def _path(tmp_path: Path, fmt: str, name: str) -> Path:
    return tmp_path / (f"{name}.sqlite" if fmt == "sqlite" else name)


def _store(fmt: str, out: Path) -> Store:
    if fmt == "sqlite":
        return SqliteStore(str(out))
    return JsonlStore(str(out)) if fmt == "jsonl" else ParquetStore(str(out), part_rows=25)


async def export(
    server: MessagesServer,
    fmt: str,
    out: Path,
    shard: Shard | None = None,
    *,
    rescan: bool = False,
    media: bool = False,
    tap: Any = None,
    **settings: Any,
) -> None:
    """One export run, as ``messages-async export [--shard] [--rescan] [--media]`` makes it."""
    options = ExportOptions(shard=shard, **settings)
    store = _store(fmt, out)
    stop = asyncio.Event()
    if tap is not None:
        tap(store, stop)
    async with make_client(server) as client, store:
        meta = ExportMeta(server.resource_uri, shard=None if shard is None else str(shard))
        await store.open(meta, fresh=False)
        fetcher = MediaFetcher(client, store, MediaOptions()) if media else None
        rescanner = Rescanner(client, store) if rescan else None
        exporter = Exporter(
            client,
            store,
            options,
            stop=stop,
            on_commit=fetcher.offer if fetcher else None,
            rescan=rescanner.rescan if rescanner else None,
        )
        stats = await run_with_media(exporter, fetcher, stop)
    assert stats.failures == []
    assert stats.interrupted == stop.is_set()


async def export_shards(
    server: MessagesServer, fmt: str, tmp_path: Path, n: int, **options: Any
) -> list[Path]:
    parts = [_path(tmp_path, fmt, f"shard-{i}") for i in range(n)]
    for i, part in enumerate(parts):
        await export(server, fmt, part, Shard(i, n), **options)
    return parts


def tree(root: Path) -> dict[str, bytes]:
    """Every file of a folder export, by its path (empty folders aside)."""
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".partial" not in p.parts
    }


def snapshot(fmt: str, path: Path) -> object:
    return _rows(path) if fmt == "sqlite" else tree(path)


def _chats(fmt: str, files: dict[str, bytes], root: Path) -> dict[int, bytes]:
    if fmt == "jsonl":
        lines = files.pop("chats.jsonl").splitlines()
        return {orjson.loads(line)["chat_id"]: line for line in lines}
    import pyarrow.parquet as pq

    files.pop("chats.parquet")
    table = pq.read_table(root / "chats.parquet").to_pydict()
    rows = zip(*(table[c] for c in table), strict=True)
    return {row[0]: orjson.dumps(row) for row in rows}


def _parquet_rows(files: dict[str, bytes], root: Path) -> dict[str, Any]:
    """Each chat's message rows (by id) and its checkpoint without its count of parts."""
    import pyarrow.parquet as pq

    found: dict[str, Any] = {}
    for name in [n for n in files if n.endswith(".parquet") and n.startswith("messages")]:
        del files[name]
        table = pq.ParquetFile(root / name).read().to_pylist()
        found.setdefault(os.path.dirname(name), []).extend(table)
    for rows in found.values():
        rows.sort(key=lambda row: row["id"])
    for name in [n for n in files if n.startswith("state" + os.sep)]:
        state = orjson.loads(files.pop(name))
        del state["parts"]
        found[name] = state
    return found


def _media_index(files: dict[str, bytes]) -> dict[str, Any]:
    rows = {}
    for line in files.pop("media.jsonl", b"").splitlines():
        obj = orjson.loads(line)
        obj.pop("fetched_at")  # when: not the same for two runs
        rows[obj["url"]] = obj
    return rows


def _versions(files: dict[str, bytes]) -> dict[str, Any]:
    """``versions/`` and ``deleted/`` without their times, and the rescan checkpoints."""
    found: dict[str, Any] = {}
    for name in [n for n in files if n.split(os.sep)[0] in ("versions", "deleted")]:
        lines = [orjson.loads(line) for line in files.pop(name).splitlines()]
        found[name] = [
            {k: v for k, v in o.items() if k not in ("seen_at", "deleted_at")} for o in lines
        ]
    return found


_SQLITE = {
    "messages": "SELECT id, chat_id, raw, uid, message, created_at FROM messages",
    "chats": "SELECT chat_id, raw, type, name, members_count FROM chats",
    "export_state": "SELECT chat_id, done, newest_id, cursor, messages, error FROM export_state",
    "message_versions": "SELECT id, version, raw FROM message_versions",
    "deleted": "SELECT id, deleted_at IS NULL FROM messages",
    "media": "SELECT url, sha256, size, path, content_type, status, error FROM media",
}


def _rows(path: Path) -> dict[str, set[tuple[object, ...]]]:
    """The SQLite export's rows (times aside), by table; a table it lacks has none."""
    found = {}
    with sqlite3.connect(path) as db:
        for name, query in _SQLITE.items():
            try:
                found[name] = set(db.execute(query))
            except sqlite3.OperationalError:  # no such table or column (yet)
                found[name] = set()
    return found


def assert_same_export(fmt: str, merged: Path, whole: Path) -> None:
    """``merged`` holds exactly what the single-process export ``whole`` holds: every message
    file, checkpoint and media file byte for byte; chats, media index and versions by key."""
    if fmt == "sqlite":
        assert _rows(merged) == _rows(whole)
        assert tree(merged.with_suffix(".media")) == tree(whole.with_suffix(".media"))
        return
    ours, theirs = tree(merged), tree(whole)
    assert _chats(fmt, ours, merged) == _chats(fmt, theirs, whole)
    if fmt == "parquet":
        # Rows, not files: a merge that joins two histories adds a part where one process
        # would have written its update's rows into one.
        assert _parquet_rows(ours, merged) == _parquet_rows(theirs, whole)
    assert _media_index(ours) == _media_index(theirs)
    assert _versions(ours) == _versions(theirs)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name] == theirs[name], name


async def command(server: MessagesServer, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "messages_async",
        *args,
        env=cli_env(server),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def merge(out: Path, parts: list[Path]) -> None:
    stats = await merge_exports(str(out), [str(p) for p in parts])
    assert stats.skipped == []


# --- merged for real -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["sqlite", *FOLDERS])
async def test_the_command_merges_shards_into_exactly_one_export(fmt: str, tmp_path: Path) -> None:
    merged, whole = _path(tmp_path, fmt, "merged"), _path(tmp_path, fmt, "whole")
    async with MessagesServer(chats=12, messages_per_chat=(0, 60)) as server:
        parts = await export_shards(server, fmt, tmp_path, 3)
        status, said, err = await command(server, "merge", "--out", str(merged), *map(str, parts))
        assert status == 0, err
        assert "Merged 3 parts" in said
        await export(server, fmt, whole)
        assert_same_export(fmt, merged, whole)
        # The command resumes on the merged export as on its own: an incremental update.
        server.post_message(server.chat_ids()[0], "after the merge")
        status, _, err = await command(server, "export", "--format", fmt, "--out", str(merged))
        assert status == 0, err
        await export(server, fmt, whole)
    assert_same_export(fmt, merged, whole)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_merging_again_is_idempotent_and_additive(fmt: str, tmp_path: Path) -> None:
    merged, whole = _path(tmp_path, fmt, "merged"), _path(tmp_path, fmt, "whole")
    async with MessagesServer(chats=10, messages_per_chat=(5, 70)) as server:
        parts = await export_shards(server, fmt, tmp_path, 3)
        await merge(merged, parts[:2])  # a subset of the shards first
        await merge(merged, parts)
        once = snapshot(fmt, merged)
        stamps = {p: p.stat().st_mtime_ns for p in merged.rglob("*") if p.is_file()}
        await merge(merged, [*parts, parts[0]])  # the same parts again, one twice
        assert snapshot(fmt, merged) == once
        if fmt != "sqlite":  # nothing was rewritten either (chats and media index included)
            assert {p: p.stat().st_mtime_ns for p in merged.rglob("*") if p.is_file()} == stamps
        await export(server, fmt, whole)  # the single process, with the same history
        assert_same_export(fmt, merged, whole)
        # New messages; one shard runs again: merging again adds exactly what it gained.
        chat = next(c for c in server.chat_ids() if Shard(1, 3).owns(c))
        server.post_message(chat, "after the first merge")
        await export(server, fmt, parts[1], Shard(1, 3))
        await merge(merged, parts)
        await export(server, fmt, whole)
        assert_same_export(fmt, merged, whole)
        # A whole export given as a part (an older one, too) duplicates nothing.
        older = _path(tmp_path, fmt, "older")
        await export(server, fmt, older)
        server.post_message(chat, "after the older export")
        await export(server, fmt, whole)
        for part in parts:
            await export(server, fmt, part, Shard(parts.index(part), 3))
        await merge(merged, [older, *parts])
        assert_same_export(fmt, merged, whole)
        await merge(merged, [older])  # after the newer shards too: it regresses nothing
    assert_same_export(fmt, merged, whole)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_an_export_resumes_on_the_merge_and_a_later_merge_joins_both(
    fmt: str, tmp_path: Path
) -> None:
    merged, whole = _path(tmp_path, fmt, "merged"), _path(tmp_path, fmt, "whole")
    async with MessagesServer(chats=8, messages_per_chat=(10, 50)) as server:
        parts = await export_shards(server, fmt, tmp_path, 2)
        await merge(merged, parts)
        await export(server, fmt, whole)
        chats = server.chat_ids()
        # OUT is updated by a plain export of its own, which stores a message deleted before
        # the shard runs again; the shard stores a newer one: each copy of the chat now holds
        # a message the other lacks, as the single process holds both.
        chat = next(c for c in chats if Shard(0, 2).owns(c))
        gone = server.post_message(chat, "stored by the export on OUT only")
        await export(server, fmt, merged)
        await export(server, fmt, whole)
        server.delete_message(gone["id"])
        server.post_message(chat, "stored by the shard only")
        await export(server, fmt, parts[0], Shard(0, 2))
        await export(server, fmt, whole)
        stats = await merge_exports(str(merged), [str(p) for p in parts])
        assert (stats.joined, stats.skipped) == (1, [])
        assert_same_export(fmt, merged, whole)
        again = await merge_exports(str(merged), [str(p) for p in parts])
        assert (again.joined, again.taken) == (0, 0)
        # And an export resumes on the result as on any export of its own.
        server.post_message(chat, "after the union")
        await export(server, fmt, merged)
        await export(server, fmt, whole)
    assert_same_export(fmt, merged, whole)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_versions_deletions_and_media_files_are_merged(fmt: str, tmp_path: Path) -> None:
    merged, whole = _path(tmp_path, fmt, "merged"), _path(tmp_path, fmt, "whole")
    # No generated messages: their attachments point at hosts that do not exist.
    async with MessagesServer(chats=6, messages_per_chat=0) as server, FileHost() as host:
        chats = server.chat_ids()
        for i, chat in enumerate(chats):
            for n in range(5):
                server.post_message(chat, f"text {n}")
            url = host.add(f"f{i}.bin", os.urandom(2000) if i % 2 else b"the same bytes")
            server.post_message(chat, f"file {i}", attachments=[{"type": "file", "url": url}])
        gone = host.gone("gone.pdf", 404)
        server.post_message(chats[0], "gone", attachments=[{"type": "file", "url": gone}])
        parts = await export_shards(server, fmt, tmp_path, 3, media=True)
        await export(server, fmt, whole, media=True)
        for chat in chats[:4]:
            first, second = server.messages(chat)[:2]
            server.edit_message(first["id"], text="edited")
            server.delete_message(second["id"])
        for i, part in enumerate(parts):
            await export(server, fmt, part, Shard(i, 3), rescan=True)
        await export(server, fmt, whole, rescan=True)
        await merge(merged, parts)
        await merge(merged, parts)
    if fmt == "sqlite":
        assert _rows(merged)["message_versions"]
        assert len(tree(merged.with_suffix(".media"))) == 4
    else:
        assert any(name.startswith("versions") for name in tree(merged))
        assert len([n for n in tree(merged) if n.startswith("media" + os.sep)]) == 4
    assert_same_export(fmt, merged, whole)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_walk_in_progress_is_taken_resumable_and_never_joined_with_a_gap(
    fmt: str, tmp_path: Path
) -> None:
    merged, part = _path(tmp_path, fmt, "merged"), _path(tmp_path, fmt, "part")
    async with MessagesServer(chats=1, messages_per_chat=300) as server:
        (chat,) = server.chat_ids()
        doomed = server.post_message(chat, "deleted after the part's first page")
        store = _store(fmt, part)
        async with make_client(server) as client, store:
            await store.open(ExportMeta(server.resource_uri), fresh=False)
            stop = asyncio.Event()
            original = store.commit

            async def commit(*args: Any, **kwargs: Any) -> Any:
                result = await original(*args, **kwargs)
                stop.set()  # as Ctrl-C after the first page: the walk stays in progress
                return result

            store.commit = commit  # type: ignore[method-assign]
            await Exporter(client, store, ExportOptions(), stop=stop).run()
        server.delete_message(doomed["id"])
        await merge(merged, [part])  # OUT lacks the chat: the walk is taken over as it is
        older = _path(tmp_path, fmt, "older")
        await export(server, fmt, older)
        # The older export holds old messages the walk has not reached, the walk one the
        # older export lacks: joined, they would claim a stretch the walk never stored.
        status, _, err = await command(server, "merge", "--out", str(merged), str(older))
        assert status == 1, err
        assert f"not merged: chat {chat}" in err, err
        # A run on the taken-over walk finishes it like any resumed export, and so does the
        # part's: the same result.
        await export(server, fmt, merged)
        await export(server, fmt, part)
        assert_same_export(fmt, merged, part)
        await merge(merged, [older, part])  # now each holds the other or more
    assert_same_export(fmt, merged, part)


def _windows(fmt: str, path: Path) -> object:
    """The window checkpoints (and JSONL segments, Parquet window parts) of an export."""
    if fmt == "sqlite":
        with sqlite3.connect(path) as db:
            return set(db.execute("SELECT * FROM export_windows"))
    return {name: data for name, data in tree(path).items() if ".window-" in name}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_chat_walked_in_windows_is_taken_mid_walk_and_finished_on_the_merge(
    fmt: str, tmp_path: Path
) -> None:
    merged, whole = _path(tmp_path, fmt, "merged"), _path(tmp_path, fmt, "whole")
    windowed = {"window_threshold": 100, "page_size": 20, "concurrency": 4}
    async with MessagesServer(chats=4, messages_per_chat=(20, 600), seed=5) as server:
        parts = [_path(tmp_path, fmt, f"shard-{i}") for i in range(2)]
        await export(server, fmt, parts[1], Shard(1, 2), **windowed)
        # Shard 0 stopped while its big chats' windows are under way.
        await export(
            server,
            fmt,
            parts[0],
            Shard(0, 2),
            tap=after_window_commits(6, asyncio.Event.set),
            **windowed,
        )
        await merge(merged, parts)  # the windows taken over as they stand
        walking = _windows(fmt, parts[0])
        assert walking, "the stop should land while windows are under way"
        assert _windows(fmt, merged) == walking
        await export(server, fmt, merged, **windowed)  # and finished on OUT
        await export(server, fmt, whole, **windowed)
        assert_same_export(fmt, merged, whole)
        await export(server, fmt, parts[0], Shard(0, 2), **windowed)
        await merge(merged, parts)  # the shard, finished since, adds nothing
    assert_same_export(fmt, merged, whole)


# A merge process killed at its Nth rename or removal: each a real SIGKILL of a real process.
_KILLER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from messages_async.export import merge_exports
    left = int(sys.argv[1])
    for name in ("replace", "unlink"):
        real = getattr(os, name)
        def hook(*args, _real=real, **kwargs):
            global left
            left -= 1
            if left < 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)
        setattr(os, name, hook)
    asyncio.run(merge_exports(sys.argv[2], sys.argv[3:]))
    """
)


def _of_chat(files: dict[str, bytes], chat: int) -> dict[str, bytes]:
    sep = os.sep
    mine = (f"state{sep}{chat}.json", f"messages{sep}chat_id={chat}{sep}", f".pending{sep}{chat}.")
    return {name: data for name, data in files.items() if name.startswith(mine)}


def _copy_tree(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def _killed_merge(at: int, out: Path, parts: list[Path]) -> int:
    command = [sys.executable, "-c", _KILLER, str(at), str(out), *map(str, parts)]
    proc = subprocess.run(command, capture_output=True, check=False)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
    return proc.returncode


@pytest.mark.parametrize("fmt", FOLDERS)
async def test_a_merge_killed_at_any_rename_leaves_no_chat_torn(fmt: str, tmp_path: Path) -> None:
    async with MessagesServer(chats=6, messages_per_chat=(20, 60)) as server:
        parts = await export_shards(server, fmt, tmp_path, 2)
        base = _path(tmp_path, fmt, "base")
        await merge(base, parts)
        # The next merge has something to swap in for every chat of shard 0.
        for chat in server.chat_ids():
            server.post_message(chat, "new")
        await export(server, fmt, parts[0], Shard(0, 2))
        reference = _path(tmp_path, fmt, "reference")
        _copy_tree(base, reference)
        await merge(reference, parts)
        whole = _path(tmp_path, fmt, "whole")
        await export(server, fmt, whole)
        old, new = tree(base), tree(reference)
        kills = 0
        for at in range(0, 100, 3):
            out = tmp_path / f"killed-{at}"
            _copy_tree(base, out)
            if _killed_merge(at, out, parts) == 0:
                break
            kills += 1
            # Whoever opens it next finishes or undoes the swap it was killed in: every chat
            # is wholly the old copy or wholly the merged one.
            async with _store(fmt, out) as store:
                await store.open(ExportMeta(server.resource_uri), fresh=False)
            after = tree(out)
            assert not (out / ".merge").exists()
            for chat in server.chat_ids():
                mine = _of_chat(after, chat)
                assert mine in (_of_chat(old, chat), _of_chat(new, chat)), f"{at}: chat {chat}"
            await merge(out, parts)  # merging again completes it exactly
            assert tree(out) == new
            await export(server, fmt, out)  # and an export resumes on it
            assert_same_export(fmt, out, whole)
    assert kills >= 4


async def test_mixed_formats_and_an_out_of_another_format_are_refused(tmp_path: Path) -> None:
    async with MessagesServer(chats=4, messages_per_chat=3) as server:
        a, b = tmp_path / "a.sqlite", tmp_path / "b"
        await export(server, "sqlite", a, Shard(0, 2))
        await export(server, "jsonl", b, Shard(1, 2))
        c = tmp_path / "c"
        await export(server, "parquet", c, Shard(1, 2))
        torn = tmp_path / "torn"  # a part that a merge into it was killed in
        await export(server, "jsonl", torn, Shard(0, 2))
        (torn / ".merge" / "7").mkdir(parents=True)
        (torn / ".merge" / "7" / "plan.json").write_bytes(b'{"moves": [], "removals": []}')
        for args, says in (
            ([str(tmp_path / "m4"), str(torn), str(b)], "was being merged into"),
            ([str(tmp_path / "m.sqlite"), str(a), str(b)], "different formats"),
            ([str(tmp_path / "m"), str(b), str(c)], "different formats"),
            ([str(c), str(b)], "is a Parquet export and the parts are JSONL"),
            ([str(b), str(b)], "is one of the parts"),
            ([str(tmp_path / "m2"), str(tmp_path / "missing")], "not a file or a directory"),
            ([str(tmp_path / "m3"), str(tmp_path)], "without a messages-async export"),
        ):
            with pytest.raises(StoreError, match=says):
                await merge_exports(args[0], args[1:])
        # The command says the same, with status 2, before it writes anything.
        status, _, err = await command(
            server, "merge", "--out", str(tmp_path / "m"), str(b), str(c)
        )
        assert status == 2, err
        assert "different formats" in err, err
        assert not (tmp_path / "m").exists()
        assert not (tmp_path / "m.sqlite").exists()


_MESSAGES = "SELECT id, chat_id, raw, uid, message, created_at FROM messages"


def _table(path: Path, query: str) -> set[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return set(db.execute(query))


async def test_sqlite_merging_again_adds_only_the_new(tmp_path: Path) -> None:
    whole, merged = tmp_path / "whole.sqlite", tmp_path / "merged.sqlite"
    async with MessagesServer(chats=12, messages_per_chat=40) as server:
        parts = await export_shards(server, "sqlite", tmp_path, 3)
        await export(server, "sqlite", whole)
        await merge(merged, parts)
        once = _table(merged, _MESSAGES)
        await merge(merged, parts)  # idempotent
        assert _table(merged, _MESSAGES) == once
        # New messages, one shard run again: merging again adds exactly what it gained.
        chat = next(c for c in server.chat_ids() if Shard(1, 3).owns(c))
        server.post_message(chat, "after the first merge")
        await export(server, "sqlite", parts[1], Shard(1, 3))
        await merge(merged, parts)
        await export(server, "sqlite", whole)  # the single export, updated too
    assert_same_export("sqlite", merged, whole)
    assert len(_table(merged, _MESSAGES)) == len(once) + 1
    # The merged store is an ordinary export, without a shard.
    with sqlite3.connect(merged) as db:
        (header,) = db.execute("SELECT value FROM meta WHERE key = 'export'").fetchone()
    assert orjson.loads(header)["shard"] is None


async def test_sqlite_merge_refuses_what_is_not_one_export(tmp_path: Path) -> None:
    async with MessagesServer(chats=4, messages_per_chat=3) as server:
        a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
        await export(server, "sqlite", a, Shard(0, 2))
        store = SqliteStore(str(b))
        async with make_client(server) as client, store:
            meta = ExportMeta(server.resource_uri, query="x", shard="1/2")
            await store.open(meta, fresh=False)
            await Exporter(client, store, ExportOptions(shard=Shard(1, 2), query="x")).run()
        for args, says in (
            (["--out", str(tmp_path / "m.sqlite"), str(a), str(b)], "another export"),
            (["--out", str(a), str(a), str(b)], "is one of the parts"),
        ):
            status, _, err = await command(server, "merge", *args)
            assert status == 2, err
            assert says in err, err
