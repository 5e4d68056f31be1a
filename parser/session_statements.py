"""What a statement does to session state, so transaction pooling can track and replay it.

PostgreSQL reports only a few parameters back (ParameterStatus, protocol 55.2.7), so a pooler that
wants SET to survive a change of server connection must read the SET itself, as PgBouncer's
`track_extra_parameters` and PgDog do. Statements whose state cannot be replayed elsewhere pin the
client to its server connection (DESIGN.md, "Session state in transaction pooling").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from parser.statements import leading_words, split_statements


class Effect(Enum):
    NONE = "none"
    SET = "set"  # key = parameter, statement = the SET to replay
    RESET = "reset"  # key = parameter
    RESET_ALL = "reset_all"
    DISCARD_ALL = "discard_all"  # resets parameters and prepared statements
    DEALLOCATE = "deallocate"  # key = statement name, or None for ALL
    PIN = "pin"  # key = the reason, shown to operators
    BEGIN = "begin"  # multi-statement transaction block opens
    SAVEPOINT = "savepoint"  # key = savepoint name
    ROLLBACK_TO = "rollback_to"  # key = savepoint name
    RELEASE = "release"  # key = savepoint name


@dataclass(frozen=True, slots=True)
class SessionEffect:
    effect: Effect
    key: str | None = None
    statement: str | None = None


NO_EFFECT = SessionEffect(Effect.NONE)

_SET = re.compile(
    r"^SET\s+(?:(SESSION|LOCAL)\s+)?(?!SESSION\b|LOCAL\b)"
    r"(TIME\s+ZONE|SCHEMA|NAMES|XML\s+OPTION|(?:\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z_0-9$]*)"
    r"(?:\.(?:\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z_0-9$]*))*)"
    r"(\s*(?:=|\bTO\b)\s*.*|\s+.*)?$",
    re.IGNORECASE | re.DOTALL,
)
_RESET = re.compile(r"^RESET\s+(ALL|TIME\s+ZONE|[\"A-Za-z_][^\s;]*)\s*$", re.IGNORECASE)
_DEALLOCATE = re.compile(r"^DEALLOCATE\s+(?:PREPARE\s+)?(ALL|\"(?:[^\"]|\"\")+\"|[^\s;]+)\s*$", re.IGNORECASE)
_ASCII_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_SET_CONFIG_LITERAL = re.compile(
    r"set_config\s*\(\s*'((?:[^']|'')*)'\s*,\s*'((?:[^']|'')*)'\s*,\s*(false|true)\s*\)", re.IGNORECASE
)
_SPECIAL_NAMES = {
    "TIME ZONE": "timezone",
    "SCHEMA": "search_path",
    "NAMES": "client_encoding",
    "XML OPTION": "xmloption",
}
_PIN_REASONS = {
    "LISTEN": "LISTEN",
    "PREPARE": "SQL PREPARE",
    "LOAD": "LOAD",
}


def mentions_session_function(
    sql: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
) -> bool:
    """Cheap pre-check for set_config(...) and session advisory locks inside an ordinary query.

    Case-folding with bytes.translate and two substring tests cost a fraction of a case-insensitive
    regex search, and this runs for every SELECT on the single-shard path.
    """
    text = bytes(sql[start:end]).translate(_ASCII_LOWER)
    # find(), not `in`: bytes.__contains__ first tries the operand as an integer and raises inside.
    return text.find(b"set_config") >= 0 or text.find(b"advisory_lock") >= 0


def _param_key(raw: str) -> str:
    raw = " ".join(raw.split())
    special = _SPECIAL_NAMES.get(raw.upper())
    if special:
        return special
    parts = [p[1:-1].replace('""', '"') if p.startswith('"') else p.lower() for p in raw.split(".")]
    return ".".join(parts)


def quote_literal(value: str) -> str:
    """A string literal PostgreSQL reads back as `value` whatever standard_conforming_strings says."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def set_statement(key: str, value: str) -> str:
    """The statement that sets parameter `key` to the text `value` (startup parameters, set_config).

    set_config reads the value as a configuration string, as a start-up option does; `SET x = '...'`
    would make a list setting (search_path) one quoted element.
    """
    return f"SELECT pg_catalog.set_config({quote_literal(key)}, {quote_literal(value)}, false)"


def _savepoint_name(raw: str) -> str:
    return raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.lower()


def analyse_statement(stmt: str) -> SessionEffect:
    """The session effect of one statement (no trailing semicolon); the first, if it has several."""
    effects = statement_effects(stmt)
    return effects[0] if effects else NO_EFFECT


def statement_effects(stmt: str) -> list[SessionEffect]:
    """Every session effect of one statement: set_config may appear several times in one SELECT."""
    first, _, _ = leading_words(stmt)
    if first in ("SELECT", "WITH", "VALUES", "CALL", "DO") and mentions_session_function(stmt.encode()):
        if re.search(r"pg_(?:try_)?advisory_lock", stmt, re.IGNORECASE):
            return [SessionEffect(Effect.PIN, "session advisory lock")]
        found = list(_SET_CONFIG_LITERAL.finditer(stmt))
        if len(found) != len(re.findall(r"set_config\s*\(", stmt, re.IGNORECASE)):
            return [SessionEffect(Effect.PIN, "set_config with computed arguments")]
        effects = []
        for m in found:
            if m.group(3).lower() == "false":
                key = _param_key(m.group(1).replace("''", "'"))
                effects.append(
                    SessionEffect(Effect.SET, key, set_statement(key, m.group(2).replace("''", "'")))
                )
        return effects
    effect = _one_effect(stmt)
    return [] if effect.effect is Effect.NONE else [effect]


def _one_effect(stmt: str) -> SessionEffect:
    first, second, third = leading_words(stmt)
    if first == "SET":
        if second in ("ROLE", "SESSION") and (second == "ROLE" or third == "AUTHORIZATION"):
            return SessionEffect(Effect.PIN, f"SET {second}")
        if second in ("TRANSACTION", "CONSTRAINTS") or (second == "SESSION" and third == "CHARACTERISTICS"):
            if second == "SESSION":
                return SessionEffect(Effect.SET, "session characteristics", stmt)
            return NO_EFFECT
        m = _SET.match(stmt.strip().rstrip(";"))
        if not m:
            return NO_EFFECT
        if (m.group(1) or "").upper() == "LOCAL":
            return NO_EFFECT
        key = _param_key(m.group(2))
        if key == "role" or key == "session_authorization":
            return SessionEffect(Effect.PIN, "SET ROLE")
        return SessionEffect(Effect.SET, key, stmt.strip().rstrip(";"))
    if first == "RESET":
        m = _RESET.match(stmt.strip().rstrip(";"))
        if not m:
            return NO_EFFECT
        if m.group(1).upper() == "ALL":
            return SessionEffect(Effect.RESET_ALL)
        return SessionEffect(Effect.RESET, _param_key(m.group(1)))
    if first == "DISCARD":
        if second == "ALL":
            return SessionEffect(Effect.DISCARD_ALL)
        if second in ("TEMP", "TEMPORARY"):
            return NO_EFFECT
        if second == "PLANS":
            return NO_EFFECT
        return NO_EFFECT
    if first == "DEALLOCATE":
        m = _DEALLOCATE.match(stmt.strip().rstrip(";"))
        if m:
            name = m.group(1)
            if name.upper() == "ALL":
                return SessionEffect(Effect.DEALLOCATE, None)
            return SessionEffect(Effect.DEALLOCATE, name[1:-1] if name.startswith('"') else name.lower())
        return NO_EFFECT
    if first in ("BEGIN", "START"):
        return SessionEffect(Effect.BEGIN)
    if first in _PIN_REASONS:
        return SessionEffect(Effect.PIN, _PIN_REASONS[first])
    if first == "CREATE" and (
        second in ("TEMP", "TEMPORARY") or (second in ("GLOBAL", "LOCAL") and third in ("TEMP", "TEMPORARY"))
    ):
        return SessionEffect(Effect.PIN, "temporary table")
    if first == "DECLARE" and re.search(r"\bWITH\s+HOLD\b", stmt, re.IGNORECASE):
        return SessionEffect(Effect.PIN, "cursor WITH HOLD")
    if first == "SAVEPOINT" and second:
        return SessionEffect(Effect.SAVEPOINT, _savepoint_name(stmt.split()[1]))
    if first == "RELEASE":
        words = stmt.split()
        name = words[2] if len(words) > 2 and words[1].upper() == "SAVEPOINT" else words[-1]
        return SessionEffect(Effect.RELEASE, _savepoint_name(name))
    if first == "ROLLBACK" and second == "TO":
        words = stmt.split()
        return SessionEffect(Effect.ROLLBACK_TO, _savepoint_name(words[-1]))
    return NO_EFFECT


def analyse_query(sql: str) -> list[SessionEffect]:
    """Session effects of every statement of a (possibly multi-statement) query, in order."""
    return [effect for stmt in split_statements(sql) for effect in statement_effects(stmt)]
