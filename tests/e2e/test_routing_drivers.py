"""Reads and transactions by key over real shards, through psql, asyncpg and psycopg (issue 3).

Key values reach pgshard in every form a driver sends them: literals in a simple Query (psql),
binary Bind parameters (asyncpg sends int8, text and uuid in binary; psycopg with ``%b``) and text
Bind parameters (psycopg ``%t``). Reads that need a cross-shard merge (ORDER BY, aggregates, ...)
must give the answer one PostgreSQL server holding every row gives, or SQLSTATE 0A000: never a
different answer. The reference is the same rows in one table written straight to shard 0.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.e2e.sharded import (  # noqa: F401
    FOUR,
    SHARD_COUNTS,
    TWO,
    ClusterFactory,
    Sharded,
    ShardedCluster,
    home_shards,
    keys_on_shard,
    misplaced,
    routing_servers_fixture,
    sharded_cluster_fixture,
)

pytestmark = pytest.mark.e2e
TABLES = [Sharded("items", "id", "bigint"), Sharded("titems", "k", "text"), Sharded("uitems", "u", "uuid")]
COMMAND_TIMEOUT = 8.0

IDS = [*range(1, 301), 2**62, -(2**62), 2**63 - 1]
TEXT_KEYS = [f"user-{i}" for i in range(100)] + ["", "ünïcødé", "it's"]
UUID_KEYS = [uuid.UUID(int=i * 7919 + (i << 100)) for i in range(100)]


def item_row(k: int) -> tuple[int, str, int]:
    return (k, f"v{k % 7}", k % 10)


def sql_lit(value: object) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def load(cluster: ShardedCluster) -> None:
    """The three tables through pgshard, and a reference copy of `items` straight on shard 0."""
    script = (
        "CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL, n integer NOT NULL);\n"
        "CREATE TABLE titems (k text PRIMARY KEY, n integer NOT NULL);\n"
        "CREATE TABLE uitems (u uuid PRIMARY KEY, n integer NOT NULL);\n"
    )
    script += (
        "INSERT INTO items (id, v, n) VALUES "
        + ", ".join(f"({k}, {sql_lit(v)}, {n})" for k, v, n in map(item_row, IDS))
        + ";\n"
    )
    script += (
        "INSERT INTO titems (k, n) VALUES "
        + ", ".join(f"({sql_lit(k)}, {len(k)})" for k in TEXT_KEYS)
        + ";\n"
    )
    script += (
        "INSERT INTO uitems (u, n) VALUES "
        + ", ".join(f"({sql_lit(u)}, {i})" for i, u in enumerate(UUID_KEYS))
        + ";\n"
    )
    cluster.psql_ok(script)
    cluster.execute(0, "CREATE TABLE ref_items (id bigint PRIMARY KEY, v text NOT NULL, n integer NOT NULL)")
    with cluster.direct(0).cursor() as cur:
        cur.executemany("INSERT INTO ref_items (id, v, n) VALUES (%s, %s, %s)", [item_row(k) for k in IDS])


#: Reads over every shard that need more than concatenation: (query over {t}, ordered?).
MERGE_QUERIES: list[tuple[str, bool]] = [
    ("SELECT count(*) FROM {t}", True),
    ("SELECT count(*), sum(n), min(id), max(id) FROM {t}", True),
    ("SELECT avg(n) FROM {t}", True),
    ("SELECT id FROM {t} ORDER BY id", True),
    ("SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT 7", True),
    ("SELECT id FROM {t} ORDER BY id OFFSET 290", True),
    ("SELECT v, count(*) FROM {t} GROUP BY v ORDER BY v", True),
    ("SELECT v, count(*) FROM {t} GROUP BY v", False),
    ("SELECT DISTINCT n FROM {t}", False),
    ("SELECT count(DISTINCT n) FROM {t}", True),
    ("SELECT n, sum(id) FROM {t} GROUP BY n HAVING count(*) > 30 ORDER BY 2 DESC", True),
]


def reference(cluster: ShardedCluster, query: str) -> list[tuple[Any, ...]]:
    return cluster.rows(0, query.format(t="ref_items"))


def check_merge(
    query: str, ordered: bool, expected: list[tuple[Any, ...]], got: list[tuple[Any, ...]] | str
) -> None:
    """`got` is the rows, or the SQLSTATE of the error pgshard answered."""
    if isinstance(got, str):
        assert got == "0A000", f"{query}: SQLSTATE {got}, expected the rows or 0A000"
        return
    if ordered:
        assert got == expected, f"{query}: wrong answer"
    else:
        assert Counter(got) == Counter(expected), f"{query}: wrong answer"


@pytest.mark.parametrize("n", SHARD_COUNTS)
def test_reads_with_psql_and_psycopg(sharded_cluster: ClusterFactory, n: int) -> None:
    cluster = sharded_cluster(shards=n, sharded_tables=TABLES)
    load(cluster)
    homes = dict(zip(IDS, home_shards(cluster, "bigint", IDS), strict=True))
    one_per_shard = [next(k for k in IDS if homes[k] == s) for s in range(n)]
    absent = 10**12

    # psql: literal keys.
    script = "".join(f"SELECT id, v FROM items WHERE id = {k};\n" for k in one_per_shard)
    script += f"SELECT id, v FROM items WHERE id = {absent};\n"
    script += f"SELECT id FROM items WHERE id IN ({', '.join(map(str, [*one_per_shard, absent]))});\n"
    out = cluster.psql_ok(script, "-A", "-t", "-F", ",").splitlines()
    assert out[:n] == [f"{k},v{k % 7}" for k in one_per_shard]
    assert Counter(out[n:]) == Counter(str(k) for k in one_per_shard)

    with cluster.connect() as conn:
        for k in [*one_per_shard, 2**63 - 1, -(2**62)]:
            # Text parameters, binary parameters, binary results.
            assert conn.execute("SELECT id, v FROM items WHERE id = %t", (k,)).fetchall() == [item_row(k)[:2]]
            assert conn.execute("SELECT id, v FROM items WHERE id = %b", (k,)).fetchall() == [item_row(k)[:2]]
            cur = conn.cursor(binary=True)
            assert cur.execute("SELECT id, n FROM items WHERE %s = id", (k,)).fetchall() == [
                (k, item_row(k)[2])
            ]
        assert conn.execute("SELECT id FROM items WHERE id = %b", (absent,)).fetchall() == []
        # The row is on its own shard only: a hint to another shard finds nothing.
        k = one_per_shard[0]
        assert (
            conn.execute(
                f"/* pgshard: shard={(homes[k] + 1) % n} */ SELECT id FROM items WHERE id = {k}"
            ).fetchall()
            == []
        )
        # IN lists and = ANY over several shards: every listed row once, in some order.
        wanted = [*one_per_shard, 5, 6, 7, absent]
        placeholders = ", ".join(["%s"] * len(wanted))
        rows = conn.execute(f"SELECT id FROM items WHERE id IN ({placeholders})", wanted).fetchall()
        assert Counter(r[0] for r in rows) == Counter(k for k in wanted if k != absent)
        rows = conn.execute("SELECT id FROM items WHERE id = ANY(%s)", (wanted,)).fetchall()
        assert Counter(r[0] for r in rows) == Counter(k for k in wanted if k != absent)
        # Text and uuid keys, text and binary.
        for key in (TEXT_KEYS[3], "", "ünïcødé", "it's"):
            for ph in ("%t", "%b"):
                rows = conn.execute(f"SELECT k, n FROM titems WHERE k = {ph}", (key,)).fetchall()
                assert rows == [(key, len(key))]
            assert conn.execute(f"SELECT n FROM titems WHERE k = {sql_lit(key)}").fetchall() == [(len(key),)]
        for i in (0, 1, 2, 3, 99):
            for ph in ("%t", "%b"):
                rows = conn.execute(f"SELECT u, n FROM uitems WHERE u = {ph}", (UUID_KEYS[i],)).fetchall()
                assert rows == [(UUID_KEYS[i], i)]
        assert conn.execute("SELECT n FROM uitems WHERE u = %b", (uuid.uuid4(),)).fetchall() == []
        # No key, no merge: the rows of all shards, concatenated.
        rows = conn.execute("SELECT id, v FROM items WHERE n = 3").fetchall()
        assert Counter(rows) == Counter(item_row(k)[:2] for k in IDS if item_row(k)[2] == 3)
        rows = conn.execute("SELECT k FROM titems WHERE n > %s", (7,)).fetchall()
        assert Counter(r[0] for r in rows) == Counter(k for k in TEXT_KEYS if len(k) > 7)
        # Merges: the single-server answer, or 0A000.
        for query, ordered in MERGE_QUERIES:
            got: list[tuple[Any, ...]] | str
            try:
                got = conn.execute(query.format(t="items")).fetchall()
            except psycopg.Error as exc:
                got = exc.sqlstate or "?"
            check_merge(query, ordered, reference(cluster, query), got)
        # LIMIT without ORDER BY: any rows will do, but no more than asked and no duplicates.
        try:
            rows = conn.execute("SELECT id FROM items LIMIT 5").fetchall()
        except psycopg.Error as exc:
            assert exc.sqlstate == "0A000"
        else:
            assert len(rows) == 5 and len(set(rows)) == 5 and all(r[0] in IDS for r in rows)


async def asyncpg_connect(cluster: ShardedCluster) -> asyncpg.Connection:
    return await asyncpg.connect(cluster.url(), timeout=10, command_timeout=COMMAND_TIMEOUT)


async def asyncpg_close(conn: asyncpg.Connection) -> None:
    """Close politely if the connection still works; a stuck one is dropped at once."""
    try:
        await conn.close(timeout=2)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        conn.terminate()


@pytest.mark.parametrize("n", [FOUR])
async def test_reads_and_writes_with_asyncpg(sharded_cluster: ClusterFactory, n: int) -> None:
    cluster = sharded_cluster(shards=n, sharded_tables=TABLES)
    load(cluster)
    homes = dict(zip(IDS, home_shards(cluster, "bigint", IDS), strict=True))
    one_per_shard = [next(k for k in IDS if homes[k] == s) for s in range(n)]
    conn = await asyncpg_connect(cluster)
    try:
        # $1 is int8, sent in binary; the same prepared statement runs on every shard.
        for k in [*one_per_shard, 2**63 - 1, -(2**62)]:
            row = await conn.fetchrow("SELECT id, v, n FROM items WHERE id = $1", k)
            assert row is not None and tuple(row) == item_row(k)
        stmt = await conn.prepare("SELECT v FROM items WHERE id = $1")
        for k in IDS[:40]:
            assert await stmt.fetchval(k) == item_row(k)[1]
        assert await stmt.fetch(10**12) == []
        for key in (TEXT_KEYS[5], "", "ünïcødé", "it's"):
            assert await conn.fetchval("SELECT n FROM titems WHERE k = $1", key) == len(key)
        for i in (0, 1, 2, 3, 99):
            assert await conn.fetchval("SELECT n FROM uitems WHERE u = $1", UUID_KEYS[i]) == i
        # An IN list of parameters and = ANY($1) spanning shards.
        wanted = [*one_per_shard, 11, 12]
        params = ", ".join(f"${i + 1}" for i in range(len(wanted)))
        rows = await conn.fetch(f"SELECT id FROM items WHERE id IN ({params})", *wanted)
        assert Counter(r["id"] for r in rows) == Counter(wanted)
        rows = await conn.fetch("SELECT id FROM items WHERE id = ANY($1::bigint[])", wanted)
        assert Counter(r["id"] for r in rows) == Counter(wanted)
        # Without a key: concatenated rows of all shards.
        rows = await conn.fetch("SELECT id FROM items WHERE n = $1", 4)
        assert Counter(r["id"] for r in rows) == Counter(k for k in IDS if item_row(k)[2] == 4)
        # Merges: the single-server answer, or 0A000.
        for query, ordered in MERGE_QUERIES:
            got: list[tuple[Any, ...]] | str
            try:
                got = [tuple(r) for r in await conn.fetch(query.format(t="items"))]
            except asyncpg.PostgresError as exc:
                got = str(exc.sqlstate)
            check_merge(query, ordered, reference(cluster, query), got)

        # Writes by key, one row per statement (binary int8 key).
        new = [k + 1000 for k in one_per_shard] + [k + 2000 for k in one_per_shard]
        for k in new:
            assert await conn.execute("INSERT INTO items (id, v, n) VALUES ($1, $2, $3)", *item_row(k)) == (
                "INSERT 0 1"
            )
        assert await conn.execute("UPDATE items SET n = n + 100 WHERE id = $1", new[0]) == "UPDATE 1"
        assert await conn.execute("DELETE FROM items WHERE id = $1", new[-1]) == "DELETE 1"
        # executemany: one Sync for rows of several shards.
        many = [item_row(k) for k in range(5000, 5040)]
        await conn.executemany("INSERT INTO items (id, v, n) VALUES ($1, $2, $3)", many)
        # Without the key: every shard, counts summed.
        expected = sum(1 for k in [*IDS, *new[:-1]] if item_row(k)[2] == 5) + sum(
            1 for r in many if r[2] == 5
        )
        assert await conn.execute("UPDATE items SET v = 'five' WHERE n = $1", 5) == f"UPDATE {expected}"
        # Refused: the key changes, or an INSERT without it.
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.execute("UPDATE items SET id = $1 WHERE id = $2", 10**9, new[0])
        assert refused.value.sqlstate == "0A000"
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.execute("INSERT INTO items (v, n) VALUES ($1, $2)", "x", 1)
        assert refused.value.sqlstate == "0A000"
        assert await conn.fetchval("SELECT 1") == 1  # the connection is fine afterwards
    finally:
        await asyncpg_close(conn)
    keys = [*IDS, *new[:-1], *(r[0] for r in many)]
    per_shard = [[r[0] for r in cluster.rows(i, "SELECT id FROM items")] for i in range(n)]
    assert Counter(k for ks in per_shard for k in ks) == Counter(keys)
    assert all(misplaced(cluster, i, "items", "id", "bigint") == 0 for i in range(n))
    assert (
        sum(
            1
            for i in range(n)
            for _ in cluster.rows(i, "SELECT 1 FROM items WHERE id = %s AND n >= 100", (new[0],))
        )
        == 1
    )


async def test_asyncpg_transactions_over_two_shards(sharded_cluster: ClusterFactory) -> None:
    cluster = sharded_cluster(shards=2, sharded_tables=TABLES[:1])
    cluster.psql_ok("CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL, n integer NOT NULL)")
    a = keys_on_shard(cluster, "bigint", 0, 5)
    b = keys_on_shard(cluster, "bigint", 1, 5)
    insert = "INSERT INTO items (id, v, n) VALUES ($1, $2, 0)"

    def where(key: int) -> list[int]:
        return [i for i in range(2) if cluster.rows(i, "SELECT 1 FROM items WHERE id = %s", (key,))]

    conn = await asyncpg_connect(cluster)
    try:
        async with conn.transaction():
            await conn.execute(insert, a[0], "commit")
            await conn.execute(insert, b[0], "commit")
            # Both rows are visible inside the transaction, through a read of both shards.
            rows = await conn.fetch("SELECT id FROM items WHERE v = 'commit'")
            assert sorted(r["id"] for r in rows) == sorted([a[0], b[0]])
        assert where(a[0]) == [0] and where(b[0]) == [1]

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with conn.transaction():
                await conn.execute(insert, a[1], "rollback")
                await conn.execute(insert, b[1], "rollback")
                raise Boom
        assert where(a[1]) == [] and where(b[1]) == []

        # A failing statement: the next one gets 25P02; the block rolls back as a whole.
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(insert, a[2], "failed")
                await conn.execute(insert, b[2], "failed")
                try:
                    await conn.execute(insert, b[0], "duplicate")
                except asyncpg.UniqueViolationError:
                    with pytest.raises(asyncpg.InFailedSQLTransactionError):
                        await conn.execute(insert, a[3], "after")
                    with pytest.raises(asyncpg.InFailedSQLTransactionError):
                        await conn.fetchval("SELECT 1")
                    raise
        assert where(a[2]) == [] and where(b[2]) == [] and where(a[3]) == []

        # A savepoint: the inner block's rows on both shards go, the outer block's stay.
        async with conn.transaction():
            await conn.execute(insert, a[3], "outer")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():
                    await conn.execute(insert, b[3], "inner")
                    await conn.execute(insert, a[4], "inner")
                    await conn.execute(insert, a[0], "duplicate")
            await conn.execute(insert, b[4], "outer")
        assert where(a[3]) == [0] and where(b[4]) == [1]
        assert where(b[3]) == [] and where(a[4]) == []
        assert await conn.fetchval("SELECT count(*) FROM items WHERE id = $1", a[3]) == 1
    finally:
        await asyncpg_close(conn)


def test_psycopg_executemany_then_another_shard(sharded_cluster: ClusterFactory) -> None:
    """psycopg's executemany runs in pipeline mode: Parse/Bind/Execute per row, then Sync and Flush."""
    cluster = sharded_cluster(shards=2, sharded_tables=TABLES[:1], deadline=10)
    cluster.psql_ok("CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL, n integer NOT NULL)")
    a = keys_on_shard(cluster, "bigint", 0, 3)
    b = keys_on_shard(cluster, "bigint", 1, 3)
    rows = [item_row(k) for k in range(1000, 1100)]
    with cluster.connect() as conn:
        cur = conn.cursor()
        cur.executemany("INSERT INTO items (id, v, n) VALUES (%s, %s, %s)", [item_row(a[0])])
        # The next statement goes to the other shard.
        cur.execute("INSERT INTO items (id, v, n) VALUES (%s, %s, %s)", item_row(b[0]))
        cur.executemany("INSERT INTO items (id, v, n) VALUES (%s, %s, %s)", rows)
        cur.execute("SELECT v FROM items WHERE id = %s", (a[1],))
        cur.execute("SELECT v FROM items WHERE id = %s", (b[1],))
        cur.executemany("UPDATE items SET n = -1 WHERE id = %s", [(a[0],), (b[0],)])
    keys = [a[0], b[0], *(r[0] for r in rows)]
    found = [k for i in range(2) for (k,) in cluster.rows(i, "SELECT id FROM items")]
    assert Counter(found) == Counter(keys)
    assert all(misplaced(cluster, i, "items", "id", "bigint") == 0 for i in range(2))
    assert sorted(
        k for i in range(2) for (k,) in cluster.rows(i, "SELECT id FROM items WHERE n = -1")
    ) == sorted([a[0], b[0]])
