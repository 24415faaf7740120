"""Which chats a shard exports: ``--shard I/N``, for several processes, machines and credentials.

A chat belongs to shard ``int.from_bytes(sha256(str(chat_id))[:8], "big") % N``: the SHA-256
of the chat id written in decimal ASCII, its first 8 bytes read as a big-endian unsigned
integer, modulo the number of shards. It depends on nothing but the id (not on the machine,
the Python version, ``PYTHONHASHSEED`` or the order of the chat listing), so every process
of a sharded export agrees on the split without talking to the others, and a chat stays in
its shard from one run to the next. A cryptographic hash spreads ids of any pattern
(consecutive, all even, ...) evenly: for a few hundred chats no shard gets much more than
its share (the tests check ``max <= 1.3 x mean``).

Indices are 0-based, like a Kubernetes Indexed Job's ``JOB_COMPLETION_INDEX``.
"""

from __future__ import annotations

import hashlib

import attrs

from .._checks import count

__all__ = ["Shard", "shard_of"]


def shard_of(chat_id: int, shards: int) -> int:
    """The shard (0 to ``shards - 1``) that exports ``chat_id``."""
    digest = hashlib.sha256(str(chat_id).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % shards


@attrs.frozen
class Shard:
    """Shard ``index`` of ``count``: it exports the chats :func:`shard_of` gives it."""

    index: int
    count: int

    def __attrs_post_init__(self) -> None:
        count("shard count", self.count, minimum=1)
        count("shard index", self.index, minimum=0)
        if self.index >= self.count:
            raise ValueError(
                f"shard index {self.index} is out of range for {self.count} shards: "
                f"indices are 0-based, 0 to {self.count - 1}"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (e.g. ``"0/4"``); ``ValueError`` saying what is wrong otherwise."""
        index, slash, total = text.strip().partition("/")
        if not slash or not _digits(index) or not _digits(total):
            raise ValueError(f"a shard is written I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return cls(int(index), int(total))

    def owns(self, chat_id: int) -> bool:
        return shard_of(chat_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
