"""Text shard keys sent in a client_encoding other than UTF8 route by the UTF-8 text the server stores."""

from __future__ import annotations

import struct

import pytest

from parser.session_statements import analyse_query
from proxy.config import Database, Shard, ShardedTable
from proxy.pg_encoding import ClientEncoding, canonical_name
from proxy.varcache import SessionState
from router.placement import HashSharding
from router.routing import Router
from router.topology import Topology

TEXT = HashSharding(1024, 4, "text")
ALL = (0, 1, 2, 3)
LATIN1 = ClientEncoding("LATIN1")
WIN1252 = ClientEncoding("WIN1252")
KEYS = ["é", "café", "Ã©0", "naïve", "Ñandú", "ÿ"]


def ts(key: str) -> int:
    return TEXT.shard(key)


@pytest.fixture
def router() -> Router:
    shards = tuple(Shard(f"postgresql://app:secret@10.0.0.{i}:5432/app") for i in range(4))
    return Router(
        Topology.from_database(
            Database(
                "app",
                shards,
                virtual_shards=1024,
                sharded_tables=(ShardedTable("t", "k", "text"), ShardedTable("n", "id", "bigint")),
            )
        )
    )


def sql(template: str, key: str, codec: str) -> bytes:
    return template.format(key.replace("'", "''")).encode(codec)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("encoding", "codec"), [(LATIN1, "latin-1"), (WIN1252, "cp1252")])
def test_simple_query_literals_are_converted(
    router: Router, key: str, encoding: ClientEncoding, codec: str
) -> None:
    for template in [
        "INSERT INTO t (k, v) VALUES ('{}', 1)",
        "SELECT * FROM t WHERE k = '{}'",
        "UPDATE t SET v = 2 WHERE k = E'{}'",
        "DELETE FROM t WHERE k IN ('{}')",
    ]:
        route = router.route_simple(sql(template, key, codec), encoding)
        assert route.error is None and route.shards == (ts(key),), (template, route)


def test_the_route_cache_serves_utf8_and_latin1_sessions_alike(router: Router) -> None:
    template = "SELECT * FROM t WHERE k = '{}'"
    # 'Ã©0' in LATIN1 is valid UTF-8 for 'é0': the bytes alone cannot tell the key.
    for key in ["Ã©0", "é0", "café", "Ã©0"]:
        assert router.route_simple(sql(template, key, "utf-8")).shards == (ts(key),)
        assert router.route_simple(sql(template, key, "latin-1"), LATIN1).shards == (ts(key),)
        assert router.route_simple(sql(template, key, "utf-8")).shards == (ts(key),)
    assert ts("Ã©0") != ts("é0")  # the case is meaningful
    assert router.hits > 0


def test_escapes_are_undone_after_conversion(router: Router) -> None:
    # E'\xc3\xa9' is the UTF-8 bytes of 'é' in every client encoding (the server converts the query
    # first, then reads the escapes); a literal LATIN1 'é' next to it is converted.
    q = b"INSERT INTO t (k) VALUES (E'\\xc3\\xa9\xe9')"
    assert router.route_simple(q, LATIN1).shards == (ts("éé"),)
    assert router.route_simple(b"INSERT INTO t (k) VALUES (E'\\xc3\\xa9')", LATIN1).shards == (ts("é"),)


@pytest.mark.parametrize("key", KEYS)
def test_bind_text_and_binary_params_are_converted(router: Router, key: str) -> None:
    raw = key.encode("latin-1")
    for query in ["INSERT INTO t (k, v) VALUES ($1, 1)", "SELECT * FROM t WHERE k = $1"]:
        prepared = router.prepare(query)
        for fmt in (0, 1):
            assert router.route_bind(prepared, [raw], [fmt], LATIN1).shards == (ts(key),)
            assert router.route_bind(prepared, [key.encode()], [fmt]).shards == (ts(key),)
    prepared = router.prepare("SELECT * FROM t WHERE k = ANY($1)")
    array = b'{"' + raw + b'"}'
    assert router.route_bind(prepared, [array], [0], LATIN1).shards == (ts(key),)
    binary = struct.pack("!iiiii", 1, 0, 25, 1, 1) + struct.pack("!i", len(raw)) + raw
    assert router.route_bind(prepared, [binary], [1], LATIN1).shards == (ts(key),)


def test_parse_literals_are_converted(router: Router) -> None:
    prepared = router.prepare("SELECT * FROM t WHERE k = 'café'".encode("latin-1"), encoding=LATIN1)
    assert router.route_bind(prepared, [], [], LATIN1).shards == (ts("café"),)


def test_integer_keys_and_utf8_sessions_are_unaffected(router: Router) -> None:
    assert router.route_simple(
        "SELECT * FROM n WHERE id = 7 AND x = 'é'".encode("latin-1"), LATIN1
    ).shards == (HashSharding(1024, 4, "bigint").shard(7),)
    assert router.route_simple("SELECT * FROM t WHERE k = 'é'".encode()).shards == (ts("é"),)
    # Without an encoding, LATIN1 bytes are not UTF-8: an INSERT fails, a read goes everywhere.
    assert router.route_simple(b"SELECT * FROM t WHERE k = '\xe9'").shards == ALL


def test_unconvertible_text(router: Router) -> None:
    # WIN1252 has no character 0x81: the server refuses the query, and so does pgshard.
    r = router.route_simple(b"INSERT INTO t (k) VALUES ('\x81')", WIN1252)
    assert r.error is not None and r.error[0] == "22P05"
    # EUC_JP has no exact conversion: ASCII keys route, a non-ASCII write is refused, a read is
    # sent everywhere.
    euc_jp = ClientEncoding("EUC_JP")
    r = router.route_simple("INSERT INTO t (k, v) VALUES ('日本', 'x')".encode("euc_jp"), euc_jp)
    assert r.error is not None and r.error[0] == "0A000" and "EUC_JP" in r.error[1]
    assert router.route_simple("SELECT * FROM t WHERE k = '日本'".encode("euc_jp"), euc_jp).shards == ALL
    r = router.route_simple("INSERT INTO t (k, v) VALUES ('ab', '日本')".encode("euc_jp"), euc_jp)
    assert r.shards == (ts("ab"),)
    prepared = router.prepare("INSERT INTO t (k) VALUES ($1)")
    r = router.route_bind(prepared, ["日本".encode("euc_jp")], [0], euc_jp)
    assert r.error is not None and r.error[0] == "0A000"
    assert router.route_bind(prepared, [b"ab"], [0], euc_jp).shards == (ts("ab"),)
    # BIG5 embeds ASCII bytes in its characters and has no exact conversion: not scanned at all.
    big5 = ClientEncoding("BIG5")
    r = router.route_simple("SELECT * FROM t WHERE k = '功'".encode("big5"), big5)
    assert r.error is not None and r.error[0] == "0A000"
    assert router.route_simple(b"SELECT * FROM t WHERE k = 'ab'", big5).shards == (ts("ab"),)


def test_sjis_second_bytes_that_look_like_backslash(router: Router) -> None:
    # '表' in SJIS is 0x95 0x5C: byte by byte, its second byte is a backslash.
    sjis = ClientEncoding("SJIS")
    q = "INSERT INTO t (k) VALUES (E'表')".encode("cp932")
    assert b"\\'" in q
    assert router.route_simple(q, sjis).shards == (ts("表"),)


def test_split_insert_with_non_ascii_text_is_refused(router: Router) -> None:
    a, b = next((x, y) for x in KEYS for y in KEYS if ts(x) != ts(y))
    q = f"INSERT INTO t (k) VALUES ('{a}'), ('{b}')".encode("latin-1")
    r = router.route_simple(q, LATIN1)
    assert r.error is not None and r.error[0] == "0A000"
    r = router.route_simple(f"INSERT INTO t (k) VALUES ('{a}'), ('{b}')".encode())
    assert r.split is not None


@pytest.mark.parametrize(
    ("spelling", "name"),
    [("latin1", "LATIN1"), ("ISO-8859-1", "LATIN1"), ("unicode", "UTF8"), ("win1252", "WIN1252"),
     ("Windows-1252", "WIN1252"), ("utf-8", "UTF8"), ("Shift_JIS", "SJIS"), ("sql_ascii", "SQL_ASCII")],
)  # fmt: skip
def test_canonical_name(spelling: str, name: str) -> None:
    assert canonical_name(spelling) == name


def settle(state: SessionState, sql: str, status: int = 0x49, outcome: bool | None = None) -> None:
    for effect in analyse_query(sql):
        state.note(effect)
    state.on_ready(status, False, outcome)


@pytest.mark.parametrize(
    ("startup", "sql", "expected"),
    [
        ({}, "SET client_encoding = 'LATIN1'", "LATIN1"),
        ({}, "SET NAMES 'win1252'", "WIN1252"),
        ({}, "SET client_encoding TO latin1", "LATIN1"),
        ({}, "SELECT set_config('client_encoding', 'LATIN1', false)", "LATIN1"),
        ({}, "SET client_encoding = 'UTF8'", None),
        ({"client_encoding": "LATIN1"}, "SELECT 1", "LATIN1"),
        ({"options": "-c client_encoding=WIN1252"}, "SELECT 1", "WIN1252"),
        ({"client_encoding": "LATIN1"}, "SET client_encoding = 'UTF8'", None),
        (
            {"client_encoding": "LATIN1"},
            "SET client_encoding = 'UTF8'; SET client_encoding TO DEFAULT",
            "LATIN1",
        ),
        ({"client_encoding": "LATIN1"}, "SET client_encoding = 'UTF8'; RESET client_encoding", "LATIN1"),
        ({"client_encoding": "LATIN1"}, "SET client_encoding = 'UTF8'; RESET ALL", "LATIN1"),
        ({}, "SET client_encoding = 'LATIN1'; SET client_encoding TO DEFAULT", None),
    ],
)
def test_session_state_tracks_the_client_encoding(
    startup: dict[str, str], sql: str, expected: str | None
) -> None:
    state = SessionState(startup)
    settle(state, sql)
    assert (state.client_encoding.name if state.client_encoding else None) == expected


def test_client_encoding_set_in_a_block() -> None:
    state = SessionState({})
    settle(state, "BEGIN; SET client_encoding = 'LATIN1'", status=0x54)
    assert state.client_encoding == LATIN1  # in effect already, though not kept until COMMIT
    settle(state, "ROLLBACK", outcome=False)
    assert state.client_encoding is None
    settle(state, "BEGIN; SET client_encoding = 'LATIN1'", status=0x54)
    settle(state, "COMMIT", outcome=True)
    assert state.client_encoding == LATIN1
