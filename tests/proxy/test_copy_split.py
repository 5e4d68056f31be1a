"""COPY FROM data split into rows and key fields as PostgreSQL reads it (proxy.copy_split), and
COPY statements' options (proxy.copy_options).

Rows are generated, written the way PostgreSQL (or Python's csv module) writes them, fed to a
splitter in arbitrary pieces, and the rows must come back byte for byte with the right key. The
e2e tests (tests/e2e/test_copy.py) check the same against PostgreSQL itself.
"""

from __future__ import annotations

import csv
import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.copy_options import CopyStatementError, parse_copy
from proxy.copy_split import CopyDataError, Splitter, csv_field, splitter_for
from proxy.pg_encoding import ClientEncoding, EncodingError

Value = str | None
_ALPHABET = st.sampled_from([*"ab,;\"'\\.\t\n\r| é日", "\\."])
_VALUES = st.one_of(st.none(), st.lists(_ALPHABET, max_size=6).map("".join))
_ROWS = st.integers(1, 4).flatmap(lambda n: st.lists(st.lists(_VALUES, min_size=n, max_size=n), max_size=8))


def _split(splitter: Splitter, data: bytes, cuts: list[int]) -> list[tuple[bytes, bytes | None]]:
    rows = []
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        rows += splitter.feed(data[last:cut])
        last = cut
    rows += splitter.feed(data[last:])
    return rows + splitter.finish()


def _pg_csv(value: Value, delimiter: str, quote: str, escape: str, first: bool) -> str:
    """CopyAttributeOutCSV: quote when needed; inside quotes, the quote and escape are escaped."""
    if value is None:
        return ""
    if value == "" or any(c in value for c in (delimiter, quote, "\r", "\n")) or (first and value == "\\."):
        inner = "".join(escape + c if c in (quote, escape) else c for c in value)
        return quote + inner + quote
    return value


@settings(max_examples=200, deadline=None)
@given(
    rows=_ROWS,
    key=st.integers(0, 3),
    dialect=st.sampled_from([(",", '"', '"'), (";", "'", "\\"), ("|", '"', "\\"), ("\t", '"', '"')]),
    newline=st.sampled_from(["\n", "\r\n"]),
    header=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_csv_rows_split_and_recombine(
    rows: list[list[Value]],
    key: int,
    dialect: tuple[str, str, str],
    newline: str,
    header: bool,
    cuts: list[int],
) -> None:
    delimiter, quote, escape = dialect
    rows = [r for r in rows if key < len(r)]
    quoted = quote.replace("'", "''")
    options = f"DELIMITER E'{delimiter}', QUOTE '{quoted}', ESCAPE E'\\{escape}'"
    statement = parse_copy(f"COPY t FROM STDIN WITH (FORMAT csv, HEADER {str(header).lower()}, {options})")
    assert statement.options.delimiter == delimiter.encode() and statement.options.escape == escape.encode()
    lines = [delimiter.join(f"h{i}" for i in range(4)) + newline] if header else []
    lines += [
        delimiter.join(_pg_csv(v, delimiter, quote, escape, i == 0) for i, v in enumerate(row)) + newline
        for row in rows
    ]
    data = "".join(lines).encode()
    splitter = splitter_for(statement.options, key, "k")
    got = _split(splitter, data, cuts)
    assert (splitter.header or b"") + b"".join(raw for raw, _ in got) == data
    assert [raw.decode() for raw, _ in got] == (lines[1:] if header else lines)
    assert [k.decode() if k is not None else None for _, k in got] == [row[key] for row in rows]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.text(',"\r\nab é.\\', max_size=6), min_size=2, max_size=3), max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=5),
)
def test_csv_written_by_pythons_csv_module(rows: list[list[str]], cuts: list[int]) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)  # "\r\n": fields with either are quoted
    data = out.getvalue().encode()
    if data.startswith(b"\\.\r") or b"\n\\.\r" in data:
        return  # an unquoted \. line is PostgreSQL's end-of-data marker
    splitter = splitter_for(parse_copy("COPY t FROM STDIN CSV").options, 1, "k")
    got = _split(splitter, data, cuts)
    assert b"".join(raw for raw, _ in got) == data
    assert [(k or b"").decode() for _, k in got] == [row[1] for row in rows]


def _pg_text(value: Value, escaped_newline: bool) -> str:
    if value is None:
        return "\\N"
    out = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r")
    return out.replace("\n", "\\\n" if escaped_newline else "\\n")


@settings(max_examples=200, deadline=None)
@given(
    rows=_ROWS,
    key=st.integers(0, 3),
    escaped_newline=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
    end_marker=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_text_rows_split_and_recombine(
    rows: list[list[Value]], key: int, escaped_newline: bool, newline: str, end_marker: bool, cuts: list[int]
) -> None:
    rows = [r for r in rows if key < len(r)]
    lines = ["\t".join(_pg_text(v, escaped_newline) for v in row) + newline for row in rows]
    data = "".join(lines).encode() + (b"\\." + newline.encode() + b"ignored" if end_marker else b"")
    splitter = splitter_for(parse_copy("COPY t FROM STDIN").options, key, "k")
    got = _split(splitter, data, cuts)
    assert [raw.decode() for raw, _ in got] == lines
    assert [k.decode() if k is not None else None for _, k in got] == [row[key] for row in rows]
    assert splitter.ended == end_marker


def test_text_escapes_in_the_key() -> None:
    options = parse_copy("COPY t FROM STDIN (DELIMITER ',', NULL 'nil')").options
    data = b"a\\,b,1\n\\x41\\101\\t\\q,2\nnil,3\n\\N,4\nx\\\ny,5\nz\\"
    got = _split(splitter_for(options, 0, "k"), data, [])
    assert [k for _, k in got] == [b"a,b", b"AA\tq", None, b"N", b"x\ny", b"z"]


def test_csv_corners() -> None:
    options = parse_copy("COPY t FROM STDIN WITH CSV HEADER FORCE NOT NULL k").options
    data = b'k,v\n"a,b",1\n,2\n"",3\n"\\.",4\n\\.x,5\n\\.\nignored,6\n'
    splitter = splitter_for(options, 0, "k")
    got = _split(splitter, data, [1, 7, 8])
    assert splitter.header == b"k,v\n" and splitter.ended
    assert [k for _, k in got] == [b"a,b", b"", b"", b"\\.", b"\\.x"]
    null = parse_copy("COPY t FROM STDIN (FORMAT csv, NULL 'N', FORCE_NULL (k))").options
    assert [k for _, k in _split(splitter_for(null, 0, "k"), b'N\n"N"\n"n"\n', [])] == [None, None, b"n"]
    assert csv_field(b'a,"b""c",d', 1, ord(","), ord('"'), ord('"')) == (b'b"c', True)
    assert csv_field(b"a,b", 2, ord(","), ord('"'), ord('"')) is None
    with pytest.raises(CopyDataError, match="unterminated CSV quoted field"):
        _split(splitter_for(options, 0, "k"), b'h\n"open,1\n', [])
    with pytest.raises(CopyDataError, match="unquoted carriage return"):
        _split(splitter_for(options, 0, "k"), b"h\na\r\nb\n", [])
    with pytest.raises(CopyDataError, match='missing data for column "k"'):
        _split(splitter_for(options, 2, "k"), b"h\na,b\n", [])
    cr = splitter_for(parse_copy("COPY t FROM STDIN CSV").options, 0, "k")
    assert _split(cr, b"1\r2\r3", [2]) == [(b"1\r", b"1"), (b"2\r", b"2"), (b"3", b"3")]


def _binary(rows: list[list[bytes | None]], extension: bytes = b"") -> bytes:
    out = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, len(extension)) + extension
    for row in rows:
        out += struct.pack("!h", len(row))
        for value in row:
            out += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return out + b"\xff\xff"


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.one_of(st.none(), st.binary(max_size=9)), min_size=2, max_size=2), max_size=8),
    extension=st.binary(max_size=3),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_binary_rows_split_and_recombine(
    rows: list[list[bytes | None]], extension: bytes, cuts: list[int]
) -> None:
    data = _binary(rows, extension)
    splitter = splitter_for(parse_copy("COPY t FROM STDIN (FORMAT binary)").options, 1, "k")
    got = _split(splitter, data, cuts)
    assert (splitter.header or b"") + b"".join(raw for raw, _ in got) + splitter.footer == data
    assert [k for _, k in got] == [row[1] for row in rows]
    with pytest.raises(CopyDataError, match="after EOF marker"):
        splitter_for(parse_copy("COPY BINARY t FROM STDIN").options, 0, "k").feed(data + b"\x00")


def test_copy_statements() -> None:
    s = parse_copy("copy items (id, v) from stdin with (freeze on)")
    assert (s.direction, s.endpoint, s.options.format) == ("from", "stdin", "text")
    s = parse_copy(
        """COPY public."It" (a, b) FROM STDIN WITH (FORMAT 'csv', HEADER match, DELIMITER ';', """
        """QUOTE '''', ESCAPE E'\\\\', FORCE_NULL (a, "B"), NULL 'x') WHERE a > 1"""
    )
    o = s.options
    assert (o.format, o.header, o.delimiter, o.quote) == ("csv", True, b";", b"'")
    assert (o.escape, o.null) == (b"\\", b"x")
    assert o.force_null == ("a", "B")
    o = parse_copy("COPY t FROM STDIN WITH CSV HEADER DELIMITER AS '|' NULL 'n' FORCE NOT NULL a, b;").options
    assert (o.header, o.delimiter, o.null, o.force_not_null) == (True, b"|", b"n", ("a", "b"))
    assert parse_copy("COPY BINARY t TO STDOUT").options.format == "binary"
    assert parse_copy("COPY (SELECT ')', 1 FROM t) TO STDOUT (FORMAT csv, HEADER)").options.header
    assert parse_copy("COPY t TO '/tmp/x' CSV").endpoint == "file"
    assert parse_copy("COPY t FROM PROGRAM 'cat x'").endpoint == "program"
    for bad, state in [
        ("COPY t FROM STDIN (FORMAT xml)", "22023"),
        ("COPY t FROM STDIN (DEFAULT 'x')", "0A000"),
        ("COPY t FROM STDIN (ENCODING 'LATIN1')", "0A000"),
        ("COPY t FROM STDIN (HEADER maybe)", "22023"),
        ("COPY t FROM STDIN CSV DELIMITER ',,'", "22023"),
        ("COPY t FROM STDIN garbage", "0A000"),
    ]:
        with pytest.raises(CopyStatementError) as info:
            parse_copy(bad)
        assert info.value.sqlstate == state, bad


def test_keys_in_another_client_encoding() -> None:
    """A text key is converted to UTF-8 before the text format's escapes are undone, as PostgreSQL
    converts each line first; the rows themselves are forwarded unchanged."""
    latin1 = ClientEncoding("LATIN1").to_utf8()
    data = "café\t1\nna\\\\ïve\t2\n\\N\t3\nplain\t4\n".encode("latin-1")
    splitter = splitter_for(parse_copy("COPY t FROM STDIN").options, 0, "k", latin1)
    rows = _split(splitter, data, [3, 9])
    assert b"".join(raw for raw, _ in rows) == data
    assert [k for _, k in rows] == ["café".encode(), "na\\ïve".encode(), None, b"plain"]
    # Escapes give bytes of the server's encoding (UTF-8 here), not of the client's.
    splitter = splitter_for(parse_copy("COPY t FROM STDIN").options, 0, "k", latin1)
    assert [k for _, k in splitter.feed(b"\\303\\251\xe9\t1\n")] == ["éé".encode()]
    splitter = splitter_for(parse_copy("COPY t FROM STDIN CSV").options, 1, "k", latin1)
    assert [k for _, k in splitter.feed(b'1,"\xe9,\xe9"\n2,\n')] == ["é,é".encode(), None]
    binary = b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"\x00\x01\x00\x00\x00\x01\xe9\xff\xff"
    splitter = splitter_for(parse_copy("COPY t FROM STDIN BINARY").options, 0, "k", latin1)
    assert [k for _, k in splitter.feed(binary)] == ["é".encode()]
    with pytest.raises(CopyDataError) as info:
        splitter_for(
            parse_copy("COPY t FROM STDIN").options, 0, "k", ClientEncoding("WIN1252").to_utf8()
        ).feed(b"\x81\t1\n")
    assert info.value.sqlstate == "22P05" and "WIN1252" in info.value.message
    # Multibyte characters hiding ASCII bytes: text and CSV must be ASCII (binary is cut by lengths).
    options = parse_copy("COPY t FROM STDIN").options
    assert splitter_for(options, 0, "k", ascii_only="SJIS").feed(b"a\t1\n") == [(b"a\t1\n", b"a")]
    with pytest.raises(CopyDataError) as info:
        splitter_for(options, 1, "k", ascii_only="SJIS").feed("1\tソ\n".encode("cp932"))
    assert info.value.sqlstate == "0A000" and "SJIS" in info.value.message
    assert splitter_for(parse_copy("COPY t FROM STDIN BINARY").options, 0, "k", ascii_only="SJIS").feed(
        binary
    )


def test_client_encodings() -> None:
    assert ClientEncoding("UTF8").as_is and ClientEncoding("SQL_ASCII").as_is
    assert not ClientEncoding("LATIN1").embeds_ascii and not ClientEncoding("EUC_JP").embeds_ascii
    assert ClientEncoding("SJIS").embeds_ascii and ClientEncoding("SOMETHING_NEW").embeds_ascii
    assert ClientEncoding("KOI8R").to_utf8()("ключ".encode("koi8_r")) == "ключ".encode()
    assert ClientEncoding("GB18030").to_utf8()("键𠀀".encode("gb18030")) == "键𠀀".encode()
    euc_jp = ClientEncoding("EUC_JP").to_utf8()
    assert euc_jp(b"ascii") == b"ascii"
    with pytest.raises(EncodingError) as info:
        euc_jp(b"\xa1\xc1")  # PostgreSQL reads U+FF5E, Python's codec U+301C
    assert info.value.sqlstate == "0A000" and "EUC_JP" in info.value.message
    with pytest.raises(EncodingError) as info:
        ClientEncoding("EUC_KR").to_utf8()(b"\xa1")
    assert info.value.sqlstate == "22021"
    assert parse_copy("COPY t FROM STDIN (ENCODING 'utf-8')").options.encoding == "UTF8"
    assert parse_copy("COPY t FROM STDIN").options.encoding is None
