"""Aggregates across shards: split one SELECT into the query every shard runs (group, aggregate) and
the final query that re-aggregates the shards' partial rows (`FROM pgshard_rows AS p`, c1..cN).

Each aggregate is decomposed so that PostgreSQL's own arithmetic and result types come out:
- COUNT -> per shard COUNT, final COALESCE(SUM(c), 0)::bigint;
- SUM -> per shard SUM, final SUM(s) cast back to the per-shard type (SUM(int) is bigint both ways);
- AVG(x) -> per shard SUM(x) and COUNT(x), final SUM(s) / NULLIF(SUM(c), 0): SUM(c) is numeric, so
  an int or numeric AVG is numeric_div exactly as avg() computes it, a float8 one float8 division,
  an interval one interval / float8 (avg(real) sums in real per shard: float tolerance applies);
- MIN, MAX, BOOL_AND, BOOL_OR, EVERY, BIT_AND, BIT_OR, BIT_XOR -> the same aggregate twice;
- agg(DISTINCT x) (one argument x shared by all of them) -> every shard also groups by x, the
  final query runs agg(DISTINCT p.x); the other aggregates are re-aggregated over those groups.
Anything else (string_agg, array_agg, stddev, percentile_cont, ...) is refused by name.
Column names, positions and output aliases resolve as in PostgreSQL: ORDER BY prefers output
columns, GROUP BY input columns (a GROUP BY name that could be either is refused).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect

_PG = Dialect.get_or_raise("postgres")

# Aggregates sqlglot reads as anonymous functions (pg_aggregate of PostgreSQL 16, by name).
ANONYMOUS_AGGREGATES = frozenset({
    "every", "xmlagg", "range_agg", "range_intersect_agg", "json_object_agg", "jsonb_object_agg",
    "jsonb_agg", "json_agg_strict", "jsonb_agg_strict", "json_object_agg_strict", "json_object_agg_unique",
    "json_object_agg_unique_strict", "jsonb_object_agg_strict", "jsonb_object_agg_unique",
    "jsonb_object_agg_unique_strict", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2",
    "regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "covar_pop", "covar_samp", "corr", "stddev_pop",
    "stddev_samp", "var_pop", "var_samp", "variance", "stddev", "mode", "any_value", "bool_and", "bool_or",
    "bit_and", "bit_or", "bit_xor", "array_agg", "string_agg", "json_agg",
})  # fmt: skip
_SAME = (
    exp.Min, exp.Max, exp.LogicalAnd, exp.LogicalOr, exp.BitwiseAndAgg, exp.BitwiseOrAgg, exp.BitwiseXorAgg,
)  # fmt: skip
_SAME_ANONYMOUS = {"every": exp.LogicalAnd, "bool_and": exp.LogicalAnd, "bool_or": exp.LogicalOr}


class Unsupported(Exception):
    """A construct a fan-out read cannot answer exactly; the message names it (for a 0A000)."""


@dataclass(frozen=True, slots=True)
class AggregateSplit:
    partial: exp.Select  # every shard: group keys and partial aggregates
    final: exp.Select  # over `pgshard_rows AS p`, with pgshard_ptype_N / pgshard_otype_N placeholders


# helpers shared with parser.fanout ----------------------------------------------------------------
def outside_subqueries(node: exp.Expr) -> list[exp.Expr]:
    """`node` and its descendants, not entering nested queries."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, exp.Query | exp.Subquery) and n is not node:
            continue
        out.append(n)
        stack.extend(n.iter_expressions())
    return out


def canon(node: exp.Expr) -> exp.Expr:
    """`node` with every identifier quoted, so that x and "x" compare equal (after normalising)."""
    out = node.copy()
    for ident in out.find_all(exp.Identifier):
        ident.set("quoted", True)
    return out


def is_star(item: exp.Expr) -> bool:
    return isinstance(item, exp.Star) or (isinstance(item, exp.Column) and isinstance(item.this, exp.Star))


def output_name(item: exp.Expr) -> str | None:
    """The column name PostgreSQL gives a select-list item (FigureColname), as far as it can be told."""
    if isinstance(item, exp.Alias):
        return item.alias
    if isinstance(item, exp.Cast):
        return output_name(item.this) if isinstance(item.this, exp.Column | exp.Func) else None
    if isinstance(item, exp.Column) and not is_star(item):
        return item.name
    if isinstance(item, exp.Anonymous):
        return item.name.lower()
    if isinstance(item, exp.Func):
        return item.sql(dialect=_PG).split("(", 1)[0].strip().lower() or None
    return None


def position(node: exp.Expr) -> int | None:
    """The 0-based item an integer constant in ORDER BY / GROUP BY names."""
    if isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit():
        return int(node.this) - 1
    return None


def resolve_item(node: exp.Expr, items: Sequence[exp.Expr]) -> int | None:
    """The select-list item an ORDER BY / DISTINCT ON key names, PostgreSQL's way: a position, or
    a bare name matching one output column (SQL92), else an expression equal to an item's."""
    if position(node) is not None:
        return position(node)
    if any(is_star(i) for i in items):
        return None  # positions of named items behind a * are unknown until the server expands it
    if isinstance(node, exp.Column) and not node.table:
        found = [i for i, item in enumerate(items) if output_name(item) == node.name]
        if len(found) == 1:
            return found[0]
    target = canon(node)
    for i, item in enumerate(items):
        if canon(item.unalias()) == target:
            return i
    return None


def is_aggregate(node: exp.Expr, names: Collection[str] = ()) -> bool:
    if isinstance(node, exp.AggFunc):
        return True
    if isinstance(node, exp.Anonymous):
        name = node.name.lower()
        return name in ANONYMOUS_AGGREGATES or name in names
    return False


def _agg_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Anonymous):
        return node.name.lower()
    return node.sql(dialect=_PG).split("(", 1)[0].strip().lower()


def _ref(index: int) -> exp.Column:
    return exp.column(f"c{index + 1}", table="p")


def _cast(node: exp.Expr, placeholder: str) -> exp.Cast:
    return exp.Cast(this=node, to=exp.DataType.build(placeholder, udt=True))


# the split ------------------------------------------------------------------------------------------
class _Split:
    """The partial select list, built while the final query's expressions are rewritten."""

    def __init__(self, names: Collection[str], grouped: bool) -> None:
        self.names = names
        self.grouped = grouped
        self.items: list[exp.Expr] = []
        self._index: dict[exp.Expr, int] = {}
        self.keys: dict[exp.Expr, int] = {}  # final group keys, by canonical form
        self.partial_keys: list[int] = []
        self.distinct: tuple[exp.Expr, int] | None = None

    def add(self, node: exp.Expr) -> int:
        key = canon(node)
        if key not in self._index:
            self._index[key] = len(self.items)
            self.items.append(node)
        return self._index[key]

    def key(self, node: exp.Expr, final: bool = True) -> int:
        index = self.add(node)
        if index not in self.partial_keys:
            self.partial_keys.append(index)
        if final:
            self.keys[canon(node)] = index
        return index

    def rewrite(self, node: exp.Expr) -> exp.Expr:
        """`node` (owned) as an expression over the partial columns."""
        index = self.keys.get(canon(node))
        if index is not None:
            return _ref(index)
        if isinstance(node, exp.Filter) and is_aggregate(node.this, self.names):
            return self.combine(node.this, node.expression)
        if is_aggregate(node, self.names):
            return self.combine(node, None)
        if isinstance(node, exp.Query | exp.Subquery):
            raise Unsupported(
                "a subquery in the select list, HAVING or ORDER BY of an aggregate query across shards"
            )
        if isinstance(node, exp.Column):
            if is_star(node) or not self.grouped:
                raise Unsupported(f'column "{node.name}" outside an aggregate of a query without GROUP BY')
            return _ref(self.key(node))  # functionally dependent on the keys, or the server refuses it
        for name, value in list(node.args.items()):
            if isinstance(value, exp.Expr):
                node.set(name, self.rewrite(value))
            elif isinstance(value, list):
                node.set(name, [self.rewrite(v) if isinstance(v, exp.Expr) else v for v in value])
        return node

    def combine(self, agg: exp.Expr, where: exp.Expr | None) -> exp.Expr:
        """The final expression of one aggregate; adds its partial aggregates to the shards' query."""
        name = _agg_name(agg)
        arg = agg.this
        if isinstance(arg, exp.Order) or agg.find(exp.Order):
            raise Unsupported(f"{name}() with ORDER BY across shards")

        def partial(node: exp.Expr) -> int:
            return self.add(exp.Filter(this=node, expression=where.copy()) if where is not None else node)

        if isinstance(arg, exp.Distinct):
            return self.combine_distinct(agg, arg, where, name)
        if isinstance(agg, exp.Count):
            total = exp.Sum(this=_ref(partial(agg.copy())))
            return exp.Cast(
                this=exp.Coalesce(this=total, expressions=[exp.Literal.number(0)]),
                to=exp.DataType.build("bigint"),
            )
        if isinstance(agg, exp.Sum):
            index = partial(agg.copy())
            return _cast(exp.Sum(this=_ref(index)), f"pgshard_ptype_{index}")
        if isinstance(agg, exp.Avg):
            s = partial(exp.Sum(this=arg.copy()))
            c = partial(exp.Count(this=arg.copy(), big_int=True))  # as the parser builds COUNT(x)
            count = exp.Nullif(this=exp.Sum(this=_ref(c)), expression=exp.Literal.number(0))
            return exp.Paren(this=exp.Div(this=exp.Sum(this=_ref(s)), expression=count, typed=True))
        if isinstance(agg, _SAME):
            return type(agg)(this=_ref(partial(agg.copy())))
        if isinstance(agg, exp.Anonymous) and name in _SAME_ANONYMOUS and len(agg.expressions) == 1:
            return _SAME_ANONYMOUS[name](this=_ref(partial(agg.copy())))
        raise Unsupported(f"aggregate {name}() across shards")

    def combine_distinct(
        self, agg: exp.Expr, arg: exp.Distinct, where: exp.Expr | None, name: str
    ) -> exp.Expr:
        """agg(DISTINCT x): every shard groups by x too; the final query runs agg(DISTINCT p.x)."""
        if where is not None or len(arg.expressions) != 1:
            raise Unsupported(f"{name}(DISTINCT ...) with FILTER or several arguments across shards")
        value = arg.expressions[0]
        if self.distinct is None:
            self.distinct = (canon(value), self.key(value.copy(), final=False))
        elif self.distinct[0] != canon(value):
            raise Unsupported("aggregates with DISTINCT over different arguments across shards")
        distinct = exp.Distinct(expressions=[_ref(self.distinct[1])])
        if isinstance(agg, exp.Count | exp.Sum | exp.Avg | exp.Min | exp.Max):
            return type(agg)(this=distinct)
        raise Unsupported(f"aggregate {name}(DISTINCT ...) across shards")


def _group_expression(node: exp.Expr, items: Sequence[exp.Expr]) -> exp.Expr:
    """What a GROUP BY item groups by: a position names a select item; a bare name is an input
    column unless only an output alias has it (PostgreSQL prefers the input column)."""
    index = position(node)
    if index is not None:
        if not 0 <= index < len(items):
            raise Unsupported(f"GROUP BY position {index + 1} is not in the select list")
        return items[index].unalias()
    if isinstance(node, exp.Column) and not node.table:
        aliased = [i.this for i in items if isinstance(i, exp.Alias) and i.alias == node.name]
        if aliased and not (isinstance(aliased[0], exp.Column) and aliased[0].name == node.name):
            columns = list(aliased[0].find_all(exp.Column))
            if not columns or any(c.name == node.name for c in columns):
                raise Unsupported(f'GROUP BY "{node.name}", both an output alias and maybe an input column')
            return aliased[0]
    return node


def _final_key(node: exp.Expr, items: Sequence[exp.Expr], split: _Split) -> exp.Expr:
    index = resolve_item(node, items)
    return exp.Literal.number(index + 1) if index is not None else split.rewrite(node.copy())


def split_aggregates(select: exp.Select, names: Collection[str] = ()) -> AggregateSplit:
    """The partial and final queries of an aggregating SELECT (raises Unsupported)."""
    items = list(select.expressions)
    if any(is_star(i) for i in items):
        raise Unsupported("SELECT * with GROUP BY or aggregates across shards")
    group = select.args.get("group")
    if group is not None and (
        any(v for k, v in group.args.items() if k != "expressions")
        or any(isinstance(g, exp.Rollup | exp.Cube | exp.GroupingSets) for g in group.expressions)
    ):
        raise Unsupported("GROUPING SETS, ROLLUP or CUBE across shards")
    limit = select.args.get("limit")
    options = limit.args.get("limit_options") if isinstance(limit, exp.Fetch) else None
    if options is not None and options.args.get("with_ties"):
        raise Unsupported("FETCH ... WITH TIES across shards")
    split = _Split(names, grouped=group is not None)
    for g in group.expressions if group is not None else []:
        split.key(_group_expression(g, items).copy())
    final = sqlglot.parse_one("SELECT 1 FROM pgshard_rows AS p", dialect=_PG)
    assert isinstance(final, exp.Select)
    outputs = [
        _cast(split.rewrite(item.unalias().copy()), f"pgshard_otype_{i}") for i, item in enumerate(items)
    ]
    final.set("expressions", outputs)
    having = select.args.get("having")
    if isinstance(having, exp.Having):
        final.set("having", exp.Having(this=split.rewrite(having.this.copy())))
    order = select.args.get("order")
    if isinstance(order, exp.Order):
        keys = [
            exp.Ordered(this=_final_key(o.this, items, split), desc=bool(o.args.get("desc")),
                        nulls_first=bool(o.args.get("nulls_first")))
            for o in order.expressions
        ]  # fmt: skip
        final.set("order", exp.Order(expressions=keys))
    distinct = select.args.get("distinct")
    if isinstance(distinct, exp.Distinct):
        on = distinct.args.get("on")
        on_keys = on.expressions if isinstance(on, exp.Tuple) else [on] if on is not None else []
        final_on = exp.Tuple(expressions=[_final_key(k, items, split) for k in on_keys]) if on_keys else None
        final.set("distinct", exp.Distinct(on=final_on))
    for arg in ("limit", "offset"):
        if select.args.get(arg) is not None:
            final.set(arg, select.args[arg].copy())
    if split.grouped:
        final.set("group", exp.Group(expressions=[_ref(i) for i in split.keys.values()]))
    if not split.items:
        split.add(exp.Count(this=exp.Star()))
    partial = select.copy()
    for arg in ("having", "order", "limit", "offset", "distinct", "group"):
        partial.set(arg, None)
    partial.set("expressions", split.items)
    if split.partial_keys:
        partial.set("group", exp.Group(expressions=[exp.Literal.number(i + 1) for i in split.partial_keys]))
    return AggregateSplit(partial, final)
