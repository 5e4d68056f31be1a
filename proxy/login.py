"""Client authentication: pgshard as the server side of SCRAM-SHA-256, md5 and trust (protocol 55.2.1).

Runs once per connection, off the hot path, as a coroutine over the session's message reader.
A wrong password is answered like PostgreSQL does (28P01) and closes only that client.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from proxy.config import User
from proxy.protocol import backend, frontend
from proxy.protocol.auth import AuthError, ScramServer, md5_verify, server_secret

ReadMessage = Callable[[], Awaitable[tuple[int, bytes]]]
Write = Callable[[bytes], None]

_PASSWORD_MESSAGE = 0x70  # 'p': PasswordMessage, SASLInitialResponse and SASLResponse alike


class LoginFailed(Exception):
    """Authentication failed or was abandoned: the session sends a FATAL with these fields and closes."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


def _failed(user_name: str) -> LoginFailed:
    return LoginFailed("28P01", f'password authentication failed for user "{user_name}"')


async def _expect_password_message(read: ReadMessage, user_name: str) -> bytes:
    msg_type, body = await read()
    if msg_type != _PASSWORD_MESSAGE:
        raise LoginFailed("08P01", f"expected a password response, got message type {chr(msg_type)!r}")
    return body


async def authenticate(user: User | None, user_name: str, read: ReadMessage, write: Write) -> None:
    """Run the exchange the user's `auth` method asks for; raises LoginFailed if it does not succeed."""
    if user is None:
        # No such user: say no in the words PostgreSQL uses, without revealing which part was wrong.
        raise _failed(user_name)
    method = user.auth
    if method == "trust":
        return
    if method == "md5":
        salt = secrets.token_bytes(4)
        write(backend.authentication_md5(salt))
        body = await _expect_password_message(read, user_name)
        response = body.rstrip(b"\x00").decode("utf-8", "replace")
        if not md5_verify(user.name, user.password or "", salt, response):
            raise _failed(user_name)
        return
    # SCRAM-SHA-256, what libpq and every modern driver use by default.
    write(backend.authentication_sasl(["SCRAM-SHA-256"]))
    body = await _expect_password_message(read, user_name)
    try:
        initial = frontend.decode_sasl_initial_response(body)
        if initial.mechanism != "SCRAM-SHA-256":
            raise LoginFailed("28000", f"SASL mechanism {initial.mechanism!r} is not supported")
        server = ScramServer(server_secret(user.name, user.password or ""))
        write(backend.authentication_sasl_continue(server.server_first(initial.data or b"")))
        final = await _expect_password_message(read, user_name)
        write(backend.authentication_sasl_final(server.server_final(final)))
    except AuthError as exc:
        raise _failed(user_name) from exc
