"""Argument checks, written once: every public entry point checks its numbers through these.

Each raises ``TypeError`` for the wrong type and ``ValueError`` for a value out of range, with
a message that names the argument and says what it must be, before anything is sent.
"""

from __future__ import annotations

import math

__all__ = ["count", "flag", "per_second", "seconds"]


def count(name: str, value: object, *, minimum: int = 0, what: str = "an int") -> int:
    """An ``int`` (not a ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {_show(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def flag(name: str, value: object) -> bool:
    """A ``bool``: ``1``, ``"yes"`` and ``None`` are refused rather than read as true or false."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {_show(value)}")
    return value


def seconds(name: str, value: object, *, allow_zero: bool = False, finite: bool = False) -> float:
    """A number of seconds: positive (or zero, if allowed), never NaN, finite if asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds, got {type(value).__name__} {_show(value)}"
        )
    low_ok = value >= 0 if allow_zero else value > 0
    if not low_ok or math.isnan(value) or (finite and math.isinf(value)):
        kind = "non-negative" if allow_zero else "positive"
        if finite:
            kind += ", finite"
        raise ValueError(f"{name} must be a {kind} number of seconds, got {value}")
    return float(value)


def per_second(name: str, value: object) -> float:
    """A rate: a positive, finite number of events per second."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of requests per second, got {type(value).__name__} "
            f"{_show(value)}"
        )
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive, finite number per second, got {value}")
    return float(value)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
