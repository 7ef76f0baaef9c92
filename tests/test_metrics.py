"""Observability without a browser: Prometheus metrics, the admin's live counters and dashboard page, logs."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from demo.app import create_app
from rateguard import MemoryStore, RedisStore, admin_router, limit
from rateguard.admin import decision_counts, mask
from rateguard.metrics import RateGuardCollector, instrument
from rateguard.stores import Store, StoreStats
from rateguard.topk import LimitedClients

from .conftest import free_port
from .helpers import client_for
from .test_admin import CLIENT, admin_app, api_key, hit

TOKEN = "observability-token-0123456789"
API_KEY = "sk_live_51HqLyjWDarjtT1zdp7dc"


def small_app(store: Store | None = None, limited: LimitedClients | None = None, **options: Any) -> FastAPI:
    """A global limit of 60/min, a 5/min route, the admin API at /admin (not limited itself)."""
    return admin_app(store, token=TOKEN, limited=limited, **options)


async def admin_get(app: FastAPI, path: str, ip: str = CLIENT, **kwargs: Any) -> Any:
    async with client_for(app, ip) as client:
        r = await client.get("/admin" + path, headers={"authorization": f"Bearer {TOKEN}"}, **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def scrape(app: FastAPI, store: Store | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a fresh registry holding only this app's collector."""
    registry = CollectorRegistry()
    instrument(app, registry, store=store)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


# -- metrics -----------------------------------------------------------------------------------


async def test_decisions_by_rule_and_outcome(store: Store) -> None:
    app = small_app(store)
    assert await hit(app, "/api/expensive", 7) == [200] * 5 + [429] * 2
    m = scrape(app)
    route = "GET,POST /api/expensive"
    assert sample(m, "rateguard_decisions_total", rule="global", outcome="allowed") == 7
    assert sample(m, "rateguard_decisions_total", rule="global", outcome="limited") == 0
    assert sample(m, "rateguard_decisions_total", rule=route, outcome="allowed") == 5
    assert sample(m, "rateguard_decisions_total", rule=route, outcome="limited") == 2
    assert sample(m, "rateguard_decisions_total", rule=route, outcome="degraded") == 0
    assert decision_counts(app) == {"global": (7, 0, 0, 0), route: (5, 2, 0, 0)}


def test_rules_without_decisions_yet_are_zero() -> None:
    from fastapi.testclient import TestClient

    app = small_app(MemoryStore())
    with TestClient(app):  # RateGuard lists the app's declared limits at start-up
        pass
    m = scrape(app)
    assert sample(m, "rateguard_decisions_total", rule="GET,POST /api/expensive", outcome="allowed") == 0


async def test_labels_never_name_a_client() -> None:
    app = small_app(MemoryStore(), identifier=api_key)
    await hit(app, "/api/data", 1)  # Starlette builds the middleware (and so RateGuard) on a first request
    before = set(scrape(app))
    for i in range(50):
        await hit(app, "/api/expensive", 6, ip=f"198.51.100.{i}", headers={"x-api-key": f"key-{i}"})
    after = scrape(app)
    assert set(after) == before  # the same series: traffic adds none
    labels = {v for (_, labels) in after for _, v in labels}
    assert not any("198.51.100" in v or "key-" in v for v in labels)


@pytest.mark.redis
async def test_redis_latency_errors_circuit_and_deny_cache(redis_url: str) -> None:
    store = RedisStore(url=redis_url)
    try:
        app = small_app(store)
        assert await hit(app, "/api/expensive", 8) == [200] * 5 + [429] * 3
        m = scrape(app)
        count = sample(m, "rateguard_store_latency_seconds_count", store="redis")
        assert count == store.latency.count > 0
        assert sample(m, "rateguard_store_latency_seconds_bucket", store="redis", le="+Inf") == count
        buckets = [
            (float(dict(labels)["le"]), value)
            for (name, labels), value in m.items()
            if name == "rateguard_store_latency_seconds_bucket"
        ]
        values = [v for _, v in sorted(buckets)]
        assert values == sorted(values)  # cumulative
        latency_sum = sample(m, "rateguard_store_latency_seconds_sum", store="redis")
        assert latency_sum == pytest.approx(store.latency.sum)
        assert sample(m, "rateguard_store_errors_total", store="redis") == 0
        assert sample(m, "rateguard_circuit_open", store="redis") == 0
        assert sample(m, "rateguard_deny_cache_hits_total", store="redis") == store.deny_cache_hits
        assert sample(m, "rateguard_degraded_decisions_total", store="redis") == 0
    finally:
        await store.close()


async def test_an_unreachable_redis_opens_the_circuit_and_decisions_are_degraded() -> None:
    store = RedisStore(url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        app = small_app(store)
        assert await hit(app, "/api/data", 3) == [200] * 3
        m = scrape(app)
    finally:
        await store.close()
    assert sample(m, "rateguard_circuit_open", store="redis") == 1
    assert sample(m, "rateguard_store_errors_total", store="redis") >= 1
    assert sample(m, "rateguard_degraded_decisions_total", store="redis") == 3
    assert sample(m, "rateguard_decisions_total", rule="global", outcome="degraded") == 3
    assert sample(m, "rateguard_decisions_total", rule="global", outcome="allowed") == 0


class NoStats(MemoryStore):
    async def stats(self) -> StoreStats:
        raise AssertionError("a scrape or a /live poll must not call the store")


async def test_a_scrape_reads_memory_only_and_labels_two_stores_of_a_kind() -> None:
    main, own = NoStats(), NoStats()
    app = small_app(main)

    @app.get("/own", dependencies=[Depends(limit(2, store=own))])
    async def own_route() -> None:
        return None

    await hit(app, "/own", 3)
    m = scrape(app)
    assert sample(m, "rateguard_decisions_total", rule="GET /own", outcome="limited") == 1
    assert not any(name.startswith("rateguard_store_") for name, _ in m)  # memory stores: no latency
    live = await admin_get(app, "/live")
    assert [s["store"] for s in live["stores"]] == ["memory", "memory_2"]


async def test_instrument_twice_or_for_two_apps_sums_on_one_collector() -> None:
    registry = CollectorRegistry()
    first, second = small_app(MemoryStore()), small_app(MemoryStore())
    assert instrument(first, registry) is instrument(first, registry)  # an app factory, twice
    instrument(second, registry)
    assert await hit(first, "/api/data", 3) == [200] * 3
    assert await hit(second, "/api/data", 2) == [200] * 2
    text = generate_latest(registry).decode()
    assert 'rateguard_decisions_total{outcome="allowed",rule="global"} 5.0' in text
    assert text.count("# TYPE rateguard_decisions_total counter") == 1
    # A collector of its own on another registry: the same names are refused there only once.
    other = CollectorRegistry()
    other.register(RateGuardCollector(first))
    with pytest.raises(ValueError, match="Duplicated"):
        other.register(RateGuardCollector(first))


def test_rateguard_imports_without_prometheus_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"  # as if it were not installed
        "import rateguard, rateguard.admin, rateguard.topk\n"
        "assert 'prometheus_client' not in [m for m, v in sys.modules.items() if v is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_metrics_without_prometheus_client_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "rateguard.metrics")
    with pytest.raises(ImportError, match=r"pip install 'fastapi-rateguard\[prometheus\]'"):
        importlib.import_module("rateguard.metrics")


async def test_demo_serves_metrics_unlimited(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "RATEGUARD_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RATEGUARD_RPM", "1")
    app = create_app()
    async with client_for(app) as client:
        await client.get("/api/data")
        assert (await client.get("/api/data")).status_code == 429
        scrapes = [await client.get("/metrics") for _ in range(3)]
    assert [r.status_code for r in scrapes] == [200] * 3
    assert scrapes[0].headers["content-type"].startswith("text/plain; version=")
    assert 'rateguard_decisions_total{outcome="limited",rule="global"} 1.0' in scrapes[-1].text
    assert "process_cpu_seconds_total" in scrapes[-1].text
    await app.state.store.close()


async def test_demo_without_prometheus_client_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # the Docker image's [demo] extra
    monkeypatch.delitem(sys.modules, "rateguard.metrics")
    app = create_app()
    async with client_for(app) as client:
        r = await client.get("/metrics")
        assert (await client.get("/api/data")).status_code == 200
    assert r.status_code == 501
    assert "pip install 'fastapi-rateguard[prometheus]'" in r.text
    await app.state.store.close()


# -- the admin's live counters -----------------------------------------------------------------


async def test_live_counts_rules_stores_and_the_most_limited_clients(store: Store) -> None:
    tracker = LimitedClients()
    app = small_app(store, limited=tracker)
    await hit(app, "/api/expensive", 7)
    # What RateGuard and limit() feed on each denial (the client ids as the store keys them).
    for _ in range(3):
        tracker.add("2001:db8:1:2::%2F64", "global")
    tracker.add("id:" + API_KEY, "GET,POST /api/expensive")
    tracker.add(CLIENT, "GET,POST /api/expensive")

    live = await admin_get(app, "/live")
    assert live["decisions"] == {"allowed": 12, "limited": 2, "degraded": 0, "shadow_limited": 0}
    assert isinstance(live["t"], float)
    rules = {r["bucket"]: r for r in live["rules"]}
    route = rules["GET,POST /api/expensive"]
    assert (route["allowed"], route["limited"], route["degraded"]) == (5, 2, 0)
    assert rules["global"]["requests_per_minute"] == 60
    (health,) = live["stores"]
    assert health["store"] == store.kind
    assert health["circuit_open"] is False
    if store.kind == "redis":
        assert health["errors"] == 0
        assert len(health["latency"]["counts"]) == len(health["latency"]["bounds"])
        assert health["latency"]["bounds"][-1] is None  # +Inf
    else:
        assert health["latency"] is None

    clients = live["limited_clients"]["clients"]
    assert live["limited_clients"]["window"] == 300
    assert clients[0] == {
        "client": "2001:db8:1:2::/64",
        "search": "2001:db8:1:2::/64",  # what the admin's search box takes
        "count": 3,
        "error": 0,
        "bucket": "global",
        "seconds_ago": clients[0]["seconds_ago"],
    }
    shown = {c["client"]: c["search"] for c in clients}
    assert shown[CLIENT] == CLIENT
    # An identity from identifier= may be an API key: masked, and not offered for search.
    assert shown["id:sk_l… (29)"] is None
    assert API_KEY not in str(live)


async def test_live_never_calls_the_store() -> None:
    live = await admin_get(small_app(NoStats()), "/live")
    assert live["stores"][0]["kind"] == "memory"


def test_mask_keeps_little_of_a_secret() -> None:
    assert mask(API_KEY) == "sk_l… (29)"
    assert mask("team-42") == "t… (7)"
    assert mask("ab") == "… (2)"


# -- the dashboard page ------------------------------------------------------------------------


async def test_dashboard_page_is_served_without_the_token_but_nothing_else_is() -> None:
    app = small_app(MemoryStore())
    async with client_for(app, CLIENT) as client:
        page = await client.get("/admin/")
        head = await client.head("/admin/")
        refused = [await client.get(p) for p in ("/admin/live", "/admin/stats", "/admin/index.html")]
        posted = await client.post("/admin/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<input id="token" type="password"' in page.text
    assert head.status_code == 200
    assert [r.status_code for r in refused] == [401] * 3
    assert posted.status_code == 401
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "'unsafe-inline'" not in csp and "http" not in csp  # only its own inline code, no CDN
    assert page.headers["cache-control"] == "no-store"


async def test_dashboard_works_offline() -> None:
    async with client_for(small_app(MemoryStore()), CLIENT) as client:
        page = (await client.get("/admin/")).text
    for remote in ("http://", "https://", "//cdn", "@import", "url("):
        assert remote not in page, remote


async def test_without_token_the_page_follows_the_loopback_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATEGUARD_ADMIN_TOKEN", raising=False)
    app = FastAPI()
    app.mount("/admin", admin_router())
    async with client_for(app, CLIENT) as stranger, client_for(app, "127.0.0.1") as local:
        assert (await stranger.get("/admin/")).status_code == 403
        assert (await local.get("/admin/")).status_code == 200
        assert (await local.get("/admin/live")).status_code == 200


async def test_demo_dashboard_address_redirects_to_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_ADMIN_TOKEN", TOKEN)
    monkeypatch.delenv("REDIS_URL", raising=False)
    app = create_app()
    async with client_for(app) as client:
        r = await client.get("/api/admin", follow_redirects=True)
        assert (await client.get("/")).json()["links"]["/api/admin/"] == "admin dashboard"
    assert r.status_code == 200 and str(r.url).endswith("/api/admin/")
    assert "<title>rateguard admin</title>" in r.text
    await app.state.store.close()


# -- logs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["any", "identifier"])
async def test_a_reset_log_line_never_holds_an_identifier_that_is_no_address(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    app = small_app(MemoryStore(), identifier=api_key)
    with caplog.at_level(logging.INFO, logger="rateguard.admin"):
        async with client_for(app, CLIENT) as client:
            r = await client.post(
                f"/admin/reset/{API_KEY}?kind={kind}", headers={"authorization": f"Bearer {TOKEN}"}
            )
    assert r.status_code == 200
    assert "admin reset of 'sk_l… (29)'" in caplog.text
    assert API_KEY not in caplog.text


async def test_a_reset_log_line_masks_an_api_key(caplog: pytest.LogCaptureFixture) -> None:
    app = small_app(MemoryStore(), identifier=api_key)
    await hit(app, "/api/data", 1, headers={"x-api-key": API_KEY})
    with caplog.at_level(logging.INFO, logger="rateguard.admin"):
        async with client_for(app, CLIENT) as client:
            r = await client.post(
                f"/admin/reset/{API_KEY}?kind=identifier", headers={"authorization": f"Bearer {TOKEN}"}
            )
    assert r.json()["cleared"]
    assert API_KEY not in caplog.text
    line = "admin reset of 'sk_l… (29)' (keys id:sk_l… (29)) from 203.0.113.7 cleared 1 bucket(s)"
    assert line in caplog.text


async def test_the_outage_warning_names_no_password(caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(url=f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0")
    try:
        with caplog.at_level(logging.INFO, logger="rateguard"):
            assert await hit(small_app(store), "/api/data", 5) == [200] * 5
    finally:
        await store.close()
    lines = [r for r in caplog.records if r.name == "rateguard.redis"]
    assert len(lines) == 1  # one line per state change, not per request
    assert lines[0].levelno == logging.WARNING and "unavailable" in lines[0].getMessage()
    assert "hunter2" not in caplog.text
