"""OpenTelemetry: the spans, events and metrics of real calls against the emulator.

The SDK's in-memory span exporter and metric reader stand in for a collector; the global
providers are set after the client is built (as applications do) and reset after each test.
Every fault is injected by the emulator for real.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import client_for, make_client
from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.util._once import Once
from test_export import start_cli

import messages_async as ma
from messages_async._observe import Waits
from messages_async._wire import build_chats
from messages_async.testing import Fault, MessagesServer, OriginRecorder

ROOT = Path(__file__).resolve().parent.parent


class Collected:
    """What the application's OpenTelemetry pipeline received."""

    def __init__(self) -> None:
        self.spans_exporter = InMemorySpanExporter()
        # Shut down by the fixture, not again at exit.
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_exporter.get_finished_spans())

    def metrics(self) -> MetricsData:
        data = self.reader.get_metrics_data()
        assert data is not None
        return data

    def points(self, name: str) -> list[Any]:
        return [
            point
            for resource in self.metrics().resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def total(self, name: str, **attributes: object) -> float:
        points = self.points(name)
        return sum(
            p.value for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())
        )

    def exported_text(self) -> str:
        """Every span and metric as a collector would receive them, as one string."""
        spans = "\n".join(span.to_json() for span in self.spans())
        return spans + "\n" + self.metrics().to_json()


def _reset_globals() -> None:
    # The API lets an application set each provider once per process; tests set them anew.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None
    metrics_internal._PROXY_METER_PROVIDER = metrics_internal._ProxyMeterProvider()


@pytest.fixture
def otel() -> Iterator[Collected]:
    """Providers made now; :func:`configure` makes them the global ones."""
    collected = Collected()
    _reset_globals()
    yield collected
    _reset_globals()
    collected.tracer_provider.shutdown()
    collected.meter_provider.shutdown()


def configure(collected: Collected) -> None:
    trace.set_tracer_provider(collected.tracer_provider)
    metrics.set_meter_provider(collected.meter_provider)


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=3, messages_per_chat=250, seed=5) as srv:
        yield srv


# --- the span tree ---------------------------------------------------------------------------


def render_tree(spans: list[ReadableSpan], root: ReadableSpan) -> str:
    """A span and everything under it, children and events in time order, as a text tree:
    the same picture the README draws."""
    lines = [_label(root)]

    def walk(span: ReadableSpan, prefix: str) -> None:
        assert span.context is not None
        children: list[tuple[int, str, ReadableSpan | None]] = [
            (child.start_time or 0, _label(child), child)
            for child in spans
            if child.parent is not None and child.parent.span_id == span.context.span_id
        ]
        children += [
            (event.timestamp, f"· {event.name}" + _reason(event.attributes), None)
            for event in span.events
        ]
        children.sort(key=lambda c: c[0])
        for index, (_, label, child) in enumerate(children):
            last = index == len(children) - 1
            lines.append(prefix + ("└── " if last else "├── ") + label)
            if child is not None:
                walk(child, prefix + ("    " if last else "│   "))

    walk(root, "")
    return "\n".join(lines)


def _label(span: ReadableSpan) -> str:
    attributes = span.attributes or {}
    if span.kind is SpanKind.CLIENT:
        return f"{span.name} {attributes['http.response.status_code']}"
    return span.name


def _reason(attributes: Any) -> str:
    reason = (attributes or {}).get("messages.wait.reason")
    return f" ({reason})" if reason else ""


def the(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    found = [
        s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda s: s.start_time or 0)


async def test_span_tree_of_a_walk_is_the_one_the_readme_draws(
    otel: Collected, server: MessagesServer
) -> None:
    async with client_for(server) as client:
        configure(otel)  # after the client was made: providers are looked up per call
        chat_id = server.chat_ids()[0]
        # Request 1 (page 1) passes every fault's allowance; page 2 is answered 429, then
        # 503, then 200; page 3 meets a revoked token (401), renews it and gets its 200.
        server.inject(Fault.rate_limited("0.05"), path="messages/", after=1)
        server.inject(Fault.status(503), path="messages/", after=1)
        server.inject(Fault.expire_token(), path="messages/", after=2)
        got = [m.id async for m in client.messages.iter(chat_id, limit=100)]
        assert got == [m["id"] for m in server.messages(chat_id)]
        stats = client.stats

    spans = otel.spans()
    walk = the(spans, "messages.iter")
    tree = render_tree(spans, walk)
    assert tree == textwrap.dedent(
        """\
        messages.iter
        ├── messages.list
        │   └── GET 200
        ├── messages.list
        │   ├── GET 429
        │   ├── · messages.wait (retry_after)
        │   ├── GET 503
        │   ├── · messages.wait (backoff)
        │   └── GET 200
        └── messages.list
            ├── GET 401
            ├── · messages.token.refused
            ├── messages.token
            └── GET 200"""
    )
    readme = (ROOT / "README.md").read_text()
    assert tree in readme, "README's span tree differs from what the client records"

    assert walk.attributes == {"messages.pages": 3, "messages.items": 250}
    assert walk.parent is None
    pages = children(spans, walk)
    assert all(p.name == "messages.list" and not p.attributes for p in pages)
    attempts = [a for p in pages for a in children(spans, p) if a.kind is SpanKind.CLIENT]
    assert len(attempts) == stats.requests == 6
    origin = server.resource_origin.removeprefix("http://")
    for attempt in attempts:
        attributes = attempt.attributes or {}
        assert attributes["http.request.method"] == "GET"
        assert attributes["url.full"] == server.resource_uri + "messages/"  # no query string
        assert f"{attributes['server.address']}:{attributes['server.port']}" == origin
    by_status = [(a.attributes or {}).get("http.response.status_code") for a in attempts]
    assert by_status == [200, 429, 503, 200, 401, 200]
    assert [(a.attributes or {}).get("error.type") for a in attempts] == [
        None,
        "429",
        "503",
        None,
        "401",
        None,
    ]
    resends = [(a.attributes or {}).get("http.request.resend_count") for a in attempts]
    assert resends == [None, None, 1, 2, None, 1]
    waits = {e.attributes["messages.wait.reason"]: e.attributes for e in pages[1].events}  # type: ignore[index]
    assert waits["retry_after"]["messages.wait.seconds"] == pytest.approx(0.05, abs=0.02)
    assert 0 <= waits["backoff"]["messages.wait.seconds"] <= 0.05  # backoff_max in make_client


async def test_every_attempt_sends_its_own_traceparent_to_the_api_and_none_elsewhere(
    otel: Collected, server: MessagesServer
) -> None:
    configure(otel)
    async with OriginRecorder() as elsewhere, client_for(server) as client:
        server.inject(Fault.expire_token(), path="messages/")  # a renewal mid-call
        await client.messages.chats()
        server.inject(Fault.redirect(elsewhere.url("/steal")))
        with pytest.raises(ma.UnsafeCursorError):
            await client.messages.chats()
        server.inject(Fault.foreign_cursor(elsewhere.origin), path="messages/")
        with pytest.raises(ma.UnsafeCursorError):
            async for _ in client.messages.pages(server.chat_ids()[0], limit=10):
                pass
        assert elsewhere.requests == []

    by_span = {format(s.context.span_id, "016x"): s for s in otel.spans() if s.context is not None}
    resource = server.resource_requests()
    assert len(resource) == 4  # 401 and its repeat, the redirect, the foreign cursor's page
    for record in resource:
        parent = record.headers["traceparent"]
        version, trace_id, span_id, _flags = parent.split("-")
        span = by_span[span_id]  # the attempt's own span, not the call's
        assert span.kind is SpanKind.CLIENT
        assert version == "00"
        assert trace_id == format(span.context.trace_id, "032x")  # type: ignore[union-attr]
    tokens = [r for r in server.requests if r.origin == "token"]
    assert len(tokens) == 2  # the sign-in and the renewal after the 401
    assert all("traceparent" not in r.headers and "tracestate" not in r.headers for r in tokens)


async def test_with_the_aiohttp_instrumentation_each_request_has_one_span(
    otel: Collected, server: MessagesServer
) -> None:
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

    configure(otel)
    instrumentor = AioHttpClientInstrumentor()
    instrumentor.instrument()
    try:
        async with client_for(server) as client:  # its session is made instrumented
            server.inject(Fault.expire_token(), path="messages/")
            await client.messages.chats()
    finally:
        instrumentor.uninstrument()
    spans = otel.spans()
    scopes = {s.instrumentation_scope.name for s in spans if s.instrumentation_scope}
    assert scopes == {"messages_async"}, "the aiohttp instrumentation recorded our requests too"
    assert [s.name for s in spans if s.kind is SpanKind.CLIENT] == ["GET", "GET"]
    tokens = [r for r in server.requests if r.origin == "token"]
    assert tokens
    assert all("traceparent" not in r.headers for r in tokens)


# --- metrics -----------------------------------------------------------------------------------


async def test_metrics_add_up_to_client_stats(otel: Collected) -> None:
    async with MessagesServer(chats=6, messages_per_chat=60, seed=2) as server:
        async with client_for(server, max_concurrency=4) as client:
            configure(otel)
            server.inject(Fault.rate_limited("0.05"), path="messages/", after=3, times=2)
            server.inject(Fault.status(503), path="messages/", after=5, times=2)
            # Twice: aiohttp itself sends a GET again once when a kept-alive connection drops.
            server.inject(Fault.drop(), path="messages/", after=8, times=2)
            server.inject(Fault.status(500), path="messages/", after=10)
            got = [item async for item in client.messages.iter_many(server.chat_ids(), limit=20)]
            assert len(got) == server.all_message_count()
            stats = client.stats
        port = server.port

    assert stats.retries >= 5
    assert stats.rate_limited == 2
    here = {"server.port": port}
    assert otel.total("messages.client.requests", **here) == stats.requests
    assert otel.total("messages.client.retries", **here) == stats.retries
    assert otel.total("messages.client.rate_limited", **here) == stats.rate_limited
    assert otel.total("messages.client.in_flight", **here) == stats.in_flight == 0
    durations = otel.points("http.client.request.duration")
    assert sum(p.count for p in durations if p.attributes["server.port"] == port) == stats.requests
    statuses = {
        p.attributes.get("http.response.status_code", p.attributes.get("error.type")): p.count
        for p in durations
    }
    assert statuses[429] == 2
    assert statuses[503] == 2
    assert statuses[500] == 1
    assert sum(v for k, v in statuses.items() if isinstance(k, str)) == 1  # the dropped one
    (bound,) = otel.points("messages.client.concurrency")
    assert bound.value == stats.concurrency
    (pace,) = otel.points("messages.client.pace")
    assert pace.value == pytest.approx(stats.pace)
    paused = otel.total("messages.client.paused", **{"messages.wait.reason": "retry_after"})
    assert paused == pytest.approx(stats.paused_total)
    assert paused > 0
    assert otel.total("messages.client.paused", **{"messages.wait.reason": "backoff"}) > 0


def test_a_pause_is_counted_once_however_many_calls_wait_it_out() -> None:
    now = [100.0]
    waits = Waits(clock=lambda: now[0])
    waits.note("retry_after", 2.0)  # the call that got the 429
    assert waits.paused == 2.0
    now[0] += 0.5
    waits.note("retry_after", 1.5)  # another call meets the same pause, 0.5 s into it
    assert waits.paused == 2.0
    now[0] += 0.5
    waits.note("retry_after", 3.0)  # a longer pause extends it by 2 s
    assert waits.paused == pytest.approx(4.0)
    now[0] += 10
    waits.note("retry_after", 1.0)  # a new pause later on
    assert waits.paused == pytest.approx(5.0)
    waits.note("backoff", 0.25)
    waits.note("backoff", 0.25)  # backoffs are each call's own: summed
    assert waits.backoff == 0.5
    assert waits.paused == pytest.approx(5.0)


# --- calls cut short ---------------------------------------------------------------------------


async def test_a_cancelled_or_late_call_ends_its_spans(
    otel: Collected, server: MessagesServer
) -> None:
    configure(otel)
    async with client_for(server) as client:
        message_id = server.messages(server.chat_ids()[0])[0]["id"]
        server.inject(Fault.delay(5.0), path=f"messages/{message_id}")
        with pytest.raises(ma.RequestTimeoutError):
            await client.with_options(deadline=0.2, max_retries=0).messages.get(message_id)
        server.inject(Fault.delay(5.0), path=f"messages/{message_id}")
        task = asyncio.create_task(client.messages.get(message_id))
        while len(server.resource_requests()) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.stats.in_flight == 0

    spans = otel.spans()
    calls = [s for s in spans if s.name == "messages.get"]
    assert [(c.attributes or {}).get("error.type") for c in calls] == [
        "RequestTimeoutError",
        "CancelledError",
    ]
    attempts = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert [(a.attributes or {}).get("error.type") for a in attempts] == [
        "TimeoutError",
        "CancelledError",
    ]
    assert otel.total("messages.client.in_flight") == 0
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


async def test_a_renewal_cancelled_before_it_starts_ends_its_span(
    otel: Collected, server: MessagesServer
) -> None:
    configure(otel)
    client = make_client(server)
    await client.open()
    # A renewal ahead of expiry, started and then cancelled by aclose() before it ever ran.
    client._sessions._start_renewal(None)
    await client.aclose()
    gc.collect()  # an exchange coroutine never awaited would warn here (warnings are errors)
    renewals = [s for s in otel.spans() if s.name == "messages.token"]
    # The sign-in at open(), then the cancelled one.
    assert [(s.attributes or {}).get("error.type") for s in renewals] == [None, "CancelledError"]


# --- nothing secret --------------------------------------------------------------------------

MARK = "Zq7secret-text"


async def test_no_secret_or_text_in_anything_exported(otel: Collected) -> None:
    views: list[object] = []
    hooks = {"request": [views.append], "response": [views.append], "error": [views.append]}
    async with (
        MessagesServer(chats=3, messages_per_chat=40, seed=9, token_ttl=3600) as server,
        OriginRecorder() as elsewhere,
    ):
        async with client_for(server, event_hooks=hooks, max_response_bytes=64 * 1024) as client:
            configure(otel)
            chat_id = server.chat_ids()[0]
            fast = client.with_options(max_retries=1, deadline=1.0)
            failing = [
                Fault.rate_limited("0.01"),
                Fault.status(500, message=MARK),
                Fault.status(502, message=MARK),
                Fault.status(503, message=MARK, retry_after="0"),
                Fault.status(504, message=MARK),
                Fault.status(400, message=MARK),
                Fault.status(403, message=MARK),
                Fault.status(404, message=MARK),
                Fault.expire_token(),
                Fault.drop(),
                Fault.delay(3.0),
                Fault.malformed(body=MARK.encode()),
                Fault.wrong_shape(),
                Fault.oversized(256 * 1024),
                Fault.invalid_cursor(),
                Fault.redirect(elsewhere.url("/steal?q=" + MARK)),
                Fault.repeat_cursor(),
                Fault.foreign_cursor(elsewhere.origin),
                Fault.backwards_page(),
                Fault.empty_page(),
            ]
            for fault in failing:
                server.inject(fault, path="messages/", times=2)
                try:
                    async for _ in fast.messages.pages(chat_id, limit=5, query=MARK[:3]):
                        pass
                except ma.MessagesError:
                    pass
                server.clear_faults()
            added = await client.messages.add(chat_id, f"hello {MARK}")
            await client.messages.edit(added.id, chat_id=chat_id, message=f"edited {MARK}")
            server.inject(Fault.drop_after_commit(), path="messages/add/")
            with pytest.raises(ma.TransportError):
                await client.messages.add(chat_id, f"again {MARK}")
            server.inject(Fault.drop_after_commit(), path=f"messages/{added.id}/delete/")
            await client.messages.delete(added.id)
            async for _ in client.messages.iter(chat_id, query=MARK, limit=3):
                pass
        tokens = [r.token for r in server.requests if r.token]
        refresh = list(server._oauth._refresh)
        assert any(r.fault == "expire_token" for r in server.requests)
        assert len(server.token_requests) >= 2  # the sign-in and the renewal

    exported = otel.exported_text() + "\n".join(map(repr, views))
    assert views
    assert otel.spans()
    forbidden = [
        MARK,
        MARK[:3],
        server.client_secret,
        "Bearer at_",
        "uthorization",
        *tokens,
        *refresh,
    ]
    for secret in forbidden:
        assert secret not in exported, f"{secret!r} was exported"
    for span in otel.spans():
        url = (span.attributes or {}).get("url.full")
        assert url is None or ("?" not in str(url) and "cursor" not in str(url))


# --- without OpenTelemetry ---------------------------------------------------------------------

_NO_OTEL = """
import asyncio, sys
{prelude}
import messages_async as ma
from messages_async.testing import MessagesServer

async def main():
    async with MessagesServer(chats=1, messages_per_chat=30) as server:
        seen = []
        async with ma.Client(
            token_url=server.token_url, client_id=server.client_id,
            client_secret=server.client_secret, event_hooks={{"response": [seen.append]}},
        ) as client:
            (chat,) = await client.messages.chats()
            n = sum([1 async for _ in client.messages.iter(chat.chat_id, limit=7)])
        assert n == 30 and len(seen) == 6, (n, len(seen))
    print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

asyncio.run(main())
"""

_HIDE = """
import importlib.abc
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, NotInstalled())
"""


@pytest.mark.parametrize("prelude", ["", _HIDE], ids=["installed-unused", "not-installed"])
def test_without_opentelemetry_the_client_works_and_imports_none(prelude: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_OTEL.format(prelude=prelude)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().replace("'", '"')) == []


async def test_without_a_provider_calls_share_one_quiet_observer(
    otel: Collected, server: MessagesServer
) -> None:
    async with client_for(server) as client:
        observer = client._observer
        request = build_chats(client._sessions.resource_root)
        assert observer.call(request) is observer.call(request)
        await client.messages.chats()
        configure(otel)
        assert observer.call(request) is not observer.call(request)


# --- the export's progress ---------------------------------------------------------------------


async def test_export_log_json_prints_one_object_per_line(tmp_path: Path) -> None:
    async with MessagesServer(chats=3, messages_per_chat=120, seed=6) as server:
        server.inject(Fault.status(503), path="messages/", after=2)  # a retry, logged
        server.inject(Fault.rate_limited("0.05"), path="messages/", after=4)
        proc = await start_cli(server, "--out", str(tmp_path / "out.sqlite"), "--log-json")
        out, err = await proc.communicate()
        sent = len(server.resource_requests())
    assert proc.returncode == 0, err.decode()
    records = [json.loads(line) for line in err.decode().splitlines()]  # every line is JSON
    assert [r["event"] for r in records if r["event"] != "log"][-1:] == ["export.done"]
    assert any(r["event"] == "log" and "503" in r["message"] for r in records)
    done = records[-1]
    assert done["chats_done"] == done["chats_total"] == 3
    assert done["messages"] == 360
    assert done["requests"] == sent
    assert done["retries"] == 2
    assert done["rate_limited"] == 1
    assert done["paused_s"] == pytest.approx(0.05, abs=0.03)
    assert done["in_flight"] == 0
    assert {"concurrency", "max_concurrency", "pace", "waiting_s", "elapsed_s"} <= set(done)
    assert f"requests:  {sent:,}," in out.decode()  # the summary agrees
    assert server.client_secret not in err.decode() + out.decode()


async def test_progress_logs_json_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from messages_async.export import ExportStats, _progress

    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.01)
    sink = io.StringIO()
    stats = ExportStats(chats_total=2, chats_done=1, messages=40)
    client = ma.ClientStats(
        requests=7,
        retries=1,
        rate_limited=1,
        in_flight=2,
        concurrency=4,
        max_concurrency=8,
        paused_for=0.5,
        pace=12.5,
        paused_total=1.25,
    )
    task = asyncio.create_task(
        _progress.show_progress(
            stats, lambda: client, "out", Console(file=sink), log=print, log_json=True
        )
    )
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    records = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert len(records) >= 3
    assert {r["event"] for r in records[:-1]} == {"export.progress"}
    assert records[-1]["event"] == "export.done"
    assert records[0] | {"time": None, "elapsed_s": None} == {
        "time": None,
        "event": "export.progress",
        "elapsed_s": None,
        "chats_total": 2,
        "chats_done": 1,
        "chats_failed": 0,
        "chats_active": 0,
        "messages": 40,
        "messages_per_s": records[0]["messages_per_s"],
        "requests": 7,
        "retries": 1,
        "rate_limited": 1,
        "paused_s": 1.25,
        "waiting_s": 0.5,
        "in_flight": 2,
        "concurrency": 4,
        "max_concurrency": 8,
        "pace": 12.5,
    }
