"""Two-phase commit across shards, and recovery of what a crash leaves prepared.

Why: a transaction that wrote on several shards and is committed with one COMMIT per shard is not
atomic: a crash (of pgshard, a shard, or the network) between two COMMITs leaves one shard committed
and another not. PostgreSQL's own two-phase commit closes that gap:

* `PREPARE TRANSACTION 'gid'` makes the transaction's work durable without committing it. "After this
  command, the transaction is no longer associated with the current session; instead, its state is
  fully stored on disk, and there is a very high probability that it can be committed successfully,
  even if a database crash occurs before the commit is requested." If PREPARE fails for any reason
  (a deferred constraint, a temporary table, a dead connection) the transaction is rolled back
  (https://www.postgresql.org/docs/current/sql-prepare-transaction.html). PREPARE and COMMIT PREPARED
  flush the WAL whatever `synchronous_commit` says (twophase.c: EndPrepare, and
  RecordTransactionCommitPrepared: "nor is there any support for async commit of a prepared xact").
* A prepared transaction survives crashes and restarts of its server and "continues to hold whatever
  locks it held" (same page) until someone runs `COMMIT PREPARED` or `ROLLBACK PREPARED` for it: not
  necessarily its session, but its owner or a superuser
  (https://www.postgresql.org/docs/current/sql-commit-prepared.html), connected to its database
  (twophase.c refuses others). Prepared transactions are listed in `pg_prepared_xacts`
  (https://www.postgresql.org/docs/current/view-pg-prepared-xacts.html), and need
  `max_prepared_transactions` > 0, which is 0 by default
  (https://www.postgresql.org/docs/current/runtime-config-resource.html).

So nothing may stay prepared for long, and whoever finds a prepared transaction must know whether to
commit or roll it back. The protocol (`commit_two_phase`) is the classic one with presumed abort:

1. PREPARE every shard that wrote (a shard that only read gets a plain COMMIT: it has nothing to
   lose; a transaction with one writer needs no 2PC at all: its COMMIT is the decision);
2. if all prepared, record the decision COMMIT durably in PostgreSQL (`DecisionLog`, a table on the
   database's default shard: proxies are stateless and may be many, DESIGN.md principle 6);
3. COMMIT PREPARED everywhere; what fails now is finished by `recover`, never rolled back.

A prepared transaction without a COMMIT decision is rolled back by `recover`. Recovery can run in any
proxy, concurrently with live commits of other proxies, so it does not just presume: before rolling
back it records an ABORT decision for the transaction, and a committer's COMMIT decision is only
taken if no ABORT was recorded first (one row per transaction, INSERT ... ON CONFLICT DO NOTHING).
Whichever comes first wins, and both sides obey the row, so a slow committer and an eager recovery
can never split a transaction. Recovery still leaves young prepared transactions alone
(`older_than`), so that it does not roll back another proxy's commit in flight.

Global transaction identifiers are `<prefix>_<32 hex digits>_<shard>`: the prefix and hex digits are
the transaction id, stored in the decision table; the shard number makes each gid unique on a
server that holds several shards of the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pooler.log import log
from pooler.server_connection import ServerConnection, ServerError
from proxy.protocol import backend, frontend

#: Opens a new, logged-in server connection (e.g. `lambda: open_server_connection(target, 5)`).
Connector = Callable[[], Awaitable[ServerConnection]]

_T = TypeVar("_T")

GID_PREFIX = "pgshard"
DECISION_TABLE = "pgshard_2pc_decisions"

#: Recovery leaves prepared transactions younger than this alone: they may be another live proxy's
#: commit in flight (its PREPAREs and decision take milliseconds; 30 s is far beyond any of them).
RECOVERY_MIN_AGE = 30.0

#: Decision rows whose transaction has nothing prepared anywhere any more are deleted by recovery
#: once they are this old. Must exceed MAX_UNDECIDED by a wide margin (see below).
DECISION_RETENTION = 3600.0

#: A committer that took longer than this from its first PREPARE to its decision rolls back instead
#: of committing. Recovery may have rolled some of its shards back and, after DECISION_RETENTION,
#: forgotten the ABORT row that fences it; a decision taken that late could split the transaction.
MAX_UNDECIDED = 600.0

_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_TXID_HEX = 32

# SQLSTATEs (PostgreSQL Appendix A, "Error Codes")
UNDEFINED_OBJECT = "42704"  # COMMIT/ROLLBACK PREPARED of a gid that is not prepared (any more)
TRANSACTION_ROLLBACK = "40000"
TRANSACTION_RESOLUTION_UNKNOWN = "08007"
_CONNECTION_FAILURE = "08006"
_DUPLICATE_TABLE, _UNIQUE_VIOLATION = "42P07", "23505"


# transaction ids and gids ---------------------------------------------------------------------------
def new_transaction_id(prefix: str = GID_PREFIX) -> str:
    """A fresh distributed transaction id: `<prefix>_<uuid4 hex>`."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"gid prefix {prefix!r} must be a letter then up to 63 letters, digits or '_'")
    return f"{prefix}_{uuid.uuid4().hex}"


def gid_for(txid: str, shard: int) -> str:
    """The PREPARE TRANSACTION identifier of one shard's part of `txid`."""
    return f"{txid}_{shard}"


def parse_gid(gid: str, prefix: str = GID_PREFIX) -> tuple[str, int] | None:
    """(transaction id, shard) of a gid that `commit_two_phase` made with `prefix`, else None.

    Strict, so that gids of other prefixes (another pgshard database, other software) are never
    taken for ours, even when one prefix starts with another.
    """
    head = prefix + "_"
    if not gid.startswith(head):
        return None
    hex_part, sep, shard = gid[len(head) :].partition("_")
    if not sep or len(hex_part) != _TXID_HEX or not shard.isdigit() or not shard.isascii():
        return None
    try:
        int(hex_part, 16)
    except ValueError:
        return None
    return head + hex_part, int(shard)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# one statement of ours on a server connection -------------------------------------------------------
async def _execute(conn: ServerConnection, sql: str) -> tuple[str, list[tuple[str | None, ...]]]:
    """Run a simple Query to its ReadyForQuery: the last CommandComplete tag and the rows (as text).

    `ServerConnection.run_simple` returns neither; both matter here (rows of pg_prepared_xacts, and
    PREPARE TRANSACTION answering "ROLLBACK" when the transaction had already failed).
    """
    conn.write(frontend.query(sql))
    error: ServerError | None = None
    tag = ""
    rows: list[tuple[str | None, ...]] = []
    while True:
        msg_type, body = await conn.read_message()
        if msg_type == 0x44:  # 'D' DataRow
            rows.append(tuple(None if v is None else v.decode() for v in backend.decode_data_row(body)))
        elif msg_type == 0x43:  # 'C' CommandComplete
            tag = backend.decode_command_complete(body)
        elif msg_type == 0x45:  # 'E' ErrorResponse
            fields = backend.decode_error_fields(body)
            error = ServerError(fields.get("C", "XX000"), fields.get("M", ""), fields)
        elif msg_type == 0x5A:  # 'Z' ReadyForQuery
            if error is not None:
                raise error
            return tag, rows


async def _attempt(conn: ServerConnection, sql: str) -> tuple[str, list[tuple[str | None, ...]]]:
    """`_execute`, with every failure (a broken stream too) as a ServerError."""
    try:
        return await _execute(conn, sql)
    except ServerError:
        raise
    except Exception as exc:  # a protocol error or a dead transport: the connection is lost
        raise ServerError(_CONNECTION_FAILURE, f"server {conn.target.label}: {exc}") from exc


def _ended(tag: str, expected: str, shard: int) -> None:
    """COMMIT and PREPARE TRANSACTION of a failed transaction roll it back without an error."""
    if tag != expected:
        raise ServerError(
            TRANSACTION_ROLLBACK,
            f"the transaction had already failed on shard {shard} and was rolled back there",
        )


async def _outcomes(
    calls: Mapping[int, Awaitable[object]],
) -> tuple[list[int], dict[int, ServerError]]:
    """Run one awaitable per shard at once: the shards that succeeded, and the errors of the others."""
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    ok: list[int] = []
    errors: dict[int, ServerError] = {}
    for shard, result in zip(calls, results, strict=True):
        if isinstance(result, ServerError):
            errors[shard] = result
        elif isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # cancelled: like a crash, recovery finishes what was prepared
            errors[shard] = ServerError(_CONNECTION_FAILURE, str(result))
        else:
            ok.append(shard)
    return ok, errors


def _first(errors: dict[int, ServerError]) -> ServerError:
    return errors[min(errors)]


# commit ---------------------------------------------------------------------------------------------
async def commit_two_phase(
    participants: Mapping[int, ServerConnection],
    wrote: set[int] | None,
    decision_log: DecisionLog,
    gid_prefix: str = GID_PREFIX,
    *,
    txid: str | None = None,
) -> None:
    """Commit a transaction open on every connection of `participants` (shard -> connection), atomically.

    `wrote` names the shards that wrote (None: assume all did). Returns once the transaction is
    committed: durably decided, even if some COMMIT PREPARED failed (recovery finishes those).
    Raises ServerError when it is not committed: the failing shard's own error when a PREPARE or
    COMMIT failed (everything is then rolled back, or left for recovery to roll back), SQLSTATE
    40000 when recovery had already decided to roll it back, 08007 when the decision could not be
    recorded nor read back (recovery then decides; until then the client cannot know).

    Afterwards every connection is idle (no transaction open) unless it is closed; a connection on
    which anything failed may be released as broken to be safe.
    """
    shards = sorted(participants)
    writers = shards if wrote is None else [s for s in shards if s in wrote]
    readers = [s for s in shards if s not in writers]
    if len(writers) <= 1:
        await _commit_one_phase(participants, readers, writers)
        return
    txid = txid or new_transaction_id(gid_prefix)
    started = time.monotonic()
    calls: dict[int, Awaitable[object]] = {s: _commit_plain(participants[s], s) for s in readers}
    calls.update({s: _prepare(participants[s], gid_for(txid, s), s) for s in writers})
    ok, errors = await _outcomes(calls)
    prepared = [s for s in ok if s in writers]
    if errors:
        log.warning("2pc: prepare failed, rolling back", txid=txid, errors=_describe(errors))
        await _abandon(participants, txid, prepared, [s for s in errors if s in writers])
        raise _first(errors)
    if time.monotonic() - started > MAX_UNDECIDED:
        await _abandon(participants, txid, prepared, [])
        raise ServerError(
            TRANSACTION_ROLLBACK, f"distributed transaction {txid} took too long to prepare; rolled back"
        )
    committed = await _decide(decision_log, txid)
    if not committed:
        await _abandon(participants, txid, prepared, [])
        raise ServerError(
            TRANSACTION_ROLLBACK,
            f"distributed transaction {txid} was rolled back by pgshard recovery before it could commit",
        )
    _, errors = await _outcomes(
        {s: _attempt(participants[s], f"COMMIT PREPARED {_literal(gid_for(txid, s))}") for s in writers}
    )
    if errors:
        log.warning(
            "2pc: commit prepared failed; recovery will finish it", txid=txid, errors=_describe(errors)
        )
        return
    try:
        await decision_log.forget(txid)
    except ServerError as exc:  # recovery collects it later
        log.info("2pc: decision not deleted", txid=txid, error=exc.message)


async def _commit_one_phase(
    participants: Mapping[int, ServerConnection], readers: list[int], writers: list[int]
) -> None:
    """No atomicity to protect: readers first (their failure still rolls back the writer), then it."""
    if readers:
        _, errors = await _outcomes({s: _commit_plain(participants[s], s) for s in readers})
        if errors:
            for shard in writers:
                with contextlib.suppress(ServerError):
                    await _attempt(participants[shard], "ROLLBACK")
            raise _first(errors)
    for shard in writers:
        await _commit_plain(participants[shard], shard)


async def _commit_plain(conn: ServerConnection, shard: int) -> None:
    tag, _ = await _attempt(conn, "COMMIT")
    _ended(tag, "COMMIT", shard)


async def _prepare(conn: ServerConnection, gid: str, shard: int) -> None:
    tag, _ = await _attempt(conn, f"PREPARE TRANSACTION {_literal(gid)}")
    _ended(tag, "PREPARE TRANSACTION", shard)


async def _decide(decision_log: DecisionLog, txid: str) -> bool:
    """Record COMMIT; True if it is (now) the decision, False if recovery decided ABORT first.

    A failure here leaves the outcome in doubt (the INSERT may have committed with its reply lost),
    so the row is read back, by trying to record ABORT: whichever is stored is the decision.
    """
    try:
        return await decision_log.decide(txid, commit=True)
    except ServerError as first:
        try:
            return await decision_log.decide(txid, commit=False)
        except ServerError as second:
            log.error("2pc: decision unknown; recovery will resolve", txid=txid, error=second.message)
            raise ServerError(
                TRANSACTION_RESOLUTION_UNKNOWN,
                f"could not record the commit decision of distributed transaction {txid} "
                f"({first.message}); pgshard recovery will commit or roll it back",
            ) from second


async def _abandon(
    participants: Mapping[int, ServerConnection], txid: str, prepared: list[int], failed: list[int]
) -> None:
    """Roll back what was prepared; end what failed. What cannot be reached, recovery rolls back."""
    calls: dict[int, Awaitable[object]] = {
        s: _attempt(participants[s], f"ROLLBACK PREPARED {_literal(gid_for(txid, s))}") for s in prepared
    }
    calls.update({s: _attempt(participants[s], "ROLLBACK") for s in failed if not participants[s].closed})
    _, errors = await _outcomes(calls)
    if errors:
        log.warning("2pc: rollback incomplete; recovery will finish it", txid=txid, errors=_describe(errors))


def _describe(errors: Mapping[int, ServerError]) -> dict[int, str]:
    return {shard: f"{e.sqlstate} {e.message}" for shard, e in errors.items()}


# the decision log -----------------------------------------------------------------------------------
class DecisionLog:
    """The outcome of each distributed transaction that got as far as a decision, kept in PostgreSQL.

    One row per transaction id in `pgshard_2pc_decisions` on the database's default shard:
    `committed` true for COMMIT (written by a committer once every shard prepared), false for ABORT
    (written by recovery before it rolls back). The primary key makes the first decision final.

    Durability is the server's: a decision is durable when PostgreSQL says its INSERT committed.
    Connections of the log raise `synchronous_commit = off` to `on` (an asynchronous commit can be
    lost in a crash after COMMIT PREPARED already ran elsewhere, which would split the transaction),
    but `fsync = off`, a volatile disk cache, or a failover to a standby that had not received the row
    still lose it: the default shard's own durability settings apply.

    `connect` opens a new server connection to that shard; at most `max_connections` are open at
    once, and idle ones are kept for reuse.
    """

    def __init__(self, connect: Connector, max_connections: int = 4, table: str = DECISION_TABLE) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", table):
            raise ValueError(f"decision table name {table!r} must be a lower-case identifier")
        self._connect = connect
        self.table = table
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[ServerConnection] = []

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[ServerConnection]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._open()
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if conn.closed:
                return
            self._idle.append(conn)

    async def _open(self) -> ServerConnection:
        conn = await self._connect()
        try:
            _, rows = await _attempt(conn, "SHOW synchronous_commit")
            if rows and rows[0][0] == "off":
                await _attempt(conn, "SET synchronous_commit = on")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, sql: str) -> tuple[str, list[tuple[str | None, ...]]]:
        async with self._connection() as conn:
            return await _attempt(conn, sql)

    async def ensure_schema(self) -> None:
        """Create the decision table if it is missing (at start-up, before any commit)."""
        sql = (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            "gid_base text PRIMARY KEY, committed boolean NOT NULL, "
            "decided_at timestamptz NOT NULL DEFAULT now())"
        )
        try:
            await self._run(sql)
        except ServerError as exc:
            # Two proxies starting at once: IF NOT EXISTS is not atomic in PostgreSQL.
            if exc.sqlstate not in (_DUPLICATE_TABLE, _UNIQUE_VIOLATION):
                raise

    async def decide(self, txid: str, commit: bool) -> bool:
        """Record `commit` as txid's outcome unless one is recorded already; the recorded outcome."""
        value = "true" if commit else "false"
        key = _literal(txid)
        sql = (
            f"WITH ins AS (INSERT INTO {self.table} (gid_base, committed) VALUES ({key}, {value}) "
            "ON CONFLICT (gid_base) DO NOTHING RETURNING committed) "
            f"SELECT committed FROM ins UNION ALL SELECT committed FROM {self.table} WHERE gid_base = {key}"
        )
        # The outer SELECT's snapshot predates a conflicting row that ON CONFLICT waited for, so it
        # can come back empty once; the next statement sees the row.
        for _ in range(3):
            _, rows = await self._run(sql)
            if rows:
                return rows[0][0] == "t"
        raise ServerError("XX000", f"decision of distributed transaction {txid} neither stored nor found")

    async def record_commit(self, txid: str) -> None:
        """Record COMMIT as txid's decision, durably; raises ServerError 40000 if it was ABORT already."""
        if not await self.decide(txid, commit=True):
            raise ServerError(TRANSACTION_ROLLBACK, f"distributed transaction {txid} was already rolled back")

    async def outcomes(self, txids: Iterable[str]) -> dict[str, bool]:
        """The recorded decisions (True: COMMIT) of those of `txids` that have one."""
        wanted = sorted(set(txids))
        if not wanted:
            return {}
        keys = ", ".join(map(_literal, wanted))
        _, rows = await self._run(f"SELECT gid_base, committed FROM {self.table} WHERE gid_base IN ({keys})")
        return {str(txid): committed == "t" for txid, committed in rows}

    async def forget(self, txid: str) -> None:
        """Delete txid's decision: every shard has committed it."""
        await self._run(f"DELETE FROM {self.table} WHERE gid_base = {_literal(txid)}")

    async def collect_garbage(self, keep: Iterable[str], older_than: float = DECISION_RETENTION) -> int:
        """Delete decisions older than `older_than` seconds except those of `keep`; how many went."""
        kept = ", ".join(map(_literal, sorted(set(keep))))
        age = f"make_interval(secs => {float(older_than)!r})"
        tag, _ = await self._run(
            f"DELETE FROM {self.table} WHERE decided_at < now() - {age}"
            f" AND gid_base <> ALL (ARRAY[{kept}]::text[])"
        )
        return int(tag.rpartition(" ")[2] or 0)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


# recovery -------------------------------------------------------------------------------------------
ShardAccess = ServerConnection | Connector
OwnerConnector = Callable[[int, str], Awaitable[ServerConnection]]


@dataclass(slots=True)
class RecoveryReport:
    """What one `recover` pass did (gids), and what it could not do."""

    committed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    left_young: list[str] = field(default_factory=list)  # prepared too recently: maybe in flight
    failed: dict[str, str] = field(default_factory=dict)  # gid -> why it is still prepared
    unreachable: dict[int, str] = field(default_factory=dict)  # shard -> error
    forgotten: int = 0  # decision rows deleted

    @property
    def clean(self) -> bool:
        return not self.failed and not self.unreachable


@dataclass(slots=True)
class _Prepared:
    gid: str
    txid: str
    owner: str
    age: float


async def recover(
    shards: Mapping[int, ShardAccess],
    decision_log: DecisionLog,
    older_than: float = RECOVERY_MIN_AGE,
    gid_prefix: str = GID_PREFIX,
    *,
    connect_as: OwnerConnector | None = None,
    keep_decisions_for: float = DECISION_RETENTION,
) -> RecoveryReport:
    """Commit or roll back every prepared transaction of ours older than `older_than` seconds.

    `shards` gives, per shard, a connection to use (left open) or a Connector (its connection is
    closed afterwards). A prepared transaction is committed if its decision is COMMIT, else ABORT is
    recorded (unless a committer got COMMIT in first) and it is rolled back. COMMIT/ROLLBACK PREPARED
    must run as the transaction's owner or a superuser: for a transaction owned by another role than
    the shard connection's, `connect_as(shard, owner)` is used when given. Decisions with nothing
    prepared anywhere are deleted after `keep_decisions_for` seconds, if every shard was reachable.
    """
    report = RecoveryReport()
    listed = await asyncio.gather(
        *(_with_shard(access, lambda c: _list_prepared(c, gid_prefix)) for access in shards.values()),
        return_exceptions=True,
    )
    found: dict[int, list[_Prepared]] = {}
    for shard, result in zip(shards, listed, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result
            report.unreachable[shard] = getattr(result, "message", str(result))
        else:
            found[shard] = result
    todo: dict[int, list[_Prepared]] = {}
    for shard, items in found.items():
        for item in items:
            if item.age < older_than:
                report.left_young.append(item.gid)
            else:
                todo.setdefault(shard, []).append(item)
    still_prepared = {item.txid for items in found.values() for item in items}
    if todo:
        decisions = await decision_log.outcomes(i.txid for items in todo.values() for i in items)
        for txid in sorted({i.txid for items in todo.values() for i in items} - set(decisions)):
            decisions[txid] = await decision_log.decide(txid, commit=False)
        results = await asyncio.gather(
            *(
                _resolve(shard, shards[shard], items, decisions, connect_as, report)
                for shard, items in todo.items()
            ),
            return_exceptions=True,
        )
        for shard, outcome in zip(todo, results, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                report.unreachable[shard] = getattr(outcome, "message", str(outcome))
        resolved = set(report.committed) | set(report.rolled_back)
        still_prepared = {i.txid for items in found.values() for i in items if i.gid not in resolved}
    if not report.unreachable:
        report.forgotten = await decision_log.collect_garbage(still_prepared, keep_decisions_for)
    if report.committed or report.rolled_back or not report.clean:
        log.info(
            "2pc recovery",
            committed=len(report.committed),
            rolled_back=len(report.rolled_back),
            failed=report.failed,
            unreachable=report.unreachable,
        )
    return report


async def _with_shard(access: ShardAccess, work: Callable[[ServerConnection], Awaitable[_T]]) -> _T:
    if isinstance(access, ServerConnection):
        return await work(access)
    conn = await access()
    try:
        return await work(conn)
    finally:
        conn.close()


async def _list_prepared(conn: ServerConnection, prefix: str) -> list[_Prepared]:
    _, rows = await _attempt(
        conn,
        "SELECT gid, owner, extract(epoch FROM now() - prepared) FROM pg_prepared_xacts "
        f"WHERE database = current_database() AND starts_with(gid, {_literal(prefix + '_')}) ORDER BY gid",
    )
    out: list[_Prepared] = []
    for gid, owner, age in rows:
        parsed = parse_gid(str(gid), prefix)
        if parsed is not None:
            out.append(_Prepared(str(gid), parsed[0], str(owner), float(age or 0)))
    return out


async def _resolve(
    shard: int,
    access: ShardAccess,
    items: list[_Prepared],
    decisions: Mapping[str, bool],
    connect_as: OwnerConnector | None,
    report: RecoveryReport,
) -> None:
    async def run(conn: ServerConnection) -> None:
        for item in items:
            commit = decisions[item.txid]
            sql = f"{'COMMIT' if commit else 'ROLLBACK'} PREPARED {_literal(item.gid)}"
            try:
                if item.owner != conn.target.user and connect_as is not None:
                    owner_conn = await connect_as(shard, item.owner)
                    try:
                        await _attempt(owner_conn, sql)
                    finally:
                        owner_conn.close()
                else:
                    await _attempt(conn, sql)
            except ServerError as exc:
                if exc.sqlstate != UNDEFINED_OBJECT:  # else someone else (its committer) finished it
                    report.failed[item.gid] = f"{exc.sqlstate} {exc.message}"
                    continue
            (report.committed if commit else report.rolled_back).append(item.gid)

    await _with_shard(access, run)


# start-up check -------------------------------------------------------------------------------------
async def check_prepared_transactions(conn: ServerConnection, shard: int) -> str | None:
    """Why two-phase commit cannot work on this shard, or None when it can."""
    _, rows = await _attempt(conn, "SHOW max_prepared_transactions")
    if rows and rows[0][0] == "0":
        t = conn.target
        return (
            f"shard {shard} ({t.host}:{t.port}) has max_prepared_transactions = 0: set it to at least "
            "max_connections in postgresql.conf and restart, or set general.two_phase_commit = false "
            "to allow best-effort one-phase commits"
        )
    return None
