"""One client connection: start-up, login, then the relay between the client and a pooled server.

The relay is the hot path (DESIGN.md, "Measured facts"): asyncio.Protocol callbacks, bytes written
to the peer's transport in one call per chunk, and only message headers looked at. Bodies are read
for the few messages that decide something: Query (session state), Parse/Bind/Describe/Close of
named statements (renamed per server connection), ReadyForQuery (when the server goes back to the
pool), ParseComplete/CloseComplete of messages pgshard itself added (dropped on the way back).

A server connection is linked to the client from the first message of a transaction to the
ReadyForQuery 'I' that answers the client's last outstanding Sync (transaction pooling).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from parser.session_statements import Effect, SessionEffect, analyse_query, mentions_session_function
from parser.statements import has_more_statements, leading_keyword
from pooler.background import spawn
from pooler.pool import Pool
from pooler.server_connection import ServerConnection, ServerError, send_cancel
from proxy import prepared
from proxy.log import log
from proxy.login import LoginFailed, authenticate
from proxy.protocol import backend, frontend
from proxy.protocol.errors import ProtocolError
from proxy.protocol.framing import int32_at, startup_packet_length
from proxy.varcache import SessionState

if TYPE_CHECKING:
    from proxy.app import ProxyApp

_from_bytes = int.from_bytes

# Message types (protocol 55.7). Final: the compiled relay compares with C constants, not globals.
_Q: Final = 0x51  # Query
_P: Final = 0x50  # Parse
_B: Final = 0x42  # Bind
_D: Final = 0x44  # Describe
_C: Final = 0x43  # Close
_S: Final = 0x53  # Sync
_F: Final = 0x46  # FunctionCall
_X: Final = 0x58  # Terminate
_H: Final = 0x48  # Flush
_E: Final = 0x45  # Execute
_Z: Final = 0x5A  # ReadyForQuery
_PARSE_COMPLETE: Final = 0x31
_CLOSE_COMPLETE: Final = 0x33
_ERROR: Final = 0x45  # ErrorResponse
_COMMAND_COMPLETE: Final = 0x43

# Leading keywords whose statements may change session state, pin the client or open a block.
_SESSION_KEYWORDS: Final = frozenset(
    b"SET RESET DISCARD DEALLOCATE LISTEN PREPARE CREATE DECLARE LOAD BEGIN START SAVEPOINT RELEASE ROLLBACK"
    b"".split()
)
_FUNCTION_KEYWORDS: Final = frozenset(b"SELECT WITH VALUES CALL".split())

# Session effects by statement text, for Parse messages (`_effects_of`); cleared when full.
_EFFECTS_SEEN: Final[dict[bytes, tuple[SessionEffect, ...]]] = {}
_EFFECTS_SEEN_MAX: Final = 4096
_EFFECTS_SEEN_LONGEST: Final = 2048

# Phases of a session.
_STARTUP: Final = 0
_AUTH: Final = 1
_READY: Final = 2
_CLOSED: Final = 3
_HIGH_WATER: Final = 256 * 1024  # client bytes buffered while waiting for a server before reads pause


class ClientSession(asyncio.Protocol):
    """The proxy side of one client: its own state, and the server connection it holds right now."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.phase = _STARTUP
        self.buf = bytearray()
        self.peer = "?"
        self.user = ""
        self.database = ""
        self.pid = 0
        self.secret = 0
        self.pool: Pool | None = None
        self.server: ServerConnection | None = None
        self.state: SessionState | None = None
        self.statements: dict[bytes, prepared.PreparedStatement] = {}
        self.pinned: str | None = None
        self.mode = "transaction"
        self.max_message = app.config.general.max_message_length
        self.max_prepared = app.config.general.max_prepared_statements
        # Sync accounting: a server goes back to the pool only when every Sync/Query sent is answered.
        self.sent_syncs = 0
        self.done_syncs = 0
        self.unsynced = False  # extended-protocol messages sent since the last Sync
        self.status = 0x49  # last transaction status from ReadyForQuery
        # Responses to drop: (sync group, drop?, server statement name or b"") per Parse and Close sent.
        self.parse_q: deque[tuple[int, bool, bytes]] = deque()
        self.close_q: deque[tuple[int, bool]] = deque()
        # Sync groups (by number) whose replies are ours to drop: queries pgshard itself added.
        self.drop_groups: deque[int] = deque()
        self.silent_syncs: deque[int] = deque()  # Syncs of ours whose ReadyForQuery alone is dropped
        self.follow_up: str | None = None  # a query of ours to send right after the client's
        self.unnamed_effects: tuple[SessionEffect, ...] = ()
        self.unpin_when_ready = False
        self.out: list[bytes] = []  # messages for the linked server, written when the batch is done
        self.srv_skip = 0  # bytes of a message that continues in the next chunk
        self.srv_skip_drop = False
        self.srv_carry = b""  # a header or a message we must see whole, split across chunks
        self.failed = False  # an ErrorResponse arrived since the last ReadyForQuery
        self.tx_outcome: bool | None = None
        self.tracking_tags = False
        self.discard_until_sync = False
        self.waiting: asyncio.Task[None] | None = None
        self._reader_waiter: asyncio.Future[None] | None = None
        self.login_task: asyncio.Task[None] | None = None
        self.client_paused = False

    # asyncio.Protocol: the client side ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.app.client_connected(self)
        self.login_task = spawn(self._login_with_timeout())

    def data_received(self, data: bytes) -> None:
        if self.phase == _READY:
            if self.buf:
                self.buf += data
                data = bytes(self.buf)
                self.buf.clear()
            try:
                self._from_client(data)
            except ProtocolError as exc:
                self.fatal(exc.sqlstate, exc.message)
            return
        if self.phase == _CLOSED:
            return
        self.buf += data
        waiter = self._reader_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == _CLOSED:
            return
        self.phase = _CLOSED
        waiter = self._reader_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.login_task is not None and not self.login_task.done():
            self.login_task.cancel()
        if self.waiting is not None:
            self.waiting.cancel()
        self.app.client_disconnected(self)
        server = self.server
        if server is not None:
            self.server = None
            server.sink = None
            spawn(self._clean_up_server(server))

    def pause_writing(self) -> None:  # the client reads slowly: stop reading from its server
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    def pause_client(self) -> None:
        if self.transport is not None and not self.client_paused:
            self.client_paused = True
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.transport is not None and self.client_paused:
            self.client_paused = False
            self.transport.resume_reading()

    # errors to the client ---------------------------------------------------------------------------
    def fatal(self, sqlstate: str, message: str) -> None:
        """Tell this client what went wrong and close it; nothing else is affected."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(backend.error_response(sqlstate, message, severity="FATAL"))
            self.transport.close()
        log.info("client closed", peer=self.peer, user=self.user, sqlstate=sqlstate, reason=message)

    # start-up and login ------------------------------------------------------------------------------
    async def _read_startup(self) -> bytes:
        while True:
            size = startup_packet_length(self.buf)
            if size and len(self.buf) >= size:
                packet = bytes(self.buf[:size])
                del self.buf[:size]
                return packet
            await self._wait_for_client()

    async def read_message(self) -> tuple[int, bytes]:
        """The next whole client message during login."""
        while True:
            if len(self.buf) >= 5:
                length = _from_bytes(self.buf[1:5], "big")
                if length < 4 or length > 65536:
                    raise ProtocolError(f"invalid message length {length} during authentication")
                if len(self.buf) >= length + 1:
                    msg_type = self.buf[0]
                    body = bytes(self.buf[5 : length + 1])
                    del self.buf[: length + 1]
                    return msg_type, body
            await self._wait_for_client()

    async def _wait_for_client(self) -> None:
        if self.phase == _CLOSED:
            raise ConnectionResetError("client went away")
        self._reader_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._reader_waiter
        finally:
            self._reader_waiter = None
        if self.phase == _CLOSED:
            raise ConnectionResetError("client went away")

    async def _login_with_timeout(self) -> None:
        try:
            await asyncio.wait_for(self._login(), self.app.config.general.login_timeout)
        except TimeoutError:
            self.fatal("08006", "login timeout: the client did not complete authentication in time")
        except ProtocolError as exc:
            self.fatal(exc.sqlstate, exc.message)
        except LoginFailed as exc:
            self.fatal(exc.sqlstate, exc.message)
        except ServerError as exc:
            self.fatal(exc.sqlstate, exc.message)
        except (ConnectionResetError, asyncio.CancelledError):
            pass

    async def _login(self) -> None:
        assert self.transport is not None
        while True:
            message = frontend.decode_startup(await self._read_startup())
            if isinstance(message, frontend.SSLRequest):
                if self.buf:
                    # Bytes behind an SSLRequest would be read as if encrypted (CVE-2021-23214).
                    raise ProtocolError("received unencrypted data after SSL request")
                if self.app.ssl_context is None:
                    self.transport.write(b"N")
                    continue
                self.transport.write(b"S")
                loop = asyncio.get_running_loop()
                new_transport = await loop.start_tls(
                    self.transport, self, self.app.ssl_context, server_side=True
                )
                assert new_transport is not None
                self.transport = new_transport
                continue
            if isinstance(message, frontend.GSSENCRequest):
                if self.buf:
                    raise ProtocolError("received unencrypted data after GSSAPI encryption request")
                self.transport.write(b"N")
                continue
            if isinstance(message, frontend.CancelRequest):
                self.app.cancel(message.pid, message.secret)
                self.transport.close()
                self.phase = _CLOSED
                self.app.client_disconnected(self)
                return
            break
        assert isinstance(message, frontend.StartupMessage)
        params = message.params
        if message.protocol >> 16 != 3:
            raise ProtocolError(f"unsupported frontend protocol {message.protocol >> 16}", "0A000")
        self.user = params.get("user", "")
        self.database = params.get("database") or self.user
        if not self.user:
            raise LoginFailed("28000", "no PostgreSQL user name specified in startup packet")
        if self.app.over_client_limit():
            raise LoginFailed("53300", "sorry, too many clients already (max_client_conn)")
        self.phase = _AUTH
        user = self.app.config.user(self.user)
        await authenticate(user, self.user, self.read_message, self.transport.write)
        database = self.app.config.database(self.database)
        if database is None or user is None:
            raise LoginFailed("3D000", f'database "{self.database}" does not exist')
        self.mode = user.pool_mode or self.app.config.general.pool_mode
        pool = self.app.pool_for(database.name, user.name, database.default_shard)
        server_parameters = await pool.ensure_parameters()
        self.pool = pool
        self.setup_routing(database.name, user.name)
        self.state = SessionState(params)
        self.pid, self.secret = self.app.register_cancel_key(self)
        out = [backend.authentication_ok()]
        reported = dict(server_parameters)
        for name, value in params.items():
            if name in reported or name == "application_name":
                reported[name] = value
        reported.setdefault("application_name", "")
        out += [backend.parameter_status(k, v) for k, v in reported.items()]
        out.append(backend.backend_key_data(self.pid, self.secret))
        out.append(backend.ready_for_query(b"I"))
        self.transport.write(b"".join(out))
        self.phase = _READY
        log.info("client logged in", peer=self.peer, user=self.user, database=self.database, mode=self.mode)
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self._from_client(data)

    def setup_routing(self, database_name: str, user_name: str) -> None:
        """A hook for sessions that route (proxy.routed_session)."""

    def drained(self) -> None:
        """Every Sync sent to the linked server is answered (a hook for proxy.routed_session)."""

    # client -> server -------------------------------------------------------------------------------
    def _from_client(self, data: bytes) -> None:
        server = self.server
        if server is None:
            if self.discard_until_sync:
                data = self._discard_to_sync(data)
                if not data:
                    return
            if self.pool is None:
                return
            if data[0] == _P and self.answer_parses_locally(data):
                return
            server = self.pool.try_acquire()
            if server is None:
                self.buf += data
                if self.waiting is None:
                    self.waiting = spawn(self._wait_for_server())
                if len(self.buf) > _HIGH_WATER:
                    self.pause_client()
                return
            self._link(server)
            assert self.server is not None
        out: list[bytes] = []
        pos = flushed = 0
        n = len(data)
        max_length = self.max_message
        while n - pos >= 5:
            msg_type = data[pos]
            length = int32_at(data, pos + 1)
            if length < 4 or length > max_length:
                raise ProtocolError(f"invalid message length {length} for message type {chr(msg_type)!r}")
            end = pos + 1 + length
            if end > n:
                break
            if msg_type in (_S, _F):  # answered by one ReadyForQuery each, as is Query
                self.sent_syncs += 1
                self.unsynced = False
                if self.follow_up is not None:
                    out.append(data[flushed:end])
                    flushed = end
                    self._add_follow_up(out)
            elif msg_type == _Q:
                replacement = self._client_query(data, pos, end)
                self.sent_syncs += 1
                if replacement is not None or self.follow_up is not None:
                    out.append(data[flushed:end] if replacement is None else data[flushed:pos] + replacement)
                    flushed = end
                    self._add_follow_up(out)
            elif msg_type in (_P, _B, _D, _C):
                self.unsynced = True
                replacement = self._client_extended(msg_type, data[pos + 5 : end])
                if replacement is not None:
                    out.append(data[flushed:pos])
                    out.append(replacement)
                    flushed = end
            elif msg_type == _X:
                out.append(data[flushed:pos])
                self._write_server(out)
                assert self.transport is not None
                self.transport.close()
                return
            else:
                self.unsynced = True if msg_type in (_E, _H) else self.unsynced
            pos = end
        if pos < n:
            self.buf += data[pos:]
        if flushed == 0 and pos == n:
            self.server.transport.write(data)  # type: ignore[union-attr]
            return
        out.append(data[flushed:pos])
        self._write_server(out)

    def _pass_message(self, msg_type: int, message: bytes, out: list[bytes]) -> None:
        """One client message bound for the linked server: bookkeeping, renaming, and what to send."""
        if msg_type in (_S, _F):  # answered by one ReadyForQuery each, as is Query
            self.sent_syncs += 1
            self.unsynced = False
            out.append(message)
            self._add_follow_up(out)
        elif msg_type == _Q:
            replacement = self._client_query(message, 0, len(message))
            self.sent_syncs += 1
            out.append(message if replacement is None else replacement)
            self._add_follow_up(out)
        elif msg_type in (_P, _B, _D, _C):
            self.unsynced = True
            replacement = self._client_extended(msg_type, message[5:])
            out.append(message if replacement is None else replacement)
        else:
            if msg_type in (_E, _H):
                self.unsynced = True
            out.append(message)

    def _write_server(self, chunks: list[bytes]) -> None:
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.write(b"".join(chunks))

    def _client_query(self, data: bytes, pos: int, end: int) -> bytes | None:
        """Look at a simple Query for session effects; returns a replacement message or None."""
        keyword = leading_keyword(data, pos + 5)
        if not (
            keyword in _SESSION_KEYWORDS
            or (keyword in _FUNCTION_KEYWORDS and mentions_session_function(data, pos + 5, end))
            or has_more_statements(data, pos + 5, end)
        ):
            return None
        try:
            sql = data[pos + 5 : end - 1].decode()
        except UnicodeDecodeError:
            return None  # the server will say what is wrong with it
        return self._apply_effects(analyse_query(sql))

    def _effects_of(self, query: bytes) -> tuple[SessionEffect, ...]:
        """Session effects of a statement being prepared, applied each time it is bound.

        Drivers send the same unnamed Parse for every execution of a query, so the answer is kept
        per query text (a pure function of it) instead of scanning the text again each time.
        """
        effects = _EFFECTS_SEEN.get(query)
        if effects is None:
            effects = _effects_of_query(query)
            if len(query) <= _EFFECTS_SEEN_LONGEST:  # kept texts stay small: at most 4096 x 2 kB
                if len(_EFFECTS_SEEN) >= _EFFECTS_SEEN_MAX:
                    _EFFECTS_SEEN.clear()
                _EFFECTS_SEEN[query] = effects
        return effects

    def _apply_effects(self, effects: Iterable[SessionEffect]) -> bytes | None:
        """Track what statements about to run do to the session; a replacement Query, or None."""
        assert self.state is not None and self.server is not None
        replacement: bytes | None = None
        for effect in effects:
            kind = effect.effect
            if kind is Effect.PIN:
                if self.pinned is None:
                    self.pinned = effect.key
                    self.app.pinned_clients += 1
                    log.info("client pinned to its server connection", peer=self.peer, reason=effect.key)
            elif kind is Effect.BEGIN:
                if self.mode == "statement":
                    replacement = frontend.query(
                        "DO $pgshard$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = "
                        "'transaction blocks are not allowed in statement pooling mode'; END $pgshard$"
                    )
            elif kind is Effect.DEALLOCATE:
                if effect.key is None:
                    self.statements.clear()
                    self.server.prepared.clear()
                else:
                    stmt = self.statements.pop(effect.key.encode(), None)
                    if stmt is not None:
                        # The server knows the statement by its shared name; let it say DEALLOCATE.
                        replacement = self._ensure_prepared(stmt) + frontend.query(
                            f"DEALLOCATE {stmt.server_name.decode()}"
                        )
                        self.server.prepared.pop(stmt.server_name, None)
            else:
                if kind is Effect.DISCARD_ALL:
                    self.statements.clear()
                    self.server.prepared.clear()
                    self.unpin_when_ready = True  # temp tables, locks, LISTEN, cursors: all gone
                if kind in (Effect.DISCARD_ALL, Effect.RESET_ALL) and self.state.baseline:
                    # The server resets to its own start-up values; the client's are put back after.
                    self.follow_up = "; ".join(self.state.baseline.values())
                self.state.note(effect)
                self.tracking_tags = True
        return replacement

    def _client_extended(self, msg_type: int, body: bytes) -> bytes | None:
        """Rename named statements to their server-side names; add a Parse where the server lacks one."""
        if msg_type == _B:
            if body[0] == 0 or body.find(b"\x00\x00") == 0:  # unnamed portal and statement
                stmt_name = prepared.bind_statement_name(body)
            else:
                stmt_name = prepared.bind_statement_name(body)
            if not stmt_name:
                if self.unnamed_effects:
                    self._apply_effects(self.unnamed_effects)
                return None
            stmt = self.statements.get(stmt_name)
            if stmt is None:
                return None  # the server reports the unknown name
            replacement = self._ensure_prepared(stmt) + prepared.rename_bind(body, stmt.server_name)
            if stmt.effects:
                self._apply_effects(stmt.effects)
            return replacement
        if msg_type == _P:
            if body[0] == 0:  # unnamed statement: passes through; its effects count when bound
                self.unnamed_effects = self._effects_of(body[1 : body.index(b"\x00", 1)])
                self.parse_q.append((self.sent_syncs, False, b""))
                return None
            name, stmt = self._prepared_from_parse(body)
            self.statements[name] = stmt
            server = self.server
            assert server is not None
            out = b""
            if stmt.server_name in server.prepared:
                # Already there under the shared name: close it first so the client's Parse succeeds.
                out = prepared.close_statement(stmt.server_name)
                self.close_q.append((self.sent_syncs, True))
                del server.prepared[stmt.server_name]
            return out + self._add_prepared(stmt, dropped=False)
        if msg_type == _D:
            if body[0] == 0x53 and body[1] != 0:  # Describe of a named statement
                stmt = self.statements.get(body[1:-1])
                if stmt is not None:
                    return self._ensure_prepared(stmt) + prepared.describe_statement(stmt.server_name)
            return None
        # Close
        if body[0] == 0x53 and body[1] != 0:
            self.statements.pop(body[1:-1], None)
            self.close_q.append((self.sent_syncs, False))
            return prepared.CLOSE_NOTHING
        self.close_q.append((self.sent_syncs, False))
        return None

    def _prepared_from_parse(self, body: bytes) -> tuple[bytes, prepared.PreparedStatement]:
        name, stmt = prepared.prepared_from_parse(body)
        effects = self._effects_of(stmt.query)
        return name, (dataclasses.replace(stmt, effects=effects) if effects else stmt)

    def _ensure_prepared(self, stmt: prepared.PreparedStatement) -> bytes:
        """The Parse to send before a message that uses `stmt`, if the server does not have it yet."""
        server = self.server
        assert server is not None
        if stmt.server_name in server.prepared:
            server.prepared.move_to_end(stmt.server_name)
            return b""
        return self._add_prepared(stmt, dropped=True)

    def _add_prepared(self, stmt: prepared.PreparedStatement, dropped: bool) -> bytes:
        server = self.server
        assert server is not None
        out = b""
        if len(server.prepared) >= self.max_prepared:
            evicted, _ = server.prepared.popitem(last=False)
            out = prepared.close_statement(evicted)
            self.close_q.append((self.sent_syncs, True))
        server.prepared[stmt.server_name] = None
        self.parse_q.append((self.sent_syncs, dropped, stmt.server_name))
        return out + stmt.parse_message

    def answer_parses_locally(self, data: bytes) -> bool:
        """Named Parse messages and a Sync, outside a transaction: remembered and answered by pgshard.

        A client preparing a statement (libpq's PQprepare, pgbench -M prepared) waits for the answer
        without sending anything else; taking a server connection for it can stall behind other
        clients' transactions. The statement is prepared where the next Bind runs, so a syntax error
        shows there instead.
        """
        if self.status != 0x49 or data[-5:] != frontend.SYNC:
            return False
        parsed: list[tuple[bytes, prepared.PreparedStatement]] = []
        pos, n = 0, len(data) - 5
        while pos < n:
            if data[pos] != _P or n - pos < 5:
                return False
            end = pos + 1 + int32_at(data, pos + 1)
            if end > n or data[pos + 5] == 0:
                return False
            name, stmt = self._prepared_from_parse(data[pos + 5 : end])
            parsed.append((name, stmt))
            pos = end
        if not parsed:
            return False
        for name, stmt in parsed:
            self.statements[name] = stmt
        assert self.transport is not None
        self.transport.write(backend.PARSE_COMPLETE * len(parsed) + backend.READY_IDLE)
        return True

    def _discard_to_sync(self, data: bytes) -> bytes:
        """After a failure to get a server, drop the client's messages up to its Sync, as PostgreSQL does."""
        pos, n = 0, len(data)
        while n - pos >= 5:
            length = int32_at(data, pos + 1)
            end = pos + 1 + length
            if end > n:
                break
            if data[pos] == _S:
                self.discard_until_sync = False
                assert self.transport is not None
                self.transport.write(backend.ready_for_query(b"I"))
                return data[end:]
            pos = end
        self.buf += data[pos:]
        return b""

    async def _wait_for_server(self) -> None:
        assert self.pool is not None
        try:
            server = await self.pool.acquire()
        except ServerError as exc:
            self.waiting = None
            self._fail_waiting(exc)
            return
        except asyncio.CancelledError:
            self.waiting = None
            raise
        self.waiting = None
        if self.phase == _CLOSED:
            self.pool.release(server)
            return
        self._link(server)
        data = bytes(self.buf)
        self.buf.clear()
        self.resume_client()
        try:
            self._from_client(data)
        except ProtocolError as exc:
            self.fatal(exc.sqlstate, exc.message)

    def _fail_waiting(self, exc: ServerError) -> None:
        """No server: an error for the client's pending request, then back to idle."""
        assert self.transport is not None
        data = bytes(self.buf)
        self.buf.clear()
        self.resume_client()
        self.transport.write(backend.error_response(exc.sqlstate, exc.message))
        if data[:1] == b"Q":
            end = 1 + _from_bytes(data[1:5], "big")
            self.transport.write(backend.ready_for_query(b"I"))
            data = data[end:]
        else:
            self.discard_until_sync = True
        if data:
            self._from_client(data)

    def _link(self, server: ServerConnection) -> None:
        """Attach a server for this transaction, bringing its session state to the client's first."""
        self.server = server
        server.sink = self
        pending = server.take_inbox()
        if pending and self.transport is not None:
            self.transport.write(pending)
        assert self.state is not None
        replay = self.state.replay_sql(server.session_state)
        if replay is not None:
            server.session_state = self.state.params
            self.inject_query(server, replay)

    def _add_follow_up(self, out: list[bytes]) -> None:
        if self.follow_up is not None:
            out.append(frontend.query(self.follow_up))
            self.sent_syncs += 1
            self.drop_groups.append(self.sent_syncs)
            self.follow_up = None

    def close_flushed_run(self) -> None:
        """The client's extended messages ended in Flush, not Sync, and it now needs another shard:
        a Sync of ours ends the run here (its ReadyForQuery is not forwarded), so this server can
        be let go once it has answered."""
        self.out.append(frontend.SYNC)
        self.sent_syncs += 1
        self.silent_syncs.append(self.sent_syncs)
        self.unsynced = False

    def inject_query(self, server: ServerConnection, sql: str) -> None:
        """Send a query of pgshard's own down the linked server; its replies never reach the client."""
        self.sent_syncs += 1
        self.drop_groups.append(self.sent_syncs)
        server.write(frontend.query(sql))

    # server -> client -------------------------------------------------------------------------------
    def server_data(self, server: ServerConnection, data: bytes) -> None:
        parse_q = self.parse_q
        if (
            not (
                self.srv_carry
                or self.srv_skip
                or self.drop_groups
                or self.silent_syncs
                or self.close_q
                or self.tracking_tags
            )
            # One Parse of the client's unnamed statement (extended protocol without names) is
            # settled by the ReadyForQuery of its group as well as by its ParseComplete.
            and (not parse_q or (len(parse_q) == 1 and not parse_q[0][1] and not parse_q[0][2]))
            and self._whole_replies(server, data, bool(parse_q))
        ):
            return
        if self.srv_carry:
            data = self.srv_carry + data
            self.srv_carry = b""
        n = len(data)
        pos = 0
        kept: list[bytes] | None = None
        out_from = 0
        if self.srv_skip:
            step = min(self.srv_skip, n)
            self.srv_skip -= step
            if self.srv_skip_drop:
                out_from = step
            pos = step
        drained = False
        while pos < n:
            if n - pos < 6 and (n - pos < 5 or data[pos] == _Z):
                self.srv_carry = data[pos:]
                n = pos
                break
            msg_type = data[pos]
            end = pos + 1 + int32_at(data, pos + 1)
            drop = False
            ready = False
            ours = False  # the ReadyForQuery of a query pgshard added: state is not the client's
            if self.drop_groups and self.drop_groups[0] == self.done_syncs + 1:
                drop = True
                if msg_type == _Z:
                    self.drop_groups.popleft()
                    ready = ours = True
                elif msg_type == _ERROR:
                    detail = data[pos + 5 : end][:200]
                    log.warning("a query of pgshard's own failed", peer=self.peer, detail=detail)
                    server.session_state = {}
            elif msg_type == _Z:
                ready = True
                if self.silent_syncs and self.silent_syncs[0] == self.done_syncs + 1:
                    self.silent_syncs.popleft()  # answers a Sync of ours: the client asked for none
                    drop = True
            elif msg_type == _PARSE_COMPLETE:
                if self.parse_q:
                    drop = self.parse_q.popleft()[1]
            elif msg_type == _CLOSE_COMPLETE:
                if self.close_q:
                    drop = self.close_q.popleft()[1]
            elif msg_type == _ERROR:
                self.failed = True
            elif msg_type == _COMMAND_COMPLETE and self.tracking_tags:
                if end > n:
                    self.srv_carry = data[pos:]
                    n = pos
                    break
                tag = data[pos + 5 : end - 1]
                if tag == b"COMMIT":
                    self.tx_outcome = True
                elif tag == b"ROLLBACK":
                    self.tx_outcome = False
            if drop:
                if kept is None:
                    kept = []
                kept.append(data[out_from:pos])
                out_from = min(end, n)
            if ready:
                self.done_syncs += 1
                self.status = data[pos + 5]
                if not ours:
                    self._on_ready(server)
                drained = self.done_syncs == self.sent_syncs
                if (
                    drained
                    and self.status == 0x49
                    and not self.unsynced
                    and self.pinned is None
                    and self.mode != "session"
                ):
                    # Whatever follows (an asynchronous notice) still belongs to this client.
                    self._forward(kept, data, out_from, n)
                    self._release(server, b"")
                    return
            if end > n:
                self.srv_skip = end - n
                self.srv_skip_drop = drop
                pos = n
                break
            pos = end
        self._forward(kept, data, out_from, n)
        if drained:
            self.drained()

    def _whole_replies(self, server: ServerConnection, data: bytes, unnamed_parse: bool) -> bool:
        """The common chunk, handled with a walk over headers only: whole messages, nothing of ours
        to drop, at most one ReadyForQuery and only as the last message. False: use the full path.

        The caller checked that nothing is pending that needs message bodies (drops, tags, carries);
        with `unnamed_parse`, the chunk must end the last group the client has sent, so that the
        ReadyForQuery retires that Parse (`_on_ready`).
        """
        n = len(data)
        pos = 0
        ready = -1
        while n - pos >= 5:
            msg_type = data[pos]
            if msg_type in (_Z, _ERROR):
                if msg_type == _ERROR or ready >= 0:
                    return False  # the full path notes the failure / splits the replies
                ready = pos
            pos += 1 + int32_at(data, pos + 1)
        if pos != n or (ready >= 0 and ready + 6 != n):
            return False  # a message split across chunks, or something after the ReadyForQuery
        if unnamed_parse and (ready < 0 or self.done_syncs + 1 != self.sent_syncs):
            return False
        transport = self.transport
        if ready < 0:
            if transport is not None and not transport.is_closing():
                transport.write(data)
            return True
        self.done_syncs += 1
        self.status = data[ready + 5]
        self._on_ready(server)
        drained = self.done_syncs == self.sent_syncs
        if transport is not None and not transport.is_closing():
            transport.write(data)
        if drained:
            if self.status == 0x49 and not self.unsynced and self.pinned is None and self.mode != "session":
                self._release(server, b"")
            else:
                self.drained()
        return True

    def _forward(self, kept: list[bytes] | None, data: bytes, out_from: int, upto: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if kept is None:
            if out_from == 0 and upto == len(data):
                transport.write(data)
            elif upto > out_from:
                transport.write(data[out_from:upto])
            return
        kept.append(data[out_from:upto])
        transport.write(b"".join(kept))

    def _on_ready(self, server: ServerConnection) -> None:
        """ReadyForQuery: settle session state and forget drop expectations of finished sync groups."""
        done = self.done_syncs
        parse_q = self.parse_q
        while parse_q and parse_q[0][0] < done:
            _, _, name = parse_q.popleft()
            if name:  # its Parse never completed (an error skipped it): the server does not have it
                server.prepared.pop(name, None)
        close_q = self.close_q
        while close_q and close_q[0][0] < done:
            close_q.popleft()
        state = self.state
        if state is not None and (state.pending or state.tx_pending):
            state.on_ready(self.status, self.failed, self.tx_outcome)
            self.tracking_tags = bool(state.tx_pending)
            server.session_state = state.params
        if self.unpin_when_ready:
            self.unpin_when_ready = False
            if self.pinned is not None and not self.failed and self.status == 0x49:
                self.pinned = None
                self.app.pinned_clients -= 1
        self.failed = False
        self.tx_outcome = None

    def _release(self, server: ServerConnection, rest: bytes) -> None:
        """The transaction is over: the server goes back to the pool for the next client."""
        self.server = None
        server.sink = None
        if rest:  # asynchronous messages after ReadyForQuery belong to nobody now
            pass
        server.pool.release(server)
        if self.buf and self.phase == _READY:
            data = bytes(self.buf)
            self.buf.clear()
            self._from_client(data)

    def server_lost(self, server: ServerConnection) -> None:
        """The server went away under us: the client's transaction is gone; say so and close."""
        if self.server is server:
            self.server = None
            server.pool.discard(server)
            self.fatal("08006", f"server connection to {server.target.label} was lost")

    # cancel and clean-up ------------------------------------------------------------------------------
    def cancel_running_query(self) -> None:
        """Forward a cancel to the server running this client's query, if one is running now."""
        server = self.server
        if server is not None and self.done_syncs < self.sent_syncs:
            spawn(send_cancel(server.target, server.backend_pid, server.backend_secret))

    async def _clean_up_server(self, server: ServerConnection) -> None:
        """The client left holding a server: cancel, roll back, reset, then reuse it or close it."""
        pool = server.pool
        pool_is_clean = False
        try:
            if self.done_syncs < self.sent_syncs or self.unsynced or self.srv_skip or self.srv_carry:
                # A query is running or the stream is mid-message: cancel it and drop the connection.
                await server.cancel_running_query()
            else:
                if self.status != 0x49:
                    await asyncio.wait_for(server.run_simple("ROLLBACK"), 10)
                if self.pinned is not None or self.mode == "session":
                    await asyncio.wait_for(server.run_simple("DISCARD ALL"), 10)
                    server.prepared.clear()
                    server.session_state = {}
                pool_is_clean = True
        except (TimeoutError, ServerError, OSError) as exc:
            log.warning("server clean-up failed", server=server.target.label, error=str(exc))
        finally:
            if self.pinned is not None:
                self.app.pinned_clients -= 1
        if pool_is_clean and not server.closed:
            pool.release(server)
        else:
            pool.discard(server)


def _effects_of_query(query: bytes) -> tuple[SessionEffect, ...]:
    keyword = leading_keyword(query)
    if keyword in _SESSION_KEYWORDS or (keyword in _FUNCTION_KEYWORDS and mentions_session_function(query)):
        try:
            return tuple(analyse_query(query.decode()))
        except UnicodeDecodeError:
            return ()
    return ()


def new_cancel_key() -> tuple[int, int]:
    return secrets.randbelow(2**31 - 1) + 1, secrets.randbelow(2**31)
