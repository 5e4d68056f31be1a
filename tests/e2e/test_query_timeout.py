"""`query_timeout` over several shards (issue 4): a shard that does not answer in time fails the query
with 57014 naming that shard, in every multi-shard path, and the client carries on afterwards.

One shard is made slow for real: a direct connection holds an ACCESS EXCLUSIVE lock on its copy of
the table, so the statement pgshard sends there waits while the other shard answers at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import wait_until
from tests.e2e.sharded import (  # noqa: F401
    ClusterFactory,
    Sharded,
    ShardedCluster,
    routing_servers_fixture,
    sharded_cluster_fixture,
)

pytestmark = pytest.mark.e2e

SLOW = 1  # the shard whose table is locked


@pytest.fixture
def cluster(sharded_cluster: ClusterFactory) -> ShardedCluster:
    cluster = sharded_cluster(
        shards=2,
        sharded_tables=[Sharded("items", "id", "bigint"), Sharded("notes", "id", "bigint")],
        general={"query_timeout": 1},
    )
    cluster.psql_ok(
        "CREATE TABLE items (id bigint PRIMARY KEY, n int); CREATE TABLE notes (id bigint, n int);"
    )
    rows = ", ".join(f"({i}, {i % 7})" for i in range(1, 201))
    cluster.psql_ok(f"INSERT INTO items (id, n) VALUES {rows}; INSERT INTO notes (id, n) VALUES {rows};")
    assert all(rows[0][0] > 0 for rows in cluster.each("SELECT count(*) FROM items"))
    return cluster


@pytest.fixture
def slow_shard(cluster: ShardedCluster) -> Iterator[None]:
    """Shard SLOW's `items` locked by a direct connection for the test's duration."""
    pg = cluster.servers[SLOW]
    locker: psycopg.Connection[Any] = psycopg.connect(
        host=str(pg.socket_dir), port=pg.port, user="postgres", dbname=cluster.dbname, connect_timeout=10
    )
    locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        locker.rollback()
        locker.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM items",  # concatenated rows
        "SELECT count(*), sum(n) FROM items",  # merged aggregates
        "SELECT id FROM items ORDER BY id DESC LIMIT 5",  # streaming merge
        "UPDATE items SET n = n + 1",  # a write on every shard
        "COPY items TO STDOUT",  # gathered COPY
    ],
)
@pytest.mark.usefixtures("slow_shard")
def test_a_shard_that_does_not_answer_in_time_is_named(cluster: ShardedCluster, sql: str) -> None:
    with cluster.connect() as conn:
        with pytest.raises(psycopg.Error) as info:
            if sql.startswith("COPY"):
                with conn.cursor().copy(sql) as copy:
                    for _ in copy:
                        pass
            else:
                conn.execute(sql).fetchall()
        assert info.value.sqlstate == "57014", info.value
        assert f"shard {SLOW}" in str(info.value), info.value
        assert "shard 0" not in str(info.value), info.value
        # The client carries on, on the shard that is not locked.
        assert conn.execute("SELECT 'after timeout'").fetchone() == ("after timeout",)


def test_after_the_lock_goes_nothing_is_left_running(cluster: ShardedCluster) -> None:
    pg = cluster.servers[SLOW]
    with psycopg.connect(
        host=str(pg.socket_dir), port=pg.port, user="postgres", dbname=cluster.dbname, connect_timeout=10
    ) as locker:
        locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        with cluster.connect() as conn, pytest.raises(psycopg.Error) as info:
            conn.execute("UPDATE items SET n = n + 1")
        assert info.value.sqlstate == "57014"
    # The lock is gone: the abandoned statement on the slow shard ends and nothing of pgshard's is
    # left idle in a transaction on either shard; the UPDATE changed no row on any shard.
    leftovers = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND usename <> 'postgres' "
        "AND (state LIKE 'idle in transaction%' OR (state = 'active' AND query LIKE 'UPDATE%'))"
    )
    for shard in range(cluster.n):
        wait_until(
            lambda shard=shard: cluster.scalar(shard, leftovers) == 0,
            timeout=15,
            what=f"shard {shard} to have no UPDATE running and no transaction left open",
        )
    unchanged = sum(i % 7 for i in range(1, 201))
    assert sum(rows[0][0] for rows in cluster.each("SELECT sum(n) FROM items")) == unchanged
    with cluster.connect() as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (200,)


@pytest.mark.parametrize("opening", ["", "UPDATE notes SET n = n WHERE id = 1", "SELECT count(*) FROM notes"])
def test_a_timeout_fails_the_block_it_ran_in(cluster: ShardedCluster, opening: str) -> None:
    """Held BEGIN, a block on one shard, a block already on both: each is failed, takes only ROLLBACK.

    The block opens on `notes`, so that the lock on `items` taken afterwards does not wait for it.
    """
    pg = cluster.servers[SLOW]
    with cluster.connect() as conn:
        conn.execute("BEGIN")
        if opening:
            conn.execute(opening)
        with psycopg.connect(
            host=str(pg.socket_dir), port=pg.port, user="postgres", dbname=cluster.dbname, connect_timeout=10
        ) as locker:
            locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(psycopg.Error) as info:
                conn.execute("SELECT id FROM items ORDER BY id LIMIT 3").fetchall()
            assert info.value.sqlstate == "57014", info.value
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            with pytest.raises(psycopg.Error) as aborted:
                conn.execute("SELECT 1")
            assert aborted.value.sqlstate == "25P02"
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (200,)
