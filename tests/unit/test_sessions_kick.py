"""Which logins on their way a kick stops (`Sessions.kick`): a stopped login gets a temporary
failure instead of its session (session.py checks the flag once its backend login is done)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from mailgate.session import NO_BACKEND, Sessions


@dataclass(eq=False)
class Login:
    """The part of a Session on its way that a kick reads and sets."""

    user: str
    backend: str = NO_BACKEND
    mailstore: str = ""
    kicked: bool = False


def worker(*logins: Login) -> Sessions:
    sessions = Sessions()
    sessions.preauth.update(cast(Any, logins))
    return sessions


def test_a_kick_of_a_user_on_a_backend_stops_their_logins_there_and_before_a_choice() -> None:
    checking = Login("alice@example.com")  # the password is being checked: no backend yet
    at_old = Login("alice@example.com", "stores/a", "pooled")
    elsewhere = Login("alice@example.com", "other/x", "other")
    bob = Login("bob@example.com")
    bob_at_old = Login("bob@example.com", "stores/a", "pooled")
    sessions = worker(checking, at_old, elsewhere, bob, bob_at_old)
    assert sessions.kick("Alice@Example.com", "stores/a") == 0  # none relayed yet
    # The first login's member came with its first round trip, before the move began: it
    # would be the old one.
    assert checking.kicked and at_old.kicked
    assert not elsewhere.kicked and not bob.kicked and not bob_at_old.kicked


def test_a_kick_of_a_backend_alone_stops_only_the_logins_at_it() -> None:
    checking = Login("alice@example.com")
    at_old = Login("bob@example.com", "stores/a", "pooled")
    by_mailstore = Login("carol@example.com", "stores/b", "pooled")
    sessions = worker(checking, at_old, by_mailstore)
    sessions.kick(None, "stores/a")
    assert at_old.kicked and not checking.kicked and not by_mailstore.kicked
    sessions.kick(None, "pooled")
    assert by_mailstore.kicked and not checking.kicked
