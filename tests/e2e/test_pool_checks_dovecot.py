"""Active health checks against real Dovecot: the greeting, STARTTLS / STLS and implicit TLS
with the certificate verified, and the failures a check must tell apart (a wrong CA, a
protocol's greeting on the wrong port, nothing listening)."""

from __future__ import annotations

import asyncio
import ssl
import statistics
import time

import pytest

from mailgate.backend.health import CheckFailed, CheckTarget, check
from mailgate.values import BackendTLS

from .conftest import DovecotStores, peers

TIMEOUT = 5.0


def target(port: int, protocol: str, tls: BackendTLS, ctx: ssl.SSLContext | None) -> CheckTarget:
    return CheckTarget("127.0.0.1", port, protocol, tls, ctx, "localhost")


@pytest.mark.parametrize(
    ("port_name", "protocol", "tls"),
    [
        ("imap", "imap", BackendTLS.NONE),
        ("imap", "imap", BackendTLS.STARTTLS),
        ("imaps", "imap", BackendTLS.IMPLICIT),
        ("pop3", "pop3", BackendTLS.STARTTLS),
        ("pop3s", "pop3", BackendTLS.IMPLICIT),
    ],
)
def test_checks_pass_on_a_healthy_dovecot(
    dovecot_stores: DovecotStores,
    client_tls_context: ssl.SSLContext,
    port_name: str,
    protocol: str,
    tls: BackendTLS,
) -> None:
    port = dovecot_stores.store1.ports[port_name]
    greeting = asyncio.run(check(target(port, protocol, tls, client_tls_context), TIMEOUT))
    assert greeting.startswith({"imap": "* OK", "pop3": "+OK"}[protocol])


def test_checks_fail_with_the_reason(
    dovecot_stores: DovecotStores, client_tls_context: ssl.SSLContext
) -> None:
    store = dovecot_stores.store1
    untrusted = ssl.create_default_context()  # the system store: not our test CA
    cases = [
        (target(store.ports["imaps"], "imap", BackendTLS.IMPLICIT, untrusted), "TLS"),
        (target(store.ports["pop3"], "imap", BackendTLS.NONE, None), "unexpected greeting"),
        (target(peers.free_port(), "imap", BackendTLS.NONE, None), "connect"),
    ]
    for t, words in cases:
        with pytest.raises(CheckFailed, match=words):
            asyncio.run(check(t, TIMEOUT))


def test_what_a_check_costs(
    dovecot_stores: DovecotStores, client_tls_context: ssl.SSLContext
) -> None:
    """Prints the time and CPU of one check (plain, STARTTLS); asserts only that they work."""
    store = dovecot_stores.store1

    async def many(t: CheckTarget, n: int) -> list[float]:
        took = []
        for _ in range(n):
            begun = time.perf_counter()
            await check(t, TIMEOUT)
            took.append(time.perf_counter() - begun)
        return took

    for name, t in (
        ("plain", target(store.ports["imap"], "imap", BackendTLS.NONE, None)),
        ("starttls", target(store.ports["imap"], "imap", BackendTLS.STARTTLS, client_tls_context)),
    ):
        cpu = time.process_time()
        took = asyncio.run(many(t, 50))
        cpu = (time.process_time() - cpu) / 50
        print(
            f"\ncheck {name}: median {statistics.median(took) * 1000:.2f} ms,"
            f" max {max(took) * 1000:.2f} ms, mailgate CPU {cpu * 1000:.2f} ms per check"
        )
