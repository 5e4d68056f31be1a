"""The route-cache key: constants out, shape kept, hints aside (parser/fingerprint.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parser.fingerprint import (
    NUMBER_MARKER,
    STRING_MARKER,
    Literal,
    LiteralKind,
    decode_escape_string,
    display,
    fingerprint,
    literal_spans,
)

N, S = LiteralKind.NUMBER, LiteralKind.STRING


def values(sql: bytes) -> list[tuple[LiteralKind, bytes]]:
    return [(lit.kind, lit.value) for lit in fingerprint(sql).literals]


def test_pgbench_select() -> None:
    fp = fingerprint(b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;")
    assert fp.key == b"SELECT abalance FROM pgbench_accounts WHERE aid = \x00;"
    assert fp.literals == [Literal(N, b"48213")]
    assert fp.hints == []
    assert display(fp.key) == "SELECT abalance FROM pgbench_accounts WHERE aid = ?;"


def test_pgbench_update_keeps_the_minus_sign_out_of_the_literal() -> None:
    fp = fingerprint(b"UPDATE pgbench_accounts SET abalance = abalance + -100 WHERE aid = 5")
    assert fp.key == b"UPDATE pgbench_accounts SET abalance = abalance + -\x00 WHERE aid = \x00"
    assert values(b"UPDATE pgbench_accounts SET abalance = abalance + -100 WHERE aid = 5") == [
        (N, b"100"),
        (N, b"5"),
    ]


def test_pgbench_insert() -> None:
    sql = (
        b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 5, -100, CURRENT_TIMESTAMP)"
    )
    fp = fingerprint(sql)
    assert fp.key.count(NUMBER_MARKER) == 4
    assert b"CURRENT_TIMESTAMP" in fp.key
    assert values(sql) == [(N, b"1"), (N, b"1"), (N, b"5"), (N, b"100")]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (b"SELECT 'abc'", [(S, b"abc")]),
        (b"SELECT 'it''s'", [(S, b"it's")]),
        (b"SELECT ''", [(S, b"")]),
        (b"SELECT E'a\\nb'", [(S, b"a\nb")]),
        (b"SELECT e'\\'q\\''", [(S, b"'q'")]),
        (b"SELECT E'\\x41\\101\\u00e9\\\\'", [(S, b"AA\xc3\xa9\\")]),
        (b"SELECT date'2024-01-01'", [(S, b"2024-01-01")]),  # a typed literal: the string after the type
        (b"SELECT DATE '2024-01-01'", [(S, b"2024-01-01")]),
        (
            b"SELECT 1.5, .5, 1e10, 1.5e-3, 0x1F, 0o17, 0b101, 1_000",
            [
                (N, b"1.5"),
                (N, b".5"),
                (N, b"1e10"),
                (N, b"1.5e-3"),
                (N, b"0x1F"),
                (N, b"0o17"),
                (N, b"0b101"),
                (N, b"1_000"),
            ],
        ),
        (b"SELECT 'caf\xc3\xa9'", [(S, b"caf\xc3\xa9")]),
    ],
)
def test_literal_values(sql: bytes, expected: list[tuple[LiteralKind, bytes]]) -> None:
    assert values(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        b"SELECT * FROM t1 WHERE c2 = $1",  # digits in identifiers and parameters
        b'SELECT "col 1", "it\'s 5" FROM "T2"',  # quoted identifiers
        b"SELECT $$ 'not' 5 $$, $fn$ body 7 $fn$",  # dollar quotes are opaque
        b"SELECT B'101', X'1F', N'x', U&'d\\0061t'",  # prefixed strings are opaque
        b"SELECT a$1, x$y FROM t$3",
        b"SELECT TRUE, FALSE, NULL",
        b"SELECT caf\xc3\xa91 FROM t",  # a non-ASCII identifier ending in a digit
    ],
)
def test_shape_only(sql: bytes) -> None:
    fp = fingerprint(sql)
    assert fp.literals == []
    assert fp.key == sql


def test_comments_dropped_and_hints_returned() -> None:
    fp = fingerprint(
        b"SELECT /* plain 5 */ 1 -- trailing 'x'\n FROM t /* pgshard: shard=2 */ -- pgshard: key='a b'"
    )
    assert fp.literals == [Literal(N, b"1")]
    assert b"plain" not in fp.key and b"pgshard" not in fp.key and b"trailing" not in fp.key
    assert fp.hints == [b"shard=2", b"key='a b'"]


def test_nested_comment() -> None:
    fp = fingerprint(b"SELECT /* a /* b */ c */ 1")
    assert fp.key == b"SELECT   \x00"


def test_statements_differing_in_constants_or_comments_share_a_key() -> None:
    a = fingerprint(b"SELECT * FROM t WHERE a = 1 AND b = 'x' /* traceparent='00-aa' */")
    b = fingerprint(b"SELECT * FROM t WHERE a = 22222 AND b = 'it''s' /* traceparent='00-bb' */")
    assert a.key == b.key


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (b"SELECT * FROM t WHERE a = 1", b"SELECT * FROM t WHERE a = '1'"),  # number vs string
        (b"SELECT * FROM t WHERE a = 1", b"SELECT * FROM t WHERE a = $1"),
        (b"SELECT * FROM t WHERE a = 1", b"SELECT * FROM u WHERE a = 1"),
        (b"SELECT $$a$$", b"SELECT $$b$$"),
        (b"INSERT INTO t VALUES (1)", b"INSERT INTO t VALUES (1), (2)"),
    ],
)
def test_different_shapes_differ(one: bytes, other: bytes) -> None:
    assert fingerprint(one).key != fingerprint(other).key


def test_literal_spans_are_character_offsets() -> None:
    sql = "SELECT 'é', x FROM t WHERE k = 42 AND s = E'\\t'"
    fp, spans = literal_spans(sql)
    assert [sql[s.start : s.end] for s in spans] == ["'é'", "42", "E'\\t'"]
    assert [s.literal for s in spans] == fp.literals
    assert fp.key == fingerprint(sql.encode()).key


def test_markers_cannot_be_confused_with_text() -> None:
    fp = fingerprint(b"SELECT '\x00' FROM t")
    assert fp.key == b"SELECT " + STRING_MARKER + b" FROM t"


def test_decode_escape_string() -> None:
    assert decode_escape_string(b"plain") == b"plain"
    assert decode_escape_string(b"a\\bb\\fc\\rd\\te") == b"a\bb\fc\rd\te"
    assert decode_escape_string(b"\\U0001F600") == "\U0001f600".encode()
    assert decode_escape_string(b"it''s") == b"it's"


_WORDS = st.sampled_from(
    [
        b"SELECT",
        b"a",
        b"t1",
        b"$1",
        b"=",
        b",",
        b"(",
        b")",
        b"FROM",
        b"WHERE",
        b"AND",
        b" ",
        b"\n",
        b"-",
        b"+",
        b"::int",
        b"'x'",
        b"'it''s'",
        b"E'\\n'",
        b"42",
        b"1.5",
        b'"q 1"',
        b"/* c */",
        b"-- c\n",
        b"$$ 1 $$",
        b"caf\xc3\xa9",
    ]
)


@given(st.lists(_WORDS, max_size=30))
def test_every_marker_is_a_literal(words: list[bytes]) -> None:
    sql = b" ".join(words)
    fp = fingerprint(sql)
    assert fp.key.count(NUMBER_MARKER) + fp.key.count(STRING_MARKER) == len(fp.literals)
    assert fingerprint(sql).key == fp.key  # deterministic
    _, spans = literal_spans(sql.decode())
    assert [s.literal for s in spans] == fp.literals


@given(
    st.lists(st.integers(min_value=0, max_value=10**18), min_size=1, max_size=5),
    st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
        min_size=1,
        max_size=3,
    ),
)
def test_constants_round_trip(numbers: list[int], strings: list[str]) -> None:
    quoted = [("'" + s.replace("'", "''") + "'").encode() for s in strings]
    sql = (
        b"SELECT * FROM t WHERE k IN ("
        + b", ".join(str(n).encode() for n in numbers)
        + b") AND s IN ("
        + b", ".join(quoted)
        + b")"
    )
    template = fingerprint(
        b"SELECT * FROM t WHERE k IN ("
        + b", ".join(b"0" for _ in numbers)
        + b") AND s IN ("
        + b", ".join(b"''" for _ in strings)
        + b")"
    )
    fp = fingerprint(sql)
    assert fp.key == template.key
    assert [lit.value for lit in fp.literals] == [str(n).encode() for n in numbers] + [
        s.encode() for s in strings
    ]
