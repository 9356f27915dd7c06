"""Fixtures shared by every test layer: a throwaway CA, a server certificate, free ports."""

from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import trustme

# scripts/peers.py starts real servers; tests of every layer (and tests/e2e/mailgate_proc.py,
# which runs mailgate as a process) import it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

# The names a test server answers to: clients connect to 127.0.0.1 or localhost, and
# mail.example.com stands for the public name (SNI, auth_http Host).
SERVER_NAMES = ("localhost", "127.0.0.1", "mail.example.com")


class CertFiles(NamedTuple):
    cert: Path  # PEM: the leaf certificate followed by its chain
    key: Path  # PEM: the private key of the leaf
    ca: Path  # PEM: the throwaway CA, for clients' `cafile`


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """A certificate for SERVER_NAMES signed by `tls_ca`, written to files."""
    issued = tls_ca.issue_cert(*SERVER_NAMES, common_name="localhost")  # fetchmail wants a CN
    directory = tmp_path_factory.mktemp("tls")
    files = CertFiles(directory / "server.pem", directory / "server.key", directory / "ca.pem")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(files.key)
    tls_ca.cert_pem.write_to_path(files.ca)
    return files


@pytest.fixture
def client_tls_context(server_cert: CertFiles) -> ssl.SSLContext:
    """A client context that trusts only the test CA and checks host names."""
    return ssl.create_default_context(cafile=str(server_cert.ca))


@pytest.fixture
def unused_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
