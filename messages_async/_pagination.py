"""Walking a chat's cursors: one page ahead, never looping, never repeating an id.

A walk is an async generator, so ``break`` (or ``aclose()``) ends it and its ``finally`` cancels
the page being fetched ahead. The checks that keep a misbehaving server from trapping a walk:

- a cursor that leads to a request this walk has already made (the resumed cursor it started
  from included) raises :class:`PaginationError` (a cycle);
- a page whose ids are not strictly beyond the previous page's (older walks go down, newer walks
  go up) raises :class:`PaginationError`; together with strictly ordered ids within a page this
  guarantees no id is yielded twice, with O(1) memory;
- an empty page that still carries a cursor is followed: only an empty cursor ends a walk
  (PROTOCOL §3), and a filtered walk over a long history may well see hundreds of them in a
  row. Only ``MAX_EMPTY_PAGES`` in a row (a million filtered-out messages at the largest page
  size) raise :class:`PaginationError`, so a server stuck handing out new cursors to the same
  position (each with a fresh nonce, so no cycle shows) cannot keep a walk spinning forever;
- a cursor URL that leaves the API's origin raises :class:`UnsafeCursorError` *before* the next
  request is built (``_wire.cursor_request``).

A bad cursor is raised after the page that carried it has been yielded (that page is itself
good); a bad page is raised instead of being yielded (the page after it may already have been
asked for, its cursor checked as above: that request is cancelled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, Literal

from yarl import URL

from ._errors import PaginationError, UnsafeCursorError
from ._models import Message, MessagesPage
from ._wire import ApiRequest, parse_cursors, parse_page

__all__ = ["Direction", "retrieve_outcome", "walk_messages", "walk_pages"]

Direction = Literal["older", "newer"]

#: Empty pages with a cursor, in a row, after which a walk is taken to be stuck.
MAX_EMPTY_PAGES = 10_000


def _check_page(page: MessagesPage, boundary: int | None, direction: Direction) -> int | None:
    """Check the page's ids against the walk so far; return the new boundary."""
    items = page.items
    if not items:
        return boundary
    previous = None
    for message in items:
        if previous is not None and message.id >= previous:
            raise PaginationError(
                f"the server sent a page whose ids are not in descending order "
                f"({previous} then {message.id}); stopped the walk to avoid repeating messages"
            )
        previous = message.id
    newest, oldest = items[0].id, items[-1].id
    if direction == "older":
        if boundary is not None and newest >= boundary:
            raise PaginationError(
                f"the server's next page went backwards (id {newest} after {boundary}); "
                "stopped the walk to avoid repeating messages"
            )
        return oldest
    if boundary is not None and oldest <= boundary:
        raise PaginationError(
            f"the server's newer page went backwards (id {oldest} after {boundary}); "
            "stopped the walk to avoid repeating messages"
        )
    return newest


async def walk_pages(
    fetch: Callable[[ApiRequest], Coroutine[Any, Any, bytes]],
    first: ApiRequest,
    follow: Callable[[str], ApiRequest],
    *,
    direction: Direction = "older",
    prefetch: bool = True,
    max_items: int | None = None,
) -> AsyncGenerator[MessagesPage, None]:
    """Yield the pages whose bodies ``fetch`` gets, from ``first`` on, following
    ``next_cursor`` (older) or ``prev_cursor``.

    With ``max_items``, no page is requested (or fetched ahead) once the pages yielded hold
    that many messages.

    With ``prefetch`` the next page is requested before the current one is yielded, so the
    consumer's work on page *n* overlaps the network time of page *n+1*; at most one page is
    held ahead, so memory stays bounded. Without ``max_items`` it is requested as soon as the
    body's cursor is read, before the page is decoded and checked: the decoding overlaps the
    server's time too. A page that then fails its checks is raised, and the page asked for
    after it is cancelled, never yielded.

    A page that checks out is always yielded before a problem with *its cursor* is raised (a
    cycle, or a URL off the API's origin): its messages are new and valid, and a consumer that
    stops early never sees an error that concerns only the pages it did not want.
    """
    # Requests, not cursor strings: a bare token and the URL it stands for are the same
    # position, and the walk's own first request (a resumed cursor) counts as seen too.
    seen: set[URL] = {first.url}
    boundary: int | None = None
    empty_run = 0
    ahead: asyncio.Task[bytes] | None = None
    wanted = max_items
    older = direction == "older"

    def next_request(
        cursor: str | None,
    ) -> tuple[ApiRequest | None, PaginationError | UnsafeCursorError | None]:
        """The request ``cursor`` leads to, or why it is not followed; (None, None): the end."""
        if cursor is None:
            return None, None
        try:
            # Checked here, before anything is sent: a cursor off the API's origin raises
            # UnsafeCursorError from ``follow``.
            request = follow(cursor)
            if request.url in seen:
                raise PaginationError(
                    "the server sent a cursor that this walk has already followed; "
                    "stopped instead of looping forever"
                )
        except (PaginationError, UnsafeCursorError) as exc:
            return None, exc
        seen.add(request.url)
        return request, None

    async def fetch_ahead(request: ApiRequest) -> None:
        """Start the next page's request as ``ahead``, and let it go out now: the decoding,
        or a consumer that works on the page without awaiting, would otherwise hold it
        back until it is done."""
        nonlocal ahead
        # Set before the loop gets a turn, so that the ``finally`` below cancels it
        # whatever happens next.
        ahead = asyncio.create_task(fetch(request), name="messages_async page prefetch")
        await asyncio.sleep(0)

    try:
        body = await fetch(first)
        while True:
            cursors_ahead = parse_cursors(body) if prefetch and wanted is None else None
            if cursors_ahead is not None:
                request, failure = next_request(cursors_ahead[0 if older else 1])
                if request is not None:
                    await fetch_ahead(request)
            page = parse_page(body)
            boundary = _check_page(page, boundary, direction)
            empty_run = 0 if page.items else empty_run + 1
            if empty_run >= MAX_EMPTY_PAGES:
                raise PaginationError(
                    f"the server sent {MAX_EMPTY_PAGES} empty pages in a row, each with a new "
                    "cursor; stopped the walk as stuck"
                )
            if cursors_ahead is None:
                cursor = page.next_cursor if older else page.prev_cursor
                if wanted is not None:
                    wanted -= len(page.items)
                    if wanted <= 0:
                        cursor = None  # the caller has all it asked for: fetch nothing more
                request, failure = next_request(cursor)
                if request is not None and prefetch:
                    await fetch_ahead(request)
            yield page
            if failure is not None:
                raise failure
            if request is None:
                return
            if ahead is not None:
                # ``ahead`` stays set while awaited, so the ``finally`` below still owns it
                # if this await is interrupted.
                body = await ahead
                ahead = None
            else:
                body = await fetch(request)
    finally:
        if ahead is not None:
            ahead.add_done_callback(retrieve_outcome)
            if not ahead.done():
                ahead.cancel()
                # Wait, so the connection is back in the pool (or closed) when the walk is
                # over. If this wait is itself cancelled, CancelledError goes on up and the
                # callback above still collects the task's outcome.
                await asyncio.wait([ahead])


def retrieve_outcome(task: asyncio.Future[Any]) -> None:
    """Done-callback for a task whose result nobody will read: mark its outcome as seen, so
    asyncio does not report an exception that was "never retrieved"."""
    if not task.cancelled():
        task.exception()


async def walk_messages(
    pages: AsyncGenerator[MessagesPage, None], max_items: int | None
) -> AsyncGenerator[Message, None]:
    """Flatten a page walk into messages, stopping after ``max_items`` if given."""
    try:
        if max_items is not None and max_items <= 0:
            return  # nothing wanted: send nothing
        if max_items is None:
            async for page in pages:
                for message in page.items:
                    yield message
            return
        remaining = max_items
        async for page in pages:
            for message in page.items:
                yield message
                remaining -= 1
                if remaining <= 0:
                    return
    finally:
        await pages.aclose()
