"""Progress of an export: a live display on a terminal, a log line every few seconds elsewhere
(or a JSON object per line, for log shippers), and the final summary.

The display shows what a user needs to tell a slow export from a stuck one: chats and messages
done, the rate, the client's current concurrency and requests in flight, retries, 429s, and
above all any pause the server asked for, counting down. The figures are the client's metrics
(README, "Observability"): requests, retries, 429s, seconds paused, in flight, the rate
controller's bound and pace.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from typing import Any

import attrs
import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.text import Text

from .._limiter import ClientStats
from ._media import MediaStats
from ._runner import ExportStats

__all__ = [
    "JsonLogFormatter",
    "json_line",
    "progress_line",
    "progress_record",
    "show_progress",
    "summary_lines",
]

#: Seconds between log lines when stderr is not a terminal.
LOG_INTERVAL = 5.0
#: Seconds between refreshes of the live display.
LIVE_INTERVAL = 0.25


def _pause(stats: ExportStats, client: ClientStats) -> float:
    return max(client.paused_for, stats.waiting_for)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _media_text(media: MediaStats) -> str:
    failed = media.gone + media.too_large + media.failed
    return (
        f"files {media.fetched:,} ({_mib(media.bytes)}), {media.active} downloading, "
        f"{media.queued:,} queued, {failed:,} not fetched"
    )


def progress_line(stats: ExportStats, client: ClientStats, media: MediaStats | None = None) -> str:
    """One line of progress, for logs."""
    line = (
        f"chats {stats.chats_done + stats.chats_failed}/{stats.chats_total}"
        f" ({stats.chats_failed} failed), {stats.messages:,} new messages,"
        f" {stats.rate:,.0f} msg/s, requests in flight {client.in_flight}"
        f" (limit {client.concurrency}/{client.max_concurrency}), {client.requests:,} requests,"
        f" {client.retries} retries, {client.rate_limited} rate-limited,"
        f" {client.paused_total:,.0f} s paused"
    )
    if client.pace is not None:
        line += f", pace {client.pace:,.1f} req/s"
    if media is not None:
        line += f"; {_media_text(media)}"
    pause = _pause(stats, client)
    if pause > 0:
        line += f"; waiting {pause:.0f} s as the server asked"
    return line


def progress_record(
    stats: ExportStats,
    client: ClientStats,
    *,
    final: bool = False,
    media: MediaStats | None = None,
) -> dict[str, Any]:
    """The progress figures as one flat object: what ``--log-json`` prints, a line each."""
    record: dict[str, Any] = {
        "time": _now(),
        "event": "export.done" if final else "export.progress",
        "elapsed_s": round(stats.elapsed, 3),
        "chats_total": stats.chats_total,
        "chats_done": stats.chats_done,
        "chats_failed": stats.chats_failed,
        "chats_active": stats.chats_active,
        "messages": stats.messages,
        "messages_per_s": round(stats.rate, 1),
        "requests": client.requests,
        "retries": client.retries,
        "rate_limited": client.rate_limited,
        "paused_s": round(client.paused_total, 3),
        "waiting_s": round(_pause(stats, client), 3),
        "in_flight": client.in_flight,
        "concurrency": client.concurrency,
        "max_concurrency": client.max_concurrency,
        "pace": None if client.pace is None else round(client.pace, 2),
    }
    if media is not None:
        record.update({f"media_{k}": v for k, v in attrs.asdict(media).items()})
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def json_line(event: str, **fields: object) -> str:
    """One line of ``--log-json`` output: a JSON object with ``time`` and ``event`` first."""
    return orjson.dumps({"time": _now(), "event": event, **fields}).decode()


class JsonLogFormatter(logging.Formatter):
    """Log records as ``--log-json`` lines, so that a log shipper reads every line of stderr."""

    def format(self, record: logging.LogRecord) -> str:
        return json_line("log", level=record.levelname.lower(), message=record.getMessage())


def _progress_json(
    stats: ExportStats,
    client: ClientStats,
    *,
    final: bool = False,
    media: MediaStats | None = None,
) -> str:
    record = progress_record(stats, client, final=final, media=media)
    return json_line(record.pop("event"), **{k: v for k, v in record.items() if k != "time"})


def _render(
    stats: ExportStats, client: ClientStats, target: str, media: MediaStats | None
) -> Group:
    done = stats.chats_done + stats.chats_failed
    head = Text.assemble(
        ("Exporting to ", "bold"),
        (target, "bold cyan"),
        f"  {stats.elapsed:,.0f} s",
    )
    bar = ProgressBar(total=max(1, stats.chats_total), completed=done, width=40)
    chats = Text.assemble(
        f"chats {done}/{stats.chats_total}",
        (f"  {stats.chats_failed} failed" if stats.chats_failed else "", "red"),
        f"  ({stats.chats_active} in progress)",
    )
    counts = Text(
        f"messages {stats.messages:,} new  {stats.rate:,.0f}/s  "
        f"requests in flight {client.in_flight} "
        f"(limit {client.concurrency}/{client.max_concurrency})  requests {client.requests:,}  "
        f"retries {client.retries}  429s {client.rate_limited}  "
        f"paused {client.paused_total:,.0f} s"
        + ("" if client.pace is None else f"  pace {client.pace:,.1f}/s")
    )
    parts: list[Text | ProgressBar] = [head, bar, chats, counts]
    if media is not None:
        parts.append(Text(_media_text(media)))
    pause = _pause(stats, client)
    if pause > 0:
        parts.append(
            Text(
                f"rate limited: waiting {pause:,.0f} s as the server asked "
                "(the export goes on by itself)",
                style="yellow",
            )
        )
    return Group(*parts)


async def show_progress(
    stats: ExportStats,
    client_stats: Callable[[], ClientStats],
    target: str,
    console: Console,
    *,
    log: Callable[[str], None],
    log_json: bool = False,
    media: MediaStats | None = None,
) -> None:
    """Show progress until cancelled: live on a terminal, else ``log`` every few seconds.

    With ``log_json``, a JSON object goes to the console's file every few seconds instead,
    terminal or not, and a last one (``"event": "export.done"``) when the export is over.
    """
    if log_json:
        out = console.file
        try:
            while True:
                await asyncio.sleep(LOG_INTERVAL)
                print(_progress_json(stats, client_stats(), media=media), file=out, flush=True)
        finally:
            last = _progress_json(stats, client_stats(), final=True, media=media)
            print(last, file=out, flush=True)
    if console.is_terminal:
        with Live(
            _render(stats, client_stats(), target, media),
            console=console,
            auto_refresh=False,
            transient=True,
        ) as live:
            while True:
                await asyncio.sleep(LIVE_INTERVAL)
                live.update(_render(stats, client_stats(), target, media), refresh=True)
    while True:
        await asyncio.sleep(LOG_INTERVAL)
        log(progress_line(stats, client_stats(), media))


def summary_lines(
    stats: ExportStats, client: ClientStats, target: str, media: MediaStats | None = None
) -> list[str]:
    """The final summary, one string per line.

    A chat is *complete* when the store holds all of it (as of its last walk): after a run
    that ends by itself, every complete chat is also up to date.
    """
    status = "interrupted" if stats.interrupted else "done"
    lines = [
        f"Export {status}: {target}",
        f"  chats:     {stats.chats_done} complete, {stats.chats_failed} failed,"
        f" {stats.chats_total - stats.chats_done - stats.chats_failed} not finished"
        f" (of {stats.chats_total})",
        f"  messages:  {stats.messages:,} new in {stats.elapsed:,.1f} s"
        f" ({stats.rate:,.0f}/s); {stats.stored_messages:,} stored for the complete chats",
        f"  requests:  {client.requests:,}, {client.retries:,} retries,"
        f" {client.rate_limited:,} answered 429"
        + (f", {stats.cursor_restarts} expired cursors" if stats.cursor_restarts else ""),
    ]
    if media is not None:
        lines.append(
            f"  media:     {media.fetched:,} files fetched ({_mib(media.bytes)}; "
            f"{media.stored:,} new, {media.reused:,} already stored), {media.gone:,} gone, "
            f"{media.too_large:,} too large, {media.failed:,} failed (tried again next run)"
        )
    if stats.failures:
        lines.append("  failed chats:")
        lines.extend(f"    {f.chat_id}: {f.error}" for f in stats.failures)
    return lines
