"""What a limit is (`Rule`), what a check answers (`Decision`), and the token-bucket step.

`take_all()` and `give_back()` are the one definition of the algorithm. `MemoryStore` calls them
(`take_now` writes the one-rule case out in place); `token_bucket.lua` mirrors them line for
line, and one table of cases in the tests checks all three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from rateguard.errors import ConfigurationError

# Float arithmetic leaves 0.9999999999 where the exact answer is 1. A token that is this close
# to whole counts as whole, so a client that waits exactly `retry_after` is let in.
EPSILON = 1e-9

# RFC 9651 integers have at most 15 digits: every q, w, r and t of the RateLimit fields must fit.
MAX_INTEGER = 999_999_999_999_999


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Rule:
    """A token bucket: ``capacity`` tokens, refilled at ``requests_per_minute`` tokens a minute.

    ``Rule.per(100, 86_400)`` is 100 a day (a bucket of 100 refilled over a day); the rate
    strings of `rateguard.rates` ("100/day") build the same.
    """

    requests_per_minute: float = 60
    capacity: int | None = None  # None: the same as requests_per_minute (at least 1)
    label: str | None = field(default=None, compare=False, kw_only=True)  # e.g. "100/day", for people
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
        if burst > MAX_INTEGER:
            raise ConfigurationError(
                f"capacity must be at most {MAX_INTEGER:,} (15 digits, what the RateLimit header "
                f"fields can carry), got {burst:,}"
            )
        object.__setattr__(self, "rate", rpm / 60.0)
        object.__setattr__(self, "burst", burst)
        if burst / self.rate > MAX_INTEGER:
            raise ConfigurationError(
                f"a bucket of {burst} refilled at {rpm!r} a minute takes longer than {MAX_INTEGER:,} "
                "seconds to refill, more than the RateLimit header fields can carry; raise the rate"
            )

    @classmethod
    def per(
        cls, amount: int, seconds: float, *, capacity: int | None = None, label: str | None = None
    ) -> Rule:
        """``amount`` requests per ``seconds``: a bucket of ``amount`` (or ``capacity``) refilled over that time."""
        if not _is_number(seconds) or math.isnan(seconds) or math.isinf(seconds) or seconds <= 0:
            raise ConfigurationError(
                f"a rate's period must be a finite number of seconds > 0, got {seconds!r}"
            )
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
            raise ConfigurationError(f"a rate's count must be a whole number >= 1, got {amount!r}")
        return cls(amount * 60.0 / seconds, capacity if capacity is not None else amount, label=label)

    @property
    def window(self) -> int:
        """Seconds an empty bucket takes to refill: the ``w`` of the RateLimit-Policy field."""
        return max(1, math.ceil(self.burst / self.rate - EPSILON))

    def __str__(self) -> str:
        if self.label is not None:
            return self.label
        return f"{self.requests_per_minute:g}/minute" + (
            f" (capacity {self.burst})" if self.burst != max(1, int(self.requests_per_minute)) else ""
        )

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


class Decision(NamedTuple):
    """The answer to one check against one bucket."""

    allowed: bool
    limit: int  # the bucket's capacity
    remaining: int  # whole tokens left after this request
    retry_after: float  # seconds until the request could pass; 0 when allowed
    reset_after: float  # seconds until the bucket is full again
    rate: float = 0.0  # tokens per second, so headers can tell when the next token comes
    degraded: bool = False  # made by a fallback while the shared store was unreachable

    @property
    def tokens(self) -> float:
        """The tokens the bucket held after this decision (fractions included)."""
        return self.limit - self.reset_after * self.rate if self.rate > 0 else float(self.remaining)

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


_new_tuple = tuple.__new__


def new_decision(
    allowed: bool,
    limit: int,
    remaining: int,
    retry_after: float,
    reset_after: float,
    rate: float,
    degraded: bool = False,
) -> Decision:
    """``Decision(...)`` for the hot path: the tuple built directly, without the keyword layer."""
    return _new_tuple(Decision, (allowed, limit, remaining, retry_after, reset_after, rate, degraded))


# The state of one stored bucket: (tokens, last refill), or None for a bucket never seen.
State = tuple[float, float] | None


def refill(tokens: float, last: float, now: float, rate: float, capacity: int) -> float:
    """Tokens a bucket holds at ``now``."""
    if now > last:
        return min(float(capacity), tokens + (now - last) * rate)
    return tokens


def take_all(
    states: Sequence[State], now: float, rules: Sequence[tuple[float, int]], cost: int
) -> tuple[bool, list[tuple[float, float]], list[Decision]]:
    """One all-or-nothing step over several buckets: ``(allowed, new states, decisions)``.

    ``rules`` gives each bucket's ``(rate, capacity)``. Every bucket is refilled; only if each
    holds ``cost`` tokens is ``cost`` taken from each, otherwise none is taken from any. A bucket
    never seen starts full; a clock that goes backwards (a Redis failover, a test) refills
    nothing and keeps the later timestamp.
    """
    refilled: list[tuple[float, float]] = []
    allowed = True
    for state, (rate, capacity) in zip(states, rules, strict=True):
        if state is None:
            tokens, last = float(capacity), now
        else:
            tokens, last = state
            if now > last:
                tokens = min(float(capacity), tokens + (now - last) * rate)
                last = now
        if tokens + EPSILON < cost:
            allowed = False
        refilled.append((tokens, last))
    # Each bucket answers for itself (a bucket that had the tokens says allowed, with nothing
    # taken when another refused): the headers then tell which limit refused and when it passes.
    decisions: list[Decision] = []
    result: list[tuple[float, float]] = []
    for (tokens, last), (rate, capacity) in zip(refilled, rules, strict=True):
        enough = tokens + EPSILON >= cost
        if allowed:
            tokens = max(0.0, tokens - cost)
        result.append((tokens, last))
        decisions.append(
            new_decision(
                enough,
                capacity,
                math.floor(tokens + EPSILON),
                0.0 if enough else (cost - tokens) / rate,
                (capacity - tokens) / rate,
                rate,
            )
        )
    return allowed, result, decisions


def take(
    tokens: float | None, last: float, now: float, rate: float, capacity: int, cost: int
) -> tuple[float, float, Decision]:
    """`take_all` for one bucket: ``(tokens, last, decision)``; ``tokens is None``: never seen."""
    _, states, decisions = take_all(
        [None if tokens is None else (tokens, last)], now, [(rate, capacity)], cost
    )
    [(tokens, last)] = states
    return tokens, last, decisions[0]


def give_back(state: State, now: float, rate: float, capacity: int, cost: int) -> tuple[float, float] | None:
    """Return ``cost`` tokens taken for a request that a later limit refused, capped at capacity.

    A bucket that is gone (never seen, expired) is full: nothing to return, and None says so.
    Refilling first, then adding, keeps the bucket on the course it would have had without the
    request: take-then-give-back leaves it where pure refill would.
    """
    if state is None:
        return None
    tokens, last = state
    if now > last:
        tokens = min(float(capacity), tokens + (now - last) * rate)
        last = now
    return min(float(capacity), tokens + cost), last


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
