#!/usr/bin/env bash
# Set up and run the tests: a virtualenv with pgshard and its test extra, lint, types, then pytest.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,bench]'
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -q "$@"
