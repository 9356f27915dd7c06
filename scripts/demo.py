"""Run mailgate on its embedded default, for trying it with a real mail client.

Creates `demo/` next to this repository's README: a self-signed certificate, two Dovecot
mailstores on 127.0.0.1, a SQLite directory built with mailgate's own admin commands (two
domains, two users), and a mailgate.toml; then runs `mailgate serve` in the foreground.
Ctrl-C stops mailgate and the stores. Each run starts from scratch.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

ROOT = Path(__file__).resolve().parent.parent
# MAILGATE_DEMO_DIR lets the test of this script run beside a developer's own demo.
DEMO = Path(os.environ.get("MAILGATE_DEMO_DIR") or ROOT / "demo")
# user -> (password, home mailstore)
USERS = {
    "alice@example.com": ("alice-secret", "store1"),
    "bob@example.org": ("bob-secret", "store2"),
}
DOMAINS = {"example.com": "store1", "example.org": "store2"}
# mailstore -> (imap port, pop3 port): two Dovecots side by side on 127.0.0.1
STORES = {"store1": (10143, 10110), "store2": (11143, 11110)}
LISTEN = {"imap": 1143, "imaps": 1993, "pop3": 1110, "pop3s": 1995}

CONFIG = """\
# mailgate on its embedded default: the SQLite directory next to this file.
hostname = "localhost"
pid_file = "mailgate.pid"

[[listener]]
protocol = "imap"
listen = "127.0.0.1:{imap}"
tls = "starttls"

[[listener]]
protocol = "imap"
listen = "127.0.0.1:{imaps}"
tls = "implicit"

[[listener]]
protocol = "pop3"
listen = "127.0.0.1:{pop3}"
tls = "starttls"

[[listener]]
protocol = "pop3"
listen = "127.0.0.1:{pop3s}"
tls = "implicit"

[imap]
auth = ["login", "plain"]

[tls]
certificate = "cert.pem"
certificate_key = "key.pem"

[directory]
url = "sqlite:///directory.db"
"""


def mailgate(*args: str, stdin: str | None = None) -> None:
    cmd = [sys.executable, "-m", "mailgate", "-c", str(DEMO / "mailgate.toml"), *args]
    subprocess.run(cmd, input=stdin, text=True, check=True, stdout=subprocess.DEVNULL)


def certificate() -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
         "-keyout", str(DEMO / "key.pem"), "-out", str(DEMO / "cert.pem"),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip


def start_stores(master_password: str) -> list[peers.Peer]:
    started = []
    # mailgate logs in to the stores as their master user, so the users' own Dovecot
    # passwords are never used: give them random ones.
    users = {user: secrets.token_urlsafe(16) for user in USERS}
    for name, (imap_port, pop3_port) in STORES.items():
        peer = peers.start_dovecot(
            DEMO,
            name,
            imap_port=imap_port,
            pop3_port=pop3_port,
            users=users,
            master=(peers.MASTER_USER, master_password),
        )
        started.append(peer)
        for user, (_password, home) in USERS.items():
            if home == name:
                peers.deliver(peer, user, f"Welcome to {name}", f"{user} lives on {name}.\n")
    return started


def build_directory(master_password: str) -> None:
    mailgate("directory", "init")
    for name, (imap_port, pop3_port) in STORES.items():
        mailgate(
            "mailstore", "add", name, "--host", "127.0.0.1",
            "--imap-port", str(imap_port), "--pop3-port", str(pop3_port),
            "--master-user", peers.MASTER_USER, "--master-password-stdin",
            stdin=master_password + "\n",
        )  # fmt: skip
    for domain, store in DOMAINS.items():
        mailgate("domain", "add", domain, "--mailstore", store)
    for user, (password, _home) in USERS.items():
        mailgate("user", "add", user, "--password-stdin", stdin=password + "\n")


def check_ports() -> None:
    busy = [p for p in [*LISTEN.values(), *(p for ps in STORES.values() for p in ps)]
            if peers.port_open(p)]  # fmt: skip
    if busy:
        sys.exit(f"demo: ports already in use on 127.0.0.1: {busy}; is another demo running?")


def usage() -> str:
    return f"""
mailgate is running on its embedded default (SQLite directory, two Dovecot stores).
  alice@example.com / alice-secret   lives on store1
  bob@example.org   / bob-secret     lives on store2
Try (-k: the demo certificate is self-signed):
  curl -k --ssl-reqd 'imap://127.0.0.1:{LISTEN["imap"]}/INBOX;UID=1' \\
       -u alice@example.com:alice-secret
  curl -k 'imaps://127.0.0.1:{LISTEN["imaps"]}/INBOX;UID=1' -u bob@example.org:bob-secret
  curl -k 'pop3s://127.0.0.1:{LISTEN["pop3s"]}/1' -u bob@example.org:bob-secret
  openssl s_client -quiet -starttls imap -connect 127.0.0.1:{LISTEN["imap"]}
Directory: python -m mailgate -c demo/mailgate.toml user list
Ctrl-C stops everything.
"""


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # SIGTERM as well as Ctrl-C, and SIGINT even when started in the background (where a
    # shell leaves it ignored): the stores must always be stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    check_ports()
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    (DEMO / "mailgate.toml").write_text(CONFIG.format(**LISTEN))
    certificate()
    master_password = secrets.token_urlsafe(24)
    stores = start_stores(master_password)
    try:
        build_directory(master_password)
        print(usage(), flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "serve", "-c", str(DEMO / "mailgate.toml")],
            env=env,
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(40)
    finally:
        for peer in stores:
            with contextlib.suppress(Exception):
                peer.stop()


if __name__ == "__main__":
    raise SystemExit(main())
