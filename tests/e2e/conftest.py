"""Real peers for end-to-end tests: two Dovecot stores, MariaDB, PostgreSQL, Redis, nginx.

A missing binary skips the tests that need it, unless MAILGATE_REQUIRE_PEERS=1 (set in CI):
then it fails them, so that nothing is silently skipped there. The one exemption is a tool no
package registry carries, named by an environment variable (`optional_tool`): Dovecot's
imaptest, which is built from its source. Without the variable its tests skip, always.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # test modules here may `import peers` too
import peers  # noqa: E402

E2E_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class MailUser:
    login: str
    password: str
    home: str  # the store holding this user's message "on <home>"


ALICE = MailUser("alice@example.com", "alice-secret", "store1")
BOB = MailUser("bob@example.org", 'bob secret "quoted"', "store2")
PONY = MailUser("p%ony@example.com", "my little p%ony", "store1")


@dataclass(frozen=True)
class DovecotStores:
    """Two Dovecots that both know every user; only the home store has the user's message."""

    store1: peers.Peer
    store2: peers.Peer
    alice: MailUser = ALICE
    bob: MailUser = BOB
    pony: MailUser = PONY
    master_user: str = peers.MASTER_USER
    master_password: str = peers.MASTER_PASSWORD

    def __getitem__(self, name: str) -> peers.Peer:
        return {"store1": self.store1, "store2": self.store2}[name]

    @staticmethod
    def subject(store: str) -> str:
        """The subject of the message that proves a session landed on `store`."""
        return f"on {store}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def require(*binaries: str | Path) -> None:
    """Skip (or, with MAILGATE_REQUIRE_PEERS=1, fail) when a binary or file is missing."""
    missing = [str(b) for b in binaries if not peers.which(str(b))]
    if not missing:
        return
    message = f"needs {', '.join(missing)}; install with scripts/install-deps"
    if os.environ.get("MAILGATE_REQUIRE_PEERS") == "1":
        pytest.fail(f"{message} (MAILGATE_REQUIRE_PEERS=1)", pytrace=False)
    pytest.skip(message)


def optional_tool(variable: str, what: str) -> Path:
    """The executable named by $`variable`, or a skip even under MAILGATE_REQUIRE_PEERS=1.

    For tools that no package registry carries (scripts/install-deps cannot install them), so
    requiring them would make CI fail for want of a step it cannot take. A variable that is
    set but names no executable is a mistake, and fails."""
    value = os.environ.get(variable, "")
    if not value:
        pytest.skip(
            f"{variable} is not set: {what} is not in any package registry, so this test is "
            f"exempt from MAILGATE_REQUIRE_PEERS; set {variable}=/path/to/the/binary to run it"
        )
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{variable}={value} is not an executable file", pytrace=False)
    return path


@pytest.fixture(scope="session")
def peers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


def _start_store(workdir: Path, name: str, tls_files: tuple[Path, Path, Path]) -> peers.Peer:
    cert, key, _ = tls_files
    port = peers.free_port
    return peers.start_dovecot(
        workdir, name, imap_port=port(), pop3_port=port(), imaps_port=port(),
        pop3s_port=port(), users={u.login: u.password for u in (ALICE, BOB, PONY)},
        tls_cert=cert, tls_key=key,
    )  # fmt: skip


@pytest.fixture(scope="session")
def dovecot_stores(
    peers_dir: Path, server_cert: tuple[Path, Path, Path]
) -> Iterator[DovecotStores]:
    require("dovecot")
    started: list[peers.Peer] = []
    try:
        for name in ("store1", "store2"):
            started.append(_start_store(peers_dir, name, server_cert))
        stores = DovecotStores(store1=started[0], store2=started[1])
        for user in (ALICE, BOB, PONY):
            peers.deliver(stores[user.home], user.login, stores.subject(user.home))
        yield stores
    finally:
        for peer in started:
            peer.stop()


@pytest.fixture(scope="session")
def mariadb(peers_dir: Path) -> Iterator[peers.Peer]:
    """MariaDB: user root, no password, on 127.0.0.1:peer.ports["mysql"]."""
    require("mariadbd", "mariadb-install-db", "mariadb")
    peer = peers.start_mariadb(peers_dir, peers.free_port())
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def postgres(peers_dir: Path) -> Iterator[peers.Peer]:
    """PostgreSQL: user postgres, trust auth, on 127.0.0.1:peer.ports["postgres"]."""
    require(peers.postgres_bin("initdb") or "initdb", "psql")
    peer = peers.start_postgres(peers_dir, peers.free_port())
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def redis(peers_dir: Path) -> Iterator[peers.Peer]:
    """Redis on 127.0.0.1:peer.ports["redis"], no persistence."""
    require("redis-server")
    peer = peers.start_redis(peers_dir, peers.free_port())
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def nginx_available() -> Path:
    """The nginx binary, with its mail module present; start it with peers.start_nginx_*."""
    require("nginx", peers.NGINX_MAIL_MODULE)
    return Path(str(peers.which("nginx")))
