"""Extended-protocol fan-out reads (proxy/fanout_read.py): which message groups pgshard answers, what
it takes from them, and LIMIT/OFFSET parameters read from the Bind. The replies themselves are
checked against a real server in tests/e2e/test_crossshard_corpus.py."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest

from parser.fanout import FanoutPlan, plan_fanout
from parser.plan import MergeFlags, StatementKind
from proxy import fanout_read, prepared
from proxy.fanout_read import Bound
from proxy.protocol import frontend
from router.route import Route

FANOUT = Route((0, 1, 2), StatementKind.SELECT, all_shards=True, merge=MergeFlags(order_by=True, limit=True))
SQL = "SELECT id FROM t WHERE v > $1 ORDER BY id LIMIT $2"


def session(**kwargs: Any) -> Any:
    values = {"pinned_shard": None, "statements": {}, "unnamed_route": None, "pools": [0, 1, 2]}
    return SimpleNamespace(**{**values, **kwargs})


def group(*messages: bytes, route: Route | None = FANOUT) -> list[tuple[int, bytes, Route | None]]:
    return [(m[0], m, route if m[0] == ord("B") else None) for m in messages]


BIND = frontend.bind("", "", (0, 1), (b"5", struct.pack(">q", 3)), (1,))
EXECUTE = frontend.execute()


def test_a_bind_over_several_shards_needing_a_merge_is_ours() -> None:
    psycopg = group(frontend.parse("", SQL), BIND, frontend.describe(b"P"), EXECUTE, frontend.sync())
    assert fanout_read.binds_fanout_read(session(), psycopg)
    assert not fanout_read.binds_fanout_read(session(pinned_shard=1), psycopg)  # SET pgshard.shard
    one = Route((1,), StatementKind.SELECT, merge=MergeFlags(order_by=True))
    assert not fanout_read.binds_fanout_read(session(), group(BIND, EXECUTE, frontend.sync(), route=one))
    plain = Route((0, 1, 2), StatementKind.SELECT, all_shards=True, merge=MergeFlags())
    assert not fanout_read.binds_fanout_read(session(), group(BIND, EXECUTE, frontend.sync(), route=plain))


def test_psycopg_shape_takes_the_parse_and_the_raw_parameters() -> None:
    parse = frontend.parse("", SQL, (23,))
    route, bound = fanout_read._bound_read(
        session(), group(parse, BIND, frontend.describe(b"P"), EXECUTE, frontend.sync())
    )
    assert route is FANOUT and isinstance(bound, Bound)
    assert (bound.sql, bound.declared) == (SQL.encode(), (23,))
    assert bound.parse == parse[5:] and bound.describe_portal and not bound.describe_statement
    assert bound.values == (b"5", struct.pack(">q", 3)) and bound.result_formats == (1,)
    # the Bind the lead gets carries the client's parameters byte for byte
    assert bound.bind((1,)) == frontend.bind("", "", (0, 1), bound.values, (1,))


def test_asyncpg_shape_binds_a_named_statement_parsed_earlier() -> None:
    name, statement = prepared.prepared_from_parse(frontend.parse("s1", SQL, (0, 20))[5:])
    bind = frontend.bind("", "s1", (1,), (struct.pack(">i", 5), struct.pack(">q", 3)), (1,))
    _, bound = fanout_read._bound_read(
        session(statements={name: statement}), group(bind, EXECUTE, frontend.flush())
    )
    assert isinstance(bound, Bound) and bound.parse is None
    assert (bound.sql, bound.declared) == (SQL.encode(), (0, 20))
    missing = fanout_read._bound_read(session(), group(bind, EXECUTE, frontend.sync()))
    assert missing == ("26000", 'prepared statement "s1" does not exist')
    # Parse and Describe of the statement in the same group (JDBC's shape)
    messages = (frontend.parse("s1", SQL), frontend.describe(b"S", "s1"), bind, EXECUTE, frontend.sync())
    _, bound = fanout_read._bound_read(session(), group(*messages))
    assert isinstance(bound, Bound) and bound.describe_statement and not bound.describe_portal


def test_unnamed_statement_parsed_before_an_earlier_sync() -> None:
    unnamed = SimpleNamespace(sql=SQL)
    _, bound = fanout_read._bound_read(session(unnamed_route=unnamed), group(BIND, EXECUTE, frontend.sync()))
    assert isinstance(bound, Bound) and (bound.sql, bound.declared) == (SQL.encode(), ())
    assert bound.max_rows == -1


def test_a_row_limit_on_the_unnamed_portal_is_kept() -> None:
    """asyncpg's fetchrow and fetchval execute with a row limit of 1."""
    unnamed = SimpleNamespace(sql=SQL)
    messages = group(BIND, frontend.execute("", 1), frontend.sync())
    _, bound = fanout_read._bound_read(session(unnamed_route=unnamed), messages)
    assert isinstance(bound, Bound) and bound.max_rows == 1


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ((frontend.parse("", SQL), BIND, EXECUTE, frontend.parse("", SQL), BIND, EXECUTE), "alone"),
        ((frontend.parse("other", "SELECT 1"), BIND, EXECUTE), "alone"),  # a Parse, then a Bind of another
        ((BIND, frontend.describe(b"P", "other"), EXECUTE), "alone"),
        ((BIND,), "alone"),
        ((frontend.bind("c1", "", (), (), ()), frontend.execute("c1", 100)), "read in parts"),  # a cursor
    ],
)
def test_other_shapes_get_0a000_naming_what(messages: tuple[bytes, ...], words: str) -> None:
    unnamed = SimpleNamespace(sql=SQL)
    found = fanout_read._bound_read(session(unnamed_route=unnamed), group(*messages, frontend.sync()))
    assert found[0] == "0A000" and isinstance(found[1], str)
    assert words in found[1] and "ORDER BY, LIMIT in a query that reads several shards" in found[1]


def bound(
    values: tuple[bytes | None, ...], formats: tuple[int, ...] = (), oids: tuple[int, ...] = ()
) -> Bound:
    return Bound(b"", (), b"", values, formats, (), oids=oids or (20,) * len(values))


def plan(sql: str) -> FanoutPlan:
    result = plan_fanout(sql)
    assert isinstance(result, FanoutPlan)
    return result


def test_limit_and_offset_parameters_let_the_rows_stream() -> None:
    sql = "SELECT id FROM t ORDER BY id LIMIT $1 OFFSET $2"
    assert not plan(sql).streamable
    text = fanout_read._bound_limits(plan(sql), bound((b"10", b" 3 ")))
    assert (text.streamable, text.limit, text.offset) == (True, 10, 3)
    binary = fanout_read._bound_limits(
        plan(sql), bound((struct.pack(">q", 7), struct.pack(">i", 2)), (1,), (20, 23))
    )
    assert (binary.streamable, binary.limit, binary.offset) == (True, 7, 2)
    nulls = fanout_read._bound_limits(plan(sql), bound((None, None)))
    assert (nulls.streamable, nulls.limit, nulls.offset) == (True, None, 0)  # LIMIT NULL: all rows
    all_rows = fanout_read._bound_limits(
        plan("SELECT id FROM t ORDER BY id LIMIT ALL OFFSET $1"), bound((b"4",))
    )
    assert (all_rows.streamable, all_rows.limit, all_rows.offset) == (True, None, 4)


@pytest.mark.parametrize(
    ("sql", "values", "oids"),
    [
        (
            "SELECT id FROM t ORDER BY id LIMIT $1",
            (b"-1",),
            (20,),
        ),  # the server's error, from the final query
        ("SELECT id FROM t ORDER BY id LIMIT $1", (b"2.5",), (1700,)),  # not an integer type
        ("SELECT id FROM t ORDER BY id LIMIT $1 + 1", (b"2",), (20,)),  # an expression
        ("SELECT id FROM t ORDER BY id LIMIT 5 OFFSET $2", (b"1",), (20,)),  # no such parameter
        ("SELECT DISTINCT id FROM t ORDER BY id LIMIT $1", (b"2",), (20,)),  # DISTINCT: the final query
    ],
)
def test_other_limits_are_left_to_the_final_query(
    sql: str, values: tuple[bytes, ...], oids: tuple[int, ...]
) -> None:
    assert not fanout_read._bound_limits(plan(sql), bound(values, (), oids)).streamable
