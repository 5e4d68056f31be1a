"""Shared fixtures: real, throw-away PostgreSQL servers for the e2e tests.

Tests that need servers are marked ``@pytest.mark.e2e``; they are skipped, with the reason, only
when this machine has no PostgreSQL server binaries. Servers come from proxy/localpg.py, which runs
them as an unprivileged user when we are root and stops them even if pytest is killed.

Every server is preloaded the same way, so tests can rely on it:

* role ``app`` / ``secret`` (stored as SCRAM-SHA-256), owner of database ``app``;
* role ``md5user`` / ``md5pass`` (stored as md5), which pg_hba lets in with md5 over TCP;
* everyone else authenticates with scram-sha-256 over TCP; the unix socket is trusted.

initdb runs once per session, into a template; each server is a copy of it (much faster).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.localpg import (
    LocalPostgres,
    PostgresNotFoundError,
    find_bindir,
    make_base_dir,
    remove_base_dir,
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compiled hot-path modules shadow their sources: refuse to test code that is not the source."""
    from proxy.native import stale_modules

    stale = stale_modules()
    if stale:
        pytest.exit(
            f"{', '.join(stale)} changed after they were compiled, so the tests would run the old code: "
            "run `pip install -e .` again (or ./test.sh, which does)",
            returncode=4,
        )


APP_USER = "app"
APP_PASSWORD = "secret"
APP_DB = "app"
MD5_USER = "md5user"
MD5_PASSWORD = "md5pass"

#: pg_hba.conf rules of every fixture server (after the implicit "local all all trust").
HBA_LINES: list[str] = [
    f"host all {MD5_USER} 127.0.0.1/32 md5",
    f"host all {MD5_USER} ::1/128 md5",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host all all ::1/128 scram-sha-256",
]

_TEMPLATE_NAME = "_template"


def _missing_postgres() -> str | None:
    """Why e2e tests cannot run here, or None when they can."""
    try:
        find_bindir()
    except PostgresNotFoundError as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing_postgres()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"e2e test needs PostgreSQL: {reason}")
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)


class PgFactory:
    """Starts named servers on demand; the same name returns the same (running) server."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.servers: dict[str, LocalPostgres] = {}
        self._settings: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._template: LocalPostgres | None = None
        self._template_lock = threading.Lock()

    def template(self) -> LocalPostgres:
        """The stopped, preloaded server that every fixture server is copied from."""
        with self._template_lock:
            if self._template is None:
                tpl = LocalPostgres(self.base_dir, name=_TEMPLATE_NAME)
                tpl.init()
                tpl.start()
                try:
                    tpl.create_role(APP_USER, APP_PASSWORD)
                    tpl.create_database(APP_DB, owner=APP_USER)
                    tpl.create_role(MD5_USER, MD5_PASSWORD, method="md5")
                    tpl.set_hba(HBA_LINES)
                finally:
                    tpl.stop()
                self._template = tpl
            return self._template

    def __call__(self, name: str, settings: Mapping[str, str] | None = None) -> LocalPostgres:
        if name == _TEMPLATE_NAME:
            raise ValueError(f"{name!r} is reserved")
        wanted = dict(settings or {})
        with self._lock:
            name_lock = self._name_locks.setdefault(name, threading.Lock())
        with name_lock:
            pg = self.servers.get(name)
            if pg is not None:
                if self._settings[name] != wanted:
                    raise ValueError(
                        f"server {name!r} already exists with settings {self._settings[name]}, not {wanted}"
                    )
            else:
                pg = LocalPostgres(self.base_dir, name=name, settings=wanted)
                pg.init(template=self.template())
                self.servers[name] = pg
                self._settings[name] = wanted
            if not pg.is_running():  # a test may have stopped it
                pg.start()
            return pg

    def many(self, names: Sequence[str], settings: Mapping[str, str] | None = None) -> list[LocalPostgres]:
        """Start several servers in parallel (startup is mostly waiting on child processes)."""
        self.template()
        with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
            return list(pool.map(lambda n: self(n, settings), names))

    def close(self) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(self.servers))) as pool:
            list(pool.map(lambda pg: pg.stop(), list(self.servers.values())))
        remove_base_dir(self.base_dir)


@pytest.fixture(scope="session")
def pg_factory() -> Iterator[PgFactory]:
    """``pg_factory(name, settings=None) -> LocalPostgres``: preloaded servers, stopped at session end."""
    reason = _missing_postgres()
    if reason is not None:
        pytest.skip(f"e2e test needs PostgreSQL: {reason}")
    factory = PgFactory(make_base_dir("tests"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def postgres(pg_factory: PgFactory) -> LocalPostgres:
    """One preloaded server, shared by the whole session; do not stop or reconfigure it."""
    return pg_factory("pg0")


@pytest.fixture(scope="session")
def shards(pg_factory: PgFactory) -> list[LocalPostgres]:
    """Two preloaded shard servers, shared by the whole session."""
    return pg_factory.many(["shard0", "shard1"])
