"""Two real Dovecot stores in one pool, under a load of real IMAP sessions (imaplib threads):
one store stops (or hangs), clients get the other member (shared storage) or a fast
temporary failure (a user's own store), the store comes back, and its users return spread
over `reconnect_spread`, as the login timestamps in mailgate's log show.

No timing is asserted beyond "well under the backend's timeout": the ramp is checked from
the log, where each user's admission must follow their ramp position (a deterministic rule),
with a generous tolerance.
"""

from __future__ import annotations

import datetime as dt
import imaplib
import os
import re
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import FakeAuth, running_auth
from mailgate.backend.pools import ramp_position

from .conftest import peers, require
from .mailgate_proc import MailgateProcess, running_mailgate

USERS = {f"user{i:02d}@example.com": f"pw-{i}" for i in range(40)}
SPREAD = 4.0  # reconnect_spread of the pool under test
# A login that takes longer than this is not a "fast" failure: the backend's login_timeout
# is 3 s, and a refused login through mailgate takes a few milliseconds.
FAST = 0.5
# The ramp's tolerance, in share of users: log timestamps are the session's end (after the
# admission), so a user may only appear *later* than the rule says; this covers clock
# granularity (1 ms) and a loaded machine's scheduling.
TOLERANCE = 0.1
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class Attempt:
    user: str
    started: float  # time.time()
    took: float
    result: str  # "ok", or the server's words


@dataclass
class Load:
    """Threads logging in (LOGIN, SELECT INBOX, LOGOUT) as USERS in turn, until stopped."""

    port: int
    users: list[str]
    threads: int = 4
    attempts: list[Attempt] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for index in range(self.threads):
            worker = threading.Thread(target=self._run, args=(index,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def _run(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            user = self.users[turn % len(self.users)]
            turn += self.threads
            started = time.time()
            result = login_once(self.port, user)
            self.attempts.append(Attempt(user, started, time.time() - started, result))
            if result != "ok":
                time.sleep(0.05)  # as a client would, a little later

    def since(self, when: float) -> list[Attempt]:
        return [a for a in self.attempts if a.started >= when]


def login_once(port: int, user: str) -> str:
    try:
        with imaplib.IMAP4("127.0.0.1", port, timeout=15) as client:
            client.login(user, USERS[user])
            client.select("INBOX")
            client.logout()
            return "ok"
    except (imaplib.IMAP4.error, OSError) as e:
        return str(e) or type(e).__name__


def stamp(line: str) -> float:
    m = _STAMP.match(line)
    assert m, line
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def transition(mg: MailgateProcess, member: str, change: str, after: float = 0.0) -> float:
    """When the log says `backend stores/MEMBER: CHANGE`, the first time after `after`."""
    for line in mg.log_text().splitlines():
        if f"backend stores/{member}: {change}" in line and stamp(line) >= after:
            return stamp(line)
    raise AssertionError(f"no '{member}: {change}' in the log:\n{mg.log_tail(60)}")


def wait_for_transition(mg: MailgateProcess, member: str, change: str, after: float) -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return transition(mg, member, change, after)
        except AssertionError:
            time.sleep(0.1)
    return transition(mg, member, change, after)


def sessions_on(mg: MailgateProcess, member: str, after: float) -> list[tuple[float, str]]:
    """(end time, user) of every logged-in session on `member` that ended after `after`."""
    found = []
    for line in mg.log_text().splitlines():
        if "mailgate.session" in line and f" backend=stores/{member} " in line:
            user = re.search(r" user=(\S+) ", line)
            relayed = " in=" in line  # the login succeeded there
            if user and relayed and stamp(line) >= after:
                found.append((stamp(line), user.group(1)))
    return found


def check_ramp(on_b: list[tuple[float, str]], t_up: float, load: Load) -> None:
    """Every user seen on the member that came back was let in by the ramp's rule: at `t`
    seconds after, only users whose ramp position is below t / SPREAD (plus the tolerance).
    Not the half-open probes: logins let in before the member was up, which waited for it
    (one a `half_open_after`, so several while a member hangs longer) and whose success made
    it up. They end just after the transition, whoever their users."""
    probes = {a.user for a in load.attempts if a.started < t_up <= a.started + a.took}
    late = [
        (round(end - t_up, 3), user, round(ramp_position(user), 3))
        for end, user in sorted(on_b)
        if ramp_position(user) > (end - t_up) / SPREAD + TOLERANCE
        and not (user in probes and end - t_up < FAST)
    ]
    assert not late, f"users let in before their turn (seconds after up, user, position): {late}"


def start_store(workdir: Path, name: str, ports: dict[str, int], mail: Path) -> peers.Peer:
    return peers.start_dovecot(
        workdir, name, imap_port=ports["imap"], pop3_port=ports["pop3"], users=USERS,
        mail_dir=mail,
    )  # fmt: skip


@pytest.fixture
def two_stores(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Dovecots a and b on one shared mail directory, restartable on the same ports."""
    require("dovecot")
    mail = tmp_path / "shared-mail"
    mail.mkdir()
    ports = {n: {"imap": peers.free_port(), "pop3": peers.free_port()} for n in ("a", "b")}
    running = {n: start_store(tmp_path, n, ports[n], mail) for n in ("a", "b")}
    try:
        yield {"dir": tmp_path, "ports": ports, "peers": running, "mail": mail}
    finally:
        for peer in running.values():
            os.killpg(peer.pid, signal.SIGCONT) if peer.alive() else None
            peer.stop()


def pool_config(stores: dict[str, Any], shared: bool) -> dict[str, Any]:
    members = [
        {"host": "127.0.0.1", "imap": p["imap"], "pop3": p["pop3"], "name": n}
        for n, p in stores["ports"].items()
    ]
    return {
        "name": "stores",
        "members": members,
        "shared_storage": shared,
        "check_interval": 0.5,
        "check_timeout": 1.0,
        "failures_to_down": 2,
        "half_open_after": 1.0,
        "reconnect_spread": SPREAD,
    }


def mailgate(stores: dict[str, Any], auth_url: str, shared: bool) -> Any:
    config = {
        "auth_http": {"url": auth_url},
        # forward_client: Dovecot gets the client's address and the hops left (x-proxy-ttl)
        "backend": {"connect_timeout": 3.0, "login_timeout": 3.0, "forward_client": True},
        "throttle": {"enabled": False},
        "shutdown_timeout": 2,
        "pool": [pool_config(stores, shared)],
    }
    return running_mailgate(stores["dir"] / "mailgate", {"imap": {"protocol": "imap"}}, config)


def test_shared_storage_pool_survives_a_store_stopping_and_ramps_it_back(
    two_stores: dict[str, Any],
) -> None:
    def answer(_req: dict[str, str]) -> dict[str, str]:
        # The auth service names the pool (Auth-Server: a pool's name); the pool chooses.
        return {"Auth-Status": "OK", "Auth-Server": "stores", "Auth-Port": "143"}

    with running_auth(FakeAuth(answer)) as auth, mailgate(two_stores, auth.url, True) as mg:
        port = mg.ports["imap"]
        assert login_once(port, "user00@example.com") == "ok"  # starts the checks
        with Load(port, list(USERS)) as load:
            time.sleep(2)
            stopped = time.time()
            two_stores["peers"]["b"].stop()
            wait_for_transition(mg, "b", "up -> down", stopped)
            time.sleep(1)
            restarted = time.time()
            two_stores["peers"]["b"] = start_store(
                two_stores["dir"], "b", two_stores["ports"]["b"], two_stores["mail"]
            )
            t_up = wait_for_transition(mg, "b", "half-open -> up", restarted)
            time.sleep(SPREAD + 1.5)
        failures = [a for a in load.attempts if a.result != "ok"]
        assert not failures, f"{len(failures)} of {len(load.attempts)} failed: {failures[:5]}"
        during = [a for a in load.since(stopped) if a.started < restarted]
        assert during, "the load ran while b was down"
        on_b = sessions_on(mg, "b", t_up)
        check_ramp(on_b, t_up, load)
        back = {user for _, user in on_b}
        assert len(back) >= 5, f"logins return to b: {sorted(back)}"
        firsts = sorted(end - t_up for end, _ in on_b)
        print(
            f"\nshared pool: {len(load.attempts)} logins, 0 failed; b down at "
            f"{transition(mg, 'b', 'up -> down', stopped) - stopped:.2f} s after the stop;"
            f" {len(back)} users back on b, the first {firsts[0]:.2f} s after up"
        )


def test_own_store_pool_gives_fast_temporary_failures_while_a_store_hangs(
    two_stores: dict[str, Any],
) -> None:
    users = list(USERS)
    home = {u: ("a" if i < 20 else "b") for i, u in enumerate(users)}

    def answer(req: dict[str, str]) -> dict[str, str]:
        # The auth service names each user's own store by address, as nginx's auth does.
        user = req.get("Auth-User", "")
        ports = two_stores["ports"][home.get(user, "a")]
        return {"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": str(ports["imap"])}

    with running_auth(FakeAuth(answer)) as auth, mailgate(two_stores, auth.url, False) as mg:
        port = mg.ports["imap"]
        assert login_once(port, users[0]) == "ok"  # starts the checks
        b = two_stores["peers"]["b"]
        with Load(port, users, threads=4) as load:
            time.sleep(2)
            hung = time.time()
            os.killpg(b.pid, signal.SIGSTOP)  # b hangs: connects succeed, nothing answers
            t_down = wait_for_transition(mg, "b", "up -> down", hung)
            time.sleep(3)
            resumed = time.time()
            os.killpg(b.pid, signal.SIGCONT)
            t_up = wait_for_transition(mg, "b", "half-open -> up", resumed)
            time.sleep(SPREAD + 1.5)
        a_users = [a for a in load.attempts if home[a.user] == "a"]
        assert a_users and all(a.result == "ok" for a in a_users), "a's users are unaffected"
        fast = [a for a in load.since(t_down + 0.2) if home[a.user] == "b" and a.started < resumed]
        assert fast, "b's users tried while b was down"
        # Each is a fast temporary failure, but for the half-open probes (one a period of
        # half_open_after, if no check took it first): those wait, and may even succeed
        # when b resumes meanwhile.
        assert all("UNAVAILABLE" in a.result or a.result == "ok" for a in fast), fast[:5]
        probes = [a for a in fast if a.took >= FAST]
        assert len(probes) <= (resumed - t_down) / 1.0 + 1, probes
        took = sorted(a.took for a in fast)
        p95 = took[int(len(took) * 0.95) - 1] if len(took) > 1 else took[0]
        assert p95 < FAST, f"temporary failures while down took up to {took[-1]:.3f} s"
        slow = [a for a in load.since(hung) if home[a.user] == "b" and a.started < t_down]
        on_b = sessions_on(mg, "b", t_up)
        check_ramp(on_b, t_up, load)
        assert len({u for _, u in on_b}) >= 5, "b's users log in again"
        assert all(a.result == "ok" for a in load.since(t_up + SPREAD + 0.5))
        print(
            f"\nown-store pool: b marked down {t_down - hung:.2f} s after it hung"
            f" ({len(slow)} logins waited for it, up to"
            f" {max((a.took for a in slow), default=0):.2f} s);"
            f" then {len(fast)} temporary failures, median {statistics.median(took) * 1000:.1f}"
            f" ms, p95 {p95 * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms"
        )
