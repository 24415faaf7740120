"""Progress of an export: a live display on a terminal, a log line every few seconds elsewhere,
and the final summary.

The display shows what a user needs to tell a slow export from a stuck one: chats and messages
done, the rate, the client's current concurrency and requests in flight, retries, 429s, and
above all any pause the server asked for, counting down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.text import Text

from .._limiter import ClientStats
from ._media import MediaStats
from ._runner import ExportStats

__all__ = ["progress_line", "show_progress", "summary_lines"]

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
        f" (limit {client.concurrency}/{client.max_concurrency}), {client.retries} retries,"
        f" {client.rate_limited} rate-limited"
    )
    if media is not None:
        line += f"; {_media_text(media)}"
    pause = _pause(stats, client)
    if pause > 0:
        line += f"; waiting {pause:.0f} s as the server asked"
    return line


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
        f"(limit {client.concurrency}/{client.max_concurrency})  retries {client.retries}  "
        f"429s {client.rate_limited}"
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
    media: MediaStats | None = None,
) -> None:
    """Show progress until cancelled: live on a terminal, else ``log`` every few seconds."""
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
    """The final summary, one string per line."""
    status = "interrupted" if stats.interrupted else "done"
    lines = [
        f"Export {status}: {target}",
        f"  chats:     {stats.chats_done} exported or up to date, {stats.chats_failed} failed,"
        f" {stats.chats_total - stats.chats_done - stats.chats_failed} not finished"
        f" (of {stats.chats_total})",
        f"  messages:  {stats.messages:,} new in {stats.elapsed:,.1f} s"
        f" ({stats.rate:,.0f}/s); {stats.stored_messages:,} stored for the finished chats",
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
