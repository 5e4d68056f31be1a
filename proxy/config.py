"""pgshard's configuration: the TOML file read once at start-up into frozen, validated dataclasses.

Everything is checked before the proxy listens: a typo, a wrong type, a missing value or a value
that cannot work (an md5 login for a SCRAM verifier, overlapping ranges, a shard index that does
not exist) stops start-up with a ConfigError naming the key, the file and the line. The rest of
pgshard can then trust these objects without re-checking them. The shape is DESIGN.md's "The
user-facing contract"; `EXAMPLE_CONFIG` below is the file the README shows.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from proxy.config_schema import (
    INTEGER_TYPES,
    KEY_TYPES,
    SHARDING_FUNCTIONS,
    ConfigError,
    ServerAddress,
    Source,
    Table,
    find_overlap,
    parse_server_url,
    split_listen,
)
from proxy.protocol.auth import is_md5_hash, is_scram_verifier

POOL_MODES = ("transaction", "session", "statement")
AUTH_METHODS = ("scram-sha-256", "md5", "trust")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "console")
ADMIN_DATABASE = "pgshard"
# PostgreSQL's PQ_LARGE_MESSAGE_LIMIT is 1 GB - 1; the default mirrors proxy/protocol/framing.py.
MAX_MESSAGE_LENGTH_LIMIT = 0x3FFFFFFF
DEFAULT_MAX_MESSAGE_LENGTH = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class General:
    """Process-wide settings; timeouts are seconds, 0 where documented means "none"."""

    listen: str = "127.0.0.1:6432"
    pool_mode: str = "transaction"
    workers: int = 1  # SO_REUSEPORT processes; pool sizes are per worker
    query_wait_timeout: float = 120.0  # a client waiting for a server connection (PgBouncer's default)
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    connect_timeout: float = 5.0
    login_timeout: float = 60.0  # PgBouncer's client_login_timeout
    max_client_conn: int = 10000
    max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_level: str = "info"
    log_format: str = "auto"
    query_timeout: float = 0.0  # per fan-out query; 0 = none
    max_prepared_statements: int = 1000  # LRU bound per server connection
    two_phase_commit: bool = True  # false: multi-shard commits are one COMMIT per shard, not atomic
    two_phase_recovery_delay: float = 30.0  # in-doubt transactions younger than this may still be committing
    catalog_refresh_interval: float = 30.0  # seconds between reads of the user-defined aggregates

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True, slots=True)
class User:
    """A login clients may use, and how pgshard checks it and pools its server connections."""

    name: str
    password: str | None = field(default=None, repr=False)  # plaintext, "SCRAM-SHA-256$...", or "md5<hex>"
    auth: str = "scram-sha-256"
    pool_size: int = 20
    min_pool_size: int = 0
    server_user: str | None = None
    server_password: str | None = field(default=None, repr=False)
    pool_mode: str | None = None  # None: general.pool_mode


@dataclass(frozen=True, slots=True)
class Shard:
    """One physical shard: its primary server (replicas come with their own issue)."""

    primary: str = field(repr=False)
    _address: ServerAddress = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_address", parse_server_url(self.primary))

    @property
    def address(self) -> ServerAddress:
        return self._address


@dataclass(frozen=True, slots=True)
class Range:
    """Keys from `start` (inclusive) up to `end` (exclusive) live on `shard`; None is unbounded."""

    start: int | None
    end: int | None
    shard: int


@dataclass(frozen=True, slots=True)
class ListRule:
    """Keys equal to one of `values` live on `shard`."""

    values: tuple[int | str, ...]
    shard: int


@dataclass(frozen=True, slots=True)
class ShardedTable:
    """A table whose rows are spread over the shards by the value of `column`."""

    name: str
    column: str
    data_type: str  # the hash of a key depends on its type, so there is no default
    function: str = "hash"
    ranges: tuple[Range, ...] = ()
    lists: tuple[ListRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Database:
    """A logical database clients connect to, spread over `shards`."""

    name: str
    shards: tuple[Shard, ...]
    virtual_shards: int = 1024
    default_shard: int = 0
    omnisharded_tables: tuple[str, ...] = ()
    sharded_tables: tuple[ShardedTable, ...] = ()
    shard_key: str | None = None  # a column that shards every table having it
    shard_key_type: str = "bigint"  # the hash of shard_key values depends on it

    def sharded_table(self, name: str) -> ShardedTable | None:
        return next((t for t in self.sharded_tables if t.name == name), None)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; `path` is None when it did not come from a file."""

    general: General
    users: tuple[User, ...]
    databases: tuple[Database, ...]
    path: Path | None = None

    def user(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)

    def database(self, name: str) -> Database | None:
        return next((d for d in self.databases if d.name == name), None)


# Defaults come from instances: with slots, `General.listen` is a slot descriptor, not "127.0.0.1:6432".
_GENERAL = General()
_USER = User("")
_DATABASE = Database("", ())
_SHARDED_TABLE = ShardedTable("", "", "")


def _keys(cls: type) -> tuple[str, ...]:
    """The TOML keys a table may have: the dataclass's own fields."""
    return tuple(f.name for f in fields(cls) if f.init)


def _read_general(t: Table, base: Path) -> General:
    listen = t.string("listen", _GENERAL.listen)
    try:
        split_listen(listen)
    except ValueError as e:
        raise t.error("listen", str(e)) from None
    tls_cert, tls_key = _tls_file(t, "tls_cert", base), _tls_file(t, "tls_key", base)
    if (tls_cert is None) != (tls_key is None):
        raise t.error(
            "tls_key" if tls_key is None else "tls_cert",
            "tls_cert and tls_key go together: set both or neither",
        )
    return General(
        listen=listen,
        pool_mode=t.choice("pool_mode", POOL_MODES, _GENERAL.pool_mode),
        workers=t.integer("workers", _GENERAL.workers, minimum=1),
        query_wait_timeout=t.seconds("query_wait_timeout", _GENERAL.query_wait_timeout),
        server_idle_timeout=t.seconds("server_idle_timeout", _GENERAL.server_idle_timeout),
        server_lifetime=t.seconds("server_lifetime", _GENERAL.server_lifetime, positive=True),
        connect_timeout=t.seconds("connect_timeout", _GENERAL.connect_timeout, positive=True),
        login_timeout=t.seconds("login_timeout", _GENERAL.login_timeout, positive=True),
        max_client_conn=t.integer("max_client_conn", _GENERAL.max_client_conn, minimum=1),
        max_message_length=t.integer(
            "max_message_length", _GENERAL.max_message_length, minimum=1024, maximum=MAX_MESSAGE_LENGTH_LIMIT
        ),
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_level=t.choice("log_level", LOG_LEVELS, _GENERAL.log_level),
        log_format=t.choice("log_format", LOG_FORMATS, _GENERAL.log_format),
        query_timeout=t.seconds("query_timeout", _GENERAL.query_timeout),
        max_prepared_statements=t.integer(
            "max_prepared_statements", _GENERAL.max_prepared_statements, minimum=1
        ),
        two_phase_commit=t.boolean("two_phase_commit", _GENERAL.two_phase_commit),
        two_phase_recovery_delay=t.seconds("two_phase_recovery_delay", _GENERAL.two_phase_recovery_delay),
        catalog_refresh_interval=t.seconds(
            "catalog_refresh_interval", _GENERAL.catalog_refresh_interval, positive=True
        ),
    )


def _tls_file(t: Table, name: str, base: Path) -> Path | None:
    """A TLS file, relative to the config file's folder, checked now rather than at the first handshake."""
    text = t.string(name, None)
    if text is None:
        return None
    path = base / Path(text).expanduser()
    if not path.is_file():
        raise t.error(name, f"no such file: {path}")
    return path


def _read_user(t: Table) -> User:
    name = t.string("name")
    auth = t.choice("auth", AUTH_METHODS, _USER.auth)
    password = t.string("password", None)
    if password is None and auth != "trust":
        raise t.error("password", f'missing: auth = "{auth}" needs a password (or use auth = "trust")')
    if password is not None and auth == "md5" and is_scram_verifier(password):
        raise t.error(
            "auth", 'a SCRAM-SHA-256 verifier cannot check an md5 login: use auth = "scram-sha-256"'
        )
    if password is not None and auth == "scram-sha-256" and is_md5_hash(password):
        raise t.error("auth", 'an md5 password hash cannot check a SCRAM login: use auth = "md5"')
    if password is not None and password.startswith("SCRAM-SHA-256$") and not is_scram_verifier(password):
        raise t.error("password", "looks like a SCRAM-SHA-256 verifier but is malformed")
    pool_size = t.integer("pool_size", _USER.pool_size, minimum=1)
    return User(
        name=name,
        password=password,
        auth=auth,
        pool_size=pool_size,
        min_pool_size=t.integer("min_pool_size", _USER.min_pool_size, minimum=0, maximum=pool_size),
        server_user=t.string("server_user", None),
        server_password=t.string("server_password", None),
        pool_mode=t.choice("pool_mode", POOL_MODES, None),
    )


def _read_shard(t: Table) -> Shard:
    url = t.string("primary")
    try:
        return Shard(url)
    except ValueError as e:
        raise t.error("primary", str(e)) from None


def _read_ranges(t: Table, data_type: str, shard_count: int) -> tuple[Range, ...]:
    ranges = []
    for r in t.tables("ranges", _keys(Range)):
        start = r.key_value("start", data_type, None)
        end = r.key_value("end", data_type, None, exclusive_end=True)
        if start is not None and end is not None and start >= end:
            raise r.error("end", f"must be greater than start ({start}), got {end}")
        ranges.append(Range(start, end, r.integer("shard", minimum=0, maximum=shard_count - 1)))
    clash = find_overlap([(r.start, r.end) for r in ranges])
    if clash is not None:
        raise t.error(f"ranges[{clash[1]}]", f"overlaps ranges[{clash[0]}]")
    return tuple(ranges)


def _read_lists(t: Table, data_type: str, shard_count: int) -> tuple[ListRule, ...]:
    rules: list[ListRule] = []
    owner: dict[int | str, int] = {}
    for i, r in enumerate(t.tables("lists", _keys(ListRule))):
        values = tuple(r.key_value("values", data_type, many=True))
        for value in values:
            if value in owner:
                raise r.error("values", f"{value!r} is already listed in lists[{owner[value]}]")
            owner[value] = i
        rules.append(ListRule(values, r.integer("shard", minimum=0, maximum=shard_count - 1)))
    return tuple(rules)


def _read_sharded_table(t: Table, shard_count: int) -> ShardedTable:
    name, column = t.string("name"), t.string("column")
    data_type = t.choice("data_type", KEY_TYPES)
    function = t.choice("function", SHARDING_FUNCTIONS, _SHARDED_TABLE.function)
    if function == "range" and data_type not in INTEGER_TYPES:
        raise t.error("function", f'range sharding needs an integer data_type, got "{data_type}"')
    for key, wanted in (("ranges", "range"), ("lists", "list")):
        if t.has(key) and function != wanted:
            raise t.error(key, f'only used with function = "{wanted}", but function = "{function}"')
    ranges = _read_ranges(t, data_type, shard_count)
    lists = _read_lists(t, data_type, shard_count)
    if function == "range" and not ranges:
        raise t.error(
            "ranges", 'missing: function = "range" needs ranges = [{ start = ..., end = ..., shard = ... }]'
        )
    if function == "list" and not lists:
        raise t.error("lists", 'missing: function = "list" needs lists = [{ values = [...], shard = ... }]')
    return ShardedTable(name, column, data_type, function, ranges, lists)


def _read_database(t: Table) -> Database:
    name = t.string("name")
    if name == ADMIN_DATABASE:
        raise t.error("name", f'"{ADMIN_DATABASE}" is reserved for the admin console')
    shards = tuple(_read_shard(s) for s in t.tables("shards", ("primary",)))
    if not shards:
        raise t.error("shards", "at least one [[databases.shards]] is required")
    count = len(shards)
    # Unset, the default rounds up to a multiple of the shard count (1024 for 2, 4 or 8 shards).
    default_virtual = -(-_DATABASE.virtual_shards // count) * count
    virtual_shards = t.integer("virtual_shards", default_virtual, minimum=count)
    if virtual_shards % count:
        # Virtual shard v lives on shard v mod N: only a multiple of N spreads keys evenly and
        # matches PARTITION BY HASH with modulus N.
        raise t.error(
            "virtual_shards",
            f"must be a multiple of the number of shards ({count}), got {virtual_shards}: "
            f"e.g. {virtual_shards + count - virtual_shards % count}",
        )
    default_shard = t.integer("default_shard", _DATABASE.default_shard, minimum=0, maximum=count - 1)
    omnisharded = t.strings("omnisharded_tables")
    _no_duplicates(t, "omnisharded_tables", omnisharded)
    sharded = tuple(_read_sharded_table(s, count) for s in t.tables("sharded_tables", _keys(ShardedTable)))
    _no_duplicates(t, "sharded_tables", [s.name for s in sharded], ".name")
    for i, table in enumerate(sharded):
        if table.name in omnisharded:
            raise t.error(f"sharded_tables[{i}].name", f'"{table.name}" is also in omnisharded_tables')
    return Database(
        name=name,
        shards=shards,
        virtual_shards=virtual_shards,
        default_shard=default_shard,
        omnisharded_tables=omnisharded,
        sharded_tables=sharded,
        shard_key=t.string("shard_key", None),
        shard_key_type=t.choice("shard_key_type", KEY_TYPES, "bigint"),
    )


def _no_duplicates(t: Table, name: str, values: list[str] | tuple[str, ...], suffix: str = "") -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise t.error(f"{name}[{i}]{suffix}", f'"{value}" appears twice')
        seen.add(value)


def parse_config(text: str, path: Path | None = None) -> Config:
    """Validate a configuration's text; `path` is for messages and relative TLS file names."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", file=path) from None
    root = Table(data, "", Source(text, path), ("general", "users", "databases"))
    base = path.parent if path is not None else Path()
    general = _read_general(root.table("general", _keys(General)), base)
    users = tuple(_read_user(u) for u in root.tables("users", _keys(User)))
    if not users:
        raise root.error("users", "at least one [[users]] is required")
    _no_duplicates(root, "users", [u.name for u in users], ".name")
    databases = tuple(_read_database(d) for d in root.tables("databases", _keys(Database)))
    if not databases:
        raise root.error("databases", "at least one [[databases]] is required")
    _no_duplicates(root, "databases", [d.name for d in databases], ".name")
    return Config(general, users, databases, path)


def load_config(path: str | Path) -> Config:
    """Read and validate the configuration file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the configuration: {e}", file=path) from None
    return parse_config(text, path)


EXAMPLE_CONFIG = """\
[general]
listen = "127.0.0.1:6432"
pool_mode = "transaction"            # transaction | session | statement
workers = 1                          # SO_REUSEPORT processes; pool sizes are per worker
query_wait_timeout = 120             # seconds a client may wait for a server connection
server_idle_timeout = 600
server_lifetime = 3600
connect_timeout = 5
login_timeout = 60
max_client_conn = 10000
# tls_cert = "server.crt"            # both or neither; relative to this file
# tls_key = "server.key"

[[users]]
name = "app"
password = "secret"                  # plain text, or a SCRAM-SHA-256 verifier (then no md5 for this user)
pool_size = 20                       # server connections per shard, per worker
min_pool_size = 0
# server_user / server_password: optional; by default server connections use the shard URL's credentials

[[databases]]                        # a logical database that clients connect to
name = "app"
virtual_shards = 1024                # hash -> virtual shard; virtual shard v is on shard v mod N by default
default_shard = 0                    # home of tables not named below
omnisharded_tables = ["countries"]   # a full copy on every shard

[[databases.shards]]                 # physical shards, in order
primary = "postgresql://app:secret@10.0.0.1:5432/app"

[[databases.shards]]
primary = "postgresql://app:secret@10.0.0.3:5432/app"

[[databases.sharded_tables]]
name = "orders"
column = "user_id"
data_type = "bigint"                 # bigint | integer | smallint | text | varchar | uuid: hash depends on it
function = "hash"                    # hash | range | list

[[databases.sharded_tables]]
name = "events"
column = "region"
data_type = "text"
function = "list"
lists = [{ values = ["eu", "uk"], shard = 0 }, { values = ["us"], shard = 1 }]

[[databases.sharded_tables]]
name = "ledger"
column = "account_id"
data_type = "bigint"
function = "range"
ranges = [{ end = 1000000, shard = 0 }, { start = 1000000, shard = 1 }]   # start inclusive, end exclusive
"""
