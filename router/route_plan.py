"""Route programs: a statement plan compiled against a topology, run per statement.

Compiling does once per (fingerprint, topology version) all the work that does not depend on the
statement's values: which table occurrences are sharded, which of the plan's columns are their
keys, which constraints fix each key (through column equalities, with values flowing only where
`parser.scope` says they may), which sharded tables are co-located, and which statements can
never run correctly (refused with 0A000, DESIGN.md Principle 4). Running a program reads the key
values, hashes them and picks a prebuilt Route.

The rule for several tables: each group of co-located sharded tables needs the shards its fixed
keys name (all shards if any member's key is free); two groups can only meet on one shard, and a
table that is not configured (it lives on the default shard only) only on the default shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from parser.fingerprint import Literal, LiteralKind
from parser.plan import (
    ColumnRef,
    RefKind,
    StatementPlan,
    ValueRef,
)
from router.keys import NotAKey, binary_array, binary_key, literal_key, text_array, text_key
from router.placement import NoShardForKey
from router.route import Route
from router.topology import TableSharding, Topology

_CONVERSION_ERRORS = (ValueError, TypeError, IndexError, LookupError, UnicodeDecodeError)


ToUtf8 = Callable[[bytes], bytes]
"""Text in the client's encoding -> the UTF-8 the server stores (`proxy.pg_encoding`); raises ValueError."""


class Values:
    """The values one statement brings: its literals, or its Bind parameters and format codes.

    Text keys are hashed over the UTF-8 the server stores; a client in another client_encoding sends
    other bytes, so `params_to_utf8` / `literals_to_utf8` (None for UTF8 clients, the common case) say
    how the server converts them. Programs are cached across sessions: the encoding is an input here.
    """

    __slots__ = ("formats", "literals", "literals_to_utf8", "params", "params_to_utf8")

    def __init__(
        self,
        literals: Sequence[Literal],
        params: Sequence[bytes | None] = (),
        formats: Sequence[int] = (),
        params_to_utf8: ToUtf8 | None = None,
        literals_to_utf8: ToUtf8 | None = None,
    ) -> None:
        self.literals = literals
        self.params = params
        self.formats = formats
        self.params_to_utf8 = params_to_utf8
        self.literals_to_utf8 = literals_to_utf8

    def read(self, ref: ValueRef, sharding: TableSharding, insert: bool = False) -> list[Any]:
        """The key values a reference denotes (several for an array); None for SQL NULL.
        Raises ValueError/TypeError/IndexError if the value cannot be a key of this type."""
        kind = ref.kind
        if kind is RefKind.LITERAL:
            literal = self.literals[ref.index]
            if self.literals_to_utf8 is not None and sharding.family == "text":
                literal = Literal(literal.kind, self.literals_to_utf8(literal.value))
            if ref.array:
                return [
                    None if e is None else text_key(sharding, e, insert) for e in text_array(literal.value)
                ]
            return [literal_key(sharding, literal, ref.negate, insert)]
        if kind is RefKind.PARAM:
            raw = self.params[ref.index - 1]
            if raw is None:
                return [None]
            formats = self.formats
            fmt = (formats[0] if len(formats) == 1 else formats[ref.index - 1]) if formats else 0
            convert = self.params_to_utf8 if sharding.family == "text" else None
            if ref.array:
                if fmt:
                    elements = binary_array(raw)  # array_recv converts each element (textrecv)
                    if convert is not None:
                        elements = [None if e is None else convert(e) for e in elements]
                    return [None if e is None else binary_key(sharding, e) for e in elements]
                if convert is not None:  # the whole text first: a multibyte character may hold a '"'
                    raw = convert(raw)
                return [None if e is None else text_key(sharding, e, insert) for e in text_array(raw)]
            if convert is not None:  # textin and textrecv both convert from client_encoding
                raw = convert(raw)
            return [binary_key(sharding, raw) if fmt else text_key(sharding, raw, insert)]
        if kind is RefKind.CONST:
            raw_const = (ref.value or "").encode("utf-8")
            if ref.array:
                return [None if e is None else text_key(sharding, e, insert) for e in text_array(raw_const)]
            return [text_key(sharding, raw_const, insert)]
        return [None]


class Unit:
    """The constraints that fix one sharded occurrence's key, evaluated with its sharding."""

    __slots__ = ("constraints", "sharding")

    def __init__(self, sharding: TableSharding, constraints: tuple[tuple[ValueRef, ...], ...]) -> None:
        self.sharding = sharding
        self.constraints = constraints

    def shards(self, values: Values) -> set[int] | None:
        """The shards holding the rows the constraints admit; None: unknown (all shards)."""
        result: set[int] | None = None
        function = self.sharding.function
        for refs in self.constraints:
            found: set[int] = set()
            try:
                for ref in refs:
                    if ref.kind is RefKind.IS_NULL:
                        keys: list[Any] = [None]
                    elif ref.kind is RefKind.NULL:
                        continue  # `key = NULL` matches no row
                    else:
                        try:
                            keys = [k for k in values.read(ref, self.sharding) if k is not None]
                        except NotAKey:
                            continue
                    for key in keys:
                        try:
                            found.add(function.shard(key))
                        except NoShardForKey:
                            continue  # no row can hold this key
            except _CONVERSION_ERRORS:
                continue  # this condition tells nothing; the others may
            result = found if result is None else result & found
        return result


class Program:
    """A compiled route; `route` runs it for one statement's values."""

    __slots__ = ()

    def route(self, values: Values, sql: str | bytes | None = None) -> Route:
        raise NotImplementedError


class Static(Program):
    __slots__ = ("_route",)

    def __init__(self, route: Route) -> None:
        self._route = route

    def route(self, values: Values, sql: str | bytes | None = None) -> Route:
        return self._route


class RoundRobin(Program):
    """Reads of omnisharded tables only: any shard answers, so spread them."""

    __slots__ = ("_next", "_routes")

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = routes
        self._next = itertools.cycle(routes).__next__

    def route(self, values: Values, sql: str | bytes | None = None) -> Route:
        return self._next()


class SingleKey(Program):
    """The common case, kept fast: one sharded table, its key fixed by one value."""

    __slots__ = ("_fallback", "_function", "_int", "_literal", "_negate", "_ref", "_routes", "_sharding")

    def __init__(self, unit: Unit, routes: tuple[Route, ...], fallback: Program) -> None:
        self._sharding = unit.sharding
        self._function = unit.sharding.function.shard
        self._ref = ref = unit.constraints[0][0]
        self._literal = ref.index if ref.kind is RefKind.LITERAL and ref.cast is None else -1
        self._negate = ref.negate
        self._int = unit.sharding.family == "int"
        self._routes = routes
        self._fallback = fallback

    def route(self, values: Values, sql: str | bytes | None = None) -> Route:
        try:
            if self._literal >= 0 and values.literals_to_utf8 is None:
                literal = values.literals[self._literal]
                raw = literal.value
                key: Any
                if self._int and literal.kind is LiteralKind.NUMBER and raw.isdigit():
                    key = -int(raw) if self._negate else int(raw)
                else:
                    key = literal_key(self._sharding, literal, self._negate)
                return self._routes[self._function(key)]
            keys = values.read(self._ref, self._sharding)
            if len(keys) == 1 and keys[0] is not None:
                return self._routes[self._function(keys[0])]
        except (NoShardForKey, *_CONVERSION_ERRORS):
            pass
        return self._fallback.route(values, sql)


class Keyed(Program):
    """Reads, UPDATE and DELETE over sharded tables: shards from the fixed keys."""

    __slots__ = (
        "_default_only",
        "_groups",
        "_multi",
        "_not_colocated",
        "_reducing",
        "_routes",
        "_single_only",
        "_topology",
    )

    def __init__(
        self,
        topology: Topology,
        groups: list[list[Unit] | None],
        routes: tuple[Route, ...],
        multi: Any,
        default_only: str | None,
        single_only: str | None,
        not_colocated: str,
        reducing: list[tuple[Unit, str]],
    ) -> None:
        self._topology = topology
        self._groups = groups
        self._routes = routes
        self._multi = multi  # callable: shards -> Route
        self._default_only = default_only  # error message if the route must be the default shard
        self._single_only = single_only  # error message if the route must be one shard
        self._not_colocated = not_colocated
        self._reducing = reducing

    def route(self, values: Values, sql: str | bytes | None = None) -> Route:
        sets: list[set[int] | None] = []
        for group in self._groups:
            if group is None:
                sets.append(None)
                continue
            acc: set[int] | None = set()
            for unit in group:
                s = unit.shards(values)
                if s is None:
                    acc = None
                    break
                acc |= s  # type: ignore[operator]
            sets.append(acc)
        shards: set[int] | None
        if len(sets) == 1:
            shards = sets[0]
        else:
            needed = [s for s in sets if s is None or s]
            if not needed:
                shards = set()
            elif all(s is not None and len(s) == 1 and s == needed[0] for s in needed):
                shards = needed[0]
            else:
                return self._multi(None, self._not_colocated)
        topology = self._topology
        if shards is None:
            shards = set(topology.all_shards)
        elif not shards:
            shards = {topology.default_shard}  # no row can match: any shard answers alike
        if self._default_only is not None and shards != {topology.default_shard}:
            return self._multi(None, self._default_only)
        if len(shards) > 1 and self._single_only is not None:
            return self._multi(None, self._single_only)
        for unit, message in self._reducing:
            s = unit.shards(values)
            if s is None or len(s) > 1 or (s and s != shards):
                return self._multi(None, message)
        if len(shards) == 1:
            return self._routes[next(iter(shards))]
        return self._multi(tuple(sorted(shards)), None)


def resolve_columns(plan: StatementPlan, topology: Topology) -> list[TableSharding | None]:
    """The sharding of each table occurrence: configured, automatic (shard_key), or presumed
    because the statement fixes a column named shard_key on a table not configured otherwise."""
    out: list[TableSharding | None] = []
    for t in plan.tables:
        out.append(None if topology.is_omnisharded(t.name) else topology.sharding(t.name))
    key = topology.shard_key
    if key is None:
        return out
    refs: list[ColumnRef] = [c.column for c in plan.constraints]
    for e in plan.equalities:
        refs += [e.left, e.right]
    for ref in refs:
        if ref.column != key:
            continue
        occurrence = ref.table
        if occurrence < 0:
            keyed = [c for c in ref.candidates if out[c] is not None and out[c].column == key]  # type: ignore[union-attr]
            free = [
                c
                for c in ref.candidates
                if out[c] is None and not topology.is_configured(plan.tables[c].name)
            ]
            occurrence = -1 if keyed or len(free) != 1 else free[0]
        if (
            occurrence >= 0
            and out[occurrence] is None
            and not topology.is_configured(plan.tables[occurrence].name)
        ):
            out[occurrence] = topology.shard_key_sharding(plan.tables[occurrence].name)
    return out


def column_node(ref: ColumnRef, shardings: list[TableSharding | None]) -> tuple[int, str] | None:
    """(occurrence, column) for a column reference, resolving an unqualified column to the one
    candidate whose shard key has that name (or the only candidate)."""
    if ref.table >= 0:
        return ref.table, ref.column
    keyed = [c for c in ref.candidates if shardings[c] is not None and shardings[c].column == ref.column]  # type: ignore[union-attr]
    if len(keyed) == 1:
        return keyed[0], ref.column
    if not keyed and len(ref.candidates) == 1:
        return ref.candidates[0], ref.column
    return None


class _Classes:
    """Union-find over columns."""

    def __init__(self) -> None:
        self.parent: dict[tuple[int, str], tuple[int, str]] = {}

    def find(self, node: tuple[int, str]) -> tuple[int, str]:
        parent = self.parent
        root = node
        while parent.get(root, root) != root:
            root = parent[root]
        while node != root:
            node, parent[node] = parent.get(node, node), root
        return root

    def union(self, a: tuple[int, str], b: tuple[int, str]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


def key_units(
    plan: StatementPlan, shardings: list[TableSharding | None], scopes: frozenset[int] | None = None
) -> dict[int, Unit | None]:
    """For each sharded occurrence, the Unit fixing its key (None: its key is free). With `scopes`,
    only conditions of those query blocks count."""
    values = _Classes()
    for e in plan.equalities:
        if e.directed or e.colocate_only or (scopes is not None and e.scope not in scopes):
            continue
        a, b = column_node(e.left, shardings), column_node(e.right, shardings)
        if a and b:
            values.union(a, b)
    pins: dict[tuple[int, str], list[tuple[ValueRef, ...]]] = {}
    for c in plan.constraints:
        if scopes is not None and c.scope not in scopes:
            continue
        node = column_node(c.column, shardings)
        if node is not None:
            pins.setdefault(values.find(node), []).append(c.values)
    directed = []
    for e in plan.equalities:
        if e.directed and (scopes is None or e.scope in scopes):
            a, b = column_node(e.left, shardings), column_node(e.right, shardings)
            if a and b:
                directed.append((values.find(a), values.find(b)))
    changed = True
    while changed:  # values flow along directed equalities until nothing changes
        changed = False
        for source, target in directed:
            for refs in pins.get(source, []):
                if refs not in pins.setdefault(target, []):
                    pins[target].append(refs)
                    changed = True
    units: dict[int, Unit | None] = {}
    for i, sharding in enumerate(shardings):
        if sharding is None:
            continue
        found = pins.get(values.find((i, sharding.column)))
        units[i] = Unit(sharding, tuple(found)) if found else None
    return units


def colocated_groups(
    plan: StatementPlan, shardings: list[TableSharding | None], occurrences: Sequence[int]
) -> list[list[int]]:
    """Partition sharded occurrences into groups whose rows meet only on equal keys."""
    classes = _Classes()
    for e in plan.equalities:
        a, b = column_node(e.left, shardings), column_node(e.right, shardings)
        if a and b:
            classes.union(a, b)
    groups: dict[Any, list[int]] = {}
    for i in occurrences:
        sharding = shardings[i]
        if sharding is None:
            continue
        root = classes.find((i, sharding.column))
        groups.setdefault((root, sharding.colocation), []).append(i)
    return list(groups.values())
