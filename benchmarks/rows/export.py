"""Export: ``messages-async export`` throughput into SQLite, JSONL and Parquet, and its peak
memory for 10k against 1M messages.

Every export runs as a real child process (``python -m messages_async export``, credentials
in the environment as a user would set them), against one emulator process that holds the
whole dataset (1000 chats × 1000 messages), so the process measured is the export alone.

- **Throughput.** Messages/s as the export reports it in its summary (from just before it
  lists the chats until the last page is committed: interpreter start-up is left out) on a
  subset of the chats, against a child that walks the same chats with
  ``client.messages.iter_many`` at the same concurrency and stores nothing (with the same GC
  tuning as the command, so that the ratio is the cost of storing). A raw single-chat or
  fan-out ceiling is not comparable: an export walks many chats *and* writes them.
- **Memory.** Peak RSS of each export child, as the kernel's high-water mark of that process's
  own memory (``VmHWM`` in ``/proc/self/status``, read by the child as it exits). Not
  ``ru_maxrss``: Linux carries that across ``exec`` from the forked copy of the parent, so a
  child of a large benchmark process would report the parent's size (it did: every line read
  the same 77 MiB). Target: 1M messages within 1.2× of 10k.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .._harness import (
    Context,
    Line,
    ServerProcess,
    Target,
    fmt_rate,
    interleave,
    median,
    paired_ratio,
)

__all__ = ["NAME", "run"]

NAME = "export"
MEMORY = Target("<=", 1.2)
THROUGHPUT = {"sqlite": Target(">=", 0.7), "jsonl": Target(">=", 0.8)}  # Parquet: measured only
CONCURRENCY = 8  # the command's default, passed explicitly so both sides use the same
FORMATS = {"sqlite": "SQLite", "jsonl": "JSONL", "parquet": "Parquet"}

# The baseline child: what the export does minus storing. The GC tuning mirrors
# messages_async/_cli.py, so the two processes differ only in the storing.
_ITER_MANY = """\
import asyncio, gc, os, sys, time
import messages_async as ma

async def main(ids, concurrency):
    async with ma.Client(
        token_url=os.environ["MESSAGES_TOKEN_URL"],
        client_id=os.environ["MESSAGES_CLIENT_ID"],
        client_secret=os.environ["MESSAGES_CLIENT_SECRET"],
        max_concurrency=2 * concurrency,
    ) as client:
        start = time.perf_counter()
        await client.messages.chats()
        n = 0
        async for _ in client.messages.iter_many(ids, concurrency=concurrency, limit=100):
            n += 1
        elapsed = time.perf_counter() - start
    print(n, elapsed)

gc.freeze()
gc.set_threshold(100_000, 50, 100)
asyncio.run(main([int(x) for x in sys.argv[1].split(",")], int(sys.argv[2])))
"""

_SUMMARY = re.compile(r"messages:\s+([\d,]+) new in [\d.,]+ s \(([\d,]+)/s\)")


def _env(info: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_")}
    env["MESSAGES_TOKEN_URL"] = info["token_url"]
    env["MESSAGES_CLIENT_ID"] = info["client_id"]
    env["MESSAGES_CLIENT_SECRET"] = info["client_secret"]
    return env


# Runs the command line as ``python -m messages_async`` would, and reports the process's own
# peak resident memory when it exits.
_WITH_PEAK = """
import atexit, runpy, sys

def _peak():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                sys.stderr.write("PEAK_RSS_KIB " + line.split()[1] + "\\n")

atexit.register(_peak)
sys.argv = ["messages-async", *sys.argv[1:]]
runpy.run_module("messages_async", run_name="__main__")
"""
_PEAK = re.compile(r"PEAK_RSS_KIB (\d+)")


def _child(argv: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Run ``argv`` to completion; its stdout and its own peak RSS in bytes.

    The peak is the child's ``PEAK_RSS_KIB`` line when it prints one (``_WITH_PEAK``), else
    ``ru_maxrss`` from ``os.wait4`` (an upper bound: it includes the forked parent's size).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        # Reaped by wait4: tell the Popen object, so it does not wait for the pid again.
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(
                f"{argv[1:4]} exited with {proc.returncode}:\n{stdout[-2000:]}{stderr[-2000:]}"
            )
    peak = _PEAK.search(stderr)
    if peak is not None:
        return stdout, int(peak.group(1)) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return stdout, usage.ru_maxrss * scale


def _stored(fmt: str, out: Path) -> int:
    """Messages actually on disk, so a summary that miscounts cannot pass unnoticed."""
    if fmt == "sqlite":
        with sqlite3.connect(out) as db:
            (n,) = db.execute("SELECT count(*) FROM messages").fetchone()
        db.close()
        return int(n)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return sum(
            pq.ParquetFile(p).metadata.num_rows for p in (out / "messages").rglob("*.parquet")
        )
    n = 0
    for path in (out / "messages").glob("*/messages.jsonl"):
        with path.open("rb") as f:
            n += sum(1 for _ in f)
    return n


def _export(
    info: dict[str, Any], fmt: str, chat_ids: list[int] | None, expected: int, work: Path
) -> tuple[float, int]:
    """One fresh export in a child process: (messages/s it reports, its peak RSS in bytes)."""
    out = work / f"export-{fmt}"
    argv = [sys.executable, "-c", _WITH_PEAK, "export", "--format", fmt, "--out", str(out)]
    argv += ["--fresh", "--concurrency", str(CONCURRENCY)]
    for chat_id in chat_ids or ():
        argv += ["--chat", str(chat_id)]
    stdout, rss = _child(argv, _env(info))
    match = _SUMMARY.search(stdout)
    if match is None:
        raise RuntimeError(f"no 'messages: N new in S s (R/s)' line in the summary:\n{stdout}")
    n, rate = (int(g.replace(",", "")) for g in match.groups())
    stored = _stored(fmt, out)
    if n != expected or stored != expected:
        raise RuntimeError(f"{fmt} export: {n} reported, {stored} stored, expected {expected}")
    return float(rate), rss


def _iter_many(info: dict[str, Any], chat_ids: list[int], expected: int) -> float:
    argv = [sys.executable, "-c", _ITER_MANY, ",".join(map(str, chat_ids)), str(CONCURRENCY)]
    stdout, _ = _child(argv, _env(info))
    n_text, elapsed = stdout.split()
    if int(n_text) != expected:
        raise RuntimeError(f"iter_many walked {n_text} messages, expected {expected}")
    return expected / float(elapsed)


def _chat_ids(info: dict[str, Any]) -> list[int]:
    import asyncio

    from ._clients import library_client

    async def main() -> list[int]:
        async with library_client(info) as client:
            return [c.chat_id for c in await client.messages.chats()]

    return asyncio.run(main())


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(ctx: Context) -> list[Line]:
    # (chats on the server, messages per chat, chats in the throughput subset, in the small run)
    chats, per_chat, subset, small = (100, 100, 50, 20) if ctx.quick else (1000, 1000, 100, 10)
    total = chats * per_chat
    with (
        ServerProcess(chats=chats, messages_per_chat=per_chat) as server,
        tempfile.TemporaryDirectory(prefix="messages-bench-export-") as tmp,
    ):
        info, work = server.info, Path(tmp)
        ids = _chat_ids(info)
        if len(ids) != chats:
            raise RuntimeError(f"the server lists {len(ids)} chats, expected {chats}")
        some = ids[:subset]
        n = subset * per_chat
        # The server builds each page's body on first request: one walk of the subset fills
        # its cache, so every timed run below is served from it.
        _iter_many(info, some, n)
        mid_rss: dict[str, list[int]] = {fmt: [] for fmt in FORMATS}

        def export_subset(fmt: str) -> float:
            rate, rss = _export(info, fmt, some, n, work)
            mid_rss[fmt].append(rss)
            return rate

        results = interleave(
            {
                "sqlite": lambda: export_subset("sqlite"),
                "jsonl": lambda: export_subset("jsonl"),
                "parquet": lambda: export_subset("parquet"),
                "iter_many": lambda: _iter_many(info, some, n),
            },
            min(ctx.repeats, 2),
            warmup=False,
        )
        memory: dict[str, tuple[int, int, int]] = {}
        for fmt in FORMATS:
            _, small_rss = _export(info, fmt, ids[:small], small * per_chat, work)
            rate, large_rss = _export(info, fmt, None, total, work)
            mid = max(mid_rss[fmt])
            memory[fmt] = (small_rss, mid, large_rss)
            ctx.log(
                f"export: {fmt}, {total:,} messages at {rate:,.0f} msg/s (server cache cold); "
                f"peak RSS {_mb(large_rss)}, vs {_mb(mid)} for {n:,} and {_mb(small_rss)} "
                f"for {small * per_chat:,}"
            )
    lines: list[Line] = []
    what = f"{subset} chats × {per_chat} msgs, concurrency {CONCURRENCY}"
    for fmt, title in FORMATS.items():
        lines.append(
            Line(
                NAME,
                f"{title} export {what} vs iter_many storing nothing (child processes)",
                fmt_rate(median(results[fmt]), "msg"),
                fmt_rate(median(results["iter_many"]), "msg"),
                paired_ratio(results[fmt], results["iter_many"]),
                THROUGHPUT.get(fmt),
            )
        )
    for fmt, title in FORMATS.items():
        small_rss, mid_rss_max, large_rss = memory[fmt]
        lines.append(
            Line(
                NAME,
                f"{title} peak RSS (VmHWM): {total:,} msgs vs {small * per_chat:,}",
                _mb(large_rss),
                _mb(small_rss),
                large_rss / small_rss,
                MEMORY,
            )
        )
        lines.append(
            Line(
                NAME,
                f"{title} peak RSS: {total:,} msgs vs {n:,} (the largest of the throughput runs)",
                _mb(large_rss),
                _mb(mid_rss_max),
                large_rss / mid_rss_max,
            )
        )
    return lines
