"""A sharded export run on a Dask cluster: one task per shard, then one merge.

Needs the ``dask`` extra (``pip install 'messages-async[dask]'``); nothing else in the library
imports Dask. ::

    from distributed import Client
    from messages_async.export.dask import ShardCredentials, export_shards

    credentials = [ShardCredentials(token_url=..., client_id=..., client_secret=...), ...]
    with Client("tcp://scheduler:8786") as client:
        result = export_shards(client, "/shared/export.sqlite", credentials)

``export_shards`` splits the export into one shard per credential (``Shard(i, N)``,
``_shard.py``), maps them over the cluster with ``Client.map(..., pure=False)``, one
synchronous task per shard running its own event loop (``asyncio.run``) with its own client,
and each shard exports into its own SQLite store (``PARTS/shard-I-of-N.sqlite``). When every
shard has finished, the stores are merged into ``OUT`` (``_merge.py``).

Everything is resumable, as any export is: a shard whose worker dies is run again by the
scheduler (up to ``distributed.scheduler.allowed-failures`` times) and goes on from the last
page its store committed; calling ``export_shards`` again with the same ``OUT`` and ``PARTS``
resumes or updates every shard, and the merge adds only what is new. The stores and ``OUT``
must therefore be on storage that every worker and the caller see at the same path (a shared
volume; any directory on a single machine).

Credentials travel to the workers inside the task's arguments, which the scheduler holds and
its dashboard and logs may show: :class:`ShardCredentials` prints its secrets as ``***``
everywhere (``repr``, ``str``, the task's repr in "Compute Failed" logs), and only pickling
(the scheduler sending the task to a worker) carries the values. Task keys name the shard
only. On a cluster spread over machines, configure TLS (``distributed.security.Security``) so
that the task messages are encrypted on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

try:
    import distributed
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "messages_async.export.dask needs Dask distributed: pip install 'messages-async[dask]'"
    ) from exc

from .._checks import count
from .._cli import DEFAULT_MAX_UNREACHABLE, _client_options
from .._client import Client
from .._secret import Secret
from ._merge import MergeStats, merge_sqlite, merged_meta, read_meta
from ._runner import ChatFailure, Exporter, ExportOptions
from ._shard import Shard
from ._sqlite import SqliteStore
from ._state import ExportMeta

__all__ = ["ShardCredentials", "ShardError", "ShardReport", "ShardedExport", "export_shards"]

logger = logging.getLogger("messages_async.export")


class ShardCredentials:
    """One shard's credentials: ``token_url``, ``client_id`` and ``client_secret`` for a
    client-credentials exchange, or a pre-issued ``access_token`` with ``resource_uri``.

    Checked at once by the same rules as :class:`messages_async.Client` (``TypeError`` or
    ``ConfigurationError`` saying what to fix). The secret and the token are never shown:
    ``repr`` and ``str`` print ``***``. Unlike the library's own secrets, this object can be
    pickled, so that a Dask scheduler can send it to the worker that runs the shard.
    """

    __slots__ = ("_access_token", "_client_id", "_client_secret", "_resource_uri", "_token_url")

    def __init__(
        self,
        *,
        token_url: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        access_token: str | None = None,
        resource_uri: str | None = None,
    ) -> None:
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = (
            None if client_secret is None else _secret("client_secret", client_secret)
        )
        self._access_token = None if access_token is None else _secret("access_token", access_token)
        self._resource_uri = resource_uri
        del client_secret, access_token  # only the wrapped values stay in this frame
        self.client()  # the client's own checks; it opens nothing until it is used

    @property
    def client_id(self) -> str | None:
        return self._client_id

    def client(self, **options: Any) -> Client:
        """A new, unopened client with these credentials (``options``: the other arguments of
        :class:`messages_async.Client`); it only reads, so it asks for ``messages_read``."""
        secret, token = self._client_secret, self._access_token
        return Client(
            token_url=self._token_url,
            client_id=self._client_id,
            client_secret=None if secret is None else secret.reveal(),
            access_token=None if token is None else token.reveal(),
            resource_uri=self._resource_uri,
            scopes=("messages_read",),
            **options,
        )

    def __repr__(self) -> str:
        if self._access_token is not None:
            return f"ShardCredentials(access_token='***', resource_uri={self._resource_uri!r})"
        return (
            f"ShardCredentials(token_url={self._token_url!r}, client_id={self._client_id!r}, "
            "client_secret='***')"
        )

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        # Deliberately picklable (the scheduler sends it to a worker); the pickle is bytes
        # in the scheduler's memory, never a repr.
        secret, token = self._client_secret, self._access_token
        return (
            _credentials,
            (
                self._token_url,
                self._client_id,
                None if secret is None else secret.reveal(),
                None if token is None else token.reveal(),
                self._resource_uri,
            ),
        )


def _credentials(
    token_url: str | None,
    client_id: str | None,
    client_secret: str | None,
    access_token: str | None,
    resource_uri: str | None,
) -> ShardCredentials:
    return ShardCredentials(
        token_url=token_url,
        client_id=client_id,
        client_secret=client_secret,
        access_token=access_token,
        resource_uri=resource_uri,
    )


def _secret(name: str, value: object) -> Secret:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str")
    return Secret(value)


@attrs.frozen
class ShardReport:
    """What one shard's (last, successful) run did, as its worker reported it.

    Attributes:
        shard: ``"I/N"``.
        path: The shard's store.
        worker: The address of the Dask worker that ran it.
        chats_total: The shard's chats.
        chats_done: Chats complete in its store.
        failures: Chats that failed for good in this run (a later run tries them again).
        messages: Messages new in this run (fewer than ``stored_messages`` when it resumed).
        stored_messages: Messages its store holds for the complete chats.
        pages: Pages fetched in this run.
        elapsed: Seconds this run took.
    """

    shard: str
    path: str
    worker: str
    chats_total: int
    chats_done: int
    failures: tuple[ChatFailure, ...]
    messages: int
    stored_messages: int
    pages: int
    elapsed: float


@attrs.frozen
class ShardedExport:
    """What :func:`export_shards` did: every shard's report and the merge into ``out``."""

    out: str
    shards: tuple[ShardReport, ...]
    merge: MergeStats

    @property
    def failures(self) -> tuple[ChatFailure, ...]:
        """Chats that failed for good in some shard (running again retries them)."""
        return tuple(f for report in self.shards for f in report.failures)


class ShardError(Exception):
    """A shard could not be exported (after Dask's retries); nothing was merged.

    ``failed`` maps each failed shard (``"I/N"``) to what went wrong. The stores keep every
    page committed, so running :func:`export_shards` again resumes every shard.
    """

    def __init__(self, message: str, failed: Mapping[str, str]) -> None:
        super().__init__(message)
        self.failed = dict(failed)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.failed))


@attrs.frozen
class _ShardTask:
    """Everything a worker needs for one shard; its repr shows no secret."""

    shard: Shard
    path: str
    credentials: ShardCredentials
    options: ExportOptions
    source: str | None


def export_shards(
    client: distributed.Client,
    out: str | os.PathLike[str],
    credentials: Sequence[ShardCredentials],
    *,
    parts: str | os.PathLike[str] | None = None,
    options: ExportOptions | None = None,
    source: str | None = None,
    retries: int = 0,
) -> ShardedExport:
    """Export in ``len(credentials)`` shards over the Dask cluster of ``client``, then merge
    them into the SQLite export ``out``. Blocks until done.

    Args:
        client: A connected ``distributed.Client`` (synchronous).
        out: The merged export (a SQLite file; an existing export of the same source and
            filters is added to, as ``messages-async merge`` does).
        credentials: One per shard: shard ``I`` of ``N = len(credentials)`` runs with
            ``credentials[I]``. The same object may be given for several shards.
        parts: The directory of the shards' stores, ``shard-I-of-N.sqlite``; created when
            missing. Default: ``out`` without its extension, plus ``.shards``.
        options: What to export (``ExportOptions``; ``shard`` must be left unset: each task
            sets its own). ``concurrency`` is per shard.
        source: What the export is of (``ExportMeta.source``); default: the API URI each
            shard's client signs in to, which must then be the same for every shard.
        retries: Times Dask runs a shard again after it raised (``Client.map(retries=)``).
            A shard whose worker died is run again whatever this says.

    Returns:
        Each shard's report and the merge's counts. Chats that failed for good are listed in
        ``failures`` (they are merged as failed; running again retries them).

    Raises:
        TypeError, ValueError: a bad argument, before anything is submitted.
        ShardError: a shard failed (refused credentials, an unwritable store, an outage
            outlasting the retries, a worker killed too often); nothing was merged.
        StoreError: the stores are not shards of one export, or ``out`` is another export.
    """
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
    retries = count("retries", retries)
    tasks = _tasks(out, credentials, parts, options, source)
    total = len(tasks)
    run = uuid.uuid4().hex[:12]
    # Explicit keys: the dashboard names the shard, and never shows an argument.
    keys = [f"messages-async-export-shard-{t.shard.index}-of-{total}-{run}" for t in tasks]
    futures = client.map(_run_shard, tasks, key=keys, pure=False, retries=retries)
    try:
        distributed.wait(futures)  # type: ignore[no-untyped-call]
        reports: list[ShardReport] = []
        failed: dict[str, str] = {}
        for task, future in zip(tasks, futures, strict=True):
            if future.status == "finished":
                reports.append(future.result())
            else:
                error = future.exception()  # type: ignore[no-untyped-call]
                failed[str(task.shard)] = f"{type(error).__name__}: {error}"
    finally:
        client.cancel(futures)  # type: ignore[no-untyped-call]
    if failed:
        said = "; ".join(f"shard {shard}: {why}" for shard, why in failed.items())
        raise ShardError(
            f"{len(failed)} of {total} shards failed, nothing merged ({said}); every page "
            "committed is kept: run export_shards again to resume",
            failed,
        )
    merge = _merge(_out_path(out), [t.path for t in tasks])
    return ShardedExport(out=_out_path(out), shards=tuple(reports), merge=merge)


def _out_path(out: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(out))


def _tasks(
    out: str | os.PathLike[str],
    credentials: Sequence[ShardCredentials],
    parts: str | os.PathLike[str] | None,
    options: ExportOptions | None,
    source: str | None,
) -> list[_ShardTask]:
    """The shards' tasks, every argument checked (nothing is created but ``parts``)."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    target = _out_path(out)
    if os.path.isdir(target):
        raise ValueError(f"out {target} is a directory; the merged export is a SQLite file")
    if not os.path.isdir(os.path.dirname(target)):
        raise ValueError(f"out {target}: the directory {os.path.dirname(target)} does not exist")
    if isinstance(credentials, (str, bytes)) or not isinstance(credentials, Sequence):
        raise TypeError("credentials must be a sequence of ShardCredentials, one per shard")
    if not credentials:
        raise ValueError("credentials is empty: give one ShardCredentials per shard")
    for i, given in enumerate(credentials):
        if not isinstance(given, ShardCredentials):
            raise TypeError(
                f"credentials[{i}] must be a ShardCredentials, got {type(given).__name__}"
            )
    options = ExportOptions() if options is None else options
    if not isinstance(options, ExportOptions):
        raise TypeError(f"options must be an ExportOptions, got {type(options).__name__}")
    if options.shard is not None:
        raise ValueError(
            f"options.shard is {options.shard}: leave it unset, each of the "
            f"{len(credentials)} shards sets its own"
        )
    if source is not None and (not isinstance(source, str) or not source):
        raise TypeError("source must be a non-empty str (or None: the API's URI)")
    if parts is None:
        folder = os.path.splitext(target)[0] + ".shards"
    elif isinstance(parts, (str, os.PathLike)):
        folder = os.path.abspath(os.fspath(parts))
    else:
        raise TypeError(f"parts must be a path, got {type(parts).__name__}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"parts {folder} is a file; the shards' stores go in a directory")
    total = len(credentials)
    tasks = [
        _ShardTask(
            shard=Shard(i, total),
            path=os.path.join(folder, f"shard-{i}-of-{total}.sqlite"),
            credentials=given,
            options=attrs.evolve(options, shard=Shard(i, total)),
            source=source,
        )
        for i, given in enumerate(credentials)
    ]
    if target in {t.path for t in tasks}:
        raise ValueError(f"out {target} is one of the shards' stores; choose another out")
    os.makedirs(folder, exist_ok=True)
    return tasks


def _run_shard(task: _ShardTask) -> ShardReport:
    """One Dask task: the shard's export, on an event loop of its own."""
    try:
        return asyncio.run(_export_shard(task))
    except Exception as exc:
        # A plain, picklable error: the library's own may not unpickle on the client.
        raise ShardError(
            f"shard {task.shard}: {type(exc).__name__}: {exc}",
            {str(task.shard): f"{type(exc).__name__}: {exc}"},
        ) from None


async def _export_shard(task: _ShardTask) -> ShardReport:
    options = task.options
    settings = _client_options(options.concurrency, DEFAULT_MAX_UNREACHABLE)
    async with task.credentials.client(**settings) as api, SqliteStore(task.path) as store:
        meta = ExportMeta(
            source=task.source or api.resource_uri or "unknown",
            query=options.query,
            since=options.since.isoformat() if options.since else None,
            until=options.until.isoformat() if options.until else None,
            shard=str(task.shard),
        )
        await store.open(meta, fresh=False)  # resumes what an earlier attempt committed
        stats = await Exporter(api, store, options).run()
    logger.info(
        "shard %s: %d of %d chats done, %d new messages",
        task.shard,
        stats.chats_done,
        stats.chats_total,
        stats.messages,
    )
    return ShardReport(
        shard=str(task.shard),
        path=task.path,
        worker=distributed.get_worker().address,
        chats_total=stats.chats_total,
        chats_done=stats.chats_done,
        failures=tuple(stats.failures),
        messages=stats.messages,
        stored_messages=stats.stored_messages,
        pages=stats.pages,
        elapsed=stats.elapsed,
    )


def _merge(out: str, parts: Sequence[str]) -> MergeStats:
    """The shards' stores into ``out``: ``messages-async merge``'s SQLite path."""
    meta = merged_meta([(p, read_meta(p)) for p in parts])

    async def prepare() -> None:
        async with SqliteStore(out) as store:  # the schema and the export's identity
            await store.open(meta, fresh=False)

    asyncio.run(prepare())
    return merge_sqlite(out, parts)
