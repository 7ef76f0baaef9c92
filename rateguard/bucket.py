"""What a limit is (`Rule`), what a check answers (`Decision`), and the token-bucket step.

`take()` is the one definition of the algorithm. `MemoryStore` calls it; `token_bucket.lua`
mirrors it line for line, and one table of cases in the tests checks both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rateguard.errors import ConfigurationError

# Float arithmetic leaves 0.9999999999 where the exact answer is 1. A token that is this close
# to whole counts as whole, so a client that waits exactly `retry_after` is let in.
EPSILON = 1e-9


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Rule:
    """A token bucket: ``capacity`` tokens, refilled at ``requests_per_minute`` tokens a minute."""

    requests_per_minute: float = 60
    capacity: int | None = None  # None: the same as requests_per_minute (at least 1)
    rate: float = field(init=False, repr=False)  # tokens per second
    burst: int = field(init=False, repr=False)  # capacity resolved

    def __post_init__(self) -> None:
        rpm = self.requests_per_minute
        if not _is_number(rpm) or math.isnan(rpm) or math.isinf(rpm) or rpm <= 0:
            raise ConfigurationError(
                f"requests_per_minute must be a finite number > 0, got {rpm!r}; "
                "use e.g. 60 for one request a second, or 0.5 for one every two minutes"
            )
        capacity = self.capacity
        if capacity is None:
            burst = max(1, int(rpm))
        else:
            if (
                not _is_number(capacity)
                or math.isnan(capacity)
                or math.isinf(capacity)
                or capacity != int(capacity)
            ):
                raise ConfigurationError(
                    f"capacity must be a whole number >= 1, got {capacity!r}; "
                    "leave it out to use requests_per_minute"
                )
            if capacity < 1:
                raise ConfigurationError(
                    f"capacity must be >= 1, got {capacity!r}; leave it out to use requests_per_minute"
                )
            burst = int(capacity)
        object.__setattr__(self, "rate", rpm / 60.0)
        object.__setattr__(self, "burst", burst)

    @property
    def window(self) -> int:
        """Seconds an empty bucket takes to refill: the ``w`` of the RateLimit-Policy field."""
        return max(1, math.ceil(self.burst / self.rate - EPSILON))

    def check_cost(self, cost: object, source: str = "cost") -> int:
        """Validate a cost for this rule and return it as an int."""
        if not isinstance(cost, int) or isinstance(cost, bool):
            raise ConfigurationError(f"{source} must be an int, got {cost!r}")
        if cost < 1 or cost > self.burst:
            raise ConfigurationError(
                f"{source} must be between 1 and capacity ({self.burst}), got {cost}; "
                "a cost above capacity could never be allowed: raise capacity or lower the cost"
            )
        return cost


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check against one bucket."""

    allowed: bool
    limit: int  # the bucket's capacity
    remaining: int  # whole tokens left after this request
    retry_after: float  # seconds until the request could pass; 0 when allowed
    reset_after: float  # seconds until the bucket is full again
    rate: float = 0.0  # tokens per second, so headers can tell when the next token comes
    degraded: bool = False  # made by a fallback while the shared store was unreachable

    @property
    def next_token_after(self) -> float:
        """Seconds until one more whole token is available (0 when the bucket is full)."""
        if not self.allowed:
            return self.retry_after
        if self.reset_after <= EPSILON or self.rate <= 0:
            return 0.0
        # capacity is whole, so the fraction of a token missing is the fraction of reset_after
        missing = self.reset_after * self.rate
        frac = missing - math.floor(missing)
        if frac <= EPSILON:
            frac = 1.0
        return frac / self.rate


def take(
    tokens: float | None, last: float, now: float, rate: float, capacity: int, cost: int
) -> tuple[float, float, Decision]:
    """One token-bucket step: returns ``(tokens, last, decision)``.

    ``tokens is None`` means a bucket never seen (or expired): it starts full. A clock that goes
    backwards (a Redis failover, a test) refills nothing and keeps the later timestamp.
    """
    if tokens is None:
        tokens = float(capacity)
        last = now
    elif now > last:
        tokens = min(float(capacity), tokens + (now - last) * rate)
        last = now
    if tokens + EPSILON >= cost:
        tokens = max(0.0, tokens - cost)
        allowed = True
        retry_after = 0.0
    else:
        allowed = False
        retry_after = (cost - tokens) / rate
    reset_after = (capacity - tokens) / rate
    remaining = math.floor(tokens + EPSILON)
    return tokens, last, new_decision(allowed, capacity, remaining, retry_after, reset_after, rate)


# A frozen dataclass's __init__ sets each field through object.__setattr__: about 1 us per
# Decision, and one is made on every request. The hot path fills a mutable twin with the same
# slots instead (plain attribute stores) and then makes it a Decision: CPython allows assigning
# __class__ between classes of the same layout. The result is the same object as the
# constructor's (fields, equality, hash, immutability afterwards), made in 40% of the time of
# setting the frozen slots one descriptor call at a time.
class _DecisionFields:
    __slots__ = Decision.__slots__


def new_decision(
    allowed: bool,
    limit: int,
    remaining: int,
    retry_after: float,
    reset_after: float,
    rate: float,
    degraded: bool = False,
) -> Decision:
    """``Decision(...)`` for the hot path (positional, no checks beyond the types given)."""
    fields: Any = _DecisionFields()
    fields.allowed = allowed
    fields.limit = limit
    fields.remaining = remaining
    fields.retry_after = retry_after
    fields.reset_after = reset_after
    fields.rate = rate
    fields.degraded = degraded
    fields.__class__ = Decision
    decision: Decision = fields
    return decision


@dataclass(frozen=True, slots=True)
class BucketState:
    """One stored bucket as the admin API shows it, refilled to the moment it was read."""

    bucket: str  # the bucket name: "global" or the route, e.g. "POST /api/expensive"
    tokens: float
    capacity: int
    rate: float  # tokens per second

    @property
    def requests_per_minute(self) -> float:
        return self.rate * 60.0

    @property
    def retry_after(self) -> float:
        return 0.0 if self.tokens + EPSILON >= 1 else (1 - self.tokens) / self.rate

    @property
    def reset_after(self) -> float:
        return max(0.0, (self.capacity - self.tokens) / self.rate)


def refill(tokens: float, last: float, now: float, rate: float, capacity: int) -> float:
    """Tokens a bucket holds at ``now`` (the refill half of `take`)."""
    if now > last:
        return min(float(capacity), tokens + (now - last) * rate)
    return tokens
