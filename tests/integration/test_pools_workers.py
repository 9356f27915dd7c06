"""Backend health is one truth per node, whatever the number of workers: what one worker's
login learns, and what the operator commands, holds in every worker at once, and survives a
reload. Real mailgate processes (a supervisor and two workers), fake backends that count
the connections they get."""

from __future__ import annotations

import imaplib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_pools_proxy import imap_login, imap_server, port_of

from e2e.mailgate_proc import MailgateProcess, running_mailgate
from harness import FakeAuth, route_to, running_auth

SRC = Path(__file__).resolve().parents[2] / "src"
FAST = 0.5  # a login the pool refuses takes milliseconds; one tried on the member, 1 s


def mailgate_cli(mg: MailgateProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "mailgate", "-c", str(mg.config_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def pool_config(auth_url: str, pool: dict[str, Any]) -> dict[str, Any]:
    return {
        "auth_http": {"url": auth_url},
        "workers": 2,
        "backend": {"connect_timeout": 1.0, "login_timeout": 1.0},
        "throttle": {"enabled": False},
        "shutdown_timeout": 2,
        "pool": [pool],
    }


def on_every_worker(
    mg: MailgateProcess, login: Callable[[str], tuple[str, float]], tries: int = 200
) -> list[tuple[str, float]]:
    """Log in on fresh connections until both workers served at least two logins (the log's
    session lines name the worker's pid); returns every (result, seconds)."""
    since = mg.log_size()
    results = []
    for i in range(tries):
        results.append(login(f"user{i}"))
        pids = [s.text.split("[", 1)[1].split("]", 1)[0] for s in mg.session_lines(since)]
        if len(set(pids)) == 2 and min(pids.count(p) for p in set(pids)) >= 2:
            return results
        time.sleep(0.02)
    raise AssertionError(f"the logins did not reach both workers: {pids}")


def wait_for_log(mg: MailgateProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in mg.log_text():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{mg.log_tail()}"
        time.sleep(0.05)


def test_what_one_worker_learns_every_worker_knows_and_a_reload_keeps(tmp_path: Path) -> None:
    with imap_server(greet=False) as hung, running_auth(FakeAuth(route_to(port_of(hung)))) as a:
        member = f"127.0.0.1:{port_of(hung)}"
        # No active checks: only the logins can find the member hung.
        pool = {"name": "stores", "members": [member], "check_interval": 0}
        pool |= {"failures_to_down": 1, "half_open_after": 600}
        with running_mailgate(
            tmp_path, {"imap": {"protocol": "imap"}}, pool_config(a.url, pool)
        ) as mg:
            result, took = imap_login(mg.ports["imap"])
            assert took >= 1.0 and "UNAVAILABLE" in result, (result, took)
            wait_for_log(mg, f"backend stores/{member}: up -> down")
            for result, took in on_every_worker(mg, lambda u: imap_login(mg.ports["imap"], u)):
                assert "UNAVAILABLE" in result and took < FAST, (result, took)
            assert hung.accepted == 1  # the other worker never tried it
            done = mailgate_cli(mg, "reload")
            assert done.returncode == 0, done.stderr
            for result, took in on_every_worker(mg, lambda u: imap_login(mg.ports["imap"], u)):
                assert "UNAVAILABLE" in result and took < FAST, (result, took)
            assert hung.accepted == 1  # the new generation started from what the old knew


def test_the_operators_drain_holds_in_every_worker_and_sessions_are_summed(
    tmp_path: Path,
) -> None:
    with imap_server() as one, imap_server() as two:
        members = [f"127.0.0.1:{port_of(s)}" for s in (one, two)]
        with running_auth(FakeAuth(route_to(143, host="stores"))) as auth:
            pool = {"name": "stores", "members": members, "check_interval": 0}
            pool |= {"shared_storage": True, "reconnect_spread": 0}
            config = pool_config(auth.url, pool)
            with running_mailgate(tmp_path, {"imap": {"protocol": "imap"}}, config) as mg:
                done = mailgate_cli(mg, "backend", "drain", f"stores/{members[1]}")
                assert done.returncode == 0, done.stderr
                before = two.accepted
                results = on_every_worker(mg, lambda u: imap_login(mg.ports["imap"], u))
                assert all(r == "ok" for r, _ in results), results
                assert two.accepted == before, "a worker sent a login to the drained member"
                held = hold_sessions(mg)
                try:
                    listed = backend_list(mg)
                    assert listed[members[0]] == len(held), listed  # both workers' sessions
                finally:
                    for client in held:
                        client.logout()
                assert mailgate_cli(mg, "backend", "up", f"stores/{members[1]}").returncode == 0
                results = on_every_worker(mg, lambda u: imap_login(mg.ports["imap"], u))
                assert all(r == "ok" for r, _ in results)
                assert two.accepted > before, "the member came back for the users it owns"


def hold_sessions(mg: MailgateProcess, tries: int = 100) -> list[imaplib.IMAP4]:
    """Logged-in sessions held open, new connections until both workers hold two."""
    held: list[imaplib.IMAP4] = []
    for i in range(tries):
        client = imaplib.IMAP4("127.0.0.1", mg.ports["imap"], timeout=10)
        client.login(f"held{i}", "pw")
        held.append(client)
        pids = [s["pid"] for s in json.loads(mailgate_cli(mg, "who", "--json").stdout)]
        if len(set(pids)) == 2 and min(pids.count(p) for p in set(pids)) >= 2:
            return held
    raise AssertionError("the sessions did not reach both workers")


def backend_list(mg: MailgateProcess) -> dict[str, int]:
    done = mailgate_cli(mg, "backend", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {m["member"]: m["sessions"] for m in json.loads(done.stdout)}
