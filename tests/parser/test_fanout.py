"""Fan-out rewrites, SQL in and SQL out (parser/fanout.py, parser/fanout_aggregates.py)."""

from __future__ import annotations

import pytest
import sqlglot
from sqlglot import exp

from parser.fanout import (
    ROWS,
    FanoutPlan,
    Refusal,
    SortKey,
    anonymous_functions,
    append_sort_keys,
    final_sql,
    plan_fanout,
    probe_sql,
    push_down_limit,
    rows_relation,
)
from parser.fanout_aggregates import split_aggregates


def select(sql: str) -> exp.Select:
    tree = sqlglot.parse_one(sql, dialect="postgres")
    assert isinstance(tree, exp.Select)
    return tree


def plan(sql: str, **kwargs: object) -> FanoutPlan:
    result = plan_fanout(sql, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, FanoutPlan), result
    return result


def refusal(sql: str, **kwargs: object) -> str:
    result = plan_fanout(sql, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, Refusal), result
    return result.reason


def aggregate(sql: str) -> tuple[str, str]:
    split = split_aggregates(select(sql))
    return split.partial.sql(dialect="postgres"), split.final.sql(dialect="postgres")


# push_down_limit ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT a FROM t ORDER BY a LIMIT 10 OFFSET 5", "SELECT a FROM t ORDER BY a LIMIT 15"),
        ("SELECT a FROM t ORDER BY a LIMIT 10", "SELECT a FROM t ORDER BY a LIMIT 10"),
        ("SELECT a FROM t ORDER BY a OFFSET 5", "SELECT a FROM t ORDER BY a"),
        ("SELECT a FROM t LIMIT ALL OFFSET 3", "SELECT a FROM t"),
        ("SELECT a FROM t LIMIT NULL", "SELECT a FROM t"),
        ("SELECT a FROM t ORDER BY a OFFSET 2 FETCH FIRST 3 ROWS ONLY", "SELECT a FROM t ORDER BY a LIMIT 5"),
        ("SELECT a FROM t LIMIT 2 + 3 OFFSET 1", "SELECT a FROM t LIMIT (2 + 3) + (1)"),
        ("SELECT a FROM t UNION ALL SELECT b FROM u ORDER BY 1 LIMIT 4 OFFSET 4",
         "SELECT a FROM t UNION ALL SELECT b FROM u ORDER BY 1 LIMIT 8"),
    ],
)  # fmt: skip
def test_push_down_limit(sql: str, expected: str) -> None:
    tree = sqlglot.parse_one(sql, dialect="postgres")
    assert isinstance(tree, exp.Query)
    assert push_down_limit(tree).sql(dialect="postgres") == expected


# append_sort_keys ---------------------------------------------------------------------------------
def test_sort_keys_name_positions_aliases_and_expressions() -> None:
    out, keys, on = append_sort_keys(
        select("SELECT a, b AS x, lower(c) FROM t ORDER BY 2 DESC, x, lower(c), a")
    )
    assert out.sql(dialect="postgres") == "SELECT a, b AS x, LOWER(c) FROM t ORDER BY 2 DESC, x, LOWER(c), a"
    assert keys == (SortKey(1, descending=True, nulls_first=True), SortKey(1), SortKey(2), SortKey(0))
    assert on == ()


def test_sort_keys_not_selected_become_hidden_columns() -> None:
    out, keys, _ = append_sort_keys(
        select("SELECT id FROM t ORDER BY amount DESC NULLS LAST, lower(s), amount")
    )
    assert out.sql(dialect="postgres") == (
        "SELECT id, amount AS pgshard_k1, LOWER(s) AS pgshard_k2 FROM t "
        "ORDER BY amount DESC NULLS LAST, LOWER(s), amount"
    )
    assert keys == (SortKey(0, True, True, False), SortKey(1, True), SortKey(0, True))
    assert keys[1].index(width=3, hidden=2) == 2


def test_sort_keys_behind_a_star_are_hidden_unless_positional() -> None:
    out, keys, _ = append_sort_keys(select("SELECT *, a + 1 AS s FROM t ORDER BY s, 1"))
    assert out.sql(dialect="postgres") == "SELECT *, a + 1 AS s, a + 1 AS pgshard_k1 FROM t ORDER BY s, 1"
    assert keys == (SortKey(0, hidden=True), SortKey(0))


def test_sort_key_output_name_wins_over_input_column() -> None:
    """SQL92: ORDER BY a bare name means the output column of that name (here, input column b)."""
    _, keys, _ = append_sort_keys(select("SELECT a AS b, b AS a FROM t ORDER BY a"))
    assert keys == (SortKey(1),)


def test_distinct_on_keys() -> None:
    out, keys, on = append_sort_keys(select("SELECT DISTINCT ON (a) b FROM t ORDER BY a, c"))
    assert out.sql(dialect="postgres") == (
        "SELECT DISTINCT ON (a) b, a AS pgshard_k1, c AS pgshard_k2 FROM t ORDER BY a, c"
    )
    assert keys == (SortKey(0, True), SortKey(1, True)) and on == (SortKey(0, True),)


# rows plans ---------------------------------------------------------------------------------------
def test_order_limit_offset_streams() -> None:
    p = plan("SELECT id, amount FROM orders ORDER BY amount DESC, id LIMIT 10 OFFSET 20")
    assert p.partial == "SELECT id, amount FROM orders ORDER BY amount DESC, id LIMIT 30"
    assert p.streamable and p.limit == 10 and p.offset == 20 and p.hidden == 0
    assert p.keys == (SortKey(1, descending=True, nulls_first=True), SortKey(0))
    assert final_sql(p, ["bigint", "numeric"], []) == (
        "SELECT p.c1, p.c2 FROM pgshard_rows AS p "
        "ORDER BY p.c2 DESC NULLS FIRST, p.c1 NULLS LAST LIMIT 10 OFFSET 20"
    )


def test_the_clients_text_is_sent_when_nothing_changes() -> None:
    """Never re-rendered needlessly: sqlglot would turn now() into CURRENT_TIMESTAMP, x::numeric
    into CAST(x AS DECIMAL)."""
    sql = "select now(), x::numeric from t order by 2 desc limit 3"
    assert plan(sql).partial == sql
    assert plan("  " + sql + "\n").partial == sql
    assert (
        plan(sql + ";").partial
        == "SELECT CURRENT_TIMESTAMP, CAST(x AS DECIMAL) FROM t ORDER BY 2 DESC LIMIT 3"
    )
    assert plan(sql + " -- note").partial.startswith("SELECT CURRENT_TIMESTAMP")
    assert plan(sql + " offset 1").partial.endswith("ORDER BY 2 DESC LIMIT 4")
    union = "select a from t union all select b from u order by 1"
    assert plan(union).partial == union


def test_limit_expression_is_not_streamed_but_pushed_down() -> None:
    p = plan("SELECT a FROM t ORDER BY a LIMIT 2 + 3")
    assert not p.streamable and p.partial == "SELECT a FROM t ORDER BY a LIMIT 2 + 3"
    assert (
        final_sql(p, ["int4"], [])
        == "SELECT p.c1 FROM pgshard_rows AS p ORDER BY p.c1 NULLS LAST LIMIT 2 + 3"
    )


def test_hidden_keys_in_the_final_query() -> None:
    p = plan("SELECT * FROM t ORDER BY name NULLS FIRST LIMIT 3")
    assert p.partial == "SELECT *, name AS pgshard_k1 FROM t ORDER BY name NULLS FIRST LIMIT 3"
    assert final_sql(p, ["int8", "text", "text"], []) == (
        "SELECT p.c1, p.c2 FROM pgshard_rows AS p ORDER BY p.c3 NULLS FIRST LIMIT 3"
    )


def test_distinct_is_a_final_step() -> None:
    p = plan("SELECT DISTINCT status FROM orders ORDER BY status LIMIT 5")
    assert p.partial == "SELECT DISTINCT status FROM orders ORDER BY status LIMIT 5"
    assert not p.streamable
    assert final_sql(p, ["text"], []) == (
        "SELECT DISTINCT p.c1 FROM pgshard_rows AS p ORDER BY p.c1 NULLS LAST LIMIT 5"
    )
    p = plan("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC")
    assert final_sql(p, ["int4", "int4"], []) == (
        "SELECT DISTINCT ON (p.c1) p.c1, p.c2 FROM pgshard_rows AS p "
        "ORDER BY p.c1 NULLS LAST, p.c2 DESC NULLS FIRST"
    )


def test_refused_rows() -> None:
    assert "window functions" in refusal("SELECT a, rank() OVER (ORDER BY a) FROM t")
    assert "window functions" in refusal("SELECT a FROM t WINDOW w AS (ORDER BY a) ORDER BY a")
    assert "WITH TIES" in refusal("SELECT a FROM t ORDER BY a FETCH FIRST 2 ROWS WITH TIES")
    assert "DISTINCT" in refusal("SELECT DISTINCT a FROM t ORDER BY b")
    assert "pgshard_" in refusal("SELECT pgshard_rows FROM t ORDER BY 1")
    assert "cannot parse" in refusal("SELECT FROM WHERE ORDER")


# set operations -----------------------------------------------------------------------------------
def test_union_all_streams_and_union_deduplicates() -> None:
    p = plan("SELECT a FROM t UNION ALL SELECT b FROM u ORDER BY a DESC LIMIT 3")
    assert p.streamable and p.keys == (SortKey(0, descending=True, nulls_first=True),)
    assert p.partial == "SELECT a FROM t UNION ALL SELECT b FROM u ORDER BY a DESC LIMIT 3"
    p = plan("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1")
    assert p.distinct and not p.streamable
    assert (
        final_sql(p, ["int4"], []) == "SELECT DISTINCT p.c1 FROM pgshard_rows AS p ORDER BY p.c1 NULLS LAST"
    )


def test_refused_set_operations() -> None:
    assert "INTERSECT" in refusal("SELECT a FROM t INTERSECT SELECT b FROM u")
    assert "UNION inside UNION ALL" in refusal(
        "(SELECT a FROM t UNION SELECT b FROM u) UNION ALL SELECT c FROM v"
    )
    assert "output column" in refusal("SELECT a FROM t UNION ALL SELECT b FROM u ORDER BY a + 1")
    sharded = {"t", "u"}.__contains__
    assert "repeat per shard" in refusal(
        "SELECT a FROM t UNION ALL SELECT code FROM countries", sharded=sharded
    )
    assert "repeat per shard" in refusal("SELECT a FROM t UNION ALL SELECT 1", sharded=sharded)
    plan("SELECT a FROM t UNION SELECT code FROM countries", sharded=sharded)  # DISTINCT removes the copies
    plan(
        "WITH x AS (SELECT a FROM t) SELECT a FROM x UNION ALL SELECT b FROM (SELECT b FROM u) AS s",
        sharded=sharded,
    )


# aggregates ---------------------------------------------------------------------------------------
def test_count_sum_min_max() -> None:
    assert aggregate("SELECT count(*), sum(x), min(y), max(y) FROM t WHERE z > 1") == (
        "SELECT COUNT(*), SUM(x), MIN(y), MAX(y) FROM t WHERE z > 1",
        "SELECT CAST(CAST(COALESCE(SUM(p.c1), 0) AS BIGINT) AS pgshard_otype_0), "
        "CAST(CAST(SUM(p.c2) AS pgshard_ptype_1) AS pgshard_otype_1), CAST(MIN(p.c3) AS pgshard_otype_2), "
        "CAST(MAX(p.c4) AS pgshard_otype_3) FROM pgshard_rows AS p",
    )


def test_avg_becomes_sum_and_count() -> None:
    assert aggregate("SELECT avg(x) FROM t") == (
        "SELECT SUM(x), COUNT(x) FROM t",
        "SELECT CAST((SUM(p.c1) / NULLIF(SUM(p.c2), 0)) AS pgshard_otype_0) FROM pgshard_rows AS p",
    )


def test_shared_partials_are_computed_once() -> None:
    partial, final = aggregate("SELECT avg(x), count(x), sum(x) FROM t HAVING count(x) > 1")
    assert partial == "SELECT SUM(x), COUNT(x) FROM t"
    assert "HAVING CAST(COALESCE(SUM(p.c2), 0) AS BIGINT) > 1" in final


def test_boolean_and_bit_aggregates() -> None:
    partial, final = aggregate(
        "SELECT bool_and(f), bool_or(f), every(f), bit_and(b), bit_or(b), bit_xor(b) FROM t"
    )
    assert partial == "SELECT BOOL_AND(f), BOOL_OR(f), EVERY(f), BIT_AND(b), BIT_OR(b), BIT_XOR(b) FROM t"
    assert "CAST(BOOL_AND(p.c3) AS pgshard_otype_2)" in final
    assert "CAST(BIT_XOR(p.c6) AS pgshard_otype_5)" in final


def test_filter_stays_with_the_partial_aggregate() -> None:
    assert aggregate("SELECT count(*) FILTER (WHERE f), avg(x) FILTER (WHERE x > 0) FROM t") == (
        "SELECT COUNT(*) FILTER(WHERE f), SUM(x) FILTER(WHERE x > 0), COUNT(x) FILTER(WHERE x > 0) FROM t",
        "SELECT CAST(CAST(COALESCE(SUM(p.c1), 0) AS BIGINT) AS pgshard_otype_0), "
        "CAST((SUM(p.c2) / NULLIF(SUM(p.c3), 0)) AS pgshard_otype_1) FROM pgshard_rows AS p",
    )


def test_group_by_having_order_limit() -> None:
    assert aggregate(
        "SELECT status, count(*) AS n, avg(x) FROM t GROUP BY status HAVING sum(y) > 3 "
        "ORDER BY n DESC NULLS LAST, status LIMIT 5 OFFSET 2"
    ) == (
        "SELECT status, COUNT(*), SUM(x), COUNT(x), SUM(y) FROM t GROUP BY 1",
        "SELECT CAST(p.c1 AS pgshard_otype_0), "
        "CAST(CAST(COALESCE(SUM(p.c2), 0) AS BIGINT) AS pgshard_otype_1), "
        "CAST((SUM(p.c3) / NULLIF(SUM(p.c4), 0)) AS pgshard_otype_2) FROM pgshard_rows AS p GROUP BY p.c1 "
        "HAVING CAST(SUM(p.c5) AS pgshard_ptype_4) > 3 ORDER BY 2 DESC NULLS LAST, 1 ASC LIMIT 5 OFFSET 2",
    )


def test_group_by_positions_aliases_and_expressions() -> None:
    partial, final = aggregate(
        "SELECT lower(s) AS l, count(*) FROM t GROUP BY l ORDER BY count(*) DESC, lower(s)"
    )
    assert partial == "SELECT LOWER(s), COUNT(*) FROM t GROUP BY 1"
    assert final.endswith("GROUP BY p.c1 ORDER BY 2 DESC, 1 ASC")
    partial, final = aggregate("SELECT x % 5, sum(y) FROM t GROUP BY 1 ORDER BY 1")
    assert partial == "SELECT x % 5, SUM(y) FROM t GROUP BY 1"
    partial, final = aggregate("SELECT x + 1 AS a, count(*) FROM t GROUP BY x ORDER BY x")
    assert partial == "SELECT x, COUNT(*) FROM t GROUP BY 1"
    assert final.startswith("SELECT CAST(p.c1 + 1 AS pgshard_otype_0)") and final.endswith(
        "ORDER BY p.c1 ASC"
    )


def test_bare_columns_outside_aggregates_become_group_keys() -> None:
    """t.x is x (or functionally dependent on the keys): grouping by it too changes no group."""
    partial, final = aggregate("SELECT t.x, count(*) FROM t GROUP BY x ORDER BY t.x")
    assert partial == "SELECT x, t.x, COUNT(*) FROM t GROUP BY 1, 2"
    assert "GROUP BY p.c1, p.c2 ORDER BY 1 ASC" in final


def test_count_distinct_groups_by_its_argument() -> None:
    assert aggregate("SELECT g, count(DISTINCT x), sum(y), avg(DISTINCT x) FROM t GROUP BY g") == (
        "SELECT g, x, SUM(y) FROM t GROUP BY 1, 2",
        "SELECT CAST(p.c1 AS pgshard_otype_0), CAST(COUNT(DISTINCT p.c2) AS pgshard_otype_1), "
        "CAST(CAST(SUM(p.c3) AS pgshard_ptype_2) AS pgshard_otype_2), "
        "CAST(AVG(DISTINCT p.c2) AS pgshard_otype_3) "
        "FROM pgshard_rows AS p GROUP BY p.c1",
    )


def test_no_group_by_and_no_partial_column() -> None:
    assert aggregate("SELECT 1 FROM t HAVING true") == (
        "SELECT COUNT(*) FROM t",
        "SELECT CAST(1 AS pgshard_otype_0) FROM pgshard_rows AS p HAVING TRUE",
    )


def test_distinct_and_distinct_on_in_the_final_query() -> None:
    _, final = aggregate("SELECT DISTINCT count(*) FROM t GROUP BY g")
    assert final.startswith("SELECT DISTINCT CAST(")
    _, final = aggregate("SELECT DISTINCT ON (g) g, count(*) FROM t GROUP BY g, h ORDER BY g, count(*)")
    assert final.startswith("SELECT DISTINCT ON (1) ") and final.endswith("ORDER BY 1 ASC, 2 ASC")


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("SELECT string_agg(s, ',') FROM t", "string_agg()"),
        ("SELECT array_agg(x) FROM t", "array_agg()"),
        ("SELECT stddev(x) FROM t", "stddev()"),
        ("SELECT json_agg(x) FROM t", "json_agg()"),
        ("SELECT xmlagg(x) FROM t", "xmlagg()"),
        ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t", "WITHIN GROUP"),
        ("SELECT count(x ORDER BY y) FROM t", "ORDER BY"),
        ("SELECT g, count(*) FROM t GROUP BY ROLLUP (g)", "ROLLUP"),
        ("SELECT g, count(*) FROM t GROUP BY GROUPING SETS ((g), ())", "GROUPING SETS"),
        ("SELECT count(DISTINCT a), count(DISTINCT b) FROM t", "different arguments"),
        ("SELECT count(DISTINCT a) FILTER (WHERE b) FROM t", "FILTER"),
        ("SELECT * FROM t GROUP BY id", "SELECT *"),
        ("SELECT g, (SELECT max(x) FROM u) FROM t GROUP BY g", "subquery"),
        ("SELECT x, count(*) FROM t", 'column "x"'),
        ("SELECT x / 10 AS x, count(*) FROM t GROUP BY x", 'GROUP BY "x"'),
        ("SELECT count(*) FROM t GROUP BY 3", "position 3"),
        ("SELECT sum(x) OVER () FROM t", "window functions"),
    ],
)
def test_refused_aggregates(sql: str, words: str) -> None:
    assert words in refusal(sql)


def test_user_defined_aggregates_named_by_the_server() -> None:
    sql = "SELECT myagg(x), upper(y), f(z), every(b) FROM t WHERE g(w) ORDER BY h(v)"
    assert anonymous_functions(sql) == {"myagg", "f", "h"}
    assert "myagg()" in refusal("SELECT myagg(x) FROM t ORDER BY 1", aggregates={"myagg"})
    assert plan("SELECT myagg(x) FROM t ORDER BY 1").aggregate is None  # a plain function, then


# the final query's pieces -------------------------------------------------------------------------
def test_final_sql_fills_in_types() -> None:
    p = plan("SELECT status, sum(x) FROM t GROUP BY status")
    assert final_sql(p, ["text", "bigint"], ["text", "bigint"]) == (
        "SELECT CAST(p.c1 AS text), CAST(CAST(SUM(p.c2) AS bigint) AS bigint) "
        "FROM pgshard_rows AS p GROUP BY p.c1"
    )


def test_rows_relation_quotes_every_value() -> None:
    rows = [(b"1", b'say "hi"'), (None, b"a\\b"), (b"3", b"NULL"), (b"4", b""), (b"5", b"$p0$ {x,y}")]
    sql = rows_relation(["bigint", "text"], [None, '"C"'], rows)
    assert sql == (
        b'(SELECT CAST(u.c1 AS bigint) AS c1, CAST(u.c2 AS text) COLLATE "C" AS c2 FROM unnest('
        b'$p0${"1",NULL,"3","4","5"}$p0$::text[], '
        b'$p1${"say \\"hi\\"","a\\\\b","NULL","","$p0$ {x,y}"}$p1$::text[]) AS u(c1, c2))'
    )


def test_rows_relation_without_rows() -> None:
    assert rows_relation(["int4"], [None], []) == (
        b"(SELECT CAST(u.c1 AS int4) AS c1 FROM unnest($p0${}$p0$::text[]) AS u(c1))"
    )
    assert ROWS == "pgshard_rows"


def test_probe_reads_collations_of_every_partial_column() -> None:
    sql = probe_sql("SELECT a, b FROM t", 2)
    assert sql.startswith(
        "SELECT pg_collation_for(s.c1::text), pg_collation_for(s.c2::text), current_setting("
    )
    assert "(SELECT * FROM (SELECT a, b FROM t\n) AS s0 LIMIT 0) AS s(c1, c2)" in sql
