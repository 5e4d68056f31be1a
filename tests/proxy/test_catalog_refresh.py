"""The janitor's catalog read when the default shard cannot be reached: at start-up a database
starts not knowing its user-defined aggregates (every unknown function may be one: refused over
several shards, never answered wrongly); later, a failed read keeps what it knew."""

from __future__ import annotations

import pytest

from proxy import janitor
from proxy.app import ProxyApp
from proxy.config import ConfigError, parse_config
from proxy.localpg import free_port


def _app() -> ProxyApp:
    shards = "".join(
        f'\n[[databases.shards]]\nprimary = "postgresql://app:secret@127.0.0.1:{free_port()}/app"\n'
        for _ in range(2)
    )
    text = (
        '[general]\nconnect_timeout = 1\ncatalog_refresh_interval = 5\n\n[[users]]\nname = "app"\n'
        'password = "secret"\n\n[[databases]]\nname = "app"\nvirtual_shards = 8\n' + shards
        + '\n[[databases.sharded_tables]]\nname = "orders"\ncolumn = "customer_id"\ndata_type = "bigint"\n'
    )  # fmt: skip
    return ProxyApp(parse_config(text))


async def test_unreachable_default_shard_at_start_up() -> None:
    app = _app()
    assert app.config.general.catalog_refresh_interval == 5
    router = app.router_for("app")
    assert router is not None and router.topology.user_aggregates == frozenset()
    await janitor.refresh_catalogs(app, startup=True)
    assert router.topology.user_aggregates is None
    route = router.route_simple(b"SELECT my_function(qty) FROM orders")
    assert route.error is not None and route.error[0] == "0A000"
    assert "could not read the catalog" in route.error[1]


async def test_a_later_failed_read_keeps_what_was_known() -> None:
    app = _app()
    router = app.router_for("app")
    assert router is not None
    router.topology.set_user_aggregates(["known_agg"])
    await janitor.refresh_catalogs(app)
    assert router.topology.user_aggregates == frozenset({"known_agg"})
    assert router.route_simple(b"SELECT upper_case(qty) FROM orders").error is None


def test_the_interval_must_be_positive() -> None:
    text = '[general]\ncatalog_refresh_interval = 0\n\n[[users]]\nname = "app"\npassword = "x"\n\n'
    text += (
        '[[databases]]\nname = "app"\n\n[[databases.shards]]\nprimary = "postgresql://app@localhost/app"\n'
    )
    with pytest.raises(ConfigError, match="catalog_refresh_interval: must be a positive number"):
        parse_config(text)
    assert parse_config(text.replace("= 0\n", "= 60\n", 1)).general.catalog_refresh_interval == 60
