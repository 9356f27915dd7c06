from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme


@pytest.fixture(scope="session")
def proxy_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, ssl.SSLContext]:
    """A throwaway CA, a localhost certificate it signed, and a client context trusting it."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "mail.example.com")
    d: Path = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return str(cert_path), str(key_path), client_ctx
