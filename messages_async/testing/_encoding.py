"""Content coding of the emulator's answers (RFC 9110 §8.4, §12.5.3), with no I/O."""

from __future__ import annotations

import json
import zlib
from typing import Any, Final

import orjson

__all__ = ["COMPRESS_MIN", "accepts", "choose_encoding", "dumps", "encode"]

#: Bodies below this are sent as they are: compressing a 200-byte error costs more than it saves.
COMPRESS_MIN: Final = 1024
_JSON: Final = "application/json; charset=utf-8"


def accepts(accept_encoding: str, coding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows ``coding`` (``q=0`` refuses it)."""
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip().lower()
        if name not in (coding, "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


def choose_encoding(accept_encoding: str, *, compress: bool = True) -> str | None:
    """The content coding to answer with: gzip, deflate or None (identity)."""
    if not compress:
        return None
    if accepts(accept_encoding, "gzip"):
        return "gzip"
    if accepts(accept_encoding, "deflate"):
        return "deflate"
    return None


def encode(body: bytes, encoding: str | None) -> tuple[bytes, dict[str, str]]:
    """A JSON body compressed as chosen, and the headers that say so."""
    headers = {"Content-Type": _JSON}
    if encoding is not None and len(body) >= COMPRESS_MIN:
        # Level 1: the emulator must stay cheap next to the client it is measuring.
        wbits = 31 if encoding == "gzip" else zlib.MAX_WBITS
        body = zlib.compress(body, 1, wbits=wbits)
        headers["Content-Encoding"] = encoding
        headers["Vary"] = "Accept-Encoding"
    return body, headers


def dumps(obj: Any) -> bytes:
    """JSON bytes of ``obj``, also of text holding a lone surrogate.

    A JavaScript server cutting an emoji in half sends such text as a ``\\ud83d`` escape, which is
    legal JSON (RFC 8259 §7); orjson refuses to encode it, the stdlib escapes it.
    """
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()
