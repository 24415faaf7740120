"""What every benchmark row shares: timing, repeats, ratios, the server process and the table.

Numbers on a shared machine are noisy, so a row never compares against a number measured at
another time: it runs its candidate and its baseline back to back in every repeat (interleaved)
and reports the median of the per-repeat ratios, which cancels most of the drift that other
work on the machine causes between repeats.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

__all__ = [
    "Context",
    "Line",
    "Row",
    "ServerProcess",
    "Target",
    "ainterleave",
    "fetch_token",
    "fmt_rate",
    "fmt_seconds",
    "gc_disabled",
    "interleave",
    "median",
    "paired_ratio",
    "print_table",
    "timed",
]


@dataclass(frozen=True)
class Target:
    """A goal for a ratio: ``>= value`` (throughput) or ``<= value`` (time, share)."""

    op: Literal[">=", "<="]
    value: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.value:g}"


@dataclass(frozen=True)
class Line:
    """One line of the table: a candidate measured against its baseline in the same run."""

    row: str
    label: str
    measured: str
    baseline: str
    ratio: float | None
    target: Target | None = None

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return "info"
        return "PASS" if self.target.met(self.ratio) else "MISS"


@dataclass
class Context:
    """Options every row reads. ``quick``: tiny sizes, so the whole run takes seconds."""

    quick: bool = False
    repeats: int = 5
    verbose: bool = True
    notes: list[str] = field(default_factory=list)

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"  {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Row:
    """A benchmark row: a name for ``--only`` and a function that returns its table lines."""

    name: str
    run: Callable[[Context], list[Line]]
    about: str = ""


# -- timing -------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """The median of ``candidate[i] / baseline[i]``: each pair was measured back to back."""
    return statistics.median(c / b for c, b in zip(candidate, baseline, strict=True))


def interleave(
    variants: dict[str, Callable[[], float]], repeats: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Run each variant once per repeat, in turn; each returns what it measured."""
    if warmup:
        for fn in variants.values():
            fn()
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


async def ainterleave(
    variants: dict[str, Callable[[], Awaitable[float]]], repeats: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """:func:`interleave` for coroutines."""
    if warmup:
        for fn in variants.values():
            await fn()
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(await fn())
    return results


def timed(walk: Callable[[], Awaitable[int]], expected: int) -> Callable[[], Awaitable[float]]:
    """A measurement for :func:`ainterleave`: the seconds ``walk`` takes, after checking that
    it walked ``expected`` messages (a fast walk that misses some must not look good)."""

    async def measure() -> float:
        start = time.perf_counter()
        n = await walk()
        elapsed = time.perf_counter() - start
        if n != expected:
            raise RuntimeError(f"walked {n} messages, expected {expected}")
        return elapsed

    return measure


def fmt_rate(per_second: float, unit: str) -> str:
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M {unit}/s"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f}k {unit}/s"
    return f"{per_second:.1f} {unit}/s"


def fmt_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


# -- the emulator in its own process -------------------------------------------------------------


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 100


class ServerProcess:
    """``messages-async serve`` in a child process, so the client's cost is what is measured.

    Use as ``with ServerProcess(chats=..., ...) as server:``; ``server.info`` holds what the
    ready file said (token_url, resource_uri, client_id, client_secret). The server never
    records requests when run this way. It is stopped with SIGTERM and waited for.
    """

    def __init__(self, **options: object) -> None:
        self._options = options
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.info: dict[str, Any] = {}

    def _argv(self, ready: str) -> list[str]:
        argv = [
            sys.executable,
            "-c",
            "from messages_async.testing._serve import serve_main; raise SystemExit(serve_main())",
            "--port",
            "0",
            "--ready-file",
            ready,
        ]
        for key, value in self._options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        return argv

    def __enter__(self) -> ServerProcess:
        self._dir = tempfile.TemporaryDirectory(prefix="messages-bench-")
        ready = os.path.join(self._dir.name, "ready.json")
        self._proc = subprocess.Popen(
            self._argv(ready), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                self.__exit__(None, None, None)
                raise RuntimeError(f"the emulator exited with {self._proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the emulator did not start within 60 s")
            time.sleep(0.02)
        with open(ready, "rb") as f:
            self.info = orjson.loads(f.read())
        return self

    def __exit__(self, *_exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the server process has used so far; None off Linux."""
        if self._proc is None:
            return None
        try:
            with open(f"/proc/{self._proc.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return None
        # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _clock_ticks()


async def fetch_token(session: aiohttp.ClientSession, info: dict[str, Any]) -> str:
    """A client-credentials exchange by hand, for the baselines that use no library code."""
    form = {
        "grant_type": "client_credentials",
        "client_id": info["client_id"],
        "client_secret": info["client_secret"],
        "scope": "messages_read",
    }
    async with session.post(info["token_url"], data=form) as r:
        r.raise_for_status()
        token: str = orjson.loads(await r.read())["access_token"]
        return token


@contextlib.contextmanager
def gc_disabled(disable: bool) -> Iterator[None]:
    was = gc.isenabled()
    if disable:
        gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# -- the table ----------------------------------------------------------------------------------

_HEADERS = ("row", "what", "measured", "baseline", "ratio", "target", "status")


def _cells(line: Line) -> tuple[str, ...]:
    ratio = "—" if line.ratio is None else f"{line.ratio:.2f}×"
    target = "—" if line.target is None else str(line.target)
    return (line.row, line.label, line.measured, line.baseline, ratio, target, line.status)


def print_table(lines: Sequence[Line], *, markdown: bool) -> None:
    rows = [_cells(line) for line in lines]
    if markdown:
        print("| " + " | ".join(_HEADERS) + " |")
        print("|" + "|".join("---" for _ in _HEADERS) + "|")
        for cells in rows:
            print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEADERS)]
    print("  ".join(h.ljust(w) for h, w in zip(_HEADERS, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for cells in rows:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
