"""Text shard keys under a client_encoding other than UTF8 (LATIN1, WIN1252), through psycopg: simple
protocol (ClientCursor), extended with text and binary parameters. Each row lands where PostgreSQL's
hash puts the text the server stores, and reads, UPDATEs and DELETEs by key find it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.e2e.sharded import (  # noqa: F401
    ClusterFactory,
    ShardedCluster,
    misplaced,
    routing_servers_fixture,
    sharded_cluster_fixture,
)
from tests.e2e.test_routing import ITEMS, TITEMS

pytestmark = pytest.mark.e2e

SCHEMA = """
CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE titems (k text PRIMARY KEY, n integer NOT NULL);
"""
KEYS = ["é", "café", "Ã©0", "naïve", "Ñandú", "ÿ", "plain"]
WIN1252_KEYS = ["€uro", "Œuvre", "“quoted”", "Ã©1"]


def stored(cluster: ShardedCluster) -> list[tuple[Any, ...]]:
    return sorted(r for i in range(cluster.n) for r in cluster.rows(i, "SELECT k, n FROM titems"))


def check(
    cluster: ShardedCluster, conn: psycopg.Connection[Any], keys: list[str], binary: bool | None
) -> None:
    """INSERT, SELECT, UPDATE, DELETE each key by itself: simple protocol (binary None), else
    extended with text or binary parameters."""
    cur: Any = psycopg.ClientCursor(conn) if binary is None else conn.cursor(binary=binary)
    kw = {} if binary is None else {"binary": binary}
    conn.execute("TRUNCATE titems")
    for n, key in enumerate(keys):
        cur.execute("INSERT INTO titems (k, n) VALUES (%s, %s)", (key, n), **kw)
    assert stored(cluster) == sorted((k, n) for n, k in enumerate(keys))
    assert all(misplaced(cluster, i, "titems", "k", "text") == 0 for i in range(cluster.n))
    for n, key in enumerate(keys):
        cur.execute("SELECT k, n FROM titems WHERE k = %s", (key,), **kw)
        assert cur.fetchall() == [(key, n)], key
        cur.execute("UPDATE titems SET n = n + 100 WHERE k = %s", (key,), **kw)
        assert cur.rowcount == 1, key
    assert stored(cluster) == sorted((k, n + 100) for n, k in enumerate(keys))
    for key in keys:
        cur.execute("DELETE FROM titems WHERE k = %s", (key,), **kw)
        assert cur.rowcount == 1, key
    assert stored(cluster) == []


def test_text_keys_in_latin1_and_win1252(sharded_cluster: ClusterFactory) -> None:
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS, TITEMS])
    cluster.psql_ok(SCHEMA)
    with cluster.connect() as conn:
        conn.execute("SET client_encoding = 'LATIN1'")
        for binary in (None, False, True):
            check(cluster, conn, KEYS, binary)
        conn.execute("SET NAMES 'WIN1252'")
        for binary in (None, False, True):
            check(cluster, conn, WIN1252_KEYS, binary)
        conn.execute("RESET client_encoding")  # UTF8 again
        for binary in (None, False, True):
            check(cluster, conn, KEYS + WIN1252_KEYS, binary)
    with cluster.connect(client_encoding="LATIN1") as conn:  # a start-up parameter
        assert conn.info.encoding == "iso8859-1"
        check(cluster, conn, KEYS, None)
        check(cluster, conn, KEYS, True)


def test_utf8_and_latin1_sessions_share_statement_shapes(sharded_cluster: ClusterFactory) -> None:
    """The route cache holds one entry per statement shape: a UTF8 session and a LATIN1 session
    sending the same shape each find their own rows ('Ã©0' in LATIN1 is valid UTF-8 for 'é0')."""
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS, TITEMS])
    cluster.psql_ok(SCHEMA)
    keys = ["Ã©0", "é0", "café", "naïve"]
    with cluster.connect() as utf8, cluster.connect() as latin1:
        latin1.execute("SET client_encoding = 'LATIN1'")
        for n, key in enumerate(keys):
            conn = utf8 if n % 2 else latin1
            psycopg.ClientCursor(conn).execute("INSERT INTO titems (k, n) VALUES (%s, %s)", (key, n))
        assert all(misplaced(cluster, i, "titems", "k", "text") == 0 for i in range(cluster.n))
        for _ in range(2):
            for conn in (utf8, latin1):
                for n, key in enumerate(keys):
                    cur = psycopg.ClientCursor(conn)
                    cur.execute("SELECT n FROM titems WHERE k = %s", (key,))
                    assert cur.fetchall() == [(n,)], (conn.info.encoding, key)
                    assert conn.execute("SELECT n FROM titems WHERE k = %s", (key,)).fetchall() == [(n,)]


def test_encodings_pgshard_cannot_convert(sharded_cluster: ClusterFactory) -> None:
    """EUC_JP has no exact conversion: a non-ASCII key is refused for a write (0A000) and found by a
    read on every shard; ASCII keys are routed as usual. A LATIN1 INSERT over several shards with
    non-ASCII text cannot be cut into per-shard statements: refused, one row per statement works."""
    cluster = sharded_cluster(shards=4, sharded_tables=[ITEMS, TITEMS])
    cluster.psql_ok(SCHEMA)
    with cluster.connect() as conn:
        conn.execute("INSERT INTO titems (k, n) VALUES ('日本', 1)")
        conn.execute("SET client_encoding = 'EUC_JP'")
        with pytest.raises(psycopg.Error) as info:
            conn.execute("INSERT INTO titems (k, n) VALUES (%s, 2)", ("東京",))
        assert info.value.sqlstate == "0A000" and "EUC_JP" in str(info.value)
        assert conn.execute("SELECT n FROM titems WHERE k = %s", ("日本",)).fetchall() == [(1,)]
        conn.execute("INSERT INTO titems (k, n) VALUES (%s, 3)", ("ascii",))
        conn.execute("SET client_encoding = 'LATIN1'")
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.Error) as info:
            cur.execute("INSERT INTO titems (k, n) VALUES ('é', 4), ('café', 5), ('ÿ', 6), ('naïve', 7)")
        assert info.value.sqlstate == "0A000"
    assert all(misplaced(cluster, i, "titems", "k", "text") == 0 for i in range(cluster.n))
    assert stored(cluster) == [("ascii", 3), ("日本", 1)]
