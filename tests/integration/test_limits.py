"""Limits that hold against a real attacker (issue 8): parallel guesses against real mailgate
processes with one, two and four workers, from one address and from hundreds; session limits
per user across workers, and leases that go with a worker that dies.

The auth service counts what reaches the password check: that is the budget's measure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from e2e.mailgate_proc import running_mailgate
from guessing import BUDGET, RIGHT, VICTIM, attack, deciding
from harness import FakeAuth, imap_backend, raw_session, read_until, running_auth, running_backend


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("sources", ["one address", "many addresses"])
def test_parallel_guesses_never_pass_the_budget(tmp_path: Path, workers: int, sources: str) -> None:
    with running_backend(imap_backend(RIGHT)) as backend:
        fake = FakeAuth(deciding(backend.port), delay=0.1)  # checks overlap
        with running_auth(fake) as auth:
            config = {
                "auth_http": {"url": auth.url, "timeout": 20.0},
                "workers": workers,
                "throttle": {
                    "lockout_after": BUDGET,
                    "free": 1000,  # no delays: the budget alone must hold
                    "concurrent_per_user": 1000,
                    "concurrent_per_ip": 1000,
                },
                "imap": {"login_timeout": 60.0},
            }
            with running_mailgate(tmp_path, {"l": {"protocol": "imap"}}, config) as mg:
                replies = asyncio.run(attack(mg.ports["l"], sources == "many addresses"))
    checked = [r for r in fake.requests if r.get("Auth-User") == VICTIM]
    assert len(checked) <= BUDGET, f"{len(checked)} guesses reached the password check"
    assert not any(b" OK " in reply for reply in replies)  # the right password did not get in
    assert all(reply.startswith(b"a NO ") for reply in replies)


def test_the_session_limit_per_user_holds_across_workers_and_frees_with_a_dead_worker(
    tmp_path: Path,
) -> None:
    with (
        running_backend(imap_backend(RIGHT)) as backend,
        running_auth(FakeAuth(deciding(backend.port))) as auth,
    ):
        config = {
            "auth_http": {"url": auth.url},
            "workers": 2,
            "limits": {"per_user": 3},
            "shutdown_timeout": 1.0,
        }
        with running_mailgate(tmp_path, {"l": {"protocol": "imap"}}, config) as mg:
            sessions = []
            for _ in range(6):  # spread over both workers by the kernel
                sock = raw_session(mg.ports["l"])
                sock.sendall(b'a LOGIN "%s" "%s"\r\n' % (VICTIM.encode(), RIGHT.encode()))
                sessions.append((sock, read_until(sock, b"\r\n")))
            ok = [s for s, reply in sessions if reply.startswith(b"a OK")]
            limited = [r for _, r in sessions if b"[LIMIT]" in r]
            assert len(ok) == 3 and len(limited) == 3, [r for _, r in sessions]
            assert limited[0] == b"a NO [LIMIT] Too many sessions, try again later\r\n"
            # A logged-out session gives its place back.
            ok[0].sendall(b"z LOGOUT\r\n")
            read_until(ok[0], b"z OK")
            ok[0].close()
            assert wait_for_login(mg.ports["l"], expect=b"a OK")
            # A worker killed with its sessions frees their places.
            for worker in mg.workers():
                os.kill(worker, signal.SIGKILL)
            assert wait_for_login(mg.ports["l"], expect=b"a OK", limit=15.0)
            assert "limits: refusing" in mg.log_text()


def wait_for_login(port: int, expect: bytes, limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            sock = raw_session(port)
        except OSError:
            time.sleep(0.2)
            continue
        sock.sendall(b'a LOGIN "%s" "%s"\r\n' % (VICTIM.encode(), RIGHT.encode()))
        if read_until(sock, b"\r\n").startswith(expect):
            return True
        sock.close()
        time.sleep(0.2)
    return False
