"""Run one batch of client messages on several shards and combine the replies into one.

The single-shard path never comes here: its bytes pass through. A statement that needs several
shards (a write without its key, DDL, a multi-row INSERT split by shard, a read of every shard) is
sent to each server connection, every reply is read whole, and the client gets what one server
holding all the rows would have said: one RowDescription, the rows of all shards, one
CommandComplete whose count is the sum, one ReadyForQuery. The first error wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pooler.server_connection import ServerConnection, ServerError
from proxy.protocol import backend

_Z, _E, _C, _D, _T, _N, _S, _A = (ord(c) for c in "ZECDTNSA")

# Commands whose tag ends in a row count (protocol 55.7, CommandComplete).
_COUNTED = frozenset((b"INSERT", b"UPDATE", b"DELETE", b"SELECT", b"MERGE", b"MOVE", b"FETCH", b"COPY"))


@dataclass(slots=True)
class ShardReply:
    """Everything one server said in answer to one batch, up to its last ReadyForQuery."""

    shard: int
    messages: list[tuple[int, bytes]] = field(default_factory=list)  # (type, whole message)
    error: dict[str, str] | None = None
    error_message: bytes = b""
    status: int = 0x49


def frame(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + (len(body) + 4).to_bytes(4, "big") + body


async def read_reply(server: ServerConnection, shard: int, syncs: int) -> ShardReply:
    """Collect a server's messages until `syncs` ReadyForQuery messages have arrived."""
    reply = ShardReply(shard)
    while syncs:
        msg_type, body = await server.read_message()
        if msg_type == _Z:
            syncs -= 1
            reply.status = body[0]
            continue
        if msg_type == _E and reply.error is None:
            reply.error = backend.decode_error_fields(body)
            reply.error_message = frame(msg_type, body)
            continue
        reply.messages.append((msg_type, frame(msg_type, body)))
    return reply


class QueryTimeout(ServerError):
    """A multi-shard statement ran past `query_timeout`: it fails, the client's session goes on."""


def query_timeout_error(timeout: float | None, waiting: Iterable[int]) -> QueryTimeout:
    """57014 naming the shards that had not answered when `query_timeout` ran out (issue 4)."""
    shards = sorted(set(waiting))
    if not shards:
        return QueryTimeout("57014", f"query_timeout: the query did not finish within {timeout or 0:g}s")
    which = f"shard {shards[0]}" if len(shards) == 1 else "shards " + ", ".join(map(str, shards))
    return QueryTimeout("57014", f"query_timeout: no complete answer from {which} within {timeout or 0:g}s")


async def scatter(
    servers: Sequence[tuple[int, ServerConnection]],
    payloads: Sequence[bytes],
    syncs: int,
    timeout: float | None,
) -> list[ShardReply]:
    """Send each server its payload at once, then gather every reply (concurrently, in shard order)."""
    for (_, server), payload in zip(servers, payloads, strict=True):
        server.write(payload)
    waiting = {shard for shard, _ in servers}

    async def read(server: ServerConnection, shard: int) -> ShardReply:
        reply = await read_reply(server, shard, syncs)
        waiting.discard(shard)
        return reply

    gathered = asyncio.gather(*(read(server, shard) for shard, server in servers))
    try:
        if timeout:
            return list(await asyncio.wait_for(gathered, timeout))
        return list(await gathered)
    except TimeoutError:
        raise query_timeout_error(timeout, waiting) from None


def _tag_parts(message: bytes) -> tuple[bytes, int | None, bytes]:
    """(command, count, prefix) of a CommandComplete: b'INSERT 0 5' -> (b'INSERT', 5, b'INSERT 0 ')."""
    tag = message[5:-1]
    head, _, last = tag.rpartition(b" ")
    command = tag.split(b" ", 1)[0]
    if command in _COUNTED and last.isdigit():
        return command, int(last), head + b" "
    return command, None, tag


def merge_replies(replies: Sequence[ShardReply], same: bool = False) -> tuple[bytes, dict[str, str] | None]:
    """One reply as a single server holding all rows would give it (without ReadyForQuery).

    The first shard's messages are the template: its DataRows are joined by every other shard's
    rows for the same statement, its CommandComplete counts become sums, its notices are kept
    once. Returns (bytes for the client, error fields or None); on error only the error is sent.
    """
    for reply in replies:
        if reply.error is not None:
            return reply.error_message, reply.error
    if same:
        # Every shard did the same thing to its own copy (DDL, omnisharded writes): one answer.
        return b"".join(message for _, message in replies[0].messages), None
    # Per shard, split the messages into statement results at each CommandComplete.
    sections: list[list[list[tuple[int, bytes]]]] = []
    for reply in replies:
        shard_sections: list[list[tuple[int, bytes]]] = [[]]
        for item in reply.messages:
            shard_sections[-1].append(item)
            if item[0] == _C or item[0] == ord("I"):  # CommandComplete or EmptyQueryResponse
                shard_sections.append([])
        sections.append(shard_sections)
    out: list[bytes] = []
    seen_notices: set[bytes] = set()
    template = sections[0]
    for index, section in enumerate(template):
        others = [s[index] if index < len(s) else [] for s in sections[1:]]
        counts = 0
        for msg_type, message in section:
            if msg_type == _C:
                _command, count, prefix = _tag_parts(message)
                if count is None:
                    out.append(message)
                    continue
                counts = count
                for other in others:
                    for other_type, other_message in other:
                        if other_type == _D:
                            out.append(other_message)
                        elif other_type == _C:
                            counts += _tag_parts(other_message)[1] or 0
                tag = prefix + str(counts).encode()
                out.append(frame(_C, tag + b"\x00"))
            elif msg_type == _N:
                if message not in seen_notices:
                    seen_notices.add(message)
                    out.append(message)
            else:
                out.append(message)
        for other in others:  # notices and async messages of other shards, once each
            for other_type, other_message in other:
                if other_type in (_N, _S, _A) and other_message not in seen_notices:
                    seen_notices.add(other_message)
                    if other_type == _N:
                        out.append(other_message)
    return b"".join(out), None
