"""router/hashing.py against a live PostgreSQL, over thousands of keys per type.

For every key, three things must agree with the server:
1. the 64-bit hash: PostgreSQL's seeded hash support function (hashint8extended & co. with
   HASH_PARTITION_SEED) must be our partition hash before its hash_combine64 from 0;
2. the partition for moduli 1, 2, 3, 4, 7, 8 and 1024: `satisfies_hash_partition(h, m, r, k)`
   must be true for the remainder r we predict (exactly one remainder satisfies it, so this
   proves equality) on a table `h (k <type>) PARTITION BY HASH (k)`;
3. real tuple routing: rows inserted into an 8-partition table land in partition `our % 8`,
   which is also the shard HashSharding(1024 virtual shards, 8 shards) picks.

Each check is one statement per type over arrays of keys, so the whole file runs in seconds.
Keys are random with a fixed seed (reproducible), across the full ranges, plus the extremes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from proxy.localpg import LocalPostgres
from router.hashing import HASH_PARTITION_SEED, partition_hash
from router.placement import HashSharding

pytestmark = pytest.mark.e2e

MODULI = (1, 2, 3, 4, 7, 8, 1024)
COMBINE = 0x49A0F4DD15E5A8E3  # hash_combine64(0, h) == h + COMBINE (mod 2**64)
M64 = (1 << 64) - 1
ROUTED_PARTITIONS = 8
SEED = 20240601


def _ints(bits: int, n: int, rng: random.Random) -> list[int]:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    edges = [lo, lo + 1, -1, 0, 1, hi - 1, hi]
    # uniform over the range, and small magnitudes (where real ids live), and powers of two
    powers = [s * (1 << p) + d for p in range(bits - 1) for s in (1, -1) for d in (-1, 0, 1)]
    keys = edges + [k for k in powers if lo <= k <= hi]
    keys += [rng.randint(lo, hi) for _ in range(n)]
    keys += [rng.randint(-100_000, 100_000) for _ in range(n // 4) if bits > 16]
    return keys


def _random_char(rng: random.Random) -> str:
    plane = rng.random()
    if plane < 0.5:
        cp = rng.randint(1, 0x7F)  # ASCII, no NUL (text cannot hold it)
    elif plane < 0.8:
        cp = rng.randint(0x80, 0xFFFF)
    else:
        cp = rng.randint(0x10000, 0x10FFFF)
    if 0xD800 <= cp <= 0xDFFF:  # surrogates have no UTF-8 form
        cp = 0xE000
    return chr(cp)


def _texts(n: int, rng: random.Random) -> list[str]:
    keys = ["", " ", "a", "A", "ü", "🐘", "x" * 11, "x" * 12, "x" * 13, "x" * 24, "x" * 1000, "é" * 3000]
    for _ in range(n):
        size = rng.choice((rng.randint(0, 12), rng.randint(0, 40), rng.randint(0, 300)))
        keys.append("".join(_random_char(rng) for _ in range(size)))
    return keys


def _uuids(n: int, rng: random.Random) -> list[uuid.UUID]:
    keys = [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), uuid.UUID(int=1), uuid.UUID(int=1 << 127)]
    return keys + [uuid.UUID(int=rng.getrandbits(128)) for _ in range(n)]


def _short(rows: list[Any]) -> str:
    """A few failing rows for the assertion message, long keys cut short."""
    return "; ".join(repr(tuple(row))[:120] for row in rows[:3])


# data type, SQL type, its hash support function, key generator
TYPES: list[tuple[str, str, str, Callable[[random.Random], list[Any]]]] = [
    ("smallint", "int2", "hashint2extended", lambda rng: list(range(-(1 << 15), 1 << 15))),  # all of them
    ("integer", "int4", "hashint4extended", lambda rng: _ints(32, 5000, rng)),
    ("bigint", "int8", "hashint8extended", lambda rng: _ints(64, 5000, rng)),
    ("text", "text", "hashtextextended", lambda rng: _texts(3000, rng)),
    ("varchar", "varchar", "hashtextextended", lambda rng: _texts(1000, rng)),
    ("uuid", "uuid", "uuid_hash_extended", lambda rng: _uuids(5000, rng)),
]


@pytest.fixture
async def conn(postgres: LocalPostgres) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres.dsn("app", "secret", "app"))
    schema = f"hashing_{uuid.uuid4().hex[:12]}"
    await connection.execute(f"CREATE SCHEMA {schema}; SET search_path = {schema}")
    try:
        yield connection
    finally:
        await connection.execute(f"DROP SCHEMA {schema} CASCADE")
        await connection.close()


@pytest.mark.parametrize(("data_type", "sql_type", "hash_fn", "make_keys"), TYPES, ids=[t[0] for t in TYPES])
async def test_partitions_match_postgres(
    conn: asyncpg.Connection,
    data_type: str,
    sql_type: str,
    hash_fn: str,
    make_keys: Callable[[random.Random], list[Any]],
) -> None:
    keys = make_keys(random.Random(f"{SEED}-{data_type}"))
    ours = [partition_hash(data_type, k) for k in keys]

    # 1. the 64-bit hash, signed as PostgreSQL's int8 result
    signed_seed = HASH_PARTITION_SEED - (1 << 64) if HASH_PARTITION_SEED >= 1 << 63 else HASH_PARTITION_SEED
    rows = await conn.fetch(
        f"SELECT {hash_fn}(k, $2) FROM unnest($1::{sql_type}[]) WITH ORDINALITY AS t(k, i) ORDER BY i",
        keys,
        signed_seed,
    )
    theirs = [(r[0] + COMBINE) & M64 for r in rows]
    wrong = [(k, o, t) for k, o, t in zip(keys, ours, theirs, strict=True) if o != t]
    assert not wrong, f"{len(wrong)} of {len(keys)} {data_type} hashes differ, e.g. {_short(wrong)}"

    # 2. satisfies_hash_partition agrees with our remainder for every modulus
    await conn.execute(f"CREATE TABLE h (k {sql_type}) PARTITION BY HASH (k)")
    all_keys = [k for k in keys for _ in MODULI]
    moduli = [m for _ in keys for m in MODULI]
    remainders = [h % m for h in ours for m in MODULI]
    bad = await conn.fetch(
        f"""SELECT k, m, r FROM unnest($1::{sql_type}[], $2::int4[], $3::int4[]) AS t(k, m, r)
            WHERE NOT satisfies_hash_partition('h'::regclass, m, r, k)""",
        all_keys,
        moduli,
        remainders,
    )
    assert not bad, f"{len(bad)} {data_type} (key, modulus, our remainder) refused, e.g. {_short(bad)}"

    # 3. rows are routed to the partition we predict
    for r in range(ROUTED_PARTITIONS):
        await conn.execute(
            f"CREATE TABLE h_{r} PARTITION OF h FOR VALUES WITH (MODULUS {ROUTED_PARTITIONS}, REMAINDER {r})"
        )
    routed = await conn.fetch(
        f"INSERT INTO h SELECT unnest($1::{sql_type}[]) RETURNING k, tableoid::regclass::text", keys
    )
    assert len(routed) == len(keys)
    sharding = HashSharding(1024, ROUTED_PARTITIONS, data_type)
    wrong_route = [
        (row[0], row[1], sharding.shard(row[0]))
        for row in routed
        if not row[1]
        == f"h_{partition_hash(data_type, row[0]) % ROUTED_PARTITIONS}"
        == f"h_{sharding.shard(row[0])}"
    ]
    assert not wrong_route, (
        f"{len(wrong_route)} {data_type} rows routed elsewhere, e.g. {_short(wrong_route)}"
    )


async def test_null_key_goes_to_remainder_zero(conn: asyncpg.Connection) -> None:
    await conn.execute("CREATE TABLE hn (k bigint) PARTITION BY HASH (k)")
    for m in MODULI:
        assert await conn.fetchval("SELECT satisfies_hash_partition('hn'::regclass, $1, 0, NULL::bigint)", m)
    assert partition_hash("bigint", None) == 0
