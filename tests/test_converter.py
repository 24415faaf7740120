"""The decode fast path agrees with the cattrs-generated reference on arbitrary input."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from messages_async._converter import _converter, _diagnostic_converter
from messages_async._models import Attachment, Message, MessagesPage

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=2**40),
    st.floats(allow_nan=False),
    st.sampled_from(["", "12", "x", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "１２"]),
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


def _outcome(converter: Any, data: Any, cls: Any) -> Any:
    try:
        return ("ok", converter.structure(data, cls))
    except Exception:
        return ("error", None)


@settings(max_examples=400, deadline=None)
@given(message)
def test_fast_message_hook_matches_the_generated_one(data: dict[str, Any]) -> None:
    fast = _outcome(_converter, data, Message)
    reference = _outcome(_diagnostic_converter, data, Message)
    assert fast == reference
    if fast[0] == "ok":
        assert fast[1].raw is data


@settings(max_examples=100, deadline=None)
@given(st.lists(message, max_size=4), scalars)
def test_pages_agree(items: list[dict[str, Any]], cursor: Any) -> None:
    data = {"items": items, "limit": 20, "next_cursor": cursor, "total_count": "3"}
    assert _outcome(_converter, data, MessagesPage) == _outcome(
        _diagnostic_converter, data, MessagesPage
    )


def test_the_fast_hook_sets_every_field_of_message() -> None:
    # The fast hook fills a blank Message slot by slot; a new field must be added there too.
    import attrs

    assert [f.name for f in attrs.fields(Message)] == [
        "id",
        "uid",
        "message",
        "attachments",
        "created_at",
        "raw",
    ]
    assert [f.name for f in attrs.fields(Attachment)] == ["type", "url", "name", "size"]
