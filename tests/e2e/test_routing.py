"""Routing over real shards (issue 3), checked on the shards themselves.

Each test gets pgshard in front of 2 or 4 real PostgreSQL servers (tests/e2e/sharded.py) and then
looks at every shard directly to see where rows and tables went. Placement is checked against
PostgreSQL's own hash partitioning: a row of a hash-sharded table belongs on shard i of N exactly
when ``satisfies_hash_partition(<table PARTITION BY HASH on the key's type>, N, i, key)`` is true.
"""

from __future__ import annotations

import random
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.ids import shard_of_id
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

ITEMS = Sharded("items", "id", "bigint")
TITEMS = Sharded("titems", "k", "text")
UITEMS = Sharded("uitems", "u", "uuid")

SCHEMA = """
CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE titems (k text PRIMARY KEY, n integer NOT NULL);
CREATE TABLE uitems (u uuid PRIMARY KEY, n integer NOT NULL);
"""


def lit(value: object) -> str:
    """An SQL literal for a str/int/UUID."""
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def insert_sql(table: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    values = ", ".join("(" + ", ".join(lit(v) for v in row) + ")" for row in rows)
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values};\n"


def chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def sqlstate_of(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] | None = None) -> str | None:
    """Run `sql`; None if it succeeded, else its SQLSTATE."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def bigint_keys(rng: random.Random, count: int) -> list[int]:
    keys = {-(2**63), 2**63 - 1, 0, -1, 1, 2**31, -(2**31) - 1}
    keys.update(range(2, 400))
    while len(keys) < count:
        keys.add(rng.randint(-(2**63), 2**63 - 1))
    out = sorted(keys)
    rng.shuffle(out)
    return out


def text_keys(rng: random.Random, count: int) -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyzABC0123456789 '\"\\-_.é日ß€"
    keys = {"", "a", "A", "'", "user-42", "x" * 300}
    while len(keys) < count:
        keys.add("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    out = sorted(keys)
    rng.shuffle(out)
    return out


def uuid_keys(rng: random.Random, count: int) -> list[uuid.UUID]:
    keys = {uuid.UUID(int=0), uuid.UUID(int=2**128 - 1)}
    while len(keys) < count:
        keys.add(uuid.UUID(int=rng.getrandbits(128)))
    out = sorted(keys)
    rng.shuffle(out)
    return out


def assert_placed(cluster: ShardedCluster, table: Sharded, expected: Sequence[Any]) -> None:
    """Every row of `table` is on the shard PostgreSQL's hash partitioning names, on one shard only,
    and the shards hold exactly `expected` keys."""
    per_shard = [
        [r[0] for r in cluster.rows(i, f"SELECT {table.column} FROM {table.name}")] for i in range(cluster.n)
    ]
    for i, keys in enumerate(per_shard):
        wrong = misplaced(cluster, i, table.name, table.column, table.data_type)
        assert wrong == 0, f"{wrong} of {len(keys)} rows of {table.name} on shard {i} do not belong there"
        assert keys, f"shard {i} got no rows of {table.name}"
    found = Counter(k for keys in per_shard for k in keys)
    twice = [k for k, c in found.items() if c > 1]
    assert not twice, f"keys of {table.name} on two shards (or twice): {twice[:5]}"
    assert sum(len(k) for k in per_shard) == len(expected)
    assert set(found) == set(expected)


@pytest.mark.parametrize("n", SHARD_COUNTS)
def test_placement_matches_postgres_hash_partitioning(sharded_cluster: ClusterFactory, n: int) -> None:
    cluster = sharded_cluster(shards=n, sharded_tables=[ITEMS, TITEMS, UITEMS])
    cluster.psql_ok(SCHEMA)
    rng = random.Random(1000 + n)
    ints, texts, uuids = bigint_keys(rng, 2500), text_keys(rng, 600), uuid_keys(rng, 600)

    # Simple protocol (psql): multi-row INSERTs of 100 rows, then single-row ones.
    script = ""
    batches: list[tuple[str, Sequence[Any]]] = []
    for batch in chunks(ints[:2000], 100):
        script += insert_sql("items", ("id", "v"), [(k, f"m{k}") for k in batch])
        batches.append(("bigint", batch))
    for batch in chunks(texts[:500], 100):
        script += insert_sql("titems", ("k", "n"), [(k, len(k)) for k in batch])
        batches.append(("text", batch))
    for batch in chunks(uuids[:500], 100):
        script += insert_sql("uitems", ("u", "n"), [(k, 1) for k in batch])
        batches.append(("uuid", batch))
    for k in ints[2000:2200]:
        script += insert_sql("items", ("id", "v"), [(k, f"s{k}")])
    for tkey in texts[500:550]:
        script += insert_sql("titems", ("k", "n"), [(tkey, 0)])
    for ukey in uuids[500:550]:
        script += insert_sql("uitems", ("u", "n"), [(ukey, 0)])
    out = cluster.psql_ok(script)
    tags = [line for line in out.splitlines() if line.startswith("INSERT")]
    assert tags == ["INSERT 0 100"] * len(batches) + ["INSERT 0 1"] * 300, out[:2000]
    # The batches really spanned shards (otherwise the count above proves nothing about splitting).
    for wanted in ("bigint", "text", "uuid"):
        data_type, batch = next(b for b in batches if b[0] == wanted)
        assert len(set(home_shards(cluster, data_type, list(batch)))) == n

    # Extended protocol (psycopg): parameters in text, then in binary.
    with cluster.connect() as conn:
        cur = conn.cursor()
        for k in ints[2200:2400]:
            cur.execute("INSERT INTO items (id, v) VALUES (%t, %t)", (k, f"t{k}"))
            assert cur.statusmessage == "INSERT 0 1"
        for k in ints[2400:2500]:
            cur.execute("INSERT INTO items (id, v) VALUES (%b, %b)", (k, f"b{k}"))
            assert cur.statusmessage == "INSERT 0 1"
        for tkey in texts[550:600]:
            cur.execute("INSERT INTO titems (k, n) VALUES (%b, %b)", (tkey, 2))
            assert cur.statusmessage == "INSERT 0 1"
        for ukey in uuids[550:600]:
            cur.execute("INSERT INTO uitems (u, n) VALUES (%b, 2)", (ukey,))
            assert cur.statusmessage == "INSERT 0 1"

    assert_placed(cluster, ITEMS, ints)
    assert_placed(cluster, TITEMS, texts)
    assert_placed(cluster, UITEMS, uuids)
    # The values arrived intact, whatever path they took.
    stored = {r[0]: r[1] for i in range(n) for r in cluster.rows(i, "SELECT id, v FROM items")}
    assert stored[ints[0]] == f"m{ints[0]}"
    assert stored[ints[2100]] == f"s{ints[2100]}"
    assert stored[ints[2300]] == f"t{ints[2300]}"
    assert stored[ints[2450]] == f"b{ints[2450]}"


@pytest.mark.parametrize("n", [FOUR])
def test_insert_corners(sharded_cluster: ClusterFactory, n: int) -> None:
    cluster = sharded_cluster(shards=n, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA)
    spread = [keys_on_shard(cluster, "bigint", i)[0] for i in range(n)]  # one key per shard
    with cluster.connect() as conn:
        # Without the key column: refused, nothing written anywhere.
        assert sqlstate_of(conn, "INSERT INTO items (v) VALUES ('no key')") == "0A000"
        # A multi-row INSERT over every shard: one tag with the total.
        cur = conn.execute(insert_sql("items", ("v", "id"), [(f"r{k}", k) for k in spread]))
        assert cur.statusmessage == f"INSERT 0 {n}"
        # RETURNING from several shards returns every row once.
        more = [k + 1_000_000 for k in spread]
        rows = conn.execute(
            insert_sql("items", ("id", "v"), [(k, "ret") for k in more]).rstrip(";\n") + " RETURNING id"
        ).fetchall()
        assert sorted(r[0] for r in rows) == sorted(more)
        # With Bind parameters spanning shards: split correctly, or refused whole (never partly).
        params = [x for k in spread for x in (k + 2_000_000, "p")]
        placeholders = ", ".join(["(%s, %s)"] * n)
        state = sqlstate_of(conn, f"INSERT INTO items (id, v) VALUES {placeholders}", params)
        with_params = [k + 2_000_000 for k in spread]
        assert state in (None, "0A000")
        # A duplicate key in a multi-shard INSERT fails the whole statement on every shard.
        dup = [(k + 3_000_000, "d") for k in spread] + [(spread[-1], "dup")]
        assert sqlstate_of(conn, insert_sql("items", ("id", "v"), dup)) == "23505"
        # NULL key: PostgreSQL would refuse the row (NOT NULL primary key).
        assert sqlstate_of(conn, "INSERT INTO items (id, v) VALUES (NULL, 'null')") == "23502"
    expected = spread + more + (with_params if state is None else [])
    assert_placed(cluster, ITEMS, expected)
    assert not any(cluster.each("SELECT 1 FROM items WHERE v IN ('no key', 'd', 'dup', 'null')"))


@pytest.mark.parametrize("n", [FOUR])
def test_update_and_delete(sharded_cluster: ClusterFactory, n: int) -> None:
    cluster = sharded_cluster(shards=n, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA)
    keys = list(range(1, 201))
    cluster.psql_ok(insert_sql("items", ("id", "v"), [(k, "start") for k in keys]))
    homes = dict(zip(keys, home_shards(cluster, "bigint", keys), strict=True))
    k1 = keys[0]
    other = (homes[k1] + 1) % n
    # A copy of k1 planted behind pgshard's back on another shard: a statement by key must not see it.
    cluster.execute(other, "INSERT INTO items (id, v) VALUES (%s, 'planted')", (k1,))

    with cluster.connect() as conn:
        cur = conn.execute(f"UPDATE items SET v = 'by key' WHERE id = {k1}")
        assert cur.statusmessage == "UPDATE 1"
        assert cluster.rows(homes[k1], "SELECT v FROM items WHERE id = %s", (k1,)) == [("by key",)]
        assert cluster.rows(other, "SELECT v FROM items WHERE id = %s", (k1,)) == [("planted",)]
        # Extended protocol, binary key.
        cur = conn.execute("UPDATE items SET v = 'bound' WHERE id = %b", (k1,))
        assert cur.statusmessage == "UPDATE 1"
        assert cluster.rows(other, "SELECT v FROM items WHERE id = %s", (k1,)) == [("planted",)]
        # An IN list over several shards: every listed row, once.
        listed = [next(k for k in keys if homes[k] == i and k != k1) for i in range(n)]
        cur = conn.execute(f"UPDATE items SET v = 'listed' WHERE id IN ({', '.join(map(str, listed))})")
        assert cur.statusmessage == f"UPDATE {len(listed)}"
        assert cluster.rows(other, "SELECT v FROM items WHERE id = %s", (k1,)) == [("planted",)]

        # Without the key: every shard, counts summed (the planted row counts: it is a row).
        expect = sum(
            int(cluster.scalar(i, "SELECT count(*) FROM items WHERE v <> 'listed'")) for i in range(n)
        )
        cur = conn.execute("UPDATE items SET v = 'all' WHERE v <> 'listed'")
        assert cur.statusmessage == f"UPDATE {expect}"
        assert expect == len(keys) - len(listed) + 1  # + the planted row
        per_shard = [int(cluster.scalar(i, "SELECT count(*) FROM items WHERE v = 'all'")) for i in range(n)]
        assert sum(per_shard) == expect and all(per_shard)

        # Changing the shard key is refused, and nothing moves.
        before = cluster.each("SELECT id, v FROM items ORDER BY id")
        state = sqlstate_of(conn, f"UPDATE items SET id = id + 1000 WHERE id = {k1}")
        assert state == "0A000"
        state = sqlstate_of(conn, "UPDATE items SET id = -id")
        assert state == "0A000"
        assert cluster.each("SELECT id, v FROM items ORDER BY id") == before

        # DELETE by key: one shard; the planted copy (updated by the keyless UPDATE) stays.
        cur = conn.execute("DELETE FROM items WHERE id = %s", (k1,))
        assert cur.statusmessage == "DELETE 1"
        assert cluster.rows(homes[k1], "SELECT 1 FROM items WHERE id = %s", (k1,)) == []
        assert cluster.rows(other, "SELECT v FROM items WHERE id = %s", (k1,)) == [("all",)]
        # DELETE without key: all shards, summed.
        expect = sum(int(cluster.scalar(i, "SELECT count(*) FROM items WHERE id % 3 = 0")) for i in range(n))
        assert expect == len([k for k in keys if k % 3 == 0])
        cur = conn.execute("DELETE FROM items WHERE id % 3 = 0")
        assert cur.statusmessage == f"DELETE {expect}"
        assert not any(cluster.each("SELECT 1 FROM items WHERE id % 3 = 0"))
        cur = conn.execute("DELETE FROM items")
        remaining = len([k for k in keys if k % 3 and k != k1]) + 1  # + the planted row
        assert cur.statusmessage == f"DELETE {remaining}"
        assert not any(cluster.each("SELECT 1 FROM items"))


@pytest.mark.parametrize("n", [FOUR])
def test_ddl_of_a_sharded_table_runs_on_every_shard(sharded_cluster: ClusterFactory, n: int) -> None:
    cluster = sharded_cluster(shards=n, sharded_tables=[ITEMS])
    everywhere = [True] * n
    columns_sql = "SELECT column_name FROM information_schema.columns WHERE table_name = 'items' ORDER BY 1"
    with cluster.connect() as conn:
        cur = conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        assert cur.statusmessage == "CREATE TABLE"
        assert [cluster.has_table(i, "items") for i in range(n)] == everywhere
        cur = conn.execute("CREATE INDEX items_v_idx ON items (v)")
        assert cur.statusmessage == "CREATE INDEX"
        assert [cluster.has_table(i, "items_v_idx") for i in range(n)] == everywhere
        cur = conn.execute("ALTER TABLE items ADD COLUMN extra integer DEFAULT 7")
        assert cur.statusmessage == "ALTER TABLE"
        assert cluster.each(columns_sql) == [[("extra",), ("id",), ("v",)]] * n
        conn.execute("INSERT INTO items (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd'), (5, 'e')")
        rows = conn.execute("SELECT id, extra FROM items").fetchall()
        assert sorted(rows) == [(k, 7) for k in (1, 2, 3, 4, 5)]
        # A failing DDL fails as a whole: no shard keeps a half-done change.
        assert sqlstate_of(conn, "ALTER TABLE items ADD COLUMN extra integer") == "42701"
        assert sqlstate_of(conn, "CREATE INDEX items_v_idx ON items (v)") == "42P07"
        cur = conn.execute("DROP INDEX items_v_idx")
        assert cur.statusmessage == "DROP INDEX"
        assert not any(cluster.has_table(i, "items_v_idx") for i in range(n))
        conn.execute("ALTER TABLE items DROP COLUMN extra")
        assert cluster.each(columns_sql) == [[("id",), ("v",)]] * n
        cur = conn.execute("DROP TABLE items")
        assert cur.statusmessage == "DROP TABLE"
        assert not any(cluster.has_table(i, "items") for i in range(n))
        # DDL inside a transaction block reaches every shard at COMMIT, and none after ROLLBACK.
        with conn.transaction():
            conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
            conn.execute("CREATE INDEX items_v_idx ON items (v)")
        assert [cluster.has_table(i, "items_v_idx") for i in range(n)] == everywhere
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            conn.execute("DROP TABLE items")
            conn.execute("SELECT 1/0")
        assert [cluster.has_table(i, "items") for i in range(n)] == everywhere


def test_an_unconfigured_table_lives_on_the_default_shard(sharded_cluster: ClusterFactory) -> None:
    # default_shard = 1, so "only on the default shard" cannot pass by landing on shard 0.
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS], default_shard=1)
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
        assert [cluster.has_table(i, "notes") for i in range(2)] == [False, True]
        conn.execute("CREATE INDEX notes_body_idx ON notes (body)")
        assert [cluster.has_table(i, "notes_body_idx") for i in range(2)] == [False, True]
        conn.execute("ALTER TABLE notes ADD COLUMN tag text")
        cur = conn.execute("INSERT INTO notes (body, tag) VALUES ('one', 't'), ('two', 't')")
        assert cur.statusmessage == "INSERT 0 2"
        cur = conn.execute("INSERT INTO notes (body) VALUES (%s)", ("three",))
        assert cur.statusmessage == "INSERT 0 1"
        assert cluster.rows(1, "SELECT body, tag FROM notes ORDER BY id") == [
            ("one", "t"),
            ("two", "t"),
            ("three", None),
        ]
        rows = conn.execute("SELECT body FROM notes ORDER BY id").fetchall()
        assert rows == [("one",), ("two",), ("three",)]
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (3,)
        cur = conn.execute("UPDATE notes SET tag = 'u'")
        assert cur.statusmessage == "UPDATE 3"
        # Joining it with a sharded table would need shard 0's rows on shard 1: loud, never short.
        keyed_on_0 = keys_on_shard(cluster, "bigint", 0)[0]
        conn.execute("INSERT INTO items (id, v) VALUES (%s, 'one')", (keyed_on_0,))
        try:
            rows = conn.execute("SELECT n.body FROM notes n JOIN items i ON i.v = n.body").fetchall()
        except psycopg.Error as exc:
            assert exc.sqlstate in ("0A000", "42P01"), exc
        else:
            assert rows == [("one",)], "a join of a default-shard table with a sharded table lost rows"
        cur = conn.execute("DELETE FROM notes WHERE body = 'two'")
        assert cur.statusmessage == "DELETE 1"
        cur = conn.execute("DROP TABLE notes")
        assert cur.statusmessage == "DROP TABLE"
        assert not any(cluster.has_table(i, "notes") for i in range(2))


@pytest.mark.parametrize("n", [TWO])
def test_omnisharded_table(sharded_cluster: ClusterFactory, n: int) -> None:
    cluster = sharded_cluster(shards=n, sharded_tables=[ITEMS], omnisharded=["countries"])
    table_sql = "SELECT code, name, seen FROM countries ORDER BY code"
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL, seen timestamptz)")
        assert all(cluster.has_table(i, "countries") for i in range(n))
        # Writes: every copy; the command tag is what one server holding the table would say.
        cur = conn.execute(
            "INSERT INTO countries (code, name) VALUES ('uk', 'United Kingdom'), ('fr', 'France')"
        )
        assert cur.statusmessage == "INSERT 0 2"
        cur = conn.execute("INSERT INTO countries (code, name) VALUES (%s, %s)", ("de", "Germany"))
        assert cur.statusmessage == "INSERT 0 1"
        cur = conn.execute("UPDATE countries SET name = upper(name) WHERE code <> 'de'")
        assert cur.statusmessage == "UPDATE 2"
        cur = conn.execute("DELETE FROM countries WHERE code = 'fr'")
        assert cur.statusmessage == "DELETE 1"
        copies = cluster.each(table_sql)
        assert copies == [[("de", "Germany", None), ("uk", "UNITED KINGDOM", None)]] * n
        rows = conn.execute(
            "INSERT INTO countries (code, name) VALUES ('nl', 'Netherlands') RETURNING code"
        ).fetchall()
        assert rows == [("nl",)]
        rows = conn.execute("DELETE FROM countries WHERE code = 'nl' RETURNING code").fetchall()
        assert rows == [("nl",)]
        # Volatile functions would make the copies differ: refused, nothing written.
        for sql in (
            "INSERT INTO countries (code, name, seen) VALUES ('es', 'Spain', now())",
            "INSERT INTO countries (code, name) VALUES ('it', random()::text)",
            "UPDATE countries SET seen = now()",
            "UPDATE countries SET name = random()::text WHERE code = 'de'",
        ):
            assert sqlstate_of(conn, sql) == "0A000", f"not refused with 0A000: {sql}"
        assert cluster.each(table_sql) == copies
        # Reads go to one copy: plant a row in shard 0's copy only; no answer is a sum over copies.
        cluster.execute(0, "INSERT INTO countries (code, name) VALUES ('zz', 'only on shard 0')")
        for _ in range(2 * n):
            count = conn.execute("SELECT count(*) FROM countries").fetchone()
            assert count in ((2,), (3,)), count
            codes = conn.execute("SELECT code FROM countries").fetchall()
            assert sorted(codes) in ([("de",), ("uk",)], [("de",), ("uk",), ("zz",)]), codes
        # Joined with a sharded table by key: runs where the sharded row is.
        conn.execute("INSERT INTO items (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')")
        got = conn.execute(
            "SELECT i.id, c.name FROM items i JOIN countries c ON c.code = 'uk' WHERE i.id = 3"
        ).fetchall()
        assert got == [(3, "UNITED KINGDOM")]
        cur = conn.execute("ALTER TABLE countries ADD COLUMN population bigint")
        assert cur.statusmessage == "ALTER TABLE"
        assert (
            cluster.each("SELECT count(*) FROM information_schema.columns WHERE table_name = 'countries'")
            == [[(4,)]] * n
        )
        cur = conn.execute("DROP TABLE countries")
        assert cur.statusmessage == "DROP TABLE"
        assert not any(cluster.has_table(i, "countries") for i in range(n))


def psql_errors(stderr: str) -> list[str]:
    """SQLSTATEs of the errors psql printed with VERBOSITY verbose, in order."""
    return re.findall(r"ERROR:  ([0-9A-Z]{5}):", stderr)


def test_transactions_with_psql(sharded_cluster: ClusterFactory) -> None:
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA)
    a = keys_on_shard(cluster, "bigint", 0, 4)
    b = keys_on_shard(cluster, "bigint", 1, 4)

    def on(shard: int) -> list[int]:
        return [r[0] for r in cluster.rows(shard, "SELECT id FROM items ORDER BY id")]

    # Commit on two shards: both visible.
    out = cluster.psql_ok(
        f"BEGIN;\nINSERT INTO items (id, v) VALUES ({a[0]}, 'tx');\n"
        f"INSERT INTO items (id, v) VALUES ({b[0]}, 'tx');\n"
        f"SELECT id FROM items WHERE id IN ({a[0]}, {b[0]});\nCOMMIT;\n",
        "-A",
        "-t",
    )
    assert sorted(int(x) for x in re.findall(r"^-?\d+$", out, re.M)) == sorted([a[0], b[0]])
    assert "COMMIT" in out
    assert on(0) == [a[0]] and on(1) == [b[0]]

    # Rollback on two shards: neither.
    cluster.psql_ok(
        f"BEGIN;\nINSERT INTO items (id, v) VALUES ({a[1]}, 'rb');\n"
        f"INSERT INTO items (id, v) VALUES ({b[1]}, 'rb');\nROLLBACK;\n"
    )
    assert on(0) == [a[0]] and on(1) == [b[0]]

    # A failing statement: every later one gets 25P02 until ROLLBACK; nothing of it stays.
    proc = cluster.psql(
        "\\set VERBOSITY verbose\n"
        f"BEGIN;\nINSERT INTO items (id, v) VALUES ({a[2]}, 'f');\n"
        f"INSERT INTO items (id, v) VALUES ({b[2]}, 'f');\n"
        f"INSERT INTO items (id, v) VALUES ({b[0]}, 'duplicate');\n"
        f"INSERT INTO items (id, v) VALUES ({a[3]}, 'after');\n"
        "SELECT 1;\n"
        "COMMIT;\n"
        f"SELECT count(*) FROM items WHERE id = {a[2]};\n",
        "-v",
        "ON_ERROR_STOP=0",
        "-A",
        "-t",
    )
    assert psql_errors(proc.stderr) == ["23505", "25P02", "25P02"], proc.stderr
    lines = proc.stdout.split()
    assert "ROLLBACK" in lines, proc.stdout  # COMMIT of a failed transaction answers ROLLBACK
    assert lines[-1] == "0", proc.stdout  # the session works again afterwards
    assert on(0) == [a[0]] and on(1) == [b[0]]

    # An error in the first statement of a transaction, before any shard was chosen.
    proc = cluster.psql(
        "\\set VERBOSITY verbose\nBEGIN;\nSELECT 1/0;\n"
        f"INSERT INTO items (id, v) VALUES ({b[3]}, 'x');\nROLLBACK;\n"
        f"INSERT INTO items (id, v) VALUES ({b[3]}, 'y');\n",
        "-v",
        "ON_ERROR_STOP=0",
    )
    assert psql_errors(proc.stderr) == ["22012", "25P02"], proc.stderr
    assert cluster.rows(1, "SELECT v FROM items WHERE id = %s", (b[3],)) == [("y",)]


def test_begin_is_held_until_the_first_statement(sharded_cluster: ClusterFactory) -> None:
    cluster = sharded_cluster(shards=2, sharded_tables=[ITEMS])
    cluster.psql_ok(SCHEMA)
    key = keys_on_shard(cluster, "bigint", 1)[0]
    in_tx = (
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
        "AND state LIKE 'idle in transaction%' AND datname = current_database()"
    )
    with cluster.connect(autocommit=False) as conn:  # psycopg sends BEGIN before the INSERT
        conn.execute("INSERT INTO items (id, v) VALUES (%s, 'held')", (key,))
        # The transaction runs on shard 1 only: shard 0 (the default) has no open transaction.
        assert [cluster.scalar(i, in_tx) for i in range(2)] == [0, 1]
        conn.commit()
    assert cluster.rows(1, "SELECT v FROM items WHERE id = %s", (key,)) == [("held",)]
    assert [cluster.scalar(i, in_tx) for i in range(2)] == [0, 0]


def test_hints_route_to_the_named_shard(sharded_cluster: ClusterFactory) -> None:
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS])
    for i, pg in enumerate(cluster.servers):
        out = cluster.psql_ok(f"/* pgshard: shard={i} */ SELECT inet_server_port();\n", "-A", "-t")
        assert out.strip() == str(pg.port)
    # An unconfigured table created, filled and read on shard 2 by hints.
    cluster.psql_ok(
        "/* pgshard: shard=2 */ CREATE TABLE notes (id int PRIMARY KEY, body text);\n"
        "/* pgshard: shard=2 */ INSERT INTO notes (id, body) VALUES (1, 'on two');\n"
    )
    assert [cluster.has_table(i, "notes") for i in range(4)] == [False, False, True, False]
    out = cluster.psql_ok("/* pgshard: shard=2 */ SELECT body FROM notes;\n", "-A", "-t")
    assert out.strip() == "on two"
    with cluster.connect() as conn:
        # Without the hint it goes to the default shard, which has no such table.
        assert sqlstate_of(conn, "SELECT body FROM notes") == "42P01"
        row = conn.execute("/* pgshard: shard=2 */ SELECT body FROM notes WHERE id = %s", (1,)).fetchone()
        assert row == ("on two",)
        row = conn.execute("/* pgshard: shard=3 */ SELECT inet_server_port(), %s::int", (5,)).fetchone()
        assert row == (cluster.servers[3].port, 5)
        # A shard that does not exist is an error, not a guess.
        assert sqlstate_of(conn, "/* pgshard: shard=4 */ SELECT 1") is not None
        # A hint overrides the key: on a shard that does not hold the key, the row is not there.
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL)")
        key = keys_on_shard(cluster, "bigint", 1)[0]
        conn.execute("INSERT INTO items (id, v) VALUES (%s, 'k')", (key,))
        assert conn.execute(f"/* pgshard: shard=1 */ SELECT v FROM items WHERE id = {key}").fetchall() == [
            ("k",)
        ]
        assert conn.execute(f"/* pgshard: shard=0 */ SELECT v FROM items WHERE id = {key}").fetchall() == []


def test_install_ids_gives_unique_ids_per_shard(sharded_cluster: ClusterFactory) -> None:
    cluster = sharded_cluster(shards=4)
    proc = cluster.cli("install-ids")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("pgshard_id() installed") == 4, proc.stdout
    every: list[int] = []
    with cluster.connect() as conn:
        for i in range(4):
            for _ in range(2):
                ids = [
                    r[0]
                    for r in conn.execute(
                        f"/* pgshard: shard={i} */ SELECT pgshard_id() FROM generate_series(1, 500)"
                    ).fetchall()
                ]
                assert len(ids) == 500
                assert {shard_of_id(x) for x in ids} == {i}
                every += ids
            row = conn.execute(f"/* pgshard: shard={i} */ SELECT pgshard_id_shard(pgshard_id())").fetchone()
            assert row == (i,)
            # The function really is shard i's own copy.
            assert cluster.scalar(i, "SELECT pgshard_id_shard(pgshard_id())") == i
    assert len(set(every)) == len(every) == 4000


def test_session_setting_pins_a_shard(sharded_cluster: ClusterFactory) -> None:
    """`SET pgshard.shard = N` sends the session's statements to shard N until RESET."""
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS])
    with cluster.connect() as conn:
        conn.execute("SET pgshard.shard = 3")
        assert conn.execute("SELECT inet_server_port()").fetchone() == (cluster.servers[3].port,)
        conn.execute("CREATE TABLE pinned_notes (id int PRIMARY KEY)")
        conn.execute("INSERT INTO pinned_notes (id) VALUES (%s)", (1,))
        assert [cluster.has_table(i, "pinned_notes") for i in range(4)] == [False, False, False, True]
        assert sqlstate_of(conn, "SET pgshard.shard = 9") == "22023"
        conn.execute("RESET pgshard.shard")
        assert sqlstate_of(conn, "SELECT id FROM pinned_notes") == "42P01"  # back to the default shard


def test_copy_from_stdin_splits_rows_by_key(sharded_cluster: ClusterFactory, tmp_path: Path) -> None:
    """`\\copy` into a sharded table: every row on its hash shard, one summed count (CSV, binary and
    COPY TO: tests/e2e/test_copy.py)."""
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS])
    keys = list(range(-500, 1500, 3))
    data = tmp_path / "items.tsv"
    data.write_text("".join(f"{k}\tv\\t{k}\n" for k in keys))  # an escaped tab inside a value
    out = cluster.psql_ok(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL);\n"
        f"\\copy items from '{data}'\n"
        "BEGIN;\nTRUNCATE items;\n"
        f"\\copy items (id, v) from '{data}' with (freeze on)\n"
        "COMMIT;\n"
    )
    assert out.count(f"COPY {len(keys)}") == 2, out
    assert_placed(cluster, ITEMS, keys)
    with cluster.connect() as conn:
        assert conn.execute("SELECT v FROM items WHERE id = %s", (1,)).fetchone() == ("v\t1",)
