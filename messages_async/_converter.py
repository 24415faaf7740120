"""The one converter: every rule for mapping wire JSON to models and back lives here.

Models stay plain attrs classes; this module teaches cattrs the contract's quirks:

- integers may arrive as strings of digits (``members_count`` always does);
- datetimes are ISO 8601, and an instant without an offset is UTC;
- a chat ``type`` the library does not know stays a plain string instead of failing;
- attachments arrive wrapped as ``{"items": [...]}``, or as ``null``;
- an empty cursor (``""``) means the same as ``null``: nothing more in that direction;
- ``Period.from_`` is ``from`` on the wire, and ``None`` fields are left out of requests;
- unknown fields are ignored when decoding (a new server field must not break old clients), and
  the raw object is kept on ``Chat.raw`` / ``Message.raw`` for exporters.

Decoding runs on a converter built without detailed validation because it is about 20% faster;
only when decoding fails is the same body decoded again by an identically configured converter
with detailed validation, to say *where* the body broke the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from ._errors import DecodeError
from ._models import Attachment, Chat, ChatType, Message, MessagesPage, NewAttachment, Period

__all__ = ["decode", "format_datetime", "unstructure"]

T = TypeVar("T")


def _int(value: object, _type: object = int) -> int:
    # bool is an int subclass; True as an id is a server bug, not a 1.
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"expected an integer or a string of digits, got {value!r}")


def _str(value: object, _type: object = str) -> str:
    # cattrs' default would turn anything into a str (None into "None"); be strict instead.
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {value!r}")


def _datetime(value: object, _type: object = datetime) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 string, got {value!r}")
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def format_datetime(value: datetime) -> str:
    """ISO 8601 with ``Z`` for UTC, the form servers print and compare most reliably."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _chat_type(value: object, _type: object = None) -> ChatType | str:
    text = _str(value)
    try:
        return ChatType(text)
    except ValueError:
        return text


def _cursor(value: object, _type: object = None) -> str | None:
    if value is None or value == "":
        return None
    return _str(value)


def _message_text(value: object, _type: object = None) -> str:
    # An attachment-only message may come with "message": null; the model keeps "" for it.
    return "" if value is None else _str(value)


def _optional(hook: Callable[[object, object], T]) -> Callable[[object, object], T | None]:
    def structure(value: object, _type: object = None) -> T | None:
        return None if value is None else hook(value, _type)

    return structure


_ATTACHMENT_SLOTS = tuple(
    Attachment.__dict__[name].__set__ for name in ("type", "url", "name", "size")
)


def _fast_attachment(data: Mapping[str, Any], _type: Any = None) -> Attachment:
    """The generated Attachment hook's rules, written out (see _fast_hooks for why)."""
    set_type, set_url, set_name, set_size = _ATTACHMENT_SLOTS
    kind = data["type"]
    if type(kind) is not str:
        kind = _str(kind)
    url = data["url"]
    if type(url) is not str:
        url = _str(url)
    name = data.get("name")
    if name is not None and type(name) is not str:
        name = _str(name)
    size = data.get("size")
    if size is not None and type(size) is not int:
        size = _int(size)
    attachment = object.__new__(Attachment)
    set_type(attachment, kind)
    set_url(attachment, url)
    set_name(attachment, name)
    set_size(attachment, size)
    return attachment


def _fast_hooks(
    attachments: Callable[[object, object], list[Attachment]],
) -> tuple[Callable[[Mapping[str, Any], Any], Message], Callable[[Mapping[str, Any], Any], Any]]:
    """The hot path: every message of every page goes through here.

    These apply exactly the rules of the generated hooks that the diagnostic converter uses,
    written out, because calling one hook per field (and cattrs' generic list hook per item)
    cost more than the fields themselves: decoding a page ran at about 0.13x the speed of
    parsing its JSON alone, and runs at about 0.2x written out (benchmarks/README.md says where
    the rest goes). A property test (tests/test_converter.py) keeps the two in agreement on
    arbitrary input.
    """
    optional_int = _optional(_int)
    # A frozen attrs __init__ sets each slot through object.__setattr__; the slots' own
    # descriptors do the same work in about half the time (0.58 vs 1.03 us per Message).
    # Every field is set, so the object is exactly what __init__ would build.
    blank = object.__new__
    from_iso = datetime.fromisoformat
    slots = Message.__dict__
    set_id, set_uid, set_text, set_attachments, set_created, set_raw = (
        slots[name].__set__ for name in ("id", "uid", "message", "attachments", "created_at", "raw")
    )

    def message(data: Mapping[str, Any], _type: Any = None) -> Message:
        mid = data["id"]
        if type(mid) is not int:
            mid = _int(mid)
        uid = data["uid"]
        if type(uid) is not int:
            uid = _int(uid)
        text = data["message"]
        if type(text) is not str:
            text = _message_text(text)
        found = data.get("attachments")
        created = data.get("created_at")
        if created is not None:
            # _datetime written out: one call less per message, about a tenth of a page's decode.
            if type(created) is not str:
                created = _datetime(created)
            else:
                created = from_iso(created)
                if created.tzinfo is None:
                    created = created.replace(tzinfo=UTC)
        message = blank(Message)
        set_id(message, mid)
        set_uid(message, uid)
        set_text(message, text)
        set_attachments(message, [] if found is None else attachments(found, None))
        set_created(message, created)
        set_raw(message, data)
        return message

    def page(data: Mapping[str, Any], _type: Any = None) -> MessagesPage:
        items = data["items"]
        if type(items) is not list:
            raise ValueError(f"expected a list of messages, got {items!r}")
        return MessagesPage(
            [message(item) for item in items],
            optional_int(data.get("limit"), None),
            _cursor(data.get("next_cursor")),
            _cursor(data.get("prev_cursor")),
            optional_int(data.get("total_count"), None),
        )

    return message, page


def _make_converter(*, detailed_validation: bool) -> cattrs.Converter:
    conv = cattrs.Converter(detailed_validation=detailed_validation)
    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(str, _str)
    conv.register_structure_hook(datetime, _datetime)
    conv.register_unstructure_hook(datetime, format_datetime)
    conv.register_structure_hook(ChatType | str, _chat_type)
    # Optional fields get direct hooks: cattrs' generic Optional dispatch costs more than the
    # field itself, and these run for every field of every message of every page.
    conv.register_structure_hook(int | None, _optional(_int))
    conv.register_structure_hook(str | None, _optional(_str))
    conv.register_structure_hook(datetime | None, _optional(_datetime))
    conv.register_structure_hook(
        Attachment,
        make_dict_structure_fn(Attachment, conv, _cattrs_detailed_validation=False)
        if detailed_validation
        else _fast_attachment,
    )
    attachment = conv.get_structure_hook(Attachment)
    attachment_list = conv.get_structure_hook(list[Attachment])

    def attachments(value: object, _type: object = None) -> list[Attachment]:
        if value is None:
            return []
        items = value.get("items") if isinstance(value, Mapping) else value
        if items is None:
            return []
        if not isinstance(items, list):
            raise ValueError(f"expected attachments as {{'items': [...]}}, got {value!r}")
        if detailed_validation:
            found: list[Attachment] = attachment_list(items, list[Attachment])
            return found  # the generated list hook says which item broke
        return [attachment(item, Attachment) for item in items]

    def keep_raw(cls: type[T], **overrides: Any) -> Callable[[Mapping[str, Any], Any], T]:
        base = make_dict_structure_fn(
            cls, conv, _cattrs_detailed_validation=detailed_validation, **overrides
        )

        def structure(data: Mapping[str, Any], _type: Any) -> T:
            obj = base(data, cls)
            # Frozen models are built once here and never changed after: setting the raw
            # mapping in place avoids copying every object just to carry it along.
            object.__setattr__(obj, "raw", data)
            return obj

        return structure

    conv.register_structure_hook(Chat, keep_raw(Chat, raw=override(omit=True)))
    if detailed_validation:
        conv.register_structure_hook(
            Message,
            keep_raw(
                Message,
                raw=override(omit=True),
                message=override(struct_hook=_message_text),
                attachments=override(struct_hook=attachments),
            ),
        )
        conv.register_structure_hook(
            MessagesPage,
            make_dict_structure_fn(
                MessagesPage,
                conv,
                _cattrs_detailed_validation=detailed_validation,
                next_cursor=override(struct_hook=_cursor),
                prev_cursor=override(struct_hook=_cursor),
            ),
        )
    else:
        message_hook, page_hook = _fast_hooks(attachments)
        conv.register_structure_hook(Message, message_hook)
        conv.register_structure_hook(MessagesPage, page_hook)
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


_converter = _make_converter(detailed_validation=False)
_diagnostic_converter = _make_converter(detailed_validation=True)


def decode(data: Any, cls: Any, *, what: str) -> Any:
    """Structure already-parsed JSON into ``cls``; a body that breaks the contract raises
    :class:`DecodeError` naming the path that broke it (``$.items[3].id``)."""
    try:
        return _converter.structure(data, cls)
    except Exception:
        pass
    try:
        _diagnostic_converter.structure(data, cls)
    except Exception as exc:
        details = "; ".join(cattrs.transform_error(exc, path="$"))
    else:  # pragma: no cover - the two converters are configured identically
        details = "unexpected shape"
    raise DecodeError(f"the server's {what} does not fit the API contract: {details}") from None


def unstructure(value: Any) -> Any:
    """Models to wire JSON (renames applied, ``None`` fields left out)."""
    return _converter.unstructure(value)
