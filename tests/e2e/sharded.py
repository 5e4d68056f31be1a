"""Fixtures for the routing tests: pgshard in front of 2 or 4 real shard servers.

``sharded_cluster(shards=N, sharded_tables=[...], omnisharded=[...])`` gives each test its own,
empty databases on the first N of four session-wide servers (``routing0`` .. ``routing3``), writes a
pgshard configuration with one ``[[databases.shards]]`` per server plus the given
``[[databases.sharded_tables]]``, starts ``python -m proxy.cli run -c FILE``, and returns once a
client has logged in through it (polled with a deadline). At teardown the proxy is stopped and the
databases are dropped. The stderr of a failed test's pgshard is attached to its report by the hook
in tests/e2e/conftest.py.

Clients log in to pgshard as ``app``/``secret``, database ``app``; the shard databases have other,
per-test names (pgshard's server connections use the shard URL's database). Direct access to a
shard, for checking where rows landed, goes through ``cluster.rows(i, sql)`` (superuser, unix
socket).

The fixtures are named in their decorators, so a test module imports the functions
(``from tests.e2e.sharded import routing_servers_fixture, sharded_cluster_fixture  # noqa: F401``)
and asks for ``sharded_cluster`` without an argument shadowing an import.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest

from proxy.localpg import LocalPostgres, free_port
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, PgFactory
from tests.e2e.conftest import (
    _PROXIES_KEY,
    HOST,
    REPO_ROOT,
    START_DEADLINE,
    ProxyProcess,
    ProxyStartError,
    clean_env,
    launch_pgshard,
)

SERVER_NAMES = ("routing0", "routing1", "routing2", "routing3")
TWO = pytest.param(2, id="2shards")
FOUR = pytest.param(4, id="4shards")
SHARD_COUNTS = [TWO, FOUR]
#: A test's pgshard is killed this long after it started, so a client stuck on a hung proxy fails
#: the test (with a note in the attached stderr) instead of hanging the suite.
TEST_DEADLINE = 60.0
_counter = itertools.count()


@dataclass(frozen=True)
class Sharded:
    """One ``[[databases.sharded_tables]]`` entry (hash sharding)."""

    name: str
    column: str
    data_type: str
    function: str = "hash"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _table(header: str, values: dict[str, Any]) -> str:
    return "\n".join([header, *(f"{k} = {_toml_value(v)}" for k, v in values.items())]) + "\n\n"


@dataclass
class ShardedCluster:
    """pgshard over `servers` (shard i is servers[i], database `dbname` on each)."""

    servers: list[LocalPostgres]
    dbname: str
    proxy: ProxyProcess
    config_path: Path
    default_shard: int
    _direct: dict[int, psycopg.Connection[Any]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.servers)

    # -- through pgshard ---------------------------------------------------------------------------
    def psql(self, sql: str, *args: str) -> subprocess.CompletedProcess[str]:
        """psql through pgshard, ON_ERROR_STOP on, `sql` on stdin."""
        return self.proxy.psql(*args, sql=sql)

    def psql_ok(self, sql: str, *args: str) -> str:
        """psql through pgshard; fails the test unless every statement succeeded; returns stdout."""
        proc = self.psql(sql, *args)
        assert proc.returncode == 0, f"psql failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """psycopg through pgshard (autocommit unless told otherwise)."""
        return self.proxy.connect(**kwargs)

    def url(self) -> str:
        """postgresql:// URL of pgshard (asyncpg)."""
        return self.proxy.url()

    # -- straight to a shard -----------------------------------------------------------------------
    def direct(self, shard: int) -> psycopg.Connection[Any]:
        """An autocommit superuser connection to shard `shard`'s database, bypassing pgshard."""
        conn = self._direct.get(shard)
        if conn is None or conn.closed:
            pg = self.servers[shard]
            conn = psycopg.connect(
                host=str(pg.socket_dir),
                port=pg.port,
                user="postgres",
                dbname=self.dbname,
                autocommit=True,
                connect_timeout=10,
            )
            self._direct[shard] = conn
        return conn

    def rows(self, shard: int, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return self.direct(shard).execute(sql, params).fetchall()

    def scalar(self, shard: int, sql: str, params: Sequence[Any] | None = None) -> Any:
        row = self.direct(shard).execute(sql, params).fetchone()
        assert row is not None
        return row[0]

    def execute(self, shard: int, sql: str, params: Sequence[Any] | None = None) -> None:
        self.direct(shard).execute(sql, params)

    def each(self, sql: str, params: Sequence[Any] | None = None) -> list[list[tuple[Any, ...]]]:
        """`sql` on every shard directly: one list of rows per shard."""
        return [self.rows(i, sql, params) for i in range(self.n)]

    def has_table(self, shard: int, name: str) -> bool:
        return self.scalar(shard, "SELECT to_regclass(%s) IS NOT NULL", (name,)) is True

    # -- the CLI -----------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`pgshard ARGS -c <this cluster's config>`."""
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=clean_env(),
            timeout=timeout,
        )

    def close(self) -> None:
        for conn in self._direct.values():
            conn.close()
        self._direct.clear()


class ClusterFactory(Protocol):
    def __call__(
        self,
        *,
        shards: int = 2,
        sharded_tables: Sequence[Sharded] = (),
        omnisharded: Sequence[str] = (),
        default_shard: int = 0,
        virtual_shards: int = 1024,
        pool_size: int = 4,
        general: dict[str, Any] | None = None,
        deadline: float = TEST_DEADLINE,
    ) -> ShardedCluster: ...


@pytest.fixture(scope="session", name="routing_servers")
def routing_servers_fixture(pg_factory: PgFactory) -> list[LocalPostgres]:
    """Four shard servers shared by the routing tests (each test uses its own databases)."""
    return pg_factory.many(list(SERVER_NAMES))


def _wait_ready(proxy: ProxyProcess) -> None:
    """A real login and SELECT 1 through pgshard, polled until a deadline."""
    deadline = time.monotonic() + START_DEADLINE
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proxy.alive():
            raise ProxyStartError(f"pgshard exited with status {proxy.proc.returncode}:\n{proxy.stderr()}")
        try:
            with proxy.connect(connect_timeout=2) as conn:
                if conn.execute("SELECT 1").fetchone() == (1,):
                    return
        except psycopg.Error as exc:
            last = str(exc)
        time.sleep(0.05)
    raise ProxyStartError(f"pgshard was not ready after {START_DEADLINE:g}s ({last}):\n{proxy.stderr()}")


def _deadline_kill(proxy: ProxyProcess, deadline: float) -> None:
    if not proxy.alive():
        return
    with proxy.stderr_path.open("a") as f:
        f.write(f"\n[test harness] pgshard killed: the test ran past its {deadline:g}s deadline (a hang?)\n")
    proxy.kill()


def _create_databases(servers: Sequence[LocalPostgres], dbname: str) -> None:
    def create(pg: LocalPostgres) -> None:
        with superuser_connection_to(pg, "postgres") as conn:
            conn.execute(f'CREATE DATABASE "{dbname}" OWNER "{APP_USER}"')

    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        list(pool.map(create, servers))


def _drop_databases(servers: Sequence[LocalPostgres], dbname: str) -> None:
    def drop(pg: LocalPostgres) -> None:
        with superuser_connection_to(pg, "postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        list(pool.map(drop, servers))


def superuser_connection_to(pg: LocalPostgres, dbname: str) -> psycopg.Connection[Any]:
    """A direct, autocommit superuser connection over the server's unix socket (trusted)."""
    return psycopg.connect(
        host=str(pg.socket_dir),
        port=pg.port,
        user="postgres",
        dbname=dbname,
        autocommit=True,
        connect_timeout=10,
    )


@pytest.fixture(name="sharded_cluster")
def sharded_cluster_fixture(
    routing_servers: list[LocalPostgres], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ClusterFactory]:
    """``sharded_cluster(shards=2|4, sharded_tables=[Sharded(...)], omnisharded=[...]) -> ShardedCluster``."""
    started: list[ProxyProcess] = []
    request.node.stash[_PROXIES_KEY] = started
    clusters: list[ShardedCluster] = []
    databases: list[tuple[list[LocalPostgres], str]] = []
    timers: list[threading.Timer] = []

    def make(
        *,
        shards: int = 2,
        sharded_tables: Sequence[Sharded] = (),
        omnisharded: Sequence[str] = (),
        default_shard: int = 0,
        virtual_shards: int = 1024,
        pool_size: int = 4,
        general: dict[str, Any] | None = None,
        deadline: float = TEST_DEADLINE,
    ) -> ShardedCluster:
        servers = routing_servers[:shards]
        assert len(servers) == shards, f"only {len(routing_servers)} routing servers"
        dbname = f"rt{next(_counter)}_{request.node.name}"[:60]
        dbname = "".join(c if c.isalnum() or c == "_" else "_" for c in dbname).lower()
        _create_databases(servers, dbname)
        databases.append((servers, dbname))
        n = len(clusters)
        last_error: ProxyStartError | None = None
        for _attempt in range(3):  # the free port may be taken between free_port() and bind()
            port = free_port()
            text = _table(
                "[general]",
                {
                    "listen": f"{HOST}:{port}",
                    "pool_mode": "transaction",
                    "log_level": "info",
                    "log_format": "json",
                    "query_wait_timeout": 20,
                    **(general or {}),
                },
            )
            text += _table(
                "[[users]]",
                {"name": APP_USER, "password": APP_PASSWORD, "auth": "scram-sha-256", "pool_size": pool_size},
            )
            database: dict[str, Any] = {
                "name": APP_DB,
                "virtual_shards": virtual_shards,
                "default_shard": default_shard,
            }
            if omnisharded:
                database["omnisharded_tables"] = list(omnisharded)
            text += _table("[[databases]]", database)
            for pg in servers:
                url = f"postgresql://{APP_USER}:{APP_PASSWORD}@{pg.host}:{pg.port}/{dbname}"
                text += _table("[[databases.shards]]", {"primary": url})
            for t in sharded_tables:
                text += _table(
                    "[[databases.sharded_tables]]",
                    {"name": t.name, "column": t.column, "data_type": t.data_type, "function": t.function},
                )
            config_path = tmp_path / f"pgshard-sharded-{n}-{_attempt}.toml"
            config_path.write_text(text)
            stderr_path = tmp_path / f"pgshard-sharded-{n}-{_attempt}.stderr"
            proc = launch_pgshard(config_path, stderr_path)
            proxy = ProxyProcess(
                port=port,
                config_path=config_path,
                stderr_path=stderr_path,
                proc=proc,
                postgres=servers[default_shard],
                pool_size=pool_size,
                passwords={APP_USER: APP_PASSWORD},
            )
            started.append(proxy)
            try:
                _wait_ready(proxy)
            except ProxyStartError as exc:
                proxy.stop()
                last_error = exc
                if "address already in use" not in proxy.stderr().lower():
                    break
                continue
            cluster = ShardedCluster(servers, dbname, proxy, config_path, default_shard)
            clusters.append(cluster)
            timer = threading.Timer(deadline, _deadline_kill, (proxy, deadline))
            timer.daemon = True
            timer.start()
            timers.append(timer)
            return cluster
        assert last_error is not None
        raise last_error

    try:
        yield make
    finally:
        for timer in timers:
            timer.cancel()
        for cluster in clusters:
            cluster.close()
        for proxy in started:
            proxy.stop()
        for servers, dbname in databases:
            _drop_databases(servers, dbname)


# --------------------------------------------------------------------------------------------------
# Placement as PostgreSQL computes it


def hash_helper(cluster: ShardedCluster, shard: int, data_type: str) -> str:
    """Create (directly on `shard`) a table hash-partitioned on a `data_type` key; returns its name."""
    name = "pgshard_h_" + "".join(c if c.isalnum() else "_" for c in data_type)
    cluster.execute(shard, f"CREATE TABLE IF NOT EXISTS {name} (k {data_type}) PARTITION BY HASH (k)")
    return name


def misplaced(cluster: ShardedCluster, shard: int, table: str, column: str, data_type: str) -> int:
    """Rows of `table` on `shard` that PARTITION BY HASH with modulus N would not put in remainder `shard`."""
    helper = hash_helper(cluster, shard, data_type)
    return int(
        cluster.scalar(
            shard,
            f"SELECT count(*) FROM {table} "
            f"WHERE NOT satisfies_hash_partition('{helper}'::regclass, %s, %s, {column})",
            (cluster.n, shard),
        )
    )


def home_shard(cluster: ShardedCluster, data_type: str, value: Any) -> int:
    """The shard PostgreSQL's hash partitioning gives `value` (computed on shard 0)."""
    helper = hash_helper(cluster, 0, data_type)
    rows = cluster.rows(
        0,
        f"SELECT r FROM generate_series(0, %s - 1) r "
        f"WHERE satisfies_hash_partition('{helper}'::regclass, %s, r, %s::{data_type})",
        (cluster.n, cluster.n, value),
    )
    assert len(rows) == 1, rows
    return int(rows[0][0])


def home_shards(cluster: ShardedCluster, data_type: str, values: Sequence[Any]) -> list[int]:
    """`home_shard` for many values in one query (same order)."""
    helper = hash_helper(cluster, 0, data_type)
    rows = cluster.rows(
        0,
        f"SELECT v.i, r FROM unnest(%s::{data_type}[]) WITH ORDINALITY AS v(k, i), "
        f"generate_series(0, %s - 1) r "
        f"WHERE satisfies_hash_partition('{helper}'::regclass, %s, r, v.k) ORDER BY v.i",
        (list(values), cluster.n, cluster.n),
    )
    assert [int(i) for i, _ in rows] == list(range(1, len(values) + 1))
    return [int(r) for _, r in rows]


def keys_on_shard(
    cluster: ShardedCluster, data_type: str, shard: int, count: int = 1, start: int = 1
) -> list[Any]:
    """`count` bigint/int keys from `start` up that live on `shard` (found by PostgreSQL's hash)."""
    assert data_type in ("bigint", "integer")
    candidates = list(range(start, start + 200 * cluster.n * count))
    homes = home_shards(cluster, data_type, candidates)
    found = [k for k, h in zip(candidates, homes, strict=True) if h == shard][:count]
    assert len(found) == count
    return found
