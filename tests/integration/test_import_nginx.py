"""`mailgate import-nginx` as an operator runs it: TOML on stdout, one line per unmapped
directive on stderr, and the result passes `mailgate check` with real certificate files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme
from test_cli import env

from mailgate.config import ConfigError, parse
from mailgate.nginx_import import import_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nginx"
# Certificate files each fixture names, relative to its nginx.conf.
CERTIFICATES = {
    "seed": [],
    "sites": ["certs/mail", "certs/brand", "certs/pop"],
    "submission": ["certs/smtp"],
    "legacy": ["legacy"],
}
# Listener keys that another branch adds to the loader (PROXY protocol in). Until it has
# landed they are taken out before `check`; once the loader knows them nothing is taken out.
PENDING_LISTENER_KEYS = ("proxy_protocol", "trusted_proxies")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        capture_output=True,
        text=True,
        env=env(),
        cwd=cwd,
        timeout=60,
    )


def materialise(name: str, tmp_path: Path) -> Path:
    """The fixture copied to tmp_path with a certificate and key for each name it uses."""
    here = tmp_path / name
    shutil.copytree(FIXTURES / name, here)
    ca = trustme.CA()
    for stem in CERTIFICATES[name]:
        issued = ca.issue_cert("mail.example.net", "imap.brand.example", "localhost")
        (here / stem).parent.mkdir(parents=True, exist_ok=True)
        issued.cert_chain_pems[0].write_to_path(here / f"{stem}.pem")
        issued.private_key_pem.write_to_path(here / f"{stem}.key")
    ca.cert_pem.write_to_path(here / "client-ca.pem")
    (here / "logs").mkdir(exist_ok=True)
    return here


def loader_knows_listener_keys() -> bool:
    raw = {"listener": [{"protocol": "imap", "listen": "127.0.0.1:1", "proxy_protocol": True}]}
    raw["auth_http"] = {"url": "http://127.0.0.1:1/"}
    try:
        parse(raw, base_dir=Path())
    except ConfigError:
        return False
    return True


def without_pending_keys(config: dict[str, Any]) -> dict[str, Any]:
    if loader_knows_listener_keys():
        return config
    listeners = [
        {k: v for k, v in lst.items() if k not in PENDING_LISTENER_KEYS}
        for lst in config.get("listener", [])
    ]
    return {**config, "listener": listeners} if listeners else config


@pytest.mark.parametrize("name", sorted(CERTIFICATES))
def test_import_prints_toml_and_notes_and_passes_check(name: str, tmp_path: Path) -> None:
    here = materialise(name, tmp_path)
    result = run("import-nginx", "nginx.conf", cwd=here)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads(result.stdout)
    expected = import_file(here / "nginx.conf")
    assert config == expected.config
    # The same notes, named as the operator named the file.
    assert result.stderr.splitlines() == [note.replace(f"{here}/", "") for note in expected.notes]
    assert "Traceback" not in result.stderr

    out = here / "mailgate.toml"
    out.write_text(tomli_w.dumps(without_pending_keys(config)))
    check = run("check", "-c", str(out), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    listeners = len(config.get("listener", []))
    assert check.stdout.rstrip().endswith(f"ok ({listeners} listeners, auth_http)")


def test_the_seed_block_on_stdout_verbatim(tmp_path: Path) -> None:
    here = materialise("seed", tmp_path)
    result = run("import-nginx", "nginx.conf", cwd=here)
    assert result.stdout == (
        '[imap]\nauth = [\n    "plain",\n    "login",\n    "cram-md5",\n]\n\n'
        '[pop3]\nauth = [\n    "user",\n    "plain",\n    "login",\n    "apop",\n'
        '    "cram-md5",\n]\n\n'
        '[auth_http]\nurl = "http://127.0.0.1:80/auth"\n\n'
        '[auth_http.header]\nX-NGX-Auth-Key = "some secret"\n'
    )
    assert result.stderr == ""


def test_a_missing_certificate_fails_check_after_import(tmp_path: Path) -> None:
    here = materialise("submission", tmp_path)
    (here / "certs/smtp.key").unlink()
    result = run("import-nginx", "nginx.conf", cwd=here)
    out = here / "mailgate.toml"
    out.write_text(tomli_w.dumps(without_pending_keys(tomllib.loads(result.stdout))))
    check = run("check", "-c", str(out), cwd=tmp_path)
    assert check.returncode == 2
    assert "smtp.key" in check.stderr


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"nginx.conf": "mail {\n  auth_http a:1/x;\n"}, "nginx.conf:1: mail { is never closed"),
        ({"nginx.conf": "http { }\n"}, "nginx.conf: no mail {} block"),
        ({"nginx.conf": "mail { include absent.conf; }\n"}, "absent.conf: cannot read"),
        ({}, "nginx.conf: cannot read: No such file"),
    ],
    ids=["syntax", "no mail block", "missing include", "missing file"],
)
def test_errors_are_one_line_and_exit_1(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    for file_name, content in files.items():
        (tmp_path / file_name).write_text(content)
    result = run("import-nginx", "nginx.conf", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("mailgate: ")
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1
