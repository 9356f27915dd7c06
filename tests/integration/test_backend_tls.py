"""TLS from mailgate to the backend: implicit TLS and STARTTLS/STLS, with the backend's
certificate verified against a configured CA, refused when untrusted, or not checked at all."""

from __future__ import annotations

import imaplib
import logging
import poplib
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from harness import (
    FakeAuth,
    TlsBackend,
    imap_backend,
    listener,
    pop3_backend,
    route_to,
    running_auth,
    running_proxy,
    running_tls_backend,
)

PASSWORD = "secret"


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@dataclass(frozen=True)
class BackendCert:
    context: ssl.SSLContext  # the backend's server context
    ca_file: str  # the PEM of the CA that signed it, for [backend] ca_file


@pytest.fixture(scope="module")
def trusted(tmp_path_factory: pytest.TempPathFactory) -> BackendCert:
    """A backend certificate for 127.0.0.1 and the CA mailgate is told to trust."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("backend-tls")
    issued.private_key_and_cert_chain_pem.write_to_path(str(d / "chain.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return BackendCert(server_context(d / "chain.pem", d / "chain.pem"), str(d / "ca.pem"))


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A backend certificate for 127.0.0.1 from a CA mailgate was not told about."""
    issued = trustme.CA().issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("untrusted")
    issued.private_key_and_cert_chain_pem.write_to_path(str(d / "chain.pem"))
    return server_context(d / "chain.pem", d / "chain.pem")


def tls_backend(protocol: str, context: ssl.SSLContext, starttls: bool) -> TlsBackend:
    plain = imap_backend(PASSWORD) if protocol == "imap" else pop3_backend(PASSWORD)
    return TlsBackend(
        greeting=plain.greeting, handler=plain.handler, context=context, starttls=starttls
    )


def config(auth_url: str, protocol: str, **backend: object) -> dict[str, object]:
    return {
        "listener": [listener(protocol)],
        "auth_http": {"url": auth_url, "timeout": 1.0},
        "backend": {"connect_timeout": 1.0, "login_timeout": 2.0, **backend},
    }


def log_in(protocol: str, port: int) -> None:
    """Log in through mailgate and run one command the backend answers; raises on failure."""
    if protocol == "imap":
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        imap.login("alice", PASSWORD)
        assert imap.noop() == ("OK", [b"NOOP completed (fake backend)"])
        imap.logout()
    else:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop.user("alice")
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == 1
        pop.quit()


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_verified_tls_to_the_backend(trusted: BackendCert, protocol: str, mode: str) -> None:
    with (
        running_tls_backend(tls_backend(protocol, trusted.context, mode == "starttls")) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        cfg = config(auth.url, protocol, tls=mode, verify=True, ca_file=trusted.ca_file)
        with running_proxy(cfg) as proxy:
            log_in(protocol, proxy.port(protocol))
    assert backend.tls_errors == []
    # Every credential went over TLS: nothing but STARTTLS/STLS was sent in cleartext.
    cleartext = [line for line in backend.lines if line not in backend.secure_lines]
    assert cleartext == ([] if mode == "implicit" else [cleartext[0]])
    if mode == "starttls":
        assert cleartext[0].rstrip().endswith((b"STARTTLS", b"STLS"))
    assert any(PASSWORD.encode() in line for line in backend.secure_lines)


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_untrusted_backend_certificate_is_unavailable(
    trusted: BackendCert,
    untrusted: ssl.SSLContext,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with (
        running_tls_backend(tls_backend("imap", untrusted, mode == "starttls")) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        cfg = config(auth.url, "imap", tls=mode, verify=True, ca_file=trusted.ca_file)
        with running_proxy(cfg) as proxy:
            imap = imaplib.IMAP4("127.0.0.1", proxy.port("imap"), timeout=10)
            with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                imap.login("alice", PASSWORD)
            imap.logout()
    assert backend.secure_lines == []  # no password reached the impostor
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name == "mailgate.session" and "backend login failed" in r.getMessage()
    ]
    assert len(failures) == 1
    assert f"127.0.0.1:{backend.port}" in failures[0]
    assert "CERTIFICATE_VERIFY_FAILED" in failures[0] or "certificate verify" in failures[0]


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_verify_false_accepts_any_certificate(untrusted: ssl.SSLContext, mode: str) -> None:
    with (
        running_tls_backend(tls_backend("imap", untrusted, mode == "starttls")) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(config(auth.url, "imap", tls=mode, verify=False)) as proxy,
    ):
        log_in("imap", proxy.port("imap"))
    assert any(PASSWORD.encode() in line for line in backend.secure_lines)


@pytest.mark.parametrize("server_name", ["mail.example.com", None])
def test_server_name_is_the_name_verified(
    tmp_path: Path, server_name: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The route names an address; the certificate names the host. `server_name` bridges them."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("mail.example.com").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "chain.pem")
    )
    ctx = server_context(tmp_path / "chain.pem", tmp_path / "chain.pem")
    caplog.set_level(logging.WARNING)
    with (
        running_tls_backend(tls_backend("imap", ctx, starttls=False)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        extra = {"server_name": server_name} if server_name else {}
        cfg = config(auth.url, "imap", tls="implicit", ca_file=str(tmp_path / "ca.pem"), **extra)
        with running_proxy(cfg) as proxy:
            if server_name:
                log_in("imap", proxy.port("imap"))
            else:
                imap = imaplib.IMAP4("127.0.0.1", proxy.port("imap"), timeout=10)
                with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                    imap.login("alice", PASSWORD)
                imap.logout()
    if server_name:
        assert any(PASSWORD.encode() in line for line in backend.secure_lines)
    else:
        assert backend.secure_lines == []
        assert "IP address mismatch" in caplog.text or "CERTIFICATE_VERIFY_FAILED" in caplog.text
