"""The emulator's data: seeded generation, the in-memory store, filters and keyset cursors.

Everything here is plain Python with no I/O, so the paging rules can be reasoned about (and
tested) apart from HTTP. Messages are kept exactly as they go on the wire — one dict per
message, never mutated after it is stored (an edit stores a new dict) — so a page is encoded
straight from the store without a per-request translation step.

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
import random
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import attrs
import orjson

__all__ = [
    "BASE_TIME",
    "Cursor",
    "CursorError",
    "Filters",
    "Page",
    "Store",
    "decode_cursor",
    "encode_cursor",
    "format_instant",
    "parse_instant",
]

#: The generated timeline starts here (2025-01-01T00:00:00Z). A fixed start, not "now", so the
#: same seed gives the same timestamps on every run.
BASE_TIME = 1_735_689_600
#: The generated timeline spans about this many seconds; new posts are stamped with the wall
#: clock, which is later than any generated message.
_SPAN = 300 * 24 * 3600
_FIRST_ID = 100_001
_GROUP_ID_BASE = 500_000
_PRIVATE_ID_BASE = 2_000
_MEMBER_ID_BASE = 3_000

Json = dict[str, Any]
Direction = Literal["next", "prev"]

_WORDS = [
    "hello",
    "hi",
    "ok",
    "sure",
    "thanks",
    "meeting",
    "tomorrow",
    "today",
    "invoice",
    "report",
    "draft",
    "review",
    "deploy",
    "release",
    "lunch",
    "coffee",
    "call",
    "later",
    "please",
    "check",
    "the",
    "new",
    "version",
    "looks",
    "good",
    "to",
    "me",
    "done",
    "fixed",
    "broken",
    "build",
    "test",
    "server",
    "client",
    "update",
    "budget",
    "plan",
    "office",
    "remote",
    "Monday",
    "Friday",
    "weekend",
    "photo",
    "document",
    "link",
    "agenda",
    "notes",
    "question",
    "answer",
    "urgent",
    "Привет",
    "спасибо",
    "café",
    "naïve",
    "Straße",
    "🙂",
    "👍",
]
_GROUP_NAMES = (
    "Team",
    "Family",
    "Book club",
    "Release crew",
    "Football",
    "Neighbours",
    "Project X",
    "Design review",
    "Weekend trip",
    "Support",
)
_ATTACHMENT_KINDS = (
    ("image", "photo.jpg"),
    ("file", "report.pdf"),
    ("link", None),
    ("file", "notes.txt"),
    ("image", "screenshot.png"),
)


class CursorError(ValueError):
    """A cursor that this server did not issue, or that was altered."""


def format_instant(ts: float) -> str:
    """An epoch time as ISO 8601 UTC with a ``Z`` (whole seconds, or microseconds if any)."""
    dt = datetime.fromtimestamp(ts, UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instant(text: str) -> float:
    """An ISO 8601 instant as epoch seconds; no offset means UTC (PROTOCOL §2 Limits).

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


@attrs.frozen
class Filters:
    """The listing filters a cursor is bound to. ``since`` is inclusive, ``till`` exclusive."""

    query: str | None = None
    since: float | None = None
    till: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.query) or self.since is not None or self.till is not None


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


def _cursor_key(seed: int) -> bytes:
    # Derived from the seed, so a restarted `messages-async serve` with the same seed still
    # accepts cursors handed out before the restart (PROTOCOL §3: cursors live 24 hours).
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


@attrs.frozen
class Page:
    """One listing window. ``older`` is the boundary for ``next_cursor`` (ids below it),
    ``newer`` the boundary for ``prev_cursor`` (ids above it); None: nothing that way."""

    items: list[Json]
    older: int | None
    newer: int | None
    total: int


class Store:
    """All chats and messages of one emulator, generated from a seed.

    Args:
        chats: how many chats to generate.
        messages_per_chat: messages in each chat, or ``(min, max)`` for a random size per chat.
        seed: same seed, same chats, ids, texts and timestamps.
        user_id: the user the default client acts as; some messages of every chat are theirs.
        extra_fields: add fields and a chat type the contract does not know, to exercise
            client tolerance (PROTOCOL §6).
    """

    def __init__(
        self,
        *,
        chats: int = 5,
        messages_per_chat: int | tuple[int, int] = 50,
        seed: int = 0,
        user_id: int = 1001,
        extra_fields: bool = False,
    ) -> None:
        self.user_id = user_id
        self.extra_fields = extra_fields
        self.cursor_key = _cursor_key(seed)
        self._chats: dict[int, Json] = {}
        self._members: dict[int, list[int]] = {}
        self._ids: dict[int, list[int]] = {}
        # Bumped on every change to a chat: the server keys its cache of encoded pages on it.
        self._versions: dict[int, int] = {}
        self._msgs: dict[int, Json] = {}
        self._chat_of: dict[int, int] = {}
        self._ts: dict[int, float] = {}
        self._last_id = _FIRST_ID - 1
        self._last_ts = float(BASE_TIME)
        # Posts and new chats after generation draw from their own generator, so they never
        # disturb the seeded dataset itself.
        self._rng = random.Random(f"{seed}:live")
        self._generate(chats, messages_per_chat, random.Random(seed))

    # -- generation ---------------------------------------------------------------------------

    def _generate(self, n_chats: int, per_chat: int | tuple[int, int], rng: random.Random) -> None:
        if n_chats < 0:
            raise ValueError("chats must be >= 0")
        sizes: list[int] = []
        for i in range(n_chats):
            # The first chat is private and the second a group, so even a tiny dataset has both.
            private = i == 0 or (i > 1 and rng.random() < 0.5)
            self._new_chat("private" if private else "group", rng)
            if isinstance(per_chat, tuple):
                lo, hi = per_chat
                sizes.append(rng.randint(lo, hi))
            else:
                sizes.append(per_chat)
        if self.extra_fields and n_chats >= 3:
            # A chat type the contract does not list: clients must tolerate it (PROTOCOL §6).
            third = list(self._chats)[2]
            self._chats[third]["type"] = "channel"
            self._chats[third].setdefault("name", "Announcements")
            self._chats[third].setdefault("picture_url", "https://files.example.test/c.png")
            self._chats[third].setdefault("members_count", "250")

        # One timeline for all chats: draw which chat speaks at each step, then number the
        # messages in time order, so ids grow with time across the whole server (PROTOCOL §2).
        chat_ids = list(self._chats)
        order: list[int] = []
        for chat_id, size in zip(chat_ids, sizes, strict=True):
            if size < 0:
                raise ValueError("messages_per_chat must be >= 0")
            order.extend([chat_id] * size)
        rng.shuffle(order)
        total = len(order)
        max_gap = max(2, 2 * _SPAN // max(1, total))
        # Texts are two phrases from a pool: drawing every word with `choices` would be most of
        # the generation time, and 2048 x 2048 combinations are plenty for a test dataset.
        phrases = [" ".join(rng.choices(_WORDS, k=1 + int(rng.random() * 6))) for _ in range(2048)]
        ts = BASE_TIME
        random_ = rng.random
        user_id = self.user_id
        msgs = self._msgs
        chat_of = self._chat_of
        ts_of = self._ts
        ids = self._ids
        members_of = self._members
        extra = self.extra_fields
        day_prefix: dict[int, str] = {}
        msg_id = self._last_id
        for chat_id in order:
            ts += 1 + int(random_() * max_gap)
            msg_id += 1
            members = members_of[chat_id]
            r = random_()
            uid = user_id if r < 0.3 else members[int(random_() * len(members))]
            text = phrases[int(random_() * 2048)]
            if r > 0.65:
                text = text + " " + phrases[int(random_() * 2048)]
            attachments: Json | None = None
            if random_() < 0.08:
                attachments = self._random_attachments(msg_id, rng)
                if random_() < 0.25:
                    text = ""
            day = ts - ts % 86400
            prefix = day_prefix.get(day)
            if prefix is None:
                prefix = day_prefix[day] = time.strftime("%Y-%m-%dT", time.gmtime(day))
            sec = ts - day
            msg: Json = {
                "id": msg_id,
                "uid": uid,
                "message": text,
                "attachments": attachments,
                "created_at": f"{prefix}{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}Z",
            }
            if extra:
                self._add_extra_message_fields(msg)
            msgs[msg_id] = msg
            chat_of[msg_id] = chat_id
            ts_of[msg_id] = float(ts)
            ids[chat_id].append(msg_id)
        self._last_id = msg_id
        self._last_ts = float(ts)

    def _random_attachments(self, msg_id: int, rng: random.Random) -> Json:
        items = []
        for k in range(1 + int(rng.random() * 3)):
            kind, name = _ATTACHMENT_KINDS[int(rng.random() * len(_ATTACHMENT_KINDS))]
            url = f"https://files.example.test/{msg_id}/{k}/{name or 'page'}"
            item: Json = {
                "type": kind,
                "url": url,
                "name": name,
                "size": None if kind == "link" else 1000 + int(rng.random() * 5_000_000),
            }
            if self.extra_fields:
                item["x_thumb"] = url + "?thumb=1"
            items.append(item)
        if self.extra_fields and rng.random() < 0.3:
            items.append(
                {"type": "sticker", "url": "https://files.example.test/s.webp", "name": None}
            )
        return {"items": items}

    @staticmethod
    def _add_extra_message_fields(msg: Json) -> None:
        msg["edited"] = False
        msg["reactions"] = {"👍": msg["id"] % 4}
        msg["x_meta"] = {"source": "emulator", "rev": 1}

    def _new_chat(
        self, type_: str, rng: random.Random, *, name: str | None = None, members: int = 0
    ) -> int:
        n = len(self._chats)
        chat: Json
        if type_ == "private":
            chat_id = _PRIVATE_ID_BASE + 1 + n
            while chat_id in self._chats:
                chat_id += 1
            chat = {"chat_id": chat_id, "type": "private"}
            self._members[chat_id] = [chat_id]
        else:
            chat_id = _GROUP_ID_BASE + 1 + n
            while chat_id in self._chats:
                chat_id += 1
            count = members if members > 0 else 3 + int(rng.random() * 20)
            others = [_MEMBER_ID_BASE + int(rng.random() * 5000) for _ in range(max(1, count - 1))]
            chat = {
                "chat_id": chat_id,
                "type": type_,
                "name": name or f"{_GROUP_NAMES[n % len(_GROUP_NAMES)]} {n}",
                "picture_url": f"https://files.example.test/chats/{chat_id}.png",
                # The seed types members_count as a string (PROTOCOL §4).
                "members_count": str(count),
            }
            self._members[chat_id] = others
        if self.extra_fields:
            chat["x_meta"] = {"muted": False, "pinned": n % 2 == 0}
        self._chats[chat_id] = chat
        self._ids[chat_id] = []
        return chat_id

    # -- reading ------------------------------------------------------------------------------

    def has_chat(self, chat_id: int) -> bool:
        return chat_id in self._chats

    def chats(self) -> list[Json]:
        return list(self._chats.values())

    def chat_ids(self) -> list[int]:
        return list(self._chats)

    def messages(self, chat_id: int) -> list[Json]:
        """A chat's messages, newest first. Raises KeyError for an unknown chat."""
        msgs = self._msgs
        return [msgs[i] for i in reversed(self._ids[chat_id])]

    def message(self, message_id: int) -> Json | None:
        return self._msgs.get(message_id)

    def chat_of(self, message_id: int) -> int | None:
        return self._chat_of.get(message_id)

    def message_count(self) -> int:
        return len(self._msgs)

    def max_id(self) -> int:
        """The largest id ever handed out (a deleted id is never reused)."""
        return self._last_id

    def members(self, chat_id: int) -> list[int]:
        return self._members[chat_id]

    def _matching_ids(self, chat_id: int, filters: Filters) -> list[int]:
        ids = self._ids[chat_id]
        if not filters.active:
            return ids
        msgs = self._msgs
        ts_of = self._ts
        query = filters.query.casefold() if filters.query else None
        since = filters.since
        till = filters.till
        out = []
        for i in ids:
            t = ts_of[i]
            if since is not None and t < since:
                continue
            if till is not None and t >= till:
                continue
            if query is not None and query not in msgs[i]["message"].casefold():
                continue
            out.append(i)
        return out

    def page(
        self,
        chat_id: int,
        filters: Filters,
        direction: Direction,
        boundary: int | None,
        limit: int,
        *,
        empty: bool = False,
        backwards: bool = False,
    ) -> Page:
        """The window of at most ``limit`` matching items next to a keyset position.

        ``next`` takes the newest items with ids below ``boundary``; ``prev`` takes the oldest
        items with ids above it (still returned newest first). ``empty`` answers an empty page
        at the same position; ``backwards`` answers the window on the wrong side of the
        boundary (the ``backwards_page`` fault).
        """
        ids = self._matching_ids(chat_id, filters)
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
        msgs = self._msgs
        if backwards and boundary is None:
            # A first page that runs oldest first: the order itself goes backwards.
            items = [msgs[i] for i in ids[lo:hi]]
        else:
            items = [msgs[i] for i in reversed(ids[lo:hi])]
        # The boundaries are written so an empty window (lo == hi) still splits the ids at the
        # right place: "ids < ids[lo]" is exactly the items before lo, "ids > ids[hi - 1]" the
        # items from hi on.
        older: int | None = None
        if lo > 0:
            older = ids[lo] if lo < n else ids[n - 1] + 1
        newer: int | None = None
        if hi < n and boundary is not None:
            newer = ids[hi - 1] if hi > 0 else ids[0] - 1
        elif hi < n and backwards:
            newer = ids[hi - 1]
        return Page(items=items, older=older, newer=newer, total=n)

    # -- writing ------------------------------------------------------------------------------

    def _stamp(self) -> float:
        # Ids and created_at must both grow: never stamp earlier than the newest message.
        now = max(time.time(), self._last_ts)
        self._last_ts = now
        return now

    def add(
        self,
        chat_id: int,
        uid: int,
        text: str,
        attachments: Sequence[Mapping[str, Any]] = (),
    ) -> Json:
        """Store a new message, numbered after every message so far. KeyError: unknown chat."""
        ids = self._ids[chat_id]
        ts = self._stamp()
        self._last_id += 1
        msg_id = self._last_id
        msg: Json = {
            "id": msg_id,
            "uid": uid,
            "message": text,
            "attachments": _attachment_structure(attachments),
            "created_at": format_instant(ts),
        }
        if self.extra_fields:
            self._add_extra_message_fields(msg)
        self._msgs[msg_id] = msg
        self._chat_of[msg_id] = chat_id
        self._ts[msg_id] = ts
        ids.append(msg_id)  # the largest id so far: the list stays sorted
        self._bump(chat_id)
        return msg

    def edit(
        self,
        message_id: int,
        *,
        text: str | None = None,
        attachments: Sequence[Mapping[str, Any]] | None = None,
    ) -> Json:
        """Replace a message's text and/or attachments (a new dict: pages already encoded or
        handed to a caller keep the old one). KeyError: unknown message."""
        msg = dict(self._msgs[message_id])
        if text is not None:
            msg["message"] = text
        if attachments is not None:
            msg["attachments"] = _attachment_structure(attachments)
        if self.extra_fields:
            msg["edited"] = True
        self._msgs[message_id] = msg
        self._bump(self._chat_of[message_id])
        return msg

    def delete(self, message_id: int) -> None:
        """Remove a message. KeyError: unknown message."""
        chat_id = self._chat_of.pop(message_id)
        del self._msgs[message_id]
        del self._ts[message_id]
        ids = self._ids[chat_id]
        del ids[bisect_left(ids, message_id)]
        self._bump(chat_id)

    def _bump(self, chat_id: int) -> None:
        self._versions[chat_id] = self._versions.get(chat_id, 0) + 1

    def version(self, chat_id: int) -> int:
        """A number that changes whenever the chat's messages do."""
        return self._versions.get(chat_id, 0)

    def add_chat(self, type_: str = "group", *, name: str | None = None, members: int = 3) -> int:
        return self._new_chat(type_, self._rng, name=name, members=members)

    def other_user(self, chat_id: int) -> int:
        """Someone in the chat who is not the default user."""
        members = [m for m in self._members[chat_id] if m != self.user_id]
        if not members:
            return _MEMBER_ID_BASE
        return members[int(self._rng.random() * len(members))]

    def random_text(self) -> str:
        return " ".join(self._rng.choices(_WORDS, k=1 + int(self._rng.random() * 8)))


def _attachment_structure(attachments: Iterable[Mapping[str, Any]]) -> Json | None:
    """Attachments as received (PROTOCOL §4 AttachmentStructure), or None when there are none."""
    items = [
        {
            "type": a["type"],
            "url": a["url"],
            "name": a.get("name"),
            "size": a.get("size"),
        }
        for a in attachments
    ]
    return {"items": items} if items else None
