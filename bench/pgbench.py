"""Running pgbench and reading its summary, so every section measures with the same tool the same way.

Why pgbench for everything that is a throughput or a latency: it is the load every PostgreSQL
pooler is judged by (PgBouncer, PgDog and SPQR publish `pgbench -S` figures), it speaks libpq in all
three query modes, and its own summary gives both throughput and average latency, measured inside
the client, without a Python driver's overhead in the way.

A run that fails (a non-zero exit, a timeout, a summary we cannot read, failed transactions) is not
an exception: it comes back as a `PgbenchRun` with `error` set, so a misbehaving proxy shows up as a
failed figure in the report instead of ending the benchmark.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("simple", "extended", "prepared")

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_TPS_ANY = re.compile(r"^tps = ([0-9.]+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)

#: Seconds a pgbench run may take beyond its -T duration (connecting, a slow first query) before
#: it is killed and reported as timed out.
GRACE = 60.0


class PgbenchError(RuntimeError):
    """pgbench could not prepare data (pgbench -i failed); the message carries its output."""


@dataclass
class PgbenchRun:
    """What one pgbench run measured, or why it did not."""

    command: list[str]
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int = 0
    error: str | None = None
    output: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.tps is not None


def pgbench_path() -> str:
    """The pgbench client: on PATH, or next to the server binaries Debian keeps off PATH."""
    found = shutil.which("pgbench")
    if found:
        return found
    from proxy.localpg import find_bindir

    candidate = find_bindir() / "pgbench"
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError("pgbench not found on PATH nor next to the PostgreSQL server binaries")


def client_env(password: str) -> dict[str, str]:
    """The caller's environment without PG* variables (they would redirect pgbench), plus the password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSQL"))}
    env["PGPASSWORD"] = password
    env["PGCONNECT_TIMEOUT"] = "10"
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


_ABORTED = re.compile(r"client (\d+) (?:script \d+ )?aborted")
_ERROR_LINE = re.compile(r"(?:ERROR|FATAL|error):\s+(.*)")


def describe_failure(stderr: str, clients: int) -> str:
    """A one-line summary of pgbench's complaints: how many clients aborted and the distinct errors."""
    aborted = {m.group(1) for m in _ABORTED.finditer(stderr)}
    messages: list[str] = []
    for line in stderr.splitlines():
        m = _ERROR_LINE.search(line)
        if m is None:
            continue
        text = m.group(1).strip()
        while inner := _ERROR_LINE.search(text):  # "client 3 aborted in command 1 query 0: ERROR:  ..."
            text = inner.group(1).strip()
        if text and text not in messages and not text.startswith("Run was aborted"):
            messages.append(text)
    parts = []
    if aborted:
        parts.append(f"{len(aborted)} of {clients} clients aborted")
    if messages:
        parts.append("; ".join(messages[:3]))
    return ": ".join(parts) if parts else _tail(stderr)


def _tail(text: str, limit: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def parse_summary(output: str) -> tuple[float | None, float | None, int | None, int]:
    """(tps, average latency in ms, transactions processed, failed transactions) from pgbench's summary."""
    m = _TPS.search(output) or _TPS_ANY.search(output)
    tps = float(m.group(1)) if m else None
    m = _LATENCY.search(output)
    latency = float(m.group(1)) if m else None
    m = _PROCESSED.search(output)
    processed = int(m.group(1)) if m else None
    m = _FAILED.search(output)
    failed = int(m.group(1)) if m else 0
    return tps, latency, processed, failed


def run_pgbench(
    host: str,
    port: int,
    user: str,
    password: str,
    dbname: str,
    *,
    clients: int,
    mode: str,
    duration: float,
    select_only: bool = True,
    script: Path | None = None,
    extra: Sequence[str] = (),
) -> PgbenchRun:
    """One timed pgbench run (`-T duration`, `-n`: no vacuum), `-j 2` from 2 clients on.

    With `script` the transaction is that file instead of the built-in `-S` (select only).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    seconds = max(1, round(duration))
    cmd = [
        pgbench_path(),
        "-n",
        "-T",
        str(seconds),
        "-c",
        str(clients),
        "-j",
        "2" if clients >= 2 else "1",
        "-M",
        mode,
        "-h",
        host,
        "-p",
        str(port),
        "-U",
        user,
    ]
    if script is not None:
        cmd += ["-f", str(script)]
    elif select_only:
        cmd.append("-S")
    cmd += [*extra, dbname]
    run = PgbenchRun(command=cmd)
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=client_env(password),
            timeout=seconds + GRACE,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        run.output = out + err
        run.error = f"pgbench timed out after {seconds + GRACE:.0f}s: {_tail(err or out)}"
        return run
    except OSError as exc:
        run.error = f"pgbench could not run: {exc}"
        return run
    run.output = proc.stdout + proc.stderr
    run.tps, run.latency_ms, run.transactions, run.failed_transactions = parse_summary(proc.stdout)
    if proc.returncode != 0:
        run.error = (
            f"pgbench exited with {proc.returncode}: {describe_failure(proc.stderr or proc.stdout, clients)}"
        )
    elif run.tps is None:
        run.error = f"no tps in pgbench output: {_tail(proc.stdout + proc.stderr)}"
    elif run.failed_transactions:
        run.error = f"{run.failed_transactions} failed transactions: {describe_failure(proc.stderr, clients)}"
    elif not run.transactions:
        run.error = f"pgbench processed no transactions: {_tail(proc.stderr or proc.stdout)}"
    return run


def pgbench_init(
    host: str,
    port: int,
    user: str,
    password: str,
    dbname: str,
    scale: int,
    steps: str = "dtgvp",
    timeout: float = 900.0,
) -> str:
    """`pgbench -i` (client-side generation, COPY) with the given init steps; returns its output.

    Raises PgbenchError with pgbench's output when it fails or times out.
    """
    cmd = [
        pgbench_path(),
        "-i",
        "-I",
        steps,
        "-s",
        str(scale),
        "-h",
        host,
        "-p",
        str(port),
        "-U",
        user,
        dbname,
    ]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=client_env(password),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise PgbenchError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise PgbenchError(
            f"{' '.join(cmd)} exited with {proc.returncode}: {_tail(proc.stderr or proc.stdout, 1500)}"
        )
    return proc.stdout + proc.stderr
