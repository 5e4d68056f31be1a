"""Router: the shard(s) each statement runs on, without a SQL parse per query (DESIGN.md
Principle 3, "Parse once").

Simple protocol: the statement's fingerprint (`parser.fingerprint`, a few microseconds) keys a
bounded LRU cache of compiled route programs; a hit reads the key straight from the fingerprint's
literal list, hashes it and returns a prebuilt Route. A miss runs the full analysis (sqlglot,
~100 us and up) and compiles its plan. Extended protocol: `prepare` analyses once per Parse and
`route_bind` routes each Bind from its parameter values.

Client encodings: text keys are hashed as the UTF-8 the server stores. A session whose client_encoding
is not UTF8 passes its `ClientEncoding`: a non-ASCII Query is converted whole, as PostgreSQL converts
the query string before scanning it (so escapes are undone after conversion and multibyte characters
that embed ASCII bytes cannot fool the scanner), and is routed as that UTF-8 text; Bind parameters of
text keys are converted one by one. The cached programs read UTF-8 only, so sessions in different
encodings share them. Where no exact conversion exists, ASCII keys still route, a write with a
non-ASCII key is refused (0A000) and a read goes to every shard.

Decisions for values that name no row:
- a NULL key (`key = $1` bound to NULL, `key = NULL`) matches no row, so any one shard gives the
  right (empty) answer: the default shard is used;
- a key value no range or list covers matches no row either (the default shard again); for an
  INSERT both are errors, as PostgreSQL's partitioning would raise (23502, 23514);
- a value that cannot be read as a key of the column's type (`int_key = 'abc'`, `int_key = 5.0`)
  widens the route to every shard the other conditions allow: PostgreSQL decides what matches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from parser.analysis import analyse
from parser.fingerprint import Fingerprint, Literal, fingerprint
from parser.hints import Hint, parse_hints
from parser.plan import StatementKind, StatementPlan
from parser.statements import split_statements
from proxy.pg_encoding import ClientEncoding, EncodingError
from router.compile import compile_plan
from router.keys import text_key
from router.placement import NoShardForKey
from router.route import FEATURE_NOT_SUPPORTED, Broadcast, Route, error_route
from router.route_plan import Program, Static, ToUtf8, Values, resolve_columns
from router.topology import TableSharding, Topology

__all__ = ["Broadcast", "PreparedRoute", "Route", "Router"]

DEFAULT_CACHE_SIZE = 10_000
MAX_CACHED_STATEMENT = 16_384  # bytes of fingerprint; longer statements (bulk INSERTs) are not cached
_SESSION_KINDS = (StatementKind.TRANSACTION, StatementKind.SET)


class _Entry:
    __slots__ = ("aggregates", "plan", "program", "typed", "version")

    def __init__(
        self, plan: StatementPlan, program: Program, version: int, aggregates: frozenset[str] | None
    ) -> None:
        self.plan, self.program, self.version = plan, program, version
        self.aggregates = aggregates  # the user-defined aggregates the plan was analysed with
        # Programs for Parses of this shape, by declared parameter types (version, program).
        self.typed: dict[tuple[int, ...], tuple[int, Program]] = {}


@dataclass(slots=True)
class PreparedRoute:
    """A Parse's analysis, kept with the prepared statement; routed per Bind."""

    sql: str
    plan: StatementPlan
    literals: list[Literal]
    hints: tuple[bytes, ...]
    program: Program
    version: int
    param_types: tuple[int, ...] = ()
    aggregates: frozenset[str] | None = frozenset()
    literals_to_utf8: ToUtf8 | None = None  # the Parse's text could not be converted: refuse non-ASCII


class Router:
    def __init__(self, topology: Topology, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.topology = topology
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._hints: dict[tuple[bytes, ...], Hint] = {}
        self._converters: dict[str, Callable[[bytes], bytes]] = {}
        self.hits = 0
        self.misses = 0

    # -- simple protocol ------------------------------------------------------------------

    def route_simple(self, sql: bytes, encoding: ClientEncoding | None = None) -> Route:
        """Route a Query message's SQL (one statement or several separated by semicolons).
        `encoding`: the session's client_encoding when it is not UTF8 (None otherwise)."""
        if encoding is not None and not sql.isascii():  # ASCII is the same text in every encoding
            return self._route_encoded(sql, encoding)
        fp = fingerprint(sql)  # the common case, inline: _route_text without a call
        key = fp.key
        semi = key.find(b";")  # strings and comments are masked in the key: a ';' there is real
        if semi >= 0 and key[semi + 1 :].strip(b" \t\r\n\f;"):
            return self._route_text(sql, None, fp)
        return self._route_fingerprint(sql, fp)

    def _to_utf8(self, encoding: ClientEncoding) -> Callable[[bytes], bytes]:
        convert = self._converters.get(encoding.name)
        if convert is None:
            convert = self._converters[encoding.name] = encoding.to_utf8()
        return convert

    def _route_encoded(self, sql: bytes, encoding: ClientEncoding) -> Route:
        """Route a non-ASCII query in another client encoding by the UTF-8 text the server will read."""
        try:
            converted = self._to_utf8(encoding)(sql)
        except EncodingError as e:
            if e.sqlstate != FEATURE_NOT_SUPPORTED:  # bad bytes: the server refuses the query alike
                return error_route(StatementKind.OTHER, e.sqlstate, e.message)
            if encoding.embeds_ascii:
                return error_route(StatementKind.OTHER, FEATURE_NOT_SUPPORTED, _unscannable(encoding.name))
            # No exact conversion, but ASCII bytes are never part of a multibyte character here: the
            # text scans as it is, and only a non-ASCII text key is refused (a write) or unknown (a read).
            route = self._route_text(sql, self._to_utf8(encoding))
        else:
            route = self._route_text(converted)
        if any(
            not text.isascii()
            for r in (route, *(route.statements or ()))
            for _, text in (*(r.split or ()), *(r.parts or ()))
        ):
            # The pieces would go out as UTF-8 to a session reading another encoding.
            return error_route(
                route.kind,
                FEATURE_NOT_SUPPORTED,
                "a statement pgshard would cut into one piece per shard (a multi-row INSERT over several "
                f"shards, a UNION ALL) cannot be cut when it holds non-ASCII text in client encoding "
                f"{encoding.name}; send one row per statement or use client_encoding UTF8",
                route.write,
            )
        return route

    def _route_text(
        self, sql: bytes, literals_to_utf8: ToUtf8 | None = None, fp: Fingerprint | None = None
    ) -> Route:
        """Route one query's text; `literals_to_utf8` converts its text-key literals if it is not UTF-8."""
        if fp is None:
            fp = fingerprint(sql)
        key = fp.key
        semi = key.find(b";")  # strings and comments are masked in the key: a ';' there is real
        if semi >= 0 and key[semi + 1 :].strip(b" \t\r\n\f;"):
            parts = split_statements(sql.decode("utf-8", "surrogateescape"))
            if len(parts) > 1:
                return self._combine(
                    [self._route_one(p.encode("utf-8", "surrogateescape"), literals_to_utf8) for p in parts]
                )
        return self._route_fingerprint(sql, fp, literals_to_utf8)

    def _route_one(self, sql: bytes, literals_to_utf8: ToUtf8 | None = None) -> Route:
        return self._route_fingerprint(sql, fingerprint(sql), literals_to_utf8)

    def _route_fingerprint(
        self, sql: bytes, fp: Fingerprint, literals_to_utf8: ToUtf8 | None = None
    ) -> Route:
        cache = self._cache
        entry = cache.get(fp.key)
        if entry is None or len(fp.literals) != entry.plan.literal_count:
            self.misses += 1
            entry = self._analyse(sql, fp.key, len(fp.literals))
        else:
            self.hits += 1
            cache.move_to_end(fp.key)
            if entry.version != self.topology.version:
                if entry.aggregates is not self.topology.user_aggregates:  # the catalog changed
                    entry = self._analyse(sql, fp.key, len(fp.literals))
                else:
                    entry.program = compile_plan(entry.plan, self.topology)
                    entry.version = self.topology.version
        values = Values(fp.literals, literals_to_utf8=literals_to_utf8)
        if fp.hints:
            return self._hinted(entry.plan, tuple(fp.hints), entry.program, values, sql)
        return entry.program.route(values, sql)

    def _analyse(self, sql: bytes, key: bytes, literal_count: int) -> _Entry:
        aggregates = self.topology.user_aggregates
        plan = analyse(sql.decode("utf-8", "surrogateescape"), aggregates)
        entry = _Entry(plan, compile_plan(plan, self.topology), self.topology.version, aggregates)
        if plan.cacheable and plan.literal_count == literal_count and len(key) <= MAX_CACHED_STATEMENT:
            cache = self._cache
            cache[key] = entry
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
        return entry

    def _combine(self, routes: list[Route]) -> Route:
        """One route for a multi-statement query: one shard if every statement can run there."""
        for r in routes:
            if r.error is not None:
                return Route(
                    (),
                    r.kind,
                    r.write,
                    reason="a statement is refused",
                    error=r.error,
                    statements=tuple(routes),
                )
        fixed = {s for r in routes if not r.omnisharded_read for s in r.shards}
        if not fixed:
            fixed = {s for r in routes for s in r.shards[:1]}
        kinds = [r.kind for r in routes if r.kind not in _SESSION_KINDS]
        write = any(r.write for r in routes)
        if not kinds:  # only transaction control and SET: the session's business
            return Route((), routes[0].kind, reason="session statements", statements=tuple(routes))
        if len(fixed) <= 1 and not any(r.split for r in routes):
            shard = next(iter(fixed), self.topology.default_shard)
            routes = [
                Route((shard,), r.kind, r.write, reason=r.reason, omnisharded_read=r.omnisharded_read)
                if r.omnisharded_read
                else r
                for r in routes
            ]
            return Route(
                (shard,),
                kinds[0],
                write,
                reason=f"every statement on shard {shard}",
                statements=tuple(routes),
            )
        shards = tuple(sorted(fixed | {s for r in routes if r.split for s, _ in r.split}))
        return Route(
            shards,
            kinds[0],
            write,
            all_shards=len(shards) == self.topology.shard_count,
            reason="statements on different shards",
            statements=tuple(routes),
        )

    # -- extended protocol ----------------------------------------------------------------

    def prepare(
        self, sql: str | bytes, param_types: Sequence[int] = (), encoding: ClientEncoding | None = None
    ) -> PreparedRoute:
        """Analyse a Parse's statement once. `param_types` are the OIDs the Parse declares (0 or
        absent: inferred by the server), used to tell whether a binary value can be read. `sql` as
        bytes is the Parse's text in the client's `encoding` (None: UTF8)."""
        literals_to_utf8: ToUtf8 | None = None
        refused: tuple[str, str] | None = None  # (SQLSTATE, message): the Parse cannot be routed
        if isinstance(sql, bytes):
            if encoding is not None and not sql.isascii():
                try:
                    sql = self._to_utf8(encoding)(sql)
                except EncodingError as e:
                    if e.sqlstate != FEATURE_NOT_SUPPORTED:
                        refused = (e.sqlstate, e.message)
                    elif encoding.embeds_ascii:
                        refused = (FEATURE_NOT_SUPPORTED, _unscannable(encoding.name))
                    literals_to_utf8 = self._to_utf8(encoding)
            sql = sql.decode("utf-8", "replace")
        raw = sql.encode("utf-8", "surrogateescape")
        fp = fingerprint(raw)
        entry = self._cache.get(fp.key)
        types = tuple(param_types)
        aggregates = self.topology.user_aggregates
        if (
            entry is not None
            and entry.plan.literal_count == len(fp.literals)
            and entry.plan.cacheable
            and entry.aggregates is aggregates
        ):
            self.hits += 1
            self._cache.move_to_end(fp.key)
        else:
            # A miss is paid once per statement shape: clients that Parse the same unnamed statement
            # for every query (libpq's PQexecParams, pgbench -M extended) hit the cache from then on.
            self.misses += 1
            entry = self._analyse(raw, fp.key, len(fp.literals))
        plan = entry.plan
        version = self.topology.version
        compiled = entry.typed.get(types)
        if compiled is not None and compiled[0] == version:
            program = compiled[1]
        else:
            program = compile_plan(plan, self.topology, types)
            if len(entry.typed) < 16:
                entry.typed[types] = (version, program)
        if refused is not None:
            program = Static(error_route(plan.kind, *refused, plan.write))
        return PreparedRoute(
            sql,
            plan,
            fp.literals,
            tuple(fp.hints),
            program,
            self.topology.version,
            types,
            aggregates,
            literals_to_utf8,
        )

    def route_bind(
        self,
        prepared: PreparedRoute,
        params: Sequence[bytes | None],
        formats: Sequence[int] = (),
        encoding: ClientEncoding | None = None,
    ) -> Route:
        """Route one Bind of a prepared statement. Format codes follow the Bind rules: none means
        text for all, one applies to all, otherwise one per parameter. `encoding`: the session's
        client_encoding when it is not UTF8; text parameters (either format) are in it."""
        if len(formats) > 1 and len(formats) != len(params):
            return error_route(
                prepared.plan.kind,
                "08P01",
                f"bind message has {len(formats)} parameter formats but {len(params)} parameters",
            )
        if prepared.version != self.topology.version and not isinstance(prepared.program, Static):
            aggregates = self.topology.user_aggregates
            if prepared.aggregates is not aggregates:  # the catalog changed since the Parse
                prepared.plan = analyse(prepared.sql, aggregates)
                prepared.aggregates = aggregates
            prepared.program = compile_plan(prepared.plan, self.topology, prepared.param_types)
            prepared.version = self.topology.version
        values = Values(
            prepared.literals,
            params,
            formats,
            None if encoding is None else self._to_utf8(encoding),
            prepared.literals_to_utf8,
        )
        if prepared.hints:
            return self._hinted(prepared.plan, prepared.hints, prepared.program, values, prepared.sql)
        return prepared.program.route(values, prepared.sql)

    # -- hints ----------------------------------------------------------------------------

    def _hinted(
        self,
        plan: StatementPlan,
        hints: tuple[bytes, ...],
        program: Program,
        values: Values,
        sql: str | bytes,
    ) -> Route:
        if plan.kind in _SESSION_KINDS:
            return program.route(values, sql)
        hint = self._hints.get(hints)
        if hint is None:
            hint = parse_hints(hints)
            if len(self._hints) < 1024:
                self._hints[hints] = hint
        if hint.error is not None:
            return error_route(plan.kind, "22023", hint.error, plan.write)
        count = self.topology.shard_count
        if hint.shard is not None:
            if hint.shard >= count:
                return error_route(
                    plan.kind,
                    "22023",
                    f"pgshard hint shard={hint.shard} is out of range: there are "
                    f"{count} shards (0..{count - 1})",
                    plan.write,
                )
            return Route((hint.shard,), plan.kind, plan.write, reason=f"hint shard={hint.shard}")
        if hint.key is not None:
            sharding = self._hint_sharding(plan)
            if isinstance(sharding, str):
                return error_route(plan.kind, FEATURE_NOT_SUPPORTED, sharding, plan.write)
            try:
                shard = sharding.function.shard(text_key(sharding, hint.key.encode("utf-8"), insert=True))
            except NoShardForKey as e:
                return error_route(plan.kind, NoShardForKey.sqlstate, str(e), plan.write)
            except (ValueError, TypeError) as e:
                return error_route(plan.kind, "22P02", f"pgshard hint key={hint.key!r}: {e}", plan.write)
            return Route((shard,), plan.kind, plan.write, reason=f"hint key={hint.key}")
        return program.route(values, sql)

    def _hint_sharding(self, plan: StatementPlan) -> TableSharding | str:
        """The sharding a key hint is read with: the statement's sharded table, else the only
        sharding of the database; a message if that is ambiguous."""
        named = [s for s in resolve_columns(plan, self.topology) if s is not None]
        candidates = named or list(self.topology.shardings)
        kinds = {s.colocation for s in candidates}
        if len(kinds) == 1:
            return candidates[0]
        where = "this statement's sharded tables" if named else "the sharded tables of this database"
        return f"pgshard hint key= is ambiguous: {where} are sharded differently; use shard=N"

    # -- introspection --------------------------------------------------------------------

    def plan(self, sql: bytes) -> StatementPlan:
        """The (cached) plan of one statement, for EXPLAIN-like views and tests."""
        fp = fingerprint(sql)
        entry = self._cache.get(fp.key)
        if entry is not None and entry.aggregates is self.topology.user_aggregates:
            return entry.plan
        return analyse(sql.decode("utf-8", "surrogateescape"), self.topology.user_aggregates)

    def clear(self) -> None:
        self._cache.clear()


def _unscannable(name: str) -> str:
    return (
        f"pgshard cannot read non-ASCII statements in client encoding {name}: its multibyte characters "
        "may hold bytes that look like quotes or backslashes and it has no exact conversion; use "
        "client_encoding UTF8"
    )
