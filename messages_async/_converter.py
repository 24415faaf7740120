"""The one converter: every rule for mapping wire JSON to models and back lives here.

Models stay plain attrs classes; this module states the contract's quirks once:

- integers may arrive as strings of digits (``members_count`` always does);
- datetimes are RFC 3339 / ISO 8601 strings, and an instant without an offset is UTC;
- a chat ``type`` the library does not know stays a plain string instead of failing;
- attachments arrive wrapped as ``{"items": [...]}``, or as ``null`` / absent;
- an attachment-only message may come with ``"message": null``; the model keeps ``""``;
- an empty cursor (``""``) means the same as ``null``: nothing more in that direction;
- a page without ``items`` (or with ``null``) is a page of no messages that keeps its cursors;
- ``Period.from_`` is ``from`` on the wire, and ``None`` fields are left out of requests;
- unknown fields are ignored when decoding (a new server field must not break old clients);
  each message keeps its JSON exactly as received on ``Message.raw_json`` for exporters, and
  ``Chat.raw`` keeps the chat's object;
- a lone surrogate escape (``"\\ud83d"`` with no pair, what a JavaScript server emits when it
  cuts a text mid-emoji; legal per RFC 8259) becomes U+FFFD, so the text stays valid Unicode
  that every exporter can write.

Decoding is msgspec, in C: a body is parsed once into the wire types below (which state the
rules above as types; ``strict=False`` is what lets digit strings through as integers; it also
reads ``"1e3"`` or ``1.0`` as an integer, which no server sends), and a
second, cheap pass over the same bytes cuts out each message's JSON. The models are then
filled in one Python loop that applies the rest (``_messages``). A body that breaks the contract
raises :class:`DecodeError` naming where (``$.items[3].id``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import cattrs
import msgspec
from cattrs.gen import make_dict_unstructure_fn, override

from ._errors import DecodeError
from ._models import Attachment, Chat, ChatType, Message, MessagesPage, NewAttachment, Period

__all__ = [
    "decode_chats",
    "decode_message",
    "decode_page",
    "format_datetime",
    "unstructure",
]

T = TypeVar("T")


# --- The wire, as types ------------------------------------------------------------------------


class _Attachments(msgspec.Struct):
    items: list[Attachment] | None = None


class _WireMessage(msgspec.Struct):
    id: int
    uid: int
    message: str | None
    attachments: _Attachments | list[Attachment] | None = None
    # Read as text and parsed below: msgspec's lax mode would also take a number as a Unix
    # time, which the contract (ISO 8601, docs/protocol.md §4) does not allow.
    created_at: Annotated[str, msgspec.Meta(min_length=19)] | None = None


class _WirePage(msgspec.Struct):
    items: list[_WireMessage] | None = None
    limit: int | None = None
    next_cursor: str | None = None
    prev_cursor: str | None = None
    total_count: int | None = None


class _RawItems(msgspec.Struct):
    # The same body again, each message's object left as its bytes (a scan, not a parse).
    items: list[msgspec.Raw] | None = None


class _WireChat(msgspec.Struct):
    chat_id: int
    type: str
    name: str | None = None
    picture_url: str | None = None
    members_count: int | None = None


class _WireChats(msgspec.Struct):
    items: list[msgspec.Raw] | None = None


_page = msgspec.json.Decoder(_WirePage, strict=False)
_page_items = msgspec.json.Decoder(_RawItems)
_message_decoder = msgspec.json.Decoder(_WireMessage, strict=False)
_chats = msgspec.json.Decoder(_WireChats)
_chat = msgspec.json.Decoder(_WireChat, strict=False)
_any = msgspec.json.Decoder()


# --- The rules the types cannot say --------------------------------------------------------------


def _attachments(value: _Attachments | list[Attachment]) -> list[Attachment]:
    # A bare list is read too: it is what an older server sent.
    if isinstance(value, list):
        return value
    return value.items or []


def _instant(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise DecodeError(
            f"the server's message does not fit the API contract: created_at {text[:40]!r} "
            "is not an ISO 8601 instant"
        ) from None


def _cursor(value: str | None) -> str | None:
    return value or None


def _chat_type(value: str) -> ChatType | str:
    try:
        return ChatType(value)
    except ValueError:
        return value


# A frozen attrs __init__ sets each slot through object.__setattr__; the slots' own descriptors
# do the same in about half the time, and every message of every page is built here. Every
# field is set (a test checks the list against attrs.fields), so the object is what __init__
# would build.
MESSAGE_FIELDS = ("id", "uid", "message", "attachments", "created_at", "raw_json", "_raw")
_blank = object.__new__
(
    _set_id,
    _set_uid,
    _set_text,
    _set_attachments,
    _set_created,
    _set_raw_json,
    _set_raw,
) = (Message.__dict__[name].__set__ for name in MESSAGE_FIELDS)


def _messages(items: list[_WireMessage], raws: list[msgspec.Raw]) -> list[Message]:
    """The models of a page's messages: the rules the wire types cannot state."""
    # One loop with everything in locals: this runs for every message of every page, and a
    # call plus a dozen global lookups per message cost about as much as the work itself.
    blank, utc, unwrap = _blank, UTC, _attachments
    set_id, set_uid, set_text, set_attachments = _set_id, _set_uid, _set_text, _set_attachments
    set_created, set_raw_json, set_raw = _set_created, _set_raw_json, _set_raw
    built: list[Message] = []
    append = built.append
    for wire, raw in zip(items, raws, strict=True):
        message = blank(Message)
        set_id(message, wire.id)
        set_uid(message, wire.uid)
        text = wire.message
        set_text(message, "" if text is None else text)
        found = wire.attachments
        set_attachments(message, [] if found is None else unwrap(found))
        text_at = wire.created_at
        created = None if text_at is None else _instant(text_at)
        if created is not None and created.tzinfo is None:
            created = created.replace(tzinfo=utc)
        set_created(message, created)
        set_raw_json(message, raw)
        set_raw(message, None)
        append(message)
    return built


# --- Bytes to models -----------------------------------------------------------------------------

# A lone surrogate escape: a high one not followed by a low one, or a low one on its own.
# Escaped backslashes are matched first so that "\\ud83d" (a backslash, then text) is left alone.
_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)


def _lone_surrogates_replaced(body: bytes) -> bytes:
    def replace(match: re.Match[bytes]) -> bytes:
        found = match.group()
        return found if len(found) != 6 or found == b"\\\\" else b"\\ufffd"

    return _ESCAPES.sub(replace, body)


def _decoding(body: bytes, what: str, decode: Callable[[bytes], T]) -> tuple[T, bytes]:
    """``decode(body)`` and the bytes it read; DecodeError for a body that breaks the contract."""
    try:
        return decode(body), body
    except msgspec.ValidationError as exc:
        raise _contract_error(what, exc) from None
    except msgspec.DecodeError as exc:
        if b"\\u" in body:
            fixed = _lone_surrogates_replaced(body)
            if fixed != body:
                return _decoding(fixed, what, decode)
        raise DecodeError(
            f"the server's {what} is not valid JSON ({exc}); {len(body)} bytes received"
        ) from None


def _contract_error(what: str, exc: msgspec.ValidationError, prefix: str = "") -> DecodeError:
    text = str(exc)
    if " - at `$" not in text and text.startswith("Expected `object`"):
        return DecodeError(f"the server's {what} is not a JSON object ({text})")
    if prefix:
        text = text.replace(" - at `$", f" - at `{prefix}")
    return DecodeError(f"the server's {what} does not fit the API contract: {text}")


def decode_page(body: bytes) -> MessagesPage:
    wire, body = _decoding(body, "message page", _page.decode)
    items = wire.items or []
    raws = _page_items.decode(body).items or [] if items else []
    return MessagesPage(
        _messages(items, raws),
        wire.limit,
        _cursor(wire.next_cursor),
        _cursor(wire.prev_cursor),
        wire.total_count,
    )


def decode_message(body: bytes) -> Message:
    wire, body = _decoding(body, "message", _message_decoder.decode)
    (message,) = _messages([wire], [msgspec.Raw(body)])
    return message


def decode_chats(body: bytes) -> list[Chat]:
    listing, body = _decoding(body, "chat list", _chats.decode)
    chats = []
    for index, raw in enumerate(listing.items or []):
        try:
            wire = _chat.decode(raw)
        except msgspec.ValidationError as exc:
            raise _contract_error("chat list", exc, prefix=f"$.items[{index}]") from None
        chats.append(
            Chat(
                wire.chat_id,
                _chat_type(wire.type),
                wire.name,
                wire.picture_url,
                wire.members_count,
                raw=_any.decode(raw),
            )
        )
    return chats


# --- Models to the wire --------------------------------------------------------------------------


def format_datetime(value: datetime) -> str:
    """ISO 8601 with ``Z`` for UTC, the form servers print and compare most reliably."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _make_unstructurer() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_unstructure_hook(datetime, format_datetime)
    conv.register_unstructure_hook(
        Period,
        make_dict_unstructure_fn(
            Period, conv, _cattrs_omit_if_default=True, from_=override(rename="from")
        ),
    )
    conv.register_unstructure_hook(
        NewAttachment, make_dict_unstructure_fn(NewAttachment, conv, _cattrs_omit_if_default=True)
    )
    return conv


_unstructurer = _make_unstructurer()


def unstructure(value: Any) -> Any:
    """Models to wire JSON (renames applied, ``None`` fields left out)."""
    return _unstructurer.unstructure(value)
