"""UNION ALL of parts that run on different shards (issue 4: "UNION ALL of routed parts").

pgshard over 3 real shards: `orders` sharded by customer_id, `countries` omnisharded, `notes` on the
default shard only. Parts of sharded rows run together and merge; a part of the default shard, of an
omnisharded table or a constant next to them runs where it routes (proxy/union_read.py), through the
simple and the extended protocol (psycopg preparing, asyncpg). Answers are checked against the rows
the test inserted, column names and types against what the default shard (which has every table)
describes for the same statement, and extended-protocol replies message by message against a
reference: a copy of every row in a schema of the default shard's database.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.protocol import backend, frontend
from tests.conftest import APP_PASSWORD, APP_USER
from tests.e2e.rawclient import RawClient
from tests.e2e.sharded import (  # noqa: F401
    ClusterFactory,
    Sharded,
    ShardedCluster,
    keys_on_shard,
    routing_servers_fixture,
    sharded_cluster_fixture,
)

pytestmark = pytest.mark.e2e

SCHEMA = """
CREATE TABLE orders (id bigint NOT NULL, customer_id bigint NOT NULL, qty int, status varchar(10));
CREATE TABLE countries (code text PRIMARY KEY, name varchar(20));
CREATE TABLE notes (id int, body text);
INSERT INTO countries VALUES ('eu', 'Europe'), ('us', 'United States');
INSERT INTO notes VALUES (1, 'first'), (2, 'second');
"""


@pytest.fixture
def cluster(sharded_cluster: ClusterFactory) -> ShardedCluster:
    cluster = sharded_cluster(
        shards=3,
        sharded_tables=[Sharded("orders", "customer_id", "bigint")],
        omnisharded=["countries"],
        virtual_shards=768,
    )
    cluster.psql_ok(SCHEMA)
    rows = ", ".join(f"({i}, {i % 12 + 1}, {i % 5}, 's{i % 3}')" for i in range(1, 61))
    cluster.psql_ok(f"INSERT INTO orders (id, customer_id, qty, status) VALUES {rows};")
    for shard in range(3):  # the data is spread: every shard has orders, only the default shard notes
        assert cluster.scalar(shard, "SELECT count(*) FROM orders") > 0
        assert cluster.has_table(shard, "notes") == (shard == 0)
    return cluster


ORDERS = [(i, i % 12 + 1, i % 5, f"s{i % 3}") for i in range(1, 61)]


def connect(cluster: ShardedCluster) -> psycopg.Connection[Any]:
    """psycopg through pgshard, never preparing a statement it repeats: the simple protocol for
    statements without parameters (the extended protocol has tests of its own below)."""
    return cluster.connect(prepare_threshold=None)


def fetch(conn: psycopg.Connection[Any], sql: str) -> Counter[tuple[Any, ...]]:
    return Counter(conn.execute(sql).fetchall())


def described(conn: psycopg.Connection[Any], sql: str) -> list[tuple[str, int]]:
    cur = conn.execute(sql)
    assert cur.description is not None
    return [(c.name, c.type_code) for c in cur.description]


def sqlstate(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] | None = None) -> str | None:
    try:
        conn.execute(sql, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def test_parts_of_sharded_rows(cluster: ShardedCluster) -> None:
    a, b = keys_on_shard(cluster, "bigint", 1)[0], keys_on_shard(cluster, "bigint", 2)[0]
    with connect(cluster) as conn:
        got = fetch(conn, f"SELECT id FROM orders WHERE customer_id = {a} UNION ALL "
                          f"SELECT id FROM orders WHERE customer_id = {b}")  # fmt: skip
        assert got == Counter((i,) for i, c, _, _ in ORDERS if c in (a, b))
        both = fetch(conn, "SELECT id, qty FROM orders UNION ALL SELECT id, qty FROM orders WHERE qty = 1")
        pairs = [(i, q) for i, _, q, _ in ORDERS]
        assert both == Counter(pairs + [(i, q) for i, q in pairs if q == 1])
        top = conn.execute(
            f"SELECT id FROM orders WHERE customer_id = {a} UNION ALL "
            f"SELECT id FROM orders WHERE customer_id = {b} ORDER BY id DESC LIMIT 3"
        ).fetchall()
        assert top == sorted([(i,) for i, c, _, _ in ORDERS if c in (a, b)], reverse=True)[:3]
        counts = conn.execute(
            f"SELECT count(*) FROM orders WHERE customer_id = {a} UNION ALL "
            f"SELECT count(*) FROM orders WHERE customer_id = {b}"
        ).fetchall()  # each part on its own shard only: no count of 0 from the other
        customers = Counter(c for _, c, _, _ in ORDERS)
        assert sorted(counts) == sorted([(customers[a],), (customers[b],)])


def test_parts_of_the_default_shard_omnisharded_tables_and_constants(cluster: ShardedCluster) -> None:
    b = keys_on_shard(cluster, "bigint", 2)[0]
    statuses = Counter((s,) for _, _, _, s in ORDERS)
    with connect(cluster) as conn:
        got = fetch(conn, "SELECT status FROM orders UNION ALL SELECT code FROM countries")
        assert got == statuses + Counter([("eu",), ("us",)])  # the countries once, not once per shard
        got = fetch(conn, f"SELECT id FROM notes UNION ALL SELECT id FROM orders WHERE customer_id = {b} "
                          "UNION ALL SELECT 100")  # fmt: skip
        assert got == Counter([(1,), (2,), (100,)] + [(i,) for i, c, _, _ in ORDERS if c == b])
        got = fetch(conn, "SELECT body FROM notes UNION ALL SELECT status FROM orders WHERE qty = 2")
        assert got == Counter([("first",), ("second",)] + [(s,) for _, _, q, s in ORDERS if q == 2])


def test_columns_are_those_of_the_whole_statement(cluster: ShardedCluster) -> None:
    """Names come from the first part, types from the whole union, even on a shard that runs only
    later parts (a NULL, a string constant, varchar next to text)."""
    b = keys_on_shard(cluster, "bigint", 2)[0]
    statements = [
        f"SELECT 1 AS one, NULL AS nothing, 'x' AS letter UNION ALL SELECT id, status, status FROM orders "
        f"WHERE customer_id = {b}",
        "SELECT name FROM countries UNION ALL SELECT status FROM orders",
        "SELECT id::numeric(10,2) AS n FROM notes UNION ALL SELECT qty FROM orders",
    ]
    with connect(cluster) as conn:
        for sql in statements:
            assert described(conn, sql) == described(cluster.direct(0), sql), sql
        rows = fetch(conn, statements[0])
        assert rows == Counter([(1, None, "x")] + [(i, s, s) for i, c, _, s in ORDERS if c == b])
        numbers = conn.execute(statements[2]).fetchall()
        assert sorted(str(n) for (n,) in numbers)[:2] == ["0", "0"]  # qty as numeric, no scale added


def test_errors_and_refusals(cluster: ShardedCluster) -> None:
    with connect(cluster) as conn:
        assert sqlstate(conn, "SELECT 1 / 0 FROM orders UNION ALL SELECT 1 FROM countries") == "22012"
        assert sqlstate(conn, "SELECT nosuch FROM orders UNION ALL SELECT 1 FROM countries") == "42703"
        mixed = "SELECT status FROM orders UNION ALL SELECT code FROM countries"
        assert sqlstate(conn, f"{mixed} ORDER BY 1") == "0A000"
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (2,)  # the session goes on


def test_in_a_transaction_block(cluster: ShardedCluster) -> None:
    b = keys_on_shard(cluster, "bigint", 2)[0]
    sql = f"SELECT id FROM orders WHERE customer_id = {b} UNION ALL SELECT id FROM notes"
    with connect(cluster) as conn:
        before = fetch(conn, sql)
    with connect(cluster) as conn:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO orders (id, customer_id, qty, status) VALUES (999, {b}, 1, 'new')")
        assert fetch(conn, sql) == before + Counter([(999,)])  # sees its own write
        conn.execute("INSERT INTO notes VALUES (3, 'third')")
        assert fetch(conn, sql) == before + Counter([(999,), (3,)])
        conn.execute("ROLLBACK")
        assert fetch(conn, sql) == before
        conn.execute("BEGIN")
        assert fetch(conn, sql) == before  # as the first statement of a block
        assert sqlstate(conn, "SELECT 1 / 0 FROM orders UNION ALL SELECT 1 FROM notes") == "22012"
        assert sqlstate(conn, sql) == "25P02"
        conn.execute("ROLLBACK")
        assert fetch(conn, sql) == before


# -- the extended protocol ---------------------------------------------------------------------------
STATUSES = Counter((s,) for _, _, _, s in ORDERS)
COUNTRIES = Counter([("eu",), ("us",)])


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_through_psycopg_prepared(cluster: ShardedCluster, binary: bool) -> None:
    """psycopg with parameters, and preparing statements (prepare_threshold 0: Parse + Sync, then Bind
    of the named statement, Describe, Execute): the rows, column types and errors one server gives."""
    b = keys_on_shard(cluster, "bigint", 2)[0]
    mixed = "SELECT status FROM orders UNION ALL SELECT code FROM countries"
    with cluster.connect(prepare_threshold=0) as conn:
        cur = conn.cursor(binary=binary)
        for _ in range(3):  # prepared once, bound again
            assert Counter(cur.execute(mixed).fetchall()) == STATUSES + COUNTRIES
        got = cur.execute(
            "SELECT status FROM orders WHERE qty > %s UNION ALL SELECT code FROM countries WHERE code <> %s",
            (2, "us"),
        ).fetchall()
        assert Counter(got) == Counter((s,) for _, _, q, s in ORDERS if q > 2) + Counter([("eu",)])
        keyed = (
            "SELECT id, NULL AS nothing, body AS letter FROM notes WHERE id > %s UNION ALL "
            "SELECT id, status, status FROM orders WHERE customer_id = %s"
        )
        got = cur.execute(keyed, (1, b)).fetchall()
        assert Counter(got) == Counter([(2, None, "second")] + [(i, s, s) for i, c, _, s in ORDERS if c == b])
        assert cur.description is not None
        direct = cluster.direct(0).execute(keyed, (1, b))
        assert direct.description is not None
        assert [(c.name, c.type_code) for c in cur.description] == [
            (c.name, c.type_code) for c in direct.description
        ]
        numbers = cur.execute(
            "SELECT id::numeric(10,2) AS n FROM notes WHERE id = %s UNION ALL SELECT qty FROM orders", (1,)
        ).fetchall()
        assert sorted(str(n) for (n,) in numbers)[:2] == ["0", "0"] and len(numbers) == 61
        assert (
            sqlstate(conn, "SELECT 1 / (qty - qty) FROM orders UNION ALL SELECT 1 FROM countries") == "22012"
        )
        bad = "SELECT qty FROM orders WHERE qty > %s::int UNION ALL SELECT 1 FROM notes"
        assert sqlstate(conn, bad, ("x",)) == "22P02"
        assert cur.execute("SELECT count(*) FROM notes").fetchone() == (2,)  # the session goes on
    with cluster.connect() as conn:  # psycopg's default: the statement is prepared at its 6th run
        for _ in range(8):
            assert Counter(conn.execute(mixed).fetchall()) == STATUSES + COUNTRIES


def test_extended_in_a_transaction_block(cluster: ShardedCluster) -> None:
    """BEGIN and ROLLBACK go as simple queries (psycopg's transaction()), the reads prepared."""
    b = keys_on_shard(cluster, "bigint", 2)[0]
    sql = "SELECT id FROM orders WHERE customer_id = %s UNION ALL SELECT id FROM notes WHERE id > %s"
    before = Counter([(1,), (2,)] + [(i,) for i, c, _, _ in ORDERS if c == b])
    with cluster.connect(prepare_threshold=0) as conn:
        assert Counter(conn.execute(sql, (b, 0)).fetchall()) == before
        with conn.transaction():
            assert Counter(conn.execute(sql, (b, 0)).fetchall()) == before  # the block's first statement
            conn.execute("INSERT INTO orders (id, customer_id, qty) VALUES (%s, %s, 1)", (999, b))
            conn.execute("INSERT INTO notes VALUES (%s, 'third')", (3,))
            assert Counter(conn.execute(sql, (b, 0)).fetchall()) == before + Counter([(999,), (3,)])
            raise psycopg.Rollback
        with conn.transaction():
            conn.execute("INSERT INTO notes VALUES (%s, 'third')", (3,))
            failing = "SELECT 1 / (qty - qty) FROM orders UNION ALL SELECT 1 FROM notes"
            assert sqlstate(conn, failing) == "22012"
            assert sqlstate(conn, sql, (b, 0)) == "25P02"
            raise psycopg.Rollback
        assert Counter(conn.execute(sql, (b, 0)).fetchall()) == before


async def test_through_asyncpg(cluster: ShardedCluster) -> None:
    """asyncpg: binary parameters and results, named statements (Parse + Describe, then Bind +
    Execute), fetchrow and fetchval (an Execute with a row limit), a transaction block."""
    b = keys_on_shard(cluster, "bigint", 2)[0]
    conn = await asyncpg.connect(cluster.url(), timeout=10, command_timeout=20)
    try:
        mixed = (
            "SELECT status, qty FROM orders WHERE qty >= $1 UNION ALL "
            "SELECT code, length(name) FROM countries"
        )
        for floor in (0, 3, 3):
            rows = await conn.fetch(mixed, floor)
            want = Counter((s, q) for _, _, q, s in ORDERS if q >= floor) + Counter([("eu", 6), ("us", 13)])
            assert Counter(tuple(r) for r in rows) == want
        keyed = (
            "SELECT id, NULL::text AS nothing, body FROM notes UNION ALL "
            "SELECT id, status, status FROM orders WHERE customer_id = $1"
        )
        rows = await conn.fetch(keyed, b)
        assert Counter(tuple(r) for r in rows) == Counter(
            [(1, None, "first"), (2, None, "second")] + [(i, s, s) for i, c, _, s in ORDERS if c == b]
        )
        row = await conn.fetchrow("SELECT id FROM notes WHERE id = $1 UNION ALL SELECT id FROM orders", 2)
        assert row is not None and row["id"] in {2} | {i for i, _, _, _ in ORDERS}
        assert await conn.fetchval("SELECT count(*) FROM notes WHERE id < $1 UNION ALL SELECT 7", 9) in (2, 7)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetch(
                "SELECT 1 / (qty - qty) FROM orders WHERE qty > $1 UNION ALL SELECT 1 FROM notes", 0
            )
        block = conn.transaction()
        await block.start()
        await conn.execute("INSERT INTO notes VALUES (3, 'third')")
        both = "SELECT id FROM notes UNION ALL SELECT id FROM orders WHERE customer_id = $1"
        rows = await conn.fetch(both, b)
        assert Counter(r["id"] for r in rows) == Counter([1, 2, 3] + [i for i, c, _, _ in ORDERS if c == b])
        await block.rollback()
        assert Counter(r["id"] for r in await conn.fetch(both, b)) == Counter(
            [1, 2] + [i for i, c, _, _ in ORDERS if c == b]
        )
    finally:
        await conn.close()


def _replies(messages: list[tuple[int, bytes]]) -> list[tuple[str, Any]]:
    """What a client reads, comparable with the reference: errors by SQLSTATE, each result's rows as a
    multiset (pgshard sends them shard by shard), notices and ParameterStatus left out."""
    out: list[tuple[str, Any]] = []
    for msg_type, body in messages:
        kind = chr(msg_type)
        if kind == "E":
            out.append((kind, backend.decode_error_fields(body).get("C")))
        elif kind == "D":
            if out and out[-1][0] == "rows":
                out[-1][1].append(body)
            else:
                out.append(("rows", [body]))
        elif kind not in "NS":
            out.append((kind, body))
    return [(k, sorted(v)) if k == "rows" else (k, v) for k, v in out]


async def _exchange(client: RawClient, data: bytes) -> list[tuple[str, Any]]:
    """Send `data` and read the replies up to ReadyForQuery (or, after a Flush, to the result's end)."""
    client.send(data)
    if not data.endswith(frontend.FLUSH):
        return _replies(await client.read_until_ready())
    messages: list[tuple[int, bytes]] = []
    async with asyncio.timeout(10):
        while not messages or chr(messages[-1][0]) not in "CEs":
            messages.append(await client.read_message())
    return _replies(messages)


async def test_extended_replies_match_one_server(cluster: ShardedCluster) -> None:
    """Message by message, pgshard answers a UNION ALL run part by part as one server holding every
    row does (a schema `ref` of the default shard's database): ParseComplete, ParameterDescription,
    RowDescriptions with the client's format codes, BindComplete, the rows in text or binary (as a
    multiset), CommandComplete or PortalSuspended, errors where the server reports them."""
    b = keys_on_shard(cluster, "bigint", 2)[0]
    rows = ", ".join(f"({i}, {c}, {q}, '{s}')" for i, c, q, s in ORDERS)
    cluster.execute(0, f"""
        CREATE SCHEMA ref;
        CREATE TABLE ref.orders (LIKE public.orders); CREATE TABLE ref.countries (LIKE public.countries);
        CREATE TABLE ref.notes (LIKE public.notes);
        INSERT INTO ref.orders VALUES {rows};
        INSERT INTO ref.countries SELECT * FROM public.countries;
        INSERT INTO ref.notes SELECT * FROM public.notes;
        GRANT USAGE ON SCHEMA ref TO {APP_USER};
        GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA ref TO {APP_USER};
    """)  # fmt: skip
    named = "SELECT status, qty FROM orders WHERE qty > $1 UNION ALL SELECT code, $2 FROM countries"
    keyed = (
        "SELECT id, NULL AS nothing, 'x' AS letter FROM notes WHERE id > $1 UNION ALL "
        "SELECT id, status, status FROM orders WHERE customer_id = $2"
    )

    def one(
        sql: str, params: Sequence[bytes | None] = (), formats: Sequence[int] = (1,), pf: Sequence[int] = ()
    ) -> bytes:
        """psycopg's shape: Parse, Bind, Describe portal, Execute, Sync."""
        return (
            frontend.parse("", sql) + frontend.bind("", "", pf, params, formats) + frontend.describe(b"P")
            + frontend.execute() + frontend.sync()
        )  # fmt: skip

    mixed = "SELECT status FROM orders UNION ALL SELECT code FROM countries"
    steps = [
        # a named statement: Parse, Describe it, Bind text and binary values with per-column formats
        frontend.parse("s1", named) + frontend.describe(b"S", "s1")
        + frontend.bind("", "s1", (0, 1), (b"2", (77).to_bytes(4, "big")), (1, 0))
        + frontend.describe(b"P") + frontend.execute() + frontend.sync(),
        # bound again with other values, binary results, no Describe (asyncpg's shape)
        frontend.bind("", "s1", (), (b"0", b"5"), (1,)) + frontend.execute() + frontend.sync(),
        one(mixed, (), ()),
        one(mixed),
        one(keyed, (b"1", str(b).encode()), (0, 1, 0)),
        one("SELECT id::numeric(10,2) AS n FROM notes WHERE id = $1 UNION ALL SELECT qty FROM orders",
            (b"1",)),
        # errors: a value the Bind rejects, too many result formats, a failure while running
        one("SELECT qty FROM orders WHERE qty > $1 UNION ALL SELECT 1 FROM notes", (b"abc",)),
        one(mixed, (), (1, 1)),
        one("SELECT 1 / (qty - qty) FROM orders UNION ALL SELECT 1 FROM countries"),
        # Flush instead of Sync: the replies, and the ReadyForQuery when the Sync comes
        frontend.parse("", keyed) + frontend.bind("", "", (), (b"0", str(b).encode()))
        + frontend.describe(b"P") + frontend.execute() + frontend.flush(),
        frontend.sync(),
        # Execute with a row limit (asyncpg's fetchrow, fetchval): PortalSuspended once it is reached
        frontend.parse("", "SELECT 1 AS one FROM orders UNION ALL SELECT 1 FROM countries")
        + frontend.bind("", "", (), (), (1,)) + frontend.execute("", 3) + frontend.sync(),
        # in a transaction block, with a write of its own
        frontend.query("BEGIN"),
        frontend.parse("", "INSERT INTO notes VALUES ($1, 'third')") + frontend.bind("", "", (), (b"3",))
        + frontend.execute() + frontend.sync(),
        one("SELECT id, body FROM notes UNION ALL SELECT id, status FROM orders WHERE customer_id = $1",
            (str(b).encode(),)),
        frontend.query("ROLLBACK"),
        frontend.query("SELECT 1"),
    ]  # fmt: skip
    reference = await RawClient.login(
        cluster.servers[0].host, cluster.servers[0].port, APP_USER, APP_PASSWORD, cluster.dbname,
        {"options": "-c search_path=ref"},
    )  # fmt: skip
    proxy = await RawClient.login(cluster.proxy.host, cluster.proxy.port, APP_USER, APP_PASSWORD, "app")
    try:
        for data in steps:
            expected = await _exchange(reference, data)
            got = await _exchange(proxy, data)
            assert got == expected, data[:200]
        # a UNION ALL run part by part in a pipeline with another statement: 0A000, never a wrong answer
        pipeline = frontend.parse("", mixed) + frontend.bind("", "") + frontend.execute()
        replies = await _exchange(proxy, pipeline * 2 + frontend.sync())
        assert [r[0] for r in replies] == ["E", "Z"] and replies[0][1] == "0A000", replies
    finally:
        await reference.terminate()
        await proxy.terminate()
