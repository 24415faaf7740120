"""The exception tree of messages_async.

Every exception the library raises on purpose derives from :class:`MessagesError`, so one
``except MessagesError`` catches them all::

    MessagesError
     ├── ConfigurationError (also ValueError)   bad arguments to Client(...)
     ├── ClientClosedError (also RuntimeError)  the client is not open, or closed mid-call
     ├── EventLoopError (also RuntimeError)     used from an event loop it was not opened in
     ├── AuthError                              token exchange failed, or token refused twice
     │    └── TokenEndpointUnreachableError     the token endpoint could not be reached
     │                                          (also a TransportError)
     ├── ScopeError                             the call needs a scope the token was not granted
     ├── TransportError (also ConnectionError)  server unreachable, or connection dropped
     │    ├── RequestTimeoutError (also TimeoutError)
     │    └── TokenEndpointUnreachableError     (also an AuthError)
     ├── ApiError                               the server answered with an error status
     │    ├── BadRequestError                   400
     │    │    └── InvalidCursorError           400 invalid_cursor (unknown or expired cursor)
     │    ├── PermissionDeniedError             403 forbidden (e.g. another user's message)
     │    ├── NotFoundError                     404
     │    ├── RateLimitError                    429
     │    └── ServerError                       5xx
     ├── DecodeError                            a response that does not fit the contract
     ├── UnsafeCursorError                      a cursor or redirect that leaves the API's origin
     └── PaginationError                        a cursor walk that would loop or go backwards

No exception carries a secret: messages and reprs are built only from statuses, error codes,
server-provided messages and URLs that the library has checked hold no credentials.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AuthError",
    "BadRequestError",
    "ClientClosedError",
    "ConfigurationError",
    "DecodeError",
    "EventLoopError",
    "InvalidCursorError",
    "MessagesError",
    "NotFoundError",
    "PaginationError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ScopeError",
    "ServerError",
    "TokenEndpointUnreachableError",
    "TransportError",
    "UnsafeCursorError",
]


class MessagesError(Exception):
    """Base class of every error raised by messages_async."""


class ConfigurationError(MessagesError, ValueError):
    """The client was configured in a way that cannot work; the message says what to change."""


class ClientClosedError(MessagesError, RuntimeError):
    """The client is not open: use ``async with Client(...)`` or ``await client.open()`` first.

    Also raised by every call that the client's own ``aclose()`` cut short.
    """


class EventLoopError(MessagesError, RuntimeError):
    """The client was used from an event loop other than the one it was opened in.

    Its connections belong to that loop; nothing was sent. Open one client per event loop
    (per thread, per ``asyncio.run``).
    """


class AuthError(MessagesError):
    """The token exchange failed, or the server refused a freshly issued token.

    Attributes:
        error: The OAuth error code (``invalid_client``, ``invalid_grant``, ...) or ``None``.
        status: The HTTP status of the failing answer, or ``None`` if no answer came.
    """

    def __init__(self, message: str, *, error: str | None = None, status: int | None = None):
        super().__init__(message)
        self.error = error
        self.status = status


class ScopeError(MessagesError):
    """The call needs a scope the access token does not carry.

    Attributes:
        required: The scope the call needs.
        granted: The scopes the token carries, or ``None`` when unknown (a pre-issued token).
    """

    def __init__(self, message: str, *, required: str, granted: frozenset[str] | None):
        super().__init__(message)
        self.required = required
        self.granted = granted


class TransportError(MessagesError, ConnectionError):
    """The request could not be completed at the network level (after any retries)."""


class TokenEndpointUnreachableError(AuthError, TransportError):
    """The token endpoint could not be reached (after any retries): an outage or a wrong
    ``token_url`` host, not refused credentials.

    An :class:`AuthError` (no token could be had) and a :class:`TransportError` (the network
    failed), so ``except ConnectionError`` catches it and ``error``/``status`` are ``None``.
    """


class RequestTimeoutError(TransportError, TimeoutError):
    """No complete answer arrived within the ``timeout`` of an attempt (after any retries), or
    the request ran out of its ``deadline``."""


class ApiError(MessagesError):
    """The server answered with an error status.

    Attributes:
        status: The HTTP status code.
        code: The contract's error code (``invalid_request``, ``not_found``, ...), or ``None``
            when the body was not the contract's error object (e.g. an HTML page from a proxy).
        message: The server's explanation, or a short description of the status.
    """

    def __init__(self, status: int, code: str | None, message: str, *, hint: str = ""):
        self.status = status
        self.code = code
        self.message = message
        text = f"HTTP {status}"
        if code:
            text += f" {code}"
        text += f": {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class BadRequestError(ApiError):
    """400: the server rejected the parameters or body."""


class InvalidCursorError(BadRequestError):
    """400 ``invalid_cursor``: the cursor is unknown or expired; start the walk again."""


class PermissionDeniedError(ApiError):
    """403 ``forbidden``: the token may not do this (e.g. edit another user's message)."""


class NotFoundError(ApiError):
    """404: the chat or message does not exist (or is not visible to this token)."""


class RateLimitError(ApiError):
    """429: too many requests.

    Attributes:
        retry_after: Seconds the server asked to wait, or ``None`` if it did not say.
    """

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        retry_after: float | None = None,
        hint: str = "",
    ):
        super().__init__(status, code, message, hint=hint)
        self.retry_after = retry_after


class ServerError(ApiError):
    """5xx: the server failed; the request was retried as far as it was safe to.

    Attributes:
        retry_after: Seconds the server asked to wait (503 may say), or ``None``.
    """

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        retry_after: float | None = None,
        hint: str = "",
    ):
        super().__init__(status, code, message, hint=hint)
        self.retry_after = retry_after


class DecodeError(MessagesError):
    """The server's answer does not fit the contract (not JSON, or the wrong shape)."""


class UnsafeCursorError(MessagesError):
    """A cursor URL or redirect points outside the API's origin or path; nothing was sent there."""


class PaginationError(MessagesError):
    """A cursor walk would repeat itself or go backwards; it was stopped instead of looping."""
