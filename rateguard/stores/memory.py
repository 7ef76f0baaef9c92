"""MemoryStore: buckets in a dict, for one process."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from rateguard.bucket import EPSILON, BucketState, Decision, Rule, refill, take
from rateguard.errors import ConfigurationError
from rateguard.stores import StoreStats

# How many of the least recently used buckets one insertion looks at for a full one to drop.
_SWEEP = 2


class _Slot:
    __slots__ = ("capacity", "last", "rate", "tokens")

    def __init__(self, tokens: float, last: float, capacity: int, rate: float) -> None:
        self.tokens = tokens
        self.last = last
        self.capacity = capacity
        self.rate = rate

    def full_at(self, now: float) -> bool:
        return refill(self.tokens, self.last, now, self.rate, self.capacity) + EPSILON >= self.capacity


class MemoryStore:
    """Token buckets in this process's memory: exact, fast, not shared between processes.

    ``max_keys`` bounds the number of buckets. A bucket that has refilled to full is the same as
    a fresh one, so such buckets are dropped first (a few are checked on every insertion, no
    background thread); past the bound, the least recently used go. ``clock`` returns seconds and
    must not go backwards; tests pass a fake one instead of sleeping.
    """

    kind = "memory"

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(max_keys, int) or isinstance(max_keys, bool) or max_keys < 1:
            raise ConfigurationError(f"max_keys must be an int >= 1, got {max_keys!r}; the default is 100000")
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}")
        self.max_keys = max_keys
        self.clock = clock
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()
        self.allowed = 0
        self.limited = 0

    def __repr__(self) -> str:
        return f"MemoryStore(max_keys={self.max_keys})"

    def take_now(self, client: str, bucket: str, rule: Rule, cost: int = 1) -> Decision:
        """`take` without the coroutine: nothing here awaits, so a decision is never split."""
        now = self.clock()
        key = (client, bucket)
        slot = self._slots.get(key)
        if slot is None:
            tokens, last, decision = take(None, now, now, rule.rate, rule.burst, cost)
            self._insert(key, _Slot(tokens, last, rule.burst, rule.rate), now)
        else:
            self._slots.move_to_end(key)
            # The caller's rule wins: a bucket follows its rule if the app's config changes.
            slot.capacity = rule.burst
            slot.rate = rule.rate
            slot.tokens, slot.last, decision = take(slot.tokens, slot.last, now, rule.rate, rule.burst, cost)
        if decision.allowed:
            self.allowed += 1
        else:
            self.limited += 1
        return decision

    async def take(self, client: str, bucket: str, rule: Rule, cost: int = 1) -> Decision:
        return self.take_now(client, bucket, rule, cost)

    def _insert(self, key: tuple[str, str], slot: _Slot, now: float) -> None:
        slots = self._slots
        # Drop full buckets from the cold end: they equal fresh ones, so nothing is lost.
        for _ in range(_SWEEP):
            if not slots:
                break
            old_key, old = next(iter(slots.items()))
            if not old.full_at(now):
                break
            del slots[old_key]
        if len(slots) >= self.max_keys:
            slots.popitem(last=False)  # least recently used
        slots[key] = slot

    async def inspect(self, client: str) -> list[BucketState]:
        now = self.clock()
        return [
            BucketState(bucket, refill(s.tokens, s.last, now, s.rate, s.capacity), s.capacity, s.rate)
            for (c, bucket), s in self._slots.items()
            if c == client
        ]

    async def reset(self, client: str) -> list[str]:
        keys = [k for k in self._slots if k[0] == client]
        for key in keys:
            del self._slots[key]
        return [bucket for _, bucket in keys]

    async def count(self) -> int:
        return len(self._slots)

    async def stats(self) -> StoreStats:
        return StoreStats(
            "memory", self.allowed, self.limited, self.allowed, self.limited, len(self._slots), True
        )

    async def close(self) -> None:
        self._slots.clear()
