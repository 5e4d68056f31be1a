"""asyncpg through pgshard in transaction pooling mode.

asyncpg's defaults are the hard case for a transaction pooler: every query is a named prepared
statement (``__asyncpg_stmt_N__``) kept in a per-connection cache, so statements prepared on one
server connection are executed later on another.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import math
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.e2e.conftest import ConnectionSampler, ProxyFactory, ProxyProcess

pytestmark = pytest.mark.e2e

POOL_SIZE = 4


async def connect(proxy: ProxyProcess, user: str = "app", **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(proxy.url(user), timeout=10, **kwargs)


@pytest.fixture
def items_table(db: psycopg.Connection[Any]) -> str:
    db.execute("DROP TABLE IF EXISTS apg_items")
    db.execute("CREATE TABLE apg_items (id int PRIMARY KEY, client int NOT NULL, label text, amount numeric)")
    db.execute("ALTER TABLE apg_items OWNER TO app")
    return "apg_items"


async def test_many_clients_share_a_small_pool(
    proxy_factory: ProxyFactory, items_table: str, db: psycopg.Connection[Any]
) -> None:
    proxy = proxy_factory(pool_size=POOL_SIZE)
    clients = 16
    rounds = 15

    async def work(client: int) -> int:
        conn = await connect(proxy)
        try:
            done = 0
            for i in range(rounds):
                row_id = client * 1000 + i
                await conn.execute(
                    "INSERT INTO apg_items (id, client, label, amount) VALUES ($1, $2, $3, $4)",
                    row_id,
                    client,
                    f"c{client}-{i}",
                    Decimal(i) / 4,
                )
                row = await conn.fetchrow("SELECT id, label, amount FROM apg_items WHERE id = $1", row_id)
                assert row is not None and tuple(row) == (row_id, f"c{client}-{i}", Decimal(i) / 4)
                async with conn.transaction():
                    await conn.execute("UPDATE apg_items SET amount = amount + $1 WHERE id = $2", 1, row_id)
                    value = await conn.fetchval("SELECT amount FROM apg_items WHERE id = $1", row_id)
                    assert value == Decimal(i) / 4 + 1
                rows = await conn.fetch("SELECT id FROM apg_items WHERE client = $1 ORDER BY id", client)
                assert [r["id"] for r in rows] == [client * 1000 + k for k in range(i + 1)]
                done += 1
            return done
        finally:
            await conn.close()

    with ConnectionSampler(proxy.postgres) as sampler:
        results = await asyncio.wait_for(asyncio.gather(*(work(c) for c in range(clients))), 120)
    assert results == [rounds] * clients
    total = db.execute("SELECT count(*), sum(amount) FROM apg_items").fetchone()
    assert total == (clients * rounds, clients * (sum(Decimal(i) / 4 for i in range(rounds)) + rounds))
    assert 1 <= sampler.max <= POOL_SIZE, f"server connections sampled: max {sampler.max}"


ROUND_TRIPS: list[tuple[str, Any]] = [
    ("numeric", Decimal("12345678901234567890.123456789012345678901234567890")),
    ("numeric", Decimal("-0.000000000000000000000000000001")),
    ("numeric", Decimal("NaN")),
    ("int8", 9223372036854775807),
    ("int2", -32768),
    ("timestamptz", dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC)),
    ("timestamp", dt.datetime(1999, 12, 31, 1, 2, 3, 456000)),
    ("date", dt.date(2000, 1, 1)),
    ("interval", dt.timedelta(days=3, seconds=7, microseconds=11)),
    ("jsonb", json.dumps({"a": [1, 2, {"b": None}], "ü": "snow ☃"})),
    ("int4[]", [1, None, -3]),
    ("text[]", ["a", None, "ü ☃", "", 'quote "x"']),
    ("bytea", bytes(range(256))),
    ("uuid", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("bool", True),
    ("bool", False),
    ("float8", 1.5e300),
    ("float8", float("inf")),
    ("float8", float("-inf")),
    ("text", "tab\tnewline\nnul-free ☃"),
    ("text", None),
]


async def test_type_round_trips(proxy: ProxyProcess) -> None:
    conn = await connect(proxy)
    try:
        for type_name, value in ROUND_TRIPS:
            got = await conn.fetchval(f"SELECT $1::{type_name}", value)
            if isinstance(value, Decimal) and value.is_nan():
                assert isinstance(got, Decimal) and got.is_nan()
            elif type_name == "jsonb":
                assert json.loads(got) == json.loads(value)
            else:
                assert got == value, type_name
        nan = await conn.fetchval("SELECT $1::float8", float("nan"))
        assert math.isnan(nan)
        # Several types in one row, NULLs included, both as parameters and as a stored row.
        await conn.execute("DROP TABLE IF EXISTS apg_types")
        await conn.execute(
            "CREATE TABLE apg_types (n numeric, ts timestamptz, j jsonb, ia int4[], ta text[], "
            "b bytea, u uuid, f float8, ok bool)"
        )
        row = (
            Decimal("3.14159265358979323846264338327950288419716939937510"),
            dt.datetime(2030, 6, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
            json.dumps([1, "two"]),
            [None],
            [],
            b"\x00\xff",
            uuid.uuid4(),
            float("nan"),
            None,
        )
        await conn.execute("INSERT INTO apg_types VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)", *row)
        await conn.execute(
            "INSERT INTO apg_types VALUES (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
        )
        stored = await conn.fetch("SELECT * FROM apg_types ORDER BY n NULLS LAST")
        first = tuple(stored[0])
        assert first[0] == row[0]
        assert first[1] == row[1]
        assert json.loads(first[2]) == [1, "two"]
        assert first[3:7] == ([None], [], b"\x00\xff", row[6])
        assert math.isnan(first[7])
        assert first[8] is None
        assert tuple(stored[1]) == (None,) * 9
    finally:
        await conn.close()


async def test_copy_in_and_out(proxy: ProxyProcess, items_table: str, db: psycopg.Connection[Any]) -> None:
    conn = await connect(proxy)
    try:
        records = [(i, i % 3, None if i % 5 == 0 else f"label {i}", Decimal(i) / 3) for i in range(1, 501)]
        result = await conn.copy_records_to_table(
            "apg_items", records=records, columns=["id", "client", "label", "amount"]
        )
        assert result == "COPY 500"
        out = io.BytesIO()
        status = await conn.copy_from_query(
            "SELECT id, label FROM apg_items WHERE client = $1 ORDER BY id", 1, output=out, format="csv"
        )
        assert status == "COPY 167"
        lines = out.getvalue().decode().splitlines()
        assert lines[:3] == ["1,label 1", "4,label 4", "7,label 7"]
        assert "10," in lines  # NULL label in CSV
        table_out = io.BytesIO()
        assert await conn.copy_from_table("apg_items", output=table_out) == "COPY 500"
        assert len(table_out.getvalue().splitlines()) == 500
        # The connection is fine after COPY, inside and outside a transaction.
        async with conn.transaction():
            assert await conn.fetchval("SELECT count(*) FROM apg_items") == 500
        assert await conn.fetchval("SELECT sum(id) FROM apg_items WHERE label IS NULL") == sum(
            range(5, 501, 5)
        )
    finally:
        await conn.close()
    assert db.execute("SELECT count(*), count(label) FROM apg_items").fetchone() == (500, 400)


async def test_prepared_statement_reused_across_server_connections(proxy_factory: ProxyFactory) -> None:
    """A statement prepared once runs on whichever server connection each transaction gets."""
    proxy = proxy_factory(pool_size=2)
    conn = await connect(proxy)
    blocker = await connect(proxy)
    try:
        stmt = await conn.prepare("SELECT $1::int * 2 AS doubled, pg_backend_pid() AS pid")
        pids: set[int] = set()
        for i in range(40):
            if i % 2 == 0:
                # The blocker takes the server connection `conn` used last, so `conn` gets the other.
                blocker_tx = blocker.transaction()
                await blocker_tx.start()
                await blocker.fetchval("SELECT 1")
            async with conn.transaction():
                row = await stmt.fetchrow(i)
                assert row is not None and row["doubled"] == 2 * i
                pids.add(row["pid"])
                assert await stmt.fetchval(i + 1) == 2 * (i + 1)
            if i % 2 == 0:
                await blocker_tx.commit()
            assert await stmt.fetchval(-i) == -2 * i  # outside any transaction block
        assert len(pids) == 2, f"expected both server connections to run the statement, got {pids}"
        # Statements asyncpg caches for plain queries behave the same way.
        for i in range(10):
            assert await conn.fetchval("SELECT $1::text || 'x'", str(i)) == f"{i}x"
    finally:
        await blocker.close()
        await conn.close()


async def test_executemany(proxy: ProxyProcess, items_table: str, db: psycopg.Connection[Any]) -> None:
    conn = await connect(proxy)
    try:
        await conn.executemany(
            "INSERT INTO apg_items (id, client, label) VALUES ($1, $2, $3)",
            [(i, 7, f"many {i}") for i in range(200)],
        )
        async with conn.transaction():
            await conn.executemany(
                "UPDATE apg_items SET amount = $2 WHERE id = $1", [(i, Decimal(i)) for i in range(0, 200, 2)]
            )
        assert await conn.fetchval("SELECT count(amount) FROM apg_items") == 100
    finally:
        await conn.close()
    assert db.execute("SELECT count(*), sum(amount) FROM apg_items").fetchone() == (
        200,
        sum(range(0, 200, 2)),
    )


async def test_error_in_transaction_then_usable(
    proxy: ProxyProcess, items_table: str, db: psycopg.Connection[Any]
) -> None:
    conn = await connect(proxy)
    try:
        await conn.execute("INSERT INTO apg_items (id, client) VALUES (1, 1)")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("INSERT INTO apg_items (id, client) VALUES (2, 1)")
                await conn.execute("INSERT INTO apg_items (id, client) VALUES (1, 1)")
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM apg_items") == 1
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("SELECT 1 / $1::int", 0)
        # A failed statement inside a transaction aborts it until the rollback, as in PostgreSQL.
        tx = conn.transaction()
        await tx.start()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("SELECT 1 / $1::int", 0)
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT 1")
        await tx.rollback()
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        async with conn.transaction():
            await conn.execute("INSERT INTO apg_items (id, client) VALUES (3, 1)")
    finally:
        await conn.close()
    assert db.execute("SELECT array_agg(id ORDER BY id) FROM apg_items").fetchone() == ([1, 3],)


async def test_nested_transactions_and_savepoints(proxy: ProxyProcess, items_table: str) -> None:
    conn = await connect(proxy)
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO apg_items (id, client) VALUES (1, 1)")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():  # a savepoint
                    await conn.execute("INSERT INTO apg_items (id, client) VALUES (2, 1)")
                    await conn.execute("INSERT INTO apg_items (id, client) VALUES (1, 1)")
            await conn.execute("INSERT INTO apg_items (id, client) VALUES (3, 1)")
        assert [r["id"] for r in await conn.fetch("SELECT id FROM apg_items ORDER BY id")] == [1, 3]
    finally:
        await conn.close()


async def test_users_with_md5_and_trust_logins(proxy: ProxyProcess) -> None:
    for user in ("app", "md5user", "trustuser"):
        conn = await connect(proxy, user)
        try:
            assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        finally:
            await conn.close()
