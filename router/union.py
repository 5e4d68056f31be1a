"""UNION [ALL] whose parts route on their own (issue 4: "UNION ALL of routed parts").

The parts of a top-level UNION chain never meet row by row, so they need not be co-located: each
part is routed by its own keys (`router.compile` builds one program per part) and the answers meet:
- every part on one shard (its keys, the default shard, or any shard for an omnisharded table or a
  constant): the statement runs there as written;
- every part reads its rows from sharded tables: the statement runs on the shards the parts need,
  each shard returning its own rows of each part, and the fan-out read merges them (ORDER BY, LIMIT,
  UNION's deduplication) or concatenates them. The same for UNION (without ALL) when the other parts
  read only omnisharded tables or constants: a copy per shard is removed by the deduplication;
- otherwise (a part of the default shard or of an omnisharded table next to sharded parts on other
  shards) a UNION ALL with nothing over the whole runs part by part: each shard runs the parts it
  must, cut from the client's text (`Route.parts`, answered by `proxy.union_read`, in the simple and
  the extended protocol: a Bind's parts keep the client's `$n`);
- anything else is refused with 0A000 naming it (DESIGN.md, principle 4).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from parser.dml import split_union
from parser.plan import StatementKind, StatementPlan
from router.route import Route
from router.route_plan import Program, Values
from router.topology import Topology


class Part(Enum):
    PARTITIONED = "partitioned"  # each row comes from one row of a sharded table
    REPLICATED = "replicated"  # omnisharded tables or no table: the same rows on every shard
    LOCAL = "local"  # tables of the default shard only
    MIXED = "mixed"  # anything else: correct on one shard only (its program refuses several)


_JOINED = "\nUNION ALL\n"  # newlines: a part may end in a -- comment


class UnionProgram(Program):
    """Routes a UNION chain from the routes of its parts."""

    __slots__ = ("_kinds", "_multi", "_plan", "_programs", "_routes", "_topology")

    def __init__(
        self,
        plan: StatementPlan,
        topology: Topology,
        parts: list[tuple[Part, Program]],
        routes: tuple[Route, ...],
        multi: Callable[[tuple[int, ...] | None, str | None], Route],
    ) -> None:
        self._plan, self._topology = plan, topology
        self._kinds = [kind for kind, _ in parts]
        self._programs = [program for _, program in parts]
        self._routes = routes  # single-shard routes, by shard
        self._multi = multi  # shards -> the whole statement on them (merge flags set); None -> error

    def route(self, values: Values, sql: str | bytes | None = None) -> Route:
        found: list[tuple[int, ...]] = []
        for program in self._programs:
            route = program.route(values, sql)
            if route.error is not None:
                return route
            found.append(route.shards)
        kinds = self._kinds
        fixed = {s for k, part in zip(kinds, found, strict=True) if k is not Part.REPLICATED for s in part}
        if len(fixed) <= 1:
            return self._routes[next(iter(fixed), self._topology.default_shard)]
        present = set(kinds)
        distinct = self._plan.merge.set_operation == "union"
        if present == {Part.PARTITIONED} or (distinct and present <= {Part.PARTITIONED, Part.REPLICATED}):
            return self._multi(tuple(sorted(fixed)), None)
        problem = self._why_not_split()
        if problem is not None:
            return self._multi(None, problem)
        text = sql.decode("utf-8", "surrogateescape") if isinstance(sql, bytes) else sql or ""
        texts = split_union(text)
        if texts is None or len(texts) != len(kinds):
            what = "a UNION ALL over several shards whose parts pgshard cannot cut from its text"
            return self._multi(None, f"{what} is not supported")
        anywhere = min(fixed)
        per_shard: dict[int, list[str]] = {}
        for kind, shards, part in zip(kinds, found, texts, strict=True):
            for shard in (anywhere,) if kind is Part.REPLICATED else shards:
                per_shard.setdefault(shard, []).append(part)
        shards = tuple(sorted(per_shard))
        return Route(
            shards,
            StatementKind.SELECT,
            all_shards=len(shards) == self._topology.shard_count,
            reason="UNION ALL: each part where it routes",
            parts=tuple((s, _JOINED.join(per_shard[s])) for s in shards),
        )

    def _why_not_split(self) -> str | None:
        """Why the parts cannot run separately and be concatenated, or None."""
        plan = self._plan
        where = "parts on different shards, not all of them read from sharded tables"
        if not plan.union_split:
            if plan.merge.set_operation == "union":
                return f"UNION (without ALL) of {where}, is not supported"
            return (
                f"UNION ALL of {where}, with WITH, ORDER BY, LIMIT, OFFSET or UNION (without ALL) over "
                "several parts, is not supported"
            )
        if plan.kind is not StatementKind.SELECT or plan.explain:
            what = "EXPLAIN" if plan.explain else plan.leading
            return f"{what} of a UNION ALL of {where}, is not supported"
        return None
