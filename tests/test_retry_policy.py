"""The retry decisions as tables: no sockets, a fake clock (plain numbers), a seeded RNG."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import messages_async as ma
from messages_async._retry import (
    TABLE,
    TOKEN_EXCHANGE,
    Attempt,
    CallState,
    Decision,
    Done,
    Failure,
    GiveUp,
    Operation,
    Renew,
    RetryIn,
    RetryPolicy,
    RoundVerdict,
    after_failed_call,
    attempts_text,
    decide,
    is_outage,
)

AGAIN, RESTART, GIVE_UP = RoundVerdict.AGAIN, RoundVerdict.RESTART, RoundVerdict.GIVE_UP


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (ma.ServerError(503, "unavailable", "down"), AGAIN),
        (ma.RateLimitError(429, "rate_limited", "slow down", retry_after=120.0), AGAIN),
        (ma.TransportError("connection reset"), AGAIN),
        (ma.RequestTimeoutError("no answer in 30 s"), AGAIN),
        (ma.PaginationError("cursor repeated"), AGAIN),
        (ma.AuthError("token endpoint unreachable"), AGAIN),
        (ma.AuthError("token endpoint failing", status=503), AGAIN),
        (ma.AuthError("token endpoint throttling", status=429), AGAIN),
        (ma.TokenEndpointUnreachableError("could not reach the token endpoint"), AGAIN),
        (ma.InvalidCursorError(400, "invalid_cursor", "expired"), RESTART),
        (ma.AuthError("refused", error="invalid_client", status=401), GIVE_UP),
        (ma.DecodeError("$.items[3].id: expected an integer"), GIVE_UP),
        (ma.NotFoundError(404, "not_found", "no such chat"), GIVE_UP),
        (ma.BadRequestError(400, "invalid_request", "bad limit"), GIVE_UP),
        (ma.PermissionDeniedError(403, "forbidden", "not yours"), GIVE_UP),
        (ma.UnsafeCursorError("cursor on another origin"), GIVE_UP),
        (ValueError("a bug"), GIVE_UP),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.name,
)
def test_round_verdict(exc: BaseException, verdict: RoundVerdict) -> None:
    assert after_failed_call(exc) is verdict


# --- the per-attempt policy: decide() on a fake clock ------------------------------------------

GET = Operation("list", idempotent=True)
ADD = Operation("add", idempotent=False)
DELETE = Operation("delete", idempotent=True, gone_means_done=True)
TOKEN = TOKEN_EXCHANGE
POLICY = RetryPolicy(
    max_retries=3,
    timeout=30.0,
    backoff_base=0.5,
    backoff_max=30.0,
    max_retry_after=60.0,
    deadline=None,
    max_unreachable=20.0,
)
NOW = 1000.0


def ask(
    op: Operation,
    attempt: Attempt,
    call: CallState | None = None,
    policy: RetryPolicy = POLICY,
    *,
    now: float = NOW,
    ends_at: float | None = None,
    budget: float = 10.0,
    seed: int = 7,
) -> tuple[Decision, CallState]:
    return decide(
        op,
        call or CallState(),
        attempt,
        policy,
        now=now,
        ends_at=ends_at,
        budget=budget,
        rng=random.Random(seed),
    )


def status(code: int, retry_after: float | None = None) -> Attempt:
    return Attempt(status=code, retry_after=retry_after)


def failed(failure: Failure) -> Attempt:
    return Attempt(failure=failure)


def verdict(decision: Decision) -> str:
    """The decision as the README's table words it."""
    if isinstance(decision, RetryIn):
        return "pause client, retry" if decision.pause_client else "retry"
    if isinstance(decision, Renew):
        return "renew token once, resend"
    if isinstance(decision, Done):
        return "delete: success"
    return "raise"


# One row per line of the README's table: (outcome, first attempt's history, GET, add, token).
ROWS: list[tuple[str, Attempt, CallState]] = [
    ("could not connect (refused, DNS, no route)", failed(Failure.NOT_CONNECTED), CallState()),
    ("TLS certificate or handshake failure", failed(Failure.CERTIFICATE), CallState()),
    ("connection lost after sending", failed(Failure.LOST), CallState()),
    ("attempt timed out", failed(Failure.TIMEOUT), CallState()),
    ("429", status(429, 1.0), CallState()),
    ("503 with Retry-After", status(503, 2.0), CallState()),
    ("500, 502, 503, 504", status(502), CallState()),
    ("401", status(401), CallState()),
    ("404 after an attempt that may have acted", status(404), CallState(maybe_acted=True)),
    ("any other status", status(400), CallState()),
]


def test_the_readme_table_is_the_policy() -> None:
    assert [row[0] for row in TABLE] == [row[0] for row in ROWS]
    for (name, get, add, token), (_, attempt, call) in zip(TABLE, ROWS, strict=True):
        op_for_get = DELETE if name.startswith("404") else GET
        assert verdict(ask(op_for_get, attempt, call)[0]) == get, name
        assert verdict(ask(ADD, attempt, call)[0]) == add, name
        expected_token = token.replace("wait, retry", "retry")
        assert verdict(ask(TOKEN, attempt, call)[0]) == expected_token, name


def test_the_readme_prints_the_table() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, get, add, token in TABLE:
        assert f"| {name} | {get} | {add} | {token} |" in readme, name


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_every_5xx_is_retried_for_a_get_with_full_jitter_backoff(code: int) -> None:
    for retries in range(3):
        decision, after = ask(GET, status(code), CallState(retries=retries))
        assert isinstance(decision, RetryIn)
        assert 0.0 <= decision.delay <= min(30.0, 0.5 * 2**retries)
        assert decision.spend_budget
        assert not decision.pause_client
        assert after.retries == retries + 1
        assert after.maybe_acted  # a gateway's 5xx may hide an upstream that acted


@pytest.mark.parametrize("code", [400, 403, 404, 405, 409, 413, 422])
def test_non_retryable_statuses_raise_at_once(code: int) -> None:
    assert isinstance(ask(GET, status(code))[0], GiveUp)
    assert isinstance(ask(TOKEN, status(code))[0], GiveUp)


def test_the_same_seed_gives_the_same_backoff() -> None:
    first = ask(GET, status(500), seed=3)[0]
    again = ask(GET, status(500), seed=3)[0]
    other = ask(GET, status(500), seed=4)[0]
    assert isinstance(first, RetryIn)
    assert isinstance(again, RetryIn)
    assert isinstance(other, RetryIn)
    assert first.delay == again.delay != other.delay


def test_max_retries_bounds_the_retries_not_the_attempts() -> None:
    assert isinstance(ask(GET, status(503), CallState(retries=2))[0], RetryIn)
    assert isinstance(ask(GET, status(503), CallState(retries=3))[0], GiveUp)
    no_retries = POLICY.replace(max_retries=0)
    assert isinstance(ask(GET, status(503), policy=no_retries)[0], GiveUp)


def test_retry_after_is_the_wait_and_pauses_the_whole_client() -> None:
    decision, _ = ask(GET, status(429, 2.5))
    assert decision == RetryIn(2.5, pause_client=True, spend_budget=False)
    decision, after = ask(ADD, status(503, 4.0))
    assert decision == RetryIn(4.0, pause_client=True, spend_budget=False)
    assert not after.maybe_acted  # the server said when to come back: it did not act


def test_a_429_without_retry_after_pauses_for_a_backoff() -> None:
    decision, _ = ask(GET, status(429))
    assert isinstance(decision, RetryIn)
    assert decision.pause_client
    assert 0.0 <= decision.delay <= 0.5


def test_a_retry_after_beyond_the_cap_raises_but_still_pauses_the_others() -> None:
    assert ask(GET, status(429, 120.0))[0] == GiveUp(pause_client=120.0)
    # The last retry spent: this call gives up, the server's wait still binds the client.
    assert ask(GET, status(429, 3.0), CallState(retries=3))[0] == GiveUp(pause_client=3.0)
    # The token endpoint's Retry-After is its own: it does not pause resource requests.
    assert ask(TOKEN, status(429, 120.0))[0] == GiveUp()


def test_the_token_exchange_waits_on_its_own() -> None:
    decision, _ = ask(TOKEN, status(429, 2.0))
    assert decision == RetryIn(2.0, pause_client=False, spend_budget=False)
    decision, _ = ask(TOKEN, failed(Failure.LOST), budget=0.0)
    assert isinstance(decision, RetryIn)
    assert not decision.spend_budget


def test_add_is_retried_only_where_the_server_cannot_have_acted() -> None:
    assert isinstance(ask(ADD, failed(Failure.NOT_CONNECTED))[0], RetryIn)
    assert isinstance(ask(ADD, status(429, 1.0))[0], RetryIn)
    assert isinstance(ask(ADD, status(503, 1.0))[0], RetryIn)
    for attempt in (failed(Failure.LOST), failed(Failure.TIMEOUT), status(500), status(503)):
        decision, after = ask(ADD, attempt)
        assert decision == GiveUp(), attempt
        assert after.maybe_acted, attempt


def test_a_401_renews_once_then_raises() -> None:
    decision, after = ask(GET, status(401))
    assert isinstance(decision, Renew)
    assert after.renewed
    assert after.retries == 0
    assert isinstance(ask(GET, status(401), after)[0], GiveUp)


def test_a_delete_that_finds_nothing_after_a_lost_answer_succeeds() -> None:
    _, after = ask(DELETE, failed(Failure.LOST))
    assert after.maybe_acted
    assert isinstance(ask(DELETE, status(404), after)[0], Done)
    assert isinstance(ask(DELETE, status(404))[0], GiveUp)  # nothing sent before: a real 404
    _, after = ask(DELETE, status(502))
    assert isinstance(ask(DELETE, status(404), after)[0], Done)  # behind a gateway error
    assert isinstance(ask(GET, status(404), after)[0], GiveUp)


def test_a_wait_is_begun_only_with_a_tenth_of_the_deadline_left_after_it() -> None:
    policy = POLICY.replace(deadline=10.0)
    decision, _ = ask(GET, status(503, 5.0), policy=policy, ends_at=NOW + 6.1)
    assert isinstance(decision, RetryIn)
    decision, _ = ask(GET, status(503, 5.0), policy=policy, ends_at=NOW + 5.9)
    assert isinstance(decision, GiveUp)
    assert "tenth of the request's 10 s deadline" in decision.note
    assert decision.pause_client == 5.0  # the others still wait for the server


def test_the_retry_budget_holds_back_retries_of_failures_only() -> None:
    decision, _ = ask(GET, status(500), budget=0.5)
    assert isinstance(decision, GiveUp)
    assert "retry budget" in decision.note
    decision, _ = ask(GET, failed(Failure.NOT_CONNECTED), budget=0.5)
    assert isinstance(decision, GiveUp)
    assert isinstance(ask(GET, status(429, 1.0), budget=0.0)[0], RetryIn)


def test_an_unreachable_endpoint_is_given_up_on_after_max_unreachable() -> None:
    policy = POLICY.replace(max_retries=100, backoff_max=4.0)
    call, now, waited = CallState(), NOW, 0.0
    while True:
        decision, call = ask(GET, failed(Failure.NOT_CONNECTED), call, policy, now=now)
        if not isinstance(decision, RetryIn):
            break
        now += decision.delay + 0.01  # the wait, then a refused connection
        waited += decision.delay
    assert isinstance(decision, GiveUp)
    assert "could not connect for" in decision.note
    assert "would pass max_unreachable (20 s)" in decision.note
    assert 16.0 <= now - NOW <= 20.0
    assert call.unreachable_since == NOW
    forever = policy.replace(max_unreachable=None)
    assert isinstance(ask(GET, failed(Failure.NOT_CONNECTED), call, forever, now=now)[0], RetryIn)


def test_an_answer_ends_a_run_of_failures_to_connect() -> None:
    _, call = ask(GET, failed(Failure.NOT_CONNECTED))
    assert call.unreachable_since == NOW
    _, call = ask(GET, status(503), call, now=NOW + 5)
    assert call.unreachable_since is None


def test_a_certificate_failure_is_never_retried() -> None:
    for op in (GET, ADD, TOKEN):
        assert ask(op, failed(Failure.CERTIFICATE))[0] == GiveUp()
    assert ask(GET, failed(Failure.UNSENDABLE))[0] == GiveUp()


def test_attempts_text_counts_in_english() -> None:
    assert attempts_text(1) == "after 1 attempt"
    assert attempts_text(3) == "after 3 attempts"


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (ma.TokenEndpointUnreachableError("no route"), True),
        (ma.AuthError("token endpoint failing", status=502), True),
        (ma.AuthError("token endpoint throttling", status=429), True),
        (ma.AuthError("refused", error="invalid_client", status=401), False),
        (ma.AuthError("no token endpoint here", status=404), False),
        (ma.ServerError(500, "internal", "boom"), True),
        (ma.ScopeError("no scope", required="messages_write", granted=None), False),
        (ma.DecodeError("$.items: expected a list"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_an_outage_is_told_from_a_refusal(exc: BaseException, outage: bool) -> None:
    assert is_outage(exc) is outage
