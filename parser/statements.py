"""Statement boundaries and leading keywords: the exact, cheap part of SQL analysis.

sqlglot misreads transaction control and utility statements (DESIGN.md, "Measured facts"), and it
costs 75-260 us a parse; the first keyword of a statement costs one regex match. So transaction
control, SET and the session-pinning utilities are recognised here, and sqlglot is kept for queries.
Lexical rules follow PostgreSQL's scanner (scan.l): '' quotes, E'' escapes, "" identifiers,
dollar quotes, -- and nested /* */ comments.
"""

from __future__ import annotations

import re

# Whitespace and comments before the first keyword, then the keyword itself.
_LEADING = re.compile(rb"(?:\s+|--[^\n]*(?:\n|$)|/\*(?:[^*]|\*(?!/))*\*/)*([A-Za-z_]+)")
_LEADING_WORDS = re.compile(
    r"(?:\s+|--[^\n]*(?:\n|$)|/\*(?:[^*]|\*(?!/))*\*/)*([A-Za-z_]+)(?:\s+([A-Za-z_]+))?(?:\s+([A-Za-z_]+))?"
)
_WORD = re.compile(rb"[A-Za-z_]+")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")


def leading_keyword(sql: bytes | bytearray | memoryview, start: int = 0) -> bytes:
    """The first keyword, upper-cased (b"" if there is none): enough to classify most statements."""
    m = _WORD.match(sql, start) or _LEADING.match(sql, start)  # most statements start with it
    return m.group(m.lastindex or 0).upper() if m else b""


def leading_words(sql: str) -> tuple[str, str, str]:
    """Up to three leading words, upper-cased, for statements whose second word matters (CREATE TEMP)."""
    m = _LEADING_WORDS.match(sql)
    if not m:
        return "", "", ""
    return tuple((w or "").upper() for w in m.groups())  # type: ignore[return-value]


_MORE_AFTER_SEMICOLON = re.compile(rb";[\s;\x00]*[^\s;\x00]")
_BLANK_OR_SEMICOLON = b" \t\n\r\f\v;\x00"


def has_more_statements(sql: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """Whether a simple Query may carry several statements (cheap pre-check before splitting)."""
    stop = len(sql) if end is None else end
    semi = sql.find(b";", start, stop)
    if semi < 0 or not sql[semi + 1 : stop].strip(_BLANK_OR_SEMICOLON):
        return False  # none, or only a trailing one: the common case, without a regex
    return _MORE_AFTER_SEMICOLON.search(sql, semi, stop) is not None


def split_statements(sql: str) -> list[str]:
    """Split a multi-statement string at top-level semicolons, honouring quotes and comments."""
    out: list[str] = []
    i, n, begin, depth = 0, len(sql), 0, 0
    while i < n:
        c = sql[i]
        if c == "'" or (
            c in "eE" and i + 1 < n and sql[i + 1] == "'" and (i == 0 or not _ident_char(sql[i - 1]))
        ):
            escapes = c != "'"
            i += 2 if escapes else 1
            while i < n:
                if escapes and sql[i] == "\\":
                    i += 2
                    continue
                if sql[i] == "'":
                    if i + 1 < n and sql[i + 1] == "'":
                        i += 2
                        continue
                    break
                i += 1
            i += 1
        elif c == '"':
            end = sql.find('"', i + 1)
            while end != -1 and end + 1 < n and sql[end + 1] == '"':
                end = sql.find('"', end + 2)
            i = n if end == -1 else end + 1
        elif c == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end == -1 else end + 1
        elif c == "/" and sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "$" and (i == 0 or not _ident_char(sql[i - 1])):
            m = _DOLLAR_TAG.match(sql, i)
            if m:
                end = sql.find(m.group(0), m.end())
                i = n if end == -1 else end + len(m.group(0))
            else:
                i += 1
        elif c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth = max(0, depth - 1)
            i += 1
        elif c == ";" and depth == 0:
            part = sql[begin:i].strip()
            if part:
                out.append(part)
            begin = i = i + 1
        else:
            i += 1
    tail = sql[begin:].strip()
    if tail:
        out.append(tail)
    return out


def _ident_char(c: str) -> bool:
    return c.isalnum() or c == "_"
