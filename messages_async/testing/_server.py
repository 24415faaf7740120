"""`MessagesServer`: a loopback emulator of the Messages API and its token endpoint.

It speaks PROTOCOL.md on its own and imports nothing from the client package, so a
misreading of the contract in one cannot hide in the other.

Two origins, on purpose: the token endpoint and the resource endpoints listen on different
ports, so a client that sends its bearer token to the wrong origin is caught by the test that
exercises it (PROTOCOL §6). Every request to either origin goes through one wrapper,
`_handle`, which records it, applies the rate limiter, the latency and any injected fault, and
only then hands it to the endpoint code, which knows nothing about faults except the few that
rewrite a listing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import math
import re
import secrets
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import parse_qsl, quote, unquote

import attrs
import orjson
import yarl
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ._dataset import (
    Cursor,
    CursorError,
    Filters,
    Store,
    decode_cursor,
    encode_cursor,
    parse_instant,
)
from ._faults import Fault, FaultHandle, FaultQueue
from ._recorder import RequestRecord, bearer_token, start_site

__all__ = ["MessagesServer"]

SCOPES: Final = ("messages_read", "messages_write")
_READ, _WRITE = SCOPES
_DEFAULT_LIMIT: Final = 20
_MAX_LIMIT: Final = 100
_MAX_TEXT: Final = 4096
_MAX_ATTACHMENTS: Final = 10
#: Bodies below this are sent as they are: compressing a 200-byte error costs more than it saves.
_COMPRESS_MIN: Final = 1024
_TOKEN_PATH: Final = "oauth/token"
_PAGE_CACHE_SIZE: Final = 2048
_REDACTED: Final = "<redacted>"

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
_ITEM_RE: Final = re.compile(r"messages/(\d+)(/edit/|/delete/)?")
_INT_RE: Final = re.compile(r"[+-]?\d+")

Json = dict[str, Any]
_Route = Literal["chats", "list", "get", "add", "edit", "delete"]


def _default_code(status: int) -> str:
    code = _ERROR_CODES.get(status)
    if code is not None:
        return code
    return "internal" if status >= 500 else "invalid_request"


def _scope_set(scopes: Iterable[str]) -> frozenset[str]:
    # A lone string is a space-separated scope list, not an iterable of one-letter scopes.
    if isinstance(scopes, str):
        return frozenset(scopes.split())
    return frozenset(scopes)


def _uint(text: str | None) -> int | None:
    """A string of ASCII digits as an int, else None."""
    if text is None or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _accepts(accept_encoding: str, coding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows ``coding`` (``q=0`` refuses it)."""
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        if name not in (coding, "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


@attrs.frozen
class _Client:
    secret: str
    scopes: frozenset[str]
    user_id: int


@attrs.frozen
class _Grant:
    """What a token (access or refresh) stands for. ``serial`` orders issue: bulk expiry
    invalidates every grant below a floor without walking the table."""

    client_id: str
    scopes: frozenset[str]
    user_id: int
    serial: int
    expires_at: float | None = None


class _Bucket:
    """A token bucket: ``rate`` requests per second, bursts of up to ``capacity``."""

    def __init__(self, rate: float, capacity: int) -> None:
        self.rate = rate
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 if the request may pass, else how many seconds until it would."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@attrs.define
class _Ctx:
    """One request, read once by the wrapper and handed to the endpoint code."""

    request: web.Request
    path: str
    params: dict[str, str]
    body: bytes
    too_large: bool
    token: str | None
    fault: Fault | None


class _Reply(Exception):
    """Raised by endpoint code to answer at once (an error, usually)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


class MessagesServer:
    """An emulator of the Messages API on loopback, with a token endpoint on a second origin.

    Use it as ``async with MessagesServer(...) as server:``, or ``await server.start()`` /
    ``await server.close()``. The data methods (``chats()``, ``post_message()``, …) work
    without HTTP and return the objects exactly as the server sends them.

    Args:
        chats: how many chats to generate (private and group).
        messages_per_chat: messages in each chat, or ``(min, max)`` for a random size per chat.
        seed: the same seed gives the same chats, ids, texts and timestamps.
        latency: seconds every resource request sleeps before it is answered.
        rate_limit: requests per second a token bucket lets through to the resource origin;
            beyond it, 429 ``rate_limited`` with ``Retry-After``. None: no limit.
        burst: the bucket's capacity (default ``max(1, int(rate_limit))``).
        retry_after_format: the rate limiter's ``Retry-After``: ``"seconds"`` or ``"http-date"``.
        cursor_mode: ``"url"``: cursors are absolute listing URLs carrying every filter;
            ``"token"``: bare opaque tokens.
        resource_path: the path of ``resource_uri``.
        token_ttl: seconds an access token lives (``expires_in``); None: until revoked, and no
            ``expires_in`` in the token response.
        extra_fields: add fields and a chat type the contract does not know.
        empty_page_every: N > 0: every Nth listing is an empty page whose cursor leads to the
            same position.
        compress: gzip (or deflate) JSON bodies of 1 KiB and more when the client accepts it.
        record: keep a `RequestRecord` of every request in ``requests``.
        max_body: request bodies over this many bytes get 413 ``too_large``.
        host: the interface both origins listen on.
        port: the resource origin's port (0: a free one).
        token_port: the token endpoint's port (0: a free one).
        user_id: the user the default client acts as.
        client_id: the default client's id.
        client_secret: the default client's secret.
    """

    def __init__(
        self,
        *,
        chats: int = 5,
        messages_per_chat: int | tuple[int, int] = 50,
        seed: int = 0,
        latency: float = 0.0,
        rate_limit: float | None = None,
        burst: int | None = None,
        retry_after_format: Literal["seconds", "http-date"] = "seconds",
        cursor_mode: Literal["url", "token"] = "url",
        resource_path: str = "/api/v1/",
        token_ttl: float | None = 3600.0,
        extra_fields: bool = False,
        empty_page_every: int = 0,
        compress: bool = True,
        record: bool = True,
        max_body: int = 64 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
        token_port: int = 0,
        user_id: int = 1001,
        client_id: str = "test-client",
        client_secret: str = "test-secret",
    ) -> None:
        if cursor_mode not in ("url", "token"):
            raise ValueError("cursor_mode must be 'url' or 'token'")
        if retry_after_format not in ("seconds", "http-date"):
            raise ValueError("retry_after_format must be 'seconds' or 'http-date'")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be > 0 or None")
        self.latency = latency
        self.rate_limit = rate_limit
        self.burst = burst if burst is not None else max(1, int(rate_limit or 1))
        self.retry_after_format = retry_after_format
        self.cursor_mode = cursor_mode
        self.resource_path = (
            "/" + resource_path.strip("/") + "/" if resource_path.strip("/") else "/"
        )
        self.token_ttl = token_ttl
        self.extra_fields = extra_fields
        self.empty_page_every = empty_page_every
        self.compress = compress
        self.record = record
        self.max_body = max_body
        self.host = host
        self._port = port
        self._token_port = token_port
        self.user_id = user_id
        self.client_id = client_id
        self.client_secret = client_secret

        self._store = Store(
            chats=chats,
            messages_per_chat=messages_per_chat,
            seed=seed,
            user_id=user_id,
            extra_fields=extra_fields,
        )
        self._clients: dict[str, _Client] = {
            client_id: _Client(client_secret, frozenset(SCOPES), user_id)
        }
        self._access: dict[str, _Grant] = {}
        self._refresh: dict[str, _Grant] = {}
        self._serial = 0
        self._access_floor = 0
        self._refresh_floor = 0
        self._bucket = _Bucket(rate_limit, self.burst) if rate_limit is not None else None
        self._faults = FaultQueue()
        self._pages_served = 0
        self._page_cache: dict[tuple[Any, ...], tuple[bytes, dict[str, str]]] = {}
        self._resource_runner: web.AppRunner | None = None
        self._token_runner: web.AppRunner | None = None
        self._url_host = host
        if host in ("0.0.0.0", "::", ""):
            # Listening on every interface: the URLs handed out still need a reachable host.
            self._url_host = "127.0.0.1"
        elif ":" in host:
            self._url_host = f"[{host}]"

        self.requests: list[RequestRecord] = []
        self.token_requests: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both origins. Idempotent."""
        if self._resource_runner is not None:
            return
        resource_app = web.Application(handler_args={"max_field_size": 16384})
        resource_app.router.add_route("*", "/{tail:.*}", self._handle_resource)
        token_app = web.Application()
        token_app.router.add_route("*", "/{tail:.*}", self._handle_token)
        self._resource_runner, self._port = await start_site(resource_app, self.host, self._port)
        try:
            self._token_runner, self._token_port = await start_site(
                token_app, self.host, self._token_port
            )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop both origins and close every connection. Idempotent."""
        runners = (self._token_runner, self._resource_runner)
        self._token_runner = self._resource_runner = None
        for runner in runners:
            if runner is not None:
                await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- addresses ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def token_port(self) -> int:
        return self._token_port

    @property
    def resource_origin(self) -> str:
        return f"http://{self._url_host}:{self._port}"

    @property
    def token_origin(self) -> str:
        return f"http://{self._url_host}:{self._token_port}"

    @property
    def resource_uri(self) -> str:
        """The ``resource_uri`` the token endpoint hands out; ends with ``/``."""
        return self.resource_origin + self.resource_path

    @property
    def token_url(self) -> str:
        return f"{self.token_origin}/{_TOKEN_PATH}"

    # -- clients and tokens -------------------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        client_secret: str,
        *,
        scopes: Iterable[str] = SCOPES,
        user_id: int | None = None,
    ) -> None:
        """Another client for the token endpoint; it is granted at most ``scopes``."""
        self._clients[client_id] = _Client(
            client_secret, _scope_set(scopes), self.user_id if user_id is None else user_id
        )

    def _new_grant(
        self, client_id: str, scopes: frozenset[str], user_id: int, ttl: float | None
    ) -> _Grant:
        self._serial += 1
        expires_at = None if ttl is None else time.monotonic() + ttl
        return _Grant(client_id, scopes, user_id, self._serial, expires_at)

    def issue_token(
        self,
        scopes: Iterable[str] = SCOPES,
        *,
        user_id: int | None = None,
        expires_in: float | None = None,
    ) -> str:
        """A pre-issued access token (no refresh token). ``expires_in`` None: ``token_ttl``."""
        token = "at_" + secrets.token_urlsafe(24)
        ttl = self.token_ttl if expires_in is None else expires_in
        self._access[token] = self._new_grant(
            self.client_id, _scope_set(scopes), self.user_id if user_id is None else user_id, ttl
        )
        return token

    def expire_tokens(self) -> None:
        """Every access token issued so far answers 401 from now on; refresh tokens still work."""
        self._access_floor = self._serial + 1
        self._access = {t: g for t, g in self._access.items() if g.serial >= self._access_floor}

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far is dead (``invalid_grant``)."""
        self._refresh_floor = self._serial + 1
        self._refresh.clear()

    @property
    def token_request_count(self) -> int:
        return len(self.token_requests)

    def _valid_access(self, token: str | None) -> _Grant | None:
        if token is None:
            return None
        grant = self._access.get(token)
        if grant is None or grant.serial < self._access_floor:
            return None
        if grant.expires_at is not None and time.monotonic() >= grant.expires_at:
            return None
        return grant

    # -- data, without HTTP -------------------------------------------------------------------

    @staticmethod
    def _copy(obj: Any) -> Any:
        # A round trip through JSON: exactly what the wire carries, and no aliasing of the store.
        return orjson.loads(orjson.dumps(obj))

    def chats(self) -> list[Json]:
        """The chat objects, as ``messages/chats/`` sends them."""
        result: list[Json] = self._copy(self._store.chats())
        return result

    def chat_ids(self) -> list[int]:
        return self._store.chat_ids()

    def messages(self, chat_id: int) -> list[Json]:
        """A chat's message objects, newest first. KeyError: unknown chat."""
        result: list[Json] = self._copy(self._store.messages(chat_id))
        return result

    def all_message_count(self) -> int:
        return self._store.message_count()

    def max_id(self) -> int:
        """The largest message id handed out so far (deleted ids are never reused)."""
        return self._store.max_id()

    def post_message(
        self,
        chat_id: int,
        text: str = "",
        *,
        uid: int | None = None,
        attachments: Sequence[Mapping[str, Any]] = (),
    ) -> Json:
        """A message from another user, as if posted now (id ``max_id() + 1``).

        Empty ``text`` and no attachments: some random text. KeyError: unknown chat.
        """
        if not self._store.has_chat(chat_id):
            raise KeyError(chat_id)
        if not text and not attachments:
            text = self._store.random_text()
        sender = self._store.other_user(chat_id) if uid is None else uid
        result: Json = self._copy(self._store.add(chat_id, sender, text, attachments))
        return result

    def add_chat(self, *, type: str = "group", name: str | None = None, members: int = 3) -> int:
        """A new, empty chat; returns its id (for ``private``, the other user's id)."""
        return self._store.add_chat(type, name=name, members=members)

    def delete_message(self, message_id: int) -> None:
        """Delete a message as if its author did. KeyError: unknown message."""
        self._store.delete(message_id)

    def edit_message(self, message_id: int, text: str) -> Json:
        """Change a message's text as if its author did; returns it. KeyError: unknown."""
        result: Json = self._copy(self._store.edit(message_id, text=text))
        return result

    # -- observation and faults ---------------------------------------------------------------

    def resource_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.origin == "resource"]

    def reset_stats(self) -> None:
        """Forget recorded requests and reset ``max_in_flight`` (to what is in flight now)."""
        self.requests = []
        self.token_requests = []
        self.max_in_flight = self.in_flight

    def inject(
        self,
        fault: Fault,
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = 1,
        after: int = 0,
        chat_id: int | None = None,
    ) -> FaultHandle:
        """Queue a fault for the requests that match.

        Args:
            fault: what goes wrong.
            method: ``"GET"``/``"POST"``; None: any.
            path: a prefix of the path relative to the resource root (``"messages/"`` matches
                every resource endpoint below it, ``"messages/add/"`` only adds);
                ``"oauth/token"`` is the token endpoint. None: any resource request, but not
                the token endpoint.
            times: how many matching requests get the fault; None: all of them.
            after: let this many matching requests through first.
            chat_id: only listings, adds and edits of that chat.
        """
        return self._faults.add(
            fault, method=method, path=path, times=times, after=after, chat_id=chat_id
        )

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- the request wrapper ------------------------------------------------------------------

    async def _handle_resource(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "resource")

    async def _handle_token(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "token")

    async def _read_body(self, request: web.Request) -> tuple[bytes, bool]:
        """The body, and whether it is over ``max_body`` (then cut at ``max_body + 1``)."""
        if not request.body_exists:
            return b"", False
        length = request.content_length
        if length is not None and length > self.max_body:
            return b"", True
        chunks: list[bytes] = []
        total = 0
        while chunk := await request.content.read(65536):
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_body:
                return b"".join(chunks)[: self.max_body + 1], True
        return b"".join(chunks), False

    def _relative(self, path: str, origin: str) -> str:
        if origin == "token":
            return path.lstrip("/")
        if path.startswith(self.resource_path):
            return path[len(self.resource_path) :]
        return path

    def _chat_for_fault(self, path: str, params: Mapping[str, str], body: bytes) -> int | None:
        if path == "messages/":
            chat = _uint(params.get("chat_id"))
            if chat is None and "cursor" in params:
                # A whole cursor URL passed as the cursor value carries the chat inside it.
                with_url = params["cursor"]
                if "://" in with_url or with_url.startswith("/"):
                    chat = _uint(yarl.URL(with_url).query.get("chat_id"))
            return chat
        if path == "messages/add/" or path.endswith("/edit/"):
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                return None
            if isinstance(obj, dict):
                chat = obj.get("chat_id")
                if isinstance(chat, int) and not isinstance(chat, bool):
                    return chat
        return None

    def _token_form_record(self, body: bytes) -> dict[str, str]:
        try:
            form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            return {}
        for secret in ("client_secret", "refresh_token"):
            if secret in form:
                form[secret] = _REDACTED
        return form

    async def _handle(self, request: web.Request, origin: str) -> web.StreamResponse:
        started = time.monotonic()
        path = self._relative(request.path, origin)
        params = dict(request.query.items())
        body, too_large = await self._read_body(request)
        token = bearer_token(request.headers)
        resource = origin == "resource"
        record: RequestRecord | None = None
        records = self.requests
        index = len(records)
        if self.record:
            record = RequestRecord(
                origin=origin,
                method=request.method,
                path=path,
                query=params,
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                body=body,
                started=started,
                token=token,
            )
            records.append(record)
        if origin == "token" and path == _TOKEN_PATH:
            self.token_requests.append(self._token_form_record(body))
        if resource:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        status: int | None = None
        fault: Fault | None = None
        try:
            response: web.StreamResponse | None
            wait = self._bucket.take() if resource and self._bucket is not None else 0.0
            if wait > 0:
                response = self._rate_limited(request, wait)
            else:
                fault = self._faults.match(
                    request.method,
                    path,
                    chat_of=lambda: self._chat_for_fault(path, params, body),
                    listing=resource and request.method == "GET" and path == "messages/",
                )
                if resource and self.latency > 0:
                    await asyncio.sleep(self.latency)
                if fault is not None and fault.kind == "delay":
                    await asyncio.sleep(fault.seconds)
                if fault is not None and fault.before_handling:
                    response = await self._act_out(request, fault, origin, path)
                else:
                    ctx = _Ctx(request, path, params, body, too_large, token, fault)
                    try:
                        response = self._resource(ctx) if resource else self._token_endpoint(ctx)
                    except _Reply as reply:
                        response = reply.response
                    if fault is not None and fault.kind == "drop_after_commit":
                        response = None
            if response is None:
                # Close without a word. aiohttp then fails to write the placeholder below and
                # treats it as a client that went away, which it logs at debug level only.
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)
            status = response.status
            return response
        finally:
            if resource:
                self.in_flight -= 1
            if record is not None:
                records[index] = attrs.evolve(
                    record,
                    finished=time.monotonic(),
                    status=status,
                    fault=fault.kind if fault is not None else None,
                )

    # -- responses ----------------------------------------------------------------------------

    def _encoding(self, request: web.Request) -> str | None:
        """The content coding to answer with: gzip, deflate or none."""
        if not self.compress:
            return None
        accept = request.headers.get("Accept-Encoding", "")
        if _accepts(accept, "gzip"):
            return "gzip"
        if _accepts(accept, "deflate"):
            return "deflate"
        return None

    def _encode(self, body: bytes, encoding: str | None) -> tuple[bytes, dict[str, str]]:
        """The body compressed as asked, and the headers that say so."""
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if encoding is not None and len(body) >= _COMPRESS_MIN:
            # Level 1: the emulator must stay cheap next to the client it is measuring.
            if encoding == "gzip":
                body = zlib.compress(body, 1, wbits=31)
            else:
                body = zlib.compress(body, 1)
            headers["Content-Encoding"] = encoding
            headers["Vary"] = "Accept-Encoding"
        return body, headers

    def _bytes(
        self,
        request: web.Request,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        body, hdrs = self._encode(body, self._encoding(request))
        if headers:
            hdrs.update(headers)
        return web.Response(status=status, body=body, headers=hdrs)

    def _json(
        self,
        request: web.Request,
        status: int,
        obj: Any,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        return self._bytes(request, status, orjson.dumps(obj), headers)

    def _error(
        self,
        request: web.Request,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        body = {"error": {"code": code, "message": message}}
        return _Reply(self._json(request, status, body, headers))

    def _oauth_error(
        self,
        request: web.Request,
        status: int,
        error: str,
        description: str,
        headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        body = {"error": error, "error_description": description}
        hdrs = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        hdrs.update(headers or {})
        return _Reply(self._json(request, status, body, hdrs))

    def _retry_after(self, wait: float) -> str:
        if self.retry_after_format == "http-date":
            return email.utils.formatdate(math.ceil(time.time() + max(1.0, wait)), usegmt=True)
        return str(max(1, math.ceil(wait)))

    def _rate_limited(self, request: web.Request, wait: float) -> web.StreamResponse:
        return self._error(
            request,
            429,
            "rate_limited",
            f"rate limit of {self.rate_limit} requests/s exceeded",
            {"Retry-After": self._retry_after(wait)},
        ).response

    # -- faults -------------------------------------------------------------------------------

    async def _act_out(
        self, request: web.Request, fault: Fault, origin: str, path: str
    ) -> web.StreamResponse | None:
        kind = fault.kind
        if kind == "drop":
            return None
        if kind == "malformed":
            return web.Response(
                status=200,
                body=fault.body or b"",
                headers={"Content-Type": fault.content_type or "application/json"},
            )
        if kind == "wrong_shape":
            return self._json(request, 200, self._wrong_shape(request.method, path, origin))
        if kind == "redirect":
            return web.Response(
                status=fault.http_status or 302,
                headers={"Location": fault.location or "/"},
            )
        if kind == "oversized":
            return await self._oversized(request, fault)
        if kind == "expire_token":
            self.expire_tokens()
        return self._fault_status(request, fault, origin)

    def _fault_status(self, request: web.Request, fault: Fault, origin: str) -> web.Response:
        status = fault.http_status or 500
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = fault.retry_after
        if origin == "token":
            code = fault.code or {400: "invalid_request", 401: "invalid_client"}.get(
                status, _default_code(status)
            )
            obj: Json = {"error": code, "error_description": fault.message or f"injected {status}"}
        else:
            code = fault.code or _default_code(status)
            if code == "invalid_token":
                headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            obj = {"error": {"code": code, "message": fault.message or f"injected {status}"}}
        headers.update(fault.headers)
        if fault.body is not None:
            headers.setdefault("Content-Type", fault.content_type or "application/json")
            return web.Response(status=status, body=fault.body, headers=headers)
        return self._json(request, status, obj, headers)

    @staticmethod
    def _wrong_shape(method: str, path: str, origin: str) -> Json:
        if origin == "token":
            return {"access_token": 42, "token_type": 7, "expires_in": "soon"}
        if path == "messages/" and method == "GET":
            return {"items": "nope", "limit": "x", "next_cursor": 5, "total_count": None}
        if path == "messages/chats/":
            return {"items": {"chat_id": "abc", "type": 7}}
        return {"id": "abc", "uid": None, "message": 5, "attachments": "none"}

    async def _oversized(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        head = b'{"items": ['
        tail = b'], "limit": 20, "next_cursor": "", "prev_cursor": "", "total_count": 0}'
        filler = max(0, fault.size - len(head) - len(tail))
        chunk = b" " * 65536
        response = web.StreamResponse(status=200)
        response.content_type = "application/json"
        if fault.gzip:
            # A gzip bomb: the body is small on the wire and inflates to `size` bytes.
            enc = zlib.compressobj(9, zlib.DEFLATED, 31)
            parts = [enc.compress(head)]
            parts.extend(enc.compress(chunk) for _ in range(filler // len(chunk)))
            parts.append(enc.compress(b" " * (filler % len(chunk)) + tail))
            parts.append(enc.flush())
            payload = b"".join(parts)
            response.headers["Content-Encoding"] = "gzip"
            if fault.declare_length:
                response.content_length = len(payload)
            else:
                response.enable_chunked_encoding()
            try:
                await response.prepare(request)
                await response.write(payload)
            except ConnectionError:
                pass
            return response
        if fault.declare_length:
            response.content_length = len(head) + filler + len(tail)
        else:
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await response.write(head)
            left = filler
            while left > 0:
                piece = chunk if left >= len(chunk) else chunk[:left]
                await response.write(piece)
                left -= len(piece)
            await response.write(tail)
        except ConnectionError:
            # The client stopped reading at its cap and closed: exactly what is being tested.
            pass
        return response

    # -- token endpoint -----------------------------------------------------------------------

    def _token_endpoint(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        if ctx.path != _TOKEN_PATH:
            raise self._error(request, 404, "not_found", "no such endpoint")
        if request.method != "POST":
            raise self._oauth_error(request, 405, "invalid_request", "use POST", {"Allow": "POST"})
        if ctx.too_large:
            raise self._oauth_error(request, 413, "invalid_request", "request body too large")
        if request.content_type != "application/x-www-form-urlencoded":
            raise self._oauth_error(
                request,
                400,
                "invalid_request",
                "the body must be application/x-www-form-urlencoded",
            )
        try:
            pairs = parse_qsl(
                ctx.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
            )
        except UnicodeDecodeError:
            raise self._oauth_error(request, 400, "invalid_request", "body is not UTF-8") from None
        form: dict[str, str] = {}
        for key, value in pairs:
            if key in form:
                # RFC 6749 §3.2: parameters must not be included more than once.
                raise self._oauth_error(
                    request, 400, "invalid_request", f"repeated parameter {key}"
                )
            form[key] = value

        client_id, client = self._authenticate_client(request, form)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise self._oauth_error(request, 400, "invalid_request", "grant_type is required")
        if grant_type == "client_credentials":
            scope = form.get("scope")
            requested = frozenset(scope.split()) if scope else client.scopes
            unknown = requested - frozenset(SCOPES)
            if unknown:
                raise self._oauth_error(
                    request, 400, "invalid_scope", f"unknown scope {' '.join(sorted(unknown))}"
                )
            granted = requested & client.scopes
            if not granted:
                raise self._oauth_error(
                    request, 400, "invalid_scope", "none of the requested scopes is allowed"
                )
            user_id = client.user_id
        elif grant_type == "refresh_token":
            refresh = form.get("refresh_token")
            if not refresh:
                raise self._oauth_error(
                    request, 400, "invalid_request", "refresh_token is required"
                )
            old = self._refresh.get(refresh)
            if old is None or old.serial < self._refresh_floor or old.client_id != client_id:
                raise self._oauth_error(
                    request, 400, "invalid_grant", "refresh token is invalid, expired or revoked"
                )
            granted = old.scopes
            scope = form.get("scope")
            if scope:
                narrowed = frozenset(scope.split())
                if not narrowed <= old.scopes:
                    raise self._oauth_error(
                        request, 400, "invalid_scope", "scope exceeds the original grant"
                    )
                granted = narrowed
            # Rotation: the refresh token just used dies with this answer.
            del self._refresh[refresh]
            user_id = old.user_id
        else:
            raise self._oauth_error(
                request,
                400,
                "unsupported_grant_type",
                f"grant_type {grant_type!r} is not supported",
            )

        access = "at_" + secrets.token_urlsafe(24)
        refresh_token = "rt_" + secrets.token_urlsafe(24)
        self._access[access] = self._new_grant(client_id, granted, user_id, self.token_ttl)
        self._refresh[refresh_token] = self._new_grant(client_id, granted, user_id, None)
        body: Json = {"access_token": access, "token_type": "Bearer"}
        if self.token_ttl is not None:
            ttl = self.token_ttl
            body["expires_in"] = int(ttl) if float(ttl).is_integer() else ttl
        body["refresh_token"] = refresh_token
        body["scope"] = " ".join(s for s in SCOPES if s in granted)
        body["resource_uri"] = self.resource_uri
        body["user_id"] = user_id
        return self._json(request, 200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate_client(
        self, request: web.Request, form: Mapping[str, str]
    ) -> tuple[str, _Client]:
        """RFC 6749 §2.3.1: HTTP Basic, or ``client_id``/``client_secret`` in the form."""
        basic: tuple[str, str] | None = None
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        if header and scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise self._oauth_error(
                    request, 400, "invalid_request", "malformed Basic credentials"
                ) from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise self._oauth_error(
                    request, 400, "invalid_request", "malformed Basic credentials"
                )
            # The id and secret are form-encoded before going into the Basic header.
            basic = (unquote(user.replace("+", " ")), unquote(password.replace("+", " ")))
        if basic is not None:
            if "client_secret" in form:
                raise self._oauth_error(
                    request, 400, "invalid_request", "more than one client authentication method"
                )
            if "client_id" in form and form["client_id"] != basic[0]:
                raise self._oauth_error(
                    request, 400, "invalid_request", "client_id does not match Basic credentials"
                )
            client_id, secret = basic
        else:
            client_id = form.get("client_id", "")
            secret = form.get("client_secret", "")
        client = self._clients.get(client_id)
        if (
            not client_id
            or client is None
            or not secrets.compare_digest(client.secret.encode(), secret.encode())
        ):
            challenge = {"WWW-Authenticate": 'Basic realm="token"'} if basic is not None else None
            raise self._oauth_error(
                request, 401, "invalid_client", "client authentication failed", challenge
            )
        return client_id, client

    # -- resource endpoints -------------------------------------------------------------------

    def _route(self, request: web.Request, path: str) -> tuple[_Route, str, int | None]:
        """(route, required method, message id) or a 404/405 reply."""
        if not request.path.startswith(self.resource_path):
            raise self._error(request, 404, "not_found", "no such endpoint")
        route: _Route
        method = "GET"
        message_id: int | None = None
        if path == "messages/":
            route = "list"
        elif path == "messages/chats/":
            route = "chats"
        elif path == "messages/add/":
            route, method = "add", "POST"
        else:
            match = _ITEM_RE.fullmatch(path)
            if match is None:
                raise self._error(request, 404, "not_found", "no such endpoint")
            message_id = int(match.group(1))
            suffix = match.group(2)
            if suffix is None:
                route = "get"
            elif suffix == "/edit/":
                route, method = "edit", "POST"
            else:
                route, method = "delete", "POST"
        if request.method != method:
            raise self._error(
                request,
                405,
                "method_not_allowed",
                f"{request.method} is not allowed here, use {method}",
                {"Allow": method},
            )
        return route, method, message_id

    def _resource(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        route, method, message_id = self._route(request, ctx.path)
        if ctx.too_large:
            reply = self._error(
                request, 413, "too_large", f"request body over {self.max_body} bytes"
            )
            reply.response.force_close()
            raise reply
        grant = self._valid_access(ctx.token)
        if grant is None:
            raise self._error(
                request,
                401,
                "invalid_token",
                "missing, expired or revoked access token",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        needed = _READ if method == "GET" else _WRITE
        if needed not in grant.scopes:
            raise self._error(
                request,
                403,
                "insufficient_scope",
                f"this endpoint needs the {needed} scope",
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'},
            )
        if route == "list":
            return self._list(ctx)
        if route == "chats":
            return self._json(request, 200, {"items": self._store.chats()})
        assert message_id is not None or route == "add"
        if route == "get":
            return self._json(request, 200, self._existing(request, message_id))
        if route == "add":
            return self._add(ctx, grant)
        if route == "edit":
            return self._edit(ctx, grant, message_id)
        return self._delete(ctx, grant, message_id)

    def _existing(self, request: web.Request, message_id: int | None) -> Json:
        msg = self._store.message(message_id) if message_id is not None else None
        if msg is None:
            raise self._error(request, 404, "not_found", f"message {message_id} not found")
        return msg

    # -- listing ------------------------------------------------------------------------------

    def _bad(self, request: web.Request, message: str) -> _Reply:
        return self._error(request, 400, "invalid_request", message)

    def _bad_cursor(self, request: web.Request, message: str) -> _Reply:
        return self._error(request, 400, "invalid_cursor", message)

    def _list(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        params = dict(ctx.params)
        raw_cursor = params.get("cursor", "")
        token = raw_cursor
        whole_url = bool(raw_cursor) and ("://" in raw_cursor or raw_cursor.startswith("/"))
        if whole_url:
            # PROTOCOL §3: a server also accepts the whole cursor URL as the cursor value.
            try:
                inner_url = yarl.URL(raw_cursor)
            except ValueError:
                raise self._bad_cursor(request, "cursor URL is malformed") from None
            if inner_url.path != self.resource_path + "messages/":
                raise self._bad_cursor(request, "cursor URL is not a listing of this API")
            inner = dict(inner_url.query.items())
            token = inner.get("cursor", "")
            if not token:
                raise self._bad_cursor(request, "cursor URL carries no cursor")
            for key in ("chat_id", "limit", "query", "period[from]", "period[till]"):
                if key not in params and key in inner:
                    params[key] = inner[key]

        chat_raw = params.get("chat_id")
        if chat_raw is None:
            raise self._bad(request, "chat_id is required")
        chat_id = _uint(chat_raw)
        if chat_id is None:
            raise self._bad(request, "chat_id must be an unsigned integer")
        limit = _DEFAULT_LIMIT
        limit_raw = params.get("limit")
        if limit_raw is not None:
            if not _INT_RE.fullmatch(limit_raw):
                raise self._bad(request, "limit must be an integer")
            limit = int(limit_raw)
            if limit < 1:
                raise self._bad(request, "limit must be at least 1")
            limit = min(limit, _MAX_LIMIT)
        filters = self._filters(request, params)
        if not self._store.has_chat(chat_id):
            raise self._error(request, 404, "not_found", f"chat {chat_id} not found")

        cursor: Cursor | None = None
        if token:
            try:
                cursor = decode_cursor(token, self._store.cursor_key)
            except CursorError as exc:
                raise self._bad_cursor(request, str(exc)) from None
            if cursor.chat_id != chat_id:
                raise self._bad_cursor(request, "cursor belongs to another chat")
            if cursor.filters != filters:
                raise self._bad_cursor(
                    request, "cursor was issued for other filters; send the same query and period"
                )

        fault = ctx.fault.kind if ctx.fault is not None else None
        direction = cursor.direction if cursor is not None else "next"
        boundary = cursor.boundary if cursor is not None else None
        self._pages_served += 1
        every = self.empty_page_every
        empty = (every > 0 and self._pages_served % every == 0) or fault == "empty_page"
        # Plain pages (no filter, no fault) are cached encoded and compressed, keyed on the
        # chat's version: a benchmark that walks the data again costs the server a dict lookup.
        # The cursors inside a cached page keep their nonce; they stand for the same positions.
        cache_key: tuple[Any, ...] | None = None
        if not (
            fault or empty or filters.active or self.extra_fields or (cursor and cursor.repeat)
        ):
            encoding = self._encoding(request)
            version = self._store.version(chat_id)
            cache_key = (chat_id, version, direction, boundary, limit, encoding)
            hit = self._page_cache.get(cache_key)
            if hit is not None:
                return web.Response(status=200, body=hit[0], headers=hit[1])
        page = self._store.page(
            chat_id,
            filters,
            direction,
            boundary,
            limit,
            empty=empty,
            backwards=fault == "backwards_page",
        )

        next_cursor = ""
        if page.older is not None:
            next_cursor = self._cursor(Cursor(chat_id, "next", page.older, filters), params, limit)
        prev_cursor = ""
        if page.newer is not None:
            prev_cursor = self._cursor(Cursor(chat_id, "prev", page.newer, filters), params, limit)

        if (cursor is not None and cursor.repeat) or (fault == "repeat_cursor" and token):
            # Hand back the cursor exactly as this request came with it: a cycle.
            if whole_url:
                next_cursor = raw_cursor
            elif self.cursor_mode == "url":
                next_cursor = self.resource_origin + request.raw_path
            else:
                next_cursor = token
        elif fault == "repeat_cursor":
            # A first page: a cursor that, once followed, keeps pointing at itself.
            at = page.older
            next_cursor = self._cursor(
                Cursor(chat_id, "next", at, filters, repeat=True), params, limit
            )
        elif fault == "foreign_cursor":
            at = page.older if page.older is not None else boundary
            position = Cursor(chat_id, "next", at, filters)
            next_cursor = self._cursor(
                position, params, limit, origin=ctx.fault.origin if ctx.fault else None
            )

        body: Json = {
            "items": page.items,
            "limit": limit,
            "next_cursor": next_cursor,
            "prev_cursor": prev_cursor,
            "total_count": page.total,
        }
        if self.extra_fields:
            body["has_more"] = bool(next_cursor)
            body["x_meta"] = {"served": self._pages_served}
        if cache_key is None:
            return self._json(request, 200, body)
        encoded, headers = self._encode(orjson.dumps(body), cache_key[-1])
        if len(self._page_cache) >= _PAGE_CACHE_SIZE:
            del self._page_cache[next(iter(self._page_cache))]
        self._page_cache[cache_key] = (encoded, headers)
        return web.Response(status=200, body=encoded, headers=headers)

    def _filters(self, request: web.Request, params: Mapping[str, str]) -> Filters:
        since = till = None
        for key in ("period[from]", "period[till]"):
            text = params.get(key)
            if text is None or text == "":
                continue
            try:
                value = parse_instant(text)
            except ValueError:
                raise self._bad(request, f"{key} is not an ISO 8601 instant: {text!r}") from None
            if key == "period[from]":
                since = value
            else:
                till = value
        if since is not None and till is not None and since > till:
            raise self._bad(request, "period[from] is after period[till]")
        return Filters(query=params.get("query") or None, since=since, till=till)

    def _cursor(
        self,
        position: Cursor,
        params: Mapping[str, str],
        limit: int,
        *,
        origin: str | None = None,
    ) -> str:
        """A cursor for ``position``: a bare token, or an absolute URL carrying every filter."""
        token = encode_cursor(position, self._store.cursor_key)
        if self.cursor_mode == "token" and origin is None:
            return token
        base = (origin + self.resource_path) if origin is not None else self.resource_uri
        parts = [f"chat_id={position.chat_id}", f"limit={limit}", f"cursor={token}"]
        for key in ("query", "period[from]", "period[till]"):
            value = params.get(key)
            if value:
                parts.append(f"{key}={quote(value, safe='')}")
        return f"{base}messages/?{'&'.join(parts)}"

    # -- writes -------------------------------------------------------------------------------

    def _json_body(self, ctx: _Ctx) -> Json:
        request = ctx.request
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise self._bad(request, "the body must be application/json")
        try:
            obj = orjson.loads(ctx.body)
        except orjson.JSONDecodeError:
            raise self._bad(request, "the body is not valid JSON") from None
        if not isinstance(obj, dict):
            raise self._bad(request, "the body must be a JSON object")
        return obj

    def _chat_id_field(self, request: web.Request, obj: Json) -> int:
        chat_id = obj.get("chat_id")
        if chat_id is None:
            raise self._bad(request, "chat_id is required")
        if not isinstance(chat_id, int) or isinstance(chat_id, bool) or chat_id < 0:
            raise self._bad(request, "chat_id must be an unsigned integer")
        return chat_id

    def _content_fields(
        self, request: web.Request, obj: Json
    ) -> tuple[str | None, list[Json] | None]:
        text = obj.get("message")
        if text is not None and not isinstance(text, str):
            raise self._bad(request, "message must be a string")
        if text is not None and len(text) > _MAX_TEXT:
            raise self._bad(request, f"message is over {_MAX_TEXT} characters")
        raw = obj.get("attachments")
        attachments: list[Json] | None = None
        if raw is not None:
            if not isinstance(raw, list):
                raise self._bad(request, "attachments must be a list")
            if len(raw) > _MAX_ATTACHMENTS:
                raise self._bad(request, f"more than {_MAX_ATTACHMENTS} attachments")
            attachments = []
            for i, item in enumerate(raw):
                if not isinstance(item, dict):
                    raise self._bad(request, f"attachments[{i}] must be an object")
                kind, url, name = item.get("type"), item.get("url"), item.get("name")
                if not isinstance(kind, str) or not kind:
                    raise self._bad(request, f"attachments[{i}].type must be a non-empty string")
                if not isinstance(url, str) or not url:
                    raise self._bad(request, f"attachments[{i}].url must be a non-empty string")
                if name is not None and not isinstance(name, str):
                    raise self._bad(request, f"attachments[{i}].name must be a string")
                attachments.append({"type": kind, "url": url, "name": name})
        return text, attachments

    def _add(self, ctx: _Ctx, grant: _Grant) -> web.StreamResponse:
        request = ctx.request
        obj = self._json_body(ctx)
        chat_id = self._chat_id_field(request, obj)
        text, attachments = self._content_fields(request, obj)
        whisper = obj.get("is_whisper")
        if whisper is not None and not isinstance(whisper, bool):
            raise self._bad(request, "is_whisper must be a boolean")
        if not text and not attachments:
            raise self._bad(request, "a message needs text or at least one attachment")
        if not self._store.has_chat(chat_id):
            raise self._error(request, 404, "not_found", f"chat {chat_id} not found")
        msg = self._store.add(chat_id, grant.user_id, text or "", attachments or ())
        return self._json(request, 200, msg)

    def _edit(self, ctx: _Ctx, grant: _Grant, message_id: int | None) -> web.StreamResponse:
        request = ctx.request
        obj = self._json_body(ctx)
        chat_id = self._chat_id_field(request, obj)
        text, attachments = self._content_fields(request, obj)
        if "message" not in obj and "attachments" not in obj:
            raise self._bad(request, "an edit needs message or attachments")
        msg = self._existing(request, message_id)
        assert message_id is not None
        if self._store.chat_of(message_id) != chat_id:
            raise self._bad(request, f"message {message_id} is not in chat {chat_id}")
        if msg["uid"] != grant.user_id:
            raise self._error(request, 403, "forbidden", "you can only edit your own messages")
        final_text = msg["message"] if text is None else text
        final_attachments = msg["attachments"] if attachments is None else attachments
        if not final_text and not final_attachments:
            raise self._bad(request, "a message needs text or at least one attachment")
        edited = self._store.edit(message_id, text=text, attachments=attachments)
        return self._json(request, 200, edited)

    def _delete(self, ctx: _Ctx, grant: _Grant, message_id: int | None) -> web.StreamResponse:
        request = ctx.request
        msg = self._existing(request, message_id)
        assert message_id is not None
        if msg["uid"] != grant.user_id:
            raise self._error(request, 403, "forbidden", "you can only delete your own messages")
        self._store.delete(message_id)
        return web.Response(status=204)
