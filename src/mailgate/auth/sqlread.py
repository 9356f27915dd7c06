"""The directory's read path: its statements compiled once, run on connections kept open.

SQLAlchemy Core builds every statement the directory runs (`auth/schema.py`) and stays the
tool for the schema, the admin CLI and the migrations. A login's lookup, though, is one small
SELECT, and SQLAlchemy's asyncio pool made it cost more than the rest of the login: a ping
before each checkout and a ROLLBACK after it (three round trips on MariaDB, about six on
PostgreSQL) and the greenlet bridge between asyncio and its sync core (~0.9 ms of CPU). Here
each statement is compiled once for the database's dialect (its SQL text, the order of its
parameters, and the type conversions SQLAlchemy would apply to them and to the result
columns) and run on the driver itself, in autocommit mode, so a lookup is one round trip:

- PostgreSQL: asyncpg, whose statement cache prepares each statement once per connection;
  a lookup is then one Bind/Execute/Sync.
- MariaDB/MySQL: asyncmy with its statement cache: each statement is prepared on the server
  once per connection (COM_STMT_PREPARE) and then run with COM_STMT_EXECUTE, the parameters
  sent apart from the statement in the binary protocol.
- SQLite: the standard library's sqlite3 (`auth/sqlite_read.py`).

Client input only ever travels as a bound parameter: the SQL text is SQLAlchemy's compilation
of schema.py's statements (or of the operator's `[directory.queries]`), never built here.

Liveness without a ping: a pooled connection that turns out dead (the server restarted, a
firewall dropped it) fails its query; then every idle connection is closed, since they are
as old, and the statement is run once more on a fresh connection. The statements are reads
(and one idempotent UPDATE), so running one twice is harmless; a fresh connection that fails
too, or a server that refuses connections, is a `ReadError`, which the directory reports as a
temporary failure, never as a wrong password. A query the directory gives up on (no answer in
query_timeout) is cancelled, and its connection, whose answer may still come, is closed.

A URL naming another driver (`postgresql+psycopg://`, `sqlite+aiosqlite://`), or with options
this path does not take, is read through SQLAlchemy's engine as before (`EngineReader`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Select, TextClause, Update

from mailgate.auth.schema import MAX_OVERFLOW, POOL_RECYCLE, dispose, engine_url, make_engine

log = logging.getLogger("mailgate.auth.directory")

Row = dict[str, Any]
# What the directory runs: schema.py's statements and the operator's queries.
Statement = Select[*tuple[Any, ...]] | Update | TextClause
Processor = Callable[[Any], Any]

# Closing connections (or a whole SQLAlchemy pool) to a server that stopped answering must not
# hang a shutdown or a login: 2 s, then they are dropped unclosed.
CLOSE_TIMEOUT = 2.0
# How long a connection past pool_size may stay idle before it is closed: a burst of logins
# keeps its connections, a quiet minute gives them back.
OVERFLOW_IDLE = 60.0
# Statements asyncmy keeps prepared per connection: the directory runs six at most.
MYSQL_STATEMENTS = 16
# The URL query options the direct drivers are given; any other goes through SQLAlchemy.
PG_OPTIONS = frozenset({"ssl", "sslmode", "prepared_statement_cache_size"})
MYSQL_OPTIONS = frozenset({"charset", "unix_socket"})


class ReadError(Exception):
    """The database could not answer; the message names the error, never a bound value."""


class Reader(Protocol):
    """Runs the directory's statements. Every failure is a `ReadError`."""

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]: ...

    async def write(self, statement: Statement, values: Mapping[str, Any]) -> None:
        """Run an UPDATE and commit it."""

    def abandoned(self, task: asyncio.Future[Any]) -> None:
        """`task`'s query got no answer in time and was cancelled: start afresh."""

    async def close(self) -> None: ...


def describe(e: BaseException) -> str:
    """The error's class and message (a driver's message names no bound value: the values
    of client input are names, and no password is ever sent to the database)."""
    orig = getattr(e, "orig", None)  # SQLAlchemy's wrapper: the driver's error inside
    if orig is not None:
        return f"{type(e).__name__} ({type(orig).__name__}: {str(orig)[:160]})"
    text = str(e)[:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- statements compiled once -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Compiled:
    """One statement as a driver takes it: SQL text with positional markers, how to build
    the arguments from named values, and the conversions of the result columns."""

    sql: str
    params: tuple[tuple[str, Any, Processor | None], ...]  # (name, default, bind conversion)
    results: tuple[tuple[str, Processor], ...]  # (column, conversion) where there is one

    def args(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, default, convert in self.params:
            value = values.get(name, default)
            out.append(value if convert is None else convert(value))
        return tuple(out)

    def rows(self, names: Sequence[str], raw: Iterable[Sequence[Any]]) -> list[Row]:
        rows = [dict(zip(names, values, strict=True)) for values in raw]
        for row in rows:
            for column, convert in self.results:
                if column in row:
                    row[column] = convert(row[column])
        return rows


def compile_statement(statement: Statement, dialect: Dialect) -> Compiled:
    """SQLAlchemy's compilation for `dialect`, with the type conversions it would apply."""
    compiled = statement.compile(dialect=dialect)
    if dialect.paramstyle not in ("qmark", "format", "numeric_dollar"):
        raise ValueError(f"{dialect.name}: positional parameters expected")
    defaults = compiled.params
    params = []
    for name in compiled.positiontup or ():
        convert = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
        params.append((name, defaults.get(name), convert))
    results: list[tuple[str, Processor]] = []
    if isinstance(statement, Select):
        for name, column in statement.selected_columns.items():
            convert = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if convert is not None:
                results.append((name, convert))
    return Compiled(compiled.string, tuple(params), tuple(results))


class Statements:
    """Each statement compiled once, at its first use, for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        # By identity: statements are long-lived attributes of the directory (the pair keeps
        # the statement alive, so its id is not reused while it is here).
        self._compiled: dict[int, tuple[Statement, Compiled]] = {}

    def __getitem__(self, statement: Statement) -> Compiled:
        found = self._compiled.get(id(statement))
        if found is None:
            found = (statement, compile_statement(statement, self._dialect))
            self._compiled[id(statement)] = found
        return found[1]


# --- connections to a database server ------------------------------------------------------------


class Driver(Protocol):
    """What the pool needs of one driver."""

    async def connect(self) -> Any: ...

    async def run(self, conn: Any, statement: Compiled, args: tuple[Any, ...]) -> list[Row]: ...

    def is_dead(self, e: Exception) -> bool:
        """Whether the connection is unusable after `e` (else it was the query's error)."""

    def abort(self, conn: Any) -> None:
        """Close at once, without waiting for the server."""

    async def close(self, conn: Any) -> None:
        """Say goodbye to the server."""


class _Dead(Exception):
    """A connection failed under a query; the message is `describe` of the cause."""


@dataclass(slots=True)
class _Conn:
    raw: Any
    opened: float  # time.monotonic()
    used: float = 0.0  # when it was last given back


class ServerReader:
    """A `Reader` over connections kept open to a database server.

    At most `size + MAX_OVERFLOW` are open at once (the rest of the lookups wait their
    turn), as with SQLAlchemy's pool; but where that pool closed every connection past `size`
    as it came back, and so opened and closed one (and prepared its statements again) for
    every few logins under load, here one past `size` stays open until it has been idle for
    OVERFLOW_IDLE. Idle connections older than POOL_RECYCLE are closed before use: MySQL drops
    idle ones after wait_timeout, NAT and firewalls after about an hour, and an old one would
    cost a failed try.
    """

    def __init__(self, driver: Driver, dialect: Dialect, size: int) -> None:
        self._driver = driver
        self.statements = Statements(dialect)
        self._size = max(size, 1)
        self._slots = asyncio.Semaphore(self._size + MAX_OVERFLOW)
        self._idle: list[_Conn] = []  # the most recently used last, and taken first
        self._closing: set[asyncio.Task[None]] = set()

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        compiled = self.statements[statement]
        args = compiled.args(values)
        async with self._slots:
            conn = self._take()
            if conn is not None:
                try:
                    return await self._run(conn, compiled, args)
                except _Dead:
                    self.drop_idle()  # as old as the one that died: the server went away
            try:
                conn = _Conn(await self._driver.connect(), time.monotonic())
            except Exception as e:
                raise ReadError(describe(e)) from None
            try:
                return await self._run(conn, compiled, args)
            except _Dead as e:
                raise ReadError(str(e)) from None

    async def write(self, statement: Statement, values: Mapping[str, Any]) -> None:
        await self.fetch(statement, values)  # autocommit: the statement commits itself

    def abandoned(self, task: asyncio.Future[Any]) -> None:
        # The cancelled query closes its own connection; the idle ones may be stuck behind
        # the same frozen server or lost network path.
        self.drop_idle()

    def drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._driver.abort(conn.raw)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._close_later(conn)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=CLOSE_TIMEOUT)

    async def _run(self, conn: _Conn, compiled: Compiled, args: tuple[Any, ...]) -> list[Row]:
        try:
            rows = await self._driver.run(conn.raw, compiled, args)
        except Exception as e:
            if self._driver.is_dead(e):
                self._driver.abort(conn.raw)
                raise _Dead(describe(e)) from None
            self._give_back(conn)
            raise ReadError(describe(e)) from None
        except BaseException:  # cancelled mid-query: its answer may still arrive on it
            self._driver.abort(conn.raw)
            raise
        self._give_back(conn)
        return rows

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.opened < POOL_RECYCLE:
                return conn
            self._close_later(conn)
        return None

    def _give_back(self, conn: _Conn) -> None:
        now = conn.used = time.monotonic()
        self._idle.append(conn)
        # The least recently used is first: past `size`, close it once the load has gone.
        if len(self._idle) > self._size and now - self._idle[0].used > OVERFLOW_IDLE:
            self._close_later(self._idle.pop(0))

    def _close_later(self, conn: _Conn) -> None:
        async def close() -> None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._driver.close(conn.raw)
            except Exception:
                self._driver.abort(conn.raw)

        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


# --- PostgreSQL: asyncpg ------------------------------------------------------------------------

# SQLSTATE classes after which a connection is gone: 08 connection exception, 57P operator
# intervention (admin_shutdown, crash_shutdown, cannot_connect_now). Other server errors
# (a missing table, a bad column) leave the connection usable.
_PG_DEAD_STATES = ("08", "57P")


class PostgresDriver:
    def __init__(self, connect_args: dict[str, Any]) -> None:
        import asyncpg

        self._asyncpg = asyncpg
        self._connect_args = connect_args

    async def connect(self) -> Any:
        return await self._asyncpg.connect(**self._connect_args)

    async def run(self, conn: Any, statement: Compiled, args: tuple[Any, ...]) -> list[Row]:
        records = await conn.fetch(statement.sql, *args)
        if not records:
            return []
        return statement.rows(list(records[0].keys()), (tuple(r.values()) for r in records))

    def is_dead(self, e: Exception) -> bool:
        if isinstance(e, self._asyncpg.PostgresError):
            return str(getattr(e, "sqlstate", "") or "").startswith(_PG_DEAD_STATES)
        return True  # the socket, the protocol or the driver itself: not the query's fault

    def abort(self, conn: Any) -> None:
        conn.terminate()

    async def close(self, conn: Any) -> None:
        await conn.close(timeout=CLOSE_TIMEOUT)


# --- MariaDB / MySQL: asyncmy ---------------------------------------------------------------------

# Errors the server sends over a connection it is about to close (or has): ER_SERVER_SHUTDOWN,
# ER_NORMAL_SHUTDOWN, ER_CONNECTION_KILLED (MariaDB), ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8).
_MYSQL_DEAD_SERVER_ERRORS = frozenset({1053, 1077, 1927, 4031})


class MysqlDriver:
    def __init__(self, connect_args: dict[str, Any]) -> None:
        import asyncmy
        import asyncmy.errors

        self._asyncmy = asyncmy
        self._errors = asyncmy.errors
        self._connect_args = connect_args

    async def connect(self) -> Any:
        # Autocommit: a read then holds no snapshot and no transaction between lookups, so no
        # ROLLBACK is owed, and a connection kept open sees every commit at once.
        return await self._asyncmy.connect(
            **self._connect_args, autocommit=True, stmt_cache_size=MYSQL_STATEMENTS
        )

    async def run(self, conn: Any, statement: Compiled, args: tuple[Any, ...]) -> list[Row]:
        cursor = conn.cursor()
        await cursor.execute(statement.sql, args)
        if cursor.description is None:  # the UPDATE
            return []
        names = [column[0] for column in cursor.description]
        return statement.rows(names, await cursor.fetchall())

    def is_dead(self, e: Exception) -> bool:
        errors = self._errors
        if isinstance(e, errors.MySQLError) and not isinstance(e, errors.InterfaceError):
            code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
            # 1000-1999 and 3000+ are the server's own errors about the statement; 2000-2999
            # are the client library's (lost connection, server gone away ...).
            server_error = code >= 1000 and not 2000 <= code < 3000
            return not server_error or code in _MYSQL_DEAD_SERVER_ERRORS
        return True

    def abort(self, conn: Any) -> None:
        conn.close()

    async def close(self, conn: Any) -> None:
        await conn.ensure_closed()


# --- through SQLAlchemy's engine, as before ----------------------------------------------------


class EngineReader:
    """A `Reader` over a SQLAlchemy engine: for drivers and URL options the direct path does
    not know. Each lookup checks out a pooled connection (with a ping) and returns it (with a
    ROLLBACK). After an error that is not the query's own, the pool is thrown away so the next
    lookup reconnects."""

    def __init__(self, url: str, pool_size: int) -> None:
        self._url, self._pool_size = url, pool_size
        self._engine: AsyncEngine | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        return await self._on_engine(statement, values, write=False)

    async def write(self, statement: Statement, values: Mapping[str, Any]) -> None:
        await self._on_engine(statement, values, write=True)

    async def _on_engine(
        self, statement: Statement, values: Mapping[str, Any], *, write: bool
    ) -> list[Row]:
        if self._engine is None:
            self._engine = make_engine(self._url, self._pool_size)
        engine = self._engine
        try:
            async with engine.begin() if write else engine.connect() as conn:
                result = await conn.execute(statement, dict(values))
                return [dict(row) for row in result.mappings().all()] if not write else []
        except ProgrammingError as e:  # a broken query is not a broken pool
            raise ReadError(describe(e)) from None
        except Exception as e:
            self._retire(engine, None)
            raise ReadError(describe(e)) from None

    def abandoned(self, task: asyncio.Future[Any]) -> None:
        if self._engine is not None:
            self._retire(self._engine, task)

    async def close(self) -> None:
        if self._engine is not None:
            self._retire(self._engine, None)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=2 * CLOSE_TIMEOUT)

    def _retire(self, engine: AsyncEngine, task: asyncio.Future[Any] | None) -> None:
        """Forget the pool; close it once its stuck query (if any) has let go."""
        if self._engine is engine:
            self._engine = None

        async def close() -> None:
            if task is not None:
                await asyncio.wait((task,), timeout=CLOSE_TIMEOUT)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await dispose(engine)

        closing = asyncio.ensure_future(close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


# --- which reader for a URL -------------------------------------------------------------------


def parse_url(url: str) -> Any:
    """The URL as SQLAlchemy reads it, with the options the direct drivers take checked. A
    ValueError says what is wrong but never shows the URL, which holds the password (make_url's
    own errors quote it, or the part around a bad port)."""
    full = engine_url(url)  # its ValueError names the scheme only
    try:
        parsed = make_url(full)
    except Exception as e:  # an ArgumentError, or int() of a bad port
        what = type(e).__name__
        raise ValueError(
            f"not a database URL SQLAlchemy can read ({what}: is the port a number, are @ : /"
            " in the password %-escaped?); the URL is not shown, it holds the password"
        ) from None
    size = parsed.query.get("prepared_statement_cache_size")
    if size is not None and not (isinstance(size, str) and size.isascii() and size.isdigit()):
        raise ValueError("prepared_statement_cache_size must be a whole number, given once")
    return parsed


def open_reader(url: str, pool_size: int, query_timeout: float) -> Reader:
    """The reader for the directory's URL; call it in the event loop that will use it (the
    drivers bind their sockets to it). Makes no connection."""
    scheme = url.partition("://")[0]
    parsed = parse_url(url)
    options = set(parsed.query)
    backend, _, driver = scheme.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite") and not options:
        database = parsed.database or ""
        if database and database != ":memory:":
            from mailgate.auth.sqlite_read import SqliteReader

            return SqliteReader(database, query_timeout)
    postgres = backend in ("postgresql", "postgres") and driver in ("", "asyncpg")
    if postgres and options <= PG_OPTIONS and _importable("asyncpg"):
        return _postgres(parsed, pool_size, query_timeout)
    mysql = backend in ("mysql", "mariadb") and driver in ("", "asyncmy")
    if mysql and options <= MYSQL_OPTIONS:
        if _importable("asyncmy"):
            return _mysql(parsed, pool_size, query_timeout)
        if not driver:
            log.warning(
                "directory: asyncmy cannot be imported, so lookups go through SQLAlchemy and"
                " aiomysql, three round trips each: pip install asyncmy"
            )
    return EngineReader(url, pool_size)


def _importable(module: str) -> bool:
    """Imported, not merely found: an install that cannot load (a C extension built for
    another Python) must take the engine's path, not fail every login's lookup."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _postgres(parsed: Any, pool_size: int, query_timeout: float) -> Reader:
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    args: dict[str, Any] = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "database": parsed.database,
        "timeout": query_timeout,
    }
    ssl = parsed.query.get("ssl") or parsed.query.get("sslmode")
    if ssl:
        args["ssl"] = ssl
    # 0 behind PgBouncer's transaction pooling before 1.21, where a statement prepared on one
    # server connection is unknown on the next: unnamed statements then, a round trip more
    # per lookup. SQLAlchemy's asyncpg dialect knows the option too (its own cache), so the
    # admin CLI accepts the same URL.
    if "prepared_statement_cache_size" in parsed.query:  # checked by parse_url
        args["statement_cache_size"] = int(parsed.query["prepared_statement_cache_size"])
    return ServerReader(PostgresDriver(args), dialect(), pool_size)  # type: ignore[no-untyped-call]


def _mysql(parsed: Any, pool_size: int, query_timeout: float) -> Reader:
    from sqlalchemy.dialects.mysql.asyncmy import dialect

    args: dict[str, Any] = {
        "host": parsed.host or "localhost",
        "port": parsed.port or 3306,
        "user": parsed.username,
        "password": parsed.password or "",
        "database": parsed.database,
        # utf8mb4: the names the directory binds are Unicode (U-labels, accents).
        "charset": parsed.query.get("charset", "utf8mb4"),
        "connect_timeout": query_timeout,
    }
    if "unix_socket" in parsed.query:
        args["unix_socket"] = parsed.query["unix_socket"]
    return ServerReader(MysqlDriver(args), dialect(), pool_size)
