"""The protocol without I/O: building requests and reading answers, as pure functions.

Everything here takes plain values and returns plain values or raises; nothing touches the
network or the clock on its own (callers pass ``now``), so the whole contract is testable
without a server. The I/O layers (``_session.py``, ``_transport.py``) only send what these
functions build and hand back what arrives.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import attrs
import orjson
from yarl import URL

from ._converter import decode, unstructure
from ._errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ConfigurationError,
    DecodeError,
    InvalidCursorError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ScopeError,
    ServerError,
    UnsafeCursorError,
)
from ._models import (
    MAX_ATTACHMENTS,
    MAX_MESSAGE_LENGTH,
    Chat,
    Message,
    MessagesPage,
    NewAttachment,
    Period,
)
from ._rate import Priority
from ._secret import Secret

__all__ = [
    "READ",
    "WRITE",
    "ApiRequest",
    "ListQuery",
    "Retry",
    "TokenGrant",
    "backoff_delay",
    "build_add",
    "build_chats",
    "build_delete",
    "build_edit",
    "build_get",
    "build_list",
    "build_token_form",
    "check_chat_id",
    "check_cursor_chat",
    "check_inside",
    "check_limit",
    "check_secure_url",
    "cursor_request",
    "error_from_response",
    "is_loopback",
    "parse_chats",
    "parse_message",
    "parse_page",
    "parse_retry_after",
    "parse_token_response",
    "resource_root",
    "same_origin",
]

READ = "messages_read"
WRITE = "messages_write"


class Retry(enum.Enum):
    """How far a request may be retried after a failure."""

    #: The request may be repeated freely: a GET, or a write whose repetition changes nothing
    #: more (an edit to the same text, a delete).
    IDEMPOTENT = "idempotent"
    #: Repeating may act twice (``messages/add/``): retry only where the server cannot have
    #: acted on it (connection refused, 429, 503 with ``Retry-After``).
    UNSENT_ONLY = "unsent-only"


@attrs.frozen
class ApiRequest:
    """A resource request, ready to send. ``op`` names it in logs and errors."""

    op: str
    method: str
    url: URL
    scope: str
    retry: Retry
    body: bytes | None = None
    #: A 404 after an attempt that may have reached the server means our attempt did it.
    gone_means_done: bool = False
    #: Pages of bulk walks wait behind single calls and watch polls for a slot.
    priority: Priority = Priority.INTERACTIVE


# --- URLs and origins --------------------------------------------------------------------------


def is_loopback(host: str | None) -> bool:
    """``localhost`` or a loopback IP: plain http there never leaves the machine."""
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_secure_url(url: URL, *, what: str, allow_insecure_http: bool) -> None:
    """Refuse URLs that would send credentials in the clear or to an unclear place."""
    if not url.absolute or url.scheme not in ("http", "https"):
        raise ConfigurationError(f"{what} must be an absolute http(s) URL, got {_show(url)}")
    if url.user is not None or url.password is not None:
        raise ConfigurationError(f"{what} must not carry user info; pass credentials separately")
    if url.scheme == "http" and not allow_insecure_http and not is_loopback(url.host):
        raise ConfigurationError(
            f"{what} {_show(url)} uses plain http, which would send credentials unencrypted; "
            "use https, or pass allow_insecure_http=True if this network is trusted"
        )


def resource_root(uri: str | URL) -> URL:
    """The resource URI as a directory: endpoint paths are appended under it."""
    url = URL(uri) if isinstance(uri, str) else uri
    url = url.with_query(None).with_fragment(None)
    if not url.path.endswith("/"):
        url = url.with_path(url.path + "/")
    return url


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme.lower(), (url.host or "").lower(), url.port)


def same_origin(a: URL, b: URL) -> bool:
    """RFC 6454 origin equality: scheme, host and port (``:443`` and no port are the same)."""
    return _origin(a) == _origin(b)


def _show(url: URL) -> str:
    # Only scheme, host, port and path: a URL's user info or query could carry secrets.
    return str(url.with_user(None).with_query(None).with_fragment(None))


# --- Argument checks (before anything is sent) -------------------------------------------------


def _check_int_id(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


def check_chat_id(value: object) -> int:
    return _check_int_id("chat_id", value)


def check_limit(value: object) -> int | None:
    """``limit`` is a page size. Above 100 it is sent as is: the server clamps it and says so."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"limit must be an int page size, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"limit is a page size and must be at least 1, got {value}")
    return value


def _check_text(message: object, attachments: Sequence[NewAttachment] | None) -> None:
    if message is not None and not isinstance(message, str):
        raise TypeError(f"message must be a str, got {type(message).__name__}")
    if attachments is not None:
        if isinstance(attachments, (str, bytes, Mapping)) or not isinstance(attachments, Sequence):
            raise TypeError("attachments must be a list of NewAttachment")
        for item in attachments:
            if not isinstance(item, NewAttachment):
                raise TypeError(
                    f"attachments must be NewAttachment objects, got {type(item).__name__}; "
                    "build them as NewAttachment(type='link', url=...)"
                )
        if len(attachments) > MAX_ATTACHMENTS:
            raise ValueError(
                f"a message takes at most {MAX_ATTACHMENTS} attachments, got {len(attachments)}"
            )
    if message is not None and len(message) > MAX_MESSAGE_LENGTH:
        raise ValueError(
            f"message is {len(message)} characters; the API takes at most {MAX_MESSAGE_LENGTH}"
        )
    if not message and not attachments:
        raise ValueError("a message needs text or at least one attachment")


# --- Building requests -------------------------------------------------------------------------


def _json(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body)


def build_chats(root: URL) -> ApiRequest:
    return ApiRequest("chats", "GET", root.join(URL("messages/chats/")), READ, Retry.IDEMPOTENT)


@attrs.frozen
class ListQuery:
    """The filters of a listing, kept so a bare cursor token can be sent with them again."""

    chat_id: int
    limit: int | None = None
    query: str | None = None
    period: Period | None = None

    def params(self) -> dict[str, str]:
        params = {"chat_id": str(self.chat_id)}
        if self.limit is not None:
            params["limit"] = str(self.limit)
        if self.query:
            params["query"] = self.query
        if self.period is not None:
            for key, value in unstructure(self.period).items():
                params[f"period[{key}]"] = value
        return params

    @classmethod
    def checked(cls, chat_id: object, limit: object, query: object, period: object) -> ListQuery:
        if query is not None and not isinstance(query, str):
            raise TypeError(f"query must be a str or None, got {type(query).__name__}")
        if period is not None and not isinstance(period, Period):
            raise TypeError(
                "period must be a messages_async.Period, e.g. Period(from_=..., till=...)"
            )
        return cls(check_chat_id(chat_id), check_limit(limit), query or None, period)


def build_list(root: URL, listing: ListQuery) -> ApiRequest:
    url = root.join(URL("messages/")).with_query(listing.params())
    return ApiRequest("list", "GET", url, READ, Retry.IDEMPOTENT)


def cursor_request(root: URL, cursor: str, listing: ListQuery) -> ApiRequest:
    """The request that follows ``cursor``, checked to stay inside the API before it is built.

    A cursor is an absolute URL (followed as given), a relative one (resolved against the
    resource root), or a bare token (sent as ``cursor=`` with the listing's filters, PROTOCOL §3).
    Any URL that would leave the resource origin, or climb above the resource path, raises
    :class:`UnsafeCursorError`, so the bearer token is never sent anywhere else.
    """
    if not isinstance(cursor, str):
        raise TypeError(f"cursor must be a str, got {type(cursor).__name__}")
    if _looks_like_url(cursor):
        try:
            target = URL(cursor)
        except ValueError as exc:
            raise UnsafeCursorError(f"the cursor is not a valid URL: {exc}") from None
        if not target.scheme:  # relative, or protocol-relative ("//host/...")
            target = root.join(target)
        if target.scheme not in ("http", "https") or not target.host:
            raise UnsafeCursorError(
                f"refused a cursor URL without an http(s) scheme and host ({target.scheme!r})"
            )
        check_inside(root, target, what="cursor URL")
        return ApiRequest("list", "GET", target, READ, Retry.IDEMPOTENT)
    params = listing.params()
    params["cursor"] = cursor
    url = root.join(URL("messages/")).with_query(params)
    return ApiRequest("list", "GET", url, READ, Retry.IDEMPOTENT)


def _looks_like_url(cursor: str) -> bool:
    # PROTOCOL §3: a cursor is an absolute URL or an opaque token, and tokens may hold any
    # character ("1700000000:42", standard base64 with "/" and "+"). So only a scheme
    # ("https://…"), a network path ("//host/…") or a path with a query ("/api/v1/messages/?…",
    # "messages/?…") makes a URL; everything else is sent as ``cursor=`` to the API's own
    # origin, where a misread token can do no harm.
    if "://" in cursor or cursor.startswith("//"):
        return True
    path, query_mark, _ = cursor.partition("?")
    return bool(query_mark) and "/" in path


def check_cursor_chat(request: ApiRequest, chat_id: int) -> None:
    """A caller's cursor URL must belong to the chat the caller names (it carries its own)."""
    named = request.url.query.get("chat_id")
    if named is not None and named != str(chat_id):
        raise ValueError(
            f"the cursor belongs to chat {named}, not chat {chat_id}; pass the chat_id the "
            "cursor came from"
        )


def check_inside(root: URL, target: URL, *, what: str) -> None:
    """Raise :class:`UnsafeCursorError` unless ``target`` is on the API's origin and path."""
    if target.user is not None or target.password is not None:
        raise UnsafeCursorError(
            f"refused a {what} with user info on {_show(target.origin())}; nothing was sent"
        )
    if not same_origin(root, target) or (target.raw_host or "") != (root.raw_host or ""):
        raise UnsafeCursorError(
            f"refused a {what} on {_show(target.origin())}: the API's origin is "
            f"{_show(root.origin())} and the access token is only sent there; nothing was sent"
        )
    if not target.path.startswith(root.path) or "/../" in target.path + "/":
        raise UnsafeCursorError(
            f"refused a {what} with path {target.path!r} outside the API's path {root.path!r}"
        )


def build_get(root: URL, message_id: object) -> ApiRequest:
    mid = _check_int_id("message_id", message_id)
    return ApiRequest("get", "GET", root.join(URL(f"messages/{mid}")), READ, Retry.IDEMPOTENT)


def build_add(
    root: URL,
    chat_id: object,
    message: object,
    attachments: Sequence[NewAttachment] | None,
    is_whisper: object,
) -> ApiRequest:
    cid = check_chat_id(chat_id)
    _check_text(message, attachments)
    if not isinstance(is_whisper, bool):
        raise TypeError(f"is_whisper must be a bool, got {type(is_whisper).__name__}")
    body: dict[str, Any] = {"chat_id": cid}
    if message:
        body["message"] = message
    if attachments:
        body["attachments"] = [unstructure(a) for a in attachments]
    if is_whisper:
        body["is_whisper"] = True
    url = root.join(URL("messages/add/"))
    return ApiRequest("add", "POST", url, WRITE, Retry.UNSENT_ONLY, _json(body))


def build_edit(
    root: URL,
    message_id: object,
    chat_id: object,
    message: object,
    attachments: Sequence[NewAttachment] | None,
) -> ApiRequest:
    mid = _check_int_id("message_id", message_id)
    cid = check_chat_id(chat_id)
    _check_text(message, attachments)
    body: dict[str, Any] = {"chat_id": cid}
    if message is not None:
        body["message"] = message
    if attachments is not None:
        body["attachments"] = [unstructure(a) for a in attachments]
    url = root.join(URL(f"messages/{mid}/edit/"))
    # Setting the same text twice leaves the same message: safe to repeat after a lost answer.
    return ApiRequest("edit", "POST", url, WRITE, Retry.IDEMPOTENT, _json(body))


def build_delete(root: URL, message_id: object) -> ApiRequest:
    mid = _check_int_id("message_id", message_id)
    url = root.join(URL(f"messages/{mid}/delete/"))
    return ApiRequest("delete", "POST", url, WRITE, Retry.IDEMPOTENT, gone_means_done=True)


# --- Reading answers ---------------------------------------------------------------------------


def _loads(body: bytes, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(
            f"the server's {what} is not valid JSON ({exc}); {len(body)} bytes received"
        ) from None


def parse_chats(body: bytes) -> list[Chat]:
    data = _loads(body, "chat list")
    if not isinstance(data, dict):
        raise DecodeError("the server's chat list is not a JSON object with 'items'")
    items: list[Chat] = decode(data.get("items") or [], list[Chat], what="chat list")
    return items


def parse_page(body: bytes) -> MessagesPage:
    data = _loads(body, "message page")
    if not isinstance(data, dict):
        raise DecodeError("the server's message page is not a JSON object")
    if data.get("items") is None:
        # A page may come without items (filtered stretch); it still carries its cursors.
        data = {**data, "items": []}
    page: MessagesPage = decode(data, MessagesPage, what="message page")
    return page


def parse_message(body: bytes) -> Message:
    data = _loads(body, "message")
    if not isinstance(data, dict):
        raise DecodeError("the server's message is not a JSON object")
    message: Message = decode(data, Message, what="message")
    return message


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3), or ``None``.

    Both forms are read: delay-seconds and an HTTP-date (IMF-fixdate, RFC 850, asctime). A value
    that cannot be read, or makes no sense (negative, not finite, a date already past), gives
    ``None`` so the caller falls back to its own backoff instead of trusting it.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.replace(".", "", 1).isdigit():
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # asctime dates carry no zone; HTTP dates are GMT
    delay = (when - now).total_seconds()
    return delay if delay >= 0 else None


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(cap, base * 2**attempt)]``.

    Full jitter spreads retries of many clients (or many tasks of one fan-out) evenly instead of
    letting them return in lock-step (AWS Architecture Blog, "Exponential Backoff and Jitter").
    """
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 32))))


_HINTS = {
    400: "check the arguments of the call",
    404: "check the chat or message id; it may have been deleted",
    413: "the request body is too large; send a shorter message or fewer attachments",
}


def _error_body(body: bytes) -> tuple[str | None, str | None]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        code = err.get("code")
        message = err.get("message")
        return (
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else None,
        )
    return None, None


def _www_authenticate(header: str | None) -> dict[str, str]:
    """The auth-params of a ``WWW-Authenticate: Bearer ...`` challenge (RFC 6750 §3)."""
    params: dict[str, str] = {}
    if not header:
        return params
    _, _, rest = header.partition(" ")
    for part in rest.split(","):
        key, sep, val = part.strip().partition("=")
        if sep:
            params[key.strip().lower()] = val.strip().strip('"')
    return params


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: datetime,
    granted: frozenset[str] | None = None,
) -> Exception:
    """Map an error answer to the library's exception (it is returned, not raised)."""
    content_type = headers.get("Content-Type")
    code, message = _error_body(body)
    if message is None:
        message = (
            f"non-JSON error body ({content_type or 'no content type'}, {len(body)} bytes); "
            "often a proxy or load balancer in front of the API"
            if code is None
            else "no message"
        )
    challenge = _www_authenticate(headers.get("WWW-Authenticate"))
    if status == 403 and (
        code == "insufficient_scope" or challenge.get("error") == "insufficient_scope"
    ):
        required = challenge.get("scope") or "unknown"
        return ScopeError(
            f"the server refused the call for lack of the {required!r} scope; ask for it in "
            f"Client(scopes=...) and make sure the client is allowed it: {message}",
            required=required,
            granted=granted,
        )
    if status == 401:
        return AuthError(
            f"the server refused the access token ({code or 'no code'}: {message})",
            error=code,
            status=status,
        )
    retry_after = parse_retry_after(headers.get("Retry-After"), now)
    hint = _HINTS.get(status, "")
    if status == 429:
        return RateLimitError(
            status,
            code,
            message,
            retry_after=retry_after,
            hint="slow down; the client waits out Retry-After up to max_retry_after",
        )
    if status >= 500:
        return ServerError(status, code, message, retry_after=retry_after)
    if status == 400 and code == "invalid_cursor":
        return InvalidCursorError(
            status, code, message, hint="the cursor is unknown or expired; start the walk again"
        )
    if status in (400, 413, 422):
        return BadRequestError(status, code, message, hint=hint)
    if status == 403:
        return PermissionDeniedError(status, code, message, hint="this token may not do that")
    if status == 404:
        return NotFoundError(status, code, message, hint=hint)
    return ApiError(status, code, message, hint=hint)


# --- Token exchange (RFC 6749 §4.4, §6) --------------------------------------------------------


@attrs.frozen
class TokenGrant:
    """What a successful token exchange gave. Secrets stay wrapped."""

    access_token: Secret
    expires_in: float | None
    refresh_token: Secret | None
    scopes: frozenset[str] | None
    resource_uri: URL
    user_id: int | None


def build_token_form(
    *,
    client_id: str,
    client_secret: Secret,
    scopes: frozenset[str],
    refresh_token: Secret | None = None,
) -> dict[str, str]:
    """The form body of a client-credentials or refresh exchange."""
    if refresh_token is not None:
        return {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token.reveal(),
            "client_id": client_id,
            "client_secret": client_secret.reveal(),
        }
    return {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": client_secret.reveal(),
        "scope": " ".join(sorted(scopes)),
    }


def parse_token_response(status: int, body: bytes, *, allow_insecure_http: bool) -> TokenGrant:
    """Read the token endpoint's answer; a failure raises :class:`AuthError`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if status != 200:
        error = data.get("error") if isinstance(data, dict) else None
        description = data.get("error_description") if isinstance(data, dict) else None
        if not isinstance(error, str):
            error = None
        hints = {
            "invalid_client": "check client_id and client_secret",
            "invalid_scope": "ask only for scopes this client is allowed",
            "invalid_grant": "the grant was refused",
        }
        raise AuthError(
            f"token exchange failed with HTTP {status}"
            + (f" {error}" if error else "")
            + (f": {description}" if isinstance(description, str) else "")
            + (f" ({hints[error]})" if error in hints else ""),
            error=error,
            status=status,
        )
    if not isinstance(data, dict):
        raise AuthError("the token endpoint's answer is not a JSON object", status=status)
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthError("the token endpoint's answer has no access_token", status=status)
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise AuthError(
            f"the token endpoint issued a {token_type!r} token; only Bearer is supported"
        )
    uri = data.get("resource_uri")
    if not isinstance(uri, str) or not uri:
        raise AuthError("the token endpoint's answer has no resource_uri")
    try:
        root = resource_root(uri)
        check_secure_url(root, what="resource_uri", allow_insecure_http=allow_insecure_http)
    except (ConfigurationError, ValueError) as exc:
        raise AuthError(f"the token endpoint returned an unusable resource_uri: {exc}") from None
    expires_in = data.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = None
    refresh = data.get("refresh_token")
    scope = data.get("scope")
    # Absent: as asked (a first exchange) or unchanged (a refresh, RFC 6749 §5.1, §6).
    scopes = frozenset(scope.split()) if isinstance(scope, str) else None
    user_id = data.get("user_id")
    if isinstance(user_id, str) and user_id.isdigit():
        user_id = int(user_id)
    return TokenGrant(
        access_token=Secret(token),
        expires_in=float(expires_in) if expires_in is not None else None,
        refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
        scopes=scopes,
        resource_uri=root,
        user_id=user_id if isinstance(user_id, int) and not isinstance(user_id, bool) else None,
    )
