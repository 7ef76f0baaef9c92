"""The demo app (demo/app.py): routes, limits, store selection, admin mount, start-up line."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI

from demo.app import create_app
from rateguard import ConfigurationError, MemoryStore, RedisStore

from .helpers import client_for

TOKEN = "demo-admin-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "RATEGUARD_RPM", "RATEGUARD_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def demo() -> AsyncIterator[FastAPI]:
    app = create_app()
    yield app
    await app.state.store.close()


def test_the_module_app_is_the_demo() -> None:
    from demo.app import app

    assert isinstance(app, FastAPI)
    assert app.title == "rateguard demo"


async def test_index_is_free_and_links_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_RPM", "1")
    app = create_app()
    async with client_for(app) as client:
        responses = [await client.get("/") for _ in range(5)]
        html = await client.get("/", headers={"accept": "text/html,application/xhtml+xml"})
    assert [r.status_code for r in responses] == [200] * 5
    assert "x-ratelimit-limit" not in responses[-1].headers
    links = responses[0].json()["links"]
    assert {"/health", "/api/data", "/api/expensive", "/api/admin/stats"} <= set(links)
    assert responses[0].json()["store"] == "memory"
    assert html.headers["content-type"].startswith("text/html")
    assert '<a href="/api/expensive">' in html.text


async def test_health_is_skipped_by_the_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_RPM", "1")
    app = create_app()
    async with client_for(app) as client:
        responses = [await client.get("/health") for _ in range(20)]
    assert {r.status_code for r in responses} == {200}
    assert responses[0].json() == {"status": "ok"}
    assert "ratelimit" not in responses[0].headers
    assert await app.state.store.count() == 0


async def test_data_has_the_global_limit_only(demo: FastAPI) -> None:
    async with client_for(demo) as client:
        first = await client.get("/api/data")
    assert first.status_code == 200
    assert first.headers["ratelimit-policy"] == '"global";q=60;w=60'
    assert first.headers["x-ratelimit-remaining"] == "59"


async def test_rpm_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_RPM", "3")
    app = create_app()
    async with client_for(app) as client:
        codes = [(await client.get("/api/data")).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


@pytest.mark.parametrize("value", ["fast", "0", "-5", "nan"])
def test_a_bad_rpm_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("RATEGUARD_RPM", value)
    with pytest.raises(ConfigurationError, match="RATEGUARD_RPM must be a number"):
        create_app()


async def test_the_readme_curl_loop(demo: FastAPI) -> None:
    """`for i in $(seq 10); do curl -i localhost:3000/api/expensive; done`: 5 x 200, then 429s."""
    async with client_for(demo, "127.0.0.1") as client:
        responses = [await client.get("/api/expensive") for _ in range(10)]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 5
    ok, denied = responses[0], responses[5]
    assert ok.json()["result"] == "expensive work done"
    assert ok.headers["x-ratelimit-limit"] == "5"
    assert ok.headers["x-ratelimit-remaining"] == "4"
    assert ok.headers["ratelimit-policy"] == '"global";q=60;w=60, "GET,POST /api/expensive";q=5;w=60'
    assert denied.headers["retry-after"] == "12"
    assert denied.headers["x-ratelimit-remaining"] == "0"
    assert denied.headers["x-ratelimit-limit"] == "5"
    assert "ratelimit" in denied.headers
    assert denied.json() == {
        "error": "Too Many Requests",
        "message": "Too many requests, please try again later.",
        "retry_after": 12,
    }


async def test_get_and_post_share_the_expensive_bucket(demo: FastAPI) -> None:
    async with client_for(demo) as client:
        codes = [(await client.request(m, "/api/expensive")).status_code for m in ["GET", "POST"] * 4]
    assert codes == [200] * 5 + [429] * 3


async def test_admin_is_mounted_and_never_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_RPM", "1")
    app = create_app()
    async with client_for(app, "127.0.0.1") as client:
        assert [(await client.get("/api/data")).status_code for _ in range(2)] == [200, 429]
        stats = [await client.get("/api/admin/stats") for _ in range(10)]
        assert {r.status_code for r in stats} == {200}
        assert stats[-1].json()["decisions"]["limited"] == 1  # admin calls took no tokens
        reset = await client.post("/api/admin/reset/127.0.0.1")
        assert [c["bucket"] for c in reset.json()["cleared"]] == ["global"]
        assert (await client.get("/api/data")).status_code == 200
    rules = {r["bucket"]: r["requests_per_minute"] for r in stats[0].json()["rules"]}
    assert rules == {"global": 1, "GET,POST /api/expensive": 5}


async def test_admin_without_token_refuses_other_machines(demo: FastAPI) -> None:
    async with client_for(demo, "198.51.100.20") as client:
        r = await client.get("/api/admin/stats")
    assert r.status_code == 403


async def test_admin_with_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEGUARD_ADMIN_TOKEN", TOKEN)
    app = create_app()
    async with client_for(app, "198.51.100.20") as client:
        assert (await client.get("/api/admin/stats")).status_code == 401
        ok = await client.get("/api/admin/stats", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


async def test_memory_store_by_default(demo: FastAPI) -> None:
    assert isinstance(demo.state.store, MemoryStore)


@pytest.mark.redis
async def test_redis_url_selects_redis_and_two_apps_share_the_limit(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    one, two = create_app(), create_app()
    try:
        assert isinstance(one.state.store, RedisStore)
        codes = []
        async with client_for(one, "127.0.0.1") as a, client_for(two, "127.0.0.1") as b:
            for i in range(8):
                codes.append((await (a if i % 2 else b).get("/api/expensive")).status_code)
            stats = (await a.get("/api/admin/stats")).json()
        assert codes == [200] * 5 + [429] * 3
        assert stats["store"]["kind"] == "redis"
        assert stats["store"]["healthy"] is True
    finally:
        await one.state.store.close()
        await two.state.store.close()


async def test_startup_logs_the_store_and_limits(caplog: pytest.LogCaptureFixture, demo: FastAPI) -> None:
    with caplog.at_level(logging.INFO, logger="rateguard.demo"):
        async with demo.router.lifespan_context(demo):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "rateguard.demo"]
    assert lines == [
        "rateguard demo: store MemoryStore (this process only); limits: global 60/min per client, "
        "/api/expensive 5/min; admin API at /api/admin (loopback clients only)"
    ]


async def test_startup_line_names_redis_without_its_password(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:6390/0")
    monkeypatch.setenv("RATEGUARD_RPM", "120")
    monkeypatch.setenv("RATEGUARD_ADMIN_TOKEN", TOKEN)
    app = create_app()
    with caplog.at_level(logging.INFO, logger="rateguard.demo"):
        async with app.router.lifespan_context(app):
            pass
    text = caplog.text
    assert "store RedisStore at redis://:***@127.0.0.1:6390/0" in text
    assert "global 120/min" in text
    assert "(bearer token)" in text
    assert "hunter2" not in text
    assert TOKEN not in text


# -- compose.yaml and Dockerfile: no Docker engine here, so parse and check them ---------------------

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"name", "services", "networks", "volumes", "configs", "secrets", "include", "version"}
SERVICE_KEYS = {
    "build", "command", "container_name", "depends_on", "entrypoint", "env_file", "environment",
    "expose", "extra_hosts", "healthcheck", "image", "init", "labels", "logging", "networks",
    "platform", "ports", "profiles", "pull_policy", "read_only", "restart", "stop_grace_period",
    "stop_signal", "tmpfs", "ulimits", "user", "volumes", "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|ms|s|m|h))+")
PORT = re.compile(
    r"((\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?(\d{1,5}(-\d{1,5})?:)?\d{1,5}(-\d{1,5})?(/(tcp|udp))?"
)
# $$ is a literal dollar; otherwise $NAME or ${NAME}, ${NAME:-default}, ${NAME:?error}, ...
INTERPOLATION = re.compile(r"\$(\$|[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*((:?[-?+])[^}]*)?\})")


def load_compose() -> dict[str, Any]:
    text = (ROOT / "compose.yaml").read_text()
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        at = 0
        while (at := line.find("$", at)) != -1:
            match = INTERPOLATION.match(line, at)
            assert match, f"compose.yaml:{i}: bad interpolation at {line[at:]!r}"
            at = match.end()
    compose = yaml.safe_load(text)
    assert isinstance(compose, dict)
    return compose


def demo_services(compose: dict[str, Any], profile: str | None = None) -> dict[str, dict[str, Any]]:
    """The demo servers that `docker compose [--profile P] up` starts."""
    return {
        name: s
        for name, s in compose["services"].items()
        if "build" in s and (profile in s["profiles"] if "profiles" in s else profile is None)
    }


def test_compose_is_well_formed() -> None:
    compose = load_compose()
    assert {k for k in compose if not k.startswith("x-")} <= TOP_LEVEL
    services = compose["services"]
    for name, service in services.items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name)
        assert set(service) <= SERVICE_KEYS, f"{name}: unknown keys {set(service) - SERVICE_KEYS}"
        assert "image" in service or "build" in service
        for port in service.get("ports", []):
            assert isinstance(port, str) and PORT.fullmatch(port), f"{name}: bad port {port!r}"
        if service.get("restart") == "no":  # a one-shot job (the cluster's init): no healthcheck
            continue
        health = service["healthcheck"]
        assert set(health) <= HEALTHCHECK_KEYS
        assert health["test"][0] in ("CMD", "CMD-SHELL")
        for key in ("interval", "timeout", "start_period"):
            if key in health:
                assert DURATION.fullmatch(health[key]), f"{name}: {key}={health[key]!r}"
        assert isinstance(health["retries"], int)
        for dep, condition in service.get("depends_on", {}).items():
            assert dep in services
            assert condition["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
        env = service.get("environment", {})
        assert isinstance(env, dict)
        assert all(isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in env.items())
        if "build" in service:
            context = service["build"] if isinstance(service["build"], str) else service["build"]["context"]
            assert (ROOT / context / "Dockerfile").is_file()


def test_compose_runs_three_demo_servers_on_one_redis() -> None:
    compose = load_compose()
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    demos = demo_services(compose)
    assert len(demos) == 3
    published = sorted(int(port.split(":")[-2]) for s in demos.values() for port in s["ports"])
    assert published == [3000, 3001, 3002]
    for service in demos.values():
        assert [port.rsplit(":", 1)[1] for port in service["ports"]] == ["3000"]
        env = service["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert "/health" in " ".join(service["healthcheck"]["test"])


def test_compose_cluster_profile_runs_three_servers_on_a_redis_cluster() -> None:
    compose = load_compose()
    services = compose["services"]
    nodes = {name: s for name, s in services.items() if name.startswith("redis-node-")}
    assert len(nodes) == 3
    for name, node in nodes.items():
        assert node["profiles"] == ["cluster"]
        assert "--cluster-enabled" in node["command"] and name in node["command"]
    init = services["redis-cluster-init"]
    assert init["profiles"] == ["cluster"] and "--cluster create" in init["command"][0]
    demos = demo_services(compose, "cluster")
    assert sorted(int(p.split(":")[-2]) for s in demos.values() for p in s["ports"]) == [3010, 3011, 3012]
    for service in demos.values():
        assert service["environment"]["RATEGUARD_REDIS_CLUSTER"] == "1"
        assert service["environment"]["REDIS_URL"].startswith("redis://redis-node-")
        assert service["depends_on"] == {
            "redis-cluster-init": {"condition": "service_completed_successfully"}
        }
    # Without the profile, nothing of the cluster starts.
    assert all("profiles" not in s for s in (services["redis"], *demo_services(compose).values()))


def test_compose_takes_the_admin_token_from_the_environment_only() -> None:
    compose = load_compose()
    for service in [*demo_services(compose).values(), *demo_services(compose, "cluster").values()]:
        token = service["environment"]["RATEGUARD_ADMIN_TOKEN"]
        # Required (${VAR:?message}): compose refuses to start without it; no default, no secret.
        assert re.fullmatch(r"\$\{RATEGUARD_ADMIN_TOKEN:\?[^}]+\}", token), token


def test_dockerfile_runs_the_demo_on_all_interfaces() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert re.fullmatch(r"FROM python:3\.1[1-9]\S*", lines[0])
    assert "COPY rateguard ./rateguard" in lines
    assert "COPY demo ./demo" in lines
    assert 'RUN pip install ".[demo]"' in lines
    assert "USER nobody" in lines
    assert lines[-1] == 'CMD ["uvicorn", "demo.app:app", "--host", "0.0.0.0", "--port", "3000"]'
