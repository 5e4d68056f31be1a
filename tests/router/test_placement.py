"""router/placement.py: hash placement agrees with PARTITION BY HASH; range and list placement."""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.hashing import partition_hash, partition_of
from router.placement import (
    HashSharding,
    KeyRange,
    ListSharding,
    NoShardForKey,
    RangeSharding,
    ShardingFunction,
)

int8s = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)

# -- hash ---------------------------------------------------------------------------------------


def test_known_placement() -> None:
    # satisfies_hash_partition('h8', 8, r, 42::bigint) is true for r = 2, and for 1024, r = 610
    hs = HashSharding(1024, 8, "bigint")
    assert hs.virtual_shard(42) == 610
    assert hs.shard(42) == 2
    assert HashSharding(1024, 8, "text").shard("alice@example.com") == 4  # hv, modulus 8
    assert HashSharding(8, 8, "uuid").shard(uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")) == 0


@given(
    key=int8s,
    shard_count=st.integers(min_value=1, max_value=64),
    multiple=st.integers(min_value=1, max_value=64),
)
def test_default_directory_is_partition_by_hash(key: int, shard_count: int, multiple: int) -> None:
    # virtual_shards = multiple * shard_count: shard == remainder of PARTITION BY HASH modulus N
    hs = HashSharding(multiple * shard_count, shard_count, "bigint")
    assert hs.shard(key) == partition_of("bigint", key, shard_count)
    assert hs.virtual_shard(key) == partition_of("bigint", key, multiple * shard_count)
    assert hs.native_modulus == shard_count


@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.integers(1, 100), st.integers(1, 100))
def test_the_arithmetic_behind_it(h: int, n: int, m: int) -> None:
    # the docstring's step: (h % (m*n)) % n == h % n for every uint64 h
    assert (h % (m * n)) % n == h % n


@given(st.text(max_size=30), st.uuids())
def test_default_directory_other_types(s: str, u: uuid.UUID) -> None:
    assert HashSharding(12, 4, "text").shard(s) == partition_of("text", s, 4)
    assert HashSharding(12, 3, "uuid").shard(u) == partition_of("uuid", u, 3)


def test_custom_directory() -> None:
    # resharding: virtual shards 0..3 were on shards 0,1,0,1; move virtual shard 3 to a new shard 2
    hs = HashSharding(4, 3, "bigint", directory=[0, 1, 0, 2])
    for key in range(-1000, 1000):
        v = partition_hash("bigint", key) % 4
        assert hs.virtual_shard(key) == v
        assert hs.shard(key) == [0, 1, 0, 2][v]
    assert hs.directory == (0, 1, 0, 2)
    assert hs.native_modulus is None
    assert HashSharding(4, 2, "bigint", directory=[0, 1, 0, 1]).native_modulus == 2


def test_null_key_is_virtual_shard_zero() -> None:
    hs = HashSharding(4, 2, "bigint", directory=[1, 0, 1, 0])
    assert hs.virtual_shard(None) == 0
    assert hs.shard(None) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 1, "bigint"), "virtual_shards must be a positive int"),
        ((4, 0, "bigint"), "shard_count must be a positive int"),
        ((10, 4, "bigint"), "must be a multiple of shard_count"),
        ((2, 4, "bigint"), "must be a multiple of shard_count"),
        ((4, 2, "numeric"), "unsupported shard key type"),
    ],
)
def test_hash_sharding_refuses_bad_config(args: tuple[int, int, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HashSharding(*args)


def test_hash_sharding_refuses_bad_directory() -> None:
    with pytest.raises(ValueError, match="3 entries, one per virtual shard is 4"):
        HashSharding(4, 2, "bigint", directory=[0, 1, 0])
    with pytest.raises(ValueError, match="virtual shard 1 is mapped to shard 2, but there are only 2"):
        HashSharding(4, 2, "bigint", directory=[0, 2, 0, 1])
    with pytest.raises(ValueError, match="non-negative int"):
        HashSharding(2, 2, "bigint", directory=[0, -1])


def test_hash_sharding_checks_the_key() -> None:
    hs = HashSharding(4, 2, "integer")
    with pytest.raises(ValueError, match="out of range for type integer"):
        hs.shard(1 << 40)
    with pytest.raises(TypeError):
        hs.shard("1")


# -- range --------------------------------------------------------------------------------------


def test_range_sharding() -> None:
    rs = RangeSharding([(100, 200, 1), (None, 100, 0), (300, None, 2)])
    assert rs.shard(-(1 << 63)) == 0
    assert rs.shard(99) == 0
    assert rs.shard(100) == 1  # start inclusive
    assert rs.shard(199) == 1
    assert rs.shard(300) == 2
    assert rs.shard(1 << 62) == 2
    for gap in (200, 250, 299):  # end exclusive; a gap has no shard
        with pytest.raises(NoShardForKey, match=f"no shard for key value {gap}") as exc:
            rs.shard(gap)
        assert exc.value.value == gap
    with pytest.raises(NoShardForKey, match="NULL"):
        rs.shard(None)
    assert rs.ranges[0] == KeyRange(None, 100, 0)


def test_range_sharding_default_and_other_types() -> None:
    rs = RangeSharding([("a", "m", 0), ("m", None, 1)], default=2)
    assert rs.shard("") == 2
    assert rs.shard("alice") == 0
    assert rs.shard("m") == 1
    assert rs.shard("zz") == 1
    assert rs.shard(None) == 2
    only_default = RangeSharding([], default=3)
    assert only_default.shard(5) == 3


def test_range_sharding_coerces_configured_bounds() -> None:
    rs = RangeSharding(
        [(None, "80000000-0000-0000-0000-000000000000", 0), ("80000000000000000000000000000000", None, 1)],
        data_type="uuid",
    )
    assert rs.shard(uuid.UUID(int=5)) == 0
    assert rs.shard(uuid.UUID(int=1 << 127)) == 1
    with pytest.raises(ValueError, match="out of range for type smallint"):
        RangeSharding([(0, 40000, 0)], data_type="smallint")


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ([(0, 10, 0), (5, 20, 1)], "ranges overlap"),
        ([(None, 10, 0), (None, 5, 1)], "ranges overlap"),
        ([(0, None, 0), (100, 200, 1)], "ranges overlap"),
        ([(10, 10, 0)], "empty range"),
        ([(10, 5, 0)], "empty range"),
        ([], "at least one range or a default"),
        ([(0, 10, -1)], "non-negative int"),
    ],
)
def test_range_sharding_refuses_bad_ranges(ranges: list[tuple[object, object, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RangeSharding(ranges)


def test_range_sharding_type_mismatch() -> None:
    with pytest.raises(TypeError, match="cannot be compared"):
        RangeSharding([(0, 10, 0)]).shard("5")


@given(st.lists(st.integers(-1000, 1000), min_size=1, max_size=20, unique=True), st.integers(-1100, 1100))
def test_range_sharding_against_a_linear_scan(cuts: list[int], key: int) -> None:
    cuts.sort()
    bounds: list[int | None] = [None, *cuts, None]
    ranges = [(lo, hi, i) for i, (lo, hi) in enumerate(itertools.pairwise(bounds)) if i % 3 != 1]
    rs = RangeSharding(ranges)
    expected = [s for lo, hi, s in ranges if (lo is None or lo <= key) and (hi is None or key < hi)]
    if expected:
        assert rs.shard(key) == expected[0]
    else:
        with pytest.raises(NoShardForKey):
            rs.shard(key)


# -- list ---------------------------------------------------------------------------------------


def test_list_sharding() -> None:
    ls = ListSharding({0: ["us", "ca"], 1: ["de", "fr"], 2: [None]})
    assert ls.shard("us") == 0
    assert ls.shard("fr") == 1
    assert ls.shard(None) == 2
    with pytest.raises(NoShardForKey, match="no shard for key value 'jp'"):
        ls.shard("jp")
    assert ListSharding({0: [1, 2]}, default=5).shard(3) == 5


def test_list_sharding_coerces_and_checks() -> None:
    ls = ListSharding({1: ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]}, data_type="uuid")
    assert ls.shard(uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")) == 1
    with pytest.raises(ValueError, match="listed for shard 0 and shard 1"):
        ListSharding({0: ["x"], 1: ["x"]})
    with pytest.raises(ValueError, match="at least one listed value or a default"):
        ListSharding({})
    # configured strings are read as PostgreSQL text input of the key type
    assert ListSharding({0: ["1", " 0x10 "]}, data_type="bigint").shard(16) == 0
    with pytest.raises(ValueError, match="invalid input syntax for type bigint"):
        ListSharding({0: ["one"]}, data_type="bigint")
    with pytest.raises(TypeError, match="must be an int"):
        ListSharding({0: [1.5]}, data_type="bigint")


def test_every_sharding_function_fits_the_protocol() -> None:
    functions: list[ShardingFunction] = [
        HashSharding(4, 2, "bigint"),
        RangeSharding([(None, None, 1)]),
        ListSharding({0: [7]}),
    ]
    assert [f.shard(7) for f in functions] == [partition_of("bigint", 7, 2), 1, 0]
