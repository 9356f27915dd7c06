"""Listener addresses and certificates: IPv6, and SNI choosing among several certificates."""

from __future__ import annotations

import imaplib
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from harness import FakeAuth, imap_backend, route_to, running_auth, running_backend, running_proxy

PASSWORD = "pw"


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener() -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(
            {
                "listener": [{"protocol": "imap", "listen": "[::1]:0"}],
                "auth_http": {"url": auth.url},
            }
        ) as proxy,
    ):
        imap = imaplib.IMAP4("::1", proxy.port("imap"), timeout=10)
        assert imap.login("alice", PASSWORD)[0] == "OK"
        imap.logout()
    assert auth.requests[0]["Client-IP"] == "::1"


def test_sni_chooses_the_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    paths = {}
    for name in ("mail.example.com", "mail.example.org"):
        cert = ca.issue_cert(name)
        paths[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(str(paths[name][0]))
        cert.private_key_pem.write_to_path(str(paths[name][1]))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    default, other = paths["mail.example.com"], paths["mail.example.org"]
    with running_auth(FakeAuth(route_to(1))) as auth:
        cfg = {
            "listener": [{"protocol": "imap", "listen": "127.0.0.1:0", "tls": "implicit"}],
            "auth_http": {"url": auth.url},
            "tls": {
                "certificate": str(default[0]),
                "certificate_key": str(default[1]),
                "sni": [
                    {
                        "server_name": "mail.example.org",
                        "certificate": str(other[0]),
                        "certificate_key": str(other[1]),
                    }
                ],
            },
        }
        with running_proxy(cfg) as proxy:
            port = proxy.port("imap", "implicit")
            for name in ("mail.example.org", "mail.example.com"):
                # Verification with check_hostname proves which certificate was presented.
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    client_ctx.wrap_socket(raw, server_hostname=name) as tls,
                ):
                    assert tls.recv(100).startswith(b"* OK")
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                pytest.raises(ssl.SSLCertVerificationError),
            ):
                client_ctx.wrap_socket(raw, server_hostname="mail.example.net")


def test_client_certificates_reach_the_auth_service(tmp_path: Path) -> None:
    """nginx's ssl_verify_client + auth_http_pass_client_cert: the auth service sees who the
    certificate says the client is."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    client_ca.cert_pem.write_to_path(str(tmp_path / "client-ca.pem"))
    alice = client_ca.issue_cert("alice@example.com", common_name="alice")
    with running_auth(FakeAuth(route_to(1))) as auth:
        cfg = {
            "listener": [{"protocol": "imap", "listen": "127.0.0.1:0", "tls": "implicit"}],
            "auth_http": {"url": auth.url, "pass_client_cert": True},
            "tls": {
                "certificate": str(tmp_path / "cert.pem"),
                "certificate_key": str(tmp_path / "key.pem"),
                "verify_client": "optional",
                "client_certificate": str(tmp_path / "client-ca.pem"),
            },
        }
        with running_proxy(cfg) as proxy:
            for with_cert in (True, False):
                ctx = ssl.create_default_context()
                server_ca.configure_trust(ctx)
                if with_cert:
                    alice.configure_cert(ctx)
                imap = imaplib.IMAP4_SSL(
                    "127.0.0.1", proxy.port("imap", "implicit"), ssl_context=ctx, timeout=10
                )
                with pytest.raises(imaplib.IMAP4.error):  # route_to(1): the backend is down
                    imap.login("alice", "pw")
                imap.logout()
    with_cert, without = auth.requests
    assert with_cert["Auth-SSL-Verify"] == "SUCCESS"
    assert with_cert["Auth-SSL-Subject"].startswith("CN=alice,OU=Testing cert")
    assert with_cert["Auth-SSL-Cert"].startswith("-----BEGIN%20CERTIFICATE-----")
    assert len(with_cert["Auth-SSL-Fingerprint"]) == 40
    assert without["Auth-SSL-Verify"] == "NONE"
    assert "Auth-SSL-Subject" not in without
