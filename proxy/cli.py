"""The `pgshard` command: `run -c FILE` serves, `check -c FILE` validates, `demo` runs an embedded default."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from proxy.config import Config, ConfigError, load_config
from proxy.log import configure_logging, log


def install_event_loop_policy() -> None:
    """uvloop when present: the relay runs 20-30% faster on it (DESIGN.md, "Measured facts")."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    config: Config, sock: socket.socket | None = None, ready: asyncio.Event | None = None
) -> None:
    """Run one worker until SIGINT/SIGTERM."""
    from proxy.app import ProxyApp

    app = ProxyApp(config)
    await app.start(sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down")
    await app.stop()


def run_workers(config: Config) -> int:
    """`workers` processes sharing the port with SO_REUSEPORT, each with its own pools."""
    from proxy.janitor import StartupError

    install_event_loop_policy()
    workers = config.general.workers
    if workers == 1:
        try:
            asyncio.run(serve(config))
        except StartupError as exc:
            log.error("cannot start", reason=str(exc))
            return 2
        return 0
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(serve(config))
            finally:
                os._exit(0)
        children.append(pid)
    log.info("workers started", pids=children)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    return status


async def install_id_function(config: Config) -> None:
    """Create pgshard_id() on every shard of every database, each with its own shard number."""
    from pooler.server_connection import ServerTarget, open_server_connection
    from router.ids import id_function_sql

    for database in config.databases:
        for index, shard in enumerate(database.shards):
            a = shard.address
            target = ServerTarget(a.host, a.port, a.user, a.password, a.dbname)
            server = await open_server_connection(target, config.general.connect_timeout)
            try:
                await server.run_simple(id_function_sql(index))
            finally:
                server.close()
            print(f"{database.name}: shard {index} ({target.label}): pgshard_id() installed")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"pgshard: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"pgshard: cannot read {path}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgshard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve with a configuration file")
    run.add_argument("-c", "--config", required=True)
    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("-c", "--config", required=True)
    ids = sub.add_parser("install-ids", help="create the pgshard_id() id function on every shard")
    ids.add_argument("-c", "--config", required=True)
    demo = sub.add_parser("demo", help="start local PostgreSQL shards, a sample schema and the proxy")
    demo.add_argument(
        "--data-dir", default="/tmp/pgshard-demo", help="where the shard servers keep their data"
    )
    demo.add_argument("--port", type=int, default=6432)
    demo.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)

    if args.command == "check":
        config = _load(args.config)
        print(f"{args.config}: OK ({len(config.databases)} database(s), {len(config.users)} user(s))")
        return 0
    if args.command == "install-ids":
        from pooler.server_connection import ServerError

        try:
            asyncio.run(install_id_function(_load(args.config)))
        except ServerError as exc:
            print(f"pgshard: {exc.message}", file=sys.stderr)
            return 1
        return 0
    if args.command == "run":
        config = _load(args.config)
        configure_logging(config.general.log_level, config.general.log_format)
        return run_workers(config)
    from proxy.demo import run_demo

    configure_logging()
    return run_demo(Path(args.data_dir), args.port, args.shards)


if __name__ == "__main__":
    sys.exit(main())
