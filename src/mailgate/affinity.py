"""User affinity: each user of a pool marked `affinity = true` on one member at a time, from
every node (what Dovecot's director did with its own ring protocol, here on Redis).

The member is chosen by weighted rendezvous over the members this node would give a new user
(up, enabled, let in by a reconnect ramp) and remembered in Redis (`a:<pool>:<user>`) while
the user has sessions and for `user_expire` after. One script decides, atomically, whatever
the nodes ask at once (redislua.py LOGIN):

- a user with a member keeps it while the member serves (it is not down): a drain or a ramp
  takes no user away from it, and nodes whose view of health differs still agree;
- a user whose member is down, or draining, moves to the node's first choice only when
  nothing holds them there: no session, no login on its way (`busy` otherwise: a temporary
  failure, until the sessions there have ended). So a ring change never splits a live user
  across two members;
- a move (`mailgate user move`, `backend drain`: moves.py) makes the user's logins fail
  temporarily until it is over.

A login asks in its first round trip (the throttle's reservation: cluster.py), for every
affinity pool, so the member is known when the route comes; the login's route tells which
pool it was and the others' claims are dropped. Without Redis (no `[cluster]`, or while it
is unreachable) the node chooses alone: the member it last saw for the user, else its first
choice, and never a second member within a login (shared storage's failover would split).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from mailgate.auth.throttle import user_key
from mailgate.backend import pools as P
from mailgate.backend.routing import BackendRouter, NoBackend, Plan, Target
from mailgate.redisstore import Claim, ClaimRequest
from mailgate.values import Route

if TYPE_CHECKING:
    from mailgate.cluster import ClusterStore

# Users whose member this node remembers, for when Redis cannot be asked (a few dozen bytes
# each: 100,000 users are a few MB).
REMEMBERED = 100_000


def affinity_user(key: str) -> str:
    """The name a user's assignment is kept under: the normalised user, or for a login
    without one (SMTP relay) the client address."""
    try:
        ipaddress.ip_address(key)
    except ValueError:
        return user_key(key) or key
    return "ip:" + key


def assignable(pool: P.Pool, state: P.HealthState, user: str, now: float) -> tuple[str, ...]:
    """The members this node would give `user` now, best first: up, enabled by the operator,
    and, while one ramps up after an outage, only for the users the ramp lets in."""
    chosen = []
    for member in P.rendezvous_order(pool.members, user):
        ms = state.member(member.pool, member.name)
        if ms.admin is not P.Admin.ENABLED or ms.health is not P.Health.UP:
            continue
        spread = pool.settings.reconnect_spread
        if ms.ramp_from is not None and spread > 0:
            share = (now - ms.ramp_from) / spread
            if share < 1.0 and P.ramp_position(user) >= share:
                continue
        chosen.append(member.name)
    return tuple(chosen)


def serving(pool: P.Pool, state: P.HealthState) -> tuple[str, ...]:
    """The members that keep the users they have: every one not down (by its checks or by
    the operator). A draining member serves its users until they are moved."""
    out = []
    for member in pool.members:
        ms = state.member(member.pool, member.name)
        if ms.admin is not P.Admin.DOWN and ms.health is not P.Health.DOWN:
            out.append(member.name)
    return tuple(out)


class AssignedPlan(Plan):
    """One member, the user's: taken unless it is down (a draining or ramping member keeps the
    users assigned to it); a half-open member's probe is still claimed once."""

    def _admit(self, member: P.Member) -> P.Admission:
        admission = super()._admit(member)
        if admission.admitted or admission.why == "down" or admission.why.startswith("half"):
            return admission
        return P.ADMITTED


class Affinity:
    """The router's hook for affinity pools (`BackendRouter.affinity`); `store` is the
    cluster's (None: this node alone)."""

    def __init__(self, router: BackendRouter, store: ClusterStore | None = None) -> None:
        self.router = router
        self.store = store
        self.pools = {name: p for name, p in router.pools.items() if p.settings.affinity}
        self._remembered: OrderedDict[tuple[str, str], str] = OrderedDict()

    def requests(self, user: str) -> list[ClaimRequest]:
        """What a login's first round trip asks for `user`: every affinity pool."""
        now = self.router.clock()
        return [self.request(pool, user, now) for pool in self.pools.values()]

    def request(self, pool: P.Pool, user: str, now: float) -> ClaimRequest:
        state = self.router.state
        return ClaimRequest(
            pool.name,
            user,
            int(pool.settings.user_expire * 1000),
            assignable(pool, state, user, now),
            serving(pool, state),
        )

    def remember(self, claim: Claim) -> None:
        if claim.member and claim.status == "ok":
            key = (claim.pool, claim.user)
            self._remembered[key] = claim.member
            self._remembered.move_to_end(key)
            if len(self._remembered) > REMEMBERED:
                self._remembered.popitem(last=False)

    def forget(self, user: str | None, backend: str | None) -> int:
        """A kick of `user` on `backend` ("pool/member"; None: anywhere) came (a move's or
        the operator's): this node no longer takes the user's member from its memory, where
        it would send them back to it while Redis is away after a move took them elsewhere.
        How many remembered members went."""
        if not user:
            return 0
        who = affinity_user(user)
        pool, _, member = (backend or "").partition("/")
        gone = 0
        for name in self.pools if backend is None else (pool,):  # a lookup each: a drain
            remembered = self._remembered.get((name, who))  # kicks every user it moves
            if remembered is not None and (backend is None or remembered == member):
                del self._remembered[(name, who)]
                gone += 1
        return gone

    # --- the router's hook --------------------------------------------------------------------

    async def plan(
        self, router: BackendRouter, pool: P.Pool, route: Route, protocol: str, key: str
    ) -> Plan | NoBackend:
        user = affinity_user(key)
        claim = None
        if self.store is not None:
            claim = await self.store.claim(self, pool, user)
        if claim is None:  # no Redis now: this node's own choice
            claim = self._local(pool, user)
        if claim.status != "ok":
            return NoBackend(_why(pool, user, claim), "unavailable", pool.name, claim.member)
        member = pool.member(claim.member)
        if member is None:  # a member this node's configuration does not have (yet)
            why = f"pool {pool.name}: {user} is assigned to {claim.member}, unknown here"
            return NoBackend(why, "unavailable", pool.name, claim.member)
        return AssignedPlan(router, route, protocol, user, pool, [member])

    def planned(self, pool: P.Pool | None) -> None:
        """The login's route is known: claims in the other pools are given back."""
        if self.store is not None:
            self.store.keep_claims(pool.name if pool is not None else None)

    def session_started(self, target: Target) -> Callable[[], None]:
        member = target.member
        assert member is not None
        pool = self.pools[member.pool]
        if self.store is None:
            return _nothing
        return self.store.session_started(pool, target.key, member.name)

    def failed(self, target: Target) -> None:
        if self.store is not None and target.member is not None:
            self.store.drop_claim(target.member.pool, target.key)

    def _local(self, pool: P.Pool, user: str) -> Claim:
        remembered = self._remembered.get((pool.name, user))
        if remembered is not None and remembered in serving(pool, self.router.state):
            return Claim(pool.name, user, remembered, "ok")
        choice = assignable(pool, self.router.state, user, self.router.clock())
        if not choice:
            return Claim(pool.name, user, "", "none")
        return Claim(pool.name, user, choice[0], "ok")


def _why(pool: P.Pool, user: str, claim: Claim) -> str:
    if claim.status == "moving":
        return f"pool {pool.name}: {user} is being moved"
    if claim.status == "busy":
        return (
            f"pool {pool.name}: {user} still has sessions on {claim.member}, which this node "
            "finds down; the user moves when they have ended"
        )
    return f"pool {pool.name}: no member takes new users now"


def _nothing() -> None:
    pass


def install(router: BackendRouter, store: ClusterStore | None) -> Affinity | None:
    """Give the router its affinity hook when a pool asks for affinity."""
    if not any(p.settings.affinity for p in router.pools.values()):
        return None
    hook = Affinity(router, store)
    router.affinity = hook
    return hook
