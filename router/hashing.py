"""PostgreSQL's hash-partitioning hash, reproduced bit for bit, so a sharded key lands where
`PARTITION BY HASH` and `satisfies_hash_partition()` would put it.

Why reproduce rather than invent: placement then can be checked from SQL on any shard, a
sharded table can be turned into (or out of) a native hash-partitioned table without moving a
row, and there is exactly one definition of "where does key K live". The price is that every
detail has to match PostgreSQL, so each constant and step below names the source file it comes
from (paths relative to the postgres/postgres repository; the functions are unchanged from
PostgreSQL 11, where hash partitioning arrived, through 17):

- `src/common/hashfn.c`: Bob Jenkins' lookup3 hash as `hash_bytes_extended` (any byte string)
  and `hash_bytes_uint32_extended` (one uint32), with its `mix` and `final` steps. The
  little-endian word order is used: PostgreSQL on big-endian hardware computes other hashes, so
  a shard must be little-endian (x86-64, arm64) for placement to match.
- `src/backend/access/hash/hashfunc.c`: `hashint2extended`/`hashint4extended` hash the value
  sign-extended to 32 bits; `hashint8extended` folds the high word into the low one
  (`lo ^= hi` for val >= 0, `lo ^= ~hi` otherwise) so equal values of int2/int4/int8 hash the
  same; `hashtextextended` hashes the bytes of the string for a deterministic collation.
  varchar has no hash function of its own: it uses text's opclass.
- `src/backend/utils/adt/uuid.c`: `uuid_hash_extended` hashes the 16 bytes.
- `src/include/catalog/partition.h`: `HASH_PARTITION_SEED`, the seed every key hash gets.
- `src/backend/partitioning/partbounds.c`: `compute_partition_hash_value` starts from 0 and
  folds each non-null key column's seeded hash in with `hash_combine64`
  (`src/include/common/hashfn.h`); a NULL column is skipped. A row's partition is then
  `(uint64) hash % modulus` (`satisfies_hash_partition`, `get_partition_for_tuple`).

Assumptions the caller must uphold: text is hashed as UTF-8 (server_encoding UTF8) and under a
deterministic collation (every collation a PostgreSQL 15 database can default to is); a
nondeterministic ICU column collation hashes a sort key instead and is not supported.

All arithmetic is C's unsigned wrap-around, spelled as Python ints masked with `& _M32` or
`& _M64`. The per-type functions are the hot path (one call per routed query): the seed is a
constant, so the state after the seed's `mix` is computed once (per key length for strings),
and `hash_combine64(0, h)` for a single key reduces to `h + constant`.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Key = int | str | uuid.UUID
"""A shard key as Python sees it: int for smallint/integer/bigint, str for text/varchar, UUID."""

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF

# src/include/catalog/partition.h: the seed handed to every key's extended hash function.
HASH_PARTITION_SEED = 0x7A5B22367996DCFD

# src/common/hashfn.c: the golden-ratio start value of lookup3's internal state, plus the key
# length, plus PostgreSQL's extra 3923095.
_GOLDEN = 0x9E3779B9
_STATE_BIAS = 3923095

# src/include/common/hashfn.h: hash_combine64's "64bit random data".
_COMBINE64_CONSTANT = 0x49A0F4DD15E5A8E3

_INT2_MIN, _INT2_MAX = -(1 << 15), (1 << 15) - 1
_INT4_MIN, _INT4_MAX = -(1 << 31), (1 << 31) - 1
_INT8_MIN, _INT8_MAX = -(1 << 63), (1 << 63) - 1


# ---------------------------------------------------------------------------------------------
# lookup3, as in src/common/hashfn.c. `_mix` and `_final` are the readable forms, used for the
# constants and the uint32 reference; the hot paths inline them and are tested against these.


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """hashfn.c `mix`: reversibly stir three 32-bit words (between 12-byte blocks)."""
    a = ((a - c) & _M32) ^ _rot(c, 4)
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ _rot(a, 6)
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ _rot(b, 8)
    b = (b + a) & _M32
    a = ((a - c) & _M32) ^ _rot(c, 16)
    c = (c + b) & _M32
    b = ((b - a) & _M32) ^ _rot(a, 19)
    a = (a + c) & _M32
    c = ((c - b) & _M32) ^ _rot(b, 4)
    b = (b + a) & _M32
    return a, b, c


def _final(a: int, b: int, c: int) -> tuple[int, int]:
    """hashfn.c `final`: avalanche the state into (b, c), the two halves of the 64-bit result."""
    c = ((c ^ b) - _rot(b, 14)) & _M32
    a = ((a ^ c) - _rot(c, 11)) & _M32
    b = ((b ^ a) - _rot(a, 25)) & _M32
    c = ((c ^ b) - _rot(b, 16)) & _M32
    a = ((a ^ c) - _rot(c, 4)) & _M32
    b = ((b ^ a) - _rot(a, 14)) & _M32
    c = ((c ^ b) - _rot(b, 24)) & _M32
    return b, c


def _seeded_state(length: int, seed: int) -> tuple[int, int, int]:
    """The state after hashfn.c's set-up: length folded in, then a non-zero seed mixed in."""
    a = b = c = (_GOLDEN + length + _STATE_BIAS) & _M32
    if seed:
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        a, b, c = _mix(a, b, c)
    return a, b, c


_BLOCK = struct.Struct("<3I")
_unpack_block = _BLOCK.unpack
_unpack_block_from = _BLOCK.unpack_from


def _hash_bytes_from(state: tuple[int, int, int], data: bytes | bytearray | memoryview) -> int:
    """hash_bytes_extended from a set-up state: 12-byte blocks with `mix`, the tail, `final`.

    `mix` and `final` are written out inline (rotations included): this is the hot path of
    text and uuid keys, and a function call per step would double its cost.
    """
    if data.__class__ is not bytes:
        data = bytes(data)
    a, b, c = state
    n = len(data)
    whole = n - n % 12
    if whole:
        for offset in range(0, whole, 12):
            x, y, z = _unpack_block_from(data, offset)
            a = (a + x) & _M32
            b = (b + y) & _M32
            c = (c + z) & _M32
            a = ((a - c) & _M32) ^ (((c << 4) | (c >> 28)) & _M32)
            c = (c + b) & _M32
            b = ((b - a) & _M32) ^ (((a << 6) | (a >> 26)) & _M32)
            a = (a + c) & _M32
            c = ((c - b) & _M32) ^ (((b << 8) | (b >> 24)) & _M32)
            b = (b + a) & _M32
            a = ((a - c) & _M32) ^ (((c << 16) | (c >> 16)) & _M32)
            c = (c + b) & _M32
            b = ((b - a) & _M32) ^ (((a << 19) | (a >> 13)) & _M32)
            a = (a + c) & _M32
            c = ((c - b) & _M32) ^ (((b << 4) | (b >> 28)) & _M32)
            b = (b + a) & _M32
    if n > whole:
        # The last 1..11 bytes are added as little-endian partial words; c's lowest byte is
        # reserved (hashfn.c: "the lowest byte of c is reserved for the length"), so c's bytes
        # go in one byte up. Zero-padding the tail to 12 bytes makes that one unpack.
        x, y, z = _unpack_block(data[whole:].ljust(12, b"\0"))
        a = (a + x) & _M32
        b = (b + y) & _M32
        c = (c + (z << 8)) & _M32  # z's top byte is padding, so nothing is lost
    c = ((c ^ b) - (((b << 14) | (b >> 18)) & _M32)) & _M32
    a = ((a ^ c) - (((c << 11) | (c >> 21)) & _M32)) & _M32
    b = ((b ^ a) - (((a << 25) | (a >> 7)) & _M32)) & _M32
    c = ((c ^ b) - (((b << 16) | (b >> 16)) & _M32)) & _M32
    a = ((a ^ c) - (((c << 4) | (c >> 28)) & _M32)) & _M32
    b = ((b ^ a) - (((a << 14) | (a >> 18)) & _M32)) & _M32
    c = ((c ^ b) - (((b << 24) | (b >> 8)) & _M32)) & _M32
    return (b << 32) | c


def hash_bytes_extended(data: bytes | bytearray | memoryview, seed: int) -> int:
    """hashfn.c `hash_bytes_extended`: the uint64 hash of a byte string (text, uuid) with a seed."""
    return _hash_bytes_from(_seeded_state(len(data), seed & _M64), data)


def hash_bytes_uint32_extended(k: int, seed: int) -> int:
    """hashfn.c `hash_bytes_uint32_extended`: the uint64 hash of one uint32 (ints) with a seed."""
    a, b, c = _seeded_state(4, seed & _M64)
    b, c = _final((a + (k & _M32)) & _M32, b, c)
    return (b << 32) | c


def hash_combine64(a: int, b: int) -> int:
    """hashfn.h `hash_combine64`: fold the next key column's hash `b` into the row hash `a`."""
    return a ^ ((b + _COMBINE64_CONSTANT + ((a << 54) & _M64) + (a >> 7)) & _M64)


def int8_fold(v: int) -> int:
    """hashfunc.c `hashint8extended`'s fold of an int8 into the uint32 that gets hashed.

    Equal values hash equally whatever the integer width (int2/int4/int8), which PostgreSQL
    needs for cross-type hash joins, and which lets us hash an int4 parameter for a bigint key.
    """
    lo = v & _M32
    hi = (v >> 32) & _M32  # Python's >> is arithmetic, like C's on int64
    return lo ^ (hi if v >= 0 else hi ^ _M32)


# ---------------------------------------------------------------------------------------------
# Per-type partition hashes: compute_partition_hash_value for a one-column key. Since the row
# hash starts at 0, hash_combine64(0, h) = h + _COMBINE64_CONSTANT (mod 2**64): the shifts of
# a = 0 vanish and 0 ^ x = x.

# The state after the seed's mix for a 4-byte (uint32) key, and the first `final` step, which
# involves only b and c and so is constant too.
_U32_A, _U32_B, _U32_C = _seeded_state(4, HASH_PARTITION_SEED)
_U32_C1 = ((_U32_C ^ _U32_B) - _rot(_U32_B, 14)) & _M32
_U32_C1_ROT11 = _rot(_U32_C1, 11)


def _uint32_partition_hash(k: int) -> int:
    """hash_combine64(0, hash_bytes_uint32_extended(k, HASH_PARTITION_SEED)), unrolled."""
    a = (_U32_A + k) & _M32
    c = _U32_C1
    a = ((a ^ c) - _U32_C1_ROT11) & _M32
    b = ((_U32_B ^ a) - (((a << 25) | (a >> 7)) & _M32)) & _M32
    c = ((c ^ b) - (((b << 16) | (b >> 16)) & _M32)) & _M32
    a = ((a ^ c) - (((c << 4) | (c >> 28)) & _M32)) & _M32
    b = ((b ^ a) - (((a << 14) | (a >> 18)) & _M32)) & _M32
    c = ((c ^ b) - (((b << 24) | (b >> 8)) & _M32)) & _M32
    return (((b << 32) | c) + _COMBINE64_CONSTANT) & _M64


def _check_int(v: object, lo: int, hi: int, type_name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{type_name} shard key must be an int, not {type(v).__name__}: {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"value {v} is out of range for type {type_name}")
    return v


def hash_int2(v: int) -> int:
    """Partition hash of a smallint key (hashfunc.c `hashint2extended`)."""
    if v.__class__ is not int or not _INT2_MIN <= v <= _INT2_MAX:
        _check_int(v, _INT2_MIN, _INT2_MAX, "smallint")
    return _uint32_partition_hash(v & _M32)


def hash_int4(v: int) -> int:
    """Partition hash of an integer key (hashfunc.c `hashint4extended`)."""
    if v.__class__ is not int or not _INT4_MIN <= v <= _INT4_MAX:
        _check_int(v, _INT4_MIN, _INT4_MAX, "integer")
    return _uint32_partition_hash(v & _M32)


def hash_int8(v: int) -> int:
    """Partition hash of a bigint key (hashfunc.c `hashint8extended`)."""
    if v.__class__ is not int or not _INT8_MIN <= v <= _INT8_MAX:
        _check_int(v, _INT8_MIN, _INT8_MAX, "bigint")
    hi = (v >> 32) & _M32
    return _uint32_partition_hash((v & _M32) ^ (hi if v >= 0 else hi ^ _M32))


# Seeded start states of hash_bytes_extended by key length, filled on first use. Bounded: a
# longer key is rare and pays one extra `mix`.
_BYTES_STATE: dict[int, tuple[int, int, int]] = {}
_BYTES_STATE_CACHE_LIMIT = 4096


def _partition_hash_bytes(data: bytes | bytearray | memoryview) -> int:
    n = len(data)
    state = _BYTES_STATE.get(n)
    if state is None:
        state = _seeded_state(n, HASH_PARTITION_SEED)
        if n < _BYTES_STATE_CACHE_LIMIT:
            _BYTES_STATE[n] = state
    return (_hash_bytes_from(state, data) + _COMBINE64_CONSTANT) & _M64


def hash_text(s: str | bytes) -> int:
    """Partition hash of a text or varchar key (hashfunc.c `hashtextextended`).

    A str is hashed as UTF-8; bytes are taken to be the string already in the server encoding.
    """
    if isinstance(s, str):
        return _partition_hash_bytes(s.encode("utf-8"))
    if isinstance(s, bytes | bytearray | memoryview):
        return _partition_hash_bytes(s)
    raise TypeError(f"text shard key must be str or bytes, not {type(s).__name__}: {s!r}")


# A uuid is always 16 bytes, so its seeded start state is a constant.
_UUID_STATE = _seeded_state(16, HASH_PARTITION_SEED)


def _uuid_partition_hash(raw: bytes) -> int:
    return (_hash_bytes_from(_UUID_STATE, raw) + _COMBINE64_CONSTANT) & _M64


def hash_uuid(u: uuid.UUID | str | bytes) -> int:
    """Partition hash of a uuid key (uuid.c `uuid_hash_extended`): its 16 bytes, big-endian.

    A str is parsed as PostgreSQL's uuid input would; bytes must be the 16 raw bytes.
    """
    if isinstance(u, uuid.UUID):
        return _uuid_partition_hash(u.bytes)
    if isinstance(u, str):
        return _uuid_partition_hash(_parse_uuid_text(u.encode("ascii", "replace")).bytes)
    if isinstance(u, bytes | bytearray | memoryview):
        if len(u) != 16:
            raise ValueError(f"a raw uuid is 16 bytes, got {len(u)}: {bytes(u)!r}")
        return _uuid_partition_hash(bytes(u))
    raise TypeError(f"uuid shard key must be UUID, str or bytes, not {type(u).__name__}: {u!r}")


# ---------------------------------------------------------------------------------------------
# Values as they arrive in a Bind message or a query's literal: PostgreSQL text format and
# binary format (protocol chapter "Message Formats", Bind; the types' *_in and *_recv).

# int2in/int4in/int8in (src/backend/utils/adt/numutils.c, pg_strtoint*_safe): C-locale isspace
# around an optional sign and digits. Non-decimal prefixes and "_" digit separators are
# PostgreSQL 16 syntax; accepting them costs nothing, as a 15 server rejects them anyway.
_INT_TEXT = re.compile(
    rb"[ \t\n\r\v\f]*([+-]?)"
    rb"(?:0[xX]((?:_?[0-9a-fA-F])+)|0[oO]((?:_?[0-7])+)|0[bB]((?:_?[01])+)|([0-9](?:_?[0-9])*))"
    rb"[ \t\n\r\v\f]*"
)

# string_to_uuid (src/backend/utils/adt/uuid.c): 32 hex digits, an optional '-' after any group
# of four except the last, the whole optionally in braces. No whitespace.
_UUID_BODY = rb"[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}"
_UUID_TEXT = re.compile(rb"\{(" + _UUID_BODY + rb")\}|(" + _UUID_BODY + rb")")


def _parse_int_text(raw: bytes, lo: int, hi: int, type_name: str) -> int:
    m = _INT_TEXT.fullmatch(raw)
    if m is None:
        raise ValueError(f"invalid input syntax for type {type_name}: {bytes(raw)!r}")
    sign, hexa, octal, binary, decimal = m.groups()
    if decimal is not None:
        v = int(decimal)
    elif hexa is not None:
        v = int(hexa.replace(b"_", b""), 16)
    elif octal is not None:
        v = int(octal.replace(b"_", b""), 8)
    else:
        v = int(binary.replace(b"_", b""), 2)
    if sign == b"-":
        v = -v
    if not lo <= v <= hi:
        raise ValueError(f"value {bytes(raw)!r} is out of range for type {type_name}")
    return v


def _parse_uuid_text(raw: bytes) -> uuid.UUID:
    m = _UUID_TEXT.fullmatch(raw)
    if m is None:
        raise ValueError(f"invalid input syntax for type uuid: {bytes(raw)!r}")
    return uuid.UUID(hex=(m.group(1) or m.group(2)).decode("ascii").replace("-", ""))


def _decode_text(raw: bytes) -> str:
    try:
        s = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid byte sequence for encoding UTF8: {bytes(raw)!r}") from e
    if "\x00" in s:
        raise ValueError(f"text values cannot contain NUL (0x00) bytes: {bytes(raw)!r}")
    return s


def _int_binary(size: int, type_name: str) -> Callable[[bytes], int]:
    def decode(raw: bytes) -> int:
        if len(raw) != size:
            raise ValueError(f"binary {type_name} is {size} bytes, got {len(raw)}: {bytes(raw)!r}")
        return int.from_bytes(raw, "big", signed=True)

    return decode


def _uuid_binary(raw: bytes) -> uuid.UUID:
    if len(raw) != 16:
        raise ValueError(f"binary uuid is 16 bytes, got {len(raw)}: {bytes(raw)!r}")
    return uuid.UUID(bytes=bytes(raw))


# ---------------------------------------------------------------------------------------------
# The table of key types, looked up by name.


@dataclass(frozen=True, slots=True)
class KeyType:
    """One supported shard-key type: how to hash it and how to read it off the wire."""

    name: str
    """PostgreSQL's SQL name for the type (format_type), as used in error messages."""
    hash: Callable[[Any], int]
    """Python value -> uint64 partition hash, as compute_partition_hash_value gives it."""
    from_text: Callable[[bytes], Key]
    """Text-format bytes (a Bind parameter in format 0, a literal) -> Python value."""
    from_binary: Callable[[bytes], Key]
    """Binary-format bytes (a Bind parameter in format 1, the type's *_send output) -> value."""


_SMALLINT = KeyType(
    "smallint",
    hash_int2,
    lambda raw: _parse_int_text(raw, _INT2_MIN, _INT2_MAX, "smallint"),
    _int_binary(2, "smallint"),
)
_INTEGER = KeyType(
    "integer",
    hash_int4,
    lambda raw: _parse_int_text(raw, _INT4_MIN, _INT4_MAX, "integer"),
    _int_binary(4, "integer"),
)
_BIGINT = KeyType(
    "bigint",
    hash_int8,
    lambda raw: _parse_int_text(raw, _INT8_MIN, _INT8_MAX, "bigint"),
    _int_binary(8, "bigint"),
)
_TEXT = KeyType("text", hash_text, _decode_text, _decode_text)
_VARCHAR = KeyType("character varying", hash_text, _decode_text, _decode_text)
_UUID = KeyType("uuid", hash_uuid, _parse_uuid_text, _uuid_binary)

KEY_TYPES: dict[str, KeyType] = {
    "smallint": _SMALLINT,
    "int2": _SMALLINT,
    "smallserial": _SMALLINT,
    "integer": _INTEGER,
    "int": _INTEGER,
    "int4": _INTEGER,
    "serial": _INTEGER,
    "bigint": _BIGINT,
    "int8": _BIGINT,
    "bigserial": _BIGINT,
    "text": _TEXT,
    "varchar": _VARCHAR,
    "character varying": _VARCHAR,
    "uuid": _UUID,
}
"""Type names a sharded table's key may be declared with, including PostgreSQL's aliases."""

_TYPMOD = re.compile(r"\s*\(\s*\d+\s*\)\s*$")


def key_type(data_type: str) -> KeyType:
    """Look up a key type by name: case-insensitive, aliases allowed, a length like varchar(20)
    ignored. Raises ValueError naming the supported types."""
    kt = KEY_TYPES.get(data_type)
    if kt is not None:
        return kt
    kt = KEY_TYPES.get(" ".join(_TYPMOD.sub("", data_type).lower().split()))
    if kt is None:
        supported = ", ".join(sorted(KEY_TYPES))
        raise ValueError(f"unsupported shard key type {data_type!r} (supported: {supported})")
    return kt


def partition_hash(data_type: str, value: object) -> int:
    """The uint64 hash PostgreSQL computes for a one-column partition key of `data_type`.

    None (SQL NULL) hashes to 0, as in compute_partition_hash_value, which skips nulls: a NULL
    key lands in remainder 0 of every modulus.
    """
    if value is None:
        return 0
    return key_type(data_type).hash(value)


def row_partition_hash(data_types: Sequence[str], values: Sequence[object]) -> int:
    """compute_partition_hash_value for a multi-column key: combine each non-null column."""
    if len(data_types) != len(values):
        raise ValueError(f"{len(data_types)} key types but {len(values)} values")
    row = 0
    for data_type, value in zip(data_types, values, strict=True):
        if value is not None:
            # the per-type functions return hash_combine64(0, h) = h + constant; undo that for h
            column = (key_type(data_type).hash(value) - _COMBINE64_CONSTANT) & _M64
            row = hash_combine64(row, column)
    return row


def key_from_text(data_type: str, raw: bytes) -> Key:
    """Read a key from PostgreSQL text format (UTF-8); ValueError if PostgreSQL would refuse it."""
    return key_type(data_type).from_text(raw)


def key_from_binary(data_type: str, raw: bytes) -> Key:
    """Read a key from PostgreSQL binary format; ValueError on a wrong length or bad UTF-8."""
    return key_type(data_type).from_binary(raw)


def partition_of(data_type: str, value: object, modulus: int) -> int:
    """The remainder (partition) of a `PARTITION BY HASH` table with this modulus."""
    if modulus <= 0:
        raise ValueError(f"modulus must be positive, got {modulus}")
    return partition_hash(data_type, value) % modulus


def partitions_of(data_type: str, values: Iterable[object], modulus: int) -> list[int]:
    """partition_of for many values of one type (the type is looked up once)."""
    if modulus <= 0:
        raise ValueError(f"modulus must be positive, got {modulus}")
    h = key_type(data_type).hash
    return [0 if v is None else h(v) % modulus for v in values]
