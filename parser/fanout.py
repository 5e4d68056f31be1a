"""Fan-out reads: what each shard runs, and the final step that turns the shards' partial rows into
the answer one PostgreSQL holding every row would give (DESIGN.md, "Rules for the corners: Merging").

`plan_fanout(sql)` reads a SELECT (or a UNION [ALL]) over sharded tables and returns a `FanoutPlan`
or a `Refusal` naming the construct (answered with 0A000, never a guess):
- rows (ORDER BY, LIMIT/OFFSET, DISTINCT [ON], UNION [ALL]): every shard runs the query with LIMIT
  n+m and no OFFSET (`push_down_limit`), ORDER BY keys missing from the select list appended as
  hidden columns (`append_sort_keys`). Without DISTINCT the partial rows are merged as streams in
  Python (`router.merge`); otherwise, or when the keys' types cannot be compared in Python, a
  PostgreSQL server runs the final query over them;
- aggregates (`split_aggregates`): every shard groups and aggregates (AVG becomes SUM and COUNT,
  COUNT(DISTINCT x) groups by x), and the final query re-aggregates the partial rows, applies
  HAVING, ORDER BY, LIMIT, and casts each column to the type the client's RowDescription names.
The final query reads the partial rows as `FROM pgshard_rows AS p`, columns c1..cN; `final_sql` fills
in their types and `rows_relation` the rows themselves (typed, with each column's collation).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from parser.fanout_aggregates import (
    ANONYMOUS_AGGREGATES,
    AggregateSplit,
    Unsupported,
    canon,
    is_aggregate,
    outside_subqueries,
    resolve_item,
    split_aggregates,
)

__all__ = [
    "ROWS",
    "FanoutPlan",
    "Refusal",
    "SortKey",
    "anonymous_functions",
    "append_sort_keys",
    "final_sql",
    "plan_fanout",
    "probe_sql",
    "push_down_limit",
    "rows_relation",
]

_PG = Dialect.get_or_raise("postgres")
ROWS = "pgshard_rows"  # the relation of partial rows in a final query
_TYPE_MARK = re.compile(r"\bpgshard_(p|o)type_(\d+)\b")


@dataclass(frozen=True, slots=True)
class SortKey:
    """One ORDER BY (or DISTINCT ON) key as a column of the partial rows."""

    column: int  # index among the visible columns, or among the hidden ones if `hidden`
    hidden: bool = False
    descending: bool = False
    nulls_first: bool = False  # PostgreSQL's default: NULLS LAST for ASC, NULLS FIRST for DESC

    def index(self, width: int, hidden: int) -> int:
        """The key's position in a partial row of `width` columns, `hidden` of them hidden."""
        return width - hidden + self.column if self.hidden else self.column


@dataclass(frozen=True, slots=True)
class FanoutPlan:
    partial: str  # what every shard runs
    hidden: int = 0  # trailing partial columns the client does not see
    keys: tuple[SortKey, ...] = ()  # the order of the partial rows (and of the answer)
    streamable: bool = False  # a k-way merge of the partial rows by `keys`, then offset/limit, answers
    limit: int | None = None  # for the merge: rows to keep after skipping `offset` (None: all)
    offset: int = 0
    distinct: bool = False  # rows mode: the final query is SELECT DISTINCT
    distinct_on: tuple[SortKey, ...] = ()
    limit_sql: str | None = None  # rows mode: the client's LIMIT / OFFSET for the final query
    offset_sql: str | None = None
    aggregate: str | None = None  # aggregate mode: the final query, with type placeholders


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # names the construct, for a 0A000 error


def _parse(sql: str) -> exp.Expr | Refusal:
    if "pgshard_" in sql.lower():
        return Refusal('a query that uses names starting with "pgshard_" across shards')
    try:
        tree = sqlglot.parse_one(sql, dialect=_PG)
    except (SqlglotError, RecursionError, ValueError, KeyError, TypeError) as e:
        return Refusal(f"a query pgshard cannot parse across shards ({str(e).splitlines()[0][:120]})")
    if tree is None:
        return Refusal("an empty query across shards")
    return normalize_identifiers(tree, dialect=_PG)


def anonymous_functions(sql: str) -> set[str]:
    """Functions of the top query block that neither sqlglot nor the list of built-in aggregates
    knows: a caller asks the server (pg_proc.prokind) which of them are (user-defined) aggregates,
    and passes those to `plan_fanout`."""
    tree = _parse(sql)
    if isinstance(tree, Refusal) or not isinstance(tree, exp.Select):
        return set()
    roots = [*tree.expressions, tree.args.get("having"), tree.args.get("order")]
    nodes = (n for r in roots if r is not None for n in outside_subqueries(r))
    return {n.name.lower() for n in nodes if isinstance(n, exp.Anonymous)} - ANONYMOUS_AGGREGATES


def plan_fanout(
    sql: str, aggregates: Collection[str] = (), sharded: Callable[[str], bool] | None = None
) -> FanoutPlan | Refusal:
    """The plan of one read across shards. `aggregates`: names among `anonymous_functions(sql)`
    the server says are aggregate functions; `sharded`: whether a table is sharded (a UNION ALL
    branch reading none would be answered once per shard)."""
    tree = _parse(sql)
    if isinstance(tree, Refusal):
        return tree
    if isinstance(tree, exp.SetOperation):
        return _plan_set_operation(tree, sharded, sql)
    if not isinstance(tree, exp.Select):
        return Refusal(f"{type(tree).__name__.upper()} statements across shards")
    if tree.args.get("into"):
        return Refusal("SELECT INTO across shards")
    roots = [*tree.expressions, *(tree.args.get(k) for k in ("having", "order", "qualify", "distinct"))]
    nodes = [n for r in roots if isinstance(r, exp.Expr) for n in outside_subqueries(r)]
    if tree.args.get("windows") or any(isinstance(n, exp.Window) for n in nodes):
        return Refusal("window functions in a query that reads several shards")
    if tree.args.get("qualify"):
        return Refusal("QUALIFY in a query that reads several shards")
    if any(isinstance(n, exp.WithinGroup) for n in nodes):
        return Refusal("ordered-set aggregates (WITHIN GROUP) across shards")
    names = {a.lower() for a in aggregates}
    if tree.args.get("group") or tree.args.get("having") or any(is_aggregate(n, names) for n in nodes):
        try:
            split = split_aggregates(tree, names)
        except Unsupported as e:
            return Refusal(str(e))
        return _aggregate_plan(split)
    return _plan_rows(tree, sql)


# rows: ORDER BY / LIMIT / DISTINCT -------------------------------------------------------------------
def _int(node: exp.Expr | None) -> int | bool | None:
    """A LIMIT/OFFSET value: an int, None for none (ALL, NULL), False if not a literal."""
    if (
        node is None
        or isinstance(node, exp.Null)
        or (isinstance(node, exp.Var) and node.name.upper() == "ALL")
    ):
        return None
    if isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit():
        return int(node.this)
    return False


def _limit_parts(query: exp.Query) -> tuple[exp.Expr | None, exp.Expr | None]:
    """(LIMIT expression, OFFSET expression); FETCH FIRST n ROWS ONLY counts as LIMIT n."""
    limit = query.args.get("limit")
    count: exp.Expr | None = None
    if isinstance(limit, exp.Fetch):
        options = limit.args.get("limit_options")
        if options is not None and options.args.get("with_ties"):
            raise Unsupported("FETCH ... WITH TIES across shards")
        count = limit.args.get("count") or exp.Literal.number(1)
    elif isinstance(limit, exp.Limit):
        count = limit.expression
    offset = query.args.get("offset")
    return count, offset.expression if isinstance(offset, exp.Offset) else None


def push_down_limit(query: exp.Query) -> exp.Query:
    """What a shard runs for LIMIT n OFFSET m: LIMIT n+m and no OFFSET (the merge skips m rows)."""
    count, offset = _limit_parts(query)
    out = query.copy()
    out.set("offset", None)
    if count is None or _int(count) is None:
        out.set("limit", None)
        return out
    n, m = _int(count), _int(offset) if offset is not None else 0
    total: exp.Expr
    if isinstance(n, int) and not isinstance(n, bool) and isinstance(m, int) and not isinstance(m, bool):
        total = exp.Literal.number(n + m)
    elif offset is None:
        total = count.copy()
    else:
        total = exp.Add(this=exp.Paren(this=count.copy()), expression=exp.Paren(this=offset.copy()))
    out.set("limit", exp.Limit(expression=total))
    return out


def append_sort_keys(select: exp.Select) -> tuple[exp.Select, tuple[SortKey, ...], tuple[SortKey, ...]]:
    """The ORDER BY and DISTINCT ON keys as partial columns; keys that are not select-list items
    are appended as hidden columns (pgshard_k1, ...) after the client's own."""
    out = select.copy()
    items = list(select.expressions)
    hidden: list[exp.Expr] = []

    def key(node: exp.Expr, desc: bool = False, nulls_first: bool = False) -> SortKey:
        index = resolve_item(node, items)
        if index is not None:
            return SortKey(index, False, desc, nulls_first)
        if isinstance(node, exp.Column) and not node.table:  # an output alias behind a *
            aliased = [i.this for i in items if isinstance(i, exp.Alias) and i.alias == node.name]
            node = aliased[0] if len(aliased) == 1 else node
        target = canon(node)
        for j, h in enumerate(hidden):
            if canon(h) == target:
                return SortKey(j, True, desc, nulls_first)
        hidden.append(node.copy())
        return SortKey(len(hidden) - 1, True, desc, nulls_first)

    order = select.args.get("order")
    keys = tuple(
        key(o.this, bool(o.args.get("desc")), bool(o.args.get("nulls_first")))
        for o in (order.expressions if isinstance(order, exp.Order) else [])
    )
    distinct = select.args.get("distinct")
    on = distinct.args.get("on") if isinstance(distinct, exp.Distinct) else None
    on_keys = tuple(key(e) for e in (on.expressions if isinstance(on, exp.Tuple) else [on] if on else []))
    for j, h in enumerate(hidden):
        out.append("expressions", exp.alias_(h, f"pgshard_k{j + 1}"))
    return out, keys, on_keys


def _verbatim(sql: str) -> str | None:
    """The client's own text, if it can be sent and wrapped as it is (no trailing ; or -- comment)."""
    text = sql.strip()
    return None if text.endswith(";") or "--" in text else text


def _rows_plan(
    partial: exp.Query, query: exp.Query, keys: tuple[SortKey, ...], hidden: int, distinct: bool,
    on: tuple[SortKey, ...] = (), sql: str = "",
) -> FanoutPlan:  # fmt: skip
    count, offset = _limit_parts(query)
    n = _int(count) if count is not None else None
    m = _int(offset) if offset is not None else None
    streamable = not distinct and not on and n is not False and m is not False
    unchanged = not hidden and offset is None and not isinstance(query.args.get("limit"), exp.Fetch)
    return FanoutPlan(
        # never re-rendered when nothing changes (DESIGN.md, "Parsing and rewriting")
        partial=(unchanged and _verbatim(sql)) or push_down_limit(partial).sql(dialect=_PG),
        hidden=hidden,
        keys=keys,
        streamable=streamable,
        limit=n if isinstance(n, int) and streamable else None,
        offset=m if isinstance(m, int) and streamable else 0,
        distinct=distinct,
        distinct_on=on,
        limit_sql=count.sql(dialect=_PG) if count is not None else None,
        offset_sql=offset.sql(dialect=_PG) if offset is not None else None,
    )


def _plan_rows(select: exp.Select, sql: str) -> FanoutPlan | Refusal:
    try:
        _limit_parts(select)
    except Unsupported as e:
        return Refusal(str(e))
    partial, keys, on = append_sort_keys(select)
    hidden = len(partial.expressions) - len(select.expressions)
    distinct = bool(select.args.get("distinct"))
    if distinct and not on and hidden:
        return Refusal("SELECT DISTINCT ordered by an expression that is not in its select list")
    return _rows_plan(partial, select, keys, hidden, distinct, on, sql)


def _branches(node: exp.Expr) -> list[exp.Expr]:
    if isinstance(node, exp.SetOperation):
        return _branches(node.this) + _branches(node.expression)
    return [node.this if isinstance(node, exp.Subquery) else node]


def _reads_sharded(branch: exp.Expr, sharded: Callable[[str], bool], ctes: dict[str, exp.Expr]) -> bool:
    """Whether every row of a UNION ALL branch comes from one shard's own rows of a sharded table."""
    sources = [branch.args.get("from_"), *(branch.args.get("joins") or [])]
    for source in sources:
        for table in source.find_all(exp.Table) if isinstance(source, exp.Expr) else []:
            cte = ctes.get(table.name)
            if sharded(table.name) or (cte is not None and _reads_sharded_anywhere(cte, sharded)):
                return True
    return False


def _reads_sharded_anywhere(node: exp.Expr, sharded: Callable[[str], bool]) -> bool:
    return any(sharded(t.name) for t in node.find_all(exp.Table))


def _plan_set_operation(
    tree: exp.SetOperation, sharded: Callable[[str], bool] | None, sql: str
) -> FanoutPlan | Refusal:
    distinct = bool(tree.args.get("distinct"))
    for node in tree.find_all(exp.SetOperation):
        if not isinstance(node, exp.Union):
            return Refusal(f"{type(node).__name__.upper()} over sharded tables on several shards")
        if node is not tree and node.args.get("distinct") and not distinct:
            return Refusal("UNION inside UNION ALL across shards")
    if not distinct and sharded is not None:
        with_ = tree.args.get("with_")
        ctes = {c.alias_or_name: c.this for c in with_.expressions} if isinstance(with_, exp.With) else {}
        if not all(_reads_sharded(b, sharded, ctes) for b in _branches(tree)):
            return Refusal("UNION ALL with a branch that reads no sharded table (it would repeat per shard)")
    try:
        _limit_parts(tree)
    except Unsupported as e:
        return Refusal(str(e))
    first: exp.Expr = tree
    while isinstance(first, exp.SetOperation | exp.Subquery):
        first = first.this
    items = first.expressions if isinstance(first, exp.Select) else []
    keys: list[SortKey] = []
    order = tree.args.get("order")
    for o in order.expressions if isinstance(order, exp.Order) else []:
        index = resolve_item(o.this, items)
        if index is None:
            return Refusal("ORDER BY of a UNION by anything but an output column, across shards")
        keys.append(SortKey(index, False, bool(o.args.get("desc")), bool(o.args.get("nulls_first"))))
    return _rows_plan(tree, tree, tuple(keys), 0, distinct, sql=sql)


def _aggregate_plan(split: AggregateSplit) -> FanoutPlan:
    return FanoutPlan(partial=split.partial.sql(dialect=_PG), aggregate=split.final.sql(dialect=_PG))


# the final query ------------------------------------------------------------------------------------
def _key_sql(key: SortKey, width: int, hidden: int) -> str:
    column = f"p.c{key.index(width, hidden) + 1}"
    direction = " DESC" if key.descending else ""
    return f"{column}{direction} NULLS {'FIRST' if key.nulls_first else 'LAST'}"


def final_sql(plan: FanoutPlan, partial_types: Sequence[str], output_types: Sequence[str]) -> str:
    """The final query over `FROM pgshard_rows AS p`, given the partial columns' types and the types
    the client's RowDescription names (both as pg_catalog.format_type spells them)."""
    if plan.aggregate is not None:
        types = {"p": partial_types, "o": output_types}
        return _TYPE_MARK.sub(lambda m: types[m.group(1)][int(m.group(2))], plan.aggregate)
    width = len(partial_types)
    visible = ", ".join(f"p.c{i + 1}" for i in range(width - plan.hidden))
    head = "SELECT "
    if plan.distinct_on:
        head += "DISTINCT ON (" + ", ".join(f"p.c{k.index(width, plan.hidden) + 1}" for k in plan.distinct_on)
        head += ") "
    elif plan.distinct:
        head += "DISTINCT "
    sql = f"{head}{visible} FROM {ROWS} AS p"
    if plan.keys:
        sql += " ORDER BY " + ", ".join(_key_sql(k, width, plan.hidden) for k in plan.keys)
    if plan.limit_sql is not None:
        sql += f" LIMIT {plan.limit_sql}"
    if plan.offset_sql is not None:
        sql += f" OFFSET {plan.offset_sql}"
    return sql


def _dollar_quote(data: bytes) -> bytes:
    n = 0
    while (tag := b"$p%d$" % n) in data:
        n += 1
    return tag + data + tag


def _array_element(value: bytes | None) -> bytes:
    if value is None:
        return b"NULL"
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def rows_relation(
    types: Sequence[str], collations: Sequence[str | None], rows: Sequence[Sequence[bytes | None]]
) -> bytes:
    """The partial rows as a relation with columns c1..cN of the given types and collations: one
    text array per column, unnested and cast (one literal per column, not one per value)."""
    width = len(types)
    arrays = []
    for i in range(width):
        body = b"{" + b",".join(_array_element(row[i]) for row in rows) + b"}"
        arrays.append(_dollar_quote(body) + b"::text[]")
    columns = []
    for i, (type_name, collation) in enumerate(zip(types, collations, strict=True)):
        collate = f" COLLATE {collation}" if collation else ""
        columns.append(f"CAST(u.c{i + 1} AS {type_name}){collate} AS c{i + 1}".encode())
    names = ", ".join(f"c{i + 1}" for i in range(width)).encode()
    return (
        b"(SELECT " + b", ".join(columns) + b" FROM unnest(" + b", ".join(arrays) + b") AS u(" + names + b"))"
    )


def probe_sql(partial: str, width: int) -> str:
    """One row: each partial column's collation, then the settings a merge in Python depends on."""
    names = ", ".join(f"c{i + 1}" for i in range(width))
    collations = "".join(f"pg_collation_for(s.c{i + 1}::text), " for i in range(width))
    return (
        f"SELECT {collations}current_setting('DateStyle'), current_setting('client_encoding'), "
        "(SELECT to_jsonb(d) ->> 'datcollate' FROM pg_database d WHERE d.datname = current_database()), "
        "(SELECT coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') FROM pg_database d "
        "WHERE d.datname = current_database()) "
        f"FROM (SELECT 1) AS d0 LEFT JOIN LATERAL (SELECT * FROM ({partial}\n) AS s0 LIMIT 0) AS s({names}) "
        "ON true"
    )
