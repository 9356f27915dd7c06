"""NetworkList: CIDR lists for trusted_proxies and trusted_networks."""

from __future__ import annotations

import ipaddress

import pytest

from mailgate.networks import EMPTY, NetworkList, parse_network


def test_ipv4_and_ipv6_networks():
    nets = NetworkList.parse(["10.0.0.0/8", "2001:db8::/32", "192.168.1.0/24"])
    for inside in ("10.0.0.1", "10.255.255.255", "2001:db8::1", "2001:db8:ffff::", "192.168.1.9"):
        assert inside in nets
    for outside in ("11.0.0.0", "9.255.255.255", "2001:db9::", "192.168.2.1", "::1"):
        assert outside not in nets


def test_a_bare_address_is_one_host():
    nets = NetworkList.parse(["192.0.2.7", "2001:db8::7"])
    assert [str(n) for n in nets.networks] == ["192.0.2.7/32", "2001:db8::7/128"]
    assert "192.0.2.7" in nets and "192.0.2.8" not in nets
    assert "2001:db8::7" in nets and "2001:db8::8" not in nets


def test_ipv4_mapped_addresses_match_their_ipv4_form_both_ways():
    v4 = NetworkList.parse(["127.0.0.1/32", "10.0.0.0/8"])
    assert "::ffff:127.0.0.1" in v4
    assert "::ffff:10.1.2.3" in v4
    assert "::ffff:11.1.2.3" not in v4
    assert ipaddress.ip_address("::ffff:10.1.2.3") in v4
    mapped = NetworkList.parse(["::ffff:10.0.0.0/104"])
    assert [str(n) for n in mapped.networks] == ["10.0.0.0/8"]
    assert "10.9.9.9" in mapped and "::ffff:10.9.9.9" in mapped and "11.0.0.1" not in mapped


def test_families_never_cross():
    assert "0.0.0.1" not in NetworkList.parse(["::/0"])
    assert "::1" not in NetworkList.parse(["0.0.0.0/0"])
    assert "::ffff:1.2.3.4" in NetworkList.parse(["0.0.0.0/0"])


def test_lookups_that_are_not_addresses_are_not_members():
    nets = NetworkList.parse(["0.0.0.0/0", "::/0"])
    for junk in ("", "localhost", "1.2.3", "::g", None, 42, b"1.2.3.4"):
        assert junk not in nets


def test_a_scope_on_the_looked_up_address_is_ignored():
    assert "fe80::1%eth0" in NetworkList.parse(["fe80::/10"])


def test_empty_list_matches_nothing():
    assert not EMPTY and len(EMPTY) == 0 and "127.0.0.1" not in EMPTY
    assert NetworkList.parse([]) == EMPTY
    assert str(EMPTY) == "(none)"


def test_frozen_and_comparable():
    nets = NetworkList.parse(["10.0.0.0/8"])
    assert nets == NetworkList.parse([" 10.0.0.0/8 "])
    with pytest.raises(AttributeError):
        nets.networks = ()  # type: ignore[misc]
    assert str(nets) == "10.0.0.0/8"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.1/8", "host bits set; did you mean 10.0.0.0/8"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32"),
        ("10.0.0.0/33", "not an IP network"),
        ("example.com", "not an IP network"),
        ("", "not an IP network"),
        ("fe80::/10%eth0", "not an IP network"),
        ("010.0.0.0/8", "not an IP network"),
    ],
)
def test_bad_entries_name_themselves(entry, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_network(entry)
    assert repr(entry) in str(err.value)
