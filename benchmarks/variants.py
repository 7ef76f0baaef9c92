"""What each benchmark variant is. Importing this module imports no web framework and no peer."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Variant:
    """One app configuration the harness serves and loads with wrk."""

    name: str  # BENCH_VARIANT
    label: str  # for tables and the chart
    what: str  # one line for the README and the results file
    needs: tuple[str, ...] = ()  # importable modules, beyond fastapi and uvicorn
    redis: bool = False  # needs the harness's redis-server
    blocked: bool = False  # every measured request is answered 429
    default: bool = True  # part of a plain `make bench`
    commit: str | None = None  # rateguard/ as it was at this commit (extracted by the harness)
    prefill: bool = False  # its app makes the buckets of BENCH_PREFILL clients at start-up (the growth runs)

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]


VARIANTS: tuple[Variant, ...] = (
    Variant("none", "no limiter", "the trivial endpoint, no middleware: the reference for every ratio"),
    Variant(
        "basehttp-noop",
        "no-op BaseHTTPMiddleware",
        "a BaseHTTPMiddleware whose dispatch only awaits call_next: the cost of that base class alone",
    ),
    Variant(
        "headers-only",
        "no limiter, 5 header fields",
        "a pure ASGI middleware that limits nothing and adds RateGuard's 5 header fields: their floor cost",
    ),
    Variant(
        "floor-memory",
        "least Python token bucket, 5 fields",
        "a dict token bucket written inline plus the same 5 header fields, no options: the least any "
        "Python limiter that sends them costs",
    ),
    Variant("rateguard-memory", "rateguard memory", "RateGuard middleware, MemoryStore"),
    Variant(
        "rateguard-memory-noheaders",
        "rateguard memory, headers=False",
        "RateGuard(headers=False), MemoryStore: the same decisions, no rate-limit fields on a 200",
    ),
    Variant(
        "rateguard-redis",
        "rateguard Redis",
        "RateGuard middleware, RedisStore on the local redis-server",
        redis=True,
    ),
    Variant(
        "floor-redis",
        "least Redis round trip, 5 fields",
        "one EVALSHA of rateguard's script per request on a raw asyncio transport, reply parsed in "
        "data_received, plus the same 5 fields: the least any Redis-backed limiter costs",
        redis=True,
    ),
    Variant(
        "rateguard-redis-before",
        "rateguard Redis, before the rewrite",
        "RateGuard + RedisStore as they were at commit 6d6b562, before the rewrite (redis-py with its "
        "own pipelining): the same app and harness on the previous code",
        redis=True,
        commit="6d6b562",
    ),
    Variant(
        "rateguard-memory-blocked",
        "rateguard memory, all blocked",
        "RateGuard, MemoryStore, capacity 1 and a near-zero rate: every request is a 429",
        blocked=True,
    ),
    Variant(
        "rateguard-redis-blocked",
        "rateguard Redis, all blocked",
        "RateGuard, RedisStore, capacity 1 and a near-zero rate: every request is a 429",
        redis=True,
        blocked=True,
    ),
    Variant(
        "slowapi-memory",
        "slowapi memory",
        "slowapi Limiter(default_limits=...) with SlowAPIASGIMiddleware, memory:// storage (fixed window)",
        needs=("slowapi",),
    ),
    Variant(
        "slowapi-redis",
        "slowapi Redis",
        "slowapi Limiter(default_limits=...) with SlowAPIASGIMiddleware, redis:// storage (fixed window)",
        needs=("slowapi",),
        redis=True,
    ),
    Variant(
        "fastapi-limiter-redis",
        "fastapi-limiter Redis",
        "fastapi-limiter RateLimiter dependency; pyrate-limiter token bucket in a RedisStateStore",
        needs=("fastapi_limiter", "pyrate_limiter"),
        redis=True,
    ),
    Variant(
        "throttled-redis",
        "throttled-py Redis",
        "throttled-py FastAPI Limiter.limit() decorator, token bucket, async RedisStore",
        needs=("throttled",),
        redis=True,
    ),
    # Not in a plain run (each variant costs rounds x (duration + ~3 s)); ask with --variants.
    Variant(
        "throttled-memory",
        "throttled-py memory",
        "throttled-py FastAPI Limiter.limit() decorator, token bucket, MemoryStore",
        needs=("throttled",),
        default=False,
    ),
    Variant(
        "slowapi-redis-basehttp",
        "slowapi Redis (BaseHTTPMiddleware)",
        "slowapi with SlowAPIMiddleware (its BaseHTTPMiddleware flavour), redis:// storage",
        needs=("slowapi",),
        redis=True,
        default=False,
    ),
)

BY_NAME = {v.name: v for v in VARIANTS}


# The growth runs (python -m benchmarks.scale). Keyed variants tell clients apart by the x-api-key
# header that wrk's script sends; every limit is a bucket of 10**9 refilled at one token an hour.
_KEYED = "keyed by x-api-key, a bucket of 10**9 refilled at one token an hour"
SCALE_VARIANTS: tuple[Variant, ...] = (
    Variant(
        "keyed-none",
        "no limiter",
        "the same app, no middleware (the header is sent, not read): the reference for every ratio",
        default=False,
    ),
    Variant(
        "keyed-floor-memory",
        "least Python token bucket, 5 fields",
        f"the dict bucket written inline, {_KEYED} (read from the raw header list), the same 5 fields",
        default=False,
        prefill=True,
    ),
    Variant(
        "keyed-rateguard-memory",
        "rateguard memory",
        f"RateGuard(rate=Rule(...), identifier=lambda r: r.headers.get('x-api-key')), {_KEYED}, "
        "MemoryStore(max_keys=2_000_000): every client's bucket is held",
        default=False,
        prefill=True,
    ),
    Variant(
        "keyed-rateguard-memory-bounded",
        "rateguard memory, max_keys=100,000",
        "the same with MemoryStore's default bound, max_keys=100_000: with more clients it evicts (run "
        "only where the clients outnumber it)",
        default=False,
        prefill=True,
    ),
    Variant(
        "keyed-floor-redis",
        "least Redis round trip, 5 fields",
        f"one EVALSHA of rateguard's script per request on a raw asyncio transport, {_KEYED}, the same 5 fields",
        redis=True,
        default=False,
        prefill=True,
    ),
    Variant(
        "keyed-rateguard-redis",
        "rateguard Redis",
        f"RateGuard(rate=Rule(...), identifier=lambda r: r.headers.get('x-api-key')), {_KEYED}, RedisStore",
        redis=True,
        default=False,
        prefill=True,
    ),
    Variant(
        "keyed-slowapi-redis",
        "slowapi Redis",
        "slowapi Limiter(key_func=<the header>, default_limits=['1000000000/hour']), SlowAPIASGIMiddleware, "
        "redis:// storage (fixed window)",
        needs=("slowapi",),
        redis=True,
        default=False,
    ),
    Variant(
        "keyed-fastapi-limiter-redis",
        "fastapi-limiter Redis",
        "fastapi-limiter RateLimiter(identifier=<the header>); a pyrate-limiter BucketFactory that makes a "
        "StateBucket + RedisStateStore token bucket per key",
        needs=("fastapi_limiter", "pyrate_limiter"),
        redis=True,
        default=False,
    ),
    Variant(
        "keyed-throttled-redis",
        "throttled-py Redis",
        "throttled-py Limiter(per_hour(...), key_func=<the header>).limit(), token bucket, async RedisStore",
        needs=("throttled",),
        redis=True,
        default=False,
    ),
    Variant(
        "rules-memory-1",
        "memory: limit('100000/second')",
        "a route limit() of one rule, MemoryStore",
        default=False,
    ),
    Variant(
        "rules-memory-2",
        "memory: limit('100000/second', '100000000/day')",
        "a route limit() of two rules, decided together in one step, MemoryStore",
        default=False,
    ),
    Variant(
        "rules-memory-global-route",
        "memory: RateGuard + route limit()",
        "RateGuard(rate='100000/second') and a route limit('100000000/day'), MemoryStore",
        default=False,
    ),
    Variant(
        "rules-redis-1",
        "Redis: limit('100000/second')",
        "a route limit() of one rule, RedisStore",
        redis=True,
        default=False,
    ),
    Variant(
        "rules-redis-2",
        "Redis: limit('100000/second', '100000000/day')",
        "a route limit() of two rules, one EVALSHA for both, RedisStore",
        redis=True,
        default=False,
    ),
    Variant(
        "rules-redis-global-route",
        "Redis: RateGuard + route limit()",
        "RateGuard(rate='100000/second') and a route limit('100000000/day'): two limits, two EVALSHA",
        redis=True,
        default=False,
    ),
    Variant(
        "exact-memory",
        "rateguard memory, limit 1000",
        "RateGuard(capacity=1000, a near-zero rate, identifier=<the header>), MemoryStore: one bucket per server",
        default=False,
    ),
    Variant(
        "exact-redis",
        "rateguard Redis, limit 1000",
        "RateGuard(capacity=1000, a near-zero rate, identifier=<the header>), RedisStore: one bucket for all servers",
        redis=True,
        default=False,
    ),
)

SCALE_BY_NAME = {v.name: v for v in SCALE_VARIANTS}
