"""Testing the echo bot against the emulator, with the fixtures of the messages_async plugin."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from echo_bot import run_bot

import messages_async as ma
from messages_async.testing import Fault, MessagesServer


@pytest.mark.messages_server(chats=2)
async def test_echo_bot_replies_to_others_and_survives_errors(
    messages_server: MessagesServer,
    messages_client: ma.Client,
    messages_wait_polled: Callable[..., Awaitable[None]],
    messages_wait_for: Callable[..., Awaitable[dict[str, Any]]],
) -> None:
    bot = asyncio.create_task(run_bot(messages_client, interval=0.05, stop_after=2))
    try:
        await messages_wait_polled()  # the bot has looked at every chat: what follows is new
        first, second = messages_server.chat_ids()
        messages_server.inject(Fault.status(503), path="messages/", times=5)  # a flaky server
        messages_server.post_message(first, "hello", uid=42)  # as another user
        messages_server.post_message(second, "hi there", uid=43)

        reply = await messages_wait_for(first, lambda m: m["message"] == "echo: hello")
        assert reply["uid"] == messages_client.user_id
        await asyncio.wait_for(bot, timeout=10)  # stop_after=2: both answered, none twice
        assert messages_server.messages(second)[0]["message"] == "echo: hi there"
    finally:
        bot.cancel()
