"""Signals a running mailgate gets from operators and init systems (issue 7, item 7: SIGHUP
killed it). Real `mailgate serve` processes, one worker and a supervisor with two."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from e2e.mailgate_proc import running_mailgate
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


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found |= {int(child) for child in text}
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_does_no_harm(tmp_path: Path, workers: int) -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        config = {
            "auth_http": {"url": auth.url},
            "workers": workers,
            "throttle": {"enabled": False},
        }
        with running_mailgate(tmp_path, {"l": {"protocol": "imap"}}, config) as mg:
            time.sleep(0.5)  # the workers are up
            workers_before = children(mg.proc.pid)
            sock = raw_session(mg.ports["l"])
            sock.sendall(b"a LOGIN alice " + PASSWORD.encode() + b"\r\n")
            assert b"a OK" in read_until(sock, b"a OK")
            for _ in range(3):
                os.kill(mg.proc.pid, signal.SIGHUP)
                time.sleep(0.3)
            assert mg.alive()
            assert children(mg.proc.pid) == workers_before  # no orphaned or restarted workers
            sock.sendall(b"b NOOP\r\n")  # the relayed session was not touched
            assert b"b OK NOOP completed" in read_until(sock, b"b OK")
            assert raw_session(mg.ports["l"])  # and new clients are served
            sock.close()
            assert "reloading is not supported yet" in mg.log_text()
        assert mg.proc.returncode == 0
