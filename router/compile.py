"""Compile a statement plan into a route program, applying the routing rules once per shape.

The rules (DESIGN.md "Placement", "Rules for the corners"; Principle 4, never a wrong answer):
- key fixed -> that shard (an IN list -> its shards); reads of sharded tables without a fixed key
  -> all shards with merge flags; UPDATE/DELETE without key -> all shards, counts summed;
  INSERT -> each row by its key, split into one INSERT per shard when rows differ;
- tables not in the config live on the default shard only; omnisharded tables are read on any
  one shard (round-robin) and written on all;
- DDL on sharded or omnisharded tables and DDL of other objects -> all shards; DDL on tables not
  in the config -> the default shard; CREATE TABLE with the shard_key column -> all shards, and the
  table is sharded from then on;
- anything that would need rows of several shards at once in one place (a join not on the keys,
  a sharded table with a default-shard table elsewhere, an aggregate subquery over a sharded
  table, a user-defined aggregate) is refused with 0A000 naming the construct; so is a read over
  several shards whose rows do not each come from one sharded row (they would repeat or go missing);
- the parts of a top-level UNION route on their own (`router.union`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from parser.plan import RefKind, StatementKind, StatementPlan
from parser.plan import ValueRef as _ValueRef
from router.compile_objects import (
    all_shards_route,
    copy_program,
    ddl_program,
    default_route,
    round_robin,
    unparsed_program,
    utility_program,
)
from router.insert_program import compile_insert
from router.keys import usable
from router.route import FEATURE_NOT_SUPPORTED, Broadcast, Route, error_route
from router.route_plan import (
    Keyed,
    Program,
    SingleKey,
    Static,
    Unit,
    _Classes,
    colocated_groups,
    column_node,
    key_units,
    resolve_columns,
)
from router.topology import TableSharding, Topology
from router.union import Part, UnionProgram


def compile_plan(plan: StatementPlan, topology: Topology, param_types: tuple[int, ...] = ()) -> Program:
    kind = plan.kind
    if kind in (StatementKind.TRANSACTION, StatementKind.SET):
        return Static(Route((), kind, reason="session"))
    if plan.unparsed:
        return unparsed_program(plan, topology)
    if kind is StatementKind.DDL:
        program = ddl_program(plan, topology)
        return program if program is not None else compile_query(plan, topology, param_types)
    if kind is StatementKind.COPY and plan.copy is not None and plan.copy.table is not None:
        return copy_program(plan, topology)
    if kind is StatementKind.UTILITY and plan.leading not in ("DECLARE", "PREPARE"):
        return utility_program(plan, topology)
    if kind is StatementKind.INSERT and plan.insert is not None:
        shardings = resolve_columns(plan, topology)
        if shardings[plan.insert.table] is not None or topology.is_omnisharded(
            plan.tables[plan.insert.table].name
        ):
            return compile_insert(plan, topology, shardings, param_types)
    return compile_query(plan, topology, param_types)


def compile_query(plan: StatementPlan, topology: Topology, param_types: tuple[int, ...] = ()) -> Program:
    """SELECT, UPDATE, DELETE, MERGE, COPY (query), DECLARE/PREPARE, CREATE TABLE AS, and INSERT
    into a table of the default shard."""
    kind, write = plan.kind, plan.write
    tables = plan.tables
    shardings = resolve_columns(plan, topology)
    omni = [topology.is_omnisharded(t.name) and shardings[i] is None for i, t in enumerate(tables)]

    def refuse(message: str) -> Static:
        return Static(error_route(kind, FEATURE_NOT_SUPPORTED, message, write))

    target = plan.target
    if target is not None and target < len(tables):
        name = tables[target].name
        sharding = shardings[target]
        if sharding is not None and sharding.column in plan.assigned:
            return refuse(
                f'{kind.name} of shard key column "{sharding.column}" of sharded table "{name}" is not '
                "supported: DELETE the row and INSERT it with its new key"
            )
        if kind is StatementKind.OTHER and sharding is not None:
            return refuse(f'MERGE into sharded table "{name}" is not supported')
        if omni[target] and write:
            return _omnisharded_write(plan, topology, omni, name, refuse)
    for i in plan.nested_writes:
        if omni[i]:
            return refuse(
                f'a data-modifying WITH query on omnisharded table "{tables[i].name}" is not supported'
            )
    if plan.union_parts and not write and any(s is not None for s in shardings):
        union = _union_program(plan, topology, shardings, param_types)
        if union is not None:
            return union
    return _program(plan, topology, shardings, param_types, range(len(tables)))


def _program(
    plan: StatementPlan,
    topology: Topology,
    shardings: list[TableSharding | None],
    param_types: tuple[int, ...],
    occurrences: Iterable[int],
    scopes: frozenset[int] | None = None,
    root: int = 0,
) -> Program:
    """The program of the statement's table occurrences `occurrences`, whose query blocks are
    `scopes` (None: all) under block `root`: the whole statement, or one part of a UNION."""
    kind, write = plan.kind, plan.write
    tables = plan.tables
    chosen = list(occurrences)
    omni = {i for i in chosen if topology.is_omnisharded(tables[i].name) and shardings[i] is None}
    local = [i for i in chosen if shardings[i] is None and i not in omni]
    sharded = [i for i in chosen if shardings[i] is not None]

    def refuse(message: str) -> Static:
        return Static(error_route(kind, FEATURE_NOT_SUPPORTED, message, write))

    if not sharded:
        if local:
            return default_route(plan, topology, f"{tables[local[0]].name}: the default shard")
        if omni and not write and not plan.locks:
            return round_robin(plan, topology, "omnisharded tables only: one shard")
        return default_route(plan, topology, "no sharded table: the default shard")

    units = {i: _usable_unit(u, param_types) for i, u in key_units(plan, shardings).items()}
    groups = colocated_groups(plan, shardings, sharded)
    group_units: list[list[Unit] | None] = []
    for g in groups:
        members = [units[i] for i in g]
        group_units.append(None if any(u is None for u in members) else [u for u in members if u is not None])
    names = [tables[g[0]].name for g in groups]
    not_colocated = (
        f'joining sharded tables "{names[0]}" and "{names[-1]}" not on their shard keys needs rows of '
        "several shards at once, which is not supported"
    )
    default_only = None
    if local:
        default_only = (
            f'table "{tables[local[0]].name}" is not sharded and lives on shard {topology.default_shard} '
            f'only; it can be combined with sharded table "{names[0]}" only when the key fixes that shard'
        )
    single_only = _single_only(plan, topology, shardings, root, names[0])
    reducing, error = _reducing_checks(plan, topology, shardings, param_types, scopes)
    if error is not None:
        return refuse(error)

    reason = ", ".join(f"{tables[i].name}.{shardings[i].column}" for i in sharded[:3])  # type: ignore[union-attr]
    routes = tuple(Route((s,), kind, write, reason=f"key {reason}") for s in topology.all_shards)
    multi = _Multi(plan, topology, reason)
    keyed = Keyed(topology, group_units, routes, multi, default_only, single_only, not_colocated, reducing)
    if len(group_units) == 1 and not local and not reducing:
        only = group_units[0]
        if only is not None and len(only) == 1 and len(only[0].constraints) == 1:
            refs = only[0].constraints[0]
            if len(refs) == 1 and refs[0].kind in (RefKind.LITERAL, RefKind.PARAM) and not refs[0].array:
                return SingleKey(only[0], routes, keyed)
    return keyed


def _single_only(
    plan: StatementPlan, topology: Topology, shardings: list[TableSharding | None], root: int, name: str
) -> str | None:
    """Why the statement (or UNION part under `root`) may run on one shard only, or None."""
    if plan.user_aggregates:
        calls = ", ".join(f"{n}()" for n in plan.user_aggregates)
        if topology.user_aggregates is None:
            what = (
                f"{calls}, which may be a user-defined aggregate (pgshard could not read the catalog of "
                f"shard {topology.default_shard} yet),"
            )
        else:
            what = f"user-defined aggregate {calls}"
        return (
            f"{what} over several shards is not supported: pgshard cannot combine its partial results; "
            "fix the shard key in WHERE so that the query reads one shard, or add a /* pgshard: shard=N */ "
            "comment to run it on one shard"
        )
    if plan.set_operations:
        return f"{plan.set_operations[0].upper()} over sharded tables on several shards is not supported"
    if not plan.write and len(plan.row_sources) > root and not partitioned(plan, shardings, root):
        return (
            f'a query whose rows do not each come from a row of a sharded table (sharded table "{name}" is '
            "read only in a subquery or on the nullable side of an outer join) would repeat or lose rows "
            "over several shards, and is not supported; fix the shard key so that it reads one shard"
        )
    if plan.kind is StatementKind.UTILITY:
        return f"{plan.leading} of a query on several shards is not supported; fix the shard key"
    return None


def partitioned(
    plan: StatementPlan, shardings: list[TableSharding | None], block: int, output: bool = False
) -> bool:
    """Whether every row query block `block` reads (with `output`: returns) holds a row of a sharded
    table, so that over several shards each row comes once, from the shard of that row. A block
    that aggregates without GROUP BY returns a row even on a shard with none of its rows (for the
    statement's own block the merge combines those); a WITH RECURSIVE query that reads itself
    counts as not partitioned."""
    sources, ungrouped = plan.row_sources, plan.ungrouped
    visiting: set[int] = set()

    def block_ok(b: int, output: bool) -> bool:
        if b in visiting or b >= len(sources) or (output and b in ungrouped):
            return False
        visiting.add(b)
        try:
            return any(all(item_ok(i) for i in clause) for clause in sources[b])
        finally:
            visiting.discard(b)

    def item_ok(item: int) -> bool:
        return shardings[item] is not None if item >= 0 else block_ok(-1 - item, True)

    return block_ok(block, output)


def _union_program(
    plan: StatementPlan,
    topology: Topology,
    shardings: list[TableSharding | None],
    param_types: tuple[int, ...],
) -> Program | None:
    """One program per part of a top-level UNION (see `router.union`); None when a table is read
    outside every part (a WITH query no part names)."""
    parts: list[tuple[Part, Program]] = []
    covered: set[int] = set()
    for blocks in plan.union_parts:
        scopes = frozenset(blocks)
        chosen = [i for i, t in enumerate(plan.tables) if t.scope in scopes]
        covered.update(chosen)
        program = _program(plan, topology, shardings, param_types, chosen, scopes, blocks[0])
        local = any(shardings[i] is None and not topology.is_omnisharded(plan.tables[i].name) for i in chosen)
        if any(shardings[i] is not None for i in chosen):
            whole = partitioned(plan, shardings, blocks[0], output=True)
            part = Part.PARTITIONED if whole and not local else Part.MIXED
        else:
            part = Part.LOCAL if local else Part.REPLICATED
        parts.append((part, program))
    if len(covered) != len(plan.tables):
        return None
    routes = tuple(Route((s,), plan.kind, reason="UNION parts on one shard") for s in topology.all_shards)
    reason = ", ".join(
        f"{t.name}.{s.column}" for t, s in zip(plan.tables, shardings, strict=True) if s is not None
    )
    return UnionProgram(plan, topology, parts, routes, _Multi(plan, topology, reason))


class _Multi:
    """Routes on several shards, and the errors of a Keyed program (built on demand, cached)."""

    def __init__(self, plan: StatementPlan, topology: Topology, reason: str) -> None:
        self._plan, self._topology, self._reason = plan, topology, reason
        self._cache: dict[Any, Route] = {}

    def __call__(self, shards: tuple[int, ...] | None, error: str | None) -> Route:
        key = error if shards is None else shards
        route = self._cache.get(key)
        if route is None:
            plan = self._plan
            if shards is None:
                route = error_route(plan.kind, FEATURE_NOT_SUPPORTED, error or "", plan.write)
            else:
                every = len(shards) == self._topology.shard_count
                route = Route(
                    shards,
                    plan.kind,
                    plan.write,
                    all_shards=every,
                    reason=f"{'every shard' if every else 'shards of the keys'} ({self._reason})",
                    broadcast_kind=Broadcast.SUM if plan.write else None,
                    merge=None if plan.write or plan.explain else plan.merge,  # EXPLAIN: plans concatenated
                )
            if len(self._cache) < 256:
                self._cache[key] = route
        return route


def _omnisharded_write(
    plan: StatementPlan, topology: Topology, omni: list[bool], name: str, refuse: Any
) -> Program:
    others = [t.name for i, t in enumerate(plan.tables) if not omni[i]]
    if others:
        return refuse(
            f'a write to omnisharded table "{name}" that reads "{others[0]}" would differ between shards'
        )
    if plan.volatile:
        return refuse(
            f'writes to omnisharded table "{name}" with volatile function {plan.volatile[0]}() would '
            "differ between shards"
        )
    return all_shards_route(plan, topology, f"omnisharded {name}: every shard")


def _usable_unit(unit: Unit | None, param_types: tuple[int, ...]) -> Unit | None:
    if unit is None:
        return None
    kept = tuple(refs for refs in unit.constraints if all(_ok(r, unit.sharding, param_types) for r in refs))
    return Unit(unit.sharding, kept) if kept else None


def _ok(ref: _ValueRef, sharding: TableSharding, param_types: tuple[int, ...]) -> bool:
    return ref.kind in (RefKind.NULL, RefKind.IS_NULL) or usable(ref, sharding, param_types)


def _reducing_checks(
    plan: StatementPlan,
    topology: Topology,
    shardings: list[TableSharding | None],
    param_types: tuple[int, ...],
    scopes_of_part: frozenset[int] | None = None,
) -> tuple[list[tuple[Unit, str]], str | None]:
    """Subqueries that aggregate, limit or deduplicate over sharded rows are correct only if those
    rows are all on the one shard the statement runs on, or follow an outer row (correlation), or
    the subquery groups by the key. `scopes_of_part`: only the subqueries of these query blocks."""
    runtime: list[tuple[Unit, str]] = []
    if topology.shard_count == 1:
        return runtime, None
    for r in plan.reducing_scopes:
        if scopes_of_part is not None and r.scope not in scopes_of_part:
            continue
        inside = set(r.occurrences)
        scopes = frozenset(r.scopes)
        classes = _Classes()
        for e in plan.equalities:
            if e.scope in scopes:
                a, b = column_node(e.left, shardings), column_node(e.right, shardings)
                if a and b:
                    classes.union(a, b)
        internal = None
        for x in sorted(inside):
            sx = shardings[x]
            if sx is None:
                continue
            root = classes.find((x, sx.column))
            correlated = any(
                o not in inside
                and so is not None
                and so.colocation == sx.colocation
                and classes.find((o, so.column)) == root
                for o, so in enumerate(shardings)
            )
            grouped = r.grouped_only and any(column_node(g, shardings) == (x, sx.column) for g in r.group_by)
            if correlated or grouped:
                continue
            if internal is None:
                internal = key_units(plan, shardings, scopes)
            unit = _usable_unit(internal.get(x), param_types)
            message = (
                f"a subquery with an aggregate, LIMIT, DISTINCT or window over sharded table "
                f'"{plan.tables[x].name}" would see one shard\'s rows only; fix its shard key inside the '
                "subquery or correlate it with the outer query on the key"
            )
            if unit is None:
                return runtime, message
            runtime.append((unit, message))
    return runtime, None
