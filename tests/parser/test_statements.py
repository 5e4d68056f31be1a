"""Leading keywords and statement splitting: exact for the lexical corners PostgreSQL's scanner has."""

from __future__ import annotations

import pytest

from parser.statements import has_more_statements, leading_keyword, leading_words, split_statements


@pytest.mark.parametrize(
    ("sql", "keyword"),
    [
        (b"select 1", b"SELECT"),
        (b"  \n\tSet x = 1", b"SET"),
        (b"/* hint */ BEGIN", b"BEGIN"),
        (b"-- comment\nreset all", b"RESET"),
        (b"/* a */ /* b */ discard all", b"DISCARD"),
        (b"", b""),
        (b"(select 1)", b""),
    ],
)
def test_leading_keyword(sql: bytes, keyword: bytes) -> None:
    assert leading_keyword(sql) == keyword


def test_leading_keyword_from_an_offset() -> None:
    assert leading_keyword(b"Q\x00\x00\x00\x0eset a=1\x00", 5) == b"SET"


def test_leading_words() -> None:
    assert leading_words("create temp table t (a int)") == ("CREATE", "TEMP", "TABLE")
    assert leading_words("commit") == ("COMMIT", "", "")


@pytest.mark.parametrize(
    ("sql", "parts"),
    [
        ("select 1; select 2", ["select 1", "select 2"]),
        ("select ';'; set x = 1;", ["select ';'", "set x = 1"]),
        ("select 'it''s; fine'", ["select 'it''s; fine'"]),
        ("select E'a\\'; b'; select 2", ["select E'a\\'; b'", "select 2"]),
        ('select 1 as "a;b"; select 2', ['select 1 as "a;b"', "select 2"]),
        ("do $$ begin perform 1; end $$; select 2", ["do $$ begin perform 1; end $$", "select 2"]),
        ("do $x$ ; $x$", ["do $x$ ; $x$"]),
        ("select 1 -- ; not a split\n; select 2", ["select 1 -- ; not a split", "select 2"]),
        ("select /* ; /* nested ; */ ; */ 1", ["select /* ; /* nested ; */ ; */ 1"]),
        ("create rule r as on insert to t do (insert into u values (1); insert into u values (2))", None),
        (";;", []),
    ],
)
def test_split_statements(sql: str, parts: list[str] | None) -> None:
    assert split_statements(sql) == (parts if parts is not None else [sql])


def test_has_more_statements() -> None:
    assert not has_more_statements(b"select 1;\x00")
    assert not has_more_statements(b"select 1; \n\x00")
    assert has_more_statements(b"set a = 1; select 1\x00")
