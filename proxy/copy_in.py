"""`COPY ... FROM STDIN` that pgshard runs itself: over several shards, or inside a transaction block
open on several shards (where no server is linked to the client to relay it).

- A sharded table: each row goes to the shard its key names. Text, CSV and binary rows are cut and
  their key read exactly as PostgreSQL reads them (`proxy.copy_split`); a HEADER line goes to every
  shard, so each shard skips (or, with MATCH, checks) its own copy of it. Rows are forwarded in
  batches of whole rows, so memory stays bounded by a batch per shard (and a slow shard's socket
  buffer, which is waited on). A text key sent in a client_encoding other than UTF8 is converted as
  the shards will convert it before it is hashed (`proxy.pg_encoding`).
- An omnisharded table: the client's bytes go to every shard unchanged; one count is reported.
- One shard (inside a multi-shard block): the bytes are relayed unchanged.

Outside a transaction block a COPY over several shards runs in a transaction on each and commits
(two-phase when configured) only if every shard accepted its rows; inside a block it joins the
block. A failure gives the client one ErrorResponse, as one server would, and leaves every shard
connection out of COPY mode (and, outside a block, rolled back). As after PostgreSQL's error, the
client's CopyData up to its CopyDone or CopyFail is then dropped, and its next Query is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pooler.server_connection import ServerConnection, ServerError
from proxy import multishard
from proxy.copy_options import CopyOptions, CopyStatementError, parse_copy
from proxy.copy_split import CopyDataError, Splitter, splitter_for
from proxy.pg_encoding import ClientEncoding
from proxy.protocol import backend, frontend
from router.keys import binary_key
from router.placement import NoShardForKey
from router.scatter import frame

if TYPE_CHECKING:
    from parser.plan import CopyPlan
    from proxy.routed_session import RoutedSession
    from router.topology import TableSharding

_BATCH = 64 * 1024
_SERVER_HIGH_WATER = 1 << 20  # bytes queued to a shard before the COPY waits for it
_G, _E, _C, _Z, _N = (ord(c) for c in "GECZN")
_d, _c, _f, _H, _S = (ord(c) for c in "dcfHS")
_IDLE, _IN_BLOCK, _FAILED = b"I", b"T", b"E"


class CopyAborted(Exception):
    """The COPY failed: the error the client gets (`fields` when a shard sent it)."""

    def __init__(self, sqlstate: str, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.sqlstate, self.message, self.fields = sqlstate, message, fields
        self.client_copying = False  # the client is still sending COPY data: the rest is dropped

    def body(self) -> bytes:
        if self.fields:
            return backend.error_response_from_fields(self.fields)
        return backend.error_response(self.sqlstate, self.message)


def _aborted(error: ServerError) -> CopyAborted:
    return CopyAborted(error.sqlstate, error.message, error.fields or None)


async def _columns(server: ServerConnection, table: str) -> list[str]:
    """The table's column order, from the catalog, when COPY names no columns."""
    server.write(
        frontend.query(
            "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = "
            f"{multishard.quote_literal(table)}::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        )
    )
    return await _first_column(server)


async def _first_column(server: ServerConnection) -> list[str]:
    """The first column of every row answering the query just sent; raises its error."""
    values: list[str] = []
    error: ServerError | None = None
    while True:
        msg_type, body = await server.read_message()
        if msg_type == ord("D"):
            value = backend.decode_data_row(body)[0]
            values.append(bytes(value or b"").decode())
        elif msg_type == _E:
            fields = backend.decode_error_fields(body)
            error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
        elif msg_type == _Z:
            if error is not None:
                raise error
            return values


async def _client_encoding(servers: dict[int, ServerConnection]) -> ClientEncoding:
    """The encoding the shards will read the client's data in: asked of the shards themselves, as it
    follows SET, SET LOCAL, set_config, start-up options and database or role defaults alike."""
    for server in servers.values():
        server.write(frontend.query("SELECT pg_catalog.current_setting('client_encoding')"))
    names: set[str] = set()
    error: ServerError | None = None
    for server in servers.values():  # every answer is read, so that each server is left ready
        try:
            names.update(await _first_column(server))
        except ServerError as exc:
            error = error or exc
    if error is not None:
        raise error
    if len(names) != 1:
        raise CopyAborted(
            "0A000",
            "COPY over several shards with client_encoding differing between them "
            f"({', '.join(sorted(names))}) is not supported",
        )
    return ClientEncoding(names.pop())


async def run_copy_in(session: RoutedSession, message: bytes, plan: CopyPlan, shards: list[int]) -> None:
    """Run the client's COPY FROM (`message`, a simple Query) on `shards` and answer the client."""
    assert session.router is not None and plan.table is not None
    sharding = session.router.topology.sharding(plan.table) if len(shards) > 1 else None
    statement = None
    if sharding is not None:
        try:
            statement = parse_copy(message[5:-1].decode("utf-8", "replace"))
        except CopyStatementError as exc:
            _fail(session, CopyAborted(exc.sqlstate, exc.message))
            return
        if statement.endpoint != "stdin":
            what = "file" if statement.endpoint == "file" else "program"
            _fail(
                session,
                CopyAborted(
                    "0A000",
                    f'COPY FROM a {what} into sharded table "{plan.table}" is not supported: use COPY FROM '
                    "STDIN (psql's \\copy), which pgshard splits by key",
                ),
            )
            return
    dist = await multishard.open_block_on(session, shards)
    if dist is not None:
        servers = {s: dist.servers[s] for s in shards}
    else:
        servers = await multishard.acquire(session, shards)
    atomic = dist is None and len(servers) > 1
    try:
        if atomic:
            await multishard.run_each_or_raise(servers, "BEGIN")
        splitter = None
        if sharding is not None and statement is not None:
            splitter = await _splitter(session, servers, plan, sharding, statement.options)
        count, notices = await _copy(session, servers, message, splitter, sharding)
        if atomic:
            try:
                await multishard.commit(session, servers, None)
            except ServerError as exc:
                multishard.release(session, servers, broken=True)
                _fail(session, _aborted(exc))
                return
    except (CopyAborted, ServerError) as exc:
        # An ErrorResponse leaves every shard at ReadyForQuery; a lost shard (no fields) may not.
        clean = isinstance(exc, CopyAborted) or bool(exc.fields)
        aborted = exc if isinstance(exc, CopyAborted) else _aborted(exc)
        if dist is None:
            if atomic and clean:
                await multishard.rollback_quietly(servers)
            multishard.release(session, servers, broken=not clean)
        _fail(session, aborted)
        if aborted.client_copying:
            with contextlib.suppress(ConnectionResetError):
                await session.skip_copy_data()
        return
    except ConnectionResetError:  # the client went away mid-COPY; its shards were taken out of COPY
        if dist is None:
            multishard.release(session, servers, broken=True)
        return
    except BaseException:
        if dist is None:
            multishard.release(session, servers, broken=True)
        raise
    tag = notices + backend.command_complete(f"COPY {count}")
    if dist is not None:
        dist.wrote.update(servers)
        multishard.reply(session, tag, _IN_BLOCK)
        return
    multishard.release(session, servers)
    multishard.reply(session, tag, _IDLE)


def _fail(session: RoutedSession, exc: CopyAborted) -> None:
    """The error, failing the client's transaction block (held or open on shards) if there is one."""
    dist = session.distributed
    if dist is not None:
        dist.failed = True
    elif session.held:
        session.held_failed = True
    multishard.reply(session, exc.body(), _FAILED if dist is not None or session.held else _IDLE)


async def _splitter(
    session: RoutedSession,
    servers: dict[int, ServerConnection],
    plan: CopyPlan,
    sharding: TableSharding,
    options: CopyOptions,
) -> Splitter:
    assert plan.table is not None
    if plan.columns:
        columns = list(plan.columns)
    else:
        first = servers.get(session.default_shard) or next(iter(servers.values()))
        columns = await _columns(first, plan.table)
    lowered = [c.lower() for c in columns]
    if sharding.column.lower() not in lowered:
        raise CopyAborted(
            "0A000", f'COPY into sharded table "{plan.table}" must include its key "{sharding.column}"'
        )
    to_utf8, ascii_only = None, None
    text_key = sharding.family == "text"
    # The data is in the client's encoding unless ENCODING says; it matters to text keys, and to
    # cutting text and CSV rows when multibyte characters may hide ASCII bytes.
    if options.encoding is None and (text_key or options.format != "binary"):
        encoding = await _client_encoding(servers)
        if not encoding.as_is:
            to_utf8 = encoding.to_utf8() if text_key else None
            ascii_only = encoding.name if encoding.embeds_ascii else None
    return splitter_for(options, lowered.index(sharding.column.lower()), sharding.column, to_utf8, ascii_only)


async def _start(servers: dict[int, ServerConnection], message: bytes) -> tuple[bytes | None, int, bytes]:
    """Send the COPY to every shard and read up to its CopyInResponse.

    Returns (the first CopyInResponse, or None when no shard entered COPY mode (a server-side file),
    the count such shards reported, their notices)."""
    for server in servers.values():
        server.write(message)
    response: bytes | None = None
    error: ServerError | None = None
    copying: list[ServerConnection] = []
    count = 0
    notices: dict[bytes, None] = {}
    for server in servers.values():
        while True:
            msg_type, body = await server.read_message()
            if msg_type == _G:
                response = response or frame(msg_type, body)
                copying.append(server)
                break
            if msg_type == _E and error is None:
                fields = backend.decode_error_fields(body)
                error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
            elif msg_type == _C:
                count += _count(body)
            elif msg_type == _N:
                notices[frame(msg_type, body)] = None
            elif msg_type == _Z:
                break
    if error is not None:
        await _fail_servers(copying, "COPY aborted: another shard refused it")
        raise error
    return response, count, b"".join(notices)


async def _fail_servers(servers: list[ServerConnection], reason: str) -> None:
    """Take shards out of COPY mode (CopyFail) and read their answers to ReadyForQuery."""
    for server in servers:
        server.write(frontend.copy_fail(reason))
    for server in servers:
        await _read_to_ready(server)


async def _read_to_ready(server: ServerConnection) -> tuple[int, ServerError | None, list[bytes]]:
    count = 0
    error: ServerError | None = None
    notices: list[bytes] = []
    while True:
        msg_type, body = await server.read_message()
        if msg_type == _C:
            count += _count(body)
        elif msg_type == _E and error is None:
            fields = backend.decode_error_fields(body)
            error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
        elif msg_type == _N:
            notices.append(frame(msg_type, body))
        elif msg_type == _Z:
            return count, error, notices


def _count(body: bytes) -> int:
    last = body.rstrip(b"\x00").rpartition(b" ")[2]
    return int(last) if last.isdigit() else 0


async def _copy(
    session: RoutedSession,
    servers: dict[int, ServerConnection],
    message: bytes,
    splitter: Splitter | None,
    sharding: TableSharding | None,
) -> tuple[int, bytes]:
    """The COPY sub-protocol between the client and the shards; (row count, notices)."""
    response, count, notices = await _start(servers, message)
    if response is None:
        return count, notices
    assert session.transport is not None
    session.transport.write(response)
    targets = list(servers.values())
    route = _router(splitter, sharding, servers) if splitter is not None else None
    done = False  # the client's CopyDone was read: an error found now leaves nothing of its to skip
    try:
        while True:
            msg_type, body = await session.read_copy_message(_BATCH)
            if msg_type == _d:
                if route is not None:
                    await route(body, False)
                else:
                    data = frontend.copy_data(body)
                    for server in targets:
                        server.write(data)
                    await _wait_for(targets)
            elif msg_type == _c:
                done = True
                if route is not None:
                    await route(b"", True)
                break
            elif msg_type == _f:
                reason = frontend.decode_copy_fail(body)
                await _fail_servers(targets, reason)
                raise CopyAborted("57014", f"COPY from stdin failed: {reason}")
            elif msg_type not in (_H, _S):  # Flush and Sync are ignored during COPY IN (protocol 55.2.6)
                # Any other message ends the COPY with an error, and is consumed, as in PostgreSQL.
                unexpected = f"unexpected message type 0x{msg_type:02X} during COPY from stdin"
                await _fail_servers(targets, unexpected)
                raise CopyAborted("08P01", unexpected)
    except CopyDataError as exc:
        await _fail_servers(targets, exc.message)
        aborted = CopyAborted(exc.sqlstate, exc.message)
        aborted.client_copying = not done
        raise aborted from None
    except ConnectionResetError:
        await _fail_servers(targets, "the client went away")
        raise
    for server in targets:
        server.write(frontend.COPY_DONE)
    total = 0
    error: ServerError | None = None
    seen: dict[bytes, None] = dict.fromkeys([notices]) if notices else {}
    for index, server in enumerate(targets):
        shard_count, shard_error, shard_notices = await _read_to_ready(server)
        if splitter is not None or index == 0:  # an omnisharded table's copies: count one
            total += shard_count
        error = error or shard_error
        seen.update(dict.fromkeys(shard_notices))
    if error is not None:
        raise error
    return total, b"".join(seen)


def _router(
    splitter: Splitter, sharding: TableSharding | None, servers: dict[int, ServerConnection]
) -> Callable[[bytes, bool], Awaitable[None]]:
    """feed(data, last): cut the data into rows and write each to its key's shard in batches."""
    assert sharding is not None
    batches = {shard: bytearray() for shard in servers}
    header_sent = False
    binary = splitter.options.format == "binary"
    shard_of = sharding.function.shard
    read_key = sharding.key_type.from_text
    column, table = sharding.column, sharding.table

    async def feed(data: bytes, last: bool) -> None:
        nonlocal header_sent
        rows = splitter.finish() if last else splitter.feed(data)
        if not header_sent and splitter.header is not None:
            for batch in batches.values():
                batch += splitter.header
            header_sent = True
        full: set[int] = set()
        for raw, key in rows:
            if key is None:
                raise CopyDataError(f'null value in shard key column "{column}" of table "{table}"', "23502")
            try:
                shard = shard_of(binary_key(sharding, key) if binary else read_key(key))
            except NoShardForKey as exc:
                raise CopyDataError(f'{exc} of sharded table "{table}"', NoShardForKey.sqlstate) from None
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                raise CopyDataError(f'shard key column "{column}": {key[:40]!r}: {exc}', "22P02") from None
            batch = batches[shard]
            batch += raw
            if len(batch) > _BATCH:
                full.add(shard)
        if last:
            full = set(batches)
        for shard in sorted(full):
            batch = batches[shard]
            if last and splitter.footer:
                batch += splitter.footer
            if batch:
                servers[shard].write(frontend.copy_data(bytes(batch)))
                batch.clear()
        if full:
            await _wait_for([servers[s] for s in full])

    return feed


async def _wait_for(servers: list[ServerConnection]) -> None:
    """Let shards that read slowly catch up, so rows do not pile up in pgshard's memory."""
    for server in servers:
        transport = server.transport
        while (
            transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() > _SERVER_HIGH_WATER
        ):
            await asyncio.sleep(0.002)
