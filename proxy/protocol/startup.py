"""Start-up packets: the untyped messages a client sends before (or instead of) a session.

StartupMessage, SSLRequest, GSSENCRequest and CancelRequest have no type byte: an Int32 length
(counting itself) and an Int32 code say what they are (PostgreSQL protocol section 55.7 "Message
Formats"; 55.2.1 "Start-up" for the flow). `framing.startup_packet_length` finds where one ends;
`decode_startup` takes the whole packet. The "options" parameter gets its own small parser because
the session must track the settings it carries like any SET.

frontend.py re-exports everything here, so callers need only `proxy.protocol.frontend`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.protocol._reader import Body, BodyReader
from proxy.protocol._writer import INT32, UINT32, cstr
from proxy.protocol.errors import ProtocolError

# 55.7 StartupMessage / CancelRequest / SSLRequest / GSSENCRequest: the Int32 after the length.
PROTOCOL_3_0 = 196608  # major 3 in the high 16 bits, minor 0 in the low 16 bits
CANCEL_REQUEST_CODE = 80877102  # 1234 << 16 | 5678
SSL_REQUEST_CODE = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 80877104  # 1234 << 16 | 5680

FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
SYNTAX_ERROR = "42601"


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a session. `params` keeps the client's order; a repeated name's last value wins.

    Besides user, database, options and replication, names starting "_pq_." are protocol options
    (55.2.1) and any other name is a run-time parameter to set for the session.
    """

    protocol: int
    params: dict[str, str]

    @property
    def user(self) -> str:
        return self.params["user"]  # decode_startup refuses a packet without it

    @property
    def database(self) -> str:
        """55.7 StartupMessage: "database ... Defaults to the user name"."""
        return self.params.get("database") or self.params["user"]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """Asks for TLS; the server answers a single byte 'S' or 'N', not a message."""


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """Asks for GSSAPI encryption; answered by a single byte 'G' or 'N'."""


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Sent on a new connection to cancel the query of the session that BackendKeyData named."""

    pid: int
    secret: int


SSL_REQUEST_MESSAGE = SSLRequest()
GSSENC_REQUEST_MESSAGE = GSSENCRequest()

SSL_REQUEST = INT32.pack(8) + UINT32.pack(SSL_REQUEST_CODE)
GSSENC_REQUEST = INT32.pack(8) + UINT32.pack(GSSENC_REQUEST_CODE)


def startup(params: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    """The StartupMessage a server connection opens with (55.7: name/value Strings, then a NUL)."""
    body = b"".join(cstr(k) + cstr(v) for k, v in params.items())
    return INT32.pack(len(body) + 9) + UINT32.pack(protocol) + body + b"\x00"


def ssl_request() -> bytes:
    return SSL_REQUEST


def gssenc_request() -> bytes:
    return GSSENC_REQUEST


def cancel_request(pid: int, secret: int) -> bytes:
    """Always 16 bytes in protocol 3.0 (55.7 CancelRequest)."""
    return INT32.pack(16) + UINT32.pack(CANCEL_REQUEST_CODE) + UINT32.pack(pid) + UINT32.pack(secret)


def decode_startup(packet: Body) -> StartupMessage | SSLRequest | GSSENCRequest | CancelRequest:
    """Decode a whole start-up packet (length word included), refusing what PostgreSQL refuses."""
    r = BodyReader(packet, "startup packet")
    length = r.int32()
    if length != len(packet) or length < 8:
        raise ProtocolError(f"invalid length of startup packet: {length} (packet has {len(packet)} bytes)")
    code = r.uint32()
    if code == SSL_REQUEST_CODE:
        r.finish()
        return SSL_REQUEST_MESSAGE
    if code == GSSENC_REQUEST_CODE:
        r.finish()
        return GSSENC_REQUEST_MESSAGE
    if code == CANCEL_REQUEST_CODE:
        message = CancelRequest(r.uint32(), r.uint32())
        r.finish()
        return message
    # 55.2.1: the server rejects a major version it does not support; a newer minor is negotiated
    # down with NegotiateProtocolVersion, which is the session's business.
    if code >> 16 != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0 to 3.0",
            FEATURE_NOT_SUPPORTED,
        )
    params: dict[str, str] = {}
    while True:
        name = r.cstring()
        if not name:
            break
        params[name] = r.cstring()
    r.finish()  # "invalid startup packet layout: expected terminator as last byte"
    if not params.get("user"):
        # 55.7 StartupMessage, user: "Required; there is no default."
        raise ProtocolError(
            "no PostgreSQL user name specified in startup packet", INVALID_AUTHORIZATION_SPECIFICATION
        )
    return StartupMessage(code, params)


def split_options(options: str) -> list[str]:
    """Split the startup "options" parameter as PostgreSQL's pg_split_opts() does.

    55.7 StartupMessage: "Spaces within this string are considered to separate arguments, unless
    escaped with a backslash (\\); write \\\\ to represent a literal backslash."
    """
    args: list[str] = []
    current: list[str] = []
    escaped = in_arg = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch in _C_SPACE:
            if in_arg:
                args.append("".join(current))
                current.clear()
                in_arg = False
            continue
        elif ch == "\\":
            escaped = True
        else:
            current.append(ch)
        in_arg = True
    if in_arg:
        args.append("".join(current))
    return args


def options_settings(options: str) -> dict[str, str]:
    """The run-time parameters that an "options" string sets ("-c name=value", "--name=value").

    The session must track these like any SET to replay them on pooled server connections. Other
    postgres command-line switches are refused rather than silently dropped.
    """
    settings: dict[str, str] = {}
    args = split_options(options)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-c" and i + 1 < len(args):
            i += 1
            setting = args[i]
        elif arg.startswith("--") or (arg.startswith("-c") and len(arg) > 2):
            setting = arg[2:]
        else:
            raise ProtocolError(
                f"unsupported command-line argument in startup options: {arg!r}", FEATURE_NOT_SUPPORTED
            )
        name, eq, value = setting.partition("=")
        if not eq or not name:
            raise ProtocolError(f"option {setting!r} requires a value", SYNTAX_ERROR)
        settings[name.replace("-", "_")] = value  # as PostgreSQL's ParseLongOption()
        i += 1
    return settings


_C_SPACE = frozenset(string.whitespace)  # C isspace(): space \t \n \v \f \r

__all__ = [
    "CANCEL_REQUEST_CODE",
    "FEATURE_NOT_SUPPORTED",
    "GSSENC_REQUEST",
    "GSSENC_REQUEST_CODE",
    "GSSENC_REQUEST_MESSAGE",
    "INVALID_AUTHORIZATION_SPECIFICATION",
    "PROTOCOL_3_0",
    "SSL_REQUEST",
    "SSL_REQUEST_CODE",
    "SSL_REQUEST_MESSAGE",
    "SYNTAX_ERROR",
    "CancelRequest",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "cancel_request",
    "decode_startup",
    "gssenc_request",
    "options_settings",
    "split_options",
    "ssl_request",
    "startup",
]
