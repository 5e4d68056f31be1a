"""Smoke test of the side-by-side benchmark (`python -m bench --quick`).

Why: the benchmark is run by hand and rarely, so it rots silently; this runs its smoke mode (one
1-second round, scale 1, 200 idle clients) against real PostgreSQL, PgBouncer and pgshard and
checks that it finishes, cleans up, and writes a JSON report of the expected shape. It asserts
nothing about speed: figures from a shared CI machine mean nothing, and pgshard being slow is the
benchmark's finding, not a test failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.pgbouncer import PgBouncerError, pgbouncer_info

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_bench_quick_single_and_memory(tmp_path: Path) -> None:
    try:
        pgbouncer_info()
    except PgBouncerError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sections", "single,memory", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== targets" in proc.stdout

    data = json.loads((out / "latest.json").read_text())
    assert set(data) >= {"meta", "sections", "targets"}
    assert data["meta"]["pgbouncer"]["version"]
    assert isinstance(data["meta"]["pgbouncer"]["prepared_statement_support"], bool)
    assert data["meta"]["options"]["quick"] is True
    assert list(data["sections"]) == ["single", "memory"]
    assert len(list(out.glob("bench-*.json"))) == 1

    single = data["sections"]["single"]
    assert single["status"] == "ok"
    keys = {fig["key"] for fig in single["figures"]}
    for mode in ("simple", "extended", "prepared"):
        for clients in ("16 clients", "1 client"):
            for series in ("direct", "pgshard"):
                assert f"{mode}, {clients}|{series}|throughput" in keys
    for fig in single["figures"]:
        assert set(fig) >= {"samples", "median", "min", "max", "errors", "unit"}
        assert len(fig["samples"]) == 1
    # Direct PostgreSQL is the baseline; its runs must work whatever state pgshard is in.
    direct = [f for f in single["figures"] if f["series"] == "direct" and f["metric"] == "throughput"]
    assert all(f["median"] is not None and f["median"] > 0 for f in direct), direct
    ratio_names = {r["name"] for r in single["ratios"]}
    assert "pgshard/PgBouncer tps, simple, 16 clients" in ratio_names
    assert "pgshard/direct tps, simple, 1 client" in ratio_names
    assert "added latency pgshard/PgBouncer, simple, 1 client" in ratio_names

    memory = data["sections"]["memory"]
    assert memory["status"] == "ok"
    memory_keys = {fig["key"] for fig in memory["figures"]}
    assert "idle|pgshard|RSS" in memory_keys
    assert "200 idle clients|pgshard|RSS" in memory_keys

    statuses = {t["description"]: t["status"] for t in data["targets"]}
    assert set(statuses.values()) <= {"PASS", "FAIL", "SKIP"}
    assert len(statuses) == 10
    crossshard = next(t for t in data["targets"] if t["section"] == "crossshard")
    assert crossshard["status"] == "SKIP" and crossshard["detail"] == "section not run"
