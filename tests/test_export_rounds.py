"""What the export does after a failed walk: the round table (no I/O), then one live check that a
body breaking the contract fails its chat once and is never asked for again."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from helpers import make_client

import messages_async as ma
from messages_async.export import Exporter, ExportMeta, ExportOptions, SqliteStore
from messages_async.export._runner import (
    MAX_CURSOR_RESTARTS,
    MAX_ROUND_WAIT,
    MAX_TRANSIENT_ROUNDS,
    Rounds,
)
from messages_async.testing import Fault, MessagesServer


@pytest.mark.parametrize(
    ("error", "action"),
    [
        (ma.ServerError(503, None, "down"), "wait"),
        (ma.TransportError("reset"), "wait"),
        (ma.PaginationError("went backwards"), "wait"),
        (ma.AuthError("token endpoint down", status=None), "wait"),
        (ma.RateLimitError(429, None, "slow", retry_after=30), "wait"),
        (ma.InvalidCursorError(400, "invalid_cursor", "expired"), "restart"),
        (ma.DecodeError("the server's message page does not fit the API contract"), "fail"),
        (ma.NotFoundError(404, "not_found", "gone"), "fail"),
        (ma.PermissionDeniedError(403, "forbidden", "no"), "fail"),
        (ma.AuthError("revoked", status=401), "raise"),
        (OSError("disk full"), "raise"),
    ],
)
def test_round_table(error: Exception, action: str) -> None:
    assert Rounds().after(error, progressed=False).action == action


def test_transient_rounds_are_bounded_and_grow_but_rate_limits_are_waited_out() -> None:
    rounds = Rounds()
    waits = []
    for _ in range(MAX_TRANSIENT_ROUNDS):
        step = rounds.after(ma.ServerError(503, None, "down"), progressed=False)
        assert step.action == "wait"
        waits.append(step.wait)
    assert waits == sorted(waits)
    assert max(waits) <= MAX_ROUND_WAIT
    for _ in range(50):  # never counted
        limited = rounds.after(ma.RateLimitError(429, None, "x", retry_after=7), progressed=False)
        assert limited.action == "wait"
        assert limited.wait == 7
    last = rounds.after(ma.ServerError(503, None, "down"), progressed=False)
    assert last.action == "fail"
    assert f"{MAX_TRANSIENT_ROUNDS + 1} times in a row" in last.why


def test_progress_starts_the_counts_again() -> None:
    rounds = Rounds()
    for _ in range(10 * MAX_TRANSIENT_ROUNDS):
        assert rounds.after(ma.TransportError("reset"), progressed=True).action == "wait"
    for _ in range(MAX_CURSOR_RESTARTS):
        step = rounds.after(ma.InvalidCursorError(400, "invalid_cursor", "x"), progressed=False)
        assert step.action == "restart"
    step = rounds.after(ma.InvalidCursorError(400, "invalid_cursor", "x"), progressed=False)
    assert step.action == "fail"


async def test_a_body_that_breaks_the_contract_fails_its_chat_once(tmp_path: Path) -> None:
    async with MessagesServer(chats=3, messages_per_chat=30, seed=4) as server:
        broken, *others = server.chat_ids()
        bad = server.inject(Fault.malformed(), path="messages/", chat_id=broken, times=None)
        store = SqliteStore(str(tmp_path / "out.sqlite"))
        options = ExportOptions(concurrency=2, page_size=10)
        async with make_client(server) as client:
            await store.open(ExportMeta(source=server.resource_uri), fresh=False)
            try:
                stats = await Exporter(client, store, options).run()
            finally:
                await store.close()
    assert [f.chat_id for f in stats.failures] == [broken]
    assert "not valid JSON" in stats.failures[0].error
    assert bad.hits == 1  # reported once; neither the client nor the runner asked again
    db = sqlite3.connect(tmp_path / "out.sqlite")
    try:
        counts = dict(db.execute("SELECT chat_id, count(*) FROM messages GROUP BY chat_id"))
    finally:
        db.close()
    assert counts == dict.fromkeys(others, 30)


async def test_a_refused_token_stops_every_worker_and_raises(tmp_path: Path) -> None:
    async with MessagesServer(chats=6, messages_per_chat=200, seed=5, latency=0.002) as server:
        store = SqliteStore(str(tmp_path / "out.sqlite"))
        commits = 0
        original = store.commit

        async def commit(*args: Any, **kwargs: Any) -> Any:
            nonlocal commits
            commits += 1
            if commits == 3:
                # The credentials are revoked mid-export: every token request is refused.
                server.inject(Fault.status(401, "invalid_client"), path="oauth/token", times=None)
                server.expire_tokens()
            return await original(*args, **kwargs)

        store.commit = commit  # type: ignore[method-assign]
        async with make_client(server) as client:
            await store.open(ExportMeta(source=server.resource_uri), fresh=False)
            exporter = Exporter(client, store, ExportOptions(concurrency=3, page_size=10))
            try:
                with pytest.raises(ma.AuthError):
                    await asyncio.wait_for(exporter.run(), 20)
            finally:
                await store.close()
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("export ")]
            sent = len(server.resource_requests())
            await asyncio.sleep(0.05)
            assert len(server.resource_requests()) == sent  # nobody goes on fetching
    assert exporter.stats.chats_done < 6
