"""Builds the authenticator chain the config asks for: Throttled(Cached(source)).

The source is either the nginx auth_http client or the SQL directory. Throttling and caching
are wrappers with the same interface, so each can be tested alone and turned off alone.
"""

from __future__ import annotations

from mailgate.auth import Authenticator
from mailgate.config import Settings
from mailgate.nodestate import NodeState
from mailgate.statestore import LocalStore, Store


def build_source(settings: Settings) -> Authenticator:
    if settings.directory is not None:
        from mailgate.auth.directory import SqlDirectory

        return SqlDirectory(settings.directory, settings.oauth)
    if settings.auth_http is not None:
        from mailgate.auth.http import AuthHttpClient

        return AuthHttpClient(settings.auth_http, settings.oauth)
    raise ValueError("no [auth_http] or [directory] configured")


def build_authenticator(settings: Settings, store: Store | None = None) -> Authenticator:
    """The chain for `settings`; `store` is where the throttle counts (the node's shared
    state; by default a store of this process alone)."""
    auth = build_source(settings)
    if settings.directory is not None and settings.directory.cache_ttl > 0:
        from mailgate.auth.cache import Cached

        auth = Cached(auth, ttl=settings.directory.cache_ttl, size=settings.directory.cache_size)
    if settings.throttle.enabled:
        from mailgate.auth.throttle import Throttled

        if store is None:
            store = LocalStore(NodeState(settings.throttle, settings.limits))
        auth = Throttled(auth, settings.throttle, store, settings.trusted_networks)
    return auth
