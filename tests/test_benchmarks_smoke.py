"""The benchmark entry point still runs: tiny sizes, every row present. Never times anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.rows import ROWS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_every_row() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout
    for row in ROWS:
        assert f"\n{row.name} " in table, f"row {row.name!r} missing from:\n{table}"
    assert "PASS" in table or "MISS" in table
