"""What a message to send must hold: checked before anything is sent, with a clear error."""

from __future__ import annotations

import pytest
from helpers import client_for

import messages_async as ma
from messages_async._wire import build_add, build_edit, resource_root
from messages_async.testing import MessagesServer

ROOT = resource_root("https://api.example.test/v1")


def link(url: str) -> list[ma.NewAttachment]:
    return [ma.NewAttachment(type="link", url=url)]


@pytest.mark.parametrize(
    ("message", "attachments", "match"),
    [
        (" ", None, "only whitespace"),
        ("\n\t \u3000", None, "only whitespace"),
        ("", [], "text or at least one attachment"),
        ("hi", link("ftp://files.example.test/a.pdf"), "scheme 'ftp'"),
        ("hi", link("file:///etc/passwd"), "scheme 'file'"),
        ("hi", link("javascript:alert(1)"), "scheme 'javascript'"),
        ("hi", link("example.test/a.png"), "'example.test/a.png', which has no scheme"),
        ("hi", link("/a.png?sig=abc"), "'/a.png', which has no scheme"),
        ("hi", link("https:///a.png"), "which has no host"),
        ("hi", link("http://[::1"), "cannot be parsed"),
    ],
)
def test_refused_before_sending(message: str, attachments: object, match: str) -> None:
    for build in (
        lambda: build_add(ROOT, 5, message, attachments, False),  # type: ignore[arg-type]
        lambda: build_edit(ROOT, 9, 5, message, attachments),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=match) as caught:
            build()
        assert "sig=abc" not in str(caught.value)  # a signed URL's query stays out of it


@pytest.mark.parametrize(
    ("message", "attachments"),
    [
        ("  padded  ", None),
        (" ", link("https://files.example.test/a.png")),  # an attachment needs no text
        ("", link("HTTP://files.example.test/a.png?sig=abc")),
        ("hi", link("https://user@files.example.test:8443/a.png")),
    ],
)
def test_accepted(message: str, attachments: list[ma.NewAttachment] | None) -> None:
    build_add(ROOT, 5, message, attachments, False)
    build_edit(ROOT, 9, 5, message, attachments)


async def test_the_client_sends_nothing_it_refuses() -> None:
    async with MessagesServer(chats=1, messages_per_chat=1) as server, client_for(server) as client:
        chat = server.chat_ids()[0]
        mine = await client.messages.add(chat, "mine")
        with pytest.raises(ValueError, match="only whitespace"):
            await client.messages.add(chat, "   ")
        with pytest.raises(ValueError, match="scheme 'ftp'"):
            await client.messages.add(chat, "see", attachments=link("ftp://x.test/a"))
        with pytest.raises(ValueError, match="only whitespace"):
            await client.messages.edit(mine.id, chat_id=chat, message="\n")
        posts = [r for r in server.resource_requests() if r.method == "POST"]
        assert len(posts) == 1  # only the first add
        assert server.messages(chat)[0]["message"] == "mine"
