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
- ``windows``: a chat too big for one walk is walked in time windows at once (``_runner.py``),
  each with a checkpoint of its own (:class:`WindowState`); empty for a chat walked in one go.
  While it is not empty the chat is not ``done``, ``cursor`` is ``None`` and what the chat has
  stored is what its windows have stored; once every window is walked the store joins them
  (each format as its module says), the list is emptied and the chat is ``done`` like any
  other: its layout is then exactly that of a chat walked in one go.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs

from .._models import Period

__all__ = ["ChatState", "ExportMeta", "WindowState"]

#: Bumped when the on-disk layout changes in a way an older reader would misread.
FORMAT_VERSION = 1


def _instant(text: Any) -> datetime | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"a window bound must be an ISO 8601 instant, got {text!r}")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"a window bound must have an offset, got {text!r}")
    return parsed


@attrs.define
class WindowState:
    """One time window of a windowed chat, and where its walk stands.

    Attributes:
        index: 0 for the newest window (open-ended), counting towards older ones.
        from_: Inclusive start (``None``: open); till: exclusive end (``None``: open-ended).
        cursor: Where the window's walk goes on (``None``: at the window's newest page).
        top: The newest id this window has stored (window 0's is the chat's watermark once
            every window is walked).
        low: The oldest id this window has stored: after an expired cursor the window starts
            again at its newest page and skips every id at or above it.
        done: Walked to its oldest message.
        messages: Messages this window has stored.
        length: The format's own progress: bytes of the JSONL segment, parts of Parquet.
        estimate: About how many messages the plan expected in it (for displays).
    """

    index: int
    from_: datetime | None = None
    till: datetime | None = None
    cursor: str | None = None
    top: int | None = None
    low: int | None = None
    done: bool = False
    messages: int = 0
    length: int = 0
    estimate: int = 0

    def period(self) -> Period | None:
        """The ``period`` filter that selects this window."""
        if self.from_ is None and self.till is None:
            return None
        return Period(from_=self.from_, till=self.till)

    def to_json(self) -> dict[str, Any]:
        obj = {name: getattr(self, name) for name in _WINDOW_FIELDS}  # as ChatState's, below
        for name in ("from_", "till"):
            value = getattr(self, name)
            obj[name] = None if value is None else value.isoformat()
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> WindowState:
        if not isinstance(obj, dict) or not isinstance(obj.get("index"), int):
            raise ValueError("a window checkpoint must be a JSON object with an index")
        fields = {a.name for a in attrs.fields(cls)}
        values = {k: v for k, v in obj.items() if k in fields}
        values["from_"] = _instant(values.get("from_"))
        values["till"] = _instant(values.get("till"))
        return cls(**values)


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
    windows: list[WindowState] = attrs.field(factory=list)

    @property
    def updating(self) -> bool:
        """Whether the walk in progress is an update of a chat that was exported before."""
        return self.done

    @property
    def in_progress(self) -> bool:
        return self.cursor is not None or self.walk_top is not None or bool(self.windows)

    @property
    def fresh(self) -> bool:
        """Nothing stored and no walk begun: the chat may still be walked in windows."""
        return not self.done and not self.in_progress and self.messages == 0

    def joined(self) -> ChatState:
        """The chat once its windows are joined: done, with what they stored together."""
        tops = [w.top for w in self.windows if w.top is not None]
        return attrs.evolve(
            self,
            done=True,
            newest_id=max(tops) if tops else self.newest_id,
            cursor=None,
            walk_top=None,
            walk_low=None,
            error=None,
            messages=sum(w.messages for w in self.windows),
            length=sum(w.length for w in self.windows),
            windows=[],
        )

    def to_json(self) -> dict[str, Any]:
        # Every page's checkpoint is serialized: a comprehension costs half of attrs.asdict.
        obj = {name: getattr(self, name) for name in _CHAT_FIELDS}
        if self.windows:
            # Only a windowed chat has the key: a chat walked in one go keeps its layout.
            obj["windows"] = [w.to_json() for w in self.windows]
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> ChatState:
        if not isinstance(obj, dict):
            raise ValueError("a chat checkpoint must be a JSON object")
        fields = {a.name for a in attrs.fields(cls)} - {"windows"}
        state = cls(**{k: v for k, v in obj.items() if k in fields})
        windows = obj.get("windows") or []
        if not isinstance(windows, list):
            raise ValueError("a chat checkpoint's windows must be a list")
        state.windows = [WindowState.from_json(w) for w in windows]
        return state


_WINDOW_FIELDS = tuple(a.name for a in attrs.fields(WindowState))
_CHAT_FIELDS = tuple(a.name for a in attrs.fields(ChatState) if a.name != "windows")


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
