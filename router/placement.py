"""Placement: which shard holds the row with a given shard-key value.

Three sharding functions share one interface, `ShardingFunction.shard(value) -> int`, so the
router never needs to know how a table is distributed (DESIGN.md, "Placement"):

- `HashSharding` hashes the key exactly as PostgreSQL's `PARTITION BY HASH` does
  (`router.hashing`), takes the hash modulo a fixed number of virtual shards, and looks the
  virtual shard up in a directory of physical shards. Resharding rewrites the directory and
  moves whole virtual shards; the hash, and so the application, never changes.
- `RangeSharding` and `ListSharding` place by the key's value, like PostgreSQL's `PARTITION BY
  RANGE` / `PARTITION BY LIST`.

Values are Python shard keys (int, str, uuid.UUID) as `router.hashing.key_from_text` and
`key_from_binary` produce them. Constructors take plain values, never config objects, so this
module can be used (and tested) without a configuration.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from router.hashing import key_type


class NoShardForKey(LookupError):
    """No range or list covers this key value, and there is no default shard.

    The counterpart of PostgreSQL's "no partition of relation ... found for row" (SQLSTATE 23514).
    """

    sqlstate = "23514"

    def __init__(self, value: object, detail: str = "") -> None:
        message = f"no shard for key value {value!r}"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.value = value


class ShardingFunction(Protocol):
    """Maps a shard-key value to a physical shard number (0-based)."""

    def shard(self, value: Any) -> int: ...


def _coerce(data_type: str | None, value: object) -> Any:
    """Bring a configured value to the Python form keys arrive in (a uuid string -> UUID,
    an int range-checked for its type), so lookups compare like with like."""
    if data_type is None or value is None:
        return value
    kt = key_type(data_type)
    if isinstance(value, str) and kt.name not in ("text", "character varying"):
        return kt.from_text(value.encode("utf-8"))
    kt.hash(value)  # raises TypeError/ValueError for a value of the wrong type or range
    return value


def _check_shard(shard: object) -> int:
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
        raise ValueError(f"a shard number must be a non-negative int, got {shard!r}")
    return shard


class HashSharding:
    """Hash placement through virtual shards, compatible with `PARTITION BY HASH`.

    `virtual_shard(value)` is `partition_hash(value) % virtual_shards`: for a key k it is the
    remainder r for which `satisfies_hash_partition(t, virtual_shards, r, k)` is true on a
    table t hash-partitioned on a key of the same type. `shard(value)` is `directory[that]`.

    Why the default directory agrees with native partitioning. Let V = virtual_shards, N =
    shard_count, h the uint64 partition hash, and V = m * N. The default directory sends
    virtual shard v to v % N, so shard(k) = (h % V) % N. Write h = q*V + (h % V); since
    q*V = (q*m)*N is a multiple of N, h % N = (h % V) % N. So shard(k) = h % N: exactly the
    partition `PARTITION BY HASH (k)` with modulus N and remainders 0..N-1 puts k in. (PostgreSQL
    routes by the greatest modulus, which is N when every partition has modulus N.) When N does
    not divide V the equality fails, and the shards also get unequal numbers of virtual shards,
    so a default directory insists on it. A custom directory (after resharding) keeps the
    virtual-shard half of the statement: virtual shard v is still remainder v modulo V.

    A NULL key hashes to 0 in PostgreSQL (compute_partition_hash_value skips nulls), so it is
    virtual shard 0.
    """

    __slots__ = ("_directory", "_hash", "data_type", "shard_count", "virtual_shards")

    def __init__(
        self,
        virtual_shards: int,
        shard_count: int,
        data_type: str,
        directory: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(virtual_shards, int) or virtual_shards < 1:
            raise ValueError(f"virtual_shards must be a positive int, got {virtual_shards!r}")
        if not isinstance(shard_count, int) or shard_count < 1:
            raise ValueError(f"shard_count must be a positive int, got {shard_count!r}")
        self._hash = key_type(data_type).hash
        self.data_type = data_type
        self.virtual_shards = virtual_shards
        self.shard_count = shard_count
        if directory is None:
            if virtual_shards % shard_count:
                raise ValueError(
                    f"virtual_shards ({virtual_shards}) must be a multiple of shard_count "
                    f"({shard_count}) for the default directory (virtual shard v on shard v % "
                    f"{shard_count}); give an explicit directory otherwise"
                )
            self._directory: tuple[int, ...] = tuple(v % shard_count for v in range(virtual_shards))
        else:
            if len(directory) != virtual_shards:
                raise ValueError(
                    f"the directory has {len(directory)} entries, one per virtual shard is {virtual_shards}"
                )
            for v, s in enumerate(directory):
                if _check_shard(s) >= shard_count:
                    raise ValueError(
                        f"virtual shard {v} is mapped to shard {s}, but there are only "
                        f"{shard_count} shards (0..{shard_count - 1})"
                    )
            self._directory = tuple(directory)

    @property
    def directory(self) -> tuple[int, ...]:
        """Physical shard of each virtual shard."""
        return self._directory

    @property
    def native_modulus(self) -> int | None:
        """shard_count if placement equals `PARTITION BY HASH` with that modulus, else None."""
        n = self.shard_count
        if self.virtual_shards % n == 0 and all(s == v % n for v, s in enumerate(self._directory)):
            return n
        return None

    def virtual_shard(self, value: Any) -> int:
        """The virtual shard (hash-partition remainder modulo virtual_shards) of a key value."""
        if value is None:
            return 0
        return self._hash(value) % self.virtual_shards

    def shard(self, value: Any) -> int:
        if value is None:
            return self._directory[0]
        return self._directory[self._hash(value) % self.virtual_shards]

    def __repr__(self) -> str:
        return (
            f"HashSharding(virtual_shards={self.virtual_shards}, shard_count={self.shard_count}, "
            f"data_type={self.data_type!r})"
        )


class KeyRange(NamedTuple):
    """Keys k with start <= k < end go to `shard`; None leaves that side unbounded."""

    start: Any
    end: Any
    shard: int


class RangeSharding:
    """Placement by key range, like `PARTITION BY RANGE`: start inclusive, end exclusive.

    Ranges may leave gaps but may not overlap; a key in a gap (or a NULL key) goes to `default`,
    or raises NoShardForKey. Keys compare as Python values: for text that is code-point order,
    which is PostgreSQL's order under the C collation only.
    """

    __slots__ = ("_ranges", "_starts", "_unbounded_first", "default")

    def __init__(
        self,
        ranges: Iterable[tuple[Any, Any, int]],
        default: int | None = None,
        data_type: str | None = None,
    ) -> None:
        rs = [
            KeyRange(_coerce(data_type, start), _coerce(data_type, end), _check_shard(shard))
            for start, end, shard in ranges
        ]
        if not rs and default is None:
            raise ValueError("range sharding needs at least one range or a default shard")
        for r in rs:
            if r.start is not None and r.end is not None and not r.start < r.end:
                raise ValueError(f"empty range: start {r.start!r} is not below end {r.end!r}")
        try:
            rs.sort(key=lambda r: (r.start is not None, r.start))
        except TypeError as e:
            raise TypeError(f"range bounds of different types cannot be ordered: {rs!r}") from e
        for prev, nxt in itertools.pairwise(rs):
            if prev.end is None or nxt.start is None or nxt.start < prev.end:
                raise ValueError(f"ranges overlap: {tuple(prev)!r} and {tuple(nxt)!r}")
        self._ranges = tuple(rs)
        self._unbounded_first = bool(rs) and rs[0].start is None
        self._starts = [r.start for r in rs if r.start is not None]
        self.default = None if default is None else _check_shard(default)

    @property
    def ranges(self) -> tuple[KeyRange, ...]:
        """The ranges, sorted by start."""
        return self._ranges

    def shard(self, value: Any) -> int:
        r = self._find(value)
        if r is not None:
            return r.shard
        if self.default is not None:
            return self.default
        raise NoShardForKey(value, "outside every range" if value is not None else "NULL key")

    def _find(self, value: Any) -> KeyRange | None:
        if value is None:
            return None
        try:
            i = bisect.bisect_right(self._starts, value) - 1 + self._unbounded_first
            if i < 0:
                return None
            r = self._ranges[i]
            if r.end is None or value < r.end:
                return r
            return None
        except TypeError as e:
            raise TypeError(f"key {value!r} cannot be compared with the range bounds") from e

    def __repr__(self) -> str:
        return f"RangeSharding({[tuple(r) for r in self._ranges]!r}, default={self.default!r})"


class ListSharding:
    """Placement by listed values, like `PARTITION BY LIST`: `lists` maps shard -> its values.

    A value may be listed for one shard only. None in a list places NULL keys, as PostgreSQL's
    `FOR VALUES IN (NULL)` does. An unlisted value goes to `default`, or raises NoShardForKey.
    """

    __slots__ = ("_by_value", "default")

    def __init__(
        self,
        lists: Mapping[int, Iterable[Any]],
        default: int | None = None,
        data_type: str | None = None,
    ) -> None:
        by_value: dict[Any, int] = {}
        for shard, values in lists.items():
            _check_shard(shard)
            for raw in values:
                value = _coerce(data_type, raw)
                if value in by_value:
                    raise ValueError(
                        f"value {value!r} is listed for shard {by_value[value]} and shard {shard}"
                    )
                by_value[value] = shard
        if not by_value and default is None:
            raise ValueError("list sharding needs at least one listed value or a default shard")
        self._by_value = by_value
        self.default = None if default is None else _check_shard(default)

    def shard(self, value: Any) -> int:
        try:
            return self._by_value[value]
        except KeyError:
            if self.default is not None:
                return self.default
            raise NoShardForKey(value, "not in any list") from None
        except TypeError as e:
            raise TypeError(f"key {value!r} is not hashable") from e

    def __repr__(self) -> str:
        return f"ListSharding({len(self._by_value)} values, default={self.default!r})"
