"""A minimal PostgreSQL client over a raw socket, for sending what no driver would send.

It speaks just enough protocol 3.0 to log in (trust, md5, SCRAM-SHA-256 through pgshard's own
sans-IO codec) and then reads and writes whole messages, so tests can send malformed bytes and
watch exactly what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib

from proxy.protocol import backend, frontend
from proxy.protocol.auth import ScramClient, md5_password
from proxy.protocol.startup import cancel_request, startup

ERROR, READY, AUTH, KEY_DATA = b"E"[0], b"Z"[0], b"R"[0], b"K"[0]


class LoginError(Exception):
    """The server answered the start-up with an ErrorResponse."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.fields = fields
        self.sqlstate = fields.get("C", "")


class RawClient:
    """One connection; `messages` are (type byte, body) pairs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pid = 0
        self.secret = 0
        self.parameters: dict[str, str] = {}

    @classmethod
    async def open(cls, host: str, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @classmethod
    async def login(
        cls,
        host: str,
        port: int,
        user: str,
        password: str | None,
        database: str,
        params: dict[str, str] | None = None,
    ) -> RawClient:
        """Connect and authenticate; raises LoginError with the server's fields when refused."""
        client = await cls.open(host, port)
        try:
            await client.startup(user, password, database, params)
        except BaseException:
            client.close()
            raise
        return client

    async def startup(
        self, user: str, password: str | None, database: str, params: dict[str, str] | None = None
    ) -> None:
        self.send(startup({"user": user, "database": database, **(params or {})}))
        scram: ScramClient | None = None
        while True:
            msg_type, body = await self.read_message()
            if msg_type == AUTH:
                code = int.from_bytes(body[:4], "big")
                if code == 0:
                    continue
                if code == 5:
                    self.send(frontend.password(md5_password(user, password or "", body[4:8])))
                elif code == 3:
                    self.send(frontend.password(password or ""))
                elif code == 10:
                    scram = ScramClient(password or "")
                    self.send(frontend.sasl_initial_response("SCRAM-SHA-256", scram.client_first()))
                elif code == 11 and scram is not None:
                    self.send(frontend.sasl_response(scram.client_final(body[4:])))
                elif code == 12 and scram is not None:
                    scram.verify_server_final(body[4:])
                else:
                    raise AssertionError(f"unexpected authentication request {code}")
            elif msg_type == KEY_DATA:
                self.pid = int.from_bytes(body[:4], "big")
                self.secret = int.from_bytes(body[4:8], "big")
            elif msg_type == b"S"[0]:
                name, _, value = body.rstrip(b"\x00").partition(b"\x00")
                self.parameters[name.decode()] = value.decode()
            elif msg_type == ERROR:
                raise LoginError(backend.decode_error_fields(body))
            elif msg_type == READY:
                return

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_message(self) -> tuple[int, bytes]:
        header = await self.reader.readexactly(5)
        length = int.from_bytes(header[1:5], "big")
        body = await self.reader.readexactly(length - 4)
        return header[0], body

    async def read_until_ready(self, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """Messages up to and including the next ReadyForQuery."""
        out: list[tuple[int, bytes]] = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.read_message()
                out.append(message)
                if message[0] == READY:
                    return out

    async def read_until_closed(self, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """Every message the peer sends before it closes the connection (EOF or reset)."""
        out: list[tuple[int, bytes]] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    out.append(await self.read_message())
                except (asyncio.IncompleteReadError, ConnectionError):
                    return out

    async def simple_query(self, sql: str, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        self.send(frontend.query(sql))
        return await self.read_until_ready(timeout)

    async def scalar(self, sql: str) -> str | None:
        """The first column of the first row of a simple query; raises on an ErrorResponse."""
        value: str | None = None
        for msg_type, body in await self.simple_query(sql):
            if msg_type == ERROR:
                raise LoginError(backend.decode_error_fields(body))
            if msg_type == b"D"[0] and value is None:
                row = backend.decode_data_row(body)
                value = None if row[0] is None else row[0].decode()
        return value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def terminate(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(frontend.terminate())
            await self.writer.drain()
        self.close()


def errors_in(messages: list[tuple[int, bytes]]) -> list[dict[str, str]]:
    """The decoded fields of every ErrorResponse among `messages`."""
    return [backend.decode_error_fields(body) for msg_type, body in messages if msg_type == ERROR]


async def send_cancel_request(host: str, port: int, pid: int, secret: int) -> bytes:
    """Send a CancelRequest on its own connection; returns whatever came back before the close."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(cancel_request(pid, secret))
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
