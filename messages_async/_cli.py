"""The ``messages-async`` command: ``export`` (the bulk export) and ``serve`` (the emulator).

Credentials come from the environment only (a secret on the command line is visible to every
user through ``ps``): ``MESSAGES_TOKEN_URL``, ``MESSAGES_CLIENT_ID`` and
``MESSAGES_CLIENT_SECRET`` for a client-credentials exchange, or ``MESSAGES_ACCESS_TOKEN`` and
``MESSAGES_RESOURCE_URI`` for a pre-issued token. ``--token-url`` and ``--client-id`` may name
the first two, which are not secret. ``export --shard I/N`` takes ``MESSAGES_CLIENT_ID_<I>``
and ``MESSAGES_CLIENT_SECRET_<I>`` instead when either is set.

Exit status: see the ``export`` parser's epilog (``messages-async export --help``), which the
README repeats word for word.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shlex
import shutil
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import NoReturn

from rich.console import Console

from ._checks import count, per_second
from ._client import Client, __version__
from ._errors import AuthError, ConfigurationError, MessagesError, ScopeError, TransportError
from ._retry import is_outage
from .export import (
    Exporter,
    ExportMeta,
    ExportOptions,
    ExportStats,
    JsonlStore,
    ParquetStore,
    SqliteStore,
    Store,
    StoreError,
    show_progress,
    summary_lines,
)
from .export._media import MediaFetcher, MediaOptions, run_with_media
from .export._merge import merge_exports, plan
from .export._parquet import load_pyarrow
from .export._progress import JsonLogFormatter, json_line
from .export._rescan import Rescanner
from .export._runner import DEFAULT_WINDOW_THRESHOLD, unless_stopped
from .export._shard import Shard

__all__ = ["main"]

PROG = "messages-async"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

ENV_TOKEN_URL = "MESSAGES_TOKEN_URL"
ENV_CLIENT_ID = "MESSAGES_CLIENT_ID"
ENV_CLIENT_SECRET = "MESSAGES_CLIENT_SECRET"
ENV_ACCESS_TOKEN = "MESSAGES_ACCESS_TOKEN"
ENV_RESOURCE_URI = "MESSAGES_RESOURCE_URI"

#: The demo's dataset: hundreds of chats, well over a hundred thousand messages.
DEMO_CHATS = 300
DEMO_MESSAGES_PER_CHAT = (50, 650)
DEMO_SEED = 2026
DEMO_SOURCE = f"the built-in demo emulator (seed {DEMO_SEED})"
DEFAULT_MAX_UNREACHABLE = 20.0


class _UsageError(Exception):
    """Bad usage, credentials or output: one line on stderr, exit status 2."""


# --- arguments ---------------------------------------------------------------------------------


def _instant(text: str) -> datetime:
    """An ISO 8601 date or date-time; one without an offset is UTC, as on the wire."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 date or time: {text!r} (e.g. 2026-01-31 or 2026-01-31T12:00:00Z)"
        ) from None
    # PROTOCOL §2: an instant with no offset is UTC. The command line follows the wire rather
    # than the machine's time zone, so the same command selects the same messages anywhere.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _chat_id(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"a chat id is an unsigned integer, got {text!r}")
    return int(text)


def _concurrency(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be between 1 and 256, got {value}")
    return value


def _window_threshold(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"a number of messages (0: never), got {text!r}")
    return int(text)


def _rate_limit(text: str) -> float:
    try:
        return per_second("--rate-limit", float(text))
    except ValueError as exc:
        message = str(exc) if "--rate-limit" in str(exc) else f"not a number: {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    number, unit = text.strip(), ""
    if number[-1:].upper() in ("K", "M", "G"):
        number, unit = number[:-1], number[-1].upper()
    if not number.isascii() or not number.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000 or 256M)")
    return int(number) * units[unit]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    try:
        return count("the value", value, minimum=1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _SecretFlag(argparse.Action):
    """A flag that exists only to refuse a secret on the command line, without echoing it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        env = ENV_CLIENT_SECRET if option_string == "--client-secret" else ENV_ACCESS_TOKEN
        parser.exit(
            EXIT_USAGE,
            f"{PROG} export: {option_string} is not accepted: a secret on the command line is "
            f"visible to every user through ps. Set {env} in the environment instead.\n",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line tools of the messages_async client.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = sub.add_parser(
        "export",
        help="export chats into SQLite, JSONL or Parquet (resumable, incremental)",
        description=(
            "Export chats into SQLite, JSONL or Parquet. Running the same command again resumes an "
            "interrupted export and then fetches only what is new. Credentials come from the "
            f"environment: {ENV_TOKEN_URL}, {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}, or "
            f"{ENV_ACCESS_TOKEN} and {ENV_RESOURCE_URI}."
        ),
        # The same words as the README's "Exit status" (tests/test_readme.py compares them).
        epilog=(
            "exit status: 0 everything exported; 1 some chats failed (listed in the summary) "
            "or the export could not go on (a server unreachable or failing, the token endpoint "
            "included; a disk error); 2 bad usage, missing or refused credentials, a wrong token "
            "URL, or an unusable --out; 130 interrupted by Ctrl-C (143 by SIGTERM), with the "
            "command that resumes. A server that cannot be connected to is retried for "
            "--max-unreachable seconds (default 20), each wait logged with its cause, then given "
            "up on."
        ),
        allow_abbrev=False,
    )
    export.add_argument(
        "--out",
        metavar="PATH",
        help="the SQLite file (default export.sqlite), the JSONL directory (default export) or "
        "the Parquet directory (default export-parquet)",
    )
    export.add_argument(
        "--format",
        choices=("sqlite", "jsonl", "parquet"),
        default="sqlite",
        help="sqlite: one file; jsonl: a directory with a file per chat; parquet: a "
        "hive-partitioned dataset (needs pyarrow) (default sqlite)",
    )
    export.add_argument(
        "--parquet-part-rows",
        type=_positive_int,
        metavar="N",
        help="parquet: most rows per part file, buffered per chat (default 10000)",
    )
    export.add_argument(
        "--sync-pages",
        type=_positive_int,
        metavar="N",
        help="jsonl: fsync a chat's file and write its checkpoint at least every N pages and "
        "every second (default 8; 1: after every page); a killed run fetches at most N pages "
        "a chat again",
    )
    export.add_argument(
        "--chat",
        dest="chats",
        action="append",
        type=_chat_id,
        metavar="ID",
        help="a chat to export; repeat for more (default: every chat the token can see)",
    )
    export.add_argument(
        "--concurrency",
        type=_concurrency,
        default=8,
        metavar="N",
        help="chats exported at once (default 8); each may have a second page in flight, so "
        "up to 2N requests",
    )
    export.add_argument(
        "--window-threshold",
        type=_window_threshold,
        default=DEFAULT_WINDOW_THRESHOLD,
        metavar="N",
        help="walk a chat of more than N messages in about N-sized time windows at once, up "
        f"to --concurrency of them (default {DEFAULT_WINDOW_THRESHOLD}; 0: never)",
    )
    export.add_argument(
        "--rate-limit",
        type=_rate_limit,
        metavar="R",
        help="requests per second never exceeded, when you know the server's limit for these "
        "credentials (default: found from the server's 429s)",
    )
    export.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="export only shard I of N (0 <= I < N, 0-based): the chats whose id hashes to I "
        "(SHA-256, the same on every machine), each shard into its own --out; with "
        f"${ENV_CLIENT_ID}_I and ${ENV_CLIENT_SECRET}_I set, the shard signs in with those",
    )
    export.add_argument(
        "--query", metavar="TEXT", help="only messages whose text contains TEXT (any case)"
    )
    export.add_argument(
        "--since",
        type=_instant,
        metavar="ISO8601",
        help="only messages at or after this instant (no offset: UTC)",
    )
    export.add_argument(
        "--until",
        type=_instant,
        metavar="ISO8601",
        help="only messages before this instant (no offset: UTC)",
    )
    export.add_argument(
        "--fresh", action="store_true", help="discard the export at --out and start over"
    )
    export.add_argument(
        "--rescan",
        action="store_true",
        help="walk every stored chat in full again to find edited and deleted messages "
        "(kept as versions and marked deleted, never removed)",
    )
    export.add_argument(
        "--media",
        action="store_true",
        help="also download every stored attachment's file (stored once by SHA-256) into "
        "export.media/ beside an SQLite file, or DIR/media/",
    )
    export.add_argument(
        "--media-concurrency",
        type=_concurrency,
        default=4,
        metavar="N",
        help="files downloaded at once (default 4)",
    )
    export.add_argument(
        "--media-max-bytes",
        type=_size,
        default=256 * 2**20,
        metavar="SIZE",
        help="largest file kept, in bytes or with K, M, G (default 256M); larger ones are "
        "recorded as too_large",
    )
    export.add_argument(
        "--media-timeout",
        type=_positive_seconds,
        default=300.0,
        metavar="SECONDS",
        help="time one file may take, retries included (default 300)",
    )
    export.add_argument(
        "--demo",
        action="store_true",
        help="export a generated dataset from the built-in emulator (no credentials needed)",
    )
    export.add_argument(
        "--max-unreachable",
        type=_seconds,
        default=DEFAULT_MAX_UNREACHABLE,
        metavar="SECONDS",
        help="give up on a server that cannot be connected to after SECONDS of retrying "
        f"(default {DEFAULT_MAX_UNREACHABLE:g}); the export then exits with status 1",
    )
    export.add_argument(
        "--log-json",
        action="store_true",
        help="write progress (every few seconds, and once at the end) and log messages to "
        "stderr as one JSON object per line, for log shippers",
    )
    export.add_argument("--token-url", metavar="URL", help=f"default: ${ENV_TOKEN_URL}")
    export.add_argument("--client-id", metavar="ID", help=f"default: ${ENV_CLIENT_ID}")
    for flag in ("--client-secret", "--access-token"):
        export.add_argument(flag, action=_SecretFlag, nargs="?", help=argparse.SUPPRESS)
    sub.add_parser(
        "serve",
        help="run the Messages API emulator (see 'messages-async serve --help')",
        add_help=False,
    )
    merge = sub.add_parser(
        "merge",
        help="merge the stores of an export's shards into one (SQLite, JSONL or Parquet)",
        description=(
            "Merge the stores of one export's shards (export --shard I/N) into OUT, in their "
            "format: every chat, message, checkpoint, version and media record, and the media "
            "files. Merging again is harmless and adds what the parts gained since. OUT is an "
            "ordinary export afterwards (without a shard)."
        ),
        epilog=(
            "exit status: 0 merged; 1 some chats could not be merged yet (listed: a part's "
            "walk of them is in progress) or a disk error; 2 bad usage, or parts that are "
            "not shards of one export or not of one format"
        ),
    )
    merge.add_argument("--out", required=True, metavar="OUT", help="the merged store")
    merge.add_argument("parts", nargs="+", metavar="PART", help="the shards' stores")
    return parser


def _merge_main(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.out)
    parts = list(dict.fromkeys(os.path.abspath(p) for p in args.parts))
    try:
        fmt, _ = plan(out, parts)
    except StoreError as exc:
        raise _UsageError(str(exc)) from None
    _check_out(out, fmt)
    try:
        stats = asyncio.run(merge_exports(out, parts))
    except StoreError as exc:
        raise _UsageError(str(exc)) from None
    except OSError as exc:
        print(f"merge failed: {exc}; what was merged stays, run the merge again", file=sys.stderr)
        return EXIT_FAILED
    for why in stats.skipped:
        print(f"not merged: {why}", file=sys.stderr)
    print(
        f"Merged {stats.parts} parts into {args.out}: {stats.chats:,} chats, "
        f"{stats.messages:,} messages, {stats.files:,} media files copied"
    )
    return EXIT_FAILED if stats.skipped else EXIT_OK


# --- credentials ---------------------------------------------------------------------------------


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _credential_names(args: argparse.Namespace) -> tuple[str, str]:
    """Where the client id and secret are in the environment: an export of shard I takes the
    pair ``MESSAGES_CLIENT_ID_<I>`` / ``MESSAGES_CLIENT_SECRET_<I>`` when either is set (one
    environment, say a Kubernetes Secret, can then hold every shard's), else the usual pair."""
    shard: Shard | None = getattr(args, "shard", None)
    if shard is not None:
        own = (f"{ENV_CLIENT_ID}_{shard.index}", f"{ENV_CLIENT_SECRET}_{shard.index}")
        if any(_env(name) for name in own):
            return own
    return ENV_CLIENT_ID, ENV_CLIENT_SECRET


def _client(args: argparse.Namespace, **options: object) -> Client:
    id_name, secret_name = _credential_names(args)
    token_url = args.token_url or _env(ENV_TOKEN_URL)
    client_id = args.client_id or _env(id_name)
    secret = _env(secret_name)
    access_token = _env(ENV_ACCESS_TOKEN)
    resource_uri = _env(ENV_RESOURCE_URI)
    try:
        if token_url and client_id and secret:
            # The complete exchange set wins over a pre-issued token: it can renew itself.
            return Client(
                token_url=token_url,
                client_id=client_id,
                client_secret=secret,
                scopes=("messages_read",),
                **options,  # type: ignore[arg-type]
            )
        if access_token and resource_uri:
            return Client(
                access_token=access_token,
                resource_uri=resource_uri,
                **options,  # type: ignore[arg-type]
            )
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise _UsageError(f"bad credentials configuration: {exc}") from None
    if access_token or resource_uri:
        missing = [
            n
            for n, v in ((ENV_ACCESS_TOKEN, access_token), (ENV_RESOURCE_URI, resource_uri))
            if not v
        ]
    else:
        missing = [
            n
            for n, v in (
                (f"{ENV_TOKEN_URL} (or --token-url)", token_url),
                (f"{id_name} (or --client-id)", client_id),
                (secret_name, secret),
            )
            if not v
        ]
    given = len(missing) < (2 if access_token or resource_uri else 3)
    raise _UsageError(
        f"{'incomplete' if given else 'no'} credentials: set {ENV_TOKEN_URL}, {ENV_CLIENT_ID} "
        f"and {ENV_CLIENT_SECRET} (or "
        f"{ENV_ACCESS_TOKEN} and {ENV_RESOURCE_URI}) in the environment; missing: "
        f"{', '.join(missing)}. To try the command without a server: {PROG} export --demo"
    )


def _client_options(args: argparse.Namespace) -> dict[str, object]:
    # An export is patient where a single call is not: a long Retry-After is waited out (the
    # progress display shows the countdown), and transient errors get more retries; but a
    # server that cannot be connected to at all is given up on after --max-unreachable.
    return {
        "rate_limit": args.rate_limit,
        "max_unreachable": args.max_unreachable,
        "max_retries": 10,
        "max_retry_after": 3600.0,
        "backoff_max": 30.0,
        "timeout": 60.0,
        # Each worker has one page in flight and one fetched ahead.
        "max_concurrency": 2 * args.concurrency,
    }


# --- running an export ---------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> Store:
    if args.format == "jsonl":
        sync = {} if args.sync_pages is None else {"sync_pages": args.sync_pages}
        return JsonlStore(_out_path(args), threads=min(4, args.concurrency), **sync)
    if args.format == "parquet":
        rows = {} if args.parquet_part_rows is None else {"part_rows": args.parquet_part_rows}
        return ParquetStore(_out_path(args), threads=min(4, args.concurrency), **rows)
    return SqliteStore(_out_path(args))


#: Options of one format only (argparse ``dest``: the option, its format): given with another
#: format they would be silently ignored, so they are refused instead.
_FORMAT_OPTIONS = {
    "sync_pages": ("--sync-pages", "jsonl"),
    "parquet_part_rows": ("--parquet-part-rows", "parquet"),
}
_DEFAULT_OUT = {"sqlite": "export.sqlite", "jsonl": "export", "parquet": "export-parquet"}
_FORMAT_NAMES = {"sqlite": "SQLite", "jsonl": "JSONL", "parquet": "Parquet"}


def _out_path(args: argparse.Namespace) -> str:
    return str(args.out or _DEFAULT_OUT[args.format])


def _check_out(path: str, fmt: str) -> None:
    """Refuse an ``--out`` that cannot be written, before anything else is done (rc 2).

    Whether an existing output is *this* export is the store's question (``Store.open``);
    this only makes sure that there is somewhere to write, and says what is wrong if not.
    """
    wants_dir = fmt != "sqlite"
    if os.path.isdir(path) and not wants_dir:
        raise _UsageError(
            f"--out {path} is a directory; the SQLite format needs a file path "
            f"(e.g. {os.path.join(path, 'export.sqlite')}), or use --format jsonl or parquet"
        )
    if os.path.exists(path) and not os.path.isdir(path) and wants_dir:
        raise _UsageError(
            f"--out {path} is a file; the {_FORMAT_NAMES[fmt]} format needs a directory "
            "(new or empty)"
        )
    # Where files will be created: the directory itself (JSONL), or the file's directory.
    # The JSONL and Parquet stores create missing directories; SQLite needs its directory.
    where = path if wants_dir else os.path.dirname(os.path.abspath(path))
    existing = where
    while not os.path.exists(existing):
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing):
        raise _UsageError(f"--out {path}: {existing} is not a directory")
    if existing != where and not wants_dir:
        raise _UsageError(
            f"--out {path}: the directory {where} does not exist; create it or choose another --out"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".messages-async-")
        os.close(fd)
        os.unlink(probe)
        if os.path.isfile(path):
            with open(path, "r+b"):
                pass
    except OSError as exc:
        target = path if existing == where else existing
        raise _UsageError(
            f"--out {path}: cannot create or write files in {target} "
            f"({exc.strerror or exc}); choose another --out"
        ) from None


def _invoked_as(argv0: str) -> str:
    """The command to repeat, as it can be typed again from where the user is."""
    if os.path.basename(argv0) == PROG:
        found = shutil.which(PROG)
        if found is not None and os.path.samefile(found, argv0):
            return PROG
        # Run by its path (say .venv/bin/messages-async, the environment not activated):
        # a bare "messages-async" would not be found.
        return shlex.quote(argv0)
    if os.path.basename(argv0) == "__main__.py":
        return f"{shlex.quote(sys.executable)} -m messages_async"
    return PROG


def _resume_hint(argv: Sequence[str], program: str = PROG) -> str:
    again = [a for a in argv if a != "--fresh"]
    return f"{program} {shlex.join(again)}"


class _Signals:
    """Ctrl-C (and SIGTERM) stop the export cleanly; a second one exits at once."""

    def __init__(self, stop: asyncio.Event, say: Callable[[str], None]) -> None:
        self.stop = stop
        self.received: signal.Signals | None = None
        self._say = say
        self._installed: list[signal.Signals] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
                continue
            self._installed.append(sig)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received is not None:
            # Everything committed is safe on disk (that is the point of the checkpoints), so
            # an impatient second Ctrl-C may simply end the process.
            self._say("stopping at once; the export resumes from its last checkpoint")
            os._exit(EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_TERMINATED)
        self.received = sig
        again = "Ctrl-C again" if sig == signal.SIGINT else "a second signal"
        self._say(f"stopping: finishing the pages being saved ({again} to quit at once)")
        self.stop.set()


async def _export(args: argparse.Namespace, argv: Sequence[str], err: Console) -> int:
    # soft_wrap: a log line stays one line whatever the width (logs are read by tools too).
    say = lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    if args.log_json:
        say = lambda line: print(json_line("message", message=line), file=sys.stderr)  # noqa: E731
    options = ExportOptions(
        chat_ids=tuple(args.chats) if args.chats else None,
        concurrency=args.concurrency,
        query=args.query or None,
        since=args.since,
        until=args.until,
        shard=args.shard,
        window_threshold=args.window_threshold,
    )
    if args.demo:
        if args.media:
            raise _UsageError(
                "--media does not go with --demo: the demo's attachments point at "
                "files.example.test, which does not exist"
            )
        return await _demo(args, argv, options, err, say)
    client = _client(args, **_client_options(args))
    return await _run(client, None, args, argv, options, err, say)


async def _demo(
    args: argparse.Namespace,
    argv: Sequence[str],
    options: ExportOptions,
    err: Console,
    say: Callable[[str], None],
) -> int:
    from .testing import Fault, MessagesServer

    server = MessagesServer(
        chats=DEMO_CHATS,
        messages_per_chat=DEMO_MESSAGES_PER_CHAT,
        seed=DEMO_SEED,
        latency=0.002,
        extra_fields=True,
        # Bare cursor tokens are signed with a key derived from the seed, so they stay valid
        # when a later run starts the emulator on another port: an interrupted demo resumes.
        cursor_mode="token",
        # Loopback needs no compression, and the emulator shares this process's CPU.
        compress=False,
        record=False,
    )
    # A few 429s, to show that a rate limit is waited out (and displayed), not a failure.
    for after in (150, 700):
        server.inject(Fault.rate_limited(retry_after="1"), path="messages/", after=after)
    async with server:
        say(
            f"demo: emulator on {server.resource_origin} with {len(server.chat_ids())} chats "
            f"and {server.all_message_count():,} messages"
        )
        client = Client(
            token_url=server.token_url,
            client_id=server.client_id,
            client_secret=server.client_secret,
            scopes=("messages_read",),
            **_client_options(args),  # type: ignore[arg-type]
        )
        return await _run(client, DEMO_SOURCE, args, argv, options, err, say)


async def _run(
    client: Client,
    source: str | None,
    args: argparse.Namespace,
    argv: Sequence[str],
    options: ExportOptions,
    err: Console,
    say: Callable[[str], None],
) -> int:
    stop = asyncio.Event()
    signals = _Signals(stop, say)
    signals.install()
    try:

        async def sign_in() -> bool:
            await client.open()
            return True

        try:
            # Signing in may wait out retries and a Retry-After: Ctrl-C must not wait for it.
            signed_in = await unless_stopped(sign_in(), stop)
        except (AuthError, ScopeError, TransportError) as exc:
            say(f"{PROG} export: {_sign_in_failure(exc, 'sign in')}")
            return _sign_in_exit(exc)
        if not signed_in:
            await client.aclose()  # already closed by the cancelled sign-in; to be sure
            say("interrupted while signing in: nothing was exported")
            return EXIT_TERMINATED if signals.received == signal.SIGTERM else EXIT_INTERRUPTED
        try:
            return await _run_open(client, source, args, argv, options, stop, signals, err, say)
        finally:
            await client.aclose()
    finally:
        signals.remove()


def _sign_in_failure(exc: MessagesError, doing: str) -> str:
    if is_outage(exc):
        return f"could not {doing}, the server is unreachable or failing: {exc}"
    refused = isinstance(exc, ScopeError) or (
        isinstance(exc, AuthError) and exc.status in (400, 401, 403)
    )
    if refused:
        return f"the server refused the credentials: {exc}"
    return f"could not {doing}: {exc}"  # e.g. a token_url that is no token endpoint


def _sign_in_exit(exc: MessagesError) -> int:
    """An outage is 1 (try again later); refused credentials or a wrong URL are 2."""
    return EXIT_FAILED if is_outage(exc) else EXIT_USAGE


async def _run_open(
    client: Client,
    source: str | None,
    args: argparse.Namespace,
    argv: Sequence[str],
    options: ExportOptions,
    stop: asyncio.Event,
    signals: _Signals,
    err: Console,
    say: Callable[[str], None],
) -> int:
    meta = ExportMeta(
        source=source or client.resource_uri or "unknown",
        query=options.query,
        since=options.since.isoformat() if options.since else None,
        until=options.until.isoformat() if options.until else None,
        shard=None if options.shard is None else str(options.shard),
    )
    store = _store(args)
    try:
        await store.open(meta, fresh=args.fresh)
    except (StoreError, OSError, sqlite3.Error) as exc:
        await store.close()
        raise _UsageError(
            f"--out {store.path}: {exc}" if not isinstance(exc, StoreError) else str(exc)
        ) from None
    fetcher = None
    if args.media:
        media_options = MediaOptions(
            concurrency=args.media_concurrency,
            max_bytes=args.media_max_bytes,
            timeout=args.media_timeout,
        )
        fetcher = MediaFetcher(client, store, media_options)
    rescanner = (
        Rescanner(
            client,
            store,
            page_size=options.page_size,
            query=options.query,
            period=options.period(),
        )
        if args.rescan
        else None
    )
    exporter = Exporter(
        client,
        store,
        options,
        stop=stop,
        on_commit=fetcher.offer if fetcher else None,
        rescan=rescanner.rescan if rescanner else None,
    )
    progress = asyncio.create_task(
        show_progress(
            exporter.stats,
            lambda: client.stats,
            store.path,
            err,
            log=say,
            log_json=args.log_json,
            media=fetcher.stats if fetcher else None,
        ),
        name="export progress",
    )
    try:
        try:
            stats = await run_with_media(exporter, fetcher, stop)
        except (AuthError, ScopeError, TransportError) as exc:
            say(f"{PROG} export: {_sign_in_failure(exc, 'export')}")
            return _sign_in_exit(exc)
        except MessagesError as exc:
            say(f"{PROG} export: {exc}")
            return EXIT_FAILED
        except OSError as exc:
            say(f"{PROG} export: cannot write {store.path}: {exc}")
            return EXIT_FAILED
    finally:
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
        await store.close()
    return _report(stats, client, store.path, signals, argv, fetcher, rescanner)


def _report(
    stats: ExportStats,
    client: Client,
    target: str,
    signals: _Signals,
    argv: Sequence[str],
    fetcher: MediaFetcher | None = None,
    rescanner: Rescanner | None = None,
) -> int:
    media = fetcher.stats if fetcher else None
    for line in summary_lines(stats, client.stats, target, media):
        print(line)
    if rescanner is not None:
        found = rescanner.stats
        print(
            f"  rescan:    {found.chats} chats walked again, {found.compared:,} messages "
            f"compared: {found.edits:,} edited, {found.deletions:,} deleted"
        )
    sys.stdout.flush()
    if stats.interrupted:
        print(
            f"Interrupted: every page fetched so far is saved. To resume, run:\n"
            f"  {_resume_hint(argv, _invoked_as(sys.argv[0] if sys.argv else PROG))}",
            file=sys.stderr,
        )
        return EXIT_TERMINATED if signals.received == signal.SIGTERM else EXIT_INTERRUPTED
    if stats.failures:
        print(
            f"{len(stats.failures)} chat(s) failed (listed above); running the same command "
            "again retries them and keeps everything else.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _export_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    err = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s", stream=sys.stderr)
    if args.log_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    if args.since and args.until and args.since > args.until:
        raise _UsageError(
            f"--since ({args.since.isoformat()}) is after --until ({args.until.isoformat()})"
        )
    for dest, (option, fmt) in _FORMAT_OPTIONS.items():
        if getattr(args, dest) is not None and args.format != fmt:
            raise _UsageError(f"{option} applies to --format {fmt} only, not {args.format}")
    _check_out(_out_path(args), args.format)
    if args.format == "parquet":
        # Like the GC below, a choice for this process alone. pyarrow's own allocator
        # (mimalloc) keeps what each store thread freed after writing a part, so the peak
        # depended on the run: 136-168 MiB for 200k messages, against 88-92 MiB at the same
        # rate with the system's malloc. Only the variable, read as pyarrow loads, reaches
        # the Parquet writer's own allocations; a pool the user names still wins.
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        try:
            load_pyarrow()  # before signing in: say at once what to install
        except StoreError as exc:
            raise _UsageError(str(exc)) from None
    # The export decodes and stores hundreds of thousands of small objects; CPython's cyclic
    # GC would scan them again and again (1.5-2.5x slower on this workload). An application
    # may tune the GC for its own process, which a library must never do behind its user's
    # back: freeze what import created, and collect the young generation far less often.
    # It is not disabled, so a reference cycle still cannot make memory grow without bound.
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    return asyncio.run(_export(args, argv, err))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``messages-async`` console script; returns the exit status.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from .testing import serve_main

        return serve_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _merge_main(args) if args.command == "merge" else _export_main(args, argv)
    except _UsageError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Only before the export installed its own handler (or on platforms without one).
        print(f"{PROG} export: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
