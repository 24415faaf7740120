"""Walking many chats at once, with bounded concurrency and backpressure.

The chats are the jobs of the one worker pool (``_pool.py``): ``concurrency`` workers take chats
in turn and walk them page by page; pages travel to the consumer through ``concurrency`` slots.
When the consumer is slow the slots fill, workers wait to hand on their page and stop fetching:
memory stays bounded by about ``2 × concurrency`` pages however many chats there are. Order is
kept within each chat because one worker walks a chat from start to end.

Failure (docs/protocol.md §7): with ``on_error="raise"`` the first failing chat's own exception
is raised (not an ``ExceptionGroup``) as soon as the consumer asks for its next item, without
first handing out what other chats had queued, and after every other worker has been cancelled
(the failing worker cancels them at once); with
``on_error="yield"`` a :class:`ChatFailed` item takes the chat's place and the others go on
(except when the client itself was closed: that ends the whole walk with
:class:`ClientClosedError`, rather than failing every chat left one by one).
Closing the generator (``break``, ``aclose()``, cancellation) cancels every worker and waits for
them, so no task outlives it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Literal

from ._errors import ClientClosedError
from ._models import ChatFailed, Message, MessagesPage
from ._pool import Emit, Pool

__all__ = ["OnError", "fan_out"]

OnError = Literal["raise", "yield"]


async def fan_out(
    chat_ids: Iterable[int],
    walk: Callable[[int], AsyncGenerator[MessagesPage, None]],
    *,
    concurrency: int,
    on_error: OnError,
    max_items: int | None,
) -> AsyncGenerator[tuple[int, Message | ChatFailed], None]:
    """Walk every chat of ``chat_ids`` with ``concurrency`` workers; yield ``(chat_id, item)``.

    ``max_items`` bounds each chat. See the module docstring for failures and cleanup.
    """

    async def walk_chat(chat_id: int, emit: Emit[tuple[int, list[Message] | ChatFailed]]) -> None:
        if max_items is not None and max_items <= 0:
            return  # nothing wanted from this chat: send nothing
        remaining = max_items
        pages = walk(chat_id)
        try:
            async for page in pages:
                items = page.items
                if remaining is not None:
                    items = items[:remaining]
                    remaining -= len(items)
                if items:
                    await emit((chat_id, items))
                if remaining is not None and remaining <= 0:
                    break
        finally:
            await pages.aclose()

    # A chat named twice is walked once: walking it again would only yield duplicates. A slot
    # holds a page's worth of messages.
    pool: Pool[int, tuple[int, list[Message] | ChatFailed]] = Pool(
        walk_chat,
        workers=concurrency,
        capacity=concurrency,
        jobs=list(dict.fromkeys(chat_ids)),
        failed_item=(lambda c, exc: (c, ChatFailed(c, exc))) if on_error == "yield" else None,
        # A closed client is not one chat's failure: report it once, for the walk.
        ends_pool=lambda exc: isinstance(exc, ClientClosedError),
        name="messages_async fan-out",
    )
    try:
        async for chat_id, payload in pool:
            if isinstance(payload, ChatFailed):
                yield chat_id, payload
                continue
            for message in payload:
                yield chat_id, message
                if pool.error is not None:
                    # A failure elsewhere is raised at once, not after the rest of this page.
                    await pool.check()
    finally:
        # No worker (nor its connection) outlives the generator.
        await pool.aclose()
