"""The admin commands as an operator types them: messages, exit codes, and what a login then gets.

The commands are registered on a parser built here (as cli.py does) and run on a real SQLite
file named by a real config file; passwords come from stdin or a (faked) terminal prompt.
"""

from __future__ import annotations

import argparse
import getpass
import io
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mailgate.auth.schema import SCHEMA_VERSION
from mailgate.cli_admin import register
from mailgate.config import load

OK, FAILED, USAGE = 0, 1, 2


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Cli:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch):
        self.config, self.capsys, self.mp = config, capsys, mp
        self.parser = argparse.ArgumentParser(prog="mailgate")
        sub = self.parser.add_subparsers(dest="command", required=True)
        register(sub, load)

    def __call__(
        self, *argv: str, stdin: str = "", tty: list[str] | None = None, config: bool = True
    ) -> tuple[int, str, str]:
        """Run one command; `tty` are the answers typed at getpass prompts."""
        if tty is not None:
            answers = iter(tty)
            self.mp.setattr(sys, "stdin", Tty())
            self.mp.setattr(getpass, "getpass", lambda prompt="": next(answers))
        else:
            self.mp.setattr(sys, "stdin", io.StringIO(stdin))
        args = self.parser.parse_args([*argv, *(["-c", str(self.config)] if config else [])])
        code = args.func(args)
        out, err = self.capsys.readouterr()
        return code, out, err


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    config = write_config(tmp_path / "mailgate.toml", '[directory]\nurl = "sqlite:///dir.db"\n')
    return Cli(config, capsys, monkeypatch)


@pytest.fixture
def ready(cli: Cli) -> Cli:
    """Schema, two mailstores, example.com on store1 and alice@example.com."""
    for argv in (
        ("directory", "init"),
        ("mailstore", "add", "store1", "--host", "10.0.0.5", "--imap-port", "2143",
         "--tls", "starttls"),
        ("mailstore", "add", "store2", "--host", "mail2.example.net"),
        ("domain", "add", "Example.COM", "--mailstore", "store1"),
    ):  # fmt: skip
        assert cli(*argv)[0] == OK, argv
    assert cli("user", "add", "alice@example.com", "--password-stdin", stdin="p%ony\n")[0] == OK
    return cli


def auth_test(cli: Cli, password: str, *extra: str) -> tuple[int, str, str]:
    return cli("auth", "test", "alice@example.com", "--password-stdin", *extra, stdin=password)


def test_init_upgrade_and_init_again(cli: Cli) -> None:
    created = f"directory schema version {SCHEMA_VERSION} created\n"
    assert cli("directory", "init") == (OK, created, "")
    code, _, err = cli("directory", "init")
    assert code == FAILED
    assert "already has a mailgate schema (use upgrade)" in err
    current = f"directory schema at version {SCHEMA_VERSION}\n"
    assert cli("directory", "upgrade") == (OK, current, "")


def test_commands_before_init_say_what_to_do(cli: Cli) -> None:
    code, _, err = cli("user", "list")
    assert code == FAILED
    assert "no mailgate schema: run `directory init` first" in err


def test_a_user_logs_in_on_the_domains_mailstore(ready: Cli) -> None:
    code, out, err = auth_test(ready, "p%ony\n")
    assert code == OK, err
    assert out.splitlines() == [
        "passdb: alice@example.com auth succeeded",
        "  backend: 10.0.0.5:2143 (imap, tls starttls)",
        "  mailstore: store1",
        "  login user: alice@example.com",
    ]
    code, out, _ = auth_test(ready, "p%ony\n", "--protocol", "pop3")
    assert "  backend: 10.0.0.5:110 (pop3, tls starttls)" in out


def test_wrong_password_and_unknown_user_fail_with_the_reason(ready: Cli) -> None:
    code, out, _ = auth_test(ready, "nope\n")
    assert code == FAILED
    assert out.splitlines() == ["passdb: alice@example.com auth failed", "  why: wrong password"]
    code, out, _ = ready("auth", "test", "bob@example.com", "--password-stdin", stdin="x\n")
    assert (code, out.splitlines()[1]) == (FAILED, "  why: unknown user")
    assert "p%ony" not in out and "nope" not in out


def test_passwd_disable_enable_move_and_list(ready: Cli) -> None:
    assert ready("user", "passwd", "Alice@Example.com", "--password-stdin", stdin="new\n")[0] == OK
    assert auth_test(ready, "p%ony\n")[0] == FAILED
    assert auth_test(ready, "new\n")[0] == OK

    assert ready("user", "disable", "alice@example.com")[:2] == (
        OK, "user alice@example.com disabled\n"
    )  # fmt: skip
    code, out, _ = auth_test(ready, "new\n")
    assert (code, out.splitlines()[1]) == (FAILED, "  why: user disabled")
    assert ready("user", "enable", "alice@example.com")[0] == OK

    assert ready("user", "move", "alice@example.com", "store2")[0] == OK
    code, out, _ = auth_test(ready, "new\n")
    assert (code, out.splitlines()[1]) == (OK, "  backend: mail2.example.net:143 (imap, tls none)")
    code, out, _ = ready("user", "list", "--domain", "example.com")
    assert out.splitlines() == [
        "ADDRESS            MAILSTORE  MOVED  ACTIVE  SCHEME      OAUTH-ONLY",
        "alice@example.com  store2     yes    yes     {ARGON2ID}  no",
    ]
    code, _, err = ready("user", "list", "--domain", "example.net")
    assert (code, err) == (FAILED, "mailgate: unknown domain 'example.net'\n")


def test_master_user_mailstore(ready: Cli) -> None:
    argv = ("mailstore", "add", "store3", "--host", "10.0.0.9", "--master-user", "proxy")
    code, _, err = ready(*argv)
    assert code == USAGE
    assert "no terminal to ask for the password: use --master-password-stdin" in err
    assert ready(*argv, "--master-password-stdin", stdin="m-secret\n")[0] == OK
    assert ready("domain", "add", "example.org", "--mailstore", "store3")[0] == OK
    assert ready("user", "add", "dave@example.org", tty=["d-pw", "d-pw"])[0] == OK
    code, out, _ = ready("auth", "test", "dave@example.org", tty=["d-pw"])
    assert code == OK
    assert "  login user: dave@example.org*proxy" in out
    assert "m-secret" not in out and "d-pw" not in out
    code, out, _ = ready("mailstore", "list")
    assert out.splitlines()[3].split() == [
        "store3", "10.0.0.9", "-", "-", "-", "none", "proxy", "yes", "1", "0", "-", "-", "-"
    ]  # fmt: skip
    assert ready("mailstore", "set-pool", "store3", "stores") == (
        OK, "mailstore store3: logins go to pool stores\n", "",
    )  # fmt: skip
    assert ready("mailstore", "list")[1].splitlines()[3].split()[-2] == "stores"
    assert ready("mailstore", "set-pool", "store3")[0] == OK
    assert ready("mailstore", "list")[1].splitlines()[3].split()[-2] == "-"


def test_refusals_name_the_problem(ready: Cli) -> None:
    cases = [
        (("mailstore", "add", "store1", "--host", "10.0.0.1"), "mailstore 'store1' already exists"),
        (("mailstore", "add", "s9", "--host", "10.0.0.1:143"), "give a host name or an IP address"),
        (("domain", "add", "example.net", "--mailstore", "nope"), "unknown mailstore 'nope'"),
        (("domain", "add", "example.com", "--mailstore", "store2"), "domain 'example.com' already"),
        (("mailstore", "remove", "store1"), "mailstore 'store1' is in use by 1 domain and 0 moved"),
        (("domain", "remove", "example.com"), "domain 'example.com' has 1 user; remove them first"),
        (("user", "move", "bob@example.com", "store2"), "unknown user 'bob@example.com'"),
        (("user", "disable", "not-an-address"), "expected local-part@domain"),
        (("user", "remove", "bob@example.com"), "unknown user 'bob@example.com'"),
    ]
    for argv, message in cases:
        code, _, err = ready(*argv)
        assert code == FAILED, argv
        assert message in err, (argv, err)


def test_user_add_checks_domain_duplicates_and_password(ready: Cli) -> None:
    def add(address: str, stdin: str = "pw\n", *extra: str) -> tuple[int, str, str]:
        return ready("user", "add", address, "--password-stdin", *extra, stdin=stdin)

    assert add("bob@example.net")[2] == (
        "mailgate: unknown domain 'example.net': add it with `domain add` first\n"
    )
    assert add("ALICE@example.com")[2] == "mailgate: user 'alice@example.com' already exists\n"
    assert add("bob@example.com", "\n")[:3:2] == (
        FAILED, "mailgate: empty password: an empty password never logs in\n"
    )  # fmt: skip
    assert add("bob@example.com", "pw\n", "--scheme", "ROT13")[2] == (
        "mailgate: unknown password scheme 'ROT13'\n"
    )
    assert add("bob@example.com", "pw\n", "--mailstore", "nope")[0] == FAILED
    assert add("bob@example.com", "b pw\n", "--scheme", "PLAIN")[0] == OK
    _, out, _ = ready("user", "list")
    assert [line.split()[0] for line in out.splitlines()] == [
        "ADDRESS", "alice@example.com", "bob@example.com"
    ]  # fmt: skip
    assert "{PLAIN}" in out and "b pw" not in out


def test_password_prompt_on_a_terminal_asks_twice(ready: Cli) -> None:
    code, _, err = ready("user", "add", "bob@example.com", tty=["one", "two"])
    assert (code, err) == (FAILED, "mailgate: the passwords do not match\n")
    assert ready("user", "add", "bob@example.com", tty=["one", "one"])[0] == OK
    code, _, err = ready("user", "add", "carol@example.com")  # no tty, no --password-stdin
    assert code == USAGE
    assert "no terminal to ask for the password: use --password-stdin" in err


def test_passwords_are_never_accepted_in_argv(ready: Cli) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ready.parser.parse_args(["user", "add", "bob@example.com", "--password", "secret"])
    assert exit_info.value.code == USAGE


def test_remove_in_order(ready: Cli) -> None:
    assert ready("user", "remove", "alice@example.com")[:2] == (
        OK, "user alice@example.com removed\n"
    )  # fmt: skip
    assert ready("domain", "remove", "example.com")[0] == OK
    assert ready("mailstore", "remove", "store1")[0] == OK
    assert ready("domain", "list")[1] == "DOMAIN  MAILSTORE  ACTIVE  USERS\n"


def test_domain_disable_refuses_its_users(ready: Cli) -> None:
    assert ready("domain", "disable", "example.com")[0] == OK
    code, out, _ = auth_test(ready, "p%ony\n")
    assert (code, out.splitlines()[1]) == (FAILED, "  why: domain disabled")
    assert ready("domain", "list")[1].splitlines()[1].split() == [
        "example.com",
        "store1",
        "no",
        "1",
    ]


def config_cases(tmp_path: Path) -> dict[str, tuple[str, int, str]]:
    custom = (
        '[directory]\nurl = "sqlite:///x.db"\n[directory.queries]\n'
        'password = "SELECT clear AS password FROM users WHERE email = :user"\n'
        'route = "SELECT destination_mailstore AS host FROM transport WHERE domain = :domain"\n'
    )
    return {
        "no directory": ('[auth_http]\nurl = "127.0.0.1:9000/auth"\n', USAGE, "no [directory]"),
        "bad toml": ("[directory\n", USAGE, "configuration error"),
        "custom": (custom, FAILED, "uses its own queries"),
        "bad path": (f'[directory]\nurl = "sqlite:///{tmp_path}/a/b.db"\n', FAILED, "database"),
    }


@pytest.mark.parametrize("case", ["no directory", "bad toml", "custom", "bad path"])
def test_config_problems(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    body, expected_code, message = config_cases(tmp_path)[case]
    cli = Cli(write_config(tmp_path / "c.toml", body), capsys, monkeypatch)
    code, out, err = cli("user", "list")
    assert (code, out) == (expected_code, "")
    assert err.startswith("mailgate: ") and message in err


def test_missing_config_option_is_a_usage_error(cli: Cli) -> None:
    code, _, err = cli("user", "list", config=False)
    assert code == USAGE
    assert "-c FILE is required" in err


def test_the_real_command_line_dispatches_to_these_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_module = pytest.importorskip("mailgate.cli")
    main: Callable[[list[str]], int] = cli_module.main
    config = write_config(tmp_path / "m.toml", '[directory]\nurl = "sqlite:///d.db"\n')
    assert main(["directory", "init", "-c", str(config)]) == OK
    assert main(["mailstore", "add", "s1", "--host", "10.0.0.5", "-c", str(config)]) == OK
    assert main(["mailstore", "list", "-c", str(config)]) == OK
    assert "s1    10.0.0.5" in capsys.readouterr().out


def test_app_passwords_and_oauth_only_from_the_command_line(ready: Cli) -> None:
    code, out, err = ready(
        "user", "app-password", "add", "alice@example.com", "--label", "phone",
        "--protocols", "imap,smtp", "--expires", "2999-12-31",
    )  # fmt: skip
    assert code == OK, err
    lines = out.splitlines()
    assert lines[0] == "app password phone added for alice@example.com, until 3000-01-01 00:00 UTC"
    generated = lines[1].removeprefix("password: ")
    assert len(generated) == 24 and lines[2] == "(shown once; only its hash is stored)"
    code, out, _ = ready(
        "user", "app-password", "add", "alice@example.com", "--label", "laptop",
        "--protocols", "pop3", "--password-stdin", stdin="typed-app-pw\n",
    )  # fmt: skip
    assert (code, out) == (OK, "app password laptop added for alice@example.com\n")

    code, out, _ = ready("user", "app-password", "list", "alice@example.com")
    rows = [line.split("  ") for line in out.splitlines()]
    assert out.splitlines()[0].split() == ["LABEL", "PROTOCOLS", "EXPIRES", "CREATED", "LAST-USED"]
    assert [r[0] for r in rows[1:]] == ["phone", "laptop"]
    assert "imap,smtp" in out and "3000-01-01 00:00" in out and "never" in out
    assert generated not in out and "typed-app-pw" not in out and "ARGON2" not in out

    # store1 has no master user, so the right app password is a temporary failure there:
    # auth test says so, which is what an operator needs to see.
    code, out, _ = ready("auth", "test", "alice@example.com", "--password-stdin", stdin=generated)
    assert code == FAILED and "no master user" in out

    assert ready("user", "set-oauth-only", "alice@example.com", "on")[:2] == (
        OK, "main password of alice@example.com refused: OAuth and app passwords only\n"
    )  # fmt: skip
    code, out, _ = auth_test(ready, "p%ony\n")
    assert (code, out.splitlines()[1]) == (
        FAILED, "  why: main password refused: the user is oauth-only, and no app password"
        " for imap matched"
    )  # fmt: skip
    assert "yes" in ready("user", "list")[1].splitlines()[1].split()[-1]
    assert ready("user", "set-oauth-only", "alice@example.com", "off")[0] == OK
    assert auth_test(ready, "p%ony\n")[0] == OK

    assert ready("user", "app-password", "revoke", "alice@example.com", "laptop")[:2] == (
        OK, "app password laptop of alice@example.com revoked\n"
    )  # fmt: skip
    cases = [
        (("revoke", "alice@example.com", "laptop"), "has no app password labelled 'laptop'"),
        (("add", "alice@example.com", "--label", "phone", "--protocols", "imap"),
         "already has an app password labelled 'phone'"),
        (("add", "alice@example.com", "--label", "x", "--protocols", "imap,nntp"), "'nntp'"),
        (("add", "bob@example.com", "--label", "x", "--protocols", "imap"), "unknown user"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, err = ready("user", "app-password", *argv)
        assert code == FAILED and message in err, (argv, err)
    code, _, err = ready("user", "app-password", "add", "alice@example.com", "--label", "x",
                         "--protocols", "imap", "--expires", "soon")  # fmt: skip
    assert code == USAGE and "expected a date" in err


def test_mailstore_oauth_login(ready: Cli) -> None:
    code, _, err = ready("mailstore", "set-oauth-login", "store1", "master")
    assert code == FAILED and "needs a master user" in err
    assert ready("mailstore", "set-oauth-login", "store1", "token")[:2] == (
        OK, "mailstore store1: oauth login token\n"
    )  # fmt: skip
    assert ready("mailstore", "list")[1].splitlines()[1].split()[-1] == "token"
    assert ready("mailstore", "set-oauth-login", "store1", "default")[0] == OK
    assert ready("mailstore", "list")[1].splitlines()[1].split()[-1] == "-"
    argv = ("mailstore", "add", "store4", "--host", "10.0.0.4", "--oauth-login", "token")
    assert ready(*argv)[0] == OK
