"""Decoding agrees with an independent reading of the contract on arbitrary input.

``_expected`` below reads a page the slow, obvious way (the stdlib ``json`` module and plain
Python, written from docs/protocol.md §4 rather than from the converter): what the models must
hold, or that the page must be refused.
"""

from __future__ import annotations

import gc
import json
from datetime import UTC, datetime
from typing import Any

import attrs
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import messages_async as ma
from messages_async._wire import parse_chats, parse_cursors, parse_message, parse_page

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
    st.sampled_from(["", "12", "x", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "１２"]),
    st.text(alphabet="ab é\U0001f600\x00", max_size=5),
)
attachment = st.fixed_dictionaries(
    {"type": st.one_of(st.just("link"), scalars), "url": st.one_of(st.just("u"), scalars)},
    optional={"name": scalars, "size": scalars},
)
attachments = st.one_of(
    scalars,
    st.fixed_dictionaries({"items": st.one_of(st.none(), st.lists(attachment, max_size=3))}),
    st.lists(attachment, max_size=2),
)
message = st.fixed_dictionaries(
    {},
    optional={
        "id": scalars,
        "uid": scalars,
        "message": scalars,
        "attachments": attachments,
        "created_at": scalars,
        "extra": scalars,
    },
)


class Refused(Exception):
    pass


def _int(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise Refused


def _opt(read: Any, value: Any) -> Any:
    return None if value is None else read(value)


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Refused


def _instant(value: Any) -> datetime:
    if not isinstance(value, str) or len(value) < 19:
        raise Refused
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Refused from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _attachment(data: Any) -> tuple[Any, ...]:
    if not isinstance(data, dict) or "type" not in data or "url" not in data:
        raise Refused
    return (
        _str(data["type"]),
        _str(data["url"]),
        _opt(_str, data.get("name")),
        _opt(_int, data.get("size")),
    )


def _expected_message(data: Any) -> tuple[Any, ...]:
    if not isinstance(data, dict) or not {"id", "uid", "message"} <= data.keys():
        raise Refused
    found = data.get("attachments")
    if isinstance(found, dict):
        found = found.get("items")
    if found is not None and not isinstance(found, list):
        raise Refused
    return (
        _int(data["id"]),
        _int(data["uid"]),
        _opt(_str, data["message"]) or "",
        [_attachment(a) for a in found or []],
        _opt(_instant, data.get("created_at")),
        data,
    )


def _got_message(m: ma.Message) -> tuple[Any, ...]:
    return (
        m.id,
        m.uid,
        m.message,
        [(a.type, a.url, a.name, a.size) for a in m.attachments],
        m.created_at,
        json.loads(bytes(m.raw_json)),
    )


def _outcome(read: Any, *args: Any) -> Any:
    try:
        return ("ok", read(*args))
    except (Refused, ma.DecodeError):
        return ("refused", None)


@settings(max_examples=400, deadline=None)
@given(message)
def test_a_message_decodes_as_the_contract_reads(data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    got = _outcome(lambda: _got_message(parse_message(body)))
    assert got == _outcome(_expected_message, data)


@settings(max_examples=150, deadline=None)
@given(st.lists(message, max_size=4), scalars)
def test_a_page_decodes_as_the_contract_reads(items: list[dict[str, Any]], cursor: Any) -> None:
    data = {"items": items, "limit": 20, "next_cursor": cursor, "total_count": "3"}
    body = json.dumps(data).encode()

    def expected() -> Any:
        if cursor is not None and not isinstance(cursor, str):
            raise Refused
        return ([_expected_message(i) for i in items], 20, cursor or None, 3)

    def got() -> Any:
        page = parse_page(body)
        return ([_got_message(m) for m in page.items], page.limit, page.next_cursor, 3)

    assert _outcome(got) == _outcome(expected)


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("cut \\ud83d", "cut \ufffd"),
        ("\\ud83d\\ude00 ok", "\U0001f600 ok"),
        ("low \\ude00 alone", "low \ufffd alone"),
        ("kept \\\\ud83d", "kept \\ud83d"),
        ("two \\ud83d\\ud83d", "two \ufffd\ufffd"),
    ],
)
def test_a_lone_surrogate_becomes_the_replacement_character(text: str, decoded: str) -> None:
    body = b'{"items": [{"id": 1, "uid": 2, "message": "' + text.encode() + b'"}]}'
    (message,) = parse_page(body).items
    assert message.message == decoded
    assert message.raw["message"] == decoded
    str(message.raw_json, "utf-8")  # valid UTF-8 JSON, ready for any exporter


def test_a_broken_item_is_named_by_its_path() -> None:
    items = [{"id": i, "uid": 1, "message": "x"} for i in range(5)]
    items[3]["id"] = "abc"
    with pytest.raises(ma.DecodeError, match=r"\$\.items\[3\]\.id"):
        parse_page(json.dumps({"items": items}).encode())
    with pytest.raises(ma.DecodeError, match=r"\$\.items\[1\]\.type"):
        parse_chats(b'{"items": [{"chat_id": 1, "type": "group"}, {"chat_id": 2, "type": 5}]}')


def test_a_decoded_message_is_the_model_built_in_code() -> None:
    # msgspec fills the models through a wire-typed twin of their classes; what comes out must
    # be the models themselves: the same class, equal and hashing like one made in code.
    body = (
        b'{"items": [{"id": "1", "uid": 2, "message": null, "created_at": "2026-01-01T00:00:00",'
        b' "attachments": {"items": [{"type": "file", "url": "u", "size": "12"}]}}]}'
    )
    (message,) = parse_page(body).items
    built = ma.Message(
        id=1,
        uid=2,
        message="",
        attachments=[ma.Attachment(type="file", url="u", size=12)],
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert type(message) is ma.Message
    assert type(message.attachments[0]) is ma.Attachment
    assert message == built
    assert hash(message) == hash(built)
    assert repr(message) == repr(built)
    assert attrs.asdict(message) == attrs.asdict(built)


def test_sent_at_is_created_at_or_a_clear_error() -> None:
    (with_it,) = parse_page(
        b'{"items": [{"id": 1, "uid": 2, "message": "m", "created_at": "2026-01-01T00:00:00"}]}'
    ).items
    assert with_it.sent_at == datetime(2026, 1, 1, tzinfo=UTC)
    (without,) = parse_page(b'{"items": [{"id": 7, "uid": 2, "message": "m"}]}').items
    assert without.created_at is None
    with pytest.raises(ma.DecodeError, match="message 7 has no created_at"):
        _ = without.sent_at


def test_raw_is_parsed_on_first_use_and_kept() -> None:
    (message,) = parse_page(b'{"items": [{"id": 1, "uid": 2, "message": "m", "x": [1]}]}').items
    assert bytes(message.raw_json) == b'{"id": 1, "uid": 2, "message": "m", "x": [1]}'
    assert message.raw == {"id": 1, "uid": 2, "message": "m", "x": [1]}
    assert message.raw is message.raw
    assert ma.Message(id=1, uid=2, message="m").raw == {}


def test_the_models_keep_their_own_types_outside_the_converter() -> None:
    # The decoders read the models with the wire's types; nobody else may see those.
    assert ma.Message.__annotations__["attachments"] == "tuple[Attachment, ...]"
    with pytest.raises(msgspec.ValidationError, match=r"\$\.message"):
        msgspec.json.decode(b'{"id": 1, "uid": 2, "message": null}', type=ma.Message)


def test_each_message_gets_its_own_json() -> None:
    items = [{"id": i, "uid": 1, "message": f"m{i}", "extra": [i, {"k": None}]} for i in range(5)]
    page = parse_page(json.dumps({"items": items}).encode())
    for i in (3, 0, 4, 1, 2):  # out of order: each message holds its own slice
        assert json.loads(bytes(page.items[i].raw_json)) == items[i]
    assert page.items[3].raw_json is page.items[3].raw_json
    (alone,) = parse_page(json.dumps({"items": items[:1]}).encode()).items
    assert alone.raw == items[0]  # the page it came from is gone; its JSON is not


@pytest.mark.parametrize(
    ("body", "cursors"),
    [
        (b'{"items": [{"id": 1, "uid": 2, "message": "m"}], "next_cursor": "n"}', ("n", None)),
        (b'{"prev_cursor": "p", "next_cursor": "", "items": []}', (None, "p")),
        (b'{"items": null, "next_cursor": null, "prev_cursor": null}', (None, None)),
        (b'{"items": "not a list", "next_cursor": "n", "extra": {"x": [1]}}', ("n", None)),
        # What a walk cannot read ahead: it then decodes first, and decode_page says why.
        (b'{"items": [], "next_cursor": 5}', None),
        (b"[1, 2]", None),
        (b'{"items": [', None),
        (b'{"next_cursor": "\\ud83d", "items": []}', None),  # a lone surrogate
    ],
)
def test_a_pages_cursors_are_read_ahead_as_decode_page_reads_them(
    body: bytes, cursors: tuple[str | None, str | None] | None
) -> None:
    assert parse_cursors(body) == cursors
    if cursors is None:
        return
    try:
        page = parse_page(body)
    except ma.DecodeError:
        return  # its items break the contract: the walk raises after asking ahead
    assert (page.next_cursor, page.prev_cursor) == cursors


def test_a_decoded_page_is_freed_without_the_cycle_collector() -> None:
    # A message's JSON is a view of its page's body, never the page a way back to its
    # messages: a walk's pages must go as soon as their messages do, not at the next full
    # collection.
    body = json.dumps({"items": [{"id": i, "uid": 1, "message": "m"} for i in range(50)]})
    gc.collect()
    gc.disable()
    try:
        page = parse_page(body.encode())
        page.items[7].raw_json  # noqa: B018 (read, and still no cycle)
        del page
        assert gc.collect() == 0
    finally:
        gc.enable()
