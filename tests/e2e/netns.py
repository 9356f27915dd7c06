"""Linux network namespaces for the cluster tests: one per mailgate node, each with its own
address on a bridge in this (the root) namespace, where the shared services listen.

    10.A.B.1   the bridge, here: HAProxy's source address, Redis, PostgreSQL, Dovecot
    10.A.B.11  node 1 (its own namespace: listens on 143, 993, 9180 as a real node would)
    10.A.B.12  node 2 ...

Names carry this process's pid (`mgc<pid>n1`, bridge `mgb<pid>`), so runs never collide and
what a crashed run left behind is recognised and removed by the next one. Needs root (the
`ip` tool): `require_root()` skips otherwise, or fails under MAILGATE_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

PREFIX = "mgc"
BRIDGE_PREFIX = "mgb"
VETH_PREFIX = "mgv"
TIMEOUT = 20.0


def require_root() -> None:
    missing = None
    if os.geteuid() != 0:
        missing = "root (network namespaces)"
    elif shutil.which("ip") is None:
        missing = "the ip tool (iproute2)"
    if missing is None:
        return
    message = f"the cluster tests need {missing}; run them as root"
    if os.environ.get("MAILGATE_REQUIRE_PEERS") == "1":
        pytest.fail(f"{message} (MAILGATE_REQUIRE_PEERS=1)", pytrace=False)
    pytest.skip(message)


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Lab:
    tag: str
    net: ipaddress.IPv4Network
    bridge: str
    namespaces: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return str(self.net[1])

    def address(self, node: int) -> str:
        return str(self.net[10 + node])

    def exec_argv(self, node: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node - 1], *argv]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Namespaces and bridges of earlier runs whose process is gone."""
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(PREFIX + r"(\d+)n\d+", name)
        if m and not _alive(int(m.group(1))):
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show", check=False).splitlines():
        m = re.match(r"\d+: (" + BRIDGE_PREFIX + r"(\d+))[:@]", line)
        if m and not _alive(int(m.group(2))):
            ip("link", "del", m.group(1), check=False)


def _free_net() -> ipaddress.IPv4Network:
    taken = []
    for line in ip("-4", "route", "show", check=False).splitlines():
        first = line.split()[0] if line.strip() else ""
        if "/" in first:
            taken.append(ipaddress.ip_network(first, strict=False))
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the test network")


def make_lab(nodes: int) -> Lab:
    remove_stale()
    tag = str(os.getpid())
    net = _free_net()
    lab = Lab(tag, net, BRIDGE_PREFIX + tag)
    try:
        ip("link", "add", lab.bridge, "type", "bridge")
        ip("addr", "add", f"{lab.hub}/24", "dev", lab.bridge)
        ip("link", "set", lab.bridge, "up")
        for node in range(1, nodes + 1):
            ns = f"{PREFIX}{tag}n{node}"
            veth = f"{VETH_PREFIX}{tag}n{node}"
            ip("netns", "add", ns)
            lab.namespaces.append(ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", lab.bridge)
            ip("link", "set", veth, "up")
            ip("-n", ns, "addr", "add", f"{lab.address(node)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "default", "via", lab.hub)
    except Exception:
        destroy(lab)
        raise
    return lab


def destroy(lab: Lab) -> None:
    for ns in lab.namespaces:
        ip("netns", "del", ns, check=False)  # its veth goes with it
    ip("link", "del", lab.bridge, check=False)
