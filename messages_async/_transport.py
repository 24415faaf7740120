"""Sending one resource request: auth, the shared limiter, and the retry policy's answers.

What to do after a failed attempt is decided by :func:`._retry.decide` (the table is in the
README, "Retries"); the protocol's own rules are pure functions in ``_wire.py``. This module
is the loop that sends attempts and acts on those answers: it sleeps, pauses the client
through the limiter, renews the token, follows same-origin redirects of a GET, or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from ._errors import (
    ClientClosedError,
    DecodeError,
    RateLimitError,
    RequestTimeoutError,
    TransportError,
    UnsafeCursorError,
)
from ._http import ERROR_BODY_CAP, describe, failure_of, read_capped, scrubbed
from ._limiter import Limiter, Outcome, Ticket
from ._observe import BACKOFF, RETRY_AFTER, CallObserver, Observer
from ._retry import (
    Attempt,
    CallState,
    Decision,
    Done,
    Failure,
    GiveUp,
    Operation,
    Renew,
    RetryBudget,
    RetryIn,
    RetryPolicy,
    attempts_text,
    decide,
    describe_wait,
)
from ._session import SessionManager, Token, attempt_timeout
from ._wire import ApiRequest, Retry, check_inside, error_from_response, same_origin

if TYPE_CHECKING:
    from ._telemetry import OtelWalk

__all__ = ["Transport"]

logger = logging.getLogger("messages_async")

_MAX_REDIRECTS = 5


class _Answer:
    __slots__ = ("body", "complete", "headers", "status")

    def __init__(
        self, status: int, headers: CIMultiDictProxy[str], body: bytes, complete: bool
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.complete = complete


def _headers(token: Token, *, json_body: bool, extra: Mapping[str, str]) -> dict[str, str]:
    headers = {
        **extra,  # first: nothing an observer adds can replace the ones below
        "Authorization": "Bearer " + token.access_token.reveal(),
        "Accept": "application/json",
    }
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


class Transport:
    """Sends :class:`ApiRequest` objects and returns the body of a successful answer."""

    def __init__(
        self,
        sessions: SessionManager,
        limiter: Limiter,
        *,
        max_response_bytes: int,
        retry_budget: RetryBudget,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        observer: Observer | None = None,
    ) -> None:
        self._observer = observer if observer is not None else Observer(None, limiter)
        self._sessions = sessions
        self._limiter = limiter
        self._max_response_bytes = max_response_bytes
        self._rng = rng
        self._clock = clock
        self._sleep = sleep
        self._budget = retry_budget

    async def send(
        self, request: ApiRequest, policy: RetryPolicy, parent: OtelWalk | None = None
    ) -> bytes | None:
        """Send ``request``; the body of the 2xx answer (``None`` for 204), else an exception.

        ``parent``: the walk this is a page of, for tracing.
        """
        report = self._observer.call(request, parent)
        try:
            body = await self._send(request, policy, report)
        except BaseException as exc:
            report.ended(exc)
            raise
        report.ended(None)
        return body

    async def _send(
        self, request: ApiRequest, policy: RetryPolicy, report: CallObserver
    ) -> bytes | None:
        self._sessions.check_loop()
        self._sessions.check_scope(request.scope)
        op = Operation(
            request.op,
            idempotent=request.retry is Retry.IDEMPOTENT,
            gone_means_done=request.gone_means_done,
        )
        call = CallState()
        url = request.url
        redirects = attempts = 0
        # With a deadline, this request (every attempt, wait and token renewal) ends by then.
        ends_at = None if policy.deadline is None else self._clock() + policy.deadline
        while True:
            token, ticket = await self._ready(request, url, policy, ends_at, attempts, report)
            self._limiter.count_attempt(retry=bool(call.retries))
            attempts += 1
            answer = await self._try(
                request, url, token, ticket, policy, ends_at, attempts, report, call.retries
            )
            if isinstance(answer, _Answer):
                if 200 <= answer.status < 300:
                    return self._body(request, answer)
                if 300 <= answer.status < 400 and "Location" in answer.headers:
                    url = self._redirect_target(request, url, answer.headers["Location"])
                    redirects += 1
                    if redirects > _MAX_REDIRECTS:
                        raise TransportError(f"{request.op}: more than {_MAX_REDIRECTS} redirects")
                    continue
                refusal: Exception | None = self._refusal(request, answer)
                attempt = Attempt(answer.status, getattr(refusal, "retry_after", None))
                cause = f"HTTP {answer.status}"
            else:
                refusal = None
                failure = failure_of(answer)
                attempt = Attempt(failure=failure)
                cause = f"{failure.value} ({describe(answer)})"
            decision, call = self._decide(op, call, attempt, policy, ends_at)
            if isinstance(decision, RetryIn):
                await self._wait(request, decision, cause, call, policy, report)
            elif isinstance(decision, Renew):
                report.token_refused()
                await self._renew(request, token, policy, ends_at, attempts)
            elif isinstance(decision, Done):
                # Our earlier attempt deleted it and the answer was lost: the caller's intent
                # holds, so this is success, not an error (exactly one deletion happened).
                return None
            else:
                raise self._give_up(request, refusal, answer, decision, call, attempts)

    async def _try(
        self,
        request: ApiRequest,
        url: URL,
        token: Token,
        ticket: Ticket,
        policy: RetryPolicy,
        ends_at: float | None,
        attempts: int,
        report: CallObserver,
        retries: int,
    ) -> _Answer | BaseException:
        """One attempt through the limiter's slot: its answer, or why none came."""
        outcome = Outcome.FAILED
        result: _Answer | BaseException
        try:
            # Inside the try: the slot is handed back even if a hook is cancelled.
            extra = await report.attempt_started(url, attempts, retry=bool(retries))
            started = self._clock()
            # The deadline cuts the attempt short through asyncio (exact, and at once if it
            # has already passed) rather than through aiohttp's timeout, which treats a
            # total of zero as none and rounds long ones up to whole seconds.
            async with self._until(ends_at):
                result = await self._attempt(request, url, token, policy, extra)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            result = exc
        else:
            outcome = Outcome.THROTTLED if result.status == 429 else Outcome.OK
        finally:
            self._limiter.release(ticket, outcome)
        elapsed = self._clock() - started
        if isinstance(result, _Answer):
            await report.attempt_ended(elapsed, status=result.status, headers=result.headers)
        else:
            await report.attempt_ended(elapsed, error=result)
        logger.debug(
            "%s %s -> %s (attempt %d, %.1f ms)",
            request.method,
            url.raw_path,
            result.status if isinstance(result, _Answer) else type(result).__name__,
            attempts,
            elapsed * 1000,
        )
        if not isinstance(result, _Answer) and self._sessions.closing:
            # Our own aclose() cut the connection: not the network's fault.
            raise ClientClosedError(
                f"the client was closed while {request.op} was in flight"
            ) from None
        return result

    def _body(self, request: ApiRequest, answer: _Answer) -> bytes | None:
        if not answer.complete:
            raise self._too_large(request, len(answer.body))
        self._budget.earn()
        return answer.body if answer.status != 204 else None

    def _refusal(self, request: ApiRequest, answer: _Answer) -> Exception:
        """The error an error answer means (returned, not raised)."""
        if answer.status == 429:
            # Counted for every 429 answered, also the one that ends a call, so that
            # client.stats agrees with what the server sent.
            self._limiter.count_rate_limited()
        return error_from_response(
            answer.status,
            answer.headers,
            answer.body,
            now=datetime.now(UTC),
            granted=self._sessions.granted,
            op=request.op,
            cut_at=None if answer.complete else ERROR_BODY_CAP,
        )

    async def _renew(
        self,
        request: ApiRequest,
        token: Token,
        policy: RetryPolicy,
        ends_at: float | None,
        attempts: int,
    ) -> None:
        try:
            async with self._until(ends_at):
                await self._sessions.renew_after_401(token)
        except TimeoutError:
            raise self._past_deadline(
                request, policy, attempts, "renewing the refused token"
            ) from None

    def _give_up(
        self,
        request: ApiRequest,
        refusal: Exception | None,
        answer: _Answer | BaseException,
        decision: GiveUp | RetryIn | Renew | Done,
        call: CallState,
        attempts: int,
    ) -> Exception:
        """The error to raise, saying why it was not retried."""
        assert isinstance(decision, GiveUp)
        if decision.pause_client is not None:
            self._limiter.pause(decision.pause_client)  # binds the client's other calls
        if refusal is not None:
            if decision.note:
                refusal.add_note(decision.note)
            return refusal  # the server's own error: it says what went wrong
        assert isinstance(answer, BaseException)
        error = self._transport_error(request, answer, attempts, call.maybe_acted, decision.note)
        # The cause keeps its type and message but not its traceback: aiohttp's frames hold
        # the request headers, the bearer token among them.
        error.__cause__ = scrubbed(answer)
        return error

    async def _ready(
        self,
        request: ApiRequest,
        url: URL,
        policy: RetryPolicy,
        ends_at: float | None,
        attempts: int,
        report: CallObserver,
    ) -> tuple[Token, Ticket]:
        """A token and a limiter slot for the next attempt, within this call's limits."""
        root = self._sessions.resource_root
        if not same_origin(url, root):
            raise UnsafeCursorError(
                f"refused to send {request.op} to {url.origin()}: the access token is only "
                f"sent to {root.origin()}"
            )
        if self._sessions.closing:
            raise ClientClosedError(f"the client was closed; {request.op} was not sent again")
        left = float("inf") if ends_at is None else ends_at - self._clock()
        if left <= 0:
            raise self._past_deadline(request, policy, attempts, "before an attempt")
        paused_for = self._limiter.paused_for()
        if paused_for > min(policy.max_retry_after, left):
            # The server asked this client to wait longer than it waits out: say so now,
            # rather than sending into the pause or sleeping through it.
            raise RateLimitError(
                429,
                "rate_limited",
                f"the server asked this client to wait {paused_for:.0f} s more",
                retry_after=paused_for,
                hint=(
                    "above max_retry_after; nothing was sent"
                    if paused_for > policy.max_retry_after
                    else "beyond the call's deadline; nothing was sent"
                ),
            )
        if paused_for > 0:
            report.waiting(RETRY_AFTER, paused_for)
        try:
            async with self._until(ends_at):
                token = await self._sessions.token()
                ticket = await self._limiter.acquire(priority=request.priority)
        except TimeoutError:
            raise self._past_deadline(
                request, policy, attempts, "waiting for a token or a free slot"
            ) from None
        return token, ticket

    def _decide(
        self,
        op: Operation,
        call: CallState,
        attempt: Attempt,
        policy: RetryPolicy,
        ends_at: float | None,
    ) -> tuple[Decision, CallState]:
        return decide(
            op,
            call,
            attempt,
            policy,
            now=self._clock(),
            ends_at=ends_at,
            budget=self._budget.tokens,
            rng=self._rng,
        )

    async def _wait(
        self,
        request: ApiRequest,
        decision: RetryIn,
        cause: str,
        call: CallState,
        policy: RetryPolicy,
        report: CallObserver,
    ) -> None:
        if decision.spend_budget:
            self._budget.try_spend()  # decide() saw a token left, and nothing ran since
        line = describe_wait(request.op, cause, decision.delay, call.retries, policy)
        if decision.pause_client:
            # Everyone waits; acquire() holds this call too (client.stats.paused_for shows it).
            logger.info("%s; the whole client pauses", line)
            self._limiter.pause(decision.delay)
        else:
            logger.warning("%s", line)
            report.waiting(BACKOFF, decision.delay)
            await self._sessions.wait_unless_closed(self._sleep(decision.delay))

    def _until(self, ends_at: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        """A scope that raises TimeoutError at ``ends_at`` (this transport's clock), if set."""
        if ends_at is None:
            return contextlib.nullcontext()
        loop_time = asyncio.get_running_loop().time() + (ends_at - self._clock())
        return asyncio.timeout_at(loop_time)

    @staticmethod
    def _past_deadline(
        request: ApiRequest, policy: RetryPolicy, attempts: int, when: str
    ) -> RequestTimeoutError:
        sent = (
            f"{attempts_text(attempts)}; nothing more was sent" if attempts else "nothing was sent"
        )
        return RequestTimeoutError(
            f"{request.op} ran out of its {policy.deadline:g} s deadline {when} ({sent})"
        )

    async def _attempt(
        self,
        request: ApiRequest,
        url: URL,
        token: Token,
        policy: RetryPolicy,
        extra: Mapping[str, str],
    ) -> _Answer:
        # The headers are built in the call expression, never bound to a local of this frame:
        # a traceback formatter that prints locals must not find the token here.
        async with self._sessions.session.request(
            request.method,
            url,
            data=request.body,
            headers=_headers(token, json_body=request.body is not None, extra=extra),
            allow_redirects=False,
            raise_for_status=False,
            timeout=attempt_timeout(policy.timeout),
        ) as response:
            status = response.status
            cap = self._max_response_bytes
            if not 200 <= status < 300:
                cap = min(cap, ERROR_BODY_CAP)  # the status says what went wrong
            body, complete = await read_capped(response, cap)
            return _Answer(status, response.headers, body, complete)

    def _too_large(self, request: ApiRequest, size: int) -> DecodeError:
        got = f"got at least {size} bytes" if size else "its Content-Length says more"
        return DecodeError(
            f"the answer to {request.op} is larger than max_response_bytes "
            f"({self._max_response_bytes}; {got}); the connection was closed. Raise "
            "Client(max_response_bytes=...) if this is expected."
        )

    def _redirect_target(self, request: ApiRequest, url: URL, location: str) -> URL:
        try:
            target = url.join(URL(location))
        except ValueError:
            raise UnsafeCursorError(f"refused an unreadable redirect of {request.op}") from None
        # The same checks as a cursor URL: the API's origin and path, no user info.
        check_inside(self._sessions.resource_root, target, what=f"redirect of {request.op}")
        if request.method != "GET":
            raise TransportError(
                f"{request.op} was answered with a redirect; a write is not re-sent to another "
                "URL. Check resource_uri."
            )
        return target

    @staticmethod
    def _transport_error(
        request: ApiRequest, error: BaseException, attempts: int, maybe_acted: bool, why: str
    ) -> TransportError:
        failure = failure_of(error)
        tried = attempts_text(attempts)
        note = f"; {why}" if why else ""
        if failure is Failure.CERTIFICATE:
            note += "; a certificate problem is not retried: check the server's certificate"
        if maybe_acted and request.retry is Retry.UNSENT_ONLY:
            note += (
                "; the server may have stored it, so it was not re-sent: check the chat "
                "before adding it again"
            )
        detail = describe(error)
        if isinstance(error, TimeoutError):
            return RequestTimeoutError(f"{request.op} timed out {tried} ({detail}){note}")
        return TransportError(f"{request.op} failed {tried}: {failure.value} ({detail}){note}")
