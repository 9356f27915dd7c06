"""SASL OAUTHBEARER (RFC 7628) and XOAUTH2 (Google) as step machines, with the published vectors.

The base64 strings below are copied from RFC 7628 section 4 and from Google's "OAuth 2.0
Mechanism" page for Gmail; they are decoded here, never re-encoded by the code under test.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.protocols.sasl import (
    MAX_FIELD,
    MAX_TOKEN,
    OAUTH_OVERHEAD,
    Challenge,
    OAuthBearerServer,
    SaslError,
    XOAuth2Server,
    error_challenge,
    is_dummy_response,
    max_oauth_response,
    new_server,
)
from mailgate.values import Credentials, Method

# RFC 7628 4.1 (IMAP, port 143): the client's initial response, one line of base64.
RFC7628_IMAP = (
    "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyI"
    "HZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
)
# RFC 7628 4.2 and 4.4 (SMTP submission, port 587).
RFC7628_SMTP = (
    "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9NTg3AWF1dGg9QmVhcmVyI"
    "HZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
)
RFC7628_TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
# RFC 7628 4.3: the server's error challenge, and the client's dummy response "AQ==".
RFC7628_ERROR = (
    "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3VyYX"
    "Rpb24iOiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0="
)
RFC7628_DUMMY = "AQ=="
# Google: the initial client response for someuser@example.com, and the error challenge.
GOOGLE_XOAUTH2 = (
    "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSF"
    "JoZG1semRHRXVZMjl0Q2cBAQ=="
)
GOOGLE_TOKEN = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
GOOGLE_ERROR = (
    "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIG1hYyIsInNjb3BlIjoiaHR0cHM6Ly9tYWlsLmdvb2dsZS"
    "5jb20vIn0K"
)


def final(result: Challenge | Credentials) -> Credentials:
    assert isinstance(result, Credentials), result
    return result


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# --- the published vectors ------------------------------------------------------------------------


@pytest.mark.parametrize("vector", [RFC7628_IMAP, RFC7628_SMTP])
def test_rfc7628_client_responses(vector: str) -> None:
    creds = final(OAuthBearerServer().step(b64(vector)))
    assert (creds.method, creds.user, creds.secret.reveal()) == (
        Method.OAUTHBEARER,
        "user@example.com",
        RFC7628_TOKEN,
    )


def test_rfc7628_error_challenge_is_byte_exact() -> None:
    got = error_challenge(
        Method.OAUTHBEARER,
        scope="example_scope",
        openid_configuration="https://example.com/.well-known/openid-configuration",
    )
    assert got == b64(RFC7628_ERROR)
    assert is_dummy_response(Method.OAUTHBEARER, b64(RFC7628_DUMMY))
    assert not is_dummy_response(Method.OAUTHBEARER, b"")


def test_google_xoauth2_client_response() -> None:
    creds = final(XOAuth2Server().step(b64(GOOGLE_XOAUTH2)))
    assert (creds.method, creds.user, creds.secret.reveal()) == (
        Method.XOAUTH2,
        "someuser@example.com",
        GOOGLE_TOKEN,
    )


def test_google_xoauth2_error_challenge() -> None:
    # Google's example lists "bearer mac"; its decoded, "formatted for clarity" form and
    # Dovecot both say "bearer", the only scheme we take. Everything else is the same.
    google = json.loads(b64(GOOGLE_ERROR))
    ours = error_challenge(Method.XOAUTH2, scope="https://mail.google.com/")
    assert ours == b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
    assert json.loads(ours) == google | {"schemes": "bearer"}
    assert is_dummy_response(Method.XOAUTH2, b"")
    assert not is_dummy_response(Method.XOAUTH2, b"\x01")


def test_error_challenge_leaves_out_what_is_not_configured() -> None:
    assert error_challenge(Method.OAUTHBEARER) == b'{"status":"invalid_token"}'
    assert error_challenge(Method.XOAUTH2) == b'{"status":"401","schemes":"bearer"}'
    with pytest.raises(ValueError):
        error_challenge(Method.PLAIN)


# --- OAUTHBEARER --------------------------------------------------------------------------------


def test_oauthbearer_without_initial_response_gets_an_empty_challenge() -> None:
    server = OAuthBearerServer()
    assert server.step(None) == Challenge(b"")
    assert final(server.step(b"n,a=bob@example.org,\x01auth=Bearer t0k\x01\x01")).user == (
        "bob@example.org"
    )
    with pytest.raises(SaslError):  # one empty challenge, not a second
        second = OAuthBearerServer()
        second.step(None)
        second.step(None)


def test_oauthbearer_without_authzid_leaves_the_user_to_the_token() -> None:
    creds = final(OAuthBearerServer().step(b"n,,\x01auth=Bearer abc.def.ghi\x01\x01"))
    assert (creds.user, creds.secret.reveal()) == ("", "abc.def.ghi")


def test_oauthbearer_unescapes_the_authzid_and_takes_flag_y() -> None:
    creds = final(OAuthBearerServer().step(b"y,a=a=2Cb=3Dc@x,\x01auth=Bearer t\x01\x01"))
    assert creds.user == "a,b=c@x"


def test_oauthbearer_scheme_is_case_insensitive_and_extra_fields_are_ignored() -> None:
    msg = b"n,a=u@x,\x01port=993\x01mech=x y\x01auth=bEaReR  t=\x01host=imap.x\x01\x01"
    assert final(OAuthBearerServer().step(msg)).secret.reveal() == "t="


@pytest.mark.parametrize(
    ("response", "why"),
    [
        (b"\x01", "dummy"),
        (b"", "wants"),
        (b"n,a=u@x,\x01auth=Bearer t\x01", "wants"),  # one ^A short
        (b"n,a=u@x\x01auth=Bearer t\x01\x01", "GS2"),
        (b"p=tls-unique,a=u@x,\x01auth=Bearer t\x01\x01", "channel binding"),
        (b"x,a=u@x,\x01auth=Bearer t\x01\x01", "flag"),
        (b"n,u@x,\x01auth=Bearer t\x01\x01", "authzid"),
        (b"n,a=u=2Dx,\x01auth=Bearer t\x01\x01", "escape"),
        (b"n,a=u@x,\x01host=x\x01\x01", "no auth"),
        (b"n,a=u@x,\x01auth=Basic dTpw\x01\x01", "Bearer"),
        (b"n,a=u@x,\x01auth=Bearer \x01\x01", "b64token"),
        (b"n,a=u@x,\x01auth=Bearer a b\x01\x01", "b64token"),
        (b"n,a=u@x,\x01auth=Bearer t=x\x01\x01", "b64token"),  # "=" only at the end
        (b"n,a=u@x,\x01auth=Bearer t\x01auth=Bearer u\x01\x01", "repeated"),
        (b"n,a=u@x,\x01a-b=1\x01auth=Bearer t\x01\x01", "key=value"),
        (b"n,a=u@x,\x01auth=Bearer t\x00\x01\x01", "key=value"),
        (b"n,a=u\x00@x,\x01auth=Bearer t\x01\x01", "control"),
    ],
)
def test_oauthbearer_malformed(response: bytes, why: str) -> None:
    with pytest.raises(SaslError, match=f"(?i){why}"):
        OAuthBearerServer().step(response)


# --- XOAUTH2 --------------------------------------------------------------------------------------


def test_xoauth2_fields_may_come_in_any_order_and_unknown_ones_are_ignored() -> None:
    creds = final(XOAuth2Server().step(b"auth=Bearer tok\x01vendor=x\x01user=a@b\x01\x01"))
    assert (creds.user, creds.secret.reveal()) == ("a@b", "tok")


def test_xoauth2_takes_an_internationalised_user_name() -> None:
    name = "관리자@example.com"
    response = f"user={name}\x01auth=Bearer tok\x01\x01".encode()
    assert final(XOAuth2Server().step(response)).user == name


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"user=a@b\x01auth=Bearer t\x01",
        b"auth=Bearer t\x01\x01",
        b"user=\x01auth=Bearer t\x01\x01",
        b"user=a@b\x01\x01",
        b"user=a@b\x01auth=Bearer\x01\x01",
        b"user=a\r\nb\x01auth=Bearer t\x01\x01",
        b"user=" + b"u" * (MAX_FIELD + 1) + b"\x01auth=Bearer t\x01\x01",
    ],
)
def test_xoauth2_malformed(response: bytes) -> None:
    with pytest.raises(SaslError):
        XOAuth2Server().step(response)


# --- limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", [XOAuth2Server, OAuthBearerServer])
def test_token_limit_is_its_own_and_configurable(server: type) -> None:
    def message(token: bytes) -> bytes:
        if server is XOAuth2Server:
            return b"user=u@x\x01auth=Bearer " + token + b"\x01\x01"
        return b"n,a=u@x,\x01auth=Bearer " + token + b"\x01\x01"

    # The default is far above the 1 KiB that user names and passwords get.
    assert MAX_TOKEN == 16 * 1024 > MAX_FIELD
    token = b"a" * MAX_TOKEN
    assert final(server().step(message(token))).secret.reveal() == token.decode()
    with pytest.raises(SaslError, match="longer than"):
        server().step(message(token + b"a"))
    assert final(server(100).step(message(b"t" * 100))).secret
    with pytest.raises(SaslError):
        server(100).step(message(b"t" * 101))
    with pytest.raises(SaslError, match="too long"):  # refused before it is parsed
        server(100).step(message(b"t" * (100 + OAUTH_OVERHEAD)))


def test_max_oauth_response_covers_the_longest_message() -> None:
    msg = b"n,a=" + b"=2C" * MAX_FIELD + b",\x01auth=Bearer " + b"t" * MAX_TOKEN + b"\x01\x01"
    assert len(base64.b64encode(msg)) <= max_oauth_response(MAX_TOKEN)
    assert max_oauth_response(1000) == len(base64.b64encode(b"x" * (1000 + OAUTH_OVERHEAD)))


def test_new_server_makes_both_with_the_token_limit() -> None:
    assert isinstance(new_server("XOAUTH2", ""), XOAuth2Server)
    oauthbearer = new_server("OAUTHBEARER", "", max_token=10)
    assert isinstance(oauthbearer, OAuthBearerServer)
    with pytest.raises(SaslError):
        oauthbearer.step(b"n,,\x01auth=Bearer " + b"t" * 11 + b"\x01\x01")


def test_the_token_never_shows_in_reprs_or_errors() -> None:
    creds = final(XOAuth2Server().step(b"user=u@x\x01auth=Bearer s3cr3t-token\x01\x01"))
    assert "s3cr3t" not in repr(creds) and "s3cr3t" not in str(creds)
    with pytest.raises(SaslError) as info:
        OAuthBearerServer().step(b"n,a=u@x,\x01auth=Bearer s3cr3t token\x01\x01")
    assert "s3cr3t" not in str(info.value)


# --- properties ---------------------------------------------------------------------------------

B64TOKEN = st.from_regex(r"\A[A-Za-z0-9\-._~+/]{1,64}={0,2}\Z")
NAME = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
)  # no surrogates, no control characters
KEY = st.from_regex(r"\A[a-z]{1,8}\Z").filter(lambda k: k != "auth")
VALUE = st.binary(max_size=20).map(lambda b: bytes(c for c in b if 0x20 <= c <= 0x7E))


def _escape(name: str) -> bytes:
    return name.encode().replace(b"=", b"=3D").replace(b",", b"=2C")


@given(user=st.one_of(st.just(""), NAME), token=B64TOKEN, extra=st.dictionaries(KEY, VALUE))
def test_oauthbearer_round_trips_any_user_token_and_fields(
    user: str, token: str, extra: dict[str, bytes]
) -> None:
    fields = [k.encode() + b"=" + v for k, v in extra.items()] + [b"auth=Bearer " + token.encode()]
    authzid = b"a=" + _escape(user) if user else b""
    msg = b"n," + authzid + b",\x01" + b"\x01".join(fields) + b"\x01\x01"
    creds = final(OAuthBearerServer().step(msg))
    assert (creds.user, creds.secret.reveal()) == (user, token)


@given(user=NAME.filter(lambda n: "\x01" not in n), token=B64TOKEN)
def test_xoauth2_round_trips_any_user_and_token(user: str, token: str) -> None:
    msg = b"user=" + user.encode() + b"\x01auth=Bearer " + token.encode() + b"\x01\x01"
    creds = final(XOAuth2Server().step(msg))
    assert (creds.user, creds.secret.reveal()) == (user, token)


@given(data=st.binary(max_size=300))
def test_any_input_gives_credentials_or_sasl_error(data: bytes) -> None:
    for server in (OAuthBearerServer(), XOAuth2Server()):
        try:
            result = server.step(data)
        except SaslError:
            continue
        assert isinstance(result, Credentials)
        token = result.secret.reveal()
        assert 0 < len(token) <= MAX_TOKEN and token.isascii() and " " not in token
        assert "\r" not in result.user and "\n" not in result.user and "\0" not in result.user
