"""Reads across shards that need more than concatenation: ORDER BY, LIMIT/OFFSET, aggregates,
GROUP BY, HAVING, DISTINCT, UNION (issue 4). The client gets exactly what one PostgreSQL holding every
row would send, or 0A000 naming the construct (DESIGN.md, principle 4 and "Rules for the corners").

One statement, on server connections taken in shard order; the lowest shard is the lead:
1. every other shard starts the partial query (`parser.fanout`) at once; the lead first answers a
   Parse + Describe of the client's own statement (the RowDescription the client will see, and the
   server's own error for a statement it rejects) and of the partial query;
2. the lead then runs a probe (each partial column's collation, DateStyle, client_encoding, the
   database's collation) and, when a type is new to this process, pg_catalog.format_type;
3. ordered rows without DISTINCT whose keys Python can compare exactly (`router.merge.column_key`)
   are merged as streams, with OFFSET/LIMIT applied, memory bounded by shards x the read buffer;
4. otherwise the partial rows (bounded: MAX_PARTIAL_ROWS, MAX_PARTIAL_BYTES) go to the lead in a
   final query that re-aggregates, filters (HAVING), deduplicates, orders and limits them with
   PostgreSQL's own semantics (collation, numeric scale, result types).
Simple Query only, text format. Extended-protocol reads across shards (whose results may be binary)
are still refused with 0A000 by `proxy.multishard.run_group`.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from parser.fanout import ROWS, FanoutPlan, Refusal, anonymous_functions, final_sql, plan_fanout, probe_sql
from parser.fanout import rows_relation as _rows_relation
from parser.plan import StatementKind
from pooler.server_connection import ServerConnection, ServerError
from proxy import multishard
from proxy.protocol import backend, frontend
from proxy.protocol.backend_messages import FieldDescription
from router.merge import (
    MergeKey,
    ShardError,
    ShardStream,
    byte_order,
    column_key,
    drain,
    keep_columns,
    merge_streams,
)
from router.scatter import frame

if TYPE_CHECKING:
    from proxy.routed_session import RoutedSession
    from router.route import Route

MAX_PARTIAL_ROWS = 1_000_000  # partial rows a final query may read (aggregate groups, bounded sorts)
MAX_PARTIAL_BYTES = 64 << 20  # and their bytes: the final query's text is about that long
_CLIENT_HIGH_WATER = 1 << 20  # bytes queued to a slow client before the merge waits
_D, _T, _C, _E, _Z, _N = (ord(c) for c in "DTCEZN")
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
    shards = sorted(set(multishard._shards_of(session, route)))
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
    read = _FanoutRead(session, servers, message[5:-1], in_block=dist is not None or bool(held))
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
        multishard._reply(session, b"", _FAILED if failed else _IN_BLOCK)
    elif held:
        session.distributed = multishard.DistributedTransaction(begin=held, servers=servers, failed=failed)
        session.held = []
        multishard._reply(session, b"", _FAILED if failed else _IN_BLOCK)
    else:
        broken = {s: servers.pop(s) for s in read.broken}
        multishard.release(session, broken, broken=True)
        multishard.release(session, servers)
        multishard._reply(session, b"", _IDLE)


def _query(sql: bytes) -> bytes:
    return frame(ord("Q"), sql + b"\x00")


def _parse_describe(sql: bytes) -> bytes:
    return frame(ord("P"), b"\x00" + sql + b"\x00\x00\x00") + frontend.describe(b"S")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class _FanoutRead:
    lead: ShardStream  # the lowest shard: Describe, probe and final query run there

    def __init__(
        self, session: RoutedSession, servers: dict[int, ServerConnection], sql: bytes, in_block: bool
    ):
        self.session = session
        self.sql = sql
        self.in_block = in_block
        self.servers = servers
        self.streams: dict[int, ShardStream] = {}
        self.broken: set[int] = set()  # shards abandoned mid-result: their connections are closed
        self.out: list[bytes] = []
        self.queued = 0

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

    async def _plan(self) -> FanoutPlan | Refusal:
        """The statement's plan; cached by its text while it calls no function sqlglot does not know."""
        topology = self.session.router.topology if self.session.router is not None else None
        key = (self.sql, id(topology), topology.version if topology is not None else 0)
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

    async def _run(self) -> bool:
        plan = await self._plan()
        if isinstance(plan, Refusal):
            return await self._refuse(plan.reason)
        partial = _query(plan.partial.encode("utf-8", "surrogateescape"))
        for stream in self.streams.values():
            if stream is not self.lead:
                stream.write(partial)
        self.lead.write(
            _parse_describe(self.sql) + _parse_describe(plan.partial.encode("utf-8", "surrogateescape"))
            + frontend.SYNC
        )  # fmt: skip
        descriptions = await self._descriptions()
        if isinstance(descriptions, bytes):  # the other shards are about to fail the same way
            await self._settle(abandon=False)
            return self.fail(descriptions)
        client_description, partial_description = descriptions
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
        missing = [w for w in dict.fromkeys(wanted) if w not in _TYPES]
        if missing:
            self.lead.write(_query(_types_sql(missing).encode()))
        self.lead.write(_query(probe_sql(plan.partial, len(columns)).encode("utf-8", "surrogateescape")))
        self.lead.write(partial)
        types = await self._types(missing)
        probe = (await self._rows(self.lead))[0]
        collations = [v.decode() if v is not None else None for v in probe[: len(columns)]]
        keys = _merge_keys(
            plan, columns, collations, [v.decode() if v else "" for v in probe[len(columns) :]]
        )
        header = frame(_T, client_description)
        if plan.streamable and keys is not None:
            return await self._stream(plan, keys, header, visible, columns)
        partial_types = [types[(c.type_oid, -1)] for c in columns]
        output_types = [types[(c.type_oid, c.type_modifier)][0] for c in outputs] if plan.aggregate else []
        return await self._final(plan, header, partial_types, output_types, collations, len(outputs))

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
        self.lead.write(_parse_describe(self.sql) + frontend.SYNC)
        await drain(self.lead)
        if self.lead.error is not None:
            return self.fail(backend.error_response_from_fields(self.lead.error))
        return self.fail(backend.error_response("0A000", f"{reason} is not supported"))

    async def _descriptions(self) -> tuple[bytes, bytes] | bytes:
        """The lead's RowDescriptions of the client's statement and of the partial query, or the
        ErrorResponse to send."""
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
        return found[0], found[1]

    async def _rows(self, stream: ShardStream) -> list[tuple[bytes | None, ...]]:
        """All rows of one small query of ours, read to its ReadyForQuery."""
        rows = []
        while (body := await stream.next_row()) is not None:
            rows.append(backend.decode_data_row(body))
        await stream.until_ready()
        if stream.error is not None:
            raise ShardError(stream.shard, stream.error)
        return rows

    async def _types(self, missing: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, bool, str]]:
        known = dict(_TYPES)
        if missing:
            for (oid, typmod), row in zip(missing, await self._rows(self.lead), strict=True):
                entry = ((row[0] or b"").decode(), row[1] == b"t", (row[2] or b"").decode())
                known[(oid, typmod)] = entry
                if oid < 16384:  # FirstNormalObjectId: built-in types never change
                    _TYPES[(oid, typmod)] = entry
        return known

    # step 3: stream merge ---------------------------------------------------------------------------
    async def _stream(
        self, plan: FanoutPlan, keys: list[MergeKey], header: bytes, visible: int, columns: Sequence[object]
    ) -> bool:
        streams = list(self.streams.values())
        for stream in streams:
            msg_type, body = await stream.result_message()
            if msg_type != _T or len(backend.decode_row_description(body)) != len(columns):
                raise ShardError(stream.shard, {"S": "ERROR", "C": "XX000", "M": "unexpected partial result"})
        self.send(header)
        sent = skipped = 0
        rows = merge_streams(streams, keys)
        async for body in rows:
            if skipped < plan.offset:
                skipped += 1
                continue
            if plan.limit is not None and sent >= plan.limit:
                break
            if plan.hidden:
                body = keep_columns(body, visible)
            self.send(frame(_D, body))
            sent += 1
            if self.queued > 65536:
                await self.flush()
                if self.session.transport is None or self.session.transport.is_closing():
                    break
        await rows.aclose()
        client_gone = self.session.transport is None or self.session.transport.is_closing()
        await self._settle(abandon=plan.limit is None and client_gone)
        errors = [s for s in streams if s.error is not None]
        if errors:
            raise ShardError(errors[0].shard, errors[0].error or {})
        self.send(backend.command_complete(f"SELECT {sent}"))
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
        self.lead.write(_query(final))
        msg_type, body = await self.lead.result_message()
        if msg_type != _T or len(backend.decode_row_description(body)) != width:
            raise ShardError(self.lead.shard, {"S": "ERROR", "C": "XX000", "M": "unexpected final result"})
        self.send(header)
        sent = 0
        while (body := await self.lead.next_row()) is not None:
            self.send(frame(_D, body))
            sent += 1
            if self.queued > 65536:
                await self.flush()
        await self.lead.until_ready()
        self.send(backend.command_complete(f"SELECT {sent}"))
        return False


def _merge_keys(
    plan: FanoutPlan, columns: Sequence[FieldDescription], collations: list[str | None], settings: list[str]
) -> list[MergeKey] | None:
    """The sort keys as Python can compare them, or None if one of them cannot be (a type it cannot
    read exactly, text in a collation that is not byte order, dates not in ISO DateStyle)."""
    datestyle, encoding, datcollate, provider = settings
    keys: list[MergeKey] = []
    for key in plan.keys:
        index = key.index(len(columns), plan.hidden)
        bytewise = byte_order(collations[index], datcollate, provider) and encoding.upper() in (
            "UTF8",
            "SQL_ASCII",
        )
        convert = column_key(columns[index].type_oid, bytewise, datestyle.upper().startswith("ISO"))
        if convert is None:
            return None
        keys.append(MergeKey(index, convert, key.descending, key.nulls_first))
    return keys


def _types_sql(pairs: Sequence[tuple[int, int]]) -> str:
    oids = ",".join(str(o) for o, _ in pairs)
    mods = ",".join(str(m) for _, m in pairs)
    return (
        "SELECT format_type(t.o, t.m), coalesce(y.typcollation <> 0, false), y.typtype "
        f"FROM unnest('{{{oids}}}'::oid[], '{{{mods}}}'::int4[]) WITH ORDINALITY AS t(o, m, i) "
        "LEFT JOIN pg_type y ON y.oid = t.o ORDER BY t.i"
    )
