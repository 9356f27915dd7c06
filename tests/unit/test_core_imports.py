"""Style rule 1: the sans-I/O cores import no I/O or clock module.

Checked by parsing the source, so an import hidden inside a function is caught too and nothing
is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "mailgate"
BANNED = frozenset({"asyncio", "socket", "ssl", "time", "selectors"})


def core_modules() -> list[Path]:
    protocols = sorted((SRC / "protocols").rglob("*.py"))
    backends = [SRC / "backend" / f"{name}.py" for name in ("imap", "pop3", "smtp")]
    return protocols + [path for path in backends if path.exists()]


def banned_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and _callee(node) in {"__import__", "import_module"}:
            first = node.args[0] if node.args else None
            names = [first.value] if isinstance(first, ast.Constant) else ["<dynamic import>"]
        else:
            continue
        found += [name for name in names if name.split(".")[0] in BANNED | {"<dynamic import>"}]
    return found


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def test_the_cores_that_must_exist_are_checked():
    names = {path.name for path in core_modules()}
    assert {"events.py", "lines.py", "sasl.py", "pop3.py"} <= names


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_core_imports_no_io(path):
    assert banned_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import os, socket",
        "from ssl import SSLContext",
        "import time as clock",
        "from selectors import DefaultSelector",
        "import asyncio.streams",
        "def f():\n    import time\n",
        "__import__('socket')",
        "importlib.import_module('asyncio')",
        "importlib.import_module(name)",
    ],
)
def test_the_checker_catches(source):
    assert banned_imports(source)


def test_the_checker_allows_similar_names():
    source = "import timeit\nfrom .time import x\nimport sslkeys\n__import__('os')\n"
    assert banned_imports(source) == []
