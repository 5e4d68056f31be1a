"""Pool modes: session, statement, pinned clients in transaction mode, and query_wait_timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.e2e.conftest import ProxyFactory

pytestmark = pytest.mark.e2e


def _one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_session_mode_keeps_one_server_connection(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_mode="session", pool_size=2)
    with proxy.connect() as a, proxy.connect() as b:
        pid = _one(a, "SELECT pg_backend_pid()")
        a.execute("CREATE TEMP TABLE session_tmp (v int)")
        for i in range(5):
            with a.transaction():
                a.execute("INSERT INTO session_tmp VALUES (%s)", (i,))
            assert _one(b, "SELECT to_regclass('session_tmp') IS NULL") is True
            assert _one(a, "SELECT pg_backend_pid()") == pid
        assert _one(a, "SELECT sum(v) FROM session_tmp") == 10
        a.execute("SET work_mem = '9MB'")
        assert _one(b, "SHOW work_mem") == "4MB"
        assert _one(a, "SHOW work_mem") == "9MB"
        assert _one(b, "SELECT pg_backend_pid()") != pid


def test_session_mode_resets_the_connection_for_the_next_client(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_mode="session", pool_size=1)
    with proxy.connect() as a:
        pid = _one(a, "SELECT pg_backend_pid()")
        a.execute("CREATE TEMP TABLE session_left (v int)")
        a.execute("SET work_mem = '9MB'")
    with proxy.connect() as b:
        assert _one(b, "SELECT pg_backend_pid()") == pid  # pool_size=1: the same server connection
        assert _one(b, "SELECT to_regclass('session_left') IS NULL") is True
        assert _one(b, "SHOW work_mem") == "4MB"


def test_statement_mode_refuses_transaction_blocks(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_mode="statement", pool_size=2)
    with proxy.connect() as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            conn.execute("BEGIN")
        assert info.value.sqlstate == "0A000"
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("START TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        assert _one(conn, "SELECT 41 + 1") == 42
        assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
    result = proxy.psql("-A", "-t", "-c", "SELECT 'statement mode'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "statement mode"


def test_pinned_client_keeps_its_server_and_is_reset_when_it_leaves(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_size=2)
    with proxy.connect() as a, proxy.connect() as b:
        a.execute("CREATE TEMP TABLE pinned_tmp (v int)")
        a.execute("LISTEN pinned_channel")
        pid = _one(a, "SELECT pg_backend_pid()")
        for i in range(6):
            with a.transaction():
                a.execute("INSERT INTO pinned_tmp VALUES (%s)", (i,))
            # B gets the other server connection, never A's.
            with b.transaction():
                assert _one(b, "SELECT pg_backend_pid()") != pid
                assert _one(b, "SELECT to_regclass('pinned_tmp') IS NULL") is True
            assert _one(a, "SELECT pg_backend_pid()") == pid
        assert _one(a, "SELECT count(*) FROM pinned_tmp") == 6
        b.execute("NOTIFY pinned_channel, 'hello'")
        a.execute("SELECT 1")
        notices = list(a.notifies(timeout=5, stop_after=1))
        assert [n.payload for n in notices] == ["hello"]
    # A has left: its server connection must come back clean. Hold every pooled connection at once
    # and look at each of them.
    with proxy.connect() as c1, proxy.connect() as c2:
        seen = []
        c1.execute("BEGIN")
        c2.execute("BEGIN")
        for conn in (c1, c2):
            seen.append(
                conn.execute(
                    "SELECT pg_backend_pid(), to_regclass('pinned_tmp') IS NULL, "
                    "(SELECT count(*) FROM pg_listening_channels())"
                ).fetchone()
            )
        c1.execute("COMMIT")
        c2.execute("COMMIT")
    assert pid in [row[0] for row in seen], f"A's server connection {pid} was not reused: {seen}"
    assert all(row[1] is True and row[2] == 0 for row in seen), seen


def test_query_wait_timeout(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_size=1, general={"query_wait_timeout": 1})
    with proxy.connect() as holder, proxy.connect() as waiter:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        with pytest.raises(psycopg.Error) as info:
            waiter.execute("SELECT %s::text", ("extended",))
        assert "query_wait_timeout" in str(info.value)
        holder.execute("COMMIT")
        assert waiter.execute("SELECT %s::text", ("after",)).fetchone() == ("after",)
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        with pytest.raises(psycopg.Error) as info2:
            waiter.execute("SELECT 'again'")
        assert "query_wait_timeout" in str(info2.value)
        holder.execute("ROLLBACK")
        assert _one(waiter, "SELECT 'usable'") == "usable"


async def test_query_wait_timeout_simple_protocol(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_size=1, general={"query_wait_timeout": 1})
    holder = await asyncpg.connect(proxy.url(), timeout=10)
    waiter = await asyncpg.connect(proxy.url(), timeout=10)
    try:
        await holder.execute("BEGIN")
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncio.wait_for(waiter.execute("SELECT 1"), 15)  # no arguments: a simple Query
        assert "query_wait_timeout" in str(info.value)
        await holder.execute("COMMIT")
        assert await waiter.execute("SELECT 1") == "SELECT 1"
        assert await waiter.fetchval("SELECT $1::int", 3) == 3
    finally:
        await holder.close()
        await waiter.close()


async def test_session_mode_hands_the_connection_on_when_a_client_leaves(proxy_factory: ProxyFactory) -> None:
    """pool_size=1 in session mode: a second client's query waits for the first client to leave."""
    proxy = proxy_factory(pool_mode="session", pool_size=1, general={"query_wait_timeout": 15})
    first = await asyncpg.connect(proxy.url(), timeout=10)
    second = await asyncpg.connect(proxy.url(), timeout=10)
    try:
        await first.execute("CREATE TEMP TABLE first_only (v int)")
        first_pid = await first.fetchval("SELECT pg_backend_pid()")
        query = asyncio.create_task(second.fetchrow("SELECT pg_backend_pid(), to_regclass('first_only')"))
        await first.close()
        row = await asyncio.wait_for(query, 20)
        assert row is not None and tuple(row) == (first_pid, None)
    finally:
        await first.close()
        await second.close()
