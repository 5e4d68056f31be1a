"""A cursor over one message body, shared by the frontend and backend decoders.

Every read checks what is left first, so a short, garbled or hostile body becomes a ProtocolError
(SQLSTATE 08P01, or 22021 for bad UTF-8) and never an IndexError, struct.error or
UnicodeDecodeError. The data types are those of PostgreSQL protocol section 55.6 ("Message Data
Types"): IntN big-endian, String = NUL-terminated, Byten = n raw bytes.

Signedness follows what PostgreSQL itself does rather than the letter of "Int16"/"Int32":
counts of formats, parameters, columns and fields are read by the server with
`pq_getmsgint(msg, 2)`, which is unsigned (a statement may have 65535 parameters), and OIDs are
unsigned 32-bit values. Lengths, format codes, type sizes and type modifiers are signed.

The reader works in place on `bytes`/`bytearray` (a memoryview is copied once): fields are sliced
out, never the body byte by byte.
"""

from __future__ import annotations

import struct
from typing import Any

from proxy.protocol.errors import ProtocolError

# 55.6 Message Data Types: "Intn(i): An n-bit integer in network byte order (most significant
# byte first)."
_INT16 = struct.Struct("!h")
_UINT16 = struct.Struct("!H")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")

# What a decoder accepts: the session may hand over a slice of its receive buffer in any of these.
Body = bytes | bytearray | memoryview

# PostgreSQL reports text it cannot decode as "invalid byte sequence for encoding" with
# ERRCODE_CHARACTER_NOT_IN_REPERTOIRE.
CHARACTER_NOT_IN_REPERTOIRE = "22021"


class BodyReader:
    """Reads the fields of one message body in order, refusing anything the format does not allow."""

    __slots__ = ("_buf", "_end", "_pos", "_what")

    def __init__(self, buf: Body, what: str, start: int = 0, end: int | None = None) -> None:
        if isinstance(buf, memoryview):
            buf = buf.tobytes()
        self._buf: bytes | bytearray = buf
        self._pos = start  # start/end let a body be read where it lies inside a larger buffer
        self._end = len(buf) if end is None else end
        self._what = what  # the message name, so an error says which message was bad

    def _short(self, wanted: str) -> ProtocolError:
        return ProtocolError(
            f"{self._what}: insufficient data left in message for {wanted} "
            f"({self._end - self._pos} bytes left)"
        )

    def byte(self) -> int:
        """A Byte1 or Int8 field, as an integer 0..255."""
        pos = self._pos
        if pos >= self._end:
            raise self._short("Byte1")
        self._pos = pos + 1
        return self._buf[pos]

    def int16(self) -> int:
        """A signed Int16: format codes, type sizes, attribute numbers."""
        pos = self._pos
        if self._end - pos < 2:
            raise self._short("Int16")
        self._pos = pos + 2
        return int(_INT16.unpack_from(self._buf, pos)[0])

    def int32(self) -> int:
        """A signed Int32: lengths (-1 for NULL), row limits, type modifiers."""
        pos = self._pos
        if self._end - pos < 4:
            raise self._short("Int32")
        self._pos = pos + 4
        return int(_INT32.unpack_from(self._buf, pos)[0])

    def uint32(self) -> int:
        """An Int32 that PostgreSQL treats as unsigned: OIDs, process ids, cancel keys."""
        pos = self._pos
        if self._end - pos < 4:
            raise self._short("Int32")
        self._pos = pos + 4
        return int(_UINT32.unpack_from(self._buf, pos)[0])

    def count(self, min_item_size: int) -> int:
        """An Int16 count of items to follow, refused if the items cannot fit in what is left.

        Checking up front keeps a lying count from driving a long loop over nothing.
        """
        pos = self._pos
        if self._end - pos < 2:
            raise self._short("Int16 count")
        n = int(_UINT16.unpack_from(self._buf, pos)[0])
        self._pos = pos + 2
        if n * min_item_size > self._end - self._pos:
            raise ProtocolError(f"{self._what}: count {n} exceeds the data left in message")
        return n

    def count32(self, min_item_size: int) -> int:
        """An Int32 count (NegotiateProtocolVersion's options), checked like `count`."""
        n = self.int32()
        if n < 0 or n * min_item_size > self._end - self._pos:
            raise ProtocolError(f"{self._what}: count {n} exceeds the data left in message")
        return n

    def unpack(self, fields: struct.Struct) -> tuple[Any, ...]:
        """Several fixed-size fields at once (a RowDescription field's 18 bytes after its name)."""
        pos = self._pos
        if self._end - pos < fields.size:
            raise self._short(f"{fields.size}-byte fields")
        self._pos = pos + fields.size
        return fields.unpack_from(self._buf, pos)

    def cstring(self) -> str:
        """A String field: UTF-8 text up to its NUL terminator."""
        pos = self._pos
        nul = self._buf.find(0, pos, self._end)
        if nul < 0:
            raise ProtocolError(f"{self._what}: missing NUL terminator in string field")
        self._pos = nul + 1
        try:
            return self._buf[pos:nul].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                f'{self._what}: invalid byte sequence for encoding "UTF8" at byte {pos + exc.start}',
                CHARACTER_NOT_IN_REPERTOIRE,
            ) from None

    def take(self, n: int) -> bytes:
        """Byten: exactly `n` raw bytes."""
        pos = self._pos
        if n < 0 or self._end - pos < n:
            raise self._short(f"Byte{n}")
        self._pos = pos + n
        return bytes(self._buf[pos : pos + n])

    def nullable_bytes(self) -> bytes | None:
        """An Int32 length and that many bytes; length -1 means NULL and no bytes follow."""
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise ProtocolError(f"{self._what}: invalid value length {n}")
        return self.take(n)

    def rest(self) -> bytes:
        """Everything left: CopyData payloads, SASL data, GSS tokens."""
        pos = self._pos
        self._pos = self._end
        return bytes(self._buf[pos : self._end])

    def finish(self) -> None:
        """Refuse trailing garbage, as PostgreSQL's pq_getmsgend() does."""
        if self._pos != self._end:
            raise ProtocolError(f"{self._what}: invalid message format ({self._end - self._pos} extra bytes)")


def require_empty(body: Body, what: str) -> None:
    """Messages with no body (Sync, Flush, ParseComplete, ...) must have none."""
    if len(body):
        raise ProtocolError(f"{what}: invalid message format ({len(body)} extra bytes)")
