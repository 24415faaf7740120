"""The README is true of the code: its examples run as written (against the built-in
emulator), and its tables, error tree and option lists are the code's own."""

from __future__ import annotations

import argparse
import ast
import builtins
import inspect
import re
import subprocess
import sys
from pathlib import Path

import messages_async as ma
from messages_async import _cli
from messages_async.testing import _serve

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    script = tmp_path / "quickstart.py"
    script.write_text(match.group(1))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "matching messages" in result.stdout


def _section(title: str) -> str:
    """The README from the heading ``title`` to the next heading of the same or a higher level."""
    readme = (ROOT / "README.md").read_text()
    level = title.split(" ")[0]
    start = readme.index(f"\n{title}\n") + 1
    rest = readme[start + len(title) :]
    # A "# comment" line inside a code block is no heading: blank the blocks out (same length).
    prose = re.sub(r"^```.*?^```", lambda m: " " * len(m.group(0)), rest, flags=re.M | re.S)
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", prose, re.M)]
    return title + (rest[: ends[0]] if ends else rest)


def _block(section: str, lang: str = "python") -> str:
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match is not None, f"no {lang} block"
    return match.group(1)


def _flat(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_export_from_python_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "export_example.py"
    script.write_text(_block(_section("### The export from Python")))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 chats complete" in result.stdout
    assert (tmp_path / "chats.sqlite").exists()


def test_web_app_excerpt_is_the_example_as_it_is() -> None:
    excerpt = _block(_section("### One client for the life of an app"))
    assert excerpt in (ROOT / "examples" / "web_app.py").read_text()


def test_configuration_table_lists_every_client_option_with_its_default() -> None:
    table = _section("## Configuration").split("\n\n")[1]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    documented: dict[str, str] = {}
    for names, default, _meaning in rows:
        values = [v.strip() for v in default.strip().split(",")] if "`, `" in default else None
        for i, name in enumerate(re.findall(r"`(\w+)`", names)):
            documented[name] = values[i] if values else default.strip()
    parameters = inspect.signature(ma.Client.__init__).parameters
    options = [name for name in parameters if name != "self"]
    assert sorted(documented) == sorted(options)
    for name in options:
        default = parameters[name].default
        if isinstance(default, (bool, int, float)) or default is None:
            shown = documented[name].strip("`")
            mib = re.fullmatch(r"(\d+) MiB", shown)
            if mib:
                value = int(mib.group(1)) * 1024 * 1024
            else:
                value = None if shown == "—" else ast.literal_eval(shown)
            assert value == default, name


def test_error_tree_is_the_class_tree() -> None:
    tree = _block(_section("### Errors"), "")
    drawn: list[tuple[int, type, str | None]] = []  # depth, class, "(also X)"
    for line in tree.splitlines():
        match = re.match(r"^([ │├└─]*)(\w+)(?: \(also (\w+)\))?", line)
        if match is None:
            assert line.strip(" │").startswith("("), line  # a note continued from above
            continue
        drawn.append((len(match.group(1)), getattr(ma, match.group(2)), match.group(3)))
    listed = {cls for _, cls, _ in drawn}
    under: dict[type, set[type]] = {cls: set() for cls in listed}
    parents: list[tuple[int, type]] = []
    for depth, cls, also in drawn:
        while parents and parents[-1][0] >= depth:
            parents.pop()
        if parents:
            under[cls].add(parents[-1][1])
        if also:
            assert issubclass(cls, getattr(builtins, also)), cls
        parents.append((depth, cls))
    for cls, drawn_under in under.items():
        # Drawn under exactly its nearest listed ancestors (two, for multiple inheritance).
        ancestors = {b for b in cls.__mro__[1:] if b in listed}
        nearest = {
            a for a in ancestors if not any(b is not a and issubclass(b, a) for b in ancestors)
        }
        assert drawn_under == nearest, f"{cls.__name__} is drawn under {drawn_under}"
    public_errors = {
        getattr(ma, name)
        for name in ma.__all__
        if isinstance(getattr(ma, name), type) and issubclass(getattr(ma, name), ma.MessagesError)
    }
    assert public_errors == listed


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        flag
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
        if flag.startswith("--")
    }


def test_the_commands_options_are_in_the_readme_and_only_those() -> None:
    export = _cli._parser()._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
    section = _section("## The main job: bulk export")
    assert _options(export) <= set(re.findall(r"--[a-z][a-z-]+", section))
    serve = _section("## The emulator")
    assert set(re.findall(r"--[a-z][a-z-]+", serve)) - {"--compressed", "--help"} <= _options(
        _serve._parser()
    )


def test_exit_status_in_the_readme_is_the_one_in_help() -> None:
    section = _section("## The main job: bulk export")
    match = re.search(r"\*\*Exit status:\*\* (.*?)\n\n", section, re.S)
    assert match is not None
    export = _cli._parser()._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
    assert export.epilog is not None
    assert _flat(f"exit status: {match.group(1)}") == _flat(export.epilog)
    for code in (_cli.EXIT_OK, _cli.EXIT_FAILED, _cli.EXIT_USAGE, _cli.EXIT_INTERRUPTED):
        assert f" {code} " in _flat(export.epilog)
