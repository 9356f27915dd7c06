"""The directory's connections to real MariaDB and PostgreSQL servers, as the server sees them.

- Round trips per login, counted by the server itself: MariaDB's global status (Questions,
  which counts COM_STMT_EXECUTE too, + Com_admin_commands = pings + Com_stmt_prepare);
  PostgreSQL's log with log_min_duration_statement = 0 (a `parse`, an `execute` or a simple
  `statement` line per request that waits for the server's answer). A login on mailgate's
  schema is one statement, an app-password login two, a login on the seed's schema its two
  queries; no pings, no ROLLBACK, no reconnects.
- The rows are what SQLAlchemy returns for the same statement (types included).
- A connection the server dropped (KILL, pg_terminate_backend) costs no login: the lookup is
  run again on a fresh connection.
- A server killed and started again under a loop of logins: temporary failures while it is
  down, never a wrong password, and every login started after it is back succeeds, without
  making a new directory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import signal
import time
from collections.abc import Iterator

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from integration.test_directory_sqlite import (
    CAROL_PW,
    FAILED,
    SEED_DDL,
    SEED_QUERIES,
    Env,
    add_app,
    env,
    list_app,
    populate,
    route,
    run,
    sql,
    wipe,
)
from integration.test_sqlread import same_rows_as_sqlalchemy
from mailgate.values import Reject, Route, TempFail

from .test_directory_sql import QUERY_TIMEOUT, SLACK, Server, server  # noqa: F401 (a fixture)

DATABASE = "mailgate_directory"
LOGINS = 30  # counted per kind of login; the counts are exact, so a few dozen suffice
MARIADB_COUNTERS = ("Questions", "Com_admin_commands", "Com_stmt_prepare", "Com_rollback",
                    "Com_commit", "Connections")  # fmt: skip
PG_REQUEST = re.compile(r"duration: [\d.]+ ms {2}(parse|execute|statement)\b")
NAMED = re.compile(r"(parse|execute) (?!<unnamed>)\S+:")
LOG_WAIT = 10.0  # for PostgreSQL's log to show the end marker


@pytest.fixture(params=["mariadb", "postgresql"])
def database(request: pytest.FixtureRequest) -> tuple[str, peers.Peer, str]:
    """(kind, the session's server, the URL of an empty database on it)."""
    from .test_directory_sql import create_mariadb_database, create_postgres_database

    peer: peers.Peer = request.getfixturevalue("mariadb" if request.param == "mariadb"
                                               else "postgres")  # fmt: skip
    create = create_mariadb_database if request.param == "mariadb" else create_postgres_database
    return request.param, peer, create(peer)


# --- counting what the server is asked --------------------------------------------------------


def mariadb_counters(peer: peers.Peer) -> dict[str, int]:
    names = ", ".join(f"'{n}'" for n in MARIADB_COUNTERS)
    out = peers.mariadb_sql(peer, f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names})")
    return {name: int(value) for name, value in (line.split("\t") for line in out.splitlines())}


class MariaDbRequests:
    """Requests that wait for an answer, between two readings of the server's counters."""

    def __init__(self, peer: peers.Peer) -> None:
        self.peer = peer
        first, _, third = (mariadb_counters(peer) for _ in range(3))
        self.reading = {k: (third[k] - first[k]) / 2 for k in first}  # what a reading adds

    @contextlib.contextmanager
    def count(self) -> Iterator[dict[str, float]]:
        found: dict[str, float] = {}
        before = mariadb_counters(self.peer)
        yield found
        after = mariadb_counters(self.peer)
        found.update({k: after[k] - before[k] - self.reading[k] for k in after})
        found["round_trips"] = (
            found["Questions"] + found["Com_admin_commands"] + found["Com_stmt_prepare"]
        )


class PostgresRequests:
    """Requests logged by the server between two markers (log_min_duration_statement = 0
    logs the parse, bind and execute steps of the extended protocol and simple statements)."""

    def __init__(self, peer: peers.Peer) -> None:
        self.peer = peer
        self.marks = 0

    def _mark(self) -> str:
        self.marks += 1
        mark = f"mailgate-mark-{self.marks}-{time.monotonic_ns()}"
        peers.postgres_sql(self.peer, f"SELECT '{mark}'")
        return mark

    @contextlib.contextmanager
    def count(self) -> Iterator[dict[str, float]]:
        found: dict[str, float] = {}
        start = self._mark()
        yield found
        end = self._mark()
        deadline = time.monotonic() + LOG_WAIT
        while end not in (text := self.peer.log_path.read_text(errors="replace")):
            assert time.monotonic() < deadline, "the end marker never reached the log"
            time.sleep(0.05)
        section = text[text.index(start) : text.index(end)].splitlines()[1:-1]
        kinds = collections.Counter(m[1] for line in section if (m := PG_REQUEST.search(line)))
        found.update(kinds)
        found["round_trips"] = float(sum(kinds.values()))
        found["transactions"] = float(sum("BEGIN" in line or "ROLLBACK" in line
                                          for line in section))  # fmt: skip
        # Statements prepared under a name, which live on the server connection (asyncpg's
        # cache); an unnamed one is logged as "parse <unnamed>".
        found["named"] = float(sum(bool(NAMED.search(line)) for line in section))


@contextlib.contextmanager
def requests_of(kind: str, peer: peers.Peer) -> Iterator[MariaDbRequests | PostgresRequests]:
    if kind == "mariadb":
        yield MariaDbRequests(peer)
        return
    setting = "log_min_duration_statement"
    peers.postgres_sql(peer, f"ALTER SYSTEM SET {setting} = 0")
    peers.postgres_sql(peer, "SELECT pg_reload_conf()")
    try:
        yield PostgresRequests(peer)
    finally:
        peers.postgres_sql(peer, f"ALTER SYSTEM RESET {setting}")
        peers.postgres_sql(peer, "SELECT pg_reload_conf()")


async def logins(e: Env, n: int, *attempts: tuple[str, str]) -> list[object]:
    """`n` logins of each of `attempts`, one after the other."""
    return [await e.auth(user, password) for _ in range(n) for user, password in attempts]


def per_login(found: dict[str, float], n: int) -> float:
    return found["round_trips"] / n


# --- round trips ------------------------------------------------------------------------------


def test_a_login_on_mailgates_schema_is_one_round_trip(
    database: tuple[str, peers.Peer, str],
) -> None:
    kind, peer, url = database

    async def scenario() -> None:
        await populate(url)
        with requests_of(kind, peer) as db:
            # Opened after the server logs statements: a PostgreSQL backend reads its settings
            # at start (one already open would log from its next command, a moment later).
            async with env(url, cache_ttl=0) as e:
                right, wrong = ("carol@example.com", CAROL_PW), ("carol@example.com", "wrong")
                unknown = ("nobody@example.com", "x")
                await logins(
                    e, 2, right, wrong, unknown
                )  # the first login reads the dummies' sample
                with db.count() as found:
                    decisions = await logins(e, LOGINS, right, wrong, unknown)
                assert sum(isinstance(d, Route) for d in decisions) == LOGINS
                assert sum(d == FAILED for d in decisions) == 2 * LOGINS
                # One statement per login, whoever logs in: no ping, no ROLLBACK, no reconnect.
                assert per_login(found, 3 * LOGINS) == 1.0, found
                if kind == "mariadb":
                    assert found["Com_admin_commands"] == found["Com_rollback"] == 0, found
                    assert found["Connections"] == found["Com_stmt_prepare"] == 0, found
                else:
                    assert found["execute"] == 3 * LOGINS and found["transactions"] == 0, found

                # An app password costs one query more, and only when it is used. Once any
                # user is seen to have one, a wrong password pays that query too, whoever
                # logs in (the same work for every user); a right password is still one.
                dave = ("dave@example.org", "dave-app")
                await add_app(e.engine, dave[0], "phone", ["imap"], dave[1])
                await logins(e, 2, dave, wrong)
                while (await list_app(url, dave[0]))[0].last_used_at is None:
                    await asyncio.sleep(0.05)  # its last use is written in the background
                with db.count() as found:
                    decisions = await logins(e, LOGINS, dave)
                assert all(route(d).credential_label == "phone" for d in decisions)
                assert per_login(found, LOGINS) == 2.0, found
                with db.count() as found:
                    decisions = await logins(e, LOGINS, right, wrong)
                assert decisions[:2] == [decisions[0], FAILED] and isinstance(decisions[0], Route)
                assert per_login(found, 2 * LOGINS) == 1.5, found  # right 1, wrong 2

    run(scenario())


def test_a_login_on_the_seeds_schema_is_its_two_queries(
    database: tuple[str, peers.Peer, str],
) -> None:
    kind, peer, url = database

    async def scenario() -> None:
        await wipe(url)
        await sql(url, *SEED_DDL)
        await sql(url, "INSERT INTO users VALUES ('bob@example.com', 'bob-clear')")
        await sql(url, "INSERT INTO transport VALUES ('example.com', 'smtp:10.0.0.5')")
        with requests_of(kind, peer) as db:
            async with env(url, queries=SEED_QUERIES, cache_ttl=0) as e:
                right, unknown = ("bob@example.com", "bob-clear"), ("nobody@example.com", "x")
                await logins(e, 2, right, unknown)
                with db.count() as found:
                    decisions = await logins(e, LOGINS, right, unknown)
                assert [isinstance(d, Route) for d in decisions] == [True, False] * LOGINS
                # The seed's script: a ping and its two SELECTs; here the two SELECTs only.
                assert per_login(found, 2 * LOGINS) == 2.0, found

    run(scenario())


def test_behind_pgbouncer_no_statement_outlives_its_lookup(postgres: peers.Peer) -> None:
    """?prepared_statement_cache_size=0, for PgBouncer's transaction pooling before 1.21 (the
    next lookup may get another server connection, where a named statement is unknown):
    asyncpg's cache is off, so every lookup prepares its statement unnamed, as a round trip
    of its own. Without the option, the statement is prepared under a name once."""
    from .test_directory_sql import create_postgres_database

    url = create_postgres_database(postgres)

    async def scenario() -> None:
        await populate(url)
        right, wrong = ("carol@example.com", CAROL_PW), ("carol@example.com", "wrong")
        with requests_of("postgresql", postgres) as db:
            for query, named in (("?prepared_statement_cache_size=0", False), ("", True)):
                async with env(url + query, cache_ttl=0) as e:
                    await logins(e, 2, right, wrong)
                    with db.count() as found:
                        decisions = await logins(e, LOGINS, right, wrong)
                assert [isinstance(d, Route) for d in decisions] == [True, False] * LOGINS
                assert (found["named"] > 0) is named, (query, found)
                if not named:
                    assert found["parse"] >= 2 * LOGINS, found

    run(scenario())


def test_rows_are_what_sqlalchemy_returns(database: tuple[str, peers.Peer, str]) -> None:
    """asyncpg, and asyncmy's binary protocol, against SQLAlchemy on its own drivers."""
    run(same_rows_as_sqlalchemy(database[2]))


# --- connections the server dropped --------------------------------------------------------------


def drop_directory_connections(kind: str, peer: peers.Peer) -> int:
    """Kill, on the server, every connection of the directory's database; returns how many."""
    if kind == "mariadb":
        ids = peers.mariadb_sql(peer, "SELECT id FROM information_schema.processlist"
                                f" WHERE db = '{DATABASE}'").split()  # fmt: skip
        for connection_id in ids:
            with contextlib.suppress(Exception):  # it may be gone already
                peers.mariadb_sql(peer, f"KILL {int(connection_id)}")
        return len(ids)
    mine = f"datname = '{DATABASE}' AND pid <> pg_backend_pid()"
    out = peers.postgres_sql(
        peer, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {mine}"
    )
    return len(out.split())


def test_a_connection_the_server_dropped_costs_no_login(
    database: tuple[str, peers.Peer, str],
) -> None:
    kind, peer, url = database

    async def scenario() -> None:
        await populate(url)
        async with env(url, cache_ttl=0, pool_size=3) as e:
            # Three lookups at once: three pooled connections.
            await asyncio.gather(*(e.auth("carol@example.com", CAROL_PW) for _ in range(3)))
            await e.auth("carol@example.com", CAROL_PW)
            for _ in range(2):  # twice: the fresh connections of the first time work too
                assert drop_directory_connections(kind, peer) >= 1
                route(await e.auth("carol@example.com", CAROL_PW))  # not a TempFail
                assert await e.auth("carol@example.com", "wrong") == FAILED

    run(scenario())


# --- a restart under load ---------------------------------------------------------------------


def kill(s: Server) -> None:
    """SIGKILL: no goodbye to the clients, as a crash or an OOM kill."""
    s.signal(signal.SIGKILL)
    assert s.peer is not None
    s.stop()  # reaps it and removes what it leaves


def test_a_server_killed_and_started_again_under_a_login_loop(
    server: Server,  # noqa: F811 (the fixture imported above)
) -> None:
    s = server
    clients = 4
    outcomes: list[tuple[float, float, str, object]] = []  # (start, end, password, decision)
    marks: dict[str, float] = {}

    async def client(e: Env, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            password = CAROL_PW if n % 3 else "wrong"
            start = time.monotonic()
            decision = await e.auth("carol@example.com", password)
            outcomes.append((start, time.monotonic(), password, decision))
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        await populate(s.url)
        async with env(s.url, cache_ttl=0, query_timeout=QUERY_TIMEOUT, pool_size=2) as e:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(client(e, stop)) for _ in range(clients)]
            await asyncio.sleep(0.5)
            marks["killing"] = time.monotonic()
            await asyncio.to_thread(kill, s)
            marks["killed"] = time.monotonic()
            await asyncio.sleep(0.5)
            marks["starting"] = time.monotonic()
            await asyncio.to_thread(s.start)  # the same port
            if s.kind == "postgresql":  # a new cluster: the data went with the old one
                await populate(s.url)
            marks["back"] = time.monotonic()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)

    run(scenario())
    before = [d for start, end, _, d in outcomes if end < marks["killing"]]
    during = [
        d for start, end, _, d in outcomes if marks["killed"] < start < end < marks["starting"]
    ]
    after = [(pw, d) for start, _, pw, d in outcomes if start > marks["back"]]
    assert before and all(isinstance(d, Route | Reject) for d in before)
    # While it is down: temporary failures, answered in time, never "wrong password".
    assert during and all(isinstance(d, TempFail) for d in during), collections.Counter(
        type(d).__name__ for d in during
    )
    assert all(end - start < QUERY_TIMEOUT + SLACK for start, end, _, _ in outcomes)
    # Back: every login started since is answered as before, by the same directory.
    assert len(after) >= clients
    for password, decision in after:
        if password == CAROL_PW:
            route(decision)  # type: ignore[arg-type]
        else:
            assert decision == FAILED, decision
    # The right password is never refused; but a new PostgreSQL cluster is empty until it is
    # filled again, and meanwhile carol is rightly unknown.
    refilling = (marks["starting"], marks["back"]) if s.kind == "postgresql" else (0.0, 0.0)
    for start, end, password, decision in outcomes:
        if password == CAROL_PW and not (refilling[0] < end and start < refilling[1]):
            assert not isinstance(decision, Reject), decision
