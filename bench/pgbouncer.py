"""PgBouncer, the reference every figure of pgshard is compared with, run the way the comparison is fair.

Why this configuration: pgshard is measured in transaction pooling on loopback TCP with SCRAM logins
and a pool of `pool_size` server connections per (user, database, shard); PgBouncer gets the same
(`pool_mode = transaction`, `default_pool_size` = the same size, which is PgBouncer's size per
user/database pair, `auth_type = scram-sha-256`). The userlist holds the password in plain text,
which PgBouncer (1.14 and later) accepts for SCRAM to clients and uses to log in to PostgreSQL
with SCRAM as well. The unix socket is off, connection logging is off (pgshard runs with
`log_level = "warning"` too), and `max_client_conn`/`listen_backlog` leave room for the 10,000
idle clients of the memory section.

PgBouncer refuses to run as root, so it runs as the unprivileged server user from a directory that
user owns; it runs in the foreground as our child (no -d), so stopping it is killing our child, and
it gets SIGTERM if the benchmark dies (bench/procs.py).

Which PgBouncer matters for `-M prepared`: prepared-statement support in transaction mode arrived
in 1.21 (`max_prepared_statements`); before that `pgbench -M prepared` works through PgBouncer only
because every pgbench client uses the same statement names and SQL, so a statement one client
prepared on a server connection is there for the next. `prepared_support()` says which case a run
is in, and the report marks those figures.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bench.procs import chown_to_server_user, spawn, stop_process, tree_rss_mb, wait_for_port

#: First PgBouncer release that supports protocol-level prepared statements in transaction mode.
PREPARED_SUPPORT_SINCE = (1, 21)
_VERSION = re.compile(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?")


class PgBouncerError(RuntimeError):
    """PgBouncer is missing or did not start."""


def find_pgbouncer() -> str | None:
    """The binary named by $PGBOUNCER, else `pgbouncer` on PATH, else Debian's /usr/sbin/pgbouncer."""
    named = os.environ.get("PGBOUNCER")
    if named:
        return named if Path(named).is_file() else shutil.which(named)
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None
    )


@dataclass(frozen=True)
class PgBouncerInfo:
    """Which PgBouncer the comparison runs against."""

    path: str
    version: tuple[int, ...]
    version_text: str

    @property
    def label(self) -> str:
        return f"PgBouncer {'.'.join(map(str, self.version))}"

    @property
    def prepared_support(self) -> bool:
        return self.version[:2] >= PREPARED_SUPPORT_SINCE

    @property
    def prepared_note(self) -> str:
        """What a `-M prepared` figure through this PgBouncer means."""
        if self.prepared_support:
            return f"{self.label} with prepared-statement support (max_prepared_statements)"
        return (
            f"{self.label} has no prepared-statement support (arrived in 1.21): -M prepared works "
            "through it only by accident (every pgbench client uses the same statement names) and "
            "breaks when a client lands on a server connection where its statement is missing or "
            "already prepared"
        )


@cache
def pgbouncer_info() -> PgBouncerInfo:
    """Locate PgBouncer and read its version from `pgbouncer --version`."""
    path = find_pgbouncer()
    if path is None:
        raise PgBouncerError("PgBouncer not found: install it (Debian: pgbouncer) or set PGBOUNCER=/path")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PgBouncerError(f"{path} --version failed: {exc}") from exc
    text = (proc.stdout + proc.stderr).strip()
    m = _VERSION.search(text)
    if m is None:
        raise PgBouncerError(f"cannot read a version from `{path} --version`: {text[:200]!r}")
    version = tuple(int(g) for g in m.groups() if g is not None)
    return PgBouncerInfo(path=path, version=version, version_text=text.splitlines()[0])


class PgBouncer:
    """One PgBouncer in transaction mode in front of one PostgreSQL database."""

    def __init__(
        self,
        directory: Path,
        port: int,
        backend_host: str,
        backend_port: int,
        backend_dbname: str,
        dbname: str,
        user: str,
        password: str,
        pool_size: int,
        max_client_conn: int = 11000,
    ) -> None:
        self.info = pgbouncer_info()
        self.dir = directory
        self.host = "127.0.0.1"
        self.port = port
        self.dbname = dbname
        self.user = user
        self.password = password
        self.ini = directory / "pgbouncer.ini"
        self.log_file = directory / "pgbouncer.log"
        self.stderr_file = directory / "pgbouncer.stderr"
        self.proc: subprocess.Popen[Any] | None = None
        self._config = {
            "listen_addr": self.host,
            "listen_port": str(port),
            "unix_socket_dir": "",
            "listen_backlog": "4096",
            "pool_mode": "transaction",
            "auth_type": "scram-sha-256",
            "auth_file": str(directory / "userlist.txt"),
            "default_pool_size": str(pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": str(max_client_conn),
            "ignore_startup_parameters": "extra_float_digits",
            "server_tls_sslmode": "disable",
            "client_tls_sslmode": "disable",
            "log_connections": "0",
            "log_disconnections": "0",
            "log_pooler_errors": "1",
            "logfile": str(self.log_file),
            "pidfile": str(directory / "pgbouncer.pid"),
            "server_idle_timeout": "600",
        }
        self._database_line = f"{dbname} = host={backend_host} port={backend_port} dbname={backend_dbname}"

    def _write_files(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        chown_to_server_user(self.dir)
        lines = ["[databases]", self._database_line, "", "[pgbouncer]"]
        lines += [f"{k} = {v}" for k, v in self._config.items()]
        self.ini.write_text("\n".join(lines) + "\n")
        userlist = self.dir / "userlist.txt"
        userlist.write_text(f'"{self.user}" "{self.password}"\n')
        for path in (self.ini, userlist):
            path.chmod(0o600)
            chown_to_server_user(path)

    def start(self, timeout: float = 20.0) -> None:
        """Start in the foreground as our child; return once it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_files()
        with self.stderr_file.open("wb") as err:
            self.proc = spawn(
                [self.info.path, str(self.ini)],
                stderr=err,
                stdout=err,
                cwd=self.dir,
                as_server_user=True,
            )
        try:
            wait_for_port(self.proc, self.host, self.port, timeout, self.log_file)
        except RuntimeError as exc:
            stop_process(self.proc)
            stderr = self.stderr_file.read_text(errors="replace").strip()[-800:]
            raise PgBouncerError(f"{self.info.label} did not start: {exc}\n{stderr}") from None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def rss_mb(self) -> float:
        pid = self.pid
        return tree_rss_mb(pid) if pid is not None else 0.0

    def stop(self) -> None:
        stop_process(self.proc)
