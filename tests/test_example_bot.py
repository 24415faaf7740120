"""The README's echo bot (``examples/echo_bot.py``, loaded from its file) against the emulator."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import messages_async as ma
from messages_async.testing import Fault, MessagesServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "echo_bot.py"


def load_example(path: Path = EXAMPLE) -> ModuleType:
    """An example module, loaded from its file as a user would run it."""
    spec = importlib.util.spec_from_file_location(f"{path.stem}_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=3, messages_per_chat=8, seed=11) as srv:
        yield srv


async def polled_every_chat(server: MessagesServer) -> None:
    """Wait until each chat had a listing answered: the bot's starting points are set."""
    wanted = {str(c) for c in server.chat_ids()}
    async with asyncio.timeout(10):
        while True:  # the server's request log is the thing observed: no event to wait on
            answered = {
                r.query.get("chat_id")
                for r in server.resource_requests()
                if r.path == "messages/" and r.status == 200
            }
            if wanted <= answered:
                return
            await asyncio.sleep(0.01)


async def test_echo_bot_answers_others_once_and_never_itself(server: MessagesServer) -> None:
    bot = load_example()
    options: dict[str, Any] = {
        "token_url": server.token_url,
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "backoff_base": 0.01,
    }
    chats = server.chat_ids()
    async with ma.Client(**options) as client:
        task = asyncio.create_task(bot.run_bot(client, interval=0.02, stop_after=3))
        try:
            await polled_every_chat(server)
            server.inject(Fault.status(503), path="messages/", times=4)
            posted = [
                server.post_message(chats[0], "hello", uid=42),
                server.post_message(
                    chats[1], "", uid=43, attachments=[{"type": "image", "url": "https://i/1.png"}]
                ),
                server.post_message(chats[2], "third", uid=44),
            ]
            # stop_after=3: had the bot echoed its own echo, one of the three would go unanswered.
            async with asyncio.timeout(15):
                await task
        finally:
            task.cancel()
    first = min(p["id"] for p in posted)
    replies = {c: [m for m in server.messages(c) if m["id"] >= first] for c in chats}
    assert [m["message"] for m in replies[chats[0]]] == ["echo: hello", "hello"]
    assert [m["message"] for m in replies[chats[2]]] == ["echo: third", "third"]
    image_reply = replies[chats[1]][0]
    assert image_reply["message"] == "echo: "
    assert image_reply["attachments"]["items"][0]["url"] == "https://i/1.png"
    for chat_replies in replies.values():
        assert chat_replies[0]["uid"] == server.user_id
        assert chat_replies[1]["uid"] != server.user_id


async def test_echo_bot_goes_on_after_a_reply_fails(server: MessagesServer) -> None:
    bot = load_example()
    chats = server.chat_ids()
    async with ma.Client(
        token_url=server.token_url,
        client_id=server.client_id,
        client_secret=server.client_secret,
        backoff_base=0.01,
    ) as client:
        task = asyncio.create_task(bot.run_bot(client, interval=0.02, stop_after=1))
        try:
            await polled_every_chat(server)
            # The first reply meets a 500: add is never sent twice, so that reply is lost,
            # and the bot must go on to answer the next message.
            server.inject(Fault.status(500), path="messages/add/")
            server.post_message(chats[0], "first", uid=42)
            async with asyncio.timeout(5):
                while not any(r.path == "messages/add/" for r in server.resource_requests()):
                    await asyncio.sleep(0.01)
            second = server.post_message(chats[1], "second", uid=43)
            async with asyncio.timeout(15):
                await task
        finally:
            task.cancel()
    assert [m["message"] for m in server.messages(chats[1]) if m["id"] >= second["id"]] == [
        "echo: second",
        "second",
    ]
    adds = [r.status for r in server.resource_requests() if r.path == "messages/add/"]
    assert adds == [500, 200]


def test_main_reads_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    bot = load_example()
    for name in ("MESSAGES_TOKEN_URL", "MESSAGES_CLIENT_ID", "MESSAGES_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(KeyError, match="MESSAGES_TOKEN_URL"):
        asyncio.run(bot.main())
