"""Throw-away local PostgreSQL servers for `pgshard demo`, the test fixtures and the benchmark.

Why this module exists: every end-to-end check of pgshard (the demo, the e2e tests, the side-by-side
benchmark) needs real PostgreSQL shard servers that appear in a second and vanish without a trace.
Three facts of the machines we run on shape it:

* PostgreSQL refuses to run as root, and we often are root. So every server process (initdb, pg_ctl,
  postgres) runs as an unprivileged OS user: the `postgres` user when the system has one, else a
  system user `pgshard` that we create (see `unprivileged_user()`). That user must be able to enter
  every directory above its data directory; pytest's and mkdtemp's directories are mode 0700 under
  root, so throw-away servers live under `/tmp/pgshard-<purpose>-<random>` (mode 0755, see
  `make_base_dir()`), and each server's own directory is owned by that user. When we are not root,
  everything simply runs as the current user.
* The server binaries are not on PATH on Debian (see `find_bindir()`).
* Servers must never outlive the process that started them, even when that process is killed with
  SIGKILL (a pytest run killed by a timeout must not leave postgres processes and /tmp directories
  behind). pg_ctl puts the postmaster in its own session, so killing our process group does not
  reach it.

How servers are cleaned up:

* Normal exit: an `atexit` handler stops (fast mode) every server this process started and removes
  the throw-away directories.
* Abnormal exit: the first time a server or throw-away directory is registered, the process starts
  one watchdog per process: a tiny Python child (this file run with ``--watchdog``) in a new session
  (so terminal signals and process-group kills do not reach it), whose stdin is the read end of a
  pipe. Only this process holds the write end (it is close-on-exec and is closed in forked
  children), and registrations travel over it as JSON lines. When the owning process dies in any
  way, the kernel closes the write end, the watchdog reads EOF at once (no polling delay), runs
  ``pg_ctl stop -m immediate`` for every data directory still registered (SIGKILL to the
  postmaster if that fails) and deletes the registered throw-away directories. On a normal exit the
  atexit handler has already unregistered everything, closes the pipe and reaps the watchdog.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

__all__ = [
    "DEFAULT_SETTINGS",
    "FALLBACK_USER",
    "LocalPostgres",
    "LocalPostgresError",
    "PostgresNotFoundError",
    "find_bindir",
    "free_port",
    "make_base_dir",
    "remove_base_dir",
    "unprivileged_user",
]

#: OS user created (``useradd -r``) to run servers when we are root and there is no `postgres` user.
FALLBACK_USER = "pgshard"

#: Settings written for every server unless overridden by ``settings``: durability off because
#: these servers are disposable and speed matters; two-phase commit needs prepared transactions.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "max_prepared_transactions": "100",
}

HOST = "127.0.0.1"
_SETTINGS_FILE = "pgshard.conf"
_INCLUDE_LINE = f"include '{_SETTINGS_FILE}'\n"
_UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes; PostgreSQL refuses longer socket paths
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SETTING_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class LocalPostgresError(RuntimeError):
    """A local server could not be created, started, stopped or queried."""


class PostgresNotFoundError(LocalPostgresError):
    """No PostgreSQL server binaries on this machine; e2e tests and the demo cannot run."""


# --------------------------------------------------------------------------------------------------
# Discovery and OS users


def _has_initdb(bindir: Path) -> bool:
    return (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()


def _version_key(path: Path) -> tuple[int, ...]:
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) or (-1,)


@cache
def find_bindir() -> Path:
    """Locate the server binaries, which Debian keeps off PATH.

    Order: ``$PGSHARD_PG_BINDIR``, ``pg_config --bindir``, the newest ``/usr/lib/postgresql/*/bin``,
    the directory of an ``initdb`` on PATH.
    """
    tried: list[str] = []
    env_dir = os.environ.get("PGSHARD_PG_BINDIR")
    if env_dir:
        if _has_initdb(Path(env_dir)):
            return Path(env_dir)
        tried.append(f"$PGSHARD_PG_BINDIR={env_dir}")
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_initdb(Path(out)):
            return Path(out)
        tried.append(f"pg_config --bindir ({out or 'failed'})")
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_initdb(candidate):
            return candidate
    tried.append("/usr/lib/postgresql/*/bin")
    initdb = shutil.which("initdb")
    if initdb and _has_initdb(Path(initdb).resolve().parent):
        return Path(initdb).resolve().parent
    tried.append("initdb on PATH")
    raise PostgresNotFoundError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found; tried "
        + ", ".join(tried)
        + ". Install the PostgreSQL server package or set PGSHARD_PG_BINDIR."
    )


def free_port() -> int:
    """A TCP port that was free a moment ago, for servers whose port the caller does not care about."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@cache
def unprivileged_user() -> str:
    """The OS user that server processes run as, since PostgreSQL refuses root.

    Not root: the current user. Root: ``postgres`` if it exists, else ``pgshard`` (created once).
    """
    if os.geteuid() != 0:
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return os.environ.get("USER") or str(os.geteuid())
    for name in ("postgres", FALLBACK_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    proc = subprocess.run(
        [useradd, "-r", "-U", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", FALLBACK_USER],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        pwd.getpwnam(FALLBACK_USER)  # also covers a concurrent creator winning the race
    except KeyError:
        raise LocalPostgresError(
            f"running as root and there is no 'postgres' user; creating '{FALLBACK_USER}' failed: "
            f"{proc.stderr.strip()}"
        ) from None
    return FALLBACK_USER


def _as_server_kwargs() -> dict[str, Any]:
    """subprocess arguments that drop root for server processes (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(unprivileged_user())
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _chown_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(unprivileged_user())
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _clean_env(server: bool) -> dict[str, str]:
    """Environment without the caller's PG* variables, which would redirect or break our commands."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSQL"))}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if server and os.geteuid() == 0:
        pw = pwd.getpwnam(unprivileged_user())
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    return env


def _check_traversable(path: Path) -> None:
    """Fail early, with advice, when the server user could not reach its own directory."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(unprivileged_user())
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == pw.pw_gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            raise LocalPostgresError(
                f"{p} (mode {st.st_mode & 0o7777:o}) cannot be entered by the OS user "
                f"'{pw.pw_name}' that PostgreSQL runs as (it refuses root); put the server under "
                f"a directory like the ones make_base_dir() creates"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    comm = Path(f"/proc/{pid}/comm")
    if comm.parent.exists():
        try:
            return comm.read_text().strip() in ("postgres", "postmaster")
        except OSError:
            return False
    return True


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# The process-wide guard: atexit cleanup plus the watchdog that outlives us by a moment


class _Guard:
    """What this process must clean up, mirrored to a watchdog that acts if we die abruptly."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._after_fork_in_child)
        atexit.register(self.shutdown)

    def _reset(self) -> None:
        self.lock = threading.RLock()
        self.owner_pid = os.getpid()
        self.servers: dict[str, LocalPostgres] = {}
        self.dirs: dict[str, None] = {}  # ordered set
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_fd: int | None = None

    def _after_fork_in_child(self) -> None:
        # A forked child does not own its parent's servers and must not keep the pipe open.
        if self.write_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.write_fd)
        self._reset()

    def _ensure_watchdog(self) -> None:
        if self.proc is not None:
            return
        read_fd, write_fd = os.pipe()  # both close-on-exec
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--watchdog"],
                stdin=read_fd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                cwd="/",
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self.write_fd = write_fd

    def _send(self, msg: dict[str, str]) -> None:
        self._ensure_watchdog()
        assert self.write_fd is not None
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.write_fd, data) :]
        except OSError as exc:
            raise LocalPostgresError(f"the cleanup watchdog is gone ({exc}); refusing to continue") from exc

    def add_server(self, pg: LocalPostgres) -> None:
        with self.lock:
            key = str(pg.data_dir)
            if key not in self.servers:
                self._send({"op": "server", "data": key, "bindir": str(pg.bindir), "user": pg.os_user})
            self.servers[key] = pg

    def remove_server(self, pg: LocalPostgres) -> None:
        with self.lock:
            key = str(pg.data_dir)
            if self.servers.pop(key, None) is not None and self.write_fd is not None:
                with contextlib.suppress(LocalPostgresError):
                    self._send({"op": "unserver", "data": key})

    def add_dir(self, path: Path) -> None:
        with self.lock:
            self._send({"op": "dir", "path": str(path)})
            self.dirs[str(path)] = None

    def remove_dir(self, path: Path) -> None:
        with self.lock:
            if str(path) in self.dirs:
                del self.dirs[str(path)]
                with contextlib.suppress(LocalPostgresError):
                    self._send({"op": "undir", "path": str(path)})

    def shutdown(self) -> None:
        """atexit: stop our servers, delete our throw-away dirs, then let the watchdog go."""
        with self.lock:
            if os.getpid() != self.owner_pid:
                return
            for pg in list(self.servers.values()):
                with contextlib.suppress(Exception):
                    pg.stop()
            for path in reversed(list(self.dirs)):
                shutil.rmtree(path, ignore_errors=True)
                self.remove_dir(Path(path))
            if self.write_fd is not None:
                os.close(self.write_fd)
                self.write_fd = None
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=30)
                self.proc = None


_GUARD = _Guard()


def _watchdog_main() -> None:
    """Body of the watchdog process: remember registrations until EOF, then clean up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    servers: dict[str, dict[str, str]] = {}
    dirs: dict[str, None] = {}
    for raw in sys.stdin.buffer:
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        op = msg.get("op")
        if op == "server":
            servers[msg["data"]] = msg
        elif op == "unserver":
            servers.pop(msg["data"], None)
        elif op == "dir":
            dirs[msg["path"]] = None
        elif op == "undir":
            dirs.pop(msg["path"], None)
    # The owner is gone: stop what it left running, then delete its throw-away directories.
    for data, info in servers.items():
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(info["user"])
                kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [
                    str(Path(info["bindir"]) / "pg_ctl"),
                    "stop",
                    "-D",
                    data,
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                timeout=40,
                **kwargs,
            )
        pid = _postmaster_pid(Path(data))
        if pid is not None and _pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for path in reversed(list(dirs)):
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Throw-away directories


def make_base_dir(purpose: str) -> Path:
    """A fresh directory the server user can enter, deleted when this process ends (even by SIGKILL).

    Lives directly in /tmp because tempfile/pytest directories are 0700 under root.
    """
    if not _NAME_RE.fullmatch(purpose):
        raise ValueError(f"purpose must match {_NAME_RE.pattern}: {purpose!r}")
    parent = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix=f"pgshard-{purpose}-", dir=parent))
    path.chmod(0o755)
    _GUARD.add_dir(path)
    return path


def remove_base_dir(path: Path) -> None:
    """Delete a make_base_dir() directory now (stop its servers first) rather than at exit."""
    shutil.rmtree(path, ignore_errors=True)
    _GUARD.remove_dir(Path(path))


# --------------------------------------------------------------------------------------------------
# The server


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _conf_value(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


class LocalPostgres:
    """One disposable PostgreSQL server in ``base_dir/name`` (data/, postgres.log, its unix socket).

    Data survives stop()/start() and a new LocalPostgres over the same directory reuses it, so the
    demo can keep its data folder; throw-away use puts ``base_dir`` under make_base_dir().
    """

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        name: str = "pg",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"name must match {_NAME_RE.pattern}: {name!r}")
        self.settings: dict[str, str] = {str(k): str(v) for k, v in (settings or {}).items()}
        for key in self.settings:
            if not _SETTING_RE.fullmatch(key):
                raise ValueError(f"not a PostgreSQL setting name: {key!r}")
            if key.lower() in ("port", "unix_socket_directories"):
                raise ValueError(f"{key} is managed by LocalPostgres; pass port= instead")
        self.name = name
        self.base_dir = Path(base_dir).absolute()
        self.dir = self.base_dir / name
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "postgres.log"
        self.bindir = find_bindir()
        self.os_user = unprivileged_user()
        self._auto_port = port is None
        self._port = free_port() if port is None else int(port)
        self._socket_dir: Path | None = None
        if len(str(self.dir / ".s.PGSQL.65535.lock")) <= _UNIX_SOCKET_MAX:
            self._socket_dir = self.dir

    def __repr__(self) -> str:
        return f"LocalPostgres(name={self.name!r}, port={self._port}, dir={str(self.dir)!r})"

    # -- properties ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """TCP address the server listens on (loopback only)."""
        return HOST

    @property
    def port(self) -> int:
        """TCP port; may change on start() if it was chosen automatically and got taken."""
        return self._port

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's unix socket, private to this server."""
        if self._socket_dir is None:
            # The server's own directory is too deep for a unix socket path.
            self._socket_dir = make_base_dir("sock")
            _chown_to_server_user(self._socket_dir)
        return self._socket_dir

    @property
    def initialized(self) -> bool:
        """Whether the data directory exists (init() done, possibly by an earlier process)."""
        return (self.data_dir / "PG_VERSION").is_file()

    # -- helpers ------------------------------------------------------------------------------------

    def _run_server_cmd(
        self, args: Sequence[str], timeout: float, what: str
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=self.dir,
                env=_clean_env(server=True),
                timeout=timeout,
                **_as_server_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalPostgresError(f"{what} of {self.name} timed out after {timeout:.0f}s") from exc

    def _ensure_dirs(self) -> None:
        if not self.base_dir.exists():
            self.base_dir.mkdir(parents=True)
            self.base_dir.chmod(0o755)
        _check_traversable(self.base_dir)
        if not self.dir.exists():
            self.dir.mkdir()
            self.dir.chmod(0o755)
            _chown_to_server_user(self.dir)
        _check_traversable(self.dir)
        _ = self.socket_dir

    def _write_file(self, path: Path, text: str) -> None:
        """Replace a config file atomically so a reloading server never sees half of it."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        _chown_to_server_user(tmp)
        os.replace(tmp, path)

    def _write_settings(self) -> None:
        conf: dict[str, str] = {
            "listen_addresses": HOST,
            "port": str(self._port),
            "unix_socket_directories": str(self.socket_dir),
            **DEFAULT_SETTINGS,
            **self.settings,
        }
        lines = ["# Written by pgshard (proxy/localpg.py) at every start; change `settings` instead."]
        lines += [f"{k} = {_conf_value(v)}" for k, v in conf.items()]
        self._write_file(self.data_dir / _SETTINGS_FILE, "\n".join(lines) + "\n")

    def _log_tail(self, offset: int, limit: int = 4000) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")[-limit:]
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------------------------

    def init(self, template: LocalPostgres | Path | None = None) -> None:
        """Create the data directory: initdb, or a copy of a stopped template (much faster than initdb).

        A template copy keeps the template's roles, databases and pg_hba.conf.
        """
        if self.initialized:
            raise LocalPostgresError(f"{self.data_dir} is already initialized")
        self._ensure_dirs()
        if template is not None:
            src = template.data_dir if isinstance(template, LocalPostgres) else Path(template)
            pid = _postmaster_pid(src)
            if pid is not None and _pid_alive(pid):
                raise LocalPostgresError(f"template {src} is running; stop it before copying")
            proc = self._run_server_cmd(["cp", "-a", str(src), str(self.data_dir)], 300, "copy")
            if proc.returncode != 0:
                raise LocalPostgresError(f"copying {src} failed: {proc.stderr.strip()}")
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        else:
            proc = self._run_server_cmd(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    f"--locale={_best_locale()}",
                    "--no-sync",
                ],
                300,
                "initdb",
            )
            if proc.returncode != 0:
                raise LocalPostgresError(f"initdb for {self.name} failed:\n{proc.stdout}\n{proc.stderr}")
            self._write_file(
                self.data_dir / "pg_hba.conf",
                "local all all trust\n"
                f"host all all {HOST}/32 scram-sha-256\n"
                "host all all ::1/128 scram-sha-256\n",
            )
        conf = self.data_dir / "postgresql.conf"
        if _INCLUDE_LINE not in conf.read_text():
            with conf.open("a") as f:
                f.write("\n" + _INCLUDE_LINE)
        self._write_settings()

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once it accepts connections (pg_ctl -w, with a deadline)."""
        if not self.initialized:
            raise LocalPostgresError(f"{self.data_dir} is not initialized; call init() first")
        if self.is_running():
            return
        self._ensure_dirs()
        _GUARD.add_server(self)
        attempts = 5 if self._auto_port else 1
        for attempt in range(attempts):
            self._write_settings()
            offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            proc = self._run_server_cmd(
                [
                    str(self.bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(max(1, int(timeout))),
                    "-s",
                ],
                timeout + 15,
                "start",
            )
            if proc.returncode == 0:
                return
            tail = self._log_tail(offset)
            port_taken = "could not bind" in tail or "already in use" in tail
            if port_taken and attempt + 1 < attempts and not self.is_running():
                self._port = free_port()  # somebody took the port between free_port() and bind()
                continue
            if not self.is_running():
                _GUARD.remove_server(self)
            raise LocalPostgresError(
                f"starting {self.name} on port {self._port} failed: {proc.stderr.strip()}\n"
                f"--- {self.log_file} ---\n{tail}"
            )

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Stop the server if it runs; idempotent. mode: smart, fast or immediate."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad stop mode {mode!r}")
        if self.is_running():
            proc = self._run_server_cmd(
                [
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    str(max(1, int(timeout))),
                    "-s",
                ],
                timeout + 15,
                "stop",
            )
            if proc.returncode != 0 and self.is_running():
                raise LocalPostgresError(f"stopping {self.name} failed: {proc.stderr.strip()}")
        _GUARD.remove_server(self)

    def is_running(self) -> bool:
        """Whether a postmaster for this data directory is alive."""
        pid = _postmaster_pid(self.data_dir)
        return pid is not None and _pid_alive(pid)

    def __enter__(self) -> Self:
        if not self.initialized:
            self.init()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients and administration -----------------------------------------------------------------

    def dsn(self, user: str = "postgres", password: str | None = None, dbname: str = "postgres") -> str:
        """A postgresql:// URL for TCP clients (asyncpg, psycopg, the proxy's shard config)."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{HOST}:{self._port}/{quote(dbname, safe='')}"

    def psql(self, sql: str, dbname: str = "postgres", user: str = "postgres") -> str:
        """Run SQL as a trusted local client and return its unaligned, tuples-only output.

        Statements run one by one (so CREATE DATABASE works) and stop at the first error, which is
        raised with psql's stderr. The final newline is removed: ``psql("select 1") == "1"``.
        """
        try:
            proc = subprocess.run(
                [
                    str(self.bindir / "psql"),
                    "-X",
                    "-A",
                    "-t",
                    "-q",
                    "-w",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    str(self.socket_dir),
                    "-p",
                    str(self._port),
                    "-U",
                    user,
                    "-d",
                    dbname,
                    "-f",
                    "-",
                ],
                input=sql,
                capture_output=True,
                text=True,
                env=_clean_env(server=False),
                timeout=300,
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalPostgresError(f"psql on {self.name} timed out: {sql[:200]}") from exc
        if proc.returncode != 0:
            raise LocalPostgresError(
                f"psql on {self.name} (db {dbname}, user {user}) failed: {proc.stderr.strip()}"
            )
        return proc.stdout.removesuffix("\n")

    def create_role(
        self,
        name: str,
        password: str | None,
        login: bool = True,
        superuser: bool = False,
        method: str = "scram-sha-256",
    ) -> None:
        """Create a role; method="md5" stores an md5 hash, for testing md5 authentication paths."""
        if method not in ("scram-sha-256", "md5"):
            raise ValueError(f"method must be scram-sha-256 or md5, not {method!r}")
        attrs = ["LOGIN" if login else "NOLOGIN", "SUPERUSER" if superuser else "NOSUPERUSER"]
        if password is not None:
            attrs.append("PASSWORD " + _quote_literal(password))
        self.psql(
            f"SET password_encryption = {_quote_literal(method)};\n"
            f"CREATE ROLE {_quote_ident(name)} WITH {' '.join(attrs)};\n"
        )

    def create_database(self, name: str, owner: str = "postgres") -> None:
        """Create a database owned by ``owner``."""
        self.psql(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(owner)};\n")

    def set_hba(self, lines: list[str]) -> None:
        """Replace the authentication rules (after a leading ``local all all trust``) and apply them.

        The unix-socket trust line stays first so that psql() keeps working. A file the server
        rejects is rolled back and raised.
        """
        hba = self.data_dir / "pg_hba.conf"
        old = hba.read_text()
        self._write_file(hba, "local all all trust\n" + "".join(line.rstrip("\n") + "\n" for line in lines))
        if not self.is_running():
            return
        errors = self.psql(
            "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL"
        )
        if errors:
            self._write_file(hba, old)
            raise LocalPostgresError(f"pg_hba.conf rejected by {self.name}:\n{errors}")
        self.reload()

    def reload(self, timeout: float = 30.0) -> None:
        """Make the server re-read its configuration; returns once new connections see it."""
        if not self.is_running():
            return
        before = float(
            self.psql("SELECT extract(epoch FROM pg_conf_load_time());\nSELECT pg_reload_conf();").split()[0]
        )
        deadline = time.monotonic() + timeout
        # Each psql is a new backend, forked with the postmaster's load time: once it is newer, the
        # postmaster has finished reloading (pg_hba.conf included) before forking it.
        while float(self.psql("SELECT extract(epoch FROM pg_conf_load_time())")) <= before:
            if time.monotonic() > deadline:
                raise LocalPostgresError(f"{self.name} did not reload its configuration in {timeout:.0f}s")
            time.sleep(0.01)


@cache
def _best_locale() -> str:
    """C.UTF-8 when the system has it (UTF8 collation-free but encoding-correct), else C."""
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "C"
    names = {line.strip().lower().replace("-", "") for line in out.splitlines()}
    return "C.UTF-8" if "c.utf8" in names else "C"


if __name__ == "__main__" and sys.argv[1:] == ["--watchdog"]:
    _watchdog_main()
