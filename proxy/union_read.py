"""A UNION ALL whose parts run on different shards (`Route.parts`, built by `router.union`): a part of
the default shard, of an omnisharded table or a constant next to sharded parts elsewhere. Each shard
runs the parts it must, cut from the client's text, and their rows are concatenated (issue 4).

What the client sees is what one server would send for the whole statement:
1. the lead (the default shard if it takes part, else the lowest) answers a Parse + Describe of the
   client's statement: its RowDescription (column names, types, typmods), or the server's own error;
2. the columns' types are named (pg_catalog.format_type, on the lead for a type new to the process);
3. each shard runs `SELECT CAST(NULL AS t1) AS "c1", ... WHERE false UNION ALL <its parts>`: the empty
   first part, typed as the whole union, makes PostgreSQL resolve each column to the same type the
   whole statement has (a part's own `NULL` or `'text'` takes the union's type, as it would there);
4. every shard's RowDescription is checked against the lead's (0A000 if one differs, never rows of
   another type), then the rows stream to the client shard by shard, with one RowDescription and
   one CommandComplete.

The extended protocol (`run_union_group`: psycopg once it prepares, asyncpg) takes the shape fan-out
reads take (`fanout_read.bound_statement`): [Parse] [Describe statement] Bind [Describe portal]
Execute, then Sync or Flush. Step 1 is then the client's Parse + Describe + Bind + Describe portal
on the lead (`fanout_read.bind_on_lead`), which yields every reply before the rows as one server
words them and the parameters' types; in step 3 each shard's query keeps the client's `$n`, and runs
as Parse with those types for all parameters + Bind with the client's values and result formats, so
the shards write binary themselves. An Execute row limit gives that many rows, then PortalSuspended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pooler.server_connection import ServerConnection
from proxy import fanout_read, multishard, prepared
from proxy.protocol import backend, frontend
from proxy.protocol.errors import ProtocolError
from router.merge import ShardError, ShardStream, drain
from router.scatter import frame

if TYPE_CHECKING:
    from proxy.fanout_read import Bound
    from proxy.routed_session import RoutedSession
    from router.route import Route

_B, _D, _T, _E, _N, _Z, _H = (ord(c) for c in "BDTENZH")
_IDLE, _IN_BLOCK, _FAILED = b"I", b"T", b"E"
_CLIENT_HIGH_WATER = 1 << 20  # bytes queued to a slow client before the rows wait
_WHAT = "a UNION ALL whose parts run on different shards"


class _Refused(Exception):
    """The answer is an error pgshard words itself (0A000)."""


class _Rejected(Exception):
    """The lead rejected the client's Parse or Bind: its replies, ending in its error, go as they are."""

    def __init__(self, replies: bytes) -> None:
        super().__init__("rejected")
        self.replies = replies


async def run_union_read(session: RoutedSession, route: Route, message: bytes) -> None:
    """Answer one simple Query whose route has `parts`: outside a block, as the first statement of a
    held BEGIN, or inside a block already on several shards."""
    await _answer(session, route, message[5:-1], None, flushed=False)


def _union_bind(session: RoutedSession, route: Route | None) -> bool:
    return (
        route is not None and route.error is None and route.parts is not None and session.pinned_shard is None
    )


def binds_union_read(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> bool:
    """Whether an extended-protocol group binds a UNION ALL run part by part on several shards."""
    return any(msg_type == _B and _union_bind(session, route) for msg_type, _, route in group)


async def run_union_group(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> None:
    """Answer an extended-protocol group that `binds_union_read`; a group of another shape (the
    statement in a pipeline with others, a cursor read in parts) gets 0A000."""
    flushed = group[-1][0] == _H
    if (session.distributed is not None and session.distributed.failed) or (
        session.held and session.held_failed
    ):
        fanout_read._group_error(session, "25P02", multishard._ABORTED, flushed)
        return
    route = next(r for t, _, r in group if t == _B and r is not None and _union_bind(session, r))
    found = fanout_read.bound_statement(session, group, route, _WHAT)
    if isinstance(found[1], str):
        fanout_read._group_error(session, found[0], found[1], flushed)
        return
    route, bound = found
    read = await _answer(session, route, bound.sql, bound, flushed)
    if read is not None and read.parsed and bound.parse is not None and bound.parse[0] != 0:
        name, statement = prepared.prepared_from_parse(bound.parse)
        session.statements[name] = statement  # a server would keep it even if the Bind failed


async def _answer(
    session: RoutedSession, route: Route, sql: bytes, bound: Bound | None, flushed: bool
) -> _UnionRead | None:
    """Run the parts on their shards and send the answer and ReadyForQuery (none after a Flush); None
    if it never started (a block already failed)."""
    assert route.parts is not None
    parts = dict(route.parts)

    def start(servers: dict[int, ServerConnection], in_block: bool) -> _UnionRead:
        return _UnionRead(session, servers, sql, parts, bound)

    return await fanout_read.answer_read(session, sorted(parts), start, flushed)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _UnionRead:
    def __init__(
        self,
        session: RoutedSession,
        servers: dict[int, ServerConnection],
        sql: bytes,
        parts: dict[int, str],
        bound: Bound | None = None,
    ) -> None:
        self.session = session
        self.servers = servers
        self.sql = sql
        self.parts = parts
        self.bound = bound  # None: a simple Query
        default = session.default_shard
        self.lead_shard = default if default in servers else min(servers)
        self.streams: dict[int, ShardStream] = {}
        self.broken: set[int] = set()  # never: every part is read to its end
        self.out: list[bytes] = []
        self.queued = 0
        self.parsed = False  # extended: the lead accepted the client's Parse
        self.prefix = b""  # extended: the replies before the rows, once the lead accepted the Bind
        self.parse_prefix = b""  # extended: those up to the Bind's (a refusal follows them)
        self.started = False  # the replies before the rows are queued for the client

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
        except _Rejected as exc:
            await self._settle()
            self.send(exc.replies)
            failed = True
        except _Refused as exc:
            await self._settle()
            self.out, self.queued = [], 0
            self.send(self.parse_prefix + backend.error_response("0A000", str(exc)))
            failed = True
        except ShardError as exc:
            await self._settle()
            if not self.started:
                self.send(self.prefix)  # the lead accepted the Bind: one server fails at the Execute
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

    def _statement(self, sql: bytes) -> bytes:
        """A shard's query: a simple Query, or with the client's parameters and result formats."""
        if self.bound is None:
            return frame(ord("Q"), sql + b"\x00")
        return fanout_read.bound_statement_sql(sql, self.bound, self.bound.result_formats)

    async def _run(self) -> None:
        lead = self.streams[self.lead_shard]
        bound = self.bound
        if bound is None:
            parse = frame(ord("P"), b"\x00" + self.sql + b"\x00\x00\x00")  # unnamed, no parameter types
            lead.write(parse + frontend.describe(b"S") + frontend.SYNC)
            description = await self._description(lead)
        else:
            accepted = await fanout_read.bind_on_lead(lead, self.sql, bound)
            self.parsed = accepted.parsed
            if accepted.error is not None:
                raise _Rejected(accepted.error)
            description = accepted.described
            self.prefix, self.parse_prefix = accepted.prefix, accepted.parse_prefix
        try:
            columns = backend.decode_row_description(description)
        except ProtocolError as exc:
            what = "a UNION ALL over several shards with column names pgshard cannot read"
            raise _Refused(f"{what}: {exc}") from None
        pairs = [(c.type_oid, c.type_modifier) for c in columns]
        names = await self._type_names(lead, pairs)
        template = ", ".join(
            f"CAST(NULL AS {name}) AS {_quote_ident(c.name)}" for c, name in zip(columns, names, strict=True)
        )
        running = list(self.streams.values())
        for stream in running:
            text = f"SELECT {template} WHERE false\nUNION ALL\n{self.parts[stream.shard]}"
            stream.write(self._statement(text.encode("utf-8", "surrogateescape")))
        for stream in running:
            msg_type, body = await stream.result_message()
            got = backend.decode_row_description(body) if msg_type == _T else ()
            if [(c.type_oid, c.type_modifier) for c in got] != pairs:
                raise _Refused(
                    f"a UNION ALL whose parts on shard {stream.shard} return other column types than the "
                    "whole statement is not supported"
                )
        self.send(frame(_T, description) if bound is None else self.prefix)
        self.started = True
        cap = bound.max_rows if bound is not None else -1  # the Execute's row limit (-1: none)
        sent = 0
        for stream in running:
            while (row := await stream.next_row()) is not None:
                if sent == cap:
                    continue  # the limit was reached: the rest is read and dropped
                self.send(frame(_D, row))
                sent += 1
                if self.queued > 65536:
                    await self.flush()
            await stream.until_ready()
            if stream.error is not None:
                raise ShardError(stream.shard, stream.error)
        self.send(fanout_read._completion(sent, cap))

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

    async def _type_names(self, lead: ShardStream, pairs: Sequence[tuple[int, int]]) -> list[str]:
        """format_type of each column, as the lead's catalog names it (built-in types cached)."""
        missing = fanout_read.missing_types(pairs)
        if missing:
            lead.write(fanout_read.types_query(missing))
        types = await fanout_read.read_types(lead, missing)
        for pair in pairs:
            name, _, typtype = types[pair]
            if typtype in ("", "p"):
                what = f"a column of type {name or 'unknown'}"
                raise _Refused(f"a UNION ALL over several shards with {what} is not supported")
        return [types[pair][0] for pair in pairs]
