"""The machinery behind config validation: typed reads that name the key, and where a key sits in the file.

An operator who mistypes `pool_size = "20"` in the third `[[users]]` should be told
`pgshard.toml, line 31: users[2].pool_size: expected an integer, got a string`, not get a
traceback. tomllib gives values but no positions, so `locate_keys` scans the TOML text itself
(table headers, array-of-tables counters, keys, inline tables and arrays) to map each dotted key
path to its line. It runs only after tomllib has accepted the text, so it can assume valid TOML.
"""

from __future__ import annotations

import difflib
import itertools
import re
import tomllib
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

KEY_TYPES = ("bigint", "integer", "smallint", "text", "varchar", "uuid")
SHARDING_FUNCTIONS = ("hash", "range", "list")
# The ranges of PostgreSQL's int8, int4 and int2: a key outside them could never be stored.
INTEGER_TYPES = {
    "bigint": (-(2**63), 2**63 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "smallint": (-(2**15), 2**15 - 1),
}
DEFAULT_PORT = 5432

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[\d+\]$")


class ConfigError(Exception):
    """A configuration the proxy refuses to start with; the message says which key, file and line."""

    def __init__(
        self, problem: str, key: str = "", file: Path | None = None, line: int | None = None
    ) -> None:
        where = str(file) if file is not None else "<config>"
        if line is not None:
            where += f", line {line}"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.problem = problem
        self.key = key
        self.file = file
        self.line = line


def join_key(parent: str, name: str) -> str:
    """The dotted path of `name` inside `parent`, as the error messages print it."""
    return f"{parent}.{name}" if parent else name


class _Scanner:
    """Walks valid TOML text recording the 1-based line of every table, key and array element."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[str, int] = {}
        self.counts: dict[str, int] = {}  # array-of-tables path -> elements seen so far

    def line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def skip_blank(self, newlines: bool = True) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            elif c in " \t\r" or (newlines and c == "\n"):
                self.pos += 1
            else:
                return

    def key_parts(self, stop: str) -> list[str]:
        """Read a (dotted, possibly quoted) key up to the `stop` character, which is consumed."""
        parts: list[str] = []
        while True:
            self.skip_blank(newlines=False)
            c = self.text[self.pos]
            if c in "\"'":
                start = self.pos
                self.skip_string()
                parts.append(tomllib.loads(f"k = {self.text[start : self.pos]}")["k"])
            else:
                m = _BARE_KEY.match(self.text, self.pos)
                if m is None:
                    raise ValueError("not a key")
                parts.append(m.group())
                self.pos = m.end()
            self.skip_blank(newlines=False)
            c = self.text[self.pos]
            self.pos += 1
            if c == stop[0]:
                if len(stop) > 1:
                    self.pos += len(stop) - 1
                return parts
            if c != ".":
                raise ValueError("bad key")

    def skip_string(self) -> None:
        text, quote = self.text, self.text[self.pos]
        if text.startswith(quote * 3, self.pos):
            end = text.find(quote * 3, self.pos + 3)
            while quote == '"' and end > 0 and _escaped(text, end):
                end = text.find(quote * 3, end + 1)
            end += 3
            while end < len(text) and text[end] == quote:  # up to two quotes may close the content
                end += 1
            self.pos = end
            return
        i = self.pos + 1
        while text[i] != quote or (quote == '"' and _escaped(text, i)):
            i += 1
        self.pos = i + 1

    def resolve(self, parts: list[str]) -> str:
        """Turn a header's dotted name into a path with the current index of each array of tables."""
        path = ""
        for part in parts:
            path = join_key(path, part)
            if path in self.counts:
                path += f"[{self.counts[path] - 1}]"
        return path

    def value(self, path: str) -> None:
        c = self.text[self.pos]
        if c in "\"'":
            self.skip_string()
        elif c in "[{":
            close = "]" if c == "[" else "}"
            self.pos += 1
            index = 0
            while True:
                self.skip_blank()
                if self.text[self.pos] == close:
                    self.pos += 1
                    return
                if c == "[":
                    element = f"{path}[{index}]"
                    self.lines.setdefault(element, self.line())
                    self.value(element)
                    index += 1
                else:
                    self.key_value(path, stop="=")
                self.skip_blank()
                if self.text[self.pos] == ",":
                    self.pos += 1
        else:
            while self.pos < len(self.text) and self.text[self.pos] not in ",]}\n#":
                self.pos += 1

    def key_value(self, table: str, stop: str) -> None:
        line = self.line()
        path = table
        for part in self.key_parts(stop):
            path = join_key(path, part)
            self.lines.setdefault(path, line)
        self.skip_blank(newlines=False)
        self.value(path)

    def run(self) -> dict[str, int]:
        table = ""
        while True:
            self.skip_blank()
            if self.pos >= len(self.text):
                return self.lines
            line = self.line()
            if self.text.startswith("[[", self.pos):
                self.pos += 2
                parts = self.key_parts("]]")
                array = self.resolve(parts[:-1])
                array = join_key(array, parts[-1])
                index = self.counts.get(array, 0)
                self.counts[array] = index + 1
                self.lines.setdefault(array, line)
                table = f"{array}[{index}]"
            elif self.text[self.pos] == "[":
                self.pos += 1
                table = self.resolve(self.key_parts("]"))
            else:
                self.key_value(table, stop="=")
                continue
            self.lines[table] = line


def _escaped(text: str, i: int) -> bool:
    """Whether the character at `i` is escaped by an odd run of backslashes."""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def locate_keys(text: str) -> dict[str, int]:
    """Map dotted key paths (`databases[0].shards[1].primary`) to their line; best effort, never raises."""
    scanner = _Scanner(text)
    try:
        return scanner.run()
    except (ValueError, IndexError):  # tomllib.TOMLDecodeError is a ValueError
        return scanner.lines


class Source:
    """Where a configuration came from, so any error can point back into it."""

    def __init__(self, text: str, file: Path | None) -> None:
        self.text = text
        self.file = file
        self._lines: dict[str, int] | None = None

    def line_of(self, key: str) -> int | None:
        """The line of `key`, or of its nearest enclosing table or array when the key is absent."""
        if self._lines is None:
            self._lines = locate_keys(self.text)
        while key:
            if key in self._lines:
                return self._lines[key]
            m = _INDEX.search(key)
            key = key[: m.start()] if m else key.rpartition(".")[0]
        return None

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(problem, key, self.file, self.line_of(key))


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    return "a table" if isinstance(value, dict) else names.get(type(value), type(value).__name__)


_REQUIRED: Any = object()


class Table:
    """One TOML table being read: keys it does not know are refused up front, then typed getters."""

    def __init__(self, data: dict[str, Any], key: str, source: Source, keys: Collection[str]) -> None:
        self.data = data
        self.key = key
        self.source = source
        for name in data:  # before any other check: a typo is the likeliest cause of what follows
            if name not in keys:
                close = difflib.get_close_matches(name, keys, n=1)
                raise self.error(
                    name, f'unknown key (did you mean "{close[0]}"?)' if close else "unknown key"
                )

    def error(self, name: str | None, problem: str) -> ConfigError:
        """An error about key `name` of this table (or the table itself when `name` is None)."""
        return self.source.error(join_key(self.key, name) if name else self.key, problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, default: Any, expected: str, accept: Callable[[Any], bool]) -> Any:
        if name not in self.data:
            if default is _REQUIRED:
                raise self.error(name, "missing: this key is required")
            return default
        value = self.data[name]
        if not accept(value):
            raise self.error(name, f"expected {expected}, got {_kind(value)}")
        return value

    def string(self, name: str, default: Any = _REQUIRED) -> Any:
        """A non-empty string (or `default`, which may be None for an optional key)."""
        value = self._get(name, default, "a string", lambda v: isinstance(v, str))
        if value == "":
            raise self.error(name, "must not be empty")
        return value

    def integer(
        self, name: str, default: Any = _REQUIRED, minimum: int | None = None, maximum: int | None = None
    ) -> Any:
        value = self._get(name, default, "an integer", lambda v: type(v) is int)
        if value is not None and minimum is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise self.error(name, f"must be at most {maximum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self._get(name, default, "true or false", lambda v: type(v) is bool))

    def seconds(self, name: str, default: float, positive: bool = False) -> float:
        """A duration in seconds: an integer or a float, never negative (nor zero if `positive`)."""
        value = self._get(name, default, "a number of seconds", lambda v: type(v) in (int, float))
        if value < 0 or (positive and value == 0) or value != value or value == float("inf"):
            raise self.error(
                name, f"must be a {'positive' if positive else 'non-negative'} number, got {value}"
            )
        return float(value)

    def choice(self, name: str, choices: Collection[str], default: Any = _REQUIRED) -> Any:
        value = self._get(name, default, "a string", lambda v: isinstance(v, str))
        if value is not None and value not in choices:
            options = " | ".join(f'"{c}"' for c in choices)
            raise self.error(name, f'must be one of {options}, got "{value}"')
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        values = self._get(name, [], "an array of strings", lambda v: isinstance(v, list))
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise self.source.error(f"{join_key(self.key, name)}[{i}]", "expected a non-empty string")
        return tuple(values)

    def table(self, name: str, keys: Collection[str]) -> Table:
        value = self._get(name, {}, "a table", lambda v: isinstance(v, dict))
        return Table(value, join_key(self.key, name), self.source, keys)

    def tables(self, name: str, keys: Collection[str]) -> list[Table]:
        """An array of tables: `[[name]]` sections or an array of inline tables."""
        values = self._get(name, [], "an array of tables", lambda v: isinstance(v, list))
        out = []
        for i, value in enumerate(values):
            key = f"{join_key(self.key, name)}[{i}]"
            if not isinstance(value, dict):
                raise self.source.error(key, f"expected a table, got {_kind(value)}")
            out.append(Table(value, key, self.source, keys))
        return out

    def key_value(
        self,
        name: str,
        data_type: str,
        default: Any = _REQUIRED,
        exclusive_end: bool = False,
        many: bool = False,
    ) -> Any:
        """A shard-key literal (or, with `many`, a non-empty array of them) checked against the column's type.

        UUIDs come back in PostgreSQL's canonical text form so "A0EE..." and "a0ee..." are one key.
        """
        if many:
            values = self._get(name, default, "an array", lambda v: isinstance(v, list))
            if not values:
                raise self.error(name, "must not be empty")
            key = join_key(self.key, name)
            return [
                _key_literal(self.source, f"{key}[{i}]", v, data_type, False) for i, v in enumerate(values)
            ]
        value = self._get(name, default, "a key value", lambda v: True)
        return (
            None
            if value is None
            else _key_literal(self.source, join_key(self.key, name), value, data_type, exclusive_end)
        )


def _key_literal(source: Source, key: str, value: Any, data_type: str, exclusive_end: bool) -> int | str:
    if data_type in INTEGER_TYPES:
        low, high = INTEGER_TYPES[data_type]
        high += exclusive_end  # an exclusive end may sit just past the type's largest value
        if type(value) is not int:
            raise source.error(key, f"expected an integer for a {data_type} key, got {_kind(value)}")
        if not low <= value <= high:
            raise source.error(key, f"{value} is out of range for {data_type}")
        return value
    if not isinstance(value, str):
        raise source.error(key, f"expected a string for a {data_type} key, got {_kind(value)}")
    if data_type == "uuid":
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise source.error(key, f'"{value}" is not a UUID') from None
    return value


def find_overlap(bounds: list[tuple[int | None, int | None]]) -> tuple[int, int] | None:
    """Indexes of two [start, end) ranges that share a key, or None; None bounds are unbounded."""
    order = sorted(range(len(bounds)), key=lambda i: (bounds[i][0] is not None, bounds[i][0] or 0))
    for a, b in itertools.pairwise(order):
        end, start = bounds[a][1], bounds[b][0]
        if end is None or start is None or end > start:
            return min(a, b), max(a, b)
    return None


def split_listen(listen: str) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6 address]:port"; ValueError says what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected "host:port", got "{listen}"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'an IPv6 address needs brackets, as in "[::1]:6432", got "{listen}"')
    if not host or not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f'expected "host:port" with a port from 0 to 65535, got "{listen}"')
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where and as whom to connect to one PostgreSQL server."""

    host: str
    port: int
    user: str
    password: str | None = field(default=None, repr=False)
    dbname: str = ""
    params: tuple[tuple[str, str], ...] = ()  # the URL's query (sslmode=...), kept for later use


def parse_server_url(url: str) -> ServerAddress:
    """Read a libpq-style URL (host may also come from ?host=, as for a Unix socket directory).

    ValueError says what is wrong with it.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            f'expected a "postgresql://user:password@host:port/dbname" URL, not "{parts.scheme}:"'
        )
    params = tuple(parse_qsl(parts.query, keep_blank_values=True))
    query = dict(params)
    try:
        port = parts.port if parts.port is not None else int(query.get("port", DEFAULT_PORT))
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    host = unquote(parts.hostname or "") or query.get("host", "")
    user = unquote(parts.username or "") or query.get("user", "")
    if not host:
        raise ValueError("the URL names no host")
    if not user:
        raise ValueError("the URL names no user")
    password = unquote(parts.password) if parts.password is not None else query.get("password")
    dbname = unquote(parts.path.lstrip("/")) or query.get("dbname", "") or user
    return ServerAddress(host, port, user, password, dbname, params)
