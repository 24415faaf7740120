"""Walking many chats at once, with bounded concurrency and backpressure.

``concurrency`` workers take chats from a shared queue of chat ids and walk them page by page;
pages travel to the consumer through a queue of ``concurrency`` slots. When the consumer is slow
the queue fills, workers block on ``put`` and stop fetching: memory stays bounded by about
``2 × concurrency`` pages however many chats there are. Order is kept within each chat because
one worker walks a chat from start to end.

Failure (PROTOCOL §7): with ``on_error="raise"`` the first failing chat's own exception is raised
(not an ``ExceptionGroup``) after every other worker has been cancelled; with
``on_error="yield"`` a :class:`ChatFailed` item takes the chat's place and the others go on.
Closing the generator (``break``, ``aclose()``, cancellation) cancels every worker and waits for
them, so no task outlives it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Literal

from ._models import ChatFailed, Message, MessagesPage

__all__ = ["OnError", "fan_out"]

OnError = Literal["raise", "yield"]


async def fan_out(
    chat_ids: Iterable[int],
    walk: Callable[[int], AsyncIterator[MessagesPage]],
    *,
    concurrency: int,
    on_error: OnError,
    max_items: int | None,
) -> AsyncIterator[tuple[int, Message | ChatFailed]]:
    pending = collections.deque(chat_ids)
    # None marks a worker that ran out of chats.
    queue: asyncio.Queue[tuple[int, list[Message] | ChatFailed] | None] = asyncio.Queue(
        maxsize=concurrency
    )

    async def worker() -> None:
        while pending:
            chat_id = pending.popleft()
            remaining = max_items
            pages = walk(chat_id)
            try:
                async for page in pages:
                    items = page.items
                    if remaining is not None:
                        items = items[:remaining]
                        remaining -= len(items)
                    if items:
                        await queue.put((chat_id, items))
                    if remaining is not None and remaining <= 0:
                        break
            except Exception as exc:  # one chat's failure; CancelledError is not caught
                await queue.put((chat_id, ChatFailed(chat_id, exc)))
                if on_error == "raise":
                    return
            finally:
                await pages.aclose()  # type: ignore[attr-defined]
        await queue.put(None)

    workers = [
        asyncio.create_task(worker(), name=f"messages_async fan-out worker {n}")
        for n in range(min(concurrency, len(pending)))
    ]
    try:
        running = len(workers)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
                continue
            chat_id, payload = item
            if isinstance(payload, ChatFailed):
                if on_error == "raise":
                    raise payload.error
                yield chat_id, payload
                continue
            for message in payload:
                yield chat_id, message
    finally:
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.wait(workers)
