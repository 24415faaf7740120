"""Walking one chat in time windows at once: the thin async layer over ``_window_plan``.

``plan_windows`` runs the planner's rounds: every probe is a ``limit=1`` listing whose
``total_count`` is the answer, the probes of a round go out together on the one worker pool
(``_pool.py``). ``walk_windows`` walks the windows on that pool too, one walk per worker,
through the one client (so its limiter paces them all), and hands out each page with the
window's checkpoint after it.

A window whose cursor is rejected as expired (400 ``invalid_cursor``) starts again at its own
newest page and skips every id it handed out already (``Window.low``), at most
``MAX_RESTARTS`` times in a row; a window resumed from a saved checkpoint does the same.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import attrs

from ._errors import ClientClosedError, InvalidCursorError
from ._models import MessagesPage, Period
from ._pool import Emit, Pool
from ._window_plan import Window, WindowPlanner, advance, unseen

if TYPE_CHECKING:
    from ._client import Messages

__all__ = ["MAX_RESTARTS", "WindowPage", "plan_windows", "walk_windows"]

#: Restarts of one window at its newest page after an expired cursor, in a row.
MAX_RESTARTS = 3


@attrs.frozen
class WindowPage:
    """One page of a windowed walk: ``page.items`` holds only messages not handed out before.

    Attributes:
        window: The window the page belongs to (as it stood before the page).
        page: The page, newest first.
        next: The window's checkpoint after this page, to save for a resume; ``None`` once
            the window is walked to its oldest message.
    """

    window: Window
    page: MessagesPage
    next: Window | None


def _bounds(period: Period | None) -> tuple[datetime | None, datetime | None]:
    return (None, None) if period is None else (period.from_, period.till)


async def plan_windows(
    messages: Messages,
    chat_id: int,
    *,
    windows: int,
    query: str | None,
    period: Period | None,
    concurrency: int,
) -> list[Window]:
    """The windows of about equal count for ``chat_id``'s selection, newest first."""
    since, until = _bounds(period)
    # The newest message and the selection's count, from the first page that holds a message:
    # a page may be empty and still carry a cursor (docs/protocol.md §3), and the walk follows
    # it with its guards against loops and endless empty pages.
    total: int | None = None
    newest: datetime | None = None
    pages = messages.pages(chat_id, limit=1, query=query, period=period, prefetch=False)
    try:
        async for page in pages:
            if total is None:
                total = page.total_count or 0
            if page.items:
                newest = page.items[0].created_at
                break
    finally:
        await pages.aclose()
    planner = WindowPlanner(
        total=total or 0, windows=windows, newest=newest, since=since, until=until
    )

    async def count(at: datetime, emit: Emit[tuple[datetime, int]]) -> None:
        page = await messages.list(
            chat_id, limit=1, query=query, period=Period(from_=since, till=at)
        )
        await emit((at, page.total_count or 0))

    while probes := planner.probes():
        pool: Pool[datetime, tuple[datetime, int]] = Pool(
            count,
            workers=concurrency,
            capacity=len(probes),
            jobs=probes,
            name="messages_async window plan",
        )
        try:
            async for at, before in pool:
                planner.answer(at, before)
        finally:
            await pool.aclose()
    return planner.windows()


def walk_windows(
    walk: Callable[[Window], AsyncGenerator[MessagesPage, None]],
    windows: Sequence[Window],
    *,
    concurrency: int,
) -> AsyncGenerator[WindowPage, None]:
    """Walk every window with ``walk(window)`` on ``concurrency`` workers."""

    async def walk_one(window: Window, emit: Emit[WindowPage]) -> None:
        restarts = 0
        while True:
            pages = walk(window)
            try:
                async for page in pages:
                    fresh = attrs.evolve(page, items=unseen(window, page.items))
                    after = advance(window, page)
                    await emit(WindowPage(window, fresh, after))
                    if fresh.items:
                        # Only progress starts the count again: a server that expires every
                        # cursor right after the pages already seen cannot loop a window.
                        restarts = 0
                    if after is None:
                        return
                    window = after
                return
            except InvalidCursorError:
                restarts += 1
                if window.cursor is None or restarts > MAX_RESTARTS:
                    raise
                window = attrs.evolve(window, cursor=None)
            finally:
                await pages.aclose()

    return _drain(
        Pool(
            walk_one,
            workers=concurrency,
            capacity=concurrency,
            jobs=list(windows),
            ends_pool=lambda exc: isinstance(exc, ClientClosedError),
            name="messages_async windows",
        )
    )


async def _drain(pool: Pool[Window, WindowPage]) -> AsyncGenerator[WindowPage, None]:
    try:
        async for item in pool:
            yield item
    finally:
        # No worker (nor its connection) outlives the generator.
        await pool.aclose()
