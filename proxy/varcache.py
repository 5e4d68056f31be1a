"""A client's session parameters, kept by pgshard so that transaction pooling never loses or leaks them.

Each client has the state it would have on a dedicated server: its start-up parameters plus every
SET that took effect. A server connection carries the state of whoever used it last; before a
client's bytes reach it, `replay_sql` gives the statements that turn one into the other (a diff, so
a server already in the right state costs nothing). SET LOCAL, and SETs in a transaction or an
implicit transaction that rolls back, are not kept, as in PostgreSQL.
"""

from __future__ import annotations

import re

from parser.session_statements import Effect, SessionEffect, quote_ident, set_statement
from proxy.pg_encoding import ClientEncoding, canonical_name
from proxy.protocol.startup import options_settings

# Start-up parameters that are not settings (protocol 55.7, StartupMessage).
_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})
_RESET_SESSION_CHARACTERISTICS = (
    "RESET default_transaction_isolation; RESET default_transaction_read_only; "
    "RESET default_transaction_deferrable"
)


def startup_settings(params: dict[str, str]) -> dict[str, str]:
    """The settings a client asked for at start-up, as parameter -> SET statement."""
    settings = {
        k.lower(): v for k, v in params.items() if k not in _NOT_SETTINGS and not k.startswith("_pq_.")
    }
    if params.get("options"):
        settings.update(options_settings(params["options"]))
    # A client that names no application gets '', not the name pgshard's server connections use.
    settings.setdefault("application_name", "")
    return {key: set_statement(key, value) for key, value in settings.items()}


def _last_savepoint(effects: list[SessionEffect], name: str | None) -> int | None:
    for index in range(len(effects) - 1, -1, -1):
        if effects[index].effect is Effect.SAVEPOINT and effects[index].key == name:
            return index
    return None


_ENCODING_KEY = "client_encoding"
# The value of a tracked client_encoding statement: set_statement's form, or the client's SET / SET NAMES.
_SET_CONFIG_VALUE = re.compile(r"set_config\('client_encoding', E?'((?:[^']|'')*)', false\)")
_SET_VALUE = re.compile(
    r"SET\s+(?:SESSION\s+)?(?:NAMES|client_encoding|\"client_encoding\")\s*(?:=|\bTO\b)?\s*"
    r"(?:E?'((?:[^']|'')*)'|\"((?:[^\"]|\"\")*)\"|([^\s;']+))",
    re.IGNORECASE | re.DOTALL,
)


def _encoding_value(statement: str | None, baseline: str | None) -> str:
    """The encoding name a tracked statement sets (SET ... TO DEFAULT: the start-up value); UTF8 when
    nothing is set, as pgshard's shards are UTF8 databases."""
    if statement is None:
        return "UTF8" if baseline is None else _encoding_value(baseline, None)
    m = _SET_CONFIG_VALUE.search(statement)
    if m:
        return m.group(1).replace("''", "'")
    m = _SET_VALUE.match(statement.strip())
    if m is None:
        return "UTF8"
    if m.group(3) is not None:
        if m.group(3).upper() == "DEFAULT":
            return "UTF8" if baseline is None else _encoding_value(baseline, None)
        return m.group(3)
    return m.group(1).replace("''", "'") if m.group(1) is not None else m.group(2).replace('""', '"')


def reset_statement(key: str) -> str:
    if key == "session characteristics":
        return _RESET_SESSION_CHARACTERISTICS
    return f"RESET {quote_ident(key)}"


class SessionState:
    """What one client has SET, and the SETs still waiting to see whether their transaction commits."""

    __slots__ = ("baseline", "client_encoding", "params", "pending", "tx_pending")

    def __init__(self, startup: dict[str, str]) -> None:
        self.baseline = startup_settings(startup)
        self.params: dict[str, str] = dict(self.baseline)
        self.pending: list[SessionEffect] = []  # sent, not yet answered by ReadyForQuery
        self.tx_pending: list[SessionEffect] = []  # succeeded inside a transaction block still open
        # The encoding the client's text arrives in when it is not what the shards store (None: UTF8):
        # the router converts text shard keys with it. Kept here, as SETs take effect, so that routing
        # a query costs one attribute read and no round trip.
        self.client_encoding: ClientEncoding | None = None
        self._refresh_encoding()

    def _refresh_encoding(self) -> None:
        """Recompute `client_encoding` from the kept settings and those of the open block."""
        baseline = self.baseline.get(_ENCODING_KEY)
        statement = self.params.get(_ENCODING_KEY)
        for e in self.tx_pending:
            if e.effect is Effect.SET and e.key == _ENCODING_KEY:
                statement = e.statement
            elif (e.effect is Effect.RESET and e.key == _ENCODING_KEY) or e.effect in (
                Effect.RESET_ALL,
                Effect.DISCARD_ALL,
            ):
                statement = baseline
        encoding = ClientEncoding(canonical_name(_encoding_value(statement, baseline)))
        self.client_encoding = None if encoding.as_is else encoding

    def note(self, effect: SessionEffect) -> None:
        """A statement with a session effect was sent to the server."""
        self.pending.append(effect)

    def on_ready(self, status: int, failed: bool, tx_outcome: bool | None) -> None:
        """ReadyForQuery arrived: keep, defer or drop what was pending.

        `failed`: an ErrorResponse came since the statements were sent. `tx_outcome`: True if a
        COMMIT, False if a ROLLBACK completed meanwhile (a block ended).
        """
        if tx_outcome is not None and self.tx_pending and status == 0x49:  # the block ended
            if tx_outcome:
                self._apply(self.tx_pending)
            self.tx_pending = []
            self._refresh_encoding()
        pending, self.pending = self.pending, []
        if not pending:
            return
        if status == 0x49:  # 'I': autocommit; an error rolled the implicit transaction back
            if not failed:
                self._apply(pending)
                self._refresh_encoding()
            return
        # Inside a block ('T', or 'E' until ROLLBACK [TO]): kept in order, savepoints as markers.
        tx = self.tx_pending
        for effect in pending:
            if effect.effect is Effect.ROLLBACK_TO:
                mark = _last_savepoint(tx, effect.key)
                if mark is not None:
                    del tx[mark + 1 :]
            elif effect.effect is Effect.RELEASE:
                mark = _last_savepoint(tx, effect.key)
                if mark is not None:
                    self.tx_pending = tx = [
                        e for i, e in enumerate(tx) if i < mark or e.effect is not Effect.SAVEPOINT
                    ]
            else:
                tx.append(effect)
        self._refresh_encoding()

    def _apply(self, effects: list[SessionEffect]) -> None:
        params = dict(self.params)  # a new dict: servers compare by identity first
        for e in effects:
            if e.effect is Effect.SET and e.key is not None and e.statement is not None:
                params[e.key] = e.statement
            elif e.effect is Effect.RESET and e.key is not None:
                if e.key in self.baseline:
                    params[e.key] = self.baseline[e.key]
                else:
                    params.pop(e.key, None)
            elif e.effect in (Effect.RESET_ALL, Effect.DISCARD_ALL):
                params = dict(self.baseline)
        self.params = params

    def replay_sql(self, server_state: dict[str, str]) -> str | None:
        """Statements that bring a server carrying `server_state` to this client's state, or None."""
        params = self.params
        if server_state is params or server_state == params:
            return None
        statements = [stmt for key, stmt in params.items() if server_state.get(key) != stmt]
        statements += [reset_statement(key) for key in server_state if key not in params]
        return "; ".join(statements) if statements else None
