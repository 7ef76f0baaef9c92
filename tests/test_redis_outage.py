"""Redis outages: decisions degrade by policy, never a 500, never a long wait, and recover by themselves.

Each test starts its own redis-server, then kills, pauses or restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import Depends, FastAPI

from rateguard import RateGuard, RedisStore, Rule, limit

from .conftest import RedisServer
from .helpers import client_for

pytestmark = pytest.mark.redis

TIMEOUT = 0.05  # the store's default
SLACK = 0.25  # scheduling on a loaded 2-core CI machine


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def app_for(store: RedisStore, capacity: int = 3) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1, capacity=capacity, store=store)

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


async def until(predicate: Any, seconds: float, poke: Any = None) -> float:
    """Wait until ``predicate()`` holds, calling ``poke()`` meanwhile; returns the time it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not within {seconds} s")
        if poke is not None:
            await poke()
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def timed_get(client: httpx.AsyncClient, ip: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await client.get("/", headers={"x-client": ip})
    return r.status_code, time.perf_counter() - t0


@pytest.fixture
async def two_servers(private_redis: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    stores = (RedisStore(url=private_redis.url), RedisStore(url=private_redis.url))
    try:
        yield stores
    finally:
        for s in stores:
            await s.close()


async def test_sigkill_under_load_then_restart(
    private_redis: RedisServer, two_servers: tuple[RedisStore, RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rateguard")
    a, b = two_servers
    app_a, app_b = app_for(a), app_for(b)
    async with client_for(app_a, "198.51.100.1") as ca, client_for(app_b, "198.51.100.1") as cb:
        # Shared before the outage: 3 tokens between both servers.
        codes = [(await c.get("/")).status_code for c in (ca, cb, ca, cb)]
        assert codes == [200, 200, 200, 429]

        results: list[tuple[int, float]] = []
        stop = asyncio.Event()

        async def steady_load(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                status = (await client.get("/")).status_code
                results.append((status, time.perf_counter() - t0))
                await asyncio.sleep(0.005)

        load = [asyncio.create_task(steady_load(c)) for c in (ca, cb)]
        await asyncio.sleep(0.2)
        private_redis.kill()
        await until(lambda: a.degraded and b.degraded, 5)
        await asyncio.sleep(0.5)  # steady load during the outage

        # Limiting continues locally: a new client gets each server's own full bucket.
        async with client_for(app_a, "198.51.100.2") as fresh:
            local = [(await fresh.get("/")).status_code for _ in range(5)]
        assert local == [200, 200, 200, 429, 429]

        private_redis.start()  # same port, empty, no scripts loaded
        took = await until(lambda: not a.degraded and not b.degraded, 8)
        stop.set()
        await asyncio.gather(*load)

    statuses = {s for s, _ in results}
    assert statuses <= {200, 429}, statuses  # never a 500 (or a 503: the policy is "local")
    assert max(d for _, d in results) < TIMEOUT + SLACK
    assert took < 6  # the breaker's back-off is capped at 5 s

    # Shared again: a new client's 3 tokens are split between the two servers.
    async with client_for(app_a, "198.51.100.3") as ca, client_for(app_b, "198.51.100.3") as cb:
        codes = [(await c.get("/")).status_code for c in (ca, cb, ca, cb)]
    assert codes == [200, 200, 200, 429]

    # One warning going into degraded mode and one info line out of it, per store: not per request.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "rateguard.redis"]
    infos = [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "rateguard.redis"
    ]
    assert len(warnings) == 2 and "unavailable" in warnings[0].getMessage()
    assert len([m for m in infos if "answers again" in m]) == 2
    # The deny cache's subscription is a state of its own: at most lost once and back once per store
    # (it may come back a moment after the test ends).
    lost = [m for m in infos if "reset channel lost" in m]
    back = [m for m in infos if "reset channel back" in m]
    assert len(lost) <= 2 and len(back) <= len(lost)
    assert len(infos) <= 6


async def test_allow_policy(private_redis: RedisServer) -> None:
    store = RedisStore(url=private_redis.url, on_error="allow")
    try:
        async with client_for(app_for(store, capacity=1)) as client:
            assert (await client.get("/")).status_code == 200
            assert (await client.get("/")).status_code == 429
            private_redis.kill()
            # Another client notices the outage (the blocked one is answered from the deny
            # cache, which is exact: it needs no Redis to know it is over its limit).
            async with client_for(app_for(store, capacity=1), "192.0.2.200") as other:
                await until(lambda: store.degraded, 5, poke=lambda: other.get("/"))
            codes = [(await client.get("/")).status_code for _ in range(10)]
        assert codes == [200] * 10
    finally:
        await store.close()


async def test_deny_policy_answers_503_with_retry_after(private_redis: RedisServer) -> None:
    store = RedisStore(url=private_redis.url, on_error="deny")
    app = app_for(store)

    @app.get("/route", dependencies=[Depends(limit(5))])
    async def route() -> dict[str, bool]:
        return {"ok": True}

    bare = FastAPI()  # limit() alone, no middleware
    bare.get("/route", dependencies=[Depends(limit(5, store=store))])(lambda: {"ok": True})
    try:
        async with client_for(app) as client, client_for(bare) as bare_client:
            assert (await client.get("/")).status_code == 200
            private_redis.kill()
            for _ in range(3):
                r = await client.get("/")
                assert r.status_code == 503
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"] == "Service Unavailable"
            r = await bare_client.get("/route")
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    finally:
        await store.close()


async def test_paused_redis_falls_back_within_the_timeout(private_redis: RedisServer) -> None:
    store = RedisStore(url=private_redis.url)
    admin = redis.Redis(port=private_redis.port)
    try:
        async with client_for(app_for(store, capacity=100)) as client:
            assert (await client.get("/")).status_code == 200
            admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            timings = []
            for _ in range(20):
                t0 = time.perf_counter()
                assert (await client.get("/")).status_code == 200
                timings.append(time.perf_counter() - t0)
            assert max(timings) < TIMEOUT + SLACK
            assert store.degraded
            await until(lambda: not store.degraded, 8, poke=lambda: client.get("/"))
            r = await client.get("/")
            # Back on Redis: its bucket still holds the tokens taken before the pause.
            assert r.status_code == 200 and int(r.headers["x-ratelimit-remaining"]) >= 90
    finally:
        admin.close()
        await store.close()


async def test_a_silent_server_costs_one_timeout_not_one_per_request() -> None:
    # Accepts TCP connections and never answers: each connect would hang without the breaker.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)
        port = silent.getsockname()[1]
        store = RedisStore(url=f"redis://127.0.0.1:{port}/0")
        try:
            async with client_for(app_for(store, capacity=1000)) as client:
                t0 = time.perf_counter()
                codes = [(await client.get("/")).status_code for _ in range(100)]
                elapsed = time.perf_counter() - t0
            assert codes == [200] * 100
            # 100 x 50 ms would be 5 s; with the breaker, a few timeouts at most.
            assert elapsed < 1.0, elapsed
            assert store.degraded_decisions == 100
        finally:
            await store.close()


async def test_a_blocked_client_costs_no_round_trip_and_reset_reaches_every_server(
    private_redis: RedisServer, two_servers: tuple[RedisStore, RedisStore]
) -> None:
    a, b = two_servers
    rule = Rule(1, capacity=2)
    admin = redis.Redis(port=private_redis.port)

    def evalsha_calls() -> int:
        return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    try:
        await a.take("blocked", "global", rule)
        await b.take("blocked", "global", rule)
        await until(lambda: a.deny_cache_live and b.deny_cache_live, 5, poke=lambda: asyncio.sleep(0))
        assert not (await a.take("blocked", "global", rule)).allowed  # Redis says no, and a remembers
        before = evalsha_calls()
        decisions = [await a.take("blocked", "global", rule) for _ in range(50)]
        assert evalsha_calls() == before  # answered from the deny cache
        assert not any(d.allowed for d in decisions)
        assert all(55 < d.retry_after <= 60 for d in decisions)
        assert a.deny_cache_hits == 50

        assert await b.reset("blocked") == ["global"]  # the admin reset, on the other server
        await until(lambda: a.deny_cache_size == 0, 2)
        assert (await a.take("blocked", "global", rule)).allowed
    finally:
        admin.close()


async def test_admin_calls_work_at_once_after_a_restart(private_redis: RedisServer) -> None:
    store = RedisStore(url=private_redis.url)
    try:
        rule = Rule(60, capacity=5)
        await store.take("c", "global", rule)
        assert (await store.stats()).healthy  # the pool now holds a connection to this server
        private_redis.kill()
        private_redis.start()  # the pooled connection is stale now
        assert (await store.stats()).healthy
        await store.take("c", "global", rule)  # decided locally or on Redis, whichever is up
        assert await store.count() in (0, 1)
        assert await store.reset("nobody") == []
    finally:
        await store.close()


async def test_a_refusal_by_the_local_fallback_is_a_refusal(redis_url: str) -> None:
    # Redis down, on_error="local": the fallback bucket decides, and its "no" must be a 429.
    from fastapi import Depends, FastAPI

    dead = RedisStore(url="redis://127.0.0.1:1/0")
    try:
        app = FastAPI()
        app.get("/", dependencies=[Depends(limit(2, store=dead))])(lambda: {"ok": True})
        async with client_for(app) as client:
            codes = [(await client.get("/")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        await dead.close()
