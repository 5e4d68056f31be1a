"""The benchmark's sections and the shared set-up they run on.

Why this shape: every section compares pgshard with something measured next to it in the same run
(PostgreSQL directly, PgBouncer, one server holding all rows, pgshard with another setting), so
each one loops over rounds and, inside a round, runs the systems back to back in an order that
rotates from round to round: machine noise and warm-up drift then hit all systems alike. Servers
and proxies are started once, lazily, by `Bench`, and shared by the sections that need them.

A section that cannot run yet (sharding is not built: pgshard rejects `[[databases.sharded_tables]]`,
or the rows do not land where PostgreSQL's hash partitioning would put them) raises `Skip` and is
reported as "skipped: <reason>". A single failed run (pgshard errors, hangs, dies) is recorded as a
failed sample of its figure, with pgbench's message; it never ends the benchmark.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.idle_clients import IdleClientsHelper
from bench.pgbench import MODES, PgbenchError, PgbenchRun, client_env, pgbench_init, run_pgbench
from bench.pgbouncer import PgBouncer, PgBouncerError, PgBouncerInfo, pgbouncer_info
from bench.report import Figure, SectionResult, paired
from bench.routing import bench_routing
from bench.servers import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgShard,
    PostgresFarm,
    ShardedTable,
)
from proxy.localpg import LocalPostgres, find_bindir, free_port

SECTIONS = ("single", "sharded", "crossshard", "routing", "memory", "workers")

TITLES = {
    "single": "pgbench -S through PostgreSQL directly, PgBouncer and pgshard (one shard)",
    "sharded": "pgbench -S through pgshard with pgbench_accounts sharded by aid over 2 and 4 shards",
    "crossshard": "cross-shard queries over 4 shards against one server holding all rows",
    "routing": "routing cost per statement (in-process micro-benchmark)",
    "memory": "resident memory (VmRSS) with idle clients",
    "workers": "pgshard workers = 1 against workers = 2 (pgbench -S, 16 clients, simple)",
}

CROSS_SHARD_QUERIES = {
    "count(*)": "SELECT count(*) FROM pgbench_accounts;",
    "ORDER BY aid DESC LIMIT 100": "SELECT aid, abalance FROM pgbench_accounts ORDER BY aid DESC LIMIT 100;",
    "GROUP BY bid with aggregates": (
        "SELECT bid, count(*), sum(abalance), avg(abalance), min(aid), max(aid) "
        "FROM pgbench_accounts GROUP BY bid ORDER BY bid;"
    ),
}

ROWS_PER_SCALE = 100_000  # pgbench_accounts rows per unit of pgbench scale
T = TypeVar("T")


class Skip(Exception):
    """This section (or part of it) cannot run on this build; the message says why."""


@dataclass
class Options:
    duration: float = 10.0
    rounds: int = 3
    scale: int = 10
    pool_size: int = 16
    quick: bool = False
    memory_clients: list[int] = field(default_factory=lambda: [1000, 10000])
    out: Path = Path("bench/results")


@dataclass
class Endpoint:
    """Something pgbench can connect to, under the name the report shows."""

    label: str
    host: str
    port: int
    dbname: str = APP_DB
    pgshard: PgShard | None = None  # to explain a failure by pgshard's exit status and log

    def pgbench(self, clients: int, mode: str, duration: float, script: Path | None = None) -> PgbenchRun:
        run = run_pgbench(
            self.host,
            self.port,
            APP_USER,
            APP_PASSWORD,
            self.dbname,
            clients=clients,
            mode=mode,
            duration=duration,
            script=script,
        )
        if run.error and self.pgshard is not None and not self.pgshard.alive():
            run.error += f" [{self.pgshard.status()}]"
        return run


def rotate(items: Sequence[T], by: int) -> list[T]:
    """`items` rotated left by `by`: round r runs the systems in a different order than round r-1."""
    if not items:
        return []
    k = by % len(items)
    return list(items[k:]) + list(items[:k])


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    """Servers and proxies shared by the sections, started on first use and all stopped by close()."""

    def __init__(self, options: Options, base_dir: Path) -> None:
        self.options = options
        self.base_dir = base_dir
        self.work = base_dir / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.farm = PostgresFarm(base_dir)
        self.pgshards: list[PgShard] = []
        self.bouncers: list[PgBouncer] = []
        self.helpers: list[IdleClientsHelper] = []
        self._single: LocalPostgres | None = None
        self._bouncer: PgBouncer | None = None
        self._bouncer_error: str | None = None
        self._pgshard_single: PgShard | None = None
        self._sharded: dict[int, PgShard | Skip] = {}

    # -- PostgreSQL ---------------------------------------------------------------------------------

    def single_pg(self) -> LocalPostgres:
        """The one server holding all pgbench rows (scale `--scale`), loaded directly."""
        if self._single is None:
            _say(f"starting PostgreSQL and loading pgbench data (scale {self.options.scale})")
            pg = self.farm.get("single")
            pgbench_init(pg.host, pg.port, APP_USER, APP_PASSWORD, APP_DB, self.options.scale, steps="dtgvp")
            self._single = pg
        return self._single

    def direct(self, label: str = "direct") -> Endpoint:
        pg = self.single_pg()
        return Endpoint(label, pg.host, pg.port)

    # -- PgBouncer ----------------------------------------------------------------------------------

    def bouncer_info(self) -> PgBouncerInfo | None:
        try:
            return pgbouncer_info()
        except PgBouncerError:
            return None

    def new_bouncer(self, name: str) -> PgBouncer:
        pg = self.single_pg()
        bouncer = PgBouncer(
            self.base_dir / name,
            free_port(),
            pg.host,
            pg.port,
            APP_DB,
            APP_DB,
            APP_USER,
            APP_PASSWORD,
            self.options.pool_size,
        )
        self.bouncers.append(bouncer)
        bouncer.start()
        return bouncer

    def bouncer(self) -> PgBouncer:
        """PgBouncer in transaction mode in front of the single server; raises PgBouncerError."""
        if self._bouncer is None:
            if self._bouncer_error is not None:
                raise PgBouncerError(self._bouncer_error)
            try:
                self._bouncer = self.new_bouncer("pgbouncer")
            except (PgBouncerError, OSError) as exc:
                self._bouncer_error = str(exc)
                raise PgBouncerError(self._bouncer_error) from None
        return self._bouncer

    # -- pgshard ------------------------------------------------------------------------------------

    def new_pgshard(self, name: str, shards: list[str], **kwargs: object) -> PgShard:
        proxy = PgShard.create(self.work, name, shards, pool_size=self.options.pool_size, **kwargs)
        self.pgshards.append(proxy)
        proxy.start()
        return proxy

    def pgshard_single(self) -> PgShard:
        """pgshard with one shard: the single server."""
        if self._pgshard_single is None:
            pg = self.single_pg()
            self._pgshard_single = self.new_pgshard(
                "pgshard-1shard", [pg.dsn(APP_USER, APP_PASSWORD, APP_DB)]
            )
        return self._pgshard_single

    def sharded(self, n: int) -> PgShard:
        """pgshard over n shards with pgbench_accounts sharded by aid, loaded through pgshard; or Skip."""
        if n not in self._sharded:
            try:
                self._sharded[n] = self._setup_sharded(n)
            except Skip as exc:
                self._sharded[n] = exc
        result = self._sharded[n]
        if isinstance(result, Skip):
            raise result
        return result

    def _setup_sharded(self, n: int) -> PgShard:
        dbname = f"app{n}"
        _say(f"setting up {n} shards (database {dbname} on shard0..shard{n - 1})")
        servers = self.farm.many([f"shard{i}" for i in range(n)])
        for pg in servers:
            if pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{dbname}'") != "1":
                pg.create_database(dbname, owner=APP_USER)
        proxy = PgShard.create(
            self.work,
            f"pgshard-{n}shards",
            [pg.dsn(APP_USER, APP_PASSWORD, dbname) for pg in servers],
            pool_size=self.options.pool_size,
            sharded_tables=[ShardedTable("pgbench_accounts", "aid", "integer")],
        )
        problem = proxy.check()
        if problem is not None:
            raise Skip(f"pgshard rejects a config with [[databases.sharded_tables]]: {problem}")
        self.pgshards.append(proxy)
        try:
            proxy.start()
        except RuntimeError as exc:
            raise Skip(f"pgshard with a sharded config did not start: {exc}") from None
        try:
            self._load_sharded(proxy, servers, dbname, n)
        except Skip:
            proxy.stop()  # nothing will run through it; free its server connections
            raise
        return proxy

    def _load_sharded(self, proxy: PgShard, servers: list[LocalPostgres], dbname: str, n: int) -> None:
        """pgbench -i through pgshard, check where the rows landed, VACUUM ANALYZE each shard."""
        _say(f"loading pgbench data (scale {self.options.scale}) through pgshard over {n} shards")
        try:
            # No vacuum through the proxy ("v"): it is done on each shard directly below.
            pgbench_init(
                proxy.host, proxy.port, APP_USER, APP_PASSWORD, APP_DB, self.options.scale, steps="dtgp"
            )
        except PgbenchError as exc:
            raise Skip(f"loading data through pgshard (pgbench -i) failed: {exc}") from None
        self._check_placement(servers, dbname, n)
        for pg in servers:
            pg.psql("VACUUM ANALYZE", dbname=dbname)

    def _check_placement(self, servers: list[LocalPostgres], dbname: str, n: int) -> None:
        """Each shard must hold exactly the rows PostgreSQL's PARTITION BY HASH (modulus n) gives it."""
        expected = self.options.scale * ROWS_PER_SCALE
        rows: list[int | None] = []
        misplaced = 0
        no_pkey: list[int] = []
        for i, pg in enumerate(servers):
            if pg.psql("SELECT to_regclass('pgbench_accounts') IS NOT NULL", dbname=dbname) != "t":
                rows.append(None)
                continue
            out = pg.psql(
                "CREATE TEMP TABLE bench_hash_check (aid integer) PARTITION BY HASH (aid);\n"
                "SELECT count(*), count(*) FILTER (WHERE NOT satisfies_hash_partition("
                f"'bench_hash_check'::regclass, {n}, {i}, aid)), "
                "(SELECT count(*) FROM pg_index WHERE indrelid = 'pgbench_accounts'::regclass "
                "AND indisprimary) FROM pgbench_accounts;",
                dbname=dbname,
            )
            count, wrong, pkeys = (int(x) for x in out.split("|"))
            rows.append(count)
            misplaced += wrong
            if not pkeys:
                no_pkey.append(i)
        where = f"pgbench_accounts rows per shard {rows} (None: no such table; pgbench -i loaded {expected})"
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise Skip(
                f"data does not land sharded: {where}; CREATE TABLE through pgshard missed shard(s) {missing}"
            )
        if misplaced or 0 in rows:
            raise Skip(
                f"data does not land sharded: {where}, {misplaced} of them on a shard other than "
                f"PostgreSQL's hash partitioning (modulus {n}) gives"
            )
        if sum(r or 0 for r in rows) != expected:
            raise Skip(f"data does not land sharded: {where}")
        if no_pkey:
            raise Skip(f"pgbench_accounts has no primary key on shard(s) {no_pkey}: DDL missed a shard")

    # -- teardown -----------------------------------------------------------------------------------

    def collect_logs(self, out_dir: Path) -> None:
        """Keep pgshard's and PgBouncer's logs of this run next to the results (the work dir is removed)."""
        logs = out_dir / "logs"
        if logs.exists():
            shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True, exist_ok=True)
        for proxy in self.pgshards:
            for path in (proxy.log_file, proxy.config_file):
                if path.exists():
                    shutil.copyfile(path, logs / path.name)
        for bouncer in self.bouncers:
            for path in (bouncer.log_file, bouncer.stderr_file, bouncer.ini):
                if path.exists():
                    shutil.copyfile(path, logs / f"{bouncer.dir.name}-{path.name}")

    def close(self) -> None:
        for helper in self.helpers:
            helper.stop()
        for proxy in self.pgshards:
            proxy.stop()
        for bouncer in self.bouncers:
            bouncer.stop()
        self.farm.stop_all()


# --------------------------------------------------------------------------------------------------
# Helpers shared by the sections


def _warm_up(endpoints: Sequence[Endpoint], options: Options, sec: SectionResult) -> None:
    """One short run each, so pools are filled and caches warm before anything is recorded."""
    if options.quick:
        return
    for ep in endpoints:
        run = ep.pgbench(16, "simple", min(2.0, options.duration))
        if run.error:
            sec.notes.append(f"warm-up through {ep.label} failed: {run.error[:300]}")


def _record(
    sec: SectionResult, group: str, series: str, run: PgbenchRun, note: str = "", latency: bool = False
) -> None:
    """Throughput, and for one client the latency as 1/tps (finer than pgbench's 3-decimal ms)."""
    sec.figure(group, series, "throughput", "tps", note).add(run.tps if run.ok else None, run.error)
    if latency:
        value = 1e6 / run.tps if run.ok and run.tps else None
        sec.figure(group, series, "latency", "us", note).add(value, run.error)


def _failed_endpoint_runs(
    sec: SectionResult, group: str, label: str, error: str, latency: bool, note: str
) -> None:
    sec.figure(group, label, "throughput", "tps", note).add(None, error)
    if latency:
        sec.figure(group, label, "latency", "us", note).add(None, error)


# --------------------------------------------------------------------------------------------------
# Sections


def section_single(bench: Bench, sec: SectionResult) -> None:
    """pgbench -S at 1 and 16 clients in each query mode: direct, PgBouncer, pgshard (one shard)."""
    opts = bench.options
    direct = bench.direct()
    info = bench.bouncer_info()
    bouncer_label = info.label if info is not None else "PgBouncer"
    bouncer_error: str | None = None
    try:
        b = bench.bouncer()
        bouncer_ep: Endpoint | None = Endpoint(bouncer_label, b.host, b.port)
    except PgBouncerError as exc:
        bouncer_ep, bouncer_error = None, str(exc)
        sec.notes.append(f"PgBouncer unavailable: {exc}")
    shard_error: str | None = None
    try:
        proxy = bench.pgshard_single()
        shard_ep: Endpoint | None = Endpoint("pgshard", proxy.host, proxy.port, pgshard=proxy)
    except RuntimeError as exc:
        shard_ep, shard_error = None, str(exc)
        sec.notes.append(f"pgshard unavailable: {exc}")
    if info is not None:
        sec.notes.append(f"PgBouncer: {info.path} ({info.version_text})")
        if not info.prepared_support:
            sec.notes.append(info.prepared_note)
    prepared_note = info.prepared_note if info is not None and not info.prepared_support else ""
    endpoints: list[tuple[str, Endpoint | None, str | None]] = [
        ("direct", direct, None),
        (bouncer_label, bouncer_ep, bouncer_error),
        ("pgshard", shard_ep, shard_error),
    ]
    _warm_up([ep for _, ep, _ in endpoints if ep is not None], opts, sec)
    combos = [(mode, clients) for clients in (16, 1) for mode in MODES]
    for rnd in range(opts.rounds):
        for mode, clients in combos:
            group = f"{mode}, {clients} client{'s' if clients > 1 else ''}"
            _say(f"single: round {rnd + 1}/{opts.rounds}, {group}")
            for label, ep, error in rotate(endpoints, rnd):
                note = prepared_note if mode == "prepared" and label == bouncer_label else ""
                if ep is None:
                    _failed_endpoint_runs(sec, group, label, error or "unavailable", clients == 1, note)
                    continue
                _record(
                    sec, group, label, ep.pgbench(clients, mode, opts.duration), note, latency=clients == 1
                )
    for mode, clients in combos:
        group = f"{mode}, {clients} client{'s' if clients > 1 else ''}"
        note = prepared_note if mode == "prepared" else ""
        tps_shard = sec.figure(group, "pgshard", "throughput", "tps")
        tps_bouncer = sec.figure(group, bouncer_label, "throughput", "tps")
        tps_direct = sec.figure(group, "direct", "throughput", "tps")
        sec.compare(f"pgshard/PgBouncer tps, {group}", tps_shard, tps_bouncer, note=note)
        sec.compare(f"pgshard/direct tps, {group}", tps_shard, tps_direct)
    for mode in MODES:
        group = f"{mode}, 1 client"
        note = prepared_note if mode == "prepared" else ""
        lat_direct = sec.figure(group, "direct", "latency", "us")
        added: dict[str, Figure] = {}
        for label in ("pgshard", bouncer_label):
            lat = sec.figure(group, label, "latency", "us")
            fig = sec.figure(group, label, "added latency", "us", note if label == bouncer_label else "")
            fig.samples = paired(lat, lat_direct, lambda a, b: a - b)
            fig.errors = lat.errors + lat_direct.errors
            added[label] = fig
        sec.compare(
            f"added latency pgshard/PgBouncer, {group}",
            added["pgshard"],
            added[bouncer_label],
            op=lambda a, b: a / b if b > 0 else None,
            note=note,
        )


def section_sharded(bench: Bench, sec: SectionResult) -> None:
    """pgbench -S, 16 clients, through pgshard over 2 and 4 shards beside one server."""
    opts = bench.options
    layouts: list[tuple[str, Endpoint]] = []
    reasons: list[str] = []
    for n in (2, 4):
        try:
            proxy = bench.sharded(n)
        except Skip as exc:
            reasons.append(f"{n} shards: {exc}")
            continue
        layouts.append(
            (f"pgshard {n} shards", Endpoint(f"pgshard {n} shards", proxy.host, proxy.port, pgshard=proxy))
        )
    if not layouts:
        raise Skip("; ".join(reasons))
    sec.notes.extend(f"skipped {r}" for r in reasons)
    sec.notes.append("all shards share this machine's CPUs: the figures show routing overhead, not scale-out")
    endpoints = [bench.direct("one server direct")]
    try:
        proxy1 = bench.pgshard_single()
        endpoints.append(Endpoint("pgshard 1 shard", proxy1.host, proxy1.port, pgshard=proxy1))
    except RuntimeError as exc:
        sec.notes.append(f"pgshard with one shard unavailable: {exc}")
    endpoints += [ep for _, ep in layouts]
    _warm_up(endpoints, opts, sec)
    for rnd in range(opts.rounds):
        for mode in MODES:
            group = f"{mode}, 16 clients"
            _say(f"sharded: round {rnd + 1}/{opts.rounds}, {group}")
            for ep in rotate(endpoints, rnd):
                _record(sec, group, ep.label, ep.pgbench(16, mode, opts.duration))
    for mode in MODES:
        group = f"{mode}, 16 clients"
        for label, _ in layouts:
            fig = sec.figure(group, label, "throughput", "tps")
            for base in ("pgshard 1 shard", "one server direct"):
                other = sec.find(group, base, "throughput")
                if other is not None:
                    sec.compare(f"{label}/{base} tps, {group}", fig, other)


def _psql_output(host: str, port: int, dbname: str, sql: str) -> tuple[str | None, str | None]:
    """(output, None) or (None, error) of one query through psql over TCP as app/secret."""
    psql = shutil.which("psql") or str(find_bindir() / "psql")
    try:
        proc = subprocess.run(
            [
                psql,
                "-X",
                "-A",
                "-t",
                "-q",
                "-w",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                host,
                "-p",
                str(port),
                "-U",
                APP_USER,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env=client_env(APP_PASSWORD),
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return None, "psql timed out after 120s"
    if proc.returncode != 0:
        return None, proc.stderr.strip()[-500:] or f"psql exited with {proc.returncode}"
    return proc.stdout, None


def section_crossshard(bench: Bench, sec: SectionResult) -> None:
    """count(*), ORDER BY ... LIMIT 100 and GROUP BY over 4 shards, timed against one server."""
    opts = bench.options
    try:
        proxy4 = bench.sharded(4)
    except Skip as exc:
        raise Skip(f"4 shards: {exc}") from None
    single = bench.direct("single server")
    sharded = Endpoint("pgshard 4 shards", proxy4.host, proxy4.port, pgshard=proxy4)
    endpoints = [single, sharded]
    try:
        proxy1 = bench.pgshard_single()
        endpoints.append(Endpoint("pgshard 1 shard", proxy1.host, proxy1.port, pgshard=proxy1))
    except RuntimeError as exc:
        sec.notes.append(f"pgshard with one shard unavailable: {exc}")
    scripts: dict[str, Path] = {}
    wrong: dict[str, str] = {}
    for i, (name, sql) in enumerate(CROSS_SHARD_QUERIES.items()):
        script = bench.work / f"crossshard-{i}.sql"
        script.write_text(sql + "\n")
        scripts[name] = script
        expected, err = _psql_output(single.host, single.port, single.dbname, sql)
        got, err2 = _psql_output(sharded.host, sharded.port, sharded.dbname, sql)
        if err2 is not None:
            wrong[name] = f"pgshard over 4 shards fails the query: {err2}"
        elif err is None and got != expected:
            wrong[name] = "pgshard over 4 shards returns a different result than the single server"
    for name, problem in wrong.items():
        sec.notes.append(f"{name}: {problem}")
    for rnd in range(opts.rounds):
        for name, script in scripts.items():
            _say(f"crossshard: round {rnd + 1}/{opts.rounds}, {name}")
            for ep in rotate(endpoints, rnd):
                fig = sec.figure(name, ep.label, "query time", "ms")
                if ep is sharded and name in wrong:
                    fig.add(None, wrong[name])
                    continue
                run = ep.pgbench(1, "simple", opts.duration, script=script)
                fig.add(run.latency_ms if run.ok else None, run.error)
    for name in scripts:
        sec.compare(
            f"pgshard 4 shards/single server time, {name}",
            sec.figure(name, "pgshard 4 shards", "query time", "ms"),
            sec.figure(name, "single server", "query time", "ms"),
        )


def section_routing(bench: Bench, sec: SectionResult) -> None:
    """The in-process routing micro-benchmark (bench/routing.py runs router.routing_bench)."""
    result = bench_routing(bench.options.rounds, bench.options.quick)
    if isinstance(result, str):
        if result.startswith("skipped: "):
            raise Skip(result.removeprefix("skipped: "))
        raise RuntimeError(result.removeprefix("failed: "))
    sec.notes.append("router.routing_bench: best of 5 timeit runs per round, in the benchmark process")
    for key, samples in result.items():
        group, series = key.split("|", 1)
        sec.figure(group, series, "routing cost", "us").samples = [float(s) for s in samples]


def _nofile_hard() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 30 if hard == resource.RLIM_INFINITY else hard


def section_memory(bench: Bench, sec: SectionResult) -> None:
    """VmRSS of pgshard and PgBouncer, fresh, with no clients and with 1,000 and 10,000 idle clients."""
    opts = bench.options
    hard = _nofile_hard()
    counts = []
    for n in sorted(opts.memory_clients):
        need = n + 512
        if need > hard:
            sec.notes.append(f"{n} idle clients skipped: RLIMIT_NOFILE hard limit {hard} < {need} needed")
        else:
            counts.append(n)
    if not counts:
        raise Skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {min(opts.memory_clients)} clients")
    pg = bench.single_pg()
    info = bench.bouncer_info()
    systems: list[str] = ["pgshard", info.label if info is not None else "PgBouncer"]
    sec.notes.append(
        "RSS = VmRSS from /proc/<pid>/status, summed over the process and its workers; "
        "each measured on a freshly started process, clients logged in with SCRAM"
    )
    for rnd in range(opts.rounds):
        for label in rotate(systems, rnd):
            _say(f"memory: round {rnd + 1}/{opts.rounds}, {label}")
            _memory_one(bench, sec, pg, label, counts, rnd)
    for label in systems:
        idle = sec.find("idle", label, "RSS")
        top = sec.find(f"{counts[-1]} idle clients", label, "RSS")
        if idle is not None and top is not None:
            fig = sec.figure(f"per client ({counts[-1]})", label, "RSS per client", "kB")
            fig.samples = paired(top, idle, lambda a, b: (a - b) * 1000.0 / counts[-1])
    if len(systems) == 2:
        for group in ["idle", *(f"{n} idle clients" for n in counts)]:
            a, b = sec.find(group, systems[0], "RSS"), sec.find(group, systems[1], "RSS")
            if a is not None and b is not None:
                sec.compare(f"pgshard/PgBouncer RSS, {group}", a, b)


def _memory_one(
    bench: Bench, sec: SectionResult, pg: LocalPostgres, label: str, counts: list[int], rnd: int
) -> None:
    stop: Callable[[], None]
    try:
        if label == "pgshard":
            proxy = bench.new_pgshard(f"pgshard-memory-{rnd}", [pg.dsn(APP_USER, APP_PASSWORD, APP_DB)])
            host, port, rss, stop = proxy.host, proxy.port, proxy.rss_mb, proxy.stop
            status: Callable[[], str] = proxy.status
        else:
            bouncer = bench.new_bouncer(f"pgbouncer-memory-{rnd}")
            host, port, rss, stop = bouncer.host, bouncer.port, bouncer.rss_mb, bouncer.stop
            status = lambda: "running" if bouncer.pid else "PgBouncer exited"  # noqa: E731
    except (RuntimeError, PgBouncerError, OSError) as exc:
        for group in ["idle", *(f"{n} idle clients" for n in counts)]:
            sec.figure(group, label, "RSS", "MB").add(None, f"did not start: {exc}")
        return
    helper: IdleClientsHelper | None = None
    try:
        time.sleep(0.5)
        sec.figure("idle", label, "RSS", "MB").add(rss())
        helper = IdleClientsHelper(host, port, APP_USER, APP_PASSWORD, APP_DB, max(counts))
        bench.helpers.append(helper)
        opened = 0
        for n in counts:
            fig = sec.figure(f"{n} idle clients", label, "RSS", "MB")
            try:
                reply = helper.open(n - opened, timeout=max(120.0, n / 20))
            except (TimeoutError, RuntimeError, ValueError) as exc:
                fig.add(None, f"{exc}; {status()}")
                break
            opened = n
            time.sleep(1.0)  # let the pooler finish start-up bookkeeping before reading RSS
            if reply.get("failed") or reply.get("open") != n:
                fig.add(
                    None,
                    f"only {reply.get('open')} of {n} clients logged in "
                    f"({reply.get('failed')} failed: {reply.get('error')}); {status()}",
                )
                continue
            fig.add(rss())
    finally:
        if helper is not None:
            helper.stop()
            bench.helpers.remove(helper)
        stop()


def section_workers(bench: Bench, sec: SectionResult) -> None:
    """pgbench -S, 16 clients, simple, through pgshard with workers = 1 and workers = 2."""
    opts = bench.options
    pg = bench.single_pg()
    endpoints = []
    for workers in (1, 2):
        label = f"pgshard workers={workers}"
        try:
            if workers == 1:
                proxy = bench.pgshard_single()
            else:
                proxy = bench.new_pgshard(
                    "pgshard-2workers", [pg.dsn(APP_USER, APP_PASSWORD, APP_DB)], workers=2
                )
        except RuntimeError as exc:
            sec.figure("simple, 16 clients", label, "throughput", "tps").add(None, str(exc))
            continue
        endpoints.append(Endpoint(label, proxy.host, proxy.port, pgshard=proxy))
    sec.notes.append(
        f"pool_size = {opts.pool_size} is per worker: workers = 2 may open twice the server connections"
    )
    sec.notes.append(f"this machine has {os.cpu_count()} CPUs shared by PostgreSQL, pgbench and pgshard")
    _warm_up(endpoints, opts, sec)
    for rnd in range(opts.rounds):
        _say(f"workers: round {rnd + 1}/{opts.rounds}")
        for ep in rotate(endpoints, rnd):
            _record(sec, "simple, 16 clients", ep.label, ep.pgbench(16, "simple", opts.duration))
    one = sec.find("simple, 16 clients", "pgshard workers=1", "throughput")
    two = sec.find("simple, 16 clients", "pgshard workers=2", "throughput")
    if one is not None and two is not None:
        sec.compare("workers=2/workers=1 tps, simple, 16 clients", two, one)


RUNNERS: dict[str, Callable[[Bench, SectionResult], None]] = {
    "single": section_single,
    "sharded": section_sharded,
    "crossshard": section_crossshard,
    "routing": section_routing,
    "memory": section_memory,
    "workers": section_workers,
}
