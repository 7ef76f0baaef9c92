"""Operating it: modes (enforce, shadow, off), testing helpers, warnings for wrong deployments."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from rateguard import ConfigurationError, Limiter, MemoryStore, RateGuard, limit
from rateguard.admin import decision_counts
from rateguard.checks import forget_warnings, worker_processes
from rateguard.stores import Store
from rateguard.testing import FakeClock, reset

from .conftest import free_port
from .helpers import client_for, stop_process


@pytest.fixture(autouse=True)
def fresh_warnings() -> None:
    forget_warnings()  # "once per process": each test starts with none said yet


def warned(caplog: pytest.LogCaptureFixture, code: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"[{code}]" in r.getMessage()]


def moded_app(store: Store, mode: str, **route: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1, capacity=3, store=store, mode=mode)

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/r", dependencies=[Depends(limit(1, capacity=2, mode=mode, **route))])
    async def r() -> dict[str, bool]:
        return {"ok": True}

    return app


# -- modes -------------------------------------------------------------------------------------


async def test_shadow_mode_lets_everything_through_and_counts_exactly_under_concurrency(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    app = moded_app(store, "shadow")
    with caplog.at_level(logging.WARNING, "rateguard"):
        async with client_for(app) as client:
            responses = await asyncio.gather(*(client.get("/") for _ in range(20)))
            routed = await asyncio.gather(*(client.get("/r") for _ in range(10)))
    assert {r.status_code for r in [*responses, *routed]} == {200}
    # No field from a limit in shadow mode: clients see the API as if it were not there.
    assert not any("ratelimit" in name for r in responses for name in r.headers)
    counts = decision_counts(app)
    # Decided exactly as in enforce: 3 of the 30 global decisions allowed (capacity 3), 27 would
    # have been refused; the route's own limit: 2 of its 10.
    assert counts["global"] == (3, 27, 0, 27)
    assert counts["GET /r"] == (2, 8, 0, 8)
    logged = [r.getMessage() for r in caplog.records if "shadow mode" in r.getMessage()]
    assert len(logged) == 2  # once per rule, not once per request
    assert "would have refused 1 request(s)" in logged[0]


async def test_off_mode_makes_no_store_call_no_header_no_count(store: Store) -> None:
    app = moded_app(store, "off")
    async with client_for(app) as client:
        responses = [await client.get(p) for p in ["/", "/r"] * 5]
    assert {r.status_code for r in responses} == {200}
    assert not any("ratelimit" in name for r in responses for name in r.headers)
    assert all(sum(c) == 0 for c in decision_counts(app).values())
    assert await store.count() == 0
    assert (await store.stats()).allowed == 0


@pytest.mark.parametrize("mode", ["off", "shadow"])
async def test_rateguard_mode_in_the_environment_overrides_every_limit(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATEGUARD_MODE", mode)
    app = moded_app(MemoryStore(), "enforce")
    async with client_for(app) as client:
        assert {(await client.get("/r")).status_code for _ in range(5)} == {200}
    assert (sum(decision_counts(app)["GET /r"]) == 0) is (mode == "off")


def test_a_bad_mode_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="'enforce'"):
        limit(5, mode="dry-run")  # type: ignore[arg-type]
    monkeypatch.setenv("RATEGUARD_MODE", "loud")
    with pytest.raises(ConfigurationError, match="RATEGUARD_MODE must be 'enforce'"):
        limit(5)


async def test_a_limiter_in_shadow_mode() -> None:
    limiter = Limiter("1/minute", mode="shadow")
    verdicts = [await limiter.hit("job") for _ in range(3)]
    assert [(v.allowed, v.shadowed) for v in verdicts] == [(True, False), (True, True), (True, True)]


# -- testing an app ----------------------------------------------------------------------------


async def test_the_testing_clock_and_reset() -> None:
    clock = FakeClock()
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=60, capacity=1, store=MemoryStore(clock=clock))
    route_limit = limit(1)

    @app.get("/", dependencies=[Depends(route_limit)])
    async def root() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        assert [(await client.get("/")).status_code for _ in range(2)] == [200, 429]
        clock.advance(1.0)  # the global bucket refills; the route's needs a minute
        assert (await client.get("/")).status_code == 429
        await reset(app)  # every bucket of the app's limits, global and per route
        assert (await client.get("/")).status_code == 200
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_dependency_overrides_switch_a_limit_off() -> None:
    guard = limit(1)
    app = FastAPI()
    app.get("/", dependencies=[Depends(guard)])(lambda: {"ok": True})
    app.dependency_overrides[guard] = lambda: None
    async with client_for(app) as client:
        assert {(await client.get("/")).status_code for _ in range(3)} == {200}


# -- warnings ----------------------------------------------------------------------------------


def test_the_worker_count_is_read_from_the_environment_and_the_command_line() -> None:
    assert worker_processes({}, ["uvicorn", "app:app"]) == 1
    assert worker_processes({"WEB_CONCURRENCY": "3"}, ["uvicorn"]) == 3
    assert worker_processes({}, ["uvicorn", "app:app", "--workers", "4"]) == 4
    assert worker_processes({}, ["uvicorn", "app:app", "--workers=2"]) == 2
    assert worker_processes({}, ["gunicorn", "-w", "5", "app:app"]) == 5
    assert worker_processes({}, ["gunicorn", "-w6", "app:app"]) == 6
    assert worker_processes({"GUNICORN_CMD_ARGS": "--workers 7"}, ["gunicorn"]) == 7


@pytest.mark.slow
def test_uvicorn_with_two_workers_and_a_memory_store_warns(tmp_path: Path) -> None:
    (tmp_path / "workers_app.py").write_text(
        textwrap.dedent(
            """
            from fastapi import FastAPI
            from rateguard import RateGuard

            app = FastAPI()
            app.add_middleware(RateGuard, requests_per_minute=60)
            """
        )
    )
    output = _run_uvicorn(tmp_path, "workers_app:app", "--workers", "2")
    assert output.count("[workers]") == 2, output  # once in each worker process
    assert "2 worker processes" in output and "RedisStore" in output


@pytest.mark.slow
def test_uvicorn_rewriting_the_client_from_x_forwarded_for_warns(tmp_path: Path) -> None:
    (tmp_path / "proxy_app.py").write_text(
        textwrap.dedent(
            """
            from fastapi import FastAPI
            from rateguard import RateGuard

            app = FastAPI()
            app.add_middleware(RateGuard, requests_per_minute=60)
            app.get("/")(lambda: {"ok": True})
            """
        )
    )

    def traffic(port: int) -> None:
        for xff in ("198.51.100.1", "198.51.100.2"):
            assert httpx.get(f"http://127.0.0.1:{port}/", headers={"x-forwarded-for": xff}).status_code == 200

    output = _run_uvicorn(tmp_path, "proxy_app:app", traffic=traffic)
    assert output.count("[proxy-headers]") == 1, output
    assert "trusted_proxies" in output


def _run_uvicorn(cwd: Path, app: str, *args: str, traffic: Any = None) -> str:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        if traffic is not None:
            traffic(port)
    finally:
        stop_process(proc, timeout=10)
    assert proc.stdout is not None
    with proc.stdout:
        return proc.stdout.read().decode()


def test_trusting_every_address_warns(caplog: pytest.LogCaptureFixture) -> None:
    RateGuard(FastAPI(), trusted_proxies=["10.0.0.0/8", "::/0"])
    assert len(warned(caplog, "trust-all")) == 1
    RateGuard(FastAPI(), trusted_proxies=["0.0.0.0/0"])
    assert len(warned(caplog, "trust-all")) == 1  # once per process


async def test_rateguard_after_cors_middleware_warns(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["*"])
    app.add_middleware(RateGuard, requests_per_minute=60)  # added last: runs first
    app.get("/")(lambda: {"ok": True})
    preflight = {"origin": "https://example.com", "access-control-request-method": "GET"}
    async with client_for(app) as client:
        await client.options("/", headers=preflight)
        await client.options("/", headers=preflight)
    (message,) = warned(caplog, "cors-order")
    assert "add RateGuard first, then CORSMiddleware" in message


async def test_rateguard_before_cors_middleware_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=60)
    app.add_middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["*"])
    app.get("/")(lambda: {"ok": True})
    preflight = {"origin": "https://example.com", "access-control-request-method": "GET"}
    async with client_for(app) as client:
        await client.options("/", headers=preflight)
        denied = [await client.get("/", headers={"origin": "https://example.com"}) for _ in range(61)][-1]
    assert not warned(caplog, "cors-order")
    # The right order: a 429 carries the CORS header, so the browser can read its Retry-After.
    assert denied.status_code == 429
    assert denied.headers["access-control-allow-origin"] == "https://example.com"


def test_validation_can_be_switched_off(caplog: pytest.LogCaptureFixture) -> None:
    RateGuard(FastAPI(), trusted_proxies=["0.0.0.0/0"], validate=False)
    RateGuard(FastAPI(), trusted_proxies=["0.0.0.0/0"], validate={"trust-all": False})
    assert not warned(caplog, "trust-all")
    with pytest.raises(ConfigurationError, match="codes from"):
        RateGuard(FastAPI(), validate={"no-such-check": False})


def test_store_check_fail_with_testclient_raises_instead_of_hanging() -> None:
    from fastapi.testclient import TestClient

    from rateguard import RedisStore, StoreError

    app = FastAPI()
    app.add_middleware(
        RateGuard, store=RedisStore(url=f"redis://127.0.0.1:{free_port()}/0"), store_check="fail"
    )
    with pytest.raises(StoreError, match="connection refused"), TestClient(app):
        pass
