"""RateGuard as an ASGI middleware: admission, headers, bodies, pass-through."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from rateguard import MemoryStore, RateGuard, RedisStore
from rateguard.stores import Store

from .conftest import FakeClock
from .helpers import client_for


def plain_app(store: Store | None = None, **options: object) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RateGuard, store=store, **options)  # type: ignore[arg-type]

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


async def test_allowed_responses_carry_headers(store: Store) -> None:
    app = plain_app(store, requests_per_minute=60, capacity=10)
    async with client_for(app) as client:
        r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit"] == "10"
    assert r.headers["x-ratelimit-remaining"] == "9"
    assert r.headers["x-ratelimit-reset"] == "1"
    assert r.headers["ratelimit-policy"] == '"global";q=10;w=10'
    assert r.headers["ratelimit"] == '"global";r=9;t=1'
    assert "retry-after" not in r.headers


async def test_limited_request_gets_429_json_and_retry_after(store: Store) -> None:
    app = plain_app(store, requests_per_minute=6, capacity=2, message="Slow down, friend.")
    async with client_for(app) as client:
        codes = [(await client.get("/")).status_code for _ in range(2)]
        r = await client.get("/")
    assert codes == [200, 200]
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "Too Many Requests", "message": "Slow down, friend.", "retry_after": 10}
    assert r.headers["retry-after"] == "10"
    assert r.headers["x-ratelimit-remaining"] == "0"
    assert r.headers["ratelimit"] == '"global";r=0;t=10'
    for name in ("retry-after", "x-ratelimit-limit", "ratelimit", "ratelimit-policy"):
        assert len(r.headers.get_list(name)) == 1


async def test_default_message(store: Store) -> None:
    app = plain_app(store, requests_per_minute=1)
    async with client_for(app) as client:
        await client.get("/")
        r = await client.get("/")
    assert r.json()["message"] == "Too many requests, please try again later."
    assert r.json()["retry_after"] == 60


async def test_exact_admission_under_100_concurrent_requests(store: Store) -> None:
    app = plain_app(store, requests_per_minute=1, capacity=17)
    async with client_for(app) as client:
        responses = await asyncio.gather(*(client.get("/") for _ in range(100)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 17
    assert codes.count(429) == 83
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in responses if r.status_code == 200)
    assert remaining == list(range(17))  # every token handed out exactly once


async def test_clients_have_separate_buckets(store: Store) -> None:
    app = plain_app(store, requests_per_minute=1)
    async with client_for(app, "198.51.100.1") as a, client_for(app, "198.51.100.2") as b:
        assert (await a.get("/")).status_code == 200
        assert (await a.get("/")).status_code == 429
        assert (await b.get("/")).status_code == 200


@pytest.mark.redis
async def test_two_app_instances_share_one_redis_limit(redis_url: str) -> None:
    stores = [RedisStore(url=redis_url), RedisStore(url=redis_url)]
    apps = [plain_app(s, requests_per_minute=1, capacity=6) for s in stores]
    try:
        async with client_for(apps[0]) as c0, client_for(apps[1]) as c1:
            responses = await asyncio.gather(*(c.get("/") for _ in range(10) for c in (c0, c1)))
        assert [r.status_code for r in responses].count(200) == 6
    finally:
        for s in stores:
            await s.close()


async def test_refill_with_injected_clock() -> None:
    clock = FakeClock()
    app = plain_app(MemoryStore(clock=clock), requests_per_minute=60, capacity=1)
    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/")).status_code == 429
        clock.advance(0.5)
        r = await client.get("/")
        assert r.status_code == 429 and r.json()["retry_after"] == 1
        clock.advance(0.5)
        assert (await client.get("/")).status_code == 200


async def test_skip_takes_no_token() -> None:
    app = plain_app(requests_per_minute=1, skip=lambda request: request.url.path == "/")
    async with client_for(app) as client:
        codes = [(await client.get("/")).status_code for _ in range(5)]
        r = await client.get("/")
    assert codes == [200] * 5
    assert "x-ratelimit-limit" not in r.headers


async def test_async_skip_and_identifier() -> None:
    async def skip(request: Request) -> bool:
        return request.headers.get("x-internal") == "yes"

    async def ident(request: Request) -> str | None:
        return request.headers.get("x-api-key")

    app = plain_app(requests_per_minute=1, skip=skip, identifier=ident)
    async with client_for(app) as client:
        assert (await client.get("/", headers={"x-api-key": "k1"})).status_code == 200
        assert (await client.get("/", headers={"x-api-key": "k1"})).status_code == 429
        assert (await client.get("/", headers={"x-api-key": "k2"})).status_code == 200
        assert (await client.get("/", headers={"x-api-key": "k1", "x-internal": "yes"})).status_code == 200
        # No key: falls back to the client IP, which has its own fresh bucket.
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/")).status_code == 429


@pytest.mark.parametrize("empty", [None, ""])
async def test_identifier_returning_nothing_falls_back_to_ip(empty: str | None) -> None:
    app = plain_app(requests_per_minute=1, identifier=lambda request: empty)
    async with client_for(app, "192.0.2.1") as a, client_for(app, "192.0.2.2") as b:
        assert (await a.get("/")).status_code == 200
        assert (await a.get("/")).status_code == 429
        assert (await b.get("/")).status_code == 200


async def test_identifier_error_propagates_with_a_note() -> None:
    def broken(request: Request) -> str:
        raise KeyError("x-api-key")

    app = plain_app(identifier=broken)
    async with client_for(app) as client:
        with pytest.raises(KeyError) as info:
            await client.get("/")
    assert any("identifier callable" in note and "broken" in note for note in info.value.__notes__)


async def test_cost_callable() -> None:
    app = plain_app(
        requests_per_minute=1, capacity=10, cost=lambda request: int(request.query_params.get("n", 1))
    )
    async with client_for(app) as client:
        r = await client.get("/?n=7")
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "3"
        assert (await client.get("/?n=4")).status_code == 429
        assert (await client.get("/?n=3")).status_code == 200


async def test_streaming_background_tasks_and_contextvars_pass_through() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    ran: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"chunk{i};".encode()
            await asyncio.sleep(0)

    async def stream(request: Request) -> StreamingResponse:
        var.set("set-in-endpoint")
        return StreamingResponse(chunks(), media_type="text/plain")

    async def background(request: Request) -> PlainTextResponse:
        var.set("set-in-bg-endpoint")
        return PlainTextResponse("ok", background=BackgroundTask(lambda: ran.append(var.get())))

    app = Starlette(routes=[Route("/stream", stream), Route("/bg", background)])
    app.add_middleware(RateGuard, requests_per_minute=10)
    async with client_for(app) as client:
        r = await client.get("/stream")
        assert r.text == "chunk0;chunk1;chunk2;"
        assert r.headers["x-ratelimit-remaining"] == "9"
        r = await client.get("/bg")
        assert r.text == "ok" and r.headers["x-ratelimit-remaining"] == "8"
    # The task ran, in the endpoint's context (BaseHTTPMiddleware would lose this value).
    assert ran == ["set-in-bg-endpoint"]


async def test_contextvar_set_by_outer_middleware_is_seen_by_endpoint() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"var": var.get()})

    inner = Starlette(routes=[Route("/", endpoint)])
    inner.add_middleware(RateGuard)

    async def outer(scope, receive, send):  # type: ignore[no-untyped-def]
        var.set("from-outer")
        await inner(scope, receive, send)

    async with client_for(outer) as client:
        assert (await client.get("/")).json() == {"var": "from-outer"}


async def test_lifespan_and_websocket_pass_through() -> None:
    events: list[str] = []

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(routes=[WebSocketRoute("/ws", ws)], lifespan=lifespan)
    app.add_middleware(RateGuard, requests_per_minute=1)

    async def run(scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        queue = list(incoming)

        async def receive() -> dict[str, Any]:
            return queue.pop(0) if queue else {"type": "websocket.disconnect", "code": 1000}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    lifespan_out = await run(
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in lifespan_out] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["startup", "shutdown"]

    ws_scope = {
        "type": "websocket", "asgi": {"version": "3.0"}, "path": "/ws", "raw_path": b"/ws",
        "root_path": "", "scheme": "ws", "query_string": b"", "headers": [],
        "client": ("203.0.113.9", 1), "server": ("testserver", 80), "subprotocols": [], "state": {},
    }  # fmt: skip
    for _ in range(3):  # more than the limit: websockets are not limited
        out = await run(dict(ws_scope), [{"type": "websocket.connect"}])
        assert [m["type"] for m in out] == ["websocket.accept", "websocket.send", "websocket.close"]
        assert out[1]["text"] == "hello"


async def test_no_client_address_gets_one_stable_key() -> None:
    app = plain_app(requests_per_minute=1)
    transport = httpx.ASGITransport(app=app, client=None)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/")).status_code == 429


async def test_stacked_middlewares_render_one_set_of_headers() -> None:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(RateGuard, requests_per_minute=60, capacity=3, name="burst")
    app.add_middleware(RateGuard, requests_per_minute=600, name="sustained")
    async with client_for(app) as client:
        r = await client.get("/")
        assert r.headers.get_list("x-ratelimit-remaining") == ["2"]
        assert r.headers["ratelimit-policy"] == '"sustained";q=600;w=60, "burst";q=3;w=3'
        await client.get("/")
        await client.get("/")
        r = await client.get("/")
    assert r.status_code == 429
    assert r.headers.get_list("retry-after") == ["1"]
    # The refused request's sustained token was given back: its field shows 597, not 596.
    assert r.headers["ratelimit"].startswith('"sustained";r=597;t=1, "burst";r=0;t=1')


async def test_peer_keys_are_remembered_per_address_not_confused() -> None:
    # The middleware remembers each peer address's key: distinct peers keep distinct buckets,
    # IPv6 peers are still grouped by /64, and the memory starts over past its bound.
    from rateguard import middleware

    guard = RateGuard(plain_app(), requests_per_minute=60, capacity=1)
    keys = []
    for host in ["10.0.0.1", "10.0.0.2", "10.0.0.1", "2001:db8::1", "2001:db8::2", "bad host/ü"]:
        keys.append(guard._client_key({"type": "http", "client": (host, 1)}))
    assert keys[0] == keys[2] == "10.0.0.1" and keys[1] == "10.0.0.2"
    assert keys[3] == keys[4] and keys[3] != keys[0]
    assert keys[5] != "bad host/ü" and "/" not in keys[5]  # encoded like any identifier
    for i in range(middleware._KEY_CACHE_SIZE + 10):
        assert guard._client_key({"type": "http", "client": (f"10.1.{i // 256}.{i % 256}", 1)}) == (
            f"10.1.{i // 256}.{i % 256}"
        )
    assert guard._keys is not None and len(guard._keys) <= middleware._KEY_CACHE_SIZE
    # A trusted proxy makes the key depend on headers too: nothing is remembered.
    behind = RateGuard(plain_app(), trusted_proxies=["10.0.0.0/8"])
    assert behind._keys is None
