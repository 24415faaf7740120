"""`--shard I/N`: the split of the chats as a table, then shards exported for real."""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import export, read, start_cli

from messages_async.export import Shard, shard_of
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
