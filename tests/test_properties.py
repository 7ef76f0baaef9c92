"""Properties of the token-bucket step over any sequence of requests and clock steps (hypothesis).

- In any interval of length T, the tokens taken by allowed requests are at most
  ``capacity + rate * T``.
- ``remaining`` is never negative or above capacity; a denied request that waits ``retry_after``
  passes (to within the float resolution of the clock), and one that waits much less does not.
- MemoryStore decides exactly as the pure step, whatever its sweep drops; evicting only ever
  makes a bucket fresh.
- MemoryStore and RedisStore (the Lua mirror, with a pinned clock) decide the same.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rateguard import MemoryStore, RedisStore, Rule
from rateguard.bucket import Decision, take, take_all
from rateguard.stores.memory import SEP

from .conftest import FakeClock

START = 1_700_000_000.0  # the FakeClock's start: float spacing there is ~2e-7 s, as in production
TOLERANCE = 1e-6  # tokens: EPSILON (1e-9) per request, summed, is far below this

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)


@dataclass(frozen=True)
class Step:
    dt: float  # seconds the clock moves before the request
    cost: int


@st.composite
def rules(draw: st.DrawFn, max_rpm: float = 6_000) -> Rule:
    rpm = draw(st.sampled_from([0.5, 1, 6, 60, 600]) | st.floats(0.5, max_rpm))
    capacity = draw(st.integers(1, 3) | st.integers(1, 60))
    return Rule(min(rpm, max_rpm), capacity=capacity)


@st.composite
def steps(draw: st.DrawFn, rule: Rule, backwards: bool = False) -> list[Step]:
    """Clock steps measured in refill times of one token, so every rate is explored alike."""
    low = -2.0 if backwards else 0.0
    units = st.just(0.0) | st.floats(low, 3.0) | st.sampled_from([1.0, 0.5, 1e-9, rule.burst])
    cost = st.just(1) | st.integers(1, rule.burst)
    return [
        Step(u / rule.rate, c) for u, c in draw(st.lists(st.tuples(units, cost), min_size=10, max_size=60))
    ]


def assert_interval_bound(allowed: list[tuple[float, int]], rule: Rule) -> None:
    """Tokens taken in every window [t_i, t_j] are at most capacity + rate * (t_j - t_i)."""
    for i, (start, _) in enumerate(allowed):
        taken = 0
        for end, cost in allowed[i:]:
            taken += cost
            assert taken <= rule.burst + rule.rate * (end - start) + TOLERANCE, (start, end, taken)


def assert_sane(decision: Decision, rule: Rule, cost: int) -> None:
    assert decision.limit == rule.burst
    assert 0 <= decision.remaining <= rule.burst
    assert 0 <= decision.reset_after <= rule.burst / rule.rate + TOLERANCE
    if decision.allowed:
        assert decision.retry_after == 0
    else:
        assert 0 < decision.retry_after <= cost / rule.rate + TOLERANCE


# ---------------------------------------------------------------------------------------------
# The pure step


@SETTINGS
@given(st.data())
def test_pure_step_respects_the_interval_bound(data: st.DataObject) -> None:
    rule = data.draw(rules())
    tokens: float | None = None
    last = now = START
    allowed: list[tuple[float, int]] = []
    for step in data.draw(steps(rule)):
        now += step.dt
        tokens, last, decision = take(tokens, last, now, rule.rate, rule.burst, step.cost)
        assert_sane(decision, rule, step.cost)
        assert 0 <= tokens <= rule.burst
        if decision.allowed:
            allowed.append((now, step.cost))
        else:
            # Waiting retry_after is enough, and much less is not. (The margin: a time near START
            # is only exact to 2.4e-7 s; with epoch-scale clocks, retry_after is as exact as that.)
            wait = decision.retry_after
            assert take(tokens, last, now + wait + 1e-6, rule.rate, rule.burst, step.cost)[2].allowed
            if wait > 1e-3:
                assert not take(tokens, last, now + wait - 1e-4, rule.rate, rule.burst, step.cost)[2].allowed
    assert_interval_bound(allowed, rule)


@SETTINGS
@given(st.data())
def test_a_clock_that_goes_backwards_refills_nothing(data: st.DataObject) -> None:
    rule = data.draw(rules())
    tokens: float | None = None
    last = now = START
    latest = -math.inf
    allowed: list[tuple[float, int]] = []
    for step in data.draw(steps(rule, backwards=True)):
        now += step.dt
        latest = max(latest, now)
        tokens, last, decision = take(tokens, last, now, rule.rate, rule.burst, step.cost)
        assert_sane(decision, rule, step.cost)
        assert last == latest  # the later timestamp is kept
        if decision.allowed:
            allowed.append((latest, step.cost))
    # Judged by the latest time seen, the bound still holds.
    assert_interval_bound(allowed, rule)


# ---------------------------------------------------------------------------------------------
# MemoryStore: the sweep and the bound never change a decision, except to make a bucket fresh


@st.composite
def traffic(draw: st.DrawFn, max_rpm: float = 6_000) -> tuple[list[Rule], list[tuple[int, int, Step]]]:
    """Requests of a few clients against a few rules: (client, rule index, step)."""
    rule_list = draw(st.lists(rules(max_rpm), min_size=1, max_size=3))
    raw = draw(
        st.lists(
            st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, 40), st.integers(1, 4)),
            min_size=20,
            max_size=80,
        )
    )
    ops = []
    for client, index, twentieths, cost in raw:
        rule = rule_list[index % len(rule_list)]
        ops.append((client, index % len(rule_list), Step(twentieths / 20 / rule.rate, min(cost, rule.burst))))
    return rule_list, ops


class References:
    """One never-evicted pure-step bucket per (client, bucket)."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, str], tuple[float | None, float]] = {}

    def take(self, key: tuple[str, str], rule: Rule, now: float, cost: int) -> Decision:
        tokens, last = self.state.get(key, (None, now))
        tokens, last, decision = take(tokens, last, now, rule.rate, rule.burst, cost)
        self.state[key] = (tokens, last)
        return decision

    def forget(self, key: tuple[str, str]) -> None:
        self.state.pop(key, None)


def same(a: Decision, b: Decision) -> bool:
    """The same decision: whole numbers exactly, times to within float error."""
    return (
        a.allowed == b.allowed
        and a.remaining == b.remaining
        and math.isclose(a.retry_after, b.retry_after, rel_tol=1e-9, abs_tol=1e-6)
        and math.isclose(a.reset_after, b.reset_after, rel_tol=1e-9, abs_tol=1e-6)
    )


@SETTINGS
@given(traffic())
def test_memory_store_decides_as_the_pure_step(case: tuple[list[Rule], list[tuple[int, int, Step]]]) -> None:
    """Room for every bucket: the sweep drops only full ones, and that changes nothing."""
    rule_list, ops = case
    clock = FakeClock(START)
    store = MemoryStore(max_keys=6 * len(rule_list), clock=clock)
    refs = References()
    for client, index, step in ops:
        clock.advance(step.dt)
        key = (f"c{client}", f"b{index}")
        decision = store.take_now(*key, rule_list[index], step.cost)
        assert same(decision, refs.take(key, rule_list[index], clock.now, step.cost))


@SETTINGS
@given(traffic())
def test_memory_store_decides_several_rules_as_the_pure_step(
    case: tuple[list[Rule], list[tuple[int, int, Step]]],
) -> None:
    """A limit of all the drawn rules: every rule's decision, allowed or refused, known bucket or
    new, is the pure all-or-nothing step's (`take_all_now` writes the usual case out)."""
    rule_list, ops = case
    buckets = tuple((f"b{i}", rule) for i, rule in enumerate(rule_list))
    clock = FakeClock(START)
    store = MemoryStore(max_keys=6 * len(rule_list), clock=clock)
    states: dict[str, list[tuple[float, float] | None]] = {}
    for client, _, step in ops:
        clock.advance(step.dt)
        name = f"c{client}"
        before = states.get(name, [None] * len(buckets))
        _, after, expected = take_all(before, clock.now, [(r.rate, r.burst) for r in rule_list], step.cost)
        # A bucket full again is the same as a fresh one, which is what the store's sweep keeps.
        states[name] = [
            None if tokens >= rule.burst else (tokens, last)
            for (tokens, last), rule in zip(after, rule_list, strict=True)
        ]
        decisions = store.take_all_now(name, buckets, step.cost)
        assert len(decisions) == len(expected)
        for mine, theirs in zip(decisions, expected, strict=True):
            assert same(mine, theirs), (mine, theirs)


@SETTINGS
@given(traffic(), st.integers(1, 6))
def test_past_the_bound_eviction_only_makes_buckets_fresh(
    case: tuple[list[Rule], list[tuple[int, int, Step]]], max_keys: int
) -> None:
    rule_list, ops = case
    clock = FakeClock(START)
    store = MemoryStore(max_keys=max_keys, clock=clock)
    refs = References()
    for client, index, step in ops:
        clock.advance(step.dt)
        key = (f"c{client}", f"b{index}")
        rule = rule_list[index]
        decision = store.take_now(*key, rule, step.cost)
        assert_sane(decision, rule, step.cost)
        assert same(decision, refs.take(key, rule, clock.now, step.cost))
        # A bucket the store let go of starts afresh: the reference forgets it too.
        kept = store._slots  # white box: which buckets the store still holds
        assert len(kept) <= max_keys
        for gone in [k for k in refs.state if k[0] + SEP + k[1] not in kept]:
            refs.forget(gone)


# ---------------------------------------------------------------------------------------------
# MemoryStore and RedisStore decide the same

_example = itertools.count()


@pytest.mark.redis
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=traffic(max_rpm=6))
async def test_memory_and_redis_decide_the_same(
    redis_url: str, case: tuple[list[Rule], list[tuple[int, int, Step]]]
) -> None:
    # Redis expires a bucket by its own clock when it would be full (at least 10 s here, at
    # <= 6 a minute), so each example's requests, run in milliseconds, never see an expiry.
    # Each example has clients of its own: the fixture's flush happens once per test. A slow
    # reply must fail the test, not be decided locally: no fallback, and a generous timeout.
    rule_list, ops = case
    run = next(_example)
    clock = FakeClock(START)
    memory = MemoryStore(clock=clock)
    redis = RedisStore(url=redis_url, on_error="deny", timeout=2.0, connect_timeout=2.0)
    try:
        for client, index, step in ops:
            clock.advance(step.dt)
            name, bucket = f"run{run}-c{client}", f"b{index}"
            rule = rule_list[index]
            mine = memory.take_now(name, bucket, rule, step.cost)
            theirs = await redis.take(name, bucket, rule, step.cost, now=clock.now)
            assert not theirs.degraded
            assert (mine.allowed, mine.remaining) == (theirs.allowed, theirs.remaining)
            assert math.isclose(mine.retry_after, theirs.retry_after, rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(mine.reset_after, theirs.reset_after, rel_tol=1e-9, abs_tol=1e-9)
    finally:
        await redis.close()


@st.composite
def applied_limits(draw: st.DrawFn) -> list[tuple[object, Decision]]:
    from rateguard.headers import PolicyHeader

    out = []
    for i in range(draw(st.integers(2, 4))):
        burst = draw(st.integers(1, 5))
        rule = Rule(draw(st.sampled_from([30, 60, 120])), capacity=burst)
        allowed = draw(st.booleans())
        remaining = draw(st.integers(0, burst))  # ties on remaining and on the wait are common
        retry = 0.0 if allowed else draw(st.sampled_from([0.5, 1.0, 3.0]))
        decision = Decision(allowed, burst, remaining, retry, float(burst - remaining) / rule.rate, rule.rate)
        out.append((PolicyHeader(f"r{i}", rule), decision))
    return out


@SETTINGS
@given(applied_limits())
def test_several_limits_report_the_worst_in_their_x_fields(applied: list[tuple[object, Decision]]) -> None:
    # Denied beats allowed, then fewest remaining, then the longest wait; the first of equals.
    from rateguard.headers import as_dict, render_all

    policy, worst = min(applied, key=lambda a: (a[1].allowed, a[1].remaining, -a[1].retry_after))
    fields = as_dict(render_all(applied))  # type: ignore[arg-type]
    assert fields["x-ratelimit-limit"] == policy.limit.decode()  # type: ignore[attr-defined]
    assert fields["x-ratelimit-remaining"] == str(worst.remaining)
    assert fields["ratelimit-policy"].count(";q=") == len(applied)
    assert ("retry-after" in fields) == any(not d.allowed for _, d in applied)
