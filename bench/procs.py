"""Process plumbing shared by the benchmark: start children that die with us, wait for ports, read RSS.

Why a module of its own: PgBouncer, pgshard and the idle-client helper are all long-lived children
of the benchmark, and none of them may outlive it, not even when the benchmark is killed with
SIGKILL (PostgreSQL servers have proxy/localpg.py's watchdog for that). Each child asks the kernel
for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), set after the uid switch that PgBouncer
needs because a credential change clears it. Memory figures need the resident size of a process
and its forked workers, which only /proc tells.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from proxy.localpg import unprivileged_user

_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _set_pdeathsig() -> None:
    """preexec_fn: SIGTERM this child when the benchmark (its parent) dies, however it dies."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def server_user_kwargs() -> dict[str, Any]:
    """subprocess arguments that run a child as the unprivileged server user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(unprivileged_user())
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def chown_to_server_user(path: Path) -> None:
    """Give a directory or file to the server user (PgBouncer writes its log and pidfile there)."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam(unprivileged_user())
        os.chown(path, pw.pw_uid, pw.pw_gid)


def spawn(
    args: Sequence[str],
    *,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    as_server_user: bool = False,
    text: bool = False,
) -> subprocess.Popen[Any]:
    """Start a child that gets SIGTERM when we die; as the server user if asked (and we are root)."""
    kwargs = server_user_kwargs() if as_server_user else {}
    return subprocess.Popen(
        list(args),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        preexec_fn=_set_pdeathsig,
        text=text,
        **kwargs,
    )


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaps. Safe to call twice."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    proc: subprocess.Popen[Any], host: str, port: int, timeout: float, log_file: Path | None = None
) -> None:
    """Return once `proc` accepts connections on the port; raise RuntimeError if it dies or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening{log_tail(log_file)}")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on {host}:{port} after {timeout:.0f}s{log_tail(log_file)}")


def log_tail(path: Path | None, limit: int = 1500) -> str:
    """The end of a log file, formatted to append to an error message (empty if nothing to show)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    if not text:
        return ""
    return f"; log tail ({path}):\n{text[-limit:]}"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (pgshard's SO_REUSEPORT workers are forked children)."""
    tree = [pid]
    i = 0
    while i < len(tree):
        tree.extend(_children(tree[i]))
        i += 1
    return tree


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, summed, in MB (10^6 bytes, as the bar is set)."""
    return sum(rss_kib(p) for p in process_tree(pid)) * 1024 / 1e6
