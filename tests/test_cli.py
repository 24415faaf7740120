"""The ``messages-async`` command, run as a real process against the emulator on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_export import assert_exact, cli_env, listings, start_cli

from messages_async import _cli
from messages_async.export import ExportMeta, _progress
from messages_async.testing import Fault, MessagesServer

SECRET = "s3cr3t-must-never-be-printed"
#: Linux's /proc, where nothing can be created.
HAS_PROC = os.path.isdir("/proc/self")


async def run(
    server: MessagesServer, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *_python_cli(),
        *args,
        env=env if env is not None else cli_env(server),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _python_cli() -> list[str]:
    return [sys.executable, "-m", "messages_async", "export"]


def _bare_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_")}


@pytest.fixture
async def server() -> AsyncIterator[MessagesServer]:
    async with MessagesServer(
        chats=4, messages_per_chat=(20, 230), seed=8, extra_fields=True
    ) as srv:
        yield srv


def _one_clean_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def test_wrong_client_secret_exits_2_with_one_line_and_no_secret(
    server: MessagesServer, tmp_path: Path
) -> None:
    env = cli_env(server)
    env["MESSAGES_CLIENT_SECRET"] = SECRET
    code, out, err = await run(server, "--out", str(tmp_path / "x.sqlite"), env=env)
    assert code == 2
    line = _one_clean_line(err)
    assert "credentials" in line
    assert SECRET not in out + err
    assert not (tmp_path / "x.sqlite").exists()


async def test_wrong_access_token_exits_2_with_one_line_and_no_token(
    server: MessagesServer, tmp_path: Path
) -> None:
    env = _bare_env()
    env.update(MESSAGES_ACCESS_TOKEN=SECRET, MESSAGES_RESOURCE_URI=server.resource_uri)
    code, out, err = await run(server, "--out", str(tmp_path / "x.sqlite"), env=env)
    assert code == 2
    assert "credentials" in _one_clean_line(err)
    assert SECRET not in out + err


def _only_these_variables(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """The process's environment with no ``MESSAGES_*`` variable but ``values``."""
    for name in list(os.environ):
        if name.startswith("MESSAGES_"):
            monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_missing_credentials_exit_2_and_name_the_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _only_these_variables(monkeypatch, MESSAGES_TOKEN_URL="http://127.0.0.1:9/token")
    assert _cli.main(["export", "--out", str(tmp_path / "x.sqlite")]) == 2
    captured = capsys.readouterr()
    line = _one_clean_line(captured.err)
    assert "MESSAGES_CLIENT_ID" in line
    assert "MESSAGES_CLIENT_SECRET" in line
    assert "MESSAGES_TOKEN_URL (" not in line  # it was given


async def test_a_shard_signs_in_with_its_own_pair_when_the_environment_has_one(
    server: MessagesServer, tmp_path: Path
) -> None:
    server.register_client("shard-1", "secret-1")
    env = cli_env(server)  # the usual pair too, which shard 1 must not use
    env.update(MESSAGES_CLIENT_ID_1="shard-1", MESSAGES_CLIENT_SECRET_1="secret-1")
    env.update(MESSAGES_CLIENT_ID_0="shard-0", MESSAGES_CLIENT_SECRET_0=SECRET)  # not its own
    out = tmp_path / "shard-1.sqlite"
    code, stdout, err = await run(server, "--shard", "1/2", "--out", str(out), env=env)
    assert code == 0, err
    clients = {server._oauth.client_id_of(r.token) for r in server.resource_requests()}
    assert clients == {"shard-1"}
    assert SECRET not in stdout + err
    # Without a pair of its own, a shard takes the usual one.
    again = ("--shard", "1/2", "--out", str(tmp_path / "b.sqlite"))
    code, _, err = await run(server, *again, env=cli_env(server))
    assert code == 0, err
    clients = {server._oauth.client_id_of(r.token) for r in server.resource_requests()}
    assert clients == {"shard-1", server.client_id}


def test_a_shard_with_half_a_pair_of_its_own_is_told_which_half(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _only_these_variables(
        monkeypatch,
        MESSAGES_TOKEN_URL="http://127.0.0.1:9/token",
        MESSAGES_CLIENT_ID="everyone",
        MESSAGES_CLIENT_SECRET=SECRET,
        MESSAGES_CLIENT_ID_3="shard-3",
    )
    argv = ["export", "--shard", "3/4", "--out", str(tmp_path / "x.sqlite")]
    assert _cli.main(argv) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert "missing: MESSAGES_CLIENT_SECRET_3" in line
    assert SECRET not in line


def test_a_secret_on_the_command_line_is_refused_without_echo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for flag in ("--client-secret", "--access-token"):
        with pytest.raises(SystemExit) as exc:
            _cli.main(["export", flag, SECRET])
        assert exc.value.code == 2
        captured = capsys.readouterr()
        assert "environment" in captured.err
        assert SECRET not in captured.out + captured.err


def test_bad_filter_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli.main(["export", "--since", "yesterday"])
    assert exc.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err
    code = _cli.main(["export", "--since", "2026-02-01", "--until", "2026-01-01"])
    assert code == 2
    assert "after --until" in _one_clean_line(capsys.readouterr().err)


def test_naive_instants_are_utc() -> None:
    assert _cli._instant("2026-01-31") == datetime(2026, 1, 31, tzinfo=UTC)
    assert _cli._instant("2026-01-31T12:00:00Z") == datetime(2026, 1, 31, 12, tzinfo=UTC)
    aware = _cli._instant("2026-01-31T12:00:00+02:00")
    assert aware == datetime(2026, 1, 31, 10, tzinfo=UTC)


def test_resume_hint_repeats_the_command_without_fresh() -> None:
    hint = _cli._resume_hint(["export", "--fresh", "--out", "my dir", "--format", "jsonl"])
    assert hint == "messages-async export --out 'my dir' --format jsonl"


def test_resume_hint_names_the_command_as_it_can_be_typed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "my env" / "bin" / "messages-async"
    script.parent.mkdir(parents=True)
    script.write_text("")
    script.chmod(0o755)
    # Not on PATH (an environment that is not activated): the path it was run by.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _cli._invoked_as(str(script)) == f"'{script}'"
    monkeypatch.setenv("PATH", str(script.parent))  # activated
    assert _cli._invoked_as(str(script)) == "messages-async"
    assert (
        _cli._invoked_as("/x/messages_async/__main__.py") == f"{sys.executable} -m messages_async"
    )
    assert _cli._invoked_as("something-else") == "messages-async"


async def test_export_then_update_through_the_command(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, stdout, err = await run(server, "--out", str(out), "--format", "jsonl")
    assert code == 0, err
    assert "Export done" in stdout
    assert_exact(server, "jsonl", out)
    chat = server.chat_ids()[0]
    server.post_message(chat, "hello again")
    server.reset_stats()
    code, stdout, err = await run(server, "--out", str(out), "--format", "jsonl")
    assert code == 0, err
    assert "1 new" in stdout
    assert len(listings(server)) == len(server.chat_ids())
    assert_exact(server, "jsonl", out)


async def test_failing_chat_is_listed_and_exit_status_is_1(
    server: MessagesServer, tmp_path: Path
) -> None:
    # Credentials as a pre-issued token this time.
    env = _bare_env()
    env.update(
        MESSAGES_ACCESS_TOKEN=server.issue_token(["messages_read"]),
        MESSAGES_RESOURCE_URI=server.resource_uri,
    )
    good = server.chat_ids()[1]
    out = tmp_path / "x.sqlite"
    code, stdout, err = await run(
        server, "--out", str(out), "--chat", str(good), "--chat", "4242", env=env
    )
    assert code == 1, err
    assert "4242: HTTP 404" in stdout
    assert "Traceback" not in err
    assert_exact(server, "sqlite", out, [good])
    db = sqlite3.connect(out)
    try:
        error = db.execute("SELECT error FROM export_state WHERE chat_id = 4242").fetchone()[0]
        assert "404" in error
    finally:
        db.close()


async def test_since_and_until_flags_reach_the_server_as_utc(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "x.sqlite"
    code, _, err = await run(
        server, "--out", str(out), "--since", "2025-03-01", "--until", "2025-06-01T02:00:00+02:00"
    )
    assert code == 0, err
    firsts = [r for r in listings(server) if "cursor" not in r.query]
    assert firsts
    for record in firsts:
        sent_from = datetime.fromisoformat(record.query["period[from]"])
        sent_till = datetime.fromisoformat(record.query["period[till]"])
        assert sent_from == datetime(2025, 3, 1, tzinfo=UTC)
        assert sent_till == datetime(2025, 6, 1, tzinfo=UTC)


async def test_ctrl_c_stops_cleanly_with_130_and_a_resume_hint(tmp_path: Path) -> None:
    async with MessagesServer(
        chats=6, messages_per_chat=(200, 400), seed=9, extra_fields=True, latency=0.05
    ) as srv:
        out = tmp_path / "out.sqlite"
        args = ["--out", str(out), "--concurrency", "2"]
        proc = await start_cli(srv, *args)
        # Polling what the server has seen: the process gives no other signal of progress.
        while proc.returncode is None and len(listings(srv)) < 4:
            await asyncio.sleep(0.01)
        assert proc.returncode is None, "the export ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 130, stderr.decode()
        err = stderr.decode()
        assert "Traceback" not in err
        # Run as python -m messages_async, so that is what the hint repeats.
        assert f"{sys.executable} -m messages_async export --out {out} --concurrency 2" in err
        assert b"Export interrupted" in stdout
        db = sqlite3.connect(out)
        try:
            partial = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            db.close()
        assert 0 < partial < srv.all_message_count()

        proc = await start_cli(srv, *args)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert_exact(srv, "sqlite", out)


async def test_ctrl_c_while_signing_in_ends_at_once(tmp_path: Path) -> None:
    async with MessagesServer(chats=2, messages_per_chat=5) as srv:
        srv.inject(Fault.delay(30.0), path="oauth/token")  # a token endpoint that hangs
        proc = await start_cli(srv, "--out", str(tmp_path / "out.sqlite"))
        while proc.returncode is None and srv.token_request_count == 0:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):  # not the 30 s the token endpoint takes
            _, stderr = await proc.communicate()
        assert proc.returncode == 130, stderr.decode()
        assert "interrupted while signing in" in stderr.decode()
        assert "Traceback" not in stderr.decode()
        assert "Unclosed" not in stderr.decode()  # the HTTP session was closed too


def test_demo_exports_the_built_in_dataset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A small dataset: the command's path is the same, only the size differs.
    monkeypatch.setattr(_cli, "DEMO_CHATS", 6)
    monkeypatch.setattr(_cli, "DEMO_MESSAGES_PER_CHAT", (10, 120))
    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.001)
    out = tmp_path / "demo.sqlite"
    assert _cli.main(["export", "--demo", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Export done" in captured.out
    # Off a terminal, progress is one whole log line at a time, never wrapped.
    progress = [line for line in captured.err.splitlines() if "requests in flight" in line]
    assert progress, captured.err
    assert all(line.startswith("chats ") and "rate-limited" in line for line in progress)
    assert "0 failed" in captured.out
    db = sqlite3.connect(out)
    try:
        count = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        chats = db.execute("SELECT count(*) FROM export_state WHERE done = 1").fetchone()[0]
    finally:
        db.close()
    assert chats == 6
    assert count > 0
    # Run again: an update, nothing new.
    assert _cli.main(["export", "--demo", "--out", str(out)]) == 0
    assert "  messages:  0 new" in capsys.readouterr().out


def test_serve_is_delegated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli.main(["serve", "--help"])
    assert exc.value.code == 0
    assert "emulator" in capsys.readouterr().out


# --- an --out that cannot be used is refused first, with rc 2 ----------------------------------


async def _run_bare(*args: str) -> tuple[int, str, str]:
    """The command with no credentials at all (``--demo`` needs none)."""
    proc = await asyncio.create_subprocess_exec(
        *_python_cli(),
        *args,
        env=_bare_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


async def test_the_reported_unusable_outs_exit_2_before_the_demo_starts(tmp_path: Path) -> None:
    for fmt, out, says in (
        ("sqlite", str(tmp_path / "nonexistent" / "dir" / "x.sqlite"), "does not exist"),
        ("jsonl", "/proc/forbidden", "cannot create"),
    ):
        if out.startswith("/proc") and not HAS_PROC:
            continue
        code, stdout, err = await _run_bare("--demo", "--format", fmt, "--out", out)
        assert code == 2, err
        line = _one_clean_line(err)  # no demo banner, no traceback: the check came first
        assert out in line
        assert says in line
        assert stdout == ""
    assert _tree(tmp_path) == []  # nothing was created


@pytest.mark.parametrize(
    ("fmt", "where", "says"),
    [
        ("sqlite", "a-file/x.sqlite", "a-file is not a directory"),
        ("sqlite", "a-file/deeper/x.sqlite", "a-file is not a directory"),
        ("sqlite", "a-dir", "is a directory; the SQLite format needs a file path"),
        ("jsonl", "a-file", "is a file; the JSONL format needs a directory"),
        ("jsonl", "a-file/below", "a-file is not a directory"),
    ],
)
def test_what_is_wrong_with_an_out_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, where: str, says: str
) -> None:
    (tmp_path / "a-file").write_text("not an export")
    (tmp_path / "a-dir").mkdir()
    out = tmp_path / where
    before = _tree(tmp_path)
    assert _cli.main(["export", "--demo", "--format", fmt, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    line = _one_clean_line(captured.err)
    assert line.startswith(f"messages-async export: --out {out}")
    assert says in line
    assert captured.out == ""
    assert _tree(tmp_path) == before


async def test_unusable_out_is_refused_before_signing_in(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "missing" / "x.sqlite"
    code, _, err = await run(server, "--out", str(out))
    assert code == 2, err
    assert "does not exist" in _one_clean_line(err)
    assert server.token_request_count == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--format", "jsonl", "--sync-pages", "0"], "--sync-pages: the value must be at least 1"),
        (["--format", "jsonl", "--sync-pages", "x"], "--sync-pages: not an integer: 'x'"),
        (["--sync-pages", "4"], "--sync-pages applies to --format jsonl only, not sqlite"),
        (
            ["--format", "parquet", "--sync-pages", "4"],
            "--sync-pages applies to --format jsonl only, not parquet",
        ),
        (
            ["--format", "jsonl", "--parquet-part-rows", "100"],
            "--parquet-part-rows applies to --format parquet only, not jsonl",
        ),
        (["--parquet-part-rows", "100"], "--parquet-part-rows applies to --format parquet only"),
    ],
)
async def test_an_option_of_another_format_is_refused_before_signing_in(
    server: MessagesServer, tmp_path: Path, args: list[str], says: str
) -> None:
    code, stdout, err = await run(server, "--out", str(tmp_path / "out"), *args)
    assert code == 2, err
    assert says in err
    assert stdout == ""
    assert server.token_request_count == 0
    assert not (tmp_path / "out").exists()


# --- the same --since instant written another way is the same export -------------------------


async def test_same_instants_with_other_offsets_resume_the_same_export(
    server: MessagesServer, tmp_path: Path
) -> None:
    out = tmp_path / "x.sqlite"
    code, _, err = await run(
        server, "--out", str(out), "--since", "2025-06-01", "--until", "2026-01-01T00:00Z"
    )
    assert code == 0, err
    code, stdout, err = await run(
        server,
        "--out",
        str(out),
        "--since",
        "2025-06-01T02:00:00+02:00",
        "--until",
        "2025-12-31T19:00:00-05:00",
    )
    assert code == 0, err
    assert "  messages:  0 new" in stdout


# --- after a Ctrl-C, the summary counts what the store holds ----------------------------------


def _states(out: Path) -> dict[int, tuple[int, str | None]]:
    if not out.exists():  # connecting would create it
        return {}
    db = sqlite3.connect(out)
    try:
        rows = db.execute("SELECT chat_id, done, cursor FROM export_state").fetchall()
    finally:
        db.close()
    return {chat_id: (done, cursor) for chat_id, done, cursor in rows}


async def _wait_for_state(
    proc: asyncio.subprocess.Process, out: Path, chat: int, want: tuple[int, bool]
) -> None:
    """Until the chat's checkpoint has ``done`` and a cursor (or not) as wanted."""
    async with asyncio.timeout(30):
        while proc.returncode is None:
            with contextlib.suppress(sqlite3.OperationalError):  # no schema yet
                done, cursor = _states(out).get(chat, (0, None))
                if (done, cursor is not None) == want:
                    return
            await asyncio.sleep(0.02)
    raise AssertionError("the export ended before reaching the wanted checkpoint")


async def test_summary_after_ctrl_c_counts_what_the_store_holds(tmp_path: Path) -> None:
    async with MessagesServer(chats=1, messages_per_chat=250, seed=3) as srv:
        chat = srv.chat_ids()[0]
        out = tmp_path / "x.sqlite"
        args = ["--out", str(out), "--concurrency", "1"]
        # Run 1: the first page is stored with its cursor; the second hangs; Ctrl-C.
        srv.inject(Fault.delay(30.0), path="messages/", after=1, chat_id=chat)
        proc = await start_cli(srv, *args)
        await _wait_for_state(proc, out, chat, (0, True))
        proc.send_signal(signal.SIGINT)
        await proc.communicate()
        assert proc.returncode == 130
        srv.clear_faults()
        # Run 2 resumes the walk to the oldest page (the chat is then complete in the store),
        # and then catches up from the newest page: that request hangs, and Ctrl-C.
        srv.inject(Fault.delay(30.0), path="messages/", after=2, chat_id=chat)
        proc = await start_cli(srv, *args)
        await _wait_for_state(proc, out, chat, (1, False))
        proc.send_signal(signal.SIGINT)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 130, stderr.decode()
        assert _states(out)[chat][0] == 1
        summary = stdout.decode()
        assert "  chats:     1 complete, 0 failed, 0 not finished (of 1)" in summary, summary
        assert "250 stored for the complete chats" in summary, summary


def test_export_identity_compares_instants_not_spellings() -> None:
    a = ExportMeta(source="s", since="2025-06-01", until="2026-01-01T00:00:00Z")
    b = ExportMeta(source="s", since="2025-06-01T02:00:00+02:00", until="2025-12-31T19:00-05:00")
    assert a == b
    assert a.since == "2025-06-01T00:00:00+00:00"
    # Exports written before keep whatever spelling they were written with.
    assert ExportMeta.from_json({"version": 1, "source": "s", "since": b"x".decode()}).since == "x"
    assert ExportMeta(source="s", since="2025-06-01T00:00:01Z") != a


@pytest.mark.parametrize(("value", "says"), [("0", "positive, finite"), ("fast", "not a number")])
def test_a_bad_rate_limit_exits_2(
    capsys: pytest.CaptureFixture[str], value: str, says: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        _cli.main(["export", "--rate-limit", value])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


async def test_told_the_rate_the_export_meets_no_429(tmp_path: Path) -> None:
    async with MessagesServer(
        chats=12, messages_per_chat=(150, 400), seed=8, rate_limit=30, burst=3
    ) as server:
        out = tmp_path / "out.sqlite"
        code, _, err = await run(
            server, "--out", str(out), "--rate-limit", "30", "--concurrency", "8"
        )
        assert code == 0, err
        assert_exact(server, "sqlite", out)
        statuses = [r.status for r in server.resource_requests()]
        assert len(statuses) > 30
        assert 429 not in statuses
