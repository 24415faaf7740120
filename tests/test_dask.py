"""messages_async.export.dask on a real LocalCluster of 4 worker processes, against the emulator.

The emulator runs on its own event loop in a thread of this process, so the workers reach it
over loopback and the tests can read what it saw (listings per chat, token requests per
client id). Each shard signs in with a credential of its own. Every merged result is compared,
row for row and ``raw`` byte for byte, with one export made by a single process.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import distributed
import pytest
from test_export import export, listings
from test_pagination import _server_in_a_thread
from test_readme import _block, _section

from messages_async.export import ExportOptions, Shard, export_shard
from messages_async.export.dask import (
    ShardCredentials,
    ShardError,
    export_shards,
)
from messages_async.testing import MessagesServer

SHARDS = 4
SECRETS = [f"the-secret-of-shard-{i}-7f3a9c" for i in range(SHARDS)]

# The whole export, read back in a fixed order; ``raw`` as stored bytes, not as parsed JSON.
_TABLES = {
    "messages": "SELECT id, chat_id, CAST(raw AS BLOB), uid, message, created_at FROM messages "
    "ORDER BY id",
    "chats": "SELECT chat_id, CAST(raw AS BLOB), type, name, picture_url, members_count "
    "FROM chats ORDER BY chat_id",
    "export_state": "SELECT chat_id, done, newest_id, messages, error FROM export_state "
    "ORDER BY chat_id",
    "meta": "SELECT key, value FROM meta WHERE key = 'export'",
}


def _tables(path: Path | str) -> dict[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(path)
    try:
        return {name: db.execute(query).fetchall() for name, query in _TABLES.items()}
    finally:
        db.close()


def _assert_same_export(merged: Path | str, reference: Path) -> None:
    got, want = _tables(merged), _tables(reference)
    assert len(got["messages"]) == len(want["messages"]) > 0
    for name in _TABLES:
        assert got[name] == want[name], name


@pytest.fixture(scope="module")
def server() -> Iterator[MessagesServer]:
    with _server_in_a_thread(
        chats=16, messages_per_chat=(120, 260), seed=16, extra_fields=True
    ) as emulator:
        for i, secret in enumerate(SECRETS):
            emulator.register_client(f"shard-{i}", secret)
        yield emulator


@pytest.fixture(scope="module")
def reference(server: MessagesServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same export made by one process with one credential."""
    out = tmp_path_factory.mktemp("single") / "whole.sqlite"
    stats = asyncio.run(export(server, "sqlite", out))
    assert stats.failures == []
    assert stats.chats_done == 16
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.Client]:
    with (
        distributed.LocalCluster(
            n_workers=SHARDS,
            threads_per_worker=1,
            processes=True,  # a worker is a process of its own, so it can be killed
            # Loopback only, on ports the system picks: the scheduler, its workers, and the
            # HTTP server the scheduler starts even without a dashboard (8787 by default).
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as local,
        distributed.Client(local) as client,
    ):
        yield client


def _credentials(server: MessagesServer, secrets: list[str] = SECRETS) -> list[ShardCredentials]:
    return [
        ShardCredentials(token_url=server.token_url, client_id=f"shard-{i}", client_secret=s)
        for i, s in enumerate(secrets)
    ]


def _no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def _chats_of(server: MessagesServer, index: int) -> set[int]:
    return {c for c in server.chat_ids() if Shard(index, SHARDS).owns(c)}


# --- the adapter, exported for real --------------------------------------------------------------


def test_four_shards_with_four_credentials_merge_into_exactly_one_export(
    server: MessagesServer, reference: Path, cluster: distributed.Client, tmp_path: Path
) -> None:
    exchanged = len(server.token_requests)
    result = export_shards(cluster, tmp_path / "export.sqlite", _credentials(server))
    _assert_same_export(tmp_path / "export.sqlite", reference)
    assert result.out == str(tmp_path / "export.sqlite")
    assert result.failures == ()
    assert result.merge.parts == SHARDS
    assert [r.shard for r in result.shards] == [f"{i}/{SHARDS}" for i in range(SHARDS)]
    for i, report in enumerate(result.shards):
        assert report.path == str(tmp_path / "export.shards" / f"shard-{i}-of-4.sqlite")
        assert report.chats_total == report.chats_done == len(_chats_of(server, i))
    # Each shard signed in with its own credential (the server's limit is per client id).
    ids = {form.get("client_id") for form in server.token_requests[exchanged:]}
    assert ids == {f"shard-{i}" for i in range(SHARDS)}
    # Run again: every shard resumes its store (nothing new), and the merge adds nothing.
    again = export_shards(cluster, tmp_path / "export.sqlite", _credentials(server))
    assert sum(r.messages for r in again.shards) == 0
    _assert_same_export(tmp_path / "export.sqlite", reference)


def _task_reprs(dask_scheduler: Any) -> list[str]:
    """Run on the scheduler: what its dashboard and logs can show of each task, arguments
    included."""
    return [
        f"{key!r} {ts.run_spec!r} {getattr(ts.run_spec, 'args', None)!r}"
        for key, ts in dask_scheduler.tasks.items()
    ]


def test_a_worker_killed_mid_shard_is_rerun_and_resumes_from_its_store(
    server: MessagesServer, reference: Path, cluster: distributed.Client, tmp_path: Path
) -> None:
    out = tmp_path / "export.sqlite"
    victim = _chats_of(server, 0)
    before = len(listings(server))

    def walked() -> int:
        """Pages of shard 0's chats the server has answered so far."""
        return sum(
            1
            for r in listings(server)[before:]
            if int(r.query["chat_id"]) in victim and r.status == 200
        )

    # Slower pages and small ones: shard 0 takes long enough to be killed in the middle.
    server.latency = 0.03
    options = ExportOptions(concurrency=2, page_size=20)
    try:
        with ThreadPoolExecutor(1) as caller:
            running = caller.submit(
                export_shards, cluster, out, _credentials(server), options=options
            )
            deadline = time.monotonic() + 30
            while walked() < 8:
                assert not running.done(), running.result()
                assert time.monotonic() < deadline, "shard 0 never got going"
                time.sleep(0.01)
            where = [
                w for w, keys in cluster.processing().items() if any("-shard-0-" in k for k in keys)
            ]
            assert len(where) == 1, cluster.processing()
            (worker,) = where
            # What the scheduler holds of the tasks names no secret.
            shown = " ".join(cluster.run_on_scheduler(_task_reprs))
            assert "client_secret='***'" in shown
            _no_secret_in(shown)
            pid = cluster.run(os.getpid, workers=[worker])[worker]
            pages_when_killed = walked()
            os.kill(pid, signal.SIGKILL)
            result = running.result(timeout=60)
    finally:
        server.latency = 0.0
    rerun = result.shards[0]
    assert rerun.pid != pid  # run again in another process (the nanny starts a new worker)
    # Resumed, not started over: the pages committed before the kill were not fetched again.
    assert 0 < rerun.messages < rerun.stored_messages, rerun
    total_pages = sum(-(-len(server.messages(c)) // 20) for c in victim)
    assert pages_when_killed < total_pages
    assert walked() < total_pages + pages_when_killed
    _assert_same_export(out, reference)


def test_a_shard_that_fails_names_itself_and_nothing_is_merged(
    server: MessagesServer, cluster: distributed.Client, tmp_path: Path
) -> None:
    secrets = [*SECRETS]
    secrets[2] = "not-the-secret-of-shard-2"
    with pytest.raises(ShardError) as caught:
        export_shards(cluster, tmp_path / "export.sqlite", _credentials(server, secrets))
    said = str(caught.value)
    assert "1 of 4 shards failed" in said
    assert "(shard 2/4: AuthError: token exchange failed with HTTP 401 invalid_client" in said
    assert list(caught.value.failed) == ["2/4"]
    assert not (tmp_path / "export.sqlite").exists()  # nothing merged
    # The three others are complete in their stores: running again resumes them.
    for i in (0, 1, 3):
        assert (tmp_path / "export.shards" / f"shard-{i}-of-4.sqlite").exists()
    # The worker logged the failed task ("Compute Failed" with the task's arguments),
    # and neither that nor the error shows a secret.
    logs = " ".join(str(line) for lines in cluster.get_worker_logs().values() for line in lines)
    assert "shard-2-of-4" in logs
    _no_secret_in(logs + said + repr(caught.value.failed))
    assert "not-the-secret-of-shard-2" not in logs + said


def _recipe_env(server: MessagesServer, **more: str) -> dict[str, str]:
    """The environment of a README recipe: the emulator, and one credential per shard."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESSAGES_", "DASK_", "RAY_"))}
    env["MESSAGES_TOKEN_URL"] = server.token_url
    for i, secret in enumerate(SECRETS):
        env[f"MESSAGES_CLIENT_ID_{i}"] = f"shard-{i}"
        env[f"MESSAGES_CLIENT_SECRET_{i}"] = secret
    return {**env, **more}


def _run_recipe(heading: str, env: dict[str, str], cwd: Path) -> str:
    script = cwd / "recipe.py"
    script.write_text(_block(_section(heading)))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _no_secret_in(done.stdout + done.stderr)
    return done.stdout


def test_the_readme_dask_recipe_runs_as_written(
    server: MessagesServer, reference: Path, cluster: distributed.Client, tmp_path: Path
) -> None:
    env = _recipe_env(server, DASK_SCHEDULER_ADDRESS=cluster.scheduler.address)
    said = _run_recipe("### Dask distributed", env, tmp_path)
    assert f"{len(_tables(reference)['messages']):,} messages in " in said
    _assert_same_export(tmp_path / "export.sqlite", reference)


@pytest.mark.skipif(
    os.environ.get("MESSAGES_ASYNC_RAY_TEST") != "1",
    reason=(
        "opt-in (MESSAGES_ASYNC_RAY_TEST=1, with ray installed): a local Ray cluster listens "
        "on every interface and the machine's own address, and the suite keeps to loopback"
    ),
)
def test_the_readme_ray_recipe_runs_as_written(
    server: MessagesServer, reference: Path, tmp_path: Path
) -> None:
    said = _run_recipe("### Ray", _recipe_env(server), tmp_path)
    assert f"{len(_tables(reference)['messages']):,} messages in export.sqlite" in said
    _assert_same_export(tmp_path / "export.sqlite", reference)


# --- arguments, checked before anything runs -----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        ({"client": "tcp://127.0.0.1:8786"}, TypeError, "must be a distributed.Client"),
        ({"credentials": []}, ValueError, "one ShardCredentials per shard"),
        ({"credentials": ["id:secret"]}, TypeError, "must be a ShardCredentials, got str"),
        ({"credentials": "id:secret"}, TypeError, "a sequence of ShardCredentials"),
        ({"options": ExportOptions(shard=Shard(0, 2))}, ValueError, "leave it unset"),
        ({"options": {"concurrency": 2}}, TypeError, "must be an ExportOptions"),
        ({"out": "."}, ValueError, "is a directory; the merged export is a SQLite file"),
        ({"out": "no/such/dir/x.sqlite"}, ValueError, "does not exist"),
        ({"retries": -1}, ValueError, "retries must be at least 0"),
        ({"source": ""}, TypeError, "source must be a non-empty str"),
        ({"parts": "file.txt"}, ValueError, "is a file; the shards' stores go in a directory"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_submitted(
    server: MessagesServer,
    cluster: distributed.Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, Any],
    error: type[Exception],
    says: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("")
    arguments: dict[str, Any] = {
        "client": cluster,
        "out": "export.sqlite",
        "credentials": _credentials(server),
        **change,
    }
    before = len(server.requests)
    with pytest.raises(error, match=says):
        export_shards(**arguments)
    assert len(server.requests) == before
    assert not (tmp_path / "export.shards").exists()


async def test_the_blocking_calls_refuse_to_run_inside_an_event_loop(
    server: MessagesServer, cluster: distributed.Client, tmp_path: Path
) -> None:
    (credentials, *_) = _credentials(server)
    for call in (
        lambda: export_shards(cluster, tmp_path / "x.sqlite", [credentials]),
        lambda: export_shard(Shard(0, 1), tmp_path / "x.sqlite", credentials),
    ):
        with pytest.raises(RuntimeError, match=r"await asyncio.to_thread\(export_shard"):
            call()
    assert os.listdir(tmp_path) == []  # nothing created either


@pytest.mark.parametrize(
    ("given", "error", "says"),
    [
        ({"client_id": "a", "client_secret": "s"}, ValueError, "missing token_url"),
        (
            {"token_url": "http://127.0.0.1:1/t", "client_id": "a", "client_secret": ""},
            TypeError,
            "client_secret must be a non-empty str",
        ),
        ({"access_token": "tok"}, ValueError, "access_token needs resource_uri"),
        (
            {"access_token": "bad token", "resource_uri": "http://127.0.0.1:1/"},
            ValueError,
            "not RFC 6750 token syntax",
        ),
    ],
)
def test_credentials_are_checked_by_the_clients_rules(
    given: dict[str, str], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says) as caught:
        ShardCredentials(**given)
    assert "bad token" not in str(caught.value)


def test_credentials_never_show_their_secrets_but_travel_to_a_worker() -> None:
    secret = ShardCredentials(
        token_url="https://auth.example.com/oauth/token",
        client_id="shard-0",
        client_secret="s3cr3t-value",
    )
    token = ShardCredentials(access_token="t0k3n", resource_uri="https://api.example.com/v1/")
    assert (
        repr(secret)
        == str(secret)
        == f"{secret}"
        == (
            "ShardCredentials(token_url='https://auth.example.com/oauth/token', "
            "client_id='shard-0', client_secret='***')"
        )
    )
    assert "t0k3n" not in repr(token)
    assert "s3cr3t-value" not in repr([secret])
    for given in (secret, token):
        back = pickle.loads(pickle.dumps(given))
        assert repr(back) == repr(given)
        assert back.client_id == given.client_id


# --- the library never imports Dask --------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_core_library_does_not_import_dask() -> None:
    done = _python(
        "import sys, messages_async, messages_async.export, messages_async._cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "assert not loaded, loaded\n"
    )
    assert done.returncode == 0, done.stderr


def test_without_dask_the_import_names_the_extra() -> None:
    done = _python(
        "import sys\n"
        "sys.modules['distributed'] = None  # as if not installed\n"
        "import messages_async.export.dask\n"
    )
    assert done.returncode == 1
    assert "ImportError: messages_async.export.dask needs Dask distributed: " in done.stderr
    assert "pip install 'messages-async[dask]'" in done.stderr
