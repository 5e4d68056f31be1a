"""The local servers that every e2e test stands on: real auth over TCP, and no leftovers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from proxy.localpg import LocalPostgres, find_bindir
from tests.conftest import APP_DB, APP_PASSWORD, APP_USER, HBA_LINES, MD5_PASSWORD, MD5_USER, PgFactory

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


def _client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except ConnectionRefusedError:
        return False


def _process_alive(pid: int) -> bool:
    """Alive and not a zombie (PID 1 in a container may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_psql_password_auth_over_tcp(postgres: LocalPostgres) -> None:
    psql = shutil.which("psql") or str(find_bindir() / "psql")
    cmd = [psql, "-X", "-A", "-t", "-w", "-h", postgres.host, "-p", str(postgres.port), "-U", APP_USER]
    cmd += ["-d", APP_DB, "-c", "SELECT current_user, current_database()"]
    ok = subprocess.run(cmd, env=_client_env(PGPASSWORD=APP_PASSWORD), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "app|app"
    bad = subprocess.run(cmd, env=_client_env(PGPASSWORD="wrong"), capture_output=True, text=True)
    assert bad.returncode != 0
    assert "password authentication failed" in bad.stderr


async def test_asyncpg_scram_and_settings(postgres: LocalPostgres) -> None:
    conn = await asyncpg.connect(postgres.dsn(APP_USER, APP_PASSWORD, APP_DB))
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
        assert await conn.fetchval("SHOW max_prepared_transactions") == "100"
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW server_encoding") == "UTF8"
    finally:
        await conn.close()
    stored = postgres.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_USER}'")
    assert stored.startswith("SCRAM-SHA-256$")
    assert postgres.psql("SELECT datdba::regrole FROM pg_database WHERE datname = 'app'") == APP_USER


async def test_md5_user_and_set_hba(pg_factory: PgFactory) -> None:
    pg = pg_factory("localpg")
    assert pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{MD5_USER}'").startswith("md5")
    dsn = pg.dsn(MD5_USER, MD5_PASSWORD, APP_DB)
    conn = await asyncpg.connect(dsn)
    assert await conn.fetchval("SELECT current_user") == MD5_USER
    await conn.close()
    # Without the md5 rule the md5-stored password cannot pass SCRAM: proves set_hba took effect.
    pg.set_hba(["host all all 127.0.0.1/32 scram-sha-256"])
    try:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(dsn)
        conn = await asyncpg.connect(pg.dsn(APP_USER, APP_PASSWORD, APP_DB))
        await conn.close()
    finally:
        pg.set_hba(HBA_LINES)
    conn = await asyncpg.connect(dsn)
    await conn.close()


def test_stop_really_stops_and_data_survives(pg_factory: PgFactory) -> None:
    pg = pg_factory("localpg")
    pg.psql("CREATE TABLE IF NOT EXISTS kept (x int); INSERT INTO kept VALUES (1);", dbname=APP_DB)
    port = pg.port
    assert _port_open(pg.host, port)
    pg.stop()
    assert not pg.is_running()
    assert not _port_open(pg.host, port)
    assert not (pg.socket_dir / f".s.PGSQL.{port}").exists()
    pg.stop()  # idempotent
    pg.start()
    assert pg.psql("SELECT count(*) > 0 FROM kept", dbname=APP_DB) == "t"


_OWNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from proxy.localpg import LocalPostgres, make_base_dir
    base = make_base_dir("owner")
    pg = LocalPostgres(base, name="orphan")
    pg.init(template=Path(sys.argv[1]))
    pg.start()
    pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    print(json.dumps({"port": pg.port, "base": str(base), "pid": pid}), flush=True)
    if sys.argv[2] == "sigkill":
        sys.stdin.read()  # wait to be killed
    """
)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_servers_do_not_outlive_their_owner(pg_factory: PgFactory, how: str) -> None:
    template = pg_factory.template()
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(template.data_dir), how],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None and owner.stdin is not None
    line = owner.stdout.readline()
    assert line, "the owner process died before starting its server"
    info = json.loads(line)
    base, pid, port = Path(info["base"]), int(info["pid"]), int(info["port"])
    assert _process_alive(pid)
    if how == "sigkill":
        owner.kill()
    owner.wait(timeout=60)
    owner.stdin.close()
    owner.stdout.close()
    if how == "sigkill":  # the watchdog cleans up asynchronously; poll with a deadline
        deadline = time.monotonic() + 30
        while (_process_alive(pid) or base.exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
    # On a normal exit atexit has already finished by the time the owner is gone.
    assert not _process_alive(pid)
    assert not base.exists()
    assert not _port_open("127.0.0.1", port)
