"""UNION ALL of parts that run on different shards (issue 4: "UNION ALL of routed parts").

pgshard over 3 real shards: `orders` sharded by customer_id, `countries` omnisharded, `notes` on the
default shard only. Parts of sharded rows run together and merge; a part of the default shard, of an
omnisharded table or a constant next to them runs where it routes (proxy/union_read.py). Answers are
checked against the rows the test inserted, and column names and types against what the default
shard (which has every table) describes for the same statement.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest

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
    """psycopg through pgshard, never preparing a statement it repeats: the extended protocol, in
    which a UNION ALL run part by part is refused (see test_errors_and_refusals)."""
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
        # the extended protocol (psycopg with a parameter, or a statement it prepares after running it
        # prepare_threshold times) cannot run parts apart (yet): refused, never wrong
        extended = "SELECT status FROM orders WHERE qty > %s UNION ALL SELECT code FROM countries"
        assert sqlstate(conn, extended, (1,)) == "0A000"
        with cluster.connect(prepare_threshold=0) as prepared:
            assert sqlstate(prepared, mixed) == "0A000"
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
