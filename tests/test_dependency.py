"""limit(): per-route limits as a FastAPI dependency."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

import rateguard
from rateguard import MemoryStore, RateGuard, RedisStore, limit
from rateguard.dependencies import RateLimitExceeded
from rateguard.stores import Store

from .helpers import client_for, demo_like_app


def route_app(store: Store | None = None, **options: object) -> FastAPI:
    app = FastAPI()
    guard = limit(3, store=store, **options)  # type: ignore[arg-type]

    @app.get("/items/{item_id}", dependencies=[Depends(guard)])
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/other", dependencies=[Depends(guard)])
    async def other() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/free")
    async def free() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_limit_without_middleware(store: Store) -> None:
    app = route_app(store)
    rateguard.install(app)  # rateguard's 429 body; without it FastAPI's {"detail": ...}
    async with client_for(app) as client:
        first = await client.get("/items/1")
        codes = [(await client.get(f"/items/{i}")).status_code for i in range(2, 5)]
        denied = await client.get("/items/9")
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit"] == "3"
    assert first.headers["x-ratelimit-remaining"] == "2"
    assert first.headers["ratelimit-policy"] == '"GET /items/{item_id}";q=3;w=60'
    assert codes == [200, 200, 429]
    assert denied.status_code == 429
    assert denied.json() == {
        "error": "Too Many Requests",
        "message": "Too many requests, please try again later.",
        "retry_after": 20,
    }
    assert denied.headers["retry-after"] == "20"
    assert denied.headers["x-ratelimit-remaining"] == "0"


async def test_each_route_has_its_own_bucket_keyed_by_template() -> None:
    app = route_app(MemoryStore())
    async with client_for(app) as client:
        # Different raw paths, one template: one bucket.
        assert [(await client.get(f"/items/{i}")).status_code for i in range(4)] == [200, 200, 200, 429]
        # Same limit() object on another route: a separate bucket.
        assert (await client.get("/other")).status_code == 200
        # An unlimited route has no rate-limit headers.
        assert "x-ratelimit-limit" not in (await client.get("/free")).headers


async def test_methods_are_part_of_the_bucket() -> None:
    app = FastAPI()
    guard = limit(1)

    @app.get("/thing", dependencies=[Depends(guard)])
    async def read() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/thing", dependencies=[Depends(guard)])
    async def write() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app, "192.0.2.50") as client:
        assert (await client.get("/thing")).status_code == 200
        assert (await client.post("/thing")).status_code == 200
        assert (await client.get("/thing")).status_code == 429


async def test_global_and_route_limits_together(store: Store) -> None:
    app = demo_like_app(store, rpm=60)
    async with client_for(app) as client:
        r = await client.post("/api/expensive")
        assert r.status_code == 200
        assert r.headers.get_list("x-ratelimit-limit") == ["5"]  # the most restrictive
        assert r.headers.get_list("x-ratelimit-remaining") == ["4"]
        assert r.headers.get_list("ratelimit-policy") == [
            '"global";q=60;w=60, "POST /api/expensive";q=5;w=60'
        ]
        assert r.headers.get_list("ratelimit") == ['"global";r=59;t=1, "POST /api/expensive";r=4;t=12']
        for _ in range(4):
            assert (await client.post("/api/expensive")).status_code == 200
        denied = await client.post("/api/expensive")
        assert denied.status_code == 429
        assert denied.json()["retry_after"] == 12
        assert denied.headers.get_list("retry-after") == ["12"]
        assert denied.headers.get_list("x-ratelimit-limit") == ["5"]
        assert denied.headers.get_list("x-ratelimit-remaining") == ["0"]
        # The denied route request took no global token: the global limit gave it back, and says so.
        assert denied.headers["ratelimit"].startswith('"global";r=55;')
        again = await client.get("/api/data")
        assert again.headers["ratelimit"].startswith('"global";r=54;')
        other = await client.get("/api/data")
        assert other.status_code == 200 and other.headers["x-ratelimit-limit"] == "60"


@pytest.mark.redis
async def test_limit_uses_the_middleware_store(redis_url: str) -> None:
    store = RedisStore(url=redis_url)
    try:
        app = demo_like_app(store)
        async with client_for(app, "198.51.100.77") as client:
            await client.post("/api/expensive")
        keys = sorted(k.decode() for k in await store.client.keys("rateguard:{*"))
        assert keys == [
            "rateguard:{198.51.100.77}:POST%20%2Fapi%2Fexpensive",
            "rateguard:{198.51.100.77}:global",
        ]
    finally:
        await store.close()


async def test_limit_without_store_or_middleware_uses_a_store_of_the_apps_own() -> None:
    # One limit() object in two apps (a module-level limit, an app built per test): each app
    # has its own buckets, so a fresh app never starts with another's.
    guard = limit(2)
    apps = []
    for _ in range(2):
        app = FastAPI()
        app.get("/x", dependencies=[Depends(guard)])(lambda: {"ok": True})
        apps.append(app)
    async with client_for(apps[0], "192.0.2.99") as a, client_for(apps[1], "192.0.2.99") as b:
        assert [(await a.get("/x")).status_code for _ in range(3)] == [200, 200, 429]
        assert [(await b.get("/x")).status_code for _ in range(3)] == [200, 200, 429]


async def test_without_install_a_limit_429_has_fastapis_body_and_every_field() -> None:
    app = route_app(MemoryStore())
    async with client_for(app) as client:
        codes = [(await client.get("/other")).status_code for _ in range(3)]
        denied = await client.get("/other")
    assert codes == [200] * 3
    assert denied.status_code == 429
    assert denied.json() == {"detail": "Too many requests, please try again later."}
    assert denied.headers["retry-after"] == "20"
    assert denied.headers["ratelimit-policy"] == '"GET /other";q=3;w=60'


async def test_behind_rateguard_a_limit_429_has_rateguards_body_with_the_limits_message() -> None:
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=60, message="global says no")

    @app.get("/x", dependencies=[Depends(limit(1, message="route says no"))])
    async def x() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        assert (await client.get("/x")).status_code == 200
        denied = await client.get("/x")
    assert denied.status_code == 429
    assert denied.json() == {"error": "Too Many Requests", "message": "route says no", "retry_after": 60}
    assert denied.headers.get_list("retry-after") == ["60"]
    assert len(denied.headers.get_list("ratelimit")) == 1


async def test_an_apps_own_429_handler_wins() -> None:
    app = route_app(MemoryStore())

    @app.exception_handler(RateLimitExceeded)
    async def mine(request: Request, exc: RateLimitExceeded) -> JSONResponse:
        return JSONResponse({"custom": exc.retry_after}, status_code=429, headers=exc.headers)

    async with client_for(app) as client:
        for _ in range(3):
            await client.get("/other")
        r = await client.get("/other")
    assert r.json() == {"custom": 20}
    assert r.headers["retry-after"] == "20"


async def test_limit_identifier_and_skip() -> None:
    app = FastAPI()
    guard = limit(
        1,
        identifier=lambda request: request.headers.get("x-api-key"),
        skip=lambda request: request.headers.get("x-api-key") == "admin",
    )

    @app.get("/k", dependencies=[Depends(guard)])
    async def k() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        assert (await client.get("/k", headers={"x-api-key": "a"})).status_code == 200
        assert (await client.get("/k", headers={"x-api-key": "a"})).status_code == 429
        assert (await client.get("/k", headers={"x-api-key": "b"})).status_code == 200
        for _ in range(3):
            assert (await client.get("/k", headers={"x-api-key": "admin"})).status_code == 200


@pytest.mark.redis
async def test_readme_snippet_with_redis_client(redis_url: str) -> None:
    """RedisStore(client=...) configures both the middleware and limit()."""
    client = aioredis.Redis.from_url(redis_url)
    store = RedisStore(client=client)
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=100, store=store)

    @app.post("/api/expensive", dependencies=[Depends(limit(5))])
    async def expensive() -> dict[str, bool]:
        return {"ok": True}

    try:
        async with client_for(app) as http:
            codes = [(await http.post("/api/expensive")).status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2
        assert await client.exists("rateguard:{203.0.113.7}:global") == 1
    finally:
        await store.close()
        await client.aclose()  # the store never closes a client it was given


async def test_routers_included_under_two_prefixes_have_separate_buckets() -> None:
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/items/{item_id}", dependencies=[Depends(limit(2))])
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/v2")
    async with client_for(app, "192.0.2.123") as client:
        codes = [(await client.get(p)).status_code for p in ("/v1/items/1", "/v1/items/2", "/v1/items/3")]
        r = await client.get("/v2/items/1")
    assert codes == [200, 200, 429]
    assert r.status_code == 200
    assert r.headers["ratelimit-policy"] == '"GET /v2/items/{item_id}";q=2;w=60'


async def test_behind_rateguard_with_install_the_429_shows_the_give_back() -> None:
    # The app's handler (install's) answers; RateGuard still sends each field once, as it stands
    # after the global limit gave its token back.
    app = demo_like_app(MemoryStore(), rpm=60)
    rateguard.install(app)
    async with client_for(app) as client:
        for _ in range(5):
            await client.post("/api/expensive")
        denied = await client.post("/api/expensive")
    assert denied.status_code == 429
    assert denied.json()["error"] == "Too Many Requests"
    assert denied.headers.get_list("ratelimit") == ['"global";r=55;t=1, "POST /api/expensive";r=0;t=12']
    assert denied.headers.get_list("retry-after") == ["12"]
