"""The Kubernetes recipe in docs/kubernetes/, run as written: an Indexed Job's pods, each
with its own credential from the Secret, then the merge Job, against the emulator.

Kubernetes itself is not here; what it does to a container's command is: it sets
``JOB_COMPLETION_INDEX`` in each pod of an Indexed Job, puts the Secret's keys into the
environment (``envFrom``), expands ``$(NAME)`` in ``command`` and ``args`` (``expand``), and
runs the result in ``workingDir``, here the shared volume (a temporary directory).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_merge import assert_same_export

from messages_async.export import shard_of
from messages_async.testing import MessagesServer

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "docs" / "kubernetes"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of ``$(NAME)`` in a container's command and args: ``$$`` is a
    ``$``; a name that is not defined, and any other ``$``, stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
            continue
        following = text[i + 1]
        end = text.find(")", i + 2) if following == "(" else -1
        if following == "$":
            out.append("$")
        elif end != -1:
            name = text[i + 2 : end]
            out.append(env.get(name, f"$({name})"))
            i = end + 1
            continue
        else:
            out.append("$" + following)
        i += 2
    return "".join(out)


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("--shard $(JOB_COMPLETION_INDEX)/4", "--shard 2/4"),
        ("$$(env | sed x)", "$(env | sed x)"),  # escaped: the shell's own substitution
        ("$(UNDEFINED) $HOME $", "$(UNDEFINED) $HOME $"),
        ("\\$MESSAGES_CLIENT_ID_$(JOB_COMPLETION_INDEX)", "\\$MESSAGES_CLIENT_ID_2"),
        ("$(unclosed", "$(unclosed"),
    ],
)
def test_what_kubernetes_does_to_a_command(text: str, expanded: str) -> None:
    assert expand(text, {"JOB_COMPLETION_INDEX": "2"}) == expanded


def _documents() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _parts() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """The Secret, the export Job, the merge Job and the claim they share."""
    docs = _documents()
    (secret,) = [d for (kind, _), d in docs.items() if kind == "Secret"]
    jobs = [d for (kind, _), d in docs.items() if kind == "Job"]
    (export,) = [j for j in jobs if j["spec"].get("completionMode") == "Indexed"]
    (merge,) = [j for j in jobs if j is not export]
    (claim,) = [name for (kind, name) in docs if kind == "PersistentVolumeClaim"]
    return secret, export, merge, claim


def _container(job: dict[str, Any], claim: str) -> dict[str, Any]:
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim  # the one shared volume
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    # The commands name their stores relative to the volume: the test's directory is it.
    assert container["workingDir"] == mount["mountPath"]
    return container


def test_the_recipe_is_an_indexed_job_on_a_shared_volume_then_a_merge() -> None:
    secret, export, merge, claim = _parts()
    spec = export["spec"]
    assert spec["completions"] == spec["parallelism"]
    script = " ".join(_container(export, claim)["args"])
    assert f"--shard $(JOB_COMPLETION_INDEX)/{spec['completions']}" in script
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # failures go to the Job
    # Exit 2 (bad usage, refused credentials) is not retried; exit 1 (an outage) is.
    (fatal, *_) = spec["podFailurePolicy"]["rules"]
    assert fatal["action"] == "FailJob"
    assert fatal["onExitCodes"]["values"] == [2]
    merge_args = _container(merge, claim)["args"]
    assert [f"shard-{i}" for i in range(spec["completions"])] == merge_args[3:]
    keys = set(secret["stringData"])
    for i in range(spec["completions"]):
        assert {f"MESSAGES_CLIENT_ID_{i}", f"MESSAGES_CLIENT_SECRET_{i}"} <= keys


async def _run_container(
    container: dict[str, Any], env: dict[str, str], volume: Path
) -> tuple[int, str]:
    env = {**env, **{e["name"]: e["value"] for e in container.get("env", [])}}
    argv = [expand(word, env) for word in [*container["command"], *container.get("args", [])]]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=volume, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _pod_environment() -> dict[str, str]:
    """No credentials but those the test gives, and the ``messages-async`` command on PATH."""
    bin_dir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bin_dir, "messages-async"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGES_")}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


async def test_the_jobs_as_written_give_exactly_one_export(tmp_path: Path) -> None:
    secret, export, merge, claim = _parts()
    shards = export["spec"]["completions"]
    volume = tmp_path / "volume"
    volume.mkdir()
    base = _pod_environment()
    async with MessagesServer(chats=16, messages_per_chat=(0, 40)) as server:
        values = {"MESSAGES_TOKEN_URL": server.token_url}
        for i in range(shards):
            server.register_client(f"shard-{i}", f"secret-{i}")
            values[f"MESSAGES_CLIENT_ID_{i}"] = f"shard-{i}"
            values[f"MESSAGES_CLIENT_SECRET_{i}"] = f"secret-{i}"
        assert set(secret["stringData"]) == set(values)  # the keys the manifest names
        container = _container(export, claim)
        assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
        pods = [
            _run_container(container, {**base, **values, "JOB_COMPLETION_INDEX": str(i)}, volume)
            for i in range(shards)
        ]
        for status, err in await asyncio.gather(*pods):  # in parallel, as the Job runs them
            assert status == 0, err
        # Each pod exported its own chats with its own credential.
        seen: dict[int, set[str | None]] = {}
        for r in server.resource_requests():
            if r.path == "messages/" and "chat_id" in r.query:
                client = server._oauth.client_id_of(r.token)
                seen.setdefault(int(r.query["chat_id"]), set()).add(client)
        assert seen
        for chat, clients in seen.items():
            assert clients == {f"shard-{shard_of(chat, shards)}"}, chat
        status, err = await _run_container(_container(merge, claim), {**base}, volume)
        assert status == 0, err
        # What one process with one credential exports.
        single = {
            **base,
            "MESSAGES_TOKEN_URL": server.token_url,
            "MESSAGES_CLIENT_ID": server.client_id,
            "MESSAGES_CLIENT_SECRET": server.client_secret,
        }
        whole = [sys.executable, "-m", "messages_async", "export", "--format", "jsonl"]
        proc = await asyncio.create_subprocess_exec(
            *whole, "--out", str(tmp_path / "whole"), env=single, stderr=asyncio.subprocess.PIPE
        )
        _, err_bytes = await proc.communicate()
        assert proc.returncode == 0, err_bytes
    merge_out = _container(merge, claim)["args"][2]
    assert_same_export("jsonl", volume / merge_out, tmp_path / "whole")
