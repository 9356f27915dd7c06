"""The loop guard: a route must never point at one of mailgate's own listeners.

A route to ourselves (an auth service's typo, a directory row naming the proxy's address, a
pool member that is the proxy) would make every login log in to itself until the timeouts
end it: a connection loop. Dovecot has `proxy_maybe` and the `x-proxy-ttl` ID field; here
the listeners' addresses are computed once, at start:

- a listener bound to an address listens on that address and port;
- a listener bound to every address (`*`, `0.0.0.0`, `::`) listens on its port on every
  address of this host: its interfaces' addresses (read once), 127.0.0.0/8, ::1, and the
  unspecified addresses (a connect to 0.0.0.0 reaches this host).

`refuses(host, port)` checks a route before connecting (an address literal; a host name is
checked after connecting, by `refuses_peer`, against the address it resolved to). Both are
a set lookup per login.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections.abc import Iterable
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
ALWAYS_LOCAL = frozenset(
    {ipaddress.ip_address("::1"), ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}
)
_FIB_TRIE = Path("/proc/net/fib_trie")
_IF_INET6 = Path("/proc/net/if_inet6")


@functools.lru_cache(maxsize=4096)  # routes name a few hosts; parsing showed in profiles
def _address(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_addresses() -> frozenset[IPAddress]:
    """This host's own addresses, read once: Linux's local routing table and IPv6 interface
    list, else whatever the host name resolves to."""
    found: set[IPAddress] = set()
    with contextlib.suppress(OSError):
        last = ""
        for line in _FIB_TRIE.read_text().splitlines():
            text = line.strip()
            if text.startswith("|-- "):
                last = text[4:]
            elif text.startswith("/32 host LOCAL") and (ip := _address(last)):
                found.add(ip)
    with contextlib.suppress(OSError):
        for line in _IF_INET6.read_text().splitlines():
            fields = line.split()
            if fields and len(fields[0]) == 32:
                hexes = fields[0]
                ip = _address(":".join(hexes[i : i + 4] for i in range(0, 32, 4)))
                if ip is not None:
                    found.add(ip)
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            if ip := _address(str(info[4][0])):
                found.add(ip)
    return frozenset(found)


class LoopGuard:
    """Where mailgate listens; `refuses` says whether a route would come back to it."""

    __slots__ = ("_any_port", "_exact", "_local")

    def __init__(
        self, listening: Iterable[tuple[str, int]], local: Iterable[IPAddress] = ()
    ) -> None:
        self._local = frozenset(local) | ALWAYS_LOCAL
        self._exact: set[tuple[IPAddress, int]] = set()
        self._any_port: set[int] = set()
        for host, port in listening:
            if port == 0:
                continue  # not bound yet: the caller passes the bound port
            if host in ("", "*", "0.0.0.0", "::"):
                self._any_port.add(port)
                continue
            for ip in _resolve(host):
                if ip.is_unspecified:
                    self._any_port.add(port)
                else:
                    self._exact.add((ip, port))

    @classmethod
    def for_listeners(cls, listening: Iterable[tuple[str, int]]) -> LoopGuard:
        """A guard for these (host, bound port) pairs, with this host's addresses."""
        return cls(listening, host_addresses())

    def is_local(self, ip: IPAddress) -> bool:
        return ip in self._local or ip in LOOPBACK_V4

    def refuses(self, host: str, port: int) -> str | None:
        """Why a route to host:port is one of our listeners, or None. A host name is None
        here: `refuses_peer` checks the address it resolves to, once connected."""
        ip = _address(host)
        if ip is None:
            return None
        return self._check(ip, port)

    def refuses_peer(self, peer: object) -> str | None:
        """The same for a connected socket's peer address ((ip, port, ...) from getpeername)."""
        if not isinstance(peer, tuple) or len(peer) < 2:
            return None
        ip = _address(peer[0]) if isinstance(peer[0], str) else None
        return None if ip is None else self._check(ip, int(peer[1]))

    def _check(self, ip: IPAddress, port: int) -> str | None:
        if (ip, port) in self._exact or (port in self._any_port and self.is_local(ip)):
            return f"{ip}:{port} is one of mailgate's own listeners (a proxy loop)"
        return None

    def __bool__(self) -> bool:
        return bool(self._exact or self._any_port)


def _resolve(host: str) -> set[IPAddress]:
    ip = _address(host)
    if ip is not None:
        return {ip}
    with contextlib.suppress(OSError):
        return {
            ip
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            if (ip := _address(str(info[4][0]))) is not None
        }
    return set()
