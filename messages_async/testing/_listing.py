"""The listing endpoint's rules, with no I/O: cursors, filters and page building.

A ``GET messages/`` goes through three steps, each testable on its own:

1. `read_query`: the parameters (a whole cursor URL given as ``cursor`` unpacked into them,
   docs/protocol.md §3) become a `Query`, or a 400/404 `Refusal`. The checks run in a fixed
   order, so the same bad request always gets the same answer.
2. `window`: the keyset window next to a cursor's boundary, over a chat's ascending ids.
3. `Lister`: the page body, with its cursors. Everything that makes a page deviate from the
   contract on purpose — the four listing faults and ``empty_page_every`` — is decided here
   and only here, in `Lister.plan`, so the HTTP layer never looks at a fault's kind to build a
   listing, and knows from `Plan.cacheable` whether the answer may come from its page cache.

Keyset paging rests on one invariant: every chat keeps an ascending list of its message ids,
and a cursor holds a boundary id, never an offset. An insert or delete shifts offsets but not
the set of ids on either side of a boundary, so a walk never repeats or skips a message that
existed throughout it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final, Literal
from urllib.parse import quote

import attrs
import orjson
import yarl

from ._answers import Json, Refusal, bad_request, not_found
from ._dataset import Store
from ._faults import Fault

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Cursor",
    "CursorError",
    "Direction",
    "Filters",
    "Lister",
    "Plan",
    "Query",
    "Window",
    "cursor_chat",
    "cursor_key",
    "decode_cursor",
    "encode_cursor",
    "matching_ids",
    "parse_instant",
    "read_filters",
    "read_query",
    "window",
]

DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 100
_INT_RE: Final = re.compile(r"[+-]?\d+")
#: The parameters a cursor URL carries besides the cursor itself (docs/protocol.md §3).
_CARRIED: Final = ("chat_id", "limit", "query", "period[from]", "period[till]")
_FILTER_PARAMS: Final = ("query", "period[from]", "period[till]")

Direction = Literal["next", "prev"]


class CursorError(ValueError):
    """A cursor that this server did not issue, or that was altered."""


def parse_instant(text: str) -> float:
    """An ISO 8601 instant as epoch seconds; no offset means UTC (docs/protocol.md §2 Limits).

    Raises:
        ValueError: the text is not an ISO 8601 date or date-time.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty instant")
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _uint(text: str | None) -> int | None:
    """A string of ASCII digits as an int, else None."""
    if text is None or not text.isascii() or not text.isdigit():
        return None
    return int(text)


# -- filters and cursors ------------------------------------------------------------------------


@attrs.frozen
class Filters:
    """The listing filters a cursor is bound to. ``since`` is inclusive, ``till`` exclusive."""

    query: str | None = None
    since: float | None = None
    till: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.query) or self.since is not None or self.till is not None


_NO_FILTERS: Final = Filters()


@attrs.frozen
class Cursor:
    """A keyset position: the items of ``chat_id`` older than ``boundary`` (``next``) or newer
    than it (``prev``). ``boundary`` None is the top of the chat (a first page).

    ``repeat`` marks a cursor built by the ``repeat_cursor`` fault: a page asked for with it
    hands the very same cursor back as its ``next_cursor``, which makes a cycle.
    """

    chat_id: int
    direction: Direction
    boundary: int | None
    filters: Filters
    repeat: bool = False


def cursor_key(seed: int) -> bytes:
    """The key cursors are signed with.

    Derived from the seed, so a restarted ``messages-async serve`` with the same seed still
    accepts cursors handed out before the restart (docs/protocol.md §3: cursors live 24 hours).
    """
    return hashlib.sha256(f"messages-emulator-cursor:{seed}".encode()).digest()


def encode_cursor(cursor: Cursor, key: bytes) -> str:
    """An opaque, signed token. A random nonce makes equal positions give different strings,
    so a client cannot rely on comparing cursors to detect progress."""
    f = cursor.filters
    payload = orjson.dumps(
        {
            "c": cursor.chat_id,
            "d": "n" if cursor.direction == "next" else "p",
            "b": cursor.boundary,
            "q": f.query,
            "f": f.since,
            "t": f.till,
            "r": 1 if cursor.repeat else 0,
            "n": os.urandom(4).hex(),
        }
    )
    sig = hmac.new(key, payload, hashlib.sha256).digest()[:8]
    return base64.urlsafe_b64encode(payload + sig).rstrip(b"=").decode("ascii")


def decode_cursor(token: str, key: bytes) -> Cursor:
    """The position a token stands for.

    Raises:
        CursorError: the token is garbled, forged or not from this server.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError) as exc:
        raise CursorError("cursor is not valid base64") from exc
    if len(raw) < 9:
        raise CursorError("cursor is too short")
    payload, sig = raw[:-8], raw[-8:]
    if not hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).digest()[:8], sig):
        raise CursorError("cursor signature does not match")
    try:
        obj = orjson.loads(payload)
        direction: Direction = "next" if obj["d"] == "n" else "prev"
        return Cursor(
            chat_id=int(obj["c"]),
            direction=direction,
            boundary=None if obj["b"] is None else int(obj["b"]),
            filters=Filters(obj["q"], obj["f"], obj["t"]),
            repeat=bool(obj["r"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CursorError("cursor payload is malformed") from exc


# -- reading a request --------------------------------------------------------------------------


@attrs.define
class Query:
    """A listing request, checked.

    Attributes:
        chat_id: the chat listed.
        limit: the page size used (clamped to `MAX_LIMIT`).
        filters: the query and period.
        cursor: the position asked for; None for a first page.
        params: the request's parameters, those of a whole cursor URL merged in; cursors
            written for this page carry its filters from here.
        token: the bare cursor token the request came with ("" for a first page).
        cursor_url: the whole cursor URL, when one was given as the ``cursor`` value.
    """

    chat_id: int
    limit: int
    filters: Filters
    cursor: Cursor | None
    params: Mapping[str, str]
    token: str = ""
    cursor_url: str | None = None


def _is_url(cursor: str) -> bool:
    return "://" in cursor or cursor.startswith("/")


def cursor_chat(params: Mapping[str, str]) -> int | None:
    """The chat a listing request is for, also when only its cursor URL names it; None when
    neither says (never an error: faults filtered by chat ask before any check)."""
    chat = _uint(params.get("chat_id"))
    if chat is None:
        cursor = params.get("cursor", "")
        if _is_url(cursor):
            try:
                chat = _uint(yarl.URL(cursor).query.get("chat_id"))
            except ValueError:
                return None
    return chat


def read_filters(params: Mapping[str, str]) -> Filters:
    """The query and period of a listing. Refusal: a period that is not ISO 8601, or runs
    backwards."""
    if not (params.get("query") or params.get("period[from]") or params.get("period[till]")):
        return _NO_FILTERS
    since = till = None
    for key in ("period[from]", "period[till]"):
        text = params.get(key)
        if text is None or text == "":
            continue
        try:
            value = parse_instant(text)
        except ValueError:
            raise bad_request(f"{key} is not an ISO 8601 instant: {text!r}") from None
        if key == "period[from]":
            since = value
        else:
            till = value
    if since is not None and till is not None and since > till:
        raise bad_request("period[from] is after period[till]")
    return Filters(query=params.get("query") or None, since=since, till=till)


def _invalid_cursor(message: str) -> Refusal:
    return Refusal(400, "invalid_cursor", message)


def read_query(params: Mapping[str, str], store: Store, *, key: bytes, listing_path: str) -> Query:
    """A listing request's parameters, checked against the contract (docs/protocol.md §2, §3).

    Args:
        params: the query parameters.
        store: for the chat's existence.
        key: what cursors are signed with (`cursor_key`).
        listing_path: the absolute path of ``messages/``, which a cursor URL must have.

    Raises:
        Refusal: 400 ``invalid_request`` or ``invalid_cursor``, or 404 for an unknown chat.
    """
    merged = dict(params)
    raw_cursor = merged.get("cursor", "")
    token = raw_cursor
    cursor_url: str | None = None
    if raw_cursor and _is_url(raw_cursor):
        try:
            inner_url = yarl.URL(raw_cursor)
        except ValueError:
            raise _invalid_cursor("cursor URL is malformed") from None
        if inner_url.path != listing_path:
            raise _invalid_cursor("cursor URL is not a listing of this API")
        inner = dict(inner_url.query.items())
        token = inner.get("cursor", "")
        if not token:
            raise _invalid_cursor("cursor URL carries no cursor")
        for name in _CARRIED:
            if name not in merged and name in inner:
                merged[name] = inner[name]
        cursor_url = raw_cursor

    chat_raw = merged.get("chat_id")
    if chat_raw is None:
        raise bad_request("chat_id is required")
    chat_id = _uint(chat_raw)
    if chat_id is None:
        raise bad_request("chat_id must be an unsigned integer")
    limit = DEFAULT_LIMIT
    limit_raw = merged.get("limit")
    if limit_raw is not None:
        if not _INT_RE.fullmatch(limit_raw):
            raise bad_request("limit must be an integer")
        limit = int(limit_raw)
        if limit < 1:
            raise bad_request("limit must be at least 1")
        limit = min(limit, MAX_LIMIT)
    filters = read_filters(merged)
    if not store.has_chat(chat_id):
        raise not_found(f"chat {chat_id} not found")

    cursor: Cursor | None = None
    if token:
        try:
            cursor = decode_cursor(token, key)
        except CursorError as exc:
            raise _invalid_cursor(str(exc)) from None
        if cursor.chat_id != chat_id:
            raise _invalid_cursor("cursor belongs to another chat")
        if cursor.filters != filters:
            raise _invalid_cursor(
                "cursor was issued for other filters; send the same query and period"
            )
    return Query(chat_id, limit, filters, cursor, merged, token, cursor_url)


# -- the window ---------------------------------------------------------------------------------


@attrs.define
class Window:
    """A slice ``ids[lo:hi]`` of a chat's ascending ids, and the boundaries of the cursors
    beside it: ``older`` for ``next_cursor`` (ids below it), ``newer`` for ``prev_cursor``
    (ids above it); None: nothing that way. ``oldest_first``: the slice is sent in ascending
    order (only the ``backwards_page`` fault does that)."""

    lo: int
    hi: int
    older: int | None
    newer: int | None
    oldest_first: bool = False


def window(
    ids: Sequence[int],
    direction: Direction,
    boundary: int | None,
    limit: int,
    *,
    empty: bool = False,
    backwards: bool = False,
) -> Window:
    """The window of at most ``limit`` ids next to a keyset position.

    ``next`` takes the newest ids below ``boundary``; ``prev`` the oldest ids above it (still
    sent newest first). ``empty``: no ids, at the same position. ``backwards``: the window on
    the wrong side of the boundary (the ``backwards_page`` fault).
    """
    n = len(ids)
    if boundary is None:
        hi = n
        lo = max(0, n - limit)
        if backwards:
            lo, hi = 0, min(n, limit)
    elif direction == "next":
        hi = bisect_left(ids, boundary)
        lo = max(0, hi - limit)
        if backwards:
            lo, hi = hi, min(n, hi + limit)
    else:
        lo = bisect_right(ids, boundary)
        hi = min(n, lo + limit)
        if backwards:
            lo, hi = max(0, lo - limit), lo
    if empty:
        if direction == "next":
            lo = hi
        else:
            hi = lo
    # The boundaries are written so an empty window (lo == hi) still splits the ids at the
    # right place: "ids < ids[lo]" is exactly the ids before lo, "ids > ids[hi - 1]" the ids
    # from hi on.
    older: int | None = None
    if lo > 0:
        older = ids[lo] if lo < n else ids[n - 1] + 1
    newer: int | None = None
    if hi < n and boundary is not None:
        newer = ids[hi - 1] if hi > 0 else ids[0] - 1
    elif hi < n and backwards:
        newer = ids[hi - 1]
    return Window(lo, hi, older, newer, oldest_first=backwards and boundary is None)


def matching_ids(store: Store, chat_id: int, filters: Filters) -> Sequence[int]:
    """The chat's ids that pass ``filters``, ascending (the store's own list when none)."""
    ids = store.ids(chat_id)
    if not filters.active:
        return ids
    messages = store.by_id
    stamps = store.stamps
    query = filters.query.casefold() if filters.query else None
    since = filters.since
    till = filters.till
    if query is None:
        # Stamps never fall as ids grow (docs/protocol.md §2), so a period is a slice: found
        # by bisection, a windowed walk of a huge chat costs the server no scan per page.
        lo = 0 if since is None else bisect_left(ids, since, key=stamps.__getitem__)
        hi = len(ids) if till is None else bisect_left(ids, till, key=stamps.__getitem__)
        return ids[lo:hi]
    out = []
    for i in ids:
        t = stamps[i]
        if since is not None and t < since:
            continue
        if till is not None and t >= till:
            continue
        if query is not None and query not in messages[i]["message"].casefold():
            continue
        out.append(i)
    return out


# -- pages --------------------------------------------------------------------------------------


@attrs.define
class Plan:
    """What one listing answer will be, decided before it is built.

    ``fault`` is the listing fault to act out (None: none); ``empty``: an empty page whose
    cursor leads to the same position. ``cacheable``: the page is what any request for the
    same position gets, so an encoded copy may be reused until the chat changes.
    """

    query: Query
    fault: Fault | None
    empty: bool
    cacheable: bool

    @property
    def kind(self) -> str | None:
        return self.fault.kind if self.fault is not None else None


class Lister:
    """Builds listing pages from a `Store`.

    Args:
        store: the data.
        cursor_mode: ``"url"``: cursors are absolute listing URLs carrying every filter;
            ``"token"``: bare tokens.
        resource_path: the path of ``resource_uri`` (``/`` first and last).
        empty_page_every: N > 0: every Nth listing is an empty page with a cursor to the same
            position.
        extra_fields: add fields the contract does not know to every page.

    ``origin`` is the resource origin the cursor URLs point at; the server sets it once it
    knows its port.
    """

    def __init__(
        self,
        store: Store,
        *,
        cursor_mode: Literal["url", "token"] = "url",
        resource_path: str = "/",
        empty_page_every: int = 0,
        extra_fields: bool = False,
    ) -> None:
        self.store = store
        self.cursor_mode = cursor_mode
        self.resource_path = resource_path
        self.empty_page_every = empty_page_every
        self.extra_fields = extra_fields
        self.key = cursor_key(store.seed)
        self.origin = ""
        self.pages_served = 0

    def read(self, params: Mapping[str, str]) -> Query:
        """`read_query` for this lister's store and paths."""
        return read_query(params, self.store, key=self.key, listing_path=self.listing_path)

    @property
    def listing_path(self) -> str:
        return self.resource_path + "messages/"

    def plan(self, query: Query, fault: Fault | None) -> Plan:
        """Count this listing and decide what deviates from a plain page."""
        self.pages_served += 1
        every = self.empty_page_every
        kind = fault.kind if fault is not None else None
        empty = (every > 0 and self.pages_served % every == 0) or kind == "empty_page"
        repeat = query.cursor is not None and query.cursor.repeat
        cacheable = not (kind or empty or query.filters.active or self.extra_fields or repeat)
        return Plan(query, fault, empty, cacheable)

    def cache_key(self, plan: Plan) -> tuple[int, int, Direction, int | None, int]:
        """What a cacheable page depends on: position, size and the chat's version."""
        q = plan.query
        cursor = q.cursor
        return (
            q.chat_id,
            self.store.version(q.chat_id),
            cursor.direction if cursor is not None else "next",
            cursor.boundary if cursor is not None else None,
            q.limit,
        )

    def page(self, plan: Plan, *, request_target: str) -> Json:
        """The ``MessagesListResponse`` (docs/protocol.md §4) for ``plan``.

        ``request_target`` is the request's path and query as sent: a repeated cursor in URL
        mode is that very URL again.
        """
        q = plan.query
        kind = plan.kind
        cursor = q.cursor
        chat_id = q.chat_id
        direction: Direction = cursor.direction if cursor is not None else "next"
        boundary = cursor.boundary if cursor is not None else None
        ids = matching_ids(self.store, chat_id, q.filters)
        win = window(
            ids,
            direction,
            boundary,
            q.limit,
            empty=plan.empty,
            backwards=kind == "backwards_page",
        )
        by_id = self.store.by_id
        chosen = ids[win.lo : win.hi]
        items = [by_id[i] for i in (chosen if win.oldest_first else reversed(chosen))]

        next_cursor = ""
        if win.older is not None:
            next_cursor = self.cursor(Cursor(chat_id, "next", win.older, q.filters), q)
        prev_cursor = ""
        if win.newer is not None:
            prev_cursor = self.cursor(Cursor(chat_id, "prev", win.newer, q.filters), q)

        repeated = cursor is not None and cursor.repeat
        if repeated or (kind == "repeat_cursor" and q.token):
            # Hand back the cursor exactly as this request came with it: a cycle.
            if q.cursor_url is not None:
                next_cursor = q.cursor_url
            elif self.cursor_mode == "url":
                next_cursor = self.origin + request_target
            else:
                next_cursor = q.token
        elif kind == "repeat_cursor":
            # A first page: a cursor that, once followed, keeps pointing at itself.
            position = Cursor(chat_id, "next", win.older, q.filters, repeat=True)
            next_cursor = self.cursor(position, q)
        elif kind == "foreign_cursor":
            at = win.older if win.older is not None else boundary
            position = Cursor(chat_id, "next", at, q.filters)
            assert plan.fault is not None
            next_cursor = self.cursor(position, q, origin=plan.fault.origin)

        body: Json = {
            "items": items,
            "limit": q.limit,
            "next_cursor": next_cursor,
            "prev_cursor": prev_cursor,
            "total_count": len(ids),
        }
        if self.extra_fields:
            body["has_more"] = bool(next_cursor)
            body["x_meta"] = {"served": self.pages_served}
        return body

    def cursor(self, position: Cursor, query: Query, *, origin: str | None = None) -> str:
        """A cursor for ``position``: a bare token, or an absolute URL carrying every filter of
        ``query`` (on ``origin`` instead of this server's, for the ``foreign_cursor`` fault)."""
        token = encode_cursor(position, self.key)
        if self.cursor_mode == "token" and origin is None:
            return token
        base = (origin if origin is not None else self.origin) + self.resource_path
        parts = [f"chat_id={position.chat_id}", f"limit={query.limit}", f"cursor={token}"]
        params = query.params
        for key in _FILTER_PARAMS:
            value = params.get(key)
            if value:
                parts.append(f"{key}={quote(value, safe='')}")
        return f"{base}messages/?{'&'.join(parts)}"
