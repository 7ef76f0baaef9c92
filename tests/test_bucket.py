"""One table of token-bucket cases, run against the pure step, MemoryStore and the Lua script."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from rateguard import ConfigurationError, Decision, MemoryStore, RedisStore, Rule
from rateguard.bucket import take

from .conftest import FakeClock

BASE = 1_700_000_000.0


@dataclass(frozen=True)
class Step:
    at: float  # seconds after BASE
    allowed: bool
    remaining: int
    retry_after: float = 0.0
    cost: int = 1


CASES: dict[str, tuple[Rule, list[Step]]] = {
    "burst then deny": (
        Rule(60, capacity=3),
        [Step(0, True, 2), Step(0, True, 1), Step(0, True, 0), Step(0, False, 0, 1.0)],
    ),
    "refill one per second": (
        Rule(60, capacity=2),
        [
            Step(0, True, 1),
            Step(0, True, 0),
            Step(0.5, False, 0, 0.5),
            Step(1.0, True, 0),
            Step(1.25, False, 0, 0.75),
            Step(3.0, True, 1),  # 0.25 + 1.75 = 2 (full), take one
        ],
    ),
    "fractional rate: one per two minutes": (
        Rule(0.5),
        [Step(0, True, 0), Step(60, False, 0, 60.0), Step(119, False, 0, 1.0), Step(120, True, 0)],
    ),
    "five a minute (the demo)": (
        Rule(5),
        [*[Step(0, True, 4 - i) for i in range(5)], Step(0, False, 0, 12.0), Step(12, True, 0)],
    ),
    "cost above one; a denied request takes nothing": (
        Rule(60, capacity=10),
        [
            Step(0, True, 6, cost=4),
            Step(0, True, 2, cost=4),
            Step(0, False, 2, 2.0, cost=4),
            Step(0, True, 0, cost=2),
        ],
    ),
    "long idle refills to capacity, not beyond": (
        Rule(60, capacity=3),
        [Step(0, True, 2), Step(0, True, 1), Step(1_000_000, True, 2), Step(1_000_000, True, 1)],
    ),
    "clock not moving": (
        Rule(6, capacity=2),
        [Step(5, True, 1), Step(5, True, 0), Step(5, False, 0, 10.0), Step(5, False, 0, 10.0)],
    ),
    "clock going backwards refills nothing": (
        Rule(60, capacity=1),
        [Step(10, True, 0), Step(5, False, 0, 1.0), Step(11, True, 0)],
    ),
    "large capacity, slow rate": (
        Rule(1, capacity=1000),
        [Step(0, True, 999, cost=1), Step(0, True, 0, cost=999), Step(30, False, 0, 30.0)],
    ),
}


def check(decision: Decision, step: Step, rule: Rule) -> None:
    assert decision.allowed is step.allowed
    assert decision.remaining == step.remaining
    assert decision.limit == rule.burst
    assert decision.retry_after == pytest.approx(step.retry_after, abs=1e-6)
    assert 0 <= decision.reset_after <= rule.burst / rule.rate + 1e-6


@pytest.mark.parametrize("case", CASES)
def test_pure_step(case: str) -> None:
    rule, steps = CASES[case]
    tokens: float | None = None
    last = 0.0
    for step in steps:
        tokens, last, decision = take(tokens, last, BASE + step.at, rule.rate, rule.burst, step.cost)
        check(decision, step, rule)


@pytest.mark.parametrize("case", CASES)
async def test_memory_store(case: str) -> None:
    rule, steps = CASES[case]
    clock = FakeClock(BASE)
    store = MemoryStore(clock=clock)
    for step in steps:
        clock.now = BASE + step.at
        check(await store.take("client", "bucket", rule, step.cost), step, rule)


@pytest.mark.redis
@pytest.mark.parametrize("case", CASES)
async def test_redis_script(case: str, redis_store: RedisStore) -> None:
    rule, steps = CASES[case]
    for step in steps:
        decision = await redis_store.take("client", "bucket", rule, step.cost, now=BASE + step.at)
        check(decision, step, rule)


def test_reset_after_and_next_token() -> None:
    rule = Rule(60, capacity=10)
    tokens, last, d = take(None, 0.0, 100.0, rule.rate, rule.burst, 3)
    assert d.reset_after == pytest.approx(3.0)
    assert d.next_token_after == pytest.approx(1.0)
    tokens, last, d = take(tokens, last, 100.25, rule.rate, rule.burst, 1)
    # 7.25 -> 6.25 tokens: 3.75 s to full, 0.75 s to the next whole token
    assert d.reset_after == pytest.approx(3.75)
    assert d.next_token_after == pytest.approx(0.75)
    assert d.remaining == 6


def test_rule_defaults() -> None:
    assert Rule().burst == 60
    assert Rule(5).burst == 5 and Rule(5).window == 60
    assert Rule(0.5).burst == 1 and Rule(0.5).window == 120
    assert Rule(100, capacity=10).window == 6
    assert Rule(2.5).burst == 2
    assert math.isclose(Rule(90).rate, 1.5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"requests_per_minute": 0}, "requests_per_minute must be a finite number > 0"),
        ({"requests_per_minute": -5}, "requests_per_minute"),
        ({"requests_per_minute": float("nan")}, "requests_per_minute"),
        ({"requests_per_minute": float("inf")}, "requests_per_minute"),
        ({"requests_per_minute": "60"}, "requests_per_minute"),
        ({"requests_per_minute": True}, "requests_per_minute"),
        ({"capacity": 0}, "capacity must be >= 1"),
        ({"capacity": -1}, "capacity must be >= 1"),
        ({"capacity": float("nan")}, "capacity must be a whole number"),
        ({"capacity": 2.5}, "capacity must be a whole number"),
    ],
)
def test_rule_rejects_bad_values(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        Rule(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_new_decision_is_the_same_frozen_value_as_the_constructor() -> None:
    from rateguard.bucket import new_decision

    fast = new_decision(False, 10, 3, 1.5, 6.5, 2.0, True)
    slow = Decision(False, 10, 3, 1.5, 6.5, 2.0, True)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert type(fast) is Decision and tuple(fast) == (False, 10, 3, 1.5, 6.5, 2.0, True)
    assert new_decision(True, 1, 0, 0.0, 0.5, 2.0).degraded is False
    with pytest.raises(AttributeError):
        fast.remaining = 4  # type: ignore[misc]
