"""``python -m benchmarks``: run every row (or ``--only`` some) and print one table."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from ._harness import Context, Line, print_table
from .rows import ROWS


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"load average at the end: {load}"
    )


def main(argv: list[str] | None = None) -> int:
    names = [row.name for row in ROWS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of messages_async; every ratio is measured in this run.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--only",
        action="append",
        choices=names,
        metavar="NAME",
        help=f"run only this row (repeatable): {', '.join(names)}",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement")
    parser.add_argument(
        "--profile", action="store_true", help="profile each row with pyinstrument (client side)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    ctx = Context(quick=args.quick, repeats=repeats)
    lines: list[Line] = []
    started = time.perf_counter()
    for row in ROWS:
        if args.only and row.name not in args.only:
            continue
        print(f"running {row.name}: {row.about}", file=sys.stderr, flush=True)
        row_start = time.perf_counter()
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled")
            profiler.start()
            try:
                lines += row.run(ctx)
            finally:
                profiler.stop()
            print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
        else:
            lines += row.run(ctx)
        ctx.log(f"{row.name}: {time.perf_counter() - row_start:.1f} s")
    print()
    print_table(lines, markdown=args.markdown)
    print()
    print(f"{len(lines)} lines in {time.perf_counter() - started:.0f} s; {_machine()}")
    print(
        "ratio: median over repeats of candidate/baseline, each pair measured back to back; "
        "PASS/MISS compares it with the target; info lines have no target."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
