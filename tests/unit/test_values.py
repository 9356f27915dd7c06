"""Hand-written copies in values.py keep every field (a field added later must not be lost)."""

from __future__ import annotations

import dataclasses

from mailgate.values import BackendAuth, BackendTLS, Route, Secret


def test_route_with_secret_keeps_every_other_field() -> None:
    route = Route(
        "10.0.0.1",
        1143,
        "alice*master",
        Secret("old"),
        tls=BackendTLS.STARTTLS,
        mailstore="store1",
        smtp_mode="xclient",
        identity="alice@example.com",
        pool="stores",
        backend_auth=BackendAuth.XOAUTH2,
        credential_label="phone",
    )
    defaults = Route("h", 1, "u", Secret("s"))
    for f in dataclasses.fields(Route):  # every field is set apart from its default above
        if f.name != "secret":
            assert getattr(route, f.name) != getattr(defaults, f.name), f.name
    copied = route.with_secret(Secret("new"))
    assert copied.secret.reveal() == "new"
    for f in dataclasses.fields(Route):
        if f.name != "secret":
            assert getattr(copied, f.name) == getattr(route, f.name), f.name
