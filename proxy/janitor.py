"""Periodic maintenance of one worker: idle and old server connections, minimum pool sizes, the
recovery of two-phase commits that a crashed proxy (this one or another) left in doubt, and the
user-defined aggregates of each sharded database (`refresh_catalogs`).

Nothing here is on the query path. Two-phase commit decisions live in PostgreSQL (DESIGN.md,
principle 6), so any proxy's janitor can finish any proxy's transactions.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pooler.background import spawn
from pooler.server_connection import ServerConnection, ServerError, ServerTarget, open_server_connection
from proxy.log import log
from proxy.protocol import backend, frontend
from router.twophase import DecisionLog, check_prepared_transactions, recover

if TYPE_CHECKING:
    from proxy.app import ProxyApp
    from proxy.config import Database

POOL_INTERVAL = 1.0
RECOVERY_INTERVAL = 5.0
USER_AGGREGATES_SQL = (
    "SELECT DISTINCT lower(proname::text) FROM pg_catalog.pg_proc "
    "WHERE prokind = 'a' AND pronamespace <> 'pg_catalog'::regnamespace"
)
_catalog_failing: set[str] = set()  # databases whose last catalog read failed (warned once)


class StartupError(Exception):
    """The cluster cannot be served as configured; the message says what to change."""


@dataclass(slots=True)
class Coordinator:
    """What a database's distributed commits need: where decisions go and how its gids start."""

    decision_log: DecisionLog
    gid_prefix: str
    targets: list[ServerTarget]


def shard_targets(database: Database) -> list[ServerTarget]:
    """Connections with each shard URL's own credentials (the owner of prepared transactions)."""
    return [
        ServerTarget(s.address.host, s.address.port, s.address.user, s.address.password, s.address.dbname)
        for s in database.shards
    ]


def gid_prefix(database_name: str) -> str:
    """Per database, so two databases whose shards share a server never resolve each other's."""
    return (
        f"pgshard_{database_name}"
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,40}", database_name)
        else "pgshard"
    )


async def prepare_two_phase(app: ProxyApp) -> None:
    """At start-up: check every shard can prepare transactions, create the decision table, recover."""
    general = app.config.general
    for database in app.config.databases:
        if len(database.shards) < 2 or not general.two_phase_commit:
            continue
        targets = shard_targets(database)
        for index, target in enumerate(targets):
            try:
                conn = await open_server_connection(target, general.connect_timeout, "pgshard-2pc")
            except ServerError as exc:
                log.warning(
                    "shard unreachable at start-up", database=database.name, shard=index, error=exc.message
                )
                continue
            try:
                problem = await check_prepared_transactions(conn, index)
            finally:
                conn.close()
            if problem:
                raise StartupError(f"database {database.name}: {problem}")
        default = targets[database.default_shard]

        def connect(target: ServerTarget = default) -> asyncio.Future[ServerConnection]:
            return asyncio.ensure_future(
                open_server_connection(target, general.connect_timeout, "pgshard-2pc")
            )

        coordinator = Coordinator(DecisionLog(connect), gid_prefix(database.name), targets)
        try:
            await coordinator.decision_log.ensure_schema()
        except ServerError as exc:
            log.warning("two-phase commit log not ready", database=database.name, error=exc.message)
        app.coordinators[database.name] = coordinator
    await recover_all(app)


async def recover_all(app: ProxyApp) -> None:
    """Finish in-doubt transactions old enough that no live proxy is still committing them."""
    timeout = app.config.general.connect_timeout
    for name, coordinator in app.coordinators.items():
        shards = {
            i: (lambda t=target: open_server_connection(t, timeout, "pgshard-2pc"))
            for i, target in enumerate(coordinator.targets)
        }
        try:
            report = await recover(
                shards,
                coordinator.decision_log,
                older_than=app.config.general.two_phase_recovery_delay,
                gid_prefix=coordinator.gid_prefix,
            )
        except ServerError as exc:
            log.warning("two-phase recovery failed", database=name, error=exc.message)
            continue
        if report.committed or report.rolled_back:
            log.info(
                "two-phase recovery",
                database=name,
                committed=report.committed,
                rolled_back=report.rolled_back,
            )
        if not report.clean:
            log.warning(
                "two-phase recovery incomplete",
                database=name,
                failed=report.failed,
                unreachable=report.unreachable,
            )


async def read_user_aggregates(target: ServerTarget, timeout: float) -> frozenset[str]:
    """The names (lower case) of the aggregates outside pg_catalog in one shard's database."""
    conn = await open_server_connection(target, timeout, "pgshard-catalog")
    try:
        conn.write(frontend.query(USER_AGGREGATES_SQL))
        names: set[str] = set()
        error: ServerError | None = None
        while True:
            msg_type, body = await asyncio.wait_for(conn.read_message(), timeout)
            if msg_type == 0x44:  # 'D' DataRow
                value = backend.decode_data_row(body)[0]
                if value is not None:
                    names.add(value.decode("utf-8", "replace"))
            elif msg_type == 0x45:  # 'E' ErrorResponse
                fields = backend.decode_error_fields(body)
                error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
            elif msg_type == 0x5A:  # 'Z' ReadyForQuery
                if error is not None:
                    raise error
                return frozenset(names)
    finally:
        conn.close()


async def refresh_catalogs(app: ProxyApp, startup: bool = False) -> None:
    """Each sharded database's user-defined aggregates, from its default shard's catalog: a read
    over several shards calling one is refused (router.compile), never answered one row per shard.

    When the catalog cannot be read (the default shard is down), a database keeps the set it knew;
    at start-up it has none, so it starts not knowing (None): every function sqlglot does not know
    then counts as a possible aggregate until a later read succeeds (the janitor retries every
    second). A change clears the database's route cache; fan-out plans are keyed by the topology's
    version, which the change bumps.
    """
    timeout = app.config.general.connect_timeout
    for database in app.config.databases:
        router = app.routers.get(database.name)
        if router is None:  # a single-shard database: nothing is merged
            continue
        target = shard_targets(database)[database.default_shard]
        try:
            names = await read_user_aggregates(target, timeout)
        except (ServerError, TimeoutError, OSError) as exc:
            if startup:
                router.topology.set_user_aggregates(None)
            if database.name not in _catalog_failing:
                _catalog_failing.add(database.name)
                message = exc.message if isinstance(exc, ServerError) else str(exc) or type(exc).__name__
                log.warning("user-defined aggregates not read", database=database.name, error=message)
            continue
        _catalog_failing.discard(database.name)
        if router.topology.set_user_aggregates(names):
            router.clear()
            log.info("user-defined aggregates", database=database.name, names=sorted(names))


async def run(app: ProxyApp) -> None:
    """The janitor loop: pools every second, two-phase recovery every RECOVERY_INTERVAL, the
    catalog every general.catalog_refresh_interval (every second while it has never been read).

    Recovery only touches transactions older than general.two_phase_recovery_delay, so running it
    often costs one catalog query per shard and never races a live commit.
    """
    next_recovery = time.monotonic() + RECOVERY_INTERVAL
    catalog_interval = app.config.general.catalog_refresh_interval
    next_catalog = time.monotonic() + catalog_interval
    recovering: asyncio.Task[None] | None = None
    reading: asyncio.Task[None] | None = None
    while True:
        await asyncio.sleep(min(POOL_INTERVAL, catalog_interval))
        now = time.monotonic()
        for pool in list(app.pools.values()):
            pool.reap_idle(now)
            if pool.size < pool.settings.min_size:
                spawn(pool.fill_min())
        if app.coordinators and now >= next_recovery and (recovering is None or recovering.done()):
            next_recovery = now + RECOVERY_INTERVAL
            recovering = spawn(recover_all(app))
        unknown = any(r is not None and r.topology.user_aggregates is None for r in app.routers.values())
        if (now >= next_catalog or unknown) and (reading is None or reading.done()):
            next_catalog = now + catalog_interval
            reading = spawn(refresh_catalogs(app))
