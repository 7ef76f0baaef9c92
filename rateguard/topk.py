"""Which clients are limited most: an approximate top-k over the last few minutes, in bounded memory.

Fed with the encoded client id of each *denied* decision only (denials are the rare path), read by
the admin dashboard. Each time slot (a minute by default) keeps a Space-Saving summary (Metwally,
Agrawal, El Abbadi 2005) of at most ``capacity`` counters: a client not yet counted takes the
place of the smallest counter and inherits its count as its possible overcount (``error``). Any
client denied more than ``1/capacity`` of a slot's denials is certain to be held. Slots older
than the window are dropped whole, so old floods fade out without any per-client decay work.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rateguard.errors import ConfigurationError


class _Counter:
    __slots__ = ("bucket", "client", "count", "error", "last")

    def __init__(self, client: str, count: int, error: int, bucket: str, last: float) -> None:
        self.client = client
        self.count = count
        self.error = error  # count may exceed the true count by at most this
        self.bucket = bucket  # the last bucket that denied the client
        self.last = last


class _Slot:
    """The counters of one time slot, and those found holding the smallest count (the next to go)."""

    __slots__ = ("counters", "floor", "floor_count", "number")

    def __init__(self, number: int) -> None:
        self.number = number
        self.counters: dict[str, _Counter] = {}
        self.floor: list[_Counter] = []
        self.floor_count = 0

    def smallest(self) -> _Counter:
        # Counts only grow and a newcomer starts above the one it replaces, so a counter found at
        # the minimum stays at it until it is counted again: one scan serves many replacements.
        floor = self.floor
        while floor:
            c = floor.pop()
            if c.count == self.floor_count and self.counters.get(c.client) is c:
                return c
        self.floor_count = min(c.count for c in self.counters.values())
        floor.extend(c for c in self.counters.values() if c.count == self.floor_count)
        return floor.pop()


@dataclass(frozen=True, slots=True)
class Limited:
    """One of the most limited clients: denials in the window (at most ``error`` too many)."""

    client: str  # the encoded client id, as in store keys ("203.0.113.7", "id:team-42")
    count: int
    error: int
    bucket: str  # the bucket (rule) that denied it last
    seconds_ago: float  # since its last denial


class LimitedClients:
    """The clients denied most over the last ``window`` seconds, approximately, in bounded memory.

    :param capacity: counters per time slot; memory is at most ``capacity * slots`` counters.
    :param window: seconds of history kept; the window moves in steps of ``window / slots``.
    :param slots: how many steps the window is cut into.
    :param clock: seconds, never going backwards; tests pass a fake one.
    """

    def __init__(
        self,
        capacity: int = 64,
        *,
        window: float = 300.0,
        slots: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigurationError(f"capacity must be an int >= 1, got {capacity!r}; the default is 64")
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ConfigurationError(f"slots must be an int >= 1, got {slots!r}; the default is 5")
        if not isinstance(window, int | float) or isinstance(window, bool) or not window > 0:
            raise ConfigurationError(f"window must be a number of seconds > 0, got {window!r}")
        self.capacity = capacity
        self.window = float(window)
        self.slots = slots
        self.clock = clock
        self._step = self.window / slots
        # Oldest first; only the newest is written to.
        self._ring: deque[_Slot] = deque()

    def __repr__(self) -> str:
        return f"LimitedClients(capacity={self.capacity}, window={self.window:g}, slots={self.slots})"

    def add(self, client: str, bucket: str) -> None:
        """Count one denial of ``client`` by ``bucket``: O(1) amortised, in bounded memory."""
        now = self.clock()
        number = int(now // self._step)
        ring = self._ring
        if not ring or ring[-1].number != number:
            ring.append(_Slot(number))
            while ring[0].number <= number - self.slots:
                ring.popleft()
        slot = ring[-1]
        counters = slot.counters
        counter = counters.get(client)
        if counter is not None:
            counter.count += 1
            counter.bucket = bucket
            counter.last = now
            return
        if len(counters) < self.capacity:
            counters[client] = _Counter(client, 1, 0, bucket, now)
            return
        smallest = slot.smallest()
        del counters[smallest.client]
        counters[client] = _Counter(client, smallest.count + 1, smallest.count, bucket, now)

    def top(self, n: int = 10) -> list[Limited]:
        """The ``n`` clients with the most denials in the window, most first."""
        now = self.clock()
        oldest = int(now // self._step) - self.slots + 1
        merged: dict[str, list[float]] = {}  # client -> [count, error, last]
        buckets: dict[str, str] = {}
        for slot in self._ring:
            if slot.number < oldest:
                continue
            for c in slot.counters.values():
                m = merged.get(c.client)
                if m is None:
                    merged[c.client] = [c.count, c.error, c.last]
                else:
                    m[0] += c.count
                    m[1] += c.error
                    m[2] = c.last  # slots are in time order: the newest wins
                buckets[c.client] = c.bucket
        ranked = sorted(merged.items(), key=lambda item: (-item[1][0], item[1][1], item[0]))[:n]
        return [
            Limited(client, int(count), int(error), buckets[client], max(0.0, now - last))
            for client, (count, error, last) in ranked
        ]

    def clear(self) -> None:
        self._ring.clear()

    def __len__(self) -> int:
        """Counters held now, over every slot."""
        return sum(len(slot.counters) for slot in self._ring)


# The process-wide tracker `RateGuard` and `limit()` feed on each denial, and the admin reads.
LIMITED = LimitedClients()

__all__ = ["LIMITED", "Limited", "LimitedClients"]
