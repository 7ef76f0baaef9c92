"""The reset channel on every topology: an admin reset or a give-back on one server reaches the
deny cache of another, on rateguard's own subscription (url, sentinels, cluster, a RedisCluster of
yours) or through a redis-py client of yours (its pub/sub)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from rateguard import RedisStore, Rule, encode_identifier
from rateguard.stores.redis.deny import ResetListener
from rateguard.stores.redis.subscriber import Subscriber

from .conftest import RedisServer
from .redis_topologies import LocalRedisCluster, LocalRedisSentinel

pytestmark = pytest.mark.redis

RULE = Rule(1, capacity=2)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Let the loop run until the subscription delivers, bounded."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


@pytest.fixture(params=["url", "client", "cluster-url", "cluster-client", "sentinel", "sentinel-client"])
async def two_servers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisStore, RedisStore, type]]:
    """Two stores on one deployment, as two app servers would have; and the subscriber they use."""
    kind = request.param
    clients: list[Any] = []  # made by the test, closed by the test (a store never closes them)
    sentinels: list[Any] = []

    def make() -> RedisStore:
        if kind == "url":
            return RedisStore(url=request.getfixturevalue("redis_server").url)
        if kind == "client":
            server: RedisServer = request.getfixturevalue("redis_server")
            clients.append(aioredis.Redis(port=server.port))
            return RedisStore(client=clients[-1])
        if kind.startswith("cluster"):
            cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
            if kind == "cluster-url":
                return RedisStore(url=cluster.url, cluster=True)
            clients.append(RedisCluster(host="127.0.0.1", port=cluster.ports[1]))
            return RedisStore(client=clients[-1])
        sentinel_set: LocalRedisSentinel = request.getfixturevalue("redis_sentinel")
        if kind == "sentinel":
            return RedisStore(sentinels=sentinel_set.sentinels, service_name="mymaster")
        sentinel = Sentinel(sentinel_set.sentinels)  # type: ignore[no-untyped-call]
        sentinels.extend(sentinel.sentinels)
        clients.append(sentinel.master_for("mymaster"))
        return RedisStore(client=clients[-1])

    if kind.startswith("cluster"):
        request.getfixturevalue("redis_cluster").flushall()
    elif kind.startswith("sentinel"):
        request.getfixturevalue("redis_sentinel").flushall()
    else:
        request.getfixturevalue("redis_url")  # flushed
    a, b = make(), make()
    try:
        # Through a plain or Sentinel client of yours, the subscription is that client's pub/sub.
        yield a, b, ResetListener if kind in ("client", "sentinel-client") else Subscriber
    finally:
        await a.close()
        await b.close()
        for client in [*clients, *sentinels]:
            await client.aclose()


async def refused_and_remembered(store: RedisStore, client: str) -> None:
    while (await store.take(client, "g", RULE)).allowed:
        pass
    hits = store.deny_cache_hits
    assert not (await store.take(client, "g", RULE)).allowed
    assert store.deny_cache_hits == hits + 1  # answered by the deny cache


async def test_a_reset_and_a_give_back_reach_the_other_servers_deny_cache(
    two_servers: tuple[RedisStore, RedisStore, type],
) -> None:
    a, b, subscriber = two_servers
    await a.take("warm-up", "g", RULE)
    await b.take("warm-up", "g", RULE)
    await until(lambda: a.deny_cache_live and b.deny_cache_live)
    assert a._bound is not None and type(a._bound.listener) is subscriber
    alice, bob = encode_identifier("alice"), encode_identifier("bob")

    await refused_and_remembered(a, alice)
    assert await b.reset(alice) == ["g"]  # the admin reset, published on the other server
    await until(lambda: a.deny_cache_size == 0)
    assert (await a.take(alice, "g", RULE)).allowed

    await refused_and_remembered(a, bob)
    await b.give_back(bob, (("g", RULE),))  # published by the script itself
    await until(lambda: a.deny_cache_size == 0)
    assert (await a.take(bob, "g", RULE)).allowed
