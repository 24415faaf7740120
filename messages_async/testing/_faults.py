"""Faults the emulator can inject, and the queue that matches them against requests.

A `Fault` only describes what goes wrong. Faults are one-shot by default and matched in the
order they were injected, so a test reads as a script: "the next listing of chat 7 gets a 503,
the one after that is dropped". What a fault answers is written here where no I/O is involved
(`canned_answer`); the server acts out the rest (a dropped connection, a body streamed to its
cap), and the listing faults are the listing's to build (`_listing.Lister.plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import attrs

from ._answers import Answer, Json, default_code, error_body

__all__ = [
    "LISTING_ONLY",
    "Fault",
    "FaultHandle",
    "FaultQueue",
    "canned_answer",
    "status_answer",
    "wrong_shape",
]

_MIB: Final = 1024 * 1024

#: Faults that rewrite a listing's answer; they only ever match ``GET messages/``.
LISTING_ONLY: Final = frozenset({"repeat_cursor", "foreign_cursor", "backwards_page", "empty_page"})
#: Faults acted out before the request is handled (the server state is left alone).
_BEFORE: Final = frozenset(
    {
        "status",
        "rate_limited",
        "drop",
        "malformed",
        "wrong_shape",
        "expire_token",
        "redirect",
        "oversized",
        "invalid_cursor",
    }
)


@attrs.frozen
class Fault:
    """An immutable description of one thing going wrong. Build it with the classmethods.

    ``kind`` is the fault's name; it is what `RequestRecord.fault` reports.
    """

    kind: str
    # Not named `status`: that name is the constructor `Fault.status(...)`.
    http_status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: str | None = None
    body: bytes | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    location: str | None = None
    origin: str | None = None
    size: int = 0
    declare_length: bool = False
    gzip: bool = False

    @property
    def before_handling(self) -> bool:
        """Whether the fault replaces the handling of the request altogether."""
        return self.kind in _BEFORE

    @classmethod
    def status(
        cls,
        status: int,
        code: str | None = None,
        *,
        message: str | None = None,
        retry_after: str | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Answer with ``status`` before the request is acted on.

        Args:
            status: the HTTP status.
            code: the error code; default by status (400 ``invalid_request``, 401
                ``invalid_token`` with ``WWW-Authenticate``, 403 ``forbidden``, 404
                ``not_found``, 429 ``rate_limited``, 500 ``internal``, 502-504 ``unavailable``).
            message: the error message.
            retry_after: the ``Retry-After`` header, sent exactly as given (so it may be
                garbage on purpose).
            body: raw bytes instead of the contract's error body (e.g. a proxy's HTML page).
            content_type: the body's content type (default ``application/json``).
            headers: more response headers.
        """
        return cls(
            "status",
            http_status=status,
            code=code,
            message=message,
            retry_after=retry_after,
            body=body,
            content_type=content_type,
            headers=tuple((headers or {}).items()),
        )

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1") -> Fault:
        """429 ``rate_limited`` with ``Retry-After`` as given (None: no header)."""
        return cls("rate_limited", http_status=429, retry_after=retry_after)

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without an answer, before the request is acted on."""
        return cls("drop")

    @classmethod
    def drop_after_commit(cls) -> Fault:
        """Act on the request (an add stores its message), then close without an answer."""
        return cls("drop_after_commit")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Extra latency for this request only; it is then answered normally."""
        return cls("delay", seconds=seconds)

    @classmethod
    def malformed(
        cls, body: bytes = b'{"items": [', content_type: str = "application/json"
    ) -> Fault:
        """200 with a body that is not valid JSON (or any bytes given)."""
        return cls("malformed", http_status=200, body=body, content_type=content_type)

    @classmethod
    def empty_page(cls) -> Fault:
        """A listing answered with no items and a cursor to the same position: a stretch the
        server filtered out, or ran out of time on (docs/protocol.md §3)."""
        return cls("empty_page", http_status=200)

    @classmethod
    def wrong_shape(cls) -> Fault:
        """200 with valid JSON that does not fit the endpoint's response type."""
        return cls("wrong_shape", http_status=200)

    @classmethod
    def expire_token(cls) -> Fault:
        """Invalidate every access token issued so far and answer 401 ``invalid_token``."""
        return cls("expire_token", http_status=401)

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Fault:
        """A redirect to ``location`` (absolute URL), e.g. to another origin."""
        return cls("redirect", http_status=status, location=location)

    @classmethod
    def repeat_cursor(cls) -> Fault:
        """A listing whose ``next_cursor`` is the cursor the request came with (a cycle)."""
        return cls("repeat_cursor")

    @classmethod
    def foreign_cursor(cls, origin: str) -> Fault:
        """A listing whose ``next_cursor`` is an absolute URL on ``origin``."""
        return cls("foreign_cursor", origin=origin.rstrip("/"))

    @classmethod
    def backwards_page(cls) -> Fault:
        """A listing whose items lie on the wrong side of the cursor (ids going backwards)."""
        return cls("backwards_page")

    @classmethod
    def oversized(
        cls, size: int = 64 * _MIB, *, declare_length: bool = False, gzip: bool = False
    ) -> Fault:
        """200 streaming ``size`` bytes of JSON-looking filler.

        Args:
            size: bytes of (decoded) body.
            declare_length: send ``Content-Length`` instead of chunked encoding.
            gzip: send it gzip-encoded: a small body on the wire that inflates to ``size``.
        """
        return cls(
            "oversized", http_status=200, size=size, declare_length=declare_length, gzip=gzip
        )

    @classmethod
    def invalid_cursor(cls) -> Fault:
        """400 ``invalid_cursor``."""
        return cls("invalid_cursor", http_status=400, code="invalid_cursor")


@attrs.define(eq=False)
class FaultHandle:
    """One injected fault and its filters. ``hits`` counts the requests it has hit."""

    fault: Fault
    method: str | None
    path: str | None
    times: int | None
    after: int
    chat_id: int | None
    hits: int = 0
    seen: int = 0
    cancelled: bool = False

    @property
    def exhausted(self) -> bool:
        return self.cancelled or (self.times is not None and self.hits >= self.times)

    def cancel(self) -> None:
        """Withdraw the fault: it hits no further requests."""
        self.cancelled = True

    def _matches(
        self, method: str, path: str, chat_of: Callable[[], int | None], listing: bool
    ) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.path is None:
            # No path: any resource request, never the token endpoint, so that a test which
            # injects "the next request fails" is not spent on the client's token exchange.
            if path == "oauth/token":
                return False
        elif not path.startswith(self.path):
            return False
        if self.chat_id is not None and self.chat_id != chat_of():
            return False
        return not (self.fault.kind in LISTING_ONLY and not listing)


class FaultQueue:
    """Injected faults in injection order; the first live one that matches a request wins."""

    def __init__(self) -> None:
        self._handles: list[FaultHandle] = []

    def add(
        self,
        fault: Fault,
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = 1,
        after: int = 0,
        chat_id: int | None = None,
    ) -> FaultHandle:
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if after < 0:
            raise ValueError("after must be >= 0")
        handle = FaultHandle(
            fault=fault,
            method=method.upper() if method else None,
            path=path.lstrip("/") if path is not None else None,
            times=times,
            after=after,
            chat_id=chat_id,
        )
        self._handles.append(handle)
        return handle

    def clear(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()

    def __len__(self) -> int:
        return sum(1 for h in self._handles if not h.exhausted)

    def match(
        self,
        method: str,
        path: str,
        *,
        chat_of: Callable[[], int | None] = lambda: None,
        listing: bool = False,
    ) -> Fault | None:
        """The fault for this request, counting it against the fault's ``after``/``times``.

        A request still inside a fault's ``after`` allowance counts toward it and goes on to
        be matched against later faults. ``chat_of`` gives the request's chat; it is only called
        for a fault filtered by chat, since finding the chat may mean parsing the body.
        """
        if not self._handles:
            return None
        found: Fault | None = None
        for handle in self._handles:
            if handle.exhausted or not handle._matches(method, path, chat_of, listing):
                continue
            if handle.seen < handle.after:
                handle.seen += 1
                continue
            handle.hits += 1
            found = handle.fault
            break
        self._handles = [h for h in self._handles if not h.exhausted]
        return found


# -- answers ------------------------------------------------------------------------------------


def wrong_shape(method: str, path: str, origin: str) -> Json:
    """Valid JSON that does not fit the endpoint's response type (the ``wrong_shape`` fault)."""
    if origin == "token":
        return {"access_token": 42, "token_type": 7, "expires_in": "soon"}
    if path == "messages/" and method == "GET":
        return {"items": "nope", "limit": "x", "next_cursor": 5, "total_count": None}
    if path == "messages/chats/":
        return {"items": {"chat_id": "abc", "type": 7}}
    return {"id": "abc", "uid": None, "message": 5, "attachments": "none"}


def status_answer(fault: Fault, origin: str) -> Answer:
    """The error answer of a fault that answers with a status: the contract's error body for
    the origin (docs/protocol.md §1 for the token endpoint, §5 otherwise), or the fault's own
    raw body."""
    status = fault.http_status or 500
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    message = fault.message or f"injected {status}"
    obj: Json
    if origin == "token":
        code = fault.code or {400: "invalid_request", 401: "invalid_client"}.get(
            status, default_code(status)
        )
        obj = {"error": code, "error_description": message}
    else:
        code = fault.code or default_code(status)
        if code == "invalid_token":
            headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        obj = error_body(code, message)
    headers.update(fault.headers)
    if fault.body is not None:
        headers.setdefault("Content-Type", fault.content_type or "application/json")
        return Answer(status, headers=headers, raw=fault.body)
    return Answer(status, obj, headers)


def canned_answer(fault: Fault, *, method: str, path: str, origin: str) -> Answer:
    """The answer of a fault acted out before handling that takes no I/O to write (every
    such kind but ``drop`` and ``oversized``)."""
    kind = fault.kind
    if kind == "malformed":
        content_type = fault.content_type or "application/json"
        return Answer(200, headers={"Content-Type": content_type}, raw=fault.body or b"")
    if kind == "wrong_shape":
        return Answer(200, wrong_shape(method, path, origin))
    if kind == "redirect":
        return Answer(fault.http_status or 302, headers={"Location": fault.location or "/"})
    return status_answer(fault, origin)
