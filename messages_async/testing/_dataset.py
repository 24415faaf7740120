"""The emulator's data: seeded generation and the in-memory message store.

Plain Python with no I/O. Messages are kept exactly as they go on the wire — one dict per
message, never mutated after it is stored (an edit stores a new dict) — so a page is encoded
straight from the store without a per-request translation step. How a listing reads the store
(filters, keyset windows, cursors) is `_listing.py`'s business; the store only promises that
every chat's ids are kept in one ascending list, which is what keyset paging rests on.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["BASE_TIME", "Store", "format_instant"]

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


def format_instant(ts: float) -> str:
    """An epoch time as ISO 8601 UTC with a ``Z`` (whole seconds, or microseconds if any)."""
    dt = datetime.fromtimestamp(ts, UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """All chats and messages of one emulator, generated from a seed.

    Args:
        chats: how many chats to generate.
        messages_per_chat: messages in each chat, or ``(min, max)`` for a random size per chat.
        seed: same seed, same chats, ids, texts and timestamps.
        user_id: the user the default client acts as; some messages of every chat are theirs.
        extra_fields: add fields and a chat type the contract does not know, to exercise
            client tolerance (docs/protocol.md §6).
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
        self.seed = seed
        self.user_id = user_id
        self.extra_fields = extra_fields
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
            # A chat type the contract does not list: clients must tolerate it
            # (docs/protocol.md §6).
            third = list(self._chats)[2]
            self._chats[third]["type"] = "channel"
            self._chats[third].setdefault("name", "Announcements")
            self._chats[third].setdefault("picture_url", "https://files.example.test/c.png")
            self._chats[third].setdefault("members_count", "250")

        # One timeline for all chats: draw which chat speaks at each step, then number the
        # messages in time order, so ids grow with time across the whole server
        # (docs/protocol.md §2).
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
                # The seed types members_count as a string (docs/protocol.md §4).
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

    def ids(self, chat_id: int) -> list[int]:
        """The chat's message ids, ascending: the store's own list, not to be changed.
        KeyError: unknown chat."""
        return self._ids[chat_id]

    @property
    def by_id(self) -> Mapping[int, Json]:
        """Every message, by id."""
        return self._msgs

    @property
    def stamps(self) -> Mapping[int, float]:
        """Every message's ``created_at``, as epoch seconds, by id."""
        return self._ts

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
    """Attachments as received (docs/protocol.md §4 ``AttachmentStructure``), or None when
    there are none."""
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
