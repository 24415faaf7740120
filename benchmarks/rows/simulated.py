"""Row ``sim``: the rate controllers against the server limiter models on a virtual clock.

A few scenarios of each kind from the matrix of issue 13 (``benchmarks/sim.py``), for the
client's controller, the previous limiter (``v0``) and botocore's CUBIC, each 60 simulated
seconds, plus the transient storm, the ceiling that halves and comes back, and a cap on
requests at once that drops for good. The whole matrix
(336 scenarios, minutes of CPU) is ``python -m benchmarks.sim``; its last table is in
benchmarks/README.md. A line per kind of limiter: the worst goodput ratio against
min(ceiling, fan-out ÷ latency) and the worst share of 429s.
"""

from __future__ import annotations

import collections

from .. import sim
from .._harness import Context, Line, Target

__all__ = ["NAME", "run"]

NAME = "sim"
GOODPUT = Target(">=", 0.95)
RECOVERY = Target("<=", 1.0)


def _family(name: str) -> str:
    return name.split(" burst")[0].rsplit(" ", 1)[0] if name.startswith("bucket") else name


def run(ctx: Context) -> list[Line]:
    worst: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [9.0, 0.0, 0])
    misses: dict[str, int] = collections.Counter()
    count = 0
    for scenario in sim.matrix(quick=True):
        count += 1
        for policy in sim.POLICIES:
            result = sim.run(scenario, policy)
            cell = worst[(scenario.name.split(" ")[0], policy)]
            cell[0] = min(cell[0], result.ratio)
            cell[1] = max(cell[1], result.share_429)
            if not sim.meets(result):
                misses[policy] += 1
    lines = []
    for (family, policy), (ratio, share, _) in sorted(worst.items()):
        lines.append(
            Line(
                NAME,
                f"{family}: {policy}, worst of the matrix",
                f"{share:.1%} 429s",
                "min(ceiling, fan-out/latency)",
                ratio,
                GOODPUT if policy == "controller" else None,
            )
        )
    for policy in sim.POLICIES:
        lines.append(
            Line(
                NAME,
                f"{policy}: scenarios missing ≥0.95× or <3% 429s",
                f"{misses[policy]} of {count}",
                "",
                None,
            )
        )
        result = sim.run(sim.halving(), policy)
        took_down, took_up = (
            result.first_reaching(0.85, at, window=1.0) for at, _ in sim.HALVING_STEPS[1:]
        )
        lines.append(
            Line(
                NAME,
                f"{policy}: ceiling 200→100→200 req/s: s to 0.85× after the drop / the return",
                " / ".join("never" if t is None else f"{t:.1f} s" for t in (took_down, took_up)),
                f"5 s; {result.share_429:.1%} 429s, {result.ratio:.2f}× overall",
                max(99.0 if t is None else t for t in (took_down, took_up)),
                Target("<=", 5.0) if policy == "controller" else None,
            )
        )
        before, after, at = sim.CAP_DROP
        result = sim.run(sim.cap_drop(), policy)
        end = result.scenario.duration
        held = result.rate_between(end - 60.0, end) / result.scenario.ideal(end)
        lines.append(
            Line(
                NAME,
                f"{policy}: a cap of {before} at once lowered to {after} at {at:g} s, "
                "goodput over the last 60 s",
                f"{result.share_429:.1%} 429s in all",
                "min(ceiling, fan-out/latency)",
                held,
                Target(">=", 0.9) if policy == "controller" else None,
            )
        )
        result = sim.run(sim.storm(10, 0.02, 32), policy)
        took = result.first_reaching(0.9, result.pauses[-1][1], window=0.5)
        lines.append(
            Line(
                NAME,
                f"{policy}: storm of 10 429s, s to 90% after the last pause",
                "never" if took is None else f"{took:.1f} s",
                "1 s",
                took if took is not None else 99.0,
                RECOVERY if policy == "controller" else None,
            )
        )
    return lines
