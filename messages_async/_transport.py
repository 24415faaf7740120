"""Sending one resource request: auth, the shared limiter, retries and safety checks.

The protocol decisions are made by pure functions in ``_wire.py``; this module is the loop that
applies them to real attempts. What may be retried (PROTOCOL §6, §7):

- idempotent requests (GETs, edits, deletes): connection failures, timeouts, 429, 500, 502, 503
  and 504, with full-jitter exponential backoff, at most ``max_retries`` times after the first
  attempt;
- ``messages/add/``: only where the server cannot have acted: the connection was refused, or it
  answered 429, or 503 with ``Retry-After``. A 500 or a connection lost after sending raises,
  because repeating could post the message twice;
- a 401 renews the token once (single-flight) and repeats the request once; this is not counted
  as a retry, and a second 401 raises :class:`AuthError`;
- a ``Retry-After`` pauses the whole client (``_limiter.py``); one longer than
  ``max_retry_after`` is not waited out: the error is raised at once with ``retry_after`` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from ._errors import (
    DecodeError,
    NotFoundError,
    RateLimitError,
    RequestTimeoutError,
    TransportError,
    UnsafeCursorError,
)
from ._limiter import Limiter, Outcome
from ._session import SessionManager, Token
from ._wire import (
    ApiRequest,
    Retry,
    backoff_delay,
    check_inside,
    error_from_response,
    same_origin,
)

__all__ = ["RetryBudget", "RetryPolicy", "Transport"]

logger = logging.getLogger("messages_async")

_RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
#: A wait is begun only if the attempt after it would still have this share of the deadline.
_DEADLINE_SHARE = 0.1
_MAX_REDIRECTS = 5


def _after(attempts: int) -> str:
    return f"after {attempts} attempt{'s' if attempts != 1 else ''}"


class RetryBudget:
    """A token bucket that caps retries of failures across the whole client.

    Without it, a server that fails every request gets ``max_retries + 1`` times the load just
    when it is least able to take it (a retry storm). Each retry of a failure (5xx, connection
    error, timeout) spends one token; each success earns back ``refill`` tokens, up to
    ``capacity``. First attempts are never held back, and waits the server asked for
    (``Retry-After``) are governed by the shared pause instead. The design follows gRPC's retry
    throttling and the AWS SDKs' retry quota: in steady state at most about ``refill`` retries
    per success.
    """

    __slots__ = ("_tokens", "capacity", "refill")

    def __init__(self, capacity: float, refill: float = 0.1) -> None:
        self.capacity = capacity
        self.refill = refill
        self._tokens = capacity

    @property
    def tokens(self) -> float:
        return self._tokens

    def try_spend(self) -> bool:
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def earn(self) -> None:
        if self._tokens < self.capacity:
            self._tokens = min(self.capacity, self._tokens + self.refill)


class RetryPolicy:
    """Retry settings of one client (or of one ``with_options`` view of it)."""

    __slots__ = (
        "attempt_timeout",
        "backoff_base",
        "backoff_max",
        "deadline",
        "max_retries",
        "max_retry_after",
        "timeout",
    )

    def __init__(
        self,
        *,
        max_retries: int,
        timeout: float,
        backoff_base: float,
        backoff_max: float,
        max_retry_after: float,
        deadline: float | None = None,
    ) -> None:
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.deadline = deadline
        # Built once per policy rather than once per attempt.
        self.attempt_timeout = aiohttp.ClientTimeout(total=timeout)

    def replace(self, **changes: object) -> RetryPolicy:
        """A copy with some settings changed (for ``Client.with_options``)."""
        fields = {name: getattr(self, name) for name in self.__slots__ if name != "attempt_timeout"}
        fields.update(changes)
        return RetryPolicy(**fields)


class _Answer:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _headers(token: Token, *, json_body: bool) -> dict[str, str]:
    headers = {
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
    ) -> None:
        self._sessions = sessions
        self._limiter = limiter
        self._max_response_bytes = max_response_bytes
        self._rng = rng
        self._clock = clock
        self._sleep = sleep
        self._budget = retry_budget

    async def send(self, request: ApiRequest, policy: RetryPolicy) -> bytes | None:
        """Send ``request``; the body of the 2xx answer (``None`` for 204), else an exception."""
        sessions = self._sessions
        sessions.check_scope(request.scope)
        retries = 0
        renewed = False
        # Set once an attempt may have reached the server without us seeing the answer, so a
        # delete that then finds nothing knows its first attempt did the work.
        maybe_acted = False
        url = request.url
        redirects = 0
        attempts = 0
        # With a deadline, this request (every attempt, wait and token renewal) ends by then.
        ends_at = None if policy.deadline is None else self._clock() + policy.deadline
        while True:
            if not same_origin(url, sessions.resource_root):
                raise UnsafeCursorError(
                    f"refused to send {request.op} to {url.origin()}: the access token is only "
                    f"sent to {sessions.resource_root.origin()}"
                )
            left = math.inf if ends_at is None else ends_at - self._clock()
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
            try:
                async with self._until(ends_at):
                    token = await sessions.token()
                    ticket = await self._limiter.acquire(priority=request.priority)
            except TimeoutError:
                raise self._past_deadline(
                    request, policy, attempts, "waiting for a token or a free slot"
                ) from None
            self._limiter.count_attempt(retry=bool(retries))
            attempts += 1
            outcome = Outcome.FAILED
            started = self._clock()
            try:
                # The deadline cuts the attempt short through asyncio (exact, and at once if it
                # has already passed) rather than through aiohttp's timeout, which treats a
                # total of zero as none and rounds long ones up to whole seconds.
                async with self._until(ends_at):
                    answer = await self._attempt(request, url, token, policy)
            except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
                error: BaseException = exc  # a certificate will not fix itself on a retry
                retryable = False
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Not connected (refused, or no connection in time): nothing was sent, so any
                # request may be retried, an add included.
                error = exc
                retryable = True
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                error = exc
                maybe_acted = True
                retryable = request.retry is Retry.IDEMPOTENT
            except TimeoutError as exc:
                error = exc
                maybe_acted = True
                retryable = request.retry is Retry.IDEMPOTENT
            else:
                error = None  # type: ignore[assignment]
                outcome = Outcome.THROTTLED if answer.status == 429 else Outcome.OK
            finally:
                self._limiter.release(ticket, outcome)
            elapsed = (self._clock() - started) * 1000
            if error is not None:
                logger.debug(
                    "%s %s -> %s (attempt %d, %.1f ms)",
                    request.method,
                    url.raw_path,
                    type(error).__name__,
                    attempts,
                    elapsed,
                )
                delay = (
                    self._backoff(retries, policy)
                    if retryable and retries < policy.max_retries
                    else None
                )
                late = delay is not None and not self._fits(ends_at, delay, policy)
                if delay is None or late or not self._budget.try_spend():
                    # The cause keeps its type and message but not its traceback: aiohttp's
                    # frames hold the request headers, the bearer token among them.
                    why = self._too_late(policy) if late else ""
                    raise self._transport_error(
                        request, error, attempts, maybe_acted, why
                    ) from error.with_traceback(None)
                await self._sleep(delay)
                retries += 1
                continue

            status = answer.status
            logger.debug(
                "%s %s -> %d (attempt %d, %.1f ms)",
                request.method,
                url.raw_path,
                status,
                attempts,
                elapsed,
            )
            if 200 <= status < 300:
                self._budget.earn()
                return answer.body if status != 204 else None
            if 300 <= status < 400 and "Location" in answer.headers:
                url = self._redirect_target(request, url, answer.headers["Location"])
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise TransportError(f"{request.op}: more than {_MAX_REDIRECTS} redirects")
                continue
            if status == 401 and not renewed:
                try:
                    async with self._until(ends_at):
                        await sessions.renew_after_401(token)
                except TimeoutError:
                    raise self._past_deadline(
                        request, policy, attempts, "renewing the refused token"
                    ) from None
                renewed = True
                continue
            exc = error_from_response(
                status, answer.headers, answer.body, now=datetime.now(UTC), granted=sessions.granted
            )
            if isinstance(exc, NotFoundError) and request.gone_means_done and maybe_acted:
                # Our earlier attempt deleted it and the answer was lost: the caller's intent
                # holds, so this is success, not an error (exactly one deletion happened).
                return None
            if status not in _RETRYABLE_STATUSES:
                raise exc
            retry_after = getattr(exc, "retry_after", None)
            shared_pause = status == 429 or (status == 503 and retry_after is not None)
            if status == 429:
                # Counted for every 429 answered, also the one that ends a call, so that
                # client.stats agrees with what the server sent (was: only retried ones).
                self._limiter.count_rate_limited()
            if not shared_pause:
                # A 5xx may come from a gateway whose upstream did the work.
                maybe_acted = True
            if request.retry is not Retry.IDEMPOTENT and not shared_pause:
                raise exc  # a 500 on add: it may have been stored; never post twice
            if retry_after is not None and retry_after > policy.max_retry_after:
                if shared_pause:
                    self._limiter.pause(retry_after)  # binds the client's other calls too
                raise exc
            if retries >= policy.max_retries:
                if shared_pause and retry_after is not None:
                    # This call gives up, but the server's Retry-After still binds every
                    # other request of the client (PROTOCOL §7).
                    self._limiter.pause(retry_after)
                raise exc
            delay = retry_after if retry_after is not None else self._backoff(retries, policy)
            if not self._fits(ends_at, delay, policy):
                if shared_pause:
                    self._limiter.pause(delay)  # this call stops; the others still wait
                exc.add_note(self._too_late(policy))
                raise exc  # the server's own error, not a timeout: it says what went wrong
            if not shared_pause and not self._budget.try_spend():
                raise exc  # the retry budget is spent: the server is failing, not blipping
            if shared_pause:
                self._limiter.pause(delay)  # everyone waits; acquire() holds us too
            else:
                await self._sleep(delay)
            retries += 1

    def _fits(self, ends_at: float | None, delay: float, policy: RetryPolicy) -> bool:
        """Whether an attempt after waiting ``delay`` would still have a tenth of the deadline.

        An attempt with only milliseconds left could not succeed; it would spend a retry and
        hide the server's error behind a timeout.
        """
        if ends_at is None or policy.deadline is None:
            return True
        return self._clock() + delay + policy.deadline * _DEADLINE_SHARE <= ends_at

    @staticmethod
    def _too_late(policy: RetryPolicy) -> str:
        return (
            f"not retried: the wait before the next attempt would leave less than a tenth of "
            f"the request's {policy.deadline:g} s deadline"
        )

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
        sent = f"{_after(attempts)}; nothing more was sent" if attempts else "nothing was sent"
        return RequestTimeoutError(
            f"{request.op} ran out of its {policy.deadline:g} s deadline {when} ({sent})"
        )

    def _backoff(self, retries: int, policy: RetryPolicy) -> float:
        return backoff_delay(
            retries, base=policy.backoff_base, cap=policy.backoff_max, rng=self._rng
        )

    async def _attempt(
        self, request: ApiRequest, url: URL, token: Token, policy: RetryPolicy
    ) -> _Answer:
        # The headers are built in the call expression, never bound to a local of this frame:
        # a traceback formatter that prints locals must not find the token here.
        async with self._sessions.session.request(
            request.method,
            url,
            data=request.body,
            headers=_headers(token, json_body=request.body is not None),
            allow_redirects=False,
            raise_for_status=False,
            timeout=policy.attempt_timeout,
        ) as response:
            length = response.content_length
            if length is not None and length > self._max_response_bytes:
                response.close()
                raise self._too_large(request, length)
            body = await self._read_capped(request, response)
            return _Answer(response.status, response.headers, body)

    async def _read_capped(self, request: ApiRequest, response: aiohttp.ClientResponse) -> bytes:
        # Counted after decompression, so a gzip bomb is cut off at the cap as well.
        cap = self._max_response_bytes
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.readany():
            size += len(chunk)
            if size > cap:
                response.close()
                raise self._too_large(request, size)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, request: ApiRequest, size: int) -> DecodeError:
        return DecodeError(
            f"the answer to {request.op} is larger than max_response_bytes "
            f"({self._max_response_bytes}; got at least {size} bytes); the connection was "
            "closed. Raise Client(max_response_bytes=...) if this is expected."
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
        tried = _after(attempts)
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        note = f"; {why}" if why else ""
        if maybe_acted and request.retry is Retry.UNSENT_ONLY:
            note += (
                "; the server may have stored it, so it was not re-sent: check the chat "
                "before adding it again"
            )
        if isinstance(error, TimeoutError):
            return RequestTimeoutError(f"{request.op} timed out {tried} ({detail}){note}")
        return TransportError(f"{request.op} failed {tried} ({detail}){note}")
