"""Field encoders shared by the frontend and backend message builders.

Encoders trust their caller (pgshard itself), with one exception: a NUL inside a String field would
silently end the field early and re-frame everything after it, so it is refused with ValueError.
Integers out of their field's range raise struct.error. Neither is a peer's ProtocolError: both are
bugs in the code that asked for the message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

# 55.6 Message Data Types: integers are big-endian.
INT16 = struct.Struct("!h")
UINT16 = struct.Struct("!H")
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")
_pack_i32 = INT32.pack


def frame(msg_type: bytes, body: bytes) -> bytes:
    """A complete message: 55.7, "Byte1 type, Int32 length of message contents including self"."""
    return msg_type + _pack_i32(len(body) + 4) + body


def cstr(text: str) -> bytes:
    """A String field: UTF-8 and a NUL terminator (55.6)."""
    raw = text.encode("utf-8")
    if b"\x00" in raw:
        raise ValueError(f"a protocol string cannot contain a NUL byte: {text!r}")
    return raw + b"\x00"


def int16_array(values: Sequence[int]) -> bytes:
    """An Int16 count followed by that many Int16 values (format codes)."""
    return UINT16.pack(len(values)) + struct.pack(f"!{len(values)}h", *values)


def oid_array16(values: Sequence[int]) -> bytes:
    """An Int16 count followed by that many OIDs (Parse, ParameterDescription)."""
    return UINT16.pack(len(values)) + struct.pack(f"!{len(values)}I", *values)


def nullable_values(values: Iterable[bytes | None]) -> bytes:
    """Int32 length (-1 for NULL) and bytes for each value, as in Bind, DataRow and FunctionCall."""
    parts: list[bytes] = []
    append = parts.append
    for value in values:
        if value is None:
            append(b"\xff\xff\xff\xff")
        else:
            append(_pack_i32(len(value)))
            append(value)
    return b"".join(parts)
