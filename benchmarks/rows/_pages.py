"""Real page bodies, fetched once from the emulator: the input of the decode row."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from .._harness import ServerProcess, fetch_token

__all__ = ["fetch_pages"]


async def _walk_all(server: ServerProcess, limit: int) -> list[bytes]:
    info = server.info
    bodies: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer " + await fetch_token(session, info)}
        root = info["resource_uri"]
        async with session.get(root + "messages/chats/", headers=headers) as r:
            chats = [c["chat_id"] for c in orjson.loads(await r.read())["items"]]
        for chat_id in chats:
            url: str = f"{root}messages/?chat_id={chat_id}&limit={limit}"
            while url:
                async with session.get(url, headers=headers) as r:
                    r.raise_for_status()
                    body = await r.read()
                bodies.append(body)
                url = orjson.loads(body)["next_cursor"] or ""
    return bodies


def fetch_pages(*, chats: int, messages_per_chat: int, limit: int = 100) -> list[bytes]:
    """Every page of every chat of a fresh emulator, as the bytes a client decodes."""
    with ServerProcess(chats=chats, messages_per_chat=messages_per_chat) as server:
        return asyncio.run(_walk_all(server, limit))
