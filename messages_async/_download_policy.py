"""The rules of fetching an attachment's file, as pure functions (docs/protocol.md §6).

An attachment's ``url`` may point at any origin, usually a file host or a CDN. Fetching it is a
plain ``GET``, and what may go with it is decided here, hop by hop, with no I/O:

- the bearer token goes only to the API's own origin (scheme, host and port of
  ``resource_uri``), and only while the chain of redirects has not left it: once a file host has
  answered, nothing it redirects to gets the token, the API's origin included (a file host must
  not be able to make the client fetch API data with its credentials);
- no cookies at all: the downloads use a session without a cookie jar, so nothing the API (or a
  caller's session) ever set can reach a file host;
- ``http://`` to a host that is not loopback is refused unless ``allow_insecure_http``, also as
  a redirect target (an ``https`` → ``http`` downgrade is refused the same way); a URL with
  user info is refused, since it would carry credentials the client did not choose to send;
- a download resumed after an interruption asks for the rest with ``Range`` and ``If-Range``
  (the validator of the first answer), so a file that changed meanwhile is sent whole again
  rather than spliced; without a validator a resume starts from byte 0;
- a ``Retry-After`` from a file host pauses that origin only (:class:`OriginPauses`).
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Callable, Mapping
from typing import Literal

import attrs
from yarl import URL

from ._errors import ConfigurationError
from ._retry import RETRYABLE_STATUSES
from ._wire import check_secure_url, same_origin

# The classes (OriginPauses, Resume, Validator, RefusedURL) are internal, not re-exported.
__all__ = [
    "REDIRECT_STATUSES",
    "Answer",
    "check_download_url",
    "classify",
    "content_path",
    "extension_for",
    "parse_content_range",
    "redirect_target",
    "request_headers",
    "sends_token",
    "show_url",
]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: The API's transient statuses (``_retry.py``, one table), and a file host's 408: a GET of a
#: file is always safe to repeat.
_RETRY_STATUSES = RETRYABLE_STATUSES | {408}
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,10}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

#: What an answer means for the download.
Answer = Literal["whole", "rest", "redirect", "retry", "gone"]


class RefusedURL(ValueError):
    """A URL this client will not fetch; the message says why."""


def show_url(url: URL | str) -> str:
    """A URL for messages and the media index: no user info, no query, no fragment.

    Signed CDN URLs carry their signature in the query; it is a credential of sorts.
    """
    u = URL(url) if isinstance(url, str) else url
    try:
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        return "<unreadable URL>"


def check_download_url(url: URL, *, allow_insecure_http: bool) -> None:
    """RefusedURL unless ``url`` may be fetched (absolute http(s), no user info, no clear text).

    The same rule as for the API's own URLs (``_wire.check_secure_url``): plain http is
    allowed to loopback hosts (tests, local mirrors) and with ``allow_insecure_http``.
    """
    if not url.absolute or not url.host:
        # Checked first: the shared check cannot word its message for a relative URL.
        raise RefusedURL(f"not an absolute http(s) URL: {show_url(url)}")
    try:
        check_secure_url(url, what="the attachment URL", allow_insecure_http=allow_insecure_http)
    except ConfigurationError as exc:
        raise RefusedURL(str(exc)) from None


def sends_token(hop: URL, resource_root: URL | None, *, left_api: bool) -> bool:
    """Whether this hop of a download carries the bearer token.

    Args:
        hop: The URL about to be requested.
        resource_root: The API's base URI (``None``: not known, so never).
        left_api: Whether an earlier hop of this download went to another origin.
    """
    return resource_root is not None and not left_api and same_origin(hop, resource_root)


def redirect_target(current: URL, location: str | None, *, allow_insecure_http: bool) -> URL:
    """Where a redirect leads; RefusedURL if it cannot be followed."""
    if not location:
        raise RefusedURL(f"a redirect without a Location from {show_url(current)}")
    try:
        target = current.join(URL(location))
    except ValueError:
        raise RefusedURL(f"an unreadable redirect from {show_url(current)}") from None
    check_download_url(target, allow_insecure_http=allow_insecure_http)
    return target


@attrs.frozen
class Validator:
    """What identifies one version of a file, for ``If-Range``: a strong ETag or a date."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Validator | None:
        etag = headers.get("ETag")
        if etag is not None and etag.startswith("W/"):
            etag = None  # RFC 9110 §13.1.5: If-Range needs a strong validator
        modified = headers.get("Last-Modified")
        if etag is None and modified is None:
            return None
        return cls(etag, modified)

    def header(self) -> str:
        return self.etag if self.etag is not None else str(self.last_modified)


@attrs.frozen
class Resume:
    """A download that has ``offset`` bytes already, of the version ``validator`` names."""

    offset: int
    validator: Validator | None

    @property
    def possible(self) -> bool:
        return self.offset > 0 and self.validator is not None


def request_headers(resume: Resume | None) -> dict[str, str]:
    """The headers of a file request (never the token: the caller adds it per hop)."""
    headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
    if resume is not None and resume.possible:
        assert resume.validator is not None
        headers["Range"] = f"bytes={resume.offset}-"
        headers["If-Range"] = resume.validator.header()
    return headers


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``(first, last, total)`` of ``Content-Range: bytes first-last/total``; None if unreadable."""
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


def classify(status: int, *, content_range: str | None, offset: int) -> Answer:
    """What an answer means: the whole file, the rest of it, a redirect, try again, or gone.

    A 206 counts as the rest only if it starts exactly at ``offset``; any other 206 (or a 200
    to a range request) means starting over, which "whole" says. Every other status that is
    not retried is "gone": the file is recorded with its status and not fetched again.
    """
    if status == 200:
        return "whole"
    if status == 206:
        parsed = parse_content_range(content_range)
        if parsed is not None and parsed[0] == offset and offset > 0:
            return "rest"
        return "retry"
    if status in REDIRECT_STATUSES:
        return "redirect"
    if status in _RETRY_STATUSES:
        return "retry"
    return "gone"


def extension_for(name: str | None, content_type: str | None, url: URL | str) -> str:
    """The extension the attachment's name, its content type or its URL path suggests."""
    for candidate in (name, URL(url).path if isinstance(url, str) else url.path):
        if candidate:
            suffix = candidate.rsplit("/", 1)[-1]
            dot = suffix.rfind(".")
            if dot > 0 and _EXTENSION.fullmatch(suffix[dot:]):
                return suffix[dot:].lower()
    if content_type:
        guessed = mimetypes.guess_extension(content_type.split(";", 1)[0].strip().lower())
        if guessed and _EXTENSION.fullmatch(guessed):
            return guessed
    return ""


def content_path(sha256: str, extension: str) -> str:
    """Where a file lives in the media folder: ``ab/ab12…<ext>`` (content-addressed)."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return f"{sha256[:2]}/{sha256}{extension}"


class OriginPauses:
    """When each origin may be asked again: a file host's 429 pauses that host only.

    Args:
        clock: Monotonic seconds (injected, so the policy runs on a fake clock in tests).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until: dict[tuple[str, str, int | None], float] = {}

    @staticmethod
    def _key(url: URL) -> tuple[str, str, int | None]:
        return (url.scheme.lower(), (url.host or "").lower(), url.port)

    def pause(self, url: URL, seconds: float) -> None:
        """Nothing goes to ``url``'s origin for ``seconds`` (a longer pause already set stays)."""
        key = self._key(url)
        until = self._clock() + max(0.0, seconds)
        if until > self._until.get(key, 0.0):
            self._until[key] = until

    def wait_for(self, url: URL) -> float:
        """Seconds to wait before a request to ``url``'s origin may go (0: now)."""
        key = self._key(url)
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._until[key]
            return 0.0
        return left
