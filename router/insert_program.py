"""INSERT into sharded and omnisharded tables: each VALUES row goes where its key belongs.

A multi-row INSERT whose rows land on several shards becomes one INSERT per shard, cut from
the client's own text (`parser.dml.split_insert`), so column names, spellings and casts are the
client's. With Bind parameters the pieces would no longer number their parameters $1..$n, so a
split is refused there (send one row per statement, or the simple protocol).
"""

from __future__ import annotations

from parser.dml import row_spans, split_insert
from parser.plan import StatementKind, StatementPlan, ValueRef
from proxy.pg_encoding import EncodingError
from router.keys import usable
from router.placement import NoShardForKey
from router.route import FEATURE_NOT_SUPPORTED, Broadcast, Route, error_route
from router.route_plan import Program, Static, Values
from router.topology import TableSharding, Topology

_KIND = StatementKind.INSERT


def compile_insert(
    plan: StatementPlan,
    topology: Topology,
    shardings: list[TableSharding | None],
    param_types: tuple[int, ...],
) -> Program:
    insert = plan.insert
    assert insert is not None
    name = plan.tables[insert.table].name
    others = [
        t.name for i, t in enumerate(plan.tables) if i != insert.table and not topology.is_omnisharded(t.name)
    ]

    def refuse(message: str, sqlstate: str = FEATURE_NOT_SUPPORTED) -> Static:
        return Static(error_route(_KIND, sqlstate, message, True))

    sharding = shardings[insert.table]
    if sharding is None:  # omnisharded: every copy gets the same rows
        if others:
            return refuse(
                f'INSERT into omnisharded table "{name}" reading "{others[0]}" would differ between shards'
            )
        if plan.volatile:
            return refuse(
                f'writes to omnisharded table "{name}" with volatile function {plan.volatile[0]}() '
                "would differ between shards"
            )
        return Static(
            Route(
                topology.all_shards,
                _KIND,
                True,
                all_shards=True,
                broadcast_kind=Broadcast.SAME,
                reason=f"omnisharded {name}: every shard",
            )
        )
    key = sharding.column
    if key in insert.conflict_assigns:
        return refuse(
            f'ON CONFLICT DO UPDATE of shard key column "{key}" of sharded table "{name}" is not supported'
        )
    if insert.select:
        return refuse(
            f'INSERT ... SELECT into sharded table "{name}" is not supported: insert the rows with VALUES'
        )
    if insert.columns is None or key not in insert.columns:
        return refuse(f'INSERT into sharded table "{name}" must name its shard key column "{key}"')
    if others:
        return refuse(
            f'INSERT into sharded table "{name}" with a subquery over "{others[0]}" is not supported'
        )
    position = insert.columns.index(key)
    refs: list[ValueRef] = []
    for n, row in enumerate(insert.rows, 1):
        ref = row[position] if position < len(row) else None
        if ref is None or ref.array or not usable(ref, sharding, param_types):
            return refuse(
                f'the shard key "{key}" of sharded table "{name}" must be a constant or a parameter '
                f"of the key's type (row {n})"
            )
        refs.append(ref)
    routes = tuple(Route((s,), _KIND, True, reason=f"key {name}.{key}") for s in topology.all_shards)
    return InsertProgram(name, sharding, tuple(refs), routes, topology.shard_count)


class InsertProgram(Program):
    __slots__ = ("_count", "_name", "_refs", "_routes", "_sharding")

    def __init__(
        self,
        name: str,
        sharding: TableSharding,
        refs: tuple[ValueRef, ...],
        routes: tuple[Route, ...],
        shard_count: int,
    ) -> None:
        self._name = name
        self._sharding = sharding
        self._refs = refs
        self._routes = routes
        self._count = shard_count

    def route(self, values: Values, sql: str | bytes | None = None) -> Route:
        shard_of_row: list[int] = []
        sharding, column = self._sharding, self._sharding.column
        for ref in self._refs:
            try:
                key = values.read(ref, sharding, insert=True)[0]
            except EncodingError as e:  # the key's text cannot be converted as the server would
                return error_route(
                    _KIND, e.sqlstate, f'shard key "{column}" of "{self._name}": {e.message}', True
                )
            except (ValueError, TypeError, IndexError, LookupError) as e:
                return error_route(
                    _KIND, "22P02", f'invalid value for shard key "{column}" of "{self._name}": {e}', True
                )
            if key is None:
                return error_route(
                    _KIND,
                    "23502",
                    f'null value in shard key column "{column}" of sharded table "{self._name}"',
                    True,
                )
            try:
                shard_of_row.append(sharding.function.shard(key))
            except NoShardForKey as e:
                return error_route(
                    _KIND, NoShardForKey.sqlstate, f'{e} of sharded table "{self._name}"', True
                )
        first = shard_of_row[0]
        if all(s == first for s in shard_of_row):
            return self._routes[first]
        return self._split(values, sql, shard_of_row)

    def _split(self, values: Values, sql: str | bytes | None, shard_of_row: list[int]) -> Route:
        if values.params:
            return error_route(
                _KIND,
                FEATURE_NOT_SUPPORTED,
                f'a multi-row INSERT into "{self._name}" whose '
                "parameters place rows on different shards is not supported; send one row per "
                "statement",
                True,
            )
        text = sql.decode("utf-8", "surrogateescape") if isinstance(sql, bytes) else sql
        spans = row_spans(text) if text is not None else None
        if spans is None or len(spans.rows) != len(shard_of_row):
            return error_route(
                _KIND,
                FEATURE_NOT_SUPPORTED,
                f'a multi-row INSERT into "{self._name}" spanning shards could not be split',
                True,
            )
        rows_by_shard: dict[int, list[int]] = {}
        for row, shard in enumerate(shard_of_row):
            rows_by_shard.setdefault(shard, []).append(row)
        shards = tuple(sorted(rows_by_shard))
        split = tuple((s, split_insert(text, spans, rows_by_shard[s])) for s in shards)  # type: ignore[arg-type]
        return Route(
            shards,
            _KIND,
            True,
            all_shards=len(shards) == self._count,
            split=split,
            broadcast_kind=Broadcast.SUM,
            reason=f"rows of {self._name} split over {len(shards)} shards",
        )
