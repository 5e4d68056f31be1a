"""A client session of a sharded database: each statement goes to the shard that holds its rows.

The pass-through relay of `ClientSession` stays the path for anything that runs on one shard: the
route picks which pool the server connection comes from, and the bytes flow as before. Here:
- simple Queries are routed one by one (a route-cache hit costs microseconds, never a full parse);
- extended-protocol messages are grouped up to their Sync or Flush, and the group goes where its
  Binds' parameter values route (Describe before any Bind is answered by the default shard);
- BEGIN is held, answered by pgshard, and started on the shard the first statement needs;
- statements needing several shards, and transactions that grow to several shards, run through
  `proxy.multishard` on server connections taken in shard order.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Final

from parser.statements import leading_words
from pooler.background import spawn
from pooler.errors import PoolTimeout
from pooler.pool import Pool
from pooler.server_connection import ServerConnection, ServerError
from proxy import multishard
from proxy.log import log
from proxy.protocol import backend, frontend
from proxy.protocol.errors import ProtocolError
from proxy.protocol.framing import iter_messages
from proxy.session import _HIGH_WATER, ClientSession
from router.scatter import QueryTimeout

if TYPE_CHECKING:
    from proxy.app import ProxyApp
    from router.routing import PreparedRoute, Route, Router

_from_bytes = int.from_bytes
# Message types (protocol 55.7). Final: the compiled relay compares with C constants, not globals.
_Q: Final = 0x51  # Query
_P: Final = 0x50  # Parse
_B: Final = 0x42  # Bind
_D: Final = 0x44  # Describe
_E: Final = 0x45  # Execute
_C: Final = 0x43  # Close
_H: Final = 0x48  # Flush
_S: Final = 0x53  # Sync
_X: Final = 0x58  # Terminate
_EXTENDED: Final = frozenset(b"PBDECHS")
_COPY_MESSAGES: Final = frozenset(b"dcf")  # CopyData, CopyDone, CopyFail
# Transaction status of ReadyForQuery.
_IDLE: Final = 0x49
_IN_BLOCK: Final = 0x54
_FAILED: Final = 0x45

# Transaction control and the tag PostgreSQL answers it with (CommandComplete).
_BEGIN_TAGS = {"BEGIN": b"BEGIN", "START": b"START TRANSACTION"}
_END_TAGS = {"COMMIT": b"COMMIT", "END": b"COMMIT", "ROLLBACK": b"ROLLBACK", "ABORT": b"ROLLBACK"}
_SAVEPOINT_TAGS = {"SAVEPOINT": b"SAVEPOINT", "RELEASE": b"RELEASE"}
_SHARD_SETTING = re.compile(
    r"\s*(SET|RESET)\s+(?:SESSION\s+)?pgshard\.shard\s*(?:(?:=|\bTO\b)\s*('?\w*'?)\s*)?;?\s*$", re.IGNORECASE
)


def _command_complete(tag: bytes) -> bytes:
    return b"C" + (len(tag) + 5).to_bytes(4, "big") + tag + b"\x00"


class RoutedSession(ClientSession):
    """ClientSession plus routing: which shard's pool serves each statement or transaction."""

    def __init__(self, app: ProxyApp) -> None:
        super().__init__(app)
        self.router: Router | None = None
        self.pools: list[Pool] = []
        self.shard = -1  # shard of self.server
        self.default_shard = 0
        self.pinned_shard: int | None = None  # SET pgshard.shard = N
        self.held: list[bytes] = []  # BEGIN and SAVEPOINTs answered by us, replayed where the block starts
        self.held_failed = False
        self.group: list[tuple[int, bytes, Route | None]] = []
        self.group_ready = False
        self.blocked = False
        self.unnamed_route: PreparedRoute | None = None
        self.statement_routes: dict[bytes, PreparedRoute] = {}
        self.unnamed_sql: bytes | None = None  # the unnamed statement's text, for transaction control
        self.unnamed_sql_before: bytes | None = None  # ... as it was when the current group began
        self.block_begin: list[bytes] = []  # how the current block began, for shards that join it
        self.parked: dict[int, ServerConnection] = {}  # session mode / pinned: one server per shard kept
        self.distributed: multishard.DistributedTransaction | None = None
        self.query_timeout: float | None = app.config.general.query_timeout or None
        self.step: asyncio.Task[None] | None = None  # a multi-shard step in flight

    # set-up at login ---------------------------------------------------------------------------------
    def setup_routing(self, database_name: str, user_name: str) -> None:
        database = self.app.config.database(database_name)
        assert database is not None
        self.default_shard = database.default_shard
        self.router = self.app.router_for(database_name)
        if self.router is not None:
            self.pools = [self.app.pool_for(database_name, user_name, i) for i in range(len(database.shards))]

    # dispatch ----------------------------------------------------------------------------------------
    def _from_client(self, data: bytes) -> None:
        if self.router is None:
            super()._from_client(data)
            return
        if self.blocked:
            self.buf += data
            waiter = self._reader_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)  # a COPY in progress reads the client's rows from here
            elif len(self.buf) > _HIGH_WATER:
                self.pause_client()
            return
        pos = 0
        for msg_type, start, end in iter_messages(data, 0, self.max_message):
            if self.blocked or not self._dispatch(msg_type, data[start:end]):
                break
            pos = end
        n = len(data)
        self._flush_out()
        if pos < n:
            self.buf += data[pos:]

    def _flush_out(self) -> None:
        if self.out:
            server = self.server
            if server is not None and server.transport is not None:
                server.transport.write(b"".join(self.out))
            self.out = []

    def _resume(self) -> None:
        """Whatever blocked dispatch is over: carry on with the held group and buffered bytes."""
        self.blocked = False
        self.resume_client()
        if self.group_ready:
            finished = self._finish_group()
            self._flush_out()
            if not finished:
                return
        if self.buf and self.phase == 2:
            data = bytes(self.buf)
            self.buf.clear()
            try:
                self._from_client(data)
            except ProtocolError as exc:
                self.fatal(exc.sqlstate, exc.message)

    def _dispatch(self, msg_type: int, message: bytes) -> bool:
        """Handle one client message; False if it must wait (it is then kept for later)."""
        if self.discard_until_sync:
            # After an error, PostgreSQL ignores extended messages up to the Sync (protocol 55.2.3).
            if msg_type == _S:
                self.discard_until_sync = False
                status = (
                    _FAILED
                    if (self.held_failed or (self.distributed and self.distributed.failed))
                    else (_IN_BLOCK if self.held or self.distributed else _IDLE)
                )
                if self.transport is not None:
                    self.transport.write(backend.ready_for_query(bytes((status,))))
            return True
        if msg_type in _EXTENDED:
            return self._dispatch_extended(msg_type, message)
        if msg_type == _Q:
            if self.group:
                self.group_ready = True
                if not self._finish_group():
                    return False
            return self._dispatch_query(message)
        if msg_type == _X:
            self._flush_out()
            if self.transport is not None:
                self.transport.close()
            self.blocked = True
            return True
        if msg_type in _COPY_MESSAGES and self.server is None:
            # No COPY is open (one relayed to a shard keeps its server linked to its end): stray
            # CopyData/CopyDone/CopyFail after a failed COPY, which PostgreSQL ignores too.
            return True
        # COPY data, CopyDone/CopyFail, FunctionCall: wherever the session is now.
        return self._to_shard(self.shard if self.server is not None else self.default_shard, [message])

    # simple Query ------------------------------------------------------------------------------------
    def _dispatch_query(self, message: bytes) -> bool:
        if self.distributed is not None:
            if self._outstanding():
                return self._wait_for_drain()
            self._run(multishard.run_query_in_transaction(self, message))
            return True
        sql = message[5:-1]
        if b"pgshard.shard" in sql[:64].lower():
            handled = self._shard_setting(sql.decode("utf-8", "replace"))
            if handled is not None:
                return handled
        first, second, _ = leading_words(sql[:64].decode("utf-8", "replace"))
        if first in _BEGIN_TAGS or first in _END_TAGS or first in _SAVEPOINT_TAGS:
            handled = self._transaction_control(first, second, message)
            if handled is not None:
                return handled
        if self.held_failed and self.server is None:
            return self._reply_local(
                backend.error_response(
                    "25P02", "current transaction is aborted, commands ignored until end of transaction block"
                ),
                _FAILED,
            )
        assert self.router is not None
        route = self.router.route_simple(sql, self.state.client_encoding if self.state is not None else None)
        return self._follow(route, message)

    def _follow(self, route: Route, message: bytes) -> bool:
        if route.error is not None:
            return self._reply_error(*route.error)
        if self.pinned_shard is not None:
            return self._to_shard(self.pinned_shard, [message])
        if route.shards and len(route.shards) == 1 and not route.all_shards and route.split is None:
            return self._to_shard(route.shards[0], [message])
        if not route.shards and not route.all_shards and route.split is None:
            # SET, SHOW and statements about no table: wherever the session is now.
            return self._to_shard(self.shard if self.server is not None else self.default_shard, [message])
        if self._outstanding():
            return self._wait_for_drain()
        self._run(multishard.run_query(self, route, message))
        return True

    async def read_copy_message(self, coalesce: int = 0) -> tuple[int, bytes]:
        """The client's next message during a COPY FROM STDIN that pgshard runs itself. With
        `coalesce`, CopyData messages already received come joined, up to about that many bytes: a
        client sending a message per row (pgbench -i) costs one step per batch, not per row."""
        while True:
            buf = self.buf
            if len(buf) >= 5:
                length = _from_bytes(buf[1:5], "big")
                if length < 4 or length > self.max_message:
                    raise ProtocolError(f"invalid message length {length} during COPY")
                if len(buf) > length:
                    msg_type = buf[0]
                    pos = length + 1
                    parts = [bytes(buf[5:pos])]
                    size = length - 4
                    while msg_type == 0x64 and size < coalesce and len(buf) - pos >= 5 and buf[pos] == 0x64:
                        length = _from_bytes(buf[pos + 1 : pos + 5], "big")
                        if length < 4 or length > self.max_message or len(buf) - pos <= length:
                            break
                        parts.append(bytes(buf[pos + 5 : pos + 1 + length]))
                        size += length - 4
                        pos += length + 1
                    del buf[:pos]
                    self.resume_client()
                    return msg_type, parts[0] if len(parts) == 1 else b"".join(parts)
            await self._wait_for_client()

    async def skip_copy_data(self) -> None:
        """A COPY FROM STDIN (simple Query) that pgshard ran failed while the client was still sending:
        drop its CopyData up to its CopyDone or CopyFail, as PostgreSQL drops them. Any other message
        is left for dispatch, unread: after the error PostgreSQL takes the next Query as usual (a
        client that stops copying on the ErrorResponse sends no CopyDone)."""
        while True:
            if not self.buf:
                await self._wait_for_client()
                continue
            if self.buf[0] not in _COPY_MESSAGES:
                return
            msg_type, _ = await self.read_copy_message()
            if msg_type != 0x64:
                return

    def _shard_setting(self, sql: str) -> bool | None:
        """`SET pgshard.shard = N` pins this session's statements to shard N; RESET lifts it.

        For statements the parser cannot route and hints cannot reach (a tool's generated SQL).
        """
        m = _SHARD_SETTING.match(sql)
        if m is None:
            return None
        if m.group(1).upper() == "RESET" or (m.group(2) or "").lower() in ("default", "''"):
            self.pinned_shard = None
            return self._reply_local(
                _command_complete(b"RESET" if m.group(1).upper() == "RESET" else b"SET"), self._status_now()
            )
        value = (m.group(2) or "").strip("'")
        if not value.isdigit() or int(value) >= len(self.pools):
            return self._reply_error(
                "22023", f"pgshard.shard must be a shard number from 0 to {len(self.pools) - 1}"
            )
        self.pinned_shard = int(value)
        return self._reply_local(_command_complete(b"SET"), self._status_now())

    def _status_now(self) -> int:
        if self.held or self.distributed is not None:
            return (
                _FAILED if self.held_failed or (self.distributed and self.distributed.failed) else _IN_BLOCK
            )
        return self.status if self.server is not None else _IDLE

    def _transaction_control(self, first: str, second: str, message: bytes) -> bool | None:
        """BEGIN is held until a statement shows where it runs; None: pass the statement on."""
        if self.server is not None:
            savepoint = first in _SAVEPOINT_TAGS or (first == "ROLLBACK" and second == "TO")
            if savepoint and self.status != _IDLE:
                self.block_begin.append(message)  # shards that join the block later replay it
            return None
        if first in _BEGIN_TAGS and not self.held:
            self.held = [message]
            return self._reply_local(_command_complete(_BEGIN_TAGS[first]), _IN_BLOCK)
        if not self.held:
            return None
        if first in _END_TAGS and second not in ("TO", "PREPARED"):
            tag = b"ROLLBACK" if self.held_failed else _END_TAGS[first]
            chain = multishard.is_chained(message[5:-1].decode("utf-8", "replace"))
            self.held = self.held[:1] if chain else []  # AND CHAIN: a new block like the last one
            self.held_failed = False
            return self._reply_local(_command_complete(tag), _IN_BLOCK if chain else _IDLE)
        if first in _SAVEPOINT_TAGS or (first == "ROLLBACK" and second == "TO"):
            if self.held_failed and first != "ROLLBACK":
                return self._reply_local(backend.error_response("25P02", multishard.ABORTED), _FAILED)
            self.held.append(message)
            if first == "ROLLBACK":
                self.held_failed = False
            return self._reply_local(_command_complete(_SAVEPOINT_TAGS.get(first, b"ROLLBACK")), _IN_BLOCK)
        return None

    def _reply_local(self, reply: bytes, status: int) -> bool:
        if self._outstanding():
            return self._wait_for_drain()
        if self.transport is not None:
            self.transport.write(reply + backend.ready_for_query(bytes((status,))))
        return True

    def _reply_error(self, sqlstate: str, message: str) -> bool:
        """An error pgshard finds itself: in a block the block fails, as PostgreSQL's would."""
        if self._outstanding():
            return self._wait_for_drain()
        status = _IDLE
        if self.distributed is not None:
            status = _FAILED
            self.distributed.failed = True
        elif self.held:
            status = _FAILED
            self.held_failed = True
        elif self.server is not None and self.status != _IDLE:
            status = _FAILED
            # The server's block must fail too, so that a COMMIT rolls it back.
            self._flush_out()
            self.inject_query(self.server, f"DO $pgshard$ BEGIN RAISE '%', {_quote(message)}; END $pgshard$")
        if self.transport is not None:
            self.transport.write(
                backend.error_response(sqlstate, message) + backend.ready_for_query(bytes((status,)))
            )
        return True

    # extended protocol -------------------------------------------------------------------------------
    def _dispatch_extended(self, msg_type: int, message: bytes) -> bool:
        route: Route | None = None
        if not self.group:
            self.unnamed_sql_before = self.unnamed_sql
        if msg_type == _P:
            self._remember_parse(message)
        elif msg_type == _B:
            route = self._route_bind(message)
        self.group.append((msg_type, message, route))
        if msg_type in (_S, _H):
            # The message is the group's now: if finishing must wait, group_ready resumes it.
            self.group_ready = True
            self._finish_group()
        return True

    def _remember_parse(self, message: bytes) -> None:
        assert self.router is not None
        body = message[5:]
        name_end = body.index(b"\x00")
        query = body[name_end + 1 : body.index(b"\x00", name_end + 1)].decode("utf-8", "replace")
        encoding = self.state.client_encoding if self.state is not None else None
        if encoding is None:
            prepared_route = self.router.prepare(query)
        else:  # text keys among its literals are in the client's encoding
            raw = body[name_end + 1 : body.index(b"\x00", name_end + 1)]
            prepared_route = self.router.prepare(raw, encoding=encoding)
        if name_end == 0:
            self.unnamed_route = prepared_route
            self.unnamed_sql = query.encode()
        else:
            self.statement_routes[body[:name_end]] = prepared_route

    def _route_bind(self, message: bytes) -> Route | None:
        assert self.router is not None
        bind = frontend.decode_bind(message[5:])
        if bind.statement:
            prepared_route = self.statement_routes.get(bind.statement.encode())
        else:
            prepared_route = self.unnamed_route
        if prepared_route is None:
            return None
        return self.router.route_bind(
            prepared_route,
            bind.params,
            bind.param_formats,
            self.state.client_encoding if self.state is not None else None,
        )

    def _finish_group(self) -> bool:
        """Send a whole extended-protocol group (up to Sync/Flush) where its Binds route."""
        group = self.group
        if (
            self.server is None
            and not self.held
            and self.distributed is None
            and group[0][0] == _P
            and self.answer_parses_locally(b"".join(message for _, message, _ in group))
        ):
            self.group, self.group_ready = [], False
            return True
        if self.server is None:
            control = multishard.control_group(self, group)
            if control == "mixed":
                return self._fail_group(
                    "0A000",
                    "transaction control (COMMIT, ROLLBACK, SAVEPOINT ...) batched with other statements "
                    "before one Sync, in a transaction pgshard spreads over shards: send it on its own",
                )
            if control == "local":
                self.group, self.group_ready = [], False
                self._run(multishard.run_control_group(self, group))
                return True
        targets: set[int] = set()
        multi = False
        for _, _, route in group:
            if route is None:
                continue
            if route.error is not None:
                return self._fail_group(*route.error)
            if self.pinned_shard is not None:
                targets.add(self.pinned_shard)
            elif route.all_shards or len(route.shards) > 1 or route.split is not None:
                multi = True
            elif route.shards:
                targets.add(route.shards[0])
        if self.distributed is not None or multi or len(targets) > 1:
            if self._outstanding():
                return self._wait_for_drain()
            self.group, self.group_ready = [], False
            self._run(multishard.run_group(self, group))
            return True
        target = targets.pop() if targets else (self.shard if self.server is not None else self.default_shard)
        if not self._to_shard(target, [message for _, message, _ in group]):
            return False
        if self.server is not None and self.status != _IDLE:
            self._note_savepoints(group)
        self.group, self.group_ready = [], False
        return True

    def _note_savepoints(self, group: list[tuple[int, bytes, Route | None]]) -> None:
        """Savepoints of a block open on one shard, kept to replay on shards that join it later."""
        texts = multishard.group_texts(self, group)
        bound: str | None = None
        for (msg_type, _, _), text in zip(group, texts, strict=True):
            if msg_type == _B:
                bound = text
            elif msg_type == _E and bound is not None and multishard.control_kind(bound) == "savepoint":
                self.block_begin.append(frontend.query(bound))

    def _fail_group(self, sqlstate: str, message: str) -> bool:
        """A group that cannot run: its error, then ReadyForQuery if it ended in Sync, as a server would."""
        if self.group[-1][0] != _S:
            self.group, self.group_ready = [], False
            self.discard_until_sync = True
            if self.distributed is not None:
                self.distributed.failed = True  # the Sync's ReadyForQuery then says so
            elif self.held:
                self.held_failed = True
            if self.transport is not None:
                self.transport.write(backend.error_response(sqlstate, message))
            return True
        if not self._reply_error(sqlstate, message):
            return False  # the group stays, ready, until the linked server has answered
        self.group, self.group_ready = [], False
        return True

    # choosing and linking servers -----------------------------------------------------------------------
    def _outstanding(self) -> bool:
        return self.server is not None and (self.done_syncs < self.sent_syncs or self.unsynced)

    def _wait_for_drain(self) -> bool:
        """Replies from the linked server must reach the client before anything else does."""
        if self.server is not None and self.unsynced and self.done_syncs == self.sent_syncs:
            self.close_flushed_run()  # the client ended in Flush: no Sync of its own will come
        self._flush_out()
        self.blocked = True
        return False

    def drained(self) -> None:
        if self.blocked and self.waiting is None and not self._outstanding():
            self._resume()

    def _to_shard(self, shard: int, messages: list[bytes]) -> bool:
        server = self.server
        if server is not None:
            if self.shard == shard:
                for message in messages:
                    self._pass_message(message[0], message, self.out)
                return True
            if self._outstanding():
                return self._wait_for_drain()
            if self.status != _IDLE:
                # The transaction grows to a second shard.
                self._flush_out()
                self._run(multishard.grow_and_run(self, shard, messages))
                return True
            self._flush_out()
            self._unlink_keep()
        if not 0 <= shard < len(self.pools):
            return self._reply_error(
                "22023", f"shard {shard} does not exist (this database has {len(self.pools)})"
            )
        server = self.parked.pop(shard, None) or self.pools[shard].try_acquire()
        if server is None:
            self.blocked = True
            self.waiting = spawn(self._wait_for_shard(shard))
            return False
        self._link_shard(server, shard)
        for message in messages:
            self._pass_message(message[0], message, self.out)
        return True

    def _unlink_keep(self) -> None:
        """Session mode or a pinned client keeps one idle server per shard while switching shards."""
        server = self.server
        assert server is not None
        self.server = None
        server.sink = None
        if self.mode == "session" or self.pinned is not None:
            self.parked[self.shard] = server
        else:
            server.pool.release(server)
        self.shard = -1

    def _link_shard(self, server: ServerConnection, shard: int) -> None:
        self._link(server)
        self.shard = shard
        self.block_begin = list(self.held)
        if self.held:
            # The held BEGIN (and savepoints) start the block here; their replies were given already.
            for message in self.held:
                self.inject_query(server, message[5:-1].decode())
            self.held = []

    async def _wait_for_shard(self, shard: int) -> None:
        try:
            server = await self.pools[shard].acquire()
        except ServerError as exc:
            self.waiting = None
            self.blocked = False
            self.group, self.group_ready = [], False
            self._fail_waiting(exc)
            return
        self.waiting = None
        if self.phase != 2:
            server.pool.release(server)
            return
        self._link_shard(server, shard)
        self._resume()

    def _route_of(self, message: bytes) -> Route | None:
        return self._route_bind(message) if message[0] == _B else None

    def _release(self, server: ServerConnection, rest: bytes) -> None:
        self.shard = -1
        if self.mode == "session" or self.pinned is not None:
            return
        super()._release(server, rest)
        if self.blocked and self.waiting is None:
            self._resume()

    def _run(self, coro: object) -> None:
        """Run a multi-shard step; client input waits until it is done."""
        self._flush_out()
        self.blocked = True
        self.step = spawn(self._guarded(coro))

    async def _guarded(self, coro: object) -> None:
        broken = False
        try:
            await coro  # type: ignore[misc]
        except (PoolTimeout, QueryTimeout) as exc:
            # The statement fails and the client goes on: no server connection was free (nothing was
            # sent), or a shard ran past query_timeout (as under PostgreSQL's statement_timeout). A
            # block it ran in is failed; after a timeout for good, since the shard is still busy with
            # the statement: the block's connections are closed (each server rolls back) and only its
            # end is taken.
            status = _IDLE
            dist = self.distributed
            if dist is not None:
                if isinstance(exc, QueryTimeout):
                    multishard.release(self, dist.servers, broken=True)
                    dist.servers, dist.wrote, dist.doomed = {}, set(), True
                dist.failed = True
                status = _FAILED
            elif self.held:
                self.held_failed = True
                status = _FAILED
            if self.transport is not None:
                ready = backend.ready_for_query(bytes((status,)))
                self.transport.write(backend.error_response(exc.sqlstate, exc.message) + ready)
        except ServerError as exc:
            broken = True
            self.fatal(exc.sqlstate, exc.message)
        except Exception as exc:  # never let a task die silently: the client must hear about it
            broken = True
            log.exception("multi-shard step failed", peer=self.peer)
            self.fatal("XX000", f"internal error in pgshard: {exc}")
        finally:
            self.step = None
        if self.phase == 2 and not broken:
            self._resume()
        elif self.phase == 3 or broken:
            self._abandon_servers(broken)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.step is None:
            self._abandon_servers(broken=False)

    def _abandon_servers(self, broken: bool) -> None:
        """The client is gone (or its step failed): no server it held may keep a transaction open."""
        servers = list(self.parked.values())
        self.parked.clear()
        if self.distributed is not None:
            servers += self.distributed.servers.values()
            self.distributed = None
        for server in servers:
            if broken:
                server.pool.discard(server)  # mid-reply: closing is the only clean state
            else:
                spawn(self._reset_and_release(server))

    async def _reset_and_release(self, server: ServerConnection) -> None:
        try:
            server.take_inbox()
            await asyncio.wait_for(server.run_simple("ROLLBACK"), 10)
            if self.pinned is not None or self.mode == "session":
                await asyncio.wait_for(server.run_simple("DISCARD ALL"), 10)
                server.prepared.clear()
                server.session_state = {}
        except (TimeoutError, ServerError, OSError):
            server.pool.discard(server)
            return
        server.pool.release(server)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
