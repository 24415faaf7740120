"""The emulator against docs/protocol.md, driven with raw aiohttp (never the client library).

The client's own tests trust this server, so its behaviour is pinned down here independently:
token exchange, errors and their headers, keyset paging, filters, writes, every fault. The
emulator's rule modules are pure, so most of their rules are tables at the end of this file,
run without sockets; the live tests check that the HTTP layer wires the same rules.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gzip
import json
import re
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

import messages_async.testing as testing
from messages_async.testing import Fault, MessagesServer, OriginRecorder

Json = dict[str, Any]


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(chats=4, messages_per_chat=45, seed=7) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    http: aiohttp.ClientSession,
    server: MessagesServer,
    method: str,
    path: str,
    *,
    token: str | None = None,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """(status, decoded JSON body or raw bytes, response) for a resource request."""
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers.update(auth(token))
    url = path if "://" in path else server.resource_uri + path
    async with http.request(method, url, headers=headers, **kwargs) as resp:
        raw = await resp.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        return resp.status, body, resp


async def exchange(
    http: aiohttp.ClientSession, server: MessagesServer, **form: str
) -> tuple[int, Json]:
    async with http.post(server.token_url, data=form) as resp:
        return resp.status, await resp.json()


def cc_form(server: MessagesServer, **extra: str) -> dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "scope": "messages_read messages_write",
    }
    form.update(extra)
    return form


async def walk(
    http: aiohttp.ClientSession,
    server: MessagesServer,
    token: str,
    chat_id: int,
    *,
    limit: int = 10,
    direction: str = "next_cursor",
    start: str | None = None,
    params: dict[str, str] | None = None,
) -> list[int]:
    """Follow cursors to the end; ids in the order received."""
    base = {"chat_id": str(chat_id), "limit": str(limit), **(params or {})}
    ids: list[int] = []
    cursor = start
    first = True
    for _ in range(1000):
        if first and cursor is None:
            status, body, _ = await call(http, server, "GET", "messages/", token=token, params=base)
        elif cursor is not None and "://" in cursor:
            status, body, _ = await call(http, server, "GET", cursor, token=token)
        else:
            query = {**base, "cursor": cursor or ""}
            status, body, _ = await call(
                http, server, "GET", "messages/", token=token, params=query
            )
        first = False
        assert status == 200, body
        ids.extend(m["id"] for m in body["items"])
        cursor = body[direction]
        if not cursor:
            return ids
    raise AssertionError("walk did not end")


# -- package surface --------------------------------------------------------------------------


def test_all_is_sorted_and_complete() -> None:
    assert testing.__all__ == sorted(testing.__all__)
    for name in testing.__all__:
        assert getattr(testing, name).__doc__, f"{name} has no docstring"


def test_emulator_does_not_import_the_client() -> None:
    # The pytest plugin is glue and may use both; the emulator itself stands alone.
    root = Path(testing.__file__).parent
    emulator = sorted(p for p in root.glob("*.py") if p.name != "_plugin.py")
    assert len(emulator) >= 10
    for path in emulator:
        text = path.read_text()
        assert "from messages_async._" not in text
        assert "from .." not in text
        assert "import pytest" not in text


def test_the_emulators_rules_do_no_io() -> None:
    # The rules are plain code over plain data; only _server.py, _recorder.py and _serve.py
    # touch aiohttp, sockets or the event loop.
    root = Path(testing.__file__).parent
    for name in (
        "_answers",
        "_dataset",
        "_encoding",
        "_endpoints",
        "_faults",
        "_listing",
        "_oauth",
    ):
        text = (root / f"{name}.py").read_text()
        for word in ("aiohttp", "asyncio", "socket"):
            assert f"import {word}" not in text, f"{name} imports {word}"
            assert f"from {word}" not in text, f"{name} imports {word}"


# -- token endpoint ---------------------------------------------------------------------------


async def test_client_credentials_exchange(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    status, body = await exchange(http, server, **cc_form(server))
    assert status == 200
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "messages_read messages_write"
    assert body["resource_uri"] == server.resource_uri
    assert body["user_id"] == server.user_id == 1001
    assert body["refresh_token"]
    assert server.token_origin != server.resource_origin
    status, chats, _ = await call(
        http, server, "GET", "messages/chats/", token=body["access_token"]
    )
    assert status == 200
    assert chats["items"] == server.chats()
    assert server.token_requests[-1]["client_secret"] == "<redacted>"
    assert server.token_request_count == 1


async def test_basic_auth_and_scope_narrowing(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    server.register_client("reader", "r-secret", scopes=("messages_read",), user_id=77)
    basic = base64.b64encode(b"reader:r-secret").decode()
    form = {"grant_type": "client_credentials", "scope": "messages_read messages_write"}
    async with http.post(
        server.token_url, data=form, headers={"Authorization": f"Basic {basic}"}
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["scope"] == "messages_read"
    assert body["user_id"] == 77
    token = body["access_token"]
    status, err, resp = await call(
        http, server, "POST", "messages/add/", token=token, json={"chat_id": 1, "message": "x"}
    )
    assert status == 403
    assert err["error"]["code"] == "insufficient_scope"
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_scope", scope="messages_write"'
    )
    # Both Basic and a form secret: two authentication methods at once.
    form2 = {**form, "client_secret": "r-secret"}
    async with http.post(
        server.token_url, data=form2, headers={"Authorization": f"Basic {basic}"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"


async def test_token_failures(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[dict[str, str], int, str]] = [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "nobody"}, 401, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": ""}, 400, "invalid_request"),
        ({"scope": "admin"}, 400, "invalid_scope"),
        ({"grant_type": "refresh_token"}, 400, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "rt_nope"}, 400, "invalid_grant"),
    ]
    for form, status, error in cases:
        got, body = await exchange(http, server, **cc_form(server, **form))
        assert (got, body["error"]) == (status, error), form
        assert body["error_description"]


async def test_token_endpoint_rejects_other_forms(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(server.token_url, json=cc_form(server)) as resp:
        assert resp.status == 400
    async with http.get(server.token_url) as resp:
        assert resp.status == 405
    token = server.issue_token()
    async with http.get(server.token_origin + "/api/v1/messages/chats/", headers=auth(token)) as r:
        assert r.status == 404


async def test_refresh_rotates_and_revokes(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    _, first = await exchange(http, server, **cc_form(server))
    refresh = {
        "grant_type": "refresh_token",
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "refresh_token": first["refresh_token"],
    }
    status, second = await exchange(http, server, **refresh)
    assert status == 200
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["scope"] == "messages_read messages_write"
    # The old refresh token died with the rotation.
    status, err = await exchange(http, server, **refresh)
    assert (status, err["error"]) == (400, "invalid_grant")
    # Expiring access tokens leaves refresh tokens working.
    server.expire_tokens()
    status, _, _ = await call(http, server, "GET", "messages/chats/", token=second["access_token"])
    assert status == 401
    refresh["refresh_token"] = second["refresh_token"]
    status, third = await exchange(http, server, **refresh)
    assert status == 200
    server.revoke_refresh_tokens()
    refresh["refresh_token"] = third["refresh_token"]
    status, err = await exchange(http, server, **refresh)
    assert (status, err["error"]) == (400, "invalid_grant")
    status, _ = await exchange(http, server, **cc_form(server))
    assert status == 200
    assert server.token_requests[1]["refresh_token"] == "<redacted>"


async def test_token_ttl_and_no_expires_in(http: aiohttp.ClientSession) -> None:
    async with MessagesServer(chats=1, messages_per_chat=1, token_ttl=0.05) as server:
        token = server.issue_token()
        status, _, _ = await call(http, server, "GET", "messages/chats/", token=token)
        assert status == 200
        await asyncio.sleep(0.08)
        status, _, _ = await call(http, server, "GET", "messages/chats/", token=token)
        assert status == 401
    async with MessagesServer(chats=1, messages_per_chat=1, token_ttl=None) as server:
        _, body = await exchange(http, server, **cc_form(server))
        assert "expires_in" not in body


# -- authorization ----------------------------------------------------------------------------


async def test_missing_unknown_and_expired_tokens(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    for token in (None, "at_unknown"):
        status, err, resp = await call(http, server, "GET", "messages/chats/", token=token)
        assert status == 401
        assert err == {"error": {"code": "invalid_token", "message": err["error"]["message"]}}
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    token = server.issue_token(scopes=("messages_write",))
    status, err, resp = await call(http, server, "GET", "messages/chats/", token=token)
    assert status == 403
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_scope", scope="messages_read"'
    )


async def test_unknown_paths_and_methods(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    token = server.issue_token()
    assert (await call(http, server, "GET", "messages/nope/", token=token))[0] == 404
    status, _, resp = await call(http, server, "GET", "messages/add/", token=token)
    assert status == 405
    assert resp.headers["Allow"] == "POST"
    async with http.get(server.resource_origin + "/elsewhere", headers=auth(token)) as resp:
        assert resp.status == 404


# -- listing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["url", "token"])
async def test_walk_covers_every_message_once(http: aiohttp.ClientSession, mode: Any) -> None:
    async with MessagesServer(chats=3, messages_per_chat=(30, 60), cursor_mode=mode) as server:
        token = server.issue_token()
        for chat_id in server.chat_ids():
            expected = [m["id"] for m in server.messages(chat_id)]
            assert expected == sorted(expected, reverse=True)
            assert await walk(http, server, token, chat_id, limit=7) == expected
        _status, page, _ = await call(
            http, server, "GET", "messages/", token=token, params={"chat_id": str(chat_id)}
        )
        assert page["limit"] == 20
        assert page["prev_cursor"] == ""
        assert page["total_count"] == len(expected)
        if mode == "url":
            assert page["next_cursor"].startswith(server.resource_uri + "messages/?chat_id=")
        else:
            assert "://" not in page["next_cursor"]


async def test_prev_cursor_walk(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    chat_id = server.chat_ids()[0]
    expected = [m["id"] for m in server.messages(chat_id)]
    # Walk to the oldest page, then back up with prev_cursor.
    url: str = server.resource_uri + f"messages/?chat_id={chat_id}&limit=10"
    pages = []
    while url:
        _, page, _ = await call(http, server, "GET", url, token=token)
        pages.append(page)
        url = page["next_cursor"]
    last = pages[-1]
    assert last["next_cursor"] == ""
    ids = [m["id"] for m in last["items"]]
    prev: str = last["prev_cursor"]
    newer_pages = []
    while prev:
        _, page, _ = await call(http, server, "GET", prev, token=token)
        page_ids = [m["id"] for m in page["items"]]
        assert page_ids == sorted(page_ids, reverse=True)
        newer_pages.append(page_ids)
        prev = page["prev_cursor"]
    for page_ids in newer_pages:
        ids = page_ids + ids
    assert ids == expected
    # Each prev page holds the items immediately newer than the boundary.
    assert newer_pages[0][-1] > last["items"][0]["id"]
    assert newer_pages[0][-1] == min(i for i in expected if i > last["items"][0]["id"])


async def test_inserts_and_deletes_during_walk(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    token = server.issue_token()
    chat_id = server.chat_ids()[1]
    before = [m["id"] for m in server.messages(chat_id)]
    url = server.resource_uri + f"messages/?chat_id={chat_id}&limit=8"
    seen: list[int] = []
    deleted: set[int] = set()
    while url:
        _, page, _ = await call(http, server, "GET", url, token=token)
        seen.extend(m["id"] for m in page["items"])
        new = server.post_message(chat_id, "fresh")
        assert new["id"] == server.max_id()
        victim = next((i for i in before if i < seen[-1] and i not in deleted), None)
        if victim is not None:
            server.delete_message(victim)
            deleted.add(victim)
        url = page["next_cursor"]
    # Keyset paging: no repeats, no skips among messages that existed throughout, and the
    # messages posted during the walk (all newer than where it started) never show up.
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen, reverse=True)
    assert set(seen) <= set(before)
    assert set(before) - deleted <= set(seen)


async def test_filters(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    chat_id = server.chat_ids()[1]
    msgs = server.messages(chat_id)
    word = next(w for m in msgs for w in m["message"].split() if w.isalpha() and len(w) > 3)
    expected = [m["id"] for m in msgs if word.casefold() in m["message"].casefold()]
    params = {"query": word.upper()}
    assert await walk(http, server, token, chat_id, limit=3, params=params) == expected
    # Period: from inclusive, till exclusive.
    pivot = msgs[10]
    later = msgs[3]
    params = {"period[from]": pivot["created_at"], "period[till]": later["created_at"]}
    got = await walk(http, server, token, chat_id, limit=4, params=params)
    assert pivot["id"] in got
    assert later["id"] not in got
    assert got == [
        m["id"] for m in msgs if pivot["created_at"] <= m["created_at"] < later["created_at"]
    ]
    # The same instant with an offset and with no offset (UTC) means the same thing.
    naive = pivot["created_at"].removesuffix("Z")
    assert await walk(http, server, token, chat_id, params={"period[from]": naive}) == [
        m["id"] for m in msgs if m["created_at"] >= pivot["created_at"]
    ]
    _, page, _ = await call(
        http,
        server,
        "GET",
        "messages/",
        token=token,
        params={"chat_id": str(chat_id), "period[from]": naive + "+00:00", "limit": "100"},
    )
    assert page["total_count"] == len([m for m in msgs if m["created_at"] >= pivot["created_at"]])


async def test_bad_listing_parameters(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[dict[str, str], str]] = [
        ({"period[from]": "yesterday"}, "invalid_request"),
        (
            {"period[from]": "2025-06-02T00:00:00Z", "period[till]": "2025-06-01T00:00:00Z"},
            "invalid_request",
        ),
        ({"limit": "0"}, "invalid_request"),
        ({"limit": "-3"}, "invalid_request"),
        ({"limit": "ten"}, "invalid_request"),
        ({"chat_id": ""}, "invalid_request"),
        ({"chat_id": "abc"}, "invalid_request"),
        ({"cursor": "garbage"}, "invalid_cursor"),
        ({"cursor": "eyJjIjoxfQ"}, "invalid_cursor"),
    ]
    token = server.issue_token()
    for params, code in cases:
        query = {"chat_id": str(server.chat_ids()[0]), **params}
        status, err, _ = await call(http, server, "GET", "messages/", token=token, params=query)
        assert (status, err["error"]["code"]) == (400, code), params


async def test_listing_limits_and_cursor_binding(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    token = server.issue_token()
    chat_id, other = server.chat_ids()[:2]
    status, page, _ = await call(
        http,
        server,
        "GET",
        "messages/",
        token=token,
        params={"chat_id": str(chat_id), "limit": "1000"},
    )
    assert (status, page["limit"], len(page["items"])) == (200, 100, 45)
    assert page["next_cursor"] == ""
    status, _, _ = await call(http, server, "GET", "messages/", token=token)
    assert status == 400
    status, _, _ = await call(
        http, server, "GET", "messages/", token=token, params={"chat_id": "999999999"}
    )
    assert status == 404
    async with MessagesServer(chats=2, messages_per_chat=30, cursor_mode="token") as tserver:
        ttoken = tserver.issue_token()
        c1, c2 = tserver.chat_ids()
        base = {"chat_id": str(c1), "limit": "5", "query": "e"}
        _, page, _ = await call(http, tserver, "GET", "messages/", token=ttoken, params=base)
        cursor = page["next_cursor"]
        # Another chat, or dropped filters: the cursor is not valid there.
        for params in ({**base, "chat_id": str(c2)}, {"chat_id": str(c1)}):
            status, err, _ = await call(
                http, tserver, "GET", "messages/", token=ttoken, params={**params, "cursor": cursor}
            )
            assert (status, err["error"]["code"]) == (400, "invalid_cursor")
        status, _, _ = await call(
            http, tserver, "GET", "messages/", token=ttoken, params={**base, "cursor": cursor}
        )
        assert status == 200
    # A whole cursor URL passed as the cursor value is accepted.
    _, page, _ = await call(
        http, server, "GET", "messages/", token=token, params={"chat_id": str(other), "limit": "5"}
    )
    status, page2, _ = await call(
        http, server, "GET", "messages/", token=token, params={"cursor": page["next_cursor"]}
    )
    assert status == 200
    assert page2["items"][0]["id"] < page["items"][-1]["id"]


async def test_empty_pages_carry_cursors(http: aiohttp.ClientSession) -> None:
    async with MessagesServer(chats=1, messages_per_chat=40, empty_page_every=2) as server:
        token = server.issue_token()
        chat_id = server.chat_ids()[0]
        expected = [m["id"] for m in server.messages(chat_id)]
        assert await walk(http, server, token, chat_id, limit=10) == expected
        # Four real pages with an empty one after each of the first three.
        assert len(server.resource_requests()) == 7


# -- data shape -------------------------------------------------------------------------------


async def test_dataset_shape_and_reproducibility() -> None:
    a = MessagesServer(chats=6, messages_per_chat=(5, 40), seed=3)
    b = MessagesServer(chats=6, messages_per_chat=(5, 40), seed=3)
    c = MessagesServer(chats=6, messages_per_chat=(5, 40), seed=4)
    assert a.chats() == b.chats()
    assert all(a.messages(i) == b.messages(i) for i in a.chat_ids())
    assert [a.messages(i) for i in a.chat_ids()] != [c.messages(i) for i in c.chat_ids()]
    types = {chat["type"] for chat in a.chats()}
    assert types == {"private", "group"}
    everything = []
    for chat in a.chats():
        msgs = a.messages(chat["chat_id"])
        everything.extend(msgs)
        if chat["type"] == "group":
            assert chat["members_count"].isdigit()
            assert chat["name"]
            assert chat["picture_url"]
        else:
            assert set(chat) == {"chat_id", "type"}
            assert {m["uid"] for m in msgs} <= {chat["chat_id"], a.user_id}
    everything.sort(key=lambda m: m["id"])
    stamps = [m["created_at"] for m in everything]
    assert stamps == sorted(stamps)
    assert all(s.endswith("Z") for s in stamps)
    assert len({m["id"] for m in everything}) == len(everything) == a.all_message_count()
    assert any(m["uid"] == a.user_id for m in everything)
    assert any(m["uid"] != a.user_id for m in everything)
    with_files = [m for m in everything if m["attachments"]]
    assert with_files
    assert set(with_files[0]["attachments"]["items"][0]) == {"type", "url", "name", "size"}
    assert a.max_id() == everything[-1]["id"]


async def test_generation_is_fast() -> None:
    # CPU time, not wall time: other processes on a busy machine must not fail this.
    started = time.process_time()
    server = MessagesServer(chats=300, messages_per_chat=400)
    assert server.all_message_count() == 120_000
    assert time.process_time() - started < 2.0


async def test_extra_fields(http: aiohttp.ClientSession) -> None:
    async with MessagesServer(chats=4, messages_per_chat=5, extra_fields=True) as server:
        token = server.issue_token()
        _, chats, _ = await call(http, server, "GET", "messages/chats/", token=token)
        assert "channel" in {c["type"] for c in chats["items"]}
        _, page, _ = await call(
            http,
            server,
            "GET",
            "messages/",
            token=token,
            params={"chat_id": str(server.chat_ids()[0])},
        )
        assert "x_meta" in page
        assert {"reactions", "edited", "x_meta"} <= set(page["items"][0])


async def test_add_chat_and_post(server: MessagesServer) -> None:
    chat_id = server.add_chat(type="group", name="New", members=4)
    assert chat_id in server.chat_ids()
    assert server.messages(chat_id) == []
    msg = server.post_message(chat_id, "hi there")
    assert msg["uid"] != server.user_id
    assert server.messages(chat_id) == [msg]
    private = server.add_chat(type="private")
    assert server.post_message(private)["uid"] == private


async def test_edits_and_deletions_between_walks(
    server: MessagesServer, http: aiohttp.ClientSession
) -> None:
    # What an export's rescan meets: the same ids, one changed, one gone.
    token = server.issue_token()
    chat_id = server.chat_ids()[1]
    before = server.messages(chat_id)
    assert await walk(http, server, token, chat_id) == [m["id"] for m in before]
    target, gone = before[3], before[5]
    attachment = {"type": "file", "url": "https://files.test/a.pdf", "name": "a.pdf", "size": 3}
    edited = server.edit_message(target["id"], "changed", attachments=[attachment])
    assert edited == {**target, "message": "changed", "attachments": {"items": [attachment]}}
    server.delete_message(gone["id"])
    _, page, _ = await call(
        http, server, "GET", "messages/", token=token, params={"chat_id": str(chat_id)}
    )
    by_id = {m["id"]: m for m in page["items"]}
    assert by_id[target["id"]] == edited
    assert gone["id"] not in by_id
    assert page["total_count"] == len(before) - 1
    assert server.edit_message(target["id"], attachments=[])["attachments"] is None
    assert server.messages(chat_id)[3]["message"] == "changed"
    with pytest.raises(KeyError):
        server.edit_message(gone["id"], "x")


async def test_another_origin_goes_through_the_same_wrapper(http: aiohttp.ClientSession) -> None:
    # The extension point for an origin serving something else (attachment files): its
    # requests are recorded under its name and injected faults reach them.
    from aiohttp import web

    server = MessagesServer(chats=1, messages_per_chat=1)
    seen: list[str] = []

    def files(ctx: Any) -> web.StreamResponse:
        seen.append(ctx.path)
        return web.Response(body=b"file bytes", content_type="application/octet-stream")

    server._add_origin("files", files)
    with pytest.raises(ValueError, match="already"):
        server._add_origin("files", files)
    async with server:
        origin = server._origins["files"]
        assert origin.port
        url = f"http://127.0.0.1:{origin.port}/f/1.bin"
        async with http.get(url, headers={"X-Probe": "1"}) as resp:
            assert (resp.status, await resp.read()) == (200, b"file bytes")
        server.inject(Fault.status(404), path="/f/2")
        async with http.get(url.replace("1.bin", "2.bin")) as resp:
            assert resp.status == 404
        assert seen == ["f/1.bin"]
        records = [r for r in server.requests if r.origin == "files"]
        assert [(r.path, r.status, r.fault) for r in records] == [
            ("f/1.bin", 200, None),
            ("f/2.bin", 404, "status"),
        ]
        assert records[0].headers["X-Probe"] == "1"
        assert server.resource_requests() == []
    assert origin.runner is None


# -- writes -----------------------------------------------------------------------------------


async def test_add_edit_delete(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    chat_id = server.chat_ids()[1]
    top = server.max_id()
    status, msg, _ = await call(
        http,
        server,
        "POST",
        "messages/add/",
        token=token,
        json={
            "chat_id": chat_id,
            "message": "hello",
            "attachments": [{"type": "link", "url": "https://example.test/"}],
            "is_whisper": False,
        },
    )
    assert status == 200
    assert msg["id"] == top + 1
    assert msg["uid"] == server.user_id
    assert msg["attachments"] == {
        "items": [{"type": "link", "url": "https://example.test/", "name": None, "size": None}]
    }
    assert server.messages(chat_id)[0] == msg
    status, got, _ = await call(http, server, "GET", f"messages/{msg['id']}", token=token)
    assert (status, got) == (200, msg)

    status, edited, _ = await call(
        http,
        server,
        "POST",
        f"messages/{msg['id']}/edit/",
        token=token,
        json={"chat_id": chat_id, "message": "edited"},
    )
    assert status == 200
    assert edited["message"] == "edited"
    assert edited["attachments"] == msg["attachments"]
    status, err, _ = await call(
        http,
        server,
        "POST",
        f"messages/{msg['id']}/edit/",
        token=token,
        json={"chat_id": server.chat_ids()[0], "message": "x"},
    )
    assert status == 400

    theirs = next(m for m in server.messages(chat_id) if m["uid"] != server.user_id)
    for path, payload in (
        (f"messages/{theirs['id']}/edit/", {"chat_id": chat_id, "message": "mine now"}),
        (f"messages/{theirs['id']}/delete/", None),
    ):
        status, err, _ = await call(http, server, "POST", path, token=token, json=payload)
        assert (status, err["error"]["code"]) == (403, "forbidden")

    async with http.post(
        server.resource_uri + f"messages/{msg['id']}/delete/", headers=auth(token)
    ) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    status, err, _ = await call(http, server, "POST", f"messages/{msg['id']}/delete/", token=token)
    assert (status, err["error"]["code"]) == (404, "not_found")
    assert (await call(http, server, "GET", f"messages/{msg['id']}", token=token))[0] == 404


async def test_add_validation(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    chat = server.chat_ids()[0]
    payloads: list[Any] = [
        {"message": "no chat"},
        {"chat_id": str(chat), "message": "chat id as string"},
        {"chat_id": chat},
        {"chat_id": chat, "message": ""},
        {"chat_id": chat, "message": "x" * 4097},
        {"chat_id": chat, "message": 5},
        {"chat_id": chat, "attachments": [{"type": "file", "url": "u"}] * 11},
        {"chat_id": chat, "attachments": [{"type": "file"}]},
        {"chat_id": chat, "attachments": "file"},
        {"chat_id": chat, "message": "x", "is_whisper": "yes"},
        ["not", "an", "object"],
    ]
    token = server.issue_token()
    for payload in payloads:
        status, err, _ = await call(
            http, server, "POST", "messages/add/", token=token, json=payload
        )
        assert (status, err["error"]["code"]) == (400, "invalid_request"), payload


async def test_add_bodies(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    chat_id = server.chat_ids()[0]
    status, _msg, _ = await call(
        http,
        server,
        "POST",
        "messages/add/",
        token=token,
        json={"chat_id": chat_id, "message": "x" * 4096},
    )
    assert status == 200
    status, err, _ = await call(
        http,
        server,
        "POST",
        "messages/add/",
        token=token,
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert (status, err["error"]["code"]) == (400, "invalid_request")
    status, err, _ = await call(
        http, server, "POST", "messages/add/", token=token, json={"chat_id": 424242, "message": "x"}
    )
    assert (status, err["error"]["code"]) == (404, "not_found")
    status, err, _ = await call(
        http,
        server,
        "POST",
        "messages/add/",
        token=token,
        json={"chat_id": chat_id, "message": "y" * (server.max_body + 10)},
    )
    assert (status, err["error"]["code"]) == (413, "too_large")


# -- faults -----------------------------------------------------------------------------------


async def test_status_faults(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    handle = server.inject(Fault.status(503, retry_after="2"), path="messages/chats/", times=2)
    server.inject(Fault.status(502, body=b"<html>bad gateway</html>", content_type="text/html"))
    server.inject(Fault.status(401))
    server.inject(Fault.rate_limited("Wed, 21 Oct 2015 07:28:00 GMT"))
    server.inject(Fault.invalid_cursor())
    for _ in range(2):
        status, err, resp = await call(http, server, "GET", "messages/chats/", token=token)
        assert (status, err["error"]["code"], resp.headers["Retry-After"]) == (
            503,
            "unavailable",
            "2",
        )
    assert handle.hits == 2
    status, body, resp = await call(http, server, "GET", "messages/chats/", token=token)
    assert (status, body, resp.content_type) == (502, b"<html>bad gateway</html>", "text/html")
    status, err, resp = await call(http, server, "GET", "messages/chats/", token=token)
    assert (status, resp.headers["WWW-Authenticate"]) == (401, 'Bearer error="invalid_token"')
    status, err, resp = await call(http, server, "GET", "messages/chats/", token=token)
    assert (status, err["error"]["code"]) == (429, "rate_limited")
    assert resp.headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    status, err, _ = await call(http, server, "GET", "messages/chats/", token=token)
    assert (status, err["error"]["code"]) == (400, "invalid_cursor")
    assert (await call(http, server, "GET", "messages/chats/", token=token))[0] == 200
    faults = [r.fault for r in server.requests]
    assert faults == [
        "status",
        "status",
        "status",
        "status",
        "rate_limited",
        "invalid_cursor",
        None,
    ]


async def test_fault_matching_filters(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    chat_a, chat_b = server.chat_ids()[:2]
    handle = server.inject(
        Fault.status(500), method="GET", path="messages/", chat_id=chat_b, after=1
    )
    for chat_id, want in (
        (chat_a, 200),
        (chat_b, 200),
        (chat_a, 200),
        (chat_b, 500),
        (chat_b, 200),
    ):
        status, _, _ = await call(
            http, server, "GET", "messages/", token=token, params={"chat_id": str(chat_id)}
        )
        assert status == want
    assert handle.hits == 1
    # No path: never the token endpoint.
    server.inject(Fault.status(500), times=None)
    status, _ = await exchange(http, server, **cc_form(server))
    assert status == 200
    server.clear_faults()
    server.inject(Fault.status(503), path="oauth/token")
    async with http.post(server.token_url, data=cc_form(server)) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "unavailable"


async def test_drop_faults(server: MessagesServer) -> None:
    token = server.issue_token()
    chat_id = server.chat_ids()[0]
    count = len(server.messages(chat_id))
    server.inject(Fault.drop(), path="messages/add/")
    server.inject(Fault.drop_after_commit(), path="messages/add/")
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(2):
            with pytest.raises(aiohttp.ClientError):
                await call(
                    http,
                    server,
                    "POST",
                    "messages/add/",
                    token=token,
                    json={"chat_id": chat_id, "message": "maybe"},
                )
        status, _, _ = await call(
            http,
            server,
            "POST",
            "messages/add/",
            token=token,
            json={"chat_id": chat_id, "message": "sure"},
        )
        assert status == 200
    assert len(server.messages(chat_id)) == count + 2  # the drop did not store, the commit did
    records = server.resource_requests()
    assert [(r.fault, r.status) for r in records] == [
        ("drop", None),
        ("drop_after_commit", None),
        (None, 200),
    ]


async def test_delay_and_latency(http: aiohttp.ClientSession) -> None:
    async with MessagesServer(chats=1, messages_per_chat=3, latency=0.05) as server:
        token = server.issue_token()
        server.inject(Fault.delay(0.1))
        started = time.monotonic()
        await asyncio.gather(
            *(call(http, server, "GET", "messages/chats/", token=token) for _ in range(5))
        )
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 1.0
        assert server.max_in_flight == 5
        assert server.in_flight == 0
        records = server.resource_requests()
        assert all(r.finished is not None and r.finished - r.started >= 0.05 for r in records)
        server.reset_stats()
        assert (server.requests, server.max_in_flight) == ([], 0)


async def test_client_gone_during_latency(http: aiohttp.ClientSession) -> None:
    async with MessagesServer(chats=1, messages_per_chat=3, latency=0.2) as server:
        token = server.issue_token()
        with pytest.raises(TimeoutError):
            await call(
                http,
                server,
                "GET",
                "messages/chats/",
                token=token,
                timeout=aiohttp.ClientTimeout(total=0.05),
            )
        # The handler stops with the client that gave up, well before its latency is over.
        for _ in range(50):
            if server.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert server.in_flight == 0
        (record,) = server.requests
        assert record.status is None
        assert record.finished is not None
        assert record.finished - record.started < 0.15


async def test_body_faults(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    chat = {"chat_id": str(server.chat_ids()[0])}
    server.inject(Fault.malformed())
    status, body, _ = await call(http, server, "GET", "messages/", token=token, params=chat)
    assert (status, body) == (200, b'{"items": [')
    server.inject(Fault.wrong_shape())
    status, body, _ = await call(http, server, "GET", "messages/", token=token, params=chat)
    assert status == 200
    assert not isinstance(body["items"], list)
    server.inject(Fault.wrong_shape())
    status, body, _ = await call(http, server, "GET", "messages/1", token=token)
    assert (status, body["id"]) == (200, "abc")
    server.inject(Fault.expire_token())
    status, err, _ = await call(http, server, "GET", "messages/chats/", token=token)
    assert (status, err["error"]["code"]) == (401, "invalid_token")
    assert (await call(http, server, "GET", "messages/chats/", token=token))[0] == 401


async def test_oversized(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    server.inject(Fault.oversized(size=3 * 1024 * 1024))
    async with http.get(server.resource_uri + "messages/chats/", headers=auth(token)) as resp:
        assert resp.status == 200
        assert resp.content_length is None
        assert len(await resp.content.read(100)) > 0
    server.inject(Fault.oversized(size=2 * 1024 * 1024))
    status, body, _ = await call(http, server, "GET", "messages/chats/", token=token)
    assert (status, body["items"]) == (200, [])
    server.inject(Fault.oversized(size=4 * 1024 * 1024, gzip=True, declare_length=True))
    async with http.get(server.resource_uri + "messages/chats/", headers=auth(token)) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert int(resp.headers["Content-Length"]) < 100_000
        assert len(await resp.read()) == 4 * 1024 * 1024
    assert (await call(http, server, "GET", "messages/chats/", token=token))[0] == 200


async def test_redirect_and_recorder(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    async with OriginRecorder() as other:
        assert other.origin != server.resource_origin
        server.inject(Fault.redirect(other.url("/steal")))
        async with http.get(
            server.resource_uri + "messages/chats/", headers=auth(token), allow_redirects=False
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == other.url("/steal")
        assert other.requests == []
        async with http.post(other.url("/x?a=1&a=2"), data=b"payload", headers=auth("t")) as resp:
            assert (resp.status, await resp.json()) == (200, {})
        (record,) = other.requests
        assert (record.method, record.path, record.query, record.body) == (
            "POST",
            "/x",
            {"a": "2"},
            b"payload",
        )
        assert record.headers["authorization"] == "Bearer t"
        assert other.saw_authorization


async def test_cursor_faults(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    chat_id = server.chat_ids()[0]
    first_url = server.resource_uri + f"messages/?chat_id={chat_id}&limit=5"
    # First page: the cursor then points at itself.
    server.inject(Fault.repeat_cursor())
    _, page, _ = await call(http, server, "GET", first_url, token=token)
    loop = page["next_cursor"]
    _, again, _ = await call(http, server, "GET", loop, token=token)
    assert again["next_cursor"] == loop
    # A later page: the cursor it came with.
    _, page, _ = await call(http, server, "GET", first_url, token=token)
    server.inject(Fault.repeat_cursor())
    _, page2, _ = await call(http, server, "GET", page["next_cursor"], token=token)
    assert page2["next_cursor"] == page["next_cursor"]
    # Not a listing: listing faults do not match.
    handle = server.inject(Fault.foreign_cursor("http://evil.test:81"))
    assert (await call(http, server, "GET", "messages/chats/", token=token))[0] == 200
    assert handle.hits == 0
    _, page, _ = await call(http, server, "GET", first_url, token=token)
    assert page["next_cursor"].startswith("http://evil.test:81/api/v1/messages/?chat_id=")
    assert handle.hits == 1
    # Backwards: the next page repeats ids at or above the previous page's smallest.
    _, page, _ = await call(http, server, "GET", first_url, token=token)
    server.inject(Fault.backwards_page())
    _, back, _ = await call(http, server, "GET", page["next_cursor"], token=token)
    assert min(m["id"] for m in back["items"]) >= min(m["id"] for m in page["items"])


# -- rate limiting and encoding ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["seconds", "http-date"])
async def test_rate_limiter(http: aiohttp.ClientSession, fmt: Any) -> None:
    async with MessagesServer(
        chats=1, messages_per_chat=1, rate_limit=2.0, burst=3, retry_after_format=fmt
    ) as server:
        token = server.issue_token()
        statuses = []
        retry_after = None
        for _ in range(5):
            status, _, resp = await call(http, server, "GET", "messages/chats/", token=token)
            statuses.append(status)
            retry_after = resp.headers.get("Retry-After", retry_after)
        assert statuses == [200, 200, 200, 429, 429]
        assert retry_after is not None
        if fmt == "seconds":
            assert retry_after == "1"
        else:
            when = email.utils.parsedate_to_datetime(retry_after).timestamp()
            assert 0 < when - time.time() <= 2


async def test_gzip(http: aiohttp.ClientSession) -> None:
    async with MessagesServer(chats=1, messages_per_chat=60) as server:
        token = server.issue_token()
        url = server.resource_uri + f"messages/?chat_id={server.chat_ids()[0]}&limit=50"
        async with http.get(url, headers=auth(token)) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert len((await resp.json())["items"]) == 50
        async with http.get(
            url, headers={**auth(token), "Accept-Encoding": "identity"}, auto_decompress=False
        ) as resp:
            assert "Content-Encoding" not in resp.headers
        async with http.get(url, headers=auth(token), auto_decompress=False) as resp:
            assert json.loads(gzip.decompress(await resp.read()))["limit"] == 50
    async with MessagesServer(chats=1, messages_per_chat=60, compress=False) as server:
        token = server.issue_token()
        url = server.resource_uri + f"messages/?chat_id={server.chat_ids()[0]}&limit=50"
        async with http.get(url, headers=auth(token)) as resp:
            assert "Content-Encoding" not in resp.headers


# -- lifecycle and the serve command ----------------------------------------------------------


async def test_start_close_and_records(http: aiohttp.ClientSession) -> None:
    server = MessagesServer(chats=1, messages_per_chat=2, record=False)
    await server.start()
    try:
        assert server.resource_uri.endswith("/api/v1/")
        status, _ = await exchange(http, server, **cc_form(server))
        assert status == 200
        assert server.requests == []
        assert server.token_request_count == 1
    finally:
        await server.close()
        await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await exchange(http, server, **cc_form(server))


async def test_request_records(server: MessagesServer, http: aiohttp.ClientSession) -> None:
    token = server.issue_token()
    await exchange(http, server, **cc_form(server))
    await call(http, server, "GET", "messages/", token=token, params={"chat_id": "1", "limit": "3"})
    token_rec, list_rec = server.requests
    assert (token_rec.origin, token_rec.path, token_rec.token) == ("token", "oauth/token", None)
    assert b"client_secret" in token_rec.body
    assert (list_rec.origin, list_rec.path, list_rec.status) == ("resource", "messages/", 404)
    assert list_rec.query == {"chat_id": "1", "limit": "3"}
    assert list_rec.token == token
    assert list_rec.headers["authorization"] == f"Bearer {token}"
    assert list_rec.finished is not None
    assert list_rec.finished >= list_rec.started
    assert server.resource_requests() == [list_rec]


async def test_serve_writes_ready_file(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    ready = tmp_path / "ready.json"
    stop = asyncio.Event()
    lines: list[str] = []
    task = asyncio.create_task(
        testing.serve(
            chats=2, messages_per_chat=5, ready_file=str(ready), stop=stop, echo=lines.append
        )
    )
    try:
        for _ in range(200):
            if ready.exists():
                break
            await asyncio.sleep(0.01)
        info = json.loads(ready.read_text())
        assert set(info) >= {"token_url", "resource_uri", "client_id", "client_secret"}
        async with http.post(
            info["token_url"],
            data={
                "grant_type": "client_credentials",
                "client_id": info["client_id"],
                "client_secret": info["client_secret"],
            },
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["resource_uri"] == info["resource_uri"]
    finally:
        stop.set()
        await task
    assert any(info["token_url"] in line for line in lines)


# -- the pure rules, without sockets ----------------------------------------------------------
#
# Each rule module of the emulator is plain code: these tables drive it directly. The live
# tests above check that the HTTP layer wires the same rules to the wire.

IDS = [10, 20, 30, 40, 50]


CASES_WINDOW_TABLE: list[tuple[Any, int | None, int, dict[str, bool], Any]] = [
    # A first page: the newest, and a next cursor below the oldest of them.
    ("next", None, 2, {}, ([40, 50], 40, None, False)),
    ("next", 40, 2, {}, ([20, 30], 20, 30)),
    ("next", 20, 2, {}, ([10], None, 10)),
    ("next", 10, 2, {}, ([], None, 9)),
    ("prev", 20, 2, {}, ([30, 40], 30, 40)),
    ("prev", 40, 5, {}, ([50], 50, None)),
    ("prev", 50, 2, {}, ([], 51, None)),
    # An empty page keeps its position: following its cursor gives what it left out.
    ("next", 40, 2, {"empty": True}, ([], 40, 30)),
    ("next", None, 2, {"empty": True}, ([], 51, None)),
    ("prev", 20, 2, {"empty": True}, ([], 30, 20)),
    # The backwards_page fault: the window on the wrong side of the boundary.
    ("next", None, 2, {"backwards": True}, ([10, 20], None, 20, True)),
    ("next", 30, 2, {"backwards": True}, ([30, 40], 30, 40)),
    ("prev", 40, 2, {"backwards": True}, ([30, 40], 30, 40)),
]


def test_window_table() -> None:
    from messages_async.testing._listing import window

    for direction, boundary, limit, flags, expected in CASES_WINDOW_TABLE:
        ids, older, newer, *rest = expected
        got = window(IDS, direction, boundary, limit, **flags)
        assert IDS[got.lo : got.hi] == ids
        assert (got.older, got.newer) == (older, newer)
        assert got.oldest_first == (rest[0] if rest else False)


def test_window_on_an_empty_chat() -> None:
    from messages_async.testing._listing import window

    got = window([], "next", None, 20)
    assert (got.lo, got.hi, got.older, got.newer) == (0, 0, None, None)


CASES_WINDOWS_TILE_A_CHAT_BOTH_WAYS: list[int] = [1, 2, 3, 7, 100]


def test_windows_tile_a_chat_both_ways() -> None:
    from messages_async.testing._listing import window

    for limit in CASES_WINDOWS_TILE_A_CHAT_BOTH_WAYS:
        ids = list(range(1, 24))
        seen: list[int] = []
        boundary: int | None = None
        first = window(ids, "next", None, limit)
        top = first.newer
        while True:
            win = window(ids, "next", boundary, limit)
            seen.extend(reversed(ids[win.lo : win.hi]))
            if win.older is None:
                break
            boundary = win.older
        assert seen == ids[::-1]
        assert top is None
        # And back up from the oldest page, by prev cursors.
        back: list[int] = []
        boundary = window(ids, "next", 2, limit).newer
        while boundary is not None:
            win = window(ids, "prev", boundary, limit)
            back.extend(ids[win.lo : win.hi])
            boundary = win.newer
        assert back == ids[1:]


def _store(**options: Any) -> Any:
    from messages_async.testing._dataset import Store

    settings: dict[str, Any] = {"chats": 2, "messages_per_chat": 6, "seed": 1}
    settings.update(options)
    return Store(**settings)


def _lister(**options: Any) -> Any:
    from messages_async.testing._listing import Lister

    store = options.pop("store", None) or _store()
    lister = Lister(store, resource_path="/api/", **options)
    lister.origin = "http://api.test"
    return lister


CASES_LISTING_REFUSALS_TABLE: list[tuple[dict[str, str], int, str, str]] = [
    ({}, 400, "invalid_request", "chat_id is required"),
    ({"chat_id": "x"}, 400, "invalid_request", "unsigned integer"),
    ({"chat_id": "-3"}, 400, "invalid_request", "unsigned integer"),
    ({"chat_id": "١٢"}, 400, "invalid_request", "unsigned integer"),
    ({"chat_id": "{chat}", "limit": "ten"}, 400, "invalid_request", "integer"),
    ({"chat_id": "{chat}", "limit": "0"}, 400, "invalid_request", "at least 1"),
    ({"chat_id": "{chat}", "period[from]": "yesterday"}, 400, "invalid_request", "ISO 8601"),
    (
        {"chat_id": "{chat}", "period[from]": "2025-02-01", "period[till]": "2025-01-01"},
        400,
        "invalid_request",
        "after",
    ),
    ({"chat_id": "999"}, 404, "not_found", "chat 999"),
    ({"chat_id": "{chat}", "cursor": "garbage!"}, 400, "invalid_cursor", "cursor"),
    ({"chat_id": "{chat}", "cursor": "{other}"}, 400, "invalid_cursor", "another chat"),
    (
        {"chat_id": "{chat}", "cursor": "{chat_cursor}", "query": "x"},
        400,
        "invalid_cursor",
        "other filters",
    ),
    ({"cursor": "http://h/elsewhere/?cursor=a"}, 400, "invalid_cursor", "not a listing"),
    ({"cursor": "http://h/api/messages/?chat_id=1"}, 400, "invalid_cursor", "no cursor"),
]


def test_listing_refusals_table() -> None:
    from messages_async.testing._answers import Refusal
    from messages_async.testing._listing import Cursor, Filters, encode_cursor

    for params, status, code, words in CASES_LISTING_REFUSALS_TABLE:
        lister = _lister()
        chat, other = lister.store.chat_ids()
        values = {
            "chat": str(chat),
            "other": encode_cursor(Cursor(other, "next", 5, Filters()), lister.key),
            "chat_cursor": encode_cursor(Cursor(chat, "next", 5, Filters()), lister.key),
        }
        filled = {k: v.format(**values) for k, v in params.items()}
        with pytest.raises(Refusal) as caught:
            lister.read(filled)
        refusal = caught.value
        assert (refusal.status, refusal.code) == (status, code)
        assert words in refusal.message
        assert refusal.body == {"error": {"code": code, "message": refusal.message}}


def test_listing_query_reading() -> None:
    from messages_async.testing._listing import MAX_LIMIT, Cursor, Filters, encode_cursor

    lister = _lister()
    chat = lister.store.chat_ids()[0]
    query = lister.read({"chat_id": str(chat), "limit": "500", "query": "Hi"})
    assert (query.chat_id, query.limit, query.cursor) == (chat, MAX_LIMIT, None)
    assert query.filters == Filters(query="Hi")
    # A whole cursor URL as the cursor value brings its chat, limit and filters along.
    token = encode_cursor(Cursor(chat, "prev", 7, Filters(query="Hi")), lister.key)
    url = f"http://api.test/api/messages/?chat_id={chat}&limit=3&query=Hi&cursor={token}"
    query = lister.read({"cursor": url})
    assert (query.chat_id, query.limit, query.token, query.cursor_url) == (chat, 3, token, url)
    assert query.cursor == Cursor(chat, "prev", 7, Filters(query="Hi"))
    # Parameters sent beside the URL win over the URL's own.
    assert lister.read({"cursor": url, "limit": "2"}).limit == 2


def test_cursor_tokens_are_signed_and_opaque() -> None:
    from messages_async.testing._listing import (
        Cursor,
        CursorError,
        Filters,
        cursor_key,
        decode_cursor,
        encode_cursor,
    )

    key = cursor_key(1)
    position = Cursor(7, "prev", 42, Filters("q", 1.5, 2.5), repeat=True)
    a, b = encode_cursor(position, key), encode_cursor(position, key)
    assert a != b  # a nonce: equal positions, different strings
    assert decode_cursor(a, key) == decode_cursor(b, key) == position
    assert cursor_key(1) == key != cursor_key(2)
    for bad in ("", "abc", a[:-2] + ("A" if a[-2] != "A" else "B") + a[-1]):
        with pytest.raises(CursorError):
            decode_cursor(bad, key)
    with pytest.raises(CursorError, match="signature"):
        decode_cursor(a, cursor_key(2))


CASES_LISTING_PLAN_TABLE: list[tuple[Fault | None, int, bool, bool]] = [
    (None, 0, False, True),
    (Fault.empty_page(), 0, True, False),
    (Fault.repeat_cursor(), 0, False, False),
    (Fault.backwards_page(), 0, False, False),
    (Fault.foreign_cursor("http://x"), 0, False, False),
    (Fault.delay(0.1), 0, False, False),
    (None, 1, True, False),
]


def test_listing_plan_table() -> None:
    for fault, every, empty, cacheable in CASES_LISTING_PLAN_TABLE:
        lister = _lister(empty_page_every=every)
        query = lister.read({"chat_id": str(lister.store.chat_ids()[0])})
        plan = lister.plan(query, fault)
        assert (plan.empty, plan.cacheable) == (empty, cacheable)
        assert lister.pages_served == 1


def test_a_filtered_or_extra_page_is_never_cached() -> None:
    lister = _lister()
    chat = str(lister.store.chat_ids()[0])
    assert not lister.plan(lister.read({"chat_id": chat, "query": "a"}), None).cacheable
    extra = _lister(store=_store(extra_fields=True), extra_fields=True)
    plan = extra.plan(extra.read({"chat_id": str(extra.store.chat_ids()[0])}), None)
    assert not plan.cacheable
    assert set(extra.page(plan, request_target="/")) >= {"has_more", "x_meta"}


def test_listing_pages_and_their_cursors() -> None:
    from messages_async.testing._listing import decode_cursor

    lister = _lister()
    chat = lister.store.chat_ids()[0]
    ids = [m["id"] for m in lister.store.messages(chat)]
    page = lister.page(
        lister.plan(lister.read({"chat_id": str(chat), "limit": "4"}), None), request_target="/"
    )
    assert [m["id"] for m in page["items"]] == ids[:4]
    assert (page["limit"], page["total_count"], page["prev_cursor"]) == (4, 6, "")
    url = yarl.URL(page["next_cursor"])
    assert (url.origin(), url.path) == (yarl.URL("http://api.test"), "/api/messages/")
    assert (url.query["chat_id"], url.query["limit"]) == (str(chat), "4")
    second = lister.page(lister.plan(lister.read({"cursor": str(url)}), None), request_target="/")
    assert [m["id"] for m in second["items"]] == ids[4:]
    assert second["next_cursor"] == ""
    assert (
        decode_cursor(yarl.URL(second["prev_cursor"]).query["cursor"], lister.key).boundary
        == ids[4]
    )
    # Bare tokens in token mode.
    lister.cursor_mode = "token"
    page = lister.page(
        lister.plan(lister.read({"chat_id": str(chat), "limit": "4"}), None), request_target="/"
    )
    assert "://" not in page["next_cursor"]
    assert decode_cursor(page["next_cursor"], lister.key).boundary == ids[3]


def test_listing_faults_build_their_pages() -> None:
    from messages_async.testing._listing import decode_cursor

    lister = _lister()
    chat = lister.store.chat_ids()[0]
    ids = [m["id"] for m in lister.store.messages(chat)]
    first = {"chat_id": str(chat), "limit": "2"}

    def page(params: dict[str, str], fault: Fault | None, target: str = "/t") -> Json:
        return lister.page(lister.plan(lister.read(params), fault), request_target=target)

    # repeat_cursor on a first page: a cursor that, once followed, hands itself back.
    looped = page(first, Fault.repeat_cursor())["next_cursor"]
    assert decode_cursor(yarl.URL(looped).query["cursor"], lister.key).repeat
    assert page({"cursor": looped}, None)["next_cursor"] == looped
    # ... and on a later page, the very cursor the request came with.
    plain = page(first, None)["next_cursor"]
    token = yarl.URL(plain).query["cursor"]
    assert page({**first, "cursor": token}, Fault.repeat_cursor(), "/api/x")["next_cursor"] == (
        "http://api.test/api/x"
    )
    foreign = yarl.URL(page(first, Fault.foreign_cursor("http://evil.test"))["next_cursor"])
    assert foreign.origin() == yarl.URL("http://evil.test")
    backwards = page({**first, "cursor": token}, Fault.backwards_page())
    assert [m["id"] for m in backwards["items"]] == ids[:2]
    empty = page(first, Fault.empty_page())
    assert empty["items"] == []
    assert empty["next_cursor"]
    assert [m["id"] for m in page({"cursor": empty["next_cursor"]}, None)["items"]] == ids[:2]


CASES_FILTERS_TABLE: list[tuple[dict[str, str], Any]] = [
    ({"query": "HELLO"}, lambda m, t: "hello" in m["message"].casefold()),
    ({"period[from]": "2025-03-01T00:00:00"}, lambda m, t: t >= 1740787200),
    ({"period[till]": "2025-03-01T00:00:00+00:00"}, lambda m, t: t < 1740787200),
    (
        {"period[from]": "2025-02-01T00:00:00Z", "period[till]": "2025-06-01T00:00:00Z"},
        lambda m, t: 1738368000 <= t < 1748736000,
    ),
]


def test_filters_table() -> None:
    from messages_async.testing._listing import matching_ids, read_filters

    for params, expected in CASES_FILTERS_TABLE:
        store = _store(chats=1, messages_per_chat=300)
        chat = store.chat_ids()[0]
        got = matching_ids(store, chat, read_filters(params))
        want = [i for i in store.ids(chat) if expected(store.by_id[i], store.stamps[i])]
        assert list(got) == want
        assert 0 < len(want) < 300


# -- the OAuth server -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _oauth(**options: Any) -> Any:
    from messages_async.testing._oauth import OAuthServer

    oauth = OAuthServer(**options)
    oauth.register("app", "s3cret", scopes="messages_read messages_write", user_id=7)
    oauth.register("reader", "r", scopes=["messages_read"], user_id=8)
    return oauth


def _token_call(oauth: Any, form: Any = None, **request: Any) -> tuple[int, Json, Any]:
    from urllib.parse import urlencode

    from messages_async.testing._oauth import TokenRequest

    settings: dict[str, Any] = {
        "method": "POST",
        "content_type": "application/x-www-form-urlencoded",
        "body": (form if isinstance(form, str) else urlencode(form or {})).encode(),
    }
    settings.update(request)
    answer = oauth.exchange(TokenRequest(**settings), resource_uri="http://api.test/v1/")
    return answer.status, answer.body, answer.headers


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


CC = {"grant_type": "client_credentials", "client_id": "app", "client_secret": "s3cret"}


CASES_TOKEN_ENDPOINT_REFUSALS_TABLE: list[tuple[Any, dict[str, Any], int, str]] = [
    (CC, {"method": "GET"}, 405, "invalid_request"),
    (CC, {"too_large": True}, 413, "invalid_request"),
    (CC, {"content_type": "application/json"}, 400, "invalid_request"),
    ("grant_type=client_credentials&grant_type=x", {}, 400, "invalid_request"),
    ({**CC, "client_secret": "wrong"}, {}, 401, "invalid_client"),
    ({**CC, "client_id": "nobody"}, {}, 401, "invalid_client"),
    ({"grant_type": "client_credentials"}, {}, 401, "invalid_client"),
    ({"client_id": "app", "client_secret": "s3cret"}, {}, 400, "invalid_request"),
    ({**CC, "grant_type": "password"}, {}, 400, "unsupported_grant_type"),
    ({**CC, "scope": "messages_admin"}, {}, 400, "invalid_scope"),
    (
        {**CC, "client_id": "reader", "client_secret": "r", "scope": "messages_write"},
        {},
        400,
        "invalid_scope",
    ),
    (
        {"grant_type": "client_credentials", "client_secret": "s3cret"},
        {"authorization": _basic("app", "s3cret")},
        400,
        "invalid_request",
    ),
    (
        {"grant_type": "client_credentials", "client_id": "reader"},
        {"authorization": _basic("app", "s3cret")},
        400,
        "invalid_request",
    ),
    (
        {"grant_type": "client_credentials"},
        {"authorization": "Basic !!"},
        400,
        "invalid_request",
    ),
    (
        {"grant_type": "client_credentials"},
        {"authorization": _basic("app", "nope")},
        401,
        "invalid_client",
    ),
    ({**CC, "grant_type": "refresh_token"}, {}, 400, "invalid_request"),
    ({**CC, "grant_type": "refresh_token", "refresh_token": "rt_x"}, {}, 400, "invalid_grant"),
]


def test_token_endpoint_refusals_table() -> None:
    for form, request_, status, error in CASES_TOKEN_ENDPOINT_REFUSALS_TABLE:
        got_status, body, headers = _token_call(_oauth(), form, **request_)
        assert (got_status, body["error"]) == (status, error)
        assert body["error_description"]
        assert headers["Cache-Control"] == "no-store"
        if status == 401 and "authorization" in request_:
            assert headers["WWW-Authenticate"].startswith("Basic")
        if status == 405:
            assert headers["Allow"] == "POST"


def test_token_endpoint_grants_and_rotation_on_a_fake_clock() -> None:
    clock = FakeClock()
    oauth = _oauth(token_ttl=60.0, clock=clock)
    status, body, _ = _token_call(oauth, {**CC, "scope": "messages_read"})
    assert status == 200
    assert body["scope"] == "messages_read"
    assert (body["expires_in"], body["token_type"], body["user_id"]) == (60, "Bearer", 7)
    assert body["resource_uri"] == "http://api.test/v1/"
    access = body["access_token"]
    assert oauth.grant_for(access).scopes == {"messages_read"}
    assert oauth.client_id_of(access) == "app"
    clock.now += 59.9
    assert oauth.grant_for(access) is not None
    clock.now += 0.1
    assert oauth.grant_for(access) is None
    assert oauth.client_id_of(access) is None
    # HTTP Basic, with the id and secret form-encoded first (RFC 6749 §2.3.1).
    oauth.register("a b", "p:w", scopes="messages_read", user_id=9)
    status, basic, _ = _token_call(
        oauth, {"grant_type": "client_credentials"}, authorization=_basic("a+b", "p%3Aw")
    )
    assert (status, basic["user_id"]) == (200, 9)

    refresh = {"grant_type": "refresh_token", "client_id": "app", "client_secret": "s3cret"}
    first = body["refresh_token"]
    status, renewed, _ = _token_call(oauth, {**refresh, "refresh_token": first})
    assert status == 200
    assert renewed["refresh_token"] != first
    # Rotation: the refresh token just used is dead; so is another client's, and a wider scope.
    assert _token_call(oauth, {**refresh, "refresh_token": first})[1]["error"] == "invalid_grant"
    other = {**refresh, "client_id": "reader", "client_secret": "r"}
    assert _token_call(oauth, {**other, "refresh_token": renewed["refresh_token"]})[0] == 400
    wider = {**refresh, "refresh_token": renewed["refresh_token"], "scope": "messages_write"}
    assert _token_call(oauth, wider)[1]["error"] == "invalid_scope"
    oauth.revoke_refresh()
    again = {**refresh, "refresh_token": renewed["refresh_token"]}
    assert _token_call(oauth, again)[1]["error"] == "invalid_grant"


def test_issued_tokens_expire_in_bulk() -> None:
    clock = FakeClock()
    oauth = _oauth(token_ttl=None, clock=clock)
    forever = oauth.issue("app", ["messages_read"], user_id=7, ttl=None)
    short = oauth.issue("app", "messages_read messages_write", user_id=7, ttl=5.0)
    assert oauth.grant_for(short).scopes == {"messages_read", "messages_write"}
    clock.now += 1e9
    assert oauth.grant_for(forever) is not None
    assert oauth.grant_for(short) is None
    _, body, _ = _token_call(oauth, CC)
    assert "expires_in" not in body
    oauth.expire_access()
    assert oauth.grant_for(forever) is None
    assert oauth.grant_for(body["access_token"]) is None
    assert oauth.grant_for(None) is None
    assert oauth.grant_for("at_unknown") is None
    later = oauth.issue("app", ["messages_read"], user_id=7, ttl=None)
    assert oauth.grant_for(later) is not None


def test_token_records_redact_secrets() -> None:
    from messages_async.testing._oauth import form_record

    record = form_record(b"grant_type=refresh_token&refresh_token=rt_1&client_secret=s&client_id=a")
    assert record == {
        "grant_type": "refresh_token",
        "refresh_token": "<redacted>",
        "client_secret": "<redacted>",
        "client_id": "a",
    }
    assert form_record(b"\xff") == {}
    assert "s3cret" not in repr(_oauth().clients)


# -- resource endpoint rules ------------------------------------------------------------------


CASES_ROUTING_TABLE: list[tuple[str, str | None, Any]] = [
    ("GET", "messages/", ("list", None)),
    ("GET", "messages/chats/", ("chats", None)),
    ("POST", "messages/add/", ("add", None)),
    ("GET", "messages/42", ("get", 42)),
    ("POST", "messages/42/edit/", ("edit", 42)),
    ("POST", "messages/42/delete/", ("delete", 42)),
    ("POST", "messages/", 405),
    ("GET", "messages/add/", 405),
    ("DELETE", "messages/42", 405),
    ("GET", "messages/42/delete/", 405),
    ("GET", "messages/abc", 404),
    ("GET", "messages/42/", 404),
    ("GET", "chats/", 404),
    ("GET", None, 404),
]


def test_routing_table() -> None:
    from messages_async.testing._answers import Refusal
    from messages_async.testing._endpoints import route

    for method, path, expected in CASES_ROUTING_TABLE:
        if isinstance(expected, int):
            with pytest.raises(Refusal) as caught:
                route(method, path)
            assert caught.value.status == expected
            if expected == 405:
                assert caught.value.headers["Allow"] in ("GET", "POST")
            continue
        target = route(method, path)
        assert (target.route, target.message_id) == expected


CASES_AUTHORIZATION_TABLE: list[tuple[str, set[str] | None, int | None, str | None]] = [
    ("GET", None, 401, 'Bearer error="invalid_token"'),
    ("GET", {"messages_read"}, None, None),
    (
        "POST",
        {"messages_read"},
        403,
        'Bearer error="insufficient_scope", scope="messages_write"',
    ),
    (
        "GET",
        {"messages_write"},
        403,
        'Bearer error="insufficient_scope", scope="messages_read"',
    ),
    ("POST", {"messages_read", "messages_write"}, None, None),
]


def test_authorization_table() -> None:
    from messages_async.testing._answers import Refusal
    from messages_async.testing._endpoints import Target, authorize
    from messages_async.testing._oauth import Grant

    for method, scopes, status, challenge in CASES_AUTHORIZATION_TABLE:
        grant = None if scopes is None else Grant("app", frozenset(scopes), 7, 1)
        target = Target("get" if method == "GET" else "add", method)
        if status is None:
            assert authorize(target, grant) is grant
            continue
        with pytest.raises(Refusal) as caught:
            authorize(target, grant)
        assert caught.value.status == status
        assert caught.value.headers["WWW-Authenticate"] == challenge


CASES_ADD_VALIDATION_TABLE: list[tuple[Json, str]] = [
    ({"message": "hi"}, "chat_id is required"),
    ({"chat_id": True, "message": "hi"}, "unsigned integer"),
    ({"chat_id": "{chat}", "message": "hi"}, "unsigned integer"),
    ({"chat_id": 0, "message": 5}, "message must be a string"),
    ({"chat_id": 0, "message": "x" * 4097}, "over 4096"),
    ({"chat_id": 0, "message": ""}, "text or at least one attachment"),
    ({"chat_id": 0, "attachments": {}}, "must be a list"),
    ({"chat_id": 0, "attachments": [{"type": "file", "url": "u"}] * 11}, "more than 10"),
    ({"chat_id": 0, "attachments": ["x"]}, "attachments[0] must be an object"),
    ({"chat_id": 0, "attachments": [{"type": "", "url": "u"}]}, "attachments[0].type"),
    ({"chat_id": 0, "attachments": [{"type": "file"}]}, "attachments[0].url"),
    ({"chat_id": 0, "attachments": [{"type": "f", "url": "u", "name": 3}]}, ".name"),
    ({"chat_id": 0, "message": "hi", "is_whisper": "yes"}, "is_whisper"),
    ({"chat_id": 1, "message": "hi"}, "chat 1 not found"),
]


def test_add_validation_table() -> None:
    from messages_async.testing._answers import Refusal
    from messages_async.testing._endpoints import Resources, Target
    from messages_async.testing._oauth import Grant

    for body, words in CASES_ADD_VALIDATION_TABLE:
        store = _store()
        chat = store.chat_ids()[0]
        body = (
            {k: (chat if v == 0 else v) for k, v in body.items()}
            if body.get("chat_id") == 0
            else body
        )
        body = {k: ("x" if v == "{chat}" else v) for k, v in body.items()}
        resources = Resources(store)
        before = store.message_count()
        with pytest.raises(Refusal, match=re.escape(words)):
            resources.answer(
                Target("add", "POST"),
                Grant("app", frozenset(), 7, 1),
                "application/json",
                json.dumps(body).encode(),
            )
        assert store.message_count() == before


def test_writes_through_the_rules() -> None:
    from messages_async.testing._answers import Refusal
    from messages_async.testing._endpoints import Resources, Target
    from messages_async.testing._oauth import Grant

    store = _store()
    chat = store.chat_ids()[0]
    me, someone = Grant("app", frozenset(), 1001, 1), Grant("app", frozenset(), 5, 2)
    resources = Resources(store)

    def call_(
        target: Target, grant: Grant, obj: Any = None, ctype: str = "application/json"
    ) -> Any:
        return resources.answer(
            target, grant, ctype, b"" if obj is None else json.dumps(obj).encode()
        )

    add = Target("add", "POST")
    with pytest.raises(Refusal, match="application/json"):
        call_(add, me, {"chat_id": chat}, "text/plain")
    with pytest.raises(Refusal, match="not valid JSON"):
        resources.answer(add, me, "application/json", b"{")
    with pytest.raises(Refusal, match="JSON object"):
        call_(add, me, [1])
    added = call_(
        add, me, {"chat_id": chat, "message": "hi", "is_whisper": True}, "application/vnd+json"
    )
    msg = added.body
    assert (added.status, msg["uid"], msg["message"], msg["id"]) == (
        200,
        1001,
        "hi",
        store.max_id(),
    )
    mid = msg["id"]
    edit = Target("edit", "POST", mid)
    with pytest.raises(Refusal, match="needs message or attachments"):
        call_(edit, me, {"chat_id": chat})
    with pytest.raises(Refusal, match="not in chat"):
        call_(edit, me, {"chat_id": store.chat_ids()[1], "message": "x"})
    with pytest.raises(Refusal) as caught:
        call_(edit, someone, {"chat_id": chat, "message": "x"})
    assert (caught.value.status, caught.value.code) == (403, "forbidden")
    with pytest.raises(Refusal, match="text or at least one attachment"):
        call_(edit, me, {"chat_id": chat, "message": ""})
    edited = call_(edit, me, {"chat_id": chat, "attachments": [{"type": "link", "url": "u"}]}).body
    assert edited["message"] == "hi"
    assert edited["attachments"] == {
        "items": [{"type": "link", "url": "u", "name": None, "size": None}]
    }
    assert call_(Target("get", "GET", mid), me).body == edited
    with pytest.raises(Refusal) as caught:
        call_(Target("delete", "POST", mid), someone)
    assert caught.value.status == 403
    assert call_(Target("delete", "POST", mid), me).status == 204
    with pytest.raises(Refusal) as caught:
        call_(Target("get", "GET", mid), me)
    assert caught.value.status == 404
    assert call_(Target("chats", "GET"), me).body == {"items": store.chats()}


def test_which_chat_a_request_concerns() -> None:
    from messages_async.testing._endpoints import request_chat

    url = "http://h/api/messages/?chat_id=12&cursor=abc"
    cases: list[tuple[str, dict[str, str], bytes, int | None]] = [
        ("messages/", {"chat_id": "7"}, b"", 7),
        ("messages/", {"chat_id": "x"}, b"", None),
        ("messages/", {"cursor": url}, b"", 12),
        ("messages/", {"cursor": "/api/messages/?chat_id=13&cursor=a"}, b"", 13),
        ("messages/", {"cursor": "http://[bad"}, b"", None),
        ("messages/", {"cursor": "opaque"}, b"", None),
        ("messages/add/", {}, b'{"chat_id": 5, "message": "x"}', 5),
        ("messages/9/edit/", {}, b'{"chat_id": 6}', 6),
        ("messages/add/", {}, b'{"chat_id": true}', None),
        ("messages/add/", {}, b'{"chat_id": "5"}', None),
        ("messages/add/", {}, b"[5]", None),
        ("messages/add/", {}, b"{", None),
        ("messages/9/delete/", {}, b'{"chat_id": 6}', None),
        ("messages/chats/", {"chat_id": "7"}, b"", None),
    ]
    for path, params, body, chat in cases:
        assert request_chat(path, params, body) == chat, (path, params, body)


# -- fault answers and content coding ---------------------------------------------------------


CASES_FAULT_ANSWERS_TABLE: list[tuple[Fault, str, int, Any, dict[str, str]]] = [
    (
        Fault.status(503, retry_after="2"),
        "resource",
        503,
        {"error": {"code": "unavailable", "message": "injected 503"}},
        {"Retry-After": "2"},
    ),
    (
        Fault.status(401),
        "resource",
        401,
        {"error": {"code": "invalid_token", "message": "injected 401"}},
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    ),
    (
        Fault.status(418),
        "resource",
        418,
        {"error": {"code": "invalid_request", "message": "injected 418"}},
        {},
    ),
    (
        Fault.status(507, "full", message="disk"),
        "resource",
        507,
        {"error": {"code": "full", "message": "disk"}},
        {},
    ),
    (
        Fault.status(401),
        "token",
        401,
        {"error": "invalid_client", "error_description": "injected 401"},
        {},
    ),
    (
        Fault.status(400),
        "token",
        400,
        {"error": "invalid_request", "error_description": "injected 400"},
        {},
    ),
    (
        Fault.status(503),
        "token",
        503,
        {"error": "unavailable", "error_description": "injected 503"},
        {},
    ),
    (
        Fault.rate_limited("7"),
        "resource",
        429,
        {"error": {"code": "rate_limited", "message": "injected 429"}},
        {"Retry-After": "7"},
    ),
    (
        Fault.invalid_cursor(),
        "resource",
        400,
        {"error": {"code": "invalid_cursor", "message": "injected 400"}},
        {},
    ),
    (
        Fault.expire_token(),
        "resource",
        401,
        {"error": {"code": "invalid_token", "message": "injected 401"}},
        {},
    ),
    (
        Fault.status(502, headers={"X-Proxy": "1"}),
        "resource",
        502,
        {"error": {"code": "unavailable", "message": "injected 502"}},
        {"X-Proxy": "1"},
    ),
    (Fault.redirect("http://x/y", 307), "resource", 307, None, {"Location": "http://x/y"}),
    (
        Fault.wrong_shape(),
        "token",
        200,
        {"access_token": 42, "token_type": 7, "expires_in": "soon"},
        {},
    ),
]


def test_fault_answers_table() -> None:
    from messages_async.testing._faults import canned_answer

    for fault, origin, status, body, headers in CASES_FAULT_ANSWERS_TABLE:
        answer = canned_answer(fault, method="GET", path="messages/", origin=origin)
        assert (answer.status, answer.body, answer.raw) == (status, body, None)
        assert headers.items() <= dict(answer.headers).items()


def test_fault_answers_with_raw_bodies() -> None:
    from messages_async.testing._faults import canned_answer, wrong_shape

    html = Fault.status(502, body=b"<html>", content_type="text/html")
    answer = canned_answer(html, method="GET", path="messages/", origin="resource")
    assert (answer.status, answer.raw, answer.headers["Content-Type"]) == (
        502,
        b"<html>",
        "text/html",
    )
    answer = canned_answer(Fault.malformed(), method="GET", path="messages/", origin="resource")
    assert (answer.status, answer.raw) == (200, b'{"items": [')
    assert wrong_shape("GET", "messages/", "resource")["items"] == "nope"
    assert wrong_shape("GET", "messages/chats/", "resource")["items"]["type"] == 7
    assert wrong_shape("POST", "messages/add/", "resource")["id"] == "abc"


CASES_CONTENT_CODING_TABLE: list[tuple[str, bool, str | None]] = [
    ("gzip, deflate", True, "gzip"),
    ("gzip, deflate", False, None),
    ("GZIP", True, "gzip"),
    ("deflate", True, "deflate"),
    ("gzip;q=0, deflate", True, "deflate"),
    ("gzip; q=0.5", True, "gzip"),
    ("gzip;q=nonsense", True, None),
    ("*", True, "gzip"),
    ("identity", True, None),
    ("", True, None),
    ("br", True, None),
]


def test_content_coding_table() -> None:
    from messages_async.testing._encoding import COMPRESS_MIN, choose_encoding, encode

    for accept, compress, expected in CASES_CONTENT_CODING_TABLE:
        coding = choose_encoding(accept, compress=compress)
        assert coding == expected
        big = b'{"a": "' + b"x" * COMPRESS_MIN + b'"}'
        body, headers = encode(big, coding)
        if coding is None:
            assert (body, headers.get("Content-Encoding")) == (big, None)
        else:
            assert zlib.decompress(body, 31 if coding == "gzip" else 15) == big
            assert headers["Content-Encoding"] == coding
        # Small bodies go as they are.
        assert encode(b"{}", coding) == (b"{}", {"Content-Type": "application/json; charset=utf-8"})
