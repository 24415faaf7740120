"""The pytest plugin, as a bot author uses it: pytest runs in a subprocess on small test files.

The plugin is loaded two ways: explicitly (``-p messages_async.testing._plugin``, with entry
point auto-loading off so it cannot be registered twice) and through the installed ``pytest11``
entry point. The README's example test (``examples/test_echo_bot.py``) runs the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "messages_async.testing._plugin"

INI = """\
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

BOT_TESTS = """
import asyncio

import pytest

import messages_async as ma
from messages_async.testing import Fault

{pytestmark}


async def pong_once(client):
    async for chat_id, msg in client.messages.watch(interval=0.02):
        if msg.uid != client.user_id:
            await client.messages.add(chat_id, "pong")
            return


async def test_defaults(messages_server, messages_client):
    assert len(messages_server.chat_ids()) == 3
    assert messages_client.user_id == messages_server.user_id
    chats = await messages_client.messages.chats()
    assert [c.chat_id for c in chats] == messages_server.chat_ids()


@pytest.mark.messages_server(chats=6, seed=4)
async def test_marker(messages_server):
    assert len(messages_server.chat_ids()) == 6


class TestOverrides:
    @pytest.fixture
    def messages_server_options(self):
        return {{"chats": 2, "messages_per_chat": 1}}

    @pytest.fixture
    def messages_client_options(self):
        return {{"max_retries": 0}}

    async def test_options(self, messages_server, messages_client):
        assert len(messages_server.chat_ids()) == 2
        messages_server.inject(Fault.status(503), path="messages/chats/")
        with pytest.raises(ma.ServerError):
            await messages_client.messages.chats()


async def test_bot(messages_server, messages_client, messages_wait_polled, messages_wait_for):
    bot = asyncio.create_task(pong_once(messages_client))
    try:
        await messages_wait_polled()
        chat = messages_server.chat_ids()[1]
        messages_server.post_message(chat, "ping", uid=99)
        reply = await messages_wait_for(chat, lambda m: m["message"] == "pong")
        assert reply["uid"] == messages_client.user_id
        await asyncio.wait_for(bot, 10)
    finally:
        bot.cancel()


async def slow_starting_bot(client):
    await asyncio.sleep(0.3)  # sets itself up before it watches
    await pong_once(client)


async def test_wait_polled_waits_for_the_bots_watch(
    messages_server, messages_client, messages_wait_polled, messages_wait_for
):
    # The test's own listings must not count as the bot having polled.
    for chat in messages_server.chat_ids():
        await messages_client.messages.list(chat, limit=1)
    bot = asyncio.create_task(slow_starting_bot(messages_client))
    try:
        await messages_wait_polled()
        chat = messages_server.chat_ids()[0]
        messages_server.post_message(chat, "ping", uid=99)
        await messages_wait_for(chat, lambda m: m["message"] == "pong")
        await asyncio.wait_for(bot, 10)
    finally:
        bot.cancel()


async def test_helpers_name_a_chat_the_emulator_does_not_have(
    messages_server, messages_wait_polled, messages_wait_for
):
    with pytest.raises(LookupError, match="no chat 999999; its chats are 20"):
        await messages_wait_for(999999, lambda m: True)
    with pytest.raises(LookupError, match="messages_wait_polled: the emulator has no chat 999999"):
        await messages_wait_polled([messages_server.chat_ids()[0], 999999])
    with pytest.raises(TypeError, match="predicate"):
        await messages_wait_for(messages_server.chat_ids()[0], "pong")


async def test_post_message_posts_the_text_it_is_given(messages_server):
    chat = messages_server.chat_ids()[0]
    assert messages_server.post_message(chat, "")["message"] == ""
    assert messages_server.messages(chat)[0]["message"] == ""
    assert messages_server.post_message(chat)["message"]  # no text at all: some random text


CLIENTS = []


async def test_client_is_kept(messages_client):
    CLIENTS.append(messages_client)


async def test_client_was_closed_after_its_test():
    (client,) = CLIENTS
    with pytest.raises(ma.ClientClosedError):
        client.messages.watch()
"""

FAILING = """
async def test_wrong(messages_server):
    assert len(messages_server.chat_ids()) == 99
"""


def entry_point_installed() -> bool:
    return any(
        ep.name == "messages_async" for ep in importlib.metadata.entry_points(group="pytest11")
    )


def run_pytest(
    tmp_path: Path, *targets: str, mode: str = "auto", autoload: bool = False
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(INI.format(mode=mode))
    env = dict(os.environ)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if autoload:
        env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    else:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        args += ["-p", "pytest_asyncio.plugin", "-p", PLUGIN]
    args += ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), *targets]
    return subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def write_bot_tests(tmp_path: Path, *, strict: bool = False) -> str:
    pytestmark = "pytestmark = pytest.mark.asyncio" if strict else ""
    path = tmp_path / "test_bot.py"
    path.write_text(textwrap.dedent(BOT_TESTS.format(pytestmark=pytestmark)))
    return str(path)


def test_fixtures_with_the_plugin_loaded_explicitly(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, write_bot_tests(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 passed" in result.stdout


def test_fixtures_in_pytest_asyncio_strict_mode(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, write_bot_tests(tmp_path, strict=True), mode="strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 passed" in result.stdout


def test_a_failing_bot_test_is_reported_as_failing(tmp_path: Path) -> None:
    path = tmp_path / "test_failing.py"
    path.write_text(FAILING)
    result = run_pytest(tmp_path, str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout


def test_the_readme_example_test_passes(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, str(ROOT / "examples" / "test_echo_bot.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


@pytest.mark.skipif(
    not entry_point_installed(),
    reason="the pytest11 entry point 'messages_async' is not installed (pip install -e .)",
)
def test_fixtures_through_the_installed_entry_point(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, write_bot_tests(tmp_path), autoload=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 passed" in result.stdout


def test_the_readme_set_up_runs_the_example_without_a_warning(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Testing a bot: the pytest plugin") :]
    toml = section[section.index("```toml\n") + len("```toml\n") :]
    (tmp_path / "pyproject.toml").write_text(toml[: toml.index("```")])
    for name in ("echo_bot.py", "test_echo_bot.py"):
        (tmp_path / name).write_text((ROOT / "examples" / name).read_text())
    env = dict(os.environ)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the plugins a bot author has, and only those
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "pytest_asyncio.plugin",
            "-p",
            PLUGIN,
            "-W",
            "error::pytest.PytestDeprecationWarning",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 passed" in result.stdout
    assert "asyncio_default_fixture_loop_scope" not in output
    assert "warning" not in output.lower()
