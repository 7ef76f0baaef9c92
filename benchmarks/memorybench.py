"""Bytes per bucket, no HTTP: `python -m benchmarks.memorybench --what memory --buckets 100000,1000000`.

Each call measures one store in a fresh process and prints one JSON object. The buckets are those
of clients ``k0``, ``k1``, ... as the growth runs' apps make them (``identifier=`` keys, bucket
``global``, a bucket of 10**9 refilled at one token an hour so none is ever full again and
forgotten), made with rateguard's public `Limiter`.

    --what memory        MemoryStore: RSS growth and tracemalloc's count per bucket, at each size
    --what floor         the least Python bucket (a dict of [tokens, last] lists), the same way
    --what bounded       MemoryStore(max_keys=100000) given 1,000,000 clients in turn: what it holds
                         and what it costs as it evicts, against the same store hit by clients it holds
    --what redis         RedisStore: used_memory growth / keys, MEMORY USAGE of sampled keys, keys per client
    --what redis-least   the least a Redis token bucket can hold: one short key with a hash tag, both
                         numbers in one string, an expiry (written with SET ... PX, no script)
    --what redis-least-named   the same under rateguard's key (``rateguard:{k…}:global``), the two
                         numbers packed in 16 bytes: the least any bucket with that key can cost

RSS is read from /proc/self/statm after ``gc.collect()``; tracemalloc runs in its own pass (it
costs memory of its own). Both count the client's text and the key tuple, which a store must hold.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

CAPACITY = 10**9
RPM = 1 / 60  # one token an hour: a touched bucket stays below full for the whole run


def rss() -> int:
    """Resident bytes of this process now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _rule() -> Any:
    from rateguard import Rule

    return Rule(RPM, CAPACITY)


def _sizes(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x})


async def _fill_memory(store: Any, start: int, stop: int) -> None:
    from rateguard import Limiter

    hit = Limiter(_rule(), store=store, name="global").hit
    for i in range(start, stop):
        await hit(f"k{i}")


def memory(sizes: list[int], traced: bool) -> dict[str, Any]:
    from rateguard import MemoryStore

    store = MemoryStore(max_keys=max(sizes) * 2)
    if traced:
        tracemalloc.start()
    gc.collect()
    base = tracemalloc.get_traced_memory()[0] if traced else rss()
    out: dict[str, Any] = {}
    done = previous = 0
    for size in sizes:
        t0 = time.perf_counter()
        asyncio.run(_fill_memory(store, done, size))
        seconds = time.perf_counter() - t0
        done = size
        gc.collect()
        now = tracemalloc.get_traced_memory()[0] if traced else rss()
        assert store.size == size, (store.size, size)
        out[str(size)] = {"bytes_per_bucket": (now - base) / size, "buckets": store.size}
        if not traced:
            out[str(size)]["fill_per_s"] = (size - previous) / seconds
        previous = size
    return out


def floor(sizes: list[int], traced: bool) -> dict[str, Any]:
    """FloorBucket's dict, as its prefill makes it (benchmarks.apps): the key text, [tokens, last]."""
    buckets: dict[str, list[float]] = {}
    if traced:
        tracemalloc.start()
    gc.collect()
    base = tracemalloc.get_traced_memory()[0] if traced else rss()
    out: dict[str, Any] = {}
    done = 0
    for size in sizes:
        now = time.monotonic()
        for i in range(done, size):
            buckets[f"k{i}"] = [CAPACITY - 1.0, now + i * 1e-9]  # distinct floats, as real times are
        done = size
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] if traced else rss()
        out[str(size)] = {"bytes_per_bucket": (used - base) / size, "buckets": len(buckets)}
    return out


def bounded(clients: int, max_keys: int) -> dict[str, Any]:
    """A bounded store under churn: every decision is for a client it no longer holds."""
    from rateguard import MemoryStore

    store = MemoryStore(max_keys=max_keys)
    gc.collect()
    base = rss()
    asyncio.run(_fill_memory(store, 0, max_keys))
    gc.collect()
    at_bound = rss()
    t0 = time.perf_counter()
    asyncio.run(_fill_memory(store, max_keys, clients))  # each new client evicts one
    churn_s = time.perf_counter() - t0
    gc.collect()
    after = rss()
    held = store.size
    # The same number of decisions for clients it holds (the last max_keys made): no eviction.
    t0 = time.perf_counter()

    async def hits() -> None:
        from rateguard import Limiter

        hit = Limiter(_rule(), store=store, name="global").hit
        first = clients - max_keys
        for n in range(clients - max_keys):
            await hit(f"k{first + n % max_keys}")

    asyncio.run(hits())
    hits_s = time.perf_counter() - t0
    return {
        "max_keys": max_keys,
        "clients": clients,
        "held": held,
        "rss_at_bound": at_bound - base,
        "rss_after": after - base,
        "churn_per_s": (clients - max_keys) / churn_s,
        "hits_per_s": (clients - max_keys) / hits_s,
    }


def _used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def _fields(value: bytes | None) -> dict[str, float]:
    """A RedisStore bucket's value, unpacked (the script's struct '<dddd')."""
    if value is None or len(value) != 32:
        return {}
    return dict(zip(("tokens", "last", "capacity", "rate"), struct.unpack("<dddd", value), strict=True))


def redis_store(url: str, sizes: list[int], concurrency: int = 128) -> dict[str, Any]:
    import redis as redis_py

    from rateguard import Limiter, RedisStore

    admin = redis_py.Redis.from_url(url)
    admin.flushdb()
    keys_before = admin.dbsize()
    base = _used_memory(admin)
    out: dict[str, Any] = {}

    async def fill(start: int, stop: int) -> None:
        store = RedisStore(url=url, timeout=5.0)  # a long deadline: a filling burst must not fall back
        hit = Limiter(_rule(), store=store, name="global").hit
        todo = iter(range(start, stop))

        async def worker() -> None:
            for i in todo:
                await hit(f"k{i}")

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            await store.close()
        if store.errors:
            raise SystemExit(f"RedisStore fell back {store.errors} time(s) while filling: {store.last_error}")

    done = 0
    for size in sizes:
        t0 = time.perf_counter()
        asyncio.run(fill(done, size))
        seconds = time.perf_counter() - t0
        keys = admin.dbsize() - keys_before - admin.exists("rateguard:stats")  # the store's one shared key
        bucket_keys = [
            k for k in (admin.randomkey() for _ in range(2000)) if k and k.startswith(b"rateguard:{")
        ]
        usage = [admin.memory_usage(k, samples=0) or 0 for k in bucket_keys[:1000]]
        out[str(size)] = {
            "bytes_per_key": (_used_memory(admin) - base) / max(1, keys),
            "memory_usage_median": statistics.median(usage) if usage else None,
            "keys": keys,
            "keys_per_client": keys / size,
            "fill_per_s": (size - done) / seconds,
            "example_key": bucket_keys[0].decode() if bucket_keys else None,
            "example_fields": _fields(admin.get(bucket_keys[0])) if bucket_keys else {},
        }
        done = size
    admin.flushdb()
    admin.close()
    return out


def redis_least(url: str, sizes: list[int], named: bool = False) -> dict[str, Any]:
    import redis as redis_py

    admin = redis_py.Redis.from_url(url)
    admin.flushdb()
    base = _used_memory(admin)
    out: dict[str, Any] = {}
    done = 0
    now = time.time()
    for size in sizes:
        for first in range(done, size, 10_000):
            pipe = admin.pipeline(transaction=False)
            for i in range(first, min(first + 10_000, size)):
                if named:  # rateguard's key; tokens and last refill, no capacity or rate
                    pipe.set(f"rateguard:{{k{i}}}:global", struct.pack("<dd", 999999999.0, now), px=3_600_000)
                else:
                    pipe.set(f"b{{k{i}}}", f"999999999 {now + i * 1e-6:.6f}", px=3_600_000)
            pipe.execute()
        done = size
        keys = admin.dbsize()
        sample = [k for k in (admin.randomkey() for _ in range(1000)) if k]
        usage = [admin.memory_usage(k, samples=0) or 0 for k in sample]
        out[str(size)] = {
            "bytes_per_key": (_used_memory(admin) - base) / max(1, keys),
            "memory_usage_median": statistics.median(usage) if usage else None,
            "keys": keys,
            "example_key": sample[0].decode() if sample else None,
        }
    admin.flushdb()
    admin.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--what",
        required=True,
        choices=("memory", "floor", "bounded", "redis", "redis-least", "redis-least-named"),
    )
    parser.add_argument(
        "--buckets",
        default="100000,1000000",
        help="comma-separated sizes (clients, for bounded: the largest)",
    )
    parser.add_argument("--max-keys", type=int, default=100_000, help="for --what bounded")
    parser.add_argument("--traced", action="store_true", help="count with tracemalloc instead of RSS")
    parser.add_argument("--redis-url", help="for --what redis / redis-least: an empty database it may flush")
    args = parser.parse_args(argv)
    sizes = _sizes(args.buckets)
    if args.what == "memory":
        result = memory(sizes, args.traced)
    elif args.what == "floor":
        result = floor(sizes, args.traced)
    elif args.what == "bounded":
        result = bounded(max(sizes), args.max_keys)
    else:
        if not args.redis_url:
            parser.error(f"--what {args.what} needs --redis-url")
        if args.what == "redis":
            result = redis_store(args.redis_url, sizes)
        else:
            result = redis_least(args.redis_url, sizes, named=args.what == "redis-least-named")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
