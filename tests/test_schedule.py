"""The watch's scheduler (``_schedule.py``) driven event by event on a made-up clock.

No sockets and no event loop: every test feeds :class:`WatchSchedule` the events a watch would
see, at the times it would see them, and checks the actions it answers. Where a rule is about
many polls over time (backoff, the cadence of quiet chats, their spread over the cap) a small
simulator plays a server whose polls answer at once, over minutes of simulated time.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections import Counter
from collections.abc import Callable

import pytest

import messages_async as ma
from messages_async._schedule import (
    END,
    GROWTH,
    MAX_ERROR_BACKOFF,
    MAX_MISBEHAVING_ROUNDS,
    ListChats,
    PollChat,
    WatchSchedule,
)


def schedule(
    chat_ids: list[int] | None,
    *,
    since: dict[int, int] | None = None,
    interval: float = 1.0,
    max_interval: float = 10.0,
    rediscover: float | None = None,
    seed: int = 1,
) -> WatchSchedule:
    return WatchSchedule(
        chat_ids,
        since=since or {},
        interval=interval,
        max_interval=max_interval,
        rediscover=max_interval if rediscover is None else rediscover,
        rng=random.Random(seed),
        now=0.0,
    )


def polls_due(s: WatchSchedule, now: float) -> list[PollChat]:
    """Every poll due at ``now`` (a listing due too is started and left running)."""
    out = []
    while isinstance(action := s.next_action(now), (PollChat, ListChats)):
        if isinstance(action, PollChat):
            out.append(action)
    assert action is None or isinstance(action, float), action
    return out


def read_first(s: WatchSchedule, now: float, poll: PollChat, newest: int) -> None:
    """A first read, as the watch makes it: the newest id, then the poll is done (no news)."""
    s.first_read(now, poll, newest)
    s.poll_done(now, poll, got_new=False)


def msgs(*ids: int) -> list[ma.Message]:
    return [ma.Message(id=i, uid=7, message=f"m{i}") for i in ids]


def outage() -> ma.ServerError:
    return ma.ServerError(503, "unavailable", "down")


# --- where a chat starts -------------------------------------------------------------------------


def test_each_chat_starts_at_its_newest_id_in_its_first_poll() -> None:
    s = schedule([1, 2])
    a, b = polls_due(s, 0.0)
    assert (a.chat_id, b.chat_id) == (1, 2)
    assert s.watermark(a) is None
    assert s.watermark(b) is None
    s.first_read(0.1, a, 10)
    assert not s.ready
    s.first_read(0.1, b, 25)
    assert s.ready
    assert s.public == {1: 10, 2: 25}
    assert s.start_max == 25


def test_a_first_poll_that_fails_starts_the_chat_at_the_start_mark_known_then() -> None:
    s = schedule([1, 2])
    a, b = polls_due(s, 0.0)
    s.first_read(0.1, a, 40)
    failed = s.poll_failed(0.1, b, outage())
    assert not failed.raise_it
    assert failed.delay > 0
    # b begins at 40, not at "its newest when a poll first succeeds": what is posted in b
    # during the outage is above 40 (ids grow server-wide) and will be yielded.
    assert s.fetched[2] == 40
    assert s.ready
    (retry,) = polls_due(s, 0.1 + failed.delay)
    assert s.watermark(retry) == 40  # the retry reads from the mark, not a first read


def test_a_first_poll_failing_before_any_id_is_seen_waits_for_the_round() -> None:
    s = schedule([1, 2])
    a, b = polls_due(s, 0.0)
    s.poll_failed(0.1, a, outage())
    assert 1 not in s.fetched
    assert not s.ready
    s.first_read(0.2, b, 30)
    assert s.fetched[1] == 30
    assert s.ready


def test_when_the_round_sees_no_id_a_failed_chat_starts_at_its_first_success() -> None:
    s = schedule([1, 2])
    a, b = polls_due(s, 0.0)
    failed = s.poll_failed(0.1, a, outage())
    s.first_read(0.1, b, 0)  # empty chat
    assert not s.ready
    (retry,) = polls_due(s, 0.1 + failed.delay)
    assert s.watermark(retry) is None  # still a first read
    s.first_read(2.0, retry, 17)
    assert s.ready
    assert s.fetched[1] == 17


def test_watching_all_a_chat_missing_from_since_starts_after_its_largest_id() -> None:
    s = schedule(None, since={1: 50, 2: 80})
    assert s.next_action(0.0) == ListChats(first=True)
    s.chats_listed(0.1, [1, 2, 3])
    assert s.fetched == {1: 50, 2: 80, 3: 80}
    assert s.ready  # nothing to wait for: every chat has its starting point
    assert {p.chat_id for p in polls_due(s, 0.1)} == {1, 2, 3}


def test_with_chat_ids_a_chat_missing_from_since_starts_from_now() -> None:
    s = schedule([1, 2], since={1: 50})
    polls = {p.chat_id: p for p in polls_due(s, 0.0)}
    assert s.watermark(polls[1]) == 50
    assert s.watermark(polls[2]) is None
    # Its first poll fails: it must not start at 1's old saved mark.
    failed = s.poll_failed(0.1, polls[2], outage())
    assert 2 not in s.fetched
    assert not s.ready
    (retry,) = polls_due(s, 0.1 + failed.delay)
    s.first_read(1.0, retry, 99)
    assert s.fetched[2] == 99
    assert s.ready


def test_fresh_chats_are_polled_before_resumed_ones() -> None:
    s = schedule([1, 2, 3], since={1: 5, 3: 6})
    assert [p.chat_id for p in polls_due(s, 0.0)] == [2, 1, 3]


def test_a_chat_listed_later_starts_at_the_start_mark() -> None:
    s = schedule(None, rediscover=5.0)
    s.next_action(0.0)
    s.chats_listed(0.0, [1])
    (a,) = polls_due(s, 0.0)
    s.first_read(0.1, a, 70)
    assert s.next_action(4.9) == pytest.approx(5.1)  # listed again rediscover after ready
    assert s.next_action(5.2) == ListChats(first=False)
    changes = s.chats_listed(5.2, [1, 9])
    assert changes.added == [9]
    assert changes.dropped == []
    assert s.fetched[9] == 70  # everything posted in 9 since the start is yielded


def test_with_no_message_at_the_start_a_new_chat_is_read_from_its_first() -> None:
    s = schedule(None)
    s.next_action(0.0)
    s.chats_listed(0.0, [1])
    (a,) = polls_due(s, 0.0)
    s.first_read(0.1, a, 0)
    s.chats_listed(20.0, [1, 2])
    assert s.fetched[2] == 0


def test_a_chat_dropped_and_listed_again_goes_on_from_its_watermark() -> None:
    s = schedule(None)
    s.next_action(0.0)
    s.chats_listed(0.0, [1, 2])
    a, b = polls_due(s, 0.0)
    read_first(s, 0.1, a, 10)
    read_first(s, 0.1, b, 20)
    (poll,) = [p for p in polls_due(s, 20.0) if p.chat_id == 1]
    assert s.fetched_batch(poll, msgs(11, 12)) == msgs(11, 12)
    assert s.poll_failed(20.5, poll, ma.NotFoundError(404, "not_found", "gone")).dropped
    assert 1 not in s.chats
    assert s.fetched[1] == 12
    # A late batch of the old stint changes nothing.
    assert s.fetched_batch(poll, msgs(13)) == []
    changes = s.chats_listed(30.0, [1, 2])
    assert changes.added == [1]
    (again,) = [p for p in polls_due(s, 30.0) if p.chat_id == 1]
    assert again.stint != poll.stint
    assert s.watermark(again) == 12


def test_a_chat_present_at_the_start_but_never_read_is_not_new() -> None:
    s = schedule(None)
    s.next_action(0.0)
    s.chats_listed(0.0, [1])
    (a,) = polls_due(s, 0.0)
    s.poll_failed(0.1, a, ma.NotFoundError(404, "not_found", "gone"))
    assert s.ready
    assert s.chats == {}
    s.chats_listed(20.0, [1])
    # No id was seen anywhere: 0 would replay its whole history, which predates the watch.
    (again,) = polls_due(s, 20.0)
    assert s.watermark(again) is None


def test_the_consumer_watermark_moves_only_when_a_message_is_handed_over() -> None:
    s = schedule([1])
    (a,) = polls_due(s, 0.0)
    read_first(s, 0.0, a, 5)
    (poll,) = polls_due(s, 5.0)
    assert s.fetched_batch(poll, msgs(3, 5, 6, 7)) == msgs(6, 7)  # at or below 5: not new
    assert s.fetched[1] == 7
    assert s.public[1] == 5
    s.delivered(1, 6)
    assert s.public[1] == 6


def test_an_explicit_watch_with_every_chat_gone_ends() -> None:
    s = schedule([1, 2])
    a, b = polls_due(s, 0.0)
    s.poll_failed(0.1, a, ma.NotFoundError(404, "not_found", "gone"))
    assert s.next_action(0.1) is None  # b's poll is still running
    s.poll_failed(0.2, b, ma.PermissionDeniedError(403, "forbidden", "no"))
    assert s.next_action(0.2) is END
    assert s.next_action(0.3) is None


# --- what a failure means ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ma.ServerError(500, None, "boom"), "again"),
        (ma.RateLimitError(429, None, "slow down", retry_after=30), "again"),
        (ma.TransportError("reset"), "again"),
        (ma.InvalidCursorError(400, "invalid_cursor", "expired"), "again"),
        (ma.PaginationError("went backwards"), "again"),  # a few times: see below
        (ma.AuthError("token endpoint down", status=503), "again"),
        (ma.AuthError("revoked", status=401), "raise"),
        (ma.DecodeError("the server's message page does not fit the API contract"), "raise"),
        (ma.ScopeError("no", required="messages_read", granted=frozenset()), "raise"),
        (ma.ClientClosedError("closed"), "raise"),
        (ma.NotFoundError(404, "not_found", "gone"), "drop"),
        (ma.PermissionDeniedError(403, "forbidden", "no"), "drop"),
        (RuntimeError("a bug"), "raise"),
    ],
)
def test_failed_poll_table(error: Exception, outcome: str) -> None:
    s = schedule([1])
    (a,) = polls_due(s, 0.0)
    failed = s.poll_failed(0.0, a, error)
    got = "raise" if failed.raise_it else "drop" if failed.dropped else "again"
    assert got == outcome
    if outcome == "again":
        # Polled again, once, after the backoff: never at once, never twice.
        assert polls_due(s, failed.delay - 1e-9) == []
        assert len(polls_due(s, failed.delay)) == 1
    elif outcome == "drop":
        assert s.chats == {}
        assert s.next_action(1e6) is END
    else:
        assert s.next_action(1e6) is None


def test_backoff_doubles_to_its_cap_honours_retry_after_and_resets_on_success() -> None:
    interval, cap = 1.0, 10.0
    s = schedule([1], interval=interval, max_interval=cap)
    (poll,) = polls_due(s, 0.0)
    read_first(s, 0.0, poll, 5)
    now = 0.0
    (poll,) = polls_due(s, now := now + 100)
    delays = []
    for n in range(1, 12):
        failed = s.poll_failed(now, poll, outage())
        assert failed.count == n
        step = min(max(cap, MAX_ERROR_BACKOFF), interval * 2.0**n)
        assert step * 0.5 <= failed.delay <= step
        delays.append(failed.delay)
        (poll,) = polls_due(s, now := now + failed.delay)
    assert max(delays) <= MAX_ERROR_BACKOFF  # a chat down for good: a poll a minute at most
    limited = s.poll_failed(now, poll, ma.RateLimitError(429, None, "x", retry_after=300))
    assert limited.delay == 300
    (poll,) = polls_due(s, now := now + 300)
    s.poll_done(now, poll, got_new=True)
    (poll,) = polls_due(s, now := now + 1.1)
    assert s.poll_failed(now, poll, outage()).count == 1  # the count starts again


def test_a_misbehaving_listing_is_tried_a_few_times_then_raised() -> None:
    s = schedule([1])
    (poll,) = polls_due(s, 0.0)
    read_first(s, 0.0, poll, 5)
    now = 100.0
    for round_ in range(2):  # a success in between starts the count again
        for _ in range(MAX_MISBEHAVING_ROUNDS - 1):
            (poll,) = polls_due(s, now)
            failed = s.poll_failed(now, poll, ma.PaginationError("went backwards"))
            assert not failed.raise_it
            # An outage in between does not end the count, nor does it count.
            (poll,) = polls_due(s, now := now + failed.delay)
            failed = s.poll_failed(now, poll, outage())
            now += failed.delay
        if round_ == 0:
            (poll,) = polls_due(s, now)
            s.poll_done(now, poll, got_new=False)
            now += 100
    (poll,) = polls_due(s, now)
    assert s.poll_failed(now, poll, ma.PaginationError("went backwards")).raise_it


def test_listing_the_chats_first_is_retried_and_a_later_failure_keeps_the_list() -> None:
    s = schedule(None, rediscover=5.0)
    assert s.next_action(0.0) == ListChats(first=True)
    assert s.next_action(0.0) is None  # one listing at a time
    failed = s.listing_failed(0.0, outage())
    assert not failed.raise_it
    assert failed.count == 1
    assert s.next_action(failed.delay) == ListChats(first=True)
    s.chats_listed(failed.delay, [1])
    (a,) = polls_due(s, failed.delay)
    s.first_read(2.0, a, 3)
    assert s.next_action(6.9) != ListChats(first=False)
    assert s.next_action(7.0) == ListChats(first=False)
    kept = s.listing_failed(7.0, ma.TransportError("reset"))
    assert not kept.raise_it
    assert list(s.chats) == [1]
    assert s.next_action(12.0) == ListChats(first=False)
    assert s.listing_failed(12.0, ma.AuthError("revoked", status=401)).raise_it


def test_the_chats_are_listed_again_only_once_the_watch_is_ready() -> None:
    s = schedule(None, rediscover=1.0)
    s.next_action(0.0)
    s.chats_listed(0.0, [1])
    (a,) = polls_due(s, 0.0)
    # The first poll takes long: no listing meanwhile, whatever rediscover says.
    assert s.next_action(5.0) is None
    s.first_read(5.0, a, 1)
    assert s.next_action(5.5) != ListChats(first=False)
    assert s.next_action(6.0) == ListChats(first=False)


# --- cadence, simulated ------------------------------------------------------------------------


def simulate(
    s: WatchSchedule,
    until: float,
    *,
    chats: list[int] | None = None,
    news: Callable[[int, float], bool] = lambda chat, t: False,
) -> list[tuple[float, object]]:
    """Run the schedule to ``until`` against a server whose answers come at once."""
    log: list[tuple[float, object]] = []
    now, next_id = 0.0, 1000
    while now <= until:
        action = s.next_action(now)
        if isinstance(action, ListChats):
            log.append((now, action))
            s.chats_listed(now, chats or [])
        elif isinstance(action, PollChat):
            log.append((now, action))
            if s.watermark(action) is None:
                s.first_read(now, action, 1)
                s.poll_done(now, action, got_new=False)
                continue
            got = news(action.chat_id, now)
            if got:
                next_id += 1
                s.fetched_batch(action, msgs(next_id))
            s.poll_done(now, action, got_new=got)
        elif action is None or action is END:
            break
        else:
            now = action
    return log


def test_quiet_chats_back_off_to_the_cap_and_a_busy_one_keeps_its_pace() -> None:
    chats, interval, cap = 40, 1.0, 10.0
    s = schedule(list(range(chats)), interval=interval, max_interval=cap)
    log = simulate(s, 600.0, news=lambda chat, t: chat == 0)
    window = [a for t, a in log if 300 <= t < 600 and isinstance(a, PollChat)]
    per_chat = Counter(a.chat_id for a in window)
    quiet = [per_chat[c] for c in range(1, chats)]
    # Settled: each quiet chat polled about once per cap (the jitter only ever shortens it).
    assert all(30 <= n <= 33 for n in quiet), quiet
    # Never a gap longer than the cap: a message in a quiet chat is seen within it.
    for chat in range(1, chats):
        times = [t for t, a in log if t >= 300 and isinstance(a, PollChat) and a.chat_id == chat]
        assert max(b - a for a, b in itertools.pairwise(times)) <= cap + 1e-9
    assert 270 <= per_chat[0] <= 330  # the busy chat: every interval (±10 % jitter)
    rate = len(window) / 300
    assert rate == pytest.approx((chats - 1) / cap + 1 / interval, rel=0.05)


def test_the_interval_grows_by_half_per_empty_poll_and_news_resets_it() -> None:
    s = schedule([1], interval=1.0, max_interval=100.0)
    (poll,) = polls_due(s, 0.0)
    s.first_read(0.0, poll, 1)
    s.poll_done(0.0, poll, got_new=False)
    now, gaps = 0.0, []
    for _ in range(6):
        due = s.next_action(now)
        assert isinstance(due, float)
        gaps.append(due - now)
        now = due
        (poll,) = polls_due(s, now)
        s.poll_done(now, poll, got_new=False)
    for n, gap in enumerate(gaps, start=1):
        assert GROWTH**n * 0.9 <= gap <= GROWTH**n * 1.1
    s.fetched_batch(poll, msgs(5))
    (poll,) = polls_due(s, now := s.next_action(now))  # type: ignore[arg-type]
    s.poll_done(now, poll, got_new=True)
    due = s.next_action(now)
    assert isinstance(due, float)
    assert 0.9 <= due - now <= 1.1


def test_quiet_chats_do_not_poll_in_lockstep() -> None:
    # Every chat starts together and goes quiet together; at the cap their polls must be
    # spread over it, not arrive in one burst per cycle.
    chats, cap = 100, 10.0
    s = schedule(list(range(chats)), interval=1.0, max_interval=cap, seed=11)
    log = simulate(s, 200.0)
    start = 100.0
    bins = [0] * 20
    for t, action in log:
        if isinstance(action, PollChat) and start <= t < start + 4 * cap:
            bins[int((t - start) / (cap / 5))] += 1
    mean = statistics.mean(bins)
    assert mean == pytest.approx(chats / cap * (cap / 5), rel=0.05)
    assert max(bins) <= 1.6 * mean, bins


def test_new_chats_are_noticed_about_as_fast_as_a_quiet_chat_is_polled() -> None:
    cap = 10.0
    s = schedule(None, interval=1.0, max_interval=cap)
    log = simulate(s, 300.0, chats=[1, 2, 3])
    listings = [t for t, a in log if isinstance(a, ListChats)]
    gaps = [b - a for a, b in itertools.pairwise(listings)]
    assert gaps
    assert all(g == pytest.approx(cap) for g in gaps)


def test_a_seeded_schedule_is_reproducible() -> None:
    def run() -> list[tuple[float, object]]:
        return simulate(schedule(list(range(10)), seed=42), 100.0)

    assert run() == run()
