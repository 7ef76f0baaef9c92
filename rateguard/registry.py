"""The limits an app has: filled by `RateGuard` and `limit()` as they are used, read by the admin
API and metrics.

One `AppLimits` per app, kept in ``app.state.rateguard`` (``request.app.state``): the app's
default store (for a `limit()` with no store and no `RateGuard` in front), the rules in force
with their decision counts, the stores in use (closed at the end of the app's lifespan), and the
clients limited most. Nothing is process-wide, so two apps (or two tests) never share a bucket
or a count by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import State

from rateguard.bucket import Rule
from rateguard.errors import ConfigurationError
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore
from rateguard.topk import LimitedClients

STATE_ATTRIBUTE = "rateguard"

# Decision counts of one bucket: allowed, limited, degraded (decided by a fallback while the
# store was unreachable), shadow_limited (would have been refused, passed in shadow mode).
ALLOWED, LIMITED, DEGRADED, SHADOW = range(4)


@dataclass(slots=True)
class RuleInForce:
    """One bucket an app's limits use: where it applies, its rule and the store holding it."""

    bucket: str
    rule: Rule | None  # None: set per request by a rate callable
    store: Store
    owner: Any  # the Policy: identity kind, ipv6_prefix; name conflicts are judged by it
    applies_to: list[str] = field(default_factory=list)  # "every request" or routes
    counts: list[int] = field(default_factory=lambda: [0, 0, 0, 0])

    def as_json(self) -> dict[str, Any]:
        rule = self.rule
        return {
            "bucket": self.bucket,
            "applies_to": ", ".join(self.applies_to),
            "rate": str(rule) if rule is not None else self.owner.describe(),
            "requests_per_minute": rule.requests_per_minute if rule is not None else None,
            "capacity": rule.burst if rule is not None else None,
            "window": rule.window if rule is not None else None,
            "identity": "identifier" if self.owner.identifier is not None else "address",
            "mode": self.owner.mode,
            "store": self.store.kind,
        }


class AppLimits:
    """Everything rateguard keeps for one app (see the module docstring)."""

    def __init__(self) -> None:
        self.rules: dict[str, RuleInForce] = {}
        self.stores: list[Store] = []
        self.limited = LimitedClients()
        self._default_store: MemoryStore | None = None

    def __repr__(self) -> str:
        return f"AppLimits(rules={list(self.rules)}, stores={self.stores})"

    @classmethod
    def of(cls, scope: Any) -> AppLimits | None:
        """The registry of the Starlette app serving this scope (created on first use), if any."""
        app = scope.get("app")
        state = getattr(app, "state", None)
        if not isinstance(state, State):
            return None
        registry = getattr(state, STATE_ATTRIBUTE, None)
        if not isinstance(registry, AppLimits):
            registry = cls()
            setattr(state, STATE_ATTRIBUTE, registry)
        return registry

    @property
    def default_store(self) -> MemoryStore:
        """The store of `limit()`s that have none and no `RateGuard` to share: this app's own."""
        if self._default_store is None:
            self._default_store = MemoryStore()
            self.use_store(self._default_store)
        return self._default_store

    def use_store(self, store: Store) -> None:
        if not any(s is store for s in self.stores):
            self.stores.append(store)

    def register(
        self, bucket: str, rule: Rule | None, store: Store, owner: Any, applies_to: str
    ) -> list[int]:
        """Record that ``owner`` decides ``bucket`` here; returns the bucket's counts to add to.

        One name, one meaning: two limits that claim a bucket name with different rules (or a
        rate callable and anything else) would overwrite each other's buckets, so that fails.
        """
        entry = self.rules.get(bucket)
        if entry is None:
            entry = self.rules[bucket] = RuleInForce(bucket, rule, store, owner)
            self.use_store(store)
        elif entry.owner is not owner and not _same_rules(entry, rule, owner, store):
            raise ConfigurationError(
                f"two limits claim the bucket name {bucket!r} with different rules "
                f"({entry.owner.describe()} and {owner.describe()}); give one of them another name="
            )
        if applies_to not in entry.applies_to and len(entry.applies_to) < 64:
            entry.applies_to.append(applies_to)
        return entry.counts

    def counts(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry.counts) for name, entry in self.rules.items()}


def _same_rules(entry: RuleInForce, rule: Rule | None, owner: Any, store: Store) -> bool:
    if entry.store is not store:
        return False
    if rule is None or entry.rule is None:  # rate callables: only the same callable is the same
        return rule is None and entry.rule is None and entry.owner.rate_fn is owner.rate_fn
    return rule == entry.rule


__all__ = ["ALLOWED", "DEGRADED", "LIMITED", "SHADOW", "AppLimits", "RuleInForce"]
