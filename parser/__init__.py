"""SQL analysis: statement kinds, tables, shard-key values, fan-out rewrites. Knows SQL, not sockets."""
