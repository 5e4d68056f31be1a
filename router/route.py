"""Route: where one statement runs, the router's answer to the session.

Kept small and immutable: single-shard routes are built once per shard and shared, so the hot
path allocates nothing for its answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from parser.plan import MergeFlags, StatementKind


class Broadcast(Enum):
    """How the answers of a write sent to several shards combine into one command tag."""

    SUM = "sum"  # each shard wrote its own rows: add the row counts (sharded writes)
    SAME = "same"  # every shard did the same thing: report one (omnisharded writes, DDL)


@dataclass(frozen=True, slots=True)
class Route:
    shards: tuple[int, ...]
    """The shards to run on, ascending; one element is a single-shard route. Empty for
    transaction control and SET (the session handles them) and for errors."""
    kind: StatementKind
    write: bool = False
    all_shards: bool = False  # shards is every shard
    reason: str = ""  # short, for logs and an EXPLAIN-like view
    error: tuple[str, str] | None = None  # (SQLSTATE, message) to answer instead of running
    split: tuple[tuple[int, str], ...] | None = None
    """A multi-row INSERT spanning shards: (shard, that shard's INSERT cut from the client's text)."""
    broadcast_kind: Broadcast | None = None  # a write on several shards
    omnisharded_read: bool = False  # reads only omnisharded tables: any one shard would do
    merge: MergeFlags | None = None  # a read on several shards: what the merger must do
    statements: tuple[Route, ...] | None = None  # a multi-statement query: one route per statement
    parts: tuple[tuple[int, str], ...] | None = None
    """A UNION ALL whose parts run on different shards (a part of the default shard, of an
    omnisharded table, a constant): (shard, the parts it runs, joined by UNION ALL), answered by
    `proxy.union_read` (in a Bind's route, the parts keep the client's `$n`)."""

    @property
    def single(self) -> int | None:
        """The shard, if the route is one shard without a split."""
        return self.shards[0] if len(self.shards) == 1 and self.split is None else None


def error_route(kind: StatementKind, sqlstate: str, message: str, write: bool = False) -> Route:
    return Route((), kind, write, reason="error", error=(sqlstate, message))


FEATURE_NOT_SUPPORTED = "0A000"
