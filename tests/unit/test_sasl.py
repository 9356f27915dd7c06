"""The SASL server mechanisms: PLAIN, LOGIN, CRAM-MD5 as step machines."""

from __future__ import annotations

import pytest

from mailgate.protocols.sasl import (
    MAX_FIELD,
    Challenge,
    CramMd5Server,
    LoginServer,
    PlainServer,
    SaslError,
    new_server,
)
from mailgate.values import Credentials, Method, Secret

SALT = "<1896.697170952@mail.example>"
DIGEST = "b913a602c7eda7a495b4e6e7334d3890"  # RFC 2195's example response


def final(result: Challenge | Credentials) -> Credentials:
    assert isinstance(result, Credentials)
    return result


# --- PLAIN ----------------------------------------------------------------------------------------


def test_plain_with_initial_response():
    creds = final(PlainServer().step(b"\0alice\0two words"))
    assert (creds.method, creds.user, creds.secret.reveal()) == (Method.PLAIN, "alice", "two words")


def test_plain_challenges_once_then_takes_the_response():
    server = PlainServer()
    assert server.step(None) == Challenge(b"")
    creds = final(server.step(b"admin\0alice\0pw"))
    assert creds.user == "alice"  # authzid is ignored, as nginx does


def test_plain_challenges_only_once():
    server = PlainServer()
    server.step(None)
    with pytest.raises(SaslError):
        server.step(None)


@pytest.mark.parametrize(
    "response",
    [b"", b"alice", b"\0alice", b"\0alice\0pw\0x", b"\0\0pw", b"\0alice\0p\rw", b"\0alice\0p\nw"],
)
def test_plain_malformed(response):
    with pytest.raises(SaslError):
        PlainServer().step(response)


def test_plain_empty_password_is_passed_on():
    assert final(PlainServer().step(b"\0alice\0")).secret.reveal() == ""


def test_fields_are_capped():
    ok = final(PlainServer().step(b"\0alice\0" + b"p" * MAX_FIELD))
    assert len(ok.secret.reveal()) == MAX_FIELD
    with pytest.raises(SaslError):
        PlainServer().step(b"\0alice\0" + b"p" * (MAX_FIELD + 1))
    with pytest.raises(SaslError):
        PlainServer().step(b"\0" + b"u" * (MAX_FIELD + 1) + b"\0pw")


def test_non_utf8_password_round_trips():
    creds = final(PlainServer().step(b"\0alice\0p\xe4ss"))
    assert creds.secret.reveal().encode("utf-8", "surrogateescape") == b"p\xe4ss"


# --- LOGIN ----------------------------------------------------------------------------------------


def test_login_asks_for_user_then_password():
    server = LoginServer()
    assert server.step(None) == Challenge(b"Username:")
    assert server.step(b"alice") == Challenge(b"Password:")
    creds = final(server.step(b"pw with spaces"))
    assert (creds.method, creds.user, creds.secret.reveal()) == (
        Method.LOGIN,
        "alice",
        "pw with spaces",
    )


def test_login_initial_response_is_the_user_name():
    server = LoginServer()
    assert server.step(b"alice") == Challenge(b"Password:")
    assert final(server.step(b"pw")).user == "alice"


@pytest.mark.parametrize("user", [b"", b"al\0ice", b"u" * (MAX_FIELD + 1)])
def test_login_bad_user(user):
    server = LoginServer()
    server.step(None)
    with pytest.raises(SaslError):
        server.step(user)


def test_login_bad_password():
    server = LoginServer()
    server.step(b"alice")
    with pytest.raises(SaslError):
        server.step(b"p\0w")


# --- CRAM-MD5 -------------------------------------------------------------------------------------


def test_cram_md5_challenge_is_the_salt_and_digest_is_lowered():
    server = CramMd5Server(SALT)
    assert server.step(None) == Challenge(SALT.encode())
    creds = final(server.step(b"tim " + DIGEST.upper().encode()))
    assert (creds.method, creds.user, creds.secret.reveal(), creds.salt) == (
        Method.CRAM_MD5,
        "tim",
        DIGEST,
        SALT,
    )


def test_cram_md5_user_may_contain_spaces():
    server = CramMd5Server(SALT)
    server.step(None)
    assert final(server.step(b"tim smith " + DIGEST.encode())).user == "tim smith"


def test_cram_md5_refuses_an_initial_response():
    with pytest.raises(SaslError):
        CramMd5Server(SALT).step(b"tim " + DIGEST.encode())


@pytest.mark.parametrize(
    "response",
    [
        None,
        b"",
        DIGEST.encode(),
        b" " + DIGEST.encode(),
        b"tim " + DIGEST[:31].encode(),
        b"tim " + DIGEST.encode() + b"0",
        b"tim " + b"z" * 32,
    ],
)
def test_cram_md5_malformed(response):
    server = CramMd5Server(SALT)
    server.step(None)
    with pytest.raises(SaslError):
        server.step(response)


# --- factory and secrecy --------------------------------------------------------------------------


def test_new_server_by_name():
    assert isinstance(new_server("PLAIN", SALT), PlainServer)
    assert isinstance(new_server("LOGIN", SALT), LoginServer)
    assert new_server("CRAM-MD5", SALT).step(None) == Challenge(SALT.encode())
    with pytest.raises(SaslError):
        new_server("GSSAPI", SALT)


def test_secret_never_shows_in_repr_str_or_format():
    creds = final(PlainServer().step(b"\0alice\0hunter2"))
    for text in (repr(creds), str(creds), f"{creds}", repr(creds.secret), f"{creds.secret}"):
        assert "hunter2" not in text
    assert creds.secret.equals("hunter2") and creds.secret.equals(Secret("hunter2"))
    assert not creds.secret.equals("hunter3")


def test_sasl_errors_do_not_carry_the_secret():
    with pytest.raises(SaslError) as info:
        PlainServer().step(b"\0alice\0hunter2\0extra")
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value)
