"""Limits that compose: rate strings, several limits and rules per request, all or nothing, plans."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import rateguard
from rateguard import ConfigurationError, Limiter, MemoryStore, RateGuard, RedisStore, Rule, limit
from rateguard.rates import GRAMMAR, parse_rule, parse_rules
from rateguard.stores import Store

from .helpers import client_for

IP = "203.0.113.7"


def tokens(states: list[Any]) -> dict[str, float]:
    return {s.bucket: round(s.tokens, 3) for s in states}


async def codes(client: Any, path: str, n: int, method: str = "GET") -> list[int]:
    return [(await client.request(method, path)).status_code for _ in range(n)]


# -- rate strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "amount", "seconds"),
    [
        ("5/minute", 5, 60),
        ("5 per minute", 5, 60),
        ("10/second", 10, 1),
        ("10/s", 10, 1),
        ("10/sec", 10, 1),
        ("1000/day", 1000, 86_400),
        ("1000 per d", 1000, 86_400),
        ("30/hr", 30, 3600),
        ("30/hours", 30, 3600),
        ("100/5 minutes", 100, 300),
        ("20 per 30s", 20, 30),
        ("7/M", 7, 60),
    ],
)
def test_rate_strings(text: str, amount: int, seconds: int) -> None:
    rule = parse_rule(text)
    assert rule.burst == amount
    assert rule.window == seconds
    assert rule.rate == pytest.approx(amount / seconds)


def test_several_rules_in_one_string_or_several_arguments() -> None:
    assert [r.window for r in parse_rules("10/second; 1000/day")] == [1, 86_400]
    assert [r.window for r in parse_rules(["10/second", "1000/day"])] == [1, 86_400]
    assert parse_rules(5) == (Rule(5),)  # a number is a minute's worth, as limit(5) has always been
    assert [str(r) for r in parse_rules("10/second, 1000/day")] == ["10/second", "1000/day"]


@pytest.mark.parametrize(
    "bad", ["", "five/minute", "5/fortnight", "5", "5/0 minutes", "0/minute", "5/-1 s", ";"]
)
def test_an_unreadable_rate_says_what_the_grammar_is(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_rules(bad)
    assert "'<n>/<unit>'" in str(info.value) or "at least 1 request" in str(info.value)


def test_rate_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="one way"):
        limit(5, rate="5/minute")
    with pytest.raises(ConfigurationError, match="one way"):
        RateGuard(Starlette(), 5, rate="5/minute")
    with pytest.raises(ConfigurationError, match="one way"):
        limit(requests_per_minute=5, rate="5/minute")
    with pytest.raises(ConfigurationError, match="capacity= sets the burst of a single rule"):
        limit("10/second", "100/day", capacity=20)
    with pytest.raises(ConfigurationError, match="same 60 s"):
        limit("10/minute", "20/minute")
    with pytest.raises(ConfigurationError, match="RateLimit header fields"):
        limit(capacity=10**16)
    with pytest.raises(ConfigurationError, match="did you mean 'identifier'"):
        limit(5, identifer=lambda r: "x")  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError) as info:
        limit("lots")
    assert GRAMMAR in str(info.value)
    assert limit("5/minute", capacity=2).policy.rules[0].burst == 2


async def test_a_string_rate_is_the_same_limit_as_a_number(store: Store) -> None:
    app = FastAPI()

    @app.get("/a", dependencies=[Depends(limit("5/minute", store=store))])
    async def a() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        r = await client.get("/a")
        assert await codes(client, "/a", 5) == [200] * 4 + [429]
    assert r.headers["ratelimit-policy"] == '"GET /a";q=5;w=60'


# -- several rules in one limit: one atomic step -----------------------------------------------


async def test_a_burst_rule_and_a_daily_quota_in_one_limit(store: Store) -> None:
    app = FastAPI()

    @app.get("/q", dependencies=[Depends(limit("3/minute", "5/day", store=store))])
    async def q() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        first = await client.get("/q")
        assert await codes(client, "/q", 3) == [200, 200, 429]
        denied = await client.get("/q")
    assert first.headers["ratelimit-policy"] == '"GET /q:1m";q=3;w=60, "GET /q:1d";q=5;w=86400'
    assert first.headers["ratelimit"] == '"GET /q:1m";r=2;t=20, "GET /q:1d";r=4;t=17280'
    assert first.headers["x-ratelimit-limit"] == "3"  # the tightest
    # Refused by the minute rule: 20 s, not the day rule's 17280 s; the day spent only 3.
    assert denied.headers["retry-after"] == "20"
    states = tokens(await store.inspect(IP))
    assert states["GET /q:1m"] < 0.1
    assert states["GET /q:1d"] == pytest.approx(2, abs=0.1)


async def test_a_refusal_by_the_quota_takes_nothing_from_the_burst_rule(store: Store) -> None:
    rules = [("b:1s", Rule.per(10, 1)), ("b:1d", Rule.per(2, 86_400))]
    assert all(d.allowed for d in await store.take_all("c", rules))
    assert all(d.allowed for d in await store.take_all("c", rules))
    refused = await store.take_all("c", rules)
    assert [d.allowed for d in refused] == [True, False]  # the burst rule had tokens, the quota not
    assert refused[0].remaining == 8  # and none was taken from it
    assert 86_400 / 2 - 1 < refused[1].retry_after <= 86_400 / 2


async def test_two_rules_under_concurrency_admit_exactly_the_tighter(store: Store) -> None:
    app = FastAPI()

    @app.get("/q", dependencies=[Depends(limit("1/minute", "3/day", store=store, capacity=None))])
    async def q() -> dict[str, bool]:
        return {"ok": True}

    rg = FastAPI()
    guard = limit(rate=["4/minute", "6/day"], store=store)

    @rg.get("/r", dependencies=[Depends(guard)])
    async def r() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(rg) as client:
        results = await asyncio.gather(*(client.get("/r") for _ in range(40)))
    assert [x.status_code for x in results].count(200) == 4
    states = tokens(await store.inspect(IP))
    assert states["GET /r:1d"] == pytest.approx(2, abs=0.1)  # 6 - the 4 admitted; refusals took nothing


# -- several limits on one request: own buckets, all or nothing --------------------------------


async def test_two_limits_on_one_route_have_their_own_buckets(store: Store) -> None:
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1000, store=store)

    @app.get("/q", dependencies=[Depends(limit(10)), Depends(limit("100/day"))])
    async def q() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        r = await client.get("/q")
    assert r.headers["ratelimit-policy"] == (
        '"global";q=1000;w=60, "GET /q";q=10;w=60, "GET /q#2";q=100;w=86400'
    )
    states = tokens(await store.inspect(IP))
    assert states["GET /q"] == pytest.approx(9, abs=0.1)
    assert states["GET /q#2"] == pytest.approx(99, abs=0.1)  # one request took one, not two
    assert len(r.headers.get_list("ratelimit")) == 1


async def test_three_a_minute_and_five_a_day_on_two_dependencies(store: Store) -> None:
    app = FastAPI()

    @app.get("/q", dependencies=[Depends(limit(3, store=store)), Depends(limit("5/day", store=store))])
    async def q() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        assert await codes(client, "/q", 3) == [200] * 3
        denied = await client.get("/q")
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == "20"  # the minute limit's wait, not a day's
    states = tokens(await store.inspect(IP))
    assert states["GET /q#2"] == pytest.approx(2, abs=0.1)


async def test_router_limit_and_route_limit_and_all_or_nothing(store: Store) -> None:
    router = APIRouter(dependencies=[Depends(limit(100, store=store))])

    @router.get("/upload", dependencies=[Depends(limit(2, store=store))])
    async def upload() -> dict[str, bool]:
        return {"ok": True}

    @router.get("/list")
    async def listing() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.include_router(router)
    async with client_for(app) as client:
        assert await codes(client, "/upload", 4) == [200, 200, 429, 429]
        listed = await client.get("/list")
    # The router-wide limit has a bucket per route; the refused uploads gave back what they took.
    assert listed.headers["ratelimit-policy"] == '"GET /list";q=100;w=60'
    states = tokens(await store.inspect(IP))
    assert states["GET /upload"] == pytest.approx(98, abs=0.1)
    assert states["GET /upload#2"] < 0.1


async def test_two_rateguards_and_a_mounted_apps_rateguard(store: Store) -> None:
    inner = FastAPI()
    inner.add_middleware(RateGuard, requests_per_minute=3, store=store)

    @inner.get("/x")
    async def x() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=50, store=store)
    app.add_middleware(RateGuard, requests_per_minute=100, store=store)
    app.mount("/v2", inner)
    async with client_for(app) as client:
        r = await client.get("/v2/x")
        assert await codes(client, "/v2/x", 3) == [200, 200, 429]
    assert r.headers["ratelimit-policy"] == '"global";q=100;w=60, "global#2";q=50;w=60, "global /v2";q=3;w=60'
    states = tokens(await store.inspect(IP))
    assert states == pytest.approx({"global": 97, "global#2": 47, "global /v2": 0}, abs=0.1)


async def test_a_catch_all_under_two_prefixes_has_two_buckets() -> None:
    router = APIRouter()

    @router.get("/{rest:path}", dependencies=[Depends(limit(1))])
    async def anything(rest: str) -> dict[str, str]:
        return {"rest": rest}

    app = FastAPI()
    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/v2")
    async with client_for(app) as client:
        assert await codes(client, "/v1/a/b", 2) == [200, 429]
        v2 = await client.get("/v2/a/b")
    assert v2.status_code == 200
    assert v2.headers["ratelimit-policy"] == '"GET /v2/{rest:path}";q=1;w=60'


async def test_a_shared_name_is_one_bucket_and_a_clash_fails() -> None:
    store = MemoryStore()
    app = FastAPI()
    shared = limit(2, name="uploads", store=store)
    for path in ("/a", "/b"):
        app.get(path, dependencies=[Depends(shared)])(lambda: {"ok": True})
    app.get("/c", dependencies=[Depends(limit(5, name="uploads", store=store))])(lambda: {"ok": True})
    async with client_for(app) as client:
        assert [(await client.get(p)).status_code for p in ("/a", "/b", "/a")] == [200, 200, 429]
        with pytest.raises(ConfigurationError, match="two limits claim the bucket name 'uploads'"):
            await client.get("/c")


async def test_all_or_nothing_under_concurrency_with_two_app_instances(store: Store) -> None:
    if isinstance(store, RedisStore):
        stores: list[Store] = [store, RedisStore(url=_url_of(store), on_error="deny", timeout=2.0)]
    else:
        stores = [store, store]

    def make(s: Store) -> FastAPI:
        app = FastAPI()
        app.add_middleware(RateGuard, requests_per_minute=1, capacity=30, store=s)

        @app.get("/q", dependencies=[Depends(limit(1, capacity=5))])
        async def q() -> dict[str, bool]:
            return {"ok": True}

        @app.get("/free")
        async def free() -> dict[str, bool]:
            return {"ok": True}

        return app

    try:
        apps = [make(s) for s in stores]
        async with client_for(apps[0]) as a, client_for(apps[1]) as b:
            results = await asyncio.gather(*(c.get("/q") for _ in range(20) for c in (a, b)))
            assert [r.status_code for r in results].count(200) == 5
            states = tokens(await store.inspect(IP))
            # Every refused request gave its global token back: only the 5 admitted spent one.
            assert states["global"] == pytest.approx(25, abs=0.1)
            assert states["GET /q"] < 0.1
            # And the global limit still has them to give: 25 more requests pass elsewhere.
            assert (await codes(a, "/free", 25)).count(200) == 25
    finally:
        if len(stores) == 2 and stores[1] is not store:
            await stores[1].close()


def _url_of(store: Store) -> str:
    assert isinstance(store, RedisStore)
    address = store.deployment.address
    assert address is not None
    return f"redis://{address.host}:{address.port}/{store.deployment.settings.db}"


# -- what clients see --------------------------------------------------------------------------


async def test_without_rateguard_every_limit_shows_and_every_429_has_retry_after() -> None:
    app = FastAPI()
    store = MemoryStore()

    @app.get("/d", dependencies=[Depends(limit(10, store=store)), Depends(limit(2, store=store))])
    async def d() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/s", dependencies=[Depends(limit(1, store=store))])
    async def s() -> StreamingResponse:
        return StreamingResponse(iter([b"a", b"b"]))

    async with client_for(app) as client:
        ok = await client.get("/d")
        await client.get("/d")
        denied = await client.get("/d")
        assert (await client.get("/s")).status_code == 200
        stream_denied = await client.get("/s")
    assert ok.headers["ratelimit-policy"] == '"GET /d";q=10;w=60, "GET /d#2";q=2;w=60'
    assert denied.status_code == 429 and denied.headers["retry-after"] == "30"
    assert denied.headers["ratelimit"].endswith('"GET /d#2";r=0;t=30')
    assert stream_denied.status_code == 429 and stream_denied.headers["retry-after"] == "60"


async def test_a_response_returning_endpoint_without_rateguard_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from rateguard.checks import forget_warnings

    forget_warnings()
    app = FastAPI()

    @app.get("/j", dependencies=[Depends(limit(5))])
    async def j() -> JSONResponse:
        return JSONResponse({"ok": True})

    async with client_for(app) as client:
        for _ in range(3):
            r = await client.get("/j")
    assert "ratelimit" not in r.headers  # FastAPI drops them: the README says so, and so does this:
    warnings = [rec for rec in caplog.records if "[dropped-headers]" in rec.getMessage()]
    assert len(warnings) == 1 and "RateGuard" in warnings[0].getMessage()


async def test_retry_after_is_the_longest_wait_among_the_refusals(store: Store) -> None:
    app = FastAPI()
    app.add_middleware(RateGuard, rate="2/minute", store=store)

    @app.get("/q", dependencies=[Depends(limit("1/hour"))])
    async def q() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        assert await codes(client, "/q", 1) == [200]
        denied = await client.get("/q")
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == "3600"
    assert denied.json()["retry_after"] == 3600


# -- plans: rates per request ------------------------------------------------------------------

PLANS = {"free": "2/minute", "pro": ["10/minute", "1000/day"]}


async def test_plans_per_client_and_an_upgrade_keeps_the_bucket(store: Store) -> None:
    plan_of = {"alice": "free", "bob": "pro"}

    def plan(request: Request) -> Any:
        return PLANS[plan_of[request.headers["x-user"]]]

    app = FastAPI()
    app.add_middleware(RateGuard, rate=plan, identifier=lambda r: r.headers["x-user"], store=store)

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        alice = [(await client.get("/", headers={"x-user": "alice"})).status_code for _ in range(3)]
        bob = await client.get("/", headers={"x-user": "bob"})
        plan_of["alice"] = "pro"  # an upgrade: the next request has the new rules
        upgraded = await client.get("/", headers={"x-user": "alice"})
    assert alice == [200, 200, 429]
    assert bob.headers["ratelimit-policy"] == '"global:1m";q=10;w=60, "global:1d";q=1000;w=86400'
    assert upgraded.status_code == 200
    assert upgraded.headers["ratelimit"].startswith('"global:1m";r=9;')


async def test_a_rate_callable_with_a_bad_answer_is_the_apps_bug() -> None:
    def broken(request: Request) -> str:
        return "lots"

    app = FastAPI()
    app.add_middleware(RateGuard, rate=broken)
    app.get("/")(lambda: {"ok": True})
    async with client_for(app) as client:
        with pytest.raises(ConfigurationError) as info:
            await client.get("/")
    assert any("rate callable" in note and "broken" in note for note in info.value.__notes__)


async def test_an_async_rate_callable_on_a_limit() -> None:
    async def rate(request: Request) -> int:
        return 1 if request.query_params.get("tight") else 100

    app = FastAPI()
    app.get("/r", dependencies=[Depends(limit(rate=rate))])(lambda: {"ok": True})
    async with client_for(app) as client:
        assert await codes(client, "/r?tight=1", 2) == [200, 429]


async def test_rateguard_with_a_daily_quota_string(store: Store) -> None:
    app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))])
    app.add_middleware(RateGuard, rate="100/minute; 10000/day", store=store)
    async with client_for(app) as client:
        r = await client.get("/")
    assert r.headers["ratelimit-policy"] == '"global:1m";q=100;w=60, "global:1d";q=10000;w=86400'


# -- outside HTTP ------------------------------------------------------------------------------


async def test_a_limiter_for_background_jobs(store: Store) -> None:
    mailer = Limiter("2/minute", store=store, name="mailer")
    results = [await mailer.hit("user-42") for _ in range(3)]
    assert [v.allowed for v in results] == [True, True, False]
    assert 29 < results[2].retry_after <= 30
    assert results[1].remaining == 0
    # Keyed as an identifier= callable's value would be: the admin API finds it the same way.
    assert [s.bucket for s in await store.inspect("id:user-42")] == ["mailer"]
    assert await mailer.reset("user-42") == ["mailer"]
    assert (await mailer.hit("user-42", cost=2)).allowed


async def test_a_limiter_with_two_rules_is_all_or_nothing() -> None:
    limiter = Limiter("3/second", "4/hour")
    verdicts = [await limiter.hit("job") for _ in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert [name for name, _ in verdicts[0].decisions] == ["limiter:1s", "limiter:1h"]


# -- OpenAPI -----------------------------------------------------------------------------------


def test_install_declares_the_429_of_limited_routes_in_openapi() -> None:
    router = APIRouter(dependencies=[Depends(limit(100))])
    router.get("/r")(lambda: {"ok": True})
    app = FastAPI()
    app.get("/limited", dependencies=[Depends(limit(5))])(lambda: {"ok": True})
    app.get("/free")(lambda: {"ok": True})
    app.include_router(router, prefix="/v1")
    rateguard.install(app)
    paths = app.openapi()["paths"]
    limited = paths["/limited"]["get"]["responses"]["429"]
    assert "Retry-After" in limited["headers"]
    assert "429" in paths["/v1/r"]["get"]["responses"]
    assert "429" not in paths["/free"]["get"]["responses"]


def test_install_leaves_an_apps_own_handler_alone() -> None:
    from starlette.exceptions import HTTPException

    app = FastAPI()

    @app.exception_handler(HTTPException)
    async def mine(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"mine": True}, status_code=429)

    rateguard.install(app)
    assert rateguard.RateLimitExceeded not in app.exception_handlers
    with pytest.raises(RuntimeError, match="before the app serves"):
        from fastapi.testclient import TestClient

        with TestClient(app):
            rateguard.install(app)


async def test_mounted_plain_starlette_app_with_rateguard_and_limits_in_fastapi() -> None:
    sub = Starlette(routes=[Route("/x", lambda r: PlainTextResponse("x"))])
    sub.add_middleware(RateGuard, requests_per_minute=1, name="sub")
    app = Starlette(routes=[Mount("/s", sub)])
    async with client_for(app) as client:
        assert await codes(client, "/s/x", 2) == [200, 429]


async def test_header_values_are_valid_structured_fields_whatever_the_name() -> None:
    app = FastAPI()
    app.get("/u", dependencies=[Depends(limit(5, name='über "straße" 100%'))])(lambda: {"ok": True})
    async with client_for(app) as client:
        r = await client.get("/u")
    policy = r.headers["ratelimit-policy"]
    assert policy == '"%C3%BCber \\"stra%C3%9Fe\\" 100%25";q=5;w=60'
    assert policy.isascii() and all(" " <= c <= "~" for c in policy)
    # Every integer of the fields has at most 15 digits: rules are bounded when they are made.
    with pytest.raises(ConfigurationError, match="15 digits"):
        Rule(1, capacity=10**15)
    with pytest.raises(ConfigurationError, match="longer than"):
        Rule(1e-14, capacity=100)


async def test_a_per_message_hit_uses_the_store_of_the_rateguard_in_front(store: Store) -> None:
    messages = limit("2/minute")
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1000, store=store)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        for _ in range(3):
            await websocket.send_text(str((await messages.hit(websocket)).allowed))

    from fastapi.testclient import TestClient

    with TestClient(app, client=(IP, 5000)) as client, client.websocket_connect("/ws") as conn:
        seen = [conn.receive_text() for _ in range(3)]
    assert seen == ["True", "True", "False"]
    assert [s.bucket for s in await store.inspect(IP)] == ["WS /ws (hit)"]


async def test_testing_reset_clears_every_store_of_an_app(store: Store) -> None:
    from rateguard.testing import reset

    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1, store=store)
    app.get("/")(lambda: {"ok": True})
    async with client_for(app) as client:
        assert await codes(client, "/", 2) == [200, 429]
        await reset(app)
        assert await codes(client, "/", 2) == [200, 429]


async def test_the_rules_of_a_call_are_the_ones_passed_even_in_a_list_changed_since(store: Store) -> None:
    # A store may keep what it derived from a tuple of rules; a list can change in place.
    rules = [("m:1s", Rule.per(10, 1)), ("m:1d", Rule.per(5, 86_400))]
    for _ in range(2):  # the second on a store already connected, as in a running app
        assert [d.limit for d in await store.take_all("c", rules)] == [10, 5]
    rules[1] = ("m:1d", Rule.per(1, 86_400))
    decisions = await store.take_all("c", rules)
    assert [d.limit for d in decisions] == [10, 1]
    assert decisions[1].remaining == 0  # the day's three tokens left are capped by the new rule
    as_tuple = tuple(rules)
    for _ in range(2):  # the same tuple again: the same answer
        assert [d.allowed for d in await store.take_all("c", as_tuple)] == [True, False]
