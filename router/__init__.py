"""Topology and placement: sharding functions, virtual shards, routing decisions, cross-shard execution."""
