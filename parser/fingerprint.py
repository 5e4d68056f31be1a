"""The route-cache key of a statement: its text with every constant replaced by a marker.

Routing may not pay a sqlglot parse per query (DESIGN.md, "Parse once": 75-260 us a parse).
Statements an application sends differ mostly in their constants, so one regex pass replaces
each number and '...' string by a marker and hands the constants back in order. Statements
with equal fingerprints have the same shape, and so the same route plan, which refers to
constants by position; a cache hit then reads the shard key straight from the list.

Lexical rules follow PostgreSQL's scanner (src/backend/parser/scan.l), with
standard_conforming_strings on (the default since 9.1): '' doubles a quote in '...' strings,
E'...' strings take backslash escapes, "..." identifiers, $tag$ dollar quotes, -- and /* */
comments (one level of nesting is understood).

- Markers are b"\\x00" (number) and b"\\x01" (string). Neither byte can appear in a valid
  statement outside a comment, a quoted identifier or a dollar quote (the scanner rejects
  control characters; a Query message is a C string, so NUL cannot appear at all), which makes
  the fingerprint unambiguous: two statements with the same fingerprint have the same tokens
  up to their constants.
- Kept verbatim (part of the shape): "identifiers", $n parameters, dollar-quoted strings (they
  are mostly function bodies), B'', X'', N'' and U&'' strings, keywords such as TRUE and NULL.
- Comments are dropped (a per-request comment such as sqlcommenter's traceparent would
  otherwise make every statement a cache miss); `/* pgshard: ... */` and `-- pgshard: ...`
  comments are returned as hints.
- Whitespace and letter case are left alone: normalising them would cost more than the cache
  misses it saves.
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import NamedTuple


class LiteralKind(IntEnum):
    NUMBER = 0
    STRING = 1


class Literal(NamedTuple):
    """One constant of a statement: its kind and its value in PostgreSQL text format (UTF-8).

    A string's value has its quotes removed and its escapes ('' and E'' backslashes) resolved,
    so it is exactly what `router.hashing.key_from_text` expects. A number is its digits as
    written (PostgreSQL 16 spellings such as 0x1F and 1_000 included); a leading minus sign is
    an operator, not part of the literal.
    """

    kind: LiteralKind
    value: bytes


class Fingerprint(NamedTuple):
    key: bytes
    """The statement with constants replaced by markers and comments removed: the cache key."""
    literals: list[Literal]
    """The constants, in order of appearance."""
    hints: list[bytes]
    """The bodies of `pgshard:` comments (b"shard=2"), in order; usually empty."""


NUMBER_MARKER = b"\x00"
STRING_MARKER = b"\x01"

# Where a token that matters may start: a comment, a quoted identifier, a string, a dollar quote,
# a number. The lookahead lets the regex engine skip every other byte cheaply (measured: 1.1 us
# to scan the pgbench SELECT, against 1.9 us without it, and 3 us once letters join the set,
# which is why E'', B'', X'', N'' and U&'' prefixes are looked at by hand below).
_SCAN = re.compile(
    rb"""(?=[-/"'$0-9.])(?:
      --[^\n]*
    | /\*(?:[^*/]|\*(?!/)|/(?!\*)|/\*(?:[^*]|\*(?!/))*\*/)*\*/
    | "(?:[^"]|"")*"
    | '(?:[^']|'')*'
    | \$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$
    | 0[xX][0-9a-fA-F_]+ | 0[oO][0-7_]+ | 0[bB][01_]+
    | (?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9]+)?
    )""",
    re.VERBOSE,
)
_ESCAPE_STRING = re.compile(rb"[eE]'(?:[^'\\]|\\.|'')*'", re.DOTALL)
_HINT = re.compile(rb"(?:--|/\*)\s*pgshard\s*:\s*(.*?)\s*(?:\*/)?\s*$", re.DOTALL | re.IGNORECASE)

# scan.l ident_cont, every byte >= 0x80 counting as a letter: a digit or quote right after one of
# these belongs to an identifier (t1, x$1) or a parameter ($1), not to a constant.
_IDENT = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$" + bytes(range(0x80, 0x100))
)
_QUOTE, _DOLLAR, _MINUS, _SLASH, _AMPERSAND, _DOT = 39, 36, 45, 47, 38, 46
_PLAIN, _ESCAPED, _OPAQUE = 0, 1, 2
_NUMBER = LiteralKind.NUMBER
_STRING = LiteralKind.STRING
_new = tuple.__new__  # NamedTuples built without their Python-level __new__: ~0.2 us each saved


def fingerprint(sql: bytes, spans: list[tuple[int, int]] | None = None) -> Fingerprint:
    """(cache key, constants, hints) of one statement, in one regex-driven pass.

    `spans`, if given, receives the byte span of each constant (for analysis, not the hot path).
    About 2-3 us for the pgbench SELECT (router/routing_bench.py measures it).
    """
    literals: list[Literal] = []
    hints: list[bytes] = []
    search = _SCAN.search
    m = search(sql)
    if m is None:
        return _new(Fingerprint, (sql, literals, hints))
    out: list[bytes] = []
    pos = 0  # sql[:pos] is accounted for in `out`
    while m is not None:
        start = m.start()
        end = m.end()
        c = sql[start]
        if 48 <= c <= 57 or c == _DOT:  # a number, unless it ends an identifier (t1) or is $1
            if not (start and sql[start - 1] in _IDENT):
                literals.append(_new(Literal, (_NUMBER, sql[start:end])))
                if spans is not None:
                    spans.append((start, end))
                out.append(sql[pos:start])
                out.append(NUMBER_MARKER)
                pos = end
        elif c == _QUOTE:
            prefix = _PLAIN
            if start:
                before = sql[start - 1]
                if before in _IDENT or before == _AMPERSAND:
                    prefix = _string_prefix(sql, start)
            if prefix == _PLAIN:
                value = sql[start + 1 : end - 1]
                if b"''" in value:
                    value = value.replace(b"''", b"'")
                literals.append(_new(Literal, (_STRING, value)))
                if spans is not None:
                    spans.append((start, end))
                out.append(sql[pos:start])
                out.append(STRING_MARKER)
                pos = end
            elif prefix == _ESCAPED:
                e = _ESCAPE_STRING.match(sql, start - 1)
                if e is not None:
                    end = e.end()
                    value = decode_escape_string(sql[start + 1 : end - 1])
                    literals.append(_new(Literal, (_STRING, value)))
                    if spans is not None:
                        spans.append((start - 1, end))
                    out.append(sql[pos : start - 1])
                    out.append(STRING_MARKER)
                    pos = end
            # else B'', X'', N'' or U&'': part of the shape, kept as written
        elif c in (_MINUS, _SLASH):  # a comment
            text = sql[start:end]
            if b"pgshard" in text:
                h = _HINT.match(text)
                if h is not None:
                    hints.append(h.group(1))
            out.append(sql[pos:start])
            out.append(b" ")
            pos = end
        elif c == _DOLLAR and not (start and sql[start - 1] in _IDENT):
            close = sql.find(sql[start:end], end)  # a dollar quote: kept as written
            end = len(sql) if close < 0 else close + end - start
        # else a "quoted identifier": kept as written
        m = search(sql, end)
    if not out:
        return _new(Fingerprint, (sql, literals, hints))
    out.append(sql[pos:])
    return _new(Fingerprint, (b"".join(out), literals, hints))


def _string_prefix(sql: bytes, quote: int) -> int:
    """What the letters before a quote make of the string: E'' (escapes), B''/X''/N''/U&''
    (kept in the shape), or nothing when they end a longer word (date'2024-01-01' is a
    typed literal: a plain string after the type name)."""
    before = sql[quote - 1]
    prev = sql[quote - 2] if quote >= 2 else 0
    if before == _AMPERSAND:
        if prev in b"uU" and not (quote >= 3 and sql[quote - 3] in _IDENT):
            return _OPAQUE
        return _PLAIN
    if prev in _IDENT:
        return _PLAIN
    if before in b"eE":
        return _ESCAPED
    if before in b"bBxXnN":
        return _OPAQUE
    return _PLAIN


class LiteralSpan(NamedTuple):
    """Where a constant sits in a statement (character offsets, end exclusive), for analysis."""

    start: int
    end: int
    literal: Literal


def literal_spans(sql: str) -> tuple[Fingerprint, list[LiteralSpan]]:
    """The fingerprint of a str statement and where its constants are, in characters.

    sqlglot reports character offsets, which differ from byte offsets once a statement holds
    non-ASCII text. The constants are numbered exactly as `fingerprint` numbers them: it is the
    same scan, run on the UTF-8 bytes.
    """
    raw = sql.encode("utf-8", "surrogateescape")
    offsets: list[tuple[int, int]] = []
    fp = fingerprint(raw, offsets)
    if not sql.isascii():
        offsets = [(_char_offset(raw, s), _char_offset(raw, e)) for s, e in offsets]
    return fp, [LiteralSpan(s, e, lit) for (s, e), lit in zip(offsets, fp.literals, strict=True)]


def _char_offset(raw: bytes, byte_offset: int) -> int:
    return len(raw[:byte_offset].decode("utf-8", "surrogateescape"))


def display(key: bytes) -> str:
    """A fingerprint for people (logs, statistics): markers shown as ? and '?'."""
    return key.replace(NUMBER_MARKER, b"?").replace(STRING_MARKER, b"'?'").decode("utf-8", "replace")


# scan.l, <xe> rules: the backslash escapes of E'...' strings.
_ESCAPE = re.compile(
    rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))|''", re.DOTALL
)
_SIMPLE_ESCAPES = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t"}


def decode_escape_string(body: bytes) -> bytes:
    """The value of an E'...' string body (quotes stripped), as UTF-8 bytes."""
    if b"\\" not in body and b"''" not in body:
        return body

    def replace(m: re.Match[bytes]) -> bytes:
        octal, hexa, u4, u8, other = m.groups()
        if octal is not None:
            return bytes([int(octal, 8) & 0xFF])
        if hexa is not None:
            return bytes([int(hexa, 16)])
        if u4 is not None or u8 is not None:
            return chr(int(u4 or u8, 16)).encode("utf-8", "surrogatepass")
        if other is not None:
            return _SIMPLE_ESCAPES.get(other, other)
        return b"'"

    return _ESCAPE.sub(replace, body)
