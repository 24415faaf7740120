"""Walking many chats at once, with bounded concurrency and backpressure.

``concurrency`` workers take chats from a shared queue of chat ids and walk them page by page;
pages travel to the consumer through a queue of ``concurrency`` slots. When the consumer is slow
the queue fills, workers block on ``put`` and stop fetching: memory stays bounded by about
``2 × concurrency`` pages however many chats there are. Order is kept within each chat because
one worker walks a chat from start to end.

Failure (PROTOCOL §7): with ``on_error="raise"`` the first failing chat's own exception is raised
(not an ``ExceptionGroup``) as soon as the consumer asks for its next item, without first
handing out what other chats had queued, and after every other worker has been cancelled; with
``on_error="yield"`` a :class:`ChatFailed` item takes the chat's place and the others go on
(except when the client itself was closed: that ends the whole walk with
:class:`ClientClosedError`, rather than failing every chat left one by one).
Closing the generator (``break``, ``aclose()``, cancellation) cancels every worker and waits for
them, so no task outlives it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Literal

from ._errors import ClientClosedError
from ._models import ChatFailed, Message, MessagesPage
from ._pagination import retrieve_outcome

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
    # A chat named twice is walked once: walking it again would only yield duplicates.
    pending = collections.deque(dict.fromkeys(chat_ids))
    # None marks a worker that ran out of chats. A slot holds a page's worth of messages.
    queue: asyncio.Queue[tuple[int, list[Message] | ChatFailed] | None] = asyncio.Queue(
        maxsize=concurrency
    )
    # With on_error="raise", the first failure, seen by the consumer before the next item it
    # would yield: pages that other chats queued earlier must not delay the error.
    failures: list[BaseException] = []

    async def walk_chat(chat_id: int) -> None:
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
                    await queue.put((chat_id, items))
                if remaining is not None and remaining <= 0:
                    break
        finally:
            await pages.aclose()

    async def worker() -> None:
        while pending:
            chat_id = pending.popleft()
            try:
                await walk_chat(chat_id)
            except Exception as exc:  # one chat's failure; CancelledError is not caught
                # A closed client is not one chat's failure: report it once, for the walk.
                if on_error == "raise" or isinstance(exc, ClientClosedError):
                    failures.append(exc)
                    await queue.put(None)  # wakes the consumer if it waits for an item
                    return
                await queue.put((chat_id, ChatFailed(chat_id, exc)))
        await queue.put(None)

    workers = [
        asyncio.create_task(worker(), name=f"messages_async fan-out worker {n}")
        for n in range(min(concurrency, len(pending)))
    ]
    try:
        running = len(workers)
        while running:
            item = await queue.get()
            if failures:
                raise failures[0]
            if item is None:
                running -= 1
                continue
            chat_id, payload = item
            if isinstance(payload, ChatFailed):
                yield chat_id, payload
                continue
            for message in payload:
                yield chat_id, message
                if failures:
                    raise failures[0]
    finally:
        for task in workers:
            task.add_done_callback(retrieve_outcome)
            task.cancel()
        if workers:
            # Wait, so no worker (nor its connection) outlives the generator. If this wait
            # is itself cancelled, CancelledError goes on up; the callbacks collect the rest.
            await asyncio.wait(workers)
