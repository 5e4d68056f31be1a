"""The things the benchmark measures: its own PostgreSQL servers and pgshard processes.

Why the benchmark starts everything itself: figures taken side by side in one run on one machine
are comparable (the same kernel, the same load, the same data); figures from different runs or
machines are not. PostgreSQL servers come from proxy/localpg.py (as the unprivileged user, stopped
even if we are killed); every server is a copy of one initdb'd template holding the role and
database the loads use, which takes a fraction of a second instead of an initdb each.

pgshard runs as `python -m proxy.cli run -c FILE` from the repository, exactly as a user runs it,
with `log_level = "warning"` so that per-login log lines (which PgBouncer also does not write here)
do not weigh on the figures; its stderr goes to a file whose tail is quoted when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import log_tail, spawn, stop_process, tree_rss_mb, wait_for_port
from proxy.localpg import LocalPostgres, free_port

APP_USER = "app"
APP_PASSWORD = "secret"
APP_DB = "app"
HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Server settings for every benchmark server on top of localpg's (fsync off and so on): room for
#: the direct clients, PgBouncer's and pgshard's pools (two workers double pgshard's) at once.
PG_SETTINGS = {"max_connections": "300"}


class PostgresFarm:
    """Benchmark PostgreSQL servers, each a copy of one template with role app/secret owning db app."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.servers: dict[str, LocalPostgres] = {}
        self._template: LocalPostgres | None = None

    def _template_server(self) -> LocalPostgres:
        if self._template is None:
            tpl = LocalPostgres(self.base_dir, name="template", settings=PG_SETTINGS)
            tpl.init()
            tpl.start()
            try:
                tpl.create_role(APP_USER, APP_PASSWORD)
                tpl.create_database(APP_DB, owner=APP_USER)
            finally:
                tpl.stop()
            self._template = tpl
        return self._template

    def get(self, name: str) -> LocalPostgres:
        """The running server `name`, created from the template on first use."""
        pg = self.servers.get(name)
        if pg is None:
            pg = LocalPostgres(self.base_dir, name=name, settings=PG_SETTINGS)
            pg.init(template=self._template_server())
            self.servers[name] = pg
        if not pg.is_running():
            pg.start()
        return pg

    def many(self, names: Sequence[str]) -> list[LocalPostgres]:
        """Several servers, started in parallel (start-up is mostly waiting)."""
        self._template_server()
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            return list(pool.map(self.get, names))

    def stop_all(self) -> None:
        with ThreadPoolExecutor(max_workers=max(1, len(self.servers))) as pool:
            list(pool.map(lambda pg: pg.stop(), list(self.servers.values())))


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class ShardedTable:
    name: str
    column: str
    data_type: str


@dataclass
class PgShardConfig:
    """What the benchmark varies in pgshard's TOML; everything else stays at pgshard's defaults."""

    port: int
    shards: list[str]  # postgresql:// URLs, in shard order
    pool_size: int = 16
    workers: int = 1
    max_client_conn: int = 11000
    sharded_tables: list[ShardedTable] = field(default_factory=list)

    def to_toml(self) -> str:
        lines = [
            "# Written by the pgshard benchmark (bench/servers.py).",
            "[general]",
            f'listen = "{HOST}:{self.port}"',
            'pool_mode = "transaction"',
            f"workers = {self.workers}",
            f"max_client_conn = {self.max_client_conn}",
            'log_level = "warning"',
            "",
            "[[users]]",
            f"name = {_toml_str(APP_USER)}",
            f"password = {_toml_str(APP_PASSWORD)}",
            f"pool_size = {self.pool_size}",
            "",
            "[[databases]]",
            f"name = {_toml_str(APP_DB)}",
        ]
        for url in self.shards:
            lines += ["", "[[databases.shards]]", f"primary = {_toml_str(url)}"]
        for table in self.sharded_tables:
            lines += [
                "",
                "[[databases.sharded_tables]]",
                f"name = {_toml_str(table.name)}",
                f"column = {_toml_str(table.column)}",
                f"data_type = {_toml_str(table.data_type)}",
            ]
        return "\n".join(lines) + "\n"


def pgshard_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONSTARTUP", None)
    return env


class PgShard:
    """One pgshard process (and its workers) serving database `app` for user app/secret."""

    def __init__(self, directory: Path, name: str, config: PgShardConfig) -> None:
        self.dir = directory
        self.name = name
        self.config = config
        self.host = HOST
        self.port = config.port
        self.config_file = directory / f"{name}.toml"
        self.log_file = directory / f"{name}.log"
        self.proc: subprocess.Popen[Any] | None = None

    @classmethod
    def create(cls, directory: Path, name: str, shards: list[str], **kwargs: Any) -> PgShard:
        return cls(directory, name, PgShardConfig(port=free_port(), shards=shards, **kwargs))

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config_file)]

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.config.to_toml())

    def check(self) -> str | None:
        """`pgshard check -c FILE`: None if the config is accepted, else pgshard's message."""
        self._write_config()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "proxy.cli", "check", "-c", str(self.config_file)],
                capture_output=True,
                text=True,
                cwd=REPO_ROOT,
                env=pgshard_env(),
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            return "pgshard check timed out after 60s"
        if proc.returncode != 0:
            return (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}")[-1500:]
        return None

    def start(self, timeout: float = 30.0) -> None:
        """Start pgshard and return once it accepts connections (and its workers had a moment)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_config()
        with self.log_file.open("ab") as log:
            self.proc = spawn(self.command, stderr=log, stdout=log, cwd=REPO_ROOT, env=pgshard_env())
        try:
            wait_for_port(self.proc, self.host, self.port, timeout, self.log_file)
        except RuntimeError as exc:
            stop_process(self.proc)
            raise RuntimeError(f"pgshard ({self.name}) did not start: {exc}") from None
        if self.config.workers > 1:
            time.sleep(1.0)  # SO_REUSEPORT: let every worker bind before clients are spread over them

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> str:
        """'running', or how it ended plus its log tail, for error messages."""
        if self.alive():
            return "running"
        code = None if self.proc is None else self.proc.returncode
        return f"pgshard ({self.name}) exited with status {code}{log_tail(self.log_file)}"

    def rss_mb(self) -> float:
        """VmRSS of pgshard and its worker processes, summed."""
        return tree_rss_mb(self.proc.pid) if self.alive() and self.proc is not None else 0.0

    def stop(self) -> None:
        stop_process(self.proc)
