"""Three mailgate nodes as one, all of it real: each node in its own Linux network namespace
with its own address, behind a real HAProxy (examples/haproxy-cluster.cfg as shipped, only
its addresses changed: send-proxy-v2, httpchk on /healthz), one real Redis, a real PostgreSQL
directory, and two real Dovecots sharing one mail directory (a pool with affinity).

Whether a user was ever on two stores at once is read from the stores' own logs (Dovecot's
login and disconnect lines, microsecond timestamps), never from mailgate's.

The scenarios run in this order on one cluster: spreading and health checks; one user through
every node at once; the per-user limit, who and kick across nodes; a user move; a store
drained under load; Redis stopped and started under load; a node shutting down (the balancer
stops sending first); a node killed under load (its leases expire).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import netns
from .clusterkit import WAIT, Imap, admin_here, control, login_once, wait_until
from .conftest import peers, require
from .mailgate_proc import SRC, to_toml

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_EXAMPLE = ROOT / "examples" / "haproxy-cluster.cfg"
NODES = 3
USERS = {f"user{i:02d}@example.com": f"pw-{i:02d}" for i in range(48)}
LEASE = 4.0  # [cluster] lease: a dead node's sessions are freed within this (plus a beat)
# The drain test's idle users hold one session per node and log in again in a loop: that
# session and the one before it, whose lease is given back in the next batch (10 ms after it
# ended), must fit; at exactly the limit such a reconnect is refused now and then.
PER_USER = 5
MOVE_DELAY = 0.5
_STAMP = "%Y-%m-%d %H:%M:%S.%f"
# Dovecot's default login line with the client's port (mailgate forwards it): the split
# check's report finds the node's session line by it.
_LOGIN_FORMAT = (
    "login_log_format_elements = user=<%u> method=%m rip=%r rport=%{rport} lip=%l mpid=%e "
    "%c session=<%{session}>\n"
)
_LOGIN = re.compile(r"^(\S+ \S+) imap-login: Info: Login: user=<([^>]*)>.*session=<([^>]+)>")
# A session's end, by the session id its imap process writes into the line itself: under
# load Dovecot's log process now and then writes an ending without the process's
# "imap(user)<pid><session>" prefix ("imap: Info: Disconnected: Logged out ..."; caught on
# this box by a drain stress run), and that session then looked open for good: a split that
# never was (mailgate had logged the session's end, the process was gone).
_LOGOUT_FORMAT = "imap_logout_format = in=%i out=%o session=<%{session}>\n"
_END = re.compile(
    r"^(\S+ \S+) imap(?:\([^)]*\)<\d+><[^>]+>)?: Info: Disconnected.* session=<([^>]+)>$"
)
_STORE_CONF = (
    f'log_timestamp = "{_STAMP.replace("%f", "%{usecs}")} "\n{_LOGIN_FORMAT}{_LOGOUT_FORMAT}'
)


@dataclass
class Node:
    index: int
    address: str
    workdir: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def config(self) -> Path:
        return self.workdir / "mailgate.toml"

    @property
    def log(self) -> Path:
        return self.workdir / "mailgate.log"

    def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
        }
        env.pop("NOTIFY_SOCKET", None)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True,
            )  # fmt: skip

    def health(self) -> int:
        """The /healthz status, 0 when nothing answers."""
        try:
            with socket.create_connection((self.address, 9180), timeout=2) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                return int(sock.recv(64).split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    def wait_healthy(self) -> None:
        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            return self.health() == 200

        wait_until(up, f"{self.name} is healthy", limit=40)

    def ask(self, **message: Any) -> dict[str, Any]:
        return control(self.workdir / "control.sock", **message)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """To the whole node (SIGKILL: a box gone), or as systemd's KillMode=mixed of the
        shipped unit sends SIGTERM: to the supervisor only, which stops its workers after
        drain_delay (a SIGTERM to every process stops the workers at once, without it)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            else:
                os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class Cluster:
    lab: netns.Lab
    workdir: Path
    nodes: list[Node]
    stores: dict[str, peers.Peer]
    redis: peers.Peer
    haproxy: peers.Peer
    cert: Any
    admin: Path
    front: dict[str, int] = field(default_factory=dict)

    def node(self, index: int) -> Node:
        return self.nodes[index - 1]

    def store_log(self, name: str) -> str:
        return self.stores[name].log_path.read_text(errors="replace")

    def intervals(self) -> dict[str, list[tuple[str, float, float, str]]]:
        """Per user, every session the stores logged: (store, login, disconnect or now, id)."""
        found: dict[str, list[tuple[str, float, float, str]]] = {}
        for store in self.stores:
            # Paired by session id, not in the log's order: Dovecot's log process writes what
            # its login and imap processes send as it reads their pipes, so a short session's
            # "Disconnected" can come before its "Login" (seen under load; that session then
            # looked open for good, a split that never was).
            logins: dict[str, tuple[str, float]] = {}
            ends: dict[str, float] = {}
            for line in self.store_log(store).splitlines():
                if m := _LOGIN.match(line):
                    logins[m.group(3)] = (m.group(2), _stamp(m.group(1)))
                elif m := _END.match(line):
                    ends[m.group(2)] = _stamp(m.group(1))
            for session, (user, start) in logins.items():
                end = ends.get(session, time.time() + 3600)
                found.setdefault(user, []).append((store, start, max(start, end), session))
        return found

    def assert_never_split(self, *loads: Load) -> None:
        """No user was on both stores at any moment, by the stores' own logs."""
        split = []
        for user, sessions in self.intervals().items():
            on_a = [(s, e, i) for store, s, e, i in sessions if store == "a"]
            on_b = [(s, e, i) for store, s, e, i in sessions if store == "b"]
            for a_start, a_end, a_id in on_a:
                for b_start, b_end, b_id in on_b:
                    if a_start < b_end and b_start < a_end:
                        split.append((user, a_start, a_end, a_id, b_start, b_end, b_id))
        if split:
            shown = [(u, _hms(s1), _hms(e1), _hms(s2), _hms(e2))
                     for u, s1, e1, _, s2, e2, _ in split[:5]]  # fmt: skip
            report = self.explain_split(split[0], loads)
            raise AssertionError(f"users on both stores at once (a from-to, b from-to): "
                                 f"{shown}\n{report}")  # fmt: skip

    def explain_split(self, split: tuple[Any, ...], loads: tuple[Load, ...] = ()) -> str:
        """What the stores and the nodes logged about the first split: its two sessions'
        store lines, the nodes' lines for their clients, cluster events near them, and the
        test clients' attempts (start, end, result, port) for the user around then."""
        user, a_start, _, a_id, b_start, _, b_id = split
        out = []
        ports, processes = set(), set()
        for store, sid in (("a", a_id), ("b", b_id)):
            for line in self.store_log(store).splitlines():
                if f"<{sid}>" in line:
                    out.append(f"store {store}: {line}")
                    if m := re.search(r"rport=(\d+)", line):
                        ports.add(m.group(1))
                    if m := re.search(r"mpid=(\d+)", line):
                        processes.add(m.group(1))
        # The stores' imap processes of the two sessions, if still there, and their sockets:
        # ESTAB means mailgate still holds the connection, CLOSE-WAIT that Dovecot has not
        # noticed it closing.
        for pid in processes:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                ps = ["ps", "-o", "pid,stat,etime,wchan:30,args", "-p", pid]
                out.append(subprocess.run(ps, capture_output=True, text=True).stdout.strip())
                sockets = subprocess.run(["ss", "-tanp"], capture_output=True, text=True)
                out += [line for line in sockets.stdout.splitlines() if f"pid={pid}," in line]
        near = (min(a_start, b_start) - 5, max(a_start, b_start) + 5)
        events = re.compile(r"Redis|affinity|kicked|cluster:|moving|moved|no backend")
        for node in self.nodes:
            for line in node.log_text().splitlines():
                stamp = _node_stamp(line)
                if stamp is None or not near[0] <= stamp <= near[1]:
                    continue
                mine = any(f":{port} " in line for port in ports)
                if mine or (events.search(line) and (user in line or "Redis" in line)):
                    out.append(f"{node.name}: {line}")
        for load in loads:
            for started, ended, who_, result, port in load.trace:
                if who_ == user and (near[0] <= started <= near[1] or str(port) in ports):
                    out.append(f"client {_hms(started)}-{_hms(ended)} port {port}: {result}")
        with contextlib.suppress(Exception):  # and what the nodes hold of the user now
            out.append(f"who {user}: {who(self, 1, user=user)}")
        return "\n".join(out[-80:])

    def imap(self, node: int | None = None, tls: bool = False) -> Imap:
        """A client session: straight to a node's own listener, or through HAProxy."""
        if node is not None:
            return Imap(self.node(node).address, 1143)
        if not tls:
            return Imap("127.0.0.1", self.front["imap"])
        context = ssl.create_default_context(cafile=str(self.cert.ca))
        return TlsImap("127.0.0.1", self.front["imaps"], context)


class TlsImap(Imap):
    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection((host, port), timeout=WAIT)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.buffer = b""
        self.greeting = self.line()


def _stamp(text: str) -> float:
    return dt.datetime.strptime(text, _STAMP).timestamp()


def _node_stamp(line: str) -> float | None:
    """The time of a mailgate log line ("2026-01-02 03:04:05,678 ..."), None if it has none."""
    try:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def _hms(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")


# --- setting it up -----------------------------------------------------------------------------


def node_settings(
    cluster_dir: Path, lab: netns.Lab, index: int, ports: dict[str, int], cert: Any
) -> dict[str, Any]:
    address, hub = lab.address(index), lab.hub
    proxied = {"proxy_protocol": True, "trusted_proxies": [f"{hub}/32"]}
    return {
        "hostname": "mail.example.com",
        "workers": 2 if index == 1 else 1,
        "health_listen": f"{address}:9180",
        "drain_delay": 3,
        "shutdown_timeout": 2,
        "control_socket": str(cluster_dir / f"node{index}" / "control.sock"),
        "tls": {"certificate": str(cert.cert), "certificate_key": str(cert.key)},
        "directory": {
            "url": f"postgresql+asyncpg://postgres@{hub}:{ports['postgres']}/mailgate",
            "cache_ttl": 60,
        },
        "throttle": {"free": 50, "base_delay": 0.0},
        # Every test client is 127.0.0.1 (through HAProxy) or the hub (straight in).
        "trusted_networks": ["127.0.0.0/8", f"{hub}/32"],
        "limits": {"per_user": PER_USER},
        "backend": {"forward_client": True, "connect_timeout": 3.0, "login_timeout": 3.0},
        "cluster": {
            "redis_url": f"redis://{hub}:{ports['redis']}/0",
            "node_name": f"node{index}",
            "lease": LEASE,
            "timeout": 1.0,
            "move_delay": MOVE_DELAY,
            "move_timeout": 15,
        },
        "pool": [
            {
                "name": "stores",
                "members": [
                    {"name": name, "host": hub, "imap": ports[f"imap-{name}"]}
                    for name in ("a", "b")
                ],
                "shared_storage": True,
                "affinity": True,
                "user_expire": 600,
                "check_interval": 0.5,
                "failures_to_down": 2,
                "half_open_after": 2,
                "reconnect_spread": 0,
            }
        ],
        "listener": [
            {"protocol": "imap", "listen": f"{address}:143", **proxied},
            {"protocol": "imap", "listen": f"{address}:993", "tls": "implicit", **proxied},
            {"protocol": "imap", "listen": f"{address}:1143"},  # the tests' own way in
        ],
    }


def haproxy_config(lab: netns.Lab, front: dict[str, int]) -> str:
    """The shipped example, with this lab's addresses and free local ports for the frontends."""
    text = HAPROXY_EXAMPLE.read_text()
    text = text.replace("192.0.2.10:143", f"127.0.0.1:{front['imap']}")
    text = text.replace("192.0.2.10:993", f"127.0.0.1:{front['imaps']}")
    base = lab.hub.rsplit(".", 1)[0]
    assert "10.0.0.11" in text
    return text.replace("10.0.0.", base + ".")


def populate(admin: Path, store_host: str) -> None:
    admin_here(admin, "directory", "init")
    admin_here(admin, "mailstore", "add", "pooled", "--host", store_host, "--pool", "stores")
    admin_here(admin, "domain", "add", "example.com", "--mailstore", "pooled")
    for user, password in USERS.items():
        admin_here(admin, "user", "add", user, "--scheme", "PLAIN", "--password-stdin",
                   stdin=f"{password}\n")  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, server_cert: Any) -> Iterator[Cluster]:
    netns.require_root()
    require("redis-server", "dovecot", "haproxy", peers.postgres_bin("initdb") or "initdb", "psql")
    workdir = tmp_path_factory.mktemp("cluster")
    lab = netns.make_lab(NODES)
    started: list[Any] = []
    nodes: list[Node] = []
    try:
        hub = lab.hub
        ports = {
            k: peers.free_port()
            for k in ("postgres", "redis", "imap-a", "imap-b", "pop3-a", "pop3-b")
        }
        pg = peers.start_postgres(
            workdir, ports["postgres"], listen=("127.0.0.1", hub), trust=(str(lab.net),)
        )
        started.append(pg)
        peers.postgres_sql(pg, "CREATE DATABASE mailgate")
        redis = peers.start_redis(workdir, ports["redis"], bind=("127.0.0.1", hub))
        started.append(redis)
        mail = workdir / "shared-mail"
        mail.mkdir()
        stores = {}
        for name in ("a", "b"):
            stores[name] = peers.start_dovecot(
                workdir, f"store-{name}", imap_port=ports[f"imap-{name}"],
                pop3_port=ports[f"pop3-{name}"], users=USERS, mail_dir=mail,
                listen=f"127.0.0.1, {hub}", trusted_networks=f"127.0.0.0/8 {lab.net}",
                extra_conf=_STORE_CONF,
            )  # fmt: skip
            started.append(stores[name])
        admin = workdir / "admin.toml"
        admin_settings = node_settings(workdir, lab, 1, ports, server_cert)
        admin_settings["directory"]["url"] = (
            f"postgresql+asyncpg://postgres@127.0.0.1:{ports['postgres']}/mailgate"
        )
        admin.write_text(to_toml(admin_settings))
        populate(admin, hub)
        for index in range(1, NODES + 1):
            node_dir = workdir / f"node{index}"
            node_dir.mkdir()
            argv = lab.exec_argv(
                index,
                [sys.executable, "-m", "mailgate", "serve", "-c", str(node_dir / "mailgate.toml")],
            )
            node = Node(index, lab.address(index), node_dir, argv)
            node.config.write_text(to_toml(node_settings(workdir, lab, index, ports, server_cert)))
            nodes.append(node)
            node.start()
        for node in nodes:
            node.wait_healthy()
        front = {"imap": peers.free_port(), "imaps": peers.free_port()}
        haproxy = peers.start_haproxy_config(workdir, haproxy_config(lab, front), front)
        started.append(haproxy)
        # Every node answered /healthz before HAProxy started: its servers start up.
        yield Cluster(lab, workdir, nodes, stores, redis, haproxy, server_cert, admin, front)
    finally:
        for node in nodes:
            node.stop()
        for peer in reversed(started):
            with contextlib.suppress(Exception):
                peer.stop()
        netns.destroy(lab)


def haproxy_log(c: Cluster) -> str:
    return c.haproxy.log_path.read_text(errors="replace")


@dataclass
class Load:
    """Threads logging in through HAProxy (or straight to nodes) as `users` in turn: LOGIN,
    SELECT INBOX, a short pause, LOGOUT; and a wrong password now and then."""

    connect: Callable[[], Imap]
    users: list[str]
    threads: int = 4
    hold: float = 0.1
    wrong_every: int = 0
    results: list[tuple[float, str, str]] = field(default_factory=list)  # (time, user, result)
    # (started, ended, user, result, the client's port: the stores log it as rport)
    trace: list[tuple[float, float, str, str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for index in range(self.threads):
            t = threading.Thread(target=self._run, args=(index,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(WAIT)

    def _run(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            user = self.users[turn % len(self.users)]
            turn += self.threads
            wrong = bool(self.wrong_every) and turn % self.wrong_every == 0
            started, port = time.time(), [0]
            result = self._once(user, wrong, port)
            self.results.append((time.time(), user, result))
            self.trace.append((started, time.time(), user, result, port[0]))

    def _once(self, user: str, wrong: bool, port: list[int]) -> str:
        try:
            session = self.connect()
        except OSError as e:
            return f"connect: {e}"
        try:
            port[0] = session.sock.getsockname()[1]
            reply = session.login(user, "not the password" if wrong else USERS[user])
            if wrong:
                return "refused" if b"[AUTHENTICATIONFAILED]" in reply else f"wrong: {reply!r}"
            if b"a OK" not in reply:
                return "tempfail" if b"[UNAVAILABLE]" in reply else f"login: {reply!r}"
            selected = session.command(b"s", b"SELECT INBOX")
            if not selected[-1].startswith(b"s OK"):
                return (
                    "kicked"
                    if any(b"* BYE" in line for line in selected)
                    else f"select: {selected!r}"
                )
            time.sleep(self.hold)
            session.command(b"z", b"LOGOUT")
            return "ok"
        except (OSError, ConnectionError) as e:
            return "kicked" if "BYE" in str(e) else f"io: {e}"
        finally:
            session.close()

    def outcomes(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        counts: dict[str, int] = {}
        for when, _, result in self.results:
            if since <= when < until:
                key = result if result in ("ok", "refused", "tempfail", "kicked") else "error"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def errors(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[str, str]]:
        return [
            (user, result)
            for when, user, result in self.results
            if since <= when < until and result not in ("ok", "refused", "tempfail", "kicked")
        ]


_FINE = ("ok", "refused", "tempfail", "kicked")


def users(start: int, end: int) -> list[str]:
    return list(USERS)[start:end]


def who(c: Cluster, node: int = 1, **filters: Any) -> list[dict[str, Any]]:
    return list(c.node(node).ask(op="who", **filters)["sessions"])


# --- the scenarios ---------------------------------------------------------------------------


def test_haproxy_spreads_clients_over_every_healthy_node(cluster: Cluster) -> None:
    assert "is DOWN" not in haproxy_log(cluster)
    seen = set()
    for user in users(0, 12):
        assert b"a OK" in login_once("127.0.0.1", cluster.front["imap"], user, USERS[user])
    for node in cluster.nodes:
        if re.search(r"imap client=127\.0\.0\.1:\d+ user=user", node.log_text()):
            seen.add(node.name)
    assert seen == {"node1", "node2", "node3"}, seen
    session = cluster.imap(tls=True)  # IMAPS: TLS through HAProxy, ended at the node
    try:
        assert b"a OK" in session.login("user00@example.com", USERS["user00@example.com"])
    finally:
        session.close()
    # HAProxy's checks are plain GETs of /healthz: no session line, no failed login.
    assert "GET /healthz" not in cluster.node(1).log_text()


def test_one_user_through_every_node_at_once_is_on_one_store(cluster: Cluster) -> None:
    held: list[Imap] = []
    try:
        for user in users(12, 20):
            barrier = threading.Barrier(NODES)
            replies: list[bytes] = []

            def one(
                node: int,
                user: str = user,
                barrier: threading.Barrier = barrier,
                replies: list[bytes] = replies,
            ) -> None:
                session = cluster.imap(node)
                held.append(session)
                barrier.wait(WAIT)
                replies.append(session.login(user, USERS[user]))
                session.command(b"s", b"SELECT INBOX")

            threads = [threading.Thread(target=one, args=(n,)) for n in range(1, NODES + 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            assert len(replies) == NODES and all(b"a OK" in r for r in replies), replies

        def listed() -> list[dict[str, Any]]:
            found = [s for s in who(cluster) if s["user"] in users(12, 20)]
            return found if len(found) == 8 * NODES else []

        sessions = wait_until(listed, "who on node1 lists all 24 sessions")
        by_user: dict[str, set[str]] = {}
        for s in sessions:
            by_user.setdefault(s["user"], set()).add(s["backend"])
        assert all(len(b) == 1 for b in by_user.values()), by_user
        assert {s["node"] for s in sessions} == {"node1", "node2", "node3"}
        assert len({b for bs in by_user.values() for b in bs}) == 2, "users spread over both stores"
    finally:
        for s in held:
            s.close()
    cluster.assert_never_split()


def test_the_per_user_limit_who_and_kick_hold_across_nodes(cluster: Cluster) -> None:
    user = users(20, 21)[0]
    held = []
    try:
        for index in range(PER_USER):
            held.append(cluster.imap(1 + index % 2))
            assert b"a OK" in held[-1].login(user, USERS[user])
        assert b"[LIMIT]" in cluster.imap(3).login(user, USERS[user])
        listed = wait_until(
            lambda: (found := who(cluster, 3, user=user)) and len(found) == PER_USER and found,
            "who on node3 lists the sessions on node1 and node2",
        )
        assert {s["node"] for s in listed} == {"node1", "node2"}
        assert cluster.node(3).ask(op="kick", user=user)["kicked"] == PER_USER
        for session in held:
            assert b"* BYE" in session.rest()
    finally:
        for s in held:
            s.close()
    wait_until(
        lambda: b"a OK" in login_once(cluster.node(3).address, 1143, user, USERS[user]),
        "a login again",
    )


def test_a_user_move_ends_their_sessions_everywhere_and_resumes_on_the_new_store(
    cluster: Cluster,
) -> None:
    user = users(21, 22)[0]
    held = []
    try:
        for node in (1, 2, 3):
            held.append(cluster.imap(node))
            assert b"a OK" in held[-1].login(user, USERS[user])
            held[-1].command(b"s", b"SELECT INBOX")

        def listed() -> set[str]:
            found = who(cluster, user=user)
            return {s["backend"] for s in found} if len(found) == 3 else set()

        (current,) = wait_until(listed, "three sessions listed")
        target = "b" if current == "stores/a" else "a"
        out = admin_here(cluster.node(1).config, "user", "move", user, "--to", f"stores/{target}")
        assert "3 sessions ended" in out, out
        for session in held:
            assert b"* BYE" in session.rest()
    finally:
        for s in held:
            s.close()
    for node in (1, 2, 3):
        session = cluster.imap(node)
        try:
            assert b"a OK" in session.login(user, USERS[user])
            wait_until(
                lambda: any(s["backend"] == f"stores/{target}" for s in who(cluster, user=user)),
                "the session is listed on the new store",
            )
        finally:
            session.command(b"z", b"LOGOUT")
            session.close()
    cluster.assert_never_split()


def test_a_store_drained_under_load_never_has_a_user_on_two_stores(cluster: Cluster) -> None:
    load_users = users(22, 38)
    idle = []
    try:
        for user in users(38, 42):  # long sessions, one per node: the drain kicks those on a
            if user in users(38, 40):  # two of them surely are there
                admin_here(cluster.node(1).config, "user", "move", user, "--to", "stores/a")
            for node in (1, 2, 3):
                idle.append((user, cluster.imap(node)))
                assert b"a OK" in idle[-1][1].login(user, USERS[user])

        def listed() -> dict[str, str]:
            found = {s["user"]: s["backend"] for s in who(cluster) if s["user"] in users(38, 42)}
            return found if len(found) == 4 else {}

        store_of = wait_until(listed, "who lists the idle sessions")
        # More logins of the idle users: a new session of a user who still has one on the
        # draining store must go there too (until the user is moved), never to b.
        with (
            Load(lambda: cluster.imap(), load_users, threads=3, hold=0.2) as load,
            Load(lambda: cluster.imap(), users(38, 42), threads=2, hold=0.05) as idle_load,
        ):
            time.sleep(2.0)
            started = time.time()
            out = subprocess.run(
                [sys.executable, "-m", "mailgate", "backend", "drain", "stores/a",
                 "-c", str(cluster.node(2).config)],
                capture_output=True, text=True, timeout=120,
                env={**os.environ, "PYTHONPATH": str(SRC)},
            )  # fmt: skip
            assert out.returncode == 0, (out.stdout, out.stderr)
            drained = time.time()
            time.sleep(2.0)
        cluster.assert_never_split(load, idle_load)
        on_a_after = [
            line for line in cluster.store_log("a").splitlines()
            if (m := _LOGIN.match(line)) and _stamp(m.group(1)) > drained + 0.5
        ]  # fmt: skip
        assert not on_a_after, f"logins on the drained store after the drain: {on_a_after[:3]}"
        assert not load.errors() and not idle_load.errors(), (load.errors(), idle_load.errors())
        assert load.outcomes(since=drained).get("ok", 0) > 0
        assert "tempfail" in idle_load.outcomes(started, drained), "logins wait while moving"
        for user, session in idle:
            if store_of[user] == "stores/a":
                assert b"* BYE" in session.rest()
            else:  # a user on b is left alone
                assert session.command(b"n", b"NOOP")[-1].startswith(b"n OK")
        print(f"\ndrain of stores/a took {drained - started:.2f} s; load: {load.outcomes()}")
        print(out.stdout.splitlines()[-1])
    finally:
        for _, session in idle:
            session.close()
        admin_here(cluster.node(1).config, "backend", "up", "stores/a")
    cluster.assert_never_split()
    for node in cluster.nodes[1:]:  # cluster-wide: the other nodes applied node1's "up" too
        wait_until(
            lambda node=node: "cluster: backend up stores/a" in node.log_text(),
            f"{node.name} applies up",
        )


def test_redis_stopped_and_started_under_load(cluster: Cluster) -> None:
    load_users = users(42, 48)
    marks = {n.name: n.log.stat().st_size for n in cluster.nodes}
    with Load(lambda: cluster.imap(), load_users, threads=4, wrong_every=5) as load:
        time.sleep(1.0)
        cluster.redis.stop()
        stopped = time.time()
        for node in cluster.nodes:
            wait_until(
                lambda node=node: "Redis unavailable" in _since(node, marks),
                f"{node.name} degraded",
            )
        time.sleep(2.0)
        again = peers.start_redis(
            cluster.workdir, cluster.redis.ports["redis"], bind=("127.0.0.1", cluster.lab.hub)
        )
        cluster.redis.pid, cluster.redis.proc = again.pid, again.proc
        started = time.time()
        for node in cluster.nodes:
            wait_until(
                lambda node=node: "is back" in _since(node, marks),
                f"{node.name} recovers",
                limit=30,
            )
        time.sleep(1.5)
    counts = load.outcomes()
    assert not load.errors(), load.errors()[:5]  # no "bad password", no limit, no refusal
    assert load.outcomes(stopped, started).get("ok", 0) > 0, "logins went on while Redis was down"
    assert counts.get("refused", 0) > 0  # wrong passwords were still wrong
    assert counts.get("tempfail", 0) == 0, counts
    for node in cluster.nodes:
        assert node.ask(op="stats")["redis_up"] >= 1
    # who reaches every node again.
    user = load_users[0]
    held = [cluster.imap(n) for n in (1, 2, 3)]
    try:
        for s in held:
            assert b"a OK" in s.login(user, USERS[user])
        wait_until(
            lambda: {x["node"] for x in who(cluster, 1, user=user)} == {"node1", "node2", "node3"},
            "who across nodes again",
        )
    finally:
        for s in held:
            s.close()
    cluster.assert_never_split()
    print(f"\nRedis down {started - stopped:.1f} s under load: {counts}")


def _since(node: Node, marks: dict[str, int]) -> str:
    with node.log.open("rb") as f:
        f.seek(marks[node.name])
        return f.read().decode(errors="replace")


def test_a_node_shutting_down_is_left_by_the_balancer_first(cluster: Cluster) -> None:
    node = cluster.node(3)
    with Load(lambda: cluster.imap(), users(0, 12), threads=4, hold=0.05) as load:
        time.sleep(1.0)
        node.signal(signal.SIGTERM)
        term = time.time()
        wait_until(lambda: node.health() in (503, 0), "node3's /healthz says it drains")
        # Unhealthy while it still serves (drain_delay): the balancer learns it first.
        assert node.health() == 503, node.log_tail(15)
        still = cluster.imap(3)
        assert b"a OK" in still.login(users(0, 1)[0], USERS[users(0, 1)[0]])
        still.close()
        wait_until(
            lambda: "Server mailgate_imap/node3 is DOWN" in haproxy_log(cluster),
            "HAProxy takes node3 out",
        )
        assert node.proc is not None
        node.proc.wait(30)
        time.sleep(1.0)
    failed = [(round(t - term, 3), u, r) for t, u, r in load.results if r not in _FINE]
    assert not failed, (failed[:5], haproxy_log(cluster)[-2000:], node.log_tail(15))
    assert load.outcomes().get("ok", 0) > 0
    node.start()
    node.wait_healthy()
    wait_until(
        lambda: haproxy_log(cluster).count("Server mailgate_imap/node3 is UP") >= 1,
        "node3 back in HAProxy",
    )


def test_a_node_killed_under_load(cluster: Cluster) -> None:
    victim, other = cluster.node(2), cluster.node(1)
    user = users(46, 47)[0]
    held = [cluster.imap(2) for _ in range(PER_USER)]
    for s in held:
        assert b"a OK" in s.login(user, USERS[user])
    wait_until(
        lambda: len(who(cluster, 1, user=user)) == PER_USER, "node1 lists the victim's sessions"
    )
    with Load(lambda: cluster.imap(), users(0, 12), threads=4, hold=0.05) as load:
        time.sleep(1.0)
        victim.signal(signal.SIGKILL)
        killed = time.time()
        refused = login_once(other.address, 1143, user, USERS[user])
        wait_until(
            lambda: "Server mailgate_imap/node2 is DOWN" in haproxy_log(cluster),
            "HAProxy takes node2 out",
        )
        down = time.time()
        back = wait_until(
            lambda: b"a OK" in login_once(other.address, 1143, user, USERS[user]) and time.time(),
            "the dead node's leases expire",
            limit=LEASE * 4,
        )
        time.sleep(1.0)
    for s in held:
        s.close()
    assert b"[LIMIT]" in refused, "right after the kill, its sessions still counted"
    after = load.errors(since=down + 1.0)
    assert not after, f"failures once HAProxy had taken node2 out: {after[:5]}"
    during = load.errors(since=killed, until=down + 1.0)
    assert all("io:" in r or "connect:" in r for _, r in during), during
    assert load.outcomes(since=down).get("ok", 0) > 0
    assert not [s for s in who(cluster, 1) if s["node"] == "node2"]
    print(
        f"\nnode2 killed: HAProxy took it out after {down - killed:.2f} s; its leases were free "
        f"after {back - killed:.2f} s (lease {LEASE:g} s); {len(during)} logins in flight failed"
    )
    cluster.assert_never_split()
