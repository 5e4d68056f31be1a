"""Routing of UNION parts, of reads whose rows do not come from sharded rows, and of user-defined
aggregates, over the 4-shard topology of tests/router/test_routing.py."""

from __future__ import annotations

import pytest

from router.route import Route
from router.routing import Router
from router.topology import Topology
from tests.router.test_routing import database, key_on

NOT_SUPPORTED = "0A000"


@pytest.fixture
def router() -> Router:
    return Router(Topology.from_database(database()))


def route(router: Router, sql: str) -> Route:
    return router.route_simple(sql.encode())


def refused(router: Router, sql: str) -> str:
    r = route(router, sql)
    assert r.error is not None and r.error[0] == NOT_SUPPORTED, r
    return r.error[1]


# -- UNION ---------------------------------------------------------------------------------------


def test_union_all_of_keyed_parts_runs_on_their_shards(router: Router) -> None:
    a, b = key_on(1), key_on(2)
    part_a, part_b = f"SELECT id FROM orders WHERE user_id = {a}", f"SELECT id FROM items WHERE user_id = {b}"
    r = route(router, f"{part_a} UNION ALL {part_b}")
    assert r.error is None and r.shards == (1, 2) and r.parts is None
    assert r.merge is not None and r.merge.set_operation == "union all"  # concatenated by the fan-out read
    same = route(router, f"{part_a} UNION ALL {part_a}")
    assert same.shards == (1,) and same.single == 1
    ordered = route(router, f"{part_a} UNION {part_b} ORDER BY 1")
    assert ordered.shards == (1, 2) and ordered.merge is not None and ordered.merge.order_by


def test_union_all_of_sharded_tables_without_keys(router: Router) -> None:
    r = route(router, "SELECT id FROM orders UNION ALL SELECT id FROM items ORDER BY 1 LIMIT 5")
    assert r.error is None and r.all_shards and r.parts is None
    assert r.merge is not None and r.merge.limit


def test_union_all_with_an_omnisharded_part_runs_part_by_part(router: Router) -> None:
    r = route(router, "SELECT status FROM orders UNION ALL SELECT code FROM countries")
    assert r.error is None and r.shards == (0, 1, 2, 3)
    assert r.parts is not None
    texts = dict(r.parts)
    assert texts[0] == "SELECT status FROM orders\nUNION ALL\nSELECT code FROM countries"  # on one shard
    assert texts[1] == texts[2] == texts[3] == "SELECT status FROM orders"


def test_union_all_with_a_default_shard_part(router: Router) -> None:
    b = key_on(2)
    keyed = f"SELECT id FROM orders WHERE user_id = {b}"
    r = route(router, f"SELECT id FROM notes UNION ALL {keyed} UNION ALL SELECT 7")
    assert r.error is None and r.parts is not None
    assert dict(r.parts) == {  # the constant part goes to a shard already taking part
        0: "SELECT id FROM notes\nUNION ALL\nSELECT 7",
        2: keyed,
    }
    on_zero = f"SELECT id FROM items WHERE user_id = {key_on(0)}"
    on_default = route(router, f"SELECT id FROM notes UNION ALL {on_zero}")
    assert on_default.single == 0
    omni = route(router, f"SELECT code FROM countries UNION ALL {keyed}")
    assert omni.single == 2


def test_union_distinct_removes_the_copies_of_omnisharded_parts(router: Router) -> None:
    r = route(router, "SELECT status FROM orders UNION SELECT code FROM countries")
    assert r.error is None and r.all_shards and r.parts is None
    assert r.merge is not None and r.merge.set_operation == "union"
    assert "UNION (without ALL)" in refused(router, "SELECT status FROM orders UNION SELECT body FROM notes")


def test_what_cannot_run_part_by_part_is_refused(router: Router) -> None:
    mixed = "SELECT status FROM orders UNION ALL SELECT code FROM countries"
    assert "ORDER BY" in refused(router, f"{mixed} ORDER BY 1")
    assert "WITH" in refused(router, f"WITH c AS (SELECT 1) {mixed}")
    assert "cannot cut" in refused(router, "(SELECT status FROM orders UNION ALL SELECT code FROM countries)")
    assert "would repeat or lose rows" in refused(
        router, "SELECT id FROM orders UNION ALL SELECT 1 WHERE EXISTS (SELECT 1 FROM items WHERE qty = 3)"
    )
    refused(router, "SELECT id FROM orders INTERSECT SELECT id FROM items")


def test_union_parts_run_apart_in_the_extended_protocol_keep_their_parameters(router: Router) -> None:
    prepared = router.prepare("SELECT status FROM orders WHERE qty > $1 UNION ALL SELECT code FROM countries")
    r = router.route_bind(prepared, [b"3"])
    assert r.error is None and r.shards == (0, 1, 2, 3) and r.parts is not None
    texts = dict(r.parts)
    assert texts[0] == "SELECT status FROM orders WHERE qty > $1\nUNION ALL\nSELECT code FROM countries"
    assert texts[1] == texts[2] == texts[3] == "SELECT status FROM orders WHERE qty > $1"
    keyed_notes = router.prepare(
        "SELECT id FROM notes WHERE id > $2 UNION ALL SELECT id FROM orders WHERE user_id = $1"
    )
    r = router.route_bind(keyed_notes, [str(key_on(2)).encode(), b"0"])
    assert r.parts is not None and dict(r.parts) == {
        0: "SELECT id FROM notes WHERE id > $2",
        2: "SELECT id FROM orders WHERE user_id = $1",
    }
    keyed = router.prepare(
        "SELECT id FROM orders WHERE user_id = $1 UNION ALL SELECT id FROM items WHERE user_id = $2"
    )
    assert router.route_bind(keyed, [str(key_on(1)).encode(), str(key_on(3)).encode()]).shards == (1, 3)


# -- reads whose rows do not each come from one sharded row --------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT c.code FROM countries c LEFT JOIN orders o ON o.status = c.code",
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM orders WHERE qty > 3)",
        "SELECT code FROM countries WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.status = code)",
        "SELECT count(*) FROM countries WHERE code IN (SELECT status FROM orders)",
        "SELECT * FROM generate_series(1, 3) g LEFT JOIN orders o ON o.qty = g",
    ],
)
def test_rows_not_from_sharded_rows_are_refused_over_several_shards(router: Router, sql: str) -> None:
    assert "would repeat or lose rows" in refused(router, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT c.code FROM countries c JOIN orders o ON o.status = c.code",
        "SELECT o.id FROM orders o LEFT JOIN countries c ON o.status = c.code",
        "SELECT * FROM orders o FULL JOIN items i ON i.user_id = o.user_id",
        "SELECT count(*) FROM (SELECT * FROM orders) s",
        "WITH big AS (SELECT * FROM orders WHERE qty > 9) SELECT count(*) FROM big",
        "SELECT * FROM generate_series(1, 3) g JOIN orders o ON o.qty = g",
    ],
)
def test_rows_from_sharded_rows_run_on_every_shard(router: Router, sql: str) -> None:
    r = route(router, sql)
    assert r.error is None and r.all_shards


def test_a_key_makes_such_a_read_one_shards(router: Router) -> None:
    a = key_on(3)
    assert route(router, f"SELECT c.code FROM countries c LEFT JOIN orders o ON o.user_id = {a}").single == 3
    assert route(router, f"SELECT 1 WHERE EXISTS (SELECT 1 FROM orders WHERE user_id = {a})").single == 3


# -- user-defined aggregates ---------------------------------------------------------------------


def test_user_aggregates_over_several_shards_are_refused(router: Router) -> None:
    sql = "SELECT myagg(qty) FROM orders"
    before = route(router, sql)
    assert before.error is None and before.all_shards  # not known yet: read as a scalar
    version = router.topology.version
    assert router.topology.set_user_aggregates(["MyAgg"])
    assert router.topology.version > version
    message = refused(router, sql)  # the cached route was analysed again
    assert "user-defined aggregate myagg()" in message and "shard=N" in message
    assert route(router, f"SELECT myagg(qty) FROM orders WHERE user_id = {key_on(2)}").single == 2
    correlated = "SELECT id, (SELECT myagg(qty) FROM items i WHERE i.user_id = o.user_id) FROM orders o"
    assert route(router, correlated).all_shards  # each subquery reads one shard's rows: correct
    assert "subquery" in refused(router, "SELECT * FROM (SELECT myagg(qty) FROM orders) s")
    assert route(router, "/* pgshard: shard=1 */ SELECT myagg(qty) FROM orders").single == 1
    assert not router.topology.set_user_aggregates(["myagg"])  # unchanged: nothing recompiled


def test_create_aggregate_through_pgshard_is_learned_at_once(router: Router) -> None:
    create = route(router, "CREATE AGGREGATE newagg (int) (sfunc = int4pl, stype = int)")
    assert create.all_shards and create.error is None
    assert "newagg()" in refused(router, "SELECT newagg(qty) FROM orders")
    router.topology.set_user_aggregates([])  # a catalog read that missed it (not yet committed)
    assert "newagg()" in refused(router, "SELECT newagg(qty) FROM orders")
    route(router, "ALTER AGGREGATE newagg(int) RENAME TO renamed")
    assert "renamed()" in refused(router, "SELECT renamed(qty) FROM orders")


def test_while_the_catalog_is_unknown_unknown_functions_are_refused(router: Router) -> None:
    router.topology.set_user_aggregates(None)
    assert "could not read the catalog" in refused(router, "SELECT format_it(qty) FROM orders")
    assert route(router, "SELECT upper(status) FROM orders").all_shards
    assert route(router, f"SELECT format_it(qty) FROM orders WHERE user_id = {key_on(1)}").single == 1
    router.topology.set_user_aggregates([])
    assert route(router, "SELECT format_it(qty) FROM orders").all_shards


def test_prepared_statements_follow_the_catalog(router: Router) -> None:
    prepared = router.prepare("SELECT myagg(qty) FROM orders WHERE qty > $1")
    assert router.route_bind(prepared, [b"1"]).error is None
    router.topology.set_user_aggregates(["myagg"])
    r = router.route_bind(prepared, [b"1"])
    assert r.error is not None and "myagg()" in r.error[1]


def test_aggregating_parts_run_only_where_their_rows_are(router: Router) -> None:
    a, b = key_on(1), key_on(2)
    part_a = f"SELECT count(*) FROM orders WHERE user_id = {a}"
    part_b = f"SELECT count(*) FROM items WHERE user_id = {b}"
    r = route(router, f"{part_a} UNION ALL {part_b}")  # run as a whole, a part answers 0 on the other shard
    assert r.error is None and r.parts is not None and dict(r.parts) == {1: part_a, 2: part_b}
    grouped = f"SELECT user_id, count(*) FROM orders WHERE user_id IN ({a}, {b}) GROUP BY user_id"
    assert route(router, f"{grouped} UNION ALL SELECT 1, 2 FROM items WHERE user_id = {b}").parts is None
    assert "subquery" in refused(router, "SELECT count(*) FROM orders UNION ALL SELECT 1 FROM items")
