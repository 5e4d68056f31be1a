"""User-defined aggregates (issue 4: never a wrong answer): pgshard cannot combine partial states
of an aggregate it does not know, so a read over several shards calling one is refused with 0A000
naming it, while a read its key keeps on one shard runs there. pgshard knows them from CREATE
AGGREGATE passing through it, and from the default shard's catalog, read at start-up and every
general.catalog_refresh_interval seconds (short here, and polled with a deadline).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from parser.analysis import analyse
from proxy.localpg import LocalPostgres
from tests.e2e.sharded import (  # noqa: F401
    ClusterFactory,
    Sharded,
    ShardedCluster,
    keys_on_shard,
    routing_servers_fixture,
    sharded_cluster_fixture,
)

pytestmark = pytest.mark.e2e

SCHEMA = "CREATE TABLE orders (id bigint NOT NULL, customer_id bigint NOT NULL, qty int NOT NULL);"
REFRESH_DEADLINE = 20.0


@pytest.fixture
def cluster(sharded_cluster: ClusterFactory) -> ShardedCluster:
    cluster = sharded_cluster(
        shards=2,
        sharded_tables=[Sharded("orders", "customer_id", "bigint")],
        general={"catalog_refresh_interval": 1},
    )
    cluster.psql_ok(SCHEMA)
    rows = ", ".join(f"({i}, {i % 10 + 1}, {i})" for i in range(1, 41))
    cluster.psql_ok(f"INSERT INTO orders (id, customer_id, qty) VALUES {rows};")
    return cluster


def answer(conn: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]] | tuple[str, str]:
    """The rows, or (SQLSTATE, message)."""
    try:
        return conn.execute(sql).fetchall()
    except psycopg.Error as exc:
        return exc.sqlstate or "", exc.diag.message_primary or ""


def test_aggregate_created_through_pgshard(cluster: ShardedCluster) -> None:
    key = keys_on_shard(cluster, "bigint", 1)[0]
    with cluster.connect(prepare_threshold=None) as conn:
        conn.execute("CREATE AGGREGATE total (int) (sfunc = int4pl, stype = int)")
        for shard in range(cluster.n):
            assert cluster.scalar(shard, "SELECT count(*) FROM pg_proc WHERE proname = 'total'") == 1
        state, message = answer(conn, "SELECT total(qty) FROM orders")
        assert state == "0A000" and "total()" in message and "shard=N" in message
        expected = sum(i for i in range(1, 41) if i % 10 + 1 == key)
        assert answer(conn, f"SELECT total(qty) FROM orders WHERE customer_id = {key}") == [(expected,)]
        assert answer(conn, "/* pgshard: shard=1 */ SELECT total(qty) > 0 FROM orders") == [(True,)]
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="total"):
            conn.execute("SELECT total(qty) FROM orders WHERE qty > %s", (0,))


def test_aggregate_created_on_the_shards_directly_is_picked_up(cluster: ShardedCluster) -> None:
    """Created behind pgshard's back: the periodic catalog read learns it, and from then on the
    read is refused instead of answered with one row per shard."""
    for shard in range(cluster.n):
        cluster.execute(shard, "CREATE AGGREGATE behind (int) (sfunc = int4pl, stype = int)")
    deadline = time.monotonic() + REFRESH_DEADLINE
    with cluster.connect(prepare_threshold=None) as conn:
        while True:
            got = answer(conn, "SELECT behind(qty) FROM orders")
            if isinstance(got, tuple):
                assert got[0] == "0A000" and "behind()" in got[1]
                break
            assert len(got) == cluster.n  # before the refresh: one row per shard (what is guarded)
            assert time.monotonic() < deadline, "pgshard did not learn the aggregate from the catalog"
            time.sleep(0.05)
        key = keys_on_shard(cluster, "bigint", 0)[0]
        expected = sum(i for i in range(1, 41) if i % 10 + 1 == key)
        assert answer(conn, f"SELECT behind(qty) FROM orders WHERE customer_id = {key}") == [(expected,)]


def test_every_builtin_aggregate_is_known_to_the_parser(routing_servers: list[LocalPostgres]) -> None:
    """pg_catalog's aggregates of this server, each called with its number of arguments: sqlglot
    or the parser's list knows each one as an aggregate (else a read over several shards would be
    answered with one row per shard), and none is taken for a user-defined one."""
    text = routing_servers[0].psql(
        "SELECT DISTINCT p.proname, p.pronargs FROM pg_proc p JOIN pg_aggregate a ON a.aggfnoid = p.oid "
        "WHERE p.pronamespace = 'pg_catalog'::regnamespace AND a.aggkind = 'n'"  # not WITHIN GROUP ones
    )
    rows = [line.split("|") for line in text.splitlines()]
    assert len(rows) > 30
    unknown = []
    for name, nargs in rows:
        args = ", ".join(f"c{i}" for i in range(max(int(nargs), 1)))
        plan = analyse(f"SELECT {name}({args}) FROM t", frozenset())
        if not plan.merge.aggregates or plan.user_aggregates:
            unknown.append(name)
    assert unknown == []
