"""The project's own checks, run as tests: types, lint, formatting and the public surface."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import messages_async

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_mypy_strict() -> None:
    result = _run("mypy", "--strict")  # files and settings in pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_names_are_exported_and_documented() -> None:
    public = set(messages_async.__all__)
    assert list(messages_async.__all__) == sorted(messages_async.__all__)
    for name in public - {"__version__"}:
        obj = getattr(messages_async, name)
        assert obj.__doc__, f"{name} has no docstring"
    # Every public class defined in a private module is re-exported.
    for info in pkgutil.iter_modules(messages_async.__path__):
        if not info.name.startswith("_") or info.name in ("_cli",):
            continue
        module = importlib.import_module(f"messages_async.{info.name}")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (
                isinstance(obj, type)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                internal = {
                    "ApiRequest",
                    "ListQuery",
                    "Retry",
                    "TokenGrant",
                    "Credentials",
                    "Token",
                    "SessionManager",
                    "Transport",
                    "RetryPolicy",
                    "RetryBudget",
                    "Operation",
                    "Attempt",
                    "CallState",
                    "Failure",
                    "RetryIn",
                    "Renew",
                    "Done",
                    "GiveUp",
                    "Limiter",
                    "RateController",
                    "Priority",
                    "Ticket",
                    "Outcome",
                    "Secret",
                    # The worker pool and the watch's scheduler (its actions and answers).
                    "Pool",
                    "ChatSource",
                    "WatchSchedule",
                    "PollChat",
                    "ListChats",
                    "FailedPoll",
                    "Listed",
                    "RoundVerdict",
                    # The time-window search behind iter_windows.
                    "WindowPlanner",
                    # Telemetry and hooks: the client's own plumbing.
                    "EventHooks",
                    "CallObserver",
                    "QuietCall",
                    "ObservedCall",
                    "Observer",
                    "Waits",
                    "Instruments",
                    "Telemetry",
                    "OtelCall",
                    "OtelWalk",
                }
                if name not in internal:
                    assert name in public, f"{module.__name__}.{name} is not re-exported"


def test_py_typed_is_shipped() -> None:
    assert (ROOT / "messages_async" / "py.typed").exists()


def test_pure_core_does_no_io() -> None:
    # The wall between the pure core and the I/O layers: these modules never import aiohttp.
    for module in ("_wire", "_converter", "_models", "_errors", "_secret", "_retry", "_checks"):
        source = (ROOT / "messages_async" / f"{module}.py").read_text()
        assert "aiohttp" not in source, f"{module} imports aiohttp"
    plan = (ROOT / "messages_async" / "_window_plan.py").read_text()
    assert "aiohttp" not in plan
    assert "asyncio" not in plan


def test_readme_shows_the_examples_verbatim() -> None:
    # The echo bot in the README is exactly the code tests/test_example_bot.py runs.
    readme = (ROOT / "README.md").read_text()
    for example in ("echo_bot.py", "test_echo_bot.py"):
        assert (ROOT / "examples" / example).read_text() in readme, example


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert command in readme
