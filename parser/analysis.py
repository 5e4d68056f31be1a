"""Full analysis of one statement into a cacheable `StatementPlan`: run on route-cache misses only.

Transaction control, SET and utility statements are classified by their leading keywords, which
is exact and cheap; sqlglot (postgres dialect, ~80 us a parse with sqlglotc) reads queries and
DML, where it is good (DESIGN.md, "Parsing and rewriting"). Constants are tied to the
fingerprint's literal list by their offset in the text, and both scanners must agree on the
constant found there, so a plan built from one statement is valid for every statement with the
same fingerprint. What sqlglot cannot parse becomes an `unparsed` plan carrying the table names a
regex finds: the router then follows hints or those tables, or refuses; it never guesses.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import SqlglotError

from parser.ddl import analyse_ddl, split_name, tables_by_regex, utility_tables
from parser.dml import closing_paren, row_spans, walk_dml
from parser.fingerprint import Literal, LiteralKind, display, literal_spans
from parser.plan import (
    ColumnRef,
    Constraint,
    CopyPlan,
    DdlPlan,
    InsertPlan,
    StatementKind,
    StatementPlan,
    TableRef,
)
from parser.scope import ScopeWalker
from parser.statements import leading_words

_POSTGRES = Dialect.get_or_raise("postgres")  # looked up once: by name it costs ~20 us a call
_TRANSACTION = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"})
_SET = frozenset({"SET", "RESET", "SHOW", "DISCARD"})
_UTILITY = frozenset({
    "VACUUM", "ANALYZE", "ANALYSE", "CLUSTER", "REINDEX", "CHECKPOINT", "LISTEN", "UNLISTEN", "NOTIFY",
    "PREPARE", "EXECUTE", "DEALLOCATE", "DECLARE", "FETCH", "MOVE", "CLOSE", "DO", "CALL", "LOCK", "LOAD",
    "GRANT", "REVOKE", "REFRESH", "SECURITY", "REASSIGN", "IMPORT",
})  # fmt: skip
_DDL = frozenset({"CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT"})
_QUERY = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "INSERT", "UPDATE", "DELETE", "MERGE", ""})

_EXPLAIN = re.compile(
    r"\s*EXPLAIN\s*(?:\((?:[^()]|\([^()]*\))*\)\s*)?(?:(?:ANALYZE|ANALYSE|VERBOSE)\b\s*)*", re.IGNORECASE
)
_INNER_QUERY = re.compile(  # DECLARE c ... CURSOR ... FOR <query>, PREPARE p [(types)] AS <query>
    r"\s*(?:DECLARE\s+(?:\"(?:[^\"]|\"\")+\"|\w+)\s+[\w\s]*?CURSOR\s+(?:(?:WITH|WITHOUT)\s+HOLD\s+)?FOR"
    r"|PREPARE\s+(?:\"(?:[^\"]|\"\")+\"|\w+)\s*(?:\([^()]*\))?\s*AS)\s+",
    re.IGNORECASE,
)
_COPY = re.compile(
    r"\s*COPY\s+(?:(\()|(?:BINARY\s+)?((?:\"(?:[^\"]|\"\")+\"|[\w$]+)(?:\s*\.\s*(?:\"(?:[^\"]|\"\")+\"|[\w$]+))?)"
    r"\s*(\([^()]*\))?\s*(FROM|TO)\b)",
    re.IGNORECASE,
)
_PLAIN_NUMBER = re.compile(rb"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_VOLATILE = re.compile(
    r"\b(now|random|setseed|nextval|setval|currval|lastval|clock_timestamp|statement_timestamp|"
    r"transaction_timestamp|timeofday|gen_random_uuid|uuid_generate_v1|uuid_generate_v1mc|uuid_generate_v4|"
    r"txid_current|pg_current_xact_id)\s*\(|\b(current_timestamp|current_date|current_time|localtimestamp|"
    r"localtime)\b",
    re.IGNORECASE,
)


def analyse(sql: str, aggregates: frozenset[str] | None = frozenset()) -> StatementPlan:
    """The plan of one statement (a multi-statement string must be split first). `aggregates`: the
    database's user-defined aggregates, None while unknown (see `parser.scope.ScopeWalker`)."""
    plan = _analyse(sql, aggregates)
    if plan.cacheable and plan.unparsed and plan.literal_count:
        # sqlglot may have failed on a constant's spelling (0x1F, 1_000): do not let this
        # statement's failure stand for every statement of its shape
        fp, _ = literal_spans(sql)
        numbers = [lit.value for lit in fp.literals if lit.kind is LiteralKind.NUMBER]
        if any(not _PLAIN_NUMBER.fullmatch(n) for n in numbers):
            plan = replace(plan, cacheable=False)
    return plan


def _analyse(sql: str, aggregates: frozenset[str] | None) -> StatementPlan:
    fp, spans = literal_spans(sql)
    masked = display(fp.key).replace("'?'", "''")  # constants neutralised for keyword regexes
    literal_at = {s.start: (i, s.literal) for i, s in enumerate(spans)}
    hints = tuple(h.decode("utf-8", "replace") for h in fp.hints)
    first, second, _ = leading_words(masked)
    common: dict[str, Any] = {"literal_count": len(fp.literals), "hints": hints, "leading": first}

    if first in _TRANSACTION or (first == "PREPARE" and second == "TRANSACTION"):
        return StatementPlan(StatementKind.TRANSACTION, **common)
    if first in _SET:
        return StatementPlan(StatementKind.SET, **common)
    if first == "EXPLAIN":
        m = _EXPLAIN.match(sql)
        offset = m.end() if m else len(sql)
        inner = leading_words(sql[offset:])[0]
        if inner in _QUERY:
            plan = _query(sql, offset, literal_at, masked, aggregates=aggregates)
            return _replace(plan, explain=True, **common)
        return StatementPlan(StatementKind.UTILITY, explain=True, **common)
    if first in _DDL:
        return _ddl(sql, masked, literal_at, common, aggregates)
    if first == "COPY":
        return _copy(sql, masked, literal_at, common, aggregates)
    if first in _UTILITY:
        m = _INNER_QUERY.match(sql) if first in ("DECLARE", "PREPARE") else None
        if m:
            plan = _query(sql, m.end(), literal_at, masked, aggregates=aggregates)
            return _replace(plan, kind=StatementKind.UTILITY, **common)
        tables = utility_tables(first, masked)
        occurrences = tuple(TableRef(t) for t in tables)
        return StatementPlan(StatementKind.UTILITY, tables=occurrences, write=first == "LOCK", **common)
    if first in _QUERY:
        return _replace(_query(sql, 0, literal_at, masked, aggregates=aggregates), **common)
    return _unparsed(StatementKind.OTHER, masked, f"unknown statement {first}", common)


def _query(
    sql: str,
    offset: int,
    literal_at: dict[int, tuple[int, Literal]],
    masked: str,
    end: int | None = None,
    aggregates: frozenset[str] | None = frozenset(),
) -> StatementPlan:
    """Analyse a query or DML statement starting at `offset` with sqlglot."""
    try:
        tree = sqlglot.parse_one(sql[offset:end], dialect=_POSTGRES)
    except (SqlglotError, RecursionError, ValueError, KeyError, TypeError) as e:
        return _unparsed(StatementKind.OTHER, masked, f"sqlglot: {str(e).splitlines()[0][:200]}", {})
    if isinstance(tree, exp.Command) or tree is None:
        return _unparsed(StatementKind.OTHER, masked, "sqlglot read it as an opaque command", {})
    try:
        return _plan_of(tree, sql, offset, literal_at, masked, aggregates)
    except Exception as e:  # a tree shape the walker does not expect: refuse rather than guess
        return _unparsed(StatementKind.OTHER, masked, f"analysis failed: {type(e).__name__}: {e}"[:200], {})


def _plan_of(
    tree: exp.Expr,
    sql: str,
    offset: int,
    literal_at: dict[int, tuple[int, Literal]],
    masked: str,
    aggregates: frozenset[str] | None,
) -> StatementPlan:
    walker = ScopeWalker(literal_at, offset, aggregates)
    target: int | None = None
    assigned: tuple[str, ...] = ()
    insert: InsertPlan | None = None
    ddl: DdlPlan | None = None
    if isinstance(tree, exp.Insert | exp.Update | exp.Delete):
        kind = {exp.Insert: StatementKind.INSERT, exp.Update: StatementKind.UPDATE}.get(
            type(tree), StatementKind.DELETE
        )
        result = walk_dml(walker, tree, None, {}, top=True)
        target, assigned, insert = result.target, result.assigned, result.insert
        if insert is not None and insert.rows:
            spans = row_spans(sql[offset:])
            if spans is not None and len(spans.rows) == len(insert.rows):
                shifted = type(spans)(
                    spans.head + offset,
                    tuple((s + offset, e + offset) for s, e in spans.rows),
                    spans.tail + offset,
                )
                insert = InsertPlan(
                    insert.table,
                    insert.columns,
                    insert.rows,
                    insert.select,
                    insert.default_values,
                    shifted,
                    insert.conflict_assigns,
                )
    elif isinstance(tree, exp.Query | exp.Values):
        kind = StatementKind.SELECT
        walker.query(tree, None, {}, top=True)
        into = tree.args.get("into")
        if isinstance(into, exp.Into) and isinstance(into.this, exp.Table):  # SELECT ... INTO new_table
            name = split_name(into.this.sql(dialect=_POSTGRES))[1]
            kind = StatementKind.DDL
            ddl = DdlPlan("CREATE", "TABLE", (name,), True)
            target = len(walker.tables)
            walker.tables.append(TableRef(name))
    elif isinstance(tree, exp.Merge):
        kind = StatementKind.OTHER
        block = walker.new_block(None, {})
        if isinstance(tree.this, exp.Table):
            target = walker.add_table(tree.this, block)
        walker.nested(tree, block)
    else:
        return _unparsed(StatementKind.OTHER, masked, f"unexpected {type(tree).__name__}", {})
    write = (
        kind in (StatementKind.INSERT, StatementKind.UPDATE, StatementKind.DELETE)
        or bool(walker.nested_writes)
        or isinstance(tree, exp.Merge)
        or ddl is not None
    )
    return StatementPlan(
        kind=kind,
        write=write,
        tables=tuple(walker.tables),
        constraints=tuple(walker.constraints),
        equalities=tuple(walker.equalities),
        target=target,
        insert=insert,
        assigned=assigned,
        merge=walker.merge,
        scope_parents=tuple(walker.parents),
        reducing_scopes=tuple(walker.reducing),
        nested_writes=tuple(walker.nested_writes),
        set_operations=tuple(walker.set_operations),
        user_aggregates=tuple(walker.user_aggregates),
        row_sources=tuple(walker.row_sources),
        ungrouped=tuple(walker.ungrouped),
        union_parts=walker.union_parts,
        union_split=walker.union_split,
        volatile=_volatile(masked),
        locks=walker.locks,
        ddl=ddl,
        cacheable=not walker.values.mismatch,
    )


def _ddl(
    sql: str,
    masked: str,
    literal_at: dict[int, tuple[int, Literal]],
    common: dict[str, Any],
    aggregates: frozenset[str] | None,
) -> StatementPlan:
    ddl = analyse_ddl(masked)
    tables: tuple[TableRef, ...] = tuple(TableRef(t) for t in ddl.tables)
    plan = StatementPlan(
        StatementKind.DDL,
        write=True,
        tables=tables,
        ddl=ddl,
        target=0 if tables else None,
        volatile=_volatile(masked),
        **common,
    )
    if (
        ddl.action == "CREATE"
        and ddl.object in ("TABLE", "MATERIALIZED VIEW")
        and re.search(r"\bAS\s*\(?\s*(?:SELECT|WITH|VALUES|TABLE)\b", masked, re.IGNORECASE)
    ):
        # CREATE TABLE ... AS <query>: the query's tables decide as much as the new table's home
        source = _ctas_source(sql, literal_at, masked, aggregates)
        if source is not None:
            occurrences = tables + tuple(
                TableRef(t.name, t.schema, t.alias, t.scope + 1) for t in source.tables
            )
            return _replace(
                plan,
                tables=occurrences,
                constraints=_shift(source.constraints, len(tables)),
                equalities=_shift(source.equalities, len(tables)),
                reducing_scopes=(),
                set_operations=source.set_operations,
                user_aggregates=source.user_aggregates,
                unparsed=source.unparsed,
            )
    return plan


def _ctas_source(
    sql: str, literal_at: dict[int, tuple[int, Literal]], masked: str, aggregates: frozenset[str] | None
) -> StatementPlan | None:
    try:
        tree = sqlglot.parse_one(sql, dialect=_POSTGRES)
    except (SqlglotError, RecursionError, ValueError, KeyError, TypeError):
        return _unparsed(StatementKind.OTHER, masked, "", {})
    query = tree.args.get("expression") if isinstance(tree, exp.Create) else None
    if not isinstance(query, exp.Query):
        return _unparsed(StatementKind.OTHER, masked, "", {})
    walker = ScopeWalker(literal_at, 0, aggregates)
    walker.query(query, None, {}, top=True)
    return StatementPlan(
        StatementKind.SELECT,
        tables=tuple(walker.tables),
        constraints=tuple(walker.constraints),
        equalities=tuple(walker.equalities),
        set_operations=tuple(walker.set_operations),
        user_aggregates=tuple(walker.user_aggregates),
    )


def _shift(items: tuple[Any, ...], by: int) -> tuple[Any, ...]:
    """Renumber the occurrences of constraints or equalities after `by` occurrences were prepended."""

    def col(c: ColumnRef) -> ColumnRef:
        return ColumnRef(c.table + by if c.table >= 0 else -1, c.column, tuple(x + by for x in c.candidates))

    out = []
    for item in items:
        if isinstance(item, Constraint):
            out.append(replace(item, column=col(item.column)))
        else:
            out.append(replace(item, left=col(item.left), right=col(item.right)))
    return tuple(out)


def _copy(
    sql: str,
    masked: str,
    literal_at: dict[int, tuple[int, Literal]],
    common: dict[str, Any],
    aggregates: frozenset[str] | None,
) -> StatementPlan:
    m = _COPY.match(masked)
    if m is None:
        return _unparsed(StatementKind.COPY, masked, "COPY statement not understood", common)
    if m.group(1):  # COPY (query) TO ...
        start = re.match(r"\s*COPY\s*\(", sql, re.IGNORECASE)
        close = closing_paren(sql, start.end() - 1) if start else None
        inner = _query(sql, start.end(), literal_at, masked, close, aggregates) if start and close else None
        if inner is None or inner.unparsed:
            return _unparsed(StatementKind.COPY, masked, "COPY (query) not understood", common)
        return _replace(inner, kind=StatementKind.COPY, copy=CopyPlan(None, None, "to"), **common)
    table = split_name(m.group(2))[1]
    columns = None
    if m.group(3):
        columns = tuple(split_name(c)[1] for c in m.group(3)[1:-1].split(",") if c.strip())
    direction = m.group(4).lower()
    return StatementPlan(
        StatementKind.COPY,
        write=direction == "from",
        tables=(TableRef(table),),
        target=0,
        copy=CopyPlan(table, columns, direction),
        **common,
    )


def _unparsed(kind: StatementKind, masked: str, reason: str, common: dict[str, Any]) -> StatementPlan:
    tables = tuple(TableRef(t) for t in tables_by_regex(masked))
    return StatementPlan(
        kind, tables=tables, unparsed=True, reason=reason, volatile=_volatile(masked), **common
    )


def _volatile(masked: str) -> tuple[str, ...]:
    found: list[str] = []
    for m in _VOLATILE.finditer(masked):
        name = (m.group(1) or m.group(2)).lower()
        if name not in found:
            found.append(name)
    return tuple(found)


def _replace(plan: StatementPlan, **changes: Any) -> StatementPlan:
    return replace(plan, **changes)
