"""``messages_async.export`` as a Python user drives it: stores as async context managers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import client_for

from messages_async.export import (
    Exporter,
    ExportMeta,
    ExportOptions,
    JsonlStore,
    SqliteStore,
    Store,
)
from messages_async.testing import MessagesServer


def _store(fmt: str, tmp_path: Path) -> Store:
    return (
        SqliteStore(str(tmp_path / "x.sqlite"))
        if fmt == "sqlite"
        else JsonlStore(str(tmp_path / "x"))
    )


@pytest.mark.parametrize("fmt", ["sqlite", "jsonl"])
async def test_a_store_closes_on_leaving_its_block_even_after_an_error(
    tmp_path: Path, fmt: str
) -> None:
    async with (
        MessagesServer(chats=2, messages_per_chat=30, seed=1) as server,
        client_for(server) as client,
    ):
        meta = ExportMeta(source=client.resource_uri or "")
        store = _store(fmt, tmp_path)

        async def export_then_fail() -> None:
            async with store:
                await store.open(meta, fresh=False)
                stats = await Exporter(client, store, ExportOptions()).run()
                assert stats.chats_done == 2
                raise KeyError("the caller's own error")

        with pytest.raises(KeyError, match="the caller's own error"):
            await export_then_fail()
        # Closed: nothing more can be handed to its threads.
        with pytest.raises(RuntimeError):
            await store.load(server.chat_ids()[0])
        await store.close()  # a second close does nothing

        # What was exported is all there: the next run is an update with nothing new.
        async with _store(fmt, tmp_path) as again:
            await again.open(meta, fresh=False)
            for chat_id in server.chat_ids():
                state = await again.load(chat_id)
                assert state.done
                assert state.messages == len(server.messages(chat_id))
            stats = await Exporter(client, again, ExportOptions()).run()
        assert (stats.chats_done, stats.messages) == (2, 0)


async def test_entering_does_not_open(tmp_path: Path) -> None:
    async with SqliteStore(str(tmp_path / "x.sqlite")) as store:
        pass
    assert not (tmp_path / "x.sqlite").exists()
    assert isinstance(store, SqliteStore)
