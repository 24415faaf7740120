"""Row: the cost of OpenTelemetry on a walk at zero added latency, where it shows most.

``client.messages.iter`` over one chat with the SDK's tracer and meter providers configured
(every span sampled, a batch span processor handing spans to an exporter that drops them, and a
metric reader aggregating every instrument), against the same walk with no provider. The
providers are set and unset between the interleaved repeats, as the client looks them up per
call.

A second line prices what the client does for telemetry when nobody listens: the quiet path
of one call (the per-call look-up and the observer calls of one attempt), timed on its own in
a loop and expressed as a share of a page's time in the same walk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.util._once import Once

from messages_async._wire import build_chats

from .._harness import (
    Context,
    Line,
    ServerProcess,
    Target,
    ainterleave,
    fmt_rate,
    fmt_seconds,
    median,
    paired_ratio,
    timed,
)
from ._clients import count_library, library_client

__all__ = ["NAME", "run"]

NAME = "tracing"
TRACED = Target("<=", 1.05)
QUIET = Target("<=", 1.01)
LATENCY = 0.02


class _Dropped(SpanExporter):
    """An exporter that drops what it is given: the cost measured is the client's and the
    SDK's, not a collector's."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def _unset_providers() -> None:
    # The API sets each global provider once per process; the row switches them on and off.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None


Providers = tuple[TracerProvider | None, MeterProvider | None]


def _set_providers(providers: Providers) -> None:
    _unset_providers()
    tracer_provider, meter_provider = providers
    if tracer_provider is not None:
        trace.set_tracer_provider(tracer_provider)
    if meter_provider is not None:
        metrics.set_meter_provider(meter_provider)


async def _quiet_call_seconds(client: Any, calls: int) -> float:
    """CPU seconds per call of what the transport asks of its observer when nobody listens."""
    observer = client._observer
    request = build_chats(client._sessions.resource_root)
    start = time.process_time()
    for _ in range(calls):
        call = observer.call(request)
        await call.attempt_started(request.url, 1, retry=False)
        await call.attempt_ended(0.001, status=200, headers={})
        call.ended(None)
    return (time.process_time() - start) / calls


def _sdk_floor_seconds(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> float:
    """CPU seconds the SDK itself takes for what one page records, with no client around it:
    a call span, an attempt span with the same attributes, one duration."""
    tracer = tracer_provider.get_tracer("floor")
    histogram = meter_provider.get_meter("floor").create_histogram("floor.duration", unit="s")
    attributes: dict[str, str | int] = {
        "http.request.method": "GET",
        "url.full": "http://127.0.0.1:8080/api/v1/messages/",
        "server.address": "127.0.0.1",
        "server.port": 8080,
    }
    calls = 2_000
    start = time.process_time()
    for _ in range(calls):
        call = tracer.start_span("messages.list")
        context = trace.set_span_in_context(call)
        attempt = tracer.start_span("GET", context=context, attributes=attributes)
        attempt.set_attribute("http.response.status_code", 200)
        attempt.end()
        histogram.record(0.001, attributes)
        call.end()
    return (time.process_time() - start) / calls


class _Walk:
    """One walk, timed both ways: wall clock, and this process's CPU (all its threads)."""

    def __init__(self, client: Any, chat_id: int, messages: int) -> None:
        self._client = client
        self._chat_id = chat_id
        self._messages = messages
        self.cpu: dict[str, list[float]] = {}
        self.seconds: dict[str, list[float]] = {}
        self.quiet_call = 0.0

    def variant(self, name: str, providers: Providers) -> Callable[[], Awaitable[float]]:
        self.cpu[name] = []

        async def measure() -> float:
            _set_providers(providers)
            try:
                cpu = time.process_time()
                seconds = await timed(
                    lambda: count_library(self._client, self._chat_id), self._messages
                )()
                self.cpu[name].append(time.process_time() - cpu)
                return seconds
            finally:
                _unset_providers()

        return measure


async def _measure(
    ctx: Context,
    info: dict[str, Any],
    messages: int,
    repeats: int,
    variants: dict[str, Providers],
) -> _Walk:
    async with library_client(info) as client:
        (chat,) = await client.messages.chats()
        walk = _Walk(client, chat.chat_id, messages)
        walk.seconds = await ainterleave(
            {name: walk.variant(name, providers) for name, providers in variants.items()},
            repeats,
        )
        walk.quiet_call = await _quiet_call_seconds(client, 2_000 if ctx.quick else 20_000)
    return walk


def run(ctx: Context) -> list[Line]:
    messages = 1_000 if ctx.quick else 10_000
    slow_pages = 3 if ctx.quick else 20
    pages = messages // 100
    exporter = _Dropped()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    # What services often run: one trace in ten recorded, unless the caller's is.
    sampled_provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    sampled_provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    traced: Providers = (tracer_provider, meter_provider)
    quiet: Providers = (None, None)
    # A walk is short next to the noise of a shared machine: twice the usual pairs.
    repeats = ctx.repeats * 2
    try:
        with ServerProcess(chats=1, messages_per_chat=messages) as server:
            variants = {
                "traced": traced,
                "sampled": (sampled_provider, meter_provider),
                "metrics": (None, meter_provider),
                "quiet": quiet,
            }
            fast = asyncio.run(_measure(ctx, server.info, messages, repeats, variants))
        with ServerProcess(chats=1, messages_per_chat=slow_pages * 100, latency=LATENCY) as server:
            variants = {"traced": traced, "quiet": quiet}
            slow = asyncio.run(_measure(ctx, server.info, slow_pages * 100, ctx.repeats, variants))
        floor = _sdk_floor_seconds(tracer_provider, meter_provider)
    finally:
        _unset_providers()
        for provider in (tracer_provider, sampled_provider, meter_provider):
            provider.shutdown()
    if exporter.spans < pages:
        raise RuntimeError(f"only {exporter.spans} spans were exported for {pages} pages")
    seconds = fast.seconds
    rates = {name: [messages / t for t in times] for name, times in seconds.items()}
    page_cpu = median(fast.cpu["quiet"]) / pages
    return [
        Line(
            NAME,
            f"iter() over 1 chat × {pages} pages, no latency: tracer and meter providers set "
            "vs none (time)",
            fmt_rate(median(rates["traced"]), "msg"),
            fmt_rate(median(rates["quiet"]), "msg"),
            paired_ratio(seconds["traced"], seconds["quiet"]),
            TRACED,
        ),
        Line(
            NAME,
            "the same walk's CPU (the client process, all threads), providers set vs none",
            fmt_seconds(median(fast.cpu["traced"])),
            fmt_seconds(median(fast.cpu["quiet"])),
            paired_ratio(fast.cpu["traced"], fast.cpu["quiet"]),
        ),
        Line(
            NAME,
            "the same walk's CPU, one trace in ten sampled (and metrics) vs none",
            fmt_seconds(median(fast.cpu["sampled"])),
            fmt_seconds(median(fast.cpu["quiet"])),
            paired_ratio(fast.cpu["sampled"], fast.cpu["quiet"]),
        ),
        Line(
            NAME,
            "the same walk's CPU, a meter provider only vs none",
            fmt_seconds(median(fast.cpu["metrics"])),
            fmt_seconds(median(fast.cpu["quiet"])),
            paired_ratio(fast.cpu["metrics"], fast.cpu["quiet"]),
        ),
        Line(
            NAME,
            "the SDK alone recording one page's spans and duration vs a page's client CPU",
            fmt_seconds(floor),
            fmt_seconds(page_cpu),
            (page_cpu + floor) / page_cpu,
        ),
        Line(
            NAME,
            f"{slow_pages} pages at {LATENCY * 1000:g} ms latency: providers set vs none (time)",
            fmt_seconds(median(slow.seconds["traced"])),
            fmt_seconds(median(slow.seconds["quiet"])),
            paired_ratio(slow.seconds["traced"], slow.seconds["quiet"]),
        ),
        Line(
            NAME,
            "no provider: the telemetry path of one call vs a page's client CPU",
            fmt_seconds(fast.quiet_call),
            fmt_seconds(page_cpu),
            (page_cpu + fast.quiet_call) / page_cpu,
            QUIET,
        ),
    ]
