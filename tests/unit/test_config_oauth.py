"""[oauth]: validated once at start, every error naming its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mailgate.config import ConfigError, OAuthSettings, parse

DIRECTORY = '[directory]\nurl = "sqlite:///d.db"\n'
AUTH_HTTP = '[auth_http]\nurl = "127.0.0.1:9000/auth"\n'
KEYCLOAK = 'issuer = "https://kc.example.com/realms/mail"\naudience = "mailgate"\n'


def oauth(body: str, mode: str = DIRECTORY) -> OAuthSettings | None:
    raw = tomllib.loads(mode + "[oauth]\n" + body)
    return parse(raw, base_dir=Path("/etc/mailgate")).oauth


def test_a_keycloak_realm_needs_two_lines() -> None:
    s = oauth(KEYCLOAK + 'scope = "openid email"\n')
    assert s is not None
    assert (s.issuer, s.audience, s.username_claim) == (
        "https://kc.example.com/realms/mail",
        "mailgate",
        "email",
    )
    assert s.algorithms == ("RS256", "ES256", "PS256", "EdDSA")
    assert (s.clock_skew, s.timeout, s.jwks_cache, s.max_token) == (60.0, 5.0, 300.0, 16384)
    assert s.validates_jwt and s.validates
    assert s.openid_configuration == (
        "https://kc.example.com/realms/mail/.well-known/openid-configuration"
    )


def test_introspection_only() -> None:
    s = oauth(
        'audience = "mailgate"\nintrospection_url = "https://idp.example/introspect"\n'
        'client_id = "mg"\nclient_secret = "s3cret"\n'
    )
    assert s is not None and s.validates and not s.validates_jwt
    assert s.client_secret is not None and "s3cret" not in repr(s)


def test_no_oauth_section_means_no_oauth() -> None:
    assert parse(tomllib.loads(DIRECTORY), base_dir=Path(".")).oauth is None


def test_with_auth_http_only_the_challenge_keys_matter() -> None:
    s = oauth('scope = "mail"\nissuer = "https://kc.example.com/realms/mail"\n', AUTH_HTTP)
    assert s is not None and s.scope == "mail" and not s.validates_jwt


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (KEYCLOAK + 'algorithms = ["RS256", "none"]\n', "oauth.algorithms: 'none' is never"),
        (KEYCLOAK + 'algorithms = ["HS256"]\n', "oauth.algorithms: 'HS256' is never"),
        (KEYCLOAK + 'algorithms = ["RS1"]\n', "oauth.algorithms: must be some of"),
        (KEYCLOAK + "algorithms = []\n", "oauth.algorithms: must not be empty"),
        ('issuer = "https://kc.example.com/realms/mail"\n', "oauth.audience: required"),
        ('audience = "mailgate"\n', "[oauth]: set issuer and audience"),
        ('audience = "m"\njwks_url = "https://kc.example.com/certs"\n', "oauth.issuer: required"),
        (
            KEYCLOAK + 'introspection_url = "https://kc.example.com/introspect"\n',
            "oauth.introspection_url: needs client_id and client_secret",
        ),
        ('issuer = "http://kc.example.com/realms/mail"\naudience = "m"\n', "oauth.issuer: must"),
        ('issuer = "ftp://127.0.0.1/x"\naudience = "m"\n', "oauth.issuer: must be https"),
        (KEYCLOAK + "max_token = 100\n", "oauth.max_token: must be from 1024"),
        (KEYCLOAK + "timeout = 0\n", "oauth.timeout: must be a positive"),
        (KEYCLOAK + 'scope = "a\\"b"\n', "oauth.scope: must be printable"),
        (KEYCLOAK + 'username_claim = ""\n', "oauth.username_claim"),
        (KEYCLOAK + "issuers = []\n", "oauth.issuers: unknown setting"),
    ],
)
def test_mistakes_are_named(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        oauth(body)
    assert message in str(info.value)


def test_http_only_to_loopback_and_ca_file_is_relative_to_the_config() -> None:
    s = oauth(
        'issuer = "http://127.0.0.1:8080/realms/mail"\naudience = "m"\nca_file = "idp-ca.pem"\n'
    )
    assert s is not None and s.ca_file == Path("/etc/mailgate/idp-ca.pem")
    assert oauth('issuer = "http://localhost:8080/realms/mail"\naudience = "m"\n') is not None


def test_the_mechanisms_are_login_methods_of_every_protocol() -> None:
    raw = tomllib.loads(
        DIRECTORY + "[oauth]\n" + KEYCLOAK
        + '[imap]\nauth = ["plain", "xoauth2", "oauthbearer"]\n'
        + '[pop3]\nauth = ["xoauth2"]\n[smtp]\nauth = ["oauthbearer", "plain"]\n'
    )  # fmt: skip
    settings = parse(raw, base_dir=Path("."))
    assert settings.protocols["imap"].auth == ("plain", "xoauth2", "oauthbearer")
    assert settings.protocols["pop3"].auth == ("xoauth2",)
    assert settings.protocols["smtp"].auth == ("oauthbearer", "plain")
