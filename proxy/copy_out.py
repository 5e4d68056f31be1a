"""`COPY table TO STDOUT` and `COPY (SELECT ...) TO STDOUT` gathered from several shards.

The shards run the client's statement one after another; the client sees what one server holding
every row would send: one CopyOutResponse, every shard's CopyData as it arrives, one CopyDone and
`COPY n` with the summed count. A HEADER line (text or CSV) comes once, from the first shard; in
the binary format the file header comes once at the start and the -1 trailer once at the end.
Memory stays bounded: a shard's stream pauses when the client reads slowly (`ShardStream`), and
rows are written to the client in batches of about 64 kB.

An error from a shard ends the COPY there with that shard's ErrorResponse (the shards after it do
not run), which clients handle as they handle a server that fails mid-COPY.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pooler.server_connection import ServerConnection
from proxy import multishard
from proxy.protocol import backend
from router.merge import ShardStream
from router.scatter import frame, query_timeout_error

if TYPE_CHECKING:
    from proxy.routed_session import RoutedSession

_BATCH = 64 * 1024
_CLIENT_HIGH_WATER = 1 << 20  # bytes queued to a slow client before the COPY waits
_H, _d, _c, _C, _E, _N, _Z = (ord(c) for c in "HdcCENZ")
_IDLE, _IN_BLOCK, _FAILED = b"I", b"T", b"E"
_BINARY_HEADER = 19  # signature (11), flags (4), header extension length (4)
_TRAILER = b"\xff\xff"


class _ClientGone(Exception):
    pass


class _Out:
    """What goes to the client, written in batches, waiting while the client is slow."""

    def __init__(self, session: RoutedSession) -> None:
        self.session = session
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)

    async def flush(self, force: bool = False) -> None:
        if self.size < _BATCH and not force:
            return
        transport = self.session.transport
        if transport is None or transport.is_closing():
            raise _ClientGone
        transport.write(b"".join(self.parts))
        self.parts, self.size = [], 0
        while transport.get_write_buffer_size() > _CLIENT_HIGH_WATER:
            if transport.is_closing():
                raise _ClientGone
            await asyncio.sleep(0.002)


async def run_copy_out(
    session: RoutedSession, message: bytes, shards: list[int], header: bool, write: bool = False
) -> None:
    """Run the client's COPY ... TO STDOUT (`message`, a simple Query) on `shards`, in shard order."""
    dist = await multishard.open_block_on(session, shards)
    if dist is not None:
        servers = {s: dist.servers[s] for s in shards}
    else:
        servers = await multishard.acquire(session, shards)
    gather = _Gather(session, servers, message, header)
    timeout = session.query_timeout
    try:
        failed = await (asyncio.wait_for(gather.run(), timeout) if timeout else gather.run())
    except BaseException as exc:
        _abandon(session, servers, gather.current)
        if isinstance(exc, _ClientGone):
            return
        if isinstance(exc, TimeoutError):
            raise query_timeout_error(timeout, [] if gather.current is None else [gather.current]) from None
        raise
    if dist is not None:
        dist.failed = failed
        if write:
            dist.wrote.update(servers)
        multishard.reply(session, b"", _FAILED if failed else _IN_BLOCK)
        return
    multishard.release(session, servers)
    multishard.reply(session, b"", _IDLE)


def _abandon(session: RoutedSession, servers: dict[int, ServerConnection], current: int | None) -> None:
    """The COPY stopped mid-stream: the shard that was sending cannot be reused."""
    dist = session.distributed
    if dist is None:
        multishard.release(session, servers, broken=True)
        return
    dist.failed = True
    if current is not None and current in dist.servers:
        server = dist.servers.pop(current)
        server.pool.discard(server)


class _Gather:
    def __init__(
        self, session: RoutedSession, servers: dict[int, ServerConnection], message: bytes, header: bool
    ) -> None:
        self.session, self.servers, self.message, self.header = session, servers, message, header
        self.out = _Out(session)
        self.current: int | None = None  # the shard whose answer is being read
        self.notices: dict[bytes, None] = {}
        self.total = 0
        self.tag = b""  # the CommandComplete of a COPY that did not copy out (a server-side file)
        self.started = False  # the client has its CopyOutResponse
        self.binary = False

    async def run(self) -> bool:
        """Every shard's answer, relayed; True if a shard failed (its error was sent)."""
        last = len(self.servers) - 1
        for index, (shard, server) in enumerate(self.servers.items()):
            self.current = shard
            stream = ShardStream(shard, server)
            try:
                stream.write(self.message)
                error = await self._one(stream, index, index == last)
            finally:
                stream.detach()
            self.current = None
            if error is not None:
                self.out.add(backend.error_response_from_fields(error))
                await self.out.flush(force=True)
                return True
        if self.started:
            self.out.add(backend.COPY_DONE)
            self.out.add(backend.command_complete(f"COPY {self.total}"))
        elif self.tag:
            self.out.add(self.tag)
        await self.out.flush(force=True)
        return False

    async def _one(self, stream: ShardStream, index: int, last: bool) -> dict[str, str] | None:
        """One shard's answer, to its ReadyForQuery; its error fields, if it failed."""
        out = self.out
        error: dict[str, str] | None = None
        skip_header = self.header and index > 0  # text/CSV: the first row is the header line
        head = bytearray() if index > 0 else None  # binary: this shard's file header, to drop
        held: bytes | None = None  # binary: the last chunk, whose trailer only the last shard keeps
        while True:
            msg_type, body = await stream.message()
            if msg_type == _d:
                if self.binary:
                    if head is not None:
                        head += body
                        if len(head) < _BINARY_HEADER:
                            continue
                        size = _BINARY_HEADER + int.from_bytes(head[15:19], "big")
                        if len(head) < size:
                            continue
                        body, head = bytes(head[size:]), None
                    if held:
                        out.add(frame(_d, held))
                    held = body
                elif skip_header:
                    skip_header = False
                else:
                    out.add(frame(_d, body))
                    if out.size >= _BATCH:
                        await out.flush()
            elif msg_type == _c:
                if held is not None and not last and held.endswith(_TRAILER):
                    held = held[:-2]
                if held:
                    out.add(frame(_d, held))
                held = None
            elif msg_type == _H:
                self.binary = body[:1] == b"\x01"
                if not self.started:
                    self.started = True
                    out.add(frame(msg_type, body))
            elif msg_type == _C:
                text = body.rstrip(b"\x00")
                head_word, _, count = text.rpartition(b" ")
                if head_word == b"COPY" and count.isdigit():
                    self.total += int(count)
                self.tag = frame(msg_type, body)
            elif msg_type == _E:
                error = error or backend.decode_error_fields(body)
            elif msg_type == _N:
                if body not in self.notices:
                    self.notices[body] = None
                    out.add(frame(msg_type, body))
            elif msg_type == _Z:
                return error
            if out.size >= _BATCH:
                await out.flush()
