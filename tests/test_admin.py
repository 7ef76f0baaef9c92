"""The admin API: stats, inspect, reset on both stores; who may call it; identifiers as opaque text."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request

from rateguard import (
    ConfigurationError,
    MemoryStore,
    RateGuard,
    RedisStore,
    admin_router,
    encode_identifier,
    limit,
)
from rateguard.admin import client_keys, discover_rules
from rateguard.stores import Store, StoreStats
from rateguard.topk import LimitedClients

from .conftest import free_port
from .helpers import client_for

TOKEN = "s3cret-admin-token-0123456789"
CLIENT = "203.0.113.7"
LOOPBACK = "127.0.0.1"


def api_key(request: Request) -> str | None:
    return request.headers.get("x-api-key")


def admin_app(
    store: Store | None = None,
    *,
    token: str | None = None,
    rpm: float = 60,
    limited: LimitedClients | None = None,
    **options: Any,
) -> FastAPI:
    """A global limit, a 5/min route, and the admin API at /admin (not limited itself)."""
    app = FastAPI()
    app.add_middleware(
        RateGuard,
        requests_per_minute=rpm,
        store=store,
        skip=lambda request: request.url.path.startswith("/admin/"),
        **options,
    )
    app.mount("/admin", admin_router(token=token, limited=limited))

    @app.get("/api/data")
    async def data() -> dict[str, bool]:
        return {"ok": True}

    @app.api_route("/api/expensive", methods=["GET", "POST"], dependencies=[Depends(limit(5, **options))])
    async def expensive() -> dict[str, bool]:
        return {"ok": True}

    return app


async def hit(app: FastAPI, path: str, n: int, ip: str = CLIENT, **kwargs: Any) -> list[int]:
    async with client_for(app, ip) as client:
        return [(await client.get(path, **kwargs)).status_code for _ in range(n)]


async def admin(app: FastAPI, method: str, path: str, ip: str = LOOPBACK, **kwargs: Any) -> httpx.Response:
    async with client_for(app, ip) as client:
        return await client.request(method, "/admin" + path, **kwargs)


def by_bucket(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["bucket"]: b for b in body["buckets"]}


# -- stats -------------------------------------------------------------------------------------


async def test_stats_counts_buckets_store_and_rules(store: Store) -> None:
    app = admin_app(store)
    assert await hit(app, "/api/expensive", 7) == [200] * 5 + [429] * 2
    r = await admin(app, "GET", "/stats")
    assert r.status_code == 200
    body = r.json()
    # Counted per decision: 7 global admissions, 5 route admissions and 2 route denials.
    assert body["decisions"] == {"allowed": 12, "limited": 2, "this_server": {"allowed": 12, "limited": 2}}
    assert body["buckets"] == 2
    assert body["store"]["kind"] == store.kind
    assert body["store"]["healthy"] is True
    assert body["store"]["degraded"] is False
    assert body["store"]["shared"] is (store.kind == "redis")
    if store.kind == "redis":
        assert body["store"]["latency_ms"] >= 0
    assert [s["kind"] for s in body["stores"]] == [store.kind]
    assert body["rules"] == [
        {
            "bucket": "global",
            "applies_to": "every request",
            "rate": "60/minute",
            "requests_per_minute": 60,
            "capacity": 60,
            "window": 60,
            "identity": "address",
            "mode": "enforce",
            "store": store.kind,
        },
        {
            "bucket": "GET,POST /api/expensive",
            "applies_to": "GET,POST /api/expensive",
            "rate": "5/minute",
            "requests_per_minute": 5,
            "capacity": 5,
            "window": 60,
            "identity": "address",
            "mode": "enforce",
            "store": store.kind,
        },
    ]
    assert body["server"]["pid"] > 0


async def test_stats_reports_an_unreachable_redis_instead_of_failing() -> None:
    dead = RedisStore(url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        r = await admin(admin_app(dead), "GET", "/stats")
    finally:
        await dead.close()
    assert r.status_code == 200
    store = r.json()["store"]
    assert store["kind"] == "redis"
    assert store["healthy"] is False
    assert store["detail"]


async def test_inspect_and_reset_answer_503_when_redis_is_unreachable() -> None:
    dead = RedisStore(url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        app = admin_app(dead)
        inspect = await admin(app, "GET", f"/bucket/{CLIENT}")
        reset = await admin(app, "POST", f"/reset/{CLIENT}")
    finally:
        await dead.close()
    for r in (inspect, reset):
        assert r.status_code == 503
        assert r.json()["error"] == "Service Unavailable"


class BrokenStore(MemoryStore):
    async def stats(self) -> StoreStats:
        raise RuntimeError("stats are broken")


async def test_a_store_whose_stats_raise_is_reported_unhealthy() -> None:
    r = await admin(admin_app(BrokenStore()), "GET", "/stats")
    assert r.status_code == 200
    assert r.json()["store"]["healthy"] is False
    assert "stats are broken" in r.json()["store"]["detail"]


# -- bucket ------------------------------------------------------------------------------------


async def test_unknown_client_gets_full_buckets(store: Store) -> None:
    app = admin_app(store)
    r = await admin(app, "GET", "/bucket/198.51.100.1")
    assert r.status_code == 200
    body = r.json()
    assert body["identifier"] == "198.51.100.1"
    buckets = by_bucket(body)
    assert set(buckets) == {"global", "GET,POST /api/expensive"}
    for b in buckets.values():
        assert b["stored"] is False
        assert b["tokens"] == b["capacity"]
        assert b["retry_after"] == 0
        assert b["reset_after"] == 0
        assert b["key"] == "198.51.100.1"
    assert buckets["GET,POST /api/expensive"]["capacity"] == 5
    assert buckets["GET,POST /api/expensive"]["requests_per_minute"] == pytest.approx(5)
    assert buckets["global"]["applies_to"] == "every request"
    assert buckets["GET,POST /api/expensive"]["applies_to"] == "GET,POST /api/expensive"


async def test_bucket_shows_tokens_retry_and_reset_after_traffic(store: Store) -> None:
    app = admin_app(store)
    await hit(app, "/api/expensive", 6)
    r = await admin(app, "GET", f"/bucket/{CLIENT}")
    buckets = by_bucket(r.json())
    route = buckets["GET,POST /api/expensive"]
    assert route["stored"] is True
    assert route["key"] == CLIENT
    assert 0 <= route["tokens"] < 0.1
    assert route["capacity"] == 5
    assert route["rate"] == pytest.approx(5 / 60)
    assert 11 < route["retry_after"] <= 12
    assert 59 < route["reset_after"] <= 60
    # The refused sixth request got its global token back: 5 taken.
    assert 55 <= buckets["global"]["tokens"] < 55.2
    assert buckets["global"]["retry_after"] == 0


async def test_bucket_rejects_an_unknown_kind() -> None:
    r = await admin(admin_app(MemoryStore()), "GET", "/bucket/x?kind=regex")
    assert r.status_code == 400
    assert "kind must be one of" in r.json()["message"]


# -- reset -------------------------------------------------------------------------------------


async def test_reset_clears_every_bucket_of_the_client_only(store: Store) -> None:
    app = admin_app(store)
    assert await hit(app, "/api/expensive", 6) == [200] * 5 + [429]
    assert await hit(app, "/api/expensive", 6, ip="198.51.100.9") == [200] * 5 + [429]
    r = await admin(app, "POST", f"/reset/{CLIENT}")
    assert r.status_code == 200
    body = r.json()
    assert body["identifier"] == CLIENT
    assert sorted(c["bucket"] for c in body["cleared"]) == ["GET,POST /api/expensive", "global"]
    assert {c["key"] for c in body["cleared"]} == {CLIENT}
    assert await hit(app, "/api/expensive", 1) == [200]
    assert await hit(app, "/api/expensive", 1, ip="198.51.100.9") == [429]
    again = await admin(app, "POST", "/reset/192.0.2.200")
    assert again.json()["cleared"] == []


async def test_reset_needs_post() -> None:
    r = await admin(admin_app(MemoryStore()), "GET", f"/reset/{CLIENT}")
    assert r.status_code == 405


@pytest.mark.parametrize("pattern", ["*", "?", "[ab]", "a*", "\\", "{a}", ".*"])
async def test_an_identifier_is_never_a_pattern(store: Store, pattern: str) -> None:
    app = admin_app(store, identifier=api_key)
    names = ["a", "ab", "b", "*", "?", "[ab]", "a*", "\\", "{a}", ".*", "x.y"]
    for name in names:
        assert await hit(app, "/api/data", 1, headers={"x-api-key": name}) == [200]
    r = await admin(app, "POST", "/reset/" + quote(pattern, safe=""))
    assert r.status_code == 200
    assert r.json()["cleared"] == [
        {"key": "id:" + encode_identifier(pattern), "bucket": "global", "store": store.kind}
    ]
    for name in names:
        left = await store.inspect("id:" + encode_identifier(name))
        assert bool(left) is (name != pattern), name


@pytest.mark.parametrize(
    ("sent_path", "identifier"),
    [
        ("a%2Fb", "a/b"),
        ("%D0%BA%D0%BB%D1%8E%D1%87", "ключ"),
        ("%F0%9F%94%91%20key", "🔑 key"),
        ("100%25", "100%"),
        ("..%2F..%2Fetc", "../../etc"),
    ],
)
async def test_identifiers_in_paths_are_opaque_text(store: Store, sent_path: str, identifier: str) -> None:
    async def utf8_key(request: Request) -> str | None:
        value = request.headers.get("x-api-key")  # header bytes arrive as latin-1 text
        return None if value is None else value.encode("latin-1").decode("utf-8")

    app = admin_app(store, identifier=utf8_key)
    assert await hit(app, "/api/expensive", 1, headers={"x-api-key": identifier.encode()}) == [200]

    r = await admin(app, "GET", f"/bucket/{sent_path}?kind=identifier")
    assert r.status_code == 200
    body = r.json()
    assert body["identifier"] == identifier
    assert {b["bucket"]: b["stored"] for b in body["buckets"]} == {
        "global": True,
        "GET,POST /api/expensive": True,
    }

    r = await admin(app, "POST", f"/reset/{sent_path}?kind=identifier")
    assert len(r.json()["cleared"]) == 2
    assert not any(b["stored"] for b in (await admin(app, "GET", f"/bucket/{sent_path}")).json()["buckets"])


async def test_an_ipv6_address_finds_its_64_group(store: Store) -> None:
    app = admin_app(store)
    assert await hit(app, "/api/expensive", 6, ip="2001:db8:1:2::5") == [200] * 5 + [429]
    for asked in ("2001:db8:1:2::1", "[2001:db8:1:2::99]", "2001:db8:1:2::/64"):
        body = (await admin(app, "GET", f"/bucket/{asked}")).json()
        route = by_bucket(body)["GET,POST /api/expensive"]
        assert route["stored"] is True, asked
        assert route["key"] == "2001:db8:1:2::%2F64"
    other = by_bucket((await admin(app, "GET", "/bucket/2001:db8:1:3::5")).json())
    assert other["GET,POST /api/expensive"]["stored"] is False
    r = await admin(app, "POST", "/reset/2001:db8:1:2::abcd")
    assert len(r.json()["cleared"]) == 2
    assert await hit(app, "/api/expensive", 1, ip="2001:db8:1:2::5") == [200]


async def test_ipv4_mapped_address_finds_the_ipv4_bucket() -> None:
    app = admin_app(MemoryStore())
    await hit(app, "/api/data", 1)
    body = (await admin(app, "GET", f"/bucket/::ffff:{CLIENT}")).json()
    assert by_bucket(body)["global"]["stored"] is True


def test_client_keys_for_each_kind() -> None:
    assert client_keys("1.2.3.4", "any", []) == ["1.2.3.4", "id:1.2.3.4"]
    assert client_keys("1.2.3.4", "address", []) == ["1.2.3.4"]
    assert client_keys("*", "identifier", []) == ["id:%2A"]
    assert client_keys("2001:db8::1", "address", []) == ["2001:db8::%2F64"]
    assert client_keys("unknown", "address", []) == ["unknown"]


async def test_api_key_identity_is_found_by_default_and_by_kind(store: Store) -> None:
    app = admin_app(store, identifier=api_key)
    await hit(app, "/api/data", 3, headers={"x-api-key": "team-42"})
    for query in ("", "?kind=identifier"):
        body = (await admin(app, "GET", f"/bucket/team-42{query}")).json()
        assert by_bucket(body)["global"]["stored"] is True
        assert by_bucket(body)["global"]["key"] == "id:team-42"
    body = (await admin(app, "GET", "/bucket/team-42?kind=address")).json()
    assert by_bucket(body)["global"]["stored"] is False


# -- rules found in the app --------------------------------------------------------------------


async def test_rules_from_included_routers_mounts_and_shared_names() -> None:
    store = MemoryStore()
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=100, store=store, name="site")
    app.mount("/admin", admin_router())
    v1 = APIRouter(dependencies=[Depends(limit(7))])

    @v1.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    app.include_router(v1, prefix="/v1")
    shared = limit(3, name="uploads")

    @app.post("/upload/a", dependencies=[Depends(shared)])
    async def upload_a() -> None:
        return None

    @app.post("/upload/b", dependencies=[Depends(shared)])
    async def upload_b() -> None:
        return None

    async def nested(_: None = Depends(limit(2))) -> None:
        return None

    @app.get("/nested", dependencies=[Depends(nested)])
    async def nested_route() -> None:
        return None

    sub = FastAPI()

    @sub.get("/deep", dependencies=[Depends(limit(4))])
    async def deep() -> None:
        return None

    app.mount("/sub", sub)

    async with client_for(app) as client:
        for method, path in [("GET", "/v1/items/1"), ("POST", "/upload/a"), ("POST", "/upload/b")]:
            assert (await client.request(method, path)).status_code == 200
        assert (await client.get("/nested")).status_code == 200
        assert (await client.get("/sub/deep")).status_code == 200

    rules = {r["bucket"]: r for r in (await admin(app, "GET", "/stats")).json()["rules"]}
    assert {b: r["requests_per_minute"] for b, r in rules.items()} == {
        "site": 100,
        "GET /v1/items/{item_id}": 7,  # the router's prefix is part of the bucket
        "uploads": 3,
        "GET /nested": 2,
        "GET /sub/deep": 4,  # and so is the mount's
    }
    assert rules["GET /v1/items/{item_id}"]["applies_to"] == "GET /v1/items/{item_id}"
    assert rules["uploads"]["applies_to"] == "POST /upload/a, POST /upload/b"
    # Every bucket the app stored is matched to a rule: the names agree with limit()'s.
    body = (await admin(app, "GET", f"/bucket/{CLIENT}")).json()
    assert all(b["stored"] and b["applies_to"] is not None for b in body["buckets"])
    assert len(body["buckets"]) == 5


async def test_a_route_with_its_own_store_is_reported_and_reset() -> None:
    main, own = MemoryStore(), MemoryStore()
    app = FastAPI()
    app.add_middleware(RateGuard, store=main, skip=lambda r: r.url.path.startswith("/admin/"))
    app.mount("/admin", admin_router())

    @app.get("/own", dependencies=[Depends(limit(2, store=own))])
    async def own_route() -> None:
        return None

    assert await hit(app, "/own", 3) == [200, 200, 429]
    body = (await admin(app, "GET", "/stats")).json()
    assert len(body["stores"]) == 2
    assert body["buckets"] == 2
    cleared = (await admin(app, "POST", f"/reset/{CLIENT}")).json()["cleared"]
    assert sorted(c["bucket"] for c in cleared) == ["GET /own", "global"]
    assert await hit(app, "/own", 1) == [200]


async def test_explicit_store_without_middleware() -> None:
    store = MemoryStore()
    await store.take(CLIENT, "elsewhere", limit(1).policy.rule)
    app = FastAPI()
    app.mount("/admin", admin_router(store))
    body = (await admin(app, "GET", f"/bucket/{CLIENT}")).json()
    assert [(b["bucket"], b["stored"], b["applies_to"]) for b in body["buckets"]] == [
        ("elsewhere", True, None)
    ]
    assert discover_rules(None) == []


# -- who may call ------------------------------------------------------------------------------

PATHS = [("GET", "/stats"), ("GET", f"/bucket/{CLIENT}"), ("POST", f"/reset/{CLIENT}"), ("GET", "/nope")]


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_without_token_loopback_peers_may_call(peer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATEGUARD_ADMIN_TOKEN", raising=False)
    app = admin_app(MemoryStore())
    for method, path in PATHS:
        r = await admin(app, method, path, ip=peer)
        assert r.status_code == (404 if path == "/nope" else 200), (method, path)


@pytest.mark.parametrize(
    "peer", [CLIENT, "10.0.0.1", "192.168.1.2", "2001:db8::1", "::ffff:8.8.8.8", "testclient"]
)
async def test_without_token_other_peers_are_forbidden(peer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATEGUARD_ADMIN_TOKEN", raising=False)
    app = admin_app(MemoryStore())
    for method, path in PATHS:
        r = await admin(app, method, path, ip=peer)
        assert r.status_code == 403, (method, path)
        assert r.json()["error"] == "Forbidden"


@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded", "x-real-ip"])
async def test_forwarding_headers_never_grant_access(header: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATEGUARD_ADMIN_TOKEN", raising=False)
    app = admin_app(MemoryStore())
    value = "for=127.0.0.1" if header == "forwarded" else "127.0.0.1"
    r = await admin(app, "GET", "/stats", ip=CLIENT, headers={header: value})
    assert r.status_code == 403
    # A loopback peer that forwards someone else's request is a proxy on this host: refused too.
    r = await admin(app, "GET", "/stats", ip=LOOPBACK, headers={header: value})
    assert r.status_code == 403
    assert "proxy" in r.json()["message"]


async def test_no_client_address_is_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATEGUARD_ADMIN_TOKEN", raising=False)
    api = admin_router()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/stats", "headers": [], "client": None}
    await api(scope, receive, send)
    assert sent[0]["status"] == 403


async def test_token_is_required_from_every_peer() -> None:
    app = admin_app(MemoryStore(), token=TOKEN)
    for peer in (LOOPBACK, CLIENT):
        for method, path in PATHS:
            r = await admin(app, method, path, ip=peer)
            assert r.status_code == 401, (peer, method, path)
            assert r.headers["www-authenticate"] == 'Bearer realm="rateguard-admin"'
            assert r.json()["error"] == "Unauthorized"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token-wrong-token-00",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer",
        f"Bearer {TOKEN.upper()}",
    ],
)
async def test_a_wrong_token_is_refused(authorization: str) -> None:
    app = admin_app(MemoryStore(), token=TOKEN)
    r = await admin(app, "GET", "/stats", ip=CLIENT, headers={"authorization": authorization})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_two_authorization_headers_are_refused() -> None:
    app = admin_app(MemoryStore(), token=TOKEN)
    headers = [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")]
    r = await admin(app, "GET", "/stats", ip=CLIENT, headers=headers)
    assert r.status_code == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
async def test_the_right_token_is_accepted_from_anywhere(scheme: str) -> None:
    app = admin_app(MemoryStore(), token=TOKEN)
    headers = {"authorization": f"{scheme} {TOKEN}"}
    for method, path in PATHS:
        r = await admin(app, method, path, ip=CLIENT, headers=headers)
        assert r.status_code == (404 if path == "/nope" else 200), (method, path)


async def test_token_is_read_from_the_environment_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_ADMIN_TOKEN", f"  {TOKEN}\n")
    app = admin_app(MemoryStore())
    monkeypatch.delenv("RATEGUARD_ADMIN_TOKEN")
    assert (await admin(app, "GET", "/stats")).status_code == 401
    ok = await admin(app, "GET", "/stats", ip=CLIENT, headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


async def test_an_empty_token_variable_means_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_ADMIN_TOKEN", "  ")
    app = admin_app(MemoryStore())
    assert (await admin(app, "GET", "/stats")).status_code == 200
    assert (await admin(app, "GET", "/stats", ip=CLIENT)).status_code == 403


@pytest.mark.parametrize(
    "token", ["", "has space in it, long enough", "tab\tseparated-token-xx", "ключ-ключ-ключ-ключ"]
)
def test_unusable_tokens_are_configuration_errors(token: str) -> None:
    with pytest.raises(ConfigurationError, match="token"):
        admin_router(token=token)


def test_a_short_token_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rateguard.admin"):
        admin_router(token="short")
    assert "only 5 characters" in caplog.text


def test_store_must_be_a_store() -> None:
    with pytest.raises(ConfigurationError, match="store must be"):
        admin_router("redis://localhost")  # type: ignore[arg-type]


async def test_reset_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    app = admin_app(MemoryStore())
    await hit(app, "/api/data", 1)
    with caplog.at_level(logging.INFO, logger="rateguard.admin"):
        await admin(app, "POST", f"/reset/{CLIENT}")
    assert f"admin reset of '{CLIENT}'" in caplog.text
    assert "from 127.0.0.1 cleared 1 bucket(s)" in caplog.text
