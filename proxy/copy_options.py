"""What a COPY statement says about its data: direction, endpoint, format and the options that
decide how rows and fields are cut (DELIMITER, QUOTE, ESCAPE, NULL, HEADER, FORCE_NULL, ...).

pgshard splits COPY FROM STDIN rows by key and gathers COPY TO STDOUT from several shards, so it
must read the data exactly as PostgreSQL will. Both option syntaxes are understood: the
parenthesised list (`WITH (FORMAT csv, HEADER)`) and the older keyword form that psql's `\\copy`
passes on verbatim (`csv header delimiter ';'`). Anything else is refused (CopyStatementError)
rather than guessed; the statement itself is always sent to the shards unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    |(?P<comment>--[^\n]*|/\*(?:[^*]|\*(?!/))*\*/)
    |(?P<estr>[eE]'(?:[^'\\]|\\.|'')*')
    |(?P<str>'(?:[^']|'')*')
    |(?P<dollar>\$(?P<tag>(?:[A-Za-z_][A-Za-z0-9_]*)?)\$.*?\$(?P=tag)\$)
    |(?P<ident>"(?:[^"]|"")*")
    |(?P<word>[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*)
    |(?P<num>[0-9]+(?:\.[0-9]*)?)
    |(?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_E_ESCAPE = re.compile(
    r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))",
    re.S,
)
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_TRUE, _FALSE = ("true", "on", "1"), ("false", "off", "0")
# Options that do not change how pgshard cuts rows or reads the key (the shards apply them).
_PASSIVE = frozenset({"freeze", "force_quote", "on_error", "log_verbosity", "reject_limit"})


class CopyStatementError(Exception):
    """A COPY statement pgshard cannot read exactly: refused instead of split by a guess."""

    def __init__(self, message: str, sqlstate: str = "0A000") -> None:
        super().__init__(message)
        self.sqlstate, self.message = sqlstate, message


@dataclass(frozen=True, slots=True)
class CopyOptions:
    format: str = "text"  # text | csv | binary
    header: bool = False  # HEADER true or MATCH: the first line is not a row
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    quote: bytes = b'"'
    escape: bytes = b'"'
    force_null: tuple[str, ...] | bool = ()  # column names, or True for *
    force_not_null: tuple[str, ...] | bool = ()
    encoding: str | None = None  # ENCODING (UTF8 only): the data's encoding, whatever client_encoding is


@dataclass(frozen=True, slots=True)
class CopyStatement:
    direction: str  # "from" or "to"
    endpoint: str  # "stdin", "stdout", "file" or "program"
    options: CopyOptions


def applies_to(columns: tuple[str, ...] | bool, column: str) -> bool:
    return columns is True or (isinstance(columns, tuple) and column in columns)


class _Tokens:
    def __init__(self, sql: str) -> None:
        self.items: list[tuple[str, str]] = []
        for m in _TOKEN.finditer(sql):
            kind = m.lastgroup or "punct"
            if kind == "tag":
                kind = "dollar"
            if kind not in ("ws", "comment"):
                self.items.append((kind, m.group(kind)))
        self.pos = 0

    def peek(self) -> tuple[str, str]:
        return self.items[self.pos] if self.pos < len(self.items) else ("end", "")

    def next(self) -> tuple[str, str]:
        item = self.peek()
        self.pos += 1
        return item

    def word(self) -> str:
        """The next token's keyword spelling (upper case), or '' if it is not a bare word."""
        kind, text = self.peek()
        return text.upper() if kind == "word" else ""

    def accept(self, *words: str) -> str | None:
        if self.word() in words:
            return self.next()[1].upper()
        return None

    def punct(self, char: str) -> bool:
        if self.peek() == ("punct", char):
            self.pos += 1
            return True
        return False

    def skip_parens(self) -> None:
        """After an opening parenthesis: skip to just past its match."""
        depth = 1
        while depth:
            kind, text = self.next()
            if kind == "end":
                raise CopyStatementError("COPY statement not understood: unbalanced parentheses")
            if kind == "punct":
                depth += {"(": 1, ")": -1}.get(text, 0)


def parse_copy(sql: str) -> CopyStatement:
    """Read a COPY statement; CopyStatementError if pgshard cannot read it exactly."""
    t = _Tokens(sql)
    if t.accept("COPY") is None:
        raise CopyStatementError("not a COPY statement")
    fmt: str | None = None
    if t.punct("("):
        t.skip_parens()
    else:
        if t.accept("BINARY"):
            fmt = "binary"
        _name(t)
        while t.punct("."):
            _name(t)
        if t.punct("("):
            t.skip_parens()
    direction = t.accept("FROM", "TO")
    if direction is None:
        raise CopyStatementError("COPY statement not understood: FROM or TO expected")
    if t.accept("STDIN", "STDOUT"):
        endpoint = "stdin" if direction == "FROM" else "stdout"
    elif t.accept("PROGRAM"):
        _string(t, "PROGRAM")
        endpoint = "program"
    else:
        _string(t, "file name")
        endpoint = "file"
    values: dict[str, object] = {}
    if fmt:
        values["format"] = fmt
    t.accept("WITH")
    if t.punct("("):
        _option_list(t, values)
    else:
        _old_options(t, values)
    if t.word() != "WHERE":
        t.punct(";")
        if t.peek()[0] != "end":
            raise CopyStatementError(f"COPY statement not understood near {t.peek()[1]!r}")
    return CopyStatement(direction.lower(), endpoint, _options(values))


def _name(t: _Tokens) -> str:
    kind, text = t.next()
    if kind == "word":
        return text.lower()
    if kind == "ident":
        return text[1:-1].replace('""', '"')
    raise CopyStatementError(f"COPY statement not understood near {text!r}")


def _string(t: _Tokens, what: str) -> str:
    kind, text = t.next()
    if kind == "str":
        return text[1:-1].replace("''", "'")
    if kind == "estr":
        return _unescape(text[2:-1])
    if kind == "dollar":
        return text[text.index("$", 1) + 1 : text.rindex("$", 0, len(text) - 1)]
    raise CopyStatementError(f"COPY {what} must be a string constant pgshard can read, not {text!r}")


def _unescape(body: str) -> str:
    """An E'...' string's value."""

    def one(m: re.Match[str]) -> str:
        octal, hex2, u4, u8, other = m.groups()
        if octal or hex2:
            return chr(int(octal, 8) if octal else int(hex2, 16))
        if u4 or u8:
            return chr(int(u4 or u8, 16))
        return _SIMPLE_ESCAPES.get(other, other)

    return _E_ESCAPE.sub(one, body.replace("''", "'"))


def _option_list(t: _Tokens, values: dict[str, object]) -> None:
    """`( name [value] [, ...] )`, the syntax of PostgreSQL 9.0 and later."""
    while True:
        name = _name(t).lower()
        kind, text = t.peek()
        value: object = True
        if (kind, text) in (("punct", ","), ("punct", ")")):
            pass
        elif kind in ("str", "estr", "dollar"):
            value = _string(t, name.upper())
        elif kind in ("word", "num", "ident"):
            t.next()
            value = text.lower() if kind != "ident" else text[1:-1]
        elif t.punct("*"):
            value = "*"
        elif t.punct("("):
            columns = [_name(t)]
            while t.punct(","):
                columns.append(_name(t))
            if not t.punct(")"):
                raise CopyStatementError(f"COPY option {name} not understood")
            value = tuple(columns)
        else:
            raise CopyStatementError(f"COPY option {name} not understood")
        values[name] = value
        if t.punct(")"):
            return
        if not t.punct(","):
            raise CopyStatementError(f"COPY option list not understood near {t.peek()[1]!r}")


def _old_options(t: _Tokens, values: dict[str, object]) -> None:
    """The keyword options of PostgreSQL before 9.0, still accepted (and what psql's \\copy sends)."""
    while True:
        word = t.accept(
            "BINARY", "CSV", "HEADER", "FREEZE", "DELIMITER", "NULL", "QUOTE", "ESCAPE", "FORCE", "ENCODING"
        )
        if word is None:
            return
        if word in ("BINARY", "CSV"):
            values["format"] = word.lower()
        elif word in ("HEADER", "FREEZE"):
            values[word.lower()] = True
        elif word in ("DELIMITER", "NULL", "QUOTE", "ESCAPE", "ENCODING"):
            t.accept("AS")
            values[word.lower()] = _string(t, word)
        else:  # FORCE QUOTE cols|*, FORCE NOT NULL cols, FORCE NULL cols
            which = t.accept("QUOTE", "NOT", "NULL")
            if which == "NOT" and t.accept("NULL") is None:
                raise CopyStatementError("COPY option FORCE NOT NULL not understood")
            if which is None:
                raise CopyStatementError("COPY option FORCE not understood")
            key = {"QUOTE": "force_quote", "NOT": "force_not_null", "NULL": "force_null"}[which]
            if t.punct("*"):
                values[key] = "*"
                continue
            kind, text = t.peek()
            if kind == "str" and text == "'*'":
                t.next()
                values[key] = "*"
                continue
            columns = [_name(t)]
            while t.punct(","):
                columns.append(_name(t))
            values[key] = tuple(columns)


def _boolean(name: str, value: object, match: bool = False) -> bool:
    if value is True:
        return True
    text = str(value).lower()
    if text in _TRUE or (match and text == "match"):
        return True
    if text in _FALSE:
        return False
    raise CopyStatementError(f"{name} requires a Boolean value", "22023")


def _byte(name: str, value: object) -> bytes:
    raw = str(value).encode()
    if len(raw) != 1:
        raise CopyStatementError(f"COPY {name} must be a single one-byte character", "22023")
    return raw


def _columns(name: str, value: object) -> tuple[str, ...] | bool:
    if value == "*":
        return True
    if isinstance(value, tuple):
        return value
    raise CopyStatementError(f"COPY {name} needs a list of columns")


def _options(values: dict[str, object]) -> CopyOptions:
    fmt = str(values.pop("format", "text")).lower()
    if fmt not in ("text", "csv", "binary"):
        raise CopyStatementError(f'COPY format "{fmt}" not recognized', "22023")
    csv = fmt == "csv"
    quote = _byte("quote", values.pop("quote")) if "quote" in values else b'"'
    delimiter = _byte("delimiter", values.pop("delimiter")) if "delimiter" in values else None
    out = CopyOptions(
        format=fmt,
        header=_boolean("header", values.pop("header"), match=True) if "header" in values else False,
        delimiter=delimiter or (b"," if csv else b"\t"),
        null=str(values.pop("null")).encode() if "null" in values else b"" if csv else b"\\N",
        quote=quote,
        escape=_byte("escape", values.pop("escape")) if "escape" in values else quote,
        force_null=_columns("FORCE_NULL", values.pop("force_null")) if "force_null" in values else (),
        force_not_null=(
            _columns("FORCE_NOT_NULL", values.pop("force_not_null")) if "force_not_null" in values else ()
        ),
    )
    encoding = values.pop("encoding", None)
    if encoding is not None and re.sub(r"[-_]", "", str(encoding).lower()) not in ("utf8", "unicode"):
        raise CopyStatementError(
            f"COPY with ENCODING {str(encoding)!r} over several shards is not supported (UTF8 only)"
        )
    if encoding is not None:
        out = replace(out, encoding="UTF8")
    if "freeze" in values:
        _boolean("freeze", values["freeze"])
    unknown = [name for name in values if name not in _PASSIVE]
    if unknown:
        raise CopyStatementError(f'COPY option "{unknown[0]}" is not supported over several shards')
    return out
