"""The real peers answer as the proxy's tests expect: users, stores, master logins, ID, TLS, SQL."""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from .conftest import DovecotStores, MailUser, require

# Dovecot's log process writes asynchronously; a line shows up within milliseconds.
LOG_WAIT = 5.0


def imap_subjects(imap: imaplib.IMAP4) -> list[str]:
    """Subjects of every message in INBOX."""
    _, count = imap.select("INBOX", readonly=True)
    if count == [b"0"]:
        return []
    _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    headers = [part[1] for part in data if isinstance(part, tuple)]
    return [h.decode().split(":", 1)[1].strip() for h in headers]


def imap_login(port: int, login: str, password: str) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    # imaplib sends the user name as it is; % is an atom-special, so quote it.
    imap.login(f'"{login}"', password)
    return imap


def wait_for_log(path: Path, needle: str) -> str:
    deadline = time.monotonic() + LOG_WAIT
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path}")


@pytest.mark.parametrize("user", ["alice", "bob", "pony"])
def test_imap_user_sees_only_the_message_of_the_store_they_are_on(
    dovecot_stores: DovecotStores, user: str
) -> None:
    who: MailUser = getattr(dovecot_stores, user)
    for store in ("store1", "store2"):
        imap = imap_login(dovecot_stores[store].ports["imap"], who.login, who.password)
        expected = [dovecot_stores.subject(store)] if store == who.home else []
        assert imap_subjects(imap) == expected
        imap.logout()


def test_pop3_password_with_space_and_quotes(dovecot_stores: DovecotStores) -> None:
    bob = dovecot_stores.bob
    pop = poplib.POP3("127.0.0.1", dovecot_stores.store2.ports["pop3"], timeout=10)
    pop.user(bob.login)
    pop.pass_(bob.password)
    assert b"Subject: on store2" in pop.retr(1)[1]
    pop.quit()


def test_wrong_password_is_refused_and_the_right_one_still_works(
    dovecot_stores: DovecotStores,
) -> None:
    alice, port = dovecot_stores.alice, dovecot_stores.store1.ports["imap"]
    for _ in range(3):
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(alice.login, "wrong")
        imap.shutdown()
    imap_login(port, alice.login, alice.password).logout()


@pytest.mark.parametrize("store", ["store1", "store2"])
def test_master_user_logs_in_as_any_user(dovecot_stores: DovecotStores, store: str) -> None:
    stores = dovecot_stores
    login = f"{stores.alice.login}*{stores.master_user}"
    imap = imap_login(stores[store].ports["imap"], login, stores.master_password)
    assert imap_subjects(imap) == ([stores.subject(store)] if store == "store1" else [])
    imap.logout()


def test_master_user_by_sasl_plain_authzid(dovecot_stores: DovecotStores) -> None:
    stores = dovecot_stores
    response = f"{stores.bob.login}\0{stores.master_user}\0{stores.master_password}".encode()
    imap = imaplib.IMAP4("127.0.0.1", stores.store2.ports["imap"], timeout=10)
    imap.authenticate("PLAIN", lambda _: response)
    assert imap_subjects(imap) == ["on store2"]
    imap.logout()


def test_imap_id_originating_ip_is_trusted(dovecot_stores: DovecotStores) -> None:
    store = dovecot_stores.store1
    imap = imaplib.IMAP4("127.0.0.1", store.ports["imap"], timeout=10)
    imap.xatom("ID", '("x-originating-ip" "192.0.2.77" "x-originating-port" "40001")')
    imap.login(dovecot_stores.alice.login, dovecot_stores.alice.password)
    imap.logout()
    line = wait_for_log(store.log_path, "rip=192.0.2.77")
    assert "Login: user=<alice@example.com>" in line


def test_implicit_tls_and_starttls(
    dovecot_stores: DovecotStores, client_tls_context: ssl.SSLContext
) -> None:
    store, alice = dovecot_stores.store1, dovecot_stores.alice
    imaps = imaplib.IMAP4_SSL(
        "localhost", store.ports["imaps"], ssl_context=client_tls_context, timeout=10
    )
    imaps.login(alice.login, alice.password)
    imaps.logout()
    pop = poplib.POP3("localhost", store.ports["pop3"], timeout=10)
    pop.stls(context=client_tls_context)
    pop.user(alice.login)
    assert pop.pass_(alice.password).startswith(b"+OK")
    pop.quit()


def test_mariadb_answers_over_tcp(mariadb: peers.Peer) -> None:
    import aiomysql

    async def query() -> tuple[int, ...]:
        conn = await aiomysql.connect(host="127.0.0.1", port=mariadb.ports["mysql"], user="root")
        async with conn.cursor() as cur:
            await cur.execute("SELECT 6 * 7")
            row = await cur.fetchone()
        conn.close()
        return tuple(row)

    assert asyncio.run(query()) == (42,)
    assert peers.mariadb_sql(mariadb, "SELECT 'ok'").strip() == "ok"


def test_postgres_answers_over_tcp(postgres: peers.Peer) -> None:
    import asyncpg

    async def query() -> int:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=postgres.ports["postgres"], user="postgres"
        )
        try:
            return int(await conn.fetchval("SELECT 6 * 7"))
        finally:
            await conn.close()

    assert asyncio.run(query()) == 42
    assert peers.postgres_sql(postgres, "SELECT 'ok'").strip() == "ok"


def test_redis_answers_ping(redis: peers.Peer) -> None:
    with socket.create_connection(("127.0.0.1", redis.ports["redis"]), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"


def test_nginx_mail_proxy_routes_by_auth_http(
    nginx_available: Path, dovecot_stores: DovecotStores, tmp_path: Path
) -> None:
    auth = peers.start_nginx_http_auth(
        tmp_path, port=peers.free_port(), backend_port=dovecot_stores.store2.ports["imap"]
    )
    try:
        proxy = peers.start_nginx_mail(
            tmp_path,
            imap_port=peers.free_port(),
            pop3_port=peers.free_port(),
            auth_url=f"127.0.0.1:{auth.ports['http']}/auth",
        )
        try:
            bob = dovecot_stores.bob
            imap = imap_login(proxy.ports["imap"], bob.login, bob.password)
            assert imap_subjects(imap) == ["on store2"]
            imap.logout()
        finally:
            proxy.stop()
    finally:
        auth.stop()
    assert not proxy.alive() and not auth.alive()


def test_cli_starts_delivers_and_stops(tmp_path: Path) -> None:
    require("dovecot")

    def cli(kind: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, peers.__file__, kind, "--dir", str(tmp_path), "--name", "s"]
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, timeout=60, check=True
        )

    imap_port, pop3_port = peers.free_port(), peers.free_port()
    started = cli("dovecot", "--imap-port", str(imap_port), "--pop3-port", str(pop3_port),
                  "--users", "carol@example.net:c p")  # fmt: skip
    peer = peers.Peer.from_json(started.stdout)
    try:
        assert peer.ports == {"imap": imap_port, "pop3": pop3_port}
        cli("deliver", "--user", "carol@example.net", "--subject", "via cli")
        imap = imap_login(imap_port, "carol@example.net", "c p")
        assert imap_subjects(imap) == ["via cli"]
        imap.logout()
    finally:
        cli("stop")
    assert not peer.alive()
    assert not (tmp_path / "s.peer.json").exists()


def test_missing_binary_skips_or_fails_by_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILGATE_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("no-such-peer-binary")
    monkeypatch.setenv("MAILGATE_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="no-such-peer-binary"):
        require("no-such-peer-binary")
