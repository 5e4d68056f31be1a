"""Globally unique ids for sharded tables: an Instagram-style id function installed on every shard.

A `serial`/identity column counts per shard, so two shards hand out the same numbers. Instead each
shard gets `pgshard_id()`, a bigint made of 41 bits of milliseconds since 2025-01-01 (good until
2094), 13 bits of shard number (8192 shards) and 10 bits of a per-shard sequence (1024 ids per
millisecond per shard before the sequence wraps into the next millisecond's values). Ids from
different shards never collide and sort roughly by creation time. `pgshard_id_shard(id)` tells
where an id was made.
"""

from __future__ import annotations

EPOCH_MS = 1735689600000  # 2025-01-01T00:00:00Z
SHARD_BITS = 13
SEQUENCE_BITS = 10
MAX_SHARDS = 1 << SHARD_BITS


def id_function_sql(shard: int) -> str:
    """The DDL that (re)creates the id functions on shard number `shard`."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard number {shard} does not fit in {SHARD_BITS} bits")
    return f"""
CREATE SEQUENCE IF NOT EXISTS pgshard_id_seq;
CREATE OR REPLACE FUNCTION pgshard_id() RETURNS bigint LANGUAGE sql VOLATILE
SET search_path FROM CURRENT AS $$
  SELECT ((floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - {EPOCH_MS})
          << {SHARD_BITS + SEQUENCE_BITS})
       | ({shard}::bigint << {SEQUENCE_BITS})
       | (nextval('pgshard_id_seq') % {1 << SEQUENCE_BITS})
$$;
CREATE OR REPLACE FUNCTION pgshard_id_shard(id bigint) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
  SELECT ((id >> {SEQUENCE_BITS}) & {MAX_SHARDS - 1})::integer
$$;
"""


def shard_of_id(value: int) -> int:
    """The shard that made an id (the same as SQL's pgshard_id_shard)."""
    return (value >> SEQUENCE_BITS) & (MAX_SHARDS - 1)
