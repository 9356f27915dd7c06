"""mailgate's own directory schema, its migrations, and the queries the directory runs.

Two shapes of database are supported:

- the built-in schema below (`mailstores`, `domains`, `users`), written by `admin.py` and read
  with one join per login;
- an existing schema (Dovecot passdb-sql style), read with the operator's two queries from
  `[directory.queries]`, e.g. the seed's postfix tables:
  `SELECT clear AS password FROM users WHERE email = :user LIMIT 1` and
  `SELECT destination_mailstore AS host FROM transport WHERE domain = :domain LIMIT 1`.

Every value from a client reaches the database as a bound parameter (:user, :domain,
:protocol), never as SQL text. SQLAlchemy 2 Core only: no ORM, no sessions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    TextClause,
    UniqueConstraint,
    Update,
    bindparam,
    false,
    func,
    inspect,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import TypeCompiler

from mailgate import names

# RFC 5321 4.5.3.1: 64 octets of local part + "@" + 255 of domain; 320 is the usual round cap.
MAX_ADDRESS = 320
MAX_DOMAIN = 255
# An argon2id string is ~100 characters, bcrypt 60, sha512-crypt 106; 512 also holds a
# {PLAIN} password of 500 characters, in a VARCHAR every database stores inline.
MAX_PASSWORD = 512
MAX_NAME = 64  # mailstore names: short labels for logs and metrics
MAX_HOST = 255  # RFC 1035 host name length
TLS_MODES = ("none", "starttls", "implicit")
# The bind parameters a configured query may use.
QUERY_PARAMS = frozenset({"user", "domain", "protocol"})
# Version 4: how an OAuth login reaches a mailstore ("master": user*master with the master
# password; "token": the client's token, for the mailstore to validate itself).
OAUTH_LOGINS = ("master", "token")
# App passwords one user may have. Each is a password hash to check when the main password
# does not match (ARGON2ID: ~20 ms of CPU), so the cap bounds the work of one failed login.
MAX_APP_PASSWORDS = 16
MAX_LABEL = 64
APP_PASSWORD_PROTOCOLS = ("imap", "pop3", "smtp")

metadata = MetaData()


class ExactName(String):
    """A name column that compares byte for byte: `users.address` and `domains.name`.

    Logins bind normalised names (`mailgate.names`), so equal must mean identical: a collation
    that folds case or accents, or ignores trailing spaces, would let spellings the throttle
    counts apart log in as one user. SQLite (BINARY) and PostgreSQL (its default collations
    are deterministic: equal only if the bytes are) compare so already; plain VARCHAR with
    normalised values is all they need (citext would add an extension and fold case by the
    server's locale rules, a second opinion beside ours). MariaDB and MySQL default to
    case- and accent-insensitive, PAD SPACE collations, so the column names a binary NO PAD
    one (`exact_collation`).
    """

    cache_ok = True


def exact_collation(dialect: Dialect) -> str:
    """The binary collation that ignores nothing, on this MariaDB or MySQL server."""
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"  # MariaDB 10.2+; utf8mb4_bin ignores trailing spaces
    if (dialect.server_version_info or (0,)) >= (8, 0, 17):
        return "utf8mb4_0900_bin"  # MySQL's NO PAD binary collation
    # MySQL 5.7 has no NO PAD collation; trailing spaces never reach it (names are trimmed).
    return "utf8mb4_bin"


@compiles(ExactName, "mysql")
def _exact_name_mysql(type_: ExactName, compiler: TypeCompiler, **kw: Any) -> str:
    collation = exact_collation(compiler.dialect)
    return f"VARCHAR({type_.length}) CHARACTER SET utf8mb4 COLLATE {collation}"


schema_version = Table(
    "mailgate_schema",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
)

mailstores = Table(
    "mailstores",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(MAX_NAME), nullable=False, unique=True),
    Column("host", String(MAX_HOST), nullable=False),
    Column("imap_port", Integer, nullable=True),  # NULL: [directory.ports] / protocol default
    Column("pop3_port", Integer, nullable=True),
    Column("smtp_port", Integer, nullable=True),
    Column("tls", String(16), nullable=False, default="none"),
    # Dovecot master user: log in as "user*master" with this password instead of the user's.
    Column("master_user", String(MAX_ADDRESS), nullable=True),
    Column("master_password", String(MAX_PASSWORD), nullable=True),
    Column("active", Boolean, nullable=False, default=True),
    # Version 2: how to hand an SMTP session to this mailstore ("xclient" or "auth");
    # NULL: [backend] smtp_mode.
    Column("smtp_login", String(16), nullable=True),
    # Version 4: "master" | "token" (OAUTH_LOGINS); NULL: master when the mailstore has a
    # master user, else token.
    Column("oauth_login", String(16), nullable=True),
    # Version 5: a [[pool]] of the config that chooses the host for this mailstore's users
    # (host and ports are then not used); NULL: host and ports, as before.
    Column("pool", String(MAX_NAME), nullable=True),
    CheckConstraint("tls IN ('none', 'starttls', 'implicit')", name="mailstores_tls"),
    mysql_charset="utf8mb4",
)

domains = Table(
    "domains",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", ExactName(MAX_DOMAIN), nullable=False, unique=True),  # names.normalise_domain
    Column("mailstore_id", Integer, ForeignKey("mailstores.id"), nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    mysql_charset="utf8mb4",
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("address", ExactName(MAX_ADDRESS), nullable=False, unique=True),  # names.normalise
    Column("password", String(MAX_PASSWORD), nullable=False),  # "{SCHEME}..."
    Column("active", Boolean, nullable=False, default=True),
    # NULL: the domain's mailstore. Set: this user lives elsewhere (a moved mailbox).
    Column("mailstore_id", Integer, ForeignKey("mailstores.id"), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, default=_now),
    Column("updated_at", DateTime(timezone=True), nullable=False, default=_now, onupdate=_now),
    # Version 4: the main password is refused; only OAuth tokens and app passwords log in.
    Column("oauth_only", Boolean, nullable=False, default=False, server_default=false()),
    mysql_charset="utf8mb4",
)

# Version 4: extra passwords per user, each limited to some protocols and perhaps a date, for
# clients that cannot do OAuth. Stored hashed like the main password ("{SCHEME}...").
app_passwords = Table(
    "app_passwords",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("label", String(MAX_LABEL), nullable=False),
    Column("password", String(MAX_PASSWORD), nullable=False),
    Column("protocols", String(32), nullable=False),  # space-separated: "imap smtp"
    Column("expires_at", DateTime(timezone=True), nullable=True),  # NULL: never
    Column("created_at", DateTime(timezone=True), nullable=False, default=_now),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    # Also the index the login query uses to find a user's app passwords.
    UniqueConstraint("user_id", "label", name="app_passwords_user_label"),
    mysql_charset="utf8mb4",
)


# --- engines --------------------------------------------------------------------------------

# Recycle pooled connections after 30 minutes: MySQL drops idle ones after wait_timeout
# (8 h by default, often lowered to minutes by hosters) and NAT/firewalls after ~1 h.
POOL_RECYCLE = 1800.0
# aiosqlite's worker thread hands the result of its last job (closing a connection that
# failed to open, or whose query was cancelled) to the event loop a moment after the job;
# closing the loop before then makes the thread raise. 50 ms is ample for a local close.
SQLITE_SETTLE = 0.05
# Extra connections past pool_size under a burst, released when idle (SQLAlchemy's default).
MAX_OVERFLOW = 10
_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "mysql": "mysql+aiomysql",
    "mariadb": "mysql+aiomysql",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def engine_url(url: str) -> str:
    """Pick the asyncio driver: sqlite:///x -> sqlite+aiosqlite:///x, and so on."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not echoed: without "://" there is no telling where its password is.
        raise ValueError("not a database URL (scheme://user:password@host/database)")
    if "+" in scheme:
        return url  # the operator named a driver
    if scheme not in _DRIVERS:
        raise ValueError(f"unsupported database {scheme!r} (sqlite, mysql, postgresql)")
    return f"{_DRIVERS[scheme]}://{rest}"


def make_engine(url: str, pool_size: int) -> AsyncEngine:
    """An engine that checks connections before use and never logs bound values."""
    full = engine_url(url)
    pool: dict[str, Any] = {"pool_size": max(pool_size, 1), "max_overflow": MAX_OVERFLOW}
    if full.startswith("sqlite") and (":memory:" in full or full.endswith("://")):
        pool = {}  # one shared in-memory connection (StaticPool): no pool to size
    return create_async_engine(
        full, pool_pre_ping=True, pool_recycle=POOL_RECYCLE, hide_parameters=True, **pool
    )


async def dispose(engine: AsyncEngine) -> None:
    """Close a pool's connections; for SQLite, also let its worker threads finish."""
    await engine.dispose()
    if engine.dialect.name == "sqlite":
        await asyncio.sleep(SQLITE_SETTLE)


# --- versions -------------------------------------------------------------------------------


class SchemaError(Exception):
    """The database has no mailgate schema, a newer one, or a configured query is unusable."""


def _v1(conn: Connection) -> None:
    # Creates the tables as defined above, which already have every later column: the later
    # steps below add a column only where it is missing (a database made by version 1).
    metadata.create_all(conn, tables=[mailstores, domains, users])


def _v2(conn: Connection) -> None:
    columns = {c["name"] for c in inspect(conn).get_columns(mailstores.name)}
    if "smtp_login" not in columns:
        conn.execute(text("ALTER TABLE mailstores ADD COLUMN smtp_login VARCHAR(16) NULL"))


def _v3(conn: Connection) -> None:
    """Names stored normalised and compared exactly (see ExactName).

    Every stored address and domain is rewritten as `mailgate.names` spells it, after checking
    that no two rows become one (then nothing changes and the error lists them). On MariaDB
    and MySQL the three tables become utf8mb4 with the exact collation first. MySQL commits
    each ALTER at once, so this step is not atomic there; it is safe to run again.
    """
    changes = [
        (users, users.c.address, _renames(conn, users.c.address, names.normalise)),
        (domains, domains.c.name, _renames(conn, domains.c.name, names.normalise_domain)),
    ]
    if conn.dialect.name == "mysql":
        collation = exact_collation(conn.dialect)
        for table in (mailstores, domains, users):
            convert = f"CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}"
            conn.execute(text(f"ALTER TABLE {table.name} {convert}"))
    for table, column, renames in changes:
        for row_id, name in renames.items():
            conn.execute(table.update().where(table.c.id == row_id).values({column.name: name}))


def _v5(conn: Connection) -> None:
    """mailstores.pool: the [[pool]] (by name) that serves the mailstore's users."""
    columns = {c["name"] for c in inspect(conn).get_columns(mailstores.name)}
    if "pool" not in columns:
        conn.execute(text(f"ALTER TABLE mailstores ADD COLUMN pool VARCHAR({MAX_NAME}) NULL"))


MAX_LISTED = 20  # problems a refused migration lists; the count says how many more


def _renames(
    conn: Connection, column: Column[str], normalise: Callable[[str], str]
) -> dict[int, str]:
    """{row id: normalised name} for the rows whose name changes; SchemaError if two rows
    would become one or a name cannot be normalised (listing them: the operator's own data)."""
    rows = conn.execute(select(column.table.c.id, column)).all()
    problems: list[str] = []
    owners: dict[str, list[str]] = {}
    renames: dict[int, str] = {}
    for row_id, stored in rows:
        try:
            normal = normalise(stored)
        except names.BadName as e:
            problems.append(f"{stored!r} ({e})")
            continue
        owners.setdefault(normal, []).append(stored)
        if normal != stored:
            renames[row_id] = normal
    for normal, spellings in owners.items():
        if len(spellings) > 1:
            problems.append(f"{' and '.join(map(repr, spellings))} would all be {normal!r}")
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise SchemaError(
            f"cannot normalise {column.table.name}.{column.name}: {shown}{more}."
            " Rename or remove these rows (by hand), then run `directory upgrade` again"
        )
    return renames


def _v4(conn: Connection) -> None:
    """OAuth logins and app passwords: mailstores.oauth_login, users.oauth_only, app_passwords."""
    found = inspect(conn)
    if "oauth_login" not in {c["name"] for c in found.get_columns(mailstores.name)}:
        conn.execute(text("ALTER TABLE mailstores ADD COLUMN oauth_login VARCHAR(16) NULL"))
    if "oauth_only" not in {c["name"] for c in found.get_columns(users.name)}:
        # FALSE is a keyword in SQLite (3.23+), MariaDB and PostgreSQL alike.
        conn.execute(text("ALTER TABLE users ADD COLUMN oauth_only BOOLEAN NOT NULL DEFAULT FALSE"))
    metadata.create_all(conn, tables=[app_passwords])  # only when missing


# (version, step): each step takes the schema from version - 1 to version. Append only.
MIGRATIONS: tuple[tuple[int, Callable[[Connection], None]], ...] = (
    (1, _v1),
    (2, _v2),
    (3, _v3),
    (4, _v4),
    (5, _v5),
)
SMTP_LOGINS = ("xclient", "auth")
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _current(conn: Connection) -> int | None:
    if not inspect(conn).has_table(schema_version.name):
        return None
    version = conn.execute(select(func.max(schema_version.c.version))).scalar()
    return int(version) if version is not None else None


def _migrate(conn: Connection) -> tuple[int, int]:
    before = _current(conn)
    if before is None:
        metadata.create_all(conn, tables=[schema_version])
        conn.execute(schema_version.insert().values(version=0))
        before = 0
    if before > SCHEMA_VERSION:
        raise SchemaError(
            f"database schema version {before} is newer than this mailgate ({SCHEMA_VERSION})"
        )
    for version, step in MIGRATIONS:
        if version > before:
            step(conn)
            conn.execute(schema_version.update().values(version=version))
    return before, SCHEMA_VERSION


async def create(conn: AsyncConnection) -> int:
    """Create the schema in an empty database; returns the version. Refuses an existing one."""
    if await conn.run_sync(_current) is not None:
        raise SchemaError("the database already has a mailgate schema (use upgrade)")
    await conn.run_sync(_migrate)
    return SCHEMA_VERSION


async def upgrade(conn: AsyncConnection) -> tuple[int, int]:
    """Apply the migrations the database lacks; returns (version before, version after)."""
    if await conn.run_sync(_current) is None:
        raise SchemaError("the database has no mailgate schema (use init)")
    return await conn.run_sync(_migrate)


async def version(conn: AsyncConnection) -> int | None:
    return await conn.run_sync(_current)


# --- queries the directory runs ---------------------------------------------------------------


def builtin_login_query() -> Select[tuple[object, ...]]:
    """One row for any name: the user's password, the three active flags and the effective
    mailstore, or NULLs in the user's columns when there is no such user.

    One round trip per login. The row comes back for an unknown user too, with the domain's
    mailstore, so the database and the directory do the same work for a name that does not
    exist as for one that does (the time of the answer must not tell them apart). The user's
    own mailstore (a moved mailbox) wins over the domain's; a user whose domain row is missing
    still comes back (and is refused with a reason in the log rather than as "unknown user").
    The count of app passwords saves the second query for the users (most) who have none.
    """
    ms = mailstores
    n_app_passwords = (
        select(func.count())
        .where(app_passwords.c.user_id == users.c.id)
        .correlate(users)
        .scalar_subquery()
    )
    one_row = select(literal_column("1").label("one")).subquery("one_row")
    return (
        select(
            users.c.address,
            users.c.password,
            users.c.oauth_only,
            n_app_passwords.label("app_passwords"),
            ms.c.oauth_login.label("ms_oauth_login"),
            users.c.active.label("user_active"),
            domains.c.active.label("domain_active"),
            ms.c.name.label("ms_name"),
            ms.c.host.label("ms_host"),
            ms.c.imap_port.label("ms_imap_port"),
            ms.c.pop3_port.label("ms_pop3_port"),
            ms.c.smtp_port.label("ms_smtp_port"),
            ms.c.tls.label("ms_tls"),
            ms.c.master_user.label("ms_master_user"),
            ms.c.master_password.label("ms_master_password"),
            ms.c.active.label("ms_active"),
            ms.c.smtp_login.label("ms_smtp_login"),
            ms.c.pool.label("ms_pool"),
        )
        .select_from(one_row)
        .outerjoin(users, users.c.address == bindparam("user"))
        .outerjoin(domains, domains.c.name == bindparam("domain"))
        .outerjoin(ms, ms.c.id == func.coalesce(users.c.mailstore_id, domains.c.mailstore_id))
        .limit(1)
    )


def builtin_password_sample(limit: int) -> Select[str, str]:
    """The newest users' addresses and stored passwords: the directory learns from them
    which schemes and costs its users have (auth/dummy.py keeps only those, not the hashes)."""
    return select(users.c.address, users.c.password).order_by(users.c.id.desc()).limit(limit)


def builtin_any_app_password() -> Select[tuple[int]]:
    """One row if any user has an app password (then every wrong password costs an
    app-password check, so no user stands out by timing)."""
    return select(app_passwords.c.id).limit(1)


def builtin_app_passwords_query() -> Select[tuple[object, ...]]:
    """A user's app passwords, at most MAX_APP_PASSWORDS (admin refuses more), oldest first."""
    return (
        select(
            app_passwords.c.id,
            app_passwords.c.label,
            app_passwords.c.password,
            app_passwords.c.protocols,
            app_passwords.c.expires_at,
            app_passwords.c.last_used_at,
        )
        .join(users, users.c.id == app_passwords.c.user_id)
        .where(users.c.address == bindparam("user"))
        .order_by(app_passwords.c.id)
        .limit(MAX_APP_PASSWORDS)
    )


def builtin_touch_app_password() -> Update:
    """Record when an app password (:app_id) was last used (:used_at)."""
    return (
        update(app_passwords)
        .where(app_passwords.c.id == bindparam("app_id"))
        .values(last_used_at=bindparam("used_at", type_=app_passwords.c.last_used_at.type))
    )


def builtin_domain_query() -> Select[tuple[object, ...]]:
    """A domain's mailstore, for SMTP relay ("auth none"): mail to a domain we host goes to
    its mailstore's SMTP port, whoever sends it."""
    ms = mailstores
    return (
        select(
            domains.c.active.label("domain_active"),
            ms.c.name.label("ms_name"),
            ms.c.host.label("ms_host"),
            ms.c.smtp_port.label("ms_smtp_port"),
            ms.c.tls.label("ms_tls"),
            ms.c.active.label("ms_active"),
            ms.c.smtp_login.label("ms_smtp_login"),
            ms.c.pool.label("ms_pool"),
        )
        .select_from(domains)
        .join(ms, ms.c.id == domains.c.mailstore_id)
        .where(domains.c.name == bindparam("domain"))
        .limit(1)
    )


def custom_query(sql: str, key: str) -> BoundQuery:
    """An operator's query as a bound statement; `key` names it in errors (config path).

    Only :user, :domain and :protocol may appear, so a typo fails at start, not per login.
    """
    clause = text(sql)
    used = set(clause.compile().params)
    unknown = sorted(used - QUERY_PARAMS)
    if unknown:
        allowed = ", ".join(":" + p for p in sorted(QUERY_PARAMS))
        raise SchemaError(
            f"{key}: unknown parameter :{unknown[0]} (allowed: {allowed};"
            " write \\: for a colon that is not a parameter)"
        )
    if not used & {"user", "domain"}:
        raise SchemaError(f"{key}: the query must use :user or :domain")
    return BoundQuery(clause, frozenset(used))


@dataclass(frozen=True, slots=True)
class BoundQuery:
    """A configured query and the parameter names it uses (some drivers refuse extra ones)."""

    clause: TextClause
    names: frozenset[str]

    def params(self, values: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in values.items() if k in self.names}


@dataclass(frozen=True, slots=True)
class CustomQueries:
    password: BoundQuery  # columns: password [, user] [, active]
    route: BoundQuery  # columns: host [, port]


def custom_queries(password_sql: str, route_sql: str) -> CustomQueries:
    return CustomQueries(
        custom_query(password_sql, "directory.queries.password"),
        custom_query(route_sql, "directory.queries.route"),
    )


# --- route values from an existing schema ----------------------------------------------------

# A postfix transport value starts with the transport's name ("smtp:", "lmtp:", "relay:");
# names are letters, digits and dashes (master.cf service names), never dots. "name:digits"
# is a host and a port instead ("localhost:2143").
_TRANSPORT = re.compile(r"^[A-Za-z][A-Za-z0-9-]*:(?!\d+$)")
_BRACKETED = re.compile(r"^\[([^\]]+)\](?::(\d+))?$")
_HOST = re.compile(r"^[A-Za-z0-9._-]+$")


class BadRoute(ValueError):
    """A route query returned a host value we cannot use; the message is safe to log."""


def parse_host(value: str) -> tuple[str, int | None]:
    """'smtp:10.0.0.5' -> ('10.0.0.5', None); '10.0.0.5:2143' -> ('10.0.0.5', 2143).

    Also '[::1]:2143', 'smtp:[mail.example.com]', bare IPv6 and host names. The port of a
    postfix transport value ('smtp:[h]:25') is the delivery port, not the one for this
    protocol, so it is dropped: the `port` column or [directory.ports] decides instead.
    """
    value = value.strip()
    if _is_ip(value):  # a bare IPv6 address looks like "name:rest" to the patterns below
        return value, None
    transport = _TRANSPORT.match(value)
    rest = value[transport.end() :] if transport else value
    host, port = _split(rest)
    if not (_HOST.match(host) or _is_ip(host)):
        raise BadRoute(f"route host {value[:80]!r} is not a host name or address")
    if port is not None and not 0 < port < 65536:
        raise BadRoute(f"route host {value[:80]!r} has an invalid port")
    return host, None if transport else port


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _split(value: str) -> tuple[str, int | None]:
    bracketed = _BRACKETED.match(value)
    if bracketed:
        port = bracketed.group(2)
        return bracketed.group(1), int(port) if port else None
    host, sep, port_text = value.rpartition(":")
    if sep and port_text.isdigit() and ":" not in host:
        return host, int(port_text)
    return value, None  # a host name, an IPv4 address or a bare IPv6 address
