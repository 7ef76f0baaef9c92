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

The growth runs (``python -m benchmarks.scale``) use the ``keyed-*``, ``rules-*``, ``exact-*``
variants at the end of this file: clients told apart by an ``x-api-key`` header, and
``BENCH_PREFILL=N`` to start with the buckets of clients ``k0`` to ``k<N-1>`` already made.
``BENCH_RATEGUARD_PATH=<dir>`` imports rateguard from that directory instead of this checkout
(``rateguard-redis-before``: the previous RedisStore, extracted from git by the harness).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import math
import os
import sys
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
# benchmarks.instructions runs an app under valgrind, some 50 times slower: there RedisStore's
# deadlines are raised, and an outage answers 503 (on_error="deny"), so that no request is
# decided by the local fallback unseen (the driver checks every status).
STORE_OPTIONS: dict[str, Any] = (
    {
        "timeout": float(os.environ["BENCH_REDIS_DEADLINE"]),
        "connect_timeout": float(os.environ["BENCH_REDIS_DEADLINE"]),
        "on_error": "deny",
    }
    if os.environ.get("BENCH_REDIS_DEADLINE")
    else {}
)
GC_FREEZE = os.environ.get("BENCH_GC_FREEZE", "1") == "1"
PREFILL = int(os.environ.get("BENCH_PREFILL", "0"))  # buckets of clients k0..k<N-1> made at start-up
RATEGUARD_PATH = os.environ.get("BENCH_RATEGUARD_PATH")
if RATEGUARD_PATH:  # ahead of uvicorn's --app-dir, which is this checkout
    sys.path.insert(0, RATEGUARD_PATH)

Closer = Callable[[], Any]
Startup = Callable[[], Any]  # a coroutine function run once start-up is done (a prefill)


def _app(closers: list[Closer] | None = None, startup: list[Startup] | None = None) -> FastAPI:
    to_close = closers if closers is not None else []
    to_start = startup if startup is not None else []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if GC_FREEZE:
            gc.collect()
            gc.freeze()
        # After the freeze: the buckets made here are scanned by the collector like those a real
        # server would have made one request at a time.
        for start in to_start:
            await start()
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


def _api_key(scope: Any) -> str:
    """The ``x-api-key`` header of a request, read from the raw list (the peer address without one)."""
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return str(value.decode("latin-1"))
    return str(scope["client"][0]) if scope.get("client") else ""


def _peer(scope: Any) -> str:
    return str(scope["client"][0]) if scope.get("client") else ""


class _Fields:
    """The five fields of one rule, as RateGuard renders them for its ``global`` limit: the fixed
    parts made once, the per-response values from the tokens left (written out, no helper)."""

    def __init__(self, rpm: float, capacity: int) -> None:
        self.capacity = float(capacity)
        self.rate = rpm / 60.0
        window = max(1, math.ceil(capacity / self.rate - 1e-9))
        self.policy = (b"ratelimit-policy", b'"global";q=%d;w=%d' % (capacity, window))
        self.limit = (b"x-ratelimit-limit", b"%d" % capacity)


class FloorBucket:
    """The least a Python token-bucket limiter that sends those fields can do: one dict keyed by
    the peer address (or the ``x-api-key`` header), the refill and take written inline, the five
    fields formatted per response. No options, no per-route limits, no counters, no Decision: a
    reference for what RateGuard's own work costs on top of it, not something to deploy."""

    def __init__(
        self, app: Any, rpm: float = HIGH, capacity: int = HIGH, keyed: bool = False, prefill: int = 0
    ) -> None:
        self.app = app
        self.buckets: dict[str, list[float]] = {}
        self.f = _Fields(rpm, capacity)
        self.capacity, self.rate = self.f.capacity, self.f.rate
        self.key = _api_key if keyed else _peer
        now = time.monotonic()
        for i in range(prefill):  # as if each client had made one request
            self.buckets[f"k{i}"] = [self.capacity - 1.0, now]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        now = time.monotonic()
        client = self.key(scope)
        bucket = self.buckets.get(client)
        if bucket is None:
            bucket = self.buckets[client] = [self.capacity, now]
        rate = self.rate
        tokens = min(self.capacity, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:  # never in a run: the limit is out of reach
            bucket[0] = tokens
            await send({"type": "http.response.start", "status": 429, "headers": [(b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": b""})
            return
        bucket[0] = tokens = tokens - 1.0
        remaining = int(tokens)
        missing = self.capacity - tokens
        reset = math.ceil(missing / rate)
        frac = missing % 1.0  # of the next token: when it comes is the RateLimit field's t
        nxt = math.ceil((frac if frac > 1e-9 else 1.0) / rate - 1e-9)
        # Written out here, not through a shared helper: a reference has no layer it does not need.
        f = self.f
        fields = [
            f.policy,
            (b"ratelimit", b'"global";r=%d;t=%d' % (remaining, nxt)),
            f.limit,
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

    def __init__(
        self,
        app: Any,
        rpm: float = HIGH,
        capacity: int = HIGH,
        keyed: bool = False,
        prefill: int = 0,
        made: list[FloorRedis] | None = None,
    ) -> None:
        import hiredis

        from rateguard.stores.redis import TOKEN_BUCKET_LUA

        self.app = app
        self.script = TOKEN_BUCKET_LUA.encode()
        self.sha = hashlib.sha1(self.script).hexdigest()
        self.pack = hiredis.pack_command
        self.replies: _Replies | None = None
        self.connecting: asyncio.Future[_Replies] | None = None
        self.f = _Fields(rpm, capacity)
        self.args = (self.f.rate, capacity)
        self.key = _api_key if keyed else _peer
        self.prefill = prefill
        if made is not None:  # Starlette makes the middleware when the app starts: the prefill finds it here
            made.append(self)

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

    async def fill(self) -> None:
        """Take one token for each of clients k0..k<prefill-1>, pipelined a thousand at a time."""
        replies = await self._connect()
        loop = asyncio.get_running_loop()
        for start in range(0, self.prefill, 1000):
            done: list[asyncio.Future[Any]] = []
            data = []
            for i in range(start, min(start + 1000, self.prefill)):
                done.append(loop.create_future())
                data.append(self.pack(("EVALSHA", self.sha, 1, f"floor:k{i}", 1, "", "", *self.args)))
            replies.waiting.extend(done)
            replies.transport.write(b"".join(data))
            await done[-1]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replies = self.replies or await self._connect()
        client = self.key(scope)
        reply = asyncio.get_running_loop().create_future()
        replies.waiting.append(reply)
        # ARGV: cost, now ('' = Redis's clock), refund channel ('' = none), rate, capacity.
        replies.transport.write(self.pack(("EVALSHA", self.sha, 1, "floor:" + client, 1, "", "", *self.args)))
        _, remaining, _, reset_after = await reply  # never denied: the limit is out of reach
        reset_after = reset_after / 1e9 if type(reset_after) is int else float(reset_after)  # ns, or text
        reset = math.ceil(reset_after)
        frac = (reset_after * self.f.rate) % 1.0  # of the next token: the RateLimit field's t
        nxt = math.ceil((frac if frac > 1e-9 else 1.0) / self.f.rate - 1e-9)
        # Written out here, not through a shared helper: a reference has no layer it does not need.
        f = self.f
        fields = [
            f.policy,
            (b"ratelimit", b'"global";r=%d;t=%d' % (remaining, nxt)),
            f.limit,
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

    return _rateguard(RedisStore(url=REDIS_URL, **STORE_OPTIONS), blocked)


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


# ---------------------------------------------------------------------------------------------
# The growth runs (python -m benchmarks.scale): many clients, several rules, several servers.

# A bucket of 10**9 refilled at one token an hour: no request is ever refused, and every bucket a
# client touched stays in the store, in memory or in Redis, for the whole run, as under a real
# "1000/day" limit. (At 10**9 a minute a bucket is full again within a microsecond, and both
# stores forget a full bucket: the store would never grow.)
SCALE_RPM = 1 / 60
SCALE_CAPACITY = HIGH
BIG_MAX_KEYS = 2_000_000  # MemoryStore(max_keys=...) that holds every client of the 1M run
EXACT_LIMIT = 1000  # the exact-* variants: a bucket of 1000, refilled at one token every ~1.9 years
EXACT_RPM = BLOCKED_RPM
ONE_RULE = "100000/second"  # rules-*: high enough that no request is refused
SECOND_RULE = "100000000/day"


def api_key(request: Request) -> str | None:
    """The identifier of every keyed variant, as the issue writes it."""
    return request.headers.get("x-api-key")


def _keyed(app: FastAPI, state: Callable[[], Any] | None = None) -> FastAPI:
    """The trivial endpoint, and ``GET /_bench/state`` for the harness (after it: ``/`` matches first)."""
    _plain(app)

    @app.get("/_bench/state")
    async def bench_state() -> dict[str, Any]:
        return {"buckets": state() if state is not None else None}

    return app


def _limiter_fill(store: Any, rule: Any, count: int, concurrency: int) -> Startup:
    """Take one token for each of clients k0..k<count-1> with rateguard's public `Limiter`, whose
    keys are those of ``identifier=``'s value (``name="global"``: RateGuard's bucket). On Redis,
    through a store of its own with a long deadline (the same keys): a burst of a million
    decisions on a busy machine must not fall back to local buckets."""

    async def fill() -> None:
        from rateguard import Limiter, RedisStore

        filler = RedisStore(url=REDIS_URL, timeout=5.0) if isinstance(store, RedisStore) else store
        hit = Limiter(rule, store=filler, name="global").hit
        todo = iter(range(count))

        async def worker() -> None:
            for i in todo:
                await hit(f"k{i}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if filler is not store:
            await filler.close()
            if filler.errors:
                raise SystemExit(f"the prefill fell back to local buckets: {filler.last_error}")

    return fill


def keyed_none() -> FastAPI:
    return _keyed(_app())


def keyed_floor_memory() -> FastAPI:
    made: list[FloorBucket] = []

    class Floor(FloorBucket):
        def __init__(self, app: Any) -> None:
            super().__init__(app, SCALE_RPM, SCALE_CAPACITY, keyed=True, prefill=PREFILL)
            made.append(self)

    app = _keyed(_app(), lambda: len(made[0].buckets) if made else None)
    app.add_middleware(Floor)
    return app


def keyed_floor_redis() -> FastAPI:
    made: list[FloorRedis] = []

    async def fill() -> None:
        await made[0].fill()

    app = _keyed(_app([close_floor_connections], [fill]))
    app.add_middleware(
        FloorRedis, rpm=SCALE_RPM, capacity=SCALE_CAPACITY, keyed=True, prefill=PREFILL, made=made
    )
    return app


def _keyed_rateguard(store: Any, concurrency: int) -> FastAPI:
    from rateguard import RateGuard, Rule

    rule = Rule(SCALE_RPM, SCALE_CAPACITY)
    fill = [_limiter_fill(store, rule, PREFILL, concurrency)] if PREFILL else []
    app = _keyed(_app([store.close], fill), (lambda: store.size) if hasattr(store, "size") else None)
    app.add_middleware(RateGuard, rate=rule, store=store, identifier=lambda r: r.headers.get("x-api-key"))
    return app


def keyed_rateguard_memory(max_keys: int = BIG_MAX_KEYS) -> FastAPI:
    from rateguard import MemoryStore

    return _keyed_rateguard(MemoryStore(max_keys=max_keys), 1)


def keyed_rateguard_redis() -> FastAPI:
    from rateguard import RedisStore

    return _keyed_rateguard(RedisStore(url=REDIS_URL), 128)


def keyed_slowapi_redis() -> FastAPI:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware

    # slowapi's docs: key_func is any function of the request.
    limiter = Limiter(key_func=api_key, default_limits=[f"{HIGH}/hour"], storage_uri=REDIS_URL)
    app = _keyed(_app())
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    app.add_middleware(SlowAPIASGIMiddleware)
    return app


def keyed_fastapi_limiter_redis() -> FastAPI:
    # fastapi-limiter's identifier= gives the key; one pyrate-limiter Limiter holds one bucket for
    # every key unless its BucketFactory routes each key to a bucket of its own (pyrate-limiter's
    # docs: a factory whose get() makes buckets on demand). Each is a token bucket in its own Redis
    # hash. Not registered with pyrate-limiter's Leaker: a StateBucket has nothing to leak.
    import redis.asyncio as aioredis
    from fastapi_limiter.depends import RateLimiter
    from pyrate_limiter import (
        BucketFactory,
        Duration,
        Limiter,
        Rate,
        RedisStateStore,
        StateBucket,
        TokenBucket,
    )
    from pyrate_limiter.abstracts import RateItem

    client = aioredis.Redis.from_url(REDIS_URL)
    rates = [Rate(HIGH, Duration.HOUR, burst=HIGH)]

    class PerKey(BucketFactory):
        def __init__(self) -> None:
            self.buckets: dict[str, StateBucket] = {}

        def wrap_item(self, name: str, weight: int = 1) -> RateItem:
            return RateItem(name, time.time_ns() // 1_000_000, weight=weight)

        def get(self, item: RateItem) -> StateBucket:
            bucket = self.buckets.get(item.name)
            if bucket is None:
                store = RedisStateStore(client, key=f"fastapi-limiter:{item.name}")
                bucket = self.buckets[item.name] = StateBucket(rates, algorithm=TokenBucket(), store=store)
            return bucket

    async def identifier(request: Request) -> str:
        return request.headers.get("x-api-key") or "-"

    limiter = Limiter(PerKey())
    app = _app([client.aclose])

    @app.get("/", dependencies=[Depends(RateLimiter(limiter=limiter, identifier=identifier))])
    async def hello() -> dict[str, str]:
        return MESSAGE

    return _keyed(app)


def keyed_throttled_redis() -> FastAPI:
    from throttled.asyncio import RedisStore, per_hour
    from throttled.asyncio.contrib.fastapi import Limiter, RateLimitExceededError, rate_limit_exceeded_handler

    limiter = Limiter(per_hour(HIGH, burst=HIGH), store=RedisStore(server=REDIS_URL), key_func=api_key)
    app = _app()
    app.add_exception_handler(RateLimitExceededError, rate_limit_exceeded_handler)

    @app.get("/")
    @limiter.limit()
    async def hello(request: Request) -> dict[str, str]:
        return MESSAGE

    return _keyed(app)


def _rules(store: Any, kind: str) -> FastAPI:
    """One rule, two rules in one limit() (one atomic step), or a RateGuard plus a route limit()."""
    from rateguard import RateGuard, limit

    app = _app([store.close])
    if kind == "1":
        dependencies = [Depends(limit(ONE_RULE, store=store))]
    elif kind == "2":
        dependencies = [Depends(limit(ONE_RULE, SECOND_RULE, store=store))]
    else:
        dependencies = [Depends(limit(SECOND_RULE, store=store))]
        app.add_middleware(RateGuard, rate=ONE_RULE, store=store)

    @app.get("/", dependencies=dependencies)
    async def hello() -> dict[str, str]:
        return MESSAGE

    return app


def _memory() -> Any:
    from rateguard import MemoryStore

    return MemoryStore()


def _redis() -> Any:
    from rateguard import RedisStore

    return RedisStore(url=REDIS_URL, **STORE_OPTIONS)


def _exact(store: Any) -> FastAPI:
    from rateguard import RateGuard

    app = _plain(_app([store.close]))
    app.add_middleware(
        RateGuard, requests_per_minute=EXACT_RPM, capacity=EXACT_LIMIT, store=store, identifier=api_key
    )
    return app


def rateguard_redis_before() -> FastAPI:
    if not RATEGUARD_PATH:
        raise SystemExit(
            "rateguard-redis-before needs BENCH_RATEGUARD_PATH: the previous rateguard/ extracted"
        )
    import rateguard

    if not str(rateguard.__file__).startswith(RATEGUARD_PATH):
        raise SystemExit(f"rateguard came from {rateguard.__file__}, not from {RATEGUARD_PATH}")
    return rateguard_redis()


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
    "rateguard-redis-before": rateguard_redis_before,
    "keyed-none": keyed_none,
    "keyed-floor-memory": keyed_floor_memory,
    "keyed-rateguard-memory": keyed_rateguard_memory,
    "keyed-rateguard-memory-bounded": lambda: keyed_rateguard_memory(max_keys=100_000),
    "keyed-floor-redis": keyed_floor_redis,
    "keyed-rateguard-redis": keyed_rateguard_redis,
    "keyed-slowapi-redis": keyed_slowapi_redis,
    "keyed-fastapi-limiter-redis": keyed_fastapi_limiter_redis,
    "keyed-throttled-redis": keyed_throttled_redis,
    "rules-memory-1": lambda: _rules(_memory(), "1"),
    "rules-memory-2": lambda: _rules(_memory(), "2"),
    "rules-memory-global-route": lambda: _rules(_memory(), "global+route"),
    "rules-redis-1": lambda: _rules(_redis(), "1"),
    "rules-redis-2": lambda: _rules(_redis(), "2"),
    "rules-redis-global-route": lambda: _rules(_redis(), "global+route"),
    "exact-memory": lambda: _exact(_memory()),
    "exact-redis": lambda: _exact(_redis()),
}


def build(variant: str) -> FastAPI:
    try:
        builder = BUILDERS[variant]
    except KeyError:
        raise SystemExit(f"unknown BENCH_VARIANT {variant!r}; one of: {', '.join(BUILDERS)}") from None
    return builder()


app = build(VARIANT)
