"""`pgshard demo`: local PostgreSQL shards in a data folder, a sample schema, the proxy on 6432.

The embedded default a new user meets first, so it must work on a fresh machine with nothing but
the PostgreSQL server packages: it starts the servers itself (as an unprivileged user when run as
root), writes its own config, loads the sample data through pgshard and stops everything on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

from proxy.cli import install_event_loop_policy, serve
from proxy.config import Config, parse_config
from proxy.localpg import LocalPostgres
from proxy.log import log

USER, PASSWORD, DATABASE = "app", "secret", "app"

SCHEMA = """
CREATE TABLE IF NOT EXISTS countries (code text PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS customers (id bigint PRIMARY KEY, name text NOT NULL, country text);
CREATE TABLE IF NOT EXISTS orders (
    id bigint NOT NULL, customer_id bigint NOT NULL, amount numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (customer_id, id));
"""
COUNTRIES = [("uk", "United Kingdom"), ("us", "United States"), ("de", "Germany"), ("fr", "France")]


def sample_data() -> str:
    """Multi-row INSERTs: pgshard splits each across the shards by key."""
    countries = ", ".join(f"('{code}', '{name}')" for code, name in COUNTRIES)
    customers = ", ".join(f"({i}, 'customer {i}', '{COUNTRIES[i % 4][0]}')" for i in range(1, 101))
    orders = ", ".join(f"({i}, {1 + i % 100}, {(i % 977) / 10.0:.2f})" for i in range(1, 1001))
    return (
        f"INSERT INTO countries (code, name) VALUES {countries} ON CONFLICT DO NOTHING;\n"
        f"INSERT INTO customers (id, name, country) VALUES {customers} ON CONFLICT DO NOTHING;\n"
        f"INSERT INTO orders (id, customer_id, amount) VALUES {orders} ON CONFLICT DO NOTHING;\n"
    )


def demo_config(servers: list[LocalPostgres], port: int) -> str:
    shards = "\n".join(
        f'[[databases.shards]]\nprimary = "postgresql://{USER}:{PASSWORD}@{pg.host}:{pg.port}/{DATABASE}"\n'
        for pg in servers
    )
    return f"""# Written by `pgshard demo`.
[general]
listen = "127.0.0.1:{port}"
pool_mode = "transaction"

[[users]]
name = "{USER}"
password = "{PASSWORD}"
pool_size = 10

[[databases]]
name = "{DATABASE}"
default_shard = 0
virtual_shards = {len(servers) * 64}
omnisharded_tables = ["countries"]

{shards}
[[databases.sharded_tables]]
name = "customers"
column = "id"
data_type = "bigint"

[[databases.sharded_tables]]
name = "orders"
column = "customer_id"
data_type = "bigint"
"""


def start_servers(data_dir: Path, count: int) -> list[LocalPostgres]:
    """Start (initialising on first use) `count` shard servers with the demo role and database."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o755)
    servers = []
    for i in range(count):
        pg = LocalPostgres(data_dir, name=f"shard{i}")
        fresh = not pg.initialized
        if fresh:
            pg.init()
        pg.start()
        if fresh:
            pg.create_role(USER, PASSWORD)
            pg.create_database(DATABASE, owner=USER)
        servers.append(pg)
    return servers


def load_sample(port: int) -> None:
    """Load the sample schema through pgshard itself, so it lands where pgshard puts it."""
    psql = shutil.which("psql")
    if psql is None:
        log.warning("psql not found: sample schema not loaded")
        return
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    result = subprocess.run(
        [
            psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            USER,
            "-d",
            DATABASE,
        ],
        input=SCHEMA + sample_data(),
        text=True,
        env=env,
        capture_output=True,
    )
    if result.returncode != 0:
        log.warning("loading the sample data failed", error=result.stderr.strip())


async def _serve_demo(config: Config, port: int) -> None:
    ready = asyncio.Event()
    server = asyncio.get_running_loop().create_task(serve(config, ready=ready))
    await ready.wait()
    await asyncio.get_running_loop().run_in_executor(None, load_sample, port)
    print(
        f"\npgshard demo is ready: {len(config.databases[0].shards)} shards behind 127.0.0.1:{port}\n"
        f"  connect:  PGPASSWORD={PASSWORD} psql -h 127.0.0.1 -p {port} -U {USER} {DATABASE}\n"
        f"  config:   {config.path}\n"
        "  stop:     Ctrl-C\n",
        flush=True,
    )
    await server


def run_demo(data_dir: Path, port: int, shard_count: int) -> int:
    servers = start_servers(data_dir, shard_count)
    try:
        config_path = data_dir / "pgshard.toml"
        config_path.write_text(demo_config(servers, port))
        config = parse_config(config_path.read_text(), config_path)
        install_event_loop_policy()
        asyncio.run(_serve_demo(config, port))
    finally:
        for pg in servers:
            pg.stop()
        log.info("demo stopped", data_dir=str(data_dir))
    return 0
