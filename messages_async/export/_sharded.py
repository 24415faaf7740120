"""One shard of an export as a plain synchronous call, for whatever engine runs the shards.

An engine (Dask, Ray, a batch system) runs :func:`export_shard` once per shard, each with a
:class:`ShardCredentials` of its own and a store of its own, anywhere, in any order, again
after a crash (it resumes from its store), and then :func:`merge_shards` joins the stores.
The call runs its own event loop (``asyncio.run``), so it goes in a worker's thread or
process, never inside a running loop. What it returns or raises pickles, so that it can
travel back from a worker: the library's own errors become a :class:`ShardError` naming the
shard.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .._client import Client
from .._secret import Secret
from ._merge import MergeStats, merge_exports
from ._runner import ChatFailure, Exporter, ExportOptions
from ._shard import Shard
from ._sqlite import SqliteStore
from ._state import ExportMeta

__all__ = [
    "ShardCredentials",
    "ShardError",
    "ShardReport",
    "export_shard",
    "merge_shards",
]

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
        host: The machine that ran it.
        pid: The process that ran it.
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
    host: str
    pid: int
    chats_total: int
    chats_done: int
    failures: tuple[ChatFailure, ...]
    messages: int
    stored_messages: int
    pages: int
    elapsed: float


class ShardError(Exception):
    """One or more shards could not be exported.

    ``failed`` maps each failed shard (``"I/N"``) to what went wrong. Their stores keep every
    page committed: running them again resumes them.
    """

    def __init__(self, message: str, failed: Mapping[str, str]) -> None:
        super().__init__(message)
        self.failed = dict(failed)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.failed))


def export_shard(
    shard: Shard,
    path: str | os.PathLike[str],
    credentials: ShardCredentials,
    options: ExportOptions | None = None,
    *,
    source: str | None = None,
) -> ShardReport:
    """Export the chats of ``shard`` into the SQLite store ``path``; resumes what is there.

    Args:
        shard: Which shard (``Shard(I, N)``).
        path: The shard's store (created, or resumed when it holds this shard's export).
        credentials: The shard's own.
        options: What to export; its ``shard`` must be unset or ``shard``.
        source: What the export is of (``ExportMeta.source``); default: the API URI the
            client signs in to. Every shard of one export must have the same.

    Raises:
        TypeError, ValueError: a bad argument, before anything is sent.
        RuntimeError: called from a coroutine (it blocks: use ``asyncio.to_thread``).
        ShardError: the shard could not be exported (refused credentials, an outage that
            outlasted the retries, a store that is another export or cannot be written).
    """
    outside_a_loop("export_shard")
    target, options = checked(shard, path, credentials, options, source)
    try:
        return asyncio.run(_export(shard, target, credentials, options, source))
    except Exception as exc:
        # A plain, picklable error: the library's own may not unpickle where it is received.
        why = f"{type(exc).__name__}: {exc}"
        raise ShardError(f"shard {shard}: {why}", {str(shard): why}) from exc


def outside_a_loop(what: str) -> None:
    """``RuntimeError`` when called from a coroutine: the call blocks and runs a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"{what} blocks until done and runs an event loop of its own: call it from synchronous "
        f"code, or from a coroutine as `await asyncio.to_thread({what}, ...)`"
    )


def checked(
    shard: Shard,
    path: str | os.PathLike[str],
    credentials: ShardCredentials,
    options: ExportOptions | None,
    source: str | None,
) -> tuple[str, ExportOptions]:
    """:func:`export_shard`'s arguments checked: the store's absolute path, and the options
    with the shard set. For an engine to check every shard before it submits one."""
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be a Shard, got {type(shard).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    if not isinstance(credentials, ShardCredentials):
        raise TypeError(f"credentials must be a ShardCredentials, got {type(credentials).__name__}")
    options = ExportOptions() if options is None else options
    if not isinstance(options, ExportOptions):
        raise TypeError(f"options must be an ExportOptions, got {type(options).__name__}")
    if options.shard not in (None, shard):
        raise ValueError(f"options.shard is {options.shard}, not {shard}: leave it unset")
    if source is not None and (not isinstance(source, str) or not source):
        raise TypeError("source must be a non-empty str (or None: the API's URI)")
    return os.path.abspath(os.fspath(path)), attrs.evolve(options, shard=shard)


async def _export(
    shard: Shard,
    path: str,
    credentials: ShardCredentials,
    options: ExportOptions,
    source: str | None,
) -> ShardReport:
    # The command's settings for an export's client (patient with rate limits and outages),
    # from its own defaults; imported here because the command imports this package.
    from .._cli import _client_options, _parser

    command = _parser().parse_args(["export", "--concurrency", str(options.concurrency)])
    settings = _client_options(command)
    async with credentials.client(**settings) as api, SqliteStore(path) as store:
        meta = ExportMeta(
            source=source or api.resource_uri or "unknown",
            query=options.query,
            since=options.since.isoformat() if options.since else None,
            until=options.until.isoformat() if options.until else None,
            shard=str(shard),
        )
        await store.open(meta, fresh=False)  # resumes what an earlier attempt committed
        stats = await Exporter(api, store, options).run()
    logger.info(
        "shard %s: %d of %d chats done, %d new messages",
        shard,
        stats.chats_done,
        stats.chats_total,
        stats.messages,
    )
    return ShardReport(
        shard=str(shard),
        path=path,
        host=socket.gethostname(),
        pid=os.getpid(),
        chats_total=stats.chats_total,
        chats_done=stats.chats_done,
        failures=tuple(stats.failures),
        messages=stats.messages,
        stored_messages=stats.stored_messages,
        pages=stats.pages,
        elapsed=stats.elapsed,
    )


def not_a_part(out: str, parts: Sequence[str]) -> None:
    if out in parts:
        raise ValueError(f"out {out} is one of the shards' stores; merge into another file")


def merge_shards(
    out: str | os.PathLike[str], parts: Sequence[str | os.PathLike[str]]
) -> MergeStats:
    """Merge the shards' stores into the export ``out``, as ``messages-async merge`` does
    (``merge_exports``: idempotent and additive; ``StoreError`` when the parts are not shards
    of one export), as a blocking call for an engine's driver."""
    target = os.path.abspath(os.fspath(out))
    paths = [os.path.abspath(os.fspath(p)) for p in parts]
    not_a_part(target, paths)
    return asyncio.run(merge_exports(target, paths))
