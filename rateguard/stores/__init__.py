"""Where buckets live. A store owns bucket state and makes each decision atomically.

Stores know nothing of HTTP: they are given an already-encoded client id (see
`rateguard.identity.encode_identifier`), bucket names and `Rule`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rateguard.bucket import BucketState, Decision, Rule

# The buckets one limit decides together: (bucket name, rule) for each of its rules.
Buckets = Sequence[tuple[str, Rule]]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store can tell about itself, for the admin API and metrics."""

    kind: str  # "memory" or "redis"
    allowed: int  # decisions that allowed a request, in this process
    limited: int  # decisions that denied one, in this process
    allowed_total: int  # across every server sharing the store (= allowed for MemoryStore)
    limited_total: int
    buckets: int  # buckets held now
    healthy: bool  # the backend answers
    latency_ms: float | None = None  # one round trip, when measured
    degraded: bool = False  # deciding with a fallback instead of the backend
    detail: str | None = None  # the last error, when unhealthy


@runtime_checkable
class Store(Protocol):
    """What `RateGuard`, `limit()` and `Limiter` need from a store."""

    kind: str

    async def take(self, client: str, bucket: str, rule: Rule, cost: int = 1) -> Decision:
        """Refill, then take ``cost`` tokens if there are that many; one atomic step."""
        ...

    async def take_all(self, client: str, buckets: Buckets, cost: int = 1) -> tuple[Decision, ...]:
        """`take` over several buckets of one client, all or nothing, in one atomic step.

        Each decision answers for its own bucket; the request passes only if every one allows,
        and only then is ``cost`` taken from each.
        """
        ...

    async def give_back(self, client: str, buckets: Buckets, cost: int = 1) -> None:
        """Return ``cost`` tokens to each bucket (capped at capacity): a later limit refused."""
        ...

    async def inspect(self, client: str) -> list[BucketState]:
        """Every bucket this client has, as it is now."""
        ...

    async def reset(self, client: str) -> list[str]:
        """Forget every bucket of this client (it starts full again); returns the bucket names."""
        ...

    async def count(self) -> int:
        """How many buckets the store holds now."""
        ...

    async def stats(self) -> StoreStats:
        """Counters and health, for the admin API."""
        ...

    async def ping(self) -> float:
        """Seconds one round trip to the backend takes; raises `StoreError` saying what is wrong."""
        ...

    async def close(self) -> None:
        """Release connections and background work; the store opens again if used afterwards."""
        ...


__all__ = ["Buckets", "Store", "StoreStats"]
