"""`mailgate serve` with the built-in SQL directory, in front of two real Dovecots.

What an operator does and what a mail client then sees: the directory built from an empty
SQLite file with the admin CLI, logins with imaplib and poplib landing on the user's store,
`user disable`/`enable`/`move` taking effect within `cache_ttl`, `directory flush` making them
immediate, `auth test`; the seed article's own postfix tables and queries on a real MariaDB;
and database outages answered `NO [UNAVAILABLE]`, never as a wrong password.

Where a user landed is proven by the one message only the home store holds ("on store1" or
"on store2", see conftest.py), and for a moved user by the backend in mailgate's session line.
"""

from __future__ import annotations

import contextlib
import functools
import imaplib
import io
import os
import poplib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from mailgate import cli

from .conftest import ALICE, BOB, PONY, DovecotStores, MailUser, require
from .mailgate_proc import SRC, MailgateProcess, running_mailgate, start_mailgate, to_toml
from .test_directory_sql import Server

# Client-side bound on every network wait: each step takes milliseconds here.
CLIENT_TIMEOUT = 10.0
# One CLI command: imports, a SQLite or database round trip, maybe an ARGON2ID hash.
CLI_TIMEOUT = 60.0
# Short enough that waiting it out costs a test little; the default is 60 s.
CACHE_TTL = 1.0
# Long enough that only a flush can end a cached login within the test.
LONG_CACHE_TTL = 3600.0
# Query timeout during outages, and the slack on top of it that absorbs a busy 2-core CI
# machine's scheduling (as in test_directory_sql.py), not any waiting of ours.
QUERY_TIMEOUT = 1.0
SLACK = 1.5
POLL_INTERVAL = 0.1
# Failures are part of these tests; a throttle delay after the second one would only slow them.
# The Throttled wrapper stays in the chain, as in an operator's default configuration.
NO_DELAYS = {"free": 1000}
LISTENERS = {"imap": {"protocol": "imap"}, "pop3": {"protocol": "pop3"}}
AUTH_FAILED = "[AUTHENTICATIONFAILED]"
UNAVAILABLE = "[UNAVAILABLE]"
WRONG = "not the password"


# --- the admin CLI ---------------------------------------------------------------------------


def mailgate_command(config: Path, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`mailgate ARGV -c CONFIG` as its own process, as an operator runs it."""
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *argv, "-c", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
        timeout=CLI_TIMEOUT,
        check=False,
    )


def admin(config: Path, *argv: str, stdin: str = "") -> str:
    """One admin command in its own process; it must succeed. Returns its output."""
    done = mailgate_command(config, *argv, stdin=stdin)
    assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout


def admin_here(config: Path, *argv: str, stdin: str = "") -> str:
    """The same command run in this process (cli.main): set-up steps, a second each faster."""
    out, err, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*argv, "-c", str(config)])
    finally:
        sys.stdin = saved
    assert code == 0, (argv, out.getvalue(), err.getvalue())
    return out.getvalue()


Admin = Callable[..., str]


def add_store(
    run: Admin, config: Path, stores: DovecotStores, name: str, *extra: str, stdin: str = ""
) -> None:
    store = stores[name]
    run(config, "mailstore", "add", name, "--host", "127.0.0.1",
        "--imap-port", str(store.ports["imap"]), "--pop3-port", str(store.ports["pop3"]),
        *extra, stdin=stdin)  # fmt: skip


def populate(
    config: Path,
    stores: DovecotStores,
    users: Mapping[MailUser, str],
    *,
    run: Admin = admin_here,
    master_on_store1: bool = False,
) -> None:
    """Schema, store1/store2, example.com -> store1, example.org -> store2, `users` with the
    given directory passwords (ARGON2ID, the default scheme).

    With `master_on_store1`, mailgate logs in to store1 as Dovecot's master user."""
    run(config, "directory", "init")
    if master_on_store1:
        add_store(run, config, stores, "store1", "--master-user", stores.master_user,
                  "--master-password-stdin", stdin=f"{stores.master_password}\n")  # fmt: skip
    else:
        add_store(run, config, stores, "store1")
    add_store(run, config, stores, "store2")
    run(config, "domain", "add", "example.com", "--mailstore", "store1")
    run(config, "domain", "add", "example.org", "--mailstore", "store2")
    for user, password in users.items():
        run(config, "user", "add", user.login, "--password-stdin", stdin=f"{password}\n")


def write_config(workdir: Path, config: Mapping[str, Any]) -> Path:
    """The config the admin CLI reads; start_mailgate rewrites it with the listeners added."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "mailgate.toml"
    path.write_text(to_toml(config))
    return path


# --- mail clients ----------------------------------------------------------------------------


def quoted(text: str) -> str:
    """An IMAP quoted string: imaplib sends LOGIN's user name as it is, and "%" is a list
    wildcard, so p%ony@example.com cannot be an atom."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def imap_subjects(port: int, user: str, password: str) -> list[str]:
    """Log in with LOGIN and return the subjects in INBOX."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as imap:
        imap.login(quoted(user), password)
        return inbox_subjects(imap)


def inbox_subjects(imap: imaplib.IMAP4) -> list[str]:
    typ, count = imap.select("INBOX", readonly=True)
    assert typ == "OK", count
    if int(count[0] or 0) == 0:
        return []
    typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK", data
    return [part[1].decode().strip() for part in data if isinstance(part, tuple)]


def imap_refusal(port: int, user: str, password: str) -> str:
    """Log in with LOGIN, expecting NO; returns the server's text."""
    with (
        imaplib.IMAP4("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as imap,
        pytest.raises(imaplib.IMAP4.error) as refused,
    ):
        imap.login(quoted(user), password)
    return str(refused.value)


def imap_plain(port: int, user: str, password: str) -> list[str]:
    with imaplib.IMAP4("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as imap:
        imap.authenticate("PLAIN", lambda _: f"\0{user}\0{password}".encode())
        return inbox_subjects(imap)


def answer(response: bytes, challenge: bytes) -> bytes:
    """An imaplib authobject that answers `response` whatever the challenge."""
    return response


def imap_cram_md5(port: int, user: str, password: str) -> list[str]:
    with imaplib.IMAP4("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as imap:
        imap.login_cram_md5(user, password)
        return inbox_subjects(imap)


def pop3_subjects(port: int, user: str, password: str) -> list[str]:
    """USER/PASS, then the Subject of every message (TOP n 0), then QUIT."""
    pop = poplib.POP3("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        subjects = []
        for n in range(1, count + 1):
            _, lines, _ = pop.top(n, 0)
            subjects += [line.decode() for line in lines if line.startswith(b"Subject: ")]
        pop.quit()
        return subjects
    finally:
        pop.close()


def pop3_refusal(port: int, user: str, password: str) -> str:
    pop = poplib.POP3("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    try:
        pop.user(user)
        with pytest.raises(poplib.error_proto) as refused:
            pop.pass_(password)
        return str(refused.value)
    finally:
        pop.close()


def on(store: str) -> list[str]:
    """What INBOX holds for a user whose home is `store`."""
    return [f"Subject: {DovecotStores.subject(store)}"]


def backend_of(mg: MailgateProcess, user: str, since: int) -> str:
    """The backend in mailgate's line for `user`'s session that ended after `since`."""
    found = mg.wait_for_sessions(lambda s: s.fields.get("user") == user, since=since)
    # The previous test's last session may be logged just after `since` was taken (the
    # client returns on LOGOUT's reply, mailgate logs when the backend closes): the newest
    # line is this login's.
    assert found, mg.log_tail()
    return found[-1]["backend"]


def wait_for_log(mg: MailgateProcess, text: str, since: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with mg.log_path.open("rb") as f:
            f.seek(since)
            if text in f.read().decode(errors="replace"):
                return True
        time.sleep(POLL_INTERVAL)
    return False


# --- the operator's flow on the built-in schema -----------------------------------------------


@dataclass
class Deployment:
    mg: MailgateProcess
    config: Path
    stores: DovecotStores


@pytest.fixture(scope="module")
def deployment(
    dovecot_stores: DovecotStores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """An empty directory made ready with the admin CLI, each command its own process."""
    workdir = tmp_path_factory.mktemp("directory-proxy")
    settings = {
        "shutdown_timeout": 2,
        "directory": {"url": "sqlite:///directory.db", "cache_ttl": CACHE_TTL},
        "throttle": NO_DELAYS,
    }
    config = write_config(workdir, settings)
    users = {u: u.password for u in (ALICE, BOB, PONY)}  # as Dovecot has them: passed through
    populate(config, dovecot_stores, users, run=admin)
    with running_mailgate(workdir, LISTENERS, settings) as mg:
        yield Deployment(mg, config, dovecot_stores)


@pytest.mark.parametrize("user", [ALICE, BOB], ids=["alice", "bob"])
def test_imap_and_pop3_logins_land_on_the_domains_store(
    deployment: Deployment, user: MailUser
) -> None:
    ports = deployment.mg.ports
    assert imap_subjects(ports["imap"], user.login, user.password) == on(user.home)
    assert imap_plain(ports["imap"], user.login, user.password) == on(user.home)
    assert pop3_subjects(ports["pop3"], user.login, user.password) == on(user.home)


def test_wrong_password_and_unknown_user_get_the_same_refusal(deployment: Deployment) -> None:
    port = deployment.mg.ports["imap"]
    wrong = imap_refusal(port, ALICE.login, WRONG)
    unknown = imap_refusal(port, "nobody@example.com", WRONG)
    assert AUTH_FAILED in wrong
    assert wrong == unknown
    assert pop3_refusal(deployment.mg.ports["pop3"], "nobody@example.com", WRONG).startswith(
        "b'-ERR [AUTH]"
    )


def test_disabled_user_is_refused_within_cache_ttl_and_enable_lets_her_in_again(
    deployment: Deployment,
) -> None:
    port, config = deployment.mg.ports["imap"], deployment.config
    assert imap_subjects(port, PONY.login, PONY.password) == on("store1")  # now cached
    admin(config, "user", "disable", PONY.login)
    try:
        disabled_at = time.monotonic()
        while True:
            try:
                imap_subjects(port, PONY.login, PONY.password)
            except imaplib.IMAP4.error as refused:
                assert AUTH_FAILED in str(refused)
                break
            assert time.monotonic() - disabled_at < CACHE_TTL + SLACK, "still logs in"
            time.sleep(POLL_INTERVAL)
        assert AUTH_FAILED in imap_refusal(port, PONY.login, PONY.password)  # and stays out
        assert "[AUTH]" in pop3_refusal(deployment.mg.ports["pop3"], PONY.login, PONY.password)
    finally:
        admin(config, "user", "enable", PONY.login)
    # A refusal is never cached: the very next login works.
    assert imap_subjects(port, PONY.login, PONY.password) == on("store1")


def test_moved_user_lands_on_the_new_store_once_cache_ttl_has_passed(
    deployment: Deployment,
) -> None:
    mg, config, stores = deployment.mg, deployment.config, deployment.stores
    store1, store2 = (f"127.0.0.1:{stores[s].ports['imap']}" for s in ("store1", "store2"))
    since = mg.log_size()
    assert imap_subjects(mg.ports["imap"], PONY.login, PONY.password) == on("store1")
    assert backend_of(mg, PONY.login, since) == store1
    admin(config, "user", "move", PONY.login, "store2")
    try:
        rows = [line.split() for line in admin(config, "user", "list").splitlines()]
        assert [PONY.login, "store2", "yes", "yes", "{ARGON2ID}", "no"] in rows
        time.sleep(CACHE_TTL)
        since = mg.log_size()
        # store2 holds no message for her: the mailbox is the new store's (empty) one.
        assert imap_subjects(mg.ports["imap"], PONY.login, PONY.password) == []
        assert backend_of(mg, PONY.login, since) == store2
    finally:
        admin(config, "user", "move", PONY.login, "store1")  # the domain's: override cleared
    time.sleep(CACHE_TTL)
    assert imap_subjects(mg.ports["imap"], PONY.login, PONY.password) == on("store1")


def test_auth_test_prints_the_decision(deployment: Deployment) -> None:
    config, stores = deployment.config, deployment.stores
    done = mailgate_command(
        config, "auth", "test", "alice@example.com", "--password-stdin", stdin=ALICE.password
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        "passdb: alice@example.com auth succeeded",
        f"  backend: 127.0.0.1:{stores.store1.ports['imap']} (imap, tls none)",
        "  mailstore: store1",
        "  login user: alice@example.com",
    ]
    done = mailgate_command(
        config, "auth", "test", BOB.login, "--protocol", "pop3", "--password-stdin",
        stdin=BOB.password + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"  backend: 127.0.0.1:{stores.store2.ports['pop3']} (pop3" in done.stdout
    done = mailgate_command(
        config, "auth", "test", "alice@example.com", "--password-stdin", stdin=WRONG
    )
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "passdb: alice@example.com auth failed",
        "  why: wrong password",
    ]
    assert WRONG not in done.stdout + done.stderr


# --- the route cache holds no secret ------------------------------------------------------------


@pytest.mark.parametrize("master", [False, True], ids=["own-password", "master-user"])
def test_a_cached_login_reaches_dovecot_with_the_password_just_sent_or_the_master_password(
    dovecot_stores: DovecotStores, tmp_path: Path, master: bool
) -> None:
    """The cache keeps no secret: on a hit, Dovecot gets the password the client has just
    typed, or (for a master-user store) the master password the directory holds. Disabling
    the user proves the second login is a hit: only the cache can still route it."""
    settings = {
        "shutdown_timeout": 2,
        "directory": {"url": "sqlite:///directory.db", "cache_ttl": LONG_CACHE_TTL},
        "throttle": {"enabled": False},
    }
    config = write_config(tmp_path, settings)
    populate(config, dovecot_stores, {ALICE: "directory-only-pw" if master else ALICE.password},
             master_on_store1=master)  # fmt: skip
    password = "directory-only-pw" if master else ALICE.password  # Dovecot knows only ALICE's
    with running_mailgate(tmp_path, {"imap": LISTENERS["imap"]}, settings) as mg:
        port = mg.ports["imap"]
        assert imap_subjects(port, ALICE.login, password) == on("store1")
        admin_here(config, "user", "disable", ALICE.login)
        for spelling in (ALICE.login, "  " + ALICE.login.upper(), ALICE.login + "\t"):
            assert imap_subjects(port, spelling, password) == on("store1"), spelling
        assert AUTH_FAILED in imap_refusal(port, ALICE.login, WRONG)  # a miss: refused


# --- directory flush ---------------------------------------------------------------------------


def flush_deployment(
    workdir: Path, stores: DovecotStores, throttle: Mapping[str, Any], workers: int = 1
) -> tuple[Path, dict[str, Any]]:
    settings = {
        "pid_file": "mailgate.pid",
        "workers": workers,
        "shutdown_timeout": 2,
        "directory": {"url": "sqlite:///directory.db", "cache_ttl": LONG_CACHE_TTL},
        "throttle": throttle,
    }
    config = write_config(workdir, settings)
    populate(config, stores, {ALICE: ALICE.password})
    return config, settings


@pytest.mark.parametrize(
    "throttle",
    [
        pytest.param(NO_DELAYS, id="throttle-on"),
        pytest.param({"enabled": False}, id="throttle-off"),
    ],
)  # fmt: skip
def test_flush_makes_a_disabled_users_refusal_immediate(
    dovecot_stores: DovecotStores, tmp_path: Path, throttle: Mapping[str, Any]
) -> None:
    config, settings = flush_deployment(tmp_path, dovecot_stores, throttle)
    with running_mailgate(tmp_path, {"imap": LISTENERS["imap"]}, settings) as mg:
        port = mg.ports["imap"]
        assert imap_subjects(port, ALICE.login, ALICE.password) == on("store1")
        admin_here(config, "user", "disable", ALICE.login)
        # Cached for an hour: this is what flush is for.
        assert imap_subjects(port, ALICE.login, ALICE.password) == on("store1")
        since = mg.log_size()
        done = mailgate_command(config, "directory", "flush")
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout == f"route cache flush sent to mailgate (pid {mg.proc.pid})\n"
        # The signal is handled by the server's loop a moment later; the log says when.
        wait_for_log(mg, "auth cache flushed", since)
        assert AUTH_FAILED in imap_refusal(port, ALICE.login, ALICE.password)
        admin_here(config, "user", "enable", ALICE.login)
        assert imap_subjects(port, ALICE.login, ALICE.password) == on("store1")


def test_flush_reaches_every_worker(dovecot_stores: DovecotStores, tmp_path: Path) -> None:
    """The kernel spreads connections over the workers, each with its own cache."""
    config, settings = flush_deployment(tmp_path, dovecot_stores, {"enabled": False}, workers=2)
    logins = 8  # both workers get some: SO_REUSEPORT hashes each new client port
    with running_mailgate(tmp_path, {"imap": LISTENERS["imap"]}, settings) as mg:
        port = mg.ports["imap"]
        for _ in range(logins):
            assert imap_subjects(port, ALICE.login, ALICE.password) == on("store1")
        admin_here(config, "user", "disable", ALICE.login)
        since = mg.log_size()
        assert mailgate_command(config, "directory", "flush").returncode == 0
        deadline = time.monotonic() + 5.0
        while mg.log_text()[since:].count("auth cache flushed") < 2:
            assert time.monotonic() < deadline, mg.log_tail()
            time.sleep(POLL_INTERVAL)
        for _ in range(logins):
            assert AUTH_FAILED in imap_refusal(port, ALICE.login, ALICE.password)


# Where a process blocked in open() of a FIFO with no reader sleeps, by kernel version.
FIFO_WAITS = ("wait_for_partner", "fifo_open")
# A cold start of mailgate up to its pid file takes about a second; 20 s means it hangs.
START_TIMEOUT = 20.0


def wait_for_fifo_open(proc: subprocess.Popen[bytes]) -> None:
    """Until `proc` sleeps opening a FIFO (RuntimeError if it never does)."""
    wchan, seen = Path(f"/proc/{proc.pid}/wchan"), set()
    deadline = time.monotonic() + START_TIMEOUT
    while (where := wchan.read_text()) not in FIFO_WAITS:
        seen.add(where)
        if proc.poll() is not None:
            raise RuntimeError(f"mailgate exited ({proc.returncode}) before its pid file")
        if time.monotonic() > deadline:
            if seen <= {"", "0"}:
                pytest.skip("this kernel does not show /proc/PID/wchan")
            raise RuntimeError(f"mailgate never opened its pid file (seen: {sorted(seen)})")
        time.sleep(POLL_INTERVAL / 10)


def test_a_flush_while_the_server_starts_does_not_kill_it(tmp_path: Path) -> None:
    """A provisioning script may flush while mailgate restarts. The pid file is made a FIFO so
    that mailgate holds still while writing it: the signal comes exactly then, every time."""
    pid_file = tmp_path / "mailgate.pid"
    os.mkfifo(pid_file)
    settings = {
        "pid_file": pid_file.name,
        "directory": {"url": "sqlite:///directory.db"},
        "listener": [{"protocol": "imap", "listen": f"127.0.0.1:{peers.free_port()}"}],
    }
    config = write_config(tmp_path, settings)
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    with (tmp_path / "mailgate.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "serve", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "PYTHONPATH": pythonpath},
        )  # fmt: skip
    try:
        wait_for_fifo_open(proc)
        os.kill(proc.pid, signal.SIGUSR1)
        reader = os.open(pid_file, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer go on
        time.sleep(1.0)
        os.close(reader)
        assert proc.poll() is None, f"mailgate died: {proc.returncode}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(10.0)


def run_flush(config: Path) -> tuple[int, str]:
    done = mailgate_command(config, "directory", "flush")
    assert done.stdout == ""
    return done.returncode, done.stderr


def test_flush_says_why_it_cannot_signal(tmp_path: Path) -> None:
    base = {"directory": {"url": "sqlite:///directory.db"}}
    config = write_config(tmp_path, base)
    code, err = run_flush(config)
    assert code == 2
    assert "pid_file is not set" in err

    config = write_config(tmp_path, {"pid_file": "run/mailgate.pid", **base})
    code, err = run_flush(config)
    assert code == 1
    assert "run/mailgate.pid: no such file: is mailgate serve running?" in err

    pid_file = tmp_path / "run" / "mailgate.pid"
    pid_file.parent.mkdir()
    pid_file.write_text("mailgate\n")
    assert run_flush(config) == (1, f"mailgate: {pid_file}: does not hold a process id\n")

    # A crashed server leaves its pid file behind; the pid may be gone...
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    pid_file.write_text(f"{gone.pid}\n")
    code, err = run_flush(config)
    assert code == 1
    assert f"process {gone.pid} named in {pid_file} is gone" in err

    # ...or taken over by another program, which SIGUSR1 would kill: it is left alone.
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(f"{other.pid}\n")
        code, err = run_flush(config)
        assert code == 1
        assert f"process {other.pid} is not `mailgate serve`" in err
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()

    config = write_config(tmp_path, {"pid_file": "run/mailgate.pid", "auth_http": {"url": "x"}})
    code, err = run_flush(config)
    assert code == 2
    assert "no [directory] section" in err


# --- the seed's deployment on MariaDB ---------------------------------------------------------

SEED_QUERIES = {
    # The seed's two statements, with named parameters instead of DBI's "?".
    "password": "SELECT clear AS password FROM users WHERE email = :user LIMIT 1",
    "route": "SELECT destination_mailstore AS host FROM transport WHERE domain = :domain LIMIT 1",
}
SEED_SQL = f"""
DROP DATABASE IF EXISTS postfix;
CREATE DATABASE postfix CHARACTER SET utf8mb4;
CREATE TABLE postfix.users (email VARCHAR(255) NOT NULL, clear VARCHAR(255));
CREATE TABLE postfix.transport (domain VARCHAR(255) NOT NULL,
                                destination_mailstore VARCHAR(255));
INSERT INTO postfix.users VALUES ('{ALICE.login}', '{ALICE.password}'),
    ('{PONY.login}', '{PONY.password}'), ('empty@example.com', '');
INSERT INTO postfix.transport VALUES ('example.com', 'smtp:127.0.0.1');
CREATE USER IF NOT EXISTS 'mail-proxy'@'127.0.0.1' IDENTIFIED BY 'p@ssword';
GRANT SELECT ON postfix.* TO 'mail-proxy'@'127.0.0.1';
"""


@pytest.fixture(scope="module")
def seed_deployment(
    mariadb: peers.Peer, dovecot_stores: DovecotStores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MailgateProcess]:
    peers.mariadb_sql(mariadb, SEED_SQL)
    store1 = dovecot_stores.store1
    settings = {
        "shutdown_timeout": 2,
        "directory": {
            # The seed's DBI user; "@" in a password is "%40" in a URL.
            "url": f"mysql://mail-proxy:p%40ssword@127.0.0.1:{mariadb.ports['mysql']}/postfix",
            "queries": SEED_QUERIES,
            # The seed's $protocol_ports, pointed at store1: every domain's mail is there.
            "ports": {"imap": store1.ports["imap"], "pop3": store1.ports["pop3"]},
        },
        "throttle": NO_DELAYS,
    }
    listeners: dict[str, dict[str, Any]] = {
        "imap": {"protocol": "imap", "auth": ["login", "plain", "cram-md5"]},
        "pop3": {"protocol": "pop3"},
    }
    with running_mailgate(tmp_path_factory.mktemp("seed"), listeners, settings) as mg:
        yield mg


@pytest.mark.parametrize("user", [ALICE, PONY], ids=["alice", "pony"])
def test_seed_schema_logins_through_mailgate(
    seed_deployment: MailgateProcess, user: MailUser
) -> None:
    port = seed_deployment.ports["imap"]
    assert imap_subjects(port, user.login, user.password) == on("store1")
    assert imap_plain(port, user.login, user.password) == on("store1")
    # The clear column lets CRAM-MD5 work, and gives the backend the password to log in with.
    assert imap_cram_md5(port, user.login, user.password) == on("store1")
    pop3 = seed_deployment.ports["pop3"]
    assert pop3_subjects(pop3, user.login, user.password) == on("store1")


def test_seed_hole_unknown_or_empty_password_never_logs_in(
    seed_deployment: MailgateProcess,
) -> None:
    """The seed compared `$password eq $real_password`: an unknown user's undef equals ""."""
    port = seed_deployment.ports["imap"]
    for user in ("nobody@example.com", "empty@example.com"):
        assert AUTH_FAILED in imap_refusal(port, user, "")
        empty = f"\0{user}\0".encode()  # PLAIN: no authzid, the user, an empty password
        with (
            imaplib.IMAP4("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as imap,
            pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"),
        ):
            imap.authenticate("PLAIN", functools.partial(answer, empty))
    assert AUTH_FAILED in imap_refusal(port, PONY.login, "my little p%25ony")  # not unescaped
    # POP3 refuses an empty PASS argument before asking anyone.
    assert pop3_refusal(seed_deployment.ports["pop3"], "nobody@example.com", "").startswith(
        "b'-ERR "
    )


# --- database outages ------------------------------------------------------------------------


@pytest.fixture(params=["mariadb", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """A database server of this test's own, to freeze and to stop."""
    if request.param == "mariadb":
        require("mariadbd", "mariadb-install-db", "mariadb")
    else:
        require(peers.postgres_bin("initdb") or "initdb", "psql")
    server = Server(request.param, tmp_path / "db")
    server.start()
    try:
        yield server
    finally:
        if server.peer is not None:
            if server.peer.alive():
                server.signal(signal.SIGCONT)  # never leave a frozen server behind
            server.stop()


def timed_refusal(refusal: Callable[[int, str, str], str], port: int, password: str) -> str:
    start = time.monotonic()
    text = refusal(port, ALICE.login, password)
    elapsed = time.monotonic() - start
    assert elapsed < QUERY_TIMEOUT + SLACK, (text, elapsed)
    return text


def assert_unavailable(mg: MailgateProcess, what: str) -> None:
    """Right and wrong password alike: a temporary failure, never a wrong password."""
    for password in (ALICE.password, WRONG):
        text = timed_refusal(imap_refusal, mg.ports["imap"], password)
        assert UNAVAILABLE in text and AUTH_FAILED not in text, (what, text)
    text = timed_refusal(pop3_refusal, mg.ports["pop3"], ALICE.password)
    assert text.startswith("b'-ERR [SYS/TEMP]"), (what, text)


def test_database_outage_is_unavailable_and_mailgate_recovers_by_itself(
    database: Server, dovecot_stores: DovecotStores, tmp_path: Path
) -> None:
    settings = {
        "shutdown_timeout": 2,
        # No cache: every login here must ask the database.
        "directory": {"url": database.url, "query_timeout": QUERY_TIMEOUT, "cache_ttl": 0},
        "throttle": NO_DELAYS,
    }
    workdir = tmp_path / "mailgate"
    config = write_config(workdir, settings)
    populate(config, dovecot_stores, {ALICE: ALICE.password})
    mg = start_mailgate(workdir, LISTENERS, settings)
    try:
        port = mg.ports["imap"]
        assert imap_subjects(port, ALICE.login, ALICE.password) == on("store1")

        database.signal(signal.SIGSTOP)  # frozen: connections open, no answers
        try:
            assert_unavailable(mg, "frozen")
        finally:
            database.signal(signal.SIGCONT)
        assert imap_subjects(port, ALICE.login, ALICE.password) == on("store1")

        database.stop()  # down: connections refused
        assert_unavailable(mg, "stopped")
        database.start()
        if database.kind == "postgresql":  # a new cluster: the data went with the old one
            populate(config, dovecot_stores, {ALICE: ALICE.password})
        assert imap_subjects(port, ALICE.login, ALICE.password) == on("store1")
        assert pop3_subjects(mg.ports["pop3"], ALICE.login, ALICE.password) == on("store1")
        assert AUTH_FAILED in imap_refusal(port, ALICE.login, WRONG)
        assert mg.alive()
    finally:
        mg.stop()
