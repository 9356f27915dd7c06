"""What an operator's Prometheus scrapes from a real mailgate with two workers: the supervisor
sums the workers' counts, and sessions open now are counted while they are open."""

from __future__ import annotations

import imaplib
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from e2e.mailgate_proc import running_mailgate
from harness import FakeAuth, free_port, imap_backend, route_to, running_auth, running_backend

PASSWORD = "pw"
LOGINS = 12


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_for(port: int, name: str, value: float, limit: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + limit
    while True:
        samples = scrape(port)
        if samples.get(name) == value or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_the_supervisor_serves_every_workers_counts(tmp_path: Path, server_cert: Any) -> None:
    metrics_port = free_port()
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        config = {
            "auth_http": {"url": auth.url},
            "workers": 2,
            "metrics_listen": f"127.0.0.1:{metrics_port}",
            "throttle": {"enabled": False},
            "shutdown_timeout": 2,
            "tls": {"certificate": str(server_cert.cert), "certificate_key": str(server_cert.key)},
        }
        listeners = {"l": {"protocol": "imap"}, "tls": {"protocol": "imap", "tls": "implicit"}}
        with running_mailgate(tmp_path, listeners, config) as mg:
            with socket.create_connection(("127.0.0.1", mg.ports["tls"]), timeout=10) as bad:
                bad.sendall(b"\x16\x03\x01\x00\x05hello")  # a handshake record of garbage
                bad.recv(100)
            for i in range(LOGINS):
                with imaplib.IMAP4("127.0.0.1", mg.ports["l"], timeout=10) as client:
                    client.login(f"user{i}", PASSWORD)
                    client.logout()
            held = imaplib.IMAP4("127.0.0.1", mg.ports["l"], timeout=10)
            held.login("held", PASSWORD)
            ok = 'mailgate_logins_total{protocol="imap",result="ok"}'
            relayed = 'mailgate_active_sessions{phase="relay"}'
            samples = wait_for(metrics_port, ok, LOGINS + 1)
            assert samples.get(ok) == LOGINS + 1, {
                k: v for k, v in samples.items() if "mailgate" in k
            }
            assert wait_for(metrics_port, relayed, 1).get(relayed) == 1
            decided = 'mailgate_auth_duration_seconds_count{protocol="imap",result="ok"}'
            assert samples.get(decided) == LOGINS + 1
            failed = 'mailgate_tls_handshake_failures_total{kind="implicit",protocol="imap"}'
            assert samples.get(failed) == 1
            held.logout()
            assert wait_for(metrics_port, relayed, 0).get(relayed) == 0
