"""The id function's layout, and its SQL on a real server."""

from __future__ import annotations

import pytest

from proxy.localpg import LocalPostgres
from router.ids import id_function_sql, shard_of_id


def test_shard_numbers_must_fit() -> None:
    with pytest.raises(ValueError):
        id_function_sql(8192)


@pytest.mark.e2e
def test_ids_from_two_shards_never_collide_and_name_their_shard(postgres: LocalPostgres) -> None:
    postgres.psql("CREATE SCHEMA IF NOT EXISTS ids_a; CREATE SCHEMA IF NOT EXISTS ids_b;", dbname="app")
    postgres.psql("SET search_path = ids_a;" + id_function_sql(3), dbname="app")
    postgres.psql("SET search_path = ids_b;" + id_function_sql(5), dbname="app")
    a = postgres.psql("SELECT ids_a.pgshard_id() FROM generate_series(1, 2000)", dbname="app").split()
    b = postgres.psql("SELECT ids_b.pgshard_id() FROM generate_series(1, 2000)", dbname="app").split()
    ids_a, ids_b = [int(x) for x in a], [int(x) for x in b]
    assert len(set(ids_a)) == 2000 and not set(ids_a) & set(ids_b)
    assert {shard_of_id(i) for i in ids_a} == {3}
    assert {shard_of_id(i) for i in ids_b} == {5}
    assert postgres.psql(f"SELECT ids_a.pgshard_id_shard({ids_b[0]})", dbname="app") == "5"
