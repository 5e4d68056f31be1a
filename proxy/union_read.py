"""A UNION ALL whose parts run on different shards (`Route.parts`, built by `router.union`): a part of
the default shard, of an omnisharded table or a constant next to sharded parts elsewhere. Each shard
runs the parts it must, cut from the client's text, and their rows are concatenated (issue 4).

What the client sees is what one server would send for the whole statement:
1. the lead (the default shard if it takes part, else the lowest) answers a Parse + Describe of the
   client's statement: its RowDescription (column names, types, typmods), or the server's own error;
2. the lead names the columns' types (pg_catalog.format_type);
3. each shard runs `SELECT CAST(NULL AS t1) AS "c1", ... WHERE false UNION ALL <its parts>`: the empty
   first part, typed as the whole union, makes PostgreSQL resolve each column to the same type the
   whole statement has (a part's own `NULL` or `'text'` takes the union's type, as it would there);
4. every shard's RowDescription is checked against the lead's (0A000 if one differs, never rows of
   another type), then the rows stream to the client shard by shard, with one RowDescription and
   one CommandComplete.
Simple Query only: in the extended protocol `router.union` refuses such a UNION ALL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pooler.server_connection import ServerConnection, ServerError
from proxy import multishard
from proxy.protocol import backend, frontend
from proxy.protocol.errors import ProtocolError
from router.merge import ShardError, ShardStream, drain
from router.scatter import frame

if TYPE_CHECKING:
    from proxy.routed_session import RoutedSession
    from router.route import Route

_D, _T, _E, _N, _Z = (ord(c) for c in "DTENZ")
_IDLE, _IN_BLOCK, _FAILED = b"I", b"T", b"E"
_CLIENT_HIGH_WATER = 1 << 20  # bytes queued to a slow client before the rows wait


class _Refused(Exception):
    """The answer is an error pgshard words itself (0A000)."""


async def run_union_read(session: RoutedSession, route: Route, message: bytes) -> None:
    """Answer one simple Query whose route has `parts`: outside a block, as the first statement of a
    held BEGIN, or inside a block already on several shards."""
    assert route.parts is not None
    shards = sorted(s for s, _ in route.parts)
    dist = session.distributed
    held = list(session.held)
    if dist is not None:
        if dist.failed:
            multishard._reply(session, backend.error_response("25P02", multishard._ABORTED), _FAILED)
            return
        await multishard._join(session, dist, shards)
        servers = {s: dist.servers[s] for s in shards}
    else:
        servers = await multishard.acquire(session, shards)
    read = _UnionRead(session, servers, message[5:-1], dict(route.parts))
    try:
        if dist is None and held:
            await multishard._replay_begin(servers, held)
        timeout = session.query_timeout
        failed = await (asyncio.wait_for(read.run(), timeout) if timeout else read.run())
    except TimeoutError:
        if dist is None:
            multishard.release(session, servers, broken=True)
        raise ServerError("57014", f"query_timeout: shards did not answer within {timeout:g}s") from None
    except BaseException:
        if dist is None:
            multishard.release(session, servers, broken=True)
        raise
    if dist is not None:
        dist.failed = failed
        status = _FAILED if failed else _IN_BLOCK
    elif held:
        session.distributed = multishard.DistributedTransaction(begin=held, servers=servers, failed=failed)
        session.held = []
        status = _FAILED if failed else _IN_BLOCK
    else:
        multishard.release(session, servers)
        status = _IDLE
    multishard._reply(session, b"", status)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _UnionRead:
    def __init__(
        self,
        session: RoutedSession,
        servers: dict[int, ServerConnection],
        sql: bytes,
        parts: dict[int, str],
    ) -> None:
        self.session = session
        self.servers = servers
        self.sql = sql
        self.parts = parts
        default = session.default_shard
        self.lead_shard = default if default in servers else min(servers)
        self.streams: dict[int, ShardStream] = {}
        self.out: list[bytes] = []
        self.queued = 0

    def send(self, data: bytes) -> None:
        self.out.append(data)
        self.queued += len(data)

    async def flush(self) -> None:
        transport = self.session.transport
        if transport is None or transport.is_closing():
            self.out, self.queued = [], 0
            return
        transport.write(b"".join(self.out))
        self.out, self.queued = [], 0
        while transport.get_write_buffer_size() > _CLIENT_HIGH_WATER and not transport.is_closing():
            await asyncio.sleep(0.002)

    async def run(self) -> bool:
        """Send the client the answer (without ReadyForQuery); True if it was an error."""
        self.streams = {s: ShardStream(s, server) for s, server in self.servers.items()}
        failed = False
        try:
            await self._run()
        except _Refused as exc:
            await self._settle()
            self.out, self.queued = [], 0
            self.send(backend.error_response("0A000", str(exc)))
            failed = True
        except ShardError as exc:
            await self._settle()
            self.send(backend.error_response_from_fields(self._first_error(exc.fields)))
            failed = True
        finally:
            for stream in self.streams.values():
                stream.detach()
        notices = dict.fromkeys(n for s in self.streams.values() for n in s.notices)  # once each, in order
        self.out[:0] = [frame(_N, body) for body in notices]
        await self.flush()
        return failed

    async def _settle(self) -> None:
        for stream in self.streams.values():
            await drain(stream)

    def _first_error(self, fallback: dict[str, str]) -> dict[str, str]:
        for stream in self.streams.values():
            if stream.error is not None:
                return stream.error
        return fallback

    async def _run(self) -> None:
        lead = self.streams[self.lead_shard]
        parse = frame(ord("P"), b"\x00" + self.sql + b"\x00\x00\x00")  # unnamed, no parameter types
        lead.write(parse + frontend.describe(b"S") + frontend.SYNC)
        description = await self._description(lead)
        try:
            columns = backend.decode_row_description(description)
        except ProtocolError as exc:
            what = "a UNION ALL over several shards with column names pgshard cannot read"
            raise _Refused(f"{what}: {exc}") from None
        pairs = [(c.type_oid, c.type_modifier) for c in columns]
        types = await self._type_names(lead, pairs)
        template = ", ".join(
            f"CAST(NULL AS {name}) AS {_quote_ident(c.name)}"
            for c, (name, _) in zip(columns, types, strict=True)
        )
        running = list(self.streams.values())
        for stream in running:
            text = f"SELECT {template} WHERE false\nUNION ALL\n{self.parts[stream.shard]}"
            stream.write(frame(ord("Q"), text.encode("utf-8", "surrogateescape") + b"\x00"))
        for stream in running:
            msg_type, body = await stream.result_message()
            got = backend.decode_row_description(body) if msg_type == _T else ()
            if [(c.type_oid, c.type_modifier) for c in got] != pairs:
                raise _Refused(
                    f"a UNION ALL whose parts on shard {stream.shard} return other column types than the "
                    "whole statement is not supported"
                )
        self.send(frame(_T, description))
        sent = 0
        for stream in running:
            while (row := await stream.next_row()) is not None:
                self.send(frame(_D, row))
                sent += 1
                if self.queued > 65536:
                    await self.flush()
            await stream.until_ready()
            if stream.error is not None:
                raise ShardError(stream.shard, stream.error)
        self.send(backend.command_complete(f"SELECT {sent}"))

    async def _description(self, lead: ShardStream) -> bytes:
        """The RowDescription body of the client's statement, as the lead describes it."""
        found: bytes | None = None
        while True:
            msg_type, body = await lead.message()
            if msg_type == _T:
                found = body
            elif msg_type == ord("n"):
                found = b"\x00\x00"
            elif msg_type == _E and lead.error is None:
                lead.error = backend.decode_error_fields(body)
            elif msg_type == _N:
                lead.notices.append(body)
            elif msg_type == _Z:
                break
        if lead.error is not None:
            raise ShardError(lead.shard, lead.error)
        if found is None:
            raise ShardError(lead.shard, {"S": "ERROR", "C": "XX000", "M": "the statement was not described"})
        return found

    async def _type_names(self, lead: ShardStream, pairs: Sequence[tuple[int, int]]) -> list[tuple[str, str]]:
        """(format_type, typtype) of each column, as the lead's catalog names them."""
        if not pairs:
            return []
        oids = ",".join(str(o) for o, _ in pairs)
        mods = ",".join(str(m) for _, m in pairs)
        sql = (
            "SELECT format_type(t.o, t.m), coalesce(y.typtype::text, '') "
            f"FROM unnest('{{{oids}}}'::oid[], '{{{mods}}}'::int4[]) WITH ORDINALITY AS t(o, m, i) "
            "LEFT JOIN pg_catalog.pg_type y ON y.oid = t.o ORDER BY t.i"
        )
        lead.write(frontend.query(sql))
        rows = []
        while (body := await lead.next_row()) is not None:
            rows.append(backend.decode_data_row(body))
        await lead.until_ready()
        if lead.error is not None:
            raise ShardError(lead.shard, lead.error)
        names = [((n or b"").decode("utf-8", "surrogateescape"), (t or b"").decode()) for n, t in rows]
        for name, typtype in names:
            if typtype in ("", "p"):
                what = f"a column of type {name or 'unknown'}"
                raise _Refused(f"a UNION ALL over several shards with {what} is not supported")
        return names
