"""Routing: SQL in, route out, over a 4-shard topology (router/routing.py and the compiler)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parser.plan import StatementKind
from proxy.config import Database, ListRule, Range, Shard, ShardedTable
from router.placement import HashSharding
from router.route import Broadcast, Route
from router.routing import Router
from router.routing_bench import bench_routing
from router.topology import Topology

K = StatementKind
BIGINT = HashSharding(1024, 4, "bigint")
INTEGER = HashSharding(1024, 4, "integer")
ALL = (0, 1, 2, 3)


def hs(key: int) -> int:
    return BIGINT.shard(key)


def key_on(shard: int, start: int = 1) -> int:
    """A bigint key that hashes to `shard`."""
    return next(k for k in range(start, start + 1000) if hs(k) == shard)


def keys_on_distinct_shards() -> tuple[int, int]:
    a = key_on(1)
    return a, key_on(2)


def database() -> Database:
    return Database(
        "app",
        tuple(Shard(f"postgresql://app:secret@10.0.0.{i}:5432/app") for i in range(4)),
        virtual_shards=1024,
        default_shard=0,
        omnisharded_tables=("countries",),
        sharded_tables=(
            ShardedTable("orders", "user_id", "bigint"),
            ShardedTable("items", "user_id", "bigint"),
            ShardedTable("pgbench_accounts", "aid", "integer"),
            ShardedTable(
                "events",
                "region",
                "text",
                "list",
                lists=(ListRule(("eu", "uk"), 0), ListRule(("us",), 1), ListRule(("ap",), 3)),
            ),
            ShardedTable(
                "ledger",
                "account_id",
                "bigint",
                "range",
                ranges=(Range(None, 1000, 0), Range(1000, 2000, 1), Range(2000, None, 2)),
            ),
        ),
        shard_key="tenant_id",
    )


@pytest.fixture
def router() -> Router:
    return Router(Topology.from_database(database()))


def route(router: Router, sql: str) -> Route:
    return router.route_simple(sql.encode())


def shards(router: Router, sql: str) -> tuple[int, ...]:
    r = route(router, sql)
    assert r.error is None, r.error
    return r.shards


def error(router: Router, sql: str) -> tuple[str, str]:
    r = route(router, sql)
    assert r.error is not None, r
    return r.error


# -- pgbench ------------------------------------------------------------------------------------


def test_pgbench_statements(router: Router) -> None:
    select = route(router, "SELECT abalance FROM pgbench_accounts WHERE aid = 5")
    assert select.shards == (INTEGER.shard(5),) and select.kind is K.SELECT and not select.write
    update = route(router, "UPDATE pgbench_accounts SET abalance = abalance + -100 WHERE aid = 5")
    assert update.shards == (INTEGER.shard(5),) and update.write and update.broadcast_kind is None
    insert = route(
        router,
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 5, -100, CURRENT_TIMESTAMP)",
    )
    assert insert.shards == (0,) and insert.write  # not configured: the default shard


def test_pgbench_unsharded_goes_to_the_default_shard() -> None:
    plain = Router(Topology(4, default_shard=2))
    assert plain.route_simple(b"SELECT abalance FROM pgbench_accounts WHERE aid = 5").shards == (2,)


# -- reads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [0, 1, 7, 42, 48213, -5, 2**63 - 1, -(2**63)])
def test_key_fixes_one_shard(router: Router, key: int) -> None:
    assert shards(router, f"SELECT * FROM orders WHERE user_id = {key}") == (hs(key),)
    assert shards(router, f"SELECT * FROM orders WHERE user_id = '{key}'") == (hs(key),)
    assert shards(router, f"SELECT * FROM orders WHERE '{key}'::bigint = user_id") == (hs(key),)


def test_in_list_and_or(router: Router) -> None:
    keys = [3, 10, 77]
    expected = tuple(sorted({hs(k) for k in keys}))
    assert shards(router, "SELECT * FROM orders WHERE user_id IN (3, 10, 77)") == expected
    assert (
        shards(router, "SELECT * FROM orders WHERE user_id = 3 OR user_id = 10 OR user_id = 77") == expected
    )
    assert shards(router, "SELECT * FROM orders WHERE user_id = ANY(ARRAY[3, 10, 77])") == expected


def test_read_without_key_goes_everywhere_with_merge_flags(router: Router) -> None:
    r = route(router, "SELECT status, count(*) FROM orders GROUP BY status ORDER BY 2 DESC LIMIT 3")
    assert r.shards == ALL and r.all_shards and not r.write
    assert (
        r.merge is not None and r.merge.aggregates and r.merge.group_by and r.merge.order_by and r.merge.limit
    )


def test_key_in_or_with_other_column_is_not_a_key(router: Router) -> None:
    assert shards(router, "SELECT * FROM orders WHERE user_id = 3 OR status = 'x'") == ALL
    assert shards(router, "SELECT * FROM orders WHERE NOT user_id = 3") == ALL
    assert shards(router, "SELECT * FROM orders WHERE user_id <> 3") == ALL


def test_list_and_range_sharding(router: Router) -> None:
    assert shards(router, "SELECT * FROM events WHERE region = 'us'") == (1,)
    assert shards(router, "SELECT * FROM events WHERE region IN ('eu', 'ap')") == (0, 3)
    assert shards(router, "SELECT * FROM events WHERE region = 'zz'") == (
        0,
    )  # listed nowhere: no row, any shard
    assert shards(router, "SELECT * FROM ledger WHERE account_id = 1500") == (1,)
    assert shards(router, "SELECT * FROM ledger WHERE account_id = 5") == (0,)
    assert shards(router, "SELECT * FROM ledger WHERE account_id = 99999") == (2,)


def test_numeric_comparisons_with_an_integer_key(router: Router) -> None:
    assert shards(router, "SELECT * FROM orders WHERE user_id = 5.0") == (hs(5),)
    assert shards(router, "SELECT * FROM orders WHERE user_id = 5.5") == (0,)  # equals no bigint
    assert shards(router, "SELECT * FROM orders WHERE user_id = 'abc'") == ALL  # PostgreSQL will say why
    assert shards(router, "SELECT * FROM orders WHERE user_id = 99999999999999999999") == ALL


def test_null_key_matches_nothing(router: Router) -> None:
    assert shards(router, "SELECT * FROM orders WHERE user_id = NULL") == (0,)
    assert shards(router, "SELECT * FROM orders WHERE user_id IS NULL") == (BIGINT.shard(None),)


def test_cast_to_another_type_is_not_a_key(router: Router) -> None:
    assert shards(router, "SELECT * FROM orders WHERE user_id = '5'::text") == ALL


# -- joins --------------------------------------------------------------------------------------


def test_colocated_join(router: Router) -> None:
    sql = "SELECT * FROM orders o JOIN items i ON o.user_id = i.user_id"
    assert shards(router, sql + " WHERE o.user_id = 7") == (hs(7),)
    assert shards(router, sql + " WHERE i.user_id = 7") == (hs(7),)  # a key fixed on one side fixes the other
    assert shards(router, sql) == ALL
    assert shards(
        router, "SELECT * FROM orders o, items i WHERE o.user_id = i.user_id AND i.user_id = 9"
    ) == (hs(9),)
    assert shards(router, "SELECT * FROM orders JOIN items USING (user_id) WHERE orders.user_id = 9") == (
        hs(9),
    )


def test_join_not_on_the_keys_is_refused(router: Router) -> None:
    code, message = error(router, "SELECT * FROM orders o JOIN items i ON o.id = i.order_id")
    assert code == "0A000" and "shard keys" in message
    a, b = keys_on_distinct_shards()
    assert (
        error(router, f"SELECT * FROM orders o, items i WHERE o.user_id = {a} AND i.user_id = {b}")[0]
        == "0A000"
    )
    k = key_on(2)
    both = f"SELECT * FROM orders o, items i WHERE o.user_id = {k} AND i.user_id = {key_on(2, k + 1)}"
    assert shards(router, both) == (2,)  # both keys on one shard: fine


def test_join_with_differently_sharded_table_on_the_key(router: Router) -> None:
    # ledger is range-sharded: equal keys are not co-located, but a fixed value fixes both
    sql = "SELECT * FROM orders o JOIN ledger l ON l.account_id = o.user_id WHERE o.user_id = {}"
    k = next(k for k in range(1, 1000) if hs(k) == 0)
    assert shards(router, sql.format(k)) == (0,)
    k2 = next(k for k in range(1, 1000) if hs(k) != 0)
    assert error(router, sql.format(k2))[0] == "0A000"


def test_left_join_fixes_only_what_it_may(router: Router) -> None:
    # the nullable side's ON condition does not restrict the preserved side
    assert (
        shards(router, "SELECT * FROM orders o LEFT JOIN items i ON i.user_id = o.user_id AND i.user_id = 3")
        == ALL
    )
    assert shards(
        router, "SELECT * FROM orders o LEFT JOIN items i ON i.user_id = o.user_id WHERE o.user_id = 3"
    ) == (hs(3),)


def test_join_with_omnisharded_table(router: Router) -> None:
    assert shards(router, "SELECT * FROM orders o JOIN countries c ON c.code = o.cc WHERE o.user_id = 4") == (
        hs(4),
    )
    assert shards(router, "SELECT * FROM orders o JOIN countries c ON c.code = o.cc WHERE user_id = 4") == (
        hs(4),
    )
    assert shards(router, "SELECT * FROM orders o JOIN countries c ON c.code = o.cc") == ALL


def test_sharded_table_with_a_default_shard_table(router: Router) -> None:
    sql = "SELECT * FROM orders o JOIN local_notes n ON n.order_id = o.id WHERE o.user_id = {}"
    assert shards(router, sql.format(key_on(0))) == (0,)
    code, message = error(router, sql.format(key_on(1)))
    assert code == "0A000" and "local_notes" in message
    assert error(router, "SELECT * FROM orders o JOIN local_notes n ON n.order_id = o.id")[0] == "0A000"


def test_omnisharded_reads_spread_round_robin(router: Router) -> None:
    seen = [route(router, "SELECT * FROM countries WHERE code = 'fr'") for _ in range(8)]
    assert sorted({r.shards[0] for r in seen}) == list(ALL)
    assert all(r.omnisharded_read and len(r.shards) == 1 for r in seen)
    assert shards(router, "SELECT * FROM countries FOR UPDATE") == (0,)  # locks: always the same shard


def test_subqueries(router: Router) -> None:
    assert error(router, "SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders)")[0] == "0A000"
    correlated = (
        "SELECT * FROM orders o WHERE total > (SELECT avg(total) FROM items i WHERE i.user_id = o.user_id)"
    )
    assert shards(router, correlated) == ALL
    pinned = (
        "SELECT * FROM orders WHERE user_id = 3 AND total > (SELECT avg(total) FROM items WHERE user_id = 3)"
    )
    assert shards(router, pinned) == (hs(3),)
    only_outside = "SELECT * FROM orders WHERE user_id = 3 AND total > (SELECT avg(total) FROM orders)"
    assert error(router, only_outside)[0] == "0A000"
    grouped = "SELECT * FROM (SELECT user_id, count(*) FROM orders GROUP BY user_id) s"
    assert shards(router, grouped) == ALL
    semi = "SELECT * FROM orders WHERE user_id IN (SELECT user_id FROM items WHERE flag) AND user_id = 5"
    assert shards(router, semi) == (hs(5),)
    assert (
        shards(
            router, "SELECT * FROM orders o WHERE EXISTS (SELECT 1 FROM items i WHERE i.user_id = o.user_id)"
        )
        == ALL
    )
    assert error(router, "SELECT user_id FROM orders INTERSECT SELECT user_id FROM items")[0] == "0A000"
    cte = (
        "WITH mine AS (SELECT * FROM orders WHERE user_id = 8)"
        " SELECT * FROM mine JOIN countries c ON c.code = mine.cc"
    )
    assert shards(router, cte) == (hs(8),)


# -- writes -------------------------------------------------------------------------------------


def test_update_and_delete(router: Router) -> None:
    r = route(router, "UPDATE orders SET status = 'paid' WHERE user_id = 11")
    assert r.shards == (hs(11),) and r.write and r.kind is K.UPDATE
    everywhere = route(router, "DELETE FROM orders WHERE status = 'void'")
    assert everywhere.shards == ALL and everywhere.broadcast_kind is Broadcast.SUM and everywhere.write
    code, message = error(router, "UPDATE orders SET user_id = 5 WHERE user_id = 4")
    assert code == "0A000" and "user_id" in message


def test_omnisharded_writes(router: Router) -> None:
    r = route(router, "UPDATE countries SET name = 'France' WHERE code = 'fr'")
    assert r.shards == ALL and r.broadcast_kind is Broadcast.SAME
    code, message = error(router, "UPDATE countries SET updated_at = now()")
    assert code == "0A000" and "now()" in message
    assert route(router, "INSERT INTO countries (code, name) VALUES ('fr', 'France')").shards == ALL
    assert error(router, "INSERT INTO countries (code, at) VALUES ('fr', clock_timestamp())")[0] == "0A000"
    assert error(router, "UPDATE countries c SET n = o.n FROM orders o WHERE o.cc = c.code")[0] == "0A000"


def test_insert_by_key(router: Router) -> None:
    r = route(router, "INSERT INTO orders (user_id, note) VALUES (42, 'x') RETURNING id")
    assert r.shards == (hs(42),) and r.split is None and r.write


def test_multi_row_insert_is_split_by_shard(router: Router) -> None:
    a, b = keys_on_distinct_shards()
    sql = (
        f"INSERT INTO orders (note, user_id) VALUES ('a', {a}), ('b', {b}), ('c', {a}) ON CONFLICT DO NOTHING"
    )
    r = route(router, sql)
    assert r.shards == (1, 2) and r.broadcast_kind is Broadcast.SUM
    assert r.split == (
        (1, f"INSERT INTO orders (note, user_id) VALUES ('a', {a}), ('c', {a}) ON CONFLICT DO NOTHING"),
        (2, f"INSERT INTO orders (note, user_id) VALUES ('b', {b}) ON CONFLICT DO NOTHING"),
    )
    same = route(router, f"INSERT INTO orders (user_id) VALUES ({a}), ({a})")
    assert same.shards == (1,) and same.split is None


@pytest.mark.parametrize(
    ("sql", "code", "words"),
    [
        ("INSERT INTO orders VALUES (1, 'x')", "0A000", 'must name its shard key column "user_id"'),
        ("INSERT INTO orders (note) VALUES ('x')", "0A000", "must name its shard key"),
        ("INSERT INTO orders (user_id) VALUES (1 + 1)", "0A000", "constant or a parameter"),
        ("INSERT INTO orders (user_id) SELECT user_id FROM items", "0A000", "INSERT ... SELECT"),
        ("INSERT INTO orders (user_id) VALUES (NULL)", "23502", "null value"),
        ("INSERT INTO orders (user_id) VALUES ('abc')", "22P02", "invalid"),
        ("INSERT INTO events (region) VALUES ('zz')", "23514", "no shard"),
        (
            "INSERT INTO orders (user_id, n) VALUES (1, 2) ON CONFLICT (user_id) DO UPDATE SET user_id = 3",
            "0A000",
            "shard key",
        ),
    ],
)
def test_insert_errors(router: Router, sql: str, code: str, words: str) -> None:
    got_code, message = error(router, sql)
    assert got_code == code and words in message


def test_insert_rounds_numeric_keys_like_postgresql(router: Router) -> None:
    assert shards(router, "INSERT INTO orders (user_id) VALUES (5.5)") == (hs(6),)
    assert shards(router, "INSERT INTO orders (user_id) VALUES (-5.5)") == (hs(-6),)


# -- DDL, utilities, sessions --------------------------------------------------------------------


def test_ddl(router: Router) -> None:
    r = route(router, "CREATE TABLE orders (id bigint, user_id bigint, note text)")
    assert r.shards == ALL and r.broadcast_kind is Broadcast.SAME and r.kind is K.DDL
    assert error(router, "CREATE TABLE orders (id bigint, note text)")[0] == "0A000"
    assert shards(router, "CREATE TABLE notes (id int)") == (0,)
    assert shards(router, "CREATE INDEX ON orders (note)") == ALL
    assert shards(router, "ALTER TABLE countries ADD COLUMN x int") == ALL
    assert shards(router, "TRUNCATE orders, items") == ALL
    assert shards(router, "DROP TABLE notes") == (0,)
    # Tables of different homes: IF EXISTS runs as written everywhere; otherwise each shard gets the
    # statement naming only the tables it holds (pgbench -i's DROP and TRUNCATE).
    drop = route(router, "drop table if exists pgbench_accounts, pgbench_branches")
    assert drop.shards == ALL and drop.split is None and drop.broadcast_kind is Broadcast.SAME
    sql = "truncate table pgbench_accounts, pgbench_branches, pgbench_history RESTART IDENTITY"
    assert route(router, sql).split == (
        (0, sql),
        *((s, "truncate table pgbench_accounts RESTART IDENTITY") for s in (1, 2, 3)),
    )
    split = route(router, 'TRUNCATE notes, ONLY "orders", "Items" CASCADE').split  # "Items" is not items
    assert split is not None and split[1] == (1, 'TRUNCATE ONLY "orders" CASCADE')
    assert error(router, "DROP TABLE /* c */ orders, notes")[0] == "0A000"
    assert shards(router, "CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql") == ALL
    assert shards(router, "CREATE EXTENSION IF NOT EXISTS pgcrypto") == ALL
    assert shards(router, "CREATE TEMP TABLE scratch (a int)") == (0,)
    assert shards(router, "CREATE TABLE recent AS SELECT * FROM notes") == (0,)
    assert error(router, "CREATE TABLE copy AS SELECT * FROM orders")[0] == "0A000"


def test_shard_key_tables(router: Router) -> None:
    assert router.topology.sharding("accounts") is None
    join = "SELECT * FROM accounts a JOIN notes n ON n.id = a.nid WHERE a.other = 1"
    assert shards(router, join) == (0,)  # both tables on the default shard, for now
    r = route(router, "CREATE TABLE accounts (id bigint, tenant_id bigint)")
    assert r.shards == ALL
    assert router.topology.sharding("accounts") is not None
    assert shards(router, "SELECT * FROM accounts WHERE tenant_id = 5") == (hs(5),)
    assert shards(router, "SELECT * FROM accounts WHERE other = 1") == ALL
    assert error(router, join)[0] == "0A000"  # the cached plan is recompiled for the new topology
    # a table not known to have the column is presumed sharded by it when the statement fixes it
    assert shards(router, "SELECT * FROM unknown_t WHERE tenant_id = 9") == (hs(9),)


def test_auto_sharded_from_the_catalog(router: Router) -> None:
    assert shards(router, "SELECT * FROM invoices WHERE x = 1") == (0,)
    router.topology.add_auto_sharded("invoices")
    assert shards(router, "SELECT * FROM invoices WHERE x = 1") == ALL


def test_session_statements(router: Router) -> None:
    for sql in ("BEGIN", "COMMIT", "SAVEPOINT a", "SET x = 1", "SHOW all", "DISCARD ALL"):
        r = route(router, sql)
        assert r.shards == () and r.error is None and r.kind in (K.TRANSACTION, K.SET)


def test_utilities(router: Router) -> None:
    assert shards(router, "VACUUM orders") == ALL
    assert shards(router, "VACUUM") == ALL
    assert shards(router, "ANALYZE notes") == (0,)
    assert shards(router, "LISTEN ch") == (0,)
    assert shards(router, "LOCK TABLE countries") == ALL
    assert shards(router, "DECLARE c CURSOR FOR SELECT * FROM orders WHERE user_id = 3") == (hs(3),)
    assert error(router, "DECLARE c CURSOR FOR SELECT * FROM orders")[0] == "0A000"
    assert shards(router, "EXPLAIN SELECT * FROM orders WHERE user_id = 3") == (hs(3),)
    assert shards(router, "COPY orders FROM STDIN") == ALL
    assert shards(router, "COPY notes FROM STDIN") == (0,)
    assert shards(router, "COPY (SELECT * FROM orders WHERE user_id = 3) TO STDOUT") == (hs(3),)


# -- hints, unparsed, multi-statement --------------------------------------------------------------


def test_hints(router: Router) -> None:
    assert shards(router, "SELECT * FROM orders /* pgshard: shard=2 */") == (2,)
    assert shards(router, "-- pgshard: shard=3\nSELECT * FROM orders o JOIN items i ON o.id = i.x") == (3,)
    code, message = error(router, "SELECT 1 /* pgshard: shard=9 */")
    assert code == "22023" and "out of range" in message
    assert shards(router, "SELECT * FROM orders /* pgshard: key=42 */") == (hs(42),)
    assert shards(router, "SELECT * FROM events /* pgshard: key=us */") == (1,)
    assert error(router, "SELECT my_function() /* pgshard: key=42 */")[0] == "0A000"  # which sharding?
    assert error(router, "SELECT 1 /* pgshard: colour=blue */")[0] == "22023"
    assert route(router, "BEGIN /* pgshard: shard=2 */").shards == ()


def test_unparsed(router: Router) -> None:
    assert error(router, "SELECT * FROM orders WHERE x ~~~ 1 FOR NO KEY TWIDDLE")[0] == "0A000"
    assert shards(router, "SELECT * FROM notes WHERE x ~~~ 1 FOR NO KEY TWIDDLE") == (0,)
    assert shards(router, "SELECT * FROM orders WHERE x ~~~ 1 FOR NO KEY TWIDDLE /* pgshard: shard=1 */") == (
        1,
    )


def test_multi_statement_query(router: Router) -> None:
    r = route(router, "BEGIN; UPDATE orders SET n = 1 WHERE user_id = 3; SELECT * FROM countries; COMMIT;")
    assert r.shards == (hs(3),) and r.write and r.statements is not None and len(r.statements) == 4
    a, b = keys_on_distinct_shards()
    spread = route(
        router, f"SELECT * FROM orders WHERE user_id = {a}; SELECT * FROM orders WHERE user_id = {b}"
    )
    assert spread.shards == (1, 2) and [s.shards for s in spread.statements or ()] == [(1,), (2,)]
    refused = route(router, "SELECT 1; UPDATE orders SET user_id = 1")
    assert refused.error is not None
    assert route(router, "SELECT ';'; ").statements is None  # one statement


# -- extended protocol --------------------------------------------------------------------------


def test_bind_text_and_binary(router: Router) -> None:
    prepared = router.prepare("SELECT * FROM orders WHERE user_id = $1")
    assert router.route_bind(prepared, [b"42"], [0]).shards == (hs(42),)
    assert router.route_bind(prepared, [b"42"]).shards == (hs(42),)
    assert router.route_bind(prepared, [struct.pack("!q", 42)], [1]).shards == (hs(42),)
    assert router.route_bind(prepared, [struct.pack("!i", 42)], [1]).shards == (hs(42),)  # declared int4
    assert router.route_bind(prepared, [None], [0]).shards == (0,)  # key = NULL matches no row
    assert router.route_bind(prepared, [b"x"], [1]).shards == ALL  # unreadable: PostgreSQL decides
    assert router.route_bind(prepared, [b"1", b"2"], [0, 1, 0]).error[0] == "08P01"  # type: ignore[index]


def test_bind_format_codes_per_parameter(router: Router) -> None:
    prepared = router.prepare("SELECT * FROM orders WHERE note = $1 AND user_id = $2")
    assert router.route_bind(prepared, [b"n", struct.pack("!q", 7)], [0, 1]).shards == (hs(7),)
    assert router.route_bind(prepared, [b"n", b"7"], [0]).shards == (hs(7),)


def test_bind_declared_types(router: Router) -> None:
    as_float = router.prepare("SELECT * FROM orders WHERE user_id = $1", param_types=[701])
    assert router.route_bind(as_float, [struct.pack("!d", 7.0)], [1]).shards == ALL
    as_int8 = router.prepare("SELECT * FROM orders WHERE user_id = $1", param_types=[20])
    assert router.route_bind(as_int8, [struct.pack("!q", 7)], [1]).shards == (hs(7),)


def test_bind_arrays(router: Router) -> None:
    prepared = router.prepare("SELECT * FROM orders WHERE user_id = ANY($1)")
    expected = tuple(sorted({hs(k) for k in (1, 2, 3)}))
    assert router.route_bind(prepared, [b"{1,2,3}"], [0]).shards == expected
    binary = struct.pack("!iiiii", 1, 0, 20, 3, 1) + b"".join(struct.pack("!iq", 8, k) for k in (1, 2, 3))
    assert router.route_bind(prepared, [binary], [1]).shards == expected


def test_bind_insert(router: Router) -> None:
    prepared = router.prepare("INSERT INTO orders (user_id, note) VALUES ($1, $2)")
    assert router.route_bind(prepared, [b"9", b"x"], [0]).shards == (hs(9),)
    assert router.route_bind(prepared, [struct.pack("!q", 9), b"x"], [1, 0]).shards == (hs(9),)
    assert router.route_bind(prepared, [None, b"x"], [0]).error[0] == "23502"  # type: ignore[index]
    two = router.prepare("INSERT INTO orders (user_id) VALUES ($1), ($2)")
    a, b = keys_on_distinct_shards()
    assert router.route_bind(two, [str(a).encode(), str(a).encode()]).shards == (1,)
    assert router.route_bind(two, [str(a).encode(), str(b).encode()]).error[0] == "0A000"  # type: ignore[index]


def test_prepared_statement_with_literals(router: Router) -> None:
    prepared = router.prepare("SELECT * FROM orders WHERE user_id = 12 AND note = $1")
    assert router.route_bind(prepared, [b"x"]).shards == (hs(12),)


# -- cache ----------------------------------------------------------------------------------------


def test_cache_hits_and_bound() -> None:
    router = Router(Topology.from_database(database()), cache_size=2)
    for sql in ("SELECT * FROM orders WHERE user_id = 1", "SELECT * FROM orders WHERE user_id = 2"):
        router.route_simple(sql.encode())
    assert (router.hits, router.misses) == (1, 1)
    router.route_simple(b"SELECT 1")
    router.route_simple(b"SELECT 2 FROM countries")
    assert len(router._cache) == 2


_TEMPLATES = [
    "SELECT * FROM orders WHERE user_id = {0}",
    "SELECT * FROM orders WHERE user_id IN ({0}, {1}, {2})",
    "SELECT * FROM orders o JOIN items i ON o.user_id = i.user_id WHERE i.user_id = {1} AND o.note = 'x{0}'",
    "UPDATE orders SET note = 'n{2}' WHERE user_id = {0}",
    "DELETE FROM orders WHERE user_id = {1} OR user_id = {2}",
    "INSERT INTO orders (user_id, note) VALUES ({0}, 'a'), ({1}, 'b'), ({2}, 'c')",
    "INSERT INTO orders (note, user_id) VALUES ('z', {2})",
    "SELECT * FROM ledger WHERE account_id = {0}",
    "SELECT * FROM orders WHERE user_id = -{0} AND note = E'{1}\\n'",
]
_KEYS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_UNSIGNED = st.integers(min_value=0, max_value=2**63 - 1)  # a minus sign is part of the shape


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(_TEMPLATES), _UNSIGNED, _UNSIGNED, _UNSIGNED, _UNSIGNED)
def test_cached_route_equals_uncached_route(template: str, warm: int, a: int, b: int, c: int) -> None:
    topology = Topology.from_database(database())
    cached = Router(topology)
    cached.route_simple(template.format(warm, warm, warm).encode())  # fills the cache for this shape
    sql = template.format(a, b, c).encode()
    hit = cached.route_simple(sql)
    assert cached.hits == 1
    fresh = Router(Topology.from_database(database())).route_simple(sql)
    assert hit == fresh


@settings(max_examples=200, deadline=None)
@given(_KEYS)
def test_route_equals_the_hash_placement(key: int) -> None:
    router = Router(Topology.from_database(database()))
    assert router.route_simple(f"SELECT * FROM orders WHERE user_id = {key}".encode()).shards == (hs(key),)
    assert router.route_simple(f"INSERT INTO items (user_id) VALUES ({key})".encode()).shards == (hs(key),)
    prepared = router.prepare("SELECT * FROM orders WHERE user_id = $1")
    assert router.route_bind(prepared, [struct.pack("!q", key)], [1]).shards == (hs(key),)


def test_bench_routing_reports_every_figure() -> None:
    figures = bench_routing(number=200)
    assert set(figures) >= {"simple_hit_us", "simple_miss_us", "extended_bind_us", "extended_prepare_miss_us"}
    assert all(v > 0 for v in figures.values())


# fmt: off
_FRAGMENTS = st.sampled_from([
    "SELECT", "*", "FROM", "orders", "o", "items", "i", "countries", "notes", "JOIN", "ON", "WHERE", "AND",
    "OR", "NOT", "user_id", "o.user_id", "i.user_id", "=", "IN", "(", ")", ",", "1", "'x'", "$1", "::bigint",
    "count(*)", "EXISTS", "UNION", "WITH", "AS", "VALUES", "UPDATE", "SET", "DELETE", "RETURNING", "ANY",
    "NULL", "IS", ";", "--", "/*", "*/", "$$", "E'\\n'", "now()", "-", "5.5", "GROUP", "ORDER", "BY", "LIMIT",
    "INSERT", "INTO",
])
# fmt: on


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=25))
def test_any_text_gets_a_route_or_an_error(fragments: list[str]) -> None:
    router = Router(Topology.from_database(database()))
    sql = " ".join(fragments).encode()
    for _ in range(2):  # a miss, then a hit
        r = router.route_simple(sql)
        assert r.error is not None or r.statements is not None or r.shards or r.kind in (K.TRANSACTION, K.SET)
    prepared = router.prepare(sql.decode())
    r = router.route_bind(prepared, [b"1"], [0])
    assert r.error is not None or r.shards or r.kind in (K.TRANSACTION, K.SET)


# -- the oracle: routed answers equal one database's answers ----------------------------------------
# Rows are placed on per-shard SQLite databases exactly as the topology places them (sharded tables by
# their key, omnisharded copies everywhere, other tables on the default shard). For generated queries,
# a route must either be refused or give, on the shards it names, the rows one database holding
# everything gives. This is Principle 4 ("never a wrong answer") as a property test.

_SCHEMA = {
    "orders": ("id", "user_id", "cid", "total"),
    "items": ("id", "user_id", "order_id", "qty"),
    "countries": ("cid", "name"),
    "notes": ("id", "order_id", "body"),
    "ledger": ("account_id", "amount"),
}


def _rows() -> dict[str, list[tuple[object, ...]]]:
    orders = [(n, 1 + n % 9, n % 3, 10 * n) for n in range(1, 30)]
    items = [(n, 1 + n % 11, 1 + n % 29, n % 4) for n in range(1, 40)]
    return {
        "orders": orders,
        "items": items,
        "countries": [(0, "fr"), (1, "de"), (2, "jp")],
        "notes": [(n, 1 + n % 29, f"n{n}") for n in range(1, 10)],
        "ledger": [(a, a % 7) for a in (1, 5, 999, 1000, 1500, 2000, 2500, 9)],
    }


def _shard_databases(topology: Topology) -> tuple[object, list[object]]:
    import sqlite3

    reference = sqlite3.connect(":memory:")
    shard_dbs = [sqlite3.connect(":memory:") for _ in range(topology.shard_count)]
    for table, columns in _SCHEMA.items():
        ddl = f"CREATE TABLE {table} ({', '.join(columns)})"
        for db in [reference, *shard_dbs]:
            db.execute(ddl)
        sharding = topology.sharding(table)
        for row in _rows()[table]:
            insert = f"INSERT INTO {table} VALUES ({', '.join('?' for _ in row)})"
            reference.execute(insert, row)
            if sharding is not None:
                targets = [sharding.function.shard(row[columns.index(sharding.column)])]
            elif topology.is_omnisharded(table):
                targets = list(topology.all_shards)
            else:
                targets = [topology.default_shard]
            for s in targets:
                shard_dbs[s].execute(insert, row)
    return reference, shard_dbs


_ORACLE_TOPOLOGY = Topology.from_database(database())
_REFERENCE, _SHARD_DBS = _shard_databases(_ORACLE_TOPOLOGY)
_FROMS = [
    "orders o",
    "items i",
    "countries c",
    "ledger l",
    "orders o JOIN items i ON o.user_id = i.user_id",
    "orders o JOIN items i ON o.id = i.order_id",
    "orders o LEFT JOIN items i ON i.user_id = o.user_id",
    "orders o LEFT JOIN items i ON i.user_id = o.user_id AND i.user_id = {k}",
    "orders o JOIN countries c ON c.cid = o.cid",
    "orders o JOIN notes n ON n.order_id = o.id",
    "orders o JOIN ledger l ON l.account_id = o.user_id",
    "orders o, items i",
    "(SELECT * FROM orders WHERE user_id = {k}) o",
    "orders o JOIN (SELECT user_id, count(*) AS qty FROM items GROUP BY user_id) i ON i.user_id = o.user_id",
    "orders o JOIN (SELECT max(user_id) AS user_id, count(*) AS qty FROM items) i ON i.user_id = o.user_id",
    "orders o JOIN (SELECT * FROM items ORDER BY id LIMIT 5) i ON i.user_id = o.user_id",
]
_CONDITIONS = [
    "o.user_id = {k}",
    "o.user_id = '{k}'",
    "{k} = o.user_id",
    "o.user_id IN ({k}, {k2})",
    "(o.user_id = {k} OR o.user_id = {k2})",
    "(o.user_id = {k} OR o.total > 100)",
    "NOT o.user_id = {k}",
    "o.user_id > {k}",
    "i.user_id = {k}",
    "i.user_id = o.user_id",
    "o.id = i.order_id",
    "c.cid = {k}",
    "l.account_id = {big}",
    "n.id = {k}",
    "EXISTS (SELECT 1 FROM items x WHERE x.user_id = o.user_id AND x.qty = 1)",
    "NOT EXISTS (SELECT 1 FROM items x WHERE x.user_id = o.user_id AND x.user_id = {k})",
    "o.user_id IN (SELECT x.user_id FROM items x WHERE x.qty > 2)",
    "o.user_id IN (SELECT x.user_id FROM items x ORDER BY x.id LIMIT 2)",
    "o.total > (SELECT avg(x.total) FROM orders x)",
    "o.total > (SELECT avg(x.total) FROM orders x WHERE x.user_id = o.user_id)",
    "o.total > (SELECT avg(x.total) FROM orders x WHERE x.user_id = {k})",
    "o.cid IN (SELECT cid FROM countries WHERE name = 'fr')",
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_FROMS),
    st.lists(st.sampled_from(_CONDITIONS), max_size=3),
    st.integers(min_value=0, max_value=12),
    st.integers(min_value=0, max_value=12),
    st.sampled_from([1, 999, 1000, 1500, 2500]),
    st.booleans(),
)
def test_routed_answers_equal_one_database(
    from_: str, conditions: list[str], k: int, k2: int, big: int, count: bool
) -> None:
    import sqlite3

    where = " AND ".join(c.format(k=k, k2=k2, big=big) for c in conditions)
    select = "count(*)" if count else "*"
    sql = f"SELECT {select} FROM {from_.format(k=k)}" + (f" WHERE {where}" if where else "")
    try:
        expected = sorted(map(repr, _REFERENCE.execute(sql).fetchall()))  # type: ignore[attr-defined]
    except sqlite3.Error:
        return  # not a valid query (an alias its FROM lacks): nothing to compare
    route = Router(_ORACLE_TOPOLOGY).route_simple(sql.encode())
    if route.error is not None:
        return  # refused: never wrong
    assert route.shards, route
    if count and len(route.shards) > 1:
        total = sum(_SHARD_DBS[s].execute(sql).fetchone()[0] for s in route.shards)  # type: ignore[attr-defined]
        assert repr((total,)) == expected[0], (sql, route)  # the merger sums counts
        return
    got = sorted(repr(row) for s in route.shards for row in _SHARD_DBS[s].execute(sql).fetchall())  # type: ignore[attr-defined]
    assert got == expected, (sql, route)


_WRITES = [
    "DELETE FROM orders WHERE user_id = {k}",
    "DELETE FROM orders WHERE user_id IN ({k}, {k2}) AND total > 50",
    "UPDATE orders SET total = total + 1 WHERE user_id = {k} OR user_id = {k2}",
    "UPDATE orders SET total = 0 WHERE total > {big}",
    "DELETE FROM items WHERE user_id IN (SELECT user_id FROM orders WHERE total > 100)",
    "UPDATE items SET qty = 0 WHERE EXISTS"
    " (SELECT 1 FROM orders WHERE orders.user_id = items.user_id AND total > 50)",
    "DELETE FROM orders WHERE total > (SELECT avg(total) FROM orders)",
    "DELETE FROM orders WHERE total > (SELECT avg(x.total) FROM orders x WHERE x.user_id = orders.user_id)",
    "UPDATE ledger SET amount = amount + 1 WHERE account_id = {big}",
    "DELETE FROM notes WHERE order_id IN (SELECT id FROM orders WHERE user_id = {k})",
    "INSERT INTO orders (id, user_id, cid, total) VALUES (100, {k}, 0, 1), (101, {k2}, 1, 2)",
    "INSERT INTO items (user_id, id) VALUES ({k}, 200)",
]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(_WRITES), st.integers(0, 12), st.integers(0, 12), st.sampled_from([1, 999, 1500, 2500])
)
def test_routed_writes_equal_one_database(template: str, k: int, k2: int, big: int) -> None:
    sql = template.format(k=k, k2=k2, big=big)
    route = Router(_ORACLE_TOPOLOGY).route_simple(sql.encode())
    table = sql.split()[2] if sql.startswith(("DELETE", "INSERT")) else sql.split()[1]
    dbs = [_REFERENCE, *_SHARD_DBS]
    for db in dbs:
        db.execute("SAVEPOINT w")  # type: ignore[attr-defined]
    try:
        _REFERENCE.execute(sql)  # type: ignore[attr-defined]
        if route.error is not None:
            return
        for s in route.shards:
            text = dict(route.split)[s] if route.split else sql
            _SHARD_DBS[s].execute(text)  # type: ignore[attr-defined]
        expected = sorted(map(repr, _REFERENCE.execute(f"SELECT * FROM {table}")))  # type: ignore[attr-defined]
        sharding = _ORACLE_TOPOLOGY.sharding(table)
        homes = _ORACLE_TOPOLOGY.all_shards if sharding is not None else (_ORACLE_TOPOLOGY.default_shard,)
        got = sorted(repr(row) for s in homes for row in _SHARD_DBS[s].execute(f"SELECT * FROM {table}"))  # type: ignore[attr-defined]
        assert got == expected, (sql, route)
    finally:
        for db in dbs:
            db.execute("ROLLBACK TO w")  # type: ignore[attr-defined]
            db.execute("RELEASE w")  # type: ignore[attr-defined]


def test_a_constant_sqlglot_misreads_does_not_poison_the_cache(router: Router) -> None:
    assert error(router, "SELECT * FROM orders WHERE user_id = 1_000")[0] == "0A000"  # PostgreSQL 16 spelling
    assert shards(router, "SELECT * FROM orders WHERE user_id = 5") == (hs(5),)


def test_postgres_aggregates_sqlglot_reads_as_plain_functions_still_need_a_merge() -> None:
    """every() over several shards must be merged (or refused), never answered once per shard."""
    from parser.analysis import analyse

    plan = analyse("SELECT every(flag), bit_xor(n) FROM orders")
    assert plan.merge is not None and plan.merge.aggregates


def test_a_parse_of_a_known_statement_shape_is_not_analysed_again() -> None:
    """pgbench -M extended and PQexecParams Parse the same unnamed statement for every query."""
    router = Router(Topology.from_database(database()))
    first = router.prepare("SELECT * FROM orders WHERE user_id = $1")
    misses = router.misses
    again = router.prepare("SELECT * FROM orders WHERE user_id = $1")
    assert router.misses == misses
    assert again.plan is first.plan
    assert router.route_bind(again, [b"7"]).shards == (hs(7),)
    typed = router.prepare("SELECT * FROM orders WHERE user_id = $1", [20])  # int8 declared: other program
    assert router.route_bind(typed, [struct.pack("!q", 7)], [1]).shards == (hs(7),)
