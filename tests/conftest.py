"""Suite-wide hygiene: every test fails on leaked tasks and on unclosed sessions, connectors,
responses or transports, whether they surface as warnings or through the loop's exception
handler ("Unclosed client session", "Task was destroyed but it is pending!")."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
async def loop_hygiene() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    before = asyncio.all_tasks()
    yield
    for _ in range(3):  # let finalizers and connection closes run
        await asyncio.sleep(0)
    gc.collect()
    current = asyncio.current_task()
    pending = {t for t in asyncio.all_tasks() - before if t is not current and not t.done()}
    if pending:
        # Tasks already told to stop (e.g. a server handler whose client went away) get a
        # moment to finish; a task that is still running after it has leaked.
        await asyncio.wait(pending, timeout=1.0)
    leaked = [t for t in pending if not t.done()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"tasks outlived the test: {leaked}"
    assert not reports, f"the event loop reported: {[r.get('message') for r in reports]}"
