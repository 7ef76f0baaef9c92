"""One tiny FastAPI app per variant, chosen by environment variables, served by uvicorn:

    BENCH_VARIANT=rateguard-redis BENCH_REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn benchmarks.apps:app --loop uvloop --http httptools

Every app has the same trivial endpoint, ``GET /``. Limits are so high (10**9 a minute, a burst of
10**9) that no normal variant ever answers 429; the ``*-blocked`` variants have capacity 1 and a
near-zero rate, so after the first request every one is a 429. wrk connects from one address, so
all requests share one bucket: for Redis that is one hot key, the worst case.

``BENCH_GC_FREEZE=1`` (the harness's default) calls ``gc.freeze()`` once start-up is done, in every
variant alike: objects made at import then never get scanned again, which shortens the collector's
pauses and with them the p99.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlparse

from fastapi import Depends, FastAPI, Request

HIGH = 10**9  # requests a minute and burst: never reached in a run
BLOCKED_RPM = 1e-6  # one token every ~1.9 years
MESSAGE = {"message": "hello"}

VARIANT = os.environ.get("BENCH_VARIANT", "none")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
GC_FREEZE = os.environ.get("BENCH_GC_FREEZE", "1") == "1"

Closer = Callable[[], Any]


def _app(closers: list[Closer] | None = None) -> FastAPI:
    to_close = closers if closers is not None else []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if GC_FREEZE:
            gc.collect()
            gc.freeze()
        yield
        for close in to_close:
            result = close()
            if hasattr(result, "__await__"):
                await result

    return FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


def _plain(app: FastAPI) -> FastAPI:
    @app.get("/")
    async def hello() -> dict[str, str]:
        return MESSAGE

    return app


def none() -> FastAPI:
    return _plain(_app())


def basehttp_noop() -> FastAPI:
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.responses import Response

    class Noop(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

    app = _plain(_app())
    app.add_middleware(Noop)
    return app


# The five fields RateGuard adds to an allowed response (as it renders them in this app), fixed.
FIELDS = [
    (b"ratelimit-policy", b'"global";q=1000000000;w=60'),
    (b"ratelimit", b'"global";r=999999999;t=1'),
    (b"x-ratelimit-limit", b"1000000000"),
    (b"x-ratelimit-remaining", b"999999999"),
    (b"x-ratelimit-reset", b"1"),
]


class HeadersOnly:
    """A pure ASGI middleware that limits nothing and adds the same header fields as RateGuard:
    what any limiter that sends those fields costs at least (wrapping send, and uvicorn checking
    and writing each field)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_fields(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *FIELDS]
            await send(message)

        await self.app(scope, receive, send_with_fields)


def headers_only() -> FastAPI:
    app = _plain(_app())
    app.add_middleware(HeadersOnly)
    return app


class FloorBucket:
    """The least a Python token-bucket limiter that sends those fields can do: one dict keyed by
    the peer address, the refill and take written inline, the five fields formatted per response.
    No options, no per-route limits, no counters, no Decision: a reference for what RateGuard's
    own work costs on top of it, not something to deploy."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.buckets: dict[str, list[float]] = {}
        self.capacity = float(HIGH)
        self.rate = HIGH / 60.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        now = time.monotonic()
        client = scope["client"][0] if scope.get("client") else ""
        bucket = self.buckets.get(client)
        if bucket is None:
            bucket = self.buckets[client] = [self.capacity, now]
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:  # never in a run: the limit is out of reach
            bucket[0] = tokens
            await send({"type": "http.response.start", "status": 429, "headers": [(b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b""})
            return
        bucket[0] = tokens = tokens - 1.0
        remaining = int(tokens)
        reset = math.ceil((self.capacity - tokens) / self.rate)
        # Written out here, not through a shared helper: a reference has no layer it does not need.
        fields = [
            FIELDS[0],
            (b"ratelimit", b'"global";r=%d;t=%d' % (remaining, 1 if reset else 0)),
            FIELDS[2],
            (b"x-ratelimit-remaining", b"%d" % remaining),
            (b"x-ratelimit-reset", b"%d" % reset),
        ]

        async def send_with_fields(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        await self.app(scope, receive, send_with_fields)


def floor_memory() -> FastAPI:
    app = _plain(_app())
    app.add_middleware(FloorBucket)
    return app


class _Replies(asyncio.Protocol):
    """Replies parsed by hiredis as they arrive, handed to the waiting requests in order."""

    def __init__(self) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        _OPEN.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        _OPEN.discard(self)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        reply = self.reader.gets()
        while reply is not False:
            self.waiting.popleft().set_result(reply)
            reply = self.reader.gets()


_OPEN: set[_Replies] = set()  # floor-redis connections of this process


def close_floor_connections() -> None:
    """Close every floor-redis connection (at shutdown, or after a test)."""
    for replies in list(_OPEN):
        replies.transport.close()


class FloorRedis:
    """The least a Redis-backed limiter can do from asyncio: one EVALSHA of rateguard's own script
    per request, written straight to a raw transport, its reply parsed in ``data_received``. No
    redis-py, no batching, no timeout, no fallback, no NOSCRIPT handling: the reference for what
    one Redis round trip per request costs on this machine, not something to deploy."""

    def __init__(self, app: Any) -> None:
        import hiredis

        from rateguard.stores.redis import TOKEN_BUCKET_LUA

        self.app = app
        self.script = TOKEN_BUCKET_LUA.encode()
        self.sha = hashlib.sha1(self.script).hexdigest()
        self.pack = hiredis.pack_command
        self.replies: _Replies | None = None
        self.connecting: asyncio.Future[_Replies] | None = None

    async def _connect(self) -> _Replies:
        if self.connecting is None:
            self.connecting = asyncio.get_running_loop().create_future()
            url = urlparse(REDIS_URL)
            _, replies = await asyncio.get_running_loop().create_connection(
                _Replies, url.hostname, url.port or 6379
            )
            db = int(url.path.strip("/") or 0)
            # The SET leaves a key behind (a bucket expires as soon as it is full again, here at
            # once), so the harness's check that each Redis variant wrote to its database holds.
            commands = (("SELECT", db), ("SCRIPT", "LOAD", self.script), ("SET", "floor:connected", "1"))
            for command in commands:
                done = asyncio.get_running_loop().create_future()
                replies.waiting.append(done)
                replies.transport.write(self.pack(command))
                await done
            self.replies = replies
            self.connecting.set_result(replies)
        return await self.connecting

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replies = self.replies or await self._connect()
        client = scope["client"][0] if scope.get("client") else ""
        reply = asyncio.get_running_loop().create_future()
        replies.waiting.append(reply)
        # ARGV: cost, now ('' = Redis's clock), refund channel ('' = none), rate, capacity.
        replies.transport.write(
            self.pack(("EVALSHA", self.sha, 1, "floor:" + client, 1, "", "", HIGH / 60.0, HIGH))
        )
        _, remaining, _, reset_after = await reply  # never denied: the limit is out of reach
        reset = math.ceil(float(reset_after))
        # Written out here, not through a shared helper: a reference has no layer it does not need.
        fields = [
            FIELDS[0],
            (b"ratelimit", b'"global";r=%d;t=%d' % (remaining, 1 if reset else 0)),
            FIELDS[2],
            (b"x-ratelimit-remaining", b"%d" % remaining),
            (b"x-ratelimit-reset", b"%d" % reset),
        ]

        async def send_with_fields(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        await self.app(scope, receive, send_with_fields)


def floor_redis() -> FastAPI:
    app = _plain(_app([close_floor_connections]))
    app.add_middleware(FloorRedis)
    return app


def _rateguard(store: Any, blocked: bool, headers: bool = True) -> FastAPI:
    from rateguard import RateGuard

    app = _plain(_app([store.close]))
    if blocked:
        app.add_middleware(RateGuard, requests_per_minute=BLOCKED_RPM, capacity=1, store=store)
    else:
        app.add_middleware(RateGuard, requests_per_minute=HIGH, capacity=HIGH, store=store, headers=headers)
    return app


def rateguard_memory(blocked: bool = False, headers: bool = True) -> FastAPI:
    from rateguard import MemoryStore

    return _rateguard(MemoryStore(), blocked, headers)


def rateguard_redis(blocked: bool = False) -> FastAPI:
    from rateguard import RedisStore

    return _rateguard(RedisStore(url=REDIS_URL), blocked)


def _slowapi(storage_uri: str, pure_asgi: bool = True) -> FastAPI:
    # What slowapi needs: the limiter on app.state, its 429 handler, and a middleware for
    # default_limits to apply to undecorated routes. Headers stay off (slowapi's default).
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
    from slowapi.util import get_remote_address

    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[f"{HIGH}/minute"],
        storage_uri=storage_uri,
    )
    app = _plain(_app())
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIASGIMiddleware if pure_asgi else SlowAPIMiddleware)
    return app


def slowapi_memory() -> FastAPI:
    return _slowapi("memory://")


def slowapi_redis() -> FastAPI:
    return _slowapi(REDIS_URL)


def slowapi_redis_basehttp() -> FastAPI:
    return _slowapi(REDIS_URL, pure_asgi=False)


def fastapi_limiter_redis() -> FastAPI:
    # fastapi-limiter 0.2 has no FastAPILimiter.init(redis) any more: a RateLimiter dependency wraps
    # a pyrate-limiter Limiter. Its token bucket on Redis is a StateBucket over a RedisStateStore
    # (one small hash, a Lua step); its RedisBucket is a sliding log that grows a sorted set by
    # one member per request, which would not be the same work as a token bucket.
    import redis.asyncio as aioredis
    from fastapi_limiter.depends import RateLimiter
    from pyrate_limiter import Duration, Limiter, Rate, RedisStateStore, StateBucket, TokenBucket

    client = aioredis.Redis.from_url(REDIS_URL)
    bucket = StateBucket(
        [Rate(HIGH, Duration.MINUTE, burst=HIGH)],
        algorithm=TokenBucket(),
        store=RedisStateStore(client, key="fastapi-limiter:bench"),
    )
    limiter = Limiter(bucket)
    app = _app([client.aclose, limiter.bucket_factory.close])

    @app.get("/", dependencies=[Depends(RateLimiter(limiter=limiter))])
    async def hello() -> dict[str, str]:
        return MESSAGE

    return app


def _throttled(store: Any) -> FastAPI:
    from throttled.asyncio import per_min
    from throttled.asyncio.contrib.fastapi import (
        Limiter,
        RateLimitExceededError,
        get_remote_address,
        rate_limit_exceeded_handler,
    )

    limiter = Limiter(per_min(HIGH, burst=HIGH), store=store, key_func=get_remote_address)
    app = _app()
    app.add_exception_handler(RateLimitExceededError, rate_limit_exceeded_handler)

    @app.get("/")
    @limiter.limit()
    async def hello(request: Request) -> dict[str, str]:  # the decorator finds the request here
        return MESSAGE

    return app


def throttled_memory() -> FastAPI:
    from throttled.asyncio import MemoryStore

    return _throttled(MemoryStore())


def throttled_redis() -> FastAPI:
    from throttled.asyncio import RedisStore

    return _throttled(RedisStore(server=REDIS_URL))


BUILDERS: dict[str, Callable[[], FastAPI]] = {
    "none": none,
    "basehttp-noop": basehttp_noop,
    "headers-only": headers_only,
    "floor-memory": floor_memory,
    "floor-redis": floor_redis,
    "rateguard-memory": rateguard_memory,
    "rateguard-memory-noheaders": lambda: rateguard_memory(headers=False),
    "rateguard-redis": rateguard_redis,
    "rateguard-memory-blocked": lambda: rateguard_memory(blocked=True),
    "rateguard-redis-blocked": lambda: rateguard_redis(blocked=True),
    "slowapi-memory": slowapi_memory,
    "slowapi-redis": slowapi_redis,
    "slowapi-redis-basehttp": slowapi_redis_basehttp,
    "fastapi-limiter-redis": fastapi_limiter_redis,
    "throttled-memory": throttled_memory,
    "throttled-redis": throttled_redis,
}


def build(variant: str) -> FastAPI:
    try:
        builder = BUILDERS[variant]
    except KeyError:
        raise SystemExit(f"unknown BENCH_VARIANT {variant!r}; one of: {', '.join(BUILDERS)}") from None
    return builder()


app = build(VARIANT)
