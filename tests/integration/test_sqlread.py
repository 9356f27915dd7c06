"""The directory's read path (auth/sqlread.py, auth/sqlite_read.py) on a real SQLite file.

- Each URL gets the reader it should: the drivers themselves for SQLite, PostgreSQL (asyncpg)
  and MariaDB/MySQL (asyncmy), SQLAlchemy's engine for any other driver or URL option.
- The rows are what SQLAlchemy returns for the same statements, values and types alike
  (`same_rows_as_sqlalchemy` runs on MariaDB and PostgreSQL too, in tests/e2e).
- SQLite reads on the event loop only while that is bounded: a file locked by a writer, or a
  query that runs past the budget, is read in the reader's thread while the loop goes on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import sys
import traceback
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import text

from integration.test_directory_sqlite import (
    CAROL_PW,
    SEED_DDL,
    SEED_QUERIES,
    add_app,
    env,
    populate,
    route,
    run,
    sql,
)
from mailgate.auth import schema
from mailgate.auth.directory import SqlDirectory
from mailgate.auth.schema import dispose, make_engine
from mailgate.auth.sqlite_read import SqliteReader
from mailgate.auth.sqlread import EngineReader, ServerReader, open_reader, parse_url
from mailgate.config import DirectoryQueries, DirectorySettings

T = TypeVar("T")
# Loop iterations a lookup that leaves the loop free lets pass; one read that held the loop
# would let through one or two. Counted, not timed.
FREE_LOOP = 20


def test_each_url_gets_its_reader(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = tmp_path / "d.db"
        expected = {
            f"sqlite:///{db}": SqliteReader,
            f"sqlite+pysqlite:///{db}": SqliteReader,
            "postgresql://u:p@h/db": ServerReader,
            "postgres://u@h:5433/db?sslmode=require": ServerReader,
            "postgresql://u@h/db?prepared_statement_cache_size=0": ServerReader,
            "postgresql+asyncpg://u@h/db": ServerReader,
            "mysql://u:p%40ss@h/db": ServerReader,
            "mariadb://u@h/db?unix_socket=/run/mysqld/mysqld.sock": ServerReader,
            # Another driver or an option the direct path does not take: SQLAlchemy, as before.
            f"sqlite+aiosqlite:///{db}": EngineReader,
            "sqlite://": EngineReader,  # in memory: the directory would be empty anyway
            f"sqlite:///{db}?mode=ro": EngineReader,
            "postgresql+psycopg://u@h/db": EngineReader,
            "postgresql://u@h/db?application_name=x": EngineReader,
            "mysql+aiomysql://u@h/db": EngineReader,
        }
        for url, kind in expected.items():
            reader = open_reader(url, 2, 1.0)
            assert type(reader) is kind, url
            await reader.close()

    run(scenario())


def test_a_driver_that_is_installed_but_cannot_load_takes_the_engines_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An asyncmy that is found but fails to import (built for another Python): the lookups
    go through SQLAlchemy on aiomysql, and building the reader does not raise."""
    broken = tmp_path / "asyncmy"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('built for another Python')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "asyncmy", raising=False)

    async def scenario() -> None:
        reader = open_reader("mysql://u:p@127.0.0.1:9/db", 1, 1.0)
        assert type(reader) is EngineReader
        await reader.close()

    run(scenario())
    assert "asyncmy cannot be imported" in caplog.text


# A password no error message may show (make_url's own errors quote the URL, or its port).
SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://mail:{SECRET}/mail",  # no "@host": the password is read as the port
        f"postgresql://mail:{SECRET}@[::1/mail",  # an unclosed IPv6 address
        f"mysql//mail:{SECRET}/mail",  # no "://", and no "@" to cut at
        f"postgresql://mail:{SECRET}@db/mail?prepared_statement_cache_size={SECRET}",
        f"postgresql://mail:{SECRET}@db/mail?prepared_statement_cache_size=0"
        "&prepared_statement_cache_size=1",
    ],
    ids=["no host", "bad host", "no scheme", "bad cache size", "cache size twice"],
)
def test_a_bad_url_is_refused_at_start_without_showing_its_password(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_url(url)
    # Nor in a traceback, which would show make_url's error as the context.
    assert SECRET not in "".join(traceback.format_exception(refused.value))
    with pytest.raises(ValueError) as refused:
        SqlDirectory(DirectorySettings(url=url))
    assert SECRET not in str(refused.value)


async def same_rows_as_sqlalchemy(url: str) -> None:
    """Every statement of the directory, through the reader and through SQLAlchemy."""
    await populate(url)
    engine = make_engine(url, 1)
    reader = open_reader(url, 1, 3.0)
    later = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    try:
        await add_app(engine, "dave@example.org", "phone", ["imap"], "dave-app")
        await sql(url, "UPDATE app_passwords SET expires_at = :t", t=later)
        custom = text("SELECT name AS host, active FROM domains WHERE name = :domain LIMIT 1")
        cases: list[tuple[Any, dict[str, Any]]] = [
            (schema.builtin_login_query(), {"user": "dave@example.org", "domain": "example.org"}),
            (schema.builtin_login_query(), {"user": "no@example.org", "domain": "example.org"}),
            (schema.builtin_login_query(), {"user": "no@nowhere.test", "domain": "nowhere.test"}),
            (schema.builtin_app_passwords_query(), {"user": "dave@example.org"}),
            (schema.builtin_domain_query(), {"domain": "example.com"}),
            (schema.builtin_password_sample(10), {}),
            (schema.builtin_any_app_password(), {}),
            (custom, {"domain": "example.com"}),
        ]
        for statement, values in cases:
            ours = await reader.fetch(statement, values)
            async with engine.connect() as conn:
                result = await conn.execute(statement, values)
                theirs = [dict(row) for row in result.mappings().all()]
            assert ours == theirs, statement
            assert [_types(row) for row in ours] == [_types(row) for row in theirs], statement
        assert (await reader.fetch(schema.builtin_login_query(), cases[1][1]))[0]["address"] is None
        await reader.write(schema.builtin_touch_app_password(), {"app_id": 1, "used_at": later})
        rows = await reader.fetch(schema.builtin_app_passwords_query(), cases[3][1])
        assert [row["last_used_at"].replace(tzinfo=dt.UTC) for row in rows] == [later]
    finally:
        await reader.close()
        await dispose(engine)


def _types(row: dict[str, Any]) -> dict[str, str]:
    return {k: type(v).__name__ for k, v in row.items()}


def test_rows_are_what_sqlalchemy_returns(tmp_path: Path) -> None:
    run(same_rows_as_sqlalchemy(f"sqlite:///{tmp_path / 'directory.db'}"))


async def loop_turns_during(pending: Awaitable[T]) -> tuple[T, int]:
    """The result, and how many times the event loop ran another task meanwhile."""
    turns = 0
    done = False

    async def spin() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    spinner = asyncio.create_task(spin())
    try:
        result = await pending
    finally:
        done = True
        await spinner
    return result, turns


def test_a_file_locked_by_a_writer_is_read_in_the_thread_while_the_loop_goes_on(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'directory.db'}"

    async def scenario() -> None:
        await populate(url)
        async with env(url, cache_ttl=0, query_timeout=10.0) as e:
            route(await e.auth("carol@example.com", CAROL_PW))
            writer = sqlite3.connect(tmp_path / "directory.db", isolation_level=None)
            writer.execute("BEGIN EXCLUSIVE")  # as `mailgate user add` holds it to commit
            asyncio.get_running_loop().call_later(0.3, writer.rollback)
            try:
                decision, turns = await loop_turns_during(e.auth("carol@example.com", CAROL_PW))
            finally:
                writer.close()
            route(decision)  # waited for the lock (in the thread), then read
            assert turns > FREE_LOOP  # and the other sessions went on meanwhile

    run(scenario())


def test_a_query_past_the_loop_budget_finishes_in_the_thread(tmp_path: Path) -> None:
    """An operator's query that scans: interrupted on the loop at LOOP_BUDGET, run again in
    the thread, with the same answer."""
    url = f"sqlite:///{tmp_path / 'directory.db'}"
    slow = DirectoryQueries(
        password="WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 300000)"
        " SELECT clear AS password FROM users"
        " WHERE email = :user AND (SELECT max(x) FROM n) > 0 LIMIT 1",
        route=SEED_QUERIES.route,
    )

    async def scenario() -> None:
        await sql(url, *SEED_DDL, "INSERT INTO users VALUES ('bob@example.com', 'bob-clear')",
                  "INSERT INTO transport VALUES ('example.com', 'smtp:10.0.0.5')")  # fmt: skip
        async with env(url, queries=slow, cache_ttl=0) as e:
            decision, turns = await loop_turns_during(e.auth("bob@example.com", "bob-clear"))
            assert route(decision).host == "10.0.0.5"
            assert turns > FREE_LOOP

    run(scenario())


def test_a_broken_file_is_a_temporary_failure_then_reads_again(tmp_path: Path) -> None:
    path = tmp_path / "directory.db"
    url = f"sqlite:///{path}"

    async def scenario() -> None:
        await populate(url)
        good = path.read_bytes()
        async with env(url, cache_ttl=0) as e:
            route(await e.auth("carol@example.com", CAROL_PW))
            path.unlink()
            path.write_bytes(b"not a database" * 100)  # replaced: the reader opens it again
            reader = e.directory._current_reader()
            assert isinstance(reader, SqliteReader)
            reader._close_loop_conn()  # as after POOL_RECYCLE
            decision = await e.auth("carol@example.com", CAROL_PW)
            assert decision.__class__.__name__ == "TempFail", decision
            path.write_bytes(good)
            route(await e.auth("carol@example.com", CAROL_PW))

    run(scenario())
