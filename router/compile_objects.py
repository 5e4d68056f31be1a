"""Routes of statements about whole tables and other objects: DDL, COPY, utilities, and
statements sqlglot could not parse. A table's home decides: every shard for sharded and
omnisharded tables and for objects that are not tables, the default shard for tables not in the
config; tables of different homes cannot be named in one statement.
"""

from __future__ import annotations

from typing import Any

from parser.ddl import table_list
from parser.plan import StatementPlan
from router.route import FEATURE_NOT_SUPPORTED, Broadcast, Route, error_route
from router.route_plan import Program, RoundRobin, Static
from router.topology import Topology

_MAINTENANCE = frozenset({"VACUUM", "ANALYZE", "ANALYSE", "CHECKPOINT", "REINDEX", "CLUSTER"})


def place(name: str, topology: Topology) -> str:
    if topology.is_omnisharded(name):
        return "omnisharded"
    return "sharded" if topology.sharding(name) is not None else "local"


def default_route(plan: StatementPlan, topology: Topology, reason: str) -> Static:
    return Static(Route((topology.default_shard,), plan.kind, plan.write, reason=reason))


def all_shards_route(plan: StatementPlan, topology: Topology, reason: str, write: bool = True) -> Static:
    broadcast = Broadcast.SAME if write else None
    return Static(
        Route(topology.all_shards, plan.kind, write, all_shards=True, reason=reason, broadcast_kind=broadcast)
    )


def by_placement(plan: StatementPlan, topology: Topology, names: tuple[str, ...], what: str) -> Program:
    """Statements about whole tables: a table's home decides; tables of different homes cannot
    be named together."""
    local = [n for n in names if place(n, topology) == "local"]
    spread = [n for n in names if n not in local]
    if spread and local:
        return Static(
            error_route(
                plan.kind,
                FEATURE_NOT_SUPPORTED,
                f'{what} names "{local[0]}", which lives on shard {topology.default_shard} only, '
                f'together with "{spread[0]}", which is on every shard: run it separately for each',
                plan.write,
            )
        )
    if spread:
        return all_shards_route(plan, topology, f"{what} on {', '.join(spread)}: every shard")
    return default_route(plan, topology, f"{what} on tables of the default shard")


def ddl_program(plan: StatementPlan, topology: Topology) -> Program | None:
    ddl = plan.ddl
    assert ddl is not None
    if ddl.object == "AGGREGATE" and ddl.name is not None:
        route = Route(
            topology.all_shards,
            plan.kind,
            True,
            all_shards=True,
            reason=f"{ddl.action} AGGREGATE {ddl.name}: every shard",
            broadcast_kind=Broadcast.SAME,
        )
        return _LearnAggregate(ddl.name, topology, route)
    if not ddl.table_ddl:
        return all_shards_route(plan, topology, f"{ddl.action} {ddl.object}: every shard")
    if ddl.temporary:
        return default_route(plan, topology, "temporary table: the default shard")
    if plan.target is not None and len(plan.tables) > len(ddl.tables):  # CREATE TABLE ... AS, SELECT INTO
        name = plan.tables[plan.target].name
        if place(name, topology) != "local":
            return Static(
                error_route(
                    plan.kind,
                    FEATURE_NOT_SUPPORTED,
                    f'CREATE TABLE "{name}" AS <query> for a sharded or omnisharded table is not '
                    "supported: create it, then INSERT the rows",
                    True,
                )
            )
        return None  # the query decides, with the new table on the default shard
    if ddl.action == "CREATE" and ddl.object == "TABLE" and ddl.tables:
        name = ddl.tables[0]
        sharding = topology.sharding(name)
        if sharding is not None and ddl.columns and sharding.column not in ddl.columns:
            return Static(
                error_route(
                    plan.kind,
                    FEATURE_NOT_SUPPORTED,
                    f'sharded table "{name}" must have its shard key column "{sharding.column}"',
                    True,
                )
            )
        key = topology.shard_key
        if key is not None and key in ddl.columns and not topology.is_configured(name):
            return _AutoShard(
                name,
                topology,
                Route(
                    topology.all_shards,
                    plan.kind,
                    True,
                    all_shards=True,
                    reason=f"new table {name} has {key}: every shard",
                    broadcast_kind=Broadcast.SAME,
                ),
            )
    if ddl.action in ("DROP", "TRUNCATE") and ddl.object == "TABLE" and _homes_differ(ddl.tables, topology):
        if ddl.if_exists:  # where a table is absent IF EXISTS makes it a no-op: every shard is exact
            return all_shards_route(plan, topology, "DROP TABLE IF EXISTS of tables of different homes")
        return _SplitByHome(plan, topology)
    return by_placement(plan, topology, ddl.tables, f"{ddl.action} {ddl.object}")


def _homes_differ(names: tuple[str, ...], topology: Topology) -> bool:
    local = [n for n in names if place(n, topology) == "local"]
    return bool(local) and len(local) < len(names)


class _SplitByHome(Program):
    """DROP TABLE or TRUNCATE naming tables of the default shard with tables on every shard (pgbench
    -i's `truncate pgbench_accounts, pgbench_branches, ...`): the default shard runs the statement as
    written, every other shard the same statement naming only the tables it holds."""

    __slots__ = ("_plan", "_topology")

    def __init__(self, plan: StatementPlan, topology: Topology) -> None:
        self._plan, self._topology = plan, topology

    def route(self, values: Any, sql: str | bytes | None = None) -> Route:
        plan, topology = self._plan, self._topology
        text = sql.decode("utf-8", "surrogateescape") if isinstance(sql, bytes) else sql or ""
        found = table_list(text) if not values.params else None
        if found is None:  # not plain text, or Bind parameters (a split has no way to carry them)
            tables = plan.ddl.tables if plan.ddl else ()
            return by_placement(plan, topology, tables, plan.leading).route(values)
        start, end, items = found
        spread = [item for item, name in items if place(name, topology) != "local"]
        other = text[:start] + ", ".join(spread) + text[end:]
        default = topology.default_shard
        split = tuple((s, text if s == default else other) for s in topology.all_shards)
        return Route(
            topology.all_shards,
            plan.kind,
            True,
            all_shards=True,
            split=split,
            broadcast_kind=Broadcast.SAME,
            reason=f"{plan.leading} of tables of different homes: split per shard",
        )


class _LearnAggregate(Program):
    """CREATE AGGREGATE (or ALTER AGGREGATE ... RENAME TO): from the next statement on, a read over
    several shards that calls it is refused rather than answered with one row per shard."""

    __slots__ = ("_name", "_route", "_topology")

    def __init__(self, name: str, topology: Topology, route: Route) -> None:
        self._name, self._topology, self._route = name, topology, route

    def route(self, values: Any, sql: str | bytes | None = None) -> Route:
        self._topology.learn_aggregate(self._name)
        return self._route


class _AutoShard(Program):
    """CREATE TABLE with the shard_key column: the table is sharded by it from now on."""

    __slots__ = ("_name", "_route", "_topology")

    def __init__(self, name: str, topology: Topology, route: Route) -> None:
        self._name, self._topology, self._route = name, topology, route

    def route(self, values: Any, sql: str | bytes | None = None) -> Route:
        self._topology.add_auto_sharded(self._name)
        return self._route


def copy_program(plan: StatementPlan, topology: Topology) -> Program:
    copy = plan.copy
    assert copy is not None and copy.table is not None
    home = place(copy.table, topology)
    if home == "local":
        return default_route(plan, topology, f"COPY {copy.table}: the default shard")
    if copy.direction == "from":
        if home == "sharded":
            sharding = topology.sharding(copy.table)
            assert sharding is not None
            return Static(
                Route(
                    topology.all_shards,
                    plan.kind,
                    True,
                    all_shards=True,
                    broadcast_kind=Broadcast.SUM,
                    reason=f"COPY FROM into sharded {copy.table}: rows split by {sharding.column}",
                )
            )
        return all_shards_route(plan, topology, f"COPY FROM into omnisharded {copy.table}: every shard")
    if home == "sharded":
        return Static(
            Route(
                topology.all_shards,
                plan.kind,
                False,
                all_shards=True,
                reason=f"COPY {copy.table} TO: every shard, concatenated",
            )
        )
    return round_robin(plan, topology, f"COPY {copy.table} TO: one shard")


def utility_program(plan: StatementPlan, topology: Topology) -> Program:
    if plan.explain:
        return default_route(plan, topology, "EXPLAIN: the default shard")
    if plan.tables:
        return by_placement(plan, topology, tuple(t.name for t in plan.tables), plan.leading)
    if plan.leading in _MAINTENANCE:
        return all_shards_route(plan, topology, f"{plan.leading}: every shard", write=False)
    return default_route(plan, topology, f"{plan.leading}: the default shard")


def unparsed_program(plan: StatementPlan, topology: Topology) -> Program:
    names = tuple(t.name for t in plan.tables)
    spread = [n for n in names if place(n, topology) != "local"]
    if not spread:
        return Static(
            Route(
                (topology.default_shard,),
                plan.kind,
                True,
                reason=f"not analysed ({plan.reason}); no sharded table: the default shard",
            )
        )
    return Static(
        error_route(
            plan.kind,
            FEATURE_NOT_SUPPORTED,
            f'pgshard cannot analyse this statement ({plan.reason}) and it names "{spread[0]}", '
            "which is not on one shard; add a /* pgshard: shard=N */ comment to route it",
            True,
        )
    )


def round_robin(plan: StatementPlan, topology: Topology, reason: str) -> Program:
    return RoundRobin(
        tuple(
            Route((s,), plan.kind, False, reason=reason, omnisharded_read=True) for s in topology.all_shards
        )
    )
