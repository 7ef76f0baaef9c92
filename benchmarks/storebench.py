"""Store-only micro-benchmark: decisions a second, no HTTP, at a given concurrency.

    python -m benchmarks.storebench --redis-url redis://127.0.0.1:6379/0 --seconds 1 --reps 3

Prints one JSON object: ``{"memory": {"1": decisions_per_s, "64": ...}, "redis": {...}}``, each the
median of ``--reps`` timed runs, and with a Redis URL ``"ping_rtt_us"``: one PING round trip on a
plain blocking socket, the least any Redis client pays per sequential call on this machine. Concurrency N means N tasks, each awaiting ``store.take()`` in a
loop on the same bucket (one hot key, as in the HTTP runs), on uvloop like the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from typing import Any
from urllib.parse import urlparse

from rateguard import MemoryStore, RedisStore, Rule

RULE = Rule(10**9, 10**9)
CLIENT = "127.0.0.1"


async def _rate(store: Any, concurrency: int, seconds: float) -> float:
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def worker(i: int) -> None:
        take = store.take
        n = 0
        while time.perf_counter() < deadline:
            await take(CLIENT, "global", RULE)
            n += 1
        counts[i] = n

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - start)


async def measure(
    stores: dict[str, Any], concurrencies: list[int], seconds: float, reps: int
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, store in stores.items():
        try:
            for _ in range(200):  # connect, load the script, fill caches
                await store.take(CLIENT, "global", RULE)
            out[name] = {}
            for c in concurrencies:
                runs = [await _rate(store, c, seconds) for _ in range(reps)]
                out[name][str(c)] = statistics.median(runs)
        finally:
            await store.close()
    return out


def ping_rtt_us(url: str, seconds: float) -> float:
    """Median microseconds of one PING round trip, no client library: the physical floor of a
    sequential Redis call from this CPU (on a VM, mostly the wake-ups of the two CPUs)."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=2) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ping = b"*1\r\n$4\r\nPING\r\n"
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 100:
            start = time.perf_counter()
            sock.sendall(ping)
            if not sock.recv(64).startswith(b"+PONG"):
                raise RuntimeError(f"no PONG from {parsed.hostname}:{parsed.port}")
            times.append(time.perf_counter() - start)
    return statistics.median(times[len(times) // 10 :]) * 1e6  # the first tenth warms up


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="measure RedisStore on this server too")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed run")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per figure; the median is kept")
    parser.add_argument("--concurrency", default="1,64", help="comma-separated task counts")
    args = parser.parse_args(argv)
    stores: dict[str, Any] = {"memory": MemoryStore()}
    if args.redis_url:
        stores["redis"] = RedisStore(url=args.redis_url)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        runner = asyncio.run
    result: dict[str, Any] = runner(measure(stores, concurrencies, args.seconds, args.reps))
    if args.redis_url:
        result["ping_rtt_us"] = ping_rtt_us(args.redis_url, args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
