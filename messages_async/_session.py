"""The session manager: the aiohttp session, the access token and the granted scopes.

One job: make sure there is an open HTTP session and a valid access token, and say which scopes
that token carries. The token exchange follows RFC 6749 (client credentials, §4.4; refresh, §6):

- the first exchange happens when the client opens, so ``client.scopes`` is known from then on;
- a token is renewed ahead of expiry (at half its life, at most a minute early), and after a 401;
- renewal is single-flight: forty calls that meet an expired token cause one exchange, and a
  waiter that is cancelled does not cancel the exchange the others are waiting on
  (docs/protocol.md §7);
- a refresh refused with ``invalid_grant`` (a dead refresh token) falls back to a new
  client-credentials exchange.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from ._errors import (
    AuthError,
    ClientClosedError,
    EventLoopError,
    ScopeError,
    TokenEndpointUnreachableError,
)
from ._http import ERROR_BODY_CAP, describe, failure_of, read_capped, scrubbed
from ._retry import (
    TOKEN_EXCHANGE,
    Attempt,
    CallState,
    Failure,
    GiveUp,
    RetryIn,
    RetryPolicy,
    attempts_text,
    decide,
    describe_wait,
)
from ._secret import Secret
from ._wire import TokenGrant, build_token_form, parse_retry_after, parse_token_response

if TYPE_CHECKING:
    from ._observe import Observer

__all__ = ["Credentials", "SessionManager", "Token", "attempt_timeout"]

logger = logging.getLogger("messages_async")

#: Refresh this long before expiry at most; short-lived tokens refresh at half their life.
_REFRESH_MARGIN = 60.0
#: Longest time a failed renewal's error is given to callers without asking again.
_REFUSAL_HOLD_MAX = 30.0
#: Connecting gets at most this long of an attempt's timeout: a host that drops packets is
#: unreachable, and waiting a whole export timeout for each SYN would hide that for minutes.
_CONNECT_TIMEOUT = 10.0


@functools.lru_cache(maxsize=16)
def attempt_timeout(total: float) -> aiohttp.ClientTimeout:
    """aiohttp's timeout of one attempt (built once per value, not once per attempt)."""
    return aiohttp.ClientTimeout(total=total, sock_connect=min(total, _CONNECT_TIMEOUT))


class _TokenAnswer:
    __slots__ = ("body", "complete", "retry_after", "status")

    def __init__(self, status: int, retry_after: float | None, body: bytes, complete: bool):
        self.status = status
        self.retry_after = retry_after
        self.body = body
        self.complete = complete


class Credentials:
    """Client credentials for the token endpoint. The secret never appears in a repr."""

    __slots__ = ("client_id", "client_secret", "scopes", "token_url")

    def __init__(
        self, token_url: URL, client_id: str, client_secret: Secret, scopes: frozenset[str]
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self.client_secret = client_secret
        self.scopes = scopes

    def __repr__(self) -> str:
        return f"Credentials(token_url={str(self.token_url)!r}, client_id={self.client_id!r})"


class Token:
    """An access token and what came with it. Identity matters: a 401 names the token it hit."""

    __slots__ = ("access_token", "expires_at", "refresh_at", "refresh_token")

    def __init__(
        self,
        access_token: Secret,
        refresh_at: float,
        refresh_token: Secret | None,
        expires_at: float = float("inf"),
    ):
        self.access_token = access_token
        self.refresh_at = refresh_at  # renewal starts here, ahead of expiry
        self.expires_at = expires_at  # and the token is of no use from here on
        self.refresh_token = refresh_token

    def __repr__(self) -> str:
        return "Token('***')"


class SessionManager:
    """Owns the HTTP session and the token; shared by every request of one client."""

    def __init__(
        self,
        *,
        credentials: Credentials | None,
        access_token: Secret | None,
        resource_root: URL | None,
        granted: frozenset[str] | None,
        session: aiohttp.ClientSession | None,
        connection_limit: int,
        policy: RetryPolicy,
        max_response_bytes: int,
        allow_insecure_http: bool,
        user_agent: str,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer | None = None,
    ) -> None:
        self._observer = observer
        self._credentials = credentials
        self._resource_root = resource_root
        self._granted = granted
        self._user_id: int | None = None
        self._token = Token(access_token, float("inf"), None) if access_token is not None else None
        self._session = session
        self._owns_session = session is None
        self._connection_limit = connection_limit
        # Token exchanges keep the client's own settings; a request's deadline bounds its
        # wait for one from the outside.
        self._policy = policy.replace(deadline=None)
        self._answer_cap = min(max_response_bytes, ERROR_BODY_CAP)
        self._allow_insecure_http = allow_insecure_http
        self._user_agent = user_agent
        self._rng = rng
        self._clock = clock
        self._renewal: asyncio.Task[Token] | None = None
        # The last renewal's failure, and until when it stands: callers that need a new
        # token meanwhile get that error at once instead of each asking the endpoint again.
        self._refusal: AuthError | None = None
        self._refused_until = 0.0
        self._refusals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set when close() begins: a call failing from then on was cut short by it.
        self.closing = False
        self._closed: asyncio.Future[None] | None = None
        self.exchanges = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._closed is None:
            self._closed = self._loop.create_future()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connection_limit),
                # Bearer auth needs no cookies, and a cookie jar could carry state to origins
                # the token must never reach.
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self._user_agent},
            )
        if self._token is None:
            await self._renew(None)

    async def close(self) -> None:
        self.closing = True
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)  # wakes calls waiting to retry
        renewal, self._renewal = self._renewal, None
        try:
            if renewal is not None and not renewal.done():
                renewal.cancel()
                try:
                    await renewal
                except (asyncio.CancelledError, Exception):
                    if (task := asyncio.current_task()) is not None and task.cancelling():
                        raise
        finally:
            # Closed even when this close is itself cancelled (Ctrl-C while signing in).
            session, self._session = self._session, None
            if self._owns_session and session is not None:
                await session.close()

    async def wait_unless_closed(self, wait: Awaitable[object]) -> None:
        """Wait for ``wait`` (a backoff), but raise :class:`ClientClosedError` at once if the
        client closes meanwhile: a call is not held up by a backoff the close ended."""
        closed = self._closed
        task = asyncio.ensure_future(wait)
        try:
            if closed is None:
                await task
                return
            await asyncio.wait((task, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            task.cancel()
        if not task.done() or closed.done():
            raise ClientClosedError("the client was closed while this call waited to retry")

    def check_loop(self) -> None:
        """Raise :class:`EventLoopError` unless called from the loop the client opened in."""
        loop = self._loop
        if loop is not None and asyncio.get_running_loop() is not loop:
            raise EventLoopError(
                "this client was opened in another event loop, and its connections and token "
                "renewal belong to that loop; nothing was sent. Open a Client in each event "
                "loop (each thread, each asyncio.run) that makes calls"
            )

    @property
    def session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            raise ClientClosedError(
                "the client is not open; use 'async with Client(...) as client:'"
            )
        if session.closed:
            # Only a caller-owned session can be closed behind the client's back.
            raise ClientClosedError(
                "the aiohttp session passed as Client(session=...) is closed; keep it open "
                "for as long as the client is used"
            )
        return session

    @property
    def resource_root(self) -> URL:
        if self._resource_root is None:
            raise ClientClosedError("the client is not open; the resource URI is not known yet")
        return self._resource_root

    @property
    def granted(self) -> frozenset[str] | None:
        return self._granted

    @property
    def user_id(self) -> int | None:
        return self._user_id

    # --- scopes ---------------------------------------------------------------------------------

    def check_scope(self, required: str) -> None:
        """Raise :class:`ScopeError` before sending when the granted scopes are known to lack it."""
        if self._granted is not None and required not in self._granted:
            granted = ", ".join(sorted(self._granted)) or "none"
            raise ScopeError(
                f"this call needs the {required!r} scope but the token was granted only "
                f"{granted}; add {required!r} to Client(scopes=...) (nothing was sent)",
                required=required,
                granted=self._granted,
            )

    # --- tokens ---------------------------------------------------------------------------------

    async def token(self) -> Token:
        """A token to send now: renewed first if it is close to expiry."""
        token = self._token
        if token is None:
            raise ClientClosedError("the client is not open")
        now = self._clock()
        if self._credentials is None or now < token.refresh_at:
            return token
        if now >= token.expires_at:
            return await self._renew(token)
        # Renewing ahead of expiry: in the background, so no call waits for the exchange,
        # and a token endpoint that fails then fails no call the current token still serves.
        # Its error surfaces only if the token expires before a renewal succeeds.
        if self._renewal is None and now >= self._refused_until:
            self._start_renewal(token)
        return token

    async def renew_after_401(self, rejected: Token) -> Token:
        """The server refused ``rejected``: get a new token (once, for every caller)."""
        if self._credentials is None:
            raise AuthError(
                "the server refused the access token (expired or revoked); this client was "
                "given a pre-issued access_token and cannot renew it: issue a new one, or "
                "configure token_url, client_id and client_secret",
                error="invalid_token",
                status=401,
            )
        return await self._renew(rejected)

    async def _renew(self, stale: Token | None) -> Token:
        current = self._token
        if current is not None and current is not stale and self._clock() < current.expires_at:
            return current  # someone else renewed it meanwhile (a renewal ahead of expiry runs)
        if (
            self._renewal is None
            and self._refusal is not None
            and self._clock() < self._refused_until
        ):
            # The endpoint refused moments ago: the same error, at once (a copy, so that
            # concurrent callers do not share one traceback).
            refusal = copy.copy(self._refusal)
            refusal.__traceback__ = None
            raise refusal
        renewal = self._renewal or self._start_renewal(current)
        try:
            # Shielded: one waiter's cancellation must not cancel the exchange the others
            # wait on.
            return await asyncio.shield(renewal)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or not renewal.cancelled():
                raise  # this waiter itself was cancelled
            # Nobody cancelled this waiter: the client closed and stopped the renewal.
            raise ClientClosedError(
                "the client was closed while this call waited for a new access token"
            ) from None

    def _start_renewal(self, current: Token | None) -> asyncio.Task[Token]:
        name = "messages_async token renewal"
        if self._observer is not None:  # a span of its own, when traced
            renewal = self._observer.start_renewal(self._exchange(current), name)
        else:
            renewal = asyncio.create_task(self._exchange(current), name=name)
        renewal.add_done_callback(self._renewal_done)
        self._renewal = renewal
        return renewal

    def _renewal_done(self, task: asyncio.Task[Token]) -> None:
        if self._renewal is task:
            self._renewal = None
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here so a failure nobody awaits is not logged
        if exc is None:
            self._refusal, self._refusals = None, 0
        elif isinstance(exc, AuthError):
            # Held for 1 s, then 2, 4, ... up to 30 s while the endpoint keeps failing.
            hold = min(_REFUSAL_HOLD_MAX, 2.0 ** min(self._refusals, 8))
            self._refusal = exc
            self._refused_until = self._clock() + hold
            self._refusals += 1
            token = self._token
            if token is not None and self._clock() < token.expires_at:
                logger.warning(
                    "renewing the access token failed (%s); the current one is still valid "
                    "for %.0f s and stays in use; renewal is tried again in %.0f s",
                    exc,
                    token.expires_at - self._clock(),
                    hold,
                )

    async def _exchange(self, current: Token | None) -> Token:
        credentials = self._credentials
        assert credentials is not None
        if current is not None and current.refresh_token is not None:
            try:
                grant = await self._request_token(credentials, current.refresh_token)
            except AuthError as exc:
                if exc.error != "invalid_grant":
                    raise
                logger.debug("refresh token refused (invalid_grant); exchanging credentials")
            else:
                return self._adopt(grant)
        return self._adopt(await self._request_token(credentials, None))

    def _adopt(self, grant: TokenGrant) -> Token:
        now = self._clock()
        if grant.expires_in is None:
            refresh_at = float("inf")  # lives until a 401 says otherwise
        else:
            refresh_at = now + grant.expires_in - min(_REFRESH_MARGIN, grant.expires_in / 2)
        previous = self._token
        # A refresh answer may leave out the refresh token, the scopes and the user: each
        # then stays as it was (RFC 6749 §5.1, §6), never silently widened or forgotten.
        refresh = grant.refresh_token
        if refresh is None and previous is not None:
            refresh = previous.refresh_token
        expires_at = float("inf") if grant.expires_in is None else now + grant.expires_in
        token = Token(grant.access_token, refresh_at, refresh, expires_at)
        self._token = token
        if grant.scopes is not None:
            self._granted = grant.scopes
        elif self._granted is None and self._credentials is not None:
            self._granted = self._credentials.scopes  # absent on the first exchange: as asked
        self._resource_root = grant.resource_uri
        if grant.user_id is not None:
            self._user_id = grant.user_id
        return token

    async def _request_token(self, credentials: Credentials, refresh: Secret | None) -> TokenGrant:
        grant_type = "refresh_token" if refresh is not None else "client_credentials"
        call = CallState()
        attempts = 0
        first = self._clock()
        while True:
            self.exchanges += 1
            attempts += 1
            started = self._clock()
            answer: _TokenAnswer | None = None
            try:
                answer = await self._post_token(credentials, refresh)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # Kept without its traceback: aiohttp's frames hold the form with the client
                # secret in their locals.
                error = scrubbed(exc)
                failure = failure_of(error)
                attempt = Attempt(failure=failure)
                cause = f"{failure.value} ({describe(error)})"
                result = type(error).__name__
            else:
                if answer.status == 200:
                    return self._grant(answer, "")
                attempt = Attempt(status=answer.status, retry_after=answer.retry_after)
                cause = result = f"HTTP {answer.status}"
            logger.debug(
                "POST %s (%s) -> %s (attempt %d, %.1f ms)",
                credentials.token_url.path,
                grant_type,
                result,
                attempts,
                (self._clock() - started) * 1000,
            )
            decision, call = decide(
                TOKEN_EXCHANGE,
                call,
                attempt,
                self._policy,
                now=self._clock(),
                ends_at=None,
                budget=float("inf"),
                rng=self._rng,
            )
            if not isinstance(decision, RetryIn):
                note = decision.note if isinstance(decision, GiveUp) else ""
                if answer is not None:
                    return self._grant(answer, note)  # raises the AuthError it means
                assert attempt.failure is not None
                raise self._unreachable(
                    credentials, error, attempt.failure, attempts, self._clock() - first, note
                ) from error
            what = f"token exchange at {credentials.token_url.origin()}"
            line = describe_wait(what, cause, decision.delay, call.retries, self._policy)
            logger.warning("%s", line)
            await asyncio.sleep(decision.delay)

    @staticmethod
    def _unreachable(
        credentials: Credentials,
        exc: BaseException,
        failure: Failure,
        attempts: int,
        spent: float,
        note: str,
    ) -> TokenEndpointUnreachableError:
        if failure is Failure.CERTIFICATE:
            note = "a certificate problem is not retried: check the endpoint's certificate"
        return TokenEndpointUnreachableError(
            f"could not reach the token endpoint {credentials.token_url.origin()} "
            f"{attempts_text(attempts)} in {spent:.0f} s: {failure.value} ({describe(exc)})"
            + (f"; {note}" if note else "")
        )

    def _grant(self, answer: _TokenAnswer, note: str) -> TokenGrant:
        """The grant the answer holds, else the AuthError it means."""
        assert self._credentials is not None
        body, answer.body = answer.body, b""
        try:
            return parse_token_response(
                answer.status,
                body,
                allow_insecure_http=self._allow_insecure_http,
                token_url=self._credentials.token_url,
                cut_at=None if answer.complete else self._answer_cap,
            )
        except AuthError as exc:
            refused = exc
        # The answer may hold a token the parser refused: no frame the error passes through
        # keeps it (the parser's own frames are dropped with its traceback).
        del body
        if note:
            refused.add_note(note)
        raise refused.with_traceback(None)

    async def _post_token(self, credentials: Credentials, refresh: Secret | None) -> _TokenAnswer:
        # The form is built in the call expression, never bound to a local of this frame.
        async with self.session.post(
            credentials.token_url,
            data=build_token_form(
                client_id=credentials.client_id,
                client_secret=credentials.client_secret,
                scopes=credentials.scopes,
                refresh_token=refresh,
            ),
            headers={"Accept": "application/json"},
            allow_redirects=False,
            raise_for_status=False,
            timeout=attempt_timeout(self._policy.timeout),
        ) as response:
            retry_after = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
            body, complete = await read_capped(response, self._answer_cap)
            return _TokenAnswer(response.status, retry_after, body, complete)
