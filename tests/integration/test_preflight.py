"""`mailgate check` finds what `serve` would fail on: a database driver that is not
installed, certificate files the service user cannot read, a key that is not the
certificate's, a log file that cannot be created. A port in use is not one of them."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from test_cli import env

from mailgate import preflight
from mailgate.config import ConfigError, Settings, parse

BASE = """
[[listener]]
protocol = "imap"
listen = "127.0.0.1:{port}"
tls = "starttls"
[tls]
certificate = "{cert}"
certificate_key = "{key}"
"""
AUTH_HTTP = '[auth_http]\nurl = "http://127.0.0.1:9/auth"\n'


@pytest.fixture
def certs() -> Iterator[Path]:
    """Two certificates with their keys in a directory others may enter (for the
    unprivileged user below): a.pem/a.key, b.pem/b.key."""
    directory = Path(tempfile.mkdtemp(prefix="mailgate-preflight-"))
    directory.chmod(0o755)
    ca = trustme.CA()
    for name in ("a", "b"):
        issued = ca.issue_cert("mail.example.com")
        issued.cert_chain_pems[0].write_to_path(directory / f"{name}.pem")
        issued.private_key_pem.write_to_path(directory / f"{name}.key")
        (directory / f"{name}.pem").chmod(0o644)
        (directory / f"{name}.key").chmod(0o600)  # as shipped: the key for its owner only
    yield directory
    shutil.rmtree(directory)


def settings(text: str, base: Path) -> Settings:
    import tomllib

    return parse(tomllib.loads(text), base_dir=base)


def config(certs: Path, *, key: str = "a.key", extra: str = AUTH_HTTP, port: int = 1143) -> str:
    return BASE.format(port=port, cert=certs / "a.pem", key=certs / key) + extra


def check(path: Path, *, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`mailgate check -c path`; `prelude` runs first in the same interpreter."""
    code = f"{prelude}\nimport sys\nfrom mailgate.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "check", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )


def test_a_good_config_has_no_problems(certs: Path) -> None:
    assert preflight.problems(settings(config(certs), certs)) == []


def test_a_key_that_is_not_the_certificates(certs: Path, tmp_path: Path) -> None:
    found = preflight.problems(settings(config(certs, key="b.key"), certs))
    assert found == [
        f"tls.certificate_key: {certs / 'b.key'} is not the key of the certificate "
        f"{certs / 'a.pem'}"
    ]
    path = tmp_path / "mailgate.toml"
    path.write_text(config(certs, key="b.key"))
    result = check(path)
    assert result.returncode == 2
    assert result.stderr == f"mailgate: configuration error: {found[0]}\n"


def test_an_sni_pair_is_checked_too(certs: Path) -> None:
    sni = f'[[tls.sni]]\nserver_name = "x"\ncertificate = "{certs / "b.pem"}"\n'
    sni += f'certificate_key = "{certs / "a.key"}"\n'
    found = preflight.problems(settings(config(certs) + sni, certs))
    assert found == [
        f"tls.sni[0].certificate_key: {certs / 'a.key'} is not the key of the certificate "
        f"{certs / 'b.pem'}"
    ]


def test_a_key_the_service_user_cannot_read(certs: Path) -> None:
    text = config(certs)
    if os.geteuid() != 0:
        (certs / "a.key").chmod(0o000)
        found = preflight.problems(settings(text, certs))
    else:
        # root reads everything: ask as the unprivileged user a service runs as.
        found = problems_as_nobody(text, certs)
    assert len(found) == 1
    assert found[0].startswith(f"tls.certificate_key: {certs / 'a.key'} cannot be read by ")
    assert found[0].endswith(": Permission denied")


def problems_as_nobody(text: str, base: Path) -> list[str]:
    nobody = pwd.getpwnam("nobody")
    loaded = settings(text, base)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run the check, report, and leave at once
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.write(write, json.dumps(preflight.problems(loaded)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result: list[str] = json.loads(data)
    return result


def test_a_missing_certificate_names_its_file(certs: Path) -> None:
    (certs / "a.pem").unlink()
    found = preflight.problems(settings(config(certs), certs))
    assert found == [
        f"tls.certificate: {certs / 'a.pem'} cannot be read by {pwd.getpwuid(os.geteuid())[0]} "
        f"(uid {os.geteuid()}): No such file or directory"
    ]


def test_a_missing_client_ca_and_backend_ca(certs: Path) -> None:
    extra = AUTH_HTTP + f'[backend]\ntls = "implicit"\nca_file = "{certs / "none.pem"}"\n'
    text = config(certs, extra=extra).replace(
        "[tls]\n", f'[tls]\nverify_client = "on"\nclient_certificate = "{certs / "ca.pem"}"\n'
    )
    found = preflight.problems(settings(text, certs))
    assert [p.split(":")[0] for p in found] == ["tls.client_certificate", "backend.ca_file"]


@pytest.mark.parametrize(
    ("url", "prelude", "message"),
    [
        (
            "mysql+asyncmy://mail:pw@127.0.0.1/mail",
            "import sys; sys.modules['asyncmy'] = None",
            "directory.url: mysql+asyncmy: the driver 'asyncmy' is not installed: "
            "pip install 'mailgate[mysql]'",
        ),
        (
            "postgresql://mail:pw@127.0.0.1/mail",
            "import sys; sys.modules['asyncpg'] = None  # as if it were not installed",
            "directory.url: postgresql: the driver 'asyncpg' is not installed: "
            "pip install 'mailgate[postgresql]'",
        ),
        (
            "mysql://mail:pw@127.0.0.1/mail",
            "import sys; sys.modules['aiomysql'] = None",
            "directory.url: mysql: the driver 'aiomysql' is not installed: "
            "pip install 'mailgate[mysql]'",
        ),
        (
            "mysql+pymysql://mail:pw@127.0.0.1/mail",
            "",
            "directory.url: mysql+pymysql: not an asyncio driver",
        ),
        ("oracle+nosuch://x@y/z", "", "directory.url: oracle+nosuch: unknown database or driver"),
        ("mongodb://x@y/z", "", "directory.url: unsupported database 'mongodb'"),
    ],
    ids=[
        "asyncmy absent",
        "asyncpg absent",
        "aiomysql absent",
        "not asyncio",
        "no such driver",
        "no such database",
    ],
)
def test_a_directory_whose_driver_serve_could_not_load(
    tmp_path: Path, url: str, prelude: str, message: str
) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'[[listener]]\nprotocol = "imap"\nlisten = "127.0.0.1:1143"\n[directory]\nurl = "{url}"\n'
    )
    result = check(path, prelude=prelude)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"mailgate: configuration error: {message}")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_mysql_lookups_without_asyncmy_go_through_aiomysql(tmp_path: Path) -> None:
    """asyncmy runs the lookups when it can be imported; without it they take SQLAlchemy's
    path on aiomysql, slower but working: check says so and passes."""
    path = tmp_path / "mailgate.toml"
    path.write_text(
        '[[listener]]\nprotocol = "imap"\nlisten = "127.0.0.1:1143"\n'
        '[directory]\nurl = "mysql://mail:pw@127.0.0.1:9/mail"\n'
    )
    result = check(path, prelude="import sys; sys.modules['asyncmy'] = None")
    assert result.returncode == 0, result.stderr
    assert "asyncmy cannot be imported, so lookups go through SQLAlchemy" in result.stderr


@pytest.mark.parametrize(
    "url",
    # No "@host" (the password is read as the port), no "://" (nothing to cut at).
    ["mysql://mail:s3cr3t-pw/mail", "mysql//mail:s3cr3t-pw/mail"],
    ids=["no host", "no scheme"],
)
def test_a_url_that_cannot_be_read_is_refused_without_its_password(
    tmp_path: Path, url: str
) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'[[listener]]\nprotocol = "imap"\nlisten = "127.0.0.1:1143"\n[directory]\nurl = "{url}"\n'
    )
    result = check(path)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("mailgate: configuration error: directory.url: not a database")
    assert "s3cr3t-pw" not in result.stderr + result.stdout


def test_an_installed_driver_passes_without_connecting(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    # Nothing listens on port 9: check must not try.
    path.write_text(
        '[[listener]]\nprotocol = "imap"\nlisten = "127.0.0.1:1143"\n'
        '[directory]\nurl = "postgresql://mail:pw@127.0.0.1:9/mail"\n'
    )
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("ok (1 listeners, directory postgresql)")


def test_redis_throttling_without_the_redis_client(tmp_path: Path, certs: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        config(certs, extra=AUTH_HTTP + '[throttle]\nredis_url = "redis://127.0.0.1:9"\n')
    )
    assert check(path).returncode == 0
    result = check(path, prelude="import sys; sys.modules['redis'] = None")
    assert result.stderr == (
        "mailgate: configuration error: cluster.redis_url: the redis client is not "
        "installed: pip install 'mailgate[redis]'\n"
    )


def test_a_log_file_that_cannot_be_created(certs: Path, tmp_path: Path) -> None:
    text = f'log_file = "{tmp_path}/no/x.log"\n' + config(certs)
    found = preflight.problems(settings(text, certs))
    user = f"{pwd.getpwuid(os.geteuid())[0]} (uid {os.geteuid()})"
    assert found == [
        f"log_file: {tmp_path}/no/x.log cannot be created by {user}: no such directory"
    ]
    ok = text.replace(f"{tmp_path}/no/x.log", f"{tmp_path}/x.log")
    assert preflight.problems(settings(ok, certs)) == []
    assert list(tmp_path.iterdir()) == []  # check leaves nothing behind


def test_a_listener_port_in_use_is_not_a_problem(certs: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "mailgate.toml"
        path.write_text(config(certs, port=port))
        result = check(path)
    assert result.returncode == 0, result.stderr
    assert f"imap on 127.0.0.1:{port}" in result.stdout


def test_every_problem_is_printed_and_check_raises_the_first(certs: Path, tmp_path: Path) -> None:
    text = config(certs, key="b.key", extra=AUTH_HTTP + '[backend]\nca_file = "none.pem"\n')
    loaded = settings(text, certs)
    assert len(preflight.problems(loaded)) == 2
    with pytest.raises(ConfigError, match=r"is not the key .* \(and 1 more: run mailgate check\)"):
        preflight.check(loaded)
    path = tmp_path / "mailgate.toml"
    path.write_text(text)
    assert len(check(path).stderr.splitlines()) == 2
