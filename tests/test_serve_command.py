"""``messages-async serve`` as a user runs it: a process, stopped with Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import messages_async as ma

SERVE = [sys.executable, "-m", "messages_async", "serve"]


def test_help_shows_every_default() -> None:
    result = subprocess.run(
        [*SERVE, "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    text = " ".join(result.stdout.split())  # argparse wraps to the terminal's width
    for shown in (
        "(default: 127.0.0.1)",
        "(default: 0, any free port)",
        "number of chats to generate (default: 20)",
        "(default: 200)",
        "same dataset (default: 0)",
        "(default: 0.0)",
        "(default: no limit)",
        "(default: url)",
        "(default: 3600.0)",
        "removed on exit",
    ):
        assert shown in text, shown


def _left_in(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def _ready(path: Path) -> dict[str, object] | None:
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_ready_file_is_there_while_serving_and_gone_after(
    tmp_path: Path, sig: signal.Signals
) -> None:
    ready = tmp_path / "ready.json"
    proc = await asyncio.create_subprocess_exec(
        *SERVE,
        "--chats",
        "2",
        "--messages-per-chat",
        "3",
        "--ready-file",
        str(ready),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            while (info := _ready(ready)) is None:
                assert proc.returncode is None, "the server exited before it was ready"
                await asyncio.sleep(0.02)
        # The file says how to reach a server that is listening.
        async with ma.Client(
            token_url=str(info["token_url"]),
            client_id=str(info["client_id"]),
            client_secret=str(info["client_secret"]),
        ) as client:
            assert len(await client.messages.chats()) == 2
    finally:
        if proc.returncode is None:
            proc.send_signal(sig)
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert _left_in(tmp_path) == []  # neither the file nor a temporary one beside it
    assert str(info["client_secret"]) in stdout.decode()


async def test_a_storm_answers_429_from_a_credentials_first_request(tmp_path: Path) -> None:
    from messages_async.testing._serve import serve

    ready = tmp_path / "ready.json"
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            chats=2,
            messages_per_chat=3,
            storm="2@0",
            ready_file=str(ready),
            stop=stop,
            echo=lambda _line: None,
        )
    )
    try:
        async with asyncio.timeout(30):
            while (info := _ready(ready)) is None:
                await asyncio.sleep(0.02)
        statuses: list[int] = []
        async with ma.Client(
            token_url=str(info["token_url"]),
            client_id=str(info["client_id"]),
            client_secret=str(info["client_secret"]),
            event_hooks={"response": [lambda view: statuses.append(view.status)]},
        ) as client:
            assert len(await client.messages.chats()) == 2  # waited out, then answered
        assert statuses == [429, 429, 200]
    finally:
        stop.set()
        await task


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--storm", "10"], "a storm is COUNT@SECONDS"),
        (["--rate-schedule", "5:100"], "steps must start with one at time 0"),
        (["--rate-schedule", "0:100", "--rate-limit", "5"], "give one"),
    ],
)
def test_bad_limit_options_exit_2_saying_what_to_fix(args: list[str], says: str) -> None:
    result = subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert says in result.stderr


async def test_more_clients_each_sign_in_with_their_own_credentials(tmp_path: Path) -> None:
    from messages_async.testing._serve import serve

    ready = tmp_path / "ready.json"
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            chats=2,
            messages_per_chat=3,
            clients=3,
            ready_file=str(ready),
            stop=stop,
            echo=lambda _line: None,
        )
    )
    try:
        async with asyncio.timeout(30):
            while (info := _ready(ready)) is None:
                await asyncio.sleep(0.02)
        clients = info["clients"]
        assert isinstance(clients, list)
        assert [c["client_id"] for c in clients] == [
            "test-client",
            "test-client-2",
            "test-client-3",
        ]
        for credential in clients:
            async with ma.Client(
                token_url=str(info["token_url"]),
                client_id=credential["client_id"],
                client_secret=credential["client_secret"],
            ) as client:
                assert len(await client.messages.chats()) == 2
        with pytest.raises(ma.AuthError):
            async with ma.Client(
                token_url=str(info["token_url"]),
                client_id="test-client-2",
                client_secret=clients[0]["client_secret"],
            ) as client:
                await client.messages.chats()
    finally:
        stop.set()
        await task


def test_clients_must_be_at_least_one() -> None:
    result = subprocess.run([*SERVE, "--clients", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--clients must be at least 1" in result.stderr
