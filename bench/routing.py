"""Routing cost per statement, measured in-process: the hook of the `routing` section.

Why in-process: the bar is "a route-cache hit costs at most 10 us per statement" (DESIGN.md,
"Parse once"), far below what a pgbench run through the proxy can resolve; a micro-benchmark of the
`parser`/`router` modules measures it directly, for a hit and a miss of the route cache, for the
simple protocol (Query text) and the extended one (Parse analysed once, then each Bind routed).

The micro-benchmark itself belongs to the routing code: `router.routing_bench.bench_routing()`
(microseconds per call, best of several timeit runs). This hook runs it once per round and maps
its keys to the report's figures. Until routing exists (neither that module nor
`parser.route_cache` imports) the section reports "skipped: routing not built yet".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: Figure name ("group|series", as the report keys them) -> samples in us, one per round.
RoutingSamples = dict[str, list[float]]

#: router.routing_bench's keys -> the report's figures. On the extended protocol a statement shape
#: is analysed at its first Parse (the miss); each Bind is routed from that analysis (the hit), and
#: a later Parse of the same shape (unnamed statements, one per query) reuses it ("parse hit").
KEY_MAP = {
    "simple_hit_us": "route-cache hit|simple",
    "simple_miss_us": "route-cache miss|simple",
    "extended_bind_us": "route-cache hit|extended",
    "extended_prepare_miss_us": "route-cache miss|extended",
    "extended_prepare_hit_us": "route-cache parse hit|extended",
}


def _load() -> Callable[..., dict[str, float]] | str:
    """The routing micro-benchmark, or "skipped: <reason>"."""
    try:
        module: Any = importlib.import_module("router.routing_bench")
    except ImportError:
        try:
            importlib.import_module("parser.route_cache")
        except ImportError:
            return "skipped: routing not built yet"
        return "skipped: parser.route_cache exists but router.routing_bench (the micro-benchmark) does not"
    except Exception as exc:
        return f"failed: importing router.routing_bench raised {type(exc).__name__}: {exc}"
    func = getattr(module, "bench_routing", None)
    if not callable(func):
        return "skipped: router.routing_bench has no bench_routing()"
    return func


def bench_routing(rounds: int = 3, quick: bool = False) -> RoutingSamples | str:
    """Samples per figure, or "skipped: <reason>" / "failed: <reason>" when there is nothing to report."""
    func = _load()
    if isinstance(func, str):
        return func
    samples: RoutingSamples = {}
    for _ in range(rounds):
        try:
            result = func(2_000) if quick else func()
        except Exception as exc:
            return f"failed: router.routing_bench.bench_routing() raised {type(exc).__name__}: {exc}"
        for key, value in result.items():
            name = KEY_MAP.get(key, f"{key.removesuffix('_us')}|detail")
            samples.setdefault(name, []).append(float(value))
    return samples
