"""Streaming k-way merge of ordered partial results, in PostgreSQL's order (DESIGN.md, "Merging").

Each shard sends its rows already sorted by the query's ORDER BY; the merge keeps one row per shard
in a heap and always sends the smallest, so memory is bounded by shards x the read buffer of
`ShardStream`, never by the result. Comparisons follow PostgreSQL for the types it can read
exactly from text (`column_key`): integers and numeric as numbers (NaN above every number), floats
as IEEE values (NaN above infinity), booleans, uuids, dates and timestamps in ISO DateStyle (time
zone offsets applied, BC years, +-infinity), and text only where the collation orders by bytes
(C, POSIX, or a libc C.UTF-8, whose glibc collation is code point order, i.e. UTF-8 byte order).
Values in binary format (a client asking for binary results) have their own keys
(`binary_column_key`). Anything else has no key here: the caller lets a PostgreSQL server sort
(bounded) or refuses.
NULLs sort as larger than every value (NULLS LAST for ASC, FIRST for DESC), unless told otherwise.
"""

from __future__ import annotations

import asyncio
import heapq
import re
import struct
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from pooler.server_connection import ServerConnection, ServerError
from proxy.protocol import backend
from proxy.protocol.framing import DEFAULT_MAX_MESSAGE_LENGTH

T = TypeVar("T")
_D, _C, _E, _T, _N, _Z = (ord(c) for c in "DCETNZ")
_SKIPPABLE = frozenset((_D, _C))  # what `until_ready` steps over in place
_D_TYPE = b"D"

# Built-in type OIDs (pg_type.dat): the same in every PostgreSQL.
BOOL, NAME, INT8, INT2, INT4, TEXT, OID = 16, 19, 20, 21, 23, 25, 26
FLOAT4, FLOAT8, BPCHAR, VARCHAR, DATE, TIMESTAMP, TIMESTAMPTZ, NUMERIC, UUID = (
    700, 701, 1042, 1043, 1082, 1114, 1184, 1700, 2950,
)  # fmt: skip
TEXT_TYPES = frozenset({NAME, TEXT, BPCHAR, VARCHAR})
BYTE_ORDER_COLLATIONS = frozenset({"c", "posix", "ucs_basic"})
BYTE_ORDER_LOCALES = frozenset({"c", "posix", "c.utf8", "c.utf-8"})


def byte_order(collation: str | None, datcollate: str, provider: str) -> bool:
    """Whether a text column with this collation (pg_collation_for's answer) sorts by bytes."""
    name = (collation or '"default"').removeprefix("pg_catalog.").strip('"').lower()
    if name == "default":
        return provider == "c" and datcollate.lower() in BYTE_ORDER_LOCALES
    return name in BYTE_ORDER_COLLATIONS


# keys ------------------------------------------------------------------------------------------------
def _number(value: bytes) -> tuple[int, Any]:
    if value == b"NaN":
        return (1, 0)
    return (0, Decimal(value.decode()))


def _float(value: bytes) -> tuple[int, float]:
    number = float(value)
    return (1, 0.0) if number != number else (0, number)


_TIMESTAMP = re.compile(
    rb"(\d{4,})-(\d\d)-(\d\d)(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
    rb"(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?( BC)?"
)


def _days(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 in the proleptic Gregorian calendar (astronomical years)."""
    year -= month <= 2
    era = year // 400  # floor division: right for negative years too
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _timestamp(value: bytes) -> tuple[int, int]:
    """date, timestamp or timestamptz in ISO DateStyle -> (infinity rank, microseconds UTC)."""
    if value == b"infinity":
        return (1, 0)
    if value == b"-infinity":
        return (-1, 0)
    m = _TIMESTAMP.fullmatch(value)
    if m is None:
        raise ValueError(f"not an ISO date/time: {value[:40]!r}")
    year, month, day, hh, mi, ss, frac, sign, oh, om, os_, bc = m.groups()
    y = int(year)
    seconds = _days(1 - y if bc else y, int(month), int(day)) * 86400
    if hh is not None:
        seconds += int(hh) * 3600 + int(mi) * 60 + int(ss)
    if sign is not None:
        offset = int(oh) * 3600 + int(om or 0) * 60 + int(os_ or 0)
        seconds -= offset if sign == b"+" else -offset
    return (0, seconds * 1_000_000 + (int(frac.ljust(6, b"0")) if frac else 0))


def _bytes(value: bytes) -> bytes:
    return value


def _bpchar(value: bytes) -> bytes:
    return value.rstrip(b" ")  # bpchar compares without its trailing spaces


_KEYS: dict[int, Callable[[bytes], Any]] = {
    INT2: int, INT4: int, INT8: int, OID: int, NUMERIC: _number, FLOAT4: _float, FLOAT8: _float,
    BOOL: _bytes, UUID: _bytes, DATE: _timestamp, TIMESTAMP: _timestamp, TIMESTAMPTZ: _timestamp,
}  # fmt: skip


def column_key(
    type_oid: int, byte_order_text: bool = False, iso_dates: bool = True
) -> Callable[[bytes], Any] | None:
    """How to compare values of a type as PostgreSQL does, from their text form; None if unknown."""
    if type_oid in TEXT_TYPES:
        if not byte_order_text:
            return None
        return _bpchar if type_oid == BPCHAR else _bytes
    if type_oid in (DATE, TIMESTAMP, TIMESTAMPTZ) and not iso_dates:
        return None
    return _KEYS.get(type_oid)


# Binary forms (the types' send functions): integers, dates and timestamps are big-endian integers
# in PostgreSQL's own order (infinities are the extreme values); text is the same bytes as its text
# form; floats IEEE; numeric a base-10000 digit array. A client asking for binary results (asyncpg
# always does) gets the shards' rows as they are, so the merge reads these.
_INT = int.from_bytes
_F4, _F8 = struct.Struct(">f").unpack, struct.Struct(">d").unpack
_NUMERIC_HEAD = struct.Struct(">hhHh").unpack_from
_NUMERIC_NAN, _NUMERIC_PINF, _NUMERIC_NINF, _NUMERIC_NEG = 0xC000, 0xD000, 0xF000, 0x4000


def _signed(value: bytes) -> int:
    return _INT(value, "big", signed=True)


def _unsigned(value: bytes) -> int:
    return _INT(value, "big")


def _binary_float(value: bytes) -> tuple[int, float]:
    number = (_F4 if len(value) == 4 else _F8)(value)[0]
    return (1, 0.0) if number != number else (0, number)


def _binary_numeric(value: bytes) -> tuple[int, Any]:
    ndigits, weight, sign, _dscale = _NUMERIC_HEAD(value)
    if sign == _NUMERIC_NAN:
        return (1, 0)
    if sign in (_NUMERIC_PINF, _NUMERIC_NINF):
        return (0, Decimal("Infinity" if sign == _NUMERIC_PINF else "-Infinity"))
    whole = 0
    for i in range(ndigits):
        whole = whole * 10000 + _INT(value[8 + 2 * i : 10 + 2 * i], "big")
    if whole == 0:
        return (0, Decimal(0))
    digits = tuple(int(c) for c in str(whole))
    return (0, Decimal((1 if sign == _NUMERIC_NEG else 0, digits, (weight - ndigits + 1) * 4)))


_BINARY_KEYS: dict[int, Callable[[bytes], Any]] = {
    INT2: _signed, INT4: _signed, INT8: _signed, OID: _unsigned, NUMERIC: _binary_numeric,
    FLOAT4: _binary_float, FLOAT8: _binary_float, BOOL: _bytes, UUID: _bytes, DATE: _signed,
    TIMESTAMP: _signed, TIMESTAMPTZ: _signed,
}  # fmt: skip


def binary_column_key(type_oid: int, byte_order_text: bool = False) -> Callable[[bytes], Any] | None:
    """`column_key` for values in binary format (the DateStyle does not matter there)."""
    if type_oid in TEXT_TYPES:
        return column_key(type_oid, byte_order_text)
    return _BINARY_KEYS.get(type_oid)


@dataclass(frozen=True, slots=True)
class MergeKey:
    column: int
    convert: Callable[[bytes], Any]
    descending: bool = False
    nulls_first: bool = False


def row_key(values: Sequence[bytes | None], keys: Sequence[MergeKey]) -> tuple[Any, ...]:
    return tuple(None if (v := values[k.column]) is None else k.convert(v) for k in keys)


_I32 = struct.Struct(">i").unpack_from
_U32 = struct.Struct(">I").unpack_from


def _values(body: bytes, last: int, pos: int = 2) -> list[bytes | None]:
    """The first `last` + 1 values of a DataRow body (a merge reads only its keys' columns); `pos`:
    where the values begin (7 in a whole DataRow message)."""
    values: list[bytes | None] = []
    for _ in range(last + 1):
        n = _I32(body, pos)[0]
        pos += 4
        if n < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + n])
            pos += n
    return values


def body_key(body: bytes, keys: Sequence[MergeKey], last: int) -> tuple[Any, ...]:
    """row_key of a DataRow body, reading only its first `last` + 1 values."""
    return row_key(_values(body, last), keys)


def keep_columns(body: bytes, count: int) -> bytes:
    """A DataRow body with only its first `count` values (hidden sort keys dropped)."""
    pos = 2
    for _ in range(count):
        n = _I32(body, pos)[0]
        pos += 4 + (n if n > 0 else 0)
    return count.to_bytes(2, "big") + body[2:pos]


def compare(a: Sequence[Any], b: Sequence[Any], keys: Sequence[MergeKey]) -> int:
    """<0, 0, >0 as row key `a` sorts before, with, or after `b`."""
    for x, y, key in zip(a, b, keys, strict=True):
        if x is None or y is None:
            if x is None and y is None:
                continue
            return -1 if (x is None) == key.nulls_first else 1
        if x == y:
            continue
        before = x < y
        return -1 if before != key.descending else 1
    return 0


class _Descending:
    """A value that sorts in reverse (a DESC key whose converted value cannot be negated)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return bool(other.value < self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and bool(self.value == other.value)

    __hash__ = None  # type: ignore[assignment]


# Converters whose values negate to sort in reverse: numbers, and (rank, number) pairs.
_NUMBERS: frozenset[Callable[[bytes], Any]] = frozenset({int, _signed, _unsigned})
_PAIRS: frozenset[Callable[[bytes], Any]] = frozenset(
    {_number, _float, _binary_float, _binary_numeric, _timestamp}
)


def sort_key(key: MergeKey) -> Callable[[bytes | None], Any]:
    """A value's key in `key`'s order under Python's own comparisons (as `compare` orders row keys):
    NULL is (0,) or (2,) by NULLS FIRST/LAST, a value (1, v) with v negated (or wrapped) for DESC.
    The merge's heap then compares plain tuples in C instead of calling `compare` per step."""
    convert = key.convert
    null = (0,) if key.nulls_first else (2,)
    if not key.descending:

        def ascending(value: bytes | None) -> Any:
            return null if value is None else (1, convert(value))

        return ascending
    if convert in _NUMBERS:

        def negated(value: bytes | None) -> Any:
            return null if value is None else (1, -convert(value))

        return negated
    if convert in _PAIRS:

        def negated_pair(value: bytes | None) -> Any:
            if value is None:
                return null
            rank, number = convert(value)
            return (1, -rank, -number)

        return negated_pair

    def wrapped(value: bytes | None) -> Any:
        return null if value is None else (1, _Descending(convert(value)))

    return wrapped


def _row_sort_key(keys: Sequence[MergeKey]) -> Callable[[Sequence[bytes | None]], Any]:
    """The sort key of a row's column values: one value's key for one ORDER BY key, else a tuple."""
    functions = [(k.column, sort_key(k)) for k in keys]
    if len(functions) == 1:
        column, function = functions[0]
        return lambda values: function(values[column])
    return lambda values: tuple(f(values[c]) for c, f in functions)


def merge_sorted(
    sources: Sequence[Iterable[T]], keys: Sequence[MergeKey], values: Callable[[T], Sequence[bytes | None]]
) -> Iterator[T]:
    """Merge already sorted sources; `values` reads an item's column values (text, None for NULL).
    Ties go to the lower source (a stable merge)."""
    key_of = _row_sort_key(keys)
    iterators = [iter(s) for s in sources]
    heap: list[tuple[Any, int, T]] = []
    for i, it in enumerate(iterators):
        for item in it:
            heap.append((key_of(values(item)), i, item))
            break
    heapq.heapify(heap)
    while heap:
        _, source, item = heap[0]
        yield item
        nxt = next(iterators[source], None)
        if nxt is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (key_of(values(nxt)), source, nxt))


# streams ---------------------------------------------------------------------------------------------
class ShardError(Exception):
    """A shard answered with an ErrorResponse (its fields)."""

    def __init__(self, shard: int, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "error"))
        self.shard, self.fields = shard, fields


class ShardStream:
    """One server connection's replies as whole messages, read as they are consumed.

    It is the connection's sink while attached: bytes go into its own buffer and reading from the
    server pauses above `high_water` bytes and resumes below `low_water`, so a slow consumer (the
    merge waiting on another shard, a slow client) bounds what is held in memory.
    """

    def __init__(self, shard: int, server: ServerConnection, high_water: int = 1 << 20) -> None:
        self.shard, self.server = shard, server
        self.high_water, self.low_water = high_water, high_water // 4
        self.buf = bytearray(server.take_inbox())
        self.pos = 0
        self.paused = self.lost = False
        self.waiter: asyncio.Future[None] | None = None
        self.description: bytes | None = None  # the RowDescription body of the current result
        self.error: dict[str, str] | None = None
        self.notices: list[bytes] = []  # NoticeResponse bodies
        self.status = b""  # the last ReadyForQuery's transaction status
        self.pending = 0  # ReadyForQuery messages still to come for what was written
        server.sink = self

    def answered(self) -> bool:
        """Whether everything written has been answered (its last ReadyForQuery has arrived)."""
        return self.pending == 0 or (self.pending == 1 and self.buf[-6:-1] == b"Z\x00\x00\x00\x05")

    def write(self, data: bytes, replies: int = 1) -> None:
        """Send the server `data`, which it answers with `replies` ReadyForQuery messages."""
        self.pending += replies
        self.server.write(data)

    # ServerSink
    def server_data(self, server: ServerConnection, data: bytes) -> None:
        self.buf += data
        if not self.paused and len(self.buf) - self.pos > self.high_water and server.transport is not None:
            self.paused = True
            server.transport.pause_reading()
        self._wake()

    def server_lost(self, server: ServerConnection) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def detach(self) -> None:
        if self.server.sink is self:
            self.server.sink = None
        if self.paused and self.server.transport is not None:
            self.paused = False
            self.server.transport.resume_reading()

    async def message(self) -> tuple[int, bytes]:
        """The next whole message (type, body)."""
        while True:
            buf, pos = self.buf, self.pos
            if len(buf) - pos >= 5:
                length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if length < 4 or length > DEFAULT_MAX_MESSAGE_LENGTH:
                    raise ServerError(
                        "08P01", f"shard {self.shard} sent a message of invalid length {length}"
                    )
                end = pos + 1 + length
                if len(buf) >= end:
                    msg_type, body = buf[pos], bytes(buf[pos + 5 : end])
                    if msg_type == _Z:
                        self.pending -= 1
                        self.status = body[:1]
                    self._consumed(end)
                    return msg_type, body
            if self.lost:
                raise ServerError("08006", f"server {self.server.target.label} closed the connection")
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def _consumed(self, end: int) -> None:
        """Messages were read up to `end`: free the buffer's head now and then, resume reading when
        what is left falls below the low-water mark."""
        buf = self.buf
        self.pos = end
        if end > 65536 and end * 2 > len(buf):
            del buf[:end]
            self.pos = 0
        if self.paused and len(buf) - self.pos < self.low_water and self.server.transport is not None:
            self.paused = False
            self.server.transport.resume_reading()

    def _skip_rows(self) -> None:
        """Step over the DataRows and CommandCompletes already in the buffer without copying them
        (the rest of a result nobody reads, after a LIMIT was reached)."""
        buf, pos = self.buf, self.pos
        size = len(buf)
        start = pos
        while size - pos >= 5 and buf[pos] in _SKIPPABLE:
            length = _U32(buf, pos + 1)[0]
            end = pos + 1 + length
            if length < 4 or length > DEFAULT_MAX_MESSAGE_LENGTH or end > size:
                break  # not whole yet, or invalid: message() waits or raises
            pos = end
        if pos != start:
            self._consumed(pos)

    async def result_message(self) -> tuple[int, bytes]:
        """The next message of a query's result: notices are kept aside, errors raise ShardError."""
        while True:
            msg_type, body = await self.message()
            if msg_type == _N:
                self.notices.append(body)
            elif msg_type == _E:
                self.error = backend.decode_error_fields(body)
                raise ShardError(self.shard, self.error)
            elif msg_type == _T:
                self.description = body
                return msg_type, body
            elif msg_type not in b"SA12":
                # ParameterStatus, NotificationResponse: not the client's business here; ParseComplete,
                # BindComplete: the extended-protocol run of a query of pgshard's
                return msg_type, body

    async def next_row(self, whole: bool = False) -> bytes | None:
        """The next DataRow body of the current result (with `whole`, the whole message, to pass on
        as it is), or None at its CommandComplete."""
        buf, pos = self.buf, self.pos
        if len(buf) - pos >= 5 and buf[pos] == _D:  # the common case, without the layers below
            length = _U32(buf, pos + 1)[0]
            end = pos + 1 + length
            if 4 <= length <= DEFAULT_MAX_MESSAGE_LENGTH and end <= len(buf):
                body = bytes(buf[pos if whole else pos + 5 : end])
                self._consumed(end)
                return body
        while True:
            msg_type, body = await self.result_message()
            if msg_type == _D:
                return _D_TYPE + (len(body) + 4).to_bytes(4, "big") + body if whole else body
            if msg_type in (_C, _Z):
                return None

    async def until_ready(self) -> None:
        """Read (and drop) everything up to the next ReadyForQuery, keeping the first error."""
        while True:
            self._skip_rows()
            msg_type, body = await self.message()
            if msg_type == _Z:
                return
            if msg_type == _E and self.error is None:
                self.error = backend.decode_error_fields(body)
            elif msg_type == _N:
                self.notices.append(body)


async def merge_streams(
    streams: Sequence[ShardStream], keys: Sequence[MergeKey], whole: bool = False
) -> AsyncGenerator[bytes, None]:
    """DataRow bodies (with `whole`, whole DataRow messages) of every stream's current result, merged
    in order, ties to the lower stream (raises ShardError)."""
    last = max((k.column for k in keys), default=-1)
    key_of = _row_sort_key(keys)
    start = 7 if whole else 2  # where the values begin
    heap: list[tuple[Any, int, bytes]] = []
    for i, stream in enumerate(streams):
        row = await stream.next_row(whole)
        if row is not None:
            heap.append((key_of(_values(row, last, start)), i, row))
    heapq.heapify(heap)
    while heap:
        _, source, row = heap[0]
        yield row
        nxt = await streams[source].next_row(whole)
        if nxt is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (key_of(_values(nxt, last, start)), source, nxt))


async def drain(stream: ShardStream) -> None:
    """Read (and drop) the rest of every reply the stream's server still owes."""
    while stream.pending > 0:
        await stream.until_ready()
