"""Brute-force throttling: an Authenticator that wraps another one.

Every guess is counted before it is checked. `begin` reserves the attempt against the client
address's budget (IPv6 per /64, what one subscriber gets) and the user's (the normalised name),
in the store all workers of the node share (the supervisor's, or Redis across nodes): while
failures plus guesses in flight have reached `lockout_after`, or a lock-out runs, the attempt
is refused without asking the inner authenticator, so however many guesses arrive at once no
more than `lockout_after` reach the password check in a window, and a correct password cannot
slip through a lock-out. `end` settles the reservation: a failure counts, and the one that
spends the budget starts a `lockout`; a success clears the user's failures.

Refused logins are answered after a delay: the first `free` failures cost nothing, then the
delay doubles from `base_delay` up to `max_delay` (`Reject.wait`: the session driver or nginx
sleeps it). An address that failed as more than `per_ip_users` distinct users in the window
(password spraying) gets `max_delay` on every failure. Too many logins of one user or from one
address at once (`concurrent_per_user`, `concurrent_per_ip`) get a temporary failure.
Addresses on `trusted_networks` (a webmail host) have no address budget of their own.

The wrapper never learns whether a user exists: it sees Reject, the same for an unknown user
and a wrong password, and answers both the same way. TempFail (an outage) is not counted.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from mailgate import metrics, names
from mailgate.addresses import subscriber
from mailgate.auth import Authenticator
from mailgate.config import ThrottleSettings
from mailgate.networks import EMPTY, NetworkList
from mailgate.nodestate import Admission, Attempt, Settled, Verdict
from mailgate.ratelog import RateLimitedLog
from mailgate.statestore import Store
from mailgate.values import ClientInfo, Credentials, Decision, Method, Reject, Route, TempFail

log = logging.getLogger("mailgate.throttle")
_refusals = RateLimitedLog(log)

MAX_DOUBLINGS = 60  # 2**60 * any sane base_delay is past max_delay; keeps the float finite
# Every name `mailgate.names` refuses counts as this one user: no spelling the directory
# would refuse gets a budget of its own (no normalised name contains a space).
REFUSED_NAMES = "refused names"


class Throttled:
    """Authenticator wrapper; see the module docstring."""

    def __init__(
        self,
        inner: Authenticator,
        settings: ThrottleSettings,
        store: Store,
        trusted: NetworkList = EMPTY,
    ) -> None:
        self._inner = inner
        self._settings = settings
        self._store = store
        self._trusted = trusted

    def flush(self) -> None:
        """Pass a cache flush (SIGUSR1) on to the wrapped authenticator; the counters stay."""
        flush = getattr(self._inner, "flush", None)
        if callable(flush):
            flush()

    def forget(self, user: str | None = None, domain: str | None = None) -> int:
        """Pass a cache invalidation (a user or domain changed) on; see Cached.forget."""
        forget = getattr(self._inner, "forget", None)
        return int(forget(user=user, domain=domain)) if callable(forget) else 0

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        # SMTP relay without AUTH guesses no password: the envelope decides, nothing to count.
        if not self._settings.enabled or creds.method is Method.NONE:
            return await self._inner.authenticate(creds, client)
        attempt = Attempt(subscriber(client.ip), user_key(creds.user), client.ip in self._trusted)
        admission = await self._store.begin(attempt)
        if admission.verdict is not Verdict.ALLOWED:
            return self._refuse(admission, attempt, client)
        outcome = "tempfail"  # what a cancelled or raising lookup settles as
        decision: Decision | None = None
        try:
            decision = await self._inner.authenticate(creds, client)
            if isinstance(decision, Route):
                outcome = "ok"
            elif isinstance(decision, Reject):
                outcome = "failed"
        finally:
            identity = _identity(decision, attempt)
            if decision is None:  # cancelled (the client left) or raised: release the slot
                await self._store.end(attempt, outcome, None)
        settled = await self._store.end(attempt, outcome, identity)
        return self._settle(decision, admission, settled, attempt, client)

    async def close(self) -> None:
        await self._inner.close()

    # --- decisions ----------------------------------------------------------------------------

    def _refuse(self, admission: Admission, attempt: Attempt, client: ClientInfo) -> Decision:
        metrics.count(metrics.THROTTLE, admission.verdict.value)
        if admission.verdict is Verdict.CONCURRENT:
            _refusals.warning(
                "throttle: too many logins at once for %s from %s", attempt.user, client.ip
            )
            return TempFail("too many logins at once", wait=self._settings.base_delay)
        if admission.verdict is Verdict.MOVING:  # `mailgate user move`: back in a moment
            return TempFail(f"{attempt.user} is being moved")
        _refusals.warning(
            "throttle: refusing a login as %s from %s: %s",
            attempt.user,
            client.ip,
            "locked out" if admission.verdict is Verdict.LOCKED else "budget spent",
        )
        return Reject(wait=self._delay(self._settings.lockout_after + 1))

    def _settle(
        self,
        decision: Decision,
        admission: Admission,
        settled: Settled,
        attempt: Attempt,
        client: ClientInfo,
    ) -> Decision:
        if isinstance(decision, Route):
            if settled.identity_locked:  # another spelling of a locked-out user
                metrics.count(metrics.THROTTLE, Verdict.LOCKED.value)
                return Reject(wait=self._delay(self._settings.lockout_after + 1))
            return decision
        if isinstance(decision, TempFail):
            return decision  # an outage is not the user's fault
        for kind in settled.locked:
            name = attempt.user if kind == "user" else client.ip
            metrics.count(metrics.THROTTLE, "lockout")
            log.warning(
                "throttle: locking out %s %s for %.0fs after %d failures",
                kind,
                name,
                self._settings.lockout,
                self._settings.lockout_after,
            )
        failures = max(
            admission.ip_failures + 1,
            admission.user_failures + 1,
            settled.ip_failures,
            settled.user_failures,
        )
        delay = self._delay(failures)
        if settled.spraying or admission.spraying:
            metrics.count(metrics.THROTTLE, "spraying")
            _refusals.warning(
                "throttle: %s failed as more than %d users; delaying its failures",
                client.ip,
                self._settings.per_ip_users,
            )
            delay = self._settings.max_delay
        elif delay:
            metrics.count(metrics.THROTTLE, "delayed")
        return replace(decision, wait=max(decision.wait, delay))

    def _delay(self, failures: int) -> float:
        s = self._settings
        if failures <= s.free:
            return 0.0
        doublings = min(failures - s.free - 1, MAX_DOUBLINGS)
        return float(min(s.base_delay * 2.0**doublings, s.max_delay))


def user_key(user: str) -> str | None:
    """The per-user counter of a name: `names.normalise` (local part lower-cased, as Dovecot's
    %Lu), so "Victim@Example.COM " and "victim@example.com" count as one."""
    if not user:
        return None
    try:
        return names.normalise(user)
    except names.BadName:
        return REFUSED_NAMES


def _identity(decision: Decision | None, attempt: Attempt) -> str | None:
    """The user the directory matched, when it is not the name the attempt counted under."""
    identity = getattr(decision, "identity", None)
    if not identity:
        return None
    key = user_key(identity)
    return key if key != attempt.user else None
