"""Configuration: the example loads, defaults hold, and every refusal names key, file and line."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import (
    EXAMPLE_CONFIG,
    Config,
    ConfigError,
    ListRule,
    Range,
    Shard,
    load_config,
    parse_config,
)
from proxy.config_schema import locate_keys, parse_server_url, split_listen

MINIMAL = """\
[[users]]
name = "app"
password = "secret"

[[databases]]
name = "app"

[[databases.shards]]
primary = "postgresql://app@localhost/app"
"""

SCRAM_VERIFIER = (
    "SCRAM-SHA-256$4096:hWk6geT9V8VF8hcWwFdnmg==$k349uvH2wfzNQV1qe/OnaA2bftf1GLA0B5IdI6iqw7I="
    ":HJwuy/jL+EAO3IVQMUy2WhF5KR+hSEQ9bgd5NLPlRTc="
)


def refusal(text: str, path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(text, path)
    return err.value


def test_example_config_loads() -> None:
    config = parse_config(EXAMPLE_CONFIG)
    assert config.general.port == 6432 and config.general.host == "127.0.0.1"
    user = config.user("app")
    assert user is not None and user.password == "secret" and user.auth == "scram-sha-256"
    db = config.database("app")
    assert db is not None and len(db.shards) == 2 and db.omnisharded_tables == ("countries",)
    assert db.shards[1].address.host == "10.0.0.3" and db.shards[1].address.password == "secret"
    events, ledger = db.sharded_table("events"), db.sharded_table("ledger")
    assert events is not None and events.lists == (ListRule(("eu", "uk"), 0), ListRule(("us",), 1))
    assert ledger is not None and ledger.ranges == (Range(None, 1000000, 0), Range(1000000, None, 1))
    assert config.user("nobody") is None and config.database("nowhere") is None
    assert "secret" not in repr(config)


def test_defaults() -> None:
    config = parse_config(MINIMAL)
    g = config.general
    assert (g.listen, g.pool_mode, g.workers, g.max_client_conn) == (
        "127.0.0.1:6432",
        "transaction",
        1,
        10000,
    )
    assert (g.query_wait_timeout, g.server_idle_timeout, g.server_lifetime) == (120, 600, 3600)
    assert (g.connect_timeout, g.login_timeout, g.query_timeout) == (5, 60, 0)
    assert g.max_message_length == 64 * 1024 * 1024 and g.max_prepared_statements == 1000
    assert (g.tls_cert, g.tls_key, g.log_level, g.log_format) == (None, None, "info", "auto")
    (user,) = config.users
    assert (user.auth, user.pool_size, user.min_pool_size, user.pool_mode) == ("scram-sha-256", 20, 0, None)
    (db,) = config.databases
    assert (db.virtual_shards, db.default_shard, db.sharded_tables, db.shard_key) == (1024, 0, (), None)
    address = db.shards[0].address
    assert (address.host, address.port, address.user, address.password, address.dbname) == (
        "localhost",
        5432,
        "app",
        None,
        "app",
    )
    assert config.path is None


def test_load_config_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "pgshard.toml"
    good.write_text(EXAMPLE_CONFIG)
    assert load_config(good).path == good
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('name = "app"\npassword', 'name = "app"\npasword'))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == f'{bad}, line 3: users[0].pasword: unknown key (did you mean "password"?)'
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def line_with(text: str, needle: str, after: int = 0) -> int:
    """The 1-based number of the first line after line `after` that contains `needle`."""
    lines = text.splitlines()
    return next(i for i in range(after, len(lines)) if needle in lines[i]) + 1


def test_unknown_keys_everywhere() -> None:
    cases = [
        (
            MINIMAL + "[general]\nlisten = '127.0.0.1:1'\nmetrics_listen = '0.0.0.0:9090'\n",
            "general.metrics_listen",
        ),
        ("colour = 'blue'\n" + MINIMAL, "colour"),
        (
            MINIMAL + "[[databases.shards]]\nprimary = 'postgresql://a@b/c'\nreplicas = []\n",
            "databases[0].shards[1].replicas",
        ),
    ]
    for text, key in cases:
        leaf = key.rpartition(".")[2]
        message = str(refusal(text))
        assert f"line {line_with(text, leaf)}: {key}: unknown key" in message, message
    assert 'did you mean "password"' in str(refusal(MINIMAL.replace("password", "pasword")))


def test_wrong_type_names_the_key_and_line() -> None:
    text = MINIMAL.replace('password = "secret"', 'password = "secret"\npool_size = "20"')
    assert str(refusal(text)) == "<config>, line 4: users[0].pool_size: expected an integer, got a string"
    assert "got a boolean" in str(refusal(text.replace('"20"', "true")))
    assert "line 4: general.workers: expected an integer" in str(
        refusal("[general]\n\n\nworkers = 1.5\n" + MINIMAL)
    )


def test_missing_values_point_at_their_table() -> None:
    err = refusal(MINIMAL.replace('primary = "postgresql://app@localhost/app"', ""))
    assert (err.key, err.line, err.problem) == (
        "databases[0].shards[0].primary",
        8,
        "missing: this key is required",
    )
    assert (
        refusal(
            MINIMAL.replace('[[databases.shards]]\nprimary = "postgresql://app@localhost/app"\n', "")
        ).line
        == 5
    )
    no_users = MINIMAL.split("[[databases]]")[1]
    assert "at least one [[users]] is required" in str(refusal("[[databases]]" + no_users))


def test_bad_values() -> None:
    cases = [
        ('[general]\npool_mode = "batch"\n', "general.pool_mode", 2, 'must be one of "transaction"'),
        ('[general]\nlisten = "6432"\n', "general.listen", 2, "host:port"),
        ('[general]\nlisten = "::1:6432"\n', "general.listen", 2, "brackets"),
        ("[general]\nworkers = 0\n", "general.workers", 2, "at least 1"),
        ("[general]\nconnect_timeout = -1\n", "general.connect_timeout", 2, "positive"),
        ('[general]\ntls_cert = "/nonexistent/cert.pem"\n', "general.tls_cert", 2, "no such file"),
    ]
    for prefix, key, line, words in cases:
        err = refusal(prefix + MINIMAL)
        assert (err.key, err.line) == (key, line) and words in err.problem, err
    shifted = MINIMAL.replace("postgresql://app@localhost/app", "mysql://app@localhost/app")
    assert refusal(shifted).key == "databases[0].shards[0].primary"
    assert "names no host" in str(refusal(MINIMAL.replace("app@localhost/app", "app@/app")))
    assert "line 2: users[0].min_pool_size" in str(
        refusal('[[users]]\nmin_pool_size = 30\nname = "x"\npassword = "y"\n' + MINIMAL)
    )
    assert "reserved" in str(
        refusal(MINIMAL.replace('[[databases]]\nname = "app"', '[[databases]]\nname = "pgshard"'))
    )


def test_listen_forms() -> None:
    assert split_listen("[::1]:6432") == ("::1", 6432)
    assert split_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    config = parse_config('[general]\nlisten = "[::1]:7000"\n' + MINIMAL)
    assert (config.general.host, config.general.port) == ("::1", 7000)
    for bad in ("localhost", ":6432", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            split_listen(bad)


def test_tls_files_both_or_neither(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("x")
    (tmp_path / "server.key").write_text("x")
    config_file = tmp_path / "pgshard.toml"
    both = '[general]\ntls_cert = "server.crt"\ntls_key = "server.key"\n' + MINIMAL
    config = parse_config(both, config_file)
    assert config.general.tls_cert == tmp_path / "server.crt"
    err = refusal('[general]\ntls_cert = "server.crt"\n' + MINIMAL, config_file)
    assert err.key == "general.tls_key" and "together" in err.problem


def test_auth_and_password_pairings() -> None:
    md5_scram = MINIMAL.replace('password = "secret"', f'password = "{SCRAM_VERIFIER}"\nauth = "md5"')
    err = refusal(md5_scram)
    assert (err.key, err.line) == ("users[0].auth", 4) and "SCRAM" in err.problem
    assert parse_config(md5_scram.replace('auth = "md5"', "")).users[0].password == SCRAM_VERIFIER
    md5_hash = MINIMAL.replace("secret", "md5bd9b2f028f0da30651d603cf780feee9")
    assert refusal(md5_hash).key == "users[0].auth"
    assert parse_config(md5_hash.replace('feee9"', 'feee9"\nauth = "md5"')).users[0].auth == "md5"
    assert refusal(MINIMAL.replace("secret", "SCRAM-SHA-256$garbled")).key == "users[0].password"
    assert refusal(MINIMAL.replace('password = "secret"\n', "")).key == "users[0].password"
    trusted = parse_config(MINIMAL.replace('password = "secret"', 'auth = "trust"'))
    assert trusted.users[0].password is None
    duplicate = MINIMAL.replace("[[databases]]", '[[users]]\nname = "app"\npassword = "x"\n\n[[databases]]')
    assert (refusal(duplicate).key, refusal(duplicate).line) == ("users[1].name", 6)


SHARDED = (
    MINIMAL
    + """
[[databases.shards]]
primary = "postgresql://app@otherhost/app"

[[databases.sharded_tables]]
name = "t"
column = "k"
data_type = "integer"
"""
)


def test_sharded_table_validation() -> None:
    table_line = line_with(SHARDED, "[[databases.sharded_tables]]")
    cases = [
        ('function = "range"\n', "sharded_tables[0].ranges", "missing", "[[databases.sharded_tables]]"),
        ('function = "list"\n', "sharded_tables[0].lists", "missing", "[[databases.sharded_tables]]"),
        ("lists = [{ values = [1], shard = 0 }]\n", "sharded_tables[0].lists", "only used", "lists ="),
        (
            'function = "range"\nranges = [\n  { end = 100, shard = 0 },\n  { start = 50, shard = 1 },\n]\n',
            "sharded_tables[0].ranges[1]",
            "overlaps ranges[0]",
            "start = 50",
        ),
        (
            'function = "range"\nranges = [{ start = 5, end = 5, shard = 0 }]\n',
            "ranges[0].end",
            "greater",
            "ranges",
        ),
        (
            'function = "range"\nranges = [{ start = 5, shard = 2 }]\n',
            "ranges[0].shard",
            "at most 1",
            "ranges",
        ),
        (
            'function = "range"\nranges = [{ start = 5, shard = 0, stop = 3 }]\n',
            "ranges[0].stop",
            "unknown",
            "ranges",
        ),
        (
            'function = "range"\nranges = [{ start = 2147483648, shard = 0 }]\n',
            "ranges[0].start",
            "range",
            "ranges",
        ),
        (
            "function = \"list\"\nlists = [{ values = ['a'], shard = 0 }]\n",
            "lists[0].values[0]",
            "integer",
            "lists",
        ),
        (
            'function = "list"\nlists = [{ values = [1, 2], shard = 0 },\n  { values = [2], shard = 1 }]\n',
            "lists[1].values",
            "already listed",
            "values = [2]",
        ),
    ]
    for extra, key, words, needle in cases:
        text = SHARDED + extra
        err = refusal(text)
        assert err.key.endswith(key) and words in err.problem, (extra, err)
        assert err.line == line_with(text, needle, table_line - 1), (extra, err)
    text_range = (
        SHARDED.replace('"integer"', '"text"') + 'function = "range"\nranges = [{ start = 1, shard = 0 }]\n'
    )
    assert "integer data_type" in refusal(text_range).problem
    uuids = SHARDED.replace('"integer"', '"uuid"') + (
        'function = "list"\nlists = [{ values = ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"], shard = 1 }]\n'
    )
    rule = parse_config(uuids).databases[0].sharded_tables[0].lists[0]
    assert rule.values == ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",)
    both = SHARDED.replace("omnisharded_tables = [", "") + ""
    assert parse_config(both).databases[0].virtual_shards == 1024
    clash = SHARDED.replace(
        'name = "app"\n\n[[databases.shards]]',
        'name = "app"\nomnisharded_tables = ["t"]\n\n[[databases.shards]]',
        1,
    )
    assert refusal(clash).key == "databases[0].sharded_tables[0].name"


def test_default_shard_must_exist() -> None:
    err = refusal(
        MINIMAL.replace('[[databases]]\nname = "app"', '[[databases]]\nname = "app"\ndefault_shard = 1')
    )
    assert (err.key, err.line) == ("databases[0].default_shard", 7)


def test_toml_syntax_error_names_the_file() -> None:
    err = refusal("[general\n", Path("/etc/pgshard.toml"))
    assert str(err).startswith("/etc/pgshard.toml: not valid TOML") and "line 1" in str(err)


def test_server_url_forms() -> None:
    a = parse_server_url("postgres://us%40r:p%3Ass@db.example:6000/my%20db?sslmode=require")
    assert (a.host, a.port, a.user, a.password, a.dbname) == ("db.example", 6000, "us@r", "p:ss", "my db")
    assert a.params == (("sslmode", "require"),)
    socket = parse_server_url("postgresql:///app?host=/var/run/postgresql&user=app")
    assert (socket.host, socket.user, socket.dbname, socket.port) == (
        "/var/run/postgresql",
        "app",
        "app",
        5432,
    )
    ipv6 = parse_server_url("postgresql://u@[::1]:5433")
    assert (ipv6.host, ipv6.port) == ("::1", 5433)
    for bad in ("postgresql://u@h:0/d", "postgresql://u@h:99999/d", "postgresql://h/d", "http://u@h/d"):
        with pytest.raises(ValueError):
            parse_server_url(bad)
    assert Shard("postgresql://u:pw@h/d") == Shard("postgresql://u:pw@h/d")


def test_locate_keys_reads_real_toml_shapes() -> None:
    text = '''\
# [[databases]] in a comment is not a header
title = """
[[databases]]
"""
[[databases]]   # first
name = "a"
"quoted key" = 1
nested.dotted = 2
arr = [
  { x = 1 },  # element 0
  { x = 2, y = "]" },
]
[[databases.shards]]
primary = "p"
[[databases]]
[[databases.shards]]
[[databases.shards]]
primary = 'q'
[general]
listen = "x"
'''
    lines = locate_keys(text)
    assert lines["title"] == 2 and lines["databases[0]"] == 5 and lines["databases[0].name"] == 6
    assert lines["databases[0].quoted key"] == 7 and lines["databases[0].nested.dotted"] == 8
    assert lines["databases[0].arr[1]"] == 11 and lines["databases[0].arr[1].y"] == 11
    assert lines["databases[0].shards[0].primary"] == 14 and lines["databases[1]"] == 15
    assert lines["databases[1].shards[1].primary"] == 18 and lines["general.listen"] == 20


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
        config.general.workers = 2  # type: ignore[misc]
    assert isinstance(config, Config)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([*"[]{}=,.\"'#\n abc_123", "users", "databases", "[[", "]]"]), max_size=60).map(
        "".join
    )
)
def test_garbage_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text)
    lines = locate_keys(text)
    assert isinstance(lines, dict)
