"""Row 1, decode: page bytes → ``MessagesPage``, items/s, with GC on and off.

- library: ``messages_async._wire.parse_page`` (msgspec into the wire structs, then the models);
- floor: ``orjson.loads`` alone, parsing without building any object;
- structs: the library's msgspec pass alone (the page as wire structs, no attrs models, no raw
  bytes): what models built in C would cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
                "structs": variant(_page.decode),
            },
            ctx.repeats,
        )
        lib, floor, std = median(r["library"]), median(r["orjson"]), median(r["structs"])
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
        lines.append(
            Line(
                NAME,
                f"{gc_name}: parse_page vs its msgspec pass alone (wire structs, no models)",
                fmt_rate(lib, "msg"),
                fmt_rate(std, "msg"),
                paired_ratio(r["library"], r["structs"]),
            )
        )
    return lines
