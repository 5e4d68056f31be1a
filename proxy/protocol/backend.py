"""Backend (server -> client) messages of protocol 3.0: build them as bytes, decode them from bytes.

pgshard speaks both sides of this: it builds these messages for its clients (authentication,
ErrorResponse, the merged RowDescription/DataRow/CommandComplete of a fan-out) and decodes what
shards send when a decision or a merge needs it. Pass-through replies are never decoded at all.

Formats: PostgreSQL protocol section 55.7 "Message Formats" (PostgreSQL 15 numbering; 53.7 in
16-17) and 55.8 "Error and Notice Message Fields". Encoders return complete messages; decoders take
a message BODY (after the 5-byte header), check it as strictly as PostgreSQL's own reader would and
raise ProtocolError otherwise.

The message types (backend_messages.py) and the Authentication family (auth_requests.py) live in
their own modules to keep each small; this one re-exports them, so `backend` alone covers
everything a server sends.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence

from proxy.protocol import backend_messages as m
from proxy.protocol._reader import Body, BodyReader, require_empty
from proxy.protocol._writer import (
    INT32,
    UINT16,
    UINT32,
    cstr,
    frame,
    int16_array,
    nullable_values,
    oid_array16,
)
from proxy.protocol.auth_requests import *  # noqa: F403  (re-exported, see the module docstring)
from proxy.protocol.auth_requests import decode_authentication
from proxy.protocol.backend_messages import *  # noqa: F403  (re-exported, see the module docstring)
from proxy.protocol.errors import ProtocolError

# The single-byte answers to SSLRequest / GSSENCRequest (55.2.10, 55.2.11): not framed messages.
SSL_ACCEPTED, SSL_REFUSED = b"S", b"N"
GSSENC_ACCEPTED, GSSENC_REFUSED = b"G", b"N"

# 55.8 Error and Notice Message Fields: keyword names for error_response(), in the order PostgreSQL
# itself sends them after S, V, C and M.
ERROR_FIELDS: dict[str, str] = {
    "detail": "D",
    "hint": "H",
    "position": "P",
    "internal_position": "p",
    "internal_query": "q",
    "where": "W",
    "schema_name": "s",
    "table_name": "t",
    "column_name": "c",
    "data_type_name": "d",
    "constraint_name": "n",
    "file": "F",
    "line": "L",
    "routine": "R",
}

# RowDescription, per field after its name: table OID, attribute number, type OID, type size,
# type modifier, format code (55.7).
_FIELD = struct.Struct("!IhIhih")

# --- Encoders: constant messages are built once ------------------------------------------------


PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
EMPTY_QUERY_RESPONSE = b"I\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"
COPY_DONE = b"c\x00\x00\x00\x04"
READY_IDLE = b"Z\x00\x00\x00\x05I"
READY_IN_TRANSACTION = b"Z\x00\x00\x00\x05T"
READY_FAILED = b"Z\x00\x00\x00\x05E"
_READY = {b"I": READY_IDLE, b"T": READY_IN_TRANSACTION, b"E": READY_FAILED}


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return frame(b"K", UINT32.pack(pid) + UINT32.pack(secret))


def ready_for_query(status: bytes) -> bytes:
    """b"I" idle, b"T" in a transaction block, b"E" in a failed one."""
    message = _READY.get(status)
    if message is None:
        raise ValueError(f"ReadyForQuery status must be b'I', b'T' or b'E', not {status!r}")
    return message


def error_response(sqlstate: str, message: str, severity: str = "ERROR", **extra: str | int) -> bytes:
    """An ErrorResponse as PostgreSQL >= 9.6 sends it: S and V severity, C, M, then any of ERROR_FIELDS.

    Clients such as libpq and JDBC read V to decide what the severity means, S to show it.
    """
    return frame(b"E", _diagnostic_body(sqlstate, message, severity, extra))


def notice_response(sqlstate: str, message: str, severity: str = "NOTICE", **extra: str | int) -> bytes:
    """A NoticeResponse (severity WARNING, NOTICE, DEBUG, INFO or LOG), laid out as error_response."""
    return frame(b"N", _diagnostic_body(sqlstate, message, severity, extra))


def error_response_from_fields(fields: Mapping[str, str]) -> bytes:
    """Re-send an error exactly as a shard reported it (keyed by field code, as decode_error_fields gives)."""
    return frame(b"E", _fields_body(fields))


def notice_response_from_fields(fields: Mapping[str, str]) -> bytes:
    return frame(b"N", _fields_body(fields))


def _diagnostic_body(sqlstate: str, message: str, severity: str, extra: Mapping[str, str | int]) -> bytes:
    unknown = extra.keys() - ERROR_FIELDS.keys()
    if unknown:
        raise TypeError(f"unknown error field(s): {', '.join(sorted(unknown))}")
    sev = cstr(severity)
    parts = [b"S", sev, b"V", sev, b"C", cstr(sqlstate), b"M", cstr(message)]
    for name, code in ERROR_FIELDS.items():
        if name in extra:
            parts += (code.encode(), cstr(str(extra[name])))
    parts.append(b"\x00")
    return b"".join(parts)


def _fields_body(fields: Mapping[str, str]) -> bytes:
    parts = []
    for code, value in fields.items():
        if len(code) != 1 or code == "\x00" or not code.isascii():
            raise ValueError(f"an error field code is one ASCII character other than NUL, not {code!r}")
        parts.append(code.encode() + cstr(value))
    parts.append(b"\x00")
    return b"".join(parts)


def command_complete(tag: str) -> bytes:
    return frame(b"C", cstr(tag))


def row_description(fields: Sequence[m.FieldDescription]) -> bytes:
    pack = _FIELD.pack
    body = b"".join(cstr(f[0]) + pack(*f[1:]) for f in fields)
    return frame(b"T", UINT16.pack(len(fields)) + body)


def data_row(values: Sequence[bytes | None]) -> bytes:
    return frame(b"D", UINT16.pack(len(values)) + nullable_values(values))


def parse_complete() -> bytes:
    return PARSE_COMPLETE


def bind_complete() -> bytes:
    return BIND_COMPLETE


def close_complete() -> bytes:
    return CLOSE_COMPLETE


def no_data() -> bytes:
    return NO_DATA


def empty_query_response() -> bytes:
    return EMPTY_QUERY_RESPONSE


def portal_suspended() -> bytes:
    return PORTAL_SUSPENDED


def parameter_description(oids: Sequence[int]) -> bytes:
    return frame(b"t", oid_array16(oids))


def copy_in_response(format: int, column_formats: Sequence[int]) -> bytes:
    return frame(b"G", bytes((format,)) + int16_array(column_formats))


def copy_out_response(format: int, column_formats: Sequence[int]) -> bytes:
    return frame(b"H", bytes((format,)) + int16_array(column_formats))


def copy_both_response(format: int, column_formats: Sequence[int]) -> bytes:
    return frame(b"W", bytes((format,)) + int16_array(column_formats))


def copy_data(data: bytes) -> bytes:
    return frame(b"d", data)


def copy_done() -> bytes:
    return COPY_DONE


def notification_response(pid: int, channel: str, payload: str) -> bytes:
    return frame(b"A", UINT32.pack(pid) + cstr(channel) + cstr(payload))


def function_call_response(value: bytes | None) -> bytes:
    return frame(b"V", nullable_values((value,)))


def negotiate_protocol_version(newest_minor: int, unrecognized_options: Sequence[str] = ()) -> bytes:
    """55.2.1: tells a client asking for 3.x or "_pq_." options what this server speaks instead."""
    body = INT32.pack(newest_minor) + INT32.pack(len(unrecognized_options))
    return frame(b"v", body + b"".join(cstr(o) for o in unrecognized_options))


# --- Decoders -----------------------------------------------------------------------------------


def decode_error_fields(body: Body) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse, keyed by their one-letter code.

    55.8: unknown field codes are kept, as "frontends should silently ignore fields of unrecognized
    type" and a proxy should pass them on.
    """
    r = BodyReader(body, "ErrorResponse/NoticeResponse")
    fields: dict[str, str] = {}
    while code := r.byte():
        fields[chr(code)] = r.cstring()
    r.finish()
    return fields


def decode_backend_key_data(body: Body) -> m.BackendKeyData:
    r = BodyReader(body, "BackendKeyData")
    message = m.BackendKeyData(r.uint32(), r.uint32())
    r.finish()
    return message


def decode_command_complete(body: Body) -> str:
    r = BodyReader(body, "CommandComplete")
    tag = r.cstring()
    r.finish()
    return tag


def decode_copy_response(body: Body) -> tuple[int, tuple[int, ...]]:
    """The overall format and the column formats of a CopyIn/CopyOut/CopyBothResponse."""
    r = BodyReader(body, "CopyResponse")
    overall = r.byte()
    formats = tuple(r.int16() for _ in range(r.count(2)))
    r.finish()
    return overall, formats


_unpack_i32 = INT32.unpack_from


def decode_data_row(body: Body) -> tuple[bytes | None, ...]:
    """A row's values as bytes (None for NULL). Hand-inlined: merges decode one per row."""
    end = len(body)
    if end < 2:
        raise ProtocolError("DataRow: insufficient data left in message")
    n = (body[0] << 8) | body[1]
    if n * 4 > end - 2:
        raise ProtocolError(f"DataRow: count {n} exceeds the data left in message")
    values: list[bytes | None] = []
    append = values.append
    pos = 2
    for _ in range(n):
        if end - pos < 4:
            raise ProtocolError("DataRow: insufficient data left in message")
        length = _unpack_i32(body, pos)[0]
        pos += 4
        if length == -1:
            append(None)
        elif 0 <= length <= end - pos:
            append(bytes(body[pos : pos + length]))
            pos += length
        else:
            raise ProtocolError(f"DataRow: invalid value length {length}")
    if pos != end:
        raise ProtocolError(f"DataRow: invalid message format ({end - pos} extra bytes)")
    return tuple(values)


def decode_function_call_response(body: Body) -> bytes | None:
    r = BodyReader(body, "FunctionCallResponse")
    value = r.nullable_bytes()
    r.finish()
    return value


def decode_negotiate_protocol_version(body: Body) -> m.NegotiateProtocolVersion:
    r = BodyReader(body, "NegotiateProtocolVersion")
    newest_minor = r.int32()
    options = tuple(r.cstring() for _ in range(r.count32(1)))
    r.finish()
    return m.NegotiateProtocolVersion(newest_minor, options)


def decode_notification_response(body: Body) -> m.NotificationResponse:
    r = BodyReader(body, "NotificationResponse")
    message = m.NotificationResponse(r.uint32(), r.cstring(), r.cstring())
    r.finish()
    return message


def decode_parameter_description(body: Body) -> tuple[int, ...]:
    r = BodyReader(body, "ParameterDescription")
    oids = tuple(r.uint32() for _ in range(r.count(4)))
    r.finish()
    return oids


def decode_parameter_status(body: Body) -> m.ParameterStatus:
    r = BodyReader(body, "ParameterStatus")
    message = m.ParameterStatus(r.cstring(), r.cstring())
    r.finish()
    return message


def decode_ready_for_query(body: Body) -> bytes:
    """The transaction status: the pooler returns a connection only at b"I"."""
    if len(body) != 1 or body[0] not in b"ITE":
        raise ProtocolError(f"ReadyForQuery: invalid transaction status {bytes(body)!r}")
    return bytes(body)


def decode_row_description(body: Body) -> tuple[m.FieldDescription, ...]:
    r = BodyReader(body, "RowDescription")
    # A field is at least a NUL (empty name) and 18 bytes of fixed fields.
    fields = tuple(m.FieldDescription(r.cstring(), *r.unpack(_FIELD)) for _ in range(r.count(19)))
    r.finish()
    return fields


def _empty(message: m.BackendMessage, what: str) -> Callable[[Body], m.BackendMessage]:
    def decode(body: Body) -> m.BackendMessage:
        require_empty(body, what)
        return message

    return decode


_DECODERS: dict[int, Callable[[Body], m.BackendMessage]] = {
    ord("R"): decode_authentication,
    ord("K"): decode_backend_key_data,
    ord("1"): _empty(m.ParseComplete(), "ParseComplete"),
    ord("2"): _empty(m.BindComplete(), "BindComplete"),
    ord("3"): _empty(m.CloseComplete(), "CloseComplete"),
    ord("n"): _empty(m.NoData(), "NoData"),
    ord("I"): _empty(m.EmptyQueryResponse(), "EmptyQueryResponse"),
    ord("s"): _empty(m.PortalSuspended(), "PortalSuspended"),
    ord("c"): _empty(m.CopyDone(), "CopyDone"),
    ord("d"): lambda body: m.CopyData(bytes(body)),
    ord("C"): lambda body: m.CommandComplete(decode_command_complete(body)),
    ord("G"): lambda body: m.CopyInResponse(*decode_copy_response(body)),
    ord("H"): lambda body: m.CopyOutResponse(*decode_copy_response(body)),
    ord("W"): lambda body: m.CopyBothResponse(*decode_copy_response(body)),
    ord("D"): lambda body: m.DataRow(decode_data_row(body)),
    ord("E"): lambda body: m.ErrorResponse(decode_error_fields(body)),
    ord("N"): lambda body: m.NoticeResponse(decode_error_fields(body)),
    ord("V"): lambda body: m.FunctionCallResponse(decode_function_call_response(body)),
    ord("v"): decode_negotiate_protocol_version,
    ord("A"): decode_notification_response,
    ord("t"): lambda body: m.ParameterDescription(decode_parameter_description(body)),
    ord("S"): decode_parameter_status,
    ord("Z"): lambda body: m.ReadyForQuery(decode_ready_for_query(body)),
    ord("T"): lambda body: m.RowDescription(decode_row_description(body)),
}


def decode_backend(msg_type: int, body: Body) -> m.BackendMessage:
    """Decode any backend message; an unknown type byte is a protocol violation."""
    decoder = _DECODERS.get(msg_type)
    if decoder is None:
        raise ProtocolError(f"unexpected message type {msg_type} from server")
    return decoder(body)
