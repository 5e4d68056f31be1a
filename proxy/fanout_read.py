"""Reads across shards that need more than concatenation: ORDER BY, LIMIT/OFFSET, aggregates,
GROUP BY, HAVING, DISTINCT, UNION (issue 4). The client gets exactly what one PostgreSQL holding every
row would send, or 0A000 naming the construct (DESIGN.md, principle 4 and "Rules for the corners").

One statement, on server connections taken in shard order; the lowest shard is the lead:
1. every other shard starts the partial query (`parser.fanout`) at once; the lead first answers a
   Parse + Describe of the client's own statement (the RowDescription the client will see, and the
   server's own error for a statement it rejects) and of the partial query;
2. the lead then runs, when a type is new to this process, pg_catalog.format_type, and a probe (each
   partial column's collation, DateStyle, client_encoding, the database's collation) when the merge
   depends on one of them: a collatable column, or a date/time sort key in text. Then its partial
   query; from a statement's second run on, when its last run needed no probe, that goes with the
   Describe, so a repeated ORDER BY ... LIMIT costs the shards' round trip and nothing more;
3. ordered rows without DISTINCT whose keys Python can compare exactly (`router.merge.column_key`)
   are merged as streams, with OFFSET/LIMIT applied, memory bounded by shards x the read buffer;
4. otherwise the partial rows (bounded: MAX_PARTIAL_ROWS, MAX_PARTIAL_BYTES) go to the lead in a
   final query that re-aggregates, filters (HAVING), deduplicates, orders and limits them with
   PostgreSQL's own semantics (collation, numeric scale, result types).

The extended protocol (`run_fanout_group`: asyncpg, psycopg with parameters, pgbench -M extended or
prepared) runs the same steps after one more on the lead: Parse + Describe + Bind + Describe of the
client's own statement with its parameters and result formats. That yields every reply the client
gets before its rows, exactly as one server words them (ParseComplete, ParameterDescription,
RowDescriptions with the client's format codes, BindComplete) or the server's own error, and the
parameter types. Every query of pgshard that reads the client's `$n` (partial, probe, final) is then
run as Parse with those types for all N parameters + Bind with the client's values as sent. Results:
- the final query is bound with the client's result formats, so PostgreSQL itself writes binary;
- the stream merge asks the shards for the visible columns in the client's formats (hidden sort keys
  in text) and compares binary keys as the types' send functions write them (`binary_column_key`),
  so asyncpg's binary reads stream too. As the formats must be chosen before the shards start, a
  client wanting binary results has the partial query started after the probe, not alongside it;
- LIMIT $n / OFFSET $n are pushed down as they are (LIMIT ($1) + ($2)); with non-negative integer
  values bound the merge streams, otherwise the final query applies them.
One Parse?/Describe(S)?/Bind/Describe(P)?/Execute per Sync (or Flush) is supported. An Execute with a
row limit on the unnamed portal (asyncpg's fetchrow, fetchval) gets that many rows, then
PortalSuspended once the limit is reached, as from one server; that portal cannot be executed again
(pgshard's own portals are closed, so a block gets 34000, never their rows). A fan-out read in a
pipeline with other statements, or a named portal executed with a row limit (a cursor), is refused
with 0A000. A Bind of the unnamed statement parsed before an earlier Sync re-parses its text with the
parameter types left to the server (the Parse's declared types are not kept).
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from parser.fanout import ROWS, FanoutPlan, Refusal, anonymous_functions, final_sql, plan_fanout, probe_sql
from parser.fanout import rows_relation as _rows_relation
from parser.plan import StatementKind
from pooler.server_connection import ServerConnection
from proxy import multishard, prepared
from proxy.protocol import backend, frontend
from proxy.protocol._writer import int16_array, oid_array16
from proxy.protocol.backend_messages import FieldDescription
from router.merge import (
    MergeKey,
    ShardError,
    ShardStream,
    binary_column_key,
    byte_order,
    column_key,
    drain,
    keep_columns,
    merge_streams,
)
from router.scatter import frame, query_timeout_error

if TYPE_CHECKING:
    from proxy.routed_session import RoutedSession
    from router.route import Route

MAX_PARTIAL_ROWS = 1_000_000  # partial rows a final query may read (aggregate groups, bounded sorts)
MAX_PARTIAL_BYTES = 64 << 20  # and their bytes: the final query's text is about that long
_CLIENT_HIGH_WATER = 1 << 20  # bytes queued to a slow client before the merge waits
_D, _T, _C, _E, _Z, _N = (ord(c) for c in "DTCEZN")
_P, _B, _S, _H, _X = (ord(c) for c in "PBSHE")  # _X: Execute
_PARSED, _BOUND, _PARAMS, _NO_DATA = (ord(c) for c in "12tn")
_DESCRIBE_STATEMENT, _DESCRIBE_PORTAL = frontend.describe(b"S"), frontend.describe(b"P")
_EXECUTE = frontend.execute()
_CLOSE_PORTAL = frontend.close(b"P")  # in a block, a later Execute of the client's portal must not find ours
_DATE_TYPES = frozenset({1082, 1114, 1184})  # date, timestamp, timestamptz: their text form is DateStyle's
_INT_TYPES = frozenset({20, 21, 23})  # int8, int2, int4: what LIMIT $n / OFFSET $n are read as
_COUNT = re.compile(rb"\s*\+?\d+\s*")
_PARAM = re.compile(r"\$(\d+)")
_UNKNOWN = -1  # a LIMIT/OFFSET value pgshard cannot read from the Bind
_IDLE, _IN_BLOCK, _FAILED = b"I", b"T", b"E"
_TOO_BIG = (
    f"a query whose final step across shards reads more than {MAX_PARTIAL_ROWS} partial rows or "
    f"{MAX_PARTIAL_BYTES >> 20} MB (ORDER BY a type or collation pgshard cannot merge itself, GROUP BY or "
    "DISTINCT with very many groups) is not supported"
)
_PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")
# built-in (oid, typmod) -> format_type name, collatable, typtype
_TYPES: dict[tuple[int, int], tuple[str, bool, str]] = {}
PLAN_CACHE_SIZE = 1024
_PLANS: OrderedDict[tuple[bytes, int, int], FanoutPlan | Refusal] = OrderedDict()
# Statements (keyed as _PLANS) whose last run needed no probe: a hint, checked on every run.
_PROBE_FREE: OrderedDict[tuple[bytes, int, int], None] = OrderedDict()


def is_fanout_read(route: Route) -> bool:
    """A read on several shards whose answer needs a merge: `run_fanout_read` answers it."""
    return (
        route.merge is not None
        and route.merge.any
        and route.statements is None
        and route.split is None
        and route.kind is StatementKind.SELECT
    )


async def run_fanout_read(session: RoutedSession, route: Route, message: bytes) -> None:
    """Answer one simple Query (`message`) that `is_fanout_read`: outside a transaction block, as the
    first statement of a held BEGIN, or inside a block already on several shards."""
    await _answer(session, route, message[5:-1], None, flushed=False)


@dataclass(slots=True)
class Bound:
    """A client's Bind of a fan-out read (extended protocol), and which replies it asked for."""

    sql: bytes
    declared: tuple[int, ...]  # the Parse's parameter types (0: left to the server)
    params: bytes  # the Bind's parameter format codes and values, as the client sent them
    values: tuple[bytes | None, ...]
    param_formats: tuple[int, ...]
    result_formats: tuple[int, ...]
    parse: bytes | None = None  # the client's Parse body, if it sent one in this group
    describe_statement: bool = False
    describe_portal: bool = False
    max_rows: int = -1  # the Execute's row limit (-1: none)
    oids: tuple[int, ...] = ()  # the parameter types, as the lead resolved them

    def bind(self, result_formats: Sequence[int]) -> bytes:
        """A Bind of the unnamed statement with the client's parameters."""
        return frame(_B, b"\x00\x00" + self.params + int16_array(result_formats))


def _fanout_bind(session: RoutedSession, route: Route | None) -> bool:
    return (
        route is not None
        and route.error is None
        and session.pinned_shard is None
        and is_fanout_read(route)
        and len(set(multishard._shards_of(session, route))) > 1
    )


def binds_fanout_read(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> bool:
    """Whether an extended-protocol group binds a read that needs a merge over several shards."""
    return any(msg_type == _B and _fanout_bind(session, route) for msg_type, _, route in group)


async def run_fanout_group(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> None:
    """Answer an extended-protocol group that `binds_fanout_read`: [Parse], [Describe statement], Bind,
    [Describe portal], Execute, then Sync (or Flush); other shapes get 0A000 (`_bound_read`)."""
    flushed = group[-1][0] == _H
    if (session.distributed is not None and session.distributed.failed) or (
        session.held and session.held_failed
    ):
        _group_error(session, "25P02", multishard._ABORTED, flushed)
        return
    found = _bound_read(session, group)
    if isinstance(found[1], str):
        _group_error(session, found[0], found[1], flushed)
        return
    route, bound = found
    read = await _answer(session, route, bound.sql, bound, flushed)
    if read is not None and read.parsed and bound.parse is not None and bound.parse[0] != 0:
        name, statement = prepared.prepared_from_parse(bound.parse)
        session.statements[name] = statement  # a server would keep it even if the Bind failed


def _group_error(session: RoutedSession, sqlstate: str, message: str, flushed: bool) -> None:
    """An error for the whole group; a block fails with it, as PostgreSQL's would."""
    status: bytes | None = _IDLE
    if session.distributed is not None:
        session.distributed.failed = True
        status = _FAILED
    elif session.held:
        session.held_failed = True
        status = _FAILED
    if flushed:
        session.discard_until_sync = True  # the client's Sync, when it comes, gets the ReadyForQuery
        status = None
    multishard._reply(session, backend.error_response(sqlstate, message), status)


def _parse_parts(body: bytes) -> tuple[bytes, tuple[int, ...]]:
    """(query, declared parameter types) of a Parse body."""
    name_end = body.index(b"\x00")
    sql_end = body.index(b"\x00", name_end + 1)
    count = int.from_bytes(body[sql_end + 1 : sql_end + 3], "big")
    return body[name_end + 1 : sql_end], struct.unpack_from(f">{count}I", body, sql_end + 3)


def _bound_read(
    session: RoutedSession, group: list[tuple[int, bytes, Route | None]]
) -> tuple[Route, Bound] | tuple[str, str]:
    """The group's fan-out read, or (SQLSTATE, message) if pgshard cannot answer it."""
    fanout = next(r for t, _, r in group if t == _B and r is not None and _fanout_bind(session, r))
    what = (multishard.unsupported_reason(fanout) or "a read that needs a merge across shards").removesuffix(
        " in a query that reads several shards"
    )
    return bound_statement(session, group, fanout, what)


def bound_statement(
    session: RoutedSession, group: list[tuple[int, bytes, Route | None]], fanout: Route, what: str
) -> tuple[Route, Bound] | tuple[str, str]:
    """The group's one statement whose Bind routed to `fanout`, in the shape [Parse] [Describe
    statement] Bind [Describe portal] Execute, then Sync or Flush; else (SQLSTATE, message) naming
    `what` (a read pgshard answers itself cannot share its Sync with other statements)."""
    items = [(t, m, r) for t, m, r in group if t not in (_S, _H)]
    pipeline = (
        "0A000",
        f"{what} in a query that reads several shards, sent with other extended-protocol messages before "
        "its Sync, is not supported; send Parse, Bind, Describe, Execute and Sync for it alone",
    )
    i, n = 0, len(items)
    parse: bytes | None = None
    described: bytes | None = None
    if i < n and items[i][0] == _P:
        parse = items[i][1][5:]
        i += 1
    if i < n and items[i][0] == _D and items[i][1][5] == ord("S"):
        described = items[i][1][6:-1]
        i += 1
    if i == n or items[i][0] != _B or items[i][2] is not fanout:
        return pipeline
    body = items[i][1][5:]
    i += 1
    bind = frontend.decode_bind(body)
    portal = body[: body.index(b"\x00")]
    statement = prepared.bind_statement_name(body)
    describe_portal = i < n and items[i][0] == _D and items[i][1][5:] == b"P" + portal + b"\x00"
    i += describe_portal
    if i == n or items[i][0] != _X or items[i][1][5:-4] != portal + b"\x00" or i + 1 != n:
        return pipeline
    max_rows = frontend.decode_execute(items[i][1][5:]).max_rows
    max_rows = max_rows if max_rows > 0 else -1  # 0 (and a negative count) means all rows
    if max_rows > 0 and portal:
        return (
            "0A000",
            f"{what} in a query that reads several shards, read in parts (a named portal executed with a "
            "row limit, a cursor), is not supported",
        )
    if (parse is not None and parse[: parse.index(b"\x00")] != statement) or (
        described is not None and described != statement
    ):
        return pipeline
    if parse is not None:
        sql, declared = _parse_parts(parse)
    elif statement:
        known = session.statements.get(statement)
        if known is None:
            name = statement.decode("utf-8", "replace")
            return ("26000", f'prepared statement "{name}" does not exist')
        sql, declared = _parse_parts(known.parse_message[5:])
    elif session.unnamed_route is not None:
        sql, declared = session.unnamed_route.sql.encode("utf-8", "surrogateescape"), ()
    else:
        return ("26000", "unnamed prepared statement does not exist")
    params = body[len(portal) + len(statement) + 2 : len(body) - 2 - 2 * len(bind.result_formats)]
    bound = Bound(
        sql, declared, params, bind.params, bind.param_formats, bind.result_formats, parse,
        describe_statement=described is not None, describe_portal=describe_portal, max_rows=max_rows,
    )  # fmt: skip
    return fanout, bound


async def _answer(
    session: RoutedSession, route: Route, sql: bytes, bound: Bound | None, flushed: bool
) -> _FanoutRead | None:
    """Run one fan-out read on the client's behalf and send its answer and ReadyForQuery (none after
    a Flush); None if it never started (a block already failed)."""
    shards = sorted(set(multishard._shards_of(session, route)))

    def start(servers: dict[int, ServerConnection], in_block: bool) -> _FanoutRead:
        return _FanoutRead(session, servers, sql, in_block=in_block, bound=bound)

    return await answer_read(session, shards, start, flushed)


class ShardRead(Protocol):
    """A read that answers the client from several shards' streams (`_FanoutRead`, union parts)."""

    servers: dict[int, ServerConnection]
    streams: dict[int, ShardStream]
    broken: set[int]  # shards abandoned mid-result: their connections are closed

    async def run(self) -> bool: ...


R = TypeVar("R", bound=ShardRead)


async def answer_read(
    session: RoutedSession,
    shards: list[int],
    start: Callable[[dict[int, ServerConnection], bool], R],
    flushed: bool,
) -> R | None:
    """Take the shards' connections (or the block's), run the read `start` makes within
    query_timeout, and settle the block and the connections; None if a failed block refused it."""
    dist = session.distributed
    held = list(session.held)
    if dist is not None:
        if dist.failed:
            multishard._reply(session, backend.error_response("25P02", multishard._ABORTED), _FAILED)
            return None
        await multishard._join(session, dist, shards)
        servers = {s: dist.servers[s] for s in shards}
    else:
        servers = await multishard.acquire(session, shards)
    read = start(servers, dist is not None or bool(held))
    try:
        if dist is None and held:
            await multishard._replay_begin(servers, held)
        timeout = session.query_timeout
        failed = await (asyncio.wait_for(read.run(), timeout) if timeout else read.run())
    except TimeoutError:
        if dist is None:
            multishard.release(session, servers, broken=True)
        raise query_timeout_error(
            timeout, [s for s, st in read.streams.items() if not st.answered()] or read.servers
        ) from None
    except BaseException:
        if dist is None:
            multishard.release(session, servers, broken=True)
        raise
    if failed and flushed:
        session.discard_until_sync = True  # PostgreSQL skips the client's messages up to its Sync
    if dist is not None:
        dist.failed = failed
        status = _FAILED if failed else _IN_BLOCK
    elif held:
        session.distributed = multishard.DistributedTransaction(begin=held, servers=servers, failed=failed)
        session.held = []
        status = _FAILED if failed else _IN_BLOCK
    else:
        broken = {s: servers.pop(s) for s in read.broken}
        multishard.release(session, broken, broken=True)
        multishard.release(session, servers)
        status = _IDLE
    multishard._reply(session, b"", None if flushed else status)
    return read


def _query(sql: bytes) -> bytes:
    return frame(ord("Q"), sql + b"\x00")


def _parse_describe(sql: bytes, oids: Sequence[int] = ()) -> bytes:
    return frame(_P, b"\x00" + sql + b"\x00" + oid_array16(oids)) + _DESCRIBE_STATEMENT


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def read_rows(stream: ShardStream) -> list[tuple[bytes | None, ...]]:
    """All rows of one small query of ours, read to its ReadyForQuery."""
    rows = []
    while (body := await stream.next_row()) is not None:
        rows.append(backend.decode_data_row(body))
    await stream.until_ready()
    if stream.error is not None:
        raise ShardError(stream.shard, stream.error)
    return rows


def missing_types(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (oid, typmod) pairs `read_types` must ask the catalog about (the rest are cached)."""
    return [p for p in dict.fromkeys(pairs) if p not in _TYPES]


def types_query(missing: Sequence[tuple[int, int]]) -> bytes:
    """The query whose rows `read_types` reads."""
    return _query(_types_sql(missing).encode())


async def read_types(
    stream: ShardStream, missing: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], tuple[str, bool, str]]:
    """(format_type name, collatable, typtype) of the cached built-in types and of `missing`, whose
    `types_query` was written to `stream` (nothing was, if none are missing). Built-in types are kept
    for the life of the process: a run asks the catalog only about a type new to it."""
    known = dict(_TYPES)
    if missing:
        for (oid, typmod), row in zip(missing, await read_rows(stream), strict=True):
            entry = ((row[0] or b"").decode(), row[1] == b"t", (row[2] or b"").decode())
            known[(oid, typmod)] = entry
            if oid < 16384:  # FirstNormalObjectId: built-in types never change
                _TYPES[(oid, typmod)] = entry
    return known


@dataclass(slots=True)
class LeadBind:
    """What the lead answered to the client's Parse, Describe and Bind (`bind_on_lead`)."""

    parsed: bool  # the lead accepted the client's Parse
    error: bytes | None = None  # the replies up to and with the error to send, if they failed
    described: bytes = b""  # the RowDescription body of the client's statement (NoData: no columns)
    prefix: bytes = b""  # the replies before the rows (ParseComplete ... BindComplete, RowDescription)
    parse_prefix: bytes = b""  # those up to the Bind's (a refusal follows them)


async def bind_on_lead(lead: ShardStream, sql: bytes, bound: Bound) -> LeadBind:
    """The client's Parse, Describe and Bind, on the lead: every reply the client gets before its
    rows, as one server words them, and the parameters' types (set in `bound.oids`)."""
    lead.write(
        _parse_describe(sql, bound.declared) + bound.bind(bound.result_formats) + _DESCRIBE_PORTAL
        + frontend.SYNC
    )  # fmt: skip
    parsed = bound_ok = False
    parameters: bytes | None = None
    descriptions: list[bytes] = []
    error: bytes | None = None
    while True:
        msg_type, body = await lead.message()
        if msg_type == _PARSED:
            parsed = True
        elif msg_type == _PARAMS:
            parameters = body
        elif msg_type in (_T, _NO_DATA):
            descriptions.append(frame(msg_type, body))
        elif msg_type == _BOUND:
            bound_ok = True
        elif msg_type == _E and error is None:
            error = frame(_E, body)
        elif msg_type == _N:
            lead.notices.append(body)
        elif msg_type == _Z:
            break
    head = backend.PARSE_COMPLETE if bound.parse is not None and parsed else b""
    if bound.describe_statement and parameters is not None and descriptions:
        head += frame(_PARAMS, parameters) + descriptions[0]
    if error is not None or parameters is None or len(descriptions) < 2 or not bound_ok:
        return LeadBind(parsed, head + (error or backend.error_response("XX000", "unexpected reply to Bind")))
    bound.oids = backend.decode_parameter_description(parameters)
    first = descriptions[0]
    described = first[5:] if first[0] == _T else b"\x00\x00"
    prefix = head + backend.BIND_COMPLETE + (descriptions[1] if bound.describe_portal else b"")
    return LeadBind(parsed, None, described, prefix, head)


def bound_statement_sql(sql: bytes, bound: Bound, formats: Sequence[int] = ()) -> bytes:
    """One query of pgshard's run with the client's parameters (Parse with their types, Bind with
    their values as sent), answered with a RowDescription, then the rows in `formats`. The portal is
    closed: in a block, a later Execute of the client's portal must not find ours."""
    return (
        frame(_P, b"\x00" + sql + b"\x00" + oid_array16(bound.oids)) + bound.bind(formats)
        + _DESCRIBE_PORTAL + _EXECUTE + _CLOSE_PORTAL + frontend.SYNC
    )  # fmt: skip


class _FanoutRead:
    lead: ShardStream  # the lowest shard: Describe, probe and final query run there

    def __init__(
        self,
        session: RoutedSession,
        servers: dict[int, ServerConnection],
        sql: bytes,
        in_block: bool,
        bound: Bound | None = None,
    ):
        self.session = session
        self.sql = sql
        self.in_block = in_block
        self.bound = bound  # None: a simple Query
        self.servers = servers
        self.streams: dict[int, ShardStream] = {}
        self.broken: set[int] = set()  # shards abandoned mid-result: their connections are closed
        self.out: list[bytes] = []
        self.queued = 0
        self.parsed = False  # extended: the lead accepted the client's Parse
        self.described = b""  # extended: the RowDescription body of the client's statement
        self.prefix = b""  # extended: the replies before the rows (ParseComplete ... RowDescription)
        self.parse_prefix = b""  # extended: those up to the Bind's (a refusal follows them)

    # client output -----------------------------------------------------------------------------------
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

    def fail(self, body: bytes) -> bool:
        self.send(body)
        return True

    # the statement ------------------------------------------------------------------------------------
    async def run(self) -> bool:
        """Send the client the answer (without ReadyForQuery); True if it was an error."""
        self.streams = {s: ShardStream(s, server) for s, server in self.servers.items()}
        self.lead = self.streams[min(self.servers)]
        try:
            failed = await self._run()
        except ShardError as exc:
            await self._settle(abandon=False)
            failed = self.fail(self._first_error(exc.fields))
        finally:
            for stream in self.streams.values():
                stream.detach()
        notices = dict.fromkeys(n for s in self.streams.values() for n in s.notices)  # once each, in order
        self.out[:0] = [frame(_N, body) for body in notices]
        await self.flush()
        return failed

    async def _settle(self, abandon: bool) -> None:
        """Bring every shard to ReadyForQuery by reading what is left; with `abandon`, outside a
        transaction block, a shard still sending rows loses its connection instead."""
        for shard, stream in self.streams.items():
            if stream.pending and abandon and not self.in_block and stream.error is None:
                self.broken.add(shard)
            else:
                await drain(stream)

    def _first_error(self, fallback: dict[str, str]) -> bytes:
        for stream in self.streams.values():
            if stream.error is not None:
                return backend.error_response_from_fields(stream.error)
        return backend.error_response_from_fields(fallback)

    def _plan_key(self) -> tuple[bytes, int, int]:
        topology = self.session.router.topology if self.session.router is not None else None
        return (self.sql, id(topology), topology.version if topology is not None else 0)

    async def _plan(self) -> FanoutPlan | Refusal:
        """The statement's plan; cached by its text while it calls no function sqlglot does not know."""
        topology = self.session.router.topology if self.session.router is not None else None
        key = self._plan_key()
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
        text = self.sql.decode("utf-8", "surrogateescape")
        unknown = sorted(anonymous_functions(text))
        aggregates = await self._aggregate_names(unknown) if unknown else []
        sharded = None if topology is None else (lambda t: topology.sharding(t) is not None)
        plan = plan_fanout(text, aggregates, sharded)
        if not unknown:
            _PLANS[key] = plan
            if len(_PLANS) > PLAN_CACHE_SIZE:
                _PLANS.popitem(last=False)
        return plan

    def _statement(self, sql: bytes, formats: Sequence[int] = ()) -> bytes:
        """One query of pgshard's: a simple Query, or with the client's parameters (answered with a
        RowDescription, then the rows in `formats`)."""
        return _query(sql) if self.bound is None else bound_statement_sql(sql, self.bound, formats)

    async def _run(self) -> bool:
        bound = self.bound
        if bound is not None and await self._bind(bound):
            return True
        plan = await self._plan()
        if isinstance(plan, Refusal):
            return await self._refuse(plan.reason)
        partial_sql = plan.partial.encode("utf-8", "surrogateescape")
        client_formats: list[int] = []
        if bound is not None:
            plan = _bound_limits(plan, bound)
            self.send(self.prefix)
            width = len(backend.decode_row_description(self.described))
            client_formats = list(bound.result_formats) * (width if len(bound.result_formats) == 1 else 1)
        # The shards can start at once unless the client's binary results may come from them directly.
        early = plan.aggregate is not None or not any(client_formats)
        text_partial = self._statement(partial_sql)
        if early:
            for stream in self.streams.values():
                if stream is not self.lead:
                    stream.write(text_partial)
        # The lead's partial query goes with its Describe when the last run of the statement needed no
        # probe (checked below): then it starts as soon as the others, and its replies follow the
        # descriptions without a round trip in between. If the hint is wrong (the columns changed),
        # the lead's partial result is dropped and the query runs again there: so only statements
        # that call no function sqlglot does not know (one that may have side effects) are hinted.
        key = self._plan_key()
        speculative = early and key in _PROBE_FREE
        if bound is None:
            describe = _parse_describe(self.sql) + _parse_describe(partial_sql) + frontend.SYNC
        else:
            describe = _parse_describe(partial_sql, bound.oids) + frontend.SYNC
        if speculative:
            self.lead.write(describe + text_partial, 2)
        else:
            self.lead.write(describe)
        descriptions = await self._descriptions()
        if isinstance(descriptions, bytes):  # the other shards are about to fail the same way
            await self._settle(abandon=False)
            return self.fail(descriptions)
        client_description = descriptions[0] if bound is None else self.described
        partial_description = descriptions[-1]
        outputs = backend.decode_row_description(client_description)
        columns = backend.decode_row_description(partial_description)
        visible = len(columns) - plan.hidden
        if plan.aggregate is None and [c.type_oid for c in columns[:visible]] != [
            c.type_oid for c in outputs
        ]:
            await self._settle(abandon=True)
            return self.fail(
                backend.error_response("XX000", "pgshard's per-shard query changed column types")
            )
        wanted = [(c.type_oid, -1) for c in columns]
        if plan.aggregate is not None:
            wanted += [(c.type_oid, c.type_modifier) for c in outputs]
        missing = missing_types(wanted)
        formats = [0] * len(columns) if early else client_formats + [0] * plan.hidden
        probing = bool(missing) or _needs_probe(plan, columns, formats)
        if key in _PLANS:  # it calls no function sqlglot does not know (no nextval(), no user function)
            _remember_probe(key, probing)
        if speculative and probing:  # the columns changed since the last run: the lead runs it again
            await self.lead.until_ready()
            if self.lead.error is not None:  # the statement failed: that is the answer
                raise ShardError(self.lead.shard, self.lead.error)
            speculative = False
        queries = [types_query(missing)] if missing else []
        if probing:
            probe_text = probe_sql(plan.partial, len(columns)).encode("utf-8", "surrogateescape")
            queries.append(self._statement(probe_text))
        if early and not speculative:
            queries.append(text_partial)
        if queries:
            self.lead.write(b"".join(queries), len(queries))  # one write: each is a system call
        types = await self._types(missing)
        probe = (await self._rows(self.lead))[0] if probing else (None,) * (len(columns) + 4)
        collations = [v.decode() if v is not None else None for v in probe[: len(columns)]]
        keys = _merge_keys(
            plan, columns, collations, [v.decode() if v else "" for v in probe[len(columns) :]], formats
        )
        streaming = plan.streamable and keys is not None
        if not early:
            partial = self._statement(partial_sql, formats if streaming else ())
            for stream in self.streams.values():
                stream.write(partial)
        header = frame(_T, client_description) if bound is None else b""
        if streaming:
            assert keys is not None
            return await self._stream(plan, keys, header, visible, columns)
        partial_types = [types[(c.type_oid, -1)] for c in columns]
        output_types = [types[(c.type_oid, c.type_modifier)][0] for c in outputs] if plan.aggregate else []
        return await self._final(plan, header, partial_types, output_types, collations, len(outputs))

    async def _bind(self, bound: Bound) -> bool:
        """The client's Parse, Describe and Bind, on the lead (`bind_on_lead`). True if they failed
        (the error is queued for the client)."""
        lead = await bind_on_lead(self.lead, self.sql, bound)
        self.parsed = lead.parsed
        if lead.error is not None:
            return self.fail(lead.error)
        self.described, self.prefix, self.parse_prefix = lead.described, lead.prefix, lead.parse_prefix
        return False

    async def _aggregate_names(self, unknown: list[str]) -> list[str]:
        """Of the functions of the top query block that sqlglot does not know, the aggregates, as the
        server says (a user-defined aggregate read as a scalar function would give a wrong answer)."""
        names = [n for n in unknown if _PLAIN_NAME.fullmatch(n)]
        odd = [n for n in unknown if n not in names]  # not looked up: taken for aggregates (refused)
        if not names:
            return odd
        listed = ", ".join(_literal(n) for n in names)
        sql = f"SELECT DISTINCT proname::text FROM pg_proc WHERE prokind = 'a' AND proname IN ({listed})"
        self.lead.write(_query(sql.encode()))
        return odd + [row[0].decode() for row in await self._rows(self.lead) if row[0] is not None]

    async def _refuse(self, reason: str) -> bool:
        """0A000, unless the lead rejects the statement itself: then its error, as one server's."""
        if self.bound is not None:  # the lead has accepted it already
            return self.fail(
                self.parse_prefix + backend.error_response("0A000", f"{reason} is not supported")
            )
        self.lead.write(_parse_describe(self.sql) + frontend.SYNC)
        await drain(self.lead)
        if self.lead.error is not None:
            return self.fail(backend.error_response_from_fields(self.lead.error))
        return self.fail(backend.error_response("0A000", f"{reason} is not supported"))

    async def _descriptions(self) -> list[bytes] | bytes:
        """The lead's RowDescriptions (of the client's statement and of the partial query, or of the
        partial query only), or the ErrorResponse to send."""
        found: list[bytes] = []
        while True:
            msg_type, body = await self.lead.message()
            if msg_type in (_T, ord("n")):
                found.append(body if msg_type == _T else b"\x00\x00")
            elif msg_type == _E and self.lead.error is None:
                self.lead.error = backend.decode_error_fields(body)
            elif msg_type == _N:
                self.lead.notices.append(body)
            elif msg_type == _Z:
                break
        error = self.lead.error
        self.lead.error = None
        if error is not None:
            return backend.error_response_from_fields(error)
        return found

    async def _rows(self, stream: ShardStream) -> list[tuple[bytes | None, ...]]:
        return await read_rows(stream)

    async def _types(self, missing: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, bool, str]]:
        return await read_types(self.lead, missing)

    # step 3: stream merge ---------------------------------------------------------------------------
    async def _stream(
        self, plan: FanoutPlan, keys: list[MergeKey], header: bytes, visible: int, columns: Sequence[object]
    ) -> bool:
        streams = list(self.streams.values())
        for stream in streams:
            msg_type, body = await stream.result_message()
            if msg_type != _T or int.from_bytes(body[:2], "big") != len(columns):
                raise ShardError(stream.shard, {"S": "ERROR", "C": "XX000", "M": "unexpected partial result"})
        self.send(header)
        sent = skipped = 0
        cap = self.bound.max_rows if self.bound is not None else -1  # -1: no row limit
        rows = merge_streams(streams, keys, whole=True)  # DataRow messages, passed on as they are
        async for row in rows:
            if skipped < plan.offset:
                skipped += 1
                continue
            if plan.limit is not None and sent >= plan.limit:
                break
            self.send(frame(_D, keep_columns(row[5:], visible)) if plan.hidden else row)
            sent += 1
            if sent == cap:
                break
            if self.queued > 65536:
                await self.flush()
                if self.session.transport is None or self.session.transport.is_closing():
                    break
        await rows.aclose()
        client_gone = self.session.transport is None or self.session.transport.is_closing()
        await self._settle(abandon=plan.limit is None and (client_gone or sent == cap))
        errors = [s for s in streams if s.error is not None]
        if errors:
            raise ShardError(errors[0].shard, errors[0].error or {})
        self.send(_completion(sent, cap))
        return False

    # step 4: final query -----------------------------------------------------------------------------
    async def _final(
        self,
        plan: FanoutPlan,
        header: bytes,
        partial_types: list[tuple[str, bool, str]],
        output_types: list[str],
        collations: list[str | None],
        width: int,
    ) -> bool:
        for name, _collatable, typtype in partial_types:
            if typtype == "p" or name == '"char"':
                await self._settle(abandon=True)
                return self.fail(
                    backend.error_response("0A000", f"a column of type {name} across shards is not supported")
                )
        rows: list[tuple[bytes | None, ...]] = []
        size = 0
        for stream in self.streams.values():
            await stream.result_message()  # RowDescription
            while (body := await stream.next_row()) is not None:
                rows.append(backend.decode_data_row(body))
                size += len(body)
                if len(rows) > MAX_PARTIAL_ROWS or size > MAX_PARTIAL_BYTES:
                    await self._settle(abandon=True)
                    return self.fail(backend.error_response("0A000", _TOO_BIG))
            await stream.until_ready()
        names = [t[0] for t in partial_types]
        used = [c if t[1] else None for c, t in zip(collations, partial_types, strict=True)]
        text = final_sql(plan, names, output_types).encode("utf-8", "surrogateescape")
        final = text.replace(ROWS.encode(), _rows_relation(names, used, rows), 1)
        self.lead.write(self._statement(final, self.bound.result_formats if self.bound else ()))
        msg_type, body = await self.lead.result_message()
        if msg_type != _T or len(backend.decode_row_description(body)) != width:
            raise ShardError(self.lead.shard, {"S": "ERROR", "C": "XX000", "M": "unexpected final result"})
        self.send(header)
        sent = 0
        cap = self.bound.max_rows if self.bound is not None else -1
        while (body := await self.lead.next_row()) is not None:
            if sent == cap:
                continue  # Execute's row limit: the rest is read and dropped
            self.send(frame(_D, body))
            sent += 1
            if self.queued > 65536:
                await self.flush()
        await self.lead.until_ready()
        self.send(_completion(sent, cap))
        return False


def _completion(sent: int, cap: int) -> bytes:
    """CommandComplete; with an Execute row limit that was reached, PortalSuspended, as PostgreSQL
    answers it (it cannot know whether more rows would follow)."""
    return backend.PORTAL_SUSPENDED if sent == cap else backend.command_complete(f"SELECT {sent}")


def _remember_probe(key: tuple[bytes, int, int], probing: bool) -> None:
    if probing:
        _PROBE_FREE.pop(key, None)
    elif key not in _PROBE_FREE:
        _PROBE_FREE[key] = None
        if len(_PROBE_FREE) > PLAN_CACHE_SIZE:
            _PROBE_FREE.popitem(last=False)


def _needs_probe(plan: FanoutPlan, columns: Sequence[FieldDescription], formats: Sequence[int]) -> bool:
    """Whether the merge depends on what only the probe tells (every column's type is cached): a
    collatable column's collation (text keys, the final query's typed rows), or the DateStyle a date
    or time key is written in. Without one, the probe's round trip and planning are saved."""
    if any(_TYPES[(c.type_oid, -1)][1] for c in columns):
        return True
    if not plan.streamable:
        return False
    for key in plan.keys:
        index = key.index(len(columns), plan.hidden)
        if columns[index].type_oid in _DATE_TYPES and not formats[index]:
            return True
    return False


def _merge_keys(
    plan: FanoutPlan,
    columns: Sequence[FieldDescription],
    collations: list[str | None],
    settings: list[str],
    formats: Sequence[int],
) -> list[MergeKey] | None:
    """The sort keys as Python can compare them, or None if one of them cannot be (a type it cannot
    read exactly, text in a collation that is not byte order, dates not in ISO DateStyle). `formats`:
    each partial column's format code (1: the client asked for binary and the shards send it)."""
    datestyle, encoding, datcollate, provider = settings
    keys: list[MergeKey] = []
    for key in plan.keys:
        index = key.index(len(columns), plan.hidden)
        bytewise = byte_order(collations[index], datcollate, provider) and encoding.upper() in (
            "UTF8",
            "SQL_ASCII",
        )
        oid = columns[index].type_oid
        if formats[index]:
            convert = binary_column_key(oid, bytewise)
        else:
            convert = column_key(oid, bytewise, datestyle.upper().startswith("ISO"))
        if convert is None:
            return None
        keys.append(MergeKey(index, convert, key.descending, key.nulls_first))
    return keys


def _bound_count(sql: str | None, bound: Bound) -> int | None:
    """A LIMIT or OFFSET's value for this Bind: a number, None for none (absent, ALL, NULL), or
    _UNKNOWN (an expression, a parameter not bound to a non-negative integer)."""
    if sql is None or sql.upper() in ("ALL", "NULL"):
        return None
    if sql.isdigit():
        return int(sql)
    m = _PARAM.fullmatch(sql)
    index = int(m.group(1)) - 1 if m else -1
    if not 0 <= index < min(len(bound.values), len(bound.oids)) or bound.oids[index] not in _INT_TYPES:
        return _UNKNOWN
    value = bound.values[index]
    formats = bound.param_formats
    if value is None:
        return None
    if (formats[0] if len(formats) == 1 else formats[index] if formats else 0) == 1:
        number = int.from_bytes(value, "big", signed=True) if len(value) in (2, 4, 8) else _UNKNOWN
    else:
        number = int(value) if _COUNT.fullmatch(value) else _UNKNOWN
    return number if number >= 0 else _UNKNOWN


def _bound_limits(plan: FanoutPlan, bound: Bound) -> FanoutPlan:
    """LIMIT $n / OFFSET $n read from the Bind, so that the rows can be merged as streams."""
    if plan.streamable or plan.aggregate is not None or plan.distinct or plan.distinct_on:
        return plan
    limit, offset = _bound_count(plan.limit_sql, bound), _bound_count(plan.offset_sql, bound)
    if limit == _UNKNOWN or offset == _UNKNOWN:
        return plan
    return replace(plan, streamable=True, limit=limit, offset=offset or 0)


def _types_sql(pairs: Sequence[tuple[int, int]]) -> str:
    oids = ",".join(str(o) for o, _ in pairs)
    mods = ",".join(str(m) for _, m in pairs)
    return (
        "SELECT format_type(t.o, t.m), coalesce(y.typcollation <> 0, false), y.typtype "
        f"FROM unnest('{{{oids}}}'::oid[], '{{{mods}}}'::int4[]) WITH ORDINALITY AS t(o, m, i) "
        "LEFT JOIN pg_type y ON y.oid = t.o ORDER BY t.i"
    )
