"""A small web app (aiohttp.web) whose request handlers share one Client.

The client is opened when the app starts and closed when it stops, with ``client.open()`` and
``client.aclose()`` in the app's startup and cleanup hooks, so every request reuses the same
connections, token and rate limiter. Run it with the credentials in the environment:

    MESSAGES_TOKEN_URL=... MESSAGES_CLIENT_ID=... MESSAGES_CLIENT_SECRET=... python web_app.py

then ``curl localhost:8080/chats/2001/latest`` or
``curl -X POST localhost:8080/chats/2001/messages -d 'hello'``.
"""

from __future__ import annotations

import os

from aiohttp import web

import messages_async as ma

CLIENT = web.AppKey("client", ma.Client)


def make_app(client: ma.Client) -> web.Application:
    """The app; it opens ``client`` on startup and closes it on cleanup."""
    app = web.Application()
    app[CLIENT] = client
    app.on_startup.append(open_client)
    app.on_cleanup.append(close_client)
    app.router.add_get("/chats/{chat_id}/latest", latest)
    app.router.add_post("/chats/{chat_id}/messages", post)
    return app


async def open_client(app: web.Application) -> None:
    # Signs in once, before the first request is served: a wrong secret stops the app here.
    await app[CLIENT].open()


async def close_client(app: web.Application) -> None:
    await app[CLIENT].aclose()


def _chat_id(request: web.Request) -> int:
    try:
        return int(request.match_info["chat_id"])
    except ValueError:
        raise web.HTTPBadRequest(text="a chat id is a number") from None


async def latest(request: web.Request) -> web.Response:
    """The chat's five newest messages."""
    client = request.app[CLIENT]
    chat_id = _chat_id(request)
    try:
        page = await client.messages.list(chat_id, limit=5)
    except ma.NotFoundError:
        raise web.HTTPNotFound(text=f"no chat {chat_id}") from None
    return web.json_response([{"id": m.id, "uid": m.uid, "message": m.message} for m in page.items])


async def post(request: web.Request) -> web.Response:
    """Post the request's body as a message; answers with the new message's id."""
    client = request.app[CLIENT]
    chat_id = _chat_id(request)
    text = await request.text()
    try:
        new = await client.messages.add(chat_id, text)
    except ValueError as exc:  # empty, only whitespace, too long: refused before sending
        raise web.HTTPBadRequest(text=str(exc)) from None
    except ma.NotFoundError:
        raise web.HTTPNotFound(text=f"no chat {chat_id}") from None
    return web.json_response({"id": new.id}, status=201)


def main() -> None:
    client = ma.Client(
        token_url=os.environ["MESSAGES_TOKEN_URL"],
        client_id=os.environ["MESSAGES_CLIENT_ID"],
        client_secret=os.environ["MESSAGES_CLIENT_SECRET"],
    )
    web.run_app(make_app(client), host="127.0.0.1", port=8080)


if __name__ == "__main__":
    main()
