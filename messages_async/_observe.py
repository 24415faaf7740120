"""Who hears about a call: OpenTelemetry, the client's event hooks, both, or nobody.

The transport reports a few moments of each call to a :class:`CallObserver`: an attempt starts
(and gets the headers to send with it, ``traceparent``), an attempt ends with a status or an
error, the call waits (and why), the token was refused, the call ends. It never asks who is
listening. This module decides, once per call:

- nobody (no OpenTelemetry provider, no hooks): the client's one :class:`QuietCall`, shared by
  every call, which does nothing but count the waits for ``client.stats``; no allocation, no
  import;
- otherwise an :class:`ObservedCall` that feeds ``_telemetry.py`` and ``_hooks.py``.

OpenTelemetry is looked up when a call is made, not when the client is built, because
applications configure it after importing their libraries; and it is not imported at all unless
the application has imported it first (nobody can have configured a provider otherwise).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._hooks import ErrorView, EventHooks, RequestView, ResponseView, run_hooks
from ._limiter import ClientStats, Limiter
from ._wire import ApiRequest

if TYPE_CHECKING:
    from ._telemetry import OtelCall, OtelWalk, Telemetry

__all__ = [
    "BACKOFF",
    "RETRY_AFTER",
    "CallObserver",
    "Observer",
    "Waits",
    "public_url",
]

T = TypeVar("T")

#: Why a call waits before its next attempt: its own backoff after a failure, or a pause the
#: server asked for (``Retry-After``), which holds every request of the client.
BACKOFF: Final = "backoff"
RETRY_AFTER: Final = "retry_after"

_NO_HEADERS: Final[Mapping[str, str]] = {}


def public_url(url: URL) -> str:
    """``url`` as telemetry and hooks may show it: no query string (cursors and filters carry
    search text), no fragment, no user info."""
    if url.raw_user is not None or url.raw_password is not None:
        url = url.with_user(None)
    text = str(url)  # cut as text: cheaper than building another URL for every attempt
    for mark in ("?", "#"):
        cut = text.find(mark)
        if cut >= 0:
            text = text[:cut]
    return text


#: Answer headers that may carry a URL with its query string (cursors, search text).
_URL_HEADERS: Final = frozenset({"location", "content-location"})
#: Answer headers that may carry a credential of the server's.
_SECRET_HEADERS: Final = frozenset({"set-cookie", "set-cookie2"})


def public_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    """Answer headers as hooks may see them: read-only, cookies left out, and URLs in them
    without their query strings."""
    shown: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _SECRET_HEADERS:
            continue
        if lowered in _URL_HEADERS:
            try:
                value = public_url(URL(value))
            except ValueError:
                continue
        shown.add(name, value)
    return CIMultiDictProxy(shown)


class Waits:
    """Seconds this client's calls have waited before attempts, by reason.

    ``paused``: the server's pauses (``Retry-After``). Every call that waits out the same pause
    reports it; only the part of a pause that reaches beyond the ones already counted is added,
    so this is how long the client was held, not the sum over its calls. ``backoff``: the calls'
    own backoff, summed over calls.
    """

    __slots__ = ("_clock", "_until", "backoff", "paused")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until = 0.0
        self.paused = 0.0
        self.backoff = 0.0

    def note(self, reason: str, seconds: float) -> None:
        """A call will wait ``seconds`` for ``reason``."""
        if reason != RETRY_AFTER:
            self.backoff += seconds
            return
        now = self._clock()
        until = now + seconds
        added = until - max(now, self._until)
        if added > 0:
            self._until = until
            self.paused += added


class CallObserver:
    """What the transport reports about one call. This base passes it on to nobody."""

    __slots__ = ()

    async def attempt_started(self, url: URL, number: int, *, retry: bool) -> Mapping[str, str]:
        """Attempt ``number`` (from 1) is about to go to ``url``; ``retry`` as counted in
        ``client.stats``. Returns headers to send with it."""
        return _NO_HEADERS

    async def attempt_ended(
        self,
        elapsed: float,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The attempt got an answer (``status``, ``headers``) or ended without one (``error``),
        ``elapsed`` seconds after it was sent."""

    def waiting(self, reason: str, seconds: float) -> None:
        """The call waits ``seconds`` before its next attempt, for ``reason``."""

    def token_refused(self) -> None:
        """The server refused the token (401); the call renews it and tries again."""

    def ended(self, error: BaseException | None) -> None:
        """The call is over: it returned, or raised ``error`` (a cancellation included)."""


class QuietCall(CallObserver):
    """Every call of a client nobody observes: counts its waits, nothing else."""

    __slots__ = ("_waits",)

    def __init__(self, waits: Waits) -> None:
        self._waits = waits

    def waiting(self, reason: str, seconds: float) -> None:
        self._waits.note(reason, seconds)


class ObservedCall(CallObserver):
    """One call that OpenTelemetry (``otel``), the hooks, or both hear about."""

    __slots__ = ("_hooks", "_otel", "_request", "_url", "_view", "_waits")

    def __init__(
        self,
        request: ApiRequest,
        otel: OtelCall | None,
        hooks: EventHooks | None,
        waits: Waits,
    ) -> None:
        self._request = request
        self._otel = otel
        self._hooks = hooks
        self._waits = waits
        self._view: RequestView | None = None
        self._url = request.url

    async def attempt_started(self, url: URL, number: int, *, retry: bool) -> Mapping[str, str]:
        request, hooks = self._request, self._hooks
        self._url = url
        shown = public_url(url)
        if hooks is not None:
            self._view = RequestView(request.op, request.method, shown, number)
            if hooks.request:
                await run_hooks(hooks.request, self._view)
        if self._otel is None:
            return _NO_HEADERS
        return self._otel.attempt_started(url, shown, number, retry=retry)

    async def attempt_ended(
        self,
        elapsed: float,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        error: BaseException | None = None,
    ) -> None:
        if self._otel is not None:
            self._otel.attempt_ended(elapsed, self._url, status=status, error=error)
        hooks, view = self._hooks, self._view
        if hooks is None or view is None:
            return
        if status is not None:
            if hooks.response:
                shown = _NO_HEADERS if headers is None else public_headers(headers)
                answer = ResponseView(view, status, shown, elapsed)
                await run_hooks(hooks.response, answer)
        elif hooks.error:
            name = type(error).__name__ if error is not None else "unknown"
            await run_hooks(hooks.error, ErrorView(view, name, elapsed))

    def waiting(self, reason: str, seconds: float) -> None:
        self._waits.note(reason, seconds)
        if self._otel is not None:
            self._otel.waiting(reason, seconds)

    def token_refused(self) -> None:
        if self._otel is not None:
            self._otel.token_refused()

    def ended(self, error: BaseException | None) -> None:
        if self._otel is not None:
            self._otel.ended(error)


class Observer:
    """The observers of one client's calls (shared by its ``with_options`` views)."""

    __slots__ = ("__weakref__", "_hooks", "_limiter", "_quiet", "_watched_by", "waits", "where")

    def __init__(
        self,
        hooks: EventHooks | None,
        limiter: Limiter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hooks = hooks if hooks else None
        self._limiter = limiter
        self.waits = Waits(clock)
        self._quiet = QuietCall(self.waits)
        #: The API's host and port, once a call has been made; metrics are labelled with it.
        self.where: tuple[str, int] | None = None
        self._watched_by: object = None

    def stats(self) -> ClientStats:
        """``client.stats``: the limiter's counters and the waits counted here."""
        return attrs.evolve(self._limiter.stats(), paused_total=self.waits.paused)

    def call(self, request: ApiRequest, parent: OtelWalk | None = None) -> CallObserver:
        """The observer of a call of ``request`` (a page of the walk ``parent``)."""
        telemetry = _telemetry_now()
        hooks = self._hooks
        if telemetry is None and hooks is None:
            return self._quiet
        otel = None
        if telemetry is not None:
            instruments = telemetry.instruments
            if instruments is not None and self._watched_by is not instruments:
                # The counters and gauges read this client's state when they are collected.
                url = request.url
                self.where = (url.host or "", url.port or 0)
                instruments.watch(self)
                self._watched_by = instruments
            otel = telemetry.call(request, parent)
        return ObservedCall(request, otel, hooks, self.waits)

    def walk(self, name: str) -> OtelWalk | None:
        """A span for a walk (its ``wrap`` runs the walk's pages under it), when traced."""
        telemetry = _telemetry_now()
        return None if telemetry is None else telemetry.walk(name)

    def start_renewal(self, exchange: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """A token exchange as a task, under a span of its own when traced."""
        telemetry = _telemetry_now()
        if telemetry is None:
            return asyncio.create_task(exchange, name=name)
        return telemetry.start_renewal(exchange, name)


_current: Callable[[], Telemetry | None] | None = None
_unusable = False


def _telemetry_now() -> Telemetry | None:
    """OpenTelemetry's providers as configured now, or None: not imported, or no provider."""
    global _current, _unusable
    current = _current
    if current is None:
        modules = sys.modules
        if _unusable or (
            modules.get("opentelemetry.trace") is None
            and modules.get("opentelemetry.metrics") is None
        ):
            return None
        try:
            from . import _telemetry
        except ImportError:  # an OpenTelemetry too old or broken: the client works without
            _unusable = True
            return None
        current = _current = _telemetry.current
    return current()
