"""MemoryStore: buckets in a dict, for one process."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from math import floor

from rateguard.bucket import EPSILON, BucketState, Decision, Rule, give_back, new_decision, refill, take_all
from rateguard.errors import ConfigurationError
from rateguard.stores import Buckets, StoreStats

_new_tuple = tuple.__new__  # `new_decision`, inline on the hot path

# Buckets one insertion checks, going round the store: more than the one it adds, so the sweep
# goes round faster than the store grows. At the bound it looks further for one to let go.
_SWEEP = 2
_SWEEP_AT_BOUND = 16

# A bucket's key: the client, this separator, the bucket name. One string rather than a tuple of
# two: a bucket costs a tuple less (56 bytes). Client ids are encoded (`encode_identifier`) and
# never hold the separator, so the first one splits a key back into its two parts.
SEP = "\x1f"


def _key(client: str, bucket: str) -> str:
    return client + SEP + bucket


class _Slot:
    __slots__ = ("last", "rule", "tokens", "used")

    def __init__(self, tokens: float, last: float, rule: Rule) -> None:
        self.tokens = tokens
        self.last = last
        self.rule = rule  # the caller's latest: a bucket follows its rule if the app's config changes
        self.used = False  # used again since the sweep last passed it


class MemoryStore:
    """Token buckets in this process's memory: exact, fast, not shared between processes.

    ``max_keys`` bounds the number of buckets. A bucket that has refilled to full is the same as
    a fresh one, so such buckets are dropped first: each insertion checks the next few buckets
    of a sweep that goes round the whole store (no background thread). Past the bound, the
    least recently used go: the sweep evicts the first bucket not used since it last came by
    (the CLOCK approximation of LRU, which costs a request nothing). ``clock`` returns seconds
    and must not go backwards; tests pass a fake one (`rateguard.testing.FakeClock`) instead of
    sleeping.

    It holds no connection and no task, so any event loop may use it, one after another; it is
    not for several threads at once.
    """

    kind = "memory"

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(max_keys, int) or isinstance(max_keys, bool) or max_keys < 1:
            raise ConfigurationError(f"max_keys must be an int >= 1, got {max_keys!r}; the default is 100000")
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}")
        self.max_keys = max_keys
        self.clock = clock
        # In sweep order: the next bucket the sweep checks first, new buckets last.
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self.allowed = 0
        self.limited = 0

    def __repr__(self) -> str:
        return f"MemoryStore(max_keys={self.max_keys})"

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def take_now(self, client: str, bucket: str, rule: Rule, cost: int = 1) -> Decision:
        """`take` without the coroutine: nothing here awaits, so a decision is never split.

        A known bucket takes the step of `bucket.take_all` written out in place: this runs on
        every request, and the general step (its lists, its frame) was a third of the cost. The
        tests hold both to the same table of cases.
        """
        key = f"{client}{SEP}{bucket}"  # one string made, where `+` makes two
        slot = self._slots.get(key)
        now = self.clock()
        if slot is None:  # a bucket never seen (or full, so forgotten): it starts full
            capacity = rule.burst
            rate = rule.rate
            if capacity + EPSILON < cost:
                self.limited += 1
                return new_decision(False, capacity, capacity, (cost - capacity) / rate, 0.0, rate)
            left = float(capacity - cost)
            if left < capacity:
                self._insert(key, _Slot(left, now, rule), now)
            self.allowed += 1
            return new_decision(True, capacity, floor(left + EPSILON), 0.0, (capacity - left) / rate, rate)
        slot.used = True
        # The caller's rule wins: a bucket follows its rule if the app's config changes.
        slot.rule = rule
        capacity = rule.burst
        rate = rule.rate
        tokens = slot.tokens
        if now > slot.last:  # a clock that goes backwards refills nothing
            tokens += (now - slot.last) * rate
            if tokens > capacity:
                tokens = float(capacity)
            slot.last = now
        if tokens + EPSILON >= cost:
            tokens -= cost
            if tokens < 0.0:
                tokens = 0.0
            slot.tokens = tokens
            self.allowed += 1
            # `new_decision`, inline: the one decision of most requests
            return _new_tuple(
                Decision,
                (True, capacity, floor(tokens + EPSILON), 0.0, (capacity - tokens) / rate, rate, False),
            )
        slot.tokens = tokens
        self.limited += 1
        return new_decision(
            False, capacity, floor(tokens + EPSILON), (cost - tokens) / rate, (capacity - tokens) / rate, rate
        )

    def take_all_now(self, client: str, buckets: Buckets, cost: int = 1) -> tuple[Decision, ...]:
        """`take_all` without the coroutine.

        When every bucket is known and each holds ``cost`` (what a limit of several rules meets
        on most requests), the step of `bucket.take_all` is written out, as in `take_now`: the
        general step's lists and calls were most of a two-rule decision. Anything else (a bucket
        never seen, a refusal) takes the general step; the tests hold both to the pure one.
        """
        now = self.clock()
        slots = self._slots
        found = [slots.get(f"{client}{SEP}{bucket}") for bucket, _ in buckets]
        if None not in found:
            known: list[_Slot] = found  # type: ignore[assignment]
            refilled = []
            for held, (_, rule) in zip(known, buckets, strict=True):
                tokens = held.tokens
                if now > held.last:
                    tokens += (now - held.last) * rule.rate
                    if tokens > rule.burst:
                        tokens = float(rule.burst)
                if tokens + EPSILON < cost:
                    break  # refused: nothing is changed here, the general step decides
                refilled.append(tokens)
            else:
                decisions = []
                for held, (_, rule), tokens in zip(known, buckets, refilled, strict=True):
                    tokens -= cost
                    if tokens < 0.0:
                        tokens = 0.0
                    if now > held.last:
                        held.last = now
                    held.tokens = tokens
                    held.rule = rule
                    held.used = True
                    capacity = rule.burst
                    rate = rule.rate
                    decisions.append(
                        _new_tuple(
                            Decision,
                            (
                                True,
                                capacity,
                                floor(tokens + EPSILON),
                                0.0,
                                (capacity - tokens) / rate,
                                rate,
                                False,
                            ),
                        )
                    )
                self.allowed += 1
                return tuple(decisions)
        states = [None if s is None else (s.tokens, s.last) for s in found]
        allowed, after, decisions = take_all(states, now, [(r.rate, r.burst) for _, r in buckets], cost)
        # The known buckets first: inserting a new one sweeps, and the sweep must judge this
        # client's other buckets by their new state (by the old, a bucket just spent may look
        # full again and be dropped, and what it was charged with lost).
        fresh = []
        for slot, (bucket, rule), (tokens, last) in zip(found, buckets, after, strict=True):
            if slot is not None:
                slot.used = True
                slot.tokens, slot.last, slot.rule = tokens, last, rule
            elif tokens < rule.burst:  # a full bucket is the same as none: keep only the others
                fresh.append((client + SEP + bucket, _Slot(tokens, last, rule)))
        for key, new in fresh:
            self._insert(key, new, now)
        if allowed:
            self.allowed += 1
        else:
            self.limited += 1
        return tuple(decisions)

    async def take(self, client: str, bucket: str, rule: Rule, cost: int = 1) -> Decision:
        return self.take_now(client, bucket, rule, cost)

    async def take_all(self, client: str, buckets: Buckets, cost: int = 1) -> tuple[Decision, ...]:
        return self.take_all_now(client, buckets, cost)

    def give_back_now(self, client: str, buckets: Buckets, cost: int = 1) -> None:
        now = self.clock()
        for bucket, rule in buckets:
            slot = self._slots.get(client + SEP + bucket)
            if slot is not None:
                back = give_back((slot.tokens, slot.last), now, rule.rate, rule.burst, cost)
                assert back is not None
                slot.tokens, slot.last = back

    async def give_back(self, client: str, buckets: Buckets, cost: int = 1) -> None:
        self.give_back_now(client, buckets, cost)

    def _insert(self, key: str, slot: _Slot, now: float) -> None:
        slots = self._slots
        at_bound = len(slots) >= self.max_keys
        for checked in range(_SWEEP_AT_BOUND):
            if not slots or (checked >= _SWEEP and not at_bound):
                break
            old_key = next(iter(slots))
            old = slots[old_key]
            if old.tokens + (now - old.last) * old.rule.rate + EPSILON >= old.rule.burst:
                del slots[old_key]  # full: the same as a fresh bucket, nothing is lost
                at_bound = False
            elif at_bound and not old.used:
                del slots[old_key]  # not used for a whole round: the least recently used
                at_bound = False
                break
            else:
                old.used = False
                slots.move_to_end(old_key)  # live: checked again next round
        if at_bound:
            slots.popitem(last=False)  # every bucket looked at is in use: the next in turn goes
        slots[key] = slot

    async def inspect(self, client: str) -> list[BucketState]:
        now = self.clock()
        head = client + SEP
        found = []
        for key, s in self._slots.items():
            if key.startswith(head):
                rule = s.rule
                tokens = refill(s.tokens, s.last, now, rule.rate, rule.burst)
                found.append(BucketState(key[len(head) :], tokens, rule.burst, rule.rate))
        return found

    async def reset(self, client: str) -> list[str]:
        return self.reset_now(client)

    def reset_now(self, client: str) -> list[str]:
        head = client + SEP
        keys = [k for k in self._slots if k.startswith(head)]
        for key in keys:
            del self._slots[key]
        return [key[len(head) :] for key in keys]

    @property
    def size(self) -> int:
        """Buckets held now."""
        return len(self._slots)

    def clear(self) -> None:
        """Forget every bucket (every client starts full); the counters stay."""
        self._slots.clear()

    async def count(self) -> int:
        return len(self._slots)

    async def stats(self) -> StoreStats:
        return StoreStats(
            "memory", self.allowed, self.limited, self.allowed, self.limited, len(self._slots), True
        )

    async def ping(self) -> float:
        return 0.0

    async def close(self) -> None:
        """Nothing to release: the buckets stay, as they would in Redis, for the next lifespan."""
