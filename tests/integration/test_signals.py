"""Reloads and signals a running mailgate gets from operators and init systems. Real
`mailgate serve` processes: a supervisor with one and with two workers.

SIGHUP used to kill mailgate (issue 7, item 7); now it reloads (issue 9, item 1).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.mailgate_proc import SRC, MailgateProcess, running_mailgate
from harness import (
    FakeAuth,
    imap_backend,
    raw_session,
    read_until,
    route_to,
    running_auth,
    running_backend,
)

PASSWORD = "secret"


def mailgate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "mailgate", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def wait_for(condition, limit: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def logged_in(mg: MailgateProcess):  # type: ignore[no-untyped-def]
    sock = raw_session(mg.ports["l"])
    sock.sendall(b"a LOGIN alice " + PASSWORD.encode() + b"\r\n")
    assert b"a OK" in read_until(sock, b"a OK")
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_without_touching_relayed_sessions(tmp_path: Path, workers: int) -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        config = {"auth_http": {"url": auth.url}, "workers": workers}
        with running_mailgate(tmp_path, {"l": {"protocol": "imap"}}, config) as mg:
            assert wait_for(lambda: len(mg.workers()) == workers)
            old = mg.workers()
            sock = logged_in(mg)
            for generation in (2, 3, 4):
                os.kill(mg.proc.pid, signal.SIGHUP)
                assert wait_for(lambda g=generation: f"generation {g} is live" in mg.log_text())
            assert mg.alive()
            sock.sendall(b"b NOOP\r\n")  # the relayed session was not touched
            assert b"b OK NOOP completed" in read_until(sock, b"b OK")
            assert logged_in(mg)  # new clients are served, by the new workers
            sock.close()
            # The old workers drained and exited; a new set serves.
            assert wait_for(lambda: len(mg.workers()) == workers and not mg.workers() & old)
        assert mg.proc.returncode == 0


def test_mailgate_reload_applies_a_good_config_and_refuses_a_bad_one(tmp_path: Path) -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        config = {"auth_http": {"url": auth.url}, "imap": {"greeting": "before"}}
        with running_mailgate(tmp_path, {"l": {"protocol": "imap"}}, config) as mg:
            assert greeting(mg).endswith(b"before\r\n")
            text = mg.config_path.read_text()
            mg.config_path.write_text(text.replace('"before"', '"after"'))
            done = mailgate(mg.config_path, "reload")
            assert done.returncode == 0, done.stderr
            assert "generation 2 is live" in done.stdout
            assert greeting(mg).endswith(b"after\r\n")
            mg.config_path.write_text(text.replace('"greeting" = "before"', '"greeting" = 42'))
            done = mailgate(mg.config_path, "reload")
            assert done.returncode == 1
            assert "imap.greeting: must be str" in done.stderr
            assert greeting(mg).endswith(b"after\r\n")
            assert "the new configuration was not applied" in mg.log_text()


def greeting(mg: MailgateProcess) -> bytes:
    with socket.create_connection(("127.0.0.1", mg.ports["l"]), timeout=10) as sock:
        return read_until(sock, b"\r\n")
