"""Faults on the client side: killed clients, bad logins, malformed bytes, stray cancels, many clients.

None of them may leave a transaction or a lock behind on the server, grow the pool past its size,
or disturb any other client.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import secrets
import subprocess
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.protocol import frontend
from tests.e2e.conftest import ProxyFactory, ProxyProcess, async_wait_until, psql_binary, wait_until
from tests.e2e.rawclient import LoginError, RawClient, errors_in, send_cancel_request

pytestmark = pytest.mark.e2e

OPEN_TRANSACTIONS_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = 'app' "
    "AND datname = 'app' AND pid <> pg_backend_pid() "
    "AND (state LIKE 'idle in transaction%%' OR (state = 'active' AND query NOT LIKE '%%pg_stat_activity%%'))"
)
ROW_LOCKS_SQL = (
    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
    "WHERE c.relname = 'fault_rows' AND l.pid <> pg_backend_pid()"
)


def _count(db: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> int:
    row = db.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def _nothing_left_open(db: psycopg.Connection[Any]) -> Callable[[], bool]:
    return lambda: _count(db, OPEN_TRANSACTIONS_SQL) == 0 and _count(db, ROW_LOCKS_SQL) == 0


@pytest.fixture
def fault_rows(db: psycopg.Connection[Any]) -> str:
    db.execute("DROP TABLE IF EXISTS fault_rows")
    db.execute("CREATE TABLE fault_rows (id int PRIMARY KEY, v int NOT NULL)")
    db.execute("INSERT INTO fault_rows SELECT g, 0 FROM generate_series(1, 5) g")
    db.execute("ALTER TABLE fault_rows OWNER TO app")
    return "fault_rows"


async def connect(proxy: ProxyProcess, user: str = "app", **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.url(user), timeout=10, **kwargs)


# --------------------------------------------------------------------------------------------------
# Killed clients


def test_psql_killed_mid_transaction_leaves_nothing_behind(
    proxy: ProxyProcess, db: psycopg.Connection[Any], fault_rows: str
) -> None:
    proc = subprocess.Popen(
        [psql_binary(), "-X", "-v", "ON_ERROR_STOP=1", "-f", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=proxy.env(),
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(
            "BEGIN;\nUPDATE fault_rows SET v = v + 1 WHERE id = 1;\nSELECT pg_sleep(60) AS killed_client;\n"
        )
        proc.stdin.close()
        wait_until(
            lambda: (
                _count(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                    ("%killed_client%",),
                )
                == 1
                and _count(db, ROW_LOCKS_SQL) > 0
            ),
            timeout=15,
            what="the psql transaction to hold its lock and sleep",
        )
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    wait_until(_nothing_left_open(db), timeout=15, what="no open transaction and no lock on the server")
    with proxy.connect() as conn:
        conn.execute("SET lock_timeout = '5s'")
        assert conn.execute("UPDATE fault_rows SET v = v + 10 WHERE id = 1 RETURNING v").fetchone() == (10,)
    assert proxy.server_connections() <= proxy.pool_size


async def test_aborted_socket_in_transaction_is_rolled_back_and_reused(
    proxy_factory: ProxyFactory, db: psycopg.Connection[Any], fault_rows: str
) -> None:
    proxy = proxy_factory(pool_size=1)
    conn = await connect(proxy)
    try:
        tx = conn.transaction()
        await tx.start()
        assert await conn.execute("UPDATE fault_rows SET v = v + 1 WHERE id = 2") == "UPDATE 1"
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert _count(db, ROW_LOCKS_SQL) > 0
        conn._transport.abort()  # the client vanishes without a Terminate, idle in transaction
    finally:
        conn.terminate()
    await async_wait_until(
        _nothing_left_open(db), timeout=15, what="the abandoned transaction to be rolled back"
    )
    other = await connect(proxy)
    try:
        # pool_size=1: the rolled-back server connection was kept and serves the next client.
        assert await other.fetchval("SELECT pg_backend_pid()") == pid
        await other.execute("SET lock_timeout = '5s'")
        assert await other.fetchval("UPDATE fault_rows SET v = v + 100 WHERE id = 2 RETURNING v") == 100
    finally:
        await other.close()
    assert proxy.server_connections() <= 1


async def test_clients_leaving_open_transactions_keep_the_pool_bounded(
    proxy_factory: ProxyFactory, db: psycopg.Connection[Any], fault_rows: str
) -> None:
    proxy = proxy_factory(pool_size=2)
    pids: set[int] = set()
    for i in range(8):
        conn = await connect(proxy)
        try:
            await conn.execute("BEGIN")
            await conn.execute("UPDATE fault_rows SET v = v + 1 WHERE id = $1", 1 + i % 5)
            pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            if i % 3 == 0:  # some leave a failed transaction rather than a live one
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await conn.execute("SELECT 1/0")
        finally:
            if i % 2 == 0:
                await conn.close()  # a polite Terminate, inside the transaction
            else:
                conn._transport.abort()
                conn.terminate()
        await async_wait_until(
            _nothing_left_open(db), timeout=15, what=f"client {i}'s transaction to be rolled back"
        )
        assert proxy.server_connections() <= 2
    assert _count(db, "SELECT sum(v) FROM fault_rows") == 0
    # Rolled back and reused, not closed and replaced: two server connections served all eight.
    assert len(pids) <= 2, pids
    survivor = await connect(proxy)
    try:
        assert await survivor.fetchval("SELECT count(*) FROM fault_rows WHERE v = 0") == 5
    finally:
        await survivor.close()


# --------------------------------------------------------------------------------------------------
# Bad logins


async def test_wrong_password_is_refused_and_others_are_unaffected(proxy: ProxyProcess) -> None:
    bystander = await connect(proxy)
    try:
        for user in ("app", "md5user", "nosuchuser"):
            with pytest.raises(asyncpg.PostgresError) as info:
                await asyncpg.connect(
                    host=proxy.host, port=proxy.port, user=user, password="wrong", database="app", timeout=10
                )
            assert info.value.sqlstate == "28P01", (user, info.value)
        assert await bystander.fetchval("SELECT $1::int", 7) == 7
        fresh = await connect(proxy, "md5user")
        try:
            assert await fresh.fetchval("SELECT 1") == 1
        finally:
            await fresh.close()
    finally:
        await bystander.close()


async def test_unknown_database(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
        await asyncpg.connect(
            host=proxy.host, port=proxy.port, user="app", password="secret", database="nosuchdb", timeout=10
        )
    assert info.value.sqlstate == "3D000"
    conn = await connect(proxy)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------------
# Malformed messages from a raw socket

_BAD_STREAMS: dict[str, bytes] = {
    "unknown message type": b"\x01\x00\x00\x00\x04",
    "garbage bytes": bytes.fromhex("deadbeef") * 8,
    "oversized length": b"Q" + (0x40000000).to_bytes(4, "big") + b"SELECT 1\x00",
    "length below 4": b"Q\x00\x00\x00\x02SELECT 1\x00",
}


async def _raw_login(proxy: ProxyProcess) -> RawClient:
    return await RawClient.login(proxy.host, proxy.port, "app", "secret", "app")


@pytest.mark.parametrize("case", list(_BAD_STREAMS))
async def test_malformed_stream_gets_08p01_and_is_closed(proxy: ProxyProcess, case: str) -> None:
    bystander = await _raw_login(proxy)
    victim = await _raw_login(proxy)
    try:
        assert await victim.scalar("SELECT 'fine'") == "fine"
        victim.send(_BAD_STREAMS[case])
        messages = await victim.read_until_closed(timeout=10)
        errors = errors_in(messages)
        assert errors, f"no ErrorResponse before the close: {messages}"
        assert errors[0]["C"] == "08P01", errors
        assert await bystander.scalar("SELECT 'bystander'") == "bystander"
        newcomer = await _raw_login(proxy)
        try:
            assert await newcomer.scalar("SELECT 'newcomer'") == "newcomer"
        finally:
            await newcomer.terminate()
    finally:
        victim.close()
        await bystander.terminate()
    await async_wait_until(
        lambda: proxy.server_connections() <= proxy.pool_size, what="the pool to be within its size"
    )


_TRUNCATED: dict[str, bytes] = {
    # A Query whose body ends before its string's terminator.
    "query without its terminator": b"Q\x00\x00\x00\x04",
    # A Bind whose length stops after the portal and statement names.
    "bind cut short": frontend.parse("", "SELECT 1") + b"B\x00\x00\x00\x06\x00\x00" + frontend.sync(),
}


@pytest.mark.parametrize("case", list(_TRUNCATED))
async def test_truncated_message_gets_08p01(proxy: ProxyProcess, case: str) -> None:
    """PostgreSQL answers ERROR 08P01 and stays usable; closing the client would be acceptable too."""
    bystander = await _raw_login(proxy)
    victim = await _raw_login(proxy)
    try:
        victim.send(_TRUNCATED[case])
        messages: list[tuple[int, bytes]] = []
        closed = False
        async with asyncio.timeout(10):
            while True:
                try:
                    messages.append(await victim.read_message())
                except (asyncio.IncompleteReadError, ConnectionError):
                    closed = True
                    break
                if messages[-1][0] == b"Z"[0]:
                    break
        errors = errors_in(messages)
        assert errors and errors[0]["C"] == "08P01", messages
        if not closed:
            assert await victim.scalar("SELECT 'still usable'") == "still usable"
        assert await bystander.scalar("SELECT 'bystander'") == "bystander"
    finally:
        victim.close()
        await bystander.terminate()


async def test_truncated_message_then_eof_does_not_hold_a_server(
    proxy_factory: ProxyFactory, db: psycopg.Connection[Any]
) -> None:
    """A client that dies halfway through a message must not keep a server connection busy."""
    proxy = proxy_factory(pool_size=1)
    for _ in range(3):
        victim = await _raw_login(proxy)
        victim.send(frontend.query("SELECT 'never completed'")[:-6])
        await victim.writer.drain()
        victim.close()
    other = await connect(proxy)
    try:
        assert await asyncio.wait_for(other.fetchval("SELECT 'served'"), 15) == "served"
    finally:
        await other.close()
    await async_wait_until(
        lambda: _count(db, OPEN_TRANSACTIONS_SQL) == 0, what="no open transaction on the server"
    )


# --------------------------------------------------------------------------------------------------
# Cancel requests


async def test_cancel_request_with_unknown_key_is_ignored(
    proxy: ProxyProcess, db: psycopg.Connection[Any]
) -> None:
    client = await _raw_login(proxy)
    try:
        assert client.pid and client.secret is not None
        client.send(frontend.query("SELECT pg_sleep(1.5), 'not cancelled'"))
        await async_wait_until(
            lambda: (
                _count(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                    ("%'not cancelled'%",),
                )
                == 1
            ),
            what="the query to run",
        )
        for pid, secret in [
            (secrets.randbelow(2**31 - 2) + 1, secrets.randbelow(2**31)),  # a key nobody was given
            (client.pid, client.secret ^ 0x5A5A5A5A),  # the right pid with a wrong secret
        ]:
            if pid == client.pid and secret == client.secret:
                continue
            assert await send_cancel_request(proxy.host, proxy.port, pid, secret) == b""
        messages = await client.read_until_ready(timeout=15)
        assert not errors_in(messages), errors_in(messages)
        assert any(b"not cancelled" in body for msg_type, body in messages if msg_type == b"D"[0])
        # Control: the right key does cancel, so the requests above really reached pgshard.
        client.send(frontend.query("SELECT pg_sleep(30), 'cancel me'"))
        await async_wait_until(
            lambda: (
                _count(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                    ("%'cancel me'%",),
                )
                == 1
            ),
            what="the second query to run",
        )
        await send_cancel_request(proxy.host, proxy.port, client.pid, client.secret)
        errors = errors_in(await client.read_until_ready(timeout=15))
        assert [e["C"] for e in errors] == ["57014"]
        assert await client.scalar("SELECT 'after cancel'") == "after cancel"
    finally:
        await client.terminate()


# --------------------------------------------------------------------------------------------------
# Many clients


def _raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def test_a_thousand_idle_clients(proxy: ProxyProcess) -> None:
    clients_wanted = 1000
    _raise_nofile(clients_wanted * 2 + 512)
    gate = asyncio.Semaphore(100)
    clients: list[RawClient] = []

    async def login() -> None:
        async with gate:
            clients.append(await _raw_login(proxy))

    try:
        await asyncio.wait_for(asyncio.gather(*(login() for _ in range(clients_wanted))), 120)
        assert len(clients) == clients_wanted
        conn = await connect(proxy)
        try:
            assert await conn.fetchval("SELECT count(*) FROM generate_series(1, $1::int)", 1000) == 1000
        finally:
            await conn.close()
        # Idle clients are still live: some of them, anywhere in the crowd, run a query now.
        for client in clients[:: clients_wanted // 10]:
            assert await client.scalar("SELECT 'awake'") == "awake"
        assert proxy.server_connections() <= proxy.pool_size
    finally:
        for client in clients:
            client.close()


async def test_max_client_conn_exceeded(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(general={"max_client_conn": 5})
    conns: list[asyncpg.Connection] = []
    try:
        for _ in range(5):
            conns.append(await connect(proxy))
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            conns.append(await connect(proxy))
        assert info.value.sqlstate == "53300"
        with pytest.raises(LoginError) as raw_info:
            await _raw_login(proxy)
        assert raw_info.value.sqlstate == "53300"
        assert await conns[0].fetchval("SELECT 1") == 1  # the ones already in are not disturbed
        await conns.pop().close()

        async def one_more() -> bool:
            try:
                conns.append(await connect(proxy))
            except asyncpg.TooManyConnectionsError:
                return False
            return True

        deadline = asyncio.get_running_loop().time() + 10
        while not await one_more():
            assert asyncio.get_running_loop().time() < deadline, "a freed slot was never reusable"
            await asyncio.sleep(0.05)
        assert await conns[-1].fetchval("SELECT 2") == 2
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()
