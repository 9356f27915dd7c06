"""Lists of IP networks: who may send a PROXY header, whose logins are trusted.

`NetworkList.parse(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])` turns config entries into a
frozen list; `"203.0.113.9" in networks` answers in a few integer operations per network, with
no parsing of the networks at lookup time. A bare address means one host (/32 or /128), and an
IPv4-mapped IPv6 address (what a socket bound on :: reports for an IPv4 client) matches the
IPv4 networks, and the other way round, so "127.0.0.1/32" also covers "::ffff:127.0.0.1".
Pure: no I/O, no mailgate imports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# ::ffff:0:0/96, where IPv4-mapped IPv6 addresses live (RFC 4291 section 2.5.5.2).
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True, slots=True)
class NetworkList:
    """Frozen list of networks with a fast `ip in networks`. Empty matches nothing."""

    networks: tuple[Network, ...] = ()
    # (network as int, mask as int) per IP version: what __contains__ reads, built once.
    _v4: tuple[tuple[int, int], ...] = field(default=(), init=False, repr=False, compare=False)
    _v6: tuple[tuple[int, int], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks = tuple(_unmap_network(n) for n in self.networks)
        object.__setattr__(self, "networks", networks)
        for version, name in ((4, "_v4"), (6, "_v6")):
            pairs = tuple(
                (int(n.network_address), int(n.netmask)) for n in networks if n.version == version
            )
            object.__setattr__(self, name, pairs)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> NetworkList:
        """Networks from config text; raises ValueError naming the bad entry."""
        return cls(tuple(parse_network(entry) for entry in entries))

    def __contains__(self, ip: object) -> bool:
        """`ip` is an address as text (a scope "%eth0" is ignored) or an ipaddress object."""
        address = _address(ip)
        if address is None:
            return False
        value = int(address)
        for network, mask in self._v4 if address.version == 4 else self._v6:
            if value & mask == network:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "(none)"


EMPTY = NetworkList()


def parse_network(entry: str) -> Network:
    """'10.0.0.0/8', '2001:db8::/32', or a bare address for one host. Host bits must be 0."""
    text = entry.strip()
    if not text or "%" in text:
        raise ValueError(f"{entry!r} is not an IP network")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{entry!r} has host bits set; did you mean {loose}?") from None
        raise ValueError(f"{entry!r} is not an IP network") from None


def _unmap_network(network: Network) -> Network:
    """An IPv6 network inside ::ffff:0:0/96 is the IPv4 network it maps."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        base = network.network_address.ipv4_mapped
        assert base is not None
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


def _address(ip: object) -> Address | None:
    if isinstance(ip, str):
        return _parse_address(ip)
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return None


# Clients come back: a login, a retry, the next session. Parsing the same text again costs
# more than the lookup itself, so recent answers are kept (bounded, so a scan cannot grow it).
@lru_cache(maxsize=4096)
def _parse_address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
