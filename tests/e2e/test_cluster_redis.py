"""Two mailgate nodes sharing one real Redis, on this host (the network-namespace cluster in
test_cluster_netns.py has three behind HAProxy): a cached login waits for one Redis round
trip, counted by holding Redis's replies; the per-user limit is one limit across nodes; `who`
and `kick` on one node reach the other's sessions; a directory change published by the admin
commands reaches both route caches at once; Redis stopped under load is the degraded mode
(node-local limits, no wrong answer) and Redis started again empty is whole again."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from guessing import BUDGET, RIGHT, VICTIM, attack, deciding
from harness import FakeAuth, FakeBackend, imap_backend, running_auth, running_backend
from mailgate.config import load
from mailgate.redislua import SCRIPTS

from .clusterkit import (
    WAIT,
    Imap,
    RedisGate,
    admin_here,
    admin_status,
    control,
    login_once,
    sessions,
    wait_until,
)
from .conftest import peers, require
from .mailgate_proc import MailgateProcess, start_mailgate, to_toml

PASSWORD = "secret"
USERS = [f"u{i:02d}@example.com" for i in range(12)]
HOST = "127.0.0.1"
LISTENERS = {"imap": {"protocol": "imap"}}


@dataclass
class Node:
    name: str
    mg: MailgateProcess
    config: Path

    @property
    def port(self) -> int:
        return self.mg.ports["imap"]

    @property
    def control_path(self) -> Path:
        return self.config.parent / "control.sock"

    def ask(self, **message: Any) -> dict[str, Any]:
        return control(self.control_path, **message)


def settings(
    root: Path, name: str, redis_port: int, backends: list[int], **extra: Any
) -> dict[str, Any]:
    members = [{"name": f"b{i}", "host": HOST, "imap": port} for i, port in enumerate(backends, 1)]
    base: dict[str, Any] = {
        "shutdown_timeout": 1,
        "workers": 1,
        "control_socket": str(root / name / "control.sock"),
        "directory": {"url": f"sqlite:///{root / 'directory.db'}", "cache_ttl": 3600},
        "throttle": {"free": 10, "base_delay": 0.0},
        # The tests' clients all come from here: no address budget (users keep theirs).
        "trusted_networks": ["127.0.0.0/8"],
        "limits": {"per_user": 2},
        "cluster": {
            "redis_url": f"redis://{HOST}:{redis_port}/0",
            "node_name": name,
            "lease": 4,
            "timeout": 1.0,
            "move_delay": 0.2,
        },
        "pool": [
            {
                "name": "stores",
                "members": members,
                "shared_storage": True,
                "affinity": True,
                "check_interval": 0,
            }
        ],
    }
    for key, value in extra.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return base


def directory(root: Path, config: dict[str, Any]) -> Path:
    path = root / "admin.toml"
    path.write_text(to_toml(config))
    admin_here(path, "directory", "init")
    admin_here(path, "mailstore", "add", "pooled", "--host", HOST, "--pool", "stores")
    admin_here(path, "domain", "add", "example.com", "--mailstore", "pooled")
    for user in USERS:
        admin_here(path, "user", "add", user, "--scheme", "PLAIN", "--password-stdin",
                   stdin=f"{PASSWORD}\n")  # fmt: skip
    return path


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[peers.Peer]:
    require("redis-server")
    peer = peers.start_redis(tmp_path, peers.free_port())
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def backends() -> Iterator[list[int]]:
    with (
        running_backend(imap_backend(PASSWORD)) as one,
        running_backend(imap_backend(PASSWORD)) as two,
    ):
        yield [one.port, two.port]


def start_node(root: Path, name: str, config: dict[str, Any]) -> Node:
    mg = start_mailgate(root / name, LISTENERS, config)
    return Node(name, mg, mg.config_path)


@pytest.fixture
def two_nodes(
    tmp_path: Path, redis_server: peers.Peer, backends: list[int]
) -> Iterator[tuple[Node, Node, Path]]:
    port = redis_server.ports["redis"]
    admin = directory(tmp_path, settings(tmp_path, "admin", port, backends))
    nodes = []
    try:
        for name in ("n1", "n2"):
            nodes.append(start_node(tmp_path, name, settings(tmp_path, name, port, backends)))
        yield nodes[0], nodes[1], admin
    finally:
        for node in nodes:
            node.mg.stop()


def test_limits_who_and_kick_are_the_clusters(two_nodes: tuple[Node, Node, Path]) -> None:
    n1, n2, _ = two_nodes
    user = USERS[0]
    with sessions() as held:
        for node in (n1, n2):
            held.append(Imap(HOST, node.port))
            assert b"a OK" in held[-1].login(user, PASSWORD)
        # per_user = 2 holds across the nodes: a third login, on either, is refused.
        for node in (n1, n2):
            assert b"[LIMIT]" in login_once(HOST, node.port, user, PASSWORD)

        def listed() -> list[dict[str, Any]]:
            found = n2.ask(op="who", user=user)["sessions"]
            return found if {s["node"] for s in found} == {"n1", "n2"} else []

        found = wait_until(listed, "who on n2 lists the sessions of both nodes")
        assert {s["backend"] for s in found} in ({"stores/b1"}, {"stores/b2"})  # one member
        # kick on n2 ends both, the one on n1 too, with the protocol's goodbye.
        assert n2.ask(op="kick", user=user)["kicked"] == 2
        for session in held:
            assert b"* BYE" in session.rest()
    # Their leases went with them: two new sessions are let in again.
    wait_until(lambda: b"a OK" in login_once(HOST, n1.port, user, PASSWORD), "a login again")


def test_a_directory_change_reaches_every_route_cache_at_once(
    two_nodes: tuple[Node, Node, Path],
) -> None:
    n1, n2, admin = two_nodes
    user = USERS[1]
    for node in (n1, n2):  # cached now, for an hour
        assert b"a OK" in login_once(HOST, node.port, user, PASSWORD)
    admin_here(admin, "user", "disable", user)
    for node in (n1, n2):
        wait_until(
            lambda node=node: (
                b"[AUTHENTICATIONFAILED]" in login_once(HOST, node.port, user, PASSWORD)
            ),
            f"{node.name} refuses the disabled user (the cache forgot it)",
        )
    assert "cluster: subscribed" in n1.mg.log_text()


def test_a_directory_move_ends_the_users_sessions_on_every_node(
    two_nodes: tuple[Node, Node, Path],
) -> None:
    n1, n2, admin = two_nodes
    user = USERS[11]
    with running_backend(imap_backend(PASSWORD)) as new, sessions() as held:
        add_mailstore(admin, "new", new.port)
        for node in (n1, n2):
            held.append(Imap(HOST, node.port))
            assert b"a OK" in held[-1].login(user, PASSWORD)
        code, _, err = admin_status(admin, "user", "move", user, "typo")
        assert code != 0 and "typo" in err, err
        for session in held:  # a move the directory refuses ends no session
            assert b"z OK" in session.command(b"z", b"NOOP")[-1]
        out = admin_here(admin, "user", "move", user, "new")
        assert "2 sessions of" in out, out
        for session in held:
            assert b"* BYE" in session.rest()
        # The command returned once both nodes' caches forgot the old route: the first
        # login after it, on either node, is on the new mailstore.
        held.clear()
        for node in (n1, n2):
            held.append(Imap(HOST, node.port))
            assert b"a OK" in held[-1].login(user, PASSWORD)
        assert sum(b" LOGIN " in line for line in new.lines) == 2, new.lines
        found = listed(n1, user, held)
        assert [s["mailstore"] for s in found] == ["new", "new"], found


def test_a_login_on_its_way_when_a_move_begins_gets_no_session(
    two_nodes: tuple[Node, Node, Path],
) -> None:
    """Authenticated, at the old store's LOGIN when the move's kick comes: a temporary
    failure, not a session on the old store after the move (its retry is on the new one)."""
    n1, _, admin = two_nodes
    user = USERS[9]
    at_login, go_on = threading.Event(), threading.Event()
    plain = imap_backend(PASSWORD).handler

    def held_login(line: bytes) -> bytes | None:
        if b" LOGIN " in line.upper():
            at_login.set()
            go_on.wait(WAIT)  # holds this backend's every connection: it is this test's own
        return plain(line)

    with (
        running_backend(FakeBackend(handler=held_login)) as old,
        running_backend(imap_backend(PASSWORD)) as new,
        sessions() as held,
    ):
        add_mailstore(admin, "old", old.port)
        add_mailstore(admin, "new", new.port)
        admin_here(admin, "user", "move", user, "old")
        held.append(Imap(HOST, n1.port))
        reply: list[bytes] = []
        client = threading.Thread(target=lambda: reply.append(held[0].login(user, PASSWORD)))
        client.start()
        try:
            assert at_login.wait(WAIT), "the login reaches the old store"
            out = admin_here(admin, "user", "move", user, "new")
        finally:
            go_on.set()
            client.join(WAIT)
        assert "0 sessions of" in out, out
        assert reply and b"a NO [UNAVAILABLE]" in reply[0], reply
        assert b"a OK" in held[0].login(user, PASSWORD)
        assert [s["mailstore"] for s in listed(n1, user, held)] == ["new"]
        assert "kicked while logging in" in n1.mg.log_text()


def add_mailstore(admin: Path, name: str, port: int) -> None:
    """A mailstore outside the pool (its own address)."""
    admin_here(admin, "mailstore", "add", name, "--host", HOST, "--imap-port", str(port))


def listed(node: Node, user: str, held: list[Imap]) -> list[dict[str, Any]]:
    """`who` on `node` for these sessions (by their client address), once it lists them all:
    other nodes' sessions come from the registry, which is up to a second behind."""
    ours = ["{}:{}".format(*session.sock.getsockname()[:2]) for session in held]

    def found() -> list[dict[str, Any]]:
        by_client = {s["client"]: s for s in node.ask(op="who", user=user)["sessions"]}
        return [by_client[c] for c in ours] if all(c in by_client for c in ours) else []

    return list(wait_until(found, f"who on {node.name} lists {ours}"))


def test_a_cached_login_waits_for_one_redis_round_trip(
    tmp_path: Path, redis_server: peers.Peer, backends: list[int]
) -> None:
    port = redis_server.ports["redis"]
    directory(tmp_path, settings(tmp_path, "admin", port, backends))
    with RedisGate(port) as gate:
        config = settings(tmp_path, "n1", gate.port, backends, cluster={"timeout": 5.0})
        node = start_node(tmp_path, "n1", config)
        try:
            user = USERS[2]
            assert b"a OK" in login_once(HOST, node.port, user, PASSWORD)  # now cached
            # That session's end (batched, and naming the user) must be in Redis before the
            # gate holds: the held reply to wait for is the next login's.
            wait_until(
                lambda: not node.ask(op="who", user=user)["sessions"],
                "the first session's end reaches Redis",
            )
            before = node.ask(op="stats")
            session = Imap(HOST, node.port)
            gate.hold()
            reply: list[bytes] = []
            client = threading.Thread(target=lambda: reply.append(session.login(user, PASSWORD)))
            client.start()
            # The node's own traffic (a heartbeat, the last session's batched end) is held
            # too: the first round is the one that answers the login's own request.
            wait_until(
                lambda: gate.waiting_for(user.encode()), "the login's first request reaches Redis"
            )
            # Releases that answered a request the login waits for: the scripts a login or a
            # failed login's settlement runs, naming the user. Not the batch of what the
            # login tells Redis without waiting (its settlement, its session's start): on a
            # loaded box the login may still be on its way when that batch's reply is held.
            awaited = tuple(
                hashlib.sha1(SCRIPTS[name].encode()).hexdigest().encode()
                for name in ("login", "settle")
            )
            rounds = 0
            releases = 0
            while client.is_alive() and releases < 8:
                rounds += gate.waiting_for(user.encode(), awaited)
                gate.release()
                releases += 1
                client.join(5.0)  # a bound: a login that waits for more waits for a release
            gate.open()
            client.join(WAIT)
            assert reply and b"a OK" in reply[0], reply
            assert rounds == 1, f"the cached login waited for {rounds} Redis round trips"
            session.command(b"z", b"LOGOUT")
            session.close()
            after = node.ask(op="stats")
            assert after["redis_logins"] - before["redis_logins"] == 1
            assert after["redis_up"] == 1
        finally:
            node.mg.stop()


def test_redis_stopped_and_started_under_load(
    two_nodes: tuple[Node, Node, Path], redis_server: peers.Peer
) -> None:
    n1, n2, _ = two_nodes
    errors: list[str] = []
    stop = threading.Event()

    def load(node: Node, users: list[str]) -> None:
        turn = 0
        while not stop.is_set():
            user = users[turn % len(users)]
            turn += 1
            try:
                reply = login_once(HOST, node.port, user, PASSWORD)
            except OSError as e:
                errors.append(f"{node.name} {user}: {e}")
                continue
            if b"a OK" not in reply:
                errors.append(f"{node.name} {user}: {reply!r}")
            wrong = login_once(HOST, node.port, user, "not the password")
            if b"[AUTHENTICATIONFAILED]" not in wrong:
                errors.append(f"{node.name} {user} wrong password: {wrong!r}")

    threads = [
        threading.Thread(target=load, args=(n1, USERS[3:6])),
        threading.Thread(target=load, args=(n2, USERS[6:9])),
    ]
    held_user = USERS[10]
    with sessions() as held:
        for t in threads:
            t.start()
        time.sleep(1.0)
        marks = {node.name: node.mg.log_size() for node in (n1, n2)}
        redis_server.stop()
        for node in (n1, n2):
            wait_until(lambda node=node: "Redis unavailable" in since(node, marks), "degraded")
        # Degraded: each node counts alone, so per_user = 2 is per node now (looser, never
        # stricter than the cluster's): two sessions on each node.
        for node in (n1, n2, n1, n2):
            held.append(Imap(HOST, node.port))
            assert b"a OK" in held[-1].login(held_user, PASSWORD)
        time.sleep(1.0)
        marks = {node.name: node.mg.log_size() for node in (n1, n2)}
        started = peers.start_redis(redis_server.workdir.parent, redis_server.ports["redis"])
        redis_server.pid, redis_server.proc = started.pid, started.proc
        for node in (n1, n2):
            wait_until(lambda node=node: "is back" in since(node, marks), f"{node.name} recovers")
        time.sleep(1.0)
        for node in (n1, n2):  # and stays back
            assert node.ask(op="stats")["redis_up"] == 1, since(node, marks)
        stop.set()
        for t in threads:
            t.join(WAIT)
        # Redis came back empty; the nodes wrote their four sessions again: one limit again.
        for node in (n1, n2):
            assert b"[LIMIT]" in login_once(HOST, node.port, held_user, PASSWORD)
    assert not errors, errors[:10]


def since(node: Node, marks: dict[str, int]) -> str:
    with node.mg.log_path.open("rb") as f:
        f.seek(marks[node.name])
        return f.read().decode(errors="replace")


def test_config_names(tmp_path: Path) -> None:
    config = settings(tmp_path, "x", 6379, [1143])
    path = tmp_path / "x.toml"
    path.write_text(to_toml({**config, "listener": [{"protocol": "imap", "listen": ":1"}]}))
    loaded = load(path)
    assert loaded.cluster.node_name == "x" and loaded.pools[0].affinity


def test_parallel_guesses_across_two_nodes_never_pass_the_clusters_budget(
    tmp_path: Path, redis_server: peers.Peer
) -> None:
    """Issue 8's race with Redis: 300 guesses at once for one user, spread over two nodes of
    two workers each and 250 source addresses; the right password is among them. The auth
    service counts what reaches the password check."""
    config = {
        "shutdown_timeout": 1,
        "workers": 2,
        "throttle": {
            "lockout_after": BUDGET,
            "free": 1000,  # no delays: the budget alone must hold
            "concurrent_per_user": 1000,
            "concurrent_per_ip": 1000,
        },
        "imap": {"login_timeout": 60.0},
        "cluster": {"redis_url": f"redis://{HOST}:{redis_server.ports['redis']}/0"},
    }
    with running_backend(imap_backend(RIGHT)) as backend:
        fake = FakeAuth(deciding(backend.port), delay=0.1)  # checks overlap
        with running_auth(fake) as auth:
            nodes = []
            try:
                for name in ("n1", "n2"):
                    node_config = config | {"auth_http": {"url": auth.url, "timeout": 20.0}}
                    node_config["cluster"] = config["cluster"] | {"node_name": name}
                    nodes.append(start_node(tmp_path, name, node_config))
                ports = [node.port for node in nodes]
                replies = asyncio.run(attack(ports, many_sources=True))
            finally:
                for node in nodes:
                    node.mg.stop()
    checked = [r for r in fake.requests if r.get("Auth-User") == VICTIM]
    assert len(checked) <= BUDGET, f"{len(checked)} guesses reached the password check"
    assert not any(b" OK " in reply for reply in replies)  # the right password did not get in
    assert all(reply.startswith(b"a NO ") for reply in replies)
