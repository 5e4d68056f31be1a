"""Parser facts behind two cross-shard read rules: user-defined aggregates (known from the catalog)
and what each query block's rows are made of (`row_sources`), including the parts of a UNION."""

from __future__ import annotations

import pytest

from parser.analysis import analyse
from parser.dml import split_union
from parser.scope import POSTGRES_AGGREGATES_SQLGLOT_MISSES

# -- user-defined aggregates ---------------------------------------------------------------------


def test_catalog_aggregates_are_aggregates() -> None:
    plan = analyse("SELECT myagg(qty), lower(status) FROM orders", frozenset({"myagg"}))
    assert plan.merge.aggregates
    assert plan.user_aggregates == ("myagg",)
    assert analyse("SELECT MyAgg(qty) FROM orders", frozenset({"myagg"})).user_aggregates == ("myagg",)


@pytest.mark.parametrize("call", ['"myagg"(qty)', '"MyAgg"(qty)', "public.myagg(qty)", '"bit_xor"(qty)'])
def test_quoted_and_qualified_aggregate_names_are_aggregates(call: str) -> None:
    assert analyse(f"SELECT {call} FROM orders", frozenset({"myagg"})).merge.aggregates


def test_without_the_catalog_an_unknown_function_is_a_scalar() -> None:
    plan = analyse("SELECT myagg(qty) FROM orders")
    assert not plan.merge.aggregates
    assert plan.user_aggregates == ()


def test_while_the_catalog_is_unknown_every_unknown_function_may_be_an_aggregate() -> None:
    plan = analyse("SELECT some_function(qty), upper(status) FROM orders", None)
    assert plan.merge.aggregates
    assert plan.user_aggregates == ("some_function",)  # upper() is known to sqlglot


def test_builtin_aggregates_sqlglot_misses_are_not_user_defined() -> None:
    plan = analyse("SELECT every(flag), bit_xor(bits), json_agg_strict(x) FROM orders", frozenset())
    assert plan.merge.aggregates
    assert plan.user_aggregates == ()
    assert {"json_agg_strict", "jsonb_agg_strict", "json_object_agg_unique_strict"} <= (
        POSTGRES_AGGREGATES_SQLGLOT_MISSES
    )


def test_a_nested_user_aggregate_makes_a_reducing_scope() -> None:
    plan = analyse("SELECT * FROM (SELECT myagg(qty) FROM orders) s", frozenset({"myagg"}))
    assert plan.user_aggregates == ()  # only the top block's are named for the refusal
    assert [r.scope for r in plan.reducing_scopes] == [1]
    assert analyse("SELECT * FROM (SELECT myagg(qty) FROM orders) s").reducing_scopes == ()


@pytest.mark.parametrize(
    ("sql", "action", "name"),
    [
        ("CREATE AGGREGATE mysum (int) (sfunc = int4pl, stype = int)", "CREATE", "mysum"),
        ('create or replace aggregate app."MySum"(numeric) (sfunc=numeric_add)', "CREATE", "MySum"),
        ("ALTER AGGREGATE mysum(int) RENAME TO total", "ALTER", "total"),
        ("ALTER AGGREGATE mysum(int) OWNER TO app", "ALTER", None),
        ("DROP AGGREGATE mysum(int)", "DROP", None),
    ],
)
def test_aggregate_ddl_names_the_aggregate(sql: str, action: str, name: str | None) -> None:
    ddl = analyse(sql).ddl
    assert ddl is not None
    assert (ddl.action, ddl.object, ddl.name) == (action, "AGGREGATE", name)


# -- what rows are made of -----------------------------------------------------------------------


def test_row_sources_of_joins() -> None:
    inner = analyse("SELECT * FROM countries c JOIN orders o ON o.code = c.code")
    assert inner.row_sources[0] == ((0,), (1,))
    left = analyse("SELECT * FROM orders o LEFT JOIN countries c ON o.code = c.code")
    assert left.row_sources[0] == ((0,),)
    nullable = analyse("SELECT * FROM countries c LEFT JOIN orders o ON o.code = c.code")
    assert nullable.row_sources[0] == ((0,),)  # orders may be NULL: only countries is certain
    right = analyse("SELECT * FROM countries c RIGHT JOIN orders o ON o.code = c.code")
    assert right.row_sources[0] == ((1,),)
    full = analyse("SELECT * FROM orders o FULL JOIN items i ON i.user_id = o.user_id")
    assert full.row_sources[0] == ((0, 1),)  # each row holds a row of one or the other
    assert analyse("SELECT 1").row_sources[0] == ()
    assert analyse("SELECT * FROM generate_series(1, 3) g").row_sources[0] == ()


def test_row_sources_of_derived_tables_and_with_queries() -> None:
    derived = analyse("SELECT * FROM (SELECT * FROM orders) s")
    assert derived.row_sources == (((-2,),), ((0,),))
    cte = analyse("WITH big AS (SELECT * FROM orders) SELECT * FROM big")
    assert cte.row_sources == (((-2,),), ((0,),))
    exists = analyse("SELECT 1 WHERE EXISTS (SELECT 1 FROM orders)")
    assert exists.row_sources[0] == ()  # orders only in a subquery


# -- UNION parts ---------------------------------------------------------------------------------


def test_union_parts_and_whether_they_can_run_apart() -> None:
    plan = analyse("SELECT id FROM orders UNION ALL SELECT 1 UNION ALL SELECT code FROM countries")
    assert [blocks[0] for blocks in plan.union_parts] == [2, 3, 4]
    assert plan.union_split
    assert plan.row_sources[0] == ((-2, -5),) and plan.row_sources[1] == ((-3, -4),)
    nested = analyse("SELECT id FROM orders UNION ALL (SELECT 1 UNION SELECT 2)")
    assert len(nested.union_parts) == 2
    assert nested.union_parts[1] == (2, 3, 4)  # the parenthesised UNION and its sides
    assert nested.union_split  # the UNION (without ALL) is inside one part
    assert not analyse("SELECT 1 FROM orders UNION SELECT 2").union_split
    assert not analyse("SELECT 1 FROM orders UNION ALL SELECT 2 UNION SELECT 3").union_split
    assert not analyse("SELECT 1 AS a FROM orders UNION ALL SELECT 2 ORDER BY a").union_split
    assert not analyse("WITH w AS (SELECT 1) SELECT * FROM w UNION ALL SELECT 2").union_split
    assert analyse("SELECT 1 FROM orders").union_parts == ()
    assert analyse("SELECT 1 FROM orders INTERSECT SELECT 2").union_parts == ()


def test_split_union_cuts_the_clients_text() -> None:
    assert split_union("SELECT 1 UNION ALL SELECT 2;") == ["SELECT 1", "SELECT 2"]
    assert split_union(
        "(SELECT 'union all' FROM t LIMIT 1) union all /* union */ select \"UNION\" from u -- x"
    ) == ["(SELECT 'union all' FROM t LIMIT 1)", '/* union */ select "UNION" from u -- x']
    assert split_union("SELECT 1 UNION SELECT 2 UNION DISTINCT SELECT $$ union $$") == [
        "SELECT 1",
        "SELECT 2",
        "SELECT $$ union $$",
    ]
    assert split_union("SELECT 1 UNION ALL (SELECT 2 UNION SELECT 3)") == [
        "SELECT 1",
        "(SELECT 2 UNION SELECT 3)",
    ]
    assert split_union("SELECT 1 INTERSECT SELECT 2") is None
    assert split_union("(SELECT 1 UNION ALL SELECT 2)") is None
    assert split_union("SELECT 1") is None


def test_blocks_that_answer_without_rows() -> None:
    assert analyse("SELECT count(*) FROM orders").ungrouped == (0,)
    assert analyse("SELECT 1 FROM orders HAVING true").ungrouped == (0,)
    assert analyse("SELECT status, count(*) FROM orders GROUP BY ROLLUP (status)").ungrouped == (0,)
    assert analyse("SELECT status, count(*) FROM orders GROUP BY status").ungrouped == ()
    assert analyse("SELECT id FROM orders UNION ALL SELECT count(*) FROM items").ungrouped == (2,)
