"""Event hooks: functions the client calls around each attempt, for people not on OpenTelemetry.

In the style of httpx's ``event_hooks``: ``Client(event_hooks={"request": [...], "response":
[...], "error": [...]})``. Each hook gets a read-only view built for it, never the objects the
transport sends with, so no hook can see (or change) the bearer token, an ``Authorization``
header, the request body or the query string, which carries search text and filters. A hook may
be a plain function or a coroutine function. A hook that raises is logged and the request goes
on: a bug in a metrics callback must not fail the call it was watching. Only a cancellation
(``CancelledError``) goes through, as it must.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import attrs

__all__ = ["ErrorView", "EventHooks", "RequestView", "ResponseView"]

logger = logging.getLogger("messages_async")

#: The events a hook can be registered for, and what each is given.
EVENTS: Final = ("request", "response", "error")


@attrs.frozen
class RequestView:
    """One attempt of a request, as an event hook sees it.

    Attributes:
        op: The call it belongs to: ``"list"``, ``"get"``, ``"add"``, ``"edit"``, ``"delete"``
            or ``"chats"``.
        method: The HTTP method.
        url: The URL without its query string (cursors and filters carry search text).
        attempt: 1 for the first attempt of the call, 2 for the one after it, and so on
            (retries, the repeat after a token renewal, and redirects all count).
    """

    op: str
    method: str
    url: str
    attempt: int


@attrs.frozen
class ResponseView:
    """An answer to one attempt, as an event hook sees it.

    Attributes:
        request: The attempt this answers.
        status: The HTTP status.
        headers: The response headers (read-only, looked up case-insensitively).
        elapsed: Seconds from sending the attempt to the last byte of the answer.
    """

    request: RequestView
    status: int
    headers: Mapping[str, str]
    elapsed: float


@attrs.frozen
class ErrorView:
    """An attempt that ended without an answer (refused, dropped, timed out, too large).

    Attributes:
        request: The attempt that failed.
        error: The exception's class name, e.g. ``"ClientConnectorError"`` or
            ``"TimeoutError"``. Not the exception itself: its traceback holds the request's
            headers, the bearer token among them.
        elapsed: Seconds from sending the attempt to the failure.
    """

    request: RequestView
    error: str
    elapsed: float


Hook = Callable[[Any], object]


class EventHooks:
    """The hooks of one client, checked once, run in registration order."""

    __slots__ = ("error", "request", "response")

    def __init__(self, hooks: Mapping[str, Iterable[Hook]]) -> None:
        if not isinstance(hooks, Mapping):
            raise TypeError(
                "event_hooks must be a dict of event name to a list of functions, e.g. "
                '{"response": [log_response]}'
            )
        unknown = sorted(set(hooks) - set(EVENTS))
        if unknown:
            raise ValueError(
                f"unknown event_hooks {', '.join(map(repr, unknown))}: the events are "
                f"{', '.join(map(repr, EVENTS))}"
            )
        lists: dict[str, tuple[Hook, ...]] = {}
        for event in EVENTS:
            given = hooks.get(event, ())
            if (
                callable(given)
                or isinstance(given, (str, bytes))
                or not isinstance(given, Iterable)
            ):
                raise TypeError(f"event_hooks[{event!r}] must be a list of functions")
            funcs = tuple(given)
            for func in funcs:
                if not callable(func):
                    raise TypeError(
                        f"event_hooks[{event!r}] holds {type(func).__name__!s}, not a function"
                    )
            lists[event] = funcs
        self.request = lists["request"]
        self.response = lists["response"]
        self.error = lists["error"]

    def __bool__(self) -> bool:
        return bool(self.request or self.response or self.error)


async def run_hooks(hooks: tuple[Hook, ...], view: object) -> None:
    """Call each hook with ``view``; log, never raise, what a hook raises (but cancellation)."""
    for hook in hooks:
        try:
            result = hook(view)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.warning(
                "the event hook %s raised; the request goes on",
                getattr(hook, "__qualname__", type(hook).__name__),
                exc_info=True,
            )
