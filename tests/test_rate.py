"""The rate controller and the server limiter models on a fake clock: no sockets, no asyncio.

The controller's reactions are tables of events in and answers out; the scenarios at the end
run it against the emulator's own limiter models in the simulation of ``benchmarks/sim.py``.
One live test checks the emulator's wiring of those models (a limit per credential).
"""

from __future__ import annotations

import pytest
from helpers import client_for

from benchmarks import sim
from messages_async._rate import Outcome, RateController, Ticket
from messages_async.testing import MessagesServer
from messages_async.testing._limits import (
    ConcurrencyLimit,
    FixedWindow,
    FromFirstRequest,
    Schedule,
    SlidingWindow,
    Storm,
    TokenBucket,
    parse_schedule,
    parse_storm,
)

# -- the server models --------------------------------------------------------------------------


def test_a_limit_from_the_first_request_runs_its_clock_from_then() -> None:
    # A storm of 2 from 1 s on, its first request at 100 s on the server's clock.
    limit = FromFirstRequest(Storm(2, start=1.0))
    assert [limit.admit(t) for t in (100.0, 100.5, 101.0, 101.1, 101.2)] == [0, 0, 1.0, 1.0, 0]


@pytest.mark.parametrize(
    ("spec", "steps"),
    [("0:200,20:100,40:200", [(0, 200), (20, 100), (40, 200)]), ("0:5", [(0, 5)])],
)
def test_a_rate_schedule_is_read_from_its_spec(spec: str, steps: list[tuple[float, float]]) -> None:
    assert parse_schedule(spec) == steps


@pytest.mark.parametrize("spec", ["", "0", "0:", "a:1", "0:0", "0:-1", "-1:5", "0:1,x"])
def test_a_bad_rate_schedule_says_how_to_write_one(spec: str) -> None:
    with pytest.raises(ValueError, match="SECONDS:RATE separated by commas"):
        parse_schedule(spec)


def test_a_storm_is_read_from_its_spec() -> None:
    assert parse_storm("10@5") == (10, 5.0)
    for bad in ("10", "@5", "0@5", "x@1", "3@-1"):
        with pytest.raises(ValueError, match="COUNT@SECONDS"):
            parse_storm(bad)


@pytest.mark.parametrize(
    ("limit", "times", "expected"),
    [
        # A bucket of 2 at 10/s: two at once, then one every 0.1 s.
        (TokenBucket(10, 2), [0, 0, 0, 0.1, 0.15, 0.2], [0, 0, 0.1, 0, 0.05, 0]),
        # A fixed window of 2 a second: the third waits for the window to turn over.
        (FixedWindow(2), [0.2, 0.5, 0.9, 1.0, 1.1, 1.2], [0, 0, 0.1, 0, 0, 0.8]),
        # A sliding window of 2 a second: the third waits for the first to age out.
        (SlidingWindow(2), [0.2, 0.5, 0.9, 1.2, 1.3, 1.6], [0, 0, 0.3, 0, 0.2, 0]),
        # A storm of 2 429s from 1 s on, then no limit.
        (Storm(2, start=1.0), [0.5, 1.0, 1.1, 1.2], [0, 1.0, 1.0, 0]),
    ],
)
def test_limit_models_answer_wait_times(
    limit: sim.Limit, times: list[float], expected: list[float]
) -> None:
    got = [limit.admit(t) for t in times]
    assert got == pytest.approx(expected)


def test_a_concurrency_limit_counts_requests_until_they_finish() -> None:
    limit = ConcurrencyLimit(2, retry_after=3.0)
    assert [limit.admit(0.0) for _ in range(3)] == [0.0, 0.0, 3.0]
    limit.finish(0.1)
    assert limit.admit(0.1) == 0.0


def test_a_schedule_changes_the_rate_keeping_the_tokens() -> None:
    limit = Schedule([(0.0, 10.0), (1.0, 100.0)], burst_seconds=0.1)
    assert limit.admit(0.0) == 0.0  # burst of 1 at 10/s
    assert limit.admit(0.0) == pytest.approx(0.1)
    assert [limit.admit(2.0) for _ in range(10)] == [0.0] * 10  # burst of 10 at 100/s
    assert limit.rate_at(0.5) == 10.0
    assert limit.rate_at(1.5) == 100.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenBucket(0, 1),
        lambda: TokenBucket(1, float("inf")),
        lambda: FixedWindow(0),
        lambda: Schedule([(1.0, 5.0)], burst_seconds=0.1),
        lambda: Schedule([(0.0, 5.0), (0.0, 6.0)], burst_seconds=0.1),
    ],
)
def test_models_refuse_bad_arguments(make: object) -> None:
    with pytest.raises(ValueError, match="must"):
        make()  # type: ignore[operator]


# -- the controller's reactions -----------------------------------------------------------------


def _burst(c: RateController, n: int, now: float) -> list[Ticket]:
    tickets = []
    for _ in range(n):
        assert c.next_send(now) == now
        tickets.append(c.sent(now))
    return tickets


def test_slow_start_widens_the_window_by_one_per_success() -> None:
    c = RateController(32, now=0.0)
    tickets = _burst(c, 8, 0.0)
    assert c.next_send(0.0) is None  # the initial window is full
    for t in tickets:
        c.succeeded(t, 0.02)
    assert c.window == 16
    assert c.pace is None
    assert c.next_send(0.02) == 0.02


def test_the_first_429_paces_at_a_floor_and_a_429_with_nothing_let_in_changes_nothing() -> None:
    c = RateController(32, now=0.0)
    tickets = _burst(c, 8, 0.0)
    # Two got in, the third was refused: a burst of about 2, a rate of at least 2 in 1 s.
    c.throttled(tickets[2], 0.001)
    c.pause(0.001, 1.0)
    assert c.pace == pytest.approx(2.0, rel=0.01)
    assert c.next_send(0.5) == pytest.approx(1.001)  # the pause binds
    for t in tickets[3:]:
        c.throttled(t, 0.002)  # echoes of the same burst: ignored
    assert c.pace == pytest.approx(2.0, rel=0.01)
    paced = c.pace
    # After the pause, a 429 with nothing let in says nothing about the rate.
    t = c.sent(1.001)
    c.throttled(t, 1.002)
    assert c.pace == pytest.approx(paced, rel=0.01)


def test_the_pace_ramps_tenfold_a_second_while_the_limit_is_unknown() -> None:
    c = RateController(32, now=0.0)
    tickets = _burst(c, 3, 0.0)
    c.throttled(tickets[2], 0.0)
    c.pause(0.0, 1.0)
    start = c.pace
    assert start is not None
    c.next_send(1.5)
    assert c.pace == pytest.approx(start * 10**0.5, rel=0.01)


def _drive(c: RateController, limit: sim.Limit, start: float, end: float) -> float:
    """Send as fast as the controller allows, answers at once; the time the run ended."""
    now = start
    while now < end:
        at = c.next_send(now)
        assert at is not None
        now = at
        ticket = c.sent(now)
        wait = limit.admit(now)
        if wait > 0:
            c.throttled(ticket, now)
            c.pause(now, 1.0)
        else:
            c.succeeded(ticket, now + 0.001)
    return now


@pytest.mark.parametrize(("rate", "burst"), [(20.0, 2.0), (100.0, 10.0), (400.0, 40.0)])
def test_two_429s_read_a_token_buckets_rate(rate: float, burst: float) -> None:
    c = RateController(32, now=0.0)
    bucket = TokenBucket(rate, burst)
    _drive(c, bucket, 0.0, 10.0)
    assert c.burst == pytest.approx(burst, rel=0.1)
    assert c.limit == pytest.approx(rate, rel=0.03)
    assert c.pace is not None
    assert c.pace <= rate


def test_a_limit_that_dropped_is_probed_for_soon_and_found_again() -> None:
    c = RateController(32, now=0.0)
    limit = Schedule([(0.0, 200.0), (10.0, 100.0), (20.0, 200.0)], burst_seconds=0.1)
    _drive(c, limit, 0.0, 9.9)
    assert c.limit == pytest.approx(200, rel=0.05)
    _drive(c, limit, 9.9, 19.9)
    assert c.limit == pytest.approx(100, rel=0.05)
    _drive(c, limit, 19.9, 26.0)
    assert c.pace is not None
    assert c.pace >= 0.9 * 200


def test_a_pace_far_above_what_the_window_uses_is_dropped() -> None:
    c = RateController(4, now=0.0)
    tickets = _burst(c, 4, 0.0)
    c.throttled(tickets[3], 0.0)
    for t in tickets[:3]:
        c.succeeded(t, 0.01)  # 10 ms: the window of 4 allows about 400/s
    c.pause(0.0, 1.0)
    assert c.pace is not None
    c.next_send(5.0)  # ramped for 4 s without a 429: far above 4 × 400/s
    assert c.pace is None


# -- whole scenarios in the simulation ----------------------------------------------------------


def test_simulated_bucket_holds_the_ceiling_with_few_429s() -> None:
    scenario = sim.Scenario(
        "bucket", lambda: TokenBucket(100, 10), 0.02, 32, lambda _t: 100.0, duration=60.0
    )
    result = sim.run(scenario, "controller")
    assert result.ratio >= 0.9
    assert result.share_429 < 0.03
    assert result.successes + result.throttled == result.sent or result.sent > result.successes


def test_simulated_storm_recovers_within_a_second_of_the_last_pause() -> None:
    scenario = sim.storm(5, 0.02, 32)
    result = sim.run(scenario, "controller")
    end = result.pauses[-1][1]
    took = result.first_reaching(0.9, end, window=0.5)
    assert took is not None
    assert took <= 1.0


# -- the emulator's wiring ------------------------------------------------------------------------


async def test_the_emulator_limits_each_credential_on_its_own() -> None:
    async with MessagesServer(chats=1, messages_per_chat=5, rate_limit=1.0, burst=2) as server:
        server.register_client("second", "second-secret")
        async with (
            client_for(server, max_retries=0) as first,
            client_for(server, client_id="second", client_secret="second-secret") as second,
        ):
            for _ in range(2):
                await first.messages.chats()
            # The first credential's bucket is empty; the second's is full.
            await second.messages.chats()
            await second.messages.chats()
        statuses = [r.status for r in server.resource_requests()]
        assert statuses == [200, 200, 200, 200]
        assert Outcome.OK.value == "ok"


async def test_a_single_call_goes_ahead_of_the_bulk_pages_queued_before_it() -> None:
    # One slot: every bulk page of the fan-out waits in line for it. A single call made
    # while they wait is the next request the emulator sees, not the last.
    async with MessagesServer(chats=6, messages_per_chat=30, latency=0.05) as server:
        async with client_for(server, max_concurrency=1) as client:
            walk = client.messages.iter_many(server.chat_ids(), concurrency=6, limit=5)
            seen = 0
            async for _ in walk:
                seen += 1
                if seen == 10:  # pages of every chat are queued by now
                    before = len(server.resource_requests())
                    await client.messages.chats()
                    break
            await walk.aclose()
        arrived = [r.path for r in server.resource_requests()[before:]]
    # At most the page already in flight (and the one granted with it) arrives first.
    assert "messages/chats/" in arrived[:2], arrived


def test_a_concurrency_limit_is_held_as_a_window_not_a_pace() -> None:
    c = RateController(32, now=0.0)
    limit = ConcurrencyLimit(4)
    now = 0.0
    # Requests answered after 10 ms; the server refuses a fifth at once.
    pending: list[tuple[float, object]] = []
    throttled_counts = []
    while now < 10.0:
        pending.sort(key=lambda p: p[0])
        at = c.next_send(now)
        if at is None or (pending and pending[0][0] <= at):
            done_at, ticket = pending.pop(0)
            now = max(now, done_at)
            limit.finish(now)
            c.succeeded(ticket, now)  # type: ignore[arg-type]
            continue
        now = at
        ticket = c.sent(now)
        if limit.admit(now) > 0:
            throttled_counts.append(ticket.in_flight)
            c.throttled(ticket, now)
            c.pause(now, 1.0)
        else:
            pending.append((now + 0.01, ticket))
    assert c.cap == 4
    assert c.pace is None
    assert c.window == 4
    assert len(throttled_counts) < 12  # two stretches' worth, then none


def test_a_429_within_the_cap_says_the_rate_is_limited_after_all() -> None:
    c = RateController(32, now=0.0)

    def send(n: int, now: float) -> tuple[list[Ticket], float]:
        tickets = []
        for _ in range(n):
            at = c.next_send(now)
            assert at is not None
            now = at
            tickets.append(c.sent(now))
        return tickets, now

    now = 0.0
    for _ in range(2):
        tickets, now = send(3, now)
        c.throttled(tickets[2], now)  # two let in, the third refused: twice at 3 in flight
        c.pause(now, 1.0)
        for t in tickets[:2]:
            c.succeeded(t, now + 0.01)
        now += 1.0
    assert c.cap == 2
    assert c.pace is None
    tickets, now = send(2, now)
    c.throttled(tickets[1], now)  # refused at 2 in flight: within the cap
    assert c.cap is None
    assert c.pace is not None


@pytest.mark.parametrize(("since", "cap"), [(10.0, None), (70.0, 4)])
def test_a_count_let_in_long_ago_does_not_rule_out_a_lower_cap(
    since: float, cap: int | None
) -> None:
    # 16 at once were let in at 1 s. Then twice in a row the fifth in flight is refused:
    # a minute (probe_after) later that is a cap of 4; ten seconds later it may still be a
    # bucket's burst after a pause.
    c = RateController(32, now=0.0)
    for t in _burst(c, 8, 0.0):
        c.succeeded(t, 0.5)
    tickets = _burst(c, 16, 1.0)
    for t in tickets:
        c.succeeded(t, 1.5)
    now = 1.0 + since
    for _ in range(2):
        tickets = []
        for _ in range(5):  # as fast as the controller lets them go, paced after the first 429
            at = c.next_send(now)
            assert at is not None
            now = at
            tickets.append(c.sent(now))
        c.throttled(tickets[4], now)
        c.pause(now, 1.0)
        for t in tickets[:4]:
            c.succeeded(t, now + 0.2)
        now += 1.5
    assert c.cap == cap


def test_simulated_cap_that_drops_is_found_and_held() -> None:
    result = sim.run(sim.cap_drop(), "controller")
    end = result.scenario.duration
    assert result.rate_between(end - 60.0, end) >= 0.85 * result.scenario.ideal(end)


def test_catching_up_a_late_slot_never_sends_more_than_the_burst_at_once() -> None:
    c = RateController(32, now=0.0)
    bucket = TokenBucket(400.0, 1.0)
    _drive(c, bucket, 0.0, 10.0)
    assert c.burst == 1.0
    pace = c.pace
    assert pace is not None
    # The caller wakes 5 ms late: with a burst of one, the next two slots are not sent at once.
    now = 10.0 + 0.005
    first = c.next_send(now)
    assert first is not None
    c.sent(max(first, now))
    second = c.next_send(now)
    assert second is not None
    assert second - max(first, now) >= 1.0 / pace - 1e-9


def test_only_a_limit_held_for_a_while_is_recalled_after_a_drop() -> None:
    c = RateController(32, now=0.0)
    # 200 req/s held for 10 s, then 100: the old limit is recalled within seconds.
    limit = Schedule([(0.0, 200.0), (10.0, 100.0)], burst_seconds=0.1)
    _drive(c, limit, 0.0, 12.5)
    assert c.limit == pytest.approx(100, rel=0.05)
    assert c._recall is not None
    assert c._recall[0] == pytest.approx(200, rel=0.05)
    # A limit read too high off a short stretch and refused at once is not gone back to.
    c = RateController(32, now=0.0)
    _drive(c, TokenBucket(5.0, 1.0), 0.0, 30.0)
    assert c._recall is None


def test_a_client_told_the_rate_paces_at_it_from_the_first_request_and_never_above() -> None:
    c = RateController(32, now=0.0, max_rate=50.0)
    assert c.pace == 50.0
    sent = []
    now = 0.0
    for _ in range(100):
        at = c.next_send(now)
        assert at is not None
        now = at
        sent.append(now)
        c.succeeded(c.sent(now), now + 0.001)
    # 100 requests at 50/s: two seconds, give or take the catch-up slack of one slot.
    assert sent[-1] - sent[0] == pytest.approx(99 / 50.0, abs=0.03)
    c.next_send(120.0)  # long past the first probe: probing never goes above the told rate
    assert c.pace is not None
    assert c.pace <= 50.0


def test_a_429_still_slows_a_client_told_a_rate_too_high() -> None:
    c = RateController(32, now=0.0, max_rate=100.0)
    _drive(c, TokenBucket(40.0, 4.0), 0.0, 10.0)
    assert c.pace is not None
    assert c.pace <= 40.0


async def test_told_the_rate_the_server_sees_no_429_and_no_burst() -> None:
    async with MessagesServer(chats=4, messages_per_chat=300, rate_limit=50, burst=5) as server:
        async with client_for(server, rate_limit=50, max_concurrency=16) as client:
            ids = server.chat_ids()
            async for _ in client.messages.iter_many(ids, concurrency=4, limit=10):
                pass
        listed = [r for r in server.resource_requests() if r.path == "messages/"]
        statuses = [r.status for r in listed]
        assert len(listed) >= 100
        assert 429 not in statuses
        times = [r.started for r in listed]
        # 50 per second: no second of the run saw more than the rate and the burst.
        for i, start in enumerate(times):
            within = sum(1 for t in times[i:] if t - start < 1.0)
            assert within <= 50 + 5


@pytest.mark.parametrize(("value", "error"), [("40", TypeError), (0, ValueError), (-1, ValueError)])
async def test_client_checks_rate_limit_before_sending(value: object, error: type) -> None:
    async with MessagesServer(chats=1, messages_per_chat=1) as server:
        with pytest.raises(error, match="rate_limit"):
            async with client_for(server, rate_limit=value):
                pass
        assert server.resource_requests() == []
