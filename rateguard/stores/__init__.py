"""Where buckets live. A store owns bucket state and makes each decision atomically.

Stores know nothing of HTTP: they are given an already-encoded client id (see
`rateguard.identity.encode_identifier`), a bucket name and a `Rule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rateguard.bucket import BucketState, Decision, Rule


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
    """What `RateGuard` and `limit()` need from a store."""

    kind: str

    async def take(self, client: str, bucket: str, rule: Rule, cost: int = 1) -> Decision:
        """Refill, then take ``cost`` tokens if there are that many; one atomic step."""
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

    async def close(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...


__all__ = ["Store", "StoreStats"]
