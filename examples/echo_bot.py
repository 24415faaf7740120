"""An echo bot: answers every message other users post, in every chat, as it arrives.

Run it with the credentials in the environment:

    MESSAGES_TOKEN_URL=... MESSAGES_CLIENT_ID=... MESSAGES_CLIENT_SECRET=... python echo_bot.py
"""

from __future__ import annotations

import asyncio
import logging
import os

import messages_async as ma

logger = logging.getLogger("echo_bot")


async def run_bot(
    client: ma.Client, *, interval: float = 1.0, stop_after: int | None = None
) -> None:
    """Echo other users' messages (and their attachments); stop after ``stop_after`` replies."""
    replies = 0
    # async with: leaving the block (break, an error) stops every poll and waits for it.
    async with client.messages.watch(interval=interval) as watch:
        async for chat_id, msg in watch:
            if msg.uid == client.user_id:
                continue  # our own replies come back through the watch too
            try:
                await client.messages.add(
                    chat_id,
                    f"echo: {msg.message}"[:4096],
                    attachments=[ma.NewAttachment(a.type, a.url, a.name) for a in msg.attachments],
                )
            except (ma.AuthError, ma.ScopeError):
                raise  # the bot cannot answer anywhere: stop, and say why
            except ma.MessagesError as exc:
                # This one reply failed (a chat we may no longer write to; a 5xx, after
                # which add is never sent again, so it is not posted twice): go on.
                logger.warning("could not answer in chat %d: %s", chat_id, exc)
                continue
            replies += 1
            if stop_after is not None and replies >= stop_after:
                break


async def main() -> None:
    async with ma.Client(
        token_url=os.environ["MESSAGES_TOKEN_URL"],
        client_id=os.environ["MESSAGES_CLIENT_ID"],
        client_secret=os.environ["MESSAGES_CLIENT_SECRET"],
    ) as client:
        await run_bot(client)


if __name__ == "__main__":
    asyncio.run(main())
