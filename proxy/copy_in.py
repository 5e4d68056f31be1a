"""`COPY sharded_table FROM STDIN`: the client's rows split to the shards their keys hash to.

Text format (the default, what psql's \\copy and pgbench -i send): one row per line, fields
separated by tabs, so the key is found without decoding the rest of the row. Rows are forwarded in
batches of whole lines; memory stays bounded by a batch per shard. The COPY runs in a transaction
on every shard and commits (two-phase when configured) only if every shard accepted its rows; inside
a client's transaction block it joins that block. CSV and binary formats across shards are refused
with 0A000 for now.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pooler.server_connection import ServerConnection, ServerError
from proxy import multishard
from proxy.protocol import backend, frontend
from router.hashing import key_from_text

if TYPE_CHECKING:
    from parser.plan import CopyPlan
    from proxy.routed_session import RoutedSession
    from router.route import Route

_BATCH = 64 * 1024
_G, _E, _C, _Z = (ord(c) for c in "GECZ")
# Options that keep the default text format (FREEZE: pgbench -i loads after TRUNCATE in its block).
_OPTIONS = re.compile(r"\bFROM\s+STDIN\b(.*)$", re.IGNORECASE | re.DOTALL)
_ALLOWED_OPTIONS = re.compile(
    r"^\s*(?:WITH\s*)?(?:\(\s*(?:FREEZE(?:\s+(?:ON|TRUE))?|FORMAT\s+text)\s*\))?\s*;?\s*$", re.I
)


class CopyAborted(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate, self.message = sqlstate, message


def splittable(plan: CopyPlan | None, session: RoutedSession) -> bool:
    """A COPY into a sharded table from the client: the rows must be split by key."""
    if plan is None or plan.direction != "from" or plan.table is None or session.router is None:
        return False
    return session.router.topology.sharding(plan.table) is not None


async def _columns(server: ServerConnection, table: str) -> list[str]:
    """The table's column order, from the catalog, when COPY names no columns."""
    server.write(
        frontend.query(
            "SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = "
            f"{multishard.quote_literal(table)}::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        )
    )
    names: list[str] = []
    error: ServerError | None = None
    while True:
        msg_type, body = await server.read_message()
        if msg_type == ord("D"):
            value = backend.decode_data_row(body)[0]
            names.append(bytes(value or b"").decode())
        elif msg_type == _E:
            fields = backend.decode_error_fields(body)
            error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
        elif msg_type == _Z:
            if error is not None:
                raise error
            return names


async def run_copy_in(session: RoutedSession, route: Route, message: bytes, plan: CopyPlan) -> None:
    assert session.router is not None and plan.table is not None
    sharding = session.router.topology.sharding(plan.table)
    assert sharding is not None
    sql = message[5:-1].decode("utf-8", "replace")
    options = _OPTIONS.search(sql)
    if options is None or not _ALLOWED_OPTIONS.match(options.group(1)):
        raise CopyAborted(
            "0A000", "COPY FROM STDIN into a sharded table is split by key in the text format only"
        )
    shards = list(range(len(session.pools)))
    dist = await multishard.open_block_on(session, shards)
    servers = dist.servers if dist is not None else await multishard.acquire(session, shards)
    try:
        if dist is None:
            await multishard.run_each_or_raise(servers, "BEGIN")
        columns = (
            list(plan.columns) if plan.columns else await _columns(servers[session.default_shard], plan.table)
        )
        lowered = [c.lower() for c in columns]
        if sharding.column.lower() not in lowered:
            raise CopyAborted(
                "0A000", f'COPY into sharded table "{plan.table}" must include its key "{sharding.column}"'
            )
        key_index = lowered.index(sharding.column.lower())
        count = await _copy_rows(session, servers, message, key_index, sharding)
    except (CopyAborted, ServerError) as exc:
        if dist is None:
            await multishard.rollback_quietly(servers)
            multishard.release(session, servers)
        else:
            dist.failed = True
        raise CopyAborted(exc.sqlstate, exc.message) from None
    tag = frontend_tag(count)
    if dist is not None:
        dist.wrote.update(servers)
        multishard.reply(session, tag, b"T")
        return
    try:
        await multishard.commit(session, servers, None)
    except ServerError as exc:
        multishard.release(session, servers, broken=True)
        raise CopyAborted(exc.sqlstate, exc.message) from None
    multishard.release(session, servers)
    multishard.reply(session, tag, b"I")


def frontend_tag(count: int) -> bytes:
    return backend.command_complete(f"COPY {count}")


async def _copy_rows(
    session: RoutedSession,
    servers: dict[int, ServerConnection],
    message: bytes,
    key_index: int,
    sharding: object,
) -> int:
    """The COPY sub-protocol (protocol 55.2.6) between one client and every shard."""
    first: bytes | None = None
    for server in servers.values():
        server.write(message)
    for server in servers.values():
        msg_type, body = await server.read_message()
        if msg_type == _E:
            fields = backend.decode_error_fields(body)
            raise ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
        if msg_type != _G:
            raise ServerError("08P01", f"unexpected reply to COPY: {chr(msg_type)!r}")
        first = first or bytes((msg_type,)) + (len(body) + 4).to_bytes(4, "big") + body
    assert first is not None and session.transport is not None
    session.transport.write(first)
    batches: dict[int, bytearray] = {shard: bytearray() for shard in servers}
    partial = b""
    data_type = sharding.data_type  # type: ignore[attr-defined]
    function = sharding.function  # type: ignore[attr-defined]
    while True:
        msg_type, body = await session.read_copy_message()
        if msg_type == ord("d"):
            data = partial + body
            end = data.rfind(b"\n")
            partial = data[end + 1 :]
            for line in data[: end + 1].splitlines(keepends=True):
                if line in (b"\\.\n", b"\\.\r\n"):
                    continue
                values = line.rstrip(b"\r\n").split(b"\t")
                if key_index >= len(values):
                    raise CopyAborted("22P04", f"missing data for the shard key column in: {line[:80]!r}")
                raw: bytes = values[key_index]
                if raw == b"\\N":
                    raise CopyAborted("23502", "null value in the shard key column")
                if b"\\" in raw:
                    raw = raw.decode("unicode_escape").encode()  # \t, \n, \\ ... (rare in keys)
                try:
                    shard = function.shard(key_from_text(data_type, raw))
                except (ValueError, LookupError) as exc:
                    raise CopyAborted("22P02", f"shard key {raw[:40]!r}: {exc}") from None
                batch = batches[shard]
                batch += line
                if len(batch) > _BATCH:
                    servers[shard].write(frontend.copy_data(bytes(batch)))
                    batch.clear()
        elif msg_type == ord("c"):
            if partial.strip() and partial.strip() != b"\\.":
                raise CopyAborted("22P04", "COPY data ended in the middle of a row")
            for shard, batch in batches.items():
                if batch:
                    servers[shard].write(frontend.copy_data(bytes(batch)))
                servers[shard].write(frontend.COPY_DONE)
            return await _finish(servers)
        elif msg_type == ord("f"):
            for server in servers.values():
                server.write(frontend.copy_fail("COPY aborted by the client"))
            await _finish(servers, quiet=True)
            raise CopyAborted("57014", f"COPY from stdin failed: {frontend.decode_copy_fail(body)}")
        # Flush and Sync are ignored during COPY IN (protocol 55.2.6).


async def _finish(servers: dict[int, ServerConnection], quiet: bool = False) -> int:
    """Read every shard's answer to the end of the COPY; the summed row count."""
    total = 0
    error: ServerError | None = None
    for server in servers.values():
        while True:
            msg_type, body = await server.read_message()
            if msg_type == _C:
                last = body.rstrip(b"\x00").rpartition(b" ")[2]
                total += int(last) if last.isdigit() else 0
            elif msg_type == _E and error is None:
                fields = backend.decode_error_fields(body)
                error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
            elif msg_type == _Z:
                break
    if error is not None and not quiet:
        raise error
    return total
