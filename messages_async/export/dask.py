"""A sharded export run on a Dask cluster: one task per shard, then one merge.

Needs the ``dask`` extra (``pip install 'messages-async[dask]'``); nothing else in the library
imports Dask. ::

    from distributed import Client
    from messages_async.export.dask import ShardCredentials, export_shards

    credentials = [ShardCredentials(token_url=..., client_id=..., client_secret=...), ...]
    with Client("tcp://scheduler:8786") as client:
        result = export_shards(client, "/shared/export.sqlite", credentials)

``export_shards`` splits the export into one shard per credential (``Shard(i, N)``,
``_shard.py``) and maps :func:`~messages_async.export.export_shard` over the cluster with
``Client.map(..., pure=False)``: one synchronous task per shard, running its own event loop
(``asyncio.run``) with its own client, exporting into its own SQLite store
(``PARTS/shard-I-of-N.sqlite``). When every shard has finished, the stores are merged into
``OUT`` (``merge_shards``, ``_merge.py``). Every argument, every shard's included, is checked
before anything is submitted.

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

import os
import uuid
from collections.abc import Sequence

import attrs

try:
    import distributed
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "messages_async.export.dask needs Dask distributed: pip install 'messages-async[dask]'"
    ) from exc

from .._checks import count
from ._merge import MergeStats
from ._runner import ChatFailure, ExportOptions
from ._shard import Shard
from ._sharded import (
    ShardCredentials,
    ShardError,
    ShardReport,
    checked,
    export_shard,
    merge_shards,
    not_a_part,
    outside_a_loop,
)

__all__ = ["ShardCredentials", "ShardError", "ShardReport", "ShardedExport", "export_shards"]


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
        RuntimeError: called from a coroutine (it blocks: use ``asyncio.to_thread``).
        ShardError: a shard failed (refused credentials, an unwritable store, an outage
            outlasting the retries, a worker killed too often); nothing was merged.
        StoreError: the stores are not shards of one export, or ``out`` is another export.
    """
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
    if client.asynchronous:
        raise TypeError("client must be a synchronous distributed.Client (asynchronous=False)")
    outside_a_loop("export_shards")
    retries = count("retries", retries)
    target, shards, paths, options = _plan(out, credentials, parts, options, source)
    total = len(shards)
    run = uuid.uuid4().hex[:12]
    # Explicit keys: the dashboard names the shard, and never shows an argument.
    keys = [f"messages-async-export-shard-{s.index}-of-{total}-{run}" for s in shards]
    futures = client.map(
        export_shard,
        shards,
        paths,
        credentials,
        options=options,
        source=source,
        key=keys,
        pure=False,
        retries=retries,
    )
    try:
        distributed.wait(futures)  # type: ignore[no-untyped-call]
        reports: list[ShardReport] = []
        failed: dict[str, str] = {}
        for shard, future in zip(shards, futures, strict=True):
            if future.status == "finished":
                reports.append(future.result())
                continue
            error = future.exception()  # type: ignore[no-untyped-call]
            if isinstance(error, ShardError):
                failed.update(error.failed)
            else:  # the worker died too often (KilledWorker), or the task was cancelled
                failed[str(shard)] = f"{type(error).__name__}: {error}"
    finally:
        client.cancel(futures)  # type: ignore[no-untyped-call]
    if failed:
        said = "; ".join(f"shard {shard}: {why}" for shard, why in failed.items())
        raise ShardError(
            f"{len(failed)} of {total} shards failed, nothing merged ({said}); every page "
            "committed is kept: run export_shards again to resume",
            failed,
        )
    merge = merge_shards(target, paths)
    return ShardedExport(out=target, shards=tuple(reports), merge=merge)


def _plan(
    out: str | os.PathLike[str],
    credentials: Sequence[ShardCredentials],
    parts: str | os.PathLike[str] | None,
    options: ExportOptions | None,
    source: str | None,
) -> tuple[str, list[Shard], list[str], ExportOptions | None]:
    """Every argument checked, every shard's too (nothing is created but ``parts``)."""
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    target = os.path.abspath(os.fspath(out))
    if os.path.isdir(target):
        raise ValueError(f"out {target} is a directory; the merged export is a SQLite file")
    if not os.path.isdir(os.path.dirname(target)):
        raise ValueError(f"out {target}: the directory {os.path.dirname(target)} does not exist")
    if isinstance(credentials, (str, bytes)) or not isinstance(credentials, Sequence):
        raise TypeError("credentials must be a sequence of ShardCredentials, one per shard")
    if not credentials:
        raise ValueError("credentials is empty: give one ShardCredentials per shard")
    if options is not None and getattr(options, "shard", None) is not None:
        raise ValueError(
            f"options.shard is {options.shard}: leave it unset, each of the "
            f"{len(credentials)} shards sets its own"
        )
    if parts is None:
        folder = os.path.splitext(target)[0] + ".shards"
    elif isinstance(parts, (str, os.PathLike)):
        folder = os.path.abspath(os.fspath(parts))
    else:
        raise TypeError(f"parts must be a path, got {type(parts).__name__}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"parts {folder} is a file; the shards' stores go in a directory")
    total = len(credentials)
    shards = [Shard(i, total) for i in range(total)]
    paths = [os.path.join(folder, f"shard-{i}-of-{total}.sqlite") for i in range(total)]
    for shard, path, given in zip(shards, paths, credentials, strict=True):
        checked(shard, path, given, options, source)
    not_a_part(target, paths)
    os.makedirs(folder, exist_ok=True)
    return target, shards, paths, options
