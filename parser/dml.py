"""INSERT, UPDATE and DELETE: the table written, what fixes its shard key, and for INSERT the key
value of every VALUES row.

A multi-row INSERT whose rows belong on different shards is split by slicing the client's text
into one INSERT per shard (`row_spans`), never by re-rendering it through sqlglot, which would
change column names and spellings (DESIGN.md, "Parsing and rewriting"). The parts of a UNION ALL
that run on different shards are cut from the text the same way (`split_union`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sqlglot import exp

from parser.conditions import Block, identifier_name
from parser.plan import InsertPlan, RowSpans, ValueRef
from parser.scope import ScopeWalker


@dataclass(slots=True)
class DmlResult:
    block: Block
    target: int | None
    assigned: tuple[str, ...] = ()
    insert: InsertPlan | None = None


def walk_dml(
    walker: ScopeWalker,
    node: exp.Expr,
    parent: Block | None,
    ctes: Mapping[str, int],
    top: bool = False,
) -> DmlResult:
    """Walk an INSERT, UPDATE or DELETE (the statement itself, or a data-modifying WITH query)."""
    block = walker.new_block(parent, ctes)
    block.ctes = walker.with_clause(node, block, ctes)
    if isinstance(node, exp.Insert):
        result = _insert(walker, node, block)
    elif isinstance(node, exp.Update):
        result = _update(walker, node, block)
    elif isinstance(node, exp.Delete):
        result = _delete(walker, node, block)
    else:
        walker.nested(node, block)
        result = DmlResult(block, None)
    returning = node.args.get("returning")
    if isinstance(returning, exp.Expr):
        walker.nested(returning, block)
    if not top and result.target is not None:
        walker.nested_writes.append(result.target)
    return result


def _target(walker: ScopeWalker, node: exp.Expr, block: Block) -> int | None:
    return walker.add_table(node, block) if isinstance(node, exp.Table) else None


def _insert(walker: ScopeWalker, node: exp.Insert, block: Block) -> DmlResult:
    this = node.this
    columns: tuple[str, ...] | None = None
    if isinstance(this, exp.Schema):
        names = [identifier_name(c) for c in this.expressions]
        columns = tuple(n for n in names if n is not None)
        this = this.this
    target = _target(walker, this, block)
    source = node.args.get("expression")
    rows: list[tuple[ValueRef | None, ...]] = []
    select = False
    if isinstance(source, exp.Values):
        for row in source.expressions:
            cells = row.expressions if isinstance(row, exp.Tuple) else [row]
            rows.append(tuple(walker.values.ref(c) for c in cells))
            walker.nested(row, block)
    elif isinstance(source, exp.Expr):
        select = True
        block.children.append(walker.query(source, block, block.ctes))
    conflict_assigns: tuple[str, ...] = ()
    conflict = node.args.get("conflict")
    if isinstance(conflict, exp.OnConflict):
        conflict_assigns = _assigned(conflict.expressions)
        walker.nested(conflict, block)
    plan = InsertPlan(
        table=target if target is not None else -1,
        columns=columns,
        rows=tuple(rows),
        select=select,
        default_values=source is None,
        conflict_assigns=conflict_assigns,
    )
    return DmlResult(block, target, conflict_assigns, plan)


def _update(walker: ScopeWalker, node: exp.Update, block: Block) -> DmlResult:
    target = _target(walker, node.this, block)
    from_ = node.args.get("from_")
    if isinstance(from_, exp.From):
        left = walker.from_item(from_.this, block)
        walker.joins(node.args.get("joins") or [], block, left)
    for assignment in node.expressions:
        walker.nested(assignment, block)
    _where(walker, node, block)
    return DmlResult(block, target, _assigned(node.expressions))


def _delete(walker: ScopeWalker, node: exp.Delete, block: Block) -> DmlResult:
    target = _target(walker, node.this, block)
    for item in node.args.get("using") or []:
        walker.from_item(item, block)
    _where(walker, node, block)
    return DmlResult(block, target)


def _where(walker: ScopeWalker, node: exp.Expr, block: Block) -> None:
    where = node.args.get("where")
    if isinstance(where, exp.Where):
        walker.nested(where, block)
        walker.conjuncts(where.this, block, frozenset())


def _assigned(assignments: list[exp.Expr]) -> tuple[str, ...]:
    names = []
    for a in assignments:
        if isinstance(a, exp.EQ):
            target = a.this
            if isinstance(target, exp.Column):
                name = identifier_name(target.args.get("this"))
                if name:
                    names.append(name)
            elif isinstance(target, exp.Tuple):  # SET (a, b) = (...)
                for c in target.expressions:
                    name = identifier_name(c.args.get("this")) if isinstance(c, exp.Column) else None
                    if name:
                        names.append(name)
    return tuple(names)


# --- VALUES rows in the client's text --------------------------------------------------------

# Tokens of PostgreSQL's scanner that can hide parentheses and commas, plus the ones that matter.
_ROW_TOKENS = re.compile(
    r"""--[^\n]*|/\*(?:[^*/]|\*(?!/)|/(?!\*)|/\*(?:[^*]|\*(?!/))*\*/)*\*/
    |(?<![A-Za-z0-9_$\u0080-\U0010ffff])[eE]'(?:[^'\\]|\\.|'')*'
    |'(?:[^']|'')*'|"(?:[^"]|"")*"
    |\$(?P<tag>(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?)\$(?s:.*?)\$(?P=tag)\$
    |[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*|[(),;]|\S""",
    re.VERBOSE | re.DOTALL,
)


def row_spans(sql: str) -> RowSpans | None:
    """Where the rows of `INSERT ... VALUES (...), (...)` are: the first top-level VALUES after
    the top-level INSERT, then parenthesised rows separated by commas. None if the text does not
    have that shape (then the statement cannot be split)."""
    depth = 0
    seen_insert = False
    rows: list[tuple[int, int]] = []
    state = "search"  # search -> row (expect "(") -> inrow -> after (expect "," or end)
    head = row_start = 0
    for m in _ROW_TOKENS.finditer(sql):
        token = m.group()
        if token.startswith(("--", "/*")):
            continue
        if state == "search":
            if token == "(":
                depth += 1
            elif token == ")":
                depth -= 1
            elif depth == 0 and token.upper() == "INSERT":
                seen_insert = True
            elif depth == 0 and seen_insert and token.upper() == "VALUES":
                head, state = m.end(), "row"
        elif state == "row":
            if token != "(":
                return None
            row_start, depth, state = m.start(), 1, "inrow"
        elif state == "inrow":
            if token == "(":
                depth += 1
            elif token == ")":
                depth -= 1
                if depth == 0:
                    rows.append((row_start, m.end()))
                    state = "after"
        elif token == ",":
            state = "row"
        else:
            return RowSpans(head, tuple(rows), rows[-1][1])
    if state == "after":
        return RowSpans(head, tuple(rows), rows[-1][1])
    return None


def closing_paren(sql: str, open_paren: int) -> int | None:
    """The offset of the parenthesis closing the one at `open_paren`, skipping strings and
    comments; None if it is not closed."""
    depth = 0
    for m in _ROW_TOKENS.finditer(sql, open_paren):
        token = m.group()
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def split_union(sql: str) -> list[str] | None:
    """The parts of a top-level UNION [ALL] chain as the client wrote them (a UNION ALL run part by
    part, `router.union`); None if the text has a top-level INTERSECT or EXCEPT, or no UNION."""
    depth = 0
    parts: list[str] = []
    start = 0
    skip_quantifier = False
    end = len(sql)
    for m in _ROW_TOKENS.finditer(sql):
        token = m.group()
        if token.startswith(("--", "/*")):
            continue
        word = token.upper()
        if skip_quantifier:
            skip_quantifier = False
            if word in ("ALL", "DISTINCT"):
                start = m.end()
                continue
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0 and word in ("INTERSECT", "EXCEPT"):
            return None
        elif depth == 0 and word == "UNION":
            parts.append(sql[start : m.start()].strip())
            start, skip_quantifier = m.end(), True
        elif depth == 0 and token == ";":
            end = m.start()
            break
    if not parts:
        return None
    parts.append(sql[start:end].strip())
    return parts if all(parts) else None


def split_insert(sql: str, spans: RowSpans, rows: list[int]) -> str:
    """The INSERT with only the given rows (indices into spans.rows), cut from the client's text."""
    body = ", ".join(sql[spans.rows[i][0] : spans.rows[i][1]] for i in rows)
    return f"{sql[: spans.head].rstrip()} {body}{sql[spans.tail :]}"
