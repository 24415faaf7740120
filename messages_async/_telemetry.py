"""OpenTelemetry traces and metrics of the client's calls (the ``otel`` extra).

Imported only once the application has imported OpenTelemetry (``_observe.py``), and used only
while it has configured a global tracer or meter provider. What it records:

- a span per logical call, ``messages.<op>`` (``messages.list``, ``messages.add``, ...), and a
  span per walk (``messages.pages``, ``messages.iter``) with each page's call under it;
- under each call, one span of kind CLIENT per attempt, following the HTTP semantic
  conventions: ``http.request.method``, ``url.full`` without its query string,
  ``server.address``, ``server.port``, ``http.request.resend_count``,
  ``http.response.status_code``, ``error.type``;
- waits between attempts as ``messages.wait`` events on the call's span (reason and seconds), a
  refused token as a ``messages.token.refused`` event, and each token exchange as a
  ``messages.token`` span (a child of the call that started it);
- ``traceparent`` on each attempt, naming the attempt's span: only ever to the API's origin,
  because only the transport's attempts carry it and they only go there. W3C trace context
  only, not the application's global propagator: a third-party API has no business with the
  application's baggage;
- the metrics listed in :class:`Instruments`.

Nothing secret or personal goes into an attribute or event: no header, no body, no query
string, no chat id, no exception message (a server's error message may quote what was sent),
only exception class names. While an attempt or a token exchange is in flight, OpenTelemetry's
own aiohttp instrumentation is told to stand aside (the "suppress HTTP instrumentation" context
key), so using both gives one CLIENT span per request, not two, and no ``traceparent`` reaches
the token endpoint through it either.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Mapping
from typing import Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from yarl import URL

from ._client import __version__
from ._limiter import ClientStats
from ._models import MessagesPage
from ._observe import BACKOFF, RETRY_AFTER, Observer
from ._wire import ApiRequest

try:
    from opentelemetry.metrics._internal import _ProxyMeterProvider
except ImportError:  # pragma: no cover - the API moved it; NoOpMeterProvider still tells
    _ProxyMeterProvider = metrics.NoOpMeterProvider  # type: ignore[assignment,misc]

__all__ = ["Instruments", "OtelCall", "OtelWalk", "Telemetry", "controller_state", "current"]

T = TypeVar("T")

_SCOPE: Final = "messages_async"
_SCHEMA: Final = "https://opentelemetry.io/schemas/1.26.0"
#: Set in the context of our own requests: instrumentations of aiohttp then record nothing
#: for them (the key that ``opentelemetry.instrumentation.utils`` reads).
_SUPPRESS_HTTP: Final = getattr(otel_context, "_SUPPRESS_HTTP_INSTRUMENTATION_KEY", None)
_NO_HEADERS: Final[Mapping[str, str]] = {}
#: The HTTP semantic conventions' advice for ``http.client.request.duration``.
_DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
)


def controller_state(stats: ClientStats) -> tuple[float | None, int]:
    """The rate controller's pace (requests per second, None while it sets none) and its
    current bound on requests in flight, as the client's stats tell them."""
    return stats.pace, stats.concurrency


def _error_type(status: int | None, error: BaseException | None) -> str | None:
    if error is not None:
        return type(error).__qualname__
    if status is not None and status >= 400:
        return str(status)
    return None


#: What each of the client's own metrics reads from a client: its stats and its waits.
_Reading = Callable[[ClientStats, "Observer"], "float | None"]


class Instruments:
    """The client's metrics, made once per meter provider.

    - ``http.client.request.duration`` (s): each attempt, from sending to the last byte, with
      the method, server, status and ``error.type`` (semantic conventions);
    - ``messages.client.requests``: attempts sent (``client.stats.requests``);
    - ``messages.client.retries``: attempts that were retries (``client.stats.retries``);
    - ``messages.client.rate_limited``: 429 answers (``client.stats.rate_limited``);
    - ``messages.client.paused`` (s): seconds waited before attempts, by
      ``messages.wait.reason``: ``retry_after`` (the server's pauses, each counted once for the
      client, ``client.stats.paused_total``) and ``backoff`` (the calls' own waits);
    - ``messages.client.in_flight``: requests in flight (``client.stats.in_flight``);
    - ``messages.client.pace`` ({request}/s) and ``messages.client.concurrency``: the rate
      controller's pace and bound on requests in flight.

    Only the duration is recorded as calls go; the others are observed: read from the clients
    (held weakly) when the application's reader collects, so they cost a call nothing and
    agree with ``client.stats`` by construction. Clients of the same server are summed.
    """

    __slots__ = ("_clients", "_lock", "duration")

    def __init__(self, meter: metrics.Meter) -> None:
        self._clients: weakref.WeakSet[Observer] = weakref.WeakSet()
        # A periodic reader collects from a thread of its own while the loop adds clients.
        self._lock = threading.Lock()
        self.duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        counters: tuple[tuple[str, str, str, _Reading], ...] = (
            ("requests", "{request}", "Attempts sent.", lambda st, _: st.requests),
            ("retries", "{request}", "Attempts that were retries.", lambda st, _: st.retries),
            ("rate_limited", "{response}", "429 answers.", lambda st, _: st.rate_limited),
        )
        for name, unit, description, read in counters:
            meter.create_observable_counter(
                "messages.client." + name,
                callbacks=[self._observe(read)],
                unit=unit,
                description=description,
            )
        meter.create_observable_counter(
            "messages.client.paused",
            callbacks=[self._observe_waits],
            unit="s",
            description="Seconds waited before attempts, by reason.",
        )
        meter.create_observable_up_down_counter(
            "messages.client.in_flight",
            callbacks=[self._observe(lambda st, _: st.in_flight)],
            unit="{request}",
            description="Requests in flight.",
        )
        meter.create_observable_gauge(
            "messages.client.pace",
            callbacks=[self._observe(lambda st, _: controller_state(st)[0])],
            unit="{request}/s",
            description="The pace the rate controller holds the client to.",
        )
        meter.create_observable_gauge(
            "messages.client.concurrency",
            callbacks=[self._observe(lambda st, _: controller_state(st)[1])],
            unit="{request}",
            description="The rate controller's bound on requests in flight.",
        )

    def watch(self, client: Observer) -> None:
        """Report ``client`` from now on (until it is garbage)."""
        with self._lock:
            self._clients.add(client)

    def _totals(self, read: _Reading) -> dict[tuple[str, int], float]:
        totals: dict[tuple[str, int], float] = {}
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            where = client.where
            value = read(client.stats(), client)
            if where is not None and value is not None:
                totals[where] = totals.get(where, 0.0) + value
        return totals

    def _observe(self, read: _Reading) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(value, {"server.address": host, "server.port": port})
                for (host, port), value in self._totals(read).items()
            ]

        return callback

    def _observe_waits(self, _options: CallbackOptions) -> Iterable[Observation]:
        observations = []
        for reason, read in ((RETRY_AFTER, _paused), (BACKOFF, _backoff)):
            for (host, port), value in self._totals(read).items():
                attributes: dict[str, str | int] = {
                    "messages.wait.reason": reason,
                    "server.address": host,
                    "server.port": port,
                }
                observations.append(Observation(value, attributes))
        return observations


def _paused(_stats: ClientStats, client: Observer) -> float:
    return client.waits.paused


def _backoff(_stats: ClientStats, client: Observer) -> float:
    return client.waits.backoff


class Telemetry:
    """The tracer and the instruments of the providers configured now (either may be None)."""

    __slots__ = ("instruments", "tracer")

    def __init__(self, tracer: trace.Tracer | None, instruments: Instruments | None) -> None:
        self.tracer = tracer
        self.instruments = instruments

    def call(self, request: ApiRequest, parent: OtelWalk | None) -> OtelCall:
        return OtelCall(self, request, parent)

    def walk(self, name: str) -> OtelWalk | None:
        return None if self.tracer is None else OtelWalk(self.tracer, name)

    def start_renewal(self, exchange: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run a token exchange as a task, under a ``messages.token`` span when traced.

        The span is made current through the task's own context, not by wrapping the
        coroutine: a task cancelled before it starts never runs a wrapper's code, which would
        leave the exchange never awaited and the span never ended.
        """
        if self.tracer is None:
            return asyncio.create_task(exchange, name=name)
        span = self.tracer.start_span("messages.token", kind=SpanKind.INTERNAL)
        current = trace.set_span_in_context(span)
        if _SUPPRESS_HTTP is not None:
            current = otel_context.set_value(_SUPPRESS_HTTP, True, current)
        context = contextvars.copy_context()
        context.run(otel_context.attach, current)
        task = asyncio.create_task(exchange, name=name, context=context)
        task.add_done_callback(lambda done: _end_renewal(span, done))
        return task


def _end_renewal(span: trace.Span, task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        _fail(span, "CancelledError")
    elif (error := task.exception()) is not None:
        _fail(span, type(error).__qualname__)
    span.end()


def _detach(token: contextvars.Token[otel_context.Context] | None) -> None:
    if token is not None:
        otel_context.detach(token)


def _fail(span: trace.Span, error_type: str) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, error_type))


class OtelWalk:
    """The span of one walk; its pages' calls are its children."""

    __slots__ = ("_name", "_tracer", "context")

    def __init__(self, tracer: trace.Tracer, name: str) -> None:
        self._tracer = tracer
        self._name = name
        self.context: otel_context.Context | None = None

    async def wrap(
        self, pages: AsyncGenerator[MessagesPage, None]
    ) -> AsyncGenerator[MessagesPage, None]:
        """``pages``, with the span open from the first page asked for to the walk's end.

        The span is never made the current one: the walk's generator runs in its consumer's
        context, which would then be left holding it between pages. Page calls are given it
        as their parent instead.
        """
        span = self._tracer.start_span(self._name, kind=SpanKind.INTERNAL)
        self.context = trace.set_span_in_context(span)
        count = items = 0
        try:
            async for page in pages:
                count += 1
                items += len(page.items)
                yield page
        except Exception as exc:
            _fail(span, type(exc).__qualname__)
            raise
        finally:
            try:
                await pages.aclose()  # a page fetched ahead ends (and is recorded) first
            finally:
                span.set_attribute("messages.pages", count)
                span.set_attribute("messages.items", items)
                span.end()


class OtelCall:
    """One call's span, its attempts' spans, and their durations."""

    __slots__ = (
        "_attempt",
        "_attempt_token",
        "_context",
        "_duration",
        "_method",
        "_span",
        "_token",
        "_tracer",
    )

    def __init__(self, telemetry: Telemetry, request: ApiRequest, parent: OtelWalk | None) -> None:
        self._tracer = tracer = telemetry.tracer
        instruments = telemetry.instruments
        self._duration = None if instruments is None else instruments.duration
        self._method = request.method
        self._attempt: trace.Span | None = None
        self._attempt_token: contextvars.Token[otel_context.Context] | None = None
        self._span: trace.Span | None = None
        self._context: otel_context.Context | None = None
        self._token: contextvars.Token[otel_context.Context] | None = None
        if tracer is not None:
            parent_context = None if parent is None else parent.context
            span = tracer.start_span(
                "messages." + request.op,
                context=parent_context,
                kind=SpanKind.INTERNAL,
            )
            self._span = span
            self._context = trace.set_span_in_context(span, parent_context)
            # Current while the call runs, so a token exchange it starts is its child.
            self._token = otel_context.attach(self._context)

    def attempt_started(
        self, url: URL, shown: str, number: int, *, retry: bool
    ) -> Mapping[str, str]:
        tracer = self._tracer
        if tracer is None:
            return _NO_HEADERS
        attributes: dict[str, str | int] = {
            "http.request.method": self._method,
            "url.full": shown,
            "server.address": url.host or "",
            "server.port": url.port or 0,
        }
        if number > 1:
            attributes["http.request.resend_count"] = number - 1
        span = tracer.start_span(
            self._method, context=self._context, kind=SpanKind.CLIENT, attributes=attributes
        )
        self._attempt = span
        context = trace.set_span_in_context(span, self._context)
        if _SUPPRESS_HTTP is not None:
            context = otel_context.set_value(_SUPPRESS_HTTP, True, context)
        self._attempt_token = otel_context.attach(context)
        return _trace_context(span)

    def attempt_ended(
        self, elapsed: float, url: URL, *, status: int | None, error: BaseException | None
    ) -> None:
        error_type = _error_type(status, error)
        duration = self._duration
        if duration is not None and elapsed >= 0:
            attributes: dict[str, str | int] = {
                "http.request.method": self._method,
                "server.address": url.host or "",
                "server.port": url.port or 0,
            }
            if status is not None:
                attributes["http.response.status_code"] = status
            if error_type is not None:
                attributes["error.type"] = error_type
            duration.record(elapsed, attributes)
        span, self._attempt = self._attempt, None
        if span is None:
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error_type is not None:
            _fail(span, error_type)
        span.end()
        _detach(self._attempt_token)

    def waiting(self, reason: str, seconds: float) -> None:
        if self._span is not None:
            self._span.add_event(
                "messages.wait", {"messages.wait.reason": reason, "messages.wait.seconds": seconds}
            )

    def token_refused(self) -> None:
        if self._span is not None:
            self._span.add_event("messages.token.refused")

    def ended(self, error: BaseException | None) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            # Cut short without an answer or an error of its own: cancelled.
            _fail(attempt, type(error).__qualname__ if error is not None else "unfinished")
            attempt.end()
            _detach(self._attempt_token)
        span = self._span
        if span is None:
            return
        if error is not None:
            _fail(span, type(error).__qualname__)
        span.end()
        _detach(self._token)


def _trace_context(span: trace.Span) -> Mapping[str, str]:
    """The W3C ``traceparent`` (and ``tracestate``) naming ``span``."""
    context = span.get_span_context()
    if not context.is_valid:
        return _NO_HEADERS
    headers = {
        "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-"
        f"{context.trace_flags:02x}"
    }
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers


_cached: tuple[object, object, Telemetry | None] | None = None


def current() -> Telemetry | None:
    """The telemetry of the global providers as they are now; None when neither is set."""
    global _cached
    tracer_provider = trace.get_tracer_provider()
    meter_provider = metrics.get_meter_provider()
    cached = _cached
    if cached is not None and cached[0] is tracer_provider and cached[1] is meter_provider:
        return cached[2]
    tracer = None
    if not isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        tracer = tracer_provider.get_tracer(_SCOPE, __version__, schema_url=_SCHEMA)
    instruments = None
    if not isinstance(meter_provider, (_ProxyMeterProvider, metrics.NoOpMeterProvider)):
        instruments = Instruments(meter_provider.get_meter(_SCOPE, __version__, schema_url=_SCHEMA))
    telemetry = None if tracer is None and instruments is None else Telemetry(tracer, instruments)
    _cached = (tracer_provider, meter_provider, telemetry)
    return telemetry
