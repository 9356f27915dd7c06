"""The benchmark still runs: `bench/run.py --selftest`, one tiny strict round (< 30 s).

No figure is asserted (the machine is shared and timing is noise). The self-test fails, and so
does this test, when any of its paths cannot log in (IMAP, POP3, IMAPS with both certificates,
full and resumed), relay a FETCH or hold idle sessions, or when the report cannot be made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import peers
import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parents[2]
# The self-test's paths (bench/run.py SELFTEST_PATHS): each must have a row in the IMAP table.
PATHS = ("direct", "nginx", "haproxy", "minproxy", "seed", "mg-http", "mg-sqlite",
         "mg-mariadb-nocache", "mg-pg-nocache", "mg-seed")  # fmt: skip


@pytest.mark.bench
def test_bench_selftest_runs_every_path_and_reports() -> None:
    require("cc", "nginx", "haproxy", "openssl", "mariadbd", "mariadb-install-db", "psql",
            peers.postgres_bin("initdb") or "initdb", peers.NGINX_MAIL_MODULE,
            peers.NGINX_MAIL_MODULE.with_name("ngx_http_perl_module.so"))  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--selftest"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    imap = out.split("IMAP logins (LOGIN, LOGOUT)", 1)[1].split("\n\n", 1)[0]
    rows = {line.split()[0] for line in imap.splitlines()[2:] if line.strip()}
    assert rows == set(PATHS), imap
    for section in ("POP3 logins", "IMAPS logins, ECDSA", "IMAPS logins, RSA-2048",
                    "1 MiB FETCH", "Memory per idle", "Database work per login",
                    "PostgreSQL statements per IMAP login", "Ratios"):  # fmt: skip
        assert section in out, section
    assert "warning:" not in out
