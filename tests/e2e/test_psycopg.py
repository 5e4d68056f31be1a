"""psycopg 3 through pgshard with prepare_threshold=0: every statement is a named prepared statement."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.e2e.conftest import ProxyFactory, ProxyProcess

pytestmark = pytest.mark.e2e


def connect(
    proxy: ProxyProcess, user: str = "app", autocommit: bool = False, **kwargs: Any
) -> psycopg.Connection[Any]:
    return psycopg.connect(
        proxy.dsn(user, **kwargs), prepare_threshold=0, autocommit=autocommit, connect_timeout=10
    )


@pytest.fixture
def pg_items(db: psycopg.Connection[Any]) -> str:
    db.execute("DROP TABLE IF EXISTS pg3_items")
    db.execute("CREATE TABLE pg3_items (id int PRIMARY KEY, label text, amount numeric, tags text[])")
    db.execute("ALTER TABLE pg3_items OWNER TO app")
    return "pg3_items"


ROUND_TRIPS: list[tuple[str, Any]] = [
    ("numeric", Decimal("98765432109876543210.012345678901234567890123456789")),
    ("numeric", Decimal("NaN")),
    ("int8", -9223372036854775808),
    ("timestamptz", dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=dt.UTC)),
    ("date", dt.date(1970, 1, 1)),
    ("int4[]", [1, None, 3]),
    ("text[]", ["x", None, "☃", ""]),
    ("bytea", bytes(range(256))),
    ("uuid", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("bool", False),
    ("float8", float("inf")),
    ("float8", float("-inf")),
    ("float8", -2.5e-300),
    ("text", None),
]


def test_type_round_trips(proxy: ProxyProcess) -> None:
    with connect(proxy) as conn:
        for type_name, value in ROUND_TRIPS:
            # Each distinct query text is a new named statement; run it twice so the second run
            # executes the already-prepared statement.
            for _ in range(2):
                row = conn.execute(f"SELECT %s::{type_name}", (value,)).fetchone()
                assert row is not None
                got = row[0]
                if isinstance(value, Decimal) and value.is_nan():
                    assert isinstance(got, Decimal) and got.is_nan()
                else:
                    assert got == value, type_name
        nan = conn.execute("SELECT %s::float8", (float("nan"),)).fetchone()
        assert nan is not None and math.isnan(nan[0])
        doc = {"a": [1, 2, None], "ü": {"nested": True}}
        assert conn.execute("SELECT %s::jsonb", (Jsonb(doc),)).fetchone() == (doc,)
        conn.commit()


def test_transactions_and_errors(proxy: ProxyProcess, pg_items: str, db: psycopg.Connection[Any]) -> None:
    with connect(proxy) as conn:
        for i in range(20):
            conn.execute(
                "INSERT INTO pg3_items (id, label, amount, tags) VALUES (%s, %s, %s, %s)",
                (i, f"item {i}", Decimal(i) / 7, ["t", str(i)]),
            )
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO pg3_items (id) VALUES (%s)", (1,))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        with conn.transaction():
            conn.execute("UPDATE pg3_items SET label = %s WHERE id = %s", ("changed", 3))
        try:
            with conn.transaction():
                conn.execute("DELETE FROM pg3_items")
                raise RuntimeError("roll it back")
        except RuntimeError:
            pass
        rows = conn.execute("SELECT id, label FROM pg3_items WHERE id < %s ORDER BY id", (5,)).fetchall()
        assert rows == [(0, "item 0"), (1, "item 1"), (2, "item 2"), (3, "changed"), (4, "item 4")]
        conn.commit()
    assert db.execute("SELECT count(*) FROM pg3_items").fetchone() == (20,)


def test_executemany_and_cursor_iteration(proxy: ProxyProcess, pg_items: str) -> None:
    with connect(proxy) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO pg3_items (id, label) VALUES (%s, %s)", [(i, f"m{i}") for i in range(300)]
            )
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("SELECT id, label FROM pg3_items ORDER BY id")
            seen = [row[0] for row in cur]
        assert seen == list(range(300))
        conn.commit()
        # A server-side (named) cursor inside a transaction.
        with conn.cursor(name="pg3_named") as cur:
            cur.itersize = 50
            cur.execute("SELECT id FROM pg3_items ORDER BY id")
            assert sum(row[0] for row in cur) == sum(range(300))
        conn.commit()


def test_copy_both_directions(proxy: ProxyProcess, pg_items: str, db: psycopg.Connection[Any]) -> None:
    with connect(proxy) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY pg3_items (id, label, amount, tags) FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i, None if i % 10 == 0 else f"c{i}", Decimal(i) / 8, ["a", "b,c"]))
            assert cur.rowcount == 1000
            conn.commit()
            received: list[tuple[Any, ...]] = []
            with cur.copy(
                "COPY (SELECT id, label, tags FROM pg3_items WHERE id < 20 ORDER BY id) TO STDOUT"
            ) as copy:
                copy.set_types(["int4", "text", "text[]"])
                received.extend(copy.rows())
            assert received[:2] == [(0, None, ["a", "b,c"]), (1, "c1", ["a", "b,c"])]
            assert len(received) == 20
            # Binary COPY in and out.
            with cur.copy("COPY pg3_items (id, label) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                for i in range(1000, 1100):
                    copy.write_row((i, f"b{i}"))
            binary_out = "COPY (SELECT id, label FROM pg3_items WHERE id >= 1000 ORDER BY id) TO STDOUT"
            with cur.copy(binary_out + " (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                binary_rows = list(copy.rows())
            assert binary_rows[0] == (1000, "b1000") and len(binary_rows) == 100
            conn.commit()
        # A COPY that fails mid-way leaves the connection usable.
        with (
            pytest.raises(psycopg.errors.UniqueViolation),
            conn.cursor() as cur,
            cur.copy("COPY pg3_items (id) FROM STDIN") as copy,
        ):
            copy.write_row((5000,))
            copy.write_row((1,))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM pg3_items").fetchone() == (1100,)
        conn.commit()
    assert db.execute("SELECT count(*), count(label) FROM pg3_items").fetchone() == (1100, 1000)


def test_set_survives_transactions_and_server_connections(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_size=2)
    with connect(proxy, autocommit=True) as a, connect(proxy, autocommit=True) as b:
        a.execute("SET work_mem = '12MB'")
        a.execute("SET datestyle = 'SQL, DMY'")
        pids: set[int] = set()
        for i in range(12):
            # B holds a transaction on every other round, so A lands on both server connections.
            if i % 2 == 0:
                b.execute("BEGIN")
                b.execute("SELECT 1")
            with a.transaction():
                row = a.execute(
                    "SELECT current_setting('work_mem'), current_setting('datestyle'), pg_backend_pid()"
                ).fetchone()
                assert row is not None
                assert row[:2] == ("12MB", "SQL, DMY"), f"round {i}"
                pids.add(row[2])
            if i % 2 == 0:
                assert b.execute("SHOW work_mem").fetchone() == ("4MB",)
                b.execute("COMMIT")
            assert b.execute("SHOW datestyle").fetchone() == ("ISO, MDY",)
        assert len(pids) == 2, pids


def test_pipeline_mode(proxy: ProxyProcess, pg_items: str, db: psycopg.Connection[Any]) -> None:
    with connect(proxy) as conn:
        with conn.pipeline():
            cursors = []
            for i in range(50):
                conn.execute("INSERT INTO pg3_items (id, label) VALUES (%s, %s)", (i, f"p{i}"))
                cursors.append(conn.execute("SELECT count(*) FROM pg3_items WHERE id <= %s", (i,)))
        assert [c.fetchone() for c in cursors] == [(i + 1,) for i in range(50)]
        conn.commit()
        # An error inside a pipeline: PostgreSQL skips to the Sync; the connection stays usable.
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute("INSERT INTO pg3_items (id) VALUES (%s)", (1000,))
            conn.execute("INSERT INTO pg3_items (id) VALUES (%s)", (1,))
            conn.execute("INSERT INTO pg3_items (id) VALUES (%s)", (1001,))
        conn.rollback()
        with conn.pipeline() as pipeline:
            first = conn.execute("SELECT %s::int", (1,))
            pipeline.sync()
            second = conn.execute("SELECT %s::text", ("two",))
        assert first.fetchone() == (1,)
        assert second.fetchone() == ("two",)
        conn.commit()
    with connect(proxy, autocommit=True) as auto, auto.pipeline():
        results = [auto.execute("SELECT %s::int * 3", (i,)) for i in range(30)]
    assert [r.fetchone() for r in results] == [(i * 3,) for i in range(30)]
    assert db.execute("SELECT count(*) FROM pg3_items").fetchone() == (50,)


def test_md5_and_trust_users(proxy: ProxyProcess) -> None:
    for user in ("md5user", "trustuser"):
        with connect(proxy, user) as conn:
            assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
            assert conn.execute("SELECT current_user").fetchone() == ("app",)  # the shard URL's role
