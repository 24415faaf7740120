"""`--shard I/N`: the split of the chats as a table, then shards exported for real."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import cli_env, export, read, start_cli

from messages_async.export import ExportMeta, Shard, StoreError, shard_of
from messages_async.export._merge import merged_meta
from messages_async.testing import MessagesServer

# --- the rule, without I/O -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shard"),
    [("0/1", Shard(0, 1)), ("0/4", Shard(0, 4)), ("3/4", Shard(3, 4)), (" 2/16 ", Shard(2, 16))],
)
def test_a_shard_is_written_i_of_n(text: str, shard: Shard) -> None:
    assert Shard.parse(text) == shard
    assert str(shard) == text.strip()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("4/4", "out of range for 4 shards: indices are 0-based, 0 to 3"),
        ("1/0", "shard count must be at least 1"),
        ("-1/3", "written I/N"),
        ("1", "written I/N"),
        ("a/b", "written I/N"),
        ("1/2/3", "written I/N"),
        ("１/２", "written I/N"),  # full-width digits are not ASCII
        ("", "written I/N"),
    ],
)
def test_any_other_value_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Shard.parse(text)


def test_the_rule_is_the_documented_hash_and_depends_on_the_id_only() -> None:
    for chat_id in (0, 1, 7, 123456789, 2**62):
        digest = hashlib.sha256(str(chat_id).encode()).digest()
        assert shard_of(chat_id, 5) == int.from_bytes(digest[:8], "big") % 5
    # Pinned: a change here would move chats between the shards of existing exports.
    assert [shard_of(i, 4) for i in range(1, 13)] == [1, 2, 3, 2, 3, 3, 2, 3, 0, 0, 2, 0]
    # The same in a fresh interpreter with another hash seed (str hashing is randomised).
    code = "from messages_async.export import shard_of; print([shard_of(i, 7) for i in range(50)])"
    other = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert other.stdout.strip() == str([shard_of(i, 7) for i in range(50)])


@pytest.mark.parametrize("shards", [2, 3, 4, 8])
@pytest.mark.parametrize("ids", ["consecutive", "even", "sparse"])
def test_shards_partition_the_chats_and_are_balanced(shards: int, ids: str) -> None:
    chats = {
        "consecutive": range(1, 401),
        "even": range(2, 802, 2),
        "sparse": range(10**9, 10**9 + 400 * 7919, 7919),
    }[ids]
    owners = [[c for c in chats if Shard(i, shards).owns(c)] for i in range(shards)]
    assert sorted(c for part in owners for c in part) == sorted(chats)  # each chat exactly once
    sizes = [len(part) for part in owners]
    assert max(sizes) <= 1.3 * statistics.mean(sizes), sizes


# --- shards exported for real --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["sqlite", "jsonl"])
async def test_the_shards_together_are_exactly_one_export(tmp_path: Path, fmt: str) -> None:
    async with MessagesServer(chats=24, messages_per_chat=30) as server:
        whole = tmp_path / ("whole.sqlite" if fmt == "sqlite" else "whole")
        await export(server, fmt, whole)
        parts = []
        for index in range(3):
            out = tmp_path / (f"part{index}.sqlite" if fmt == "sqlite" else f"part{index}")
            stats = await export(server, fmt, out, shard=Shard(index, 3))
            assert stats.failures == []
            parts.append(read(fmt, out))
    all_chats, all_messages = read(fmt, whole)
    seen: dict[int, list[dict[str, object]]] = {}
    for index, (chats, messages) in enumerate(parts):
        assert all(Shard(index, 3).owns(c) for c in chats)
        assert set(messages) <= set(chats)
        assert not set(messages) & set(seen), "a chat exported by two shards"
        seen.update(messages)
    assert seen == all_messages  # every chat's messages, the same raw objects, the same order
    assert set().union(*(chats for chats, _ in parts)) == set(all_chats)


def test_the_command_refuses_a_bad_shard_with_status_2() -> None:
    for bad in ("4/4", "x", "1/0"):
        proc = subprocess.run(
            [sys.executable, "-m", "messages_async", "export", "--demo", "--shard", bad],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "--shard" in proc.stderr
        assert "demo:" not in proc.stdout + proc.stderr  # refused before anything started


async def test_a_store_of_one_shard_is_not_resumed_as_another(tmp_path: Path) -> None:
    async with MessagesServer(chats=6, messages_per_chat=5) as server:
        out = str(tmp_path / "part.sqlite")
        first = await start_cli(server, "--out", out, "--shard", "0/2")
        _, err = await first.communicate()
        assert first.returncode == 0, err
        other = await start_cli(server, "--out", out, "--shard", "1/2")
        _, err = await other.communicate()
    assert other.returncode == 2
    said = err.decode()
    assert "--shard '0/2'" in said, said  # what the store holds
    assert "--shard '1/2'" in said, said  # what this run asks for


# --- merge ---------------------------------------------------------------------------------------


def _table(path: Path, query: str) -> set[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return set(db.execute(query))


_MESSAGES = "SELECT id, chat_id, raw, uid, message, created_at FROM messages"
_CHATS = "SELECT chat_id, raw, type, name, members_count FROM chats"
_STATES = "SELECT chat_id, done, newest_id, messages, error FROM export_state"


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


async def _command(server: MessagesServer, *args: str) -> tuple[int, str, str]:
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


async def _run(server: MessagesServer, *args: str) -> str:
    """``messages-async export ARGS`` (or ``merge ARGS`` when the first is "merge")."""
    command = list(args) if args[:1] == ("merge",) else ["export", *args]
    status, out, err = await _command(server, *command)
    assert status == 0, err
    return out


async def test_merged_shards_equal_one_export_and_merging_again_adds_only_the_new(
    tmp_path: Path,
) -> None:
    whole, merged = tmp_path / "whole.sqlite", tmp_path / "merged.sqlite"
    parts = [tmp_path / f"shard-{i}.sqlite" for i in range(3)]
    async with MessagesServer(chats=12, messages_per_chat=40) as server:
        for i, part in enumerate(parts):
            await _run(server, "--out", str(part), "--shard", f"{i}/3")
        said = await _run(server, "merge", "--out", str(merged), *map(str, parts))
        assert "Merged 3 parts" in said
        await _run(server, "--out", str(whole))
        for query in (_MESSAGES, _CHATS, _STATES):
            assert _table(merged, query) == _table(whole, query), query
        once = _table(merged, _MESSAGES)
        await _run(server, "merge", "--out", str(merged), *map(str, parts))  # idempotent
        assert _table(merged, _MESSAGES) == once
        # New messages, one shard run again: merging again adds exactly what it gained.
        chat = next(c for c in server.chat_ids() if Shard(1, 3).owns(c))
        server.post_message(chat, "after the first merge")
        await _run(server, "--out", str(parts[1]), "--shard", "1/3")
        await _run(server, "merge", "--out", str(merged), *map(str, parts))
        await _run(server, "--out", str(whole))  # the single export, updated too
    assert _table(merged, _MESSAGES) == _table(whole, _MESSAGES)
    assert len(_table(merged, _MESSAGES)) == len(once) + 1
    # The merged store is an ordinary export: a plain run resumes it with nothing new.
    with sqlite3.connect(merged) as db:
        (header,) = db.execute("SELECT value FROM meta WHERE key = 'export'").fetchone()
    assert '"shard": null' in header or '"shard":null' in header


async def test_merge_refuses_what_is_not_one_export(tmp_path: Path) -> None:
    async with MessagesServer(chats=4, messages_per_chat=3) as server:
        a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
        await _run(server, "--out", str(a), "--shard", "0/2")
        await _run(server, "--out", str(b), "--shard", "1/2", "--query", "x")
        for args, says in (
            (["--out", str(tmp_path / "m.sqlite"), str(a), str(b)], "another export"),
            (["--out", str(a), str(a), str(b)], "is one of the parts"),
            (
                ["--out", str(tmp_path / "m2.sqlite"), str(tmp_path / "missing.sqlite")],
                "not a file",
            ),
        ):
            status, _, err = await _command(server, "merge", *args)
            assert status == 2, err
            assert says in err, err
