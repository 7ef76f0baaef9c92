"""RedisStore on a real local Redis Cluster (3 primaries) and a real Sentinel set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from rateguard import RedisStore, Rule, encode_identifier

from .helpers import client_for
from .redis_topologies import LocalRedisCluster, LocalRedisSentinel
from .test_bucket import BASE, CASES, check
from .test_middleware import plain_app

pytestmark = pytest.mark.redis

# The contract tests judge the store, not this machine's load: a slow reply on a busy CI machine
# must not turn into a local fallback decision (the failover test keeps the default deadlines).
PATIENT: dict[str, Any] = {"timeout": 2.0, "connect_timeout": 2.0}


@pytest.fixture(params=["cluster-url", "cluster-client", "sentinel", "sentinel-client"])
async def scaled_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A RedisStore on each topology, built each way the README shows."""
    kind = request.param
    client: Any = None  # a client the test makes is the test's to close (the store never closes it)
    if kind.startswith("cluster"):
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        if kind == "cluster-url":
            store = RedisStore(url=cluster.url, cluster=True, **PATIENT)
        else:
            client = RedisCluster(host="127.0.0.1", port=cluster.ports[1])
            store = RedisStore(client=client, **PATIENT)
    else:
        sentinel_set: LocalRedisSentinel = request.getfixturevalue("redis_sentinel")
        sentinel_set.flushall()
        if kind == "sentinel":
            store = RedisStore(sentinels=sentinel_set.sentinels, service_name="mymaster", **PATIENT)
        else:
            sentinel = Sentinel(sentinel_set.sentinels)  # type: ignore[no-untyped-call]
            client = sentinel.master_for("mymaster")
            store = RedisStore(client=client, **PATIENT)
    try:
        yield store
    finally:
        await store.close()
        if client is not None:
            await client.aclose()
        if kind == "sentinel-client":
            for s in sentinel.sentinels:
                await s.aclose()


@pytest.mark.parametrize("case", ["burst then deny", "cost above one; a denied request takes nothing"])
async def test_bucket_cases(scaled_store: RedisStore, case: str) -> None:
    rule, steps = CASES[case]
    for step in steps:
        decision = await scaled_store.take("client", "bucket", rule, step.cost, now=BASE + step.at)
        check(decision, step, rule)


async def test_exact_admission_under_concurrency(scaled_store: RedisStore) -> None:
    app = plain_app(scaled_store, requests_per_minute=1, capacity=17)
    async with client_for(app) as client:
        responses = await asyncio.gather(*(client.get("/") for _ in range(100)))
    assert [r.status_code for r in responses].count(200) == 17
    assert not scaled_store.degraded


async def test_inspect_reset_count_and_stats(scaled_store: RedisStore) -> None:
    rule = Rule(60, capacity=10)
    clients = [encode_identifier(f"10.0.{i}.1") for i in range(30)]
    for c in clients:
        await scaled_store.take(c, "global", rule, 2)
        await scaled_store.take(c, "POST /api/expensive", Rule(5), 1)
    assert await scaled_store.count() == 60
    states = {s.bucket: s for s in await scaled_store.inspect(clients[0])}
    assert set(states) == {"global", "POST /api/expensive"}
    assert 8 <= states["global"].tokens < 8.5
    assert sorted(await scaled_store.reset(clients[0])) == ["POST /api/expensive", "global"]
    assert await scaled_store.count() == 58
    assert (await scaled_store.take(clients[0], "global", rule)).remaining == 9
    stats = await scaled_store.stats()
    assert stats.healthy and stats.allowed_total == 61 and stats.buckets == 59


async def test_script_flush_everywhere_recovers(
    scaled_store: RedisStore, request: pytest.FixtureRequest
) -> None:
    rule = Rule(60, capacity=5)
    clients = [f"c{i}" for i in range(20)]
    for c in clients:
        await scaled_store.take(c, "g", rule)
    client = scaled_store.client
    if isinstance(client, RedisCluster):
        for node in client.get_primaries():
            await node.execute_command("SCRIPT", "FLUSH")
    else:
        await client.script_flush()
    decisions = await asyncio.gather(*(scaled_store.take(c, "g", rule) for c in clients))
    assert [d.remaining for d in decisions] == [3] * 20
    assert not scaled_store.degraded


async def test_cluster_spreads_clients_over_every_primary(redis_cluster: LocalRedisCluster) -> None:
    redis_cluster.flushall()
    store = RedisStore(url=redis_cluster.url, cluster=True)
    try:
        rule = Rule(60)
        for i in range(300):
            client = encode_identifier(f"203.0.{i // 250}.{i % 250}")
            await store.take(client, "global", rule)
            await store.take(client, "GET,POST /api/expensive", Rule(5))
    finally:
        await store.close()
    sizes = []
    for port in redis_cluster.ports:
        with redis.Redis(port=port) as node:
            keys = [k.decode() for k in node.keys("rateguard:{*")]
            sizes.append(len(keys))
            # A client's buckets sit together on one node.
            by_client: dict[str, int] = {}
            for k in keys:
                tag = k[k.index("{") : k.index("}") + 1]
                by_client[tag] = by_client.get(tag, 0) + 1
            assert set(by_client.values()) == {2}
    assert sum(sizes) == 600
    assert min(sizes) >= 600 * 0.2, sizes  # each of 3 primaries holds a fair share


async def test_cluster_reset_touches_only_that_clients_slot(redis_cluster: LocalRedisCluster) -> None:
    redis_cluster.flushall()
    store = RedisStore(url=redis_cluster.url, cluster=True)
    try:
        rule = Rule(60)
        for name in ("alice", "bob", "*", "{alice}"):
            await store.take(encode_identifier(name), "global", rule)
        assert await store.reset(encode_identifier("*")) == ["global"]
        assert await store.reset(encode_identifier("alice")) == ["global"]
        assert await store.count() == 2
        assert [b.bucket for b in await store.inspect(encode_identifier("bob"))] == ["global"]
    finally:
        await store.close()


async def test_sentinel_failover_under_load(redis_sentinel_failover: LocalRedisSentinel) -> None:
    sentinels = redis_sentinel_failover.sentinels
    stores = [RedisStore(sentinels=sentinels, service_name="mymaster") for _ in range(2)]
    apps = [plain_app(s, requests_per_minute=1, capacity=4) for s in stores]
    results: list[tuple[int, float]] = []
    stop = asyncio.Event()
    try:
        async with client_for(apps[0]) as c0, client_for(apps[1]) as c1:

            async def load(client: Any) -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = await client.get("/", headers={"x": "1"})
                    results.append((r.status_code, time.perf_counter() - t0))
                    await asyncio.sleep(0.01)

            tasks = [asyncio.create_task(load(c)) for c in (c0, c1)]
            await asyncio.sleep(0.2)
            redis_sentinel_failover.kill_primary()
            await asyncio.to_thread(redis_sentinel_failover.wait_for_failover, 15)
            deadline = time.monotonic() + 10
            while any(s.degraded for s in stores) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the load above pokes the stores' breakers meanwhile
            stop.set()
            await asyncio.gather(*tasks)
            assert not any(s.degraded for s in stores)

        assert {s for s, _ in results} <= {200, 429}
        assert max(d for _, d in results) < 0.5
        # Shared again on the new primary: 4 tokens between both servers.
        async with client_for(apps[0], "192.0.2.77") as c0, client_for(apps[1], "192.0.2.77") as c1:
            codes = [(await c.get("/")).status_code for c in (c0, c1, c0, c1, c0, c1)]
        assert codes == [200, 200, 200, 200, 429, 429]
    finally:
        for s in stores:
            await s.close()
