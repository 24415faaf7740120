"""Retry decisions, as plain code: what a failure means for whoever may try again.

Nothing here does I/O or reads a clock; the loops that send requests, poll chats and run
export rounds ask these functions and act on the answer (see ``docs/protocol.md`` §6, §7).

Two levels ask:

- the transport, per attempt of one request (connection failures, statuses, ``Retry-After``);
- whoever runs *rounds* of calls over a long time (a watch polling a chat, an export walking
  one): once a call has failed after the transport's own retries, :func:`after_failed_call`
  says whether a later round may succeed.
"""

from __future__ import annotations

import enum

from ._errors import (
    AuthError,
    InvalidCursorError,
    PaginationError,
    RateLimitError,
    ServerError,
    TransportError,
)

__all__ = ["RoundVerdict", "after_failed_call"]


class RoundVerdict(enum.Enum):
    """What a failed call means for the next round of the same work."""

    #: An outage (server errors, rate limits, the network): try again after a wait. Callers
    #: still bound how many rounds in a row they spend on it.
    AGAIN = "again"
    #: The cursor is no longer valid: start the walk again from the newest page.
    RESTART = "restart"
    #: The same request would fail the same way (a body that breaks the contract, a refused
    #: credential, a 4xx): report it once and do not ask again.
    GIVE_UP = "give_up"


def after_failed_call(exc: BaseException) -> RoundVerdict:
    """Classify an exception that ended a call after the transport's own retries."""
    if isinstance(exc, InvalidCursorError):
        return RoundVerdict.RESTART
    if isinstance(exc, (ServerError, RateLimitError, TransportError, PaginationError)):
        # A misbehaving listing (PaginationError) may be a server mid-deploy; callers bound it.
        return RoundVerdict.AGAIN
    if isinstance(exc, AuthError):
        # The token endpoint unreachable or failing is an outage, not refused credentials.
        outage = exc.status is None or exc.status >= 500 or exc.status == 429
        return RoundVerdict.AGAIN if outage else RoundVerdict.GIVE_UP
    # A DecodeError among them: the server sent a body that breaks the contract, and asking
    # again gets the same body.
    return RoundVerdict.GIVE_UP
