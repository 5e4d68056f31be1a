"""A raw-protocol connection to one PostgreSQL server: start-up, authentication, then a byte pipe.

Replies are forwarded without decoding (design principle 1), so this is an asyncio.Protocol that
hands each chunk of bytes straight to whichever client session is linked to it. Before and between
links it runs small exchanges of its own (login, ROLLBACK, DISCARD ALL) through `run_simple`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pooler.pool import Pool

from pooler.errors import ServerError
from proxy.protocol import backend, frontend
from proxy.protocol.auth import AuthError, ScramClient, md5_password
from proxy.protocol.errors import ProtocolError
from proxy.protocol.framing import DEFAULT_MAX_MESSAGE_LENGTH, message_length


@dataclass(frozen=True, slots=True)
class ServerTarget:
    """Where a pool's connections go and who they log in as."""

    host: str
    port: int
    user: str
    password: str | None
    dbname: str

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"


class ServerSink(Protocol):
    """The client session linked to a server connection: it receives the server's bytes as they come."""

    def server_data(self, server: ServerConnection, data: bytes) -> None: ...

    def server_lost(self, server: ServerConnection) -> None: ...


class ServerConnection(asyncio.Protocol):
    """One PostgreSQL backend. Linked to a session it is a pipe; unlinked it answers our own requests."""

    pool: Pool  # set by the pool that opened it; a connection opened on its own has none

    def __init__(self, target: ServerTarget) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.sink: ServerSink | None = None
        self.backend_pid = 0
        self.backend_secret = 0
        self.parameters: dict[str, str] = {}
        # Named statements prepared on this backend (server-side names), least recently used first.
        self.prepared: OrderedDict[bytes, None] = OrderedDict()
        # The tracked session state (SET statements by parameter) this backend currently carries.
        self.session_state: dict[str, str] = {}
        self.created_at = time.monotonic()
        self.last_used = self.created_at
        self.closed = False
        self.broken = False
        self._inbox = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        if not self._connected.done():
            self._connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.server_data(self, data)
            return
        self._inbox += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.server_lost(self)

    def pause_writing(self) -> None:  # the server is slow to read: stop reading from its client
        sink = self.sink
        if sink is not None and hasattr(sink, "pause_client"):
            sink.pause_client()

    def resume_writing(self) -> None:
        sink = self.sink
        if sink is not None and hasattr(sink, "resume_client"):
            sink.resume_client()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # IO helpers for unlinked exchanges --------------------------------------------------------
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def read_message(self) -> tuple[int, bytes]:
        """The next whole message from the server while no session is linked."""
        while True:
            size = message_length(self._inbox, 0, DEFAULT_MAX_MESSAGE_LENGTH) if self._inbox else 0
            if size and len(self._inbox) >= size:
                msg_type = self._inbox[0]
                body = bytes(self._inbox[5:size])
                del self._inbox[:size]
                return msg_type, body
            if self.closed:
                raise ServerError("08006", f"server {self.target.label} closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take_inbox(self) -> bytes:
        """Bytes that arrived unlinked and unread (asynchronous notices); handed to the next session."""
        if not self._inbox:
            return b""
        data = bytes(self._inbox)
        self._inbox.clear()
        return data

    async def run_simple(self, sql: str) -> bytes:
        """Run a simple Query of our own to its ReadyForQuery; returns the transaction status byte.

        Raises ServerError with the server's fields if the statement failed.
        """
        self.write(frontend.query(sql))
        error: ServerError | None = None
        while True:
            msg_type, body = await self.read_message()
            if msg_type == 0x45:  # 'E'
                fields = backend.decode_error_fields(body)
                error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
            elif msg_type == 0x5A:  # 'Z'
                if error is not None:
                    raise error
                return body[:1]

    # login --------------------------------------------------------------------------------------
    async def login(self, application_name: str) -> None:
        """Start-up and authentication (protocol 55.2.1): SCRAM-SHA-256, md5, cleartext or trust."""
        await self._connected
        t = self.target
        self.write(
            frontend.startup({"user": t.user, "database": t.dbname, "application_name": application_name})
        )
        scram: ScramClient | None = None
        while True:
            msg_type, body = await self.read_message()
            if msg_type == 0x52:  # 'R' authentication request
                code = int.from_bytes(body[0:4], "big")
                if code == 0:
                    continue
                if code == 3:
                    self.write(frontend.password(self._password()))
                elif code == 5:
                    self.write(frontend.password(md5_password(t.user, self._password(), body[4:8])))
                elif code == 10:
                    mechanisms = body[4:].split(b"\x00")
                    if b"SCRAM-SHA-256" not in mechanisms:
                        raise ServerError("08006", f"server {t.label} offers no SASL mechanism we support")
                    scram = ScramClient(self._password())
                    self.write(frontend.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif code == 11 and scram is not None:
                    self.write(frontend.sasl_response(scram.client_final(body[4:])))
                elif code == 12 and scram is not None:
                    try:
                        scram.verify_server_final(body[4:])
                    except AuthError as exc:
                        raise ServerError(
                            "08006", f"server {t.label} failed SCRAM verification: {exc}"
                        ) from exc
                else:
                    raise ServerError("08006", f"server {t.label} asks for unsupported authentication {code}")
            elif msg_type == 0x53:  # 'S' ParameterStatus
                name, _, value = body.rstrip(b"\x00").partition(b"\x00")
                self.parameters[name.decode()] = value.decode()
            elif msg_type == 0x4B:  # 'K' BackendKeyData
                self.backend_pid = int.from_bytes(body[0:4], "big")
                self.backend_secret = int.from_bytes(body[4:8], "big")
            elif msg_type == 0x45:  # 'E'
                fields = backend.decode_error_fields(body)
                raise ServerError(fields.get("C", "08006"), fields.get("M", "server login failed"), fields)
            elif msg_type == 0x5A:  # 'Z'
                return
            # NoticeResponse, NegotiateProtocolVersion: nothing to do

    def _password(self) -> str:
        if self.target.password is None:
            raise ServerError("08006", f"server {self.target.label} wants a password and none is configured")
        return self.target.password

    def close(self) -> None:
        """Terminate politely; the server rolls back whatever was open."""
        if self.transport is not None and not self.closed:
            self.closed = True
            try:
                self.transport.write(frontend.TERMINATE)
            finally:
                self.transport.close()

    async def cancel_running_query(self) -> None:
        """Send a CancelRequest for this backend on a connection of its own (protocol 55.2.7)."""
        await send_cancel(self.target, self.backend_pid, self.backend_secret)


async def send_cancel(target: ServerTarget, pid: int, secret: int, timeout: float = 5.0) -> None:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), timeout)
    except (TimeoutError, OSError):
        return
    writer.write(frontend.cancel_request(pid, secret))
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.drain(), timeout)
    writer.close()


async def open_server_connection(
    target: ServerTarget, connect_timeout: float, application_name: str = "pgshard"
) -> ServerConnection:
    """Connect and log in, within `connect_timeout`; raises ServerError naming the server on failure."""
    loop = asyncio.get_running_loop()
    conn: ServerConnection | None = None

    async def _open() -> ServerConnection:
        nonlocal conn
        _, proto = await loop.create_connection(lambda: ServerConnection(target), target.host, target.port)
        conn = proto
        await proto.login(application_name)
        return proto

    try:
        return await asyncio.wait_for(_open(), connect_timeout)
    except TimeoutError:
        if conn is not None:
            conn.close()
        raise ServerError("08006", f"timeout connecting to server {target.label}") from None
    except OSError as exc:
        raise ServerError(
            "08006", f"could not connect to server {target.label}: {exc.strerror or exc}"
        ) from exc
    except (ProtocolError, AuthError) as exc:
        if conn is not None:
            conn.close()
        raise ServerError("08006", f"server {target.label}: {exc}") from exc
    except ServerError:
        if conn is not None:
            conn.close()
        raise
