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
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import attrs
import orjson
from yarl import URL

from ._checks import count, flag
from ._converter import decode_chats, decode_message, decode_page, peek_cursors, unstructure
from ._errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ConfigurationError,
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
    "is_bearer_token",
    "is_client_id",
    "is_loopback",
    "is_outage_status",
    "is_scope_token",
    "parse_chats",
    "parse_cursors",
    "parse_message",
    "parse_page",
    "parse_retry_after",
    "parse_token_response",
    "resource_root",
    "same_origin",
    "server_text",
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
        missing = " (it does not start with https:// or http://)"
        raise ConfigurationError(
            f"{what} must be an absolute http(s) URL such as https://host/path, got "
            f"{_show(url)!r}{missing}"
        )
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
    if url.absolute:
        url = url.with_user(None)
    return server_text(str(url.with_query(None).with_fragment(None)), limit=200)


#: Longest piece of server-provided text (an error message, a token type) quoted in an error.
_SERVER_TEXT_LIMIT = 300


def server_text(text: str, *, limit: int = _SERVER_TEXT_LIMIT) -> str:
    """Text a server sent, fit to quote in an exception or a log line.

    Control characters (a CR/LF that would forge a log line, an ANSI escape that would
    rewrite the terminal) are shown escaped, and the text is cut at ``limit`` characters.
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text) - limit} more characters)"
    return text


# --- Argument checks (before anything is sent) -------------------------------------------------


def _check_int_id(name: str, value: object) -> int:
    return count(name, value, minimum=0)


def check_chat_id(value: object) -> int:
    return _check_int_id("chat_id", value)


def check_limit(value: object) -> int | None:
    """``limit`` is a page size. Above 100 it is sent as is: the server clamps it and says so."""
    if value is None:
        return None
    return count("limit", value, minimum=1, what="an int page size")


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
        for item in attachments:
            _check_attachment_url(item.url)
    if message is not None and len(message) > MAX_MESSAGE_LENGTH:
        raise ValueError(
            f"message is {len(message)} characters; the API takes at most {MAX_MESSAGE_LENGTH}"
        )
    if not attachments and (not message or message.isspace()):
        # Text of only whitespace shows as an empty message: it is no text.
        raise ValueError(
            "a message needs text or at least one attachment"
            + ("; this text is only whitespace" if message else "")
        )


def _check_attachment_url(url: str) -> None:
    # docs/protocol.md §6: an attachment is fetched with a plain GET, from any origin.
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        parsed = None
    # Shown without its query: a file host's URL may carry a signature.
    bare = repr(str(parsed.with_query(None).with_fragment(None))) if parsed is not None else ""
    if parsed is None:
        shown = "a URL that cannot be parsed"
    elif not parsed.scheme:
        shown = f"{bare}, which has no scheme"
    elif parsed.scheme not in ("http", "https"):
        shown = f"a URL with the scheme {parsed.scheme!r}"
    elif not parsed.absolute:
        shown = f"{bare}, which has no host"
    else:
        return
    raise ValueError(
        f"an attachment's url must be an absolute http:// or https:// URL, got {shown}"
    )


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
    resource root), or a bare token (sent as ``cursor=`` with the listing's filters,
    docs/protocol.md §3).
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
    # docs/protocol.md §3: a cursor is an absolute URL or an opaque token, and tokens may hold any
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
    flag("is_whisper", is_whisper)
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


def parse_chats(body: bytes) -> list[Chat]:
    return decode_chats(body)


def parse_page(body: bytes) -> MessagesPage:
    return decode_page(body)


def parse_cursors(body: bytes) -> tuple[str | None, str | None] | None:
    return peek_cursors(body)


def parse_message(body: bytes) -> Message:
    return decode_message(body)


def is_outage_status(status: int) -> bool:
    """A status that says the server is failing or throttling, not refusing the request."""
    return status >= 500 or status == 429


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
#: A 404 that cannot be about an id: the API is not where ``resource_uri`` says.
_WRONG_RESOURCE_URI = (
    "the server has no such endpoint here: check resource_uri (the API's base URI)"
)


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
            server_text(code, limit=60) if isinstance(code, str) else None,
            server_text(message) if isinstance(message, str) else None,
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
    op: str | None = None,
    cut_at: int | None = None,
) -> Exception:
    """Map an error answer to the library's exception (it is returned, not raised).

    ``op`` names the call (a 404 on the chat list cannot be about an id); ``cut_at`` is the
    cap the body was cut at, when it was longer.
    """
    content_type = server_text(headers.get("Content-Type") or "no content type", limit=80)
    code, message = _error_body(body) if cut_at is None else (None, None)
    contract = code is not None
    if message is None:
        size = f"{len(body)} bytes" if cut_at is None else f"more than {cut_at} bytes"
        message = (
            f"non-JSON error body ({content_type}, {size}); "
            "often a proxy or load balancer in front of the API"
            if code is None
            else "no message"
        )
    challenge = _www_authenticate(headers.get("WWW-Authenticate"))
    if status == 403 and (
        code == "insufficient_scope" or challenge.get("error") == "insufficient_scope"
    ):
        required = server_text(challenge.get("scope") or "unknown", limit=60)
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
        if op == "chats" or not contract:
            hint = _WRONG_RESOURCE_URI
        return NotFoundError(status, code, message, hint=hint)
    if status == 405 and op is not None:
        hint = _WRONG_RESOURCE_URI
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


#: RFC 6750 §2.1 ``b64token``: what may follow ``Bearer `` in an Authorization header.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: RFC 6749 Appendix A: a refresh token is printable ASCII (VSCHAR).
_VSCHARS = re.compile(r"[\x20-\x7e]+")
#: RFC 6749 §3.3 ``scope-token``.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_TOKEN_HINTS = {
    "invalid_client": "check client_id and client_secret",
    "invalid_scope": "ask only for scopes this client is allowed",
    "invalid_grant": "the grant was refused",
}


def is_scope_token(value: str) -> bool:
    """Whether ``value`` is one scope name (RFC 6749 §3.3 scope-token)."""
    return _SCOPE_TOKEN.fullmatch(value) is not None


def is_client_id(value: str) -> bool:
    """Whether ``value`` may be a client_id (RFC 6749 Appendix A: printable ASCII)."""
    return _VSCHARS.fullmatch(value) is not None


def is_bearer_token(value: str) -> bool:
    """Whether ``value`` may be sent as a bearer token (RFC 6750 §2.1 token syntax)."""
    return _B64TOKEN.fullmatch(value) is not None


def parse_token_response(
    status: int,
    body: bytes,
    *,
    allow_insecure_http: bool,
    token_url: URL | None = None,
    cut_at: int | None = None,
) -> TokenGrant:
    """Read the token endpoint's answer; a failure raises :class:`AuthError`.

    ``cut_at`` is the cap the answer was cut at, when it was longer. Nothing the endpoint sent is
    quoted raw: no token value ever, other text only through :func:`server_text`.
    """
    where = (
        f"the token endpoint {_show(token_url)}" if token_url is not None else "the token endpoint"
    )
    if cut_at is not None:
        raise AuthError(
            f"{where} answered HTTP {status} with more than {cut_at} bytes; a token answer "
            "is far smaller: check token_url",
            status=status,
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if status != 200:
        raise _token_refusal(status, data, where)
    if not isinstance(data, dict):
        raise AuthError(
            f"{where} answered HTTP 200 with a body that is not a JSON object; is token_url "
            "the token endpoint?",
            status=status,
        )
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthError(f"{where}'s answer has no access_token", status=status)
    if not is_bearer_token(token):
        # Sent as is, it would break the Authorization header (a CR/LF, a space) or be
        # refused by the HTTP library with the token in its traceback (RFC 6750 §2.1).
        raise AuthError(
            f"{where} issued an access_token that is not RFC 6750 token syntax "
            f"({len(token)} characters, value not shown); refusing to send it",
            status=status,
        )
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = server_text(token_type, limit=40) if isinstance(token_type, str) else token_type
        raise AuthError(
            f"{where} issued a {shown!r} token; only Bearer is supported", status=status
        )
    uri = data.get("resource_uri")
    if not isinstance(uri, str) or not uri:
        raise AuthError(f"{where}'s answer has no resource_uri", status=status)
    try:
        root = resource_root(uri)
        check_secure_url(root, what="resource_uri", allow_insecure_http=allow_insecure_http)
    except (ConfigurationError, ValueError) as exc:
        raise AuthError(
            f"{where} returned an unusable resource_uri: {server_text(str(exc))}", status=status
        ) from None
    expires_in = data.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isascii() and expires_in.isdigit():
        expires_in = int(expires_in)
    if (
        not isinstance(expires_in, (int, float))
        or isinstance(expires_in, bool)
        or not 0 < expires_in < 10**9  # beyond ~30 years: no expiry worth planning for
    ):
        expires_in = None
    refresh = data.get("refresh_token")
    if isinstance(refresh, str) and refresh and _VSCHARS.fullmatch(refresh) is None:
        raise AuthError(
            f"{where} issued a refresh_token that is not RFC 6749 syntax (value not shown)",
            status=status,
        )
    scope = data.get("scope")
    # Absent: as asked (a first exchange) or unchanged (a refresh, RFC 6749 §5.1, §6).
    scopes = frozenset(scope.split(" ")) - {""} if isinstance(scope, str) else None
    if scopes is not None and not all(is_scope_token(s) for s in scopes):
        raise AuthError(
            f"{where} granted scopes that are not RFC 6749 scope syntax: "
            f"{server_text(str(scope), limit=80)!r}",
            status=status,
        )
    user_id = data.get("user_id")
    if isinstance(user_id, str) and user_id.isascii() and user_id.isdigit():
        user_id = int(user_id)
    return TokenGrant(
        access_token=Secret(token),
        expires_in=float(expires_in) if expires_in is not None else None,
        refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
        scopes=scopes,
        resource_uri=root,
        user_id=user_id if isinstance(user_id, int) and not isinstance(user_id, bool) else None,
    )


def _token_refusal(status: int, data: object, where: str) -> AuthError:
    error = data.get("error") if isinstance(data, dict) else None
    description = data.get("error_description") if isinstance(data, dict) else None
    error = server_text(error, limit=60) if isinstance(error, str) else None
    if status in (404, 405) and error is None:
        # No OAuth error object: this is not a token endpoint at all.
        return AuthError(
            f"{where} answered HTTP {status}: that URL looks wrong, there is no token "
            "endpoint there; check token_url",
            status=status,
        )
    text = f"token exchange failed with HTTP {status}"
    if error:
        text += f" {error}"
    if isinstance(description, str):
        text += f": {server_text(description)}"
    if error in _TOKEN_HINTS:
        text += f" ({_TOKEN_HINTS[error]})"
    elif is_outage_status(status):
        text += f" ({where} is failing or overloaded; try again later)"
    elif error is None:
        text += " (not an OAuth error answer: check token_url)"
    return AuthError(text, error=error, status=status)
