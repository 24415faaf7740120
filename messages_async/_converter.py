"""The one converter: every rule for mapping wire JSON to models and back lives here.

Models stay plain attrs classes; this module states the contract's quirks once:

- integers may arrive as strings of digits (``members_count`` always does): ``_Int``;
- datetimes are RFC 3339 text (docs/protocol.md §4: ISO 8601; a number is refused, not read
  as a Unix time), and an instant without an offset is UTC;
- a chat ``type`` the library does not know stays a plain string instead of failing;
- attachments arrive wrapped as ``{"items": [...]}``, or as ``null`` / absent (a bare list, what
  an older server sent, is read too);
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

Decoding is msgspec, in C, straight into the models: msgspec reads the models with the wire's
types (``_reading_the_wire``: digit strings, ``null`` text, the envelope), and ``_messages``
then gives each field its model's type in one loop (the rules a type cannot state), and hands
each message its JSON, cut out of the same bytes by a second, cheap pass (a scan, not a parse).
Decoding is strict: msgspec's lax mode would also read a number as a datetime. A body that
breaks the contract raises :class:`DecodeError` naming where (``$.items[3].id``).
"""

from __future__ import annotations

import inspect
import re
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import cattrs
import msgspec
from cattrs.gen import make_dict_unstructure_fn, override

from ._errors import DecodeError
from ._models import (
    Attachment,
    Chat,
    ChatType,
    Message,
    MessagesPage,
    NewAttachment,
    Period,
    _Received,
)

__all__ = [
    "decode_chats",
    "decode_message",
    "decode_page",
    "format_datetime",
    "peek_cursors",
    "unstructure",
]

T = TypeVar("T")


# --- The wire, as types ------------------------------------------------------------------------

#: An integer, or a string of its ASCII digits (docs/protocol.md §4).
_Int = int | Annotated[str, msgspec.Meta(pattern=r"^[0-9]+\Z")]


def _int(value: int | str) -> int:
    return value if value.__class__ is int else int(value)


class _Envelope(msgspec.Struct):
    items: tuple[Attachment, ...] | None = None


@contextmanager
def _reading_the_wire(model: type, **wire_types: object) -> Iterator[None]:
    """Decoders built inside read ``model`` with the wire's types for the fields named.

    msgspec fills attrs classes straight from JSON, and reads a class's annotations once,
    when a decoder is built: for that moment the model carries the wire's types. Every
    decoded object is then the model itself, with no copy and no second class; ``_messages``
    gives the fields their models' types.
    """
    public = inspect.get_annotations(model)
    model.__annotations__ = {**public, **wire_types}
    try:
        yield
    finally:
        model.__annotations__ = public
        # What msgspec cached on the class: the decoders keep their own, and anyone else
        # decoding the model with msgspec must read its own types.
        if "__msgspec_cache__" in model.__dict__:
            delattr(model, "__msgspec_cache__")


class _WirePage(msgspec.Struct):
    items: list[Message] | None = None
    limit: _Int | None = None
    next_cursor: str | None = None
    prev_cursor: str | None = None
    total_count: _Int | None = None


class _Cursors(msgspec.Struct):
    # A page's cursors alone: its items are skipped, not decoded.
    next_cursor: str | None = None
    prev_cursor: str | None = None


class _RawItems(msgspec.Struct):
    # The same body again, each item's object left as its bytes (a scan, not a parse).
    items: list[msgspec.Raw] | None = None


class _WireChat(msgspec.Struct):
    chat_id: _Int
    type: str
    name: str | None = None
    picture_url: str | None = None
    members_count: _Int | None = None


with (
    _reading_the_wire(Attachment, size=_Int | None),
    _reading_the_wire(
        Message,
        id=_Int,
        uid=_Int,
        message=str | None,
        attachments=_Envelope | tuple[Attachment, ...] | None,
    ),
):
    _page = msgspec.json.Decoder(_WirePage)
    _message_decoder = msgspec.json.Decoder(Message)
_items = msgspec.json.Decoder(_RawItems)
_cursors = msgspec.json.Decoder(_Cursors)
_chat = msgspec.json.Decoder(_WireChat)
_any = msgspec.json.Decoder()


# --- The rules the types cannot say --------------------------------------------------------------

# Stores that bypass frozen attrs' __setattr__, as attrs' own __init__ does: the objects are
# still being built.
_set_raw_json = _Received.__dict__["_raw_json"].__set__
(_set_id, _set_uid, _set_text, _set_attachments, _set_created) = (
    Message.__dict__[name].__set__ for name in ("id", "uid", "message", "attachments", "created_at")
)
_set_size = Attachment.__dict__["size"].__set__


def _sized(attachments: tuple[Attachment, ...]) -> tuple[Attachment, ...]:
    for attachment in attachments:
        size: Any = attachment.size
        if size is not None and size.__class__ is not int:
            _set_size(attachment, _int(size))
    return attachments


def _messages(items: list[Message], raws: list[msgspec.Raw]) -> list[Message]:
    """The messages msgspec filled, given their models' types: the rules types cannot state."""
    # Every message of every page runs through here, so the work is in C where it can be: the
    # JSON handed over by a map (consumed by a deque that keeps nothing, the itertools
    # recipe), then one loop with everything in locals, the frequent cases first. The JSON
    # is cut here rather than on first use: exporters ask for every message's, and one map
    # over the page costs them less than a property that cuts.
    deque(map(_set_raw_json, items, raws), maxlen=0)
    set_attachments, utc = _set_attachments, UTC
    for message in items:
        found: Any = message.attachments
        if found is None:
            set_attachments(message, ())
        elif found.__class__ is _Envelope:
            set_attachments(message, _sized(found.items or ()))
        elif found:
            _sized(found)
        text: Any = message.message
        if text is None:
            _set_text(message, "")
        created = message.created_at
        if created is not None and created.tzinfo is None:
            _set_created(message, created.replace(tzinfo=utc))
        if message.id.__class__ is not int or message.uid.__class__ is not int:
            _set_id(message, _int(message.id))
            _set_uid(message, _int(message.uid))
    return items


def _cursor(value: str | None) -> str | None:
    return value or None


def _chat_type(value: str) -> ChatType | str:
    try:
        return ChatType(value)
    except ValueError:
        return value


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
    items = wire.items
    return MessagesPage(
        _messages(items, _items.decode(body).items or []) if items else [],
        None if wire.limit is None else _int(wire.limit),
        _cursor(wire.next_cursor),
        _cursor(wire.prev_cursor),
        None if wire.total_count is None else _int(wire.total_count),
    )


def peek_cursors(body: bytes) -> tuple[str | None, str | None] | None:
    """A page's ``(next_cursor, prev_cursor)``, read without decoding its messages (a scan of
    the body: a tenth of decoding it), so that a walk can ask for the next page first; None
    when the body does not read as a page (``decode_page`` then says why)."""
    try:
        wire = _cursors.decode(body)
    except msgspec.MsgspecError:
        return None
    return _cursor(wire.next_cursor), _cursor(wire.prev_cursor)


def decode_message(body: bytes) -> Message:
    wire, body = _decoding(body, "message", _message_decoder.decode)
    (message,) = _messages([wire], [msgspec.Raw(body)])
    return message


def decode_chats(body: bytes) -> list[Chat]:
    listing, body = _decoding(body, "chat list", _items.decode)
    chats = []
    for index, raw in enumerate(listing.items or []):
        try:
            wire = _chat.decode(raw)
        except msgspec.ValidationError as exc:
            raise _contract_error("chat list", exc, prefix=f"$.items[{index}]") from None
        chats.append(
            Chat(
                _int(wire.chat_id),
                _chat_type(wire.type),
                wire.name,
                wire.picture_url,
                None if wire.members_count is None else _int(wire.members_count),
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
