"""MemoryStore stays bounded: full buckets go first, then the least recently used; limits stay exact."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from rateguard import MemoryStore, RateGuard, Rule
from rateguard.bucket import take

from . import raw_asgi
from .conftest import FakeClock

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


class Reference:
    """The exact decisions of one bucket that is never evicted: the pure step on its own."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.tokens: float | None = None
        self.last = 0.0

    def take(self, now: float, cost: int = 1) -> Any:
        self.tokens, self.last, decision = take(
            self.tokens, self.last, now, self.rule.rate, self.rule.burst, cost
        )
        return decision


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _flood_child() -> dict[str, Any]:
    """Run in a fresh interpreter: three floods of 300,000 new clients against the default store.

    The clock moves 1 microsecond a request, so no flooding client's bucket refills during a
    flood: every insertion past the bound must evict (the worst case). Eight active clients keep
    making requests throughout; each decision must equal that of a bucket never evicted.
    """
    clock = FakeClock(1_000.0)
    store = MemoryStore(clock=clock)
    flood_rule = Rule(60, capacity=10)
    # Each active client asks every 256 us and gets a token every 333 us: some requests are denied.
    active_rule = Rule(180_000, capacity=3)
    active = {f"active-{i}": Reference(active_rule) for i in range(8)}
    outcomes = {True: 0, False: 0}
    mismatches = 0
    max_count = 0
    sizes = []
    rss = [_rss()]
    for flood in "abc":
        for i in range(300_000):
            clock.advance(1e-6)
            await store.take(f"{flood}-{i}", "global", flood_rule)
            if i % 32 == 0:
                name = f"active-{i // 32 % 8}"
                decision = await store.take(name, "global", active_rule)
                outcomes[decision.allowed] += 1
                if decision != active[name].take(clock.now):
                    mismatches += 1
            max_count = max(max_count, await store.count())
        sizes.append(await store.count())
        rss.append(_rss())
    return {
        "max_keys": store.max_keys,
        "max_count": max_count,
        "sizes": sizes,
        "rss": rss,
        "mismatches": mismatches,
        "active_allowed": outcomes[True],
        "active_denied": outcomes[False],
    }


def test_a_flood_of_300k_clients_keeps_the_store_bounded_and_memory_flat() -> None:
    code = "import asyncio, json; from tests.test_memory_bound import _flood_child; print(json.dumps(asyncio.run(_flood_child())))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    r0, r1, r2, r3 = report["rss"]
    assert report["max_keys"] == 100_000
    assert report["max_count"] <= 100_000
    assert report["sizes"] == [100_000] * 3
    assert report["mismatches"] == 0
    assert report["active_allowed"] > 10_000 and report["active_denied"] > 1_000, report
    # The first flood fills the store to its bound; later floods of new clients reuse that memory.
    footprint = r1 - r0
    assert footprint < 150 * MB, report
    assert r3 - r1 < footprint // 4 + 4 * MB, report
    assert r3 - r2 < footprint // 10 + 4 * MB, report


async def test_active_clients_stay_exact_while_a_flood_evicts() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=1_000, clock=clock)
    rule = Rule(60, capacity=5)
    refs = {f"active-{i}": Reference(rule) for i in range(20)}
    for i in range(30_000):
        clock.advance(0.001)
        await store.take(f"flood-{i}", "global", Rule(1, capacity=5))  # never refills in the test
        if i % 25 == 0:
            name = f"active-{i // 25 % 20}"
            assert await store.take(name, "global", rule) == refs[name].take(clock.now)
        assert await store.count() <= 1_000


async def test_full_buckets_go_before_live_ones() -> None:
    """A bucket that refills slowly is not evicted while full buckets can go instead."""
    clock = FakeClock()
    store = MemoryStore(max_keys=1_000, clock=clock)
    hourly = Rule(1 / 60, capacity=1)
    assert (await store.take("slow-client", "report", hourly)).allowed
    for i in range(20_000):  # 20 x the bound, each full again a second after its request
        clock.advance(0.01)
        await store.take(f"client-{i}", "global", Rule(60))
    assert await store.count() <= 300
    decision = await store.take("slow-client", "report", hourly)
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(3_400, abs=0.01)  # an hour less the 200 s gone


async def test_past_the_bound_the_least_recently_used_go() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=100, clock=clock)
    rule = Rule(1, capacity=5)  # nothing refills during the test
    for i in range(100):
        await store.take(f"old-{i}", "global", rule)
    for i in range(0, 100, 2):  # the even ones are used again
        await store.take(f"old-{i}", "global", rule)
    for i in range(50):
        await store.take(f"new-{i}", "global", rule)
    assert await store.count() == 100
    kept = {i for i in range(100) if await store.inspect(f"old-{i}")}
    assert kept == set(range(0, 100, 2))
    # The used ones kept their state: two tokens taken, three left.
    assert [b.tokens for b in await store.inspect("old-0")] == [3.0]


async def test_idle_buckets_drain_as_new_clients_come() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=10_000, clock=clock)
    rule = Rule(60, capacity=10)
    for i in range(10_000):
        await store.take(f"a-{i}", "global", rule)
    assert await store.count() == 10_000
    clock.advance(3600)  # every bucket is full again
    for i in range(2_000):
        await store.take(f"b-{i}", "global", rule)
    # Each insertion dropped two full buckets: 10,000 - 4,000 + 2,000.
    assert await store.count() == 8_000
    for i in range(2_000, 5_000):
        await store.take(f"b-{i}", "global", rule)
    assert await store.count() == 5_000  # only the new clients, whose buckets are not full yet


async def test_the_sweep_judges_a_bucket_by_its_state_now() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=100, clock=clock)
    rule = Rule(60, capacity=2)
    await store.take("x", "global", rule)
    clock.advance(5)  # x is full again ...
    await store.take("x", "global", rule)
    await store.take("x", "global", rule)  # ... and now empty
    for i in range(60):  # the sweep passes x many times
        await store.take(f"y-{i}", "global", rule)
    assert await store.count() == 61
    assert not (await store.take("x", "global", rule)).allowed


async def test_reset_and_clear_forget_buckets() -> None:
    store = MemoryStore(max_keys=10)
    rule = Rule(1, capacity=2)
    await store.take("a", "one", rule)
    await store.take("a", "two", rule)
    await store.take("b", "one", rule)
    assert sorted(await store.reset("a")) == ["one", "two"]
    assert await store.count() == 1
    for i in range(20):  # the sweep copes with the gaps reset left
        await store.take(f"c-{i}", "one", rule)
    assert await store.count() == 10
    await store.close()  # closing keeps the buckets, as Redis would, for the next lifespan
    assert await store.count() == 10
    store.clear()
    assert await store.count() == 0


async def test_a_flood_through_the_middleware_keeps_its_store_bounded() -> None:
    """Distinct client addresses over ASGI: the bound holds and a steady client keeps its limit."""
    clock = FakeClock()
    store = MemoryStore(max_keys=500, clock=clock)

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = RateGuard(Starlette(routes=[Route("/", ok)]), requests_per_minute=60, capacity=3, store=store)
    codes = []
    for i in range(5_000):
        clock.advance(0.0001)
        peer = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert (await raw_asgi.request(app, client=(peer, 1))).status == 200
        if i % 10 == 0:
            codes.append((await raw_asgi.request(app, client=("192.0.2.1", 1))).status)
        assert await store.count() <= 500
    # 500 requests 1 ms apart, over 0.5 s: the 3 tokens it starts with, and none refilled.
    assert codes == [200] * 3 + [429] * 497


def test_default_bound() -> None:
    assert MemoryStore().max_keys == 100_000
    assert asyncio.run(MemoryStore().count()) == 0
