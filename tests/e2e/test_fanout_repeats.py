"""A cross-shard read run again and again (proxy/fanout_read.py): from its second run the lead shard
gets the partial query together with its Describe, on the word of the last run that the merge needed
no probe; the columns are checked on every run. These tests change the columns between runs (the
hint is then wrong: the lead's partial result is dropped and the statement runs the long way) and
fail statements on a repeat, inside and outside transaction blocks, through both protocols."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.e2e.sharded import (  # noqa: F401
    ClusterFactory,
    Sharded,
    ShardedCluster,
    routing_servers_fixture,
    sharded_cluster_fixture,
)

pytestmark = pytest.mark.e2e

ROWS = [(i, i % 7 + 1, i % 5, f"s{i % 4}") for i in range(1, 81)]  # id, customer_id, qty, status


@pytest.fixture
def cluster(sharded_cluster: ClusterFactory) -> ShardedCluster:
    cluster = sharded_cluster(
        shards=3, sharded_tables=[Sharded("orders", "customer_id", "bigint")], virtual_shards=768
    )
    values = ", ".join(f"({i}, {c}, {q}, '{s}')" for i, c, q, s in ROWS)
    cluster.psql_ok(
        "CREATE TABLE orders (id bigint, customer_id bigint NOT NULL, qty int, status text);\n"
        f"INSERT INTO orders (id, customer_id, qty, status) VALUES {values};"
    )
    for shard in range(3):
        assert cluster.scalar(shard, "SELECT count(*) FROM orders") > 0
    return cluster


def expected_top(key: Any, limit: int) -> list[tuple[Any, ...]]:
    return [(i, q) for i, _, q, _ in sorted(ROWS, key=key)][:limit]


def sqlstate(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> str | None:
    try:
        conn.execute(sql, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


@pytest.mark.parametrize("prepare", [None, 0], ids=["simple", "extended"])
def test_repeats_follow_column_changes(cluster: ShardedCluster, prepare: int | None) -> None:
    top = "SELECT id, qty FROM orders ORDER BY qty DESC, id LIMIT 6"
    count = "SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY qty"
    with cluster.connect(prepare_threshold=prepare) as conn:
        for _ in range(3):
            assert conn.execute(top).fetchall() == expected_top(lambda r: (-r[2], r[0]), 6)
            assert conn.execute(count).fetchall() == [(q, 16) for q in range(5)]
        # qty becomes text: the merge now needs each column's collation (the probe)
        conn.execute("ALTER TABLE orders ALTER COLUMN qty TYPE text")
        for _ in range(3):
            got = conn.execute(top).fetchall()
            assert got == [(i, str(q)) for i, q in expected_top(lambda r: (-r[2], r[0]), 6)]
            assert conn.execute(count).fetchall() == [(str(q), 16) for q in range(5)]
        # and back: the probe is no longer needed, the hint is learnt again
        conn.execute("ALTER TABLE orders ALTER COLUMN qty TYPE int USING qty::int")
        for _ in range(3):
            assert conn.execute(top).fetchall() == expected_top(lambda r: (-r[2], r[0]), 6)


@pytest.mark.parametrize("prepare", [None, 0], ids=["simple", "extended"])
def test_repeats_that_fail(cluster: ShardedCluster, prepare: int | None) -> None:
    failing = "SELECT id, 10 / (qty - qty) FROM orders ORDER BY id LIMIT 3"
    top = "SELECT id, qty FROM orders ORDER BY id DESC LIMIT 2"
    with cluster.connect(prepare_threshold=prepare) as conn:
        for _ in range(3):
            assert sqlstate(conn, failing) == "22012"
            assert conn.execute(top).fetchall() == [(80, 0), (79, 4)]
        with conn.transaction():
            for _ in range(2):
                assert conn.execute(top).fetchall() == [(80, 0), (79, 4)]
            conn.execute("INSERT INTO orders (id, customer_id, qty) VALUES (81, 1, 1)")
            assert conn.execute(top).fetchall() == [(81, 1), (80, 0)]
            assert sqlstate(conn, failing) == "22012"
            assert sqlstate(conn, top) == "25P02"
            raise psycopg.Rollback
        assert conn.execute(top).fetchall() == [(80, 0), (79, 4)]
        with conn.transaction():
            assert conn.execute(top).fetchall() == [(80, 0), (79, 4)]  # the first statement of a block
            conn.execute("ALTER TABLE orders ALTER COLUMN qty TYPE text")  # the hint is wrong in the block
            assert conn.execute(top).fetchall() == [(80, "0"), (79, "4")]
            raise psycopg.Rollback
        assert conn.execute(top).fetchall() == [(80, 0), (79, 4)]
