"""Transaction pooling never loses one client's session state nor leaks it to another.

With pool_size=1 every client shares the single server connection, so interleaving two clients
makes the server connection change hands on every transaction; each must still see exactly the
state it would see on a dedicated PostgreSQL connection.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import ProxyFactory, ProxyProcess, psql_binary

pytestmark = pytest.mark.e2e

#: Settings compared between clients; application_name is checked on its own, since a client that
#: sends none has its own rule (test_client_without_application_name_sees_it_empty).
SETTINGS = ("search_path", "statement_timeout", "TimeZone", "work_mem", "DateStyle")


@pytest.fixture
def proxy1(proxy_factory: ProxyFactory) -> ProxyProcess:
    return proxy_factory(pool_size=1)


@pytest.fixture
def defaults(db: psycopg.Connection[Any]) -> dict[str, str]:
    """What a fresh direct connection that sets nothing sees."""
    return {name: _show(db, name) for name in SETTINGS}


@pytest.fixture
def schemas(proxy1: ProxyProcess) -> Iterator[None]:
    """Two tables named `whereami`, in public and in schema ss_a, telling which one a query found."""
    with proxy1.connect() as conn:
        conn.execute("DROP SCHEMA IF EXISTS ss_a CASCADE")
        conn.execute("DROP TABLE IF EXISTS public.whereami")
        conn.execute("CREATE SCHEMA ss_a")
        conn.execute("CREATE TABLE ss_a.whereami AS SELECT 'ss_a'::text AS v")
        conn.execute("CREATE TABLE public.whereami AS SELECT 'public'::text AS v")
    yield


def _show(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute(f"SHOW {name}").fetchone()
    assert row is not None
    return str(row[0])


def _pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def _state(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {name: _show(conn, name) for name in SETTINGS}


def test_set_is_kept_for_its_client_and_never_leaks(
    proxy1: ProxyProcess, defaults: dict[str, str], schemas: None
) -> None:
    with proxy1.connect() as a, proxy1.connect(application_name="client-b") as b:
        a.execute("SET search_path TO ss_a, public")
        a.execute("SET application_name = 'client-a'")
        a.execute("SET statement_timeout = '1234ms'")
        a.execute("SET TIME ZONE 'Asia/Tokyo'")
        a.execute("SET work_mem TO '7MB'")
        a.execute("SET DateStyle = 'German'")
        wanted_a = {
            "search_path": "ss_a, public",
            "statement_timeout": "1234ms",
            "TimeZone": "Asia/Tokyo",
            "work_mem": "7MB",
            "DateStyle": "German, DMY",
        }
        for _ in range(3):
            assert _state(b) == defaults
            assert _show(b, "application_name") == "client-b"
            assert _state(a) == wanted_a
            assert _show(a, "application_name") == "client-a"
            assert b.execute("SELECT v FROM whereami").fetchone() == ("public",)
            assert a.execute("SELECT v FROM whereami").fetchone() == ("ss_a",)
            assert _pid(a) == _pid(b)  # one server connection: they really did share it
        # The settings are in force on the server, not just echoed back by SHOW.
        with pytest.raises(psycopg.errors.QueryCanceled):
            a.execute("SELECT pg_sleep(5)")
        assert b.execute("SELECT 'slept' FROM pg_sleep(1.5)").fetchone() == (
            "slept",
        )  # B has no 1234 ms limit
        assert a.execute("SELECT to_char(now(), 'TZH')").fetchone() == ("+09",)
        assert b.execute("SELECT to_char(now(), 'TZH')").fetchone() != ("+09",)
        app_names = a.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
        assert app_names == ("client-a",)
        assert b.execute(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone() == ("client-b",)


def test_client_without_application_name_sees_it_empty(proxy1: ProxyProcess) -> None:
    """As on a direct connection, a client that sends no application_name sees ''."""
    with proxy1.connect() as a:
        assert _show(a, "application_name") == ""


def test_set_local_and_rolled_back_set_are_not_kept(proxy1: ProxyProcess, defaults: dict[str, str]) -> None:
    with proxy1.connect() as a, proxy1.connect() as b:
        a.execute("SET work_mem = '8MB'")
        # SET LOCAL lasts until the end of its transaction only.
        a.execute("BEGIN")
        a.execute("SET LOCAL work_mem = '16MB'")
        a.execute("SET LOCAL statement_timeout = '9s'")
        assert _show(a, "work_mem") == "16MB"
        a.execute("COMMIT")
        _state(b)
        assert _show(a, "work_mem") == "8MB"
        assert _show(a, "statement_timeout") == defaults["statement_timeout"]
        # A SET in a transaction that rolls back is undone.
        a.execute("BEGIN")
        a.execute("SET work_mem = '32MB'")
        assert _show(a, "work_mem") == "32MB"
        a.execute("ROLLBACK")
        _state(b)
        assert _show(a, "work_mem") == "8MB"
        # ... also when the transaction failed first.
        a.execute("BEGIN")
        a.execute("SET work_mem = '33MB'")
        with pytest.raises(psycopg.errors.DivisionByZero):
            a.execute("SELECT 1/0")
        a.execute("ROLLBACK")
        _state(b)
        assert _show(a, "work_mem") == "8MB"
        # A SET in a transaction that commits is kept.
        a.execute("BEGIN")
        a.execute("SET work_mem = '24MB'")
        a.execute("COMMIT")
        assert _state(b) == defaults
        assert _show(a, "work_mem") == "24MB"
        assert _state(b) == defaults


def test_set_rolled_back_to_savepoint_is_undone(
    proxy_factory: ProxyFactory, defaults: dict[str, str]
) -> None:
    """ROLLBACK TO SAVEPOINT undoes only the SETs after the savepoint; COMMIT keeps the one before.

    pool_size=2, and after the commit B holds the server connection A used, so A's next query runs
    on the other one: A sees there only what pgshard itself recorded and replays.
    """
    proxy = proxy_factory(pool_size=2)
    with proxy.connect() as a, proxy.connect() as b:
        a.execute("BEGIN")
        b.execute("BEGIN")  # both server connections exist from here on
        a.execute("COMMIT")
        b.execute("COMMIT")
        a.execute("BEGIN")
        a.execute("SET work_mem = '10MB'")
        a.execute("SAVEPOINT s1")
        a.execute("SET work_mem = '20MB'")
        a.execute("ROLLBACK TO SAVEPOINT s1")
        assert _show(a, "work_mem") == "10MB"
        a_pid = _pid(a)
        a.execute("COMMIT")
        b.execute("BEGIN")
        b_pid = _pid(b)
        assert _show(a, "work_mem") == "10MB", f"A on {_pid(a)} (was {a_pid}; B holds {b_pid})"
        assert _show(b, "work_mem") == defaults["work_mem"]
        b.execute("COMMIT")
        assert _state(b) == defaults
        assert _show(a, "work_mem") == "10MB"


def _warm_two_servers(a: psycopg.Connection[Any], b: psycopg.Connection[Any]) -> None:
    """Make the pool open both of its server connections."""
    a.execute("BEGIN")
    b.execute("BEGIN")
    a.execute("COMMIT")
    b.execute("COMMIT")


def test_set_config_is_tracked_like_set(proxy_factory: ProxyFactory) -> None:
    """set_config(..., false) is a SET, also twice in one statement; A then moves to the other server."""
    proxy = proxy_factory(pool_size=2)
    with proxy.connect() as a, proxy.connect() as b:
        _warm_two_servers(a, b)
        a.execute(
            "SELECT set_config('work_mem', '13MB', false), set_config('statement_timeout', '7s', false)"
        )
        assert (_show(a, "work_mem"), _show(a, "statement_timeout")) == ("13MB", "7s")
        a_pid = _pid(a)
        b.execute("BEGIN")
        b_pid = _pid(b)
        where = f"A on {_pid(a)} (was {a_pid}; B holds {b_pid})"
        assert (_show(a, "work_mem"), _show(a, "statement_timeout")) == ("13MB", "7s"), where
        assert _show(b, "work_mem") == "4MB"
        b.execute("COMMIT")


def test_set_config_of_a_list_setting(proxy1: ProxyProcess, schemas: None) -> None:
    """set_config('search_path', 'ss_a,public', false) names two schemas, not one called "ss_a,public"."""
    with proxy1.connect() as a, proxy1.connect() as b:
        a.execute("SELECT set_config('search_path', 'ss_a,public', false)")
        for _ in range(2):
            assert _show(a, "search_path") == "ss_a,public"
            assert a.execute("SELECT v FROM whereami").fetchone() == ("ss_a",)
            assert b.execute("SELECT v FROM whereami").fetchone() == ("public",)


def test_reset_and_reset_all(proxy1: ProxyProcess, defaults: dict[str, str]) -> None:
    with proxy1.connect() as a, proxy1.connect() as b:
        a.execute("SET work_mem = '5MB'")
        a.execute("SET statement_timeout = '3s'")
        a.execute("SET search_path = pg_catalog")
        a.execute("RESET work_mem")
        assert _state(b) == defaults
        assert _show(a, "work_mem") == defaults["work_mem"]
        assert _show(a, "statement_timeout") == "3s"
        a.execute("RESET ALL")
        assert _state(b) == defaults
        assert _state(a) == defaults
        a.execute("SET statement_timeout = '4s'")
        a.execute("RESET statement_timeout")
        _state(b)
        assert _show(a, "statement_timeout") == defaults["statement_timeout"]


def test_startup_parameters_apply_on_every_server_connection(
    proxy1: ProxyProcess, defaults: dict[str, str], schemas: None
) -> None:
    dsn = proxy1.dsn(
        options="'-c search_path=ss_a,public -c statement_timeout=4321'", application_name="start-app"
    )
    with psycopg.connect(dsn, autocommit=True) as c, proxy1.connect() as b:
        for _ in range(3):
            assert _show(c, "search_path") == "ss_a,public"  # as PostgreSQL 15 shows it
            assert _show(c, "statement_timeout") == "4321ms"
            assert _show(c, "application_name") == "start-app"
            assert c.execute("SELECT v FROM whereami").fetchone() == ("ss_a",)
            assert c.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone() == ("start-app",)
            assert _state(b) == defaults
            assert b.execute("SELECT v FROM whereami").fetchone() == ("public",)
        # SET then RESET returns to the start-up value, as on a direct connection.
        c.execute("SET search_path = public")
        assert c.execute("SELECT v FROM whereami").fetchone() == ("public",)
        c.execute("RESET search_path")
        _state(b)
        assert _show(c, "search_path") == "ss_a,public"  # as PostgreSQL 15 shows it
        c.execute("SET statement_timeout = 0")
        c.execute("RESET ALL")
        _state(b)
        assert _show(c, "statement_timeout") == "4321ms"
        assert _show(c, "application_name") == "start-app"


def test_pgoptions_through_psql(proxy1: ProxyProcess, schemas: None) -> None:
    """libpq's PGOPTIONS and PGAPPNAME, with another client using the one server connection between."""
    with proxy1.connect() as b:
        b.execute("SET search_path = pg_catalog")  # B leaves its own state on the server connection
        result = subprocess.run(
            [
                *(psql_binary(), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"),
                *("-c", "SHOW search_path", "-c", "SELECT v FROM whereami", "-c", "SHOW application_name"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=proxy1.env(PGOPTIONS="-c search_path=ss_a", PGAPPNAME="psql-opts"),
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["ss_a", "ss_a", "psql-opts"]
        assert _show(b, "search_path") == "pg_catalog"


def test_discard_all(proxy1: ProxyProcess, defaults: dict[str, str]) -> None:
    dsn = proxy1.dsn(options="'-c statement_timeout=4321'", application_name="a-start")
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as a, proxy1.connect() as b:
        a.execute("SET work_mem = '6MB'")
        a.execute("SET application_name = 'before-discard'")
        assert a.execute("SELECT %s::int", (1,)).fetchone() == (1,)  # a named prepared statement
        a.execute("PREPARE sql_level AS SELECT 2")
        assert a.execute("EXECUTE sql_level").fetchone() == (2,)
        a.execute("DISCARD ALL")
        assert _show(a, "work_mem") == defaults["work_mem"]
        assert _show(a, "application_name") == "a-start"
        assert _show(a, "statement_timeout") == "4321ms"  # start-up options are the session defaults
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            a.execute("EXECUTE sql_level")
        assert _state(b) == defaults
        # Named statements psycopg prepared before DISCARD ALL are gone server-side; psycopg
        # re-prepares them, and through pgshard that must work too.
        assert a.execute("SELECT %s::int", (3,)).fetchone() == (3,)
        assert _show(a, "work_mem") == defaults["work_mem"]
