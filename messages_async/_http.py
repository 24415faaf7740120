"""aiohttp's side of one attempt, shared by the transport and the token exchange.

Reading a body under a cap, naming a failure in the retry policy's words, and describing it
without anything a server or a request could smuggle into a log line or an exception.
"""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from ._retry import Failure
from ._wire import server_text

__all__ = ["ERROR_BODY_CAP", "describe", "failure_of", "read_capped", "scrubbed"]

#: Error answers and token answers are small; more than this is read no further. The status
#: says what went wrong, and a server's essay in an error body helps nobody.
ERROR_BODY_CAP = 64 * 1024


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    """The body, and whether it was complete; past ``cap`` bytes the connection is closed.

    Counted after decompression (aiohttp inflates in bounded steps from 3.14.4 on, the floor
    in ``pyproject.toml``), so a gzip bomb is cut off at the cap as well.
    """
    length = response.content_length
    if length is not None and length > cap:
        response.close()
        return b"", False
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > cap:
            response.close()
            chunks.append(chunk[: cap - (size - len(chunk))])
            return b"".join(chunks), False
        chunks.append(chunk)
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), True


def failure_of(exc: BaseException) -> Failure:
    """What a failed attempt's exception means for retrying it."""
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError)):
        return Failure.CERTIFICATE
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        # Not connected (refused, unresolvable, no route, or no connection in time): nothing
        # was sent.
        return Failure.NOT_CONNECTED
    if isinstance(exc, TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, ValueError) and not isinstance(exc, aiohttp.ClientError):
        return Failure.UNSENDABLE  # e.g. a header value aiohttp will not put on the wire
    # Dropped connections, unreadable answers (a malformed status line, oversized headers)
    # and every other aiohttp failure: the request may have been acted on.
    return Failure.LOST


def describe(exc: BaseException) -> str:
    """``Type: message`` of an aiohttp failure, fit for a log line or an exception message."""
    # A ClientResponseError's str() carries the request URL with its query; its message
    # alone says enough.
    text = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
    name = type(exc).__name__
    return f"{name}: {server_text(text)}" if text else name


def scrubbed(exc: BaseException) -> BaseException:
    """``exc`` with the tracebacks of it and its whole chain dropped, and no request headers.

    aiohttp's frames hold the request's headers (the bearer token) and the token form (the
    client secret) in their locals, and a ``ClientResponseError`` carries the request's
    headers in its ``request_info`` (shown by its repr): the exception keeps its type, its
    message and the URL only.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        if isinstance(current, aiohttp.ClientResponseError):
            info = current.request_info
            headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
            current.request_info = aiohttp.RequestInfo(
                info.url, info.method, headers, info.real_url
            )
            current.history = ()
            current.args = (current.request_info, ())
        todo += [current.__cause__, current.__context__]
    return exc
