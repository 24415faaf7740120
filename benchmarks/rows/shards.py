"""Row ``shards``: the point of ``--shard``, against a server that limits each credential.

The emulator (``messages-async serve --clients 5`` in its own process) limits each client id
to a token bucket of its own (docs/protocol.md §5): ``RATE`` requests/s, burst a tenth of a
second, ``Retry-After: 1``, 20 ms latency. The same dataset is exported once by one
``messages-async export`` process with one credential, then by 4 ``--shard I/4`` processes at
once, each with a credential of its own in its environment and its own SQLite store, as the
Kubernetes recipe runs them. Times are what each export reports in its summary (from just
before it lists the chats to its last commit: interpreter start-up left out); the shards'
time is the slowest shard's. The row checks that the shards together hold exactly what the
single export holds.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from .._harness import Context, Line, ServerProcess, Target, fmt_rate

__all__ = ["NAME", "run"]

NAME = "shards"
SPEED_UP = Target(">=", 3.5)
SHARDS = 4
RATE = 40.0
LATENCY = 0.02
CHATS = 256

_SUMMARY = re.compile(r"messages:\s+([\d,]+) new in ([\d.,]+) s")


def _start(
    info: dict[str, Any], credential: int, out: Path, shard: int | None, told: bool
) -> subprocess.Popen[bytes]:
    client = info["clients"][credential]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_")}
    env["MESSAGES_TOKEN_URL"] = info["token_url"]
    env["MESSAGES_CLIENT_ID"] = client["client_id"]
    env["MESSAGES_CLIENT_SECRET"] = client["client_secret"]
    argv = [sys.executable, "-m", "messages_async", "export", "--out", str(out), "--fresh"]
    argv += ["--concurrency", "8"]
    if shard is not None:
        argv += ["--shard", f"{shard}/{SHARDS}"]
    if told:
        argv += ["--rate-limit", f"{RATE:g}"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _seconds(proc: subprocess.Popen[bytes]) -> float:
    """How long the export took by its own summary; it must have succeeded."""
    stdout, stderr = proc.communicate()
    text = stdout.decode(errors="replace")
    match = _SUMMARY.search(text)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"the export exited with {proc.returncode}:\n{text}{stderr.decode()}")
    return float(match.group(2).replace(",", ""))


def _rows(paths: list[Path]) -> set[tuple[int, int, str]]:
    rows: set[tuple[int, int, str]] = set()
    for path in paths:
        with sqlite3.connect(path) as db:
            rows |= set(db.execute("SELECT id, chat_id, raw FROM messages"))
        db.close()
    return rows


def _measure(
    info: dict[str, Any], folder: Path, *, told: bool
) -> tuple[float, float, int, bool, float]:
    one = _seconds(_start(info, SHARDS, folder / "one.sqlite", None, told))
    parts = [folder / f"shard-{i}.sqlite" for i in range(SHARDS)]
    procs = [_start(info, i, parts[i], i, told) for i in range(SHARDS)]
    sharded = max(_seconds(p) for p in procs)
    whole = _rows([folder / "one.sqlite"])
    sizes = [len(_rows([part])) for part in parts]
    balance = max(sizes) / (sum(sizes) / SHARDS)  # the largest shard bounds the speed-up
    return one, sharded, len(whole), _rows(parts) == whole, balance


def run(ctx: Context) -> list[Line]:
    chats, per_chat = (32, 20) if ctx.quick else (CHATS, 1000)
    with (
        ServerProcess(
            chats=chats,
            messages_per_chat=per_chat,
            latency=LATENCY,
            rate_limit=RATE,
            burst=max(1, round(RATE * 0.1)),
            clients=SHARDS + 1,
        ) as server,
        TemporaryDirectory() as folder,
    ):
        one, sharded, messages, exact, balance = _measure(server.info, Path(folder), told=False)
        told = None if ctx.quick else _measure(server.info, Path(folder), told=True)
    ctx.log(
        f"shards: {messages:,} messages, one credential {one:.1f} s, "
        f"{SHARDS} shards {sharded:.1f} s, exact: {exact}"
    )
    if not exact:
        raise RuntimeError("the shards together do not hold what the single export holds")
    told_lines: list[Line] = []
    if told is not None:
        # The same with every client told the bucket's rate: no shard spends its first
        # seconds finding it, so what is left is the split's own balance.
        one_told, sharded_told, _, exact_told, _ = told
        if not exact_told:
            raise RuntimeError("told the rate, the shards do not hold what the single one holds")
        told_lines.append(
            Line(
                NAME,
                f"  the same, every client told the rate (--rate-limit {RATE:g}): "
                f"{one_told:.1f} s vs {sharded_told:.1f} s",
                fmt_rate(messages / sharded_told, "msg"),
                fmt_rate(messages / one_told, "msg"),
                one_told / sharded_told,
                None,
            )
        )
    return [
        Line(
            NAME,
            f"{SHARDS} shards × own credential vs one, {chats} chats × {per_chat} msgs, "
            f"bucket {RATE:g} req/s per credential, {LATENCY * 1000:g} ms (rows exact)",
            fmt_rate(messages / sharded, "msg"),
            fmt_rate(messages / one, "msg"),
            one / sharded,
            SPEED_UP,
        ),
        Line(
            NAME,
            f"  the largest shard's messages vs the mean: at most {SHARDS / balance:.2f}× "
            "with no other cost",
            f"{balance:.3f}×",
            "1",
            balance,
        ),
        *told_lines,
    ]
