"""router/twophase.py against three real PostgreSQL shards: commit, failed PREPAREs, crash recovery.

A crash of pgshard is simulated by running the protocol's steps by hand up to a point and then closing
every connection: prepared transactions survive that (they belong to no session), open ones are rolled
back by their server. Whatever the point, `recover` must leave no prepared transaction on any shard
and the data all-or-nothing. Shards live in a database of their own (`twophase`) on the session's
servers, so nothing here can touch another test's data or prepared transactions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

import pytest

from pooler.server_connection import ServerConnection, ServerError, ServerTarget, open_server_connection
from proxy.localpg import LocalPostgres
from router.twophase import (
    DECISION_TABLE,
    TRANSACTION_ROLLBACK,
    DecisionLog,
    check_prepared_transactions,
    commit_two_phase,
    gid_for,
    new_transaction_id,
    parse_gid,
    recover,
)
from tests.conftest import APP_PASSWORD, APP_USER, PgFactory

pytestmark = pytest.mark.e2e

DB = "twophase"
OTHER_ROLE, OTHER_PASSWORD = "twophase_other", "other-secret"
Connect = Callable[[int], Awaitable[ServerConnection]]


# fixtures -------------------------------------------------------------------------------------------
def _ensure_database(pg: LocalPostgres) -> None:
    if pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'") != "1":
        pg.create_database(DB, owner=APP_USER)
    if pg.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{OTHER_ROLE}'") != "1":
        pg.create_role(OTHER_ROLE, OTHER_PASSWORD)


def _rollback_leftovers(pg: LocalPostgres) -> None:
    gids = pg.psql(f"SELECT gid FROM pg_prepared_xacts WHERE database = '{DB}'", dbname=DB)
    for gid in filter(None, gids.splitlines()):
        pg.psql(f"ROLLBACK PREPARED '{gid}'", dbname=DB)


@pytest.fixture
def cluster(pg_factory: PgFactory) -> Iterator[list[LocalPostgres]]:
    """Three shards with empty tables `items` and `deferred` (a unique key checked at commit)."""
    pgs = pg_factory.many(["shard0", "shard1", "shard2"])
    for pg in pgs:
        _ensure_database(pg)
        _rollback_leftovers(pg)
        pg.psql(
            f"DROP TABLE IF EXISTS items, deferred, {DECISION_TABLE};"
            "CREATE TABLE items (id int PRIMARY KEY, note text);"
            "CREATE TABLE deferred (k int UNIQUE DEFERRABLE INITIALLY DEFERRED);"
            f"ALTER TABLE items OWNER TO {APP_USER}; ALTER TABLE deferred OWNER TO {APP_USER};"
            f"GRANT ALL ON items TO {OTHER_ROLE};",
            dbname=DB,
        )
    yield pgs
    for pg in pgs:
        _rollback_leftovers(pg)


def _target(pg: LocalPostgres, user: str = APP_USER, password: str = APP_PASSWORD) -> ServerTarget:
    return ServerTarget(pg.host, pg.port, user, password, DB)


@pytest.fixture
async def connect(cluster: list[LocalPostgres]) -> AsyncIterator[Connect]:
    """`await connect(shard)`: a new connection to that shard's database, closed at teardown."""
    opened: list[ServerConnection] = []

    async def _connect(shard: int) -> ServerConnection:
        conn = await open_server_connection(_target(cluster[shard]), 10)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.close()


@pytest.fixture
async def decisions(cluster: list[LocalPostgres], connect: Connect) -> AsyncIterator[DecisionLog]:
    log = DecisionLog(lambda: connect(0))
    await log.ensure_schema()
    yield log
    log.close()


# helpers --------------------------------------------------------------------------------------------
async def _open_transactions(
    connect: Connect, shards: Sequence[int] = (0, 1, 2)
) -> dict[int, ServerConnection]:
    """A transaction on each shard that inserted item `shard`."""
    conns = {shard: await connect(shard) for shard in shards}
    for shard, conn in conns.items():
        await conn.run_simple(f"BEGIN; INSERT INTO items VALUES ({shard}, 'shard {shard}')")
    return conns


def _items(cluster: list[LocalPostgres]) -> list[str]:
    """Every shard's item ids, one string per shard."""
    return [pg.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM items", dbname=DB) for pg in cluster]


def _prepared(cluster: list[LocalPostgres]) -> list[str]:
    return [
        gid
        for pg in cluster
        for gid in pg.psql(f"SELECT gid FROM pg_prepared_xacts WHERE database = '{DB}'", dbname=DB).split()
    ]


def _decision_rows(cluster: list[LocalPostgres]) -> str:
    return cluster[0].psql(f"SELECT string_agg(committed::text, ',') FROM {DECISION_TABLE}", dbname=DB)


def _spy(conn: ServerConnection) -> list[str]:
    """The SQL of every simple Query sent on `conn` from now on."""
    sent: list[str] = []
    write = conn.write

    def recording_write(data: bytes) -> None:
        if data[:1] == b"Q":
            sent.append(data[5:-1].decode())
        write(data)

    conn.write = recording_write  # type: ignore[method-assign]
    return sent


def _crash(conns: dict[int, ServerConnection]) -> None:
    """pgshard dies: its connections go; what was prepared stays, what was open is rolled back."""
    for conn in conns.values():
        conn.close()


async def _prepare(conns: dict[int, ServerConnection], txid: str, shards: Sequence[int]) -> None:
    for shard in shards:
        await conns[shard].run_simple(f"PREPARE TRANSACTION '{gid_for(txid, shard)}'")


def _recovery_shards(connect: Connect) -> dict[int, Callable[[], Awaitable[ServerConnection]]]:
    return {shard: (lambda s=shard: connect(s)) for shard in range(3)}  # type: ignore[misc]


# commit ---------------------------------------------------------------------------------------------
async def test_commit_across_three_shards(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    sent = {shard: _spy(conn) for shard, conn in conns.items()}
    await commit_two_phase(conns, None, decisions)
    assert _items(cluster) == ["0", "1", "2"]
    assert _prepared(cluster) == []
    assert _decision_rows(cluster) == ""  # forgotten once every shard committed
    for shard, statements in sent.items():
        assert [s.split(" '")[0] for s in statements] == ["PREPARE TRANSACTION", "COMMIT PREPARED"], shard
        assert parse_gid(statements[0].split("'")[1]) is not None
    for conn in conns.values():  # idle and usable again
        assert await conn.run_simple("SELECT 1") == b"I"


async def test_deferred_constraint_failing_at_prepare_rolls_back_every_shard(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    await conns[1].run_simple("INSERT INTO deferred VALUES (7), (7)")  # checked at PREPARE
    with pytest.raises(ServerError) as failed:
        await commit_two_phase(conns, None, decisions)
    assert failed.value.sqlstate == "23505"
    assert failed.value.fields.get("n") == "deferred_k_key"  # PostgreSQL's own error, untouched
    assert _items(cluster) == ["", "", ""]
    assert _prepared(cluster) == []
    assert _decision_rows(cluster) == ""
    for conn in conns.values():
        assert await conn.run_simple("SELECT 1") == b"I"


async def test_a_shard_lost_before_prepare_rolls_back_the_others(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    # waits (up to 10 s) until the backend is gone
    assert cluster[2].psql(f"SELECT pg_terminate_backend({conns[2].backend_pid}, 10000)") == "t"
    with pytest.raises(ServerError) as failed:
        await commit_two_phase(conns, None, decisions)
    assert failed.value.sqlstate == "08006"
    assert _items(cluster) == ["", "", ""]
    assert _prepared(cluster) == []


async def test_a_transaction_that_failed_on_one_shard_is_not_committed_anywhere(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    with pytest.raises(ServerError):
        await conns[2].run_simple("SELECT 1 / 0")
    with pytest.raises(ServerError) as failed:  # PREPARE of a failed transaction answers ROLLBACK
        await commit_two_phase(conns, None, decisions)
    assert failed.value.sqlstate == TRANSACTION_ROLLBACK
    assert _items(cluster) == ["", "", ""]
    assert _prepared(cluster) == []


async def test_read_only_participants_are_committed_without_prepare(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect, (0, 1))
    conns[2] = await connect(2)
    await conns[2].run_simple("BEGIN; SELECT count(*) FROM items")
    sent = {shard: _spy(conn) for shard, conn in conns.items()}
    await commit_two_phase(conns, {0, 1}, decisions)
    assert sent[2] == ["COMMIT"]
    assert [s.split(" '")[0] for s in sent[0]] == ["PREPARE TRANSACTION", "COMMIT PREPARED"]
    assert _items(cluster) == ["0", "1", ""]
    assert _prepared(cluster) == []


async def test_a_single_writer_gets_a_plain_commit(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect, (1,))
    for shard in (0, 2):
        conns[shard] = await connect(shard)
        await conns[shard].run_simple("BEGIN; SELECT 1")
    sent = {shard: _spy(conn) for shard, conn in conns.items()}
    await commit_two_phase(conns, {1}, decisions)
    assert sent == {0: ["COMMIT"], 1: ["COMMIT"], 2: ["COMMIT"]}
    assert _items(cluster) == ["", "1", ""]
    assert _decision_rows(cluster) == ""


async def test_a_commit_loses_to_an_abort_recovery_recorded_first(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    txid = new_transaction_id()
    assert await decisions.decide(txid, commit=False) is False  # recovery got there first
    conns = await _open_transactions(connect)
    with pytest.raises(ServerError) as failed:
        await commit_two_phase(conns, None, decisions, txid=txid)
    assert failed.value.sqlstate == TRANSACTION_ROLLBACK
    assert _items(cluster) == ["", "", ""]
    assert _prepared(cluster) == []
    with pytest.raises(ServerError):
        await decisions.record_commit(txid)


# recovery -------------------------------------------------------------------------------------------
async def test_recovery_rolls_back_what_was_prepared_without_a_decision(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    txid = new_transaction_id()
    await _prepare(conns, txid, (0, 1))  # crash before shard 2's PREPARE
    _crash(conns)
    assert sorted(_prepared(cluster)) == [gid_for(txid, 0), gid_for(txid, 1)]
    report = await recover(_recovery_shards(connect), decisions, older_than=0)
    assert sorted(report.rolled_back) == [gid_for(txid, 0), gid_for(txid, 1)]
    assert report.committed == [] and report.clean
    assert _prepared(cluster) == []
    assert _items(cluster) == ["", "", ""]
    assert await decisions.outcomes([txid]) == {txid: False}  # fenced: a late committer now loses


async def test_recovery_commits_everything_after_the_decision(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    txid = new_transaction_id()
    await _prepare(conns, txid, (0, 1, 2))
    await decisions.record_commit(txid)
    _crash(conns)  # before any COMMIT PREPARED
    report = await recover(_recovery_shards(connect), decisions, older_than=0, keep_decisions_for=0)
    assert sorted(report.committed) == [gid_for(txid, s) for s in range(3)]
    assert report.rolled_back == [] and report.clean
    assert _prepared(cluster) == []
    assert _items(cluster) == ["0", "1", "2"]
    assert report.forgotten == 1 and _decision_rows(cluster) == ""


async def test_recovery_commits_the_rest_after_some_commit_prepared(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    txid = new_transaction_id()
    await _prepare(conns, txid, (0, 1, 2))
    await decisions.record_commit(txid)
    await conns[0].run_simple(f"COMMIT PREPARED '{gid_for(txid, 0)}'")
    _crash(conns)
    report = await recover(_recovery_shards(connect), decisions, older_than=0)
    assert sorted(report.committed) == [gid_for(txid, 1), gid_for(txid, 2)]
    assert _prepared(cluster) == []
    assert _items(cluster) == ["0", "1", "2"]
    assert _decision_rows(cluster) == "true"  # kept until it is older than keep_decisions_for


async def test_recovery_leaves_young_prepared_transactions_alone(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    txid = new_transaction_id()
    await _prepare(conns, txid, (0, 1, 2))  # a live proxy, about to record its decision
    report = await recover(_recovery_shards(connect), decisions, older_than=3600, keep_decisions_for=0)
    assert sorted(report.left_young) == [gid_for(txid, s) for s in range(3)]
    assert report.committed == report.rolled_back == []
    assert len(_prepared(cluster)) == 3
    await decisions.record_commit(txid)  # not fenced: the commit goes on
    for shard, conn in conns.items():
        await conn.run_simple(f"COMMIT PREPARED '{gid_for(txid, shard)}'")
    assert _items(cluster) == ["0", "1", "2"]


async def test_recovery_with_a_shard_down_resolves_the_others_and_keeps_decisions(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conns = await _open_transactions(connect)
    txid = new_transaction_id()
    await _prepare(conns, txid, (0, 1, 2))
    await decisions.record_commit(txid)
    _crash(conns)

    async def down() -> ServerConnection:
        raise ServerError("08006", "could not connect to server shard2")

    shards = {**_recovery_shards(connect), 2: down}
    report = await recover(shards, decisions, older_than=0, keep_decisions_for=0)
    assert sorted(report.committed) == [gid_for(txid, 0), gid_for(txid, 1)]
    assert report.unreachable == {2: "could not connect to server shard2"} and not report.clean
    assert _decision_rows(cluster) == "true"  # shard 2 still needs it
    report = await recover(_recovery_shards(connect), decisions, older_than=0, keep_decisions_for=0)
    assert report.committed == [gid_for(txid, 2)] and report.forgotten == 1
    assert _items(cluster) == ["0", "1", "2"]
    assert _prepared(cluster) == []


async def test_recovery_ignores_prepared_transactions_it_did_not_make(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    conn = await connect(0)
    await conn.run_simple(
        "BEGIN; INSERT INTO items VALUES (1, 'someone else'); PREPARE TRANSACTION 'pgshard_x_0'"
    )
    report = await recover(_recovery_shards(connect), decisions, older_than=0)
    assert report.committed == report.rolled_back == report.left_young == []
    assert _prepared(cluster) == ["pgshard_x_0"]


async def test_recovery_of_another_roles_transaction_connects_as_its_owner(
    cluster: list[LocalPostgres], connect: Connect, decisions: DecisionLog
) -> None:
    txid = new_transaction_id()
    other = await open_server_connection(_target(cluster[1], OTHER_ROLE, OTHER_PASSWORD), 10)
    try:
        await other.run_simple(
            f"BEGIN; INSERT INTO items VALUES (1, 'x'); PREPARE TRANSACTION '{gid_for(txid, 1)}'"
        )
    finally:
        other.close()
    report = await recover(_recovery_shards(connect), decisions, older_than=0)
    assert list(report.failed) == [gid_for(txid, 1)] and "42501" in report.failed[gid_for(txid, 1)]

    async def connect_as(shard: int, owner: str) -> ServerConnection:
        assert owner == OTHER_ROLE
        return await open_server_connection(_target(cluster[shard], OTHER_ROLE, OTHER_PASSWORD), 10)

    report = await recover(_recovery_shards(connect), decisions, older_than=0, connect_as=connect_as)
    assert report.rolled_back == [gid_for(txid, 1)] and report.clean
    assert _prepared(cluster) == []


# start-up check and gids ----------------------------------------------------------------------------
async def test_check_prepared_transactions(cluster: list[LocalPostgres], pg_factory: PgFactory) -> None:
    ok = await open_server_connection(_target(cluster[0]), 10)
    pg = pg_factory("twophase_noprep", {"max_prepared_transactions": "0"})
    off = await open_server_connection(ServerTarget(pg.host, pg.port, APP_USER, APP_PASSWORD, "app"), 10)
    try:
        assert await check_prepared_transactions(ok, 0) is None
        message = await check_prepared_transactions(off, 3)
    finally:
        ok.close()
        off.close()
    assert message is not None
    assert message.startswith(f"shard 3 ({pg.host}:{pg.port}) has max_prepared_transactions = 0: set it")
    assert "general.two_phase_commit = false" in message


def test_gids_name_their_transaction_and_shard() -> None:
    txid = new_transaction_id()
    assert parse_gid(gid_for(txid, 12)) == (txid, 12)
    assert parse_gid(gid_for(new_transaction_id("pgshard_app"), 1)) is None  # another prefix's gid
    assert parse_gid("pgshard_x_0") is None
    assert parse_gid(gid_for(txid, 1) + "x") is None
    with pytest.raises(ValueError):
        new_transaction_id("bad'prefix")
