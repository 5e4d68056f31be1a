"""COMMIT, ROLLBACK and savepoints sent through the extended protocol (Parse/Bind/Execute/Sync).

psycopg with prepare_threshold=0 prepares every statement, BEGIN and ROLLBACK included; asyncpg's
``fetch`` always does. In a block pgshard spreads over several shards (or holds before any shard),
these must reach every shard (COMMIT through two-phase commit) and be answered as one PostgreSQL
answers them: the same tags and transaction status, ROLLBACK still accepted in a failed block, and
nothing left open on any shard. The reference is the same script run straight against shard 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from proxy.protocol import backend, frontend
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.e2e.conftest import HOST, async_wait_until, wait_until
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
ITEMS = Sharded("items", "id", "bigint")
SCHEMA = "CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL, n integer NOT NULL DEFAULT 1)"
IN_TX = (
    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND datname = current_database() "
    "AND state LIKE 'idle in transaction%'"
)
_STATUS = {
    pq.TransactionStatus.IDLE: "I",
    pq.TransactionStatus.INTRANS: "T",
    pq.TransactionStatus.INERROR: "E",
}


def setup(cluster: ShardedCluster) -> tuple[list[int], list[int]]:
    cluster.psql_ok(SCHEMA + ";\n")
    return keys_on_shard(cluster, "bigint", 0, 6), keys_on_shard(cluster, "bigint", 1, 6)


def connect(cluster: ShardedCluster) -> psycopg.Connection[Any]:
    return cluster.connect(prepare_threshold=0, autocommit=True)


def reference(cluster: ShardedCluster) -> psycopg.Connection[Any]:
    """Straight to shard 0 (one PostgreSQL), as the same role, every statement prepared too."""
    pg = cluster.servers[0]
    return psycopg.connect(
        host=str(pg.socket_dir), port=pg.port, user="postgres", dbname=cluster.dbname,
        autocommit=True, prepare_threshold=0, connect_timeout=10,
    )  # fmt: skip


def step(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> tuple[str, str]:
    """(tag or SQLSTATE, transaction status after it)."""
    try:
        cur = conn.execute(sql, params or None)
        outcome = cur.statusmessage or ""
    except psycopg.Error as exc:
        outcome = exc.sqlstate or "?"
    return outcome, _STATUS[conn.info.transaction_status]


def no_open_transactions(cluster: ShardedCluster) -> None:
    wait_until(
        lambda: all(cluster.scalar(i, IN_TX) == 0 for i in range(cluster.n)),
        what="no shard connection idle in transaction",
    )


def where(cluster: ShardedCluster, keys: list[int]) -> list[int]:
    return sorted(k for i in range(cluster.n) for (k,) in cluster.rows(i, "SELECT id FROM items"))


def script(run: Callable[[str, tuple[Any, ...]], tuple[str, str]], a: list[int], b: list[int]) -> list[Any]:
    """The same statements through pgshard and on one server; `a` and `b` keys live on different shards."""
    ins = "INSERT INTO {t} (id, v) VALUES (%s, %s)"
    out: list[Any] = []
    # The repro: a block over two shards fails; ROLLBACK must end it.
    out += [run("BEGIN", ()), run(ins, (a[0], "x")), run(ins, (b[0], "x"))]
    out += [run("SELECT 1/(n-n) FROM {t}", ()), run("SELECT 1", ()), run("SAVEPOINT s", ())]
    out += [run("RELEASE SAVEPOINT s", ()), run("ROLLBACK", ()), run("SELECT 1", ())]
    # COMMIT of a failed block answers ROLLBACK.
    out += [run("BEGIN", ()), run(ins, (a[1], "y")), run(ins, (b[1], "y")), run(ins, (a[1], "dup"))]
    out += [run("COMMIT", ()), run("SELECT 1", ())]
    # Savepoints over both shards: one shard joins after the savepoint was taken.
    out += [run("BEGIN", ()), run(ins, (a[2], "kept")), run("SAVEPOINT sp", ()), run(ins, (b[2], "gone"))]
    out += [run(ins, (a[3], "gone")), run("ROLLBACK TO SAVEPOINT sp", ()), run(ins, (b[3], "kept"))]
    out += [run("SAVEPOINT sp2", ()), run(ins, (b[3], "dup")), run("SELECT 1", ())]
    out += [run("ROLLBACK TO sp2", ()), run(ins, (a[4], "kept")), run("RELEASE sp2", ())]
    out += [run("RELEASE SAVEPOINT sp", ()), run("ROLLBACK TO sp", ()), run("ROLLBACK", ())]
    out += [run("BEGIN", ()), run(ins, (a[2], "kept")), run(ins, (b[2], "kept")), run("END", ())]
    # A block pgshard holds before any shard; BEGIN ... COMMIT with nothing in between.
    out += [run("START TRANSACTION", ()), run("SAVEPOINT h", ()), run("ROLLBACK TO h", ())]
    out += [run("RELEASE h", ()), run("COMMIT", ()), run("BEGIN", ()), run("ABORT", ())]
    # COMMIT on a healthy two-shard block.
    out += [run("BEGIN", ()), run(ins, (a[5], "c")), run(ins, (b[5], "c")), run("COMMIT", ())]
    out += [run("SELECT 1", ())]
    return out


def test_extended_transaction_control_matches_postgres(sharded_cluster: ClusterFactory) -> None:
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    a, b = setup(cluster)
    cluster.execute(0, SCHEMA.replace("items", "ref_items"))
    with connect(cluster) as conn, reference(cluster) as ref:

        def through(sql: str, params: tuple[Any, ...]) -> tuple[str, str]:
            return step(conn, sql.format(t="items"), params)

        def direct(sql: str, params: tuple[Any, ...]) -> tuple[str, str]:
            return step(ref, sql.format(t="ref_items"), params)

        got = script(through, a, b)
        want = script(direct, a, b)
        assert got == want
        # The repro's answers, spelled out.
        failed = [("22012", "E"), ("25P02", "E"), ("25P02", "E"), ("25P02", "E")]
        assert got[3:9] == [*failed, ("ROLLBACK", "I"), ("SELECT 1", "I")]
        assert got[13] == ("ROLLBACK", "I")
        no_open_transactions(cluster)
    expected = sorted([a[2], b[2], a[3], b[3], a[4], a[5], b[5]])
    assert where(cluster, expected) == sorted([a[2], b[2], a[5], b[5]])
    ref_rows = sorted(k for (k,) in cluster.rows(0, "SELECT id FROM ref_items"))
    assert ref_rows == sorted([a[2], b[2], a[5], b[5]])
    assert cluster.rows(0, "SELECT id FROM items WHERE id = ANY(%s)", ([b[2], b[5]],)) == []


def test_savepoints_and_commit_across_shards(sharded_cluster: ClusterFactory) -> None:
    """Rows a savepoint rolled back go on every shard; a block that began on one shard grows later."""
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    a, b = setup(cluster)
    ins = "INSERT INTO items (id, v) VALUES (%s, %s)"
    with connect(cluster) as conn:
        assert step(conn, "BEGIN") == ("BEGIN", "T")
        assert step(conn, ins, (a[0], "outer")) == ("INSERT 0 1", "T")  # on shard 0 only, so far
        assert step(conn, "SAVEPOINT one") == ("SAVEPOINT", "T")
        assert step(conn, ins, (a[1], "inner")) == ("INSERT 0 1", "T")
        assert step(conn, ins, (b[0], "inner")) == ("INSERT 0 1", "T")  # the block grows to shard 1
        assert step(conn, "SAVEPOINT two") == ("SAVEPOINT", "T")
        assert step(conn, ins, (b[1], "two")) == ("INSERT 0 1", "T")
        assert step(conn, "RELEASE two") == ("RELEASE", "T")
        # Both shards see the savepoint `one`: shard 1 joined after it was taken.
        assert step(conn, "ROLLBACK TO SAVEPOINT one") == ("ROLLBACK", "T")
        rows = conn.execute("SELECT id FROM items ORDER BY id").fetchall()
        assert [r[0] for r in rows] == [a[0]]
        assert step(conn, ins, (b[2], "after")) == ("INSERT 0 1", "T")
        assert step(conn, "RELEASE SAVEPOINT one") == ("RELEASE", "T")
        assert step(conn, "COMMIT") == ("COMMIT", "I")
        assert step(conn, "SELECT 1") == ("SELECT 1", "I")
    assert cluster.rows(0, "SELECT id FROM items") == [(a[0],)]
    assert cluster.rows(1, "SELECT id FROM items") == [(b[2],)]
    assert [cluster.scalar(i, "SELECT count(*) FROM pg_prepared_xacts") for i in range(2)] == [0, 0]
    no_open_transactions(cluster)


def test_extended_commit_is_two_phase(sharded_cluster: ClusterFactory) -> None:
    """A COMMIT that fails on the last shard (a deferred constraint checked at PREPARE) commits
    nowhere: one COMMIT per shard in shard order would have committed shard 0 first."""
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    a, b = setup(cluster)
    cluster.execute(
        1,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.v = 'refused' THEN RAISE EXCEPTION 'refused at commit' USING ERRCODE = '23514'; "
        "END IF; RETURN NULL; END $$",
    )
    cluster.execute(
        1,
        "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    ins = "INSERT INTO items (id, v) VALUES (%s, %s)"
    with connect(cluster) as conn:
        for outcome in ("committed", "refused"):
            assert step(conn, "BEGIN") == ("BEGIN", "T")
            assert step(conn, ins, (a[0] if outcome == "committed" else a[1], outcome))[0] == "INSERT 0 1"
            assert step(conn, ins, (b[0] if outcome == "committed" else b[1], outcome))[0] == "INSERT 0 1"
            assert step(conn, "COMMIT") == (("COMMIT", "I") if outcome == "committed" else ("23514", "I"))
        assert step(conn, "SELECT 1") == ("SELECT 1", "I")
    assert cluster.rows(0, "SELECT id, v FROM items") == [(a[0], "committed")]
    assert cluster.rows(1, "SELECT id, v FROM items") == [(b[0], "committed")]
    assert [cluster.scalar(i, "SELECT count(*) FROM pg_prepared_xacts") for i in range(2)] == [0, 0]
    no_open_transactions(cluster)


def test_and_chain(sharded_cluster: ClusterFactory) -> None:
    """COMMIT AND CHAIN starts the next block at once, as PostgreSQL does; AND NO CHAIN does not."""
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    a, b = setup(cluster)
    cluster.execute(0, SCHEMA.replace("items", "ref_items"))
    ins = "INSERT INTO {t} (id, v) VALUES (%s, %s)"

    def run(conn: psycopg.Connection[Any], t: str) -> list[tuple[str, str]]:
        sql = ins.format(t=t)
        return [
            step(conn, "BEGIN"), step(conn, sql, (a[0], "c")), step(conn, sql, (b[0], "c")),
            step(conn, "COMMIT AND CHAIN"), step(conn, sql, (a[1], "r")), step(conn, sql, (b[1], "r")),
            step(conn, "ROLLBACK AND CHAIN"), step(conn, "SELECT 1"), step(conn, "COMMIT AND NO CHAIN"),
            step(conn, "SELECT 1"),
        ]  # fmt: skip

    with connect(cluster) as conn, reference(cluster) as ref:
        assert run(conn, "items") == run(ref, "ref_items")
    assert where(cluster, []) == sorted([a[0], b[0]])
    no_open_transactions(cluster)


async def test_asyncpg_extended_rollback_of_failed_block(sharded_cluster: ClusterFactory) -> None:
    """asyncpg's fetch prepares every statement: BEGIN, the failing read, ROLLBACK, COMMIT."""
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    a, b = setup(cluster)
    conn = await asyncpg.connect(cluster.url(), timeout=10, command_timeout=8)
    ins = "INSERT INTO items (id, v) VALUES ($1, $2)"
    try:
        for _ in range(2):  # the second time from asyncpg's statement cache
            await conn.fetch("BEGIN")
            await conn.fetch(ins, a[0], "x")
            await conn.fetch(ins, b[0], "x")
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetch("SELECT 1/(n-n) FROM items")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetch("SAVEPOINT s")
            await conn.fetch("ROLLBACK")
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM items") == 0
        await conn.fetch("BEGIN")
        await conn.fetch(ins, a[1], "c")
        await conn.fetch("SAVEPOINT s")
        await conn.fetch(ins, b[1], "c")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.fetch(ins, a[1], "dup")
        await conn.fetch("ROLLBACK TO SAVEPOINT s")
        await conn.fetch(ins, b[2], "c")
        await conn.fetch("COMMIT")
        assert not conn.is_in_transaction()
    finally:
        await conn.close(timeout=5)
    assert sorted(k for i in range(2) for (k,) in cluster.rows(i, "SELECT id FROM items")) == sorted(
        [a[1], b[2]]
    )
    await async_wait_until(
        lambda: all(cluster.scalar(i, IN_TX) == 0 for i in range(2)), what="no shard idle in transaction"
    )


def _summary(messages: list[tuple[int, bytes]]) -> list[str]:
    """Each message as its type, with the tag, SQLSTATE or status where there is one."""
    out: list[str] = []
    for msg_type, body in messages:
        kind = chr(msg_type)
        if kind in "EN":
            out.append(f"{kind}:{backend.decode_error_fields(body).get('C')}")
        elif kind == "C":
            out.append("C:" + body.rstrip(b"\x00").decode())
        elif kind == "Z":
            out.append("Z:" + body.decode())
        elif kind == "t":
            out.append(f"t:{len(backend.decode_parameter_description(body))}")
        else:
            out.append(kind)
    return out


def _statement(sql: str, describe: bool = True) -> bytes:
    parts = [frontend.parse("", sql), frontend.bind("", "")]
    if describe:
        parts.append(frontend.describe(b"P"))
    return b"".join([*parts, frontend.execute()])


async def _raw_script(client: RawClient, t: str, a: list[int], b: list[int]) -> list[list[str]]:
    """Raw batches, some ending in Flush (then a lone Sync), some using a named statement."""
    replies: list[list[str]] = []

    async def batch(data: bytes, flush: bool = False) -> None:
        if flush:
            client.send(data + frontend.flush())
            await asyncio.sleep(0.05)  # the Flush batch and the Sync arrive apart
        else:
            client.send(data)
        client.send(frontend.sync())
        replies.append(_summary(await client.read_until_ready()))

    await batch(_statement("BEGIN"))
    await batch(_statement(f"INSERT INTO {t} (id, v) VALUES ({a[0]}, 'x')"))
    await batch(_statement(f"INSERT INTO {t} (id, v) VALUES ({b[0]}, 'x')"))
    await batch(frontend.parse("sp", "SAVEPOINT s") + frontend.describe(b"S", "sp"))
    await batch(frontend.bind("", "sp") + frontend.execute())
    await batch(_statement(f"SELECT 1/(n-n) FROM {t}"))
    await batch(_statement("SAVEPOINT z"), flush=True)
    await batch(_statement("ROLLBACK TO s"), flush=True)
    await batch(_statement(f"SELECT count(*) FROM {t}"))
    await batch(frontend.bind("", "sp") + frontend.describe(b"P") + frontend.execute(), flush=True)
    await batch(_statement(f"SELECT 1/(n-n) FROM {t}"))
    await batch(frontend.close(b"S", "sp") + _statement("COMMIT", describe=False))
    await batch(_statement("SELECT 1"))
    return replies


async def test_raw_extended_messages_match_postgres(sharded_cluster: ClusterFactory) -> None:
    """Message by message (Describe of a statement, Flush then Sync, Close), the same as PostgreSQL."""
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    a, b = setup(cluster)
    cluster.execute(0, SCHEMA.replace("items", "ref_items"))
    cluster.execute(0, f"ALTER TABLE ref_items OWNER TO {APP_USER}")
    pg = cluster.servers[0]
    proxy = await RawClient.login(HOST, cluster.proxy.port, APP_USER, APP_PASSWORD, APP_DB)
    direct = await RawClient.login(pg.host, pg.port, APP_USER, APP_PASSWORD, cluster.dbname)
    try:
        got = await _raw_script(proxy, "items", a, b)
        want = await _raw_script(direct, "ref_items", a, b)
        assert got == want
        assert got[6] == ["E:25P02", "Z:E"] and got[7] == ["1", "2", "n", "C:ROLLBACK", "Z:T"]
        assert got[11] == ["3", "1", "2", "C:ROLLBACK", "Z:I"]
        # Transaction control batched with other statements in a block over several shards: refused.
        for sql in ("BEGIN", f"INSERT INTO items (id, v) VALUES ({a[1]}, 'y')"):
            await proxy.simple_query(sql)
        proxy.send(_statement(f"INSERT INTO items (id, v) VALUES ({b[1]}, 'y')") + frontend.sync())
        assert _summary(await proxy.read_until_ready()) == ["1", "2", "n", "C:INSERT 0 1", "Z:T"]
        proxy.send(_statement(f"INSERT INTO items (id, v) VALUES ({b[2]}, 'y')") + _statement("COMMIT"))
        proxy.send(frontend.sync())
        assert _summary(await proxy.read_until_ready()) == ["E:0A000", "Z:E"]
        proxy.send(_statement("ROLLBACK") + frontend.sync())
        assert _summary(await proxy.read_until_ready()) == ["1", "2", "n", "C:ROLLBACK", "Z:I"]
    finally:
        await proxy.terminate()
        await direct.terminate()
    assert where(cluster, []) == []
    await async_wait_until(
        lambda: all(cluster.scalar(i, IN_TX) == 0 for i in range(2)), what="no shard idle in transaction"
    )
