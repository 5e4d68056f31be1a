"""Statements and transactions that need more than one shard.

Server connections are taken in shard order, so two fan-outs can never deadlock on the pools. A
write that touches several shards outside a transaction block runs in a transaction on each and is
committed only when every shard succeeded. A transaction block that grows to a second shard becomes
a DistributedTransaction: its BEGIN and savepoints are replayed on each shard that joins, and COMMIT
commits each shard in turn. That last step is not yet atomic across shards (two-phase commit is
issue 5); until then a failure between two shards' COMMITs can leave one committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parser.statements import leading_words
from pooler.server_connection import ServerConnection, ServerError
from proxy import copy_in, copy_out, fanout_read, prepared, union_read
from proxy.copy_options import CopyStatementError, parse_copy
from proxy.log import log
from proxy.protocol import backend, frontend
from router.route import Broadcast
from router.scatter import frame, merge_replies, query_timeout_error, scatter
from router.twophase import commit_two_phase

if TYPE_CHECKING:
    from proxy.routed_session import RoutedSession
    from router.routing import Route

_IDLE, _IN_BLOCK, _FAILED = b"I", b"T", b"E"
_ABORTED = "current transaction is aborted, commands ignored until end of transaction block"
ABORTED = _ABORTED
_P, _B, _D, _E, _C, _H, _S = b"PBDECHS"


@dataclass(slots=True)
class DistributedTransaction:
    """A client's transaction block open on several shards."""

    begin: list[bytes]  # Query messages (BEGIN, SAVEPOINT ...) to replay on shards that join
    servers: dict[int, ServerConnection] = field(default_factory=dict)
    failed: bool = False
    wrote: set[int] = field(default_factory=set)  # shards that must be prepared; the rest just commit
    doomed: bool = False  # its connections were closed (a shard timed out): only its end is accepted


# server connections ---------------------------------------------------------------------------------
async def _prepare(session: RoutedSession, server: ServerConnection) -> None:
    """Bring a server to the client's session state before it runs anything of the client's."""
    server.take_inbox()
    assert session.state is not None
    replay = session.state.replay_sql(server.session_state)
    if replay is not None:
        try:
            await server.run_simple(replay)
        except ServerError as exc:
            log.warning("replaying session state failed", server=server.target.label, error=exc.message)
        server.session_state = session.state.params


async def acquire(session: RoutedSession, shards: Sequence[int]) -> dict[int, ServerConnection]:
    """Server connections for `shards`, taken in shard order."""
    got: dict[int, ServerConnection] = {}
    try:
        for shard in sorted(set(shards)):
            server = session.parked.pop(shard, None) or await session.pools[shard].acquire()
            got[shard] = server
            await _prepare(session, server)
    except BaseException:
        release(session, got, broken=True)
        raise
    return got


def release(session: RoutedSession, servers: dict[int, ServerConnection], broken: bool = False) -> None:
    for shard, server in servers.items():
        if broken or server.closed:
            server.pool.discard(server)
        elif session.mode == "session" or session.pinned is not None:
            session.parked[shard] = server
        else:
            server.pool.release(server)


async def _run_each(servers: dict[int, ServerConnection], sql: str) -> list[ServerError]:
    """Run one statement of ours on every server; the errors, if any."""
    results = await asyncio.gather(*(s.run_simple(sql) for s in servers.values()), return_exceptions=True)
    errors: list[ServerError] = []
    for result in results:
        if isinstance(result, ServerError):
            errors.append(result)
        elif isinstance(result, BaseException):
            raise result
    return errors


async def _replay_begin(servers: dict[int, ServerConnection], begin: list[bytes]) -> None:
    for message in begin:
        errors = await _run_each(servers, message[5:-1].decode())
        if errors:
            raise errors[0]


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def run_each_or_raise(servers: dict[int, ServerConnection], sql: str) -> None:
    errors = await _run_each(servers, sql)
    if errors:
        raise errors[0]


async def rollback_quietly(servers: dict[int, ServerConnection]) -> None:
    with contextlib.suppress(OSError):
        await _run_each(servers, "ROLLBACK")


async def open_block_on(session: RoutedSession, shards: Sequence[int]) -> DistributedTransaction | None:
    """Inside a client's transaction block: that block, now open on `shards` too; else None."""
    dist = session.distributed
    if dist is None and session.held:
        dist = DistributedTransaction(begin=session.held)
        session.held = []
        session.distributed = dist
    if dist is None:
        return None
    await _join(session, dist, shards)
    return dist


async def _copy(session: RoutedSession, route: Route, message: bytes) -> bool:
    """A COPY over several shards, or any COPY inside a block open on several: pgshard runs the COPY
    sub-protocol itself (`proxy.copy_in`, `proxy.copy_out`); False if this is not a COPY it runs."""
    assert session.router is not None
    plan = session.router.plan(message[5:-1]).copy
    if plan is None or route.statements is not None:
        return False
    dist = session.distributed
    if session.pinned_shard is not None:
        shards = [session.pinned_shard]
    else:
        shards = sorted(set(_shards_of(session, route))) or [next(iter(dist.servers)) if dist else 0]
    if plan.direction == "from":
        if plan.table is None:
            return False
        await copy_in.run_copy_in(session, message, plan, shards)
        return True
    header = False
    if len(shards) > 1:
        refusal: str | None = None
        names = _merge_names(route)
        try:
            statement = parse_copy(message[5:-1].decode("utf-8", "replace"))
        except CopyStatementError as exc:
            refusal = exc.message
        else:
            header = statement.options.header
            if statement.endpoint != "stdout":
                refusal = "COPY TO a file or program from several shards is not supported: use TO STDOUT"
        if names:
            refusal = (
                f"COPY (query) TO with {', '.join(names)} over several shards is not supported: COPY "
                "gathers each shard's rows as they come, it does not merge them"
            )
        elif route.write:
            refusal = "COPY of a data-modifying query's rows over several shards is not supported"
        if refusal is not None:
            _refuse(session, refusal)
            return True
    await copy_out.run_copy_out(session, message, shards, header, write=route.write)
    return True


def _refuse(session: RoutedSession, message: str) -> None:
    """A statement pgshard will not run: 0A000, failing the client's transaction block if any."""
    if session.distributed is not None:
        session.distributed.failed = True
    elif session.held:
        session.held_failed = True
    status = _FAILED if session.distributed is not None or session.held else _IDLE
    _reply(session, backend.error_response("0A000", message), status)


def reply(session: RoutedSession, body: bytes, status: bytes | None) -> None:
    _reply(session, body, status)


def _reply(session: RoutedSession, body: bytes, status: bytes | None) -> None:
    """The reply and its ReadyForQuery (none when the client's messages ended in Flush)."""
    if session.transport is not None and not session.transport.is_closing():
        session.transport.write(body if status is None else body + backend.ready_for_query(status))


def _error_body(error: ServerError) -> bytes:
    if error.fields:
        return backend.error_response_from_fields(error.fields)
    return backend.error_response(error.sqlstate, error.message)


_MERGE_CONSTRUCTS = (
    ("order_by", "ORDER BY"),
    ("limit", "LIMIT"),
    ("offset", "OFFSET"),
    ("aggregates", "aggregate functions"),
    ("group_by", "GROUP BY"),
    ("distinct", "DISTINCT"),
    ("window", "window functions"),
    ("having", "HAVING"),
)


def unsupported_reason(route: Route) -> str | None:
    """Why a route that needs several shards cannot be answered correctly (yet), or None.

    Never a wrong answer (DESIGN.md, principle 4): a read the merger cannot combine is refused.
    """
    if route.statements is not None:
        return "a multi-statement query whose statements need different shards; send them one at a time"
    if route.kind.value == "copy":
        return "COPY over several shards in the extended query protocol (send it as a simple Query)"
    names = _merge_names(route)
    return f"{', '.join(names)} in a query that reads several shards" if names else None


def _merge_names(route: Route) -> list[str]:
    """The constructs of a read over several shards that need a merge, not a concatenation."""
    merge = route.merge
    if merge is None or not merge.any:
        return []
    names = [name for attr, name in _MERGE_CONSTRUCTS if getattr(merge, attr)]
    if merge.set_operation:
        names.append(merge.set_operation.upper())
    return names


def _shards_of(session: RoutedSession, route: Route) -> list[int]:
    if route.split is not None:
        return [shard for shard, _ in route.split]
    if route.all_shards:
        return list(range(len(session.pools)))
    return list(route.shards)


def _payloads(route: Route, message: bytes, shards: list[int]) -> list[bytes]:
    if route.split is not None:
        texts = dict(route.split)
        return [frontend.query(texts[shard]) for shard in shards]
    return [message] * len(shards)


def _timeout(session: RoutedSession) -> float | None:
    return session.query_timeout


# simple Query ---------------------------------------------------------------------------------------
async def run_query(session: RoutedSession, route: Route, message: bytes) -> None:
    """A statement that needs several shards, outside a transaction or as the first of a held block."""
    if session.server is not None and session.status != _IDLE[0]:
        # A block open on the linked shard grows to the others: nothing may run outside it.
        await grow_and_run(session, session.shard, [message])
        return
    if fanout_read.is_fanout_read(route):
        await fanout_read.run_fanout_read(session, route, message)
        return
    if route.parts is not None:
        await union_read.run_union_read(session, route, message)
        return
    if route.kind.value == "copy" and await _copy(session, route, message):
        return
    unsupported = unsupported_reason(route)
    if unsupported:
        _reply(session, backend.error_response("0A000", unsupported), _FAILED if session.held else _IDLE)
        if session.held:
            session.held_failed = True
        return
    shards = sorted(set(_shards_of(session, route)))
    in_block = bool(session.held)
    atomic = in_block or (route.write and len(shards) > 1)
    servers = await acquire(session, shards)
    try:
        if in_block:
            await _replay_begin(servers, session.held)
        elif atomic:
            errors = await _run_each(servers, "BEGIN")
            if errors:
                raise errors[0]
        payloads = _payloads(route, message, shards)
        replies = await scatter(list(servers.items()), payloads, 1, _timeout(session))
    except BaseException:
        release(session, servers, broken=True)
        raise
    body, error = merge_replies(replies, same=route.broadcast_kind is Broadcast.SAME)
    if in_block:
        session.distributed = DistributedTransaction(
            begin=session.held, servers=servers, failed=error is not None
        )
        session.held = []
        _reply(session, body, _FAILED if error else _IN_BLOCK)
        return
    if atomic:
        body, error, broken = await _finish_implicit(session, servers, body, error)
        release(session, servers, broken=broken)
    else:
        release(session, servers)
    _reply(session, body, _IDLE)


async def _finish_implicit(
    session: RoutedSession, servers: dict[int, ServerConnection], body: bytes, error: dict[str, str] | None
) -> tuple[bytes, dict[str, str] | None, bool]:
    """Commit an implicit multi-shard transaction if every shard succeeded, else roll back all.

    Returns (reply, error fields, whether the connections must be discarded).
    """
    if error is not None:
        await _run_each(servers, "ROLLBACK")
        return body, error, False
    try:
        await commit(session, servers, None)
    except ServerError as exc:
        return _error_body(exc), exc.fields or {"C": exc.sqlstate}, True
    return body, None, False


async def commit(
    session: RoutedSession, servers: dict[int, ServerConnection], wrote: set[int] | None
) -> None:
    """Commit on every shard: two-phase when configured and several shards wrote, else one by one."""
    coordinator = session.app.coordinators.get(session.database)
    if coordinator is not None and len(servers) > 1:
        await commit_two_phase(servers, wrote, coordinator.decision_log, coordinator.gid_prefix)
        return
    errors = await _run_each(servers, "COMMIT")
    if errors:
        raise errors[0]


async def grow_and_run(session: RoutedSession, shard: int, messages: list[bytes]) -> None:
    """The linked server's transaction block needs another shard: it becomes distributed."""
    server = session.server
    assert server is not None
    session.server = None
    server.sink = None
    dist = DistributedTransaction(begin=session.block_begin or [frontend.query("BEGIN")])
    dist.servers[session.shard] = server
    dist.wrote.add(session.shard)  # what ran there passed through unexamined: assume it wrote
    dist.failed = session.status == _FAILED[0]
    session.shard = -1
    session.distributed = dist
    if messages and messages[0][0] == ord("Q"):
        for message in messages:
            await run_query_in_transaction(session, message)
        return
    group = [(m[0], m, session._route_of(m)) for m in messages]
    await run_group(session, group)


async def _join(session: RoutedSession, dist: DistributedTransaction, shards: Sequence[int]) -> None:
    """Shards a distributed transaction has not touched yet: begin there, replaying savepoints."""
    new = [s for s in shards if s not in dist.servers]
    if not new:
        return
    joined = await acquire(session, new)
    try:
        await _replay_begin(joined, dist.begin)
    except BaseException:
        release(session, joined, broken=True)
        raise
    dist.servers.update(joined)
    dist.servers = dict(sorted(dist.servers.items()))


async def run_query_in_transaction(session: RoutedSession, message: bytes) -> None:
    dist = session.distributed
    assert dist is not None and session.router is not None
    sql = message[5:-1]
    text = sql.decode("utf-8", "replace")
    if control_kind(text) in ("end", "savepoint"):
        body, _ = await transaction_control(session, dist, text)
        _reply(session, body, block_status(session))
        return
    if dist.failed:
        _reply(session, backend.error_response("25P02", _ABORTED), _FAILED)
        return
    state = session.state
    route = session.router.route_simple(sql, state.client_encoding if state is not None else None)
    if route.error is not None:
        dist.failed = True
        _reply(session, backend.error_response(*route.error), _FAILED)
        return
    if route.kind.value == "copy" and await _copy(session, route, message):
        return
    if (
        fanout_read.is_fanout_read(route)
        and session.pinned_shard is None
        and len(_shards_of(session, route)) > 1
    ):
        await fanout_read.run_fanout_read(session, route, message)
        return
    if route.parts is not None and session.pinned_shard is None:
        await union_read.run_union_read(session, route, message)
        return
    unsupported = unsupported_reason(route)
    if unsupported and len(_shards_of(session, route)) > 1:
        dist.failed = True
        _reply(session, backend.error_response("0A000", unsupported), _FAILED)
        return
    shards = _shards_of(session, route) or [next(iter(dist.servers))]
    if session.pinned_shard is not None:
        shards = [session.pinned_shard]
    await _join(session, dist, shards)
    targets = [(s, dist.servers[s]) for s in sorted(set(shards))]
    if route.write:
        dist.wrote.update(s for s, _ in targets)
    replies = await scatter(targets, _payloads(route, message, [s for s, _ in targets]), 1, _timeout(session))
    body, error = merge_replies(replies, same=route.broadcast_kind is Broadcast.SAME)
    dist.failed = error is not None
    _reply(session, body, _FAILED if dist.failed else _IN_BLOCK)


async def _end(session: RoutedSession, dist: DistributedTransaction, commit_block: bool) -> bytes:
    """COMMIT (two-phase when several shards wrote) or ROLLBACK on every shard of the block; the reply."""
    session.distributed = None
    if commit_block and not dist.failed:
        try:
            await commit(session, dist.servers, dist.wrote)
        except ServerError as exc:
            release(session, dist.servers, broken=True)
            return _error_body(exc)
        release(session, dist.servers)
        return frame(ord("C"), b"COMMIT\x00")
    errors = await _run_each(dist.servers, "ROLLBACK")
    release(session, dist.servers, broken=bool(errors))
    return frame(ord("C"), b"ROLLBACK\x00")


# transaction control --------------------------------------------------------------------------------
_CHAIN = re.compile(r"\bAND\s+(NO\s+)?CHAIN\s*;?\s*$", re.IGNORECASE)
_END_WORDS = ("COMMIT", "END", "ROLLBACK", "ABORT")
_BEGIN_TAGS = {"BEGIN": b"BEGIN", "START": b"START TRANSACTION"}


def control_kind(sql: str) -> str | None:
    """'begin', 'end' (COMMIT, ROLLBACK ...), 'savepoint' (SAVEPOINT, RELEASE, ROLLBACK TO) or None.

    Why: these change the block itself, so pgshard answers or spreads them instead of routing them.
    """
    first, second, _ = leading_words(sql[:64])
    if first in _BEGIN_TAGS:
        return "begin"
    if first in ("SAVEPOINT", "RELEASE") or (first == "ROLLBACK" and second == "TO"):
        return "savepoint"
    if first in _END_WORDS and second != "PREPARED":
        return "end"
    return None


def _exits_failed_block(sql: str) -> bool:
    """What PostgreSQL still accepts in a failed block (IsTransactionExitStmt): COMMIT, ROLLBACK [TO]."""
    first, _, _ = leading_words(sql[:64])
    return control_kind(sql) == "end" or first == "ROLLBACK"


def is_chained(sql: str) -> bool:
    m = _CHAIN.search(sql)
    return m is not None and m.group(1) is None


def block_status(session: RoutedSession) -> bytes:
    """The ReadyForQuery status of a client whose block is answered by pgshard (held or distributed)."""
    dist = session.distributed
    if dist is not None:
        return _FAILED if dist.failed else _IN_BLOCK
    if session.held:
        return _FAILED if session.held_failed else _IN_BLOCK
    return _IDLE


async def transaction_control(
    session: RoutedSession, dist: DistributedTransaction, sql: str
) -> tuple[bytes, bool]:
    """COMMIT/ROLLBACK/savepoints of a distributed block, as PostgreSQL answers them: (reply, ok).

    Why: the block lives on several shards, so each of these must reach every one of them (COMMIT
    through two-phase commit), and a failed block still takes ROLLBACK and ROLLBACK TO.
    """
    first, _, _ = leading_words(sql[:64])
    if control_kind(sql) == "end":
        chain = is_chained(sql)
        begin = dist.begin[0]
        body = await _end(session, dist, commit_block=first in ("COMMIT", "END"))
        if chain and body[:1] == b"C":
            # AND CHAIN: a new block with the same characteristics, held until a statement needs a shard.
            session.held = [begin]
            session.held_failed = False
        return body, body[:1] == b"C"
    if dist.failed and (not _exits_failed_block(sql) or dist.doomed):
        return backend.error_response("25P02", _ABORTED), False
    message = frontend.query(sql)
    replies = await scatter(list(dist.servers.items()), [message] * len(dist.servers), 1, _timeout(session))
    body, error = merge_replies(replies, same=True)
    if error is None:
        dist.begin.append(message)  # shards that join later replay it
        if first == "ROLLBACK":
            dist.failed = False
    else:
        dist.failed = True
    return body, error is None


def _parse_text(message: bytes) -> bytes:
    body = message[5:]
    name_end = body.index(b"\x00")
    return body[name_end + 1 : body.index(b"\x00", name_end + 1)]


def group_texts(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> list[str | None]:
    """The SQL each Parse and Bind of `group` names (None for other messages, or when unknown)."""
    named: dict[bytes, bytes] = {}
    unnamed: bytes | None = session.unnamed_sql_before
    texts: list[str | None] = []
    for msg_type, message, _ in group:
        text: bytes | None = None
        if msg_type == _P:
            text = _parse_text(message)
            if message[5] == 0:
                unnamed = text
            else:
                named[message[5 : message.index(b"\x00", 5)]] = text
        elif msg_type == _B:
            name = prepared.bind_statement_name(message[5:])
            if not name:
                text = unnamed
            else:
                stmt = session.statements.get(name)
                text = named.get(name, stmt.query if stmt is not None else None)
        texts.append(None if text is None else text.decode("utf-8", "replace"))
    return texts


def control_group(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> str | None:
    """'local' when pgshard must answer this extended-protocol group of transaction control itself,
    'mixed' when it mixes such control with other statements in a block pgshard spreads, else None.

    Why: in a block held by pgshard or open on several shards, COMMIT, ROLLBACK and savepoints must
    reach every shard (or none yet), which one routed group cannot do.
    """
    idle = session.distributed is None and not session.held
    kinds = [
        control_kind(text) if text is not None else None
        for (msg_type, _, _), text in zip(group, group_texts(session, group), strict=True)
        if msg_type in (_P, _B)
    ]
    if not kinds:
        return None
    if idle:
        return "local" if all(kind == "begin" for kind in kinds) else None
    controls = [kind in ("end", "savepoint") for kind in kinds]
    if all(controls):
        return "local"
    return "mixed" if any(controls) else None


async def run_control_group(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> None:
    """Parse/Bind/Describe/Execute of BEGIN, COMMIT, ROLLBACK and savepoints, answered as PostgreSQL
    would: BEGIN is held, the others act on the held block or on every shard of a distributed one."""
    out: list[bytes] = []
    ok = True
    portal: str | None = None
    for (msg_type, message, _), text in zip(group, group_texts(session, group), strict=True):
        if msg_type in (_P, _B):
            assert text is not None
            if _block_failed(session) and not _exits_failed_block(text):
                out.append(backend.error_response("25P02", _ABORTED))
                ok = False
                break
            if msg_type == _P:
                if message[5] != 0:
                    name, stmt = session._prepared_from_parse(message[5:])
                    session.statements[name] = stmt
                out.append(backend.PARSE_COMPLETE)
            else:
                portal = text
                out.append(backend.BIND_COMPLETE)
        elif msg_type == _D:
            if message[5] == ord("S"):
                out.append(backend.parameter_description([]))
            out.append(backend.NO_DATA)
        elif msg_type == _C:
            if message[5] == ord("S") and message[6] != 0:
                session.statements.pop(message[6:-1], None)
            out.append(backend.CLOSE_COMPLETE)
        elif msg_type == _E:
            if portal is None:
                out.append(backend.error_response("34000", "portal does not exist"))
                ok = False
                break
            body, ok = await _execute_control(session, portal)
            out.append(body)
            if not ok:
                break
    if group[-1][0] == _H:
        if not ok:
            session.discard_until_sync = True  # PostgreSQL skips to the Sync after an error
        _reply(session, b"".join(out), None)
        return
    _reply(session, b"".join(out), block_status(session))


def _block_failed(session: RoutedSession) -> bool:
    dist = session.distributed
    return dist.failed if dist is not None else bool(session.held) and session.held_failed


async def _execute_control(session: RoutedSession, sql: str) -> tuple[bytes, bool]:
    """One Execute of transaction control: (reply, ok)."""
    dist = session.distributed
    if dist is not None:
        return await transaction_control(session, dist, sql)
    first, _, _ = leading_words(sql[:64])
    kind = control_kind(sql)
    if kind == "begin":
        if session.held:  # as PostgreSQL: a warning, and the block carries on
            notice = backend.notice_response("25001", "there is already a transaction in progress", "WARNING")
            return notice + backend.command_complete(_BEGIN_TAGS[first].decode()), True
        session.held = [frontend.query(sql)]
        session.held_failed = False
        return backend.command_complete(_BEGIN_TAGS[first].decode()), True
    if kind == "end":
        commits = first in ("COMMIT", "END") and not session.held_failed
        session.held = session.held[:1] if is_chained(sql) else []
        session.held_failed = False
        return backend.command_complete("COMMIT" if commits else "ROLLBACK"), True
    session.held.append(frontend.query(sql))
    if first == "ROLLBACK":
        session.held_failed = False
        return backend.command_complete("ROLLBACK"), True
    return backend.command_complete(first), True


# extended protocol ----------------------------------------------------------------------------------
async def run_group(session: RoutedSession, group: list[tuple[int, bytes, Route | None]]) -> None:
    """An extended-protocol group whose Binds route to several shards, or inside a distributed block.

    Each Bind (with its Execute and portal Describe) goes to its shards; Parse, statement Describe
    and Close go to every shard involved. Replies are merged in the client's message order. A Bind
    of a read that needs a merge is answered by `fanout_read.run_fanout_group`, one of a UNION ALL
    run part by part (`Route.parts`) by `union_read.run_union_group`.
    """
    if session.server is not None and session.status != _IDLE[0] and session.distributed is None:
        # A block open on the linked shard grows to the others: nothing may run outside it.
        await grow_and_run(session, session.shard, [message for _, message, _ in group])
        return
    if fanout_read.binds_fanout_read(session, group):
        await fanout_read.run_fanout_group(session, group)
        return
    if union_read.binds_union_read(session, group):
        await union_read.run_union_group(session, group)
        return
    dist = session.distributed
    flushed = bool(group) and group[-1][0] == _H  # the client asked for replies, not ReadyForQuery
    default = next(iter(dist.servers)) if dist is not None else session.default_shard
    n_shards = len(session.pools)
    plan: list[tuple[int, bytes, tuple[int, ...] | None]] = []
    current: tuple[int, ...] = (default,)
    current_same = False  # the Bind's statement did the same on every copy: answer once
    same: set[int] = set()
    write = False
    for msg_type, message, route in group:
        shards: tuple[int, ...] | None = None
        if msg_type == _B:
            if route is not None and route.error is not None:
                _reply_group_error(session, route.error, flushed)
                return
            reason = unsupported_reason(route) if route is not None else None
            if reason and route is not None and (route.all_shards or len(route.shards) > 1):
                _reply_group_error(session, ("0A000", reason), flushed)
                return
            if session.pinned_shard is not None:
                current = (session.pinned_shard,)
            elif route is not None and (route.all_shards or route.shards):
                current = tuple(range(n_shards)) if route.all_shards else tuple(sorted(set(route.shards)))
                write = write or route.write
            else:
                current = (default,)
            current_same = route is not None and route.broadcast_kind is Broadcast.SAME
            shards = current
        elif msg_type == _E or (msg_type == _D and message[5] == ord("P")):
            shards = current
            if msg_type == _E and current_same:
                same.add(len(plan))
        plan.append((msg_type, message, shards))
    involved = sorted({s for _, _, shards in plan if shards for s in shards} or {default})
    in_block = dist is not None or bool(session.held)
    if dist is None and session.held:
        dist = DistributedTransaction(begin=session.held)
        session.held = []
        session.distributed = dist
    if dist is not None:
        if dist.failed:
            _reply_group_error(session, ("25P02", _ABORTED), flushed)
            return
        await _join(session, dist, involved)
        servers = {s: dist.servers[s] for s in involved}
    else:
        servers = await acquire(session, involved)
    atomic = dist is None and write and len(involved) > 1
    try:
        if atomic:
            errors = await _run_each(servers, "BEGIN")
            if errors:
                raise errors[0]
        payloads, skips = _group_payloads(session, plan, servers)
        replies = await _gather_streams(servers, payloads, _timeout(session))
    except BaseException:
        if dist is None:
            release(session, servers, broken=True)
        raise
    body, failed = _merge_group(plan, replies, skips, same)
    if dist is not None:
        if write:
            dist.wrote.update(involved)
        dist.failed = failed
        _reply(session, body, None if flushed else _FAILED if failed else _IN_BLOCK)
        return
    broken = False
    if atomic:
        body, _, broken = await _finish_implicit(session, servers, body, {"C": "error"} if failed else None)
    release(session, servers, broken=broken)
    _reply(session, body, None if flushed else _IDLE if not in_block else _IN_BLOCK)


def _reply_group_error(session: RoutedSession, error: tuple[str, str], flushed: bool = False) -> None:
    status: bytes | None = _IDLE
    if session.distributed is not None:
        session.distributed.failed = True
        status = _FAILED
    if flushed:
        status = None  # the client's Sync, when it comes, gets the ReadyForQuery
    _reply(session, backend.error_response(*error), status)


def _group_payloads(
    session: RoutedSession,
    plan: list[tuple[int, bytes, tuple[int, ...] | None]],
    servers: dict[int, ServerConnection],
) -> tuple[dict[int, bytes], dict[int, int]]:
    """Each shard's messages (statement names renamed, missing statements prepared first) and
    how many replies at its head answer messages pgshard added."""
    out: dict[int, list[bytes]] = {s: [] for s in servers}
    injected: dict[int, list[bytes]] = {s: [] for s in servers}
    skips: dict[int, int] = dict.fromkeys(servers, 0)
    for msg_type, message, shards in plan:
        targets = shards if shards is not None else tuple(servers)
        body = message[5:]
        for shard in targets:
            server = servers[shard]
            if msg_type == _P and body[0] != 0:
                name, stmt = prepared.prepared_from_parse(body)
                session.statements[name] = stmt
                if stmt.server_name in server.prepared:
                    injected[shard].append(prepared.close_statement(stmt.server_name))
                    skips[shard] += 1
                server.prepared[stmt.server_name] = None
                out[shard].append(stmt.parse_message)
            elif msg_type == _B and prepared.bind_statement_name(body):
                stmt_ = session.statements.get(prepared.bind_statement_name(body))
                if stmt_ is None:
                    out[shard].append(message)
                    continue
                if stmt_.server_name not in server.prepared:
                    server.prepared[stmt_.server_name] = None
                    injected[shard].append(stmt_.parse_message)
                    skips[shard] += 1
                out[shard].append(prepared.rename_bind(body, stmt_.server_name))
            elif msg_type == _D and body[0] == ord("S") and body[1] != 0:
                stmt_ = session.statements.get(body[1:-1])
                if stmt_ is not None and stmt_.server_name not in server.prepared:
                    server.prepared[stmt_.server_name] = None
                    injected[shard].append(stmt_.parse_message)
                    skips[shard] += 1
                out[shard].append(prepared.describe_statement(stmt_.server_name) if stmt_ else message)
            elif msg_type == _C and body[0] == ord("S") and body[1] != 0:
                session.statements.pop(body[1:-1], None)
                out[shard].append(prepared.CLOSE_NOTHING)
            elif msg_type in (_S, _H):
                continue
            else:
                out[shard].append(message)
    return {s: b"".join(injected[s] + out[s]) + frontend.SYNC for s in servers}, skips


async def _gather_streams(
    servers: dict[int, ServerConnection], payloads: dict[int, bytes], timeout: float | None
) -> dict[int, list[tuple[int, bytes]]]:
    for shard, server in servers.items():
        server.write(payloads[shard])

    waiting = set(servers)

    async def read(shard: int, server: ServerConnection) -> list[tuple[int, bytes]]:
        messages: list[tuple[int, bytes]] = []
        while True:
            msg_type, body = await server.read_message()
            if msg_type == ord("Z"):
                waiting.discard(shard)
                return messages
            messages.append((msg_type, frame(msg_type, body)))

    results = asyncio.gather(*(read(shard, server) for shard, server in servers.items()))
    try:
        streams = await asyncio.wait_for(results, timeout) if timeout else await results
    except TimeoutError:
        raise query_timeout_error(timeout, waiting) from None
    return dict(zip(servers, streams, strict=True))


def _merge_group(
    plan: list[tuple[int, bytes, tuple[int, ...] | None]],
    streams: dict[int, list[tuple[int, bytes]]],
    skips: dict[int, int],
    same: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[bytes, bool]:
    """Walk the client's messages and take each one's replies from its shards' streams."""
    cursor = dict(skips)
    out: list[bytes] = []
    seen_notices: set[bytes] = set()

    def take(shard: int) -> tuple[int, bytes] | None:
        stream = streams[shard]
        while cursor[shard] < len(stream):
            item = stream[cursor[shard]]
            cursor[shard] += 1
            if item[0] in (ord("N"), ord("S"), ord("A")):
                if item[0] == ord("N") and item[1] not in seen_notices:
                    seen_notices.add(item[1])
                    out.append(item[1])
                continue
            return item
        return None

    every = tuple(streams)
    for index, (msg_type, message, shards) in enumerate(plan):
        targets = shards if shards is not None else every
        if msg_type in (_S, _H):
            continue
        if msg_type == _E:
            rows: list[bytes] = []
            total = 0
            tag: tuple[bytes, bytes] | None = None
            for position, shard in enumerate(targets):
                shard_rows: list[bytes] = []
                shard_total = 0
                while True:
                    item = take(shard)
                    if item is None:
                        break
                    if item[0] == _E:
                        out.append(item[1])
                        return b"".join(out), True
                    if item[0] == ord("D"):
                        shard_rows.append(item[1])
                        continue
                    if item[0] == _C:
                        text = item[1][5:-1]
                        head, _, last = text.rpartition(b" ")
                        if last.isdigit():
                            shard_total = int(last)
                            tag = (head + b" ", b"")
                        else:
                            tag = (text, b"-")
                    else:
                        tag = (item[1], b"raw")
                    break
                if position == 0 or index not in same:  # copies that did the same answer once
                    rows.extend(shard_rows)
                    total += shard_total
            out.extend(rows)
            if tag is not None:
                if tag[1] == b"raw":
                    out.append(tag[0])
                elif tag[1] == b"-":
                    out.append(frame(_C, tag[0] + b"\x00"))
                else:
                    out.append(frame(_C, tag[0] + str(total).encode() + b"\x00"))
            continue
        units = 2 if (msg_type == _D and message[5] == ord("S")) else 1
        first: list[bytes] = []
        for position, shard in enumerate(targets):
            for _ in range(units):
                item = take(shard)
                if item is None:
                    continue
                if item[0] == _E:
                    out.append(item[1])
                    return b"".join(out), True
                if position == 0:
                    first.append(item[1])
        out.extend(first)
    return b"".join(out), False
