"""The directory's reads on SQLite: on the event loop while that is bounded, else in a thread.

A lookup in the directory's file costs about 15 µs of CPU with the standard library's sqlite3;
handing it to a thread and its answer back costs some 55 µs more, in futex and wake-up system
calls (aiosqlite hands every call of a query over on its own: 145 futex per login). So a read
runs on the event loop, as one synchronous call, within two bounds that keep it from holding
up the other sessions:

- a busy timeout of 0: when a writer (the admin CLI) holds the lock that a read needs, the
  read does not wait for it: SQLite answers SQLITE_BUSY at once;
- a CPU budget of LOOP_BUDGET, checked by a progress handler every PROGRESS_STEP virtual
  machine instructions: an operator's `[directory.queries]` that scans a large table is
  interrupted there.

Either way the read is run again in the reader's own thread, on a connection of its own that
waits for locks up to query_timeout and is interrupted when the directory gives up on the
lookup; lookups queued behind it that were given up meanwhile are skipped, not run. Writes
(an app password's last use) always go to the thread: a commit waits for the disk.

What the loop may still wait for is the disk itself, the first time a page of the file is
read: the file is read at every login, so its pages stay in the page cache. Put the file on
local storage (a directory on network storage should be a database server anyway).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.dialects.sqlite.pysqlite import dialect as sqlite_dialect

from mailgate.auth.schema import POOL_RECYCLE
from mailgate.auth.sqlread import (
    CLOSE_TIMEOUT,
    Compiled,
    ReadError,
    Row,
    Statement,
    Statements,
    describe,
)

# CPU a read may spend on the event loop before it is moved to the thread: 1 ms is some 60
# lookups' worth of the directory's own query and a tenth of a busy worker's login budget.
LOOP_BUDGET = 0.001
# How much longer than query_timeout the thread's connection waits for a lock (see above).
BUSY_MARGIN = 0.5
# How often SQLite calls the budget check: an indexed lookup takes a few hundred
# instructions, so it finishes before the first check; a scan is checked every ~50 µs.
PROGRESS_STEP = 1000
# Errors that mean "not now" rather than "not possible": the read is run in the thread.
_RETRY_IN_THREAD = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_INTERRUPT})


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ABANDONED = "abandoned"


class _Abandoned(Exception):
    """The job was given up on before the thread reached it."""


class _Job:
    """One call for the thread, which the event loop may give up on at any time."""

    __slots__ = ("call", "lock", "state")

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.lock = threading.Lock()
        self.state = _State.QUEUED

    def run(self) -> Any:  # in the thread
        with self.lock:
            if self.state is _State.ABANDONED:
                raise _Abandoned
            self.state = _State.RUNNING
        try:
            return self.call()
        finally:
            with self.lock:
                self.state = _State.DONE

    def abandon(self, conn: sqlite3.Connection | None) -> None:  # on the loop
        with self.lock:  # so the interrupt cannot reach the thread's next job
            if self.state is _State.RUNNING and conn is not None:
                conn.interrupt()
            if self.state is _State.QUEUED:
                self.state = _State.ABANDONED


class SqliteReader:
    """A `Reader` over one SQLite file (auth/sqlread.py), for one event loop."""

    def __init__(self, path: str, query_timeout: float) -> None:
        self._path = path
        # The thread's wait for a writer's lock: past query_timeout, so that the directory's
        # own timeout is what gives up (one reason in the log, "no answer in N s", and the
        # thread's connection interrupted), not SQLite's busy handler a moment before it.
        self._busy_timeout = query_timeout + BUSY_MARGIN
        self.statements = Statements(sqlite_dialect())
        self._loop_conn: sqlite3.Connection | None = None
        self._loop_opened = 0.0
        self._deadline = 0.0  # of the read running on the loop, on time.perf_counter()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "mailgate-sqlite")
        self._thread_conn: sqlite3.Connection | None = None  # opened and used in the thread
        self._thread_opened = 0.0

    async def fetch(self, statement: Statement, values: Mapping[str, Any]) -> list[Row]:
        compiled = self.statements[statement]
        args = compiled.args(values)
        try:
            return self._read_on_loop(compiled, args)
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF not in _RETRY_IN_THREAD:
                self._close_loop_conn()
                raise ReadError(describe(e)) from None
        except sqlite3.Error as e:
            self._close_loop_conn()  # opened again at the next read (a replaced file ...)
            raise ReadError(describe(e)) from None
        return await self._in_thread(lambda: self._run_in_thread(compiled, args))

    async def write(self, statement: Statement, values: Mapping[str, Any]) -> None:
        compiled = self.statements[statement]
        args = compiled.args(values)
        await self._in_thread(lambda: self._run_in_thread(compiled, args))

    def abandoned(self, task: asyncio.Future[Any]) -> None:
        """Nothing to do: the cancelled lookup abandons (or interrupts) its own job."""

    async def close(self) -> None:
        self._close_loop_conn()
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._thread, self._close_thread_conn)
        self._thread.shutdown(wait=False)
        await asyncio.wait((done,), timeout=CLOSE_TIMEOUT)

    # --- on the event loop --------------------------------------------------------------------

    def _read_on_loop(self, compiled: Compiled, args: tuple[Any, ...]) -> list[Row]:
        now = time.monotonic()
        conn = self._loop_conn
        if conn is None or now - self._loop_opened > POOL_RECYCLE:
            self._close_loop_conn()
            conn = self._loop_conn = _connect(self._path, busy_timeout=0.0)
            conn.set_progress_handler(self._over_budget, PROGRESS_STEP)
            self._loop_opened = now
        self._deadline = time.perf_counter() + LOOP_BUDGET
        return _read(conn, compiled, args)

    def _over_budget(self) -> bool:
        return time.perf_counter() > self._deadline

    def _close_loop_conn(self) -> None:
        conn, self._loop_conn = self._loop_conn, None
        if conn is not None:
            conn.close()

    async def _in_thread(self, call: Callable[[], list[Row]]) -> list[Row]:
        job = _Job(call)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, job.run)
        except asyncio.CancelledError:
            job.abandon(self._thread_conn)
            raise
        except sqlite3.Error as e:
            raise ReadError(describe(e)) from None

    # --- in the thread -------------------------------------------------------------------------

    def _run_in_thread(self, compiled: Compiled, args: tuple[Any, ...]) -> list[Row]:
        now = time.monotonic()
        if self._thread_conn is None or now - self._thread_opened > POOL_RECYCLE:
            self._close_thread_conn()
            self._thread_conn = _connect(self._path, busy_timeout=self._busy_timeout)
            self._thread_opened = now
        try:
            return _read(self._thread_conn, compiled, args)
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xFF not in _RETRY_IN_THREAD:
                self._close_thread_conn()
            raise
        except sqlite3.Error:
            self._close_thread_conn()
            raise

    def _close_thread_conn(self) -> None:
        conn, self._thread_conn = self._thread_conn, None
        if conn is not None:
            conn.close()


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: autocommit, so no read leaves a transaction (and its lock) open.
    # check_same_thread=False: the loop interrupts the thread's connection.
    return sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )


def _read(conn: sqlite3.Connection, compiled: Compiled, args: tuple[Any, ...]) -> list[Row]:
    """Run the statement and read every row: the statement is then reset, and its lock let go."""
    cursor = conn.execute(compiled.sql, args)
    try:
        raw = cursor.fetchall()
        names = [column[0] for column in cursor.description or ()]
    finally:
        cursor.close()
    return compiled.rows(names, raw) if names else []
