"""Money moves between accounts on different shards while pgshard is killed (SIGKILL) again and again.

Every transfer is one transaction over two shards, committed with two-phase commit. Whatever point
of the protocol a kill lands on, after a restart the recovery task must leave no prepared
transaction behind and every transfer must be all or nothing: the sum of all balances never moves.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.localpg import LocalPostgres, free_port
from tests.conftest import APP_PASSWORD, APP_USER, PgFactory

pytestmark = pytest.mark.e2e

ACCOUNTS = 300
START_BALANCE = 1000
CLIENTS = 12
KILLS = 3
DB = "crashdb"


def _wait(condition: object, deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Proxy:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def dsn(self) -> str:
        return (
            f"host=127.0.0.1 port={self.port} user={APP_USER} password={APP_PASSWORD}"
            " dbname=app connect_timeout=3"
        )

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config)],
                cwd=Path(__file__).resolve().parents[2],
                stderr=log,
            )

        def ready() -> bool:
            try:
                with psycopg.connect(self.dsn(), autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                return False

        _wait(ready, 20, "pgshard to accept logins")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cluster(pg_factory: PgFactory, tmp_path: Path) -> Iterator[tuple[Proxy, list[LocalPostgres]]]:
    servers = pg_factory.many(["crash0", "crash1", "crash2"])
    for pg in servers:
        pg.psql(f"DROP DATABASE IF EXISTS {DB}")
        pg.create_database(DB, owner=APP_USER)
    shards = "\n".join(
        f'[[databases.shards]]\nprimary = "postgresql://{APP_USER}:{APP_PASSWORD}@{pg.host}:{pg.port}/{DB}"\n'
        for pg in servers
    )
    port = free_port()
    config = tmp_path / "pgshard.toml"
    config.write_text(
        f"""
[general]
listen = "127.0.0.1:{port}"
log_level = "warning"
two_phase_recovery_delay = 0.5
query_wait_timeout = 10

[[users]]
name = "{APP_USER}"
password = "{APP_PASSWORD}"
pool_size = 8

[[databases]]
name = "app"
virtual_shards = 24

{shards}
[[databases.sharded_tables]]
name = "accounts"
column = "id"
data_type = "bigint"
"""
    )
    proxy = Proxy(config, port, tmp_path / "pgshard.log")
    proxy.start()
    try:
        yield proxy, servers
    finally:
        proxy.stop()
        for pg in servers:
            pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


def _shard_sum(servers: list[LocalPostgres]) -> int:
    return sum(
        int(pg.psql("SELECT coalesce(sum(balance), 0) FROM accounts", dbname=DB) or 0) for pg in servers
    )


def _prepared(servers: list[LocalPostgres]) -> int:
    return sum(int(pg.psql("SELECT count(*) FROM pg_prepared_xacts", dbname=DB)) for pg in servers)


def test_transfers_stay_all_or_nothing_when_pgshard_is_killed(
    cluster: tuple[Proxy, list[LocalPostgres]],
) -> None:
    proxy, servers = cluster
    try:
        _transfers(proxy, servers)
    except BaseException:
        print(proxy.log.read_text()[-6000:])
        raise


def _transfers(proxy: Proxy, servers: list[LocalPostgres]) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
        rows = ", ".join(f"({i}, {START_BALANCE})" for i in range(ACCOUNTS))
        conn.execute(f"INSERT INTO accounts (id, balance) VALUES {rows}")
    total = ACCOUNTS * START_BALANCE
    assert _shard_sum(servers) == total
    # Which shard each account is on, to make every transfer cross shards.
    home = {}
    for index, pg in enumerate(servers):
        for line in pg.psql("SELECT id FROM accounts", dbname=DB).split():
            home[int(line)] = index
    committed = [0]
    in_doubt: list[int] = []  # prepared transactions found right after each kill
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn: psycopg.Connection[object] | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(proxy.dsn(), autocommit=True)
                a = rng.randrange(ACCOUNTS)
                b = rng.choice([i for i in range(a % 7, ACCOUNTS, 7) if home[i] != home[a]])
                with conn.transaction():
                    conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s", (a,))
                    conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", (b,))
                committed[0] += 1
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(KILLS):
            goal = committed[0] + 40
            _wait(lambda goal=goal: committed[0] >= goal, 60, "transfers to commit")
            time.sleep(random.uniform(0, 0.3))
            proxy.kill()
            in_doubt.append(_prepared(servers))
            proxy.start()
        goal = committed[0] + 40
        _wait(lambda goal=goal: committed[0] >= goal, 60, "transfers after the last restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    # Recovery (at start-up and every few seconds) resolves what the kills left in doubt.
    _wait(lambda: _prepared(servers) == 0, 60, "recovery to resolve every prepared transaction")
    assert _shard_sum(servers) == total
    for pg in servers:
        assert (
            pg.psql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
                dbname=DB,
            )
            == "0"
        )
    assert committed[0] >= KILLS * 40
    print("prepared transactions left in doubt by each kill:", in_doubt)
