"""A helper process that holds thousands of logged-in, idle client connections to a pooler.

Why a separate process and raw sockets: the memory section asks how much a pooler keeps per idle
client, with 1,000 and 10,000 of them. A driver connection (asyncpg, psycopg) weighs far more than
a socket and would make the client side the bottleneck, and the benchmark process must not share
its file-descriptor budget with them. So this tiny asyncio client does only what a real client
does to become an idle session: StartupMessage, the SCRAM-SHA-256 exchange (or md5/cleartext if
asked), wait for ReadyForQuery, then nothing. Messages are built and read with pgshard's own
sans-IO codec (`proxy.protocol`), which is independent of pgshard's server side.

Protocol with the parent, one JSON line per command on stdin/stdout:
    {"open": N}   open N more connections -> {"open": total, "failed": n, "error": first error or null}
    {"close": true}  close all               -> {"open": 0}
End of stdin closes everything and exits, so the helper never outlives the benchmark.

Run: python -m bench.idle_clients --host H --port P --user U --password PW --dbname D
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import subprocess
import sys
from typing import Any

from proxy.protocol import backend, frontend
from proxy.protocol.auth import ScramClient, md5_password
from proxy.protocol.startup import startup

#: Logins in flight at once: enough to go fast, few enough to stay under any listen backlog.
CONCURRENT_LOGINS = 100
LOGIN_TIMEOUT = 10.0
#: Stop trying once this many logins failed (and more failed than succeeded): the pooler is broken.
GIVE_UP_AFTER = 200


class LoginError(Exception):
    """The server refused the login or broke the protocol."""


def raise_nofile(wanted: int) -> int:
    """Raise our soft RLIMIT_NOFILE towards `wanted` (capped by the hard limit); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


async def _read_message(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(5)
    length = int.from_bytes(header[1:5], "big")
    if length < 4:
        raise LoginError(f"bad message length {length}")
    return header[0], await reader.readexactly(length - 4)


async def login(
    host: str, port: int, user: str, password: str, dbname: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open one connection and log in; return it once the server said ReadyForQuery."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(startup({"user": user, "database": dbname, "application_name": "pgshard-bench-idle"}))
        scram: ScramClient | None = None
        while True:
            kind, body = await _read_message(reader)
            if kind == ord("R"):
                auth = backend.decode_authentication(body)
                if isinstance(auth, backend.AuthenticationSASL):
                    scram = ScramClient(password)
                    writer.write(frontend.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif isinstance(auth, backend.AuthenticationSASLContinue):
                    if scram is None:
                        raise LoginError("SASLContinue before SASL")
                    writer.write(frontend.sasl_response(scram.client_final(auth.data)))
                elif isinstance(auth, backend.AuthenticationSASLFinal):
                    if scram is None:
                        raise LoginError("SASLFinal before SASL")
                    scram.verify_server_final(auth.data)
                elif isinstance(auth, backend.AuthenticationMD5Password):
                    writer.write(frontend.password(md5_password(user, password, auth.salt)))
                elif isinstance(auth, backend.AuthenticationCleartextPassword):
                    writer.write(frontend.password(password))
                elif not isinstance(auth, backend.AuthenticationOk):
                    raise LoginError(f"unsupported authentication request {type(auth).__name__}")
            elif kind == ord("E"):
                fields = backend.decode_error_fields(body)
                raise LoginError(f"{fields.get('C', '?')}: {fields.get('M', '?')}")
            elif kind == ord("Z"):
                return reader, writer
            # ParameterStatus, BackendKeyData, NoticeResponse: nothing to do for an idle client.
    except BaseException:
        writer.close()
        raise


class IdleClients:
    def __init__(self, host: str, port: int, user: str, password: str, dbname: str) -> None:
        self.target = (host, port, user, password, dbname)
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self, n: int) -> dict[str, Any]:
        """Log in n more clients, CONCURRENT_LOGINS at a time; give up early if logins keep failing."""
        sem = asyncio.Semaphore(CONCURRENT_LOGINS)
        errors: list[str] = []
        opened = 0

        async def one() -> None:
            nonlocal opened
            async with sem:
                if len(errors) >= GIVE_UP_AFTER and len(errors) > opened:
                    errors.append("not attempted: too many failed logins")
                    return
                try:
                    conn = await asyncio.wait_for(login(*self.target), LOGIN_TIMEOUT)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                else:
                    self.conns.append(conn)
                    opened += 1

        await asyncio.gather(*(one() for _ in range(n)))
        return {"open": self.alive(), "failed": len(errors), "error": errors[0] if errors else None}

    def alive(self) -> int:
        return sum(1 for reader, _ in self.conns if not reader.at_eof())

    async def close(self) -> dict[str, Any]:
        for _, writer in self.conns:
            writer.close()
        for _, writer in self.conns:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)
        self.conns.clear()
        return {"open": 0}


async def serve(args: argparse.Namespace) -> None:
    clients = IdleClients(args.host, args.port, args.user, args.password, args.dbname)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            try:
                command = json.loads(line)
            except ValueError:
                reply: dict[str, Any] = {"error": f"bad command {line.strip()!r}"}
            else:
                if "open" in command:
                    reply = await clients.open(int(command["open"]))
                elif command.get("close"):
                    reply = await clients.close()
                else:
                    reply = {"error": f"unknown command {command!r}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await clients.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_clients", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--dbname", required=True)
    parser.add_argument("--max-clients", type=int, default=10000)
    args = parser.parse_args(argv)
    raise_nofile(args.max_clients + 256)
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args))
    return 0


class IdleClientsHelper:
    """The parent's handle on a helper process: open more idle clients, close them, stop."""

    def __init__(self, host: str, port: int, user: str, password: str, dbname: str, max_clients: int) -> None:
        from bench.procs import spawn
        from bench.servers import REPO_ROOT, pgshard_env

        self.proc = spawn(
            [
                sys.executable,
                "-m",
                "bench.idle_clients",
                "--host",
                host,
                "--port",
                str(port),
                "--user",
                user,
                "--password",
                password,
                "--dbname",
                dbname,
                "--max-clients",
                str(max_clients),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            env=pgshard_env(),
            text=True,
        )

    def _ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        import selectors

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"idle-client helper did not answer {command} within {timeout:.0f}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"idle-client helper exited with status {self.proc.poll()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def open(self, n: int, timeout: float = 300.0) -> dict[str, Any]:
        """Open n more idle clients; the reply says how many are open and how many failed."""
        return self._ask({"open": n}, timeout)

    def close(self, timeout: float = 60.0) -> dict[str, Any]:
        return self._ask({"close": True}, timeout)

    def stop(self) -> None:
        from bench.procs import stop_process

        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)


if __name__ == "__main__":
    sys.exit(main())
