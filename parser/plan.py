"""What analysis learns about a statement, in a form that can be cached by fingerprint.

A `StatementPlan` depends on the statement's shape only: it names constants by their position in
the fingerprint's literal list (`ValueRef`), never by value, so one plan serves every statement
with the same fingerprint. It knows SQL, not topology: it records which columns of which table
occurrences are fixed to which values, and which columns are equated with each other; the router
decides which of those columns are shard keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class StatementKind(Enum):
    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    DDL = "ddl"
    COPY = "copy"
    TRANSACTION = "transaction"  # BEGIN, COMMIT, ROLLBACK, SAVEPOINT, PREPARE TRANSACTION, ...
    SET = "set"  # SET, RESET, SHOW, DISCARD
    UTILITY = "utility"  # VACUUM, ANALYZE, GRANT, LISTEN, PREPARE, EXECUTE, DECLARE, FETCH, DO, CALL, ...
    OTHER = "other"


class RefKind(Enum):
    LITERAL = "literal"  # index: position in the fingerprint's literal list
    PARAM = "param"  # index: the n of $n
    CONST = "const"  # value: a constant that is part of the fingerprint ($$dollar quoted$$)
    NULL = "null"  # `= NULL`: matches no row; a NULL in a VALUES row
    IS_NULL = "is_null"  # `IS NULL`: rows whose key is NULL


@dataclass(frozen=True, slots=True)
class ValueRef:
    """Where a shard-key value comes from, without the value itself."""

    kind: RefKind
    index: int = 0
    value: str | None = None
    negate: bool = False  # -<number literal>
    cast: str | None = None  # the type of an explicit cast: '42'::bigint, $1::int
    array: bool = False  # `= ANY($1)`: the value is an array of keys

    def __str__(self) -> str:
        if self.kind is RefKind.LITERAL:
            text = f"literal#{self.index}"
        elif self.kind is RefKind.PARAM:
            text = f"${self.index}"
        elif self.kind is RefKind.CONST:
            text = repr(self.value)
        else:
            text = self.kind.value
        text = f"-{text}" if self.negate else text
        text = f"ANY({text})" if self.array else text
        return f"{text}::{self.cast}" if self.cast else text


@dataclass(frozen=True, slots=True)
class TableRef:
    """One occurrence of a table in a statement (a self-join has two)."""

    name: str  # lower-cased unless quoted
    schema: str | None = None
    alias: str | None = None
    scope: int = 0  # the query block it appears in; 0 is the statement's own


@dataclass(frozen=True, slots=True)
class ColumnRef:
    """A column of a table occurrence. `table` is -1 for an unqualified column in a block with
    several tables: `candidates` are the occurrences it may belong to (without a catalog the
    parser cannot tell; the router knows which of them has a key column of that name)."""

    table: int
    column: str
    candidates: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Constraint:
    """`column = v` or `column IN (v1, v2, ...)`: every row of that occurrence that can reach the
    result has one of these values. Only conjuncts that hold for those rows are recorded (WHERE,
    inner-join ON, the nullable side of an outer join's ON)."""

    column: ColumnRef
    values: tuple[ValueRef, ...]
    scope: int = 0  # the query block whose condition it is


@dataclass(frozen=True, slots=True)
class Equality:
    """`left = right` between two columns. If `directed`, a value fixed on `left` fixes `right`
    but not the other way (an outer join's preserved side, a correlated subquery's outer column);
    either way the two columns hold equal values in every row pair that meets."""

    left: ColumnRef
    right: ColumnRef
    directed: bool = False
    colocate_only: bool = False  # FULL JOIN: rows that meet are equal, but no value flows
    scope: int = 0


@dataclass(frozen=True, slots=True)
class MergeFlags:
    """What a fan-out read needs from the merger (issue 4), for the statement's top query block."""

    order_by: bool = False
    limit: bool = False
    offset: bool = False
    aggregates: bool = False
    group_by: bool = False
    distinct: bool = False
    window: bool = False
    having: bool = False
    set_operation: str | None = None  # "union", "union all", "intersect", "except", ...

    @property
    def any(self) -> bool:
        return (
            self.order_by
            or self.limit
            or self.offset
            or self.aggregates
            or self.group_by
            or self.distinct
            or self.window
            or self.having
            or self.set_operation is not None
        )


NO_MERGE = MergeFlags()


@dataclass(frozen=True, slots=True)
class ReducingScope:
    """A nested query block that aggregates, groups, limits, windows or deduplicates: run over one
    shard's rows it answers differently than over all rows, unless its sharded rows are all on
    that shard (fixed by its own conditions or by a correlation to an outer row), or it groups by
    the shard key."""

    scope: int
    scopes: tuple[int, ...]  # the block and the blocks that feed it
    occurrences: tuple[int, ...]  # the table occurrences read by those blocks
    grouped_only: bool  # only GROUP BY / aggregates / HAVING (no LIMIT, DISTINCT, window)
    group_by: tuple[ColumnRef, ...] = ()


@dataclass(frozen=True, slots=True)
class RowSpans:
    """Character offsets of an INSERT's VALUES rows: text[:head] is everything before the first
    row, text[start:end] each row's parentheses, text[tail:] what follows the last row (ON
    CONFLICT, RETURNING). Offsets are those of the analysed text; `parser.insert.row_spans`
    recomputes them for another statement with the same fingerprint."""

    head: int
    rows: tuple[tuple[int, int], ...]
    tail: int


@dataclass(frozen=True, slots=True)
class InsertPlan:
    table: int  # the target occurrence
    columns: tuple[str, ...] | None  # None: no column list
    rows: tuple[tuple[ValueRef | None, ...], ...] = ()  # per VALUES row, per column; None: expression
    select: bool = False  # INSERT ... SELECT (or any source other than VALUES)
    default_values: bool = False
    spans: RowSpans | None = None
    conflict_assigns: tuple[str, ...] = ()  # ON CONFLICT DO UPDATE SET columns


@dataclass(frozen=True, slots=True)
class DdlPlan:
    action: str  # CREATE, ALTER, DROP, TRUNCATE, COMMENT, ...
    object: str  # TABLE, INDEX, VIEW, FUNCTION, ... (upper case)
    tables: tuple[str, ...] = ()  # the tables the statement is about
    table_ddl: bool = False  # about tables (their placement decides) rather than other objects
    columns: tuple[str, ...] = ()  # CREATE TABLE's column names
    temporary: bool = False
    name: str | None = None  # the aggregate a CREATE AGGREGATE (or ALTER AGGREGATE ... RENAME TO) makes
    if_exists: bool = False  # DROP ... IF EXISTS


@dataclass(frozen=True, slots=True)
class CopyPlan:
    table: str | None  # COPY t ... (None for COPY (query))
    columns: tuple[str, ...] | None
    direction: str  # "from" (into the table) or "to"


@dataclass(frozen=True, slots=True)
class StatementPlan:
    kind: StatementKind
    write: bool = False
    tables: tuple[TableRef, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    equalities: tuple[Equality, ...] = ()
    target: int | None = None  # the occurrence an INSERT/UPDATE/DELETE writes
    insert: InsertPlan | None = None
    assigned: tuple[str, ...] = ()  # UPDATE SET columns
    merge: MergeFlags = NO_MERGE
    scope_parents: tuple[int | None, ...] = ()  # per query block, its enclosing block
    reducing_scopes: tuple[ReducingScope, ...] = ()
    nested_writes: tuple[int, ...] = ()  # occurrences written by data-modifying WITH queries
    set_operations: tuple[str, ...] = ()  # INTERSECT / EXCEPT anywhere (not decomposable per shard)
    user_aggregates: tuple[str, ...] = ()
    """Functions the top query block calls as aggregates that only the catalog says are aggregates
    (user-defined, or any unknown function while the catalog has not been read): their partial
    results cannot be combined. In a nested block they make it a reducing scope instead."""
    row_sources: tuple[tuple[tuple[int, ...], ...], ...] = ()
    """Per query block, what each of its rows is made of, as clauses: every row holds a row of at
    least one item of every clause. An item is a table occurrence (>= 0) or a block b (-1 - b). A
    block whose rows each hold a row of a sharded table returns, over several shards, every row
    once; any other block (a sharded table only in a subquery or on the nullable side of an outer
    join) would repeat or lose rows."""
    ungrouped: tuple[int, ...] = ()
    """Blocks that aggregate without GROUP BY (or with grouping sets): they return a row even when
    they read none, so run where none of their rows are, they still answer."""
    union_parts: tuple[tuple[int, ...], ...] = ()
    """Per part of a top-level UNION [ALL] chain, its query block and every block whose rows flow
    into it (a part's own block first)."""
    union_split: bool = False
    """The top-level UNION chain can run part by part and be concatenated: every UNION in it is
    UNION ALL and nothing applies to the whole (WITH, ORDER BY, LIMIT, OFFSET)."""
    volatile: tuple[str, ...] = ()  # volatile functions called (now, random, nextval, ...)
    locks: bool = False  # SELECT ... FOR UPDATE/SHARE
    ddl: DdlPlan | None = None
    copy: CopyPlan | None = None
    explain: bool = False
    unparsed: bool = False  # sqlglot could not parse it: tables come from a regex
    leading: str = ""  # the first keyword, upper-case
    literal_count: int = 0
    cacheable: bool = True
    """False when the plan may depend on this statement's constant values rather than its shape
    (sqlglot read a constant differently from PostgreSQL's scanner, e.g. 1_000 or 0x1F)."""
    hints: tuple[str, ...] = field(default=(), compare=False)
    """Hints of the analysed text. Statements that differ only in hints share a fingerprint and so
    a cached plan: a router takes each statement's hints from its own fingerprint."""
    reason: str = ""  # why sqlglot failed, for unparsed plans
