"""End-to-end fixtures: pgshard as a real subprocess in front of the session's PostgreSQL server.

``proxy_factory(...)`` writes a TOML configuration to a temporary file, starts
``python -m proxy.cli run -c FILE`` on a free port, and returns once a real client has logged in
through it (polled with a deadline, never a fixed sleep). Every proxy a test started is stopped at
teardown (SIGTERM, then SIGKILL after a deadline), and its stderr is attached to the report of a
failed test.

Clients log in to pgshard as one of three users, all sharing the server role of the shard URL
(``app``/``secret``), so every server connection pgshard opens shows up in pg_stat_activity as
``usename = 'app' AND datname = 'app'``:

* ``app`` / ``secret``: SCRAM-SHA-256 (libpq's and every driver's default);
* ``md5user`` / ``md5pass``: md5;
* ``trustuser``: trust (no password).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.localpg import LocalPostgres, free_port
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER

REPO_ROOT = Path(__file__).resolve().parents[2]
TRUST_USER = "trustuser"
HOST = "127.0.0.1"
START_DEADLINE = 30.0
STOP_DEADLINE = 10.0

#: Counts pgshard's server connections: every pool logs in as the shard URL's role.
SERVER_CONNECTIONS_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
    f"AND usename = '{APP_USER}' AND datname = '{APP_DB}' AND pid <> pg_backend_pid()"
)

_PROXIES_KEY = pytest.StashKey[list["ProxyProcess"]]()


# --------------------------------------------------------------------------------------------------
# Small helpers used by the tests too


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """`wait_until` for async tests: the event loop keeps running (and closing sockets) between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        await asyncio.sleep(interval)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's PG* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSQL"))}
    env.update(extra)
    return env


def launch_pgshard(config_path: Path, stderr_path: Path) -> subprocess.Popen[bytes]:
    """`pgshard run -c config_path` as a real process, its output in stderr_path."""
    with stderr_path.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "run", "-c", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            cwd=REPO_ROOT,
            env=clean_env(PYTHONUNBUFFERED="1"),
            start_new_session=True,  # terminal signals for pytest do not reach it
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(header: str, values: Mapping[str, Any]) -> str:
    lines = [header]
    lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def default_users(pool_size: int, pool_mode: str | None = None) -> list[dict[str, Any]]:
    """The three test logins: SCRAM `app`, md5 `md5user`, trust `trustuser`."""
    users: list[dict[str, Any]] = [
        {"name": APP_USER, "password": APP_PASSWORD, "auth": "scram-sha-256"},
        {"name": MD5_USER, "password": MD5_PASSWORD, "auth": "md5"},
        {"name": TRUST_USER, "auth": "trust"},
    ]
    for user in users:
        user["pool_size"] = pool_size
        if pool_mode is not None:
            user["pool_mode"] = pool_mode
    return users


# --------------------------------------------------------------------------------------------------
# The proxy process


@dataclass
class ProxyProcess:
    """One running pgshard process and how to reach it."""

    port: int
    config_path: Path
    stderr_path: Path
    proc: subprocess.Popen[bytes]
    postgres: LocalPostgres
    pool_size: int
    passwords: dict[str, str | None] = field(default_factory=dict)

    host: str = HOST

    # -- connection strings ------------------------------------------------------------------------
    def dsn(
        self, user: str = APP_USER, dbname: str = APP_DB, password: str | None = "", **params: str
    ) -> str:
        """A libpq key=value string; password "" means the configured password of `user`."""
        if password == "":
            password = self.passwords.get(user)
        parts = [f"host={self.host}", f"port={self.port}", f"user={user}", f"dbname={dbname}"]
        if password is not None:
            parts.append(f"password={password}")
        params.setdefault("sslmode", "disable")
        parts += [f"{k}={v}" for k, v in params.items()]
        return " ".join(parts)

    def url(self, user: str = APP_USER, dbname: str = APP_DB) -> str:
        """A postgresql:// URL (asyncpg)."""
        password = self.passwords.get(user)
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def env(self, user: str = APP_USER, dbname: str = APP_DB, **extra: str) -> dict[str, str]:
        """Environment for psql/pgbench pointed at this proxy."""
        env = clean_env(PGHOST=self.host, PGPORT=str(self.port), PGUSER=user, PGDATABASE=dbname)
        password = self.passwords.get(user)
        if password is not None:
            env["PGPASSWORD"] = password
        env.setdefault("PGSSLMODE", "disable")
        env.setdefault("PGCONNECT_TIMEOUT", "10")
        env.update(extra)
        return env

    def connect(self, user: str = APP_USER, dbname: str = APP_DB, **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection through the proxy (autocommit unless told otherwise)."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn(user, dbname), **kwargs)

    def psql(
        self,
        *args: str,
        sql: str | None = None,
        user: str = APP_USER,
        dbname: str = APP_DB,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run psql through the proxy; `sql` goes to stdin (with ON_ERROR_STOP on)."""
        command = [psql_binary(), "-X", "-v", "ON_ERROR_STOP=1", *args]
        if sql is not None:
            command += ["-f", "-"]
        return subprocess.run(
            command,
            input=sql,
            capture_output=True,
            text=True,
            env={**self.env(user, dbname), **(env or {})},
            timeout=timeout,
            cwd=cwd,
        )

    # -- the server behind it ----------------------------------------------------------------------
    def server_connections(self) -> int:
        """pgshard's connections to the PostgreSQL server right now (all users share the role)."""
        return int(self.postgres.psql(SERVER_CONNECTIONS_SQL))

    # -- the process -------------------------------------------------------------------------------
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a deadline; returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(STOP_DEADLINE)


def psql_binary() -> str:
    return shutil.which("psql") or "psql"


def pgbench_binary() -> str:
    return shutil.which("pgbench") or "pgbench"


class ProxyStartError(RuntimeError):
    """pgshard did not come up; carries its stderr."""


class ProxyFactory:
    """Starts pgshard processes for one test; all are stopped at teardown."""

    def __init__(self, postgres: LocalPostgres, tmp_dir: Path, started: list[ProxyProcess]) -> None:
        self.postgres = postgres
        self.tmp_dir = tmp_dir
        self.started = started

    def __call__(
        self,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 4,
        users: Sequence[Mapping[str, Any]] | None = None,
        general: Mapping[str, Any] | None = None,
        tls: tuple[Path, Path] | None = None,
        database: str = APP_DB,
    ) -> ProxyProcess:
        """Start pgshard with these settings and return once a client can log in through it.

        `users`: [[users]] tables (default: the three test logins with `pool_size`); `general`:
        extra [general] keys; `tls`: (cert, key) files.
        """
        user_tables = [dict(u) for u in (users if users is not None else default_users(pool_size))]
        last_error: ProxyStartError | None = None
        for _attempt in range(3):  # the free port may be taken between free_port() and bind()
            port = free_port()
            general_table: dict[str, Any] = {
                "listen": f"{HOST}:{port}",
                "pool_mode": pool_mode,
                "log_level": "info",
                "log_format": "json",
                # Short enough that a server connection pgshard loses track of fails a test in
                # seconds rather than PgBouncer's two minutes; tests of the timeout set their own.
                "query_wait_timeout": 20,
                **(general or {}),
            }
            if tls is not None:
                general_table["tls_cert"], general_table["tls_key"] = str(tls[0]), str(tls[1])
            shard_url = (
                f"postgresql://{APP_USER}:{APP_PASSWORD}@{self.postgres.host}:{self.postgres.port}/{APP_DB}"
            )
            text = _toml_table("[general]", general_table)
            for user in user_tables:
                text += "\n" + _toml_table("[[users]]", user)
            text += "\n" + _toml_table("[[databases]]", {"name": database})
            text += "\n" + _toml_table("[[databases.shards]]", {"primary": shard_url})
            n = len(self.started)
            config_path = self.tmp_dir / f"pgshard-{n}.toml"
            config_path.write_text(text)
            stderr_path = self.tmp_dir / f"pgshard-{n}.stderr"
            proc = launch_pgshard(config_path, stderr_path)
            passwords = {str(u["name"]): u.get("password") for u in user_tables}
            proxy = ProxyProcess(
                port=port,
                config_path=config_path,
                stderr_path=stderr_path,
                proc=proc,
                postgres=self.postgres,
                pool_size=min(int(u.get("pool_size", 20)) for u in user_tables),
                passwords=passwords,
            )
            self.started.append(proxy)
            try:
                self._wait_ready(proxy, user_tables)
                return proxy
            except ProxyStartError as exc:
                proxy.stop()
                last_error = exc
                if "address already in use" not in proxy.stderr().lower():
                    break
        assert last_error is not None
        raise last_error

    @staticmethod
    def _wait_ready(proxy: ProxyProcess, users: Sequence[Mapping[str, Any]]) -> None:
        """TCP connect, then a real login and SELECT 1, polled until a deadline."""
        login_user = str(users[0]["name"])
        deadline = time.monotonic() + START_DEADLINE
        last: str = "no attempt"
        while time.monotonic() < deadline:
            if not proxy.alive():
                raise ProxyStartError(
                    f"pgshard exited with status {proxy.proc.returncode}:\n{proxy.stderr()}"
                )
            try:
                with socket.create_connection((proxy.host, proxy.port), timeout=1):
                    pass
            except OSError as exc:
                last = f"connect: {exc}"
                time.sleep(0.02)
                continue
            try:
                with proxy.connect(login_user, connect_timeout=5) as conn:
                    if conn.execute("SELECT 1").fetchone() == (1,):
                        return
            except psycopg.Error as exc:
                last = f"login: {exc}"
            time.sleep(0.05)
        raise ProxyStartError(f"pgshard was not ready after {START_DEADLINE:g}s ({last}):\n{proxy.stderr()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the stderr of every pgshard a failed test started to its report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for i, proxy in enumerate(item.stash.get(_PROXIES_KEY, [])):
            text = proxy.stderr()
            if len(text) > 20000:
                text = "...\n" + text[-20000:]
            report.sections.append((f"pgshard #{i} stderr (port {proxy.port})", text))


@pytest.fixture
def proxy_factory(
    postgres: LocalPostgres, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ProxyFactory]:
    """``proxy_factory(pool_mode=..., pool_size=..., users=..., general=..., tls=...) -> ProxyProcess``."""
    started: list[ProxyProcess] = []
    request.node.stash[_PROXIES_KEY] = started
    factory = ProxyFactory(postgres, tmp_path, started)
    try:
        yield factory
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> ProxyProcess:
    """pgshard in transaction mode with pool_size 4 and the three test logins."""
    return proxy_factory()


# --------------------------------------------------------------------------------------------------
# Watching the server


def superuser_connection(postgres: LocalPostgres) -> psycopg.Connection[Any]:
    """A direct, autocommit connection as `postgres` over the server's unix socket (trusted)."""
    return psycopg.connect(
        host=str(postgres.socket_dir),
        port=postgres.port,
        user="postgres",
        dbname=APP_DB,
        autocommit=True,
        connect_timeout=10,
    )


class ConnectionSampler:
    """Samples pgshard's server-side connection count every `interval` seconds in a thread."""

    def __init__(self, postgres: LocalPostgres, interval: float = 0.1) -> None:
        self.postgres = postgres
        self.interval = interval
        self.samples: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-sampler", daemon=True)

    def _run(self) -> None:
        try:
            with superuser_connection(self.postgres) as conn:
                while not self._stop.is_set():
                    row = conn.execute(SERVER_CONNECTIONS_SQL).fetchone()
                    assert row is not None
                    self.samples.append(int(row[0]))
                    self._stop.wait(self.interval)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def max(self) -> int:
        if self.errors:
            raise self.errors[0]
        return max(self.samples, default=0)


@pytest.fixture
def db(postgres: LocalPostgres) -> Iterator[psycopg.Connection[Any]]:
    """A direct superuser connection to database `app`, for checking what reached the server."""
    with superuser_connection(postgres) as conn:
        yield conn
