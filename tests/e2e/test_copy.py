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
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import psycopg
import pytest

from proxy.protocol import frontend
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER
from tests.e2e.rawclient import RawClient, errors_in
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
T = TypeVar("T")


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


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call()` in a thread: the test fails, instead of hanging, if the client gets no answer in time."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the test's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"no answer within {seconds:g}s: the client hangs")
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


def test_copy_failing_at_its_end_leaves_the_client_usable(sharded_cluster: ClusterFactory) -> None:
    """An error found only at the client's CopyDone (a last row without a newline, a binary stream
    cut short): the client gets it, then its next query is answered (nothing else is skipped)."""
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA)
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    for sql, data, sqlstate in [
        ("COPY items (id, v, n) FROM STDIN (FORMAT csv)", b"1,a,1\n2,b,2\n,c,3", "23502"),
        ("COPY items (id, v, n) FROM STDIN", b"1\ta\t1\n2\tb\t2\n\\N\tc\t3", "23502"),
        ("COPY items (id, v, n) FROM STDIN (FORMAT csv)", b"1,a,1\n2,b,2\nx,c,3", "22P02"),
        ("COPY items (id, v, n) FROM STDIN (FORMAT binary)", header + b"\x00\x03\x00\x00", "22P04"),
    ]:
        with cluster.connect() as conn:

            def copy_then_query(sql: str = sql, data: bytes = data) -> tuple[str | None, Any]:
                state = None
                try:
                    with conn.cursor().copy(sql) as copy:
                        copy.write(data)
                except psycopg.Error as exc:
                    state = exc.sqlstate
                return state, conn.execute("SELECT 'after', count(*) FROM items").fetchone()

            assert within(15, copy_then_query) == (sqlstate, ("after", 0)), sql
    assert open_transactions(cluster) == []


def test_copy_error_mid_copy_then_a_query_without_copy_done(sharded_cluster: ClusterFactory) -> None:
    """After an error during COPY IN the client may go straight on to its next Query (it is answered,
    never taken for COPY data); CopyData, CopyDone and CopyFail arriving later are dropped, as
    PostgreSQL drops them. A Query in the middle of a COPY fails it (08P01), as in PostgreSQL."""
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA)
    proxy = cluster.proxy

    async def scenario() -> None:
        client = await RawClient.login(proxy.host, proxy.port, APP_USER, APP_PASSWORD, APP_DB)
        try:
            copy_sql = "COPY items (id, v, n) FROM STDIN (FORMAT csv)"
            # A NULL key mid-stream: the error comes while the client is still copying.
            client.send(frontend.query(copy_sql))
            assert (await client.read_message())[0] == ord("G")
            client.send(frontend.copy_data(b"1,a,1\n,b,2\n"))
            reply = await client.read_until_ready()
            assert [f["C"] for f in errors_in(reply)] == ["23502"]
            assert await client.scalar("SELECT 'after'") == "after"
            # Stray copy messages after the COPY ended are ignored, then the next Query is answered.
            client.send(frontend.copy_data(b"3,c,3\n") + frontend.COPY_DONE + frontend.copy_fail("late"))
            assert await client.scalar("SELECT count(*) FROM items") == "0"
            # A Query while the COPY is still open: 08P01, the rows so far are not kept.
            client.send(frontend.query(copy_sql))
            assert (await client.read_message())[0] == ord("G")
            client.send(frontend.copy_data(b"4,d,4\n5,e,5\n") + frontend.query("SELECT 'lost'"))
            reply = await client.read_until_ready()
            assert [f["C"] for f in errors_in(reply)] == ["08P01"]
            assert not [m for m in reply if m[0] == ord("D")]
            assert await client.scalar("SELECT count(*) FROM items") == "0"
            # And a good COPY still works on the same connection.
            client.send(frontend.query(copy_sql))
            assert (await client.read_message())[0] == ord("G")
            client.send(frontend.copy_data(b"6,f,6\n7,g,7") + frontend.COPY_DONE)
            reply = await client.read_until_ready()
            assert not errors_in(reply)
            assert await client.scalar("SELECT count(*) FROM items") == "2"
        finally:
            await client.terminate()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert open_transactions(cluster) == []


LATIN1_KEYS = ["é", "café", "Ã©", "naïve", "ÿ", "Ñandú", "plain", "a\tb", "ß" * 30]
LATIN1_KEYS += [f"k{i}é" for i in range(40)]


def test_copy_text_keys_in_another_client_encoding(sharded_cluster: ClusterFactory) -> None:
    """Text keys sent in the client's encoding are placed by the text PostgreSQL stores (converted to
    UTF8), in text, CSV and binary; an encoding pgshard cannot convert exactly refuses non-ASCII keys
    (0A000), and one whose multibyte characters embed ASCII bytes refuses non-ASCII text and CSV."""
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS, TITEMS])
    cluster.psql_ok(SCHEMA)

    def stored_keys() -> list[str]:
        return sorted(r[0] for r in every_row(cluster, "SELECT k FROM titems"))

    def load(encoding: str, sql: str, data: bytes | list[tuple[str, int]]) -> int:
        with cluster.connect() as conn, conn.cursor() as cur:
            cur.execute("TRUNCATE titems")
            cur.execute(f"SET client_encoding = '{encoding}'")
            with cur.copy(sql) as copy:
                if isinstance(data, bytes):
                    copy.write(data)
                else:
                    copy.set_types(["text", "int4"])
                    for row in data:
                        copy.write_row(row)
            return cur.rowcount

    def escaped(key: str) -> str:
        return key.replace("\\", "\\\\").replace("\t", "\\t")

    text = "".join(f"{escaped(k)}\t{i}\n" for i, k in enumerate(LATIN1_KEYS)).encode("latin-1")
    csv = "".join(f"{pg_csv(k)},{i}\n" for i, k in enumerate(LATIN1_KEYS)).encode("latin-1")
    rows = [(k, i) for i, k in enumerate(LATIN1_KEYS)]
    for sql, data in [
        ("COPY titems (k, n) FROM STDIN", text),
        ("COPY titems (k, n) FROM STDIN (FORMAT csv)", csv),
        ("COPY titems (k, n) FROM STDIN (FORMAT binary)", rows),
    ]:
        assert load("LATIN1", sql, data) == len(LATIN1_KEYS), sql
        assert stored_keys() == sorted(LATIN1_KEYS), sql
        for i in range(cluster.n):
            assert misplaced(cluster, i, "titems", "k", "text") == 0, (sql, i)
    win1252 = ["€uro", "‰", "Œuvre", "“quoted”"]
    data = "".join(f"{k}\t1\n" for k in win1252).encode("cp1252")
    assert load("WIN1252", "COPY titems (k, n) FROM STDIN", data) == len(win1252)
    assert stored_keys() == sorted(win1252)
    assert all(misplaced(cluster, i, "titems", "k", "text") == 0 for i in range(cluster.n))

    with cluster.connect() as conn:
        for encoding, sql, data, sqlstate, match in [
            ("EUC_JP", "COPY titems FROM STDIN", "日本\t1\n".encode("euc_jp"), "0A000", "EUC_JP"),
            ("SJIS", "COPY items FROM STDIN", "1\t日本\t1\n".encode("cp932"), "0A000", "SJIS"),
            ("WIN1252", "COPY titems FROM STDIN", b"ok\t1\n\x81\t2\n", "22P05", "WIN1252"),
        ]:
            conn.execute(f"SET client_encoding = '{encoding}'")
            copying = conn.cursor().copy(sql)
            with pytest.raises(psycopg.Error) as info, copying as copy:
                copy.write(data)
            assert (info.value.sqlstate, match in str(info.value)) == (sqlstate, True), (encoding, info.value)
        # ASCII is the same text in every encoding: such keys and rows are taken as they are.
        conn.execute("SET client_encoding = 'EUC_JP'")
        with conn.cursor().copy("COPY titems FROM STDIN") as copy:
            copy.write(b"ascii key\t1\n")
        conn.execute("SET client_encoding = 'SJIS'")
        with conn.cursor().copy("COPY items (id, v) FROM STDIN") as copy:
            copy.write(b"1\tascii\n2\tonly\n")
        # COPY ... (ENCODING 'UTF8') says the data is UTF8 whatever the client encoding.
        conn.execute("SET client_encoding = 'LATIN1'")
        with conn.cursor().copy("COPY titems FROM STDIN (ENCODING 'UTF8')") as copy:
            copy.write("日本\t2\n".encode())
    assert "ascii key" in stored_keys() and "日本" in stored_keys()
    assert all(misplaced(cluster, i, "titems", "k", "text") == 0 for i in range(cluster.n))
    assert sorted(every_row(cluster, "SELECT id, v FROM items")) == [(1, "ascii"), (2, "only")]
    assert all(misplaced(cluster, i, "items", "id", "bigint") == 0 for i in range(cluster.n))
    assert open_transactions(cluster) == []
