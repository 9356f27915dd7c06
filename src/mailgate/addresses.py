"""Client addresses as the limits count them."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPV6_PREFIX = 64  # one subscriber's network (RFC 6177): counting single addresses is useless


@lru_cache(maxsize=4096)
def subscriber(ip: str) -> str:
    """The key one client address is counted under: an IPv4 address (IPv4-mapped IPv6 too), or
    the /64 an IPv6 address is in. A value that is no address (a test, a Unix socket) is its
    own key."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/{IPV6_PREFIX}", strict=False))
    return str(address)
