"""DDL and utility statements, read from their keywords.

sqlglot parses little of PostgreSQL's DDL and utility grammar (functions with plpgsql bodies,
VACUUM, GRANT, LOCK come back as an opaque Command; DESIGN.md, "Measured facts"), while what a
router needs from them is small: what kind of object the statement is about and, when it is a
table, which one. Regexes over the masked text (constants replaced, comments dropped; see
`parser.fingerprint`) answer that exactly enough and cheaply.
"""

from __future__ import annotations

import re

from parser.plan import DdlPlan

_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*)'
_QNAME = rf"{_NAME}(?:\s*\.\s*{_NAME}){{0,2}}"
_QNAMES = rf"{_QNAME}(?:\s*\*)?(?:\s*,\s*(?:ONLY\s+)?{_QNAME}(?:\s*\*)?)*"
_PART = re.compile(_NAME)

_I = re.IGNORECASE | re.DOTALL
_CREATE_TABLE = re.compile(
    rf"\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:(?:GLOBAL|LOCAL)\s+)?(?:(TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+"
    rf"(?:IF\s+NOT\s+EXISTS\s+)?({_QNAME})\s*(\(|AS\b|PARTITION\s+OF\b|OF\b)?",
    _I,
)
_CREATE_INDEX = re.compile(
    rf"\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}\s+)?"
    rf"ON\s+(?:ONLY\s+)?({_QNAME})",
    _I,
)
_ON_TABLE = re.compile(  # CREATE TRIGGER/POLICY/RULE ... ON t
    rf"\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:CONSTRAINT\s+)?(TRIGGER|POLICY|RULE)\b.*?\bON\s+({_QNAME})", _I
)
_ALTER_TABLE = re.compile(rf"\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?({_QNAME})", _I)
_DROP_TABLE = re.compile(rf"\s*DROP\s+TABLE\s+(IF\s+EXISTS\s+)?({_QNAMES})", _I)
# The table list of DROP TABLE / TRUNCATE in the client's own text (a leading ONLY included).
_TABLE_LIST = re.compile(
    rf"\s*(?:DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?|TRUNCATE\s+(?:TABLE\s+)?)((?:ONLY\s+)?{_QNAMES})", _I
)
_TRUNCATE = re.compile(rf"\s*TRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?({_QNAMES})", _I)
_COMMENT = re.compile(rf"\s*COMMENT\s+ON\s+(TABLE|COLUMN)\s+({_QNAME})", _I)
# The aggregates a statement makes: the router learns their names at once (see parser.scope).
_CREATE_AGGREGATE = re.compile(rf"\s*CREATE\s+(?:OR\s+REPLACE\s+)?AGGREGATE\s+({_QNAME})", _I)
_RENAME_AGGREGATE = re.compile(rf"\s*ALTER\s+AGGREGATE\s+.*?\bRENAME\s+TO\s+({_NAME})", _I)
_OBJECT = re.compile(
    r"\s*(CREATE|ALTER|DROP|COMMENT)\s+(?:ON\s+)?(?:OR\s+REPLACE\s+)?(?:(?:GLOBAL|LOCAL|TEMP|TEMPORARY|UNLOGGED|"
    r"UNIQUE|TRUSTED|PROCEDURAL|RECURSIVE|DEFAULT|CONSTRAINT)\s+)*(MATERIALIZED\s+VIEW|FOREIGN\s+TABLE|"
    r"FOREIGN\s+DATA\s+WRAPPER|TEXT\s+SEARCH\s+\w+|EVENT\s+TRIGGER|ACCESS\s+METHOD|[A-Za-z_]+)",
    _I,
)

_UTILITY_TABLES = {
    "VACUUM": re.compile(
        rf"\s*VACUUM\s*(?:\((?:[^()]|\([^()]*\))*\)\s*)?(?:(?:FULL|FREEZE|VERBOSE|ANALYZE|ANALYSE)\s+)*({_QNAMES})?",
        _I,
    ),
    "ANALYZE": re.compile(
        rf"\s*ANALY[SZ]E\s*(?:\((?:[^()]|\([^()]*\))*\)\s*)?(?:VERBOSE\s+)?({_QNAMES})?", _I
    ),
    "CLUSTER": re.compile(rf"\s*CLUSTER\s*(?:\([^()]*\)\s*)?(?:VERBOSE\s+)?({_QNAME})?", _I),
    "REINDEX": re.compile(rf"\s*REINDEX\s*(?:\([^()]*\)\s*)?TABLE\s+(?:CONCURRENTLY\s+)?({_QNAME})", _I),
    "LOCK": re.compile(rf"\s*LOCK\s+(?:TABLE\s+)?(?:ONLY\s+)?({_QNAMES})", _I),
    "REFRESH": re.compile(rf"\s*REFRESH\s+MATERIALIZED\s+VIEW\s+(?:CONCURRENTLY\s+)?({_QNAME})", _I),
    "GRANT": re.compile(
        rf"\s*(?:GRANT|REVOKE)\b.*?\bON\s+(?:TABLE\s+)?(?!ALL\b|SEQUENCE\b|FUNCTION\b|"
        rf"PROCEDURE\b|ROUTINE\b|SCHEMA\b|DATABASE\b|DOMAIN\b|TYPE\b|LANGUAGE\b|FOREIGN\b|"
        rf"LARGE\b|TABLESPACE\b|PARAMETER\b)({_QNAMES})\s+(?:TO|FROM)\b",
        _I,
    ),
}
_UTILITY_TABLES["ANALYSE"] = _UTILITY_TABLES["ANALYZE"]
_UTILITY_TABLES["REVOKE"] = _UTILITY_TABLES["GRANT"]

_SOURCES = re.compile(rf"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(?:ONLY\s+)?({_QNAME})", _I)
_NOT_TABLES = frozenset(
    [
        "select",
        "lateral",
        "stdin",
        "stdout",
        "only",
        "values",
        "where",
        "set",
        "group",
        "order",
        "limit",
        "join",
        "on",
        "as",
        "unnest",
        "with",
        "default",
    ]
)
_CONSTRAINT_WORDS = frozenset({"constraint", "primary", "unique", "check", "foreign", "exclude", "like"})


def split_name(qualified: str) -> tuple[str | None, str]:
    """(schema, table) of a possibly qualified name, folded as PostgreSQL folds identifiers."""
    parts = [_fold(p) for p in _PART.findall(qualified)]
    return (parts[-2] if len(parts) > 1 else None), parts[-1]


def _fold(part: str) -> str:
    return part[1:-1].replace('""', '"') if part.startswith('"') else part.lower()


def _names(qualified_list: str) -> tuple[str, ...]:
    out = []
    for item in re.split(r",(?=(?:[^\"]|\"[^\"]*\")*$)", qualified_list):
        item = re.sub(r"^\s*ONLY\s+", "", item, flags=re.IGNORECASE).rstrip(" \t\r\n*")
        if item.strip():
            out.append(split_name(item)[1])
    return tuple(out)


def table_list(sql: str) -> tuple[int, int, list[tuple[str, str]]] | None:
    """DROP TABLE or TRUNCATE as the client wrote it: the span of its table list and each item's
    text with its table name; None if the text does not read plainly (a comment inside, say)."""
    m = _TABLE_LIST.match(sql)
    if m is None:
        return None
    items = []
    for item in re.split(r",(?=(?:[^\"]|\"[^\"]*\")*$)", m.group(1)):
        text = item.strip()
        bare = re.sub(r"^ONLY\s+", "", text, flags=re.IGNORECASE).rstrip(" \t\r\n*")
        if not bare:
            return None
        items.append((text, split_name(bare)[1]))
    return m.start(1), m.end(1), items


def analyse_ddl(masked: str) -> DdlPlan:
    """Action, object kind and tables of a DDL statement (CREATE, ALTER, DROP, TRUNCATE, COMMENT)."""
    m = _CREATE_TABLE.match(masked)
    if m:
        temporary, name, after = m.group(1), m.group(2), (m.group(3) or "").upper()
        columns = _table_columns(masked, m.end() - 1) if after == "(" else ()
        return DdlPlan(
            "CREATE",
            "TABLE",
            (split_name(name)[1],),
            True,
            columns,
            bool(temporary and temporary.upper().startswith("TEMP")),
        )
    m = _CREATE_INDEX.match(masked)
    if m:
        return DdlPlan("CREATE", "INDEX", (split_name(m.group(1))[1],), True)
    m = _ON_TABLE.match(masked)
    if m:
        return DdlPlan("CREATE", m.group(1).upper(), (split_name(m.group(2))[1],), True)
    m = _ALTER_TABLE.match(masked)
    if m:
        return DdlPlan("ALTER", "TABLE", (split_name(m.group(1))[1],), True)
    m = _DROP_TABLE.match(masked)
    if m:
        return DdlPlan("DROP", "TABLE", _names(m.group(2)), True, if_exists=bool(m.group(1)))
    m = _TRUNCATE.match(masked)
    if m:
        return DdlPlan("TRUNCATE", "TABLE", _names(m.group(1)), True)
    m = _COMMENT.match(masked)
    if m:
        schema, name = split_name(m.group(2))
        table = (schema or name) if m.group(1).upper() == "COLUMN" else name
        return DdlPlan("COMMENT", m.group(1).upper(), (table,), True)
    m = _CREATE_AGGREGATE.match(masked) or _RENAME_AGGREGATE.match(masked)
    if m:
        action = "CREATE" if masked.lstrip()[:6].upper() == "CREATE" else "ALTER"
        return DdlPlan(action, "AGGREGATE", name=split_name(m.group(1))[1])
    m = _OBJECT.match(masked)
    if m:
        return DdlPlan(m.group(1).upper(), " ".join(m.group(2).upper().split()))
    return DdlPlan("UNKNOWN", "UNKNOWN")


def _table_columns(masked: str, open_paren: int) -> tuple[str, ...]:
    """Column names of `CREATE TABLE t (...)`: the first word of each top-level element that is
    not a table constraint."""
    depth, start, names = 0, open_paren + 1, []
    i, n = open_paren, len(masked)
    elements = []
    while i < n:
        c = masked[i]
        if c == '"':
            end = masked.find('"', i + 1)
            while end != -1 and masked.startswith('""', end):
                end = masked.find('"', end + 2)
            i = n if end < 0 else end + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                elements.append(masked[start:i])
                break
        elif c == "," and depth == 1:
            elements.append(masked[start:i])
            start = i + 1
        i += 1
    for element in elements:
        m = _PART.search(element)
        if m and m.start() == len(element) - len(element.lstrip()):
            word = _fold(m.group())
            if m.group().startswith('"') or word not in _CONSTRAINT_WORDS:
                names.append(word)
    return tuple(names)


def utility_tables(keyword: str, masked: str) -> tuple[str, ...]:
    pattern = _UTILITY_TABLES.get(keyword)
    if pattern is None:
        return ()
    m = pattern.match(masked)
    return _names(m.group(1)) if m and m.group(1) else ()


def tables_by_regex(masked: str) -> tuple[str, ...]:
    """Table names after FROM, JOIN, INTO, UPDATE or TABLE: a statement sqlglot cannot parse is
    routed by these (or refused), never guessed."""
    out: list[str] = []
    for m in _SOURCES.finditer(masked):
        name = split_name(m.group(1))[1]
        if name not in out and (m.group(1).startswith('"') or name not in _NOT_TABLES):
            out.append(name)
    return tuple(out)
