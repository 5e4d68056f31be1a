"""Named prepared statements across pooled server connections (PgBouncer 1.21's max_prepared_statements).

A client's statement name means nothing on the next server connection it gets. Each client keeps its
names; the server-side name is derived from the statement's content (query text and parameter
types), so every client preparing the same SQL shares one prepared statement per server connection.
The functions here rewrite Parse/Bind/Describe/Close bodies; they are pure, over bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from parser.session_statements import SessionEffect

_I32 = 4


@dataclass(frozen=True, slots=True)
class PreparedStatement:
    """A client's statement: the server-side name and the Parse message that creates it there."""

    server_name: bytes
    parse_message: bytes
    query: bytes
    effects: tuple[SessionEffect, ...] = ()  # on session state, applied each time it is bound


def _frame(msg_type: bytes, body: bytes) -> bytes:
    return msg_type + (len(body) + _I32).to_bytes(4, "big") + body


def prepared_from_parse(body: bytes) -> tuple[bytes, PreparedStatement]:
    """(client name, statement) from a Parse body: name\\0 query\\0 int16 n, n x int32 oid."""
    name_end = body.index(b"\x00")
    rest = body[name_end + 1 :]
    server_name = b"pgs_" + hashlib.blake2b(rest, digest_size=10).hexdigest().encode()
    query = rest[: rest.index(b"\x00")]
    return body[:name_end], PreparedStatement(server_name, _frame(b"P", server_name + b"\x00" + rest), query)


def rename_bind(body: bytes, server_name: bytes) -> bytes:
    """A Bind message (framed) naming `server_name` instead of the client's statement."""
    portal_end = body.index(b"\x00")
    stmt_end = body.index(b"\x00", portal_end + 1)
    return _frame(b"B", body[: portal_end + 1] + server_name + body[stmt_end:])


def bind_statement_name(body: bytes | bytearray) -> bytes:
    portal_end = body.index(b"\x00")
    return bytes(body[portal_end + 1 : body.index(b"\x00", portal_end + 1)])


def describe_statement(server_name: bytes) -> bytes:
    return _frame(b"D", b"S" + server_name + b"\x00")


def close_statement(server_name: bytes) -> bytes:
    return _frame(b"C", b"S" + server_name + b"\x00")


# Closing a statement that does not exist is not an error (protocol 55.7, Close): a client's Close
# becomes a Close of this name, so the client still gets its CloseComplete in order.
CLOSE_NOTHING = close_statement(b"pgshard_nothing")
