"""``examples/web_app.py`` (loaded from its file), served on loopback, against the emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from test_example_bot import load_example

import messages_async as ma
from messages_async.testing import MessagesServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "web_app.py"


def client_of(server: MessagesServer) -> ma.Client:
    return ma.Client(
        token_url=server.token_url,
        client_id=server.client_id,
        client_secret=server.client_secret,
    )


async def test_handlers_share_one_client_opened_at_startup_and_closed_at_cleanup() -> None:
    app_module = load_example(EXAMPLE)
    async with MessagesServer(chats=3, messages_per_chat=12, seed=5, latency=0.005) as server:
        client = client_of(server)
        runner = web.AppRunner(app_module.make_app(client))
        await runner.setup()  # runs on_startup: the client signs in here
        try:
            assert server.token_request_count == 1
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            base = f"http://127.0.0.1:{port}"
            chats = server.chat_ids()
            async with aiohttp.ClientSession(base) as http:

                async def latest(chat_id: int) -> list[dict[str, object]]:
                    async with http.get(f"/chats/{chat_id}/latest") as resp:
                        assert resp.status == 200, await resp.text()
                        body: list[dict[str, object]] = await resp.json()
                        return body

                pages = await asyncio.gather(*(latest(chats[i % 3]) for i in range(60)))
                for i, page in enumerate(pages):
                    expected = server.messages(chats[i % 3])[:5]
                    assert [m["id"] for m in page] == [m["id"] for m in expected]

                async with http.post(f"/chats/{chats[0]}/messages", data="hello") as resp:
                    assert resp.status == 201
                    new_id = (await resp.json())["id"]
                assert server.messages(chats[0])[0]["id"] == new_id
                async with http.post(f"/chats/{chats[0]}/messages", data="  ") as resp:
                    assert resp.status == 400
                    assert "whitespace" in await resp.text()
                async with http.get("/chats/999999/latest") as resp:
                    assert resp.status == 404
            # Sixty requests, one sign-in, and never more connections than the client allows.
            assert server.token_request_count == 1
            assert server.max_in_flight <= 32
        finally:
            await runner.cleanup()  # runs on_cleanup: the client is closed
        with pytest.raises(ma.ClientClosedError):
            await client.messages.chats()


async def test_a_refused_secret_stops_the_app_at_startup() -> None:
    app_module = load_example(EXAMPLE)
    async with MessagesServer(chats=1) as server:
        client = ma.Client(
            token_url=server.token_url, client_id=server.client_id, client_secret="wrong"
        )
        runner = web.AppRunner(app_module.make_app(client))
        with pytest.raises(ma.AuthError):
            await runner.setup()
        await runner.cleanup()
