"""Testing an app that uses rateguard: a clock you move, and buckets you reset between tests.

    from rateguard.testing import FakeClock, reset

    clock = FakeClock()
    app.add_middleware(RateGuard, requests_per_minute=60, store=MemoryStore(clock=clock))
    ...
    clock.advance(1.0)          # a token refills, no sleeping
    await reset(app)            # every bucket of the app's limits, in every store they use

To switch limiting off for a whole test run, set ``RATEGUARD_MODE=off`` in the environment
before the app's limits are first used (e.g. in ``conftest.py``); to switch off one ``limit()``,
override it as FastAPI dependencies are: ``app.dependency_overrides[my_limit] = lambda: None``.
"""

from __future__ import annotations

import time
from typing import Any

from rateguard.registry import STATE_ATTRIBUTE, AppLimits
from rateguard.stores import Store


class FakeClock:
    """A clock tests move by hand, for ``MemoryStore(clock=...)``: no sleeping."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.monotonic() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time on (never back: a store's clock must not go backwards)."""
        if seconds < 0:
            raise ValueError(f"a clock moves forwards, got {seconds}")
        self.now += seconds


def stores_of(app: Any) -> list[Store]:
    """The stores an app's limits use (as far as they have been used, or declared)."""
    registry = getattr(getattr(app, "state", None), STATE_ATTRIBUTE, None)
    return list(registry.stores) if isinstance(registry, AppLimits) else []


async def reset(app: Any, *stores: Store) -> None:
    """Forget every bucket of ``app``'s limits (and of ``stores``): each client starts full.

    Counters stay. For a RedisStore this deletes every key under its prefix: use it on a test
    database only.
    """
    seen: list[Store] = []
    for store in [*stores_of(app), *stores]:
        if any(s is store for s in seen):
            continue
        seen.append(store)
        clear = getattr(store, "clear", None)
        if clear is None:
            raise TypeError(f"{store!r} has no clear(): reset its buckets yourself")
        result = clear()
        if hasattr(result, "__await__"):
            await result


__all__ = ["FakeClock", "reset", "stores_of"]
