"""The argument checks every entry point shares, as a table."""

from __future__ import annotations

import math

import pytest

from messages_async._checks import count, per_second, seconds


@pytest.mark.parametrize(
    ("value", "minimum", "error", "message"),
    [
        (True, 0, TypeError, "n must be an int, got bool True"),
        (1.0, 0, TypeError, "n must be an int, got float 1.0"),
        ("3", 0, TypeError, "n must be an int, got str '3'"),
        (0, 1, ValueError, "n must be at least 1, got 0"),
        (-1, 0, ValueError, "n must be at least 0, got -1"),
    ],
)
def test_count_refuses(value: object, minimum: int, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        count("n", value, minimum=minimum)
    assert str(info.value) == message


def test_count_accepts() -> None:
    assert count("n", 0) == 0
    assert count("n", 5, minimum=5) == 5
    assert count("limit", 7, minimum=1, what="an int page size") == 7
    with pytest.raises(TypeError, match="limit must be an int page size"):
        count("limit", None, minimum=1, what="an int page size")


@pytest.mark.parametrize(
    ("value", "options", "error", "message"),
    [
        (None, {}, TypeError, "t must be a number of seconds, got NoneType None"),
        (False, {}, TypeError, "t must be a number of seconds, got bool False"),
        (0, {}, ValueError, "t must be a positive number of seconds, got 0"),
        (-0.5, {"allow_zero": True}, ValueError, "must be a non-negative number of seconds"),
        (math.nan, {"allow_zero": True}, ValueError, "non-negative number of seconds, got nan"),
        (math.inf, {"finite": True}, ValueError, "t must be a positive, finite number"),
    ],
)
def test_seconds_refuses(
    value: object, options: dict[str, bool], error: type, message: str
) -> None:
    with pytest.raises(error) as info:
        seconds("t", value, **options)
    assert message in str(info.value)


def test_seconds_accepts() -> None:
    assert seconds("t", 2) == 2.0
    assert seconds("t", 0, allow_zero=True) == 0.0
    assert seconds("t", math.inf) == math.inf


def test_the_check_is_written_once() -> None:
    # No module spells out its own "at least 1" check any more (the emulator's answers to a
    # bad request are the server's words, not an argument check).
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "messages_async"
    spelled = [
        path.name
        for path in package.rglob("*.py")
        if "at least 1" in path.read_text()
        and path.name != "_checks.py"
        and "testing" not in path.parts
    ]
    assert spelled == [], spelled


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("40", TypeError, "r must be a number of requests per second, got str '40'"),
        (True, TypeError, "r must be a number of requests per second, got bool True"),
        (0, ValueError, "r must be a positive, finite number per second, got 0"),
        (-5.0, ValueError, "r must be a positive, finite number per second, got -5.0"),
        (math.inf, ValueError, "r must be a positive, finite number per second, got inf"),
        (math.nan, ValueError, "r must be a positive, finite number per second, got nan"),
    ],
)
def test_per_second_refuses(value: object, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        per_second("r", value)
    assert str(info.value) == message
    assert per_second("r", 40) == 40.0
