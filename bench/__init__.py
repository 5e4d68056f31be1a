"""pgshard's side-by-side benchmark: `python -m bench` (see bench/README.md).

A folder of the repository, not part of the installed distribution: it needs the PostgreSQL
server binaries, pgbench and PgBouncer on the machine, and exists to check pgshard's speed and
memory bars (DESIGN.md, "What good looks like") against PostgreSQL directly and PgBouncer,
measured in one run on one machine.
"""
