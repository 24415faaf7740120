"""The public API as users write it; checked by mypy --strict (tests/test_quality.py), never run."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import messages_async as ma


async def typical_use() -> None:
    async with ma.Client(
        token_url="https://auth.example.test/token",
        client_id="id",
        client_secret="secret",
        deadline=10.0,
    ) as client:
        scopes: frozenset[str] | None = client.scopes
        chats: list[ma.Chat] = await client.messages.chats()
        page: ma.MessagesPage = await client.messages.list(
            chats[0].chat_id,
            limit=50,
            period=ma.Period(from_=datetime(2026, 1, 1, tzinfo=UTC)),
        )
        message: ma.Message = await client.messages.add(
            chats[0].chat_id, "hi", attachments=[ma.NewAttachment(type="link", url="u")]
        )
        await client.messages.edit(message.id, chat_id=chats[0].chat_id, message="edited")
        await client.messages.delete(message.id)
        async for msg in client.messages.iter(chats[0].chat_id, max_items=10):
            _id: int = msg.id
        async for p in client.messages.pages(chats[0].chat_id, cursor=page.next_cursor):
            _cursor: str | None = p.next_cursor
        async for chat_id, item in client.messages.iter_many([1, 2], concurrency=4):
            _text: str = item.message
            _cid: int = chat_id
        async for _chat_id, result in client.messages.iter_many([1, 2], on_error="yield"):
            if isinstance(result, ma.ChatFailed):
                _err: BaseException = result.error
        async with contextlib.aclosing(client.messages.iter(chats[0].chat_id)) as messages:
            async for _first in messages:
                break
        hurried: ma.Client = client.with_options(deadline=2.0, max_retries=1, timeout=1.0)
        _again: ma.MessagesPage = await hurried.with_options(deadline=None).messages.list(1)
        stats: ma.ClientStats = client.stats
        _paused: float = stats.paused_total
        watch: ma.Watch = client.messages.watch([1], since={1: 5})
        async with watch:
            async for _cid, new in watch:
                _mid: int = new.id
            _marks: dict[int, int] = watch.watermarks
        for attachment in message.attachments:
            got: ma.Downloaded = await client.messages.download(attachment, "/tmp/file")
            _sha: str = got.sha256
        try:
            with open("/tmp/other", "wb") as out:
                await client.messages.download("https://files.example.test/x", out, max_bytes=10)
        except ma.DownloadError as exc:
            _reason: str = exc.reason
            _code: int | None = exc.status
        del scopes, stats
    try:
        pass
    except ma.RateLimitError as exc:
        _after: float | None = exc.retry_after
    except ma.ApiError as exc:
        _status: int = exc.status


def log_request(request: ma.RequestView) -> None:
    _line: str = f"{request.op} {request.method} {request.url} #{request.attempt}"


async def log_answer(response: ma.ResponseView) -> None:
    _seconds: float = response.elapsed
    _retry_after: str | None = response.headers.get("Retry-After")
    _status: int = response.status


def log_failure(failure: ma.ErrorView) -> None:
    _error: str = failure.error
    _attempt: int = failure.request.attempt


def hooked() -> ma.Client:
    return ma.Client(
        token_url="https://auth.example.test/token",
        client_id="id",
        client_secret="secret",
        event_hooks={"request": [log_request], "response": [log_answer], "error": [log_failure]},
    )
