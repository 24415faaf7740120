"""The pure protocol core, tested without a server: requests, cursors, errors, Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from yarl import URL

import messages_async as ma
from messages_async._secret import Secret
from messages_async._wire import (
    ListQuery,
    Retry,
    backoff_delay,
    build_add,
    build_delete,
    build_edit,
    build_get,
    build_list,
    build_token_form,
    check_secure_url,
    cursor_request,
    error_from_response,
    parse_chats,
    parse_message,
    parse_page,
    parse_retry_after,
    parse_token_response,
    resource_root,
    server_text,
)

ROOT = resource_root("https://api.example.test/v1")
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def test_resource_root_is_a_directory_with_or_without_slash() -> None:
    for uri in ("https://api.example.test/v1", "https://api.example.test/v1/"):
        root = resource_root(uri)
        assert str(build_get(root, 42).url) == "https://api.example.test/v1/messages/42"
        assert str(build_delete(root, 7).url) == "https://api.example.test/v1/messages/7/delete/"


def test_list_query_encoding_with_period_and_query() -> None:
    period = ma.Period(
        from_=datetime(2026, 1, 1, tzinfo=UTC),
        till=datetime(2026, 2, 1, 1, tzinfo=timezone(timedelta(hours=1))),
    )
    request = build_list(ROOT, ListQuery.checked(42, 100, "invoice", period))
    assert request.method == "GET"
    assert request.scope == "messages_read"
    assert request.retry is Retry.IDEMPOTENT
    assert request.url.path == "/v1/messages/"
    assert dict(request.url.query) == {
        "chat_id": "42",
        "limit": "100",
        "query": "invoice",
        "period[from]": "2026-01-01T00:00:00Z",
        "period[till]": "2026-02-01T01:00:00+01:00",
    }


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1, None, None, None), ValueError),
        (("42", None, None, None), TypeError),
        ((True, None, None, None), TypeError),
        ((1, 0, None, None), ValueError),
        ((1, 2.5, None, None), TypeError),
        ((1, None, 5, None), TypeError),
        ((1, None, None, "2026"), TypeError),
    ],
)
def test_bad_list_arguments_raise_before_sending(args: tuple[object, ...], error: type) -> None:
    with pytest.raises(error):
        ListQuery.checked(*args)


def test_period_requires_aware_ordered_datetimes() -> None:
    with pytest.raises(ValueError, match="naive"):
        ma.Period(from_=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="after"):
        ma.Period(from_=datetime(2026, 2, 1, tzinfo=UTC), till=datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(TypeError):
        ma.Period(from_="2026-01-01")  # type: ignore[arg-type]
    same = datetime(2026, 1, 1, tzinfo=UTC)
    assert ma.Period(from_=same, till=same).till == same  # empty range is allowed


def test_add_body_and_retry_mode() -> None:
    request = build_add(
        ROOT, 5, "hi", [ma.NewAttachment(type="link", url="https://x.test/a")], True
    )
    assert request.method == "POST"
    assert request.scope == "messages_write"
    assert request.retry is Retry.UNSENT_ONLY
    assert request.body is not None
    assert orjson.loads(request.body) == {
        "chat_id": 5,
        "message": "hi",
        "attachments": [{"type": "link", "url": "https://x.test/a"}],
        "is_whisper": True,
    }


@pytest.mark.parametrize(
    ("message", "attachments", "error", "match"),
    [
        ("", None, ValueError, "text or at least one attachment"),
        ("x" * 4097, None, ValueError, "4096"),
        ("x", [ma.NewAttachment(type="link", url="u")] * 11, ValueError, "at most 10"),
        ("x", [{"type": "link", "url": "u"}], TypeError, "NewAttachment"),
        (b"bytes", None, TypeError, "str"),
    ],
)
def test_bad_add_arguments(message: object, attachments: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_add(ROOT, 5, message, attachments, False)  # type: ignore[arg-type]


def test_message_of_exactly_4096_characters_and_attachment_only_are_fine() -> None:
    build_add(ROOT, 5, "é" * 4096, None, False)
    build_add(ROOT, 5, "", [ma.NewAttachment(type="image", url="https://x.test/u")], False)


def test_edit_is_idempotent_and_needs_chat_id() -> None:
    request = build_edit(ROOT, 9, 5, "new", None)
    assert request.retry is Retry.IDEMPOTENT
    assert request.body is not None
    assert orjson.loads(request.body) == {"chat_id": 5, "message": "new"}
    with pytest.raises(TypeError):
        build_edit(ROOT, 9, None, "new", None)


def test_new_attachment_validates() -> None:
    with pytest.raises(TypeError):
        ma.NewAttachment(type="", url="u")
    with pytest.raises(TypeError):
        ma.NewAttachment(type="link", url=None)  # type: ignore[arg-type]


# --- cursors -----------------------------------------------------------------------------------

LISTING = ListQuery(42, 50, "a b", None)


def test_bare_cursor_is_sent_with_the_original_filters() -> None:
    request = cursor_request(ROOT, "abc_DEF-123", LISTING)
    assert dict(request.url.query) == {
        "chat_id": "42",
        "limit": "50",
        "query": "a b",
        "cursor": "abc_DEF-123",
    }


@pytest.mark.parametrize(
    "token", ["1700000000:42", "/AbC+de/f==", "eyJpZCI6NDJ9?", "javascript:alert(1)", "a b"]
)
def test_anything_that_is_not_a_url_is_a_bare_token(token: str) -> None:
    # PROTOCOL §3: opaque tokens may hold any character; they go to the API's own origin.
    request = cursor_request(ROOT, token, LISTING)
    assert request.url.origin() == ROOT.origin()
    assert request.url.path == "/v1/messages/"
    assert request.url.query["cursor"] == token
    assert request.url.query["chat_id"] == "42"


def test_absolute_cursor_is_followed_as_given() -> None:
    cursor = "https://api.example.test/v1/messages/?chat_id=42&cursor=T1&query=zz"
    request = cursor_request(ROOT, cursor, LISTING)
    assert request.url == URL(cursor)


def test_relative_cursor_is_resolved_against_the_root() -> None:
    request = cursor_request(ROOT, "messages/?chat_id=42&cursor=T", LISTING)
    assert str(request.url) == "https://api.example.test/v1/messages/?chat_id=42&cursor=T"
    request = cursor_request(ROOT, "/v1/messages/?cursor=T", LISTING)
    assert request.url.host == "api.example.test"


@pytest.mark.parametrize(
    "cursor",
    [
        "https://evil.test/v1/messages/?cursor=T",
        "//evil.test/v1/messages/?cursor=T",
        "https://api.example.test.evil.test/v1/messages/?cursor=T",
        "http://api.example.test/v1/messages/?cursor=T",
        "https://api.example.test:8443/v1/messages/?cursor=T",
        "https://user:pw@api.example.test/v1/messages/?cursor=T",
        "https://api.example.test./v1/messages/?cursor=T",
        "../other/?cursor=T",
        "/v2/messages/?cursor=T",
        "https://api.example.test/v1/../admin/?cursor=T",
        "https:/\\evil.test/v1/messages/?cursor=T",
    ],
)
def test_cursors_leaving_the_api_are_refused(cursor: str) -> None:
    with pytest.raises(ma.UnsafeCursorError) as info:
        cursor_request(ROOT, cursor, LISTING)
    assert "pw" not in str(info.value)


# --- responses ---------------------------------------------------------------------------------

PAGE = {
    "items": [
        {
            "id": 10,
            "uid": "7",
            "message": "hi",
            "attachments": {"items": [{"type": "link", "url": "u", "name": None, "size": "12"}]},
            "created_at": "2026-01-01T00:00:00Z",
            "reactions": ["+1"],
        },
        {"id": 9, "uid": 7, "message": None, "attachments": None},
    ],
    "limit": 20,
    "next_cursor": "",
    "prev_cursor": None,
    "total_count": "2",
    "unknown": True,
}


def test_parse_page_tolerates_and_keeps_unknown_fields() -> None:
    page = parse_page(orjson.dumps(PAGE))
    first, second = page.items
    assert first.uid == 7
    assert first.attachments == (ma.Attachment(type="link", url="u", name=None, size=12),)
    assert first.created_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert first.raw["reactions"] == ["+1"]
    assert second.message == ""
    assert second.attachments == ()
    assert page.next_cursor is None
    assert page.prev_cursor is None
    assert page.total_count == 2


def test_parse_chats_with_unknown_type_and_digit_string_count() -> None:
    body = orjson.dumps(
        {
            "items": [
                {"chat_id": 1, "type": "group", "name": "g", "members_count": "12"},
                {"chat_id": 2, "type": "channel", "extra": 1},
                {"chat_id": 3, "type": "private"},
            ]
        }
    )
    chats = parse_chats(body)
    assert chats[0].type is ma.ChatType.GROUP
    assert chats[0].members_count == 12
    assert chats[1].type == "channel"
    assert chats[1].raw["extra"] == 1
    assert chats[2].type is ma.ChatType.PRIVATE


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b'{"items": [', "not valid JSON"),
        (b"<html>", "not valid JSON"),
        (b'{"items": "nope"}', r"\$\.items"),
        (b'{"items": [{"id": "abc", "uid": 1, "message": "x"}]}', r"\$\.items\[0\]\.id"),
        (b'{"items": [{"id": true, "uid": 1, "message": "x"}]}', r"\$\.items\[0\]\.id"),
        (b"[1, 2]", "not a JSON object"),
    ],
)
def test_malformed_pages_raise_decode_error_with_a_path(body: bytes, match: str) -> None:
    with pytest.raises(ma.DecodeError, match=match):
        parse_page(body)


def test_parse_message_wrong_shape() -> None:
    with pytest.raises(ma.DecodeError, match="message"):
        parse_message(b'{"id": "abc"}')


# --- errors ------------------------------------------------------------------------------------


def _err(status: int, code: str | None, headers: dict[str, str] | None = None) -> Exception:
    body = orjson.dumps({"error": {"code": code, "message": "m"}}) if code else b"<html>x</html>"
    return error_from_response(status, headers or {}, body, now=NOW)


def test_error_mapping() -> None:
    assert isinstance(_err(404, "not_found"), ma.NotFoundError)
    assert isinstance(_err(400, "invalid_cursor"), ma.InvalidCursorError)
    assert isinstance(_err(400, "invalid_request"), ma.BadRequestError)
    assert isinstance(_err(403, "forbidden"), ma.PermissionDeniedError)
    assert isinstance(_err(401, "invalid_token"), ma.AuthError)
    scope = _err(
        403,
        "insufficient_scope",
        {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="messages_write"'},
    )
    assert isinstance(scope, ma.ScopeError)
    assert scope.required == "messages_write"
    limited = _err(429, "rate_limited", {"Retry-After": "3"})
    assert isinstance(limited, ma.RateLimitError)
    assert limited.retry_after == 3.0
    html = _err(502, None)
    assert isinstance(html, ma.ServerError)
    assert html.status == 502
    assert html.code is None
    assert "non-JSON" in str(html)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Wed, 25 Nov 2026 12:00:05 GMT", 5.0),
        ("Wednesday, 25-Nov-26 12:00:07 GMT", 7.0),
        ("Wed Nov 25 12:00:09 2026", 9.0),
        ("Wed, 25 Nov 2026 11:00:00 GMT", None),  # in the past
        ("-1", None),
        ("nan", None),
        ("inf", None),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_backoff_is_bounded_full_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        for _ in range(50):
            delay = backoff_delay(attempt, base=0.5, cap=8.0, rng=rng)
            assert 0.0 <= delay <= min(8.0, 0.5 * 2**attempt)
    assert backoff_delay(10_000, base=0.5, cap=8.0, rng=rng) <= 8.0


# --- token exchange ----------------------------------------------------------------------------


def test_token_form_and_response() -> None:
    form = build_token_form(
        client_id="c", client_secret=Secret("s3cret"), scopes=frozenset({"b", "a"})
    )
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "c",
        "client_secret": "s3cret",
        "scope": "a b",
    }
    grant = parse_token_response(
        200,
        orjson.dumps(
            {
                "access_token": "tk-9f8e7d",
                "token_type": "bearer",
                "expires_in": 60,
                "scope": "messages_read",
                "resource_uri": "https://api.example.test/v1",
                "user_id": 5,
            }
        ),
        allow_insecure_http=False,
    )
    assert grant.scopes == frozenset({"messages_read"})
    assert str(grant.resource_uri) == "https://api.example.test/v1/"
    assert grant.user_id == 5
    assert "tk-9f8e7d" not in repr(grant)


def test_token_response_refuses_plain_http_resource_uri() -> None:
    body = orjson.dumps({"access_token": "t", "resource_uri": "http://api.example.test/"})
    with pytest.raises(ma.AuthError, match="plain http"):
        parse_token_response(200, body, allow_insecure_http=False)
    loopback = orjson.dumps({"access_token": "t", "resource_uri": "http://127.0.0.1:1/v1"})
    parse_token_response(200, loopback, allow_insecure_http=False)


def test_token_failure_is_auth_error_with_code() -> None:
    body = orjson.dumps({"error": "invalid_client", "error_description": "bad secret"})
    with pytest.raises(ma.AuthError, match="invalid_client") as info:
        parse_token_response(401, body, allow_insecure_http=False)
    assert info.value.error == "invalid_client"


# --- what a hostile server sends, quoted safely ------------------------------------------------


def test_server_text_escapes_control_characters_and_is_cut() -> None:
    assert server_text("plain words") == "plain words"
    assert server_text("forged\r\nINFO all good") == "forged\\r\\nINFO all good"
    assert server_text("\x1b[2Jcleared") == "\\x1b[2Jcleared"
    long = server_text("x" * 10_000)
    assert len(long) < 400
    assert long.endswith("(9700 more characters)")


def test_an_error_message_from_the_server_is_quoted_safely() -> None:
    body = orjson.dumps(
        {"error": {"code": "internal\r\nX", "message": "line one\nline two " + "y" * 5000}}
    )
    exc = error_from_response(500, {}, body, now=NOW)
    assert isinstance(exc, ma.ServerError)
    text = str(exc)
    assert "\n" not in text
    assert "\r" not in text
    assert "line one\\nline two" in text
    assert len(text) < 500


def test_an_error_body_cut_at_its_cap_says_so() -> None:
    exc = error_from_response(502, {"Content-Type": "text/html"}, b"<html>", now=NOW, cut_at=65536)
    assert "more than 65536 bytes" in str(exc)


@pytest.mark.parametrize(
    ("op", "body", "hint"),
    [
        ("chats", b'{"error": {"code": "not_found", "message": "x"}}', "check resource_uri"),
        ("list", b"404: Not Found", "check resource_uri"),
        ("get", b"<html>nope</html>", "check resource_uri"),
        ("get", b'{"error": {"code": "not_found", "message": "x"}}', "check the chat or message"),
        ("list", b'{"error": {"code": "not_found", "message": "x"}}', "check the chat or message"),
    ],
)
def test_a_404_points_at_the_id_or_at_the_resource_uri(op: str, body: bytes, hint: str) -> None:
    exc = error_from_response(404, {}, body, now=NOW, op=op)
    assert isinstance(exc, ma.NotFoundError)
    assert hint in str(exc)


def test_a_scope_challenge_is_quoted_safely() -> None:
    headers = {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="a\x1bb"'}
    exc = error_from_response(403, headers, b"{}", now=NOW)
    assert isinstance(exc, ma.ScopeError)
    assert "\x1b" not in str(exc)


def _grant(**fields: object) -> bytes:
    body: dict[str, object] = {
        "access_token": "at_ok-._~+/==",
        "token_type": "Bearer",
        "resource_uri": "https://api.example.test/v1/",
    }
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"access_token": "a\r\nb"}, "not RFC 6750 token syntax"),
        ({"access_token": "a b"}, "not RFC 6750 token syntax"),
        ({"access_token": "a=b"}, "not RFC 6750 token syntax"),  # '=' only as padding
        ({"refresh_token": "r\nt"}, "refresh_token that is not RFC 6749"),
        ({"scope": "messages_read\x1b[31m"}, "not RFC 6749 scope syntax"),
        ({"token_type": "mac" + "!" * 500}, "only Bearer is supported"),
    ],
)
def test_a_token_answer_that_breaks_the_rfcs_is_refused(
    fields: dict[str, object], match: str
) -> None:
    with pytest.raises(ma.AuthError, match=match) as info:
        parse_token_response(200, _grant(**fields), allow_insecure_http=False)
    assert info.value.status == 200
    assert "\r" not in str(info.value)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 300


def test_a_token_answer_keeps_odd_but_valid_values() -> None:
    grant = parse_token_response(
        200, _grant(expires_in=10**12, scope="a  b"), allow_insecure_http=False
    )
    assert grant.access_token.reveal() == "at_ok-._~+/=="
    assert grant.expires_in is None  # beyond any useful horizon: as if it never expires
    assert grant.scopes == frozenset({"a", "b"})


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (404, b"404: Not Found", "that URL looks wrong.*check token_url"),
        (405, b"", "that URL looks wrong"),
        (200, b"<html>login</html>", "is token_url the token endpoint"),
        (502, b"<html>bad gateway</html>", "failing or overloaded; try again later"),
        (401, b'{"error": "invalid_client"}', "check client_id and client_secret"),
    ],
)
def test_a_token_failure_points_the_right_way(status: int, body: bytes, match: str) -> None:
    with pytest.raises(ma.AuthError, match=match) as info:
        parse_token_response(
            status,
            body,
            allow_insecure_http=False,
            token_url=URL("https://auth.example.test/oauth/tokn"),
        )
    assert info.value.status == status


def test_a_token_answer_cut_at_its_cap_is_refused() -> None:
    with pytest.raises(ma.AuthError, match="more than 65536 bytes"):
        parse_token_response(200, b"{", allow_insecure_http=False, cut_at=65536)


@pytest.mark.parametrize(
    "url", ["auth.example.test/oauth/token", "localhost:9/token", "ftp://auth.example.test/"]
)
def test_a_url_without_an_http_scheme_gets_a_message_of_ours(url: str) -> None:
    with pytest.raises(ma.ConfigurationError, match="such as https://host/path") as info:
        check_secure_url(URL(url), what="token_url", allow_insecure_http=False)
    assert "does not start with https:// or http://" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scopes": ("messages_read\n",)}, "RFC 6749"),
        ({"scopes": ('say"hi',)}, "RFC 6749"),
        ({"client_id": "me\r\nyou"}, "client_id must be printable ASCII"),
        ({"max_unreachable": -1}, "max_unreachable must be a non-negative number"),
        ({"backoff_max": float("inf")}, "backoff_max must be a non-negative, finite number"),
    ],
)
def test_arguments_that_would_break_the_wire_are_refused(
    kwargs: dict[str, object], match: str
) -> None:
    settings: dict[str, object] = {
        "token_url": "https://auth.example.test/oauth/token",
        "client_id": "me",
        "client_secret": "s",
    }
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ma.Client(**settings)  # type: ignore[arg-type]
