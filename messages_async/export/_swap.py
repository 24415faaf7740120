"""Several files of a folder export replaced together, or not at all, across a crash.

A chat of a JSONL or Parquet export is more than one file (its messages, its checkpoint, its
versions, ...), and a merge that replaces some of them and not the others would leave the chat
torn: a checkpoint that describes another file. A :class:`Swap` is a small redo journal:

1. the new files are written into ``DIR/.merge/<key>/`` and ``fsync``-ed (nothing a reader
   looks at has changed);
2. ``plan.json``, which says where each staged file goes and which files go away, is written
   atomically: from here on the swap *will* happen;
3. the staged files are renamed into place (each rename atomic, the checkpoint last), the
   doomed files removed, and the journal folder deleted.

A run killed before step 2 leaves a journal without a plan, which is discarded; killed after
it, a plan that :func:`finish_swaps` carries out again (renaming what is still staged,
removing what is still there), whoever opens the export next: the merge, or a store's
``open``. Either way every chat is wholly the old one or wholly the new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import orjson

from ._jsonl import _fsync_path, atomic_write

__all__ = ["JOURNAL", "Swap", "finish_swaps", "unfinished_swaps"]

#: The journal folder in an export's directory.
JOURNAL = ".merge"
_PLAN = "plan.json"


class Swap:
    """The files of one unit (a chat) of the export at ``root``, replaced at once.

    Paths are relative to ``root``. Stage every new file (write it at :meth:`stage`'s path),
    name the files that go away (:meth:`remove`), then :meth:`commit`.
    """

    def __init__(self, root: str, key: str) -> None:
        self.root = root
        self.folder = os.path.join(root, JOURNAL, key)
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder)
        self._moves: list[tuple[str, str]] = []
        self._removals: list[str] = []

    def stage(self, target: str) -> str:
        """Where to write the new content of ``target``; staged files move in this order."""
        name = str(len(self._moves))
        self._moves.append((name, target))
        return os.path.join(self.folder, name)

    def remove(self, target: str) -> None:
        self._removals.append(target)

    @property
    def empty(self) -> bool:
        return not self._moves and not self._removals

    def commit(self) -> None:
        """Make the staged files durable, decide the swap, and carry it out."""
        for name, _ in self._moves:
            with open(os.path.join(self.folder, name), "rb+") as f:
                os.fsync(f.fileno())
        plan = {"moves": self._moves, "removals": self._removals}
        atomic_write(os.path.join(self.folder, _PLAN), orjson.dumps(plan))
        _fsync_path(self.folder)
        _carry_out(self.root, self.folder)

    def abandon(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _carry_out(root: str, folder: str) -> None:
    with open(os.path.join(folder, _PLAN), "rb") as f:
        plan = orjson.loads(f.read())
    touched: set[str] = set()
    moved = {target for _, target in plan["moves"]}
    # A file that is moved in is replaced by the move: removing it first would, on a second
    # attempt after a crash, remove the new file that was already moved there.
    for target in [t for t in plan["removals"] if t not in moved]:
        path = os.path.join(root, target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        touched.add(os.path.dirname(path))
    for name, target in plan["moves"]:
        staged, path = os.path.join(folder, name), os.path.join(root, target)
        if os.path.exists(staged):  # else moved already, before a crash
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(staged, path)
        touched.add(os.path.dirname(path))
    for where in sorted(touched):
        if os.path.isdir(where):
            _fsync_path(where)
    shutil.rmtree(folder)


def unfinished_swaps(root: str) -> list[str]:
    """Keys of the swaps in ``root`` that were decided but not (wholly) carried out."""
    journal = os.path.join(root, JOURNAL)
    if not os.path.isdir(journal):
        return []
    return sorted(
        key for key in os.listdir(journal) if os.path.exists(os.path.join(journal, key, _PLAN))
    )


def finish_swaps(root: str) -> None:
    """Carry out every decided swap of the export at ``root``; discard the undecided ones."""
    journal = os.path.join(root, JOURNAL)
    if not os.path.isdir(journal):
        return
    for key in sorted(os.listdir(journal)):
        folder = os.path.join(journal, key)
        if os.path.exists(os.path.join(folder, _PLAN)):
            _carry_out(root, folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(journal)
