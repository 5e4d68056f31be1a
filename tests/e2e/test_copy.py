"""COPY across shards (issue 4), against real shards and real clients (psql, psycopg).

COPY FROM STDIN into a sharded table puts each row on the shard PostgreSQL's hash partitioning
names (checked with satisfies_hash_partition, as tests/e2e/test_routing.py does) in text, CSV and
binary; COPY TO STDOUT of a table or query on several shards comes back as one COPY, its header
once, and loads back into a reference table unchanged. Failures give one error and leave no shard
connection in a transaction.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.e2e.sharded import (  # noqa: F401
    ClusterFactory,
    Sharded,
    ShardedCluster,
    keys_on_shard,
    misplaced,
    routing_servers_fixture,
    sharded_cluster_fixture,
)
from tests.e2e.test_routing import ITEMS, TITEMS, assert_placed

pytestmark = pytest.mark.e2e

SCHEMA = """
CREATE TABLE items (id bigint PRIMARY KEY, v text, n integer);
CREATE TABLE titems (k text PRIMARY KEY, n integer);
CREATE TABLE notes (id integer PRIMARY KEY, body text);
CREATE TABLE countries (code text PRIMARY KEY, name text);
"""
NASTY = [
    None,
    "",
    "plain",
    "a,b",
    'say "hi"',
    "two\nlines",
    "crlf\r\ninside",
    "\\.",
    "back\\slash",
    " lead and trail ",
    "é日ß€",
    ',",\n"',
]
Row = tuple[int, str | None, int]


def pg_csv(value: object, delimiter: str = ",", quote: str = '"') -> str:
    """A value as PostgreSQL's CSV output writes it (NULL: nothing; "": quoted)."""
    if value is None:
        return ""
    text = str(value)
    if text == "" or any(c in text for c in (delimiter, quote, "\r", "\n", "\\")):
        return quote + text.replace(quote, quote * 2) + quote
    return text


def items_rows(count: int) -> list[Row]:
    return [(i * 7 - 300, NASTY[i % len(NASTY)], i % 10) for i in range(count)]


def every_row(cluster: ShardedCluster, sql: str) -> list[tuple[Any, ...]]:
    return sorted((r for i in range(cluster.n) for r in cluster.rows(i, sql)), key=repr)


def open_transactions(cluster: ShardedCluster) -> list[str]:
    """Server connections (pgshard's) left inside a transaction on any shard."""
    sql = (
        "SELECT state FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND state LIKE 'idle in transaction%'"
    )
    return [f"shard {i}: {r[0]}" for i in range(cluster.n) for r in cluster.rows(i, sql)]


def test_copy_from_csv_text_binary_split_rows_by_key(sharded_cluster: ClusterFactory, tmp_path: Path) -> None:
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS, TITEMS], omnisharded=["countries"])
    cluster.psql_ok(SCHEMA)
    rows = items_rows(600)
    data = tmp_path / "items.csv"
    data.write_text("id,v,n\n" + "".join(f"{i},{pg_csv(v)},{n}\n" for i, v, n in rows), newline="")
    # psql sends the file a line at a time: quoted newlines split rows over CopyData messages.
    out = cluster.psql_ok(f"\\copy items from '{data}' csv header\n")
    assert f"COPY {len(rows)}" in out
    assert_placed(cluster, ITEMS, [r[0] for r in rows])
    assert every_row(cluster, "SELECT id, v, n FROM items") == sorted(rows, key=repr)

    # Text keys, another dialect (';', single quotes, backslash escapes), psycopg in small pieces.
    keys = ["a;b", "q'uote", "multi\nline", "plain", " spaced ", "日本", "\\", "x" * 40]
    keys += [f"k{i}" for i in range(200)]
    body = "".join(
        "'" + k.replace("\\", "\\\\").replace("'", "\\'") + f"';{i}\n" for i, k in enumerate(keys)
    ).encode()
    with cluster.connect() as conn, conn.cursor() as cur:
        sql = "COPY titems (k, n) FROM STDIN WITH (FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\')"
        with cur.copy(sql) as copy:
            for start in range(0, len(body), 97):
                copy.write(body[start : start + 97])
        assert cur.rowcount == len(keys)
    for i in range(cluster.n):
        assert misplaced(cluster, i, "titems", "k", "text") == 0
    assert sorted(r[0] for r in every_row(cluster, "SELECT k FROM titems")) == sorted(keys)

    # Binary, and an omnisharded table (every copy gets every row, the count is reported once).
    with cluster.connect() as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE items")
        with cur.copy("COPY items (id, v, n) FROM STDIN (FORMAT binary)") as copy:
            copy.set_types(["int8", "text", "int4"])
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == len(rows)
        with cur.copy("COPY countries FROM STDIN") as copy:
            copy.write(b"fr\tFrance\nde\tGermany\n")
        assert cur.rowcount == 2
    assert_placed(cluster, ITEMS, [r[0] for r in rows])
    assert every_row(cluster, "SELECT id, v, n FROM items") == sorted(rows, key=repr)
    assert [cluster.scalar(i, "SELECT count(*) FROM countries") for i in range(cluster.n)] == [2] * 4

    async def with_asyncpg() -> bytes:
        """asyncpg's bulk load (binary records) and COPY TO (binary) through pgshard."""
        conn = await asyncpg.connect(cluster.url(), timeout=10)
        try:
            await conn.execute("TRUNCATE items")
            status = await conn.copy_records_to_table("items", records=rows, columns=["id", "v", "n"])
            assert status == f"COPY {len(rows)}"
            out = io.BytesIO()
            await conn.copy_from_table("items", output=out, format="binary")
            return out.getvalue()
        finally:
            await conn.close()

    data = asyncio.run(with_asyncpg())
    assert data.count(b"PGCOPY\n\xff\r\n\x00") == 1 and data.endswith(b"\xff\xff")
    assert_placed(cluster, ITEMS, [r[0] for r in rows])


def test_copy_from_failures_leave_nothing_behind(sharded_cluster: ClusterFactory, tmp_path: Path) -> None:
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA)
    with cluster.connect() as conn:
        conn.execute("INSERT INTO items (id, v, n) VALUES (1000000, 'kept', 0)")
        for bad, sqlstate in [
            (b"1,a,1\n2,b,2\n,null key,3\n4,d,4\n", "23502"),  # a NULL key: refused by pgshard
            (b"5,a,1\n1000000,duplicate,2\n6,c,3\n", "23505"),  # one shard's error
            (b'7,"unterminated\n', "22P04"),
        ]:
            copying = conn.cursor().copy("COPY items FROM STDIN CSV")
            with pytest.raises(psycopg.Error) as info, copying as copy:
                for start in range(0, len(bad), 5):
                    copy.write(bad[start : start + 5])
            assert info.value.sqlstate == sqlstate, info.value
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)  # the connection carries on
        assert open_transactions(cluster) == []
        # The client gives up (CopyFail): the same.
        copying = conn.cursor().copy("COPY items FROM STDIN")
        with pytest.raises((RuntimeError, psycopg.Error)), copying as copy:
            copy.write(b"8\tx\t1\n")
            raise RuntimeError("client gives up")
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)
        # An option pgshard cannot split by is refused before any data moves.
        copying = conn.cursor().copy("COPY items FROM STDIN (FORMAT csv, DEFAULT 'x')")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="default"), copying as copy:
            copy.write(b"9,x,1\n")
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (1,)
    # COPY as the first statement of a block (BEGIN is held until then), in and out.
    with cluster.connect(autocommit=False) as conn:
        with conn.cursor().copy("COPY items (id, v) FROM STDIN") as copy:
            copy.write(b"11\ta\n12\tb\n13\tc\n")
        with conn.cursor().copy("COPY items (id) TO STDOUT") as copy:
            assert sorted(b"".join(bytes(c) for c in copy).split()) == [b"1000000", b"11", b"12", b"13"]
        conn.rollback()
        with conn.cursor().copy("COPY items (id) TO STDOUT") as copy:
            assert b"".join(bytes(c) for c in copy) == b"1000000\n"
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.NotNullViolation), conn.cursor().copy("COPY items FROM STDIN") as c:
            c.write(b"\\N\tx\t1\n")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT count(*) FROM items")
        conn.rollback()
    assert open_transactions(cluster) == []


def test_copy_to_stdout_gathers_every_shard(sharded_cluster: ClusterFactory, tmp_path: Path) -> None:
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA + "CREATE TABLE items_ref (id bigint PRIMARY KEY, v text, n integer);\n")
    rows = items_rows(500)
    with cluster.connect() as conn, conn.cursor() as cur, cur.copy("COPY items FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    expected = sorted(rows, key=repr)

    def reference(load: str, data: bytes) -> list[tuple[Any, ...]]:
        """Load `data` into items_ref (the default shard only) and read it back."""
        with cluster.connect() as conn, conn.cursor() as cur:
            cur.execute("TRUNCATE items_ref")
            with cur.copy(f"COPY items_ref FROM STDIN {load}") as copy:
                copy.write(data)
            return sorted(cur.execute("SELECT id, v, n FROM items_ref").fetchall(), key=repr)

    # psql: CSV with HEADER, one header line, every row; loads back unchanged.
    out = tmp_path / "items.csv"
    printed = cluster.psql_ok(f"\\copy items to '{out}' csv header\n")
    assert f"COPY {len(rows)}" in printed
    text = out.read_bytes()
    assert text.count(b"id,v,n\n") == 1 and text.startswith(b"id,v,n\n")
    assert reference("(FORMAT csv, HEADER)", text) == expected

    def copy_out(sql: str) -> tuple[bytes, int]:
        with cluster.connect() as conn, conn.cursor() as cur:
            with cur.copy(sql) as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
            return data, cur.rowcount

    data, count = copy_out("COPY items TO STDOUT")
    assert count == len(rows) and reference("", data) == expected
    data, count = copy_out("COPY items (id, v, n) TO STDOUT (FORMAT binary)")
    assert count == len(rows) and data.count(b"PGCOPY\n\xff\r\n\x00") == 1 and data.endswith(b"\xff\xff")
    assert reference("(FORMAT binary)", data) == expected
    data, count = copy_out("COPY (SELECT id, v, n FROM items WHERE n IN (3, 4)) TO STDOUT CSV HEADER")
    assert data.startswith(b"id,v,n\n") and data.count(b"id,v,n\n") == 1
    assert count == sum(1 for r in rows if r[2] in (3, 4))
    assert reference("(FORMAT csv, HEADER)", data) == [r for r in expected if r[2] in (3, 4)]

    with cluster.connect() as conn:
        for sql in ("COPY (SELECT id FROM items ORDER BY id) TO STDOUT", f"COPY items TO '{tmp_path}/x'"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as info, conn.cursor().copy(sql) as copy:
                list(copy)
        assert "ORDER BY" in str(info.value) or "STDOUT" in str(info.value)
        # In a transaction block: the block's own rows, on every shard.
        conn.autocommit = False
        conn.execute("INSERT INTO items (id, v, n) VALUES (%s, 'new', 1)", (10**9,))
        with conn.cursor().copy("COPY (SELECT id FROM items WHERE v = 'new') TO STDOUT") as copy:
            assert b"".join(bytes(c) for c in copy) == b"%d\n" % 10**9
        conn.rollback()

    # A shard failing mid-COPY (after earlier shards sent rows): one error, nothing left open.
    last = keys_on_shard(cluster, "bigint", cluster.n - 1, start=5_000_000)[0]
    with cluster.connect() as conn:
        conn.execute("INSERT INTO items (id, v, n) VALUES (%s, 'boom', 0)", (last,))
        sql = "COPY (SELECT id, 1 / (CASE WHEN v = 'boom' THEN 0 ELSE 1 END) FROM items) TO STDOUT"
        with pytest.raises(psycopg.errors.DivisionByZero), conn.cursor().copy(sql) as copy:
            list(copy)
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (len(rows) + 1,)
    assert open_transactions(cluster) == []


def test_copy_inside_a_block_on_several_shards(sharded_cluster: ClusterFactory, tmp_path: Path) -> None:
    """pgbench -i's load: DROP and TRUNCATE naming tables of different homes, then COPY into each
    table inside one block that spans every shard."""
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS])
    notes = tmp_path / "notes.tsv"
    notes.write_text("".join(f"{i}\tnote {i}\n" for i in range(50)))
    items = tmp_path / "items.tsv"
    items.write_text("".join(f"{i}\tv{i}\t{i % 5}\n" for i in range(400)))
    script = (
        "DROP TABLE IF EXISTS items, notes, countries;\n" + SCHEMA + "BEGIN;\nTRUNCATE items, notes;\n"
        f"\\copy notes from '{notes}' with (freeze on)\n"
        f"\\copy items from '{items}' with (freeze on)\n"
        "COMMIT;\n"
        "BEGIN;\nINSERT INTO items (id, v, n) VALUES (-1, 'x', 0), (-2, 'y', 0);\n"
        f"\\copy items to '{tmp_path}/in_block.tsv'\n"
        f"\\copy notes to '{tmp_path}/notes_out.tsv'\n"
        "ROLLBACK;\n"
    )
    out = cluster.psql_ok(script)
    assert "COPY 50" in out and "COPY 400" in out and "COPY 402" in out
    assert_placed(cluster, ITEMS, list(range(400)))
    assert cluster.scalar(0, "SELECT count(*) FROM notes") == 50
    assert (tmp_path / "notes_out.tsv").read_text() == notes.read_text()
    assert not any(cluster.has_table(i, "notes") for i in range(1, 4))
    cluster.psql_ok("TRUNCATE notes, items;\nDROP TABLE items, notes;\n")
    assert not any(cluster.has_table(i, t) for i in range(4) for t in ("items", "notes"))
    assert open_transactions(cluster) == []
