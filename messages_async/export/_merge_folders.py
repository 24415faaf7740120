"""JSONL and Parquet exports merged into one, chat by chat (``messages-async merge``).

A chat is exported whole by one shard, so each chat of ``OUT`` comes from one copy at a time:
the copy ``OUT`` holds (if any) or the part's. What a copy *holds* is its content: the ids of
its messages (pending update segments and a windowed walk's segments or parts included), its
versions by ``(id, version)`` and its deletions by ``id``. Comparing the two contents
decides (:func:`decide`, a pure table):

- the same content: ``OUT``'s copy stays, unless the part's checkpoint is further along (it
  finished a walk ``OUT``'s copy is in the middle of);
- one holds the other: the fuller copy wins, taken over whole and byte for byte (its files up
  to its checkpoint's lengths, its checkpoint as written); a walk in progress stays resumable;
- neither (``OUT`` was updated by a run of its own, the part by another): when both copies
  are settled (no walk, update or rescan in progress), the union: every message once, newest
  first (JSONL) or as parts (Parquet), the line of the copy with the higher watermark where
  both have an id, and that copy's checkpoint with the counts and lengths of the union. A copy
  in the middle of a walk cannot be joined to another without a gap, so such a chat keeps
  ``OUT``'s copy and is reported: finish the part's export and merge again.

So merging is idempotent (the same part again changes nothing and rewrites nothing) and
additive (a part that ran further brings what it gained; a subset of the shards, or a whole
export given as a part, adds only what ``OUT`` lacks). The chat objects of the chats taken
from a part replace ``OUT``'s; the media index takes each URL's better line (a final status
over one to be retried, then the later fetch) and the content-addressed media files are copied
when missing.

Crash safety: each chat's new files are written into a journal and swapped in together (see
``_swap.py``): a merge killed at any point leaves every chat wholly the old or the new copy,
and whoever opens ``OUT`` next (the merge again, or an export) finishes or discards the swap.
The chats file and the media index are each replaced atomically, after the chats' data and
the media files they refer to.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence, Set
from typing import Any

import attrs
import orjson

from ._jsonl import _copy_into, atomic_write, chat_file, read_window
from ._media import _RETRIED
from ._parquet import _WINDOW, _write_parquet, load_pyarrow, part_name
from ._state import ChatState
from ._store import Store, StoreError
from ._swap import Swap

__all__ = [
    "Action",
    "FolderMerge",
    "Held",
    "Standing",
    "copy_media",
    "decide",
    "held",
    "merge_folder",
]

logger = logging.getLogger("messages_async.export")

_STATE_FILE = re.compile(r"(\d+)\.json")
_PART_FILE = re.compile(r"part-(\d+)\.parquet")


# --- the decision, without I/O -------------------------------------------------------------------


class Held(enum.Enum):
    """How the content of ``OUT``'s copy of a chat relates to the part's."""

    SAME = "same"
    OUT_HOLDS_PART = "out holds part"
    PART_HOLDS_OUT = "part holds out"
    DIVERGED = "diverged"


def held(out: Set[Any], part: Set[Any]) -> Held:
    if out == part:
        return Held.SAME
    if part <= out:
        return Held.OUT_HOLDS_PART
    if out <= part:
        return Held.PART_HOLDS_OUT
    return Held.DIVERGED


def joined(relations: Iterable[Held]) -> Held:
    """The relation of two contents from the relations of their pieces."""
    kinds = {r for r in relations if r is not Held.SAME}
    if len(kinds) > 1:
        return Held.DIVERGED
    return kinds.pop() if kinds else Held.SAME


@attrs.frozen
class Standing:
    """Where a copy's checkpoint stands: walked to the end once, and nothing in progress."""

    done: bool
    settled: bool


class Action(enum.Enum):
    KEEP = "keep"  # OUT's copy stays as it is
    TAKE = "take"  # the part's copy replaces it, byte for byte
    UNION = "union"  # both copies' content, once each
    SKIP = "skip"  # cannot be joined now: OUT's copy stays, and the chat is reported


def decide(relation: Held | None, out: Standing | None, part: Standing) -> Action:
    """What becomes of a chat (``relation`` and ``out`` None: ``OUT`` has no copy)."""
    if out is None or relation is None:
        return Action.TAKE
    if relation is Held.SAME:
        ahead = (part.done, part.settled) > (out.done, out.settled)
        return Action.TAKE if ahead else Action.KEEP
    if relation is Held.OUT_HOLDS_PART:
        return Action.KEEP
    if relation is Held.PART_HOLDS_OUT:
        return Action.TAKE
    return Action.UNION if out.settled and part.settled else Action.SKIP


# --- reading a copy ------------------------------------------------------------------------------


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return None


def _lines(path: str, length: int) -> Iterator[bytes]:
    """The lines of ``path`` within its first ``length`` bytes (what a checkpoint covers)."""
    if length <= 0:
        return
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        left = length
        for line in f:
            yield line[:left]
            left -= len(line)
            if left <= 0:
                return


def _copy_prefix(source: str, target: str, length: int) -> None:
    """``target`` made of the first ``length`` bytes of ``source`` (none: an empty file)."""
    with open(target, "wb") as dst:
        if length > 0:
            _copy_into(dst, source, length)


def _message_id(line: bytes) -> int:
    return int(orjson.loads(line)["id"])


class Copy(abc.ABC):
    """One export's copy of one chat: its checkpoint, and the files it covers."""

    def __init__(self, root: str, chat_id: int, state_raw: bytes) -> None:
        self.root = root
        self.chat_id = chat_id
        self.state_raw = state_raw
        obj = orjson.loads(state_raw)
        self.state_obj: dict[str, Any] = obj
        self.state = ChatState.from_json(obj)
        self.rescan_raw: bytes | None = None
        self.rescan: dict[str, Any] | None = None
        with contextlib.suppress(FileNotFoundError), open(self.path(self.rescan_rel), "rb") as f:
            self.rescan_raw = f.read()
            self.rescan = orjson.loads(self.rescan_raw)

    def path(self, *rel: str) -> str:
        return os.path.join(self.root, *rel)

    @property
    def state_rel(self) -> str:
        return os.path.join("state", f"{self.chat_id}.json")

    @property
    def versions_rel(self) -> str:
        return os.path.join("versions", f"{self.chat_id}.jsonl")

    @property
    def deleted_rel(self) -> str:
        return os.path.join("deleted", f"{self.chat_id}.jsonl")

    @property
    def rescan_rel(self) -> str:
        return os.path.join("rescan", f"{self.chat_id}.json")

    @property
    def standing(self) -> Standing:
        rescanning = self.rescan is not None and self.rescan.get("top") is not None
        busy = self.state.in_progress or self.state.merging or rescanning
        return Standing(done=self.state.done, settled=not busy)

    def versions(self) -> list[bytes]:
        length = self.rescan["versions_length"] if self.rescan else 0
        return list(_lines(self.path(self.versions_rel), length))

    def deleted(self) -> list[bytes]:
        length = self.rescan["deleted_length"] if self.rescan else 0
        return list(_lines(self.path(self.deleted_rel), length))

    def holds(self, other: Copy) -> Held:
        """How ``self``'s content (``OUT``'s copy) relates to ``other``'s (the part's)."""
        if (self.state_raw, self.rescan_raw, self.sizes()) == (
            other.state_raw,
            other.rescan_raw,
            other.sizes(),
        ):
            return Held.SAME  # the same part merged again: nothing to read
        return joined(
            [
                held(self.message_ids(), other.message_ids()),
                held(_version_keys(self.versions()), _version_keys(other.versions())),
                held(_deleted_keys(self.deleted()), _deleted_keys(other.deleted())),
            ]
        )

    @abc.abstractmethod
    def sizes(self) -> tuple[int | None, ...]:
        """The sizes of the files the checkpoint covers (equal checkpoints, equal sizes: the
        same content)."""

    @abc.abstractmethod
    def message_ids(self) -> set[int]: ...

    @abc.abstractmethod
    def stage_take(self, swap: Swap, out: Copy | None) -> None:
        """Stage this copy's messages in ``swap``'s export, replacing ``out``'s."""

    @abc.abstractmethod
    def stage_union(self, swap: Swap, other: Copy, out: Copy) -> dict[str, Any]:
        """Stage the union of this copy's messages (winning on equal ids) and ``other``'s;
        the checkpoint fields it changes."""

    def stage_rescan_take(self, swap: Swap, out: Copy | None) -> None:
        if self.rescan is None:
            for rel in (self.versions_rel, self.deleted_rel, self.rescan_rel):
                if out is not None and os.path.exists(out.path(rel)):
                    swap.remove(rel)
            return
        for rel, key in (
            (self.versions_rel, "versions_length"),
            (self.deleted_rel, "deleted_length"),
        ):
            _copy_prefix(self.path(rel), swap.stage(rel), self.rescan[key])
        with open(swap.stage(self.rescan_rel), "wb") as f:
            f.write(self.rescan_raw or b"")

    def stage_rescan_union(self, swap: Swap, other: Copy) -> None:
        """This copy's versions and deletions, then ``other``'s that this one lacks."""
        if self.rescan is None and other.rescan is None:
            return
        versions = _union(self.versions(), other.versions(), _version_key)
        deleted = _union(self.deleted(), other.deleted(), _deleted_key)
        for rel, lines in ((self.versions_rel, versions), (self.deleted_rel, deleted)):
            with open(swap.stage(rel), "wb") as f:
                f.write(b"".join(lines))
        base = self.rescan if self.rescan is not None else other.rescan
        assert base is not None
        checkpoint = {
            **base,
            "versions_length": sum(map(len, versions)),
            "deleted_length": sum(map(len, deleted)),
        }
        with open(swap.stage(self.rescan_rel), "wb") as f:
            f.write(orjson.dumps(checkpoint))


def _version_key(line: bytes) -> tuple[int, int]:
    obj = orjson.loads(line)
    return int(obj["id"]), int(obj["version"])


def _deleted_key(line: bytes) -> int:
    return int(orjson.loads(line)["id"])


def _version_keys(lines: list[bytes]) -> set[tuple[int, int]]:
    return {_version_key(line) for line in lines}


def _deleted_keys(lines: list[bytes]) -> set[int]:
    return {_deleted_key(line) for line in lines}


def _union(first: list[bytes], second: list[bytes], key: Any) -> list[bytes]:
    seen = {key(line) for line in first}
    return first + [line for line in second if key(line) not in seen]


# --- JSONL ---------------------------------------------------------------------------------------


class JsonlCopy(Copy):
    """A chat of a JSONL export (``_jsonl.py``): its file, and an update segment in progress."""

    @property
    def main_rel(self) -> str:
        return os.path.relpath(chat_file(self.root, self.chat_id), self.root)

    @property
    def flat_rel(self) -> str:
        return os.path.join("messages", f"{self.chat_id}.jsonl")  # the earlier layout

    @property
    def pending_rel(self) -> str:
        return os.path.join(".pending", f"{self.chat_id}.jsonl")

    def _main(self) -> str:
        main = self.path(self.main_rel)
        flat = self.path(self.flat_rel)
        return flat if not os.path.exists(main) and os.path.exists(flat) else main

    def _renamed(self) -> bool:
        """An update's merge was under way and its rename has happened (see _jsonl.py)."""
        s = self.state
        return s.merging and _size(self._main()) == s.length + s.pending_length

    def _main_length(self) -> int:
        s = self.state
        return s.length + s.pending_length if self._renamed() else s.length

    def _pending_length(self) -> int:
        s = self.state
        return s.pending_length if (s.merging or s.in_progress) and not self._renamed() else 0

    def _window_rels(self) -> list[str]:
        """A windowed walk's segments and checkpoints (see _jsonl.py), temporary files aside."""
        prefix = f"{self.chat_id}.window-"
        with contextlib.suppress(FileNotFoundError):
            names = os.listdir(self.path(".pending"))
            return sorted(
                os.path.join(".pending", n)
                for n in names
                if n.startswith(prefix) and not n.endswith(".tmp")
            )
        return []

    def _segments(self) -> list[tuple[str, int]]:
        found = [
            (self.path(self.pending_rel), self._pending_length()),
            (self._main(), self._main_length()),
        ]
        for planned in self.state.windows:
            stem = self.path(".pending", f"{self.chat_id}.window-{planned.index}")
            window = read_window(f"{stem}.json", planned)
            found.append((f"{stem}.jsonl", window.length))
        return found

    def sizes(self) -> tuple[int | None, ...]:
        windows = [_size(self.path(rel)) for rel in self._window_rels()]
        return (_size(self._main()), _size(self.path(self.pending_rel)), *windows)

    def message_ids(self) -> set[int]:
        return {_message_id(line) for path, n in self._segments() for line in _lines(path, n)}

    def newest_first(self) -> Iterator[tuple[int, bytes]]:
        """The settled file's ``(id, line)``s, checked to be newest first."""
        previous: int | None = None
        for line in _lines(self._main(), self._main_length()):
            mid = _message_id(line)
            if previous is not None and mid >= previous:
                raise StoreError(
                    f"{self._main()}: message {mid} after {previous}; a chat's file must be "
                    "newest first to be merged"
                )
            previous = mid
            yield mid, line

    def _stage_removals(self, swap: Swap, out: Copy | None, *, keep_pending: bool) -> None:
        if out is None:
            return
        rels = [self.flat_rel, os.path.join(".pending", f"{self.chat_id}.merge")]
        if not keep_pending:
            rels.append(self.pending_rel)
        for rel in rels:
            if os.path.exists(out.path(rel)):
                swap.remove(rel)

    def stage_take(self, swap: Swap, out: Copy | None) -> None:
        pending = self._pending_length()
        self._stage_removals(swap, out, keep_pending=bool(pending))
        windows = self._window_rels()
        if isinstance(out, JsonlCopy):
            for rel in set(out._window_rels()) - set(windows):
                swap.remove(rel)
        _copy_prefix(self._main(), swap.stage(self.main_rel), self._main_length())
        if pending:
            _copy_prefix(self.path(self.pending_rel), swap.stage(self.pending_rel), pending)
        for rel in windows:  # a windowed walk in progress, as it stands (the store cuts it)
            _copy_prefix(self.path(rel), swap.stage(rel), os.path.getsize(self.path(rel)))

    def stage_union(self, swap: Swap, other: Copy, out: Copy) -> dict[str, Any]:
        assert isinstance(other, JsonlCopy)
        self._stage_removals(swap, out, keep_pending=False)
        count = length = 0
        with open(swap.stage(self.main_rel), "wb") as f:
            for line in _newest_first_union(self.newest_first(), other.newest_first()):
                f.write(line)
                count += 1
                length += len(line)
        return {"messages": count, "length": length, "pending_length": 0, "merging": False}


def _newest_first_union(
    first: Iterator[tuple[int, bytes]], second: Iterator[tuple[int, bytes]]
) -> Iterator[bytes]:
    """Two newest-first sequences as one, each id once (``first``'s line where both have it)."""
    a, b = next(first, None), next(second, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] >= b[0]):
            assert a is not None
            if b is not None and b[0] == a[0]:
                b = next(second, None)
            yield a[1]
            a = next(first, None)
        else:
            yield b[1]
            b = next(second, None)


# --- Parquet -------------------------------------------------------------------------------------


class ParquetCopy(Copy):
    """A chat of a Parquet export (``_parquet.py``): the parts its checkpoint counts."""

    @property
    def folder_rel(self) -> str:
        return os.path.join("messages", f"chat_id={self.chat_id}")

    @property
    def parts(self) -> int:
        parts = self.state_obj.get("parts", 0)
        return parts if isinstance(parts, int) and not isinstance(parts, bool) else 0

    def part_rel(self, n: int) -> str:
        return os.path.join(self.folder_rel, part_name(n))

    def _window_rels(self) -> list[str]:
        """A windowed walk's hidden parts and checkpoints (see _parquet.py)."""
        with contextlib.suppress(FileNotFoundError):
            names = os.listdir(self.path(self.folder_rel))
            return sorted(os.path.join(self.folder_rel, n) for n in names if n.startswith(_WINDOW))
        return []

    def sizes(self) -> tuple[int | None, ...]:
        rels = [self.part_rel(n) for n in range(self.parts)] + self._window_rels()
        return tuple(_size(self.path(rel)) for rel in rels)

    def _read(self, n: int, columns: list[str] | None = None) -> Any:
        _, pq = load_pyarrow()
        # A file, not a dataset: no chat_id column from the directory's name.
        return pq.ParquetFile(self.path(self.part_rel(n))).read(columns=columns)

    def message_ids(self) -> set[int]:
        _, pq = load_pyarrow()
        files = [self.path(self.part_rel(n)) for n in range(self.parts)]
        for planned in self.state.windows:
            stem = self.path(self.folder_rel, f"{_WINDOW}{planned.index}")
            window = read_window(f"{stem}.json", planned)
            files += [f"{stem}-{k}.part" for k in range(window.length)]
        return {
            i for f in files for i in pq.ParquetFile(f).read(columns=["id"]).column(0).to_pylist()
        }

    def _stage_removals(self, swap: Swap, out: Copy | None, keep: int) -> None:
        """Remove ``out``'s files of the chat beyond the first ``keep`` parts."""
        if out is None:
            return
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(out.path(self.folder_rel)):
                match = _PART_FILE.fullmatch(name)
                if match is None or int(match.group(1)) >= keep:
                    swap.remove(os.path.join(self.folder_rel, name))

    def _stage_parts(self, swap: Swap) -> None:
        for n in range(self.parts):
            source = self.path(self.part_rel(n))
            _copy_prefix(source, swap.stage(self.part_rel(n)), os.path.getsize(source))

    def stage_take(self, swap: Swap, out: Copy | None) -> None:
        self._stage_removals(swap, out, self.parts)  # OUT's window files included
        self._stage_parts(swap)
        for rel in self._window_rels():  # a windowed walk in progress, as it stands
            _copy_prefix(self.path(rel), swap.stage(rel), os.path.getsize(self.path(rel)))

    def stage_union(self, swap: Swap, other: Copy, out: Copy) -> dict[str, Any]:
        assert isinstance(other, ParquetCopy)
        pa, pq = load_pyarrow()
        import pyarrow.compute as pc

        if self is not out:
            self._stage_parts(swap)
        ids = pa.array(sorted(self.message_ids()), type=pa.int64())
        parts, count = self.parts, len(ids)
        staged: list[tuple[str, Any]] = []
        for n in range(other.parts):
            table = other._read(n)
            extra = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=ids)))
            if extra.num_rows:
                staged.append((self.part_rel(parts), extra))
                parts += 1
                count += extra.num_rows
        self._stage_removals(swap, out, self.parts if self is out else 0)
        for rel, extra in staged:
            _write_parquet(pq, extra, swap.stage(rel))
        return {"messages": count, "parts": parts}


# --- one part into OUT ---------------------------------------------------------------------------


@attrs.define
class FolderMerge:
    """What merging parts into a folder export did."""

    taken: int = 0
    joined: int = 0
    skipped: list[str] = attrs.Factory(list)
    chat_objects: int = 0
    media_rows: int = 0
    files: int = 0


def _copies(root: str, kind: type[Copy]) -> Iterator[tuple[int, Copy | str]]:
    """Every chat with a checkpoint in ``root``: its copy, or why it cannot be read."""
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(os.path.join(root, "state"))):
            match = _STATE_FILE.fullmatch(name)
            if match is None:
                continue
            chat_id = int(match.group(1))
            yield chat_id, _copy(root, chat_id, kind)


def _copy(root: str, chat_id: int, kind: type[Copy]) -> Copy | str:
    path = os.path.join(root, "state", f"{chat_id}.json")
    try:
        with open(path, "rb") as f:
            return kind(root, chat_id, f.read())
    except FileNotFoundError:
        return "no checkpoint"
    except (ValueError, TypeError, KeyError) as exc:
        return f"{path} is unreadable ({exc})"


def _merge_chat(out_root: str, part: Copy, kind: type[Copy], report: FolderMerge) -> bool:
    """Merge one chat of a part; True if ``OUT``'s copy now comes from the part."""
    found = _copy(out_root, part.chat_id, kind)
    out = found if isinstance(found, Copy) else None  # unreadable: the export would redo it
    relation = None if out is None else out.holds(part)
    action = decide(relation, None if out is None else out.standing, part.standing)
    if action is Action.KEEP:
        return False
    if action is Action.SKIP:
        report.skipped.append(
            f"chat {part.chat_id}: {part.root} and {out_root} hold different messages of it and "
            "one of them is in the middle of a walk; run that export to its end and merge again"
        )
        return False
    swap = Swap(out_root, str(part.chat_id))
    try:
        if action is Action.TAKE or out is None:
            part.stage_take(swap, out)
            part.stage_rescan_take(swap, out)
            state_raw, from_part = part.state_raw, True
            report.taken += 1
        else:
            # The copy with the higher watermark leads: its lines, its checkpoint.
            lead, other = (part, out) if _watermark(part) >= _watermark(out) else (out, part)
            changed = lead.stage_union(swap, other, out)
            lead.stage_rescan_union(swap, other)
            state_raw, from_part = orjson.dumps({**lead.state_obj, **changed}), lead is part
            report.joined += 1
        with open(swap.stage(part.state_rel), "wb") as f:  # staged last: it moves last
            f.write(state_raw)
        swap.commit()
    except BaseException:
        swap.abandon()
        raise
    return from_part


def _watermark(copy: Copy) -> int:
    return copy.state.newest_id if copy.state.newest_id is not None else -1


def merge_folder(store: Store, parts: Sequence[str], fmt: str) -> FolderMerge:
    """Merge the ``fmt`` exports at ``parts`` into ``store`` (open; called on its thread)."""
    kind: type[Copy] = JsonlCopy if fmt == "jsonl" else ParquetCopy
    report = FolderMerge()
    for part in parts:
        from_part: set[int] = set()
        for chat_id, copy in _copies(part, kind):
            if isinstance(copy, str):
                report.skipped.append(f"chat {chat_id} of {part}: {copy}")
                continue
            try:
                if _merge_chat(store.path, copy, kind, report):
                    from_part.add(chat_id)
            except (StoreError, ValueError, TypeError, KeyError) as exc:
                report.skipped.append(f"chat {chat_id} of {part}: unreadable ({exc})")
        report.files += copy_media(os.path.join(part, "media"), os.path.join(store.path, "media"))
        report.media_rows += _merge_media_index(part, store.path)
        report.chat_objects += _merge_chat_objects(store, part, fmt, from_part)
    return report


# --- the chats file and the media ----------------------------------------------------------------


def _chat_objects(root: str, fmt: str) -> dict[int, Any]:
    if fmt == "jsonl":
        found: dict[int, Any] = {}
        for line in _lines(os.path.join(root, "chats.jsonl"), 1 << 62):
            with contextlib.suppress(ValueError):
                obj = orjson.loads(line)
                found[int(obj["chat_id"])] = obj
        return found
    path = os.path.join(root, "chats.parquet")
    if not os.path.exists(path):
        return {}
    _, pq = load_pyarrow()
    table = pq.ParquetFile(path).read(columns=["chat_id", "raw"]).to_pydict()
    return {c: orjson.loads(raw) for c, raw in zip(table["chat_id"], table["raw"], strict=True)}


def _merge_chat_objects(store: Store, part: str, fmt: str, from_part: set[int]) -> int:
    """The part's chat objects of the chats taken from it, and of those ``OUT`` lacks."""
    theirs = _chat_objects(part, fmt)
    ours = _chat_objects(store.path, fmt)
    wanted = [
        obj
        for chat_id, obj in theirs.items()
        if chat_id not in ours or (chat_id in from_part and ours[chat_id] != obj)
    ]
    if wanted:
        store._save_chats(wanted)  # the store's own rule: the others stay as they are
    return len(wanted)


def _media_lines(path: str) -> tuple[bytes, dict[str, tuple[dict[str, Any], bytes]]]:
    """The good prefix of a media index, and each URL's last line."""
    good = bytearray()
    last: dict[str, tuple[dict[str, Any], bytes]] = {}
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn by a crash: the index cuts it off too
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                break
            good += line
            last[obj["url"]] = (obj, line)
    return bytes(good), last


def _better(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Whether the media line ``new`` should win over ``old``: final, then later."""
    if old is None:
        return True
    rank = (new.get("status") not in _RETRIED, str(new.get("fetched_at") or ""))
    return rank > (old.get("status") not in _RETRIED, str(old.get("fetched_at") or ""))


def _merge_media_index(part: str, out_root: str) -> int:
    target = os.path.join(out_root, "media.jsonl")
    _, theirs = _media_lines(os.path.join(part, "media.jsonl"))
    if not theirs:
        return 0
    good, ours = _media_lines(target)
    added = [line for url, (obj, line) in theirs.items() if _better(obj, ours.get(url, (None,))[0])]
    if added:
        atomic_write(target, good + b"".join(added))
    return len(added)


def copy_media(source: str, target: str) -> int:
    """Copy the media files under ``source`` that ``target`` lacks; how many were copied.

    Content-addressed (``ab/ab12…``): a name already there holds the same bytes.
    """
    copied = 0
    if not os.path.isdir(source):
        return 0
    for folder, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # partial downloads stay behind
        for name in files:
            src = os.path.join(folder, name)
            dst = os.path.join(target, os.path.relpath(src, source))
            if os.path.exists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
            copied += 1
    return copied
