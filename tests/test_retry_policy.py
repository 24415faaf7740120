"""The retry decisions as tables: no sockets, no clock."""

from __future__ import annotations

import pytest

import messages_async as ma
from messages_async._retry import RoundVerdict, after_failed_call

AGAIN, RESTART, GIVE_UP = RoundVerdict.AGAIN, RoundVerdict.RESTART, RoundVerdict.GIVE_UP


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (ma.ServerError(503, "unavailable", "down"), AGAIN),
        (ma.RateLimitError(429, "rate_limited", "slow down", retry_after=120.0), AGAIN),
        (ma.TransportError("connection reset"), AGAIN),
        (ma.RequestTimeoutError("no answer in 30 s"), AGAIN),
        (ma.PaginationError("cursor repeated"), AGAIN),
        (ma.AuthError("token endpoint unreachable"), AGAIN),
        (ma.AuthError("token endpoint failing", status=503), AGAIN),
        (ma.AuthError("token endpoint throttling", status=429), AGAIN),
        (ma.InvalidCursorError(400, "invalid_cursor", "expired"), RESTART),
        (ma.AuthError("refused", error="invalid_client", status=401), GIVE_UP),
        (ma.DecodeError("$.items[3].id: expected an integer"), GIVE_UP),
        (ma.NotFoundError(404, "not_found", "no such chat"), GIVE_UP),
        (ma.BadRequestError(400, "invalid_request", "bad limit"), GIVE_UP),
        (ma.PermissionDeniedError(403, "forbidden", "not yours"), GIVE_UP),
        (ma.UnsafeCursorError("cursor on another origin"), GIVE_UP),
        (ValueError("a bug"), GIVE_UP),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.name,
)
def test_round_verdict(exc: BaseException, verdict: RoundVerdict) -> None:
    assert after_failed_call(exc) is verdict
