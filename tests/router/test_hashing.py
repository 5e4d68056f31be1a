"""router/hashing.py against values PostgreSQL 15 computed, plus the fast paths against the
reference forms of hashfn.c's functions.

The expected hashes came from a real server:
    ((hashint8extended(k, 8816678312871386365)::numeric + 5305509591434766563) % 2^64
i.e. the seeded hash support function (seed = HASH_PARTITION_SEED), combined into a row hash of 0
with hash_combine64 (its constant is 5305509591434766563); and the partitions from
    SELECT r FROM generate_series(0, m - 1) r WHERE satisfies_hash_partition('h'::regclass, m, r, k)
on tables `h (k <type>) PARTITION BY HASH (k)`, for m = 3, 8, 1024.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.hashing import (
    HASH_PARTITION_SEED,
    KEY_TYPES,
    hash_bytes_extended,
    hash_bytes_uint32_extended,
    hash_combine64,
    hash_int2,
    hash_int4,
    hash_int8,
    hash_text,
    hash_uuid,
    int8_fold,
    key_from_binary,
    key_from_text,
    key_type,
    partition_hash,
    partition_of,
    partitions_of,
    row_partition_hash,
)

M64 = (1 << 64) - 1
MODULI = (3, 8, 1024)

# (key, partition hash, partitions for moduli 3, 8, 1024)
INT8_KNOWN = [
    (0, 901916981443598768, (2, 0, 432)),
    (1, 11274504255086170040, (2, 0, 952)),
    (-1, 288437243775528869, (2, 5, 933)),
    (42, 12669485132091644514, (0, 2, 610)),
    (2147483647, 17701988066039669119, (1, 7, 383)),
    (-2147483648, 10244051894435199606, (0, 6, 630)),
    (4294967296, 11274504255086170040, (2, 0, 952)),
    (-4294967297, 7453217227354435114, (1, 2, 554)),
    (9223372036854775807, 10244051894435199606, (0, 6, 630)),
    (-9223372036854775808, 17701988066039669119, (1, 7, 383)),
]
INT4_KNOWN = [
    (0, 901916981443598768, (2, 0, 432)),
    (1, 11274504255086170040, (2, 0, 952)),
    (-1, 288437243775528869, (2, 5, 933)),
    (42, 12669485132091644514, (0, 2, 610)),
    (2147483647, 17701988066039669119, (1, 7, 383)),
    (-2147483648, 10244051894435199606, (0, 6, 630)),
]
INT2_KNOWN = [
    (0, 901916981443598768, (2, 0, 432)),
    (1, 11274504255086170040, (2, 0, 952)),
    (-1, 288437243775528869, (2, 5, 933)),
    (42, 12669485132091644514, (0, 2, 610)),
    (32767, 17315557435858050766, (1, 6, 718)),
    (-32768, 11190752103532758141, (0, 5, 125)),
]
TEXT_KNOWN = [
    ("", 18051608080690800806, (2, 6, 166)),
    ("a", 17047028206024085342, (2, 6, 862)),
    ("hello", 2670230039693765524, (1, 4, 916)),
    ("abcdefghijk", 3259074282889399131, (0, 3, 859)),  # 11 bytes: the longest tail
    ("abcdefghijkl", 15875462123530940521, (1, 1, 105)),  # one whole block, no tail
    ("abcdefghijklm", 16966499550419038102, (1, 6, 918)),
    ("héllo wörld ✓ 🐘", 5051670788620614381, (0, 5, 749)),
    ("The quick brown fox jumps over the lazy dog", 11175731615344884169, (1, 1, 457)),
]
VARCHAR_KNOWN = [
    ("", 18051608080690800806, (2, 6, 166)),
    ("alice@example.com", 3914442153962193628, (1, 4, 732)),
]
UUID_KNOWN = [
    ("00000000-0000-0000-0000-000000000000", 24427445038037925, (0, 5, 933)),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", 5156523127093460353, (1, 1, 385)),
    ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", 5730022782425327056, (1, 0, 464)),
    ("123e4567-e89b-12d3-a456-426614174000", 4053376898952622981, (1, 5, 901)),
]

KNOWN = [
    ("bigint", INT8_KNOWN),
    ("integer", INT4_KNOWN),
    ("smallint", INT2_KNOWN),
    ("text", TEXT_KNOWN),
    ("varchar", VARCHAR_KNOWN),
    ("uuid", UUID_KNOWN),
]
KNOWN_CASES = [(t, k, h, p) for t, rows in KNOWN for k, h, p in rows]


@pytest.mark.parametrize(("data_type", "key", "expected_hash", "expected_parts"), KNOWN_CASES)
def test_known_values_from_postgres(
    data_type: str, key: object, expected_hash: int, expected_parts: tuple[int, ...]
) -> None:
    assert partition_hash(data_type, key) == expected_hash
    assert tuple(partition_of(data_type, key, m) for m in MODULI) == expected_parts
    # the known partitions follow from the known hash, as satisfies_hash_partition says
    assert tuple(expected_hash % m for m in MODULI) == expected_parts


def test_per_type_functions_match_the_table() -> None:
    for key, h, _ in INT8_KNOWN:
        assert hash_int8(key) == h
    for key, h, _ in INT4_KNOWN:
        assert hash_int4(key) == h
    for key, h, _ in INT2_KNOWN:
        assert hash_int2(key) == h
    for key, h, _ in TEXT_KNOWN:
        assert hash_text(key) == h
        assert hash_text(key.encode()) == h
        assert hash_text(bytearray(key.encode())) == h
        assert hash_text(memoryview(key.encode())) == h
    for key, h, _ in UUID_KNOWN:
        u = uuid.UUID(key)
        assert hash_uuid(u) == h
        assert hash_uuid(key) == h
        assert hash_uuid(u.bytes) == h


def test_reference_functions_with_other_seeds() -> None:
    # SELECT hashtextextended('', 0), hashtextextended('abcdefghijklmnopqrstuvwxyz', 0),
    #        hashint8extended(-42, 0), hashint4extended(123456, 1), hashtextextended('abc', -1)
    assert hash_bytes_extended(b"", 0) == -6939563903564495251 & M64
    assert hash_bytes_extended(b"abcdefghijklmnopqrstuvwxyz", 0) == -6612928417832572997 & M64
    assert hash_bytes_uint32_extended(int8_fold(-42), 0) == 8809670066178192187
    assert hash_bytes_uint32_extended(123456, 1) == -7785123539626401428 & M64
    assert hash_bytes_extended(b"abc", -1) == 1911237551546830967
    # hashtextextended('héllo', 0) and hashint8extended(42, seed), raw (before the combine)
    assert hash_bytes_extended("héllo".encode(), 0) == 2465157995015290115
    assert hash_bytes_uint32_extended(int8_fold(42), HASH_PARTITION_SEED) == 7363975540656877951


def test_multi_column_keys() -> None:
    # hm (a bigint, b text, c uuid) PARTITION BY HASH (a, b, c); remainders for modulus 3, 8, 1024
    u = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    types = ["bigint", "text", "uuid"]
    cases = [
        ((42, "x", u), (1, 7, 367)),
        ((-1, "", None), (2, 0, 928)),
        ((None, "alice", uuid.UUID(int=0)), (0, 1, 185)),
        ((7, None, None), (1, 7, 279)),
        ((None, None, None), (0, 0, 0)),
    ]
    for values, parts in cases:
        h = row_partition_hash(types, values)
        assert tuple(h % m for m in MODULI) == parts, values
    # one column: the combine from 0 is what the per-type functions already did
    assert row_partition_hash(["bigint"], [42]) == hash_int8(42)
    with pytest.raises(ValueError, match="2 key types but 1 values"):
        row_partition_hash(["bigint", "text"], [1])


def test_null_key_is_remainder_zero() -> None:
    # SELECT satisfies_hash_partition('h8', m, 0, NULL::bigint) is true for every m
    assert partition_hash("bigint", None) == 0
    assert partition_of("text", None, 7) == 0
    assert partitions_of("uuid", [None, None], 5) == [0, 0]


# -- the fast paths are the reference functions, specialised --------------------------------------

int8s = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
int4s = st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1)
int2s = st.integers(min_value=-(1 << 15), max_value=(1 << 15) - 1)


@given(int8s)
def test_int8_fast_path_is_the_reference(v: int) -> None:
    assert hash_int8(v) == hash_combine64(0, hash_bytes_uint32_extended(int8_fold(v), HASH_PARTITION_SEED))


@given(int4s)
def test_int_widths_hash_alike(v: int) -> None:
    # hashfunc.c folds int8 so that equal values hash equally at every width
    assert hash_int4(v) == hash_int8(v)
    assert hash_int4(v) == hash_combine64(0, hash_bytes_uint32_extended(v, HASH_PARTITION_SEED))


@given(int2s)
def test_int2_is_int4(v: int) -> None:
    assert hash_int2(v) == hash_int4(v)


@given(st.binary(max_size=200))
def test_text_fast_path_is_the_reference(data: bytes) -> None:
    assert hash_text(data) == hash_combine64(0, hash_bytes_extended(data, HASH_PARTITION_SEED))


@given(st.uuids())
def test_uuid_fast_path_is_the_reference(u: uuid.UUID) -> None:
    assert hash_uuid(u) == hash_combine64(0, hash_bytes_extended(u.bytes, HASH_PARTITION_SEED))


def test_long_text_beyond_the_state_cache() -> None:
    s = "ü" * 5000  # 10000 bytes: longer than the cached start states
    assert hash_text(s) == hash_combine64(0, hash_bytes_extended(s.encode(), HASH_PARTITION_SEED))
    assert hash_text(s) == hash_text(s)


@given(st.integers(min_value=0, max_value=M64), st.integers(min_value=0, max_value=M64))
def test_hash_combine64_stays_in_uint64(a: int, b: int) -> None:
    assert 0 <= hash_combine64(a, b) <= M64


# -- range and type checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "bad"),
    [
        (hash_int2, 32768),
        (hash_int2, -32769),
        (hash_int4, 2147483648),
        (hash_int4, -2147483649),
        (hash_int8, 1 << 63),
        (hash_int8, -(1 << 63) - 1),
    ],
)
def test_out_of_range_ints(fn: object, bad: int) -> None:
    assert callable(fn)
    with pytest.raises(ValueError, match="out of range"):
        fn(bad)


@pytest.mark.parametrize("bad", [True, 1.0, "1", b"\x00" * 8, None])
def test_ints_must_be_ints(bad: object) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        hash_int8(bad)  # type: ignore[arg-type]


def test_bad_text_and_uuid_keys() -> None:
    with pytest.raises(TypeError):
        hash_text(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        hash_text("\ud800")  # a lone surrogate has no UTF-8 form
    with pytest.raises(ValueError, match="16 bytes"):
        hash_uuid(b"\x00" * 15)
    with pytest.raises(ValueError, match="invalid input syntax for type uuid"):
        hash_uuid("not-a-uuid")
    with pytest.raises(TypeError):
        hash_uuid(42)  # type: ignore[arg-type]


# -- the type table --------------------------------------------------------------------------------


def test_type_names_and_aliases() -> None:
    for name in ("bigint", "integer", "smallint", "text", "varchar", "uuid"):
        assert name in KEY_TYPES
    assert key_type("int8") is key_type("bigint") is key_type("BIGINT") is key_type("bigserial")
    assert key_type("int") is key_type("int4") is key_type("Integer")
    assert key_type("varchar(255)") is key_type("character  varying (20)") is key_type("varchar")
    assert key_type("text").hash is key_type("varchar").hash
    with pytest.raises(ValueError, match="unsupported shard key type 'numeric'"):
        key_type("numeric")
    with pytest.raises(ValueError, match="unsupported"):
        partition_hash("float8", 1.0)
    with pytest.raises(ValueError, match="modulus"):
        partition_of("bigint", 1, 0)


# -- text format (int2in/int4in/int8in, textin, uuid_in) -------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"42", 42),
        (b" 42 ", 42),
        (b"\t-7\n", -7),
        (b"\x0c\x0b7\r", 7),  # every C-locale isspace character
        (b"+0", 0),
        (b"-0", 0),
        (b"00042", 42),
        (b"9223372036854775807", 9223372036854775807),
        (b"-9223372036854775808", -9223372036854775808),
        # PostgreSQL 16 syntax (a 15 server rejects it, so accepting it cannot misroute)
        (b"1_000", 1000),
        (b"0x1F", 31),
        (b"-0X_ff", -255),
        (b"0o17", 15),
        (b"0b1_01", 5),
    ],
)
def test_int8_from_text(raw: bytes, expected: int) -> None:
    assert key_from_text("bigint", raw) == expected


@pytest.mark.parametrize(
    "raw",
    [b"", b" ", b"+", b"-", b"4 2", b"1e3", b"1.0", "٣".encode(), b"0x", b"_1", b"1_", b"1__0", b"0b2",
     b"\xa07", b"42\x00", b"++1"],
)  # fmt: skip
def test_int8_bad_text(raw: bytes) -> None:
    with pytest.raises(ValueError, match="invalid input syntax for type bigint"):
        key_from_text("bigint", raw)


@pytest.mark.parametrize(
    ("data_type", "raw"),
    [
        ("bigint", b"9223372036854775808"),
        ("bigint", b"-9223372036854775809"),
        ("integer", b"2147483648"),
        ("integer", b"-2147483649"),
        ("smallint", b"32768"),
        ("smallint", b"-0x8001"),
    ],
)
def test_int_text_out_of_range(data_type: str, raw: bytes) -> None:
    with pytest.raises(ValueError, match=f"out of range for type {data_type}"):
        key_from_text(data_type, raw)


def test_int_text_limits() -> None:
    assert key_from_text("integer", b"-2147483648") == -2147483648
    assert key_from_text("smallint", b"32767") == 32767
    assert key_from_text("smallint", b"-32768") == -32768


UUID_CANONICAL = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")


# What PostgreSQL 15 said of each form (ERR: invalid input syntax for type uuid)
@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", True),
        (b"{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", True),
        (b"a0eebc999c0b4ef8bb6d6bb9bd380a11", True),
        (b"a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", True),
        (b"{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}", True),
        (b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", False),
        (b"{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", False),
        (b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", False),
        (b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111", False),
        (b" a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", False),
        (b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 ", False),
        (b"a0eeb-c99-9c0b-4ef8-bb6d-6bb9bd380a11", False),
        (b"a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11", False),
        (b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-", False),
        (b"-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", False),
        (b"urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", False),
        (b"g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", False),
        (b"", False),
    ],
)
def test_uuid_from_text(raw: bytes, ok: bool) -> None:
    if ok:
        assert key_from_text("uuid", raw) == UUID_CANONICAL
    else:
        with pytest.raises(ValueError, match="invalid input syntax for type uuid"):
            key_from_text("uuid", raw)


def test_text_from_text_and_binary() -> None:
    for conv in (key_from_text, key_from_binary):
        assert conv("text", "héllo ✓".encode()) == "héllo ✓"
        assert conv("varchar", b"") == ""
        with pytest.raises(ValueError, match="invalid byte sequence for encoding UTF8"):
            conv("text", b"\xff\xfe")
        with pytest.raises(ValueError, match="NUL"):
            conv("text", b"a\x00b")


def test_binary_format() -> None:
    assert key_from_binary("bigint", (-2).to_bytes(8, "big", signed=True)) == -2
    assert key_from_binary("integer", b"\x7f\xff\xff\xff") == 2147483647
    assert key_from_binary("smallint", b"\x80\x00") == -32768
    assert key_from_binary("uuid", UUID_CANONICAL.bytes) == UUID_CANONICAL
    assert key_from_binary("bigint", memoryview(b"\x00" * 7 + b"\x2a")) == 42
    for data_type, raw in [("bigint", b"\x00" * 4), ("integer", b"\x00" * 8), ("smallint", b"\x00"),
                           ("uuid", b"\x00" * 17)]:  # fmt: skip
        with pytest.raises(ValueError, match=r"binary .* is \d+ bytes, got"):
            key_from_binary(data_type, raw)


@given(int8s)
def test_text_and_binary_round_trip(v: int) -> None:
    assert key_from_text("bigint", str(v).encode()) == v
    assert key_from_binary("bigint", v.to_bytes(8, "big", signed=True)) == v
