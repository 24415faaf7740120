"""The emulator against PROTOCOL.md, driven with raw aiohttp (never the client library).

The client's own tests trust this server, so its behaviour is pinned down here independently:
token exchange, errors and their headers, keyset paging, filters, writes, every fault.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

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
    emulator = ("__init__", "_dataset", "_faults", "_recorder", "_serve", "_server")
    for name in emulator:
        text = (root / f"{name}.py").read_text()
        assert "from messages_async._" not in text
        assert "from .." not in text
        assert "import pytest" not in text


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
