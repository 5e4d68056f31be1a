"""Query cancellation: asyncpg sends a CancelRequest when a query times out; keys never cross clients."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.protocol import frontend
from tests.e2e.conftest import ProxyFactory, ProxyProcess, async_wait_until
from tests.e2e.rawclient import RawClient, errors_in, send_cancel_request

pytestmark = pytest.mark.e2e


def _active(db: psycopg.Connection[Any], pattern: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
        "AND pid <> pg_backend_pid()",
        (pattern,),
    ).fetchone()
    assert row is not None
    return int(row[0])


async def test_wait_for_timeout_cancels_the_query(proxy: ProxyProcess, db: psycopg.Connection[Any]) -> None:
    conn = await asyncpg.connect(proxy.url(), timeout=10)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetch("SELECT pg_sleep(10)"), 0.5)
        # Well before the 10 s sleep would have ended by itself, nothing is sleeping any more.
        await async_wait_until(
            lambda: _active(db, "%pg_sleep(10)%") == 0, timeout=5, what="the query to be cancelled"
        )
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        assert not conn.is_in_transaction()
        # Cancelling inside a transaction aborts that transaction, as on PostgreSQL.
        tx = conn.transaction()
        await tx.start()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetch("SELECT pg_sleep(10)"), 0.5)
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT 1")
        await tx.rollback()
        assert await conn.fetchval("SELECT $1::text", "usable") == "usable"
    finally:
        await conn.close()
    await async_wait_until(lambda: _active(db, "%pg_sleep(10)%") == 0, timeout=5, what="no sleep left")


async def test_cancel_key_of_an_idle_client_never_reaches_another_clients_query(
    proxy_factory: ProxyFactory, db: psycopg.Connection[Any]
) -> None:
    """pool_size=1: A used the server connection, then B runs on it; A's key must not cancel B."""
    proxy = proxy_factory(pool_size=1)
    a = await RawClient.login(proxy.host, proxy.port, "app", "secret", "app")
    b = await RawClient.login(proxy.host, proxy.port, "app", "secret", "app")
    try:
        assert await a.scalar("SELECT pg_backend_pid()::text") is not None
        b.send(frontend.query("SELECT pg_sleep(1.5), 'b survives'"))
        await async_wait_until(lambda: _active(db, "%'b survives'%") == 1, what="B's query to run")
        assert await send_cancel_request(proxy.host, proxy.port, a.pid, a.secret) == b""
        messages = await b.read_until_ready(timeout=15)
        assert not errors_in(messages), errors_in(messages)
        assert any(b"b survives" in body for msg_type, body in messages if msg_type == b"D"[0])
        assert await a.scalar("SELECT 'a fine'") == "a fine"
    finally:
        await a.terminate()
        await b.terminate()
