"""Typed models of the Messages API.

Plain frozen attrs classes with no serialization logic: every wire rule (renames, digit
strings, datetimes, the ``{"items": [...]}`` attachment envelope) lives in the one converter,
``_converter.py``. Argument checks that need no server live here, so a bad value fails at the
line that made it, before anything is sent.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs
import msgspec

from ._errors import DecodeError

__all__ = [
    "MAX_ATTACHMENTS",
    "MAX_MESSAGE_LENGTH",
    "Attachment",
    "Chat",
    "ChatFailed",
    "ChatType",
    "Message",
    "MessagesPage",
    "NewAttachment",
    "Period",
]

MAX_MESSAGE_LENGTH = 4096
MAX_ATTACHMENTS = 10

_EMPTY_RAW: Mapping[str, Any] = {}
_NO_JSON = msgspec.Raw()


class ChatType(enum.Enum):
    """The kinds of chat the contract names. A chat of an unknown kind keeps its raw string."""

    PRIVATE = "private"
    GROUP = "group"


@attrs.frozen
class Chat:
    """A conversation. ``name``, ``picture_url`` and ``members_count`` are set for groups only."""

    chat_id: int
    type: ChatType | str
    name: str | None = None
    picture_url: str | None = None
    members_count: int | None = None
    # The object exactly as received, unknown fields included, for exporters; left out of
    # equality, hashing and repr (two messages are equal by their data; a repr stays short).
    raw: Mapping[str, Any] = attrs.field(
        default=_EMPTY_RAW, eq=False, hash=False, repr=False, kw_only=True
    )


@attrs.frozen
class Attachment:
    """An attachment of a received message."""

    type: str
    url: str
    name: str | None = None
    size: int | None = None


def _non_empty_str(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"NewAttachment.{attribute.name} must be a non-empty str, got {value!r}")


def _optional_str(_inst: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"NewAttachment.{attribute.name} must be a str or None, got {value!r}")


@attrs.frozen
class NewAttachment:
    """An attachment to send with :meth:`add` or :meth:`edit`.

    Args:
        type: ``"file"``, ``"image"``, ``"link"`` or another kind the server knows.
        url: Where the attachment lives.
        name: An optional display name.
    """

    type: str = attrs.field(validator=_non_empty_str)
    url: str = attrs.field(validator=_non_empty_str)
    name: str | None = attrs.field(default=None, validator=_optional_str)


class _Received:
    # What a decoded message keeps of the wire, outside the attrs fields: msgspec fills the
    # fields of a model straight from JSON and then looks up every field it did not see,
    # which for these two (never on the wire) cost as much as the rest of the decode.
    __slots__ = ("_raw", "_raw_json")
    _raw: Mapping[str, Any]
    _raw_json: msgspec.Raw


@attrs.frozen
class Message(_Received):
    """A message. ``uid`` is the sender.

    ``created_at`` is ``None`` only when the server leaves it out: the contract makes it an
    extension (docs/protocol.md §4), which the emulator, and servers like it, always send.
    Code that relies on it reads :attr:`sent_at` instead, which is never ``None``.
    """

    id: int
    uid: int
    message: str
    attachments: tuple[Attachment, ...] = attrs.field(default=(), converter=tuple)
    created_at: datetime | None = None

    @property
    def raw_json(self) -> msgspec.Raw:
        """The message's JSON object exactly as received, unknown fields included: what
        exporters store. A :class:`msgspec.Raw` (bytes-like UTF-8 JSON, a view of the page's
        body: ``bytes(m.raw_json)``, ``str(m.raw_json, "utf-8")``); empty for a message made
        in code."""
        try:
            return self._raw_json
        except AttributeError:
            return _NO_JSON

    @property
    def raw(self) -> Mapping[str, Any]:
        """The object exactly as received, unknown fields included, parsed on first use
        (``{}`` for a message made in code)."""
        try:
            return self._raw
        except AttributeError:
            pass
        raw_json = self.raw_json
        raw: Mapping[str, Any] = msgspec.json.decode(raw_json) if raw_json else _EMPTY_RAW
        object.__setattr__(self, "_raw", raw)
        return raw

    @property
    def sent_at(self) -> datetime:
        """``created_at``, for code that needs it: never ``None``.

        Raises:
            DecodeError: the server did not send ``created_at`` for this message.
        """
        if self.created_at is None:
            raise DecodeError(
                f"message {self.id} has no created_at: the server does not send it "
                "(docs/protocol.md §4 makes it an extension); use created_at, which is None then"
            )
        return self.created_at


@attrs.frozen
class MessagesPage:
    """One page of a chat's messages, newest first.

    ``next_cursor`` leads to older messages and ``prev_cursor`` to newer ones; each is ``None``
    when there is nothing in that direction. ``limit`` is the page size the server used.
    """

    items: list[Message] = attrs.field(hash=False)
    limit: int | None = None
    next_cursor: str | None = None
    prev_cursor: str | None = None
    total_count: int | None = None


def _aware(_inst: object, attribute: attrs.Attribute[datetime | None], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, datetime):
        raise TypeError(f"Period.{attribute.name} must be a datetime or None, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"Period.{attribute.name} is a naive datetime ({value.isoformat()}); give it a "
            "timezone, e.g. datetime(..., tzinfo=timezone.utc), so the instant is unambiguous"
        )


@attrs.frozen
class Period:
    """A date filter: ``from_`` is inclusive, ``till`` exclusive; either may be left open.

    Both must be timezone-aware, and ``from_`` may not be after ``till``.
    """

    from_: datetime | None = attrs.field(default=None, validator=_aware)
    till: datetime | None = attrs.field(default=None, validator=_aware)

    def __attrs_post_init__(self) -> None:
        if self.from_ is None and self.till is None:
            raise ValueError("Period needs from_, till or both; pass period=None for no filter")
        if self.from_ is not None and self.till is not None and self.from_ > self.till:
            raise ValueError(
                f"Period.from_ ({self.from_.isoformat()}) is after till ({self.till.isoformat()})"
            )


@attrs.frozen
class ChatFailed:
    """Yielded by ``iter_many(..., on_error="yield")`` in place of a chat that failed for good."""

    chat_id: int
    error: BaseException = attrs.field(eq=False)
