"""When Redis is unreachable: the outage policy, and a circuit breaker that stops waiting on it.

After a failure, decisions skip Redis for a back-off that starts at ``retry_backoff`` and
doubles up to ``max_backoff``; then one probe runs in the background while requests keep being
answered, and decisions go back to Redis when it succeeds. Meanwhile ``on_error`` decides:
``"local"`` (an in-process bucket of the same rules), ``"allow"`` or ``"deny"`` (a 503).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

from rateguard.bucket import Decision
from rateguard.errors import StoreUnavailable
from rateguard.stores import Buckets
from rateguard.stores.memory import MemoryStore

OnError = Literal["local", "allow", "deny"]
ON_ERROR: tuple[OnError, ...] = ("local", "allow", "deny")

logger = logging.getLogger("rateguard.redis")


class Breaker:
    """Health of one Redis as this process sees it, and what to decide while it is down."""

    def __init__(
        self,
        where: Callable[[], str],
        on_error: OnError,
        retry_backoff: float,
        max_backoff: float,
        local_max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = where
        self.on_error = on_error
        self.retry_backoff = retry_backoff
        self.max_backoff = max_backoff
        self.clock = clock
        self.degraded = False
        self.last_error: str | None = None
        self.errors = 0  # failed round trips (connection, timeout, refusing node)
        self.degraded_decisions = 0
        self.probing = False
        self.local = MemoryStore(max_keys=local_max_keys)
        self._backoff = 0.0
        self._retry_at = 0.0
        self._since = 0.0

    @property
    def backoff(self) -> float:
        return max(self._backoff, self.retry_backoff)

    def probe_due(self) -> bool:
        """Degraded, the back-off is over and no probe runs: time to try Redis again."""
        return self.degraded and not self.probing and self.clock() >= self._retry_at

    def failed(self, exc: BaseException) -> bool:
        """Count a failure; True if it starts an outage (the store then forgets what it cached)."""
        self.errors += 1
        now = self.clock()
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.degraded and now < self._retry_at:
            return False  # more news of the same outage: the back-off stands
        started = not self.degraded
        if started:
            self.degraded = True
            self._since = now
            self._backoff = self.retry_backoff
            logger.warning(
                "rateguard: Redis %s unavailable (%s); deciding with on_error=%r until it answers again",
                self.where(),
                self.last_error,
                self.on_error,
            )
        else:
            self._backoff = min(self.max_backoff, self._backoff * 2)
        self._retry_at = now + self._backoff
        return started

    def succeeded(self) -> None:
        if self.degraded:
            self.degraded = False
            logger.info(
                "rateguard: Redis %s answers again after %.1f s; limits are shared again",
                self.where(),
                self.clock() - self._since,
            )
            self._backoff = 0.0
            self.last_error = None
            self.local = MemoryStore(max_keys=self.local.max_keys)

    def fallback(self, client: str, buckets: Buckets, cost: int) -> tuple[Decision, ...]:
        """Decide without Redis, by ``on_error``; raises `StoreUnavailable` for ``"deny"``."""
        self.degraded_decisions += 1
        if self.on_error == "local":
            decisions = self.local.take_all_now(client, buckets, cost)
            return tuple(d._replace(degraded=True) for d in decisions)
        if self.on_error == "allow":
            return tuple(Decision(True, r.burst, r.burst, 0.0, 0.0, r.rate, True) for _, r in buckets)
        raise StoreUnavailable(
            f"Redis is unavailable ({self.last_error}); on_error='deny'",
            retry_after=max(1.0, self._retry_at - self.clock()),
        )


__all__ = ["ON_ERROR", "Breaker", "OnError"]
