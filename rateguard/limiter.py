"""From a request to decisions: the one flow `RateGuard`, `limit()` and `Limiter` share.

A request may pass several limits: a `RateGuard` (or two, or one in a mounted sub-app), then
the `limit()`s of its route, router and app. Each rule of each limit is its own bucket; the
rules of one limit are decided in one atomic step, and a request that one limit refuses takes no
token from any: what the earlier limits took for it is given back. The per-request record,
`RequestLimits`, lives in ``scope["rateguard"]``; whoever renders the headers reads it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Unpack

from starlette.requests import HTTPConnection

from rateguard.bucket import EPSILON, Decision, Rule, new_decision
from rateguard.errors import StoreError
from rateguard.headers import Applied, PolicyHeader
from rateguard.identity import encode_identifier
from rateguard.policy import Headers, LimitOptions, Policy
from rateguard.rates import period_label
from rateguard.registry import ALLOWED, DEGRADED, LIMITED, SHADOW, AppLimits
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore

_new_tuple = tuple.__new__  # an allowed Verdict, built without NamedTuple's Python-level __new__

SCOPE_KEY = "rateguard"

logger = logging.getLogger("rateguard")


class RequestLimits:
    """What the limits of one request did: for its headers, its give-backs and unique names."""

    __slots__ = (
        "applied",
        "claims",
        "fields",
        "guarded",
        "message",
        "refusal",
        "registry",
        "root_path",
        "store",
        "taken",
    )

    def __init__(
        self,
        store: Store | None,
        registry: AppLimits | None,
        fields: Headers,
        guarded: bool,
        claim: str | None = None,
        root_path: str = "",
    ) -> None:
        self.store = store  # the outermost RateGuard's: limit()s without store= use it
        self.registry = registry
        self.fields = fields  # the headers option of whoever renders the headers
        self.guarded = guarded  # a RateGuard renders the headers (else each limit() does)
        self.applied: list[Applied] = []
        self.taken: list[tuple[Store, str, Sequence[tuple[str, Rule]], int]] = []
        self.claims: list[str] = [] if claim is None else [claim]  # limit names, in the order they ran
        self.root_path = root_path  # where the first limit saw the request: a mount is what comes after
        self.refusal: Verdict | None = None  # what refused the request, and its message
        self.message = ""

    def claim(self, base: str, explicit: bool) -> str:
        """This limit's name in this request: ``base``, or ``base#2`` if another took it first.

        Limits run in the order the app's code gives them (middleware outside in, then FastAPI's
        dependencies in order), so the same limit gets the same name on every server. A name
        given with ``name=`` is never changed: sharing it is the point.
        """
        return claim(self.claims, base, explicit)

    async def give_back(self) -> None:
        """A limit refused: return what the earlier ones took for this request.

        The headers then show those limits as they are after the give-back: the refused request
        spent nothing there.
        """
        taken, self.taken = self.taken, []
        for store, client, buckets, cost in taken:
            # A failing store: its fallback decided, or the token is lost; never a 500.
            with contextlib.suppress(StoreError):
                await store.give_back(client, buckets, cost)
            names = {name for name, _ in buckets}
            self.applied[:] = [  # in place: a RateGuard outside holds this list
                (header, _given_back(d, cost) if header.name in names else d) for header, d in self.applied
            ]


def _given_back(d: Decision, cost: int) -> Decision:
    """The decision as it stands once ``cost`` tokens came back to its bucket."""
    tokens = min(float(d.limit), d.tokens + cost)
    reset_after = max(0.0, (d.limit - tokens) / d.rate) if d.rate > 0 else 0.0
    return new_decision(
        d.allowed, d.limit, math.floor(tokens + EPSILON), d.retry_after, reset_after, d.rate, d.degraded
    )


def claim(claims: list[str], base: str, explicit: bool) -> str:
    """``base``, or ``base#2`` (``#3``...) if an earlier limit in ``claims`` has it; recorded."""
    if not explicit and base in claims:
        n = 2
        while f"{base}#{n}" in claims:
            n += 1
        base = f"{base}#{n}"
    claims.append(base)
    return base


class Verdict(NamedTuple):
    """What a limit answered for one request or one `Limiter.hit`."""

    allowed: bool
    decisions: tuple[tuple[str, Decision], ...]  # (bucket name, decision), one per rule
    shadowed: bool = False  # refused, but let through by mode="shadow"

    @property
    def retry_after(self) -> float:
        """Seconds until every rule that refused would pass (0 when allowed)."""
        return max((d.retry_after for _, d in self.decisions if not d.allowed), default=0.0)

    @property
    def remaining(self) -> int:
        """Whole requests left before the tightest rule refuses."""
        return min((d.remaining for _, d in self.decisions), default=0)


class Plan:
    """The buckets one limit decides for one name and one set of rules, with their headers."""

    __slots__ = ("buckets", "counts", "headers", "names", "single")

    def __init__(
        self,
        base: str,
        rules: tuple[Rule, ...],
        registry: AppLimits | None,
        owner: Any,
        store: Store,
        applies_to: str,
    ) -> None:
        if len(rules) == 1:
            names: tuple[str, ...] = (base,)
        else:
            names = tuple(f"{base}:{period_label(rule.window)}" for rule in rules)
        self.names = names
        self.buckets = tuple(zip(names, rules, strict=True))
        self.headers = tuple(PolicyHeader(name, rule) for name, rule in self.buckets)
        rule_of = (lambda r: None) if owner.rate_fn is not None else (lambda r: r)
        if registry is None:
            self.counts = tuple([0, 0, 0, 0] for _ in names)
        else:
            self.counts = tuple(
                registry.register(name, rule_of(rule), store, owner, applies_to)
                for name, rule in self.buckets
            )
        self.single = self.buckets[0] if len(rules) == 1 else None


class Planner:
    """The plans of one limit, per app registry, name and rules (a bounded cache)."""

    __slots__ = ("_plans",)

    def __init__(self) -> None:
        # Keyed by the rules' identity: a policy's rules (and a rate callable's parsed answers) are
        # kept tuples, and hashing Rule dataclasses on every request costs more than the lookup.
        self._plans: dict[
            tuple[int, str, int, int, str], tuple[Plan, AppLimits | None, tuple[Rule, ...]]
        ] = {}

    def plan(
        self,
        policy: Policy,
        store: Store,
        registry: AppLimits | None,
        base: str,
        rules: tuple[Rule, ...],
        applies_to: str,
    ) -> Plan:
        key = (id(registry), base, id(rules), id(store), applies_to)
        found = self._plans.get(key)
        if found is not None and found[1] is registry and found[2] is rules:
            return found[0]
        plan = Plan(base, rules, registry, policy, store, applies_to)
        if len(self._plans) >= 4096:  # route templates and plans are few; raw paths are not
            self._plans.clear()
        self._plans[key] = (plan, registry, rules)
        return plan


class ShadowLog:
    """Logs the would-be refusals of a limit in shadow mode: per rule, at most once a minute."""

    __slots__ = ("_rules",)

    def __init__(self) -> None:
        self._rules: dict[str, list[float]] = {}  # bucket -> [refusals not logged yet, next log time]

    def add(self, bucket: str) -> None:
        entry = self._rules.get(bucket)
        if entry is None:
            if len(self._rules) >= 1024:  # rules are few; this only bounds a runaway
                self._rules.clear()
            entry = self._rules[bucket] = [0, 0.0]
        entry[0] += 1
        now = time.monotonic()
        if now >= entry[1]:
            logger.warning(
                "rateguard: limit %r in shadow mode would have refused %d request(s) since it last said so",
                bucket,
                int(entry[0]),
            )
            entry[0] = 0
            entry[1] = now + 60.0


def count(counts: list[int], decision: Decision) -> None:
    if decision.degraded:
        counts[DEGRADED] += 1
    elif decision.allowed:
        counts[ALLOWED] += 1
    else:
        counts[LIMITED] += 1


async def decide(
    policy: Policy,
    planner: Planner,
    shadow: ShadowLog,
    store: Store,
    base: str,
    applies_to: str,
    scope: Any,
    conn: HTTPConnection | None,
    limits: RequestLimits,
) -> Verdict | None:
    """One limit's decision for one request; None when it did not apply (off, skipped).

    Raises `StoreError` when the store can't decide and its policy refuses (answered with 503);
    what earlier limits took is given back first.
    """
    if policy.mode == "off":
        return None
    if policy.skip is not None and conn is not None and await policy.should_skip(conn):
        return None
    # Each step awaits only when the user's callable is async: a coroutine apiece adds up.
    found = policy.client_id_now(scope, conn) if policy.sync_identity else policy.client_id(scope, conn)
    client: str = found if type(found) is str else await found  # type: ignore[misc]
    rules = policy.rules if policy.rate_fn is None else await policy.rules_for(conn)
    cost = policy.fixed_cost or await policy.cost_of(conn, rules)
    registry = limits.registry
    plan = planner.plan(policy, store, registry, base, rules, applies_to)
    try:
        single = plan.single
        if single is not None:
            if type(store) is MemoryStore:
                decision = store.take_now(client, single[0], single[1], cost)
            else:
                decision = await store.take(client, single[0], single[1], cost)
            if decision.allowed and not decision.degraded:  # the common case, kept short
                plan.counts[0][ALLOWED] += 1
                limits.taken.append((store, client, plan.buckets, cost))
                if policy.mode == "enforce":
                    limits.applied.append((plan.headers[0], decision))
                return _new_tuple(Verdict, (True, ((single[0], decision),), False))
            decisions: tuple[Decision, ...] = (decision,)
        elif type(store) is MemoryStore:
            decisions = store.take_all_now(client, plan.buckets, cost)
        else:
            decisions = await store.take_all(client, plan.buckets, cost)
    except StoreError:
        await limits.give_back()
        raise
    for decision in decisions:
        if not decision.allowed or decision.degraded:
            break
    else:  # every rule allowed, none by a fallback: the common case of several rules, kept short
        for counts in plan.counts:
            counts[ALLOWED] += 1
        limits.taken.append((store, client, plan.buckets, cost))
        if policy.mode == "enforce":
            limits.applied.extend(zip(plan.headers, decisions, strict=True))
        return _new_tuple(Verdict, (True, tuple(zip(plan.names, decisions, strict=True)), False))
    allowed = True
    for counts, decision in zip(plan.counts, decisions, strict=True):
        if decision.degraded:
            counts[DEGRADED] += 1
        elif decision.allowed:
            counts[ALLOWED] += 1
        else:
            counts[LIMITED] += 1
        if not decision.allowed:  # a fallback's refusal (degraded) refuses too
            allowed = False
    verdict = Verdict(allowed, tuple(zip(plan.names, decisions, strict=True)))
    if allowed:
        limits.taken.append((store, client, plan.buckets, cost))
        if policy.mode == "enforce":
            limits.applied.extend(zip(plan.headers, decisions, strict=True))
        return verdict
    refused_by = next(name for name, d in verdict.decisions if not d.allowed)
    if registry is not None:
        registry.limited.add(client, refused_by)  # the rare path: feeds the dashboard's top-k
    if policy.mode == "shadow":
        for counts, decision in zip(plan.counts, decisions, strict=True):
            if not decision.allowed:
                counts[SHADOW] += 1
        shadow.add(refused_by)
        return Verdict(True, verdict.decisions, shadowed=True)
    limits.applied.extend(zip(plan.headers, decisions, strict=True))
    limits.refusal = verdict
    limits.message = policy.message
    await limits.give_back()
    return verdict


class Limiter:
    """A limit to call yourself, outside HTTP: ``await Limiter("10/minute").hit("user-42")``.

    Takes the rates and options of `limit()` (``store``, ``name``, ``capacity``, ``cost``,
    ``mode``); the identifier is encoded as an ``identifier=`` callable's value would be, so the
    admin API finds and resets it the same way (``kind=identifier``). Without ``store=`` it uses
    a `MemoryStore` of its own. Its buckets are named ``name`` (default ``"limiter"``).
    """

    def __init__(self, *rates: float | str | Rule, **options: Unpack[LimitOptions]) -> None:
        self.policy = Policy("Limiter", rates, options)
        if self.policy.rate_fn is not None:
            raise TypeError("Limiter takes fixed rates; call it with the rate you want for each hit instead")
        self.name = self.policy.name or "limiter"
        self.store: Store = self.policy.store if self.policy.store is not None else MemoryStore()
        self._planner = Planner()
        self._shadow = ShadowLog()

    def __repr__(self) -> str:
        return f"Limiter({self.policy.describe()!r}, name={self.name!r}, store={self.store!r})"

    async def hit(self, identifier: str, cost: int | None = None) -> Verdict:
        """Take ``cost`` tokens for ``identifier`` (any text) from every rule, all or nothing."""
        policy = self.policy
        if policy.mode == "off":
            return Verdict(True, ())
        rules = policy.rules
        spend = policy.cost if cost is None else cost
        if not isinstance(spend, int):
            raise TypeError("Limiter.hit takes cost as an int (a cost callable needs a request)")
        for rule in rules:
            rule.check_cost(spend)
        plan = self._planner.plan(policy, self.store, None, self.name, rules, "Limiter.hit")
        client = "id:" + encode_identifier(str(identifier))
        decisions = await self.store.take_all(client, plan.buckets, spend)
        verdict = Verdict(all(d.allowed for d in decisions), tuple(zip(plan.names, decisions, strict=True)))
        if not verdict.allowed and policy.mode == "shadow":
            self._shadow.add(plan.names[0])
            return Verdict(True, verdict.decisions, shadowed=True)
        return verdict

    async def reset(self, identifier: str) -> list[str]:
        """Forget this identifier's buckets (of every limit on this store)."""
        return await self.store.reset("id:" + encode_identifier(str(identifier)))


__all__ = ["SCOPE_KEY", "Limiter", "Planner", "RequestLimits", "Verdict", "decide"]
