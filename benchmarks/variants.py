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
