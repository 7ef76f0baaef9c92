"""RedisStore against a real redis-server: the script, keys, TTLs, clock, recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from rateguard import Decision, RedisStore, Rule, encode_identifier
from rateguard.stores.redis.wire import Connection

from .helpers import client_for
from .test_middleware import plain_app

pytestmark = pytest.mark.redis


async def test_every_key_has_a_ttl(redis_store: RedisStore) -> None:
    rule = Rule(60, capacity=10)
    for i in range(20):
        await redis_store.take(encode_identifier(f"client-{i}"), "global", rule, 3)
    await redis_store.stats()  # also writes the shared totals
    keys = await redis_store.client.keys("*")
    assert len(keys) == 21  # 20 buckets and the totals
    for key in keys:
        ttl = await redis_store.client.pttl(key)
        if key == b"rateguard:stats":
            assert 0 < ttl <= 86_400_000
        else:
            # 7 tokens left of 10 at 1/s: full again in 3 s
            assert 2_000 < ttl <= 3_000


async def test_denied_request_keeps_the_expiry(redis_store: RedisStore) -> None:
    rule = Rule(1, capacity=1)
    assert (await redis_store.take("c", "b", rule)).allowed
    assert not (await redis_store.take("c", "b", rule)).allowed
    ttl = await redis_store.client.pttl(redis_store.key("c", "b"))
    assert 59_000 < ttl <= 60_000


async def test_script_flush_mid_run_recovers(redis_store: RedisStore) -> None:
    rule = Rule(60, capacity=5)
    assert (await redis_store.take("c", "b", rule)).remaining == 4
    await redis_store.client.script_flush()
    assert (await redis_store.take("c", "b", rule)).remaining == 3  # reloaded, state kept
    await redis_store.client.script_flush()
    results = await asyncio.gather(*(redis_store.take("c", "b", rule) for _ in range(5)))
    assert sum(d.allowed for d in results) == 3


async def test_replies_answer_in_order_and_recover_from_noscript(redis_url: str) -> None:
    # Replies are parsed by hiredis in the connection's own protocol: each must pair with its
    # command, error replies (NOSCRIPT in the middle of a batch) included.
    from .conftest import contract_store

    store = contract_store(redis_url)
    try:
        rules = [Rule(60, capacity=c) for c in (3, 5, 7)]
        results = await asyncio.gather(*(store.take(f"c{i % 3}", "b", rules[i % 3]) for i in range(30)))
        assert [sum(d.allowed for d in results[i::3]) for i in range(3)] == [3, 5, 7]
        assert sorted(d.remaining for d in results[0::3] if d.allowed) == [0, 1, 2]
        await store.client.script_flush()  # NOSCRIPT error replies in the middle of a batch
        again = await asyncio.gather(*(store.take(f"d{i}", "b", rules[2]) for i in range(20)))
        assert all(d.allowed and d.remaining == 6 for d in again)
    finally:
        await store.close()


async def _until(condition: Callable[[], object], seconds: float = 5.0) -> None:
    """Wait for a real connection to get somewhere, bounded."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _next_from_redis(store: RedisStore, rule: Rule, seconds: float = 5.0) -> Decision:
    """Take until Redis decides again: after a dropped connection the store decides locally
    (degraded) until its probe, started by traffic after the back-off, reconnects."""
    deadline = time.monotonic() + seconds
    while (decision := await store.take("c", "b", rule)).degraded:
        assert time.monotonic() < deadline, "Redis never decided again"
        await asyncio.sleep(0.02)
    return decision


RULE_1_PER_MIN = Rule(1, capacity=5)  # no refill to speak of while a test runs


def _connection(store: RedisStore) -> Connection:
    """The store's decision connection (white box: rateguard's own wire)."""
    bound = store._bound
    assert bound is not None and bound.channel is not None and bound.channel.conn is not None
    return bound.channel.conn


@pytest.fixture
async def taken_once(redis_url: str) -> AsyncIterator[tuple[RedisStore, Connection]]:
    """A store (on_error="local": it recovers by itself) that has decided once through Redis,
    and its decision connection."""
    store = RedisStore(url=redis_url, timeout=2.0, connect_timeout=2.0)
    try:
        assert (await store.take("c", "b", RULE_1_PER_MIN)).remaining == 4
        yield store, _connection(store)
    finally:
        await store.close()


async def test_out_of_step_bytes_drop_the_connection_and_a_new_one_takes_over(
    taken_once: tuple[RedisStore, Connection],
) -> None:
    # Bytes no command waits for mean the stream is out of step: the connection is dropped and a
    # new one made; the bucket, kept in Redis, is unharmed.
    store, first = taken_once
    first.data_received(b"+OK\r\n")  # a reply nobody asked for
    assert first.closed
    decision = await _next_from_redis(store, RULE_1_PER_MIN)
    assert decision.remaining == 3  # the local fallback's decisions did not touch Redis
    assert _connection(store) is not first


async def test_a_connection_closed_by_the_server_is_noticed_without_a_reader_task(
    taken_once: tuple[RedisStore, Connection],
) -> None:
    store, first = taken_once
    killed = await store.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert killed >= 1
    await _until(lambda: first.closed)  # the close reached the connection by itself
    decision = await _next_from_redis(store, RULE_1_PER_MIN)
    assert decision.remaining == 3


async def test_decisions_use_redis_time_not_the_app_clock(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = Rule(60, capacity=2)
    assert (await redis_store.take("c", "b", rule)).remaining == 1
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    monotonic = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: monotonic() + 3600)
    # An app server an hour ahead: if its clock were used, the bucket would be full again.
    d = await redis_store.take("c", "b", rule)
    assert d.allowed and d.remaining == 0
    assert not (await redis_store.take("c", "b", rule)).allowed


async def test_app_clock_shift_over_http(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore(url=redis_url)
    app = plain_app(store, requests_per_minute=1, capacity=2)
    try:
        async with client_for(app) as client:
            assert (await client.get("/")).status_code == 200
            real_time = time.time
            monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
            assert (await client.get("/")).status_code == 200
            assert (await client.get("/")).status_code == 429
    finally:
        await store.close()


@pytest.mark.parametrize(
    "identifier",
    ["2001:db8::1", "*", "{", "}", "a b", "x" * 10_000, "\x00nul", "é\u2603", "", "a:*:{b}", "\r\n"],
)
async def test_any_identifier_makes_a_safe_bounded_key(redis_store: RedisStore, identifier: str) -> None:
    client = encode_identifier(identifier)
    rule = Rule(60, capacity=2)
    assert (await redis_store.take(client, "global", rule)).remaining == 1
    keys = await redis_store.client.keys("rateguard:{*")
    assert len(keys) == 1
    key = keys[0].decode()
    assert len(key) <= 160
    assert key.startswith("rateguard:{") and key.count("{") == 1 and key.count("}") == 1
    # The client's own buckets only: a glob-like identifier must not touch others.
    await redis_store.take(encode_identifier("bystander"), "global", rule)
    assert [b.bucket for b in await redis_store.inspect(client)] == ["global"]
    assert await redis_store.reset(client) == ["global"]
    assert len(await redis_store.client.keys("rateguard:{*")) == 1


async def test_inspect_and_reset(redis_store: RedisStore) -> None:
    rule = Rule(60, capacity=10)
    await redis_store.take("c", "global", rule, 4)
    await redis_store.take("c", "POST /api/expensive", Rule(5), 1)
    await redis_store.take("other", "global", rule, 1)
    states = {s.bucket: s for s in await redis_store.inspect("c")}
    assert set(states) == {"global", "POST /api/expensive"}
    assert states["global"].capacity == 10
    assert 6 <= states["global"].tokens < 6.5
    assert states["POST /api/expensive"].requests_per_minute == pytest.approx(5)
    assert await redis_store.count() == 3
    assert sorted(await redis_store.reset("c")) == ["POST /api/expensive", "global"]
    assert await redis_store.inspect("c") == []
    assert (await redis_store.take("c", "global", rule)).remaining == 9
    assert await redis_store.count() == 2


async def test_a_bucket_is_32_bytes_of_packed_doubles(redis_store: RedisStore) -> None:
    import struct

    await redis_store.take("c", "global", Rule(60, capacity=10), 4)
    key = redis_store.key("c", "global")
    value = await redis_store.client.get(key)
    tokens, last, capacity, rate = struct.unpack("<dddd", value)
    assert (tokens, capacity, rate) == (6.0, 10.0, 1.0)
    [sec, usec] = await redis_store.client.time()
    assert 0 <= sec + usec / 1e6 - last < 5  # Redis's clock, not the app's


async def test_waits_come_back_exact_in_nanoseconds_and_as_text_past_104_days(
    redis_store: RedisStore,
) -> None:
    # The script sends a wait as whole nanoseconds, or as text where those stop being exact.
    minute = Rule(1, capacity=1)  # a token a minute
    assert (await redis_store.take("c", "minute", minute)).allowed
    refused = await redis_store.take("c", "minute", minute)
    assert 59 < refused.retry_after <= 60 and 59 < refused.reset_after <= 60
    year = Rule.per(1, 365 * 86_400)
    assert (await redis_store.take("c", "year", year)).allowed
    refused = await redis_store.take("c", "year", year)
    assert 365 * 86_400 - 5 < refused.retry_after <= 365 * 86_400
    assert refused.reset_after == pytest.approx(refused.retry_after)


async def test_a_bucket_in_the_earlier_hash_form_is_read_then_replaced(redis_url: str) -> None:
    # rateguard kept a bucket as a hash (t, ts, c, r) before the packed string; servers of both
    # versions on one Redis during an upgrade, or buckets left from before it, must not fail.
    store = RedisStore(url=redis_url, deny_cache=False)
    try:
        key = store.key("old", "global")
        sec, usec = await store.client.time()
        now = int(sec) + int(usec) / 1e6
        await store.client.hset(key, mapping={"t": "3", "ts": repr(now), "c": "10", "r": "1"})
        await store.client.pexpire(key, 60_000)
        [state] = await store.inspect("old")
        assert (state.bucket, state.capacity) == ("global", 10) and 3 <= state.tokens < 4
        refused = await store.take("old", "global", Rule(60, capacity=10), 5)
        assert not refused.allowed and await store.client.type(key) == b"hash"  # a refusal writes nothing
        decision = await store.take("old", "global", Rule(60, capacity=10), 1)
        assert decision.allowed and decision.remaining in (2, 3)
        assert await store.client.type(key) == b"string"
    finally:
        await store.close()


async def test_inspect_reads_the_packed_buckets_through_a_client_that_decodes(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(client=client)
    try:
        await store.take("c", "global", Rule(60, capacity=10), 4)
        [state] = await store.inspect("c")
        assert state.capacity == 10 and 6 <= state.tokens < 6.5
    finally:
        await store.close()
        await client.aclose()


async def test_prefix_and_hash_tag(redis_url: str) -> None:
    store = RedisStore(url=redis_url, prefix="myapp:rl:")
    try:
        await store.take("10.0.0.1", "global", Rule())
        assert await store.client.keys("myapp:rl:{*") == [b"myapp:rl:{10.0.0.1}:global"]
    finally:
        await store.close()


async def test_host_port_form(redis_server) -> None:  # type: ignore[no-untyped-def]
    store = RedisStore(host="127.0.0.1", port=redis_server.port)
    try:
        assert (await store.take("c", "b", Rule(60))).allowed
    finally:
        await store.close()


async def test_evalsha_packed_by_hand_is_what_hiredis_packs(redis_store: RedisStore) -> None:
    from hiredis import pack_command

    from rateguard.stores.redis.batcher import Batcher
    from rateguard.stores.redis.wire import Settings

    batcher = Batcher(
        sha="a" * 40,
        script=b"",
        settings=Settings(),
        timeout=1.0,
        route=lambda keys: None,  # type: ignore[arg-type,return-value]
        on_failure=lambda exc: None,
        on_success=lambda: None,
    )
    many = ("p:{c}:a", "p:{c}:b:1d")
    for keys in [
        ("rateguard:{127.0.0.1}:global",),
        ("p:{%C3%BC}:x",),
        ("k:{" + "#" + "f" * 64 + "}:b",),
        many,
    ]:
        for args in [
            (1, "", "", 1.0, 1),
            (3, "", "x", 1e9 / 60, 10**9),
            (5, 1.5e9, "", 0.008333333333333333, 5),
        ]:
            want = pack_command(("EVALSHA", "a" * 40, len(keys), *keys, *args))
            assert batcher.pack(keys, args) == want
            assert batcher.pack(keys, args) == want  # and again, from what it kept


def test_round_trips_are_timed_finer_than_uvloops_millisecond_clock(redis_url: str) -> None:
    # uvloop's loop.time() moves in whole milliseconds: timed with it, 300 sub-millisecond round
    # trips summed to a whole number of milliseconds (often 0). perf_counter does not.
    import uvloop

    async def main() -> tuple[int, float]:
        store = RedisStore(url=redis_url, timeout=2.0, connect_timeout=2.0)
        try:
            for _ in range(300):
                await store.take("c", "b", Rule(10**6, capacity=10**6))
            return store.latency.count, store.latency.sum
        finally:
            await store.close()

    count, total = uvloop.run(main())
    assert count >= 300  # (and the first decision's NOSCRIPT, resent once the script is loaded)
    assert total > 0
    assert abs(total * 1000 - round(total * 1000)) > 1e-6  # not a sum of whole milliseconds
