"""Row 1, decode: page bytes → ``MessagesPage``, items/s, with GC on and off.

- library: ``messages_async._wire.parse_page`` (msgspec straight into the attrs models, the
  rules no type states, each message's JSON cut out);
- floor: ``orjson.loads`` alone, parsing without building any object;
- pass: the library's msgspec pass alone (the attrs models filled with the wire's types; no
  rules, no JSON cut out): the most any decoder into these models can reach;
- structs: the same page decoded by msgspec into ``msgspec.Struct`` twins of the models: what
  models that msgspec builds in C would cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import msgspec
import orjson

from messages_async._converter import _page
from messages_async._wire import parse_page

from .._harness import (
    Context,
    Line,
    Target,
    fmt_rate,
    gc_disabled,
    interleave,
    median,
    paired_ratio,
)
from ._pages import fetch_pages

__all__ = ["NAME", "run"]

NAME = "decode"
TARGET = Target(">=", 0.8)


class _Attachment(msgspec.Struct):
    type: str
    url: str
    name: str | None = None
    size: int | None = None


class _Envelope(msgspec.Struct):
    items: list[_Attachment] | None = None


class _Message(msgspec.Struct):
    id: int
    uid: int
    message: str | None
    attachments: _Envelope | list[_Attachment] | None = None
    created_at: datetime | None = None


class _Page(msgspec.Struct):
    items: list[_Message] | None = None
    limit: int | None = None
    next_cursor: str | None = None
    prev_cursor: str | None = None
    total_count: int | None = None


_structs = msgspec.json.Decoder(_Page)


def _rate(
    fn: Callable[[bytes], object], bodies: list[bytes], items: int, loops: int, *, gc_off: bool
) -> float:
    with gc_disabled(gc_off):
        start = time.perf_counter()
        for _ in range(loops):
            for body in bodies:
                fn(body)
        elapsed = time.perf_counter() - start
    return items * loops / elapsed


def run(ctx: Context) -> list[Line]:
    if ctx.quick:
        bodies = fetch_pages(chats=1, messages_per_chat=300)
        loops = 2
    else:
        bodies = fetch_pages(chats=4, messages_per_chat=1000)
        loops = 5
    items = sum(len(orjson.loads(b)["items"]) for b in bodies)
    size = sum(len(b) for b in bodies) / len(bodies)
    ctx.log(f"decode: {len(bodies)} pages, {items} messages, {size / 1024:.1f} KiB a page")
    lines: list[Line] = []
    for gc_off in (False, True):
        gc_name = "GC off" if gc_off else "GC on"

        def variant(fn: Callable[[bytes], object], off: bool = gc_off) -> Callable[[], float]:
            return lambda: _rate(fn, bodies, items, loops, gc_off=off)

        r = interleave(
            {
                "library": variant(parse_page),
                "orjson": variant(orjson.loads),
                "pass": variant(_page.decode),
                "structs": variant(_structs.decode),
            },
            ctx.repeats,
        )
        lib, floor = median(r["library"]), median(r["orjson"])
        lines.append(
            Line(
                NAME,
                f"{gc_name}: parse_page vs orjson.loads alone (floor)",
                fmt_rate(lib, "msg"),
                fmt_rate(floor, "msg"),
                paired_ratio(r["library"], r["orjson"]),
                TARGET,
            )
        )
        for key, what in (
            ("pass", "its msgspec pass alone (attrs models, no rules, no JSON cut)"),
            ("structs", "msgspec into Struct twins of the models"),
        ):
            lines.append(
                Line(
                    NAME,
                    f"{gc_name}: {what} vs orjson.loads alone",
                    fmt_rate(median(r[key]), "msg"),
                    fmt_rate(floor, "msg"),
                    paired_ratio(r[key], r["orjson"]),
                )
            )
    return lines
