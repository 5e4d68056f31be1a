"""Conditions of a query block: which columns its WHERE and JOIN ... ON conjuncts fix to values,
and which they equate (see `parser.scope` for when a fact may be recorded)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from sqlglot import exp

from parser.plan import ColumnRef, Constraint, Equality, RefKind, ValueRef
from parser.values import ValueReader, as_array, unparen


def identifier_name(node: exp.Expr | None) -> str | None:
    """An identifier as PostgreSQL folds it: lower-cased unless quoted."""
    if not isinstance(node, exp.Identifier):
        return None
    name = str(node.this)
    return name if node.quoted else name.lower()


class Block:
    """One query block (SELECT, a set operation, a DML statement) while it is being walked."""

    __slots__ = ("children", "ctes", "id", "local", "names", "parent")

    def __init__(self, block_id: int, parent: Block | None, ctes: Mapping[str, int]) -> None:
        self.id = block_id
        self.parent = parent
        self.ctes = ctes  # visible WITH names -> the block of their body
        self.names: dict[str, int | None] = {}  # alias (or table name) -> occurrence; None: not a table
        self.local: list[int] = []  # occurrences read by this block directly
        self.children: list[int] = []  # blocks whose rows flow into this one


class ConditionCollector:
    """The conjunct-reading half of `parser.scope.ScopeWalker`."""

    constraints: list[Constraint]
    equalities: list[Equality]
    values: ValueReader
    _subqueries: dict[int, tuple[int, ColumnRef | None, bool]]

    def conjuncts(self, node: exp.Expr, block: Block, preserved: frozenset[int], full: bool = False) -> None:
        for c in _flatten_and(node):
            if isinstance(c, exp.EQ):
                left, right = unparen(c.this), unparen(c.expression)
                if isinstance(right, exp.Column) and not isinstance(left, exp.Column):
                    left, right = right, left
                if not isinstance(left, exp.Column):
                    continue
                if isinstance(right, exp.Column):
                    a, b = self.column(left, block), self.column(right, block)
                    if a and b:
                        self._equality(a, b, block, preserved, full)
                elif isinstance(right, exp.Any):
                    self.any_condition(left, right.this, block, preserved)
                elif isinstance(right, exp.Subquery | exp.Select):
                    self.subquery_equality(left, right, block, preserved)
                else:
                    ref = self.values.ref(right)
                    if ref is not None:
                        self.pin(left, (ref,), block, preserved)
            elif isinstance(c, exp.In):
                column = unparen(c.this)
                if not isinstance(column, exp.Column):
                    continue
                query = c.args.get("query")
                if query is not None:
                    self.subquery_equality(column, query, block, preserved)
                    continue
                refs = [self.values.ref(v) for v in c.expressions]
                if refs and all(r is not None for r in refs):
                    self.pin(column, tuple(r for r in refs if r is not None), block, preserved)
            elif isinstance(c, exp.Is) and isinstance(c.expression, exp.Null):
                column = unparen(c.this)
                if isinstance(column, exp.Column):
                    self.pin(column, (ValueRef(RefKind.IS_NULL),), block, preserved)
            elif isinstance(c, exp.Or):
                self.disjunction(c, block, preserved)

    def disjunction(self, node: exp.Or, block: Block, preserved: frozenset[int]) -> None:
        """`k = 1 OR k = 2 OR k IN (3, 4)` fixes k to {1, 2, 3, 4}; any other disjunct, nothing."""
        column: exp.Column | None = None
        refs: list[ValueRef] = []
        for d in _flatten(node, exp.Or):
            if isinstance(d, exp.EQ):
                left, right = unparen(d.this), unparen(d.expression)
                if isinstance(right, exp.Column) and not isinstance(left, exp.Column):
                    left, right = right, left
                values = [right]
            elif isinstance(d, exp.In) and not d.args.get("query"):
                left, values = unparen(d.this), list(d.expressions)
            else:
                return
            if not isinstance(left, exp.Column) or (column is not None and left != column):
                return
            column = left
            for v in values:
                ref = self.values.ref(v)
                if ref is None:
                    return
                refs.append(ref)
        if column is not None:
            self.pin(column, tuple(refs), block, preserved)

    def any_condition(
        self, column: exp.Column, node: exp.Expr, block: Block, preserved: frozenset[int]
    ) -> None:
        node = unparen(node)
        if isinstance(node, exp.Array):
            refs = [self.values.ref(v) for v in node.expressions]
            if refs and all(r is not None for r in refs):
                self.pin(column, tuple(r for r in refs if r is not None), block, preserved)
        elif isinstance(node, exp.Subquery | exp.Select):
            self.subquery_equality(column, node, block, preserved)
        else:
            ref = self.values.ref(node)
            if ref is not None and ref.kind in (RefKind.PARAM, RefKind.LITERAL, RefKind.CONST):
                self.pin(column, (as_array(ref),), block, preserved)

    def subquery_equality(
        self, column: exp.Column, query: exp.Expr, block: Block, preserved: frozenset[int]
    ) -> None:
        """`k IN (SELECT c ...)`, `k = ANY(SELECT c ...)`, `k = (SELECT c ...)`: k equals some c.
        A value may flow into the subquery only if its result is row by row (no aggregate, limit,
        distinct): otherwise its rows depend on rows with other keys."""
        info = self._subqueries.get(id(query))
        outer = self.column(column, block)
        if info is None or outer is None or not outer[1]:
            return
        _, projection, reducing = info
        if projection is None or _is_preserved(outer[0], preserved):
            return
        if reducing:
            self.equalities.append(Equality(projection, outer[0], directed=True, scope=block.id))
        else:
            self.equalities.append(Equality(outer[0], projection, scope=block.id))

    def pin(
        self, column: exp.Column, refs: tuple[ValueRef, ...], block: Block, preserved: frozenset[int]
    ) -> None:
        resolved = self.column(column, block)
        if resolved is None or not resolved[1]:
            return  # an outer block's column: a subquery's condition does not fix it
        ref = resolved[0]
        if ref.table < 0:
            candidates = tuple(c for c in ref.candidates if c not in preserved)
            if not candidates:
                return
            ref = ColumnRef(-1, ref.column, candidates)
        elif ref.table in preserved:
            return
        self.constraints.append(Constraint(ref, refs, scope=block.id))

    def equality(
        self, a: ColumnRef, b: ColumnRef, block: Block, preserved: frozenset[int], full: bool
    ) -> None:
        self._equality((a, True), (b, True), block, preserved, full)

    def _equality(
        self,
        a: tuple[ColumnRef, bool],
        b: tuple[ColumnRef, bool],
        block: Block,
        preserved: frozenset[int],
        full: bool,
    ) -> None:
        (left, left_local), (right, right_local) = a, b
        if not left_local and not right_local:
            return
        if not left_local or not right_local:  # correlation: the outer value flows in
            outer, inner = (left, right) if right_local else (right, left)
            if not _is_preserved(inner, preserved) and not full:
                self.equalities.append(Equality(outer, inner, directed=True, scope=block.id))
            return
        if full:
            self.equalities.append(Equality(left, right, colocate_only=True, scope=block.id))
            return
        left_kept, right_kept = _is_preserved(left, preserved), _is_preserved(right, preserved)
        if left_kept and right_kept:
            return
        if left_kept or right_kept:
            if (left.table < 0 and left_kept) or (right.table < 0 and right_kept):
                return
            source, target = (left, right) if left_kept else (right, left)
            self.equalities.append(Equality(source, target, directed=True, scope=block.id))
        else:
            self.equalities.append(Equality(left, right, scope=block.id))

    def column(self, node: exp.Expr, block: Block) -> tuple[ColumnRef, bool] | None:
        """(column, whether it belongs to `block` itself) or None if it names no known table."""
        if not isinstance(node, exp.Column) or not isinstance(node.args.get("this"), exp.Identifier):
            return None
        name = identifier_name(node.args["this"])
        assert name is not None
        qualifier = identifier_name(node.args.get("table"))
        if qualifier is None:
            if len(block.local) == 1:
                return ColumnRef(block.local[0], name), True
            if block.local:
                return ColumnRef(-1, name, tuple(block.local)), True
            return None
        current: Block | None = block
        while current is not None:
            if qualifier in current.names:
                occurrence = current.names[qualifier]
                if occurrence is None:
                    return None
                return ColumnRef(occurrence, name), current is block
            current = current.parent
        return None


def _is_preserved(ref: ColumnRef, preserved: frozenset[int]) -> bool:
    if ref.table >= 0:
        return ref.table in preserved
    return any(c in preserved for c in ref.candidates)


def _flatten(node: exp.Expr, kind: type[exp.Expr]) -> Iterator[exp.Expr]:
    stack = [node]
    while stack:
        n = unparen(stack.pop())
        if isinstance(n, kind):
            stack.append(n.expression)
            stack.append(n.this)
        else:
            yield n


def _flatten_and(node: exp.Expr) -> Iterator[exp.Expr]:
    return _flatten(node, exp.And)
