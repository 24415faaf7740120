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
- ``traceparent`` on each attempt, with the attempt's span: only ever to the API's origin,
  because only the transport's attempts carry it and they only go there;
- the metrics listed in :class:`Instruments`.

Nothing secret or personal goes into an attribute or event: no header, no body, no query
string, no chat id, no exception message (a server's error message may quote what was sent),
only exception class names. While an attempt or a token exchange is in flight, OpenTelemetry's
own aiohttp instrumentation is told to stand aside (the "suppress HTTP instrumentation" context
key), so using both gives one CLIENT span per request, not two, and no ``traceparent`` reaches
the token endpoint through it either.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import AsyncGenerator, Coroutine, Mapping
from typing import Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from ._client import __version__
from ._limiter import Limiter
from ._models import MessagesPage
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
#: W3C trace context only, not the application's global propagator: a third-party API has no
#: business with the application's baggage.
_PROPAGATOR: Final = TraceContextTextMapPropagator()
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


def controller_state(limiter: Limiter) -> tuple[float | None, int]:
    """The rate controller's pace (requests per second, None while it sets none) and its
    current bound on requests in flight."""
    stats = limiter.stats()
    return stats.pace, stats.concurrency


def _error_type(status: int | None, error: BaseException | None) -> str | None:
    if error is not None:
        return type(error).__qualname__
    if status is not None and status >= 400:
        return str(status)
    return None


class Instruments:
    """The client's metrics, made once per meter provider.

    - ``http.client.request.duration`` (s): each attempt, from sending to the last byte, with
      the method, server, status and ``error.type`` (semantic conventions);
    - ``messages.client.requests``: attempts sent (``client.stats.requests``);
    - ``messages.client.retries``: attempts that were retries (``client.stats.retries``);
    - ``messages.client.rate_limited``: 429 answers (``client.stats.rate_limited``);
    - ``messages.client.paused`` (s): seconds waited before attempts, by
      ``messages.wait.reason``: ``retry_after`` (the server's pauses, each counted once for the
      client, ``client.stats.paused_total``) and ``backoff`` (each call's own waits);
    - ``messages.client.in_flight``: attempts being sent or awaiting an answer;
    - ``messages.client.pace`` ({request}/s) and ``messages.client.concurrency``: the rate
      controller's current pace and bound on requests in flight, after each attempt.
    """

    __slots__ = (
        "concurrency",
        "duration",
        "in_flight",
        "pace",
        "paused",
        "rate_limited",
        "requests",
        "retries",
    )

    def __init__(self, meter: metrics.Meter) -> None:
        self.duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of HTTP client requests.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self.requests = meter.create_counter(
            "messages.client.requests", unit="{request}", description="Attempts sent."
        )
        self.retries = meter.create_counter(
            "messages.client.retries", unit="{request}", description="Attempts that were retries."
        )
        self.rate_limited = meter.create_counter(
            "messages.client.rate_limited", unit="{response}", description="429 answers."
        )
        self.paused = meter.create_counter(
            "messages.client.paused", unit="s", description="Seconds waited before attempts."
        )
        self.in_flight = meter.create_up_down_counter(
            "messages.client.in_flight", unit="{request}", description="Attempts in flight."
        )
        self.pace = meter.create_gauge(
            "messages.client.pace",
            unit="{request}/s",
            description="The pace the rate controller holds the client to.",
        )
        self.concurrency = meter.create_gauge(
            "messages.client.concurrency",
            unit="{request}",
            description="The rate controller's bound on attempts in flight.",
        )


class Telemetry:
    """The tracer and the instruments of the providers configured now (either may be None)."""

    __slots__ = ("instruments", "tracer")

    def __init__(self, tracer: trace.Tracer | None, instruments: Instruments | None) -> None:
        self.tracer = tracer
        self.instruments = instruments

    def call(self, request: ApiRequest, parent: OtelWalk | None, limiter: Limiter) -> OtelCall:
        return OtelCall(self, request, parent, limiter)

    def walk(self, name: str) -> OtelWalk | None:
        return None if self.tracer is None else OtelWalk(self.tracer, name)

    def renewal(self, exchange: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        return exchange if self.tracer is None else _traced_renewal(self.tracer, exchange)


async def _traced_renewal(tracer: trace.Tracer, exchange: Coroutine[Any, Any, T]) -> T:
    span = tracer.start_span("messages.token", kind=SpanKind.INTERNAL)
    context = trace.set_span_in_context(span)
    if _SUPPRESS_HTTP is not None:
        context = otel_context.set_value(_SUPPRESS_HTTP, True, context)
    token = otel_context.attach(context)
    try:
        return await exchange
    except BaseException as exc:
        _fail(span, type(exc).__qualname__)
        raise
    finally:
        span.end()
        otel_context.detach(token)


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
    """One call's span, its attempts' spans, and the metrics they add to."""

    __slots__ = (
        "_attempt",
        "_attempt_token",
        "_context",
        "_instruments",
        "_limiter",
        "_method",
        "_open",
        "_span",
        "_token",
        "_tracer",
        "_where",
    )

    def __init__(
        self, telemetry: Telemetry, request: ApiRequest, parent: OtelWalk | None, limiter: Limiter
    ) -> None:
        self._tracer = tracer = telemetry.tracer
        self._instruments = telemetry.instruments
        self._limiter = limiter
        self._method = request.method
        url = request.url
        self._where: dict[str, str | int] = {
            "server.address": url.host or "",
            "server.port": url.port or 0,
        }
        self._open = False
        self._attempt: trace.Span | None = None
        self._attempt_token: contextvars.Token[otel_context.Context] | None = None
        self._span: trace.Span | None = None
        self._context: otel_context.Context | None = None
        self._token: contextvars.Token[otel_context.Context] | None = None
        if tracer is not None:
            span = tracer.start_span(
                "messages." + request.op,
                context=None if parent is None else parent.context,
                kind=SpanKind.INTERNAL,
                attributes={"messages.operation": request.op},
            )
            self._span = span
            self._context = trace.set_span_in_context(
                span, None if parent is None else parent.context
            )
            # Current while the call runs, so a token exchange it starts is its child.
            self._token = otel_context.attach(self._context)

    def attempt_started(
        self, url: URL, shown: str, number: int, *, retry: bool
    ) -> Mapping[str, str]:
        self._open = True
        instruments = self._instruments
        if instruments is not None:
            where = self._where
            instruments.requests.add(1, where)
            if retry:
                instruments.retries.add(1, where)
            instruments.in_flight.add(1, where)
        tracer = self._tracer
        if tracer is None:
            return {}
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
        headers: dict[str, str] = {}
        _PROPAGATOR.inject(headers, context)
        return headers

    def attempt_ended(
        self, elapsed: float, *, status: int | None, error: BaseException | None
    ) -> None:
        self._open = False
        error_type = _error_type(status, error)
        instruments = self._instruments
        if instruments is not None:
            where = self._where
            attributes: dict[str, str | int] = {"http.request.method": self._method, **where}
            if status is not None:
                attributes["http.response.status_code"] = status
            if error_type is not None:
                attributes["error.type"] = error_type
            if elapsed >= 0 and math.isfinite(elapsed):
                instruments.duration.record(elapsed, attributes)
            instruments.in_flight.add(-1, where)
            if status == 429:
                instruments.rate_limited.add(1, where)
            pace, bound = controller_state(self._limiter)
            instruments.concurrency.set(bound, where)
            if pace is not None:
                instruments.pace.set(pace, where)
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error_type is not None:
            _fail(span, error_type)
        span.end()
        _detach(self._attempt_token)

    def waiting(self, reason: str, seconds: float, counted: float) -> None:
        if self._span is not None:
            self._span.add_event(
                "messages.wait", {"messages.wait.reason": reason, "messages.wait.seconds": seconds}
            )
        if self._instruments is not None and counted > 0:
            self._instruments.paused.add(counted, {"messages.wait.reason": reason, **self._where})

    def token_refused(self) -> None:
        if self._span is not None:
            self._span.add_event("messages.token.refused")

    def ended(self, error: BaseException | None) -> None:
        if self._open:
            self._cut_short(error)
        span = self._span
        if span is None:
            return
        if error is not None:
            _fail(span, type(error).__qualname__)
        span.end()
        _detach(self._token)

    def _cut_short(self, error: BaseException | None) -> None:
        """End an attempt that never ended by itself (cancelled, or past the deadline)."""
        self._open = False
        if self._instruments is not None:
            self._instruments.in_flight.add(-1, self._where)
        span, self._attempt = self._attempt, None
        if span is not None:
            _fail(span, type(error).__qualname__ if error is not None else "unfinished")
            span.end()
            _detach(self._attempt_token)


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
