"""Frontend (client -> server) messages of protocol 3.0: build them as bytes, decode them from bytes.

Sans-IO in the manner of h11: encoders return complete messages (type byte, length, body), decoders
take a message BODY (the bytes after the 5-byte header that `framing.iter_messages` found) or, for
start-up packets, the whole packet. Nothing here touches a socket.

Formats are those of the PostgreSQL protocol chapter, section 55.7 "Message Formats" (PostgreSQL 15
numbering; 53.7 in 16-17). A decoder raises ProtocolError for anything PostgreSQL would refuse as
malformed; the session answers with its `sqlstate` and closes that client.

Decoded sequences are tuples (the messages are frozen). Type byte 'p' is shared by PasswordMessage,
SASLInitialResponse, SASLResponse and GSSResponse: only the authentication exchange in progress
says which, so `decode_frontend` returns the raw `AuthenticationResponse` and the session calls
`decode_password`, `decode_sasl_initial_response` or `decode_sasl_response`.

Start-up packets (no type byte) are coded in startup.py; this module re-exports them, so
`frontend` alone covers everything a client sends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.protocol._reader import Body, BodyReader, require_empty
from proxy.protocol._writer import (
    INT16,
    INT32,
    UINT16,
    UINT32,
    cstr,
    frame,
    int16_array,
    nullable_values,
    oid_array16,
)
from proxy.protocol.errors import ProtocolError
from proxy.protocol.startup import *  # noqa: F403  (re-exported, see the module docstring)


@dataclass(frozen=True, slots=True)
class Query:
    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_oids: tuple[int, ...]  # 0 leaves a parameter's type to the server


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]  # 0 text, 1 binary: none, one for all, or one per parameter
    params: tuple[bytes | None, ...]  # None is SQL NULL
    result_formats: tuple[int, ...]

    def param_format(self, index: int) -> int:
        """The format of parameter `index`, resolving 55.7's "zero, one, or one per parameter" rule."""
        formats = self.param_formats
        if not formats:
            return 0
        return formats[0] if len(formats) == 1 else formats[index]


@dataclass(frozen=True, slots=True)
class Describe:
    kind: bytes  # b"S" prepared statement, b"P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int  # 0 (PostgreSQL also treats negatives so) means no limit


@dataclass(frozen=True, slots=True)
class Close:
    kind: bytes  # b"S" prepared statement, b"P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Sync:
    pass


@dataclass(frozen=True, slots=True)
class Flush:
    pass


@dataclass(frozen=True, slots=True)
class Terminate:
    pass


@dataclass(frozen=True, slots=True)
class CopyData:
    data: bytes


@dataclass(frozen=True, slots=True)
class CopyDone:
    pass


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    function_oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int


@dataclass(frozen=True, slots=True)
class AuthenticationResponse:
    """A 'p' message not yet interpreted: PasswordMessage, SASL(Initial)Response or GSSResponse."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None  # None: the client sent no initial response (length -1)


FrontendMessage = (
    Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | Terminate
    | CopyData | CopyDone | CopyFail | FunctionCall | AuthenticationResponse
)  # fmt: skip

_SYNC, _FLUSH, _TERMINATE, _COPY_DONE = Sync(), Flush(), Terminate(), CopyDone()

# ---------------------------------------------------------------------------------------------
# Encoders (55.7). Constant messages are built once.

SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"
COPY_DONE = b"c\x00\x00\x00\x04"


def query(sql: str) -> bytes:
    return frame(b"Q", cstr(sql))


def parse(name: str, sql: str, param_oids: Sequence[int] = ()) -> bytes:
    return frame(b"P", cstr(name) + cstr(sql) + oid_array16(param_oids))


def bind(
    portal: str,
    statement: str,
    param_formats: Sequence[int] = (),
    params: Sequence[bytes | None] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    return frame(
        b"B",
        cstr(portal) + cstr(statement) + int16_array(param_formats)
        + UINT16.pack(len(params)) + nullable_values(params) + int16_array(result_formats),
    )  # fmt: skip


def describe(kind: bytes, name: str = "") -> bytes:
    return frame(b"D", _kind(kind) + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(b"E", cstr(portal) + INT32.pack(max_rows))


def close(kind: bytes, name: str = "") -> bytes:
    return frame(b"C", _kind(kind) + cstr(name))


def sync() -> bytes:
    return SYNC


def flush() -> bytes:
    return FLUSH


def terminate() -> bytes:
    return TERMINATE


def copy_data(data: bytes) -> bytes:
    return frame(b"d", data)


def copy_done() -> bytes:
    return COPY_DONE


def copy_fail(message: str) -> bytes:
    return frame(b"f", cstr(message))


def function_call(
    function_oid: int, arg_formats: Sequence[int], args: Sequence[bytes | None], result_format: int = 0
) -> bytes:
    return frame(
        b"F",
        UINT32.pack(function_oid) + int16_array(arg_formats) + UINT16.pack(len(args))
        + nullable_values(args) + INT16.pack(result_format),
    )  # fmt: skip


def password(pw: str) -> bytes:
    """PasswordMessage: cleartext, or "md5" + hex digest for md5 authentication."""
    return frame(b"p", cstr(pw))


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    """The client-first message of SCRAM (55.3 SASL Authentication); None sends length -1."""
    tail = b"\xff\xff\xff\xff" if data is None else INT32.pack(len(data)) + data
    return frame(b"p", cstr(mechanism) + tail)


def sasl_response(data: bytes) -> bytes:
    return frame(b"p", data)


def gss_response(data: bytes) -> bytes:
    return frame(b"p", data)


def _kind(kind: bytes) -> bytes:
    if kind != b"S" and kind != b"P":
        raise ValueError(f"Describe/Close kind must be b'S' or b'P', not {kind!r}")
    return kind


# ---------------------------------------------------------------------------------------------
# Decoders. Each takes a body and checks it as PostgreSQL's postgres.c does, ending with the
# equivalent of pq_getmsgend(): trailing bytes are an error.


def decode_query(body: Body) -> str:
    r = BodyReader(body, "Query")
    sql = r.cstring()
    r.finish()
    return sql


def decode_parse(body: Body) -> Parse:
    r = BodyReader(body, "Parse")
    name = r.cstring()
    sql = r.cstring()
    oids = tuple(r.uint32() for _ in range(r.count(4)))
    r.finish()
    return Parse(name, sql, oids)


def decode_bind(body: Body) -> Bind:
    r = BodyReader(body, "Bind")
    portal = r.cstring()
    statement = r.cstring()
    formats = tuple(r.int16() for _ in range(r.count(2)))
    params = tuple(r.nullable_bytes() for _ in range(r.count(4)))
    results = tuple(r.int16() for _ in range(r.count(2)))
    r.finish()
    _check_format_count("Bind", "parameter", len(formats), len(params))
    return Bind(portal, statement, formats, params, results)


def decode_describe(body: Body) -> Describe:
    r = BodyReader(body, "Describe")
    kind = _decode_kind(r, "DESCRIBE")
    message = Describe(kind, r.cstring())
    r.finish()
    return message


def decode_execute(body: Body) -> Execute:
    r = BodyReader(body, "Execute")
    message = Execute(r.cstring(), r.int32())
    r.finish()
    return message


def decode_close(body: Body) -> Close:
    r = BodyReader(body, "Close")
    kind = _decode_kind(r, "CLOSE")
    message = Close(kind, r.cstring())
    r.finish()
    return message


def decode_copy_fail(body: Body) -> str:
    r = BodyReader(body, "CopyFail")
    message = r.cstring()
    r.finish()
    return message


def decode_function_call(body: Body) -> FunctionCall:
    r = BodyReader(body, "FunctionCall")
    oid = r.uint32()
    formats = tuple(r.int16() for _ in range(r.count(2)))
    args = tuple(r.nullable_bytes() for _ in range(r.count(4)))
    result_format = r.int16()
    r.finish()
    _check_format_count("FunctionCall", "argument", len(formats), len(args))
    return FunctionCall(oid, formats, args, result_format)


def decode_password(body: Body) -> str:
    """A PasswordMessage's password (cleartext, or "md5" + 32 hex digits)."""
    r = BodyReader(body, "PasswordMessage")
    pw = r.cstring()
    r.finish()
    return pw


def decode_sasl_initial_response(body: Body) -> SASLInitialResponse:
    r = BodyReader(body, "SASLInitialResponse")
    mechanism = r.cstring()
    data = r.nullable_bytes()
    r.finish()
    return SASLInitialResponse(mechanism, data)


def decode_sasl_response(body: Body) -> bytes:
    """SASLResponse (and GSSResponse) carry the mechanism's data and nothing else."""
    return bytes(body)


def _decode_kind(r: BodyReader, command: str) -> bytes:
    kind = r.byte()
    if kind != 0x53 and kind != 0x50:  # 'S', 'P'
        raise ProtocolError(f"invalid {command} message subtype {kind}")
    return b"S" if kind == 0x53 else b"P"


def _check_format_count(what: str, item: str, n_formats: int, n_items: int) -> None:
    # 55.7 Bind: the format code count "can be zero ...; or one ...; or it can equal the actual
    # number of parameters."
    if n_formats > 1 and n_formats != n_items:
        raise ProtocolError(f"{what} message has {n_formats} {item} formats but {n_items} {item}s")


def _empty(message: FrontendMessage, what: str) -> Callable[[Body], FrontendMessage]:
    def decode(body: Body) -> FrontendMessage:
        require_empty(body, what)
        return message

    return decode


_DECODERS: dict[int, Callable[[Body], FrontendMessage]] = {
    ord("Q"): lambda body: Query(decode_query(body)),
    ord("P"): decode_parse,
    ord("B"): decode_bind,
    ord("D"): decode_describe,
    ord("E"): decode_execute,
    ord("C"): decode_close,
    ord("S"): _empty(_SYNC, "Sync"),
    ord("H"): _empty(_FLUSH, "Flush"),
    ord("X"): _empty(_TERMINATE, "Terminate"),
    ord("d"): lambda body: CopyData(bytes(body)),
    ord("c"): _empty(_COPY_DONE, "CopyDone"),
    ord("f"): lambda body: CopyFail(decode_copy_fail(body)),
    ord("F"): decode_function_call,
    ord("p"): lambda body: AuthenticationResponse(bytes(body)),
}


def decode_frontend(msg_type: int, body: Body) -> FrontendMessage:
    """Decode any typed frontend message; an unknown type byte is a protocol violation."""
    decoder = _DECODERS.get(msg_type)
    if decoder is None:
        raise ProtocolError(f"invalid frontend message type {msg_type}")
    return decoder(body)
