"""Topology: where each table of a logical database lives, built once from its configuration.

A table is sharded (by a configured function, or automatically by the database's `shard_key`
column), omnisharded (a full copy on every shard), or unconfigured (it lives on the default shard
only, DESIGN.md "Placement"). Sharding functions are built here once, not per query.
`version` changes whenever the placement of a table changes (a table found to carry the
shard_key column) or the set of user-defined aggregates does, so route programs compiled against an
older topology are recompiled (and statements re-analysed, when the aggregates changed).

User-defined aggregates (`user_aggregates`) are read from the default shard's catalog by the
janitor (`proxy.janitor.refresh_catalogs`) at start-up and every `general.catalog_refresh_interval`
seconds, and learned at once from CREATE AGGREGATE passing through pgshard. A read over several
shards calling one is refused: pgshard cannot combine partial states of an aggregate it does not
know. Until the catalog has been read once (the default shard was unreachable at start-up) the set
is None and every function sqlglot does not know counts as an aggregate: some reads are refused
that would have been fine, none is answered wrongly. Until the next read, an aggregate made behind
pgshard's back (or through another worker process) is not known: that window is
`catalog_refresh_interval`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from router.hashing import KeyType, key_type
from router.placement import HashSharding, ListSharding, RangeSharding, ShardingFunction

if TYPE_CHECKING:
    from proxy.config import Database

_FAMILIES = {
    "smallint": "int",
    "integer": "int",
    "bigint": "int",
    "text": "text",
    "character varying": "text",
    "uuid": "uuid",
}


@dataclass(frozen=True, slots=True, eq=False)
class TableSharding:
    """How one table is sharded: its key column, the key's type, and the sharding function."""

    table: str
    column: str
    data_type: str
    function: ShardingFunction = field(repr=False)
    key_type: KeyType = field(repr=False)
    family: str  # "int", "text" or "uuid": key types whose equal values hash alike
    colocation: tuple[Any, ...] = field(repr=False)
    """Tables with equal colocation tuples place equal keys on the same shard, so a join on their
    keys never leaves a shard."""


class Topology:
    """Placement of every table of one logical database."""

    def __init__(
        self,
        shard_count: int,
        *,
        default_shard: int = 0,
        virtual_shards: int = 1024,
        sharded: Iterable[TableSharding] = (),
        omnisharded: Iterable[str] = (),
        shard_key: str | None = None,
        shard_key_type: str = "bigint",
    ) -> None:
        if shard_count < 1:
            raise ValueError(f"shard_count must be positive, got {shard_count}")
        if not 0 <= default_shard < shard_count:
            raise ValueError(f"default_shard {default_shard} is not one of the {shard_count} shards")
        self.shard_count = shard_count
        self.default_shard = default_shard
        self.virtual_shards = virtual_shards
        self.all_shards: tuple[int, ...] = tuple(range(shard_count))
        self._sharded = {t.table: t for t in sharded}
        self.omnisharded = frozenset(omnisharded)
        self.shard_key = shard_key
        self.shard_key_type = shard_key_type
        self._auto: dict[str, TableSharding] = {}
        self._shard_key_function: ShardingFunction | None = None
        self.version = 0
        self.user_aggregates: frozenset[str] | None = frozenset()  # lower case; None: not known yet
        self._learned_aggregates: set[str] = set()

    @classmethod
    def from_database(cls, db: Database | Any) -> Topology:
        """Build from a `proxy.config.Database` (read duck-typed: router never imports proxy)."""
        count = len(db.shards)
        tables = []
        for t in db.sharded_tables:
            if t.function == "range":
                function: ShardingFunction = RangeSharding(
                    [(r.start, r.end, r.shard) for r in t.ranges], None, t.data_type
                )
                spec: tuple[Any, ...] = ("range", tuple((r.start, r.end, r.shard) for r in t.ranges))
            elif t.function == "list":
                lists: dict[int, list[Any]] = {}
                for rule in t.lists:
                    lists.setdefault(rule.shard, []).extend(rule.values)
                function = ListSharding(lists, None, t.data_type)
                spec = ("list", tuple(sorted((s, tuple(v)) for s, v in lists.items())))
            else:
                function = HashSharding(db.virtual_shards, count, t.data_type)
                spec = ("hash", db.virtual_shards, count)
            tables.append(sharding(t.name, t.column, t.data_type, function, spec))
        return cls(
            count,
            default_shard=db.default_shard,
            virtual_shards=db.virtual_shards,
            sharded=tables,
            omnisharded=db.omnisharded_tables,
            shard_key=db.shard_key,
            shard_key_type=getattr(db, "shard_key_type", None) or "bigint",
        )

    def sharding(self, table: str) -> TableSharding | None:
        """The sharding of a configured or automatically sharded table, else None."""
        found = self._sharded.get(table)
        if found is None:
            found = self._auto.get(table)
        return found

    def is_omnisharded(self, table: str) -> bool:
        return table in self.omnisharded

    def is_configured(self, table: str) -> bool:
        return table in self._sharded or table in self.omnisharded

    @property
    def shardings(self) -> tuple[TableSharding, ...]:
        return tuple(self._sharded.values()) + tuple(self._auto.values())

    def shard_key_sharding(self, table: str) -> TableSharding:
        """The sharding a table gets from carrying the database's shard_key column."""
        if self.shard_key is None:
            raise LookupError("this database has no shard_key")
        if self._shard_key_function is None:
            self._shard_key_function = HashSharding(
                self.virtual_shards, self.shard_count, self.shard_key_type
            )
        spec = ("hash", self.virtual_shards, self.shard_count)
        return sharding(table, self.shard_key, self.shard_key_type, self._shard_key_function, spec)

    def add_auto_sharded(self, table: str) -> bool:
        """Record that `table` has the shard_key column (from the catalog, or its CREATE TABLE).
        Configured tables keep their configuration. Returns whether anything changed."""
        if (
            self.shard_key is None
            or table in self._sharded
            or table in self.omnisharded
            or table in self._auto
        ):
            return False
        self._auto[table] = self.shard_key_sharding(table)
        self.version += 1
        return True

    @property
    def auto_sharded(self) -> frozenset[str]:
        return frozenset(self._auto)

    def set_user_aggregates(self, names: Iterable[str] | None) -> bool:
        """The catalog's user-defined aggregates (None: it could not be read). Names learned from DDL
        stay: the catalog read may predate a CREATE AGGREGATE not yet committed, and a stale name can
        only cost a refusal. Returns whether the set changed."""
        found = None if names is None else frozenset(n.lower() for n in names) | self._learned_aggregates
        if found == self.user_aggregates:
            return False
        self.user_aggregates = found
        self.version += 1
        return True

    def learn_aggregate(self, name: str) -> bool:
        """A CREATE AGGREGATE (or a RENAME TO) passing through pgshard: known from the next statement on."""
        name = name.lower()
        self._learned_aggregates.add(name)
        known = self.user_aggregates
        if known is None or name in known:
            return False
        self.user_aggregates = known | {name}
        self.version += 1
        return True


def sharding(
    table: str, column: str, data_type: str, function: ShardingFunction, spec: tuple[Any, ...]
) -> TableSharding:
    kt = key_type(data_type)
    family = _FAMILIES[kt.name]
    return TableSharding(table, column, kt.name, function, kt, family, (family, *spec))
