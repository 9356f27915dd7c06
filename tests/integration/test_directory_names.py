"""Names normalised once, against a real database: which spellings log in, as whom, and under
which throttle key.

Found when it was tried (issue 8, item 2): with MariaDB's default collation, a locked
`victim@example.com` still let `victim@example.com ` (trailing spaces), `vïctim@example.com` and
`victim@example.coM ` log in, because the throttle's key was `user.lower()` while the database
ignored trailing spaces and folded accents. `NamesBehaviour` runs here on SQLite and in
tests/e2e/test_directory_sql.py on MariaDB and PostgreSQL, through the real SqlDirectory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import text

from integration.test_directory_sqlite import (
    FAILED,
    SEED_DDL,
    UNDO_VERSION_4,
    env,
    populate,
    route,
    run,
    sql,
    wipe,
)
from mailgate import admin
from mailgate.auth.schema import SCHEMA_VERSION, dispose, make_engine
from mailgate.auth.throttle import REFUSED_NAMES, Throttled, user_key
from mailgate.config import DirectoryQueries, LimitsSettings, ThrottleSettings
from mailgate.nodestate import NodeState
from mailgate.statestore import LocalStore
from mailgate.values import ClientInfo, Credentials, Decision, Method, Reject, Route, Secret

LOGGER = "mailgate.auth.directory"
VICTIM, VICTIM_PW = "victim@example.com", "victim-pw"
ACCENTED, ACCENTED_PW = "v\u00efctim@example.com", "accented-pw"  # precomposed ï (NFC)
DECOMPOSED = "vi\u0308ctim@example.com"  # i + COMBINING DIAERESIS: the same name as ACCENTED
VICTIM_KEY = VICTIM
# Spellings a client may send for the victim: all one user, one throttle key.
SAME_AS_VICTIM = [
    VICTIM,
    "victim@example.com  ",
    "victim@example.com\t",
    "VICTIM@Example.COM",
    "victim@example.coM ",
    "  Victim@EXAMPLE.com",
]
# Spellings that must reach nobody: invisible, control and look-alike characters.
REFUSED = [
    "vi\u200bctim@example.com",  # ZERO WIDTH SPACE (utf8mb4_unicode_ci ignores it)
    "victim\u200d@example.com",  # ZERO WIDTH JOINER
    "victim@example.com\u00a0",  # NO-BREAK SPACE
    "victim@exam\u202eelp.com",  # RIGHT-TO-LEFT OVERRIDE
    "victim@example.com\ufeff",  # BOM
    "victim@example.com\r\n",
    "victim\x00@example.com",
    "\udcffvictim@example.com",  # a byte that was not UTF-8 (surrogateescape)
]
# Other accents the victim's name may be folded to by a database: still nobody.
ACCENT_VARIANTS = [ACCENTED, DECOMPOSED, "vict\u00edm@example.com", "victim@\u00e9xample.com"]
LESER = "leser@b\u00fccher.example"
LESER_SPELLINGS = [
    LESER,
    "leser@xn--bcher-kva.example",
    "LESER@XN--BCHER-KVA.EXAMPLE",
    "leser@B\u00dcCHER.example",
    "leser@bu\u0308cher.example",  # decomposed ü
]
SEED_QUERIES_WITH_USER = DirectoryQueries(
    # The seed's password query, naming the stored address: the throttle keys on it.
    password='SELECT email AS "user", clear AS password FROM users WHERE email = :user LIMIT 1',
    route="SELECT destination_mailstore AS host FROM transport WHERE domain = :domain LIMIT 1",
)


# No delays (they would only slow the test); locked out after three failures.
LOCK_AFTER_3 = ThrottleSettings(free=1000, lockout_after=3, lockout=300.0)


def throttled_over(directory: object) -> Throttled:
    """The throttle as a worker builds it, counting in this process."""
    store = LocalStore(NodeState(LOCK_AFTER_3, LimitsSettings()))
    return Throttled(directory, LOCK_AFTER_3, store)  # type: ignore[arg-type]


async def lock_out(throttled: Throttled) -> None:
    """Four wrong guesses for the victim from one address: the victim is locked out."""
    for _ in range(4):
        guess = Credentials(Method.PLAIN, VICTIM, Secret("guess"))
        assert await throttled.authenticate(guess, ClientInfo("192.0.2.1", 1, "imap")) == FAILED


async def try_each(throttled: Throttled, names: list[str], password: str) -> list[Decision]:
    """Each name with `password`, each from an address of its own (no per-IP lock-out)."""
    decisions = []
    for n, name in enumerate(names):
        creds = Credentials(Method.PLAIN, name, Secret(password))
        decisions.append(
            await throttled.authenticate(creds, ClientInfo(f"198.51.100.{n + 1}", 1, "imap"))
        )
    return decisions


def is_mysql(url: str) -> bool:
    return url.startswith(("mysql", "mariadb"))


def key(decision: Decision, sent: str) -> str | None:
    """The throttle key of a login: the identity the directory matched, else the sent name."""
    identity = decision.identity if isinstance(decision, Route | Reject) else None
    return user_key(identity or sent)


async def add_users(url: str) -> None:
    """populate()'s data, plus the victim, an accented user and a user in an IDN domain, each
    added with an unnormalised spelling: admin stores them normalised."""
    await populate(url)
    e = make_engine(url, 1)
    try:
        await admin.add_user(e, "  Victim@Example.COM ", Secret(VICTIM_PW), scheme="PLAIN")
        await admin.add_user(e, DECOMPOSED.upper(), Secret(ACCENTED_PW), scheme="PLAIN")
        await admin.add_domain(e, "XN--BCHER-KVA.example", "store1")
        await admin.add_user(e, "Leser@b\u00fccher.EXAMPLE", Secret("leser-pw"), scheme="PLAIN")
    finally:
        await dispose(e)


async def stored_addresses(url: str) -> list[str]:
    e = make_engine(url, 1)
    try:
        async with e.connect() as conn:
            rows = (await conn.execute(text("SELECT address FROM users"))).all()
    finally:
        await dispose(e)
    return sorted(str(row[0]) for row in rows)


async def count_matches(url: str, address: str) -> int:
    """How many rows the database itself finds equal to `address` (its collation's view)."""
    e = make_engine(url, 1)
    try:
        async with e.connect() as conn:
            query = text("SELECT COUNT(*) FROM users WHERE address = :a")
            return int((await conn.execute(query, {"a": address})).scalar_one())
    finally:
        await dispose(e)


async def as_version_2(url: str) -> None:
    """The schema as version 2 left it: on MariaDB, the database's case- and accent-folding
    collation on the name columns."""
    await wipe(url)
    e = make_engine(url, 1)
    try:
        await admin.init_schema(e)
    finally:
        await dispose(e)
    statements = [*UNDO_VERSION_4, "UPDATE mailgate_schema SET version = 2"]
    if is_mysql(url):
        statements += [
            f"ALTER TABLE {t} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
            for t in ("mailstores", "domains", "users")
        ]
    await sql(url, *statements)


async def insert_raw(url: str, domains: list[str], users: list[tuple[str, str]]) -> None:
    """Rows written by hand (or by an older mailgate), bypassing admin's normalisation."""
    await sql(url, "INSERT INTO mailstores (name, host, tls, active) VALUES ('s', '10.0.0.9',"
              " 'none', :t)", t=True)  # fmt: skip
    for name in domains:
        await sql(url, "INSERT INTO domains (name, mailstore_id, active) VALUES (:n, 1, :t)",
                  n=name, t=True)  # fmt: skip
    for address, password in users:
        await sql(url, "INSERT INTO users (address, password, active, created_at, updated_at)"
                  " VALUES (:a, :p, :t, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
                  a=address, p="{PLAIN}" + password, t=True)  # fmt: skip


class NamesBehaviour:
    """Subclasses define the `db_url` fixture (an empty database)."""

    def test_spellings_of_one_name_log_in_as_one_user_under_one_throttle_key(
        self, db_url: str
    ) -> None:
        async def scenario() -> None:
            await add_users(db_url)
            async with env(db_url) as e:
                for name in SAME_AS_VICTIM:
                    r = route(await e.auth(name, VICTIM_PW))
                    assert (r.user, r.identity, r.secret.reveal()) == (VICTIM, VICTIM, VICTIM_PW)
                    assert key(r, name) == user_key(name) == VICTIM_KEY, repr(name)
                    wrong = await e.auth(name, "wrong")
                    assert wrong == FAILED and isinstance(wrong, Reject)
                    assert wrong.identity == VICTIM and key(wrong, name) == VICTIM_KEY

        run(scenario())

    def test_a_locked_out_user_stays_locked_out_whatever_the_spelling(self, db_url: str) -> None:
        """The issue as found: `victim@example.com` locked, and its other spellings logging in
        with the right password from other addresses. The accented user is someone else."""

        async def scenario() -> None:
            await add_users(db_url)
            async with env(db_url) as e:
                throttled = throttled_over(e.directory)
                await lock_out(throttled)
                for name, decision in zip(SAME_AS_VICTIM, await try_each(
                        throttled, SAME_AS_VICTIM, VICTIM_PW), strict=True):  # fmt: skip
                    assert decision == FAILED, repr(name)
                for name in (ACCENTED, DECOMPOSED):  # not locked: another user, own password
                    route((await try_each(throttled, [name], ACCENTED_PW))[0])
                    assert await try_each(throttled, [name], VICTIM_PW) == [FAILED]

        run(scenario())

    def test_an_accent_is_another_user_in_every_database(self, db_url: str) -> None:
        async def scenario() -> None:
            await add_users(db_url)
            async with env(db_url) as e:
                for name in (ACCENTED, DECOMPOSED):
                    r = route(await e.auth(name, ACCENTED_PW))
                    assert (r.user, r.identity) == (ACCENTED, ACCENTED)  # stored precomposed
                    assert key(r, name) == ACCENTED != VICTIM_KEY
                    assert await e.auth(name, VICTIM_PW) == FAILED
                assert await e.auth(VICTIM, ACCENTED_PW) == FAILED
                await admin.remove_user(e.engine, ACCENTED)
                for name in ACCENT_VARIANTS:  # no such user now: the victim's password fails
                    refused = await e.auth(name, VICTIM_PW)
                    assert refused == FAILED, repr(name)
                    assert isinstance(refused, Reject) and refused.identity is None
                    assert key(refused, name) != VICTIM_KEY

        run(scenario())

    def test_invisible_and_control_characters_reach_nobody_and_are_not_logged(
        self, db_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)

        async def scenario() -> None:
            await add_users(db_url)
            async with env(db_url) as e:
                for name in REFUSED:
                    refused = await e.auth(name, VICTIM_PW)
                    assert refused == FAILED, repr(name)
                    assert isinstance(refused, Reject) and refused.identity is None
                    assert key(refused, name) == REFUSED_NAMES  # one budget for them all

        run(scenario())
        assert caplog.text.count("refused: user name ") == len(REFUSED)
        for name in REFUSED:
            assert name not in caplog.text

    def test_admin_stores_names_normalised_and_the_database_compares_them_exactly(
        self, db_url: str
    ) -> None:
        async def scenario() -> None:
            await add_users(db_url)
            assert await stored_addresses(db_url) == sorted(
                ["alice@example.com", "carol@example.com", "dave@example.org", VICTIM,
                 ACCENTED, LESER]
            )  # fmt: skip
            async with env(db_url) as e:
                domains = {d.name for d in await admin.list_domains(e.engine)}
                assert domains == {"example.com", "example.org", "b\u00fccher.example"}
                for spelling in ("victim@example.com ", "VICTIM@example.com", DECOMPOSED):
                    with pytest.raises(admin.AdminError, match="already exists"):
                        await admin.add_user(e.engine, spelling, Secret("x"), scheme="PLAIN")
                with pytest.raises(admin.AdminError, match="already exists"):
                    await admin.add_domain(e.engine, "xn--bcher-kva.EXAMPLE", "store1")
                with pytest.raises(admin.AdminError, match="format"):
                    await admin.add_user(e.engine, REFUSED[0], Secret("x"), scheme="PLAIN")
                await admin.set_password(e.engine, "VICTIM@example.com ", Secret("new-pw"))
                route(await e.auth(VICTIM, "new-pw"))
            # The database's own view: nothing but the exact bytes is equal (no PAD SPACE, no
            # case or accent folding), so its idea of one user is the throttle's.
            assert await count_matches(db_url, VICTIM) == 1
            for other in ("victim@example.com ", "Victim@example.com", "v\u00efctim@example.com",
                          "vi\u0308ctim@example.com", "victim@example.com\u00a0"):  # fmt: skip
                expected = 1 if other == ACCENTED else 0
                assert await count_matches(db_url, other) == expected, repr(other)

        run(scenario())

    def test_an_a_label_and_its_u_label_are_one_domain(self, db_url: str) -> None:
        async def scenario() -> None:
            await add_users(db_url)
            async with env(db_url) as e:
                for name in LESER_SPELLINGS:
                    r = route(await e.auth(name, "leser-pw"))
                    assert (r.user, r.host, key(r, name)) == (LESER, "10.0.0.5", LESER)
                for bad in ("leser@xn--bcher-kvb.example", "leser@xn--b\u00fccher.example"):
                    assert await e.auth(bad, "leser-pw") == FAILED, bad

        run(scenario())

    def test_upgrade_to_version_3_normalises_stored_names_and_collations(self, db_url: str) -> None:
        async def scenario() -> None:
            await as_version_2(db_url)
            decomposed = DECOMPOSED.replace("example.com", "example.net")
            await insert_raw(
                db_url,
                domains=["Example.NET", "xn--bcher-kva.example"],
                users=[("Mixed@Example.NET", "m"), (decomposed, "d"),
                       ("leser@xn--bcher-kva.example", "l")],
            )  # fmt: skip
            e = make_engine(db_url, 1)
            try:
                assert await admin.upgrade_schema(e) == (2, SCHEMA_VERSION)
            finally:
                await dispose(e)
            assert await stored_addresses(db_url) == sorted(
                ["mixed@example.net", "v\u00efctim@example.net", LESER]
            )
            async with env(db_url) as e2:
                assert route(await e2.auth("MIXED@example.net ", "m")).user == "mixed@example.net"
                assert route(await e2.auth("v\u00efctim@example.net", "d")).host == "10.0.0.9"
                assert route(await e2.auth("leser@xn--bcher-kva.example", "l")).user == LESER
            assert await count_matches(db_url, "mixed@example.net ") == 0  # no PAD SPACE now
            if is_mysql(db_url):
                for table, column in (("users", "address"), ("domains", "name")):
                    assert await column_collation(db_url, table, column) == "utf8mb4_nopad_bin"

        run(scenario())

    def test_upgrade_refuses_names_that_would_become_one_and_changes_nothing(
        self, db_url: str
    ) -> None:
        async def scenario() -> None:
            await as_version_2(db_url)
            # Distinct in every collation, one name once normalised.
            raw = ["x@b\u00fccher.example", "x@xn--bcher-kva.example", "Solo@Example.com"]
            await insert_raw(db_url, domains=["example.com"], users=[(a, "pw") for a in raw])
            e = make_engine(db_url, 1)
            try:
                with pytest.raises(admin.AdminError) as refused:
                    await admin.upgrade_schema(e)
                async with e.connect() as conn:
                    version = await conn.execute(text("SELECT version FROM mailgate_schema"))
                    assert version.scalar_one() == 2
            finally:
                await dispose(e)
            message = str(refused.value)
            assert "'x@bücher.example' and 'x@xn--bcher-kva.example' would all be" in message
            assert "directory upgrade" in message
            assert await stored_addresses(db_url) == sorted(raw)  # nothing renamed

        run(scenario())

    def test_operators_schema_keys_the_throttle_on_the_address_the_database_matched(
        self, db_url: str
    ) -> None:
        """The seed's postfix tables with the database's default collation, which mailgate
        cannot change: on MariaDB it folds case and accents and ignores trailing spaces. The
        password query names the stored address (`email AS "user"`); whatever the database
        matches logs in as that address, and counts under its key."""

        async def scenario() -> None:
            await wipe(db_url)
            await sql(db_url, *SEED_DDL)
            await sql(db_url, "INSERT INTO users VALUES (:u, :p)", u=VICTIM, p=VICTIM_PW)
            await sql(db_url, "INSERT INTO transport VALUES ('example.com', 'smtp:10.0.0.5')")
            logged_in = set()
            async with env(db_url, queries=SEED_QUERIES_WITH_USER) as e:
                for name in SAME_AS_VICTIM + ACCENT_VARIANTS + REFUSED:
                    decision = await e.auth(name, VICTIM_PW)
                    if isinstance(decision, Route):
                        logged_in.add(name)
                        assert (decision.user, decision.identity) == (VICTIM, VICTIM)
                        assert key(decision, name) == VICTIM_KEY, repr(name)
                    wrong = await e.auth(name, "wrong")
                    assert wrong == FAILED
                    if name in logged_in:  # a wrong guess counts against the matched user
                        assert key(wrong, name) == VICTIM_KEY, repr(name)
            # The local part's case is the database's business on an operator's schema.
            exact = {VICTIM, "victim@example.com  ", "victim@example.com\t", "victim@example.coM "}
            folding = exact | {"VICTIM@Example.COM", "  Victim@EXAMPLE.com", *ACCENT_VARIANTS}
            assert logged_in == (folding if is_mysql(db_url) else exact)

        run(scenario())


async def column_collation(url: str, table: str, column: str) -> str:
    e = make_engine(url, 1)
    try:
        async with e.connect() as conn:
            query = text(
                "SELECT COLLATION_NAME FROM information_schema.COLUMNS WHERE"
                " TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t AND COLUMN_NAME = :c"
            )
            return str((await conn.execute(query, {"t": table, "c": column})).scalar_one())
    finally:
        await dispose(e)


class TestSqliteNames(NamesBehaviour):
    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'directory.db'}"
