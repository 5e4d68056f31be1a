"""psql through pgshard: scripts, \\copy both ways, errors in transactions, cancel, TLS."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import ProxyFactory, ProxyProcess, psql_binary, wait_until

pytestmark = pytest.mark.e2e


def test_script_ddl_dml_copy_and_rollback(
    proxy: ProxyProcess, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    copy_in = tmp_path / "in.csv"
    copy_in.write_text('10,"ten, with a comma",100\n11,eleven,\n12,"quote "" inside",120\n')
    copy_out = tmp_path / "out.csv"
    copy_out_table = tmp_path / "table.tsv"
    script = f"""
DROP TABLE IF EXISTS psql_items;
CREATE TABLE psql_items (id int PRIMARY KEY, name text NOT NULL, qty int);
INSERT INTO psql_items VALUES (1, 'one', 10), (2, 'two', 20);
-- three statements on one line, sent as one simple Query
INSERT INTO psql_items VALUES (3, 'three', 30) \\; UPDATE psql_items SET qty = qty + 1 WHERE id = 1 \\;\
SELECT 'multi' AS tag;
\\copy psql_items FROM '{copy_in}' WITH (FORMAT csv)
\\copy (SELECT id, name, qty FROM psql_items ORDER BY id) TO '{copy_out}' WITH (FORMAT csv)
\\copy psql_items TO '{copy_out_table}'
BEGIN;
INSERT INTO psql_items VALUES (100, 'rolled back', 0);
\\set ON_ERROR_STOP 0
INSERT INTO psql_items VALUES (1, 'duplicate', 0);
SELECT 'not reached';
\\set ON_ERROR_STOP 1
ROLLBACK;
SELECT 'after rollback: ' || count(*) FROM psql_items;
DELETE FROM psql_items WHERE id = 2;
ALTER TABLE psql_items ADD COLUMN note text DEFAULT 'n';
"""
    result = proxy.psql("-A", "-t", sql=script)
    assert result.returncode == 0, result.stderr
    assert "multi" in result.stdout
    assert "duplicate key value violates unique constraint" in result.stderr
    assert "current transaction is aborted" in result.stderr
    assert "after rollback: 6" in result.stdout
    assert "not reached" not in result.stdout

    rows = db.execute("SELECT id, name, qty, note FROM psql_items ORDER BY id").fetchall()
    assert rows == [
        (1, "one", 11, "n"),
        (3, "three", 30, "n"),
        (10, "ten, with a comma", 100, "n"),
        (11, "eleven", None, "n"),
        (12, 'quote " inside', 120, "n"),
    ]
    assert copy_out.read_text().splitlines() == [
        "1,one,11",
        "2,two,20",
        "3,three,30",
        '10,"ten, with a comma",100',
        "11,eleven,",
        '12,"quote "" inside",120',
    ]
    assert sorted(copy_out_table.read_text().splitlines()) == sorted(
        [
            "1\tone\t11",
            "2\ttwo\t20",
            "3\tthree\t30",
            "10\tten, with a comma\t100",
            "11\televen\t\\N",
            '12\tquote " inside\t120',
        ]
    )


def test_multi_statement_query_with_command_option(proxy: ProxyProcess, db: psycopg.Connection[Any]) -> None:
    """psql -c sends the whole string as one simple Query: an implicit transaction."""
    db.execute("DROP TABLE IF EXISTS psql_multi")
    ok = proxy.psql("-c", "CREATE TABLE psql_multi (v int); INSERT INTO psql_multi VALUES (1), (2)")
    assert ok.returncode == 0, ok.stderr
    # The second statement fails, so the first one's row must be rolled back with it.
    failed = proxy.psql("-c", "INSERT INTO psql_multi VALUES (3); SELECT 1/0")
    assert failed.returncode != 0
    assert "division by zero" in failed.stderr
    assert db.execute("SELECT array_agg(v ORDER BY v) FROM psql_multi").fetchone() == ([1, 2],)
    again = proxy.psql("-A", "-t", "-c", "SELECT count(*) FROM psql_multi")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "2"


def test_sigint_cancels_pg_sleep(proxy: ProxyProcess, db: psycopg.Connection[Any]) -> None:
    marker = "psql_cancel_marker"
    proc = subprocess.Popen(
        [psql_binary(), "-X", "-c", f"SELECT pg_sleep(30) AS {marker}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=proxy.env(),
    )
    try:
        wait_until(
            lambda: (
                db.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                    (f"%pg_sleep(30) AS {marker}%",),
                ).fetchone()
                == (1,)
            ),
            timeout=15,
            what="pg_sleep to be running on the server",
        )
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)  # well before pg_sleep(30) would end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "canceling statement due to user request" in stderr
    assert proc.returncode != 0
    wait_until(
        lambda: (
            db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                (f"%pg_sleep(30) AS {marker}%",),
            ).fetchone()
            == (0,)
        ),
        timeout=10,
        what="the cancelled pg_sleep to be gone from the server",
    )
    after = proxy.psql("-A", "-t", "-c", "SELECT 42")
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == "42"


def test_sslmode_disable_works_and_require_fails_without_cert(proxy: ProxyProcess) -> None:
    plain = proxy.psql("-A", "-t", "-c", "SELECT 'plain'", env={"PGSSLMODE": "disable"})
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == "plain"
    prefer = proxy.psql("-A", "-t", "-c", "SELECT 'prefer'", env={"PGSSLMODE": "prefer"})
    assert prefer.returncode == 0, prefer.stderr
    assert prefer.stdout.strip() == "prefer"
    required = proxy.psql("-c", "SELECT 1", env={"PGSSLMODE": "require"})
    assert required.returncode != 0
    assert "server does not support SSL" in required.stderr


@pytest.fixture
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"),
            *("-days", "1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_sslmode_require_with_cert(proxy_factory: ProxyFactory, self_signed_cert: tuple[Path, Path]) -> None:
    proxy = proxy_factory(tls=self_signed_cert)
    secure = proxy.psql(
        "-A", "-t", "-c", "SELECT 'over tls'", "-c", "\\conninfo", env={"PGSSLMODE": "require"}
    )
    assert secure.returncode == 0, secure.stderr
    assert "over tls" in secure.stdout
    assert "SSL connection" in secure.stdout
    plain = proxy.psql("-A", "-t", "-c", "SELECT 'plain'", "-c", "\\conninfo", env={"PGSSLMODE": "disable"})
    assert plain.returncode == 0, plain.stderr
    assert "plain" in plain.stdout
    assert "SSL connection" not in plain.stdout
    # A whole session over TLS: a transaction and an error inside it.
    script = (
        "BEGIN;\n\\set ON_ERROR_STOP 0\nSELECT 1/0;\n\\set ON_ERROR_STOP 1\nROLLBACK;\nSELECT 'still fine';\n"
    )
    session = proxy.psql("-A", "-t", sql=script, env={"PGSSLMODE": "require"})
    assert session.returncode == 0, session.stderr
    assert "division by zero" in session.stderr
    assert "still fine" in session.stdout
