"""Config keys for PROXY protocol listeners and trusted networks: values and errors by key path."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mailgate import config
from mailgate.config import ConfigError
from mailgate.networks import EMPTY

BASE = """
[auth_http]
url = "http://127.0.0.1:9000/auth"
[[listener]]
protocol = "imap"
listen = "127.0.0.1:1143"
[[listener]]
protocol = "imap"
listen = "127.0.0.1:1144"
"""


def parse(extra_listener: str = "", top: str = "") -> config.Settings:
    text = top + BASE + extra_listener
    return config.parse(tomllib.loads(text), base_dir=Path("."))


def test_defaults_are_off_and_empty():
    settings = parse()
    for listener in settings.listeners:
        assert listener.proxy_protocol is False
        assert listener.trusted_proxies == EMPTY
        assert listener.proxy_protocol_timeout == 5.0
    assert settings.trusted_networks == EMPTY


def test_a_proxy_protocol_listener():
    settings = parse(
        'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32", "10.1.0.0/16", "::1"]\n'
        "proxy_protocol_timeout = 3\n"
    )
    plain, behind = settings.listeners
    assert plain.proxy_protocol is False
    assert behind.proxy_protocol is True
    assert behind.proxy_protocol_timeout == 3.0
    assert "10.1.2.3" in behind.trusted_proxies and "::1" in behind.trusted_proxies
    assert "::ffff:127.0.0.1" in behind.trusted_proxies
    assert "10.2.0.1" not in behind.trusted_proxies


def test_top_level_trusted_networks():
    settings = parse(top='trusted_networks = ["10.0.0.0/8", "2001:db8::/32"]\n')
    assert "10.9.9.9" in settings.trusted_networks
    assert "2001:db8::5" in settings.trusted_networks
    assert "192.0.2.1" not in settings.trusted_networks


@pytest.mark.parametrize(
    ("listener", "top", "message"),
    [
        ("proxy_protocol = true\n", "", "listener[1].trusted_proxies: required with proxy_"),
        ("proxy_protocol = true\ntrusted_proxies = []\n", "", "listener[1].trusted_proxies: req"),
        ('trusted_proxies = ["127.0.0.1"]\n', "", "listener[1].trusted_proxies: only makes"),
        ("proxy_protocol_timeout = 2\n", "", "listener[1].proxy_protocol_timeout: only makes"),
        ('proxy_protocol = "yes"\n', "", "listener[1].proxy_protocol: must be bool"),
        (
            'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1", "10.0.0.1/8"]\n',
            "",
            "listener[1].trusted_proxies[1]: '10.0.0.1/8' has host bits set; did you mean 10.0.",
        ),
        (
            'proxy_protocol = true\ntrusted_proxies = ["haproxy.local"]\n',
            "",
            "listener[1].trusted_proxies[0]: 'haproxy.local' is not an IP network",
        ),
        (
            'proxy_protocol = true\ntrusted_proxies = "127.0.0.1"\n',
            "",
            "listener[1].trusted_proxies: must be list",
        ),
        (
            'proxy_protocol = true\ntrusted_proxies = ["::1"]\nproxy_protocol_timeout = 0\n',
            "",
            "listener[1].proxy_protocol_timeout: must be a positive number",
        ),
        ("", 'trusted_networks = ["10.0.0.0/33"]\n', "trusted_networks[0]: '10.0.0.0/33' is not"),
        ("", "trusted_networks = [1]\n", "trusted_networks: must be a list of non-empty strings"),
    ],
)
def test_errors_name_the_key(listener, top, message):
    with pytest.raises(ConfigError) as err:
        parse(listener, top)
    assert message in str(err.value)
