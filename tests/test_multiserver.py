"""Several servers, one limit: three real `uvicorn demo.app:app` processes on one real redis-server.

Each test speaks from its own loopback address (127.0.0.N), so its client has buckets of its own
and no test sees another's: no flushing, and no server-side cache to clear in between.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import RedisServer, free_port
from .helpers import stop_process

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


class DemoServer:
    """One `uvicorn demo.app:app` process on a free port, its output kept in a log file."""

    def __init__(self, redis_url: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("RATEGUARD_")}
        env["REDIS_URL"] = redis_url
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "demo.app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def wait_ready(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn on port {self.port} exited:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn on port {self.port} did not answer /health:\n{self.output()}")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)  # by pid: only the process this test started


@pytest.fixture(scope="module")
def servers(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[DemoServer]]:
    logs = tmp_path_factory.mktemp("uvicorn")
    started: list[DemoServer] = []
    try:
        for i in range(3):
            started.append(DemoServer(redis_server.url, logs / f"server-{i}.log"))
        deadline = time.monotonic() + START_TIMEOUT
        for server in started:
            server.wait_ready(deadline)
        yield started
    finally:
        for server in started:
            server.stop()


def client_from(address: str) -> httpx.AsyncClient:
    """An HTTP client whose connections come from ``address`` (any 127.0.0.0/8 address is loopback)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(transport=transport, timeout=10)


async def stats_of(client: httpx.AsyncClient, servers: list[DemoServer]) -> list[dict[str, Any]]:
    return [(await client.get(s.url + "/api/admin/stats")).json() for s in servers]


async def test_startup_line_names_redis(servers: list[DemoServer]) -> None:
    for server in servers:
        assert "rateguard demo: store RedisStore at redis://127.0.0.1:" in server.output()


async def test_thirty_concurrent_requests_over_three_servers_admit_exactly_five(
    servers: list[DemoServer],
) -> None:
    async with client_from("127.0.0.2") as client:
        responses = await asyncio.gather(
            *(client.get(servers[i % 3].url + "/api/expensive") for i in range(30))
        )
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 5, codes
    assert codes.count(429) == 25, codes
    for r in responses:
        assert r.headers["x-ratelimit-limit"] == "5"
        assert "ratelimit-policy" in r.headers
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["x-ratelimit-remaining"] == "0"
            assert r.json()["error"] == "Too Many Requests"
    # Every server took part.
    by_server: dict[str, set[int]] = {}
    for i, r in enumerate(responses):
        by_server.setdefault(servers[i % 3].url, set()).add(r.status_code)
    assert len(by_server) == 3


async def test_a_reset_on_one_server_is_seen_by_the_others(servers: list[DemoServer]) -> None:
    a, b, c = (s.url for s in servers)
    async with client_from("127.0.0.3") as client:
        codes = [(await client.get(s + "/api/expensive")).status_code for s in [a, b, c, a, b]]
        assert codes == [200] * 5
        # Every server now denies this client.
        assert [(await client.get(s + "/api/expensive")).status_code for s in [a, b, c]] == [429] * 3

        reset = await client.post(a + "/api/admin/reset/127.0.0.3")
        assert reset.status_code == 200
        assert sorted(x["bucket"] for x in reset.json()["cleared"]) == ["GET,POST /api/expensive", "global"]

        assert (await client.get(b + "/api/expensive")).status_code == 200
        assert (await client.post(c + "/api/expensive")).status_code == 200
        seen = (await client.get(a + "/api/admin/bucket/127.0.0.3")).json()
    route = {x["bucket"]: x for x in seen["buckets"]}["GET,POST /api/expensive"]
    assert route["stored"] is True
    assert 3 <= route["tokens"] < 3.1


async def test_stats_add_up_across_servers(servers: list[DemoServer]) -> None:
    async with client_from("127.0.0.4") as client:
        # Asking each server for stats also adds its own counts to the shared totals.
        before = await stats_of(client, servers)
        total_before = (await stats_of(client, servers[:1]))[0]["decisions"]
        responses = await asyncio.gather(
            *(client.get(servers[i % 3].url + "/api/expensive") for i in range(12))
        )
        assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 7
        after = await stats_of(client, servers)
        total_after = (await stats_of(client, servers[:1]))[0]["decisions"]

    mine = {
        name: sum(
            x["decisions"]["this_server"][name] - y["decisions"]["this_server"][name]
            for x, y in zip(after, before, strict=True)
        )
        for name in ("allowed", "limited")
    }
    # 12 global admissions + 5 route admissions; 7 route denials.
    assert mine == {"allowed": 17, "limited": 7}
    assert total_after["allowed"] - total_before["allowed"] == 17
    assert total_after["limited"] - total_before["limited"] == 7
    pids = {s["server"]["pid"] for s in after}
    assert len(pids) == 3
    for s in after:
        assert s["store"]["kind"] == "redis"
        assert s["store"]["healthy"] is True
        assert s["store"]["degraded"] is False
        assert s["store"]["latency_ms"] is not None
        assert [r["bucket"] for r in s["rules"]] == ["global", "GET,POST /api/expensive"]


async def test_admin_over_a_real_socket_ignores_forwarding_headers(servers: list[DemoServer]) -> None:
    async with client_from("127.0.0.5") as client:
        plain = await client.get(servers[0].url + "/api/admin/stats")
        forwarded = await client.get(
            servers[0].url + "/api/admin/stats", headers={"x-forwarded-for": "127.0.0.1"}
        )
        elsewhere = await client.get(
            servers[0].url + "/api/admin/stats", headers={"x-forwarded-for": "203.0.113.50"}
        )
    assert plain.status_code == 200
    assert forwarded.status_code == 403
    assert elsewhere.status_code == 403
