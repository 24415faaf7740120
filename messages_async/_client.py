"""The client and its ``messages`` resource: the public face of the request path.

Each method checks its arguments and builds its request with pure functions from ``_wire.py``
(so a bad argument raises before anything is sent), hands the request to the transport, and
decodes the answer with pure functions again. Walks and fan-outs reuse exactly this path.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import functools
import os
import random
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Literal, Self, overload

import aiohttp
import attrs
from yarl import URL

from ._checks import count, flag, per_second, seconds
from ._download import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
    Downloaded,
    Downloader,
    DownloadError,
    PartialFile,
    StreamSink,
)
from ._errors import ClientClosedError, ConfigurationError
from ._fanout import OnError, fan_out
from ._hooks import EventHooks, Hook
from ._limiter import ClientStats, Limiter, Priority
from ._models import Attachment, Chat, ChatFailed, Message, MessagesPage, NewAttachment, Period
from ._observe import Observer
from ._pagination import Direction, walk_messages, walk_pages
from ._retry import RetryBudget, RetryPolicy
from ._secret import Secret
from ._session import Credentials, SessionManager
from ._transport import Transport
from ._watch import Watch
from ._window_plan import Window
from ._windows import WindowPage, plan_windows, walk_windows
from ._wire import (
    READ,
    WRITE,
    ApiRequest,
    ListQuery,
    build_add,
    build_chats,
    build_delete,
    build_edit,
    build_get,
    build_list,
    check_chat_id,
    check_cursor_chat,
    check_secure_url,
    cursor_request,
    is_bearer_token,
    is_client_id,
    is_scope_token,
    parse_chats,
    parse_message,
    parse_page,
    resource_root,
)

if TYPE_CHECKING:
    from ._telemetry import OtelWalk

__all__ = ["Client", "Messages"]

__version__ = "0.1.0"

DEFAULT_SCOPES = (READ, WRITE)


class _NotGiven(enum.Enum):
    # A sentinel, because None is meaningful for some arguments (no filter, no expiry).
    NOT_GIVEN = "NOT_GIVEN"


NOT_GIVEN = _NotGiven.NOT_GIVEN


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class _Lifecycle:
    """Whether a client is open; shared with its ``with_options`` views."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = _State.UNOPENED


def _secret_or_none(name: str, value: object) -> Secret | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str")
    return Secret(value)


def _scopes(value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(
            "scopes must be a collection of scope names, e.g. ('messages_read',), not a str"
        )
    scopes = frozenset(value)
    if not scopes or not all(isinstance(s, str) and is_scope_token(s) for s in scopes):
        raise ValueError(
            "scopes must be scope names of printable ASCII without spaces, quotes or "
            f"backslashes (RFC 6749 §3.3), got {value!r}"
        )
    return scopes


class Client:
    """An asyncio client for the Messages API.

    Use it as an async context manager; one client shares its HTTP connections, its token and
    its rate-limit state among every call made through it, so make one and reuse it::

        async with Client(token_url=..., client_id=..., client_secret=...) as client:
            chats = await client.messages.chats()

    Args:
        token_url: The token endpoint (client-credentials exchange).
        client_id: The client's id at the token endpoint.
        client_secret: The client's secret. Never logged, never in a repr or an error.
        scopes: The scopes to ask for (default: read and write). With ``access_token``, the
            scopes that token is known to carry; leave out when unknown.
        access_token: A pre-issued bearer token, instead of the three credentials above.
        resource_uri: The API's base URI, required with ``access_token`` (the exchange
            provides it otherwise).
        session: A caller-owned ``aiohttp.ClientSession`` to use; the client never closes it.
        timeout: Seconds allowed for each attempt of a request, from connecting to the last
            byte of the answer; connecting gets at most 10 s of it.
        deadline: Seconds each request may take in all: every attempt, wait and token renewal
            (``None``: no limit beyond the attempts' own timeouts). For a walk it applies to
            each page; bound a whole walk with ``asyncio.timeout()``. A wait that would leave
            less than a tenth of it is not begun: the error that caused it is raised instead.
        max_retries: Retries after the first attempt (0 disables retrying). aiohttp itself
            may send a GET again, once, when a kept-alive connection turns out to be closed;
            that is not counted here (docs/protocol.md §7).
        max_concurrency: Most requests this client has in flight at once (the adaptive bound
            starts here and never exceeds it).
        rate_limit: Requests per second this client never exceeds, for a server whose limit
            you know (its documentation, or your share of a quota): the client is paced at it
            from its first request instead of finding the rate with its first 429s, and a
            429 still slows it further. ``None`` (the default): the rate is found.
        backoff_base: First backoff step in seconds; doubles per retry, with full jitter.
        backoff_max: Longest backoff step in seconds.
        max_retry_after: Longest ``Retry-After`` waited out; a longer one raises at once with
            ``retry_after`` set, so the caller decides.
        max_response_bytes: Largest answer read (after decompression) before giving up.
        retry_budget: Retries of failures (5xx, connection errors, timeouts) the client may
            spend in a burst across all its calls; each success earns back a tenth of one.
            Stops a failing server from being hit ``max_retries + 1`` times harder.
        max_unreachable: Seconds a request (or a token exchange) keeps retrying a server it
            cannot connect to (refused, unresolvable, no route) before raising; ``None``:
            only ``max_retries`` bounds it.
        allow_insecure_http: Allow plain ``http://`` to non-loopback hosts.
        event_hooks: Functions called around each attempt of a request, in the style of
            httpx: ``{"request": [...], "response": [...], "error": [...]}``, given a
            :class:`RequestView`, a :class:`ResponseView` or an :class:`ErrorView` (never the
            token, a header sent or the query string). Plain or ``async`` functions; one that
            raises is logged and the request goes on.
    """

    def __init__(
        self,
        *,
        token_url: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        scopes: Iterable[str] | _NotGiven = NOT_GIVEN,
        access_token: str | None = None,
        resource_uri: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
        deadline: float | None = None,
        max_retries: int = 3,
        max_concurrency: int = 32,
        rate_limit: float | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 60.0,
        max_response_bytes: int = 32 * 1024 * 1024,
        retry_budget: int = 50,
        max_unreachable: float | None = 20.0,
        allow_insecure_http: bool = False,
        event_hooks: Mapping[str, Iterable[Hook]] | None = None,
    ) -> None:
        self._life = _Lifecycle()
        self._is_view = False
        self._client_id = client_id if isinstance(client_id, str) else None
        # The secrets are wrapped first and the plain strings dropped from this frame, so a
        # traceback that shows locals (a configuration error raised below) cannot show them.
        secret = _secret_or_none("client_secret", client_secret)
        token = _secret_or_none("access_token", access_token)
        del client_secret, access_token
        if token is not None and not is_bearer_token(token.reveal()):
            raise ConfigurationError(
                "access_token is not RFC 6750 token syntax (letters, digits and -._~+/ then "
                "'=' padding); it would break the Authorization header. Value not shown."
            )
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise TypeError("session must be an aiohttp.ClientSession")
        given = {"token_url": token_url, "client_id": client_id, "client_secret": secret}
        credentials: Credentials | None = None
        root: URL | None = None
        granted: frozenset[str] | None = None
        if token is not None:
            if any(v is not None for v in given.values()):
                raise ConfigurationError(
                    "give either access_token (with resource_uri) or token_url, client_id and "
                    "client_secret, not both"
                )
            if resource_uri is None:
                raise ConfigurationError("access_token needs resource_uri: where to send it")
            root = self._checked_url(resource_uri, "resource_uri", allow_insecure_http)
            root = resource_root(root)
            if scopes is not NOT_GIVEN:
                granted = _scopes(scopes)
        else:
            missing = [name for name, value in given.items() if value is None]
            if missing:
                raise ConfigurationError(
                    f"missing {', '.join(missing)}: give token_url, client_id and client_secret "
                    "(or access_token and resource_uri)"
                )
            if resource_uri is not None:
                raise ConfigurationError(
                    "resource_uri comes from the token exchange; give it only with access_token"
                )
            if not isinstance(client_id, str) or not client_id:
                raise TypeError("client_id must be a non-empty str")
            if not is_client_id(client_id):
                raise ConfigurationError(
                    f"client_id must be printable ASCII (RFC 6749), got {client_id!r}"
                )
            assert secret is not None  # not missing, checked above
            url = self._checked_url(token_url, "token_url", allow_insecure_http)
            requested = _scopes(DEFAULT_SCOPES if scopes is NOT_GIVEN else scopes)
            credentials = Credentials(url, client_id, secret, requested)
        max_concurrency = count("max_concurrency", max_concurrency, minimum=1)
        hooks = None if event_hooks is None else EventHooks(event_hooks)
        self._policy = RetryPolicy(
            max_retries=count("max_retries", max_retries, minimum=0),
            timeout=seconds("timeout", timeout),
            backoff_base=seconds("backoff_base", backoff_base, allow_zero=True, finite=True),
            backoff_max=seconds("backoff_max", backoff_max, allow_zero=True, finite=True),
            max_retry_after=seconds("max_retry_after", max_retry_after, allow_zero=True),
            deadline=None if deadline is None else seconds("deadline", deadline),
            max_unreachable=(
                None
                if max_unreachable is None
                else seconds("max_unreachable", max_unreachable, allow_zero=True)
            ),
        )
        response_cap = count("max_response_bytes", max_response_bytes, minimum=1)
        rng = random.Random()
        self._limiter = Limiter(
            max_concurrency,
            max_rate=None if rate_limit is None else per_second("rate_limit", rate_limit),
        )
        self._observer = Observer(hooks, self._limiter)
        self._sessions = SessionManager(
            credentials=credentials,
            access_token=token,
            resource_root=root,
            granted=granted,
            session=session,
            connection_limit=max(100, max_concurrency),
            policy=self._policy,
            max_response_bytes=response_cap,
            allow_insecure_http=bool(allow_insecure_http),
            user_agent=f"messages-async/{__version__}",
            rng=rng,
            observer=self._observer,
        )
        self._transport = Transport(
            self._sessions,
            self._limiter,
            max_response_bytes=response_cap,
            retry_budget=RetryBudget(count("retry_budget", retry_budget, minimum=0)),
            rng=rng,
            observer=self._observer,
        )
        self._downloads = Downloader(
            resource_root=self._known_root,
            token=self._bearer,
            allow_insecure_http=bool(allow_insecure_http),
            user_agent=f"messages-async/{__version__}",
            max_retries=self._policy.max_retries,
            backoff_base=self._policy.backoff_base,
            backoff_max=self._policy.backoff_max,
            max_retry_after=self._policy.max_retry_after,
            rng=rng,
        )
        self.messages = Messages(self)

    def _known_root(self) -> URL | None:
        try:
            return self._sessions.resource_root
        except ClientClosedError:
            return None

    async def _bearer(self) -> str:
        return (await self._sessions.token()).access_token.reveal()

    @staticmethod
    def _checked_url(value: object, what: str, allow_insecure_http: bool) -> URL:
        if not isinstance(value, (str, URL)):
            raise TypeError(f"{what} must be a str URL, got {type(value).__name__}")
        try:
            url = URL(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{what} is not a valid URL: {exc}") from None
        check_secure_url(url, what=what, allow_insecure_http=allow_insecure_http)
        return url

    def with_options(
        self,
        *,
        timeout: float | _NotGiven = NOT_GIVEN,
        deadline: float | _NotGiven | None = NOT_GIVEN,
        max_retries: int | _NotGiven = NOT_GIVEN,
    ) -> Self:
        """A view of this client whose requests use other retry settings.

        The view shares everything else with this client: connections, token, rate limiter,
        counters, and being open or closed. It does not own them: open and close the client
        itself (``async with`` on a view raises ``TypeError``). Cheap to make, so make one
        per call site if you like::

            page = await client.with_options(deadline=2, max_retries=0).messages.list(chat_id)

        Token exchanges keep the client's own settings.

        Args:
            timeout: Seconds for each attempt of a request.
            deadline: Seconds for each request in all (every attempt and wait), or ``None``.
            max_retries: Retries after the first attempt.
        """
        changes: dict[str, object] = {}
        if timeout is not NOT_GIVEN:
            changes["timeout"] = seconds("timeout", timeout)
        if deadline is not NOT_GIVEN:
            changes["deadline"] = None if deadline is None else seconds("deadline", deadline)
        if max_retries is not NOT_GIVEN:
            changes["max_retries"] = count("max_retries", max_retries, minimum=0)
        view = copy.copy(self)
        view._policy = self._policy.replace(**changes)
        view._is_view = True
        view.messages = Messages(view)
        return view

    def _check_owner(self, what: str) -> None:
        if self._is_view:
            raise TypeError(
                f"{what} on a with_options() view: the view does not own the client it was "
                "made from; open and close that client instead"
            )

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the HTTP session and exchange the credentials for a token.

        ``async with Client(...)`` calls this for you. For a client that lives as long as an
        app, call it from the app's startup hook and :meth:`aclose` from its shutdown hook
        (``examples/web_app.py`` does this with aiohttp.web). A client whose ``open()``
        failed, or that was closed, cannot be opened again: make a new one.
        """
        self._check_owner("open()")
        if self._state is _State.OPEN:
            return
        if self._state is _State.CLOSED:
            raise ClientClosedError("this client was closed; create a new Client")
        try:
            await self._sessions.open()
        except BaseException:
            self._life.state = _State.CLOSED
            self._limiter.close()
            await self._sessions.close()
            raise
        self._life.state = _State.OPEN

    async def aclose(self) -> None:
        """Close the client and the HTTP session it opened. Closing twice does nothing."""
        self._check_owner("aclose()")
        if self._state is _State.CLOSED:
            return
        self._sessions.check_loop()
        self._life.state = _State.CLOSED
        self._limiter.close()
        try:
            await self._downloads.close()
        finally:
            await self._sessions.close()

    async def __aenter__(self) -> Self:
        self._check_owner("async with")
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def _state(self) -> _State:
        return self._life.state

    def _require_open(self) -> None:
        if self._state is not _State.OPEN:
            raise ClientClosedError(
                "the client was closed; create a new Client"
                if self._state is _State.CLOSED
                else "the client is not open; use 'async with Client(...) as client:'"
            )

    async def _send(self, request: ApiRequest, parent: OtelWalk | None = None) -> bytes | None:
        self._require_open()
        return await self._transport.send(request, self._policy, parent)

    # --- state ----------------------------------------------------------------------------------

    @property
    def scopes(self) -> frozenset[str] | None:
        """The scopes the token carries (from the exchange); ``None`` when not known."""
        return self._sessions.granted

    @property
    def user_id(self) -> int | None:
        """The user this client acts as, when the token exchange says."""
        return self._sessions.user_id

    @property
    def resource_uri(self) -> str | None:
        """The API's base URI, once known."""
        sessions = getattr(self, "_sessions", None)  # None while __init__ is still checking
        try:
            return str(sessions.resource_root) if sessions is not None else None
        except ClientClosedError:
            return None

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the request counters and the adaptive concurrency."""
        return self._observer.stats()

    @property
    def token_exchanges(self) -> int:
        """Requests made to the token endpoint so far."""
        return self._sessions.exchanges

    def __repr__(self) -> str:
        who = f"client_id={self._client_id!r}, " if self._client_id else ""
        view = ""
        if self._is_view:
            p = self._policy
            view = (
                f" view(timeout={p.timeout:g}, deadline={p.deadline}, max_retries={p.max_retries})"
            )
        return f"<Client {who}resource_uri={self.resource_uri!r} state={self._state.value}{view}>"


class Messages:
    """The Messages API's endpoints: ``client.messages``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _root(self) -> URL:
        self._client._require_open()
        return self._client._sessions.resource_root

    async def _page(self, request: ApiRequest) -> MessagesPage:
        return parse_page(await self._body(request))

    async def _body(self, request: ApiRequest, parent: OtelWalk | None = None) -> bytes:
        return await self._client._send(request, parent) or b""

    async def chats(self) -> list[Chat]:
        """Every chat the token can see."""
        body = await self._client._send(build_chats(self._root()))
        return parse_chats(body or b"")

    async def list(
        self,
        chat_id: int,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        query: str | None = None,
        period: Period | None = None,
    ) -> MessagesPage:
        """One page of a chat's messages, newest first.

        Args:
            chat_id: The chat (for a private chat, the other user's id).
            limit: Page size (the server's default is 20, its maximum 100); not a total. A
                larger one is sent as is and the server answers with at most 100 messages
                (``page.limit`` says how many it used).
            cursor: A ``next_cursor`` or ``prev_cursor`` from an earlier page.
            query: Case-insensitive substring filter on the text.
            period: A date filter.
        """
        listing = ListQuery.checked(chat_id, limit, query, period)
        root = self._root()
        if cursor is None or cursor == "":
            return await self._page(build_list(root, listing))
        request = cursor_request(root, cursor, listing)
        check_cursor_chat(request, listing.chat_id)
        return await self._page(request)

    async def get(self, message_id: int) -> Message:
        """One message by id."""
        body = await self._client._send(build_get(self._root(), message_id))
        return parse_message(body or b"")

    async def add(
        self,
        chat_id: int,
        message: str = "",
        *,
        attachments: Sequence[NewAttachment] | None = None,
        is_whisper: bool = False,
    ) -> Message:
        """Post a message; returns it as stored. Never sent twice (see the README)."""
        request = build_add(self._root(), chat_id, message, attachments, is_whisper)
        body = await self._client._send(request)
        return parse_message(body or b"")

    async def edit(
        self,
        message_id: int,
        *,
        chat_id: int,
        message: str | None = None,
        attachments: Sequence[NewAttachment] | None = None,
    ) -> Message:
        """Change one of this user's messages; returns it as edited."""
        request = build_edit(self._root(), message_id, chat_id, message, attachments)
        body = await self._client._send(request)
        return parse_message(body or b"")

    async def delete(self, message_id: int) -> None:
        """Delete one of this user's messages."""
        await self._client._send(build_delete(self._root(), message_id))

    async def download(
        self,
        attachment: Attachment | str,
        destination: str | os.PathLike[str] | BinaryIO,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 -- a per-file limit, documented
    ) -> Downloaded:
        """Fetch an attachment's file into ``destination``; returns what was written.

        The bearer token goes only to the API's own origin (docs/protocol.md §6); any other
        origin, and anything a redirect leads to from there, gets no credentials and no
        cookies. Plain ``http://`` to a host that is not loopback is refused unless the client
        has ``allow_insecure_http``. A dropped connection resumes with a ``Range`` request
        where the host supports it; 429s and 5xx are retried (a ``Retry-After`` pauses that
        host only).

        Args:
            attachment: An :class:`Attachment` of a message, or a URL.
            destination: A path (written as ``path + ".part"`` and renamed into place only when
                complete; an interrupted call leaves the part for the next call to resume), or
                a binary file object opened for writing.
            max_bytes: Largest file accepted; a file of exactly this size is kept.
            timeout: Seconds the whole file may take, every retry included.

        Raises:
            DownloadError: ``reason`` says why: ``refused``, ``too_large``, ``gone`` (with
                ``status``, e.g. 404 or 410) or ``failed``.
        """
        url = attachment.url if isinstance(attachment, Attachment) else attachment
        if not isinstance(url, str):
            raise TypeError(f"attachment must be an Attachment or a str URL, got {url!r}")
        max_bytes = count("max_bytes", max_bytes, minimum=0)
        time_limit = seconds("timeout", timeout)
        self._client._require_open()
        downloads = self._client._downloads
        downloads.check(url)  # refused before anything is created or sent
        if not isinstance(destination, (str, os.PathLike)):
            if not callable(getattr(destination, "write", None)):
                raise TypeError("destination must be a path or a binary file object")
            sink = StreamSink(destination)
            return await downloads.fetch(url, sink, max_bytes=max_bytes, time_limit=time_limit)
        path = os.fspath(destination)
        # Off the loop: resuming reads (and hashes) what an interrupted call wrote.
        part = await asyncio.to_thread(PartialFile, f"{path}.part", url)
        try:
            result = await downloads.fetch(url, part, max_bytes=max_bytes, time_limit=time_limit)
            await asyncio.to_thread(part.sync)
        except DownloadError as exc:
            if exc.reason == "failed":
                part.close()  # kept: the next call resumes it
            else:
                part.discard()
            raise
        except BaseException:
            part.close()
            raise
        part.finish(path)
        return result

    # --- walks ----------------------------------------------------------------------------------

    def pages(
        self,
        chat_id: int,
        *,
        limit: int | None = 100,
        cursor: str | None = None,
        query: str | None = None,
        period: Period | None = None,
        direction: Direction = "older",
        prefetch: bool = True,
        bulk: bool = False,
    ) -> AsyncGenerator[MessagesPage, None]:
        """Walk a chat's pages, newest first, following cursors.

        ``limit`` is the page size, not a total. Save ``page.next_cursor`` to resume later with
        ``pages(chat_id, cursor=saved)``. ``direction="newer"`` follows ``prev_cursor`` instead,
        towards messages newer than the cursor. With ``prefetch`` (the default) the next page
        is fetched while you work on the current one. ``bulk=True`` marks the walk as part of
        a bulk job (``iter_many`` and the export set it): when requests queue for a slot, its
        pages wait behind single calls and watch polls of the same client.
        """
        listing = ListQuery.checked(chat_id, limit, query, period)
        if direction not in ("older", "newer"):
            raise ValueError(f"direction must be 'older' or 'newer', got {direction!r}")
        if cursor is not None and not isinstance(cursor, str):
            raise TypeError(f"cursor must be a str or None, got {type(cursor).__name__}")
        if direction == "newer" and not cursor:
            raise ValueError(
                "direction='newer' walks up from a saved cursor (a page's prev_cursor); the "
                "first page is already the newest"
            )
        return self._walk(
            listing,
            "messages.pages",
            cursor=cursor,
            direction=direction,
            prefetch=prefetch,
            bulk=flag("bulk", bulk),
        )

    def _walk(
        self,
        listing: ListQuery,
        name: str,
        *,
        cursor: str | None = None,
        direction: Direction = "older",
        prefetch: bool = True,
        max_items: int | None = None,
        bulk: bool = False,
    ) -> AsyncGenerator[MessagesPage, None]:
        root = self._root()
        priority = Priority.BULK if bulk else Priority.INTERACTIVE

        def marked(request: ApiRequest) -> ApiRequest:
            return attrs.evolve(request, priority=priority) if bulk else request

        if cursor:
            first = cursor_request(root, cursor, listing)
            check_cursor_chat(first, listing.chat_id)
        else:
            first = build_list(root, listing)
        walk = self._client._observer.walk(name)  # a span for the walk, when traced
        pages = walk_pages(
            self._body if walk is None else functools.partial(self._body, parent=walk),
            marked(first),
            lambda c: marked(cursor_request(self._root(), c, listing)),
            direction=direction,
            prefetch=prefetch,
            max_items=max_items,
        )
        return pages if walk is None else walk.wrap(pages)

    def iter(
        self,
        chat_id: int,
        *,
        limit: int | None = 100,
        query: str | None = None,
        period: Period | None = None,
        max_items: int | None = None,
        prefetch: bool = True,
    ) -> AsyncGenerator[Message, None]:
        """Every message of a chat, newest first.

        ``limit`` is the page size of each request, not a total: use ``max_items`` to stop
        after that many messages.
        """
        if max_items is not None:
            count("max_items", max_items, minimum=0)
        listing = ListQuery.checked(chat_id, limit, query, period)
        pages = self._walk(listing, "messages.iter", prefetch=prefetch, max_items=max_items)
        return walk_messages(pages, max_items)

    @overload
    def iter_many(
        self,
        chat_ids: Iterable[int],
        *,
        concurrency: int = ...,
        limit: int | None = ...,
        query: str | None = ...,
        period: Period | None = ...,
        max_items: int | None = ...,
        on_error: Literal["raise"] = ...,
    ) -> AsyncGenerator[tuple[int, Message], None]: ...

    @overload
    def iter_many(
        self,
        chat_ids: Iterable[int],
        *,
        concurrency: int = ...,
        limit: int | None = ...,
        query: str | None = ...,
        period: Period | None = ...,
        max_items: int | None = ...,
        on_error: Literal["yield"],
    ) -> AsyncGenerator[tuple[int, Message | ChatFailed], None]: ...

    def iter_many(
        self,
        chat_ids: Iterable[int],
        *,
        concurrency: int = 8,
        limit: int | None = 100,
        query: str | None = None,
        period: Period | None = None,
        max_items: int | None = None,
        on_error: OnError = "raise",
    ) -> (
        AsyncGenerator[tuple[int, Message | ChatFailed], None]
        | AsyncGenerator[tuple[int, Message], None]
    ):
        """Every message of many chats, as ``(chat_id, message)``, walked concurrently.

        At most ``concurrency`` chats are walked at once; messages arrive as they come, in
        order within each chat. ``max_items`` bounds each chat. With ``on_error="raise"`` the
        first failing chat's exception is raised after the others are cancelled; with
        ``"yield"`` a ``(chat_id, ChatFailed)`` item reports it and the others go on.
        """
        if isinstance(chat_ids, (str, bytes)) or not isinstance(chat_ids, Iterable):
            raise TypeError("chat_ids must be an iterable of int chat ids")
        ids = [check_chat_id(c) for c in chat_ids]
        concurrency = count("concurrency", concurrency, minimum=1)
        if max_items is not None:
            count("max_items", max_items, minimum=0)
        if on_error not in ("raise", "yield"):
            raise ValueError(f"on_error must be 'raise' or 'yield', got {on_error!r}")
        ListQuery.checked(0, limit, query, period)  # fail now, not in a worker
        self._root()

        def walk(chat_id: int) -> AsyncGenerator[MessagesPage, None]:
            # No prefetch inside a fan-out: the other chats already overlap the network, and
            # in-flight requests stay within ``concurrency``.
            return self.pages(
                chat_id, limit=limit, query=query, period=period, prefetch=False, bulk=True
            )

        return fan_out(ids, walk, concurrency=concurrency, on_error=on_error, max_items=max_items)

    async def plan_windows(
        self,
        chat_id: int,
        *,
        windows: int,
        query: str | None = None,
        period: Period | None = None,
        concurrency: int = 8,
    ) -> Sequence[Window]:
        """Split a chat's selection into about ``windows`` time windows of about equal count.

        The boundaries are found by bisection on ``total_count`` of ``limit=1`` listings
        (``concurrency`` at once); the windows tile the selection with no gap and no overlap,
        newest first, the newest open-ended. A boundary never splits an instant, so a plan
        can hold fewer windows than asked for (see :class:`Window`).
        """
        cid = check_chat_id(chat_id)
        count("windows", windows, minimum=1)
        count("concurrency", concurrency, minimum=1)
        ListQuery.checked(cid, 1, query, period)
        return await plan_windows(
            self, cid, windows=windows, query=query, period=period, concurrency=concurrency
        )

    def iter_windows(
        self,
        chat_id: int,
        *,
        windows: int | Sequence[Window],
        concurrency: int = 8,
        limit: int | None = 100,
        query: str | None = None,
        period: Period | None = None,
    ) -> AsyncGenerator[WindowPage, None]:
        """One chat walked in time windows at once, as :class:`WindowPage` items.

        ``windows=N`` plans about N windows of equal count first (:meth:`plan_windows`);
        a list of :class:`Window` (saved ``WindowPage.next`` checkpoints) resumes them, the
        ``period`` then being the windows' own. Pages of different windows interleave; within
        a window they run newest first and no message is handed out twice. At most
        ``concurrency`` windows are walked at once, through this client's limiter.
        """
        cid = check_chat_id(chat_id)
        concurrency = count("concurrency", concurrency, minimum=1)
        ListQuery.checked(cid, limit, query, period)
        planned: Sequence[Window] | None = None
        if isinstance(windows, int) and not isinstance(windows, bool):
            count("windows", windows, minimum=1)
        elif isinstance(windows, Sequence) and all(isinstance(w, Window) for w in windows):
            planned = tuple(windows)
        else:
            raise TypeError("windows must be an int (how many) or a list of Window checkpoints")
        self._root()

        def walk(window: Window) -> AsyncGenerator[MessagesPage, None]:
            # No prefetch: the windows already overlap the network, and in-flight requests
            # stay within ``concurrency``.
            return self.pages(
                cid,
                limit=limit,
                cursor=window.cursor,
                query=query,
                period=window.period(),
                prefetch=False,
                bulk=True,
            )

        async def run() -> AsyncGenerator[WindowPage, None]:
            plan = planned
            if plan is None:
                assert isinstance(windows, int)
                plan = await plan_windows(
                    self, cid, windows=windows, query=query, period=period, concurrency=concurrency
                )
            walk_all = walk_windows(walk, plan, concurrency=concurrency)
            try:
                async for item in walk_all:
                    yield item
            finally:
                await walk_all.aclose()

        return run()

    # --- watching -------------------------------------------------------------------------------

    def watch(
        self,
        chat_ids: Iterable[int] | None = None,
        *,
        interval: float = 1.0,
        since: Mapping[int, int] | None = None,
        limit: int = 100,
        max_interval: float | None = None,
        concurrency: int = 8,
        rediscover: float | None = None,
    ) -> Watch:
        """New messages as they arrive, as ``(chat_id, message)``: the loop of a bot.

        Each message posted after the watch started is yielded once, oldest first within its
        chat; a burst bigger than a page is followed back so nothing is missed. Quiet chats
        are polled less and less often (up to ``max_interval``); polls share the client's
        rate limiter. Transient errors back off and never end the watch; a deleted chat is
        dropped with a log line; an answer that breaks the contract is raised, once::

            async for chat_id, msg in client.messages.watch():
                if msg.uid != client.user_id:
                    await client.messages.add(chat_id, f"echo: {msg.message}")

        Args:
            chat_ids: The chats to watch; ``None`` watches every chat, re-listing them every
                ``rediscover`` seconds and picking up new ones.
            interval: Seconds between polls of a chat with news (the shortest interval).
            since: ``{chat_id: message_id}`` to resume after (exclusive), e.g. a saved
                :attr:`Watch.watermarks`. Watching every chat (``chat_ids=None``), a chat
                missing from it appeared after it was saved: it starts after the largest
                id in it, so nothing posted there while the bot was down is lost. With
                ``chat_ids``, chats missing from it start from now.
            limit: Page size of each poll.
            max_interval: Longest interval for a quiet chat (default ``10 * interval``): the
                longest a message in a quiet chat waits to be seen.
            concurrency: Most chats polled at once.
            rediscover: Seconds between re-listings of the chats (with ``chat_ids=None``);
                default ``max_interval``, so a new chat is noticed as fast as a quiet one.

        Returns:
            A :class:`Watch`: iterate it with ``async for``; ``break``, ``aclose()`` or
            leaving ``async with`` stops every poll.
        """
        self._root()  # a closed or unopened client fails here, not in a background task
        return Watch(
            self,
            chat_ids,
            interval=interval,
            since=since,
            limit=limit,
            max_interval=max_interval,
            concurrency=concurrency,
            rediscover=rediscover,
        )
