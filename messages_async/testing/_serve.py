"""Running the emulator as a process: ``messages-async serve``.

Benchmarks run the emulator in a separate process, so that its cost is not charged to the
client being measured. The parent waits for ``--ready-file``: it is written (atomically) only
once both origins listen, and carries everything a client needs to connect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Literal

import orjson

from ._limits import (
    FromFirstRequest,
    Limit,
    Schedule,
    Storm,
    TokenBucket,
    Unlimited,
    default_burst,
    parse_schedule,
    parse_storm,
)
from ._server import MessagesServer

__all__ = ["run_forever", "serve", "serve_main"]


def _write_ready_file(path: str, server: MessagesServer, clients: list[tuple[str, str]]) -> None:
    info = {
        "token_url": server.token_url,
        "resource_uri": server.resource_uri,
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "clients": [{"client_id": i, "client_secret": s} for i, s in clients],
        "user_id": server.user_id,
        "pid": os.getpid(),
    }
    directory = os.path.dirname(os.path.abspath(path))
    # Write then rename: a parent polling for the file never reads half of it.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ready-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(info))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token_port: int = 0,
    chats: int = 20,
    messages_per_chat: int | tuple[int, int] = 200,
    seed: int = 0,
    latency: float = 0.0,
    rate_limit: float | None = None,
    burst: int | None = None,
    rate_schedule: str | None = None,
    storm: str | None = None,
    clients: int = 1,
    cursor_mode: Literal["url", "token"] = "url",
    token_ttl: float | None = 3600.0,
    extra_fields: bool = False,
    compress: bool = True,
    ready_file: str | None = None,
    stop: asyncio.Event | None = None,
    echo: Callable[[str], None] | None = None,
) -> None:
    """Serve until ``stop`` is set, or until SIGINT/SIGTERM when no ``stop`` is given.

    Requests are not recorded: a long-running server must not grow without bound.
    """
    say = echo if echo is not None else (lambda line: print(line, flush=True))
    server = MessagesServer(
        limit=_limit(rate_limit, burst, rate_schedule, storm),
        host=host,
        port=port,
        token_port=token_port,
        chats=chats,
        messages_per_chat=messages_per_chat,
        seed=seed,
        latency=latency,
        rate_limit=rate_limit,
        burst=burst,
        cursor_mode=cursor_mode,
        token_ttl=token_ttl,
        extra_fields=extra_fields,
        compress=compress,
        record=False,
    )
    # More credentials, each with a rate limit of its own, for running shards side by side.
    credentials = [(server.client_id, server.client_secret)]
    for k in range(2, clients + 1):
        credentials.append((f"{server.client_id}-{k}", f"{server.client_secret}-{k}"))
        server.register_client(*credentials[-1])
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                continue
            installed.append(sig)
    try:
        async with server:
            say(f"token_url:     {server.token_url}")
            say(f"resource_uri:  {server.resource_uri}")
            say(f"client_id:     {server.client_id}")
            say(f"client_secret: {server.client_secret}")
            for client_id, secret in credentials[1:]:
                say(f"also:          {client_id} / {secret}")
            say(f"user_id:       {server.user_id}")
            say(
                f"{len(server.chat_ids())} chats, {server.all_message_count()} messages "
                f"(seed {seed}); Ctrl-C to stop"
            )
            if ready_file:
                _write_ready_file(ready_file, server, credentials)
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if ready_file:
            # Gone with the server: a script that finds the file may rely on it listening.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file)


def _messages_per_chat(text: str) -> int | tuple[int, int]:
    for sep in ("-", ","):
        if sep in text.strip("-"):
            lo, _, hi = text.partition(sep)
            return (int(lo), int(hi))
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="messages-async serve",
        description=(
            "Run the Messages API emulator (token endpoint and API on two ports) until "
            "Ctrl-C. It prints the URLs and the credentials to use."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=0, help="API port (default: %(default)s, any free port)"
    )
    p.add_argument(
        "--token-port",
        type=int,
        default=0,
        help="token endpoint port (default: %(default)s, any free port)",
    )
    p.add_argument(
        "--chats", type=int, default=20, help="number of chats to generate (default: %(default)s)"
    )
    p.add_argument(
        "--messages-per-chat",
        type=_messages_per_chat,
        default=200,
        metavar="N|MIN-MAX",
        help="messages in each chat, or a random size per chat in MIN-MAX (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="same seed, same dataset (default: %(default)s)"
    )
    p.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds added to each API call (default: %(default)s)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="API requests per second, answered 429 with Retry-After above it (default: no limit)",
    )
    p.add_argument(
        "--burst",
        type=int,
        default=None,
        help="requests allowed at once above --rate-limit (default: one second's worth)",
    )
    p.add_argument(
        "--rate-schedule",
        type=_schedule_arg,
        default=None,
        metavar="S:R,...",
        help="a rate limit that changes over time, e.g. 0:200,20:100,40:200 (from S seconds "
        "after a credential's first request, R requests/s, bursts of 0.1 s); instead of "
        "--rate-limit",
    )
    p.add_argument(
        "--storm",
        type=_storm_arg,
        default=None,
        metavar="N@S",
        help="answer the next N requests from S seconds after a credential's first request "
        "with 429, then go on as before (default: none)",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=1,
        metavar="N",
        help="credentials to accept, each limited on its own: test-client, then test-client-2 "
        "with test-secret-2 and so on (default: %(default)s)",
    )
    p.add_argument(
        "--cursor-mode",
        choices=("url", "token"),
        default="url",
        help="cursors as absolute URLs or bare tokens (default: %(default)s)",
    )
    p.add_argument(
        "--token-ttl",
        type=float,
        default=3600.0,
        help="access token lifetime in seconds (default: %(default)s)",
    )
    p.add_argument(
        "--extra-fields",
        action="store_true",
        help="send fields clients must ignore (default: off)",
    )
    p.add_argument("--no-compress", action="store_true", help="never gzip responses")
    p.add_argument(
        "--ready-file",
        metavar="PATH",
        help="write the URLs and credentials here as JSON once listening; removed on exit",
    )
    return p


def _limit(
    rate_limit: float | None, burst: int | None, schedule: str | None, storm: str | None
) -> Callable[[], Limit] | None:
    """The limiter the options ask for, per credential; None: ``--rate-limit`` (or nothing)."""
    if schedule is None and storm is None:
        return None
    steps = parse_schedule(schedule) if schedule is not None else None
    count, start = parse_storm(storm) if storm is not None else (0, 0.0)

    def make() -> Limit:
        after: Limit
        if steps is not None:
            after = Schedule(steps, burst_seconds=_BURST_SECONDS)
        elif rate_limit is not None:
            after = TokenBucket(rate_limit, default_burst(rate_limit, burst))
        else:
            after = Unlimited()
        return FromFirstRequest(Storm(count, start=start, after=after) if count else after)

    return make


#: Each step of ``--rate-schedule`` lets a tenth of a second of its rate through at once.
_BURST_SECONDS = 0.1


def _schedule_arg(text: str) -> str:
    try:
        Schedule(parse_schedule(text), burst_seconds=_BURST_SECONDS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _storm_arg(text: str) -> str:
    try:
        parse_storm(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def run_forever(**options: object) -> None:
    """`serve` with the given options in a new event loop, until SIGINT/SIGTERM."""
    asyncio.run(serve(**options))  # type: ignore[arg-type]


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of ``messages-async serve``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    if args.rate_schedule is not None and args.rate_limit is not None:
        parser.error("--rate-schedule and --rate-limit both set the rate limit: give one")
    try:
        run_forever(
            host=args.host,
            port=args.port,
            token_port=args.token_port,
            chats=args.chats,
            messages_per_chat=args.messages_per_chat,
            seed=args.seed,
            latency=args.latency,
            rate_limit=args.rate_limit,
            burst=args.burst,
            rate_schedule=args.rate_schedule,
            storm=args.storm,
            clients=args.clients,
            cursor_mode=args.cursor_mode,
            token_ttl=args.token_ttl,
            extra_fields=args.extra_fields,
            compress=not args.no_compress,
            ready_file=args.ready_file,
        )
    except OSError as exc:
        print(f"messages-async serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
