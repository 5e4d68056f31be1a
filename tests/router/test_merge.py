"""The k-way merge of ordered shard results (router/merge.py): PostgreSQL's order from text and binary
values."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Sequence
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.types.numeric import DecimalBinaryDumper

from proxy.protocol import backend
from router import merge
from router.merge import (
    MergeKey,
    ShardError,
    ShardStream,
    binary_column_key,
    byte_order,
    column_key,
    compare,
    drain,
    merge_sorted,
    merge_streams,
    row_key,
)

Row = tuple[bytes | None, ...]


def key_of(oid: int, **kwargs: Any) -> Any:
    convert = column_key(oid, **kwargs)
    assert convert is not None
    return convert


def ordered(oid: int, values: Sequence[bytes], **kwargs: Any) -> list[bytes]:
    return sorted(values, key=key_of(oid, **kwargs))


# keys by type ---------------------------------------------------------------------------------------
def test_integers_compare_as_numbers() -> None:
    assert ordered(merge.INT4, [b"10", b"9", b"-3", b"100"]) == [b"-3", b"9", b"10", b"100"]
    assert (
        ordered(merge.INT8, [b"9223372036854775807", b"-9223372036854775808"])[0] == b"-9223372036854775808"
    )


def test_numeric_nan_sorts_above_infinity() -> None:
    values = [b"NaN", b"1.50", b"Infinity", b"-Infinity", b"-0.001", b"1e3", b"2"]
    assert ordered(merge.NUMERIC, values) == [
        b"-Infinity",
        b"-0.001",
        b"1.50",
        b"2",
        b"1e3",
        b"Infinity",
        b"NaN",
    ]
    k = key_of(merge.NUMERIC)
    assert k(b"1.50") == k(b"1.5")  # equal values, whatever their scale


def test_float_nan_sorts_above_infinity() -> None:
    values = [b"NaN", b"Infinity", b"-Infinity", b"0", b"-0", b"1.5e-300"]
    assert ordered(merge.FLOAT8, values) == [b"-Infinity", b"0", b"-0", b"1.5e-300", b"Infinity", b"NaN"]


def test_timestamps_compare_as_instants() -> None:
    k = key_of(merge.TIMESTAMPTZ)
    # 01:30 EST is 06:30 UTC, 03:10 EDT is 07:10 UTC: later although "smaller" as text for offsets
    assert k(b"2024-03-10 01:30:00-05") < k(b"2024-03-10 03:10:00-04")
    assert k(b"2024-03-10 07:00:00+01") < k(b"2024-03-10 06:30:00+00")
    assert k(b"1900-01-01 00:00:00+00:53:28") < k(b"1900-01-01 00:00:00+00")
    values = [
        b"2020-01-01",
        b"infinity",
        b"0044-03-15 BC",
        b"-infinity",
        b"10000-01-01",
        b"0001-01-01",
        b"0001-12-31 BC",
    ]
    assert ordered(merge.DATE, values) == [
        b"-infinity",
        b"0044-03-15 BC",
        b"0001-12-31 BC",
        b"0001-01-01",
        b"2020-01-01",
        b"10000-01-01",
        b"infinity",
    ]
    assert ordered(
        merge.TIMESTAMP, [b"2020-01-01 00:00:00.5", b"2020-01-01 00:00:00.25", b"2020-01-01 00:00:00"]
    ) == [b"2020-01-01 00:00:00", b"2020-01-01 00:00:00.25", b"2020-01-01 00:00:00.5"]
    with pytest.raises(ValueError):
        k(b"01/02/2020 10:00:00 PST")


def test_text_only_in_byte_order_collations() -> None:
    assert column_key(merge.TEXT) is None
    assert ordered(merge.TEXT, [b"b", b"B", b"a", b"\xc3\xa4", b"ab"], byte_order_text=True) == [
        b"B",
        b"a",
        b"ab",
        b"b",
        b"\xc3\xa4",
    ]
    k = key_of(merge.BPCHAR, byte_order_text=True)
    assert k(b"ab  ") == k(b"ab")  # bpchar ignores trailing spaces
    assert column_key(merge.DATE, iso_dates=False) is None
    assert column_key(1186) is None  # interval: left to the server


# binary keys (a client asking for binary results gets the shards' rows as they are) ------------------
def _numeric_binary(value: Decimal) -> bytes:
    """PostgreSQL's numeric_send, as psycopg (an independent implementation) writes it."""
    return bytes(DecimalBinaryDumper(Decimal).dump(value) or b"")


def test_binary_numeric_reads_the_exact_value() -> None:
    k = binary_column_key(merge.NUMERIC)
    assert k is not None
    for text in ("1.50", "-0.001", "1e3", "0", "0.0000", "123456789.000000001", "-1e-20", "-99999.9999"):
        assert k(_numeric_binary(Decimal(text))) == (0, Decimal(text))
    assert k(_numeric_binary(Decimal("NaN"))) == (1, 0)  # NaN above everything, as in text
    assert k(_numeric_binary(Decimal("-Infinity"))) < k(_numeric_binary(Decimal("-1e300")))
    assert k(_numeric_binary(Decimal("1e300"))) < k(_numeric_binary(Decimal("Infinity"))) < (1, 0)


@given(st.decimals(min_value=-(10**40), max_value=10**40, allow_nan=False))
def test_binary_numeric_orders_as_text(value: Decimal) -> None:
    binary, text = binary_column_key(merge.NUMERIC), column_key(merge.NUMERIC)
    assert binary is not None and text is not None
    assert binary(_numeric_binary(value)) == text(str(value).encode())


def test_binary_keys_order_as_postgresql() -> None:
    def order(oid: int, values: Sequence[bytes]) -> list[bytes]:
        key = binary_column_key(oid)
        assert key is not None
        return sorted(values, key=key)

    int8 = [struct.pack(">q", v) for v in (-(2**63), -1, 0, 1, 2**62)]
    assert order(merge.INT8, list(reversed(int8))) == int8
    assert order(merge.INT2, [struct.pack(">h", 5), struct.pack(">h", -5)]) == [
        struct.pack(">h", v) for v in (-5, 5)
    ]
    floats = [struct.pack(">d", v) for v in (-math.inf, -1.5, 0.0, 2.25, math.inf, math.nan)]
    assert order(merge.FLOAT8, list(reversed(floats))) == floats  # NaN above infinity
    assert order(merge.FLOAT4, [struct.pack(">f", math.nan), struct.pack(">f", 1.0)])[0] == struct.pack(
        ">f", 1.0
    )
    # dates: int32 days since 2000-01-01, timestamps: int64 microseconds; infinities are the extremes
    days = [struct.pack(">i", v) for v in (-(2**31), -730_000, -1, 0, 9000, 2**31 - 1)]
    assert order(merge.DATE, list(reversed(days))) == days
    micros = [struct.pack(">q", v) for v in (-(2**63), -5, 0, 10**15, 2**63 - 1)]
    assert order(merge.TIMESTAMPTZ, list(reversed(micros))) == micros
    assert order(merge.BOOL, [b"\x01", b"\x00"]) == [b"\x00", b"\x01"]
    assert order(merge.OID, [struct.pack(">I", 2**32 - 1), struct.pack(">I", 7)])[0] == struct.pack(">I", 7)
    # text: the same bytes as its text form, so only in a byte-order collation
    assert binary_column_key(merge.TEXT) is None
    key = binary_column_key(merge.BPCHAR, byte_order_text=True)
    assert key is not None and key(b"ab  ") == key(b"ab")
    assert binary_column_key(1186) is None  # interval: left to the server


@pytest.mark.parametrize(
    ("collation", "datcollate", "provider", "expected"),
    [
        ('"C"', "en_US.UTF-8", "c", True),
        ('"POSIX"', "en_US.UTF-8", "c", True),
        ('pg_catalog."C"', "de_DE", "c", True),
        ('"default"', "C", "c", True),
        ('"default"', "C.UTF-8", "c", True),
        ('"default"', "C.utf8", "c", True),
        ('"default"', "en_US.UTF-8", "c", False),
        ('"default"', "C", "i", False),
        ('"und-x-icu"', "C", "c", False),
        (None, "C", "c", True),
    ],
)
def test_byte_order(collation: str | None, datcollate: str, provider: str, expected: bool) -> None:
    assert byte_order(collation, datcollate, provider) is expected


# comparing and merging rows -------------------------------------------------------------------------
def ints(column: int = 0, descending: bool = False, nulls_first: bool | None = None) -> MergeKey:
    """A key with PostgreSQL's defaults: NULLS LAST for ASC, NULLS FIRST for DESC."""
    return MergeKey(column, int, descending, descending if nulls_first is None else nulls_first)


def merged(sources: Sequence[Sequence[Row]], keys: Sequence[MergeKey]) -> list[Row]:
    return list(merge_sorted(sources, keys, lambda row: row))


def test_nulls_last_ascending_first_descending() -> None:
    asc = [(b"1",), (b"3",), (None,)]
    assert merged([asc, [(b"2",), (None,)]], [ints()]) == [(b"1",), (b"2",), (b"3",), (None,), (None,)]
    desc = [(None,), (b"3",), (b"1",)]
    assert merged([desc, [(b"2",)]], [ints(descending=True)]) == [(None,), (b"3",), (b"2",), (b"1",)]
    assert merged([[(None,), (b"1",)], [(b"0",)]], [ints(nulls_first=True)]) == [(None,), (b"0",), (b"1",)]
    assert merged([[(b"1",), (None,)], [(b"0",)]], [ints(descending=True, nulls_first=False)]) == [
        (b"1",),
        (b"0",),
        (None,),
    ]


def test_ties_keep_shard_order_and_later_keys_decide() -> None:
    a = [(b"1", b"a0"), (b"2", b"a1")]
    b = [(b"1", b"b0"), (b"2", b"b1")]
    assert merged([a, b], [ints()]) == [(b"1", b"a0"), (b"1", b"b0"), (b"2", b"a1"), (b"2", b"b1")]
    x = [(b"1", b"9"), (b"1", b"3")]
    y = [(b"1", b"5")]
    assert merged([x, y], [ints(), ints(1, descending=True)]) == [(b"1", b"9"), (b"1", b"5"), (b"1", b"3")]


def test_empty_sources_and_no_keys() -> None:
    assert merged([[], [(b"1",)], []], [ints()]) == [(b"1",)]
    assert merged([[(b"2",)], [(b"1",)]], []) == [(b"2",), (b"1",)]  # no ORDER BY: shard after shard
    assert compare(row_key((None,), [ints()]), row_key((None,), [ints()]), [ints()]) == 0


@given(
    st.lists(st.lists(st.one_of(st.none(), st.integers(-50, 50)), max_size=12), min_size=1, max_size=5),
    st.booleans(),
    st.booleans(),
)
def test_merge_equals_a_stable_sort(
    shards: list[list[int | None]], descending: bool, nulls_first: bool
) -> None:
    def reference(value: int | None) -> tuple[int, int]:
        if value is None:
            return (0 if nulls_first else 2, 0)
        return (1, -value if descending else value)

    sources = [[(None if v is None else str(v).encode(),) for v in sorted(s, key=reference)] for s in shards]
    expected = sorted(
        (row for s in sources for row in s), key=lambda r: reference(None if r[0] is None else int(r[0]))
    )
    assert merged(sources, [ints(descending=descending, nulls_first=nulls_first)]) == expected


_SORTABLE = [  # (type OID, text values of that type, NULL included)
    (merge.INT4, st.integers(-(2**31), 2**31 - 1).map(lambda v: str(v).encode())),
    (merge.NUMERIC, st.sampled_from([b"NaN", b"0", b"-0.00", b"1.5", b"1.50", b"-2", b"1e3", b"999.999"])),
    (merge.FLOAT8, st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"0", b"-0", b"1.5", b"-3.25"])),
    (merge.TIMESTAMP, st.sampled_from([b"infinity", b"-infinity", b"2024-01-02 03:04:05", b"0044-03-15 BC"])),
    (merge.TEXT, st.binary(max_size=4)),
    (merge.BOOL, st.sampled_from([b"t", b"f"])),
]


@given(st.data(), st.booleans(), st.booleans(), st.integers(0, len(_SORTABLE) - 1), st.integers(0, 2))
def test_sort_keys_order_as_compare(
    data: Any, descending: bool, nulls_first: bool, which: int, n2: int
) -> None:
    """The merge's tuple keys (`merge.sort_key`) put rows in the order `compare` gives, ties kept."""
    import functools

    oid, values = _SORTABLE[which]
    other_oid, other_values = _SORTABLE[n2]
    keys = [
        MergeKey(0, column_key(oid, True), descending, nulls_first),
        MergeKey(1, column_key(other_oid, True), not descending, not nulls_first),
    ]
    rows = data.draw(st.lists(st.tuples(st.none() | values, st.none() | other_values), max_size=12))
    by_compare = sorted(
        rows, key=functools.cmp_to_key(lambda a, b: compare(row_key(a, keys), row_key(b, keys), keys))
    )
    functions = [merge.sort_key(k) for k in keys]
    by_tuples = sorted(rows, key=lambda r: tuple(f(v) for f, v in zip(functions, r, strict=True)))
    assert by_tuples == by_compare


# streams ---------------------------------------------------------------------------------------------
class FakeTransport:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class FakeServer:
    """What ShardStream needs of a ServerConnection."""

    def __init__(self, inbox: bytes = b"") -> None:
        self.sink: Any = None
        self.transport = FakeTransport()
        self.inbox = inbox
        self.written: list[bytes] = []
        self.target = SimpleNamespace(label="fake:5432/db")

    def take_inbox(self) -> bytes:
        data, self.inbox = self.inbox, b""
        return data

    def write(self, data: bytes) -> None:
        self.written.append(data)


def result(rows: Sequence[Sequence[bytes | None]], error: bytes = b"") -> bytes:
    fields = [backend.FieldDescription("k", type_oid=23), backend.FieldDescription("v")]
    body = backend.row_description(fields) + b"".join(backend.data_row(r) for r in rows)
    body += error or backend.command_complete(f"SELECT {len(rows)}")
    return body + backend.ready_for_query(b"I")


def stream_of(server: FakeServer, shard: int = 0) -> ShardStream:
    return ShardStream(shard, server, high_water=64)  # type: ignore[arg-type]


async def feed(stream: ShardStream, data: bytes, chunk: int = 7) -> None:
    for i in range(0, len(data), chunk):
        stream.server_data(stream.server, data[i : i + chunk])
        await asyncio.sleep(0)


async def test_streams_merge_in_order_with_bounded_buffers() -> None:
    servers = [FakeServer(), FakeServer(inbox=result([(b"2", b"b"), (b"5", b"e")])), FakeServer()]
    streams = [stream_of(s) for s in servers]
    for s in streams:
        s.write(b"Q...")
    assert all(server.sink is stream for server, stream in zip(servers, streams, strict=True))
    big = [(str(i).encode(), b"x" * 20) for i in (1, 3, 4, 6, 7, 8, 9)]
    streams[0].server_data(servers[0], result(big))  # far above high water: reading pauses
    assert servers[0].transport.paused
    feeder = asyncio.ensure_future(feed(streams[2], result([])))
    for s in streams:
        msg_type, _ = await s.result_message()
        assert msg_type == ord("T")
    got = [backend.decode_data_row(body)[0] async for body in merge_streams(streams, [ints()])]
    assert got == [b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"]
    assert not servers[0].transport.paused  # resumed as the buffer drained
    await feeder
    for s in streams:
        await drain(s)
        s.detach()
        assert s.pending == 0 and s.status == b"I" and s.server.sink is None


async def test_an_error_stops_the_merge_and_drain_keeps_it() -> None:
    good, bad = FakeServer(), FakeServer()
    streams = [stream_of(good, 0), stream_of(bad, 1)]
    for s in streams:
        s.write(b"Q...")
    streams[0].server_data(good, result([(b"1", b"a"), (b"3", b"c")]))
    streams[1].server_data(
        bad, result([(b"2", b"b")], error=backend.error_response("22012", "division by zero"))
    )
    for s in streams:
        await s.result_message()
    seen = []
    with pytest.raises(ShardError) as info:
        async for body in merge_streams(streams, [ints()]):
            seen.append(backend.decode_data_row(body)[0])
    assert info.value.fields["C"] == "22012" and info.value.shard == 1
    assert seen == [b"1", b"2"]
    for s in streams:
        await drain(s)
    assert streams[1].error is not None and streams[1].error["M"] == "division by zero"


async def test_a_lost_server_raises() -> None:
    server = FakeServer()
    stream = stream_of(server)
    stream.write(b"Q...")
    waiting = asyncio.ensure_future(stream.message())
    await asyncio.sleep(0)
    stream.server_lost(server)  # type: ignore[arg-type]
    with pytest.raises(merge.ServerError) as info:
        await waiting
    assert info.value.sqlstate == "08006"


async def test_notices_are_kept_aside() -> None:
    server = FakeServer(inbox=backend.notice_response("01000", "hello") + result([(b"1", None)]))
    stream = stream_of(server)
    stream.write(b"Q...")
    assert (await stream.result_message())[0] == ord("T")
    assert await stream.next_row() is not None and await stream.next_row() is None
    assert len(stream.notices) == 1


def test_reading_data_rows_in_place() -> None:
    body = backend.data_row([b"7", None, b"abc", b"x"])[5:]
    assert merge.body_key(body, [ints(0), MergeKey(2, bytes)], last=2) == (7, b"abc")
    assert merge.body_key(body, [ints(1)], last=1) == (None,)
    assert merge.keep_columns(body, 3) == backend.data_row([b"7", None, b"abc"])[5:]
    assert merge.keep_columns(body, 0) == b"\x00\x00"


def test_day_numbers_follow_the_proleptic_gregorian_calendar() -> None:
    from datetime import date

    for year in (1, 4, 100, 400, 1582, 1900, 1970, 2000, 2024, 9999):
        for month in (1, 2, 3, 12):
            assert (
                merge._days(year, month, 1) == date(year, month, 1).toordinal() - date(1970, 1, 1).toordinal()
            )

    def leap(y: int) -> bool:
        return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)

    for year in range(-1200, 2):  # astronomical years: 0 is 1 BC, -400 is 401 BC (both leap)
        assert merge._days(year + 1, 1, 1) - merge._days(year, 1, 1) == (366 if leap(year) else 365)
    k = key_of(merge.DATE)
    assert k(b"0401-12-31 BC") < k(b"0400-01-01 BC") < k(b"0400-03-01 BC") < k(b"0001-01-01")
