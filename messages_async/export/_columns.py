"""Typed columns derived from the raw objects, shared by every format that stores them.

The raw objects are stored exactly as received; these are the few fields an analyst wants as
real columns beside them. Each is read tolerantly (PROTOCOL §6: integers may arrive as strings
of digits, unknown chat types are kept as they are), and a field that cannot be read is left
empty rather than failing the export: the raw object still holds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["ChatColumns", "chat_columns", "optional_int", "optional_str", "utc_timestamp"]

#: ``(chat_id, type, name, picture_url, members_count)``.
ChatColumns = tuple[int, str | None, str | None, str | None, int | None]


def optional_int(value: object) -> int | None:
    """An int, or a string of ASCII digits read as one; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def chat_columns(raw: Mapping[str, Any]) -> ChatColumns:
    """The typed columns of a chat object as received."""
    return (
        int(raw["chat_id"]),
        optional_str(raw.get("type")),
        optional_str(raw.get("name")),
        optional_str(raw.get("picture_url")),
        optional_int(raw.get("members_count")),
    )


def utc_timestamp(value: datetime | None) -> str | None:
    """``YYYY-MM-DD HH:MM:SS[.ffffff]`` in UTC: the form SQLite's own date functions write,
    which DuckDB reads as a TIMESTAMP, pandas as datetime64 and Python's ``sqlite3`` (with
    ``detect_types=PARSE_DECLTYPES``) as a datetime. Sorting the text sorts the instants."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(sep=" ")[:-6]  # without the "+00:00"
