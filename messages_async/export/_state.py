"""What an export remembers between runs: per-chat checkpoints and the export's identity.

A chat's checkpoint says exactly what is stored and where its walk stands, so that a run that
is killed at any instant can go on from the last checkpoint without a duplicate or a gap:

- ``done``: the chat was walked to its oldest message at least once. From then on a run only
  fetches what is newer than ``newest_id`` (an *update*).
- ``newest_id``: the high watermark. Every message of the chat (matching the filters) with an
  id up to it is stored, as of the end of the last complete walk.
- ``cursor``: where the walk in progress goes on (``None``: it starts at the newest page).
- ``walk_top`` / ``walk_low``: the newest and oldest id the walk in progress has stored. A walk
  stores one contiguous stretch of ids, newest first, so after an expired cursor the walk can
  start again at the newest page and skip every id ``>= walk_low`` without losing one: those
  are either stored already or newer than the walk (the next update's business).
- ``length`` / ``pending_length`` / ``merging``: the JSONL store's byte checkpoints (unused by
  SQLite, whose transactions need none).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs

__all__ = ["ChatState", "ExportMeta"]

#: Bumped when the on-disk layout changes in a way an older reader would misread.
FORMAT_VERSION = 1


@attrs.define
class ChatState:
    """One chat's checkpoint (see the module docstring for the meaning of each field)."""

    chat_id: int
    done: bool = False
    newest_id: int | None = None
    cursor: str | None = None
    walk_top: int | None = None
    walk_low: int | None = None
    error: str | None = None
    messages: int = 0
    length: int = 0
    pending_length: int = 0
    merging: bool = False

    @property
    def updating(self) -> bool:
        """Whether the walk in progress is an update of a chat that was exported before."""
        return self.done

    @property
    def in_progress(self) -> bool:
        return self.cursor is not None or self.walk_top is not None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> ChatState:
        if not isinstance(obj, dict):
            raise ValueError("a chat checkpoint must be a JSON object")
        fields = {a.name for a in attrs.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in fields})


def _one_spelling(instant: str | None) -> str | None:
    """An ISO 8601 instant written one way (UTC), so that equal instants compare equal."""
    if instant is None:
        return None
    try:
        parsed = datetime.fromisoformat(instant)
    except ValueError:
        return instant  # not an instant this code wrote: compared as written
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # docs/protocol.md §2: no offset means UTC
    return parsed.astimezone(UTC).isoformat()


@attrs.frozen
class ExportMeta:
    """What makes two runs the same export: where the data comes from and which filters apply.

    Resuming an export with other filters would mix two different selections in one file (and
    a saved cursor is bound to the filters it was issued for), so a mismatch is refused.
    """

    source: str
    query: str | None = None
    #: ``--since 2025-06-01`` and ``--since 2025-06-01T02:00:00+02:00`` are the same instant,
    #: hence the same export: both are kept in UTC.
    since: str | None = attrs.field(default=None, converter=_one_spelling)
    until: str | None = attrs.field(default=None, converter=_one_spelling)
    #: ``"I/N"`` for one shard of a sharded export (``--shard``), else None.
    shard: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **attrs.asdict(self)}

    @classmethod
    def from_json(cls, obj: Any) -> ExportMeta:
        if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
            raise ValueError("not an export of this version")
        return cls(
            source=str(obj["source"]),
            query=obj.get("query"),
            since=obj.get("since"),
            until=obj.get("until"),
            shard=obj.get("shard"),
        )

    def describe(self) -> str:
        parts = [f"source {self.source}"]
        for name in ("query", "since", "until", "shard"):
            value = getattr(self, name)
            parts.append(f"--{name} {value!r}" if value is not None else f"no --{name}")
        return ", ".join(parts)
