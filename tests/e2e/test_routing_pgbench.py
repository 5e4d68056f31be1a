"""pgbench through pgshard on a table sharded by `aid` (issue 3).

The accounts are created and loaded through pgshard (INSERT ... VALUES batches, each split over
the shards), their placement is checked against PostgreSQL's hash partitioning, then 8 pgbench
clients read and update accounts by key with a custom script. Every UPDATE adds 1 to one balance,
so afterwards the balances summed over all shards equal the number of transactions pgbench
reports, whatever shard each one ran on.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import pgbench_binary
from tests.e2e.sharded import (  # noqa: F401
    ClusterFactory,
    Sharded,
    ShardedCluster,
    misplaced,
    routing_servers_fixture,
    sharded_cluster_fixture,
)

pytestmark = pytest.mark.e2e

ACCOUNTS = 10_000
BATCH = 1_000
SECONDS = 5
SCRIPT = """\\set aid random(1, 10000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
"""


def load_accounts(cluster: ShardedCluster) -> None:
    sql = (
        "CREATE TABLE pgbench_accounts "
        "(aid integer PRIMARY KEY, bid integer NOT NULL, abalance integer NOT NULL, filler character(84));\n"
    )
    for start in range(1, ACCOUNTS + 1, BATCH):
        rows = ", ".join(f"({aid}, {1 + aid // 100_000}, 0, '')" for aid in range(start, start + BATCH))
        sql += f"INSERT INTO pgbench_accounts (aid, bid, abalance, filler) VALUES {rows};\n"
    out = cluster.psql_ok(sql)
    assert out.splitlines().count(f"INSERT 0 {BATCH}") == ACCOUNTS // BATCH, out
    counts = [int(cluster.scalar(i, "SELECT count(*) FROM pgbench_accounts")) for i in range(cluster.n)]
    assert sum(counts) == ACCOUNTS and all(counts), counts
    for i in range(cluster.n):
        assert misplaced(cluster, i, "pgbench_accounts", "aid", "integer") == 0


def balances(cluster: ShardedCluster) -> int:
    return sum(
        int(cluster.scalar(i, "SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts"))
        for i in range(cluster.n)
    )


@pytest.mark.parametrize(
    ("mode", "n"),
    [pytest.param("simple", 2, id="simple-2shards"), pytest.param("prepared", 4, id="prepared-4shards")],
)
def test_pgbench_script_by_key(sharded_cluster: ClusterFactory, tmp_path: Path, mode: str, n: int) -> None:
    cluster = sharded_cluster(
        shards=n,
        sharded_tables=[Sharded("pgbench_accounts", "aid", "integer")],
        pool_size=4,
        general={"query_wait_timeout": 10},
        deadline=60,
    )
    load_accounts(cluster)
    script = tmp_path / "by_key.sql"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [
            pgbench_binary(),
            "-n",
            "-f",
            str(script),
            "-M",
            mode,
            "-c",
            "8",
            "-j",
            "2",
            "-T",
            str(SECONDS),
        ],
        capture_output=True,
        text=True,
        env=cluster.proxy.env(),
        timeout=SECONDS + 40,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    assert processed is not None, output
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert failed is not None and int(failed.group(1)) == 0, output
    done = int(processed.group(1))
    assert done > 0, output
    # Every transaction's UPDATE hit exactly one row on exactly one shard, and nothing moved.
    assert balances(cluster) == done, output
    counts = [int(cluster.scalar(i, "SELECT count(*) FROM pgbench_accounts")) for i in range(n)]
    assert sum(counts) == ACCOUNTS
    touched = [
        int(cluster.scalar(i, "SELECT count(*) FROM pgbench_accounts WHERE abalance > 0")) for i in range(n)
    ]
    assert all(touched), f"some shard got no updates: {touched}"
    for i in range(n):
        assert misplaced(cluster, i, "pgbench_accounts", "aid", "integer") == 0
