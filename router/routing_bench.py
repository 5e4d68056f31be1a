"""What routing costs per statement, measured on pgbench's statements over a 4-shard topology.

The budget comes from DESIGN.md "Measured facts": every microsecond the proxy spends on the
single-shard path is taken from PostgreSQL and the client on the same cores, so a route-cache hit
must stay within a few microseconds (target <= 10 us); a miss pays sqlglot (~80 us a parse).
Numbers are the best of several timeit runs (microseconds per call).
"""

from __future__ import annotations

import timeit
from types import SimpleNamespace

from parser.fingerprint import fingerprint
from router.routing import Router
from router.topology import Topology

PGBENCH_SELECT = b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"
PGBENCH_UPDATE = b"UPDATE pgbench_accounts SET abalance = abalance + -4213 WHERE aid = 48213;"
PGBENCH_PREPARED = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


def bench_topology() -> Topology:
    """4 shards; pgbench_accounts hash-sharded on aid (integer), as a sharded pgbench would be."""
    table = SimpleNamespace(
        name="pgbench_accounts", column="aid", data_type="integer", function="hash", ranges=(), lists=()
    )
    db = SimpleNamespace(
        shards=(0, 1, 2, 3),
        virtual_shards=1024,
        default_shard=0,
        omnisharded_tables=(),
        sharded_tables=(table,),
        shard_key=None,
    )
    return Topology.from_database(db)


def _best(statement: object, number: int, repeat: int = 5) -> float:
    times = timeit.repeat(statement, number=number, repeat=repeat)  # type: ignore[arg-type]
    return min(times) / number * 1e6


def bench_routing(number: int = 20_000) -> dict[str, float]:
    """Microseconds per call: fingerprint alone, route_simple on a cache hit and on a miss (full
    analysis and compile), prepare (once per Parse: a miss analyses, a hit reuses the statement
    shape's analysis) and route_bind (once per Bind)."""
    router = Router(bench_topology())
    router.route_simple(PGBENCH_SELECT)
    router.route_simple(PGBENCH_UPDATE)
    prepared = router.prepare(PGBENCH_PREPARED)
    params = [b"48213"]
    formats = [0]
    binary = [(48213).to_bytes(4, "big")]

    def miss() -> None:
        router.clear()
        router.route_simple(PGBENCH_SELECT)

    def prepare_miss() -> None:
        router.clear()
        router.prepare(PGBENCH_PREPARED)

    results = {
        "fingerprint_us": _best(lambda: fingerprint(PGBENCH_SELECT), number),
        "simple_hit_us": _best(lambda: router.route_simple(PGBENCH_SELECT), number),
        "simple_update_hit_us": _best(lambda: router.route_simple(PGBENCH_UPDATE), number),
        "simple_miss_us": _best(miss, max(number // 100, 20)),
        "extended_prepare_miss_us": _best(prepare_miss, max(number // 100, 20)),
        "extended_prepare_hit_us": _best(lambda: router.prepare(PGBENCH_PREPARED), number),
        "extended_bind_us": _best(lambda: router.route_bind(prepared, params, formats), number),
        "extended_bind_binary_us": _best(lambda: router.route_bind(prepared, binary, [1]), number),
    }
    router.clear()
    return {k: round(v, 2) for k, v in results.items()}


if __name__ == "__main__":
    for name, value in bench_routing().items():
        print(f"{name:26} {value:8.2f} us")
