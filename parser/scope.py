"""Query blocks of a parsed statement: the tables each block reads, and the column values and
column equalities its WHERE and JOIN conditions guarantee.

A fact is recorded only where it holds for every row of a table that can reach the result, so
the router may narrow a statement to the shards holding those rows and never lose one:
- conjuncts of WHERE and of an inner join's ON fix the columns of the block's own tables;
- an outer join's ON fixes only its nullable side; a value fixed on the preserved side flows to
  the nullable side (`Equality.directed`), never back; FULL JOIN only co-locates;
- a conjunct of a subquery that names an outer column (correlation) fixes nothing outside the
  subquery (NOT EXISTS would invert it), but lets the outer value flow in;
- OR, NOT, <> and every other predicate are ignored: ignoring a conjunct can only widen a route.
Columns are matched to tables by qualifier and alias; an unqualified column in a block of several
tables keeps its candidates, and the router (which knows the key columns) picks one.

Each block also records what its rows are made of (`StatementPlan.row_sources`), so the router can
tell a read whose every row comes from one sharded row (it may run on several shards) from one that
would repeat or lose rows there (`countries LEFT JOIN orders`, `EXISTS (... orders ...)` alone).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from sqlglot import exp

from parser.conditions import Block, ConditionCollector, identifier_name
from parser.fingerprint import Literal
from parser.plan import ColumnRef, Constraint, Equality, MergeFlags, ReducingScope, TableRef
from parser.values import ValueReader

_NO_OCCURRENCES: frozenset[int] = frozenset()
_MAX_CLAUSES = 64  # a FULL JOIN multiplies clauses; past this, fewer guarantees (never a wrong one)
Clauses = tuple[tuple[int, ...], ...]


class ScopeWalker(ConditionCollector):
    """Walks a sqlglot tree once, collecting tables, constraints and equalities."""

    def __init__(
        self,
        literal_at: Mapping[int, tuple[int, Literal]],
        base: int = 0,
        aggregates: frozenset[str] | None = frozenset(),
    ) -> None:
        """`aggregates`: the database's user-defined aggregates (lower case); None while they are
        not known, and then every function sqlglot does not know counts as one (never a wrong answer)."""
        self.values = ValueReader(literal_at, base)
        self.aggregates = aggregates
        self.user_aggregates: list[str] = []
        self.row_sources: list[Clauses] = []
        self.ungrouped: list[int] = []  # blocks that may return a row reading none
        self.union_parts: tuple[tuple[int, ...], ...] = ()
        self.union_split = False
        self.tables: list[TableRef] = []
        self.constraints: list[Constraint] = []
        self.equalities: list[Equality] = []
        self.parents: list[int | None] = []
        self.reducing: list[ReducingScope] = []
        self.set_operations: list[str] = []
        self.nested_writes: list[int] = []
        self.locks = False
        self.merge = MergeFlags()
        self._blocks: list[Block] = []
        self._subqueries: dict[int, tuple[int, ColumnRef | None, bool]] = {}
        self._side_blocks: dict[int, int] = {}  # id(a set operation's side) -> its block

    # -- blocks ---------------------------------------------------------------------------

    def new_block(self, parent: Block | None, ctes: Mapping[str, int]) -> Block:
        block = Block(len(self.parents), parent, ctes)
        self.parents.append(parent.id if parent else None)
        self.row_sources.append(())
        self._blocks.append(block)
        return block

    def closure(self, block_id: int) -> list[int]:
        """The block and every block whose rows flow into it."""
        seen, todo = [block_id], [block_id]
        while todo:
            for child in self._blocks[todo.pop()].children:
                if child not in seen:
                    seen.append(child)
                    todo.append(child)
        return seen

    def add_table(self, node: exp.Table, block: Block) -> int | None:
        """Register a FROM item that names a table (or a WITH query) in `block`."""
        name = identifier_name(node.args.get("this"))
        if name is None:
            return None
        alias = identifier_name(node.args["alias"].args.get("this")) if node.args.get("alias") else name
        schema = identifier_name(node.args.get("db"))
        if schema is None and name in block.ctes:
            block.names[alias or name] = None
            block.children.append(block.ctes[name])
            return None
        occurrence = len(self.tables)
        self.tables.append(TableRef(name, schema, alias if alias != name else None, block.id))
        block.names[alias or name] = occurrence
        block.local.append(occurrence)
        return occurrence

    # -- queries --------------------------------------------------------------------------

    def query(self, node: exp.Expr, parent: Block | None, ctes: Mapping[str, int], top: bool = False) -> int:
        """Walk a query (SELECT, set operation, VALUES, or a DML in WITH); returns its block id."""
        while isinstance(node, exp.Subquery) and isinstance(node.this, exp.Query):
            node = node.this
        if isinstance(node, exp.DML) and not top:
            from parser.dml import walk_dml  # a data-modifying WITH query

            return walk_dml(self, node, parent, ctes).block.id
        block = self.new_block(parent, ctes)
        ctes = self.with_clause(node, block, ctes)
        block.ctes = ctes
        if isinstance(node, exp.SetOperation):
            op = type(node).__name__.lower() + ("" if node.args.get("distinct") else " all")
            if not isinstance(node, exp.Union):
                self.set_operations.append(op)
            sides = []
            for side in (node.this, node.expression):
                child = self.query(side, block, ctes)
                self._side_blocks[id(side)] = child
                block.children.append(child)
                sides.append(-1 - child)
            if isinstance(node, exp.Union):  # each row comes from one of the sides
                self.row_sources[block.id] = (tuple(sides),)
            reducing = op == "union" or any(node.args.get(k) for k in ("order", "limit", "offset"))
            self.finish_block(node, block, top, reducing, op)
            if top and isinstance(node, exp.Union):
                parts, every_all = _union_chain(node)
                self.union_parts = tuple(tuple(self.closure(self._side_blocks[id(p)])) for p in parts)
                self.union_split = every_all and not any(
                    node.args.get(k) for k in ("with_", "order", "limit", "offset")
                )
        elif isinstance(node, exp.Select):
            self.select(node, block, top)
        else:
            self.nested(node, block)
        return block.id

    def with_clause(self, node: exp.Expr, block: Block, ctes: Mapping[str, int]) -> Mapping[str, int]:
        with_ = node.args.get("with_")
        if not isinstance(with_, exp.With):
            return ctes
        ctes = dict(ctes)
        for cte in with_.expressions:
            name = identifier_name(cte.args["alias"].args.get("this")) if cte.args.get("alias") else None
            if name is None:
                continue
            if with_.args.get("recursive"):
                ctes[name] = len(self.parents)  # the block the body is about to get
            ctes[name] = self.query(cte.this, block.parent, ctes)
        return ctes

    def select(self, node: exp.Select, block: Block, top: bool) -> None:
        from_ = node.args.get("from_")
        left: list[int] = []
        sources: Clauses = ()
        if isinstance(from_, exp.From):
            left, sources = self.from_source(from_.this, block)
        _, self.row_sources[block.id] = self.join_sources(node.args.get("joins") or [], block, left, sources)
        for key in ("expressions", "where", "group", "having", "qualify", "order", "limit", "offset"):
            value = node.args.get(key)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, exp.Expr):
                    self.nested(item, block)
        where = node.args.get("where")
        if isinstance(where, exp.Where):
            self.conjuncts(where.this, block, _NO_OCCURRENCES)
        if node.args.get("locks"):
            self.locks = True
        # a nested block's aggregate makes it a reducing scope, which the router checks on its own
        found = self.user_aggregates if top else []
        aggregates, window = _aggregates_and_windows(node, self.aggregates, found)
        group, having = bool(node.args.get("group")), bool(node.args.get("having"))
        group_node = node.args.get("group")
        sets = isinstance(group_node, exp.Group) and any(
            isinstance(e, exp.Rollup | exp.Cube | exp.GroupingSets) for e in group_node.expressions
        )
        if (aggregates or having) and (not group or sets):
            self.ungrouped.append(block.id)  # count(*) of no rows is a row
        distinct, limit, offset = (bool(node.args.get(k)) for k in ("distinct", "limit", "offset"))
        if top:
            self.merge = MergeFlags(
                order_by=bool(node.args.get("order")),
                limit=limit,
                offset=offset,
                aggregates=aggregates,
                group_by=group,
                distinct=distinct,
                window=window or bool(node.args.get("windows")),
                having=having,
            )
        elif aggregates or window or group or having or distinct or limit or offset:
            grouped_only = not (window or distinct or limit or offset)
            group_by: list[ColumnRef] = []
            group_node = node.args.get("group")
            if grouped_only and isinstance(group_node, exp.Group):
                for item in group_node.expressions:
                    ref = self.column(item, block)
                    if ref is not None and ref[1]:
                        group_by.append(ref[0])
            self.add_reducing(block, grouped_only, tuple(group_by))

    def finish_block(self, node: exp.Expr, block: Block, top: bool, reducing: bool, op: str) -> None:
        if top:
            self.merge = MergeFlags(
                order_by=bool(node.args.get("order")),
                limit=bool(node.args.get("limit")),
                offset=bool(node.args.get("offset")),
                set_operation=op,
            )
        elif reducing:
            self.add_reducing(block, False, ())

    def add_reducing(self, block: Block, grouped_only: bool, group_by: tuple[ColumnRef, ...]) -> None:
        scopes = self.closure(block.id)
        occurrences = tuple(i for i, t in enumerate(self.tables) if t.scope in scopes)
        self.reducing.append(ReducingScope(block.id, tuple(scopes), occurrences, grouped_only, group_by))

    def from_item(self, node: exp.Expr, block: Block) -> list[int]:
        """Register one FROM item; returns the table occurrences it brings into the block."""
        return self.from_source(node, block)[0]

    def joins(self, joins: list[exp.Join], block: Block, left: list[int]) -> list[int]:
        return self.join_sources(joins, block, left, ())[0]

    def from_source(self, node: exp.Expr, block: Block) -> tuple[list[int], Clauses]:
        """Register one FROM item: the table occurrences it brings into the block, and what each of
        its rows is made of (see `StatementPlan.row_sources`)."""
        if isinstance(node, exp.Table):
            occurrence = self.add_table(node, block)
            name = identifier_name(node.args.get("this"))
            sources: Clauses = ()
            if occurrence is not None:
                sources = ((occurrence,),)
            elif name is not None and node.args.get("db") is None and name in block.ctes:
                sources = ((-1 - block.ctes[name],),)  # a WITH query's rows
            elif not isinstance(node.args.get("this"), exp.Identifier):
                self.nested(node, block)  # a table function: generate_series(...), unnest($1)
                _name_source(node, block)
            out = [] if occurrence is None else [occurrence]
            if node.args.get("joins"):  # a parenthesised join: (a JOIN b ON ...)
                out, sources = self.join_sources(node.args["joins"], block, out, sources)
            return out, sources
        if isinstance(node, exp.Subquery) and not isinstance(node.this, exp.Query):
            found = self.from_source(node.this, block)
            _name_source(node, block)
            return found
        if isinstance(node, exp.Subquery | exp.Lateral):
            inner = node.this
            child = self.query(inner, block, block.ctes)
            block.children.append(child)
            _name_source(node, block)
            return [], ((-1 - child,),)
        self.nested(node, block)  # VALUES, UNNEST, ...
        _name_source(node, block)
        return [], ()

    def join_sources(
        self, joins: list[exp.Join], block: Block, left: list[int], sources: Clauses
    ) -> tuple[list[int], Clauses]:
        left = list(left)
        for join in joins:
            right, right_sources = self.from_source(join.this, block)
            side = (join.args.get("side") or "").upper()
            preserved: frozenset[int] = _NO_OCCURRENCES
            if side == "LEFT":
                preserved = frozenset(left)
            elif side == "RIGHT":
                preserved = frozenset(right)
                sources = right_sources
            elif side == "FULL":
                preserved = frozenset(left + right)
                sources = _either(sources, right_sources)
            else:  # inner, CROSS, comma: every row holds a row of both sides
                sources = sources + right_sources
            on = join.args.get("on")
            if isinstance(on, exp.Expr):
                self.nested(on, block)
                self.conjuncts(on, block, preserved, side == "FULL")
            for ident in join.args.get("using") or []:
                name = identifier_name(ident)
                if name and len(right) == 1 and left:
                    self.equality(
                        ColumnRef(-1, name, tuple(left)),
                        ColumnRef(right[0], name),
                        block,
                        preserved,
                        side == "FULL",
                    )
            left += right
        return left, sources[:_MAX_CLAUSES]

    def nested(self, node: exp.Expr, block: Block) -> None:
        """Walk the subqueries inside an expression as child blocks of `block`."""
        for query in _subqueries(node):
            child = self.query(query, block, block.ctes)
            block.children.append(child)
            projection = None
            inner = query.this if isinstance(query, exp.Subquery) else query
            if isinstance(inner, exp.Select) and len(inner.expressions) == 1:
                item = inner.expressions[0]
                item = item.this if isinstance(item, exp.Alias) else item
                resolved = self.column(item, self._blocks[child])
                projection = resolved[0] if resolved and resolved[1] else None
            reducing = any(r.scope == child for r in self.reducing)
            self._subqueries[id(query)] = (child, projection, reducing)
            self._subqueries[id(inner)] = (child, projection, reducing)


def _name_source(node: exp.Expr, block: Block) -> None:
    alias = node.args.get("alias")
    if isinstance(alias, exp.TableAlias):
        name = identifier_name(alias.args.get("this"))
        if name:
            block.names[name] = None


def _subqueries(node: exp.Expr) -> Iterator[exp.Expr]:
    """The outermost queries inside an expression (not the expression itself)."""
    stack = list(node.iter_expressions())
    while stack:
        n = stack.pop()
        if isinstance(n, exp.Query | exp.DML):
            yield n
        else:
            stack.extend(n.iter_expressions())


def _either(left: Clauses, right: Clauses) -> Clauses:
    """Rows that hold a row of one side or of the other (FULL JOIN): (a AND b) OR c = (a OR c) AND
    (b OR c)."""
    out: list[tuple[int, ...]] = []
    for a in left:
        for b in right:
            if len(out) < _MAX_CLAUSES:
                out.append(tuple(dict.fromkeys(a + b)))
    return tuple(out)


def _union_chain(node: exp.Expr) -> tuple[list[exp.Expr], bool]:
    """The parts of a UNION chain written without parentheses around it, and whether every UNION
    in it is UNION ALL."""
    if isinstance(node, exp.Union):
        left, left_all = _union_chain(node.this)
        right, right_all = _union_chain(node.expression)
        return left + right, left_all and right_all and not node.args.get("distinct")
    return [node], True


def _aggregates_and_windows(
    select: exp.Select, known: frozenset[str] | None, found: list[str]
) -> tuple[bool, bool]:
    """Whether the block aggregates or uses window functions. A function sqlglot does not know
    is an aggregate if it is a built-in one, a user-defined one (`known`), or any while `known` is
    None; the latter two go into `found`."""
    aggregates = window = False
    roots = list(select.expressions)
    for key in ("having", "order", "qualify"):
        if select.args.get(key) is not None:
            roots.append(select.args[key])
    stack = roots
    while stack:
        n = stack.pop()
        if isinstance(n, exp.Query):
            continue
        if isinstance(n, exp.Window):
            window = True
            stack.extend(v for k, v in n.args.items() if k != "this" and isinstance(v, exp.Expr))
            inner = n.this
            if isinstance(inner, exp.Expr):
                stack.extend(inner.iter_expressions())  # sum(count(*)) OVER (): count is an aggregate
            continue
        if isinstance(n, exp.AggFunc):
            aggregates = True
        elif isinstance(n, exp.Anonymous):
            name = n.name.lower()  # a quoted name too: lower-casing only adds refusals
            if name in POSTGRES_AGGREGATES_SQLGLOT_MISSES:
                aggregates = True
            elif known is None or name in known:
                aggregates = True
                if name not in found:
                    found.append(name)
        stack.extend(n.iter_expressions())
    return aggregates, window


# PostgreSQL's built-in aggregates that sqlglot reads as plain (anonymous) functions: missing one
# would let a read over several shards return one row per shard. User-defined aggregates come from
# the catalog (`ScopeWalker(aggregates=...)`, read by proxy/catalog.py).
POSTGRES_AGGREGATES_SQLGLOT_MISSES = frozenset(
    [
        "json_agg_strict",  # PostgreSQL 16
        "jsonb_agg_strict",
        "json_object_agg_unique_strict",
        "jsonb_object_agg_unique_strict",
        "json_arrayagg",
        "json_objectagg",
        "every",
        "bit_xor",
        "xmlagg",
        "json_object_agg",
        "jsonb_object_agg",
        "json_object_agg_strict",
        "json_object_agg_unique",
        "jsonb_object_agg_strict",
        "jsonb_object_agg_unique",
        "range_agg",
        "range_intersect_agg",
        "regr_avgx",
        "regr_avgy",
        "regr_count",
        "regr_intercept",
        "regr_r2",
        "regr_slope",
        "regr_sxx",
        "regr_sxy",
        "regr_syy",
        "covar_pop",
        "covar_samp",
        "corr",
        "var_pop",
        "var_samp",
        "variance",
        "stddev_pop",
        "stddev_samp",
        "stddev",
        "mode",
        "percentile_cont",
        "percentile_disc",
        "rank",
        "dense_rank",
        "percent_rank",
        "cume_dist",
        "string_agg",
        "array_agg",
        "json_agg",
        "jsonb_agg",
        "bool_and",
        "bool_or",
        "bit_and",
        "bit_or",
        "count",
        "sum",
        "avg",
        "min",
        "max",
    ]
)
