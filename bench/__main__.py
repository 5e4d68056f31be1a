"""`python -m bench`: measure pgshard side by side with PostgreSQL directly and PgBouncer, in one run.

Why one command that starts everything: the speed bar (DESIGN.md, "What good looks like") is
relative, "at or above PgBouncer's on the same machine, measured side by side in one run", so the
command owns the whole experiment: its own PostgreSQL servers, PgBouncer in transaction mode,
pgshard, the data, the rounds, and the cleanup (every process is stopped at the end, on errors and
on Ctrl-C too). See bench/README.md for what each section measures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.report import SectionResult, evaluate_targets, format_table, to_json, write_chart, write_json
from bench.sections import RUNNERS, SECTIONS, TITLES, Bench, Options, Skip
from bench.servers import REPO_ROOT
from proxy import native


def parse_args(argv: list[str] | None) -> tuple[Options, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="pgshard side by side with PostgreSQL directly and PgBouncer (see bench/README.md).",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds per pgbench run (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--scale", type=int, default=None, help="pgbench scale factor (default 10)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=16,
        help="server connections per pool: pgshard's pool_size (per user, shard and worker) and "
        "PgBouncer's default_pool_size (per user/database pair); default 16",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run for CI: duration 1, rounds 1, scale 1, memory with 200 clients only",
    )
    parser.add_argument(
        "--memory-clients",
        default=None,
        help="comma-separated idle-client counts for the memory section (default 1000,10000)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "bench" / "results",
        help="results directory (default bench/results)",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}"
        )
    quick = bool(args.quick)
    opts = Options(
        duration=args.duration if args.duration is not None else (1.0 if quick else 10.0),
        rounds=args.rounds if args.rounds is not None else (1 if quick else 3),
        scale=args.scale if args.scale is not None else (1 if quick else 10),
        pool_size=args.pool_size,
        quick=quick,
        memory_clients=(
            [int(x) for x in args.memory_clients.split(",") if x.strip()]
            if args.memory_clients
            else ([200] if quick else [1000, 10000])
        ),
        out=args.out,
    )
    if opts.duration < 1 or opts.rounds < 1 or opts.scale < 1 or opts.pool_size < 1:
        parser.error("--duration, --rounds, --scale and --pool-size must be at least 1")
    if any(n < 1 for n in opts.memory_clients):
        parser.error("--memory-clients must be positive")
    return opts, [s for s in SECTIONS if s in sections]


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (
        (out.stdout or out.stderr).strip().splitlines()[0]
        if (out.stdout or out.stderr).strip()
        else "unknown"
    )


def collect_meta(opts: Options, sections: list[str], bench: Bench) -> dict[str, Any]:
    from proxy.localpg import find_bindir

    info = bench.bouncer_info()
    try:
        postgres = _first_line([str(find_bindir() / "postgres"), "--version"])
    except Exception:
        postgres = "unknown"
    commit = _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": list(os.getloadavg()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgres": postgres,
        "pgbench": _first_line(["pgbench", "--version"]),
        "pgbouncer": (
            {
                "path": info.path,
                "version": ".".join(map(str, info.version)),
                "label": info.label,
                "prepared_statement_support": info.prepared_support,
                "note": info.prepared_note,
            }
            if info is not None
            else {"label": "PgBouncer: not found"}
        ),
        "pgshard_commit": commit + ("" if dirty in ("", "unknown") else " (uncommitted changes)"),
        # The hot path runs compiled (proxy/native.py) unless pgshard was installed pure Python.
        "pgshard_compiled": native.compiled_modules(),
        "pgshard_stale_compiled": native.stale_modules(),
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "options": {
            "duration": opts.duration,
            "rounds": opts.rounds,
            "scale": opts.scale,
            "pool_size": opts.pool_size,
            "quick": opts.quick,
            "memory_clients": opts.memory_clients,
            "sections": sections,
        },
    }


def raise_own_nofile() -> None:
    """Children (PgBouncer, pgshard, the idle-client helper) inherit it: 10,000 clients need ~10k fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    opts, sections = parse_args(argv)
    raise_own_nofile()
    from proxy.localpg import make_base_dir, remove_base_dir

    base_dir = make_base_dir("bench")
    bench = Bench(opts, base_dir)
    meta = collect_meta(opts, sections, bench)
    results: dict[str, SectionResult] = {}
    interrupted = False
    try:
        for name in sections:
            sec = SectionResult(name, TITLES[name])
            results[name] = sec
            started = time.monotonic()
            print(f"[bench] section {name}: {sec.title}", flush=True)
            try:
                RUNNERS[name](bench, sec)
            except Skip as exc:
                sec.status = "skipped: " + " ".join(str(exc).split())
            except KeyboardInterrupt:
                sec.status = "failed: interrupted"
                interrupted = True
            except Exception as exc:
                traceback.print_exc()
                sec.status = f"failed: {type(exc).__name__}: " + " ".join(str(exc).split())
            sec.seconds = time.monotonic() - started
            print(f"[bench] section {name}: {sec.status} ({sec.seconds:.0f}s)", flush=True)
            if interrupted:
                break
    finally:
        try:
            bench.collect_logs(opts.out)
        except OSError as exc:
            print(f"[bench] could not keep logs: {exc}", file=sys.stderr)
        bench.close()
        remove_base_dir(base_dir)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["loadavg_end"] = list(os.getloadavg())
    targets = evaluate_targets(results)
    print()
    print(format_table(meta, results, targets))
    data = to_json(meta, results, targets)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = write_json(data, opts.out, stamp)
    print(f"\nresults written to {paths[0]} (and {paths[1].name})")
    _, message = write_chart(results, opts.out, stamp)
    print(message)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
