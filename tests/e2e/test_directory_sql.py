"""The directory's behaviour suite on real MariaDB and PostgreSQL (and SQLite again), and outages.

The suites are `DirectoryBehaviour` from tests/integration/test_directory_sqlite.py and
`NamesBehaviour` (spellings, collations, the version 3 migration) from
tests/integration/test_directory_names.py, unchanged:
each test starts by dropping every table of its database, so one database per module and
server is enough. The outage tests run their own servers, which they freeze and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from integration.test_directory_names import (
    ACCENT_VARIANTS,
    SAME_AS_VICTIM,
    SEED_QUERIES_WITH_USER,
    VICTIM,
    VICTIM_PW,
    NamesBehaviour,
    lock_out,
    throttled_over,
    try_each,
)
from integration.test_directory_sqlite import (
    CAROL_PW,
    FAILED,
    SEED_DDL,
    DirectoryBehaviour,
    Env,
    env,
    populate,
    route,
    run,
    sql,
    wipe,
)
from mailgate.values import Decision, TempFail

from .conftest import require

DATABASE = "mailgate_directory"
# Logins during an outage must be answered within query_timeout; the slack absorbs a busy
# 2-core CI machine's scheduling, not any waiting of ours.
QUERY_TIMEOUT = 1.0
SLACK = 1.5
# How long a frozen server's threads may take to stop; /proc's states of a stopped thread
# (or one that is exiting).
STOP_WAIT = 10.0
STOPPED_STATES = frozenset({"T", "t", "Z", "X"})


def mariadb_url(peer: peers.Peer) -> str:
    return f"mysql://root@127.0.0.1:{peer.ports['mysql']}/{DATABASE}"


def postgres_url(peer: peers.Peer) -> str:
    return f"postgresql://postgres@127.0.0.1:{peer.ports['postgres']}/{DATABASE}"


def create_mariadb_database(peer: peers.Peer) -> str:
    peers.mariadb_sql(
        peer,
        f"DROP DATABASE IF EXISTS {DATABASE}; CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4",
    )
    return mariadb_url(peer)


def create_postgres_database(peer: peers.Peer) -> str:
    peers.postgres_sql(peer, f"DROP DATABASE IF EXISTS {DATABASE}")
    peers.postgres_sql(peer, f"CREATE DATABASE {DATABASE}")
    return postgres_url(peer)


@pytest.fixture(scope="module")
def mariadb_database(mariadb: peers.Peer) -> str:
    return create_mariadb_database(mariadb)


@pytest.fixture(scope="module")
def postgresql_database(postgres: peers.Peer) -> str:
    return create_postgres_database(postgres)


class TestSqlDirectory(DirectoryBehaviour):
    @pytest.fixture(params=["sqlite", "mariadb", "postgresql"])
    def db_url(self, request: pytest.FixtureRequest, tmp_path: Path) -> str:
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / 'directory.db'}"
        return str(request.getfixturevalue(f"{request.param}_database"))


class TestSqlNames(NamesBehaviour):
    """SQLite runs in tests/integration; here the two servers whose collations differ."""

    @pytest.fixture(params=["mariadb", "postgresql"])
    def db_url(self, request: pytest.FixtureRequest) -> str:
        return str(request.getfixturevalue(f"{request.param}_database"))


def test_on_a_folding_collation_the_lock_out_follows_the_matched_user(
    request: pytest.FixtureRequest, mariadb_database: str
) -> None:
    """The seed's tables on a folding collation, with `email AS "user"`: every spelling the
    database matches must meet the victim's lock-out: the throttle counts the identity the
    directory matched as well as the name the client sent."""

    async def scenario() -> None:
        await wipe(mariadb_database)
        await sql(mariadb_database, *SEED_DDL)
        await sql(mariadb_database, "INSERT INTO users VALUES (:u, :p)", u=VICTIM, p=VICTIM_PW)
        await sql(mariadb_database, "INSERT INTO transport VALUES ('example.com', 'smtp:h')")
        async with env(mariadb_database, queries=SEED_QUERIES_WITH_USER) as e:
            throttled = throttled_over(e.directory)
            await lock_out(throttled)
            names = SAME_AS_VICTIM + ACCENT_VARIANTS
            for name, decision in zip(names, await try_each(throttled, names, VICTIM_PW),
                                      strict=True):  # fmt: skip
                assert decision == FAILED, repr(name)

    run(scenario())


# --- outages --------------------------------------------------------------------------------------


class Server:
    """A database server of our own that the test may freeze, thaw, stop and start again."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind, self.workdir, self.port = kind, workdir, peers.free_port()
        self.peer: peers.Peer | None = None
        self.url = ""

    def start(self) -> None:
        """Start on the same port as before. PostgreSQL comes back empty (a new cluster)."""
        if self.kind == "mariadb":  # keeps its data directory across restarts
            self.peer = peers.start_mariadb(self.workdir, self.port, "mariadb-outage")
            self.url = self.url or create_mariadb_database(self.peer)
        else:
            self.peer = peers.start_postgres(self.workdir, self.port, "postgres-outage")
            self.url = create_postgres_database(self.peer)

    def stop(self) -> None:
        assert self.peer is not None
        self.peer.stop()

    def signal(self, sig: signal.Signals) -> None:
        """To the server and its children: PostgreSQL serves each connection from a child
        that calls setsid(), so signalling the process group would miss them. SIGSTOP returns
        once every thread has stopped: kill() returns before that, and mariadbd's threads
        stop only when the one the kernel handed the signal to gets the CPU, while its
        connection threads may still answer a query (on a busy machine, one time in a few
        dozen: the lookup then got a Route during the "outage")."""
        assert self.peer is not None
        pids = [self.peer.pid, *children(self.peer.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            deadline = time.monotonic() + STOP_WAIT
            while not all(stopped(pid) for pid in pids):
                assert time.monotonic() < deadline, f"{self.kind} did not stop"
                time.sleep(0.001)


def stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (or gone)."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] not in STOPPED_STATES:
                return False
    return True


def children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found


@pytest.fixture(params=["mariadb", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "mariadb":
        require("mariadbd", "mariadb-install-db", "mariadb")
    else:
        require(peers.postgres_bin("initdb") or "initdb", "psql")
    s = Server(request.param, tmp_path)
    s.start()
    try:
        yield s
    finally:
        if s.peer is not None:
            if s.peer.alive():
                s.signal(signal.SIGCONT)  # never leave a frozen server behind
            s.stop()


async def timed(pending: Awaitable[Decision]) -> tuple[Decision, float]:
    start = time.monotonic()
    decision = await pending
    return decision, time.monotonic() - start


def test_outage_gives_tempfail_in_time_and_the_same_directory_recovers(server: Server) -> None:
    async def during_outage(e: Env, what: str) -> None:
        # Right password, wrong password and unknown user: all temporary, none a Reject.
        for user, password in (
            ("carol@example.com", CAROL_PW),
            ("carol@example.com", "wrong"),
            ("nobody@example.com", "x"),
        ):
            decision, elapsed = await timed(e.auth(user, password))
            assert isinstance(decision, TempFail), (what, user, decision)
            assert elapsed < QUERY_TIMEOUT + SLACK, (what, elapsed)

    async def scenario() -> None:
        await populate(server.url)
        async with env(server.url, query_timeout=QUERY_TIMEOUT) as e:
            route(await e.auth("carol@example.com", CAROL_PW))  # a pooled connection exists

            server.signal(signal.SIGSTOP)  # frozen: connections open, no answers
            try:
                await during_outage(e, "frozen")
            finally:
                server.signal(signal.SIGCONT)
            route(await e.auth("carol@example.com", CAROL_PW))

            await asyncio.to_thread(server.stop)  # down: connections refused
            await during_outage(e, "stopped")
            await asyncio.to_thread(server.start)
            if server.kind == "postgresql":
                await populate(server.url)  # a new cluster: the data went with the old one
            route(await e.auth("carol@example.com", CAROL_PW))
            assert await e.auth("carol@example.com", "wrong") == FAILED

    asyncio.run(scenario())
