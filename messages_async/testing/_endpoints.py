"""The resource endpoints' rules, with no I/O: routing, authorisation, reads and writes.

`route` maps a path and method to one of the six endpoints (docs/protocol.md §2), `authorize`
checks the bearer token's grant and scope, and `Resources` answers every endpoint but the
listing (which is `_listing.py`'s) from the `Store`, validating bodies against the contract's
limits. Each refusal is raised as a `Refusal`, in the order the checks are listed here, so the
same bad request always gets the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, Literal

import attrs
import orjson

from ._answers import Answer, Json, Refusal, bad_request, not_found
from ._dataset import Store
from ._listing import cursor_chat
from ._oauth import READ, WRITE, Grant

__all__ = [
    "MAX_ATTACHMENTS",
    "MAX_TEXT",
    "Resources",
    "Route",
    "Target",
    "authorize",
    "request_chat",
    "route",
]

MAX_TEXT: Final = 4096
MAX_ATTACHMENTS: Final = 10
_ITEM_RE: Final = re.compile(r"messages/(\d+)(/edit/|/delete/)?")

Route = Literal["chats", "list", "get", "add", "edit", "delete"]


@attrs.define
class Target:
    """The endpoint a request is for; ``message_id`` for ``get``, ``edit`` and ``delete``."""

    route: Route
    method: str
    message_id: int | None = None


#: The endpoints without an id, built once: most requests are listings.
_FIXED: Final = {
    "messages/": Target("list", "GET"),
    "messages/chats/": Target("chats", "GET"),
    "messages/add/": Target("add", "POST"),
}


def route(method: str, path: str | None) -> Target:
    """The endpoint for ``method`` on ``path`` (relative to the resource root; None: a path
    outside it).

    Raises:
        Refusal: 404 for an unknown path, 405 (with ``Allow``) for a wrong method.
    """
    if path is None:
        raise not_found("no such endpoint")
    target = _FIXED.get(path)
    if target is None:
        match = _ITEM_RE.fullmatch(path)
        if match is None:
            raise not_found("no such endpoint")
        message_id = int(match.group(1))
        suffix = match.group(2)
        if suffix is None:
            target = Target("get", "GET", message_id)
        elif suffix == "/edit/":
            target = Target("edit", "POST", message_id)
        else:
            target = Target("delete", "POST", message_id)
    if method != target.method:
        raise Refusal(
            405,
            "method_not_allowed",
            f"{method} is not allowed here, use {target.method}",
            {"Allow": target.method},
        )
    return target


def authorize(target: Target, grant: Grant | None) -> Grant:
    """The grant, if it may call ``target`` (RFC 6750 §3.1).

    Raises:
        Refusal: 401 ``invalid_token`` without a valid grant, 403 ``insufficient_scope`` when
            the grant lacks the endpoint's scope; each with its ``WWW-Authenticate``.
    """
    if grant is None:
        raise Refusal(
            401,
            "invalid_token",
            "missing, expired or revoked access token",
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    needed = READ if target.method == "GET" else WRITE
    if needed not in grant.scopes:
        raise Refusal(
            403,
            "insufficient_scope",
            f"this endpoint needs the {needed} scope",
            {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'},
        )
    return grant


def request_chat(path: str, params: Mapping[str, str], body: bytes) -> int | None:
    """The chat a request concerns, read as leniently as possible: listings (also by their
    cursor URL), adds and edits. For faults filtered by chat, which are matched before the
    request is checked, so nothing here may raise."""
    if path == "messages/":
        return cursor_chat(params)
    if path == "messages/add/" or path.endswith("/edit/"):
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if isinstance(obj, dict):
            chat = obj.get("chat_id")
            if isinstance(chat, int) and not isinstance(chat, bool):
                return chat
    return None


def _json_body(content_type: str, body: bytes) -> Json:
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise bad_request("the body must be application/json")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise bad_request("the body must be a JSON object")
    return obj


def _chat_id_field(obj: Json) -> int:
    chat_id = obj.get("chat_id")
    if chat_id is None:
        raise bad_request("chat_id is required")
    if not isinstance(chat_id, int) or isinstance(chat_id, bool) or chat_id < 0:
        raise bad_request("chat_id must be an unsigned integer")
    return chat_id


def _content_fields(obj: Json) -> tuple[str | None, list[Json] | None]:
    """The text and attachments of an add or edit (docs/protocol.md §2 Limits, §4)."""
    text = obj.get("message")
    if text is not None and not isinstance(text, str):
        raise bad_request("message must be a string")
    if text is not None and len(text) > MAX_TEXT:
        raise bad_request(f"message is over {MAX_TEXT} characters")
    raw = obj.get("attachments")
    attachments: list[Json] | None = None
    if raw is not None:
        if not isinstance(raw, list):
            raise bad_request("attachments must be a list")
        if len(raw) > MAX_ATTACHMENTS:
            raise bad_request(f"more than {MAX_ATTACHMENTS} attachments")
        attachments = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise bad_request(f"attachments[{i}] must be an object")
            kind, url, name = item.get("type"), item.get("url"), item.get("name")
            if not isinstance(kind, str) or not kind:
                raise bad_request(f"attachments[{i}].type must be a non-empty string")
            if not isinstance(url, str) or not url:
                raise bad_request(f"attachments[{i}].url must be a non-empty string")
            if name is not None and not isinstance(name, str):
                raise bad_request(f"attachments[{i}].name must be a string")
            attachments.append({"type": kind, "url": url, "name": name})
    return text, attachments


class Resources:
    """Every resource endpoint but the listing, over ``store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def answer(self, target: Target, grant: Grant, content_type: str, body: bytes) -> Answer:
        """The answer to an authorised request for ``target`` (not ``list``)."""
        route_ = target.route
        if route_ == "chats":
            return Answer(200, {"items": self.store.chats()})
        if route_ == "add":
            return self.add(grant, _json_body(content_type, body))
        message_id = target.message_id
        assert message_id is not None, target
        if route_ == "get":
            return Answer(200, self._existing(message_id))
        if route_ == "edit":
            return self.edit(grant, message_id, _json_body(content_type, body))
        if route_ == "delete":
            return self.delete(grant, message_id)
        raise AssertionError(f"no rule for {route_!r}")

    def _existing(self, message_id: int) -> Json:
        msg = self.store.message(message_id)
        if msg is None:
            raise not_found(f"message {message_id} not found")
        return msg

    def add(self, grant: Grant, obj: Json) -> Answer:
        chat_id = _chat_id_field(obj)
        text, attachments = _content_fields(obj)
        whisper = obj.get("is_whisper")
        if whisper is not None and not isinstance(whisper, bool):
            raise bad_request("is_whisper must be a boolean")
        if not text and not attachments:
            raise bad_request("a message needs text or at least one attachment")
        if not self.store.has_chat(chat_id):
            raise not_found(f"chat {chat_id} not found")
        return Answer(200, self.store.add(chat_id, grant.user_id, text or "", attachments or ()))

    def edit(self, grant: Grant, message_id: int, obj: Json) -> Answer:
        chat_id = _chat_id_field(obj)
        text, attachments = _content_fields(obj)
        if "message" not in obj and "attachments" not in obj:
            raise bad_request("an edit needs message or attachments")
        msg = self._existing(message_id)
        if self.store.chat_of(message_id) != chat_id:
            raise bad_request(f"message {message_id} is not in chat {chat_id}")
        if msg["uid"] != grant.user_id:
            raise Refusal(403, "forbidden", "you can only edit your own messages")
        final_text = msg["message"] if text is None else text
        final_attachments = msg["attachments"] if attachments is None else attachments
        if not final_text and not final_attachments:
            raise bad_request("a message needs text or at least one attachment")
        return Answer(200, self.store.edit(message_id, text=text, attachments=attachments))

    def delete(self, grant: Grant, message_id: int) -> Answer:
        msg = self._existing(message_id)
        if msg["uid"] != grant.user_id:
            raise Refusal(403, "forbidden", "you can only delete your own messages")
        self.store.delete(message_id)
        return Answer(204)
