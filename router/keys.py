"""Shard-key values from where a statement keeps them: a literal of the query text, or a Bind
parameter in text or binary format (protocol "Message Formats", Bind).

A value that cannot be read as a key raises ValueError (or TypeError); the caller decides what
that means: for a read it widens the route (PostgreSQL may still match rows, as `int_key = 5.0`
does), for an INSERT it is an error.
"""

from __future__ import annotations

import struct
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from parser.fingerprint import Literal, LiteralKind
from parser.plan import ValueRef
from router.hashing import Key
from router.topology import TableSharding

# pg_type OIDs a parameter may be declared with (Parse), by key family. 0: let the server infer it.
INT_OIDS = frozenset({0, 20, 21, 23})  # int8, int2, int4
TEXT_OIDS = frozenset({0, 25, 1043, 705})  # text, varchar, unknown
UUID_OIDS = frozenset({0, 2950})
ARRAY_OIDS = {1016: "int", 1005: "int", 1007: "int", 1009: "text", 1015: "text", 2951: "uuid"}
FAMILY_OIDS = {"int": INT_OIDS, "text": TEXT_OIDS, "uuid": UUID_OIDS}

_INT_CASTS = frozenset({"smallint", "int2", "integer", "int", "int4", "bigint", "int8"})
_NUMERIC_CASTS = frozenset({"numeric", "decimal"})
_TEXT_CASTS = frozenset({"text", "varchar", "character varying"})
_UUID_CASTS = frozenset({"uuid"})


class NotAKey(ValueError):
    """The value cannot equal any key (a fractional number for an integer key): no row matches."""


def cast_family(cast: str) -> str | None:
    """The key family a cast yields ('int', 'numeric', 'text', 'uuid'), or None."""
    base = cast.split("(")[0].strip()
    if base.endswith("[]"):
        base = base[:-2].strip()
    if base in _INT_CASTS:
        return "int"
    if base in _NUMERIC_CASTS:
        return "numeric"
    if base in _TEXT_CASTS:
        return "text"
    if base in _UUID_CASTS:
        return "uuid"
    return None


def usable(ref: ValueRef, sharding: TableSharding, param_types: tuple[int, ...] = ()) -> bool:
    """Whether a value compared with (or inserted into) the key can be read as a key of its type.
    A cast to another family (`key = $1::text` for an integer key) or a parameter declared with
    such a type compares under other rules; such a value is treated as unknown."""
    if ref.cast is not None:
        family = cast_family(ref.cast)
        if family != sharding.family and not (family == "numeric" and sharding.family == "int"):
            return False
        if ref.array != ref.cast.endswith("[]"):
            return False
    if ref.kind.value == "param" and 0 < ref.index <= len(param_types):
        oid = param_types[ref.index - 1]
        if ref.array:
            return oid == 0 or ARRAY_OIDS.get(oid) == sharding.family
        return oid in FAMILY_OIDS[sharding.family]
    return True


def literal_key(sharding: TableSharding, literal: Literal, negate: bool = False, insert: bool = False) -> Key:
    """The key a literal denotes. A number with a fraction or exponent compared with an integer key
    is a numeric comparison; in an INSERT it is rounded, as PostgreSQL's numeric-to-int cast does."""
    value = literal.value
    if sharding.family == "int" and literal.kind is LiteralKind.NUMBER:
        if value.isdigit():  # the common case: int() and the hash's range check are all it needs
            return -int(value) if negate else int(value)
        lowered = value.lower()
        if b"." in lowered or (b"e" in lowered and not lowered.startswith(b"0x")):
            return _numeric_to_int(sharding, value, negate, insert)
    if negate:
        value = b"-" + value
    return sharding.key_type.from_text(value)


def text_key(sharding: TableSharding, raw: bytes, insert: bool = False) -> Key:
    if sharding.family == "int":
        try:
            return sharding.key_type.from_text(raw)
        except ValueError:
            if b"." in raw or b"e" in raw.lower():
                return _numeric_to_int(sharding, raw.strip(), False, insert)
            raise
    return sharding.key_type.from_text(raw)


def binary_key(sharding: TableSharding, raw: bytes) -> Key:
    """A binary parameter. Integers are read by length (int2/int4/int8 all compare with an
    integer key, and a client may declare any of them); the value must fit the key's type."""
    if sharding.family == "int":
        if len(raw) not in (2, 4, 8):
            raise ValueError(f"binary integer parameter of {len(raw)} bytes")
        value = int.from_bytes(raw, "big", signed=True)
        sharding.key_type.hash(value)  # range check for the key's type
        return value
    return sharding.key_type.from_binary(raw)


def text_array(raw: bytes) -> list[bytes | None]:
    """Elements of a one-dimensional array in text format: {1,2,"a b",NULL}."""
    s = raw.strip()
    if s.startswith(b"[") and b"=" in s:  # explicit bounds: [0:2]={...}
        s = s[s.index(b"=") + 1 :].strip()
    if not (s.startswith(b"{") and s.endswith(b"}")):
        raise ValueError(f"not an array literal: {raw!r}")
    body = s[1:-1]
    out: list[bytes | None] = []
    i, n = 0, len(body)
    if not body.strip():
        return out
    while i <= n:
        while i < n and body[i : i + 1].isspace():
            i += 1
        if i < n and body[i : i + 1] == b"{":
            raise ValueError("multi-dimensional arrays are not shard keys")
        if i < n and body[i : i + 1] == b'"':
            i += 1
            item = bytearray()
            while i < n and body[i : i + 1] != b'"':
                if body[i : i + 1] == b"\\":
                    i += 1
                item += body[i : i + 1]
                i += 1
            i += 1
            out.append(bytes(item))
            while i < n and body[i : i + 1] != b",":
                i += 1
        else:
            end = body.find(b",", i)
            end = n if end < 0 else end
            item_raw = body[i:end].strip()
            out.append(None if item_raw.upper() == b"NULL" else item_raw)
            i = end
        i += 1
    return out


_HEADER = struct.Struct("!iii")
_DIM = struct.Struct("!ii")
_LEN = struct.Struct("!i")


def binary_array(raw: bytes) -> list[bytes | None]:
    """Elements of an array in binary format (array_send): ndim, flags, element OID, dimensions,
    then each element as a length-prefixed value (-1: NULL)."""
    ndim, _flags, _oid = _HEADER.unpack_from(raw, 0)
    if ndim == 0:
        return []
    if ndim != 1:
        raise ValueError("multi-dimensional arrays are not shard keys")
    count, _lower = _DIM.unpack_from(raw, 12)
    pos, out = 20, list[bytes | None]()
    for _ in range(count):
        (length,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(raw[pos : pos + length])
            pos += length
    return out


def _numeric_to_int(sharding: TableSharding, value: bytes, negate: bool, insert: bool) -> int:
    try:
        number = Decimal(value.decode("ascii").replace("_", ""))
    except (InvalidOperation, UnicodeDecodeError) as e:
        raise ValueError(f"invalid number {value!r}") from e
    if negate:
        number = -number
    if number != number.to_integral_value():
        if not insert:
            raise NotAKey(f"{number} is not an integer")
        # numeric -> integer rounds half away from zero (numeric.c, numeric_int8)
        number = number.to_integral_value(rounding=ROUND_HALF_UP)
    result = int(number)
    sharding.key_type.hash(result)
    return result
