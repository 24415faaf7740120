"""What the emulator's pure parts hand to its HTTP layer: an answer, or a refusal.

The endpoint rules (listing, writes, the token endpoint) are plain functions that never see an
aiohttp object. They return an `Answer` or raise a `Refusal`; `_server.py` turns either into a
response, compressed as the request allows. Keeping the error shape here, in one place, is what
makes every refusal of a resource endpoint look the same on the wire (docs/protocol.md §5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import attrs

__all__ = ["Answer", "Json", "Refusal", "bad_request", "default_code", "error_body", "not_found"]

Json = dict[str, Any]

_ERROR_CODES: Final = {
    400: "invalid_request",
    401: "invalid_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    429: "rate_limited",
    500: "internal",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}


def default_code(status: int) -> str:
    """The error code a resource endpoint gives ``status`` when nothing more precise applies."""
    code = _ERROR_CODES.get(status)
    if code is not None:
        return code
    return "internal" if status >= 500 else "invalid_request"


def error_body(code: str, message: str) -> Json:
    """The body of every non-2xx answer of a resource endpoint (docs/protocol.md §5)."""
    return {"error": {"code": code, "message": message}}


@attrs.define
class Answer:
    """A response to write.

    ``body`` is encoded as JSON (and compressed where the request allows); None means no body
    (a 204, a redirect). ``raw``, when given, is sent instead exactly as it is, with the
    ``Content-Type`` in ``headers``: a fault's broken body.

    Not frozen, like the other values built on every request (`Query`, `Plan`, `Target`):
    a frozen attrs class pays for ``object.__setattr__`` on each field, which was a few
    microseconds a request, a tenth of what the emulator spends on a cached page.
    """

    status: int
    body: Any = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    raw: bytes | None = None


class Refusal(Exception):
    """An error answer, raised from anywhere inside an endpoint's rules.

    ``body`` is the JSON to send: the resource endpoints' ``{"error": {...}}`` by default, or
    an OAuth error object for the token endpoint. ``close`` asks for the connection to be closed
    after the answer (a request body too large to read on).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        body: Json | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers: Mapping[str, str] = dict(headers or {})
        self.body: Json = body if body is not None else error_body(code, message)
        self.close = close

    def answer(self) -> Answer:
        return Answer(self.status, self.body, self.headers)


def bad_request(message: str) -> Refusal:
    """400 ``invalid_request``: the request's parameters or body break the contract."""
    return Refusal(400, "invalid_request", message)


def not_found(message: str) -> Refusal:
    return Refusal(404, "not_found", message)
