"""The import graph keeps each concern where it belongs (issue 7, "values on the ground floor").

Read from the source with `ast`, so nothing is executed and an import hidden in a function is
seen too. Every rule names the files it covers; a file that is missing fails the test rather
than being skipped, so renaming a module cannot quietly switch a rule off.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "mailgate"


def mailgate_imports(path: Path, root: Path = SRC) -> set[str]:
    """Every mailgate module `path` imports, absolute or relative, at any depth."""
    package = ".".join(("mailgate", *path.relative_to(root).parent.parts))
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "mailgate" or name.startswith("mailgate.")}


def files(*patterns: str) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matched = sorted(SRC.glob(pattern))
        assert matched, f"no file matches {pattern}: a rule would check nothing"
        paths += matched
    return paths


# (files, modules they must not import, why)
RULES = [
    (files("values.py"), ("mailgate",), "the ground floor imports nothing of mailgate"),
    (
        files("protocols/*.py"),
        (
            "mailgate.auth",
            "mailgate.backend",
            "mailgate.config",
            "mailgate.netio",
            "mailgate.session",
            "mailgate.relay",
            "mailgate.server",
        ),
        "protocol cores are sans-I/O and know no authenticator",
    ),
    (files("relay.py"), ("mailgate.protocols",), "the relay parses nothing"),
    (files("config.py"), ("mailgate.auth",), "config is data, not the auth_http client"),
    (
        files("backend/__init__.py", "backend/core.py", "backend/imap.py", "backend/pop3.py")
        + files("backend/smtp.py"),
        ("mailgate.auth", "mailgate.netio", "mailgate.session", "mailgate.config"),
        "backend login cores are sans-I/O",
    ),
    (
        files("auth/*.py"),
        ("mailgate.protocols", "mailgate.backend", "mailgate.session", "mailgate.relay"),
        "authenticators know no protocol wire and no driver",
    ),
    (
        files("netio.py"),
        ("mailgate.session", "mailgate.auth", "mailgate.backend", "mailgate.server"),
        "the driver loop is below the session",
    ),
]


@pytest.mark.parametrize(
    ("path", "banned", "why"),
    [(path, banned, why) for paths, banned, why in RULES for path in paths],
    ids=lambda value: str(value.relative_to(SRC)) if isinstance(value, Path) else "",
)
def test_forbidden_edges(path: Path, banned: tuple[str, ...], why: str) -> None:
    bad = sorted(name for name in mailgate_imports(path) if within(name, banned))
    assert not bad, f"{path.relative_to(SRC)} imports {bad}: {why}"


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    (tmp_path / "protocols").mkdir()
    module = tmp_path / "protocols" / "x.py"
    module.write_text(
        "from ..auth import http\nfrom . import core\nimport mailgate.netio\n"
        "def f():\n    from mailgate.session import Session\n"
    )
    found = mailgate_imports(module, root=tmp_path)
    assert {"mailgate.auth.http", "mailgate.protocols.core", "mailgate.netio"} <= found
    assert "mailgate.session.Session" in found
    assert within("mailgate.auth.http", ("mailgate.auth",))
    assert not within("mailgate.authserver", ("mailgate.auth",))
