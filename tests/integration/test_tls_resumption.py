"""TLS session resumption through a real mailgate with two workers: a client that comes back
with the ticket it was given resumes, whichever worker takes the new connection (the workers
share the ticket keys), so a reconnecting mail client skips the expensive handshake."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from e2e.mailgate_proc import MailgateProcess, running_mailgate
from harness import FakeAuth, route_to, running_auth

RECONNECTS = 40


def greeting(
    mg: MailgateProcess, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", mg.ports["imaps"]), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    assert sock.recv(4096).startswith(b"* OK")  # TLS 1.3: the ticket comes with the data
    return sock


def test_a_ticket_resumes_on_every_worker(tmp_path: Path, server_cert: Any) -> None:
    with running_auth(FakeAuth(route_to(9))) as auth:
        config = {
            "auth_http": {"url": auth.url},
            "workers": 2,
            "tls": {"certificate": str(server_cert.cert), "certificate_key": str(server_cert.key)},
        }
        listeners = {"imaps": {"protocol": "imap", "tls": "implicit"}}
        with running_mailgate(tmp_path, listeners, config) as mg:
            ctx = ssl.create_default_context(cafile=str(server_cert.ca))
            with greeting(mg, ctx, None) as first:
                session = first.session
            since = mg.log_size()
            resumed = []
            for _ in range(RECONNECTS):
                with greeting(mg, ctx, session) as again:
                    resumed.append(again.session_reused)
                    again.sendall(b"a LOGOUT\r\n")
                    again.recv(4096)
            pids = {
                s.text.split("[", 1)[1].split("]", 1)[0]
                for s in mg.wait_for_sessions(lambda s: True, since=since)
            }
            assert all(resumed), f"{resumed.count(False)} of {RECONNECTS} were full handshakes"
            assert len(pids) == 2, f"the connections reached only the workers {pids}"
