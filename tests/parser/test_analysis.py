"""Statement analysis: kinds, tables, key constraints by position, INSERT rows (parser/analysis.py)."""

from __future__ import annotations

import pytest

from parser.analysis import analyse
from parser.dml import row_spans, split_insert
from parser.hints import Hint, parse_hints
from parser.plan import ColumnRef, Constraint, Equality, RefKind, StatementKind, StatementPlan, ValueRef

K = StatementKind


def lit(i: int, **kw: object) -> ValueRef:
    return ValueRef(RefKind.LITERAL, i, **kw)  # type: ignore[arg-type]


def param(n: int, **kw: object) -> ValueRef:
    return ValueRef(RefKind.PARAM, n, **kw)  # type: ignore[arg-type]


def pins(plan: StatementPlan) -> dict[tuple[str, str], tuple[ValueRef, ...]]:
    """Constraints by (table or alias, column), for readable assertions."""
    out = {}
    for c in plan.constraints:
        t = plan.tables[c.column.table] if c.column.table >= 0 else None
        name = (t.alias or t.name) if t else "?"
        out[(name, c.column.column)] = c.values
    return out


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", K.TRANSACTION),
        ("start transaction", K.TRANSACTION),
        ("COMMIT", K.TRANSACTION),
        ("END", K.TRANSACTION),
        ("ROLLBACK TO SAVEPOINT s1", K.TRANSACTION),
        ("SAVEPOINT s1", K.TRANSACTION),
        ("RELEASE s1", K.TRANSACTION),
        ("PREPARE TRANSACTION 'x'", K.TRANSACTION),
        ("COMMIT PREPARED 'x'", K.TRANSACTION),
        ("SET search_path = app", K.SET),
        ("RESET ALL", K.SET),
        ("SHOW server_version", K.SET),
        ("DISCARD ALL", K.SET),
        ("VACUUM ANALYZE orders", K.UTILITY),
        ("LISTEN ch", K.UTILITY),
        ("PREPARE p AS SELECT 1", K.UTILITY),
        ("EXECUTE p", K.UTILITY),
        ("DO $$ BEGIN END $$", K.UTILITY),
        ("CALL proc(1)", K.UTILITY),
        ("GRANT SELECT ON orders TO app", K.UTILITY),
        ("CREATE TABLE t (a int)", K.DDL),
        ("DROP INDEX i", K.DDL),
        ("TRUNCATE t", K.DDL),
        ("COPY t FROM STDIN", K.COPY),
        ("SELECT 1", K.SELECT),
        ("WITH x AS (SELECT 1) SELECT * FROM x", K.SELECT),
        ("VALUES (1)", K.SELECT),
        ("INSERT INTO t (a) VALUES (1)", K.INSERT),
        ("UPDATE t SET a = 1", K.UPDATE),
        ("DELETE FROM t", K.DELETE),
        ("/* c */ -- d\n select 1", K.SELECT),
        ("FROBNICATE", K.OTHER),
    ],
)
def test_kind_by_leading_keywords(sql: str, kind: StatementKind) -> None:
    assert analyse(sql).kind is kind


def test_explain_is_analysed_like_its_query() -> None:
    plan = analyse("EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM orders WHERE user_id = 42")
    assert plan.explain and plan.kind is K.SELECT
    assert pins(plan) == {("orders", "user_id"): (lit(0),)}


def test_pgbench_statements() -> None:
    select = analyse("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;")
    assert [t.name for t in select.tables] == ["pgbench_accounts"]
    assert pins(select) == {("pgbench_accounts", "aid"): (lit(0),)}
    update = analyse("UPDATE pgbench_accounts SET abalance = abalance + -100 WHERE aid = 5")
    assert update.kind is K.UPDATE and update.write and update.target == 0
    assert update.assigned == ("abalance",)
    assert pins(update) == {("pgbench_accounts", "aid"): (lit(1),)}  # literal #0 is the 100
    insert = analyse(
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 5, -100, CURRENT_TIMESTAMP)"
    )
    assert insert.insert is not None
    assert insert.insert.columns == ("tid", "bid", "aid", "delta", "mtime")
    assert insert.insert.rows == ((lit(0), lit(1), lit(2), lit(3, negate=True), None),)
    assert insert.volatile == ("current_timestamp",)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("k = 5", (lit(0),)),
        ("5 = k", (lit(0),)),
        ("k = -5", (lit(0, negate=True),)),
        ("k = $2", (param(2),)),
        ("k = '42'::bigint", (lit(0, cast="bigint"),)),
        ("k = CAST($1 AS int)", (param(1, cast="int"),)),
        ("k = bigint '7'", (lit(0, cast="bigint"),)),
        ("k IN (1, $1, '3')", (lit(0), param(1), lit(1))),
        ("k = 1 OR k = 2 OR k IN (3)", (lit(0), lit(1), lit(2))),
        ("(k = 1)", (lit(0),)),
        ("k = ANY($1)", (param(1, array=True),)),
        ("k = ANY(ARRAY[1, 2])", (lit(0), lit(1))),
        ("k = ANY('{1,2}')", (lit(0, array=True),)),
        ("k IS NULL", (ValueRef(RefKind.IS_NULL),)),
        ("k = NULL", (ValueRef(RefKind.NULL),)),
        ("k = $$abc$$", (ValueRef(RefKind.CONST, value="abc"),)),
    ],
)
def test_key_constraints(where: str, expected: tuple[ValueRef, ...]) -> None:
    assert pins(analyse(f"SELECT * FROM t WHERE {where}")) == {("t", "k"): expected}


@pytest.mark.parametrize(
    "where",
    [
        "k = 1 OR j = 2",
        "NOT (k = 1)",
        "k <> 1",
        "k > 1",
        "k = 1 + 1",
        "k = f(1)",
        "k = j",
        "k IN (SELECT 1)",
        "k = 1.0 * 2",
    ],
)
def test_conditions_that_fix_nothing(where: str) -> None:
    assert analyse(f"SELECT * FROM t WHERE {where}").constraints == ()


def test_other_conjuncts_do_not_hide_a_fixed_key() -> None:
    plan = analyse("SELECT * FROM t WHERE (x = 1 OR y = 2) AND k = 3 AND NOT z")
    assert pins(plan) == {("t", "k"): (lit(2),)}


def test_literal_positions_survive_strings_and_comments() -> None:
    plan = analyse("SELECT 'a;b', 7 /* 8 */ FROM t WHERE s = E'x\\'y' AND k = 9 -- 10")
    assert pins(plan) == {("t", "s"): (lit(2),), ("t", "k"): (lit(3),)}
    assert plan.literal_count == 4


def test_tables_are_folded_and_schema_reduced() -> None:
    plan = analyse(
        'SELECT * FROM Public.Orders o JOIN "Items" ON o.id = "Items".oid JOIN s."MiXed" m ON true'
    )
    assert [(t.name, t.schema, t.alias) for t in plan.tables] == [
        ("orders", "public", "o"),
        ("Items", None, None),
        ("MiXed", "s", "m"),
    ]


def test_joins_record_equalities_by_kind() -> None:
    plan = analyse(
        "SELECT * FROM orders o JOIN items i ON o.user_id = i.user_id"
        " LEFT JOIN ledger l ON l.account_id = o.user_id"
        " FULL JOIN events e ON e.region = o.region"
    )
    o, i, l_, e = (
        ColumnRef(n, c) for n, c in ((0, "user_id"), (1, "user_id"), (2, "account_id"), (3, "region"))
    )
    assert Equality(o, i) in plan.equalities
    assert (
        Equality(o, l_, directed=True) in plan.equalities
    )  # the preserved side's value flows to the nullable
    assert (
        Equality(e, ColumnRef(0, "region"), colocate_only=True) in plan.equalities
        or Equality(ColumnRef(0, "region"), e, colocate_only=True) in plan.equalities
    )


def test_outer_join_on_fixes_the_nullable_side_only() -> None:
    plan = analyse("SELECT * FROM orders o LEFT JOIN items i ON i.user_id = 5 AND o.user_id = 6")
    assert pins(plan) == {("i", "user_id"): (lit(0),)}


def test_unqualified_column_keeps_its_candidates() -> None:
    plan = analyse("SELECT * FROM orders o JOIN countries c ON c.code = o.cc WHERE user_id = 5")
    assert plan.constraints == (Constraint(ColumnRef(-1, "user_id", (0, 1)), (lit(0),)),)


def test_correlated_subquery_lets_values_flow_in_only() -> None:
    plan = analyse(
        "SELECT * FROM orders o WHERE NOT EXISTS"
        " (SELECT 1 FROM items i WHERE i.user_id = o.user_id AND o.user_id = 5)"
    )
    assert plan.constraints == ()  # o.user_id = 5 inside NOT EXISTS fixes nothing about o
    assert plan.equalities == (
        Equality(ColumnRef(0, "user_id"), ColumnRef(1, "user_id"), directed=True, scope=1),
    )


def test_in_subquery_equates_the_projection() -> None:
    plan = analyse("SELECT * FROM orders o WHERE o.user_id IN (SELECT i.user_id FROM items i WHERE i.x = 1)")
    assert plan.equalities == (Equality(ColumnRef(0, "user_id"), ColumnRef(1, "user_id")),)
    limited = analyse(
        "SELECT * FROM orders o WHERE o.user_id IN (SELECT user_id FROM items ORDER BY x LIMIT 3)"
    )
    assert limited.equalities == (Equality(ColumnRef(1, "user_id"), ColumnRef(0, "user_id"), directed=True),)


def test_ctes_are_not_tables() -> None:
    plan = analyse("WITH orders AS (SELECT * FROM items WHERE user_id = 1) SELECT * FROM orders")
    assert [t.name for t in plan.tables] == ["items"]
    assert plan.constraints[0].scope != 0


def test_merge_flags_and_reducing_scopes() -> None:
    top = analyse(
        "SELECT DISTINCT region, count(*) FROM events GROUP BY region HAVING count(*) > 1 ORDER BY 2 "
        "LIMIT 5 OFFSET 1"
    )
    m = top.merge
    assert (m.aggregates, m.group_by, m.having, m.distinct, m.order_by, m.limit, m.offset) == (True,) * 7
    assert analyse("SELECT sum(x) OVER (PARTITION BY k) FROM t").merge.window
    assert not analyse("SELECT sum(x) OVER () FROM t").merge.aggregates
    assert analyse("SELECT 1 FROM a UNION SELECT 2 FROM b").merge.set_operation == "union"
    nested = analyse("SELECT * FROM orders WHERE total > (SELECT avg(total) FROM orders)")
    assert not nested.merge.any
    assert [r.occurrences for r in nested.reducing_scopes] == [(1,)]
    grouped = analyse("SELECT * FROM (SELECT user_id, count(*) FROM orders GROUP BY user_id) s")
    (scope,) = grouped.reducing_scopes
    assert scope.grouped_only and scope.group_by == (ColumnRef(0, "user_id"),)


def test_insert_rows_and_spans() -> None:
    sql = (
        "INSERT INTO orders (user_id, note) VALUES (1, 'a(,'), ($1, now()), (-3, $$x$$)"
        " ON CONFLICT DO NOTHING"
    )
    plan = analyse(sql)
    insert = plan.insert
    assert insert is not None and insert.columns == ("user_id", "note")
    assert insert.rows == (
        (lit(0), lit(1)),
        (param(1), None),
        (lit(2, negate=True), ValueRef(RefKind.CONST, value="x")),
    )
    assert insert.spans is not None
    assert [sql[s:e] for s, e in insert.spans.rows] == ["(1, 'a(,')", "($1, now())", "(-3, $$x$$)"]
    assert sql[insert.spans.tail :] == " ON CONFLICT DO NOTHING"
    assert split_insert(sql, insert.spans, [0, 2]) == (
        "INSERT INTO orders (user_id, note) VALUES (1, 'a(,'), (-3, $$x$$) ON CONFLICT DO NOTHING"
    )


def test_insert_variants() -> None:
    assert analyse("INSERT INTO orders VALUES (1)").insert.columns is None  # type: ignore[union-attr]
    assert analyse("INSERT INTO orders (user_id) SELECT user_id FROM items").insert.select  # type: ignore[union-attr]
    assert analyse("INSERT INTO orders DEFAULT VALUES").insert.default_values  # type: ignore[union-attr]
    upsert = analyse(
        "INSERT INTO orders (user_id, n) VALUES (1, 2) ON CONFLICT (user_id) DO UPDATE SET n = 3"
    )
    assert upsert.insert.conflict_assigns == ("n",)  # type: ignore[union-attr]


def test_row_spans_of_odd_texts() -> None:
    assert row_spans("INSERT INTO t DEFAULT VALUES") is None
    sql = "WITH v AS (VALUES (9)) INSERT INTO t (a) VALUES (1),(2);"
    spans = row_spans(sql)
    assert (
        spans is not None and [sql[s:e] for s, e in spans.rows] == ["(1)", "(2)"] and sql[spans.tail :] == ";"
    )


def test_ddl() -> None:
    create = analyse(
        'CREATE TABLE IF NOT EXISTS app.accounts (id bigint PRIMARY KEY, tenant_id bigint, "Note" text, '
        "CONSTRAINT c CHECK (id > 0), PRIMARY KEY (id))"
    )
    assert create.ddl is not None
    assert (create.ddl.action, create.ddl.object, create.ddl.tables) == ("CREATE", "TABLE", ("accounts",))
    assert create.ddl.columns == ("id", "tenant_id", "Note") and create.ddl.table_ddl
    index = analyse("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ix ON ONLY orders (user_id)").ddl
    assert index is not None and index.tables == ("orders",) and index.table_ddl
    assert analyse("DROP TABLE IF EXISTS a, public.b CASCADE").ddl.tables == ("a", "b")  # type: ignore[union-attr]
    assert analyse("TRUNCATE TABLE ONLY a, b RESTART IDENTITY").ddl.tables == ("a", "b")  # type: ignore[union-attr]
    assert analyse("ALTER TABLE IF EXISTS orders ADD COLUMN x int").ddl.tables == ("orders",)  # type: ignore[union-attr]
    function = analyse(
        "CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ SELECT 1 FROM orders $$ LANGUAGE sql"
    ).ddl
    assert function is not None and not function.table_ddl and function.object == "FUNCTION"
    assert analyse("CREATE TEMP TABLE tmp (a int)").ddl.temporary  # type: ignore[union-attr]
    ctas = analyse(
        "CREATE TABLE summary AS SELECT user_id, count(*) FROM orders WHERE user_id = 3 GROUP BY 1"
    )
    assert [t.name for t in ctas.tables] == ["summary", "orders"] and ctas.target == 0
    assert pins(ctas) == {("orders", "user_id"): (lit(0),)}


def test_utility_tables() -> None:
    assert [t.name for t in analyse("VACUUM (VERBOSE, ANALYZE) orders, public.items").tables] == [
        "orders",
        "items",
    ]
    assert [t.name for t in analyse("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").tables] == ["orders"]
    assert [t.name for t in analyse("GRANT SELECT, INSERT ON TABLE orders TO app").tables] == ["orders"]
    assert analyse("GRANT USAGE ON SCHEMA app TO u").tables == ()
    declare = analyse("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM orders WHERE user_id = 4")
    assert declare.kind is K.UTILITY and pins(declare) == {("orders", "user_id"): (lit(0),)}


def test_copy() -> None:
    plan = analyse("COPY public.orders (user_id, note) FROM STDIN WITH (FORMAT csv)")
    assert plan.copy is not None and (plan.copy.table, plan.copy.columns, plan.copy.direction) == (
        "orders",
        ("user_id", "note"),
        "from",
    )
    query = analyse("COPY (SELECT * FROM orders WHERE user_id = 1) TO STDOUT WITH (HEADER)")
    assert query.kind is K.COPY and pins(query) == {("orders", "user_id"): (lit(0),)}


def test_volatile_functions() -> None:
    plan = analyse("UPDATE countries SET a = now(), b = random(), c = nextval('s'), d = 'now()'")
    assert plan.volatile == ("now", "random", "nextval")


def test_unparsed_statements_keep_their_tables() -> None:
    plan = analyse("SELECT * FROM orders o WHERE o.x ~~~ 5 FOR NO KEY TWIDDLE")
    assert plan.unparsed and plan.kind is K.OTHER and [t.name for t in plan.tables] == ["orders"]


def test_hints_are_stored_and_parsed() -> None:
    plan = analyse("SELECT * FROM orders /* pgshard: shard=2 */")
    assert plan.hints == ("shard=2",)
    assert parse_hints([b"shard=2"]) == Hint(shard=2)
    assert parse_hints(["key='a b'"]) == Hint(key="a b")
    assert parse_hints(["shard=x"]).error is not None
    assert parse_hints(["colour=blue"]).error is not None


def test_update_assigning_a_tuple_and_delete_using() -> None:
    plan = analyse(
        "UPDATE orders o SET (user_id, n) = (1, 2) FROM items i WHERE o.id = i.oid AND i.user_id = 4"
    )
    assert plan.assigned == ("user_id", "n")
    delete = analyse("DELETE FROM orders o USING items i WHERE o.user_id = i.user_id AND i.user_id = 4")
    assert delete.target == 0 and pins(delete) == {("i", "user_id"): (lit(0),)}


def test_data_modifying_cte_is_a_write() -> None:
    plan = analyse("WITH d AS (DELETE FROM orders WHERE user_id = 1 RETURNING *) SELECT * FROM d")
    assert plan.write and plan.nested_writes == (0,)


def test_value_specific_plans_are_not_cacheable() -> None:
    assert analyse("SELECT * FROM t WHERE k = 5").cacheable
    assert not analyse("SELECT * FROM t WHERE k = 1_000").cacheable
