"""pgbench through pgshard: initialisation, then 20 clients multiplexed over a pool of 4.

Durations: `-T 10` for the simple protocol (as the issue asks) and `-T 5` for the others to keep
the suite fast; set PGSHARD_E2E_PGBENCH_SECONDS to run every mode that long.

pgbench (15) prepares each statement with a synchronous PQprepare the first time a client runs it,
which blocks the whole pgbench thread while that Parse waits for a server connection. With 10
clients per thread and a pool of 4, the other clients of the blocked thread may be holding every
server connection inside open transactions; `-M prepared` with `-c 20 -j 2` therefore only works
through a pooler that can answer such a Parse without a server connection. The extra
one-client-per-thread run checks prepared statements under multiplexing without that condition.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import ConnectionSampler, ProxyFactory, ProxyProcess, pgbench_binary

pytestmark = pytest.mark.e2e

POOL_SIZE = 4
CLIENTS = 20
DEFAULT_SECONDS = 5


def _seconds(default: int) -> int:
    override = os.environ.get("PGSHARD_E2E_PGBENCH_SECONDS")
    return int(override) if override else default


def _pgbench(proxy: ProxyProcess, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pgbench_binary(), *args],
        capture_output=True,
        text=True,
        env=proxy.env(),
        timeout=timeout,
    )


def _initialise(proxy: ProxyProcess, db: psycopg.Connection[Any]) -> None:
    init = _pgbench(proxy, "-i", "-s", "1", "-q", timeout=120)
    assert init.returncode == 0, f"pgbench -i failed:\n{init.stdout}\n{init.stderr}"
    counts = db.execute(
        "SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_branches), "
        "(SELECT count(*) FROM pgbench_tellers), (SELECT count(*) FROM pgbench_history)"
    ).fetchone()
    assert counts == (100000, 1, 10, 0)


@pytest.mark.parametrize(
    ("mode", "clients", "threads", "default_seconds"),
    [
        pytest.param("simple", CLIENTS, 2, 10, id="simple"),
        pytest.param("extended", CLIENTS, 2, DEFAULT_SECONDS, id="extended"),
        pytest.param("prepared", CLIENTS, 2, DEFAULT_SECONDS, id="prepared"),
        pytest.param("prepared", 8, 8, DEFAULT_SECONDS, id="prepared-one-client-per-thread"),
    ],
)
def test_pgbench_multiplexed(
    proxy_factory: ProxyFactory,
    db: psycopg.Connection[Any],
    mode: str,
    clients: int,
    threads: int,
    default_seconds: int,
) -> None:
    # Waits for a server connection last milliseconds here; a short query_wait_timeout bounds the
    # time a stuck pgbench run costs the suite.
    proxy = proxy_factory(pool_size=POOL_SIZE, general={"query_wait_timeout": 5})
    seconds = _seconds(default_seconds)
    with ConnectionSampler(proxy.postgres) as sampler:
        _initialise(proxy, db)
        run = _pgbench(
            proxy,
            "-c",
            str(clients),
            "-j",
            str(threads),
            "-T",
            str(seconds),
            "-M",
            mode,
            "-n",
            timeout=seconds + 120,
        )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    assert processed is not None, output
    assert int(processed.group(1)) > 0
    failed = re.search(r"number of failed transactions: (\d+)", output)
    assert failed is not None, output
    assert int(failed.group(1)) == 0, output
    # pgbench's own history table agrees that every transaction committed.
    history = db.execute("SELECT count(*) FROM pgbench_history").fetchone()
    assert history is not None and history[0] == int(processed.group(1))
    assert sampler.samples, "the sampler took no samples"
    assert 1 <= sampler.max <= POOL_SIZE, f"server connections sampled: max {sampler.max}"
