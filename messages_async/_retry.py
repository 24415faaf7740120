"""Retry decisions, as plain code: what a failure means for whoever may try again.

Nothing here does I/O or reads a clock; the loops that send requests, poll chats and run
export rounds ask these functions and act on the answer (see ``docs/protocol.md`` §6, §7).

Two levels ask:

- the transport and the token exchange, per attempt of one request: :func:`decide` takes what
  the attempt came to (a status and its ``Retry-After``, or why no answer came), the call's
  history, its settings, the retry budget and the time left, and answers :class:`RetryIn`,
  :class:`Renew`, :class:`Done` or :class:`GiveUp`;
- whoever runs *rounds* of calls over a long time (a watch polling a chat, an export walking
  one): once a call has failed after the transport's own retries, :func:`after_failed_call`
  says whether a later round may succeed.

The per-attempt classification is one table, :data:`TABLE`, printed in the README ("Retries").
"""

from __future__ import annotations

import enum
import random

import attrs

from ._errors import (
    AuthError,
    InvalidCursorError,
    PaginationError,
    RateLimitError,
    ServerError,
    TransportError,
)
from ._wire import backoff_delay, is_outage_status

__all__ = [
    "TABLE",
    "TOKEN_EXCHANGE",
    "Attempt",
    "CallState",
    "Decision",
    "Done",
    "Failure",
    "GiveUp",
    "Operation",
    "Renew",
    "RetryBudget",
    "RetryIn",
    "RetryPolicy",
    "RoundVerdict",
    "after_failed_call",
    "attempts_text",
    "decide",
    "describe_wait",
    "is_outage",
]

#: Statuses that may succeed when asked again (docs/protocol.md §6): throttling and server failures.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
#: A wait is begun only if the attempt after it would still have this share of the deadline.
DEADLINE_SHARE = 0.1


class Failure(enum.Enum):
    """Why an attempt got no answer, in the policy's words (``_http.py`` maps the HTTP
    library's exceptions to these)."""

    #: No connection was made (refused, unresolvable name, no route, connect timeout): the
    #: request was never sent, so even an ``add`` may be sent again.
    NOT_CONNECTED = "could not connect"
    #: The TLS handshake failed (an untrusted or mismatched certificate): every retry meets
    #: the same certificate.
    CERTIFICATE = "TLS certificate or handshake failure"
    #: The connection broke after the request went out, or the answer was not readable HTTP:
    #: the server may have acted.
    LOST = "connection lost"
    #: No complete answer within the attempt's ``timeout``: the server may have acted.
    TIMEOUT = "timed out"
    #: The HTTP library refused to send the request as built: asking again changes nothing.
    UNSENDABLE = "could not be sent"


@attrs.frozen
class Operation:
    """What is being sent, as far as retrying it is concerned."""

    name: str
    #: Whether sending it twice does no more than sending it once (GET, edit, delete, a token
    #: exchange); an ``add`` is not, and is repeated only where the server cannot have acted.
    idempotent: bool
    #: A resource request: its ``Retry-After`` pauses every request of the client
    #: (docs/protocol.md §7), a 401 renews the token once, and failures spend the retry
    #: budget. The token exchange is none of these: it waits on its own.
    resource: bool = True
    #: A 404 after an attempt that may have reached the server means that attempt did it.
    gone_means_done: bool = False


TOKEN_EXCHANGE = Operation("token exchange", idempotent=True, resource=False)


@attrs.frozen
class Attempt:
    """What one attempt came to: an answer's status (with its ``Retry-After``), or a failure."""

    status: int | None = None
    retry_after: float | None = None
    failure: Failure | None = None


@attrs.frozen
class CallState:
    """The history of one call that matters for its next decision."""

    #: Retries spent (a renewal after a 401 is not one).
    retries: int = 0
    renewed: bool = False
    #: Set once an attempt may have reached the server without us seeing its answer.
    maybe_acted: bool = False
    #: When the current run of failures to connect began (the caller's clock), or ``None``.
    unreachable_since: float | None = None


@attrs.frozen
class RetryPolicy:
    """Retry settings of one client (or of one ``with_options`` view of it)."""

    max_retries: int
    timeout: float
    backoff_base: float
    backoff_max: float
    max_retry_after: float
    deadline: float | None = None
    #: Longest run of failures to connect that is retried (``None``: ``max_retries`` only).
    max_unreachable: float | None = 20.0

    def replace(self, **changes: object) -> RetryPolicy:
        """A copy with some settings changed (for ``Client.with_options``)."""
        return attrs.evolve(self, **changes)  # type: ignore[arg-type]


class RetryBudget:
    """A token bucket that caps retries of failures across the whole client.

    Without it, a server that fails every request gets ``max_retries + 1`` times the load just
    when it is least able to take it (a retry storm). Each retry of a failure (5xx, connection
    error, timeout) spends one token; each success earns back ``refill`` tokens, up to
    ``capacity``. First attempts are never held back, and waits the server asked for
    (``Retry-After``) are governed by the shared pause instead. The design follows gRPC's retry
    throttling and the AWS SDKs' retry quota: in steady state at most about ``refill`` retries
    per success.
    """

    __slots__ = ("_tokens", "capacity", "refill")

    def __init__(self, capacity: float, refill: float = 0.1) -> None:
        self.capacity = capacity
        self.refill = refill
        self._tokens = capacity

    @property
    def tokens(self) -> float:
        return self._tokens

    def try_spend(self) -> bool:
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def earn(self) -> None:
        if self._tokens < self.capacity:
            self._tokens = min(self.capacity, self._tokens + self.refill)


@attrs.frozen
class RetryIn:
    """Send again after ``delay`` seconds."""

    delay: float
    #: Pause every request of the client for ``delay`` (a ``Retry-After`` or a 429) instead
    #: of sleeping in this call alone; the limiter then holds this call too.
    pause_client: bool = False
    #: Spend one token of the retry budget (the caller checked there is one).
    spend_budget: bool = False


@attrs.frozen
class Renew:
    """The token was refused: renew it (once) and send again; not counted as a retry."""


@attrs.frozen
class Done:
    """The caller's intent holds although the answer says otherwise (a delete whose earlier
    attempt did the work): succeed without a body."""


@attrs.frozen
class GiveUp:
    """Raise the error of this attempt."""

    #: Why it was not retried, when the error alone does not say ("" otherwise).
    note: str = ""
    #: The server's ``Retry-After`` still binds the client's other requests: pause them
    #: this long although this call gives up.
    pause_client: float | None = None


Decision = RetryIn | Renew | Done | GiveUp


def _shared_pause(status: int | None, retry_after: float | None) -> bool:
    # The server said when to come back (docs/protocol.md §7): it did not act, and the whole client
    # waits, not this call alone.
    return status == 429 or (status == 503 and retry_after is not None)


def decide(
    op: Operation,
    call: CallState,
    attempt: Attempt,
    policy: RetryPolicy,
    *,
    now: float,
    ends_at: float | None,
    budget: float,
    rng: random.Random,
) -> tuple[Decision, CallState]:
    """What to do after ``attempt`` of ``op`` failed, and the call's state for the next one.

    Args:
        op: What was sent.
        call: The call's history so far.
        attempt: A non-2xx, non-redirect answer, or a failure.
        policy: The call's retry settings.
        now: The caller's clock.
        ends_at: When the call's deadline passes (same clock), or ``None``.
        budget: Tokens left in the client's retry budget.
        rng: The source of backoff jitter.
    """
    status, failure = attempt.status, attempt.failure
    shared = op.resource and _shared_pause(status, attempt.retry_after)
    acted = call.maybe_acted
    unreachable_since = None
    if failure is not None:
        acted = acted or failure in (Failure.LOST, Failure.TIMEOUT)
        if failure is Failure.NOT_CONNECTED:
            unreachable_since = now if call.unreachable_since is None else call.unreachable_since
    elif status is not None and status >= 500 and not shared:
        acted = True  # a gateway's 5xx may hide an upstream that did the work
    state = attrs.evolve(call, maybe_acted=acted, unreachable_since=unreachable_since)

    if failure is None and status == 401 and op.resource and not call.renewed:
        return Renew(), attrs.evolve(state, renewed=True)
    if failure is None and status == 404 and op.gone_means_done and call.maybe_acted:
        return Done(), state

    if failure is not None:
        retryable = failure is Failure.NOT_CONNECTED or (
            op.idempotent and failure in (Failure.LOST, Failure.TIMEOUT)
        )
    else:
        retryable = status in RETRYABLE_STATUSES and (op.idempotent or shared)
    if not retryable:
        return GiveUp(), state

    retry_after = attempt.retry_after if failure is None else None
    if retry_after is not None and retry_after > policy.max_retry_after:
        return GiveUp(pause_client=retry_after if shared else None), state
    if call.retries >= policy.max_retries:
        return GiveUp(pause_client=retry_after if shared else None), state
    if retry_after is not None:
        delay = retry_after
    else:
        delay = backoff_delay(
            call.retries, base=policy.backoff_base, cap=policy.backoff_max, rng=rng
        )
    if (
        ends_at is not None
        and policy.deadline is not None
        and now + delay + policy.deadline * DEADLINE_SHARE > ends_at
    ):
        note = (
            "not retried: the wait before the next attempt would leave less than a tenth of "
            f"the request's {policy.deadline:g} s deadline"
        )
        return GiveUp(note, pause_client=delay if shared else None), state
    if (
        unreachable_since is not None
        and policy.max_unreachable is not None
        and now + delay - unreachable_since > policy.max_unreachable
    ):
        note = (
            f"not retried: could not connect for {now - unreachable_since:.1f} s, and waiting "
            f"{delay:.1f} s more would pass max_unreachable ({policy.max_unreachable:g} s)"
        )
        return GiveUp(note), state
    # Waits the server asked for are the shared pause's business, not the budget's.
    spend = op.resource and not shared
    if spend and budget < 1.0:
        note = "not retried: the client's retry budget is spent (many calls are failing)"
        return GiveUp(note), state
    decision = RetryIn(delay, pause_client=shared, spend_budget=spend)
    return decision, attrs.evolve(state, retries=call.retries + 1)


#: The classification, as printed in the README: (what came back, GET/edit/delete, add,
#: token exchange). ``tests/test_retry_policy.py`` checks :func:`decide` against every row.
TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("could not connect (refused, DNS, no route)", "retry", "retry", "retry"),
    ("TLS certificate or handshake failure", "raise", "raise", "raise"),
    ("connection lost after sending", "retry", "raise", "retry"),
    ("attempt timed out", "retry", "raise", "retry"),
    ("429", "pause client, retry", "pause client, retry", "wait, retry"),
    ("503 with Retry-After", "pause client, retry", "pause client, retry", "wait, retry"),
    ("500, 502, 503, 504", "retry", "raise", "retry"),
    ("401", "renew token once, resend", "renew token once, resend", "raise"),
    ("404 after an attempt that may have acted", "delete: success", "raise", "raise"),
    ("any other status", "raise", "raise", "raise"),
)


def attempts_text(attempts: int) -> str:
    """``after 1 attempt``, ``after 3 attempts``."""
    return f"after {attempts} attempt{'s' if attempts != 1 else ''}"


def describe_wait(what: str, cause: str, delay: float, retry: int, policy: RetryPolicy) -> str:
    """The log line a user sees while a call waits: what, why, for how long, how far along."""
    return f"{what}: {cause}; retrying in {delay:.1f} s (retry {retry} of {policy.max_retries})"


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


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the server is unreachable, failing or throttling, rather than
    refusing this request (or these credentials)."""
    if isinstance(exc, (ServerError, RateLimitError, TransportError)):
        return True  # an unreachable token endpoint is a TransportError too
    if isinstance(exc, AuthError):
        return exc.status is None or is_outage_status(exc.status)
    return False


def after_failed_call(exc: BaseException) -> RoundVerdict:
    """Classify an exception that ended a call after the transport's own retries."""
    if isinstance(exc, InvalidCursorError):
        return RoundVerdict.RESTART
    if is_outage(exc) or isinstance(exc, PaginationError):
        # A misbehaving listing (PaginationError) may be a server mid-deploy; callers bound it.
        return RoundVerdict.AGAIN
    # A DecodeError among the rest: the server sent a body that breaks the contract, and
    # asking again gets the same body; a refused credential or a 4xx fails the same way.
    return RoundVerdict.GIVE_UP
