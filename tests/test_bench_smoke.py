"""The benchmark harness runs end to end in its tiny mode and writes its tables.

No speed is asserted, here or anywhere in the suite: figures from a shared machine mean nothing.
This only keeps `make bench` from rotting: servers start, wrk's output parses, the report is written,
and no process is left behind.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _row(text: str, section: str, label: str) -> list[str]:
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in body.splitlines():
        if line.startswith(f"| {label} |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} under {section!r}:\n{body}")


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(",", "").rstrip("x%"))


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_tiny_run_writes_results(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed, and CI must run this test: apt-get install -y wrk")
        pytest.skip("wrk is not installed: sudo apt-get install -y wrk (Debian/Ubuntu) or brew install wrk")
    token = f"rateguard-bench-smoke-{uuid.uuid4().hex}"
    env = dict(os.environ, RATEGUARD_BENCH_SMOKE=token)
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    dated = sorted(tmp_path.glob("20*.md"))
    assert len(dated) == 1, list(tmp_path.iterdir())
    text = (tmp_path / "latest.md").read_text()
    assert text == dated[0].read_text().replace(dated[0].with_suffix(".png").name, "latest.png")

    for label in ("no limiter", "rateguard memory"):
        throughput = _row(text, "Throughput", label)
        assert _number(throughput[1]) > 0  # req/s
        assert _number(throughput[4]) > 0  # p50
        assert _number(throughput[5]) > 0  # p99
        assert throughput[-1] == "all 2xx"
        latency = _row(text, "Added latency at one connection", label)
        assert _number(latency[1]) > 0
    memory = _row(text, "Store only", "memory")
    assert _number(memory[1]) > 0 and _number(memory[2]) > 0
    assert "| 1 | rateguard memory req/s >= 0.97x floor-memory, one client |" in text  # issue 16's
    assert "| 1 | RateGuard + MemoryStore req/s >= 0.95x no limiter |" in text  # issue 5's
    assert json.loads((tmp_path / "latest.json").read_text())["rounds"]["rateguard-memory"]
    assert "### One client" in (tmp_path / "summary.md").read_text()

    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")

    assert _processes_with(token) == [], "the harness left processes running"


def test_tiny_scale_run_writes_results(tmp_path: Path) -> None:
    # The growth runs: wrk's key-walking script, the keyed apps and their prefill, the memory bench.
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed, and CI must run this test: apt-get install -y wrk")
        pytest.skip("wrk is not installed: sudo apt-get install -y wrk (Debian/Ubuntu) or brew install wrk")
    token = f"rateguard-bench-smoke-{uuid.uuid4().hex}"
    env = dict(os.environ, RATEGUARD_BENCH_SMOKE=token)
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--tiny", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    text = (tmp_path / "scale-latest.md").read_text()
    for label in ("no limiter", "least Python token bucket, 5 fields", "rateguard memory"):
        assert _number(_row(text, "Distinct clients", label)[1]) > 0  # x no limiter, 1000 clients
    # Prefilled: each store holds the 1000 clients (and the readiness check's address), no more.
    memory = text.split("### Server memory after the runs", 1)[1].split("\n## ", 1)[0]
    assert memory.count("1,001 buckets") == 2, memory
    assert _number(_row(text, "Memory per bucket", "MemoryStore, RSS")[1]) > 0
    assert "| 1 | rateguard memory req/s >= 0.97x floor-memory, 100,000 clients |" in text
    assert "### Cost against the number of clients" in (tmp_path / "summary.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "scale-latest.png").read_bytes().startswith(b"\x89PNG")
    assert _processes_with(token) == [], "the harness left processes running"


@pytest.mark.redis
@pytest.mark.parametrize(
    ("reference", "rateguard"),
    [
        ("headers-only", "rateguard-memory"),
        ("floor-memory", "rateguard-memory"),
        ("floor-redis", "rateguard-memory"),
        ("keyed-floor-memory", "keyed-rateguard-memory"),
        ("keyed-floor-redis", "keyed-rateguard-memory"),
    ],
)
async def test_the_reference_variants_send_rateguards_fields(
    reference: str, rateguard: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reference is only a floor for rateguard if it makes the server do the same header work:
    # the same five fields, with the same values, on a first request of the benchmark's limits
    # (the growth runs' keyed variants: a bucket of 10**9 refilled at one token an hour).
    from benchmarks import apps

    from .helpers import client_for

    monkeypatch.setattr(apps, "REDIS_URL", redis_url)

    async def first_fields(variant: str) -> dict[str, str]:
        async with client_for(apps.build(variant)) as client:
            response = await client.get("/", headers={"x-api-key": f"smoke-{uuid.uuid4().hex}"})
        assert response.status_code == 200 and response.json() == apps.MESSAGE
        return {k: v for k, v in response.headers.items() if "ratelimit" in k}

    expected = await first_fields(rateguard)
    assert len(expected) == 5
    try:
        assert await first_fields(reference) == expected
    finally:
        apps.close_floor_connections()
        await asyncio.sleep(0)  # the transport closes its socket on the next loop turn


def test_compared_variants_run_back_to_back_in_alternating_order() -> None:
    # The targets' ratios divide runs seconds apart, not half a round apart, and neither side
    # always goes first; every live variant runs once a round.
    from benchmarks.run import ADJACENT, round_order

    live = ["none", "floor-memory", "x", "rateguard-memory", "rateguard-redis", "floor-redis", "y"]
    for r in range(6):
        order = round_order(live, r)
        assert sorted(order) == sorted(live)
        a, b = order.index("floor-memory"), order.index("rateguard-memory")
        assert abs(a - b) == 1
        assert (a < b) == (r % 2 == 0)
        assert abs(order.index("rateguard-redis") - order.index("floor-redis")) == 1
    assert len({round_order(live, r)[0] for r in range(6)}) == 5  # five blocks take turns first
    assert all(len(set(chain)) == len(chain) for chain in ADJACENT)


@pytest.mark.redis
@pytest.mark.parametrize("concurrency", [1, 32])
def test_the_instruction_driver_decides_every_request_on_redis(redis_url: str, concurrency: int) -> None:
    # What valgrind runs for a Redis variant: it must exit 0 only if every response is a 200
    # decided by Redis (an outage answers 503 there, so a fallback can't pass unseen).
    env = dict(os.environ, BENCH_VARIANT="none", BENCH_REDIS_DEADLINE="30")
    args = ["--drive", "rateguard-redis", "--requests", "64", "--concurrency", str(concurrency)]

    def drive(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "benchmarks.instructions", *args],
            cwd=REPO,
            env=dict(env, BENCH_REDIS_URL=url),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    run = drive(redis_url)
    assert run.returncode == 0, run.stdout + run.stderr
    refused = drive(f"redis://127.0.0.1:{_closed_port()}/0")
    assert refused.returncode != 0 and "503" in refused.stdout + refused.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_counted_targets_are_read_from_the_instruction_tables(tmp_path: Path) -> None:
    from benchmarks.summary import instruction_targets

    def table(file: str, rows: dict[str, int]) -> None:
        lines = ["| variant | instructions/request | + vs no limiter | ratio |", "|---|--:|--:|--:|"]
        lines += [f"| some label (`{name}`) | {count:,} | +1 | 0.9 |" for name, count in rows.items()]
        (tmp_path / file).write_text("\n".join(lines) + "\n")

    table("instructions.md", {"floor-memory": 970, "rateguard-memory": 1000})
    table("instructions-redis.md", {"rules-redis-1": 949, "rules-redis-2": 1000})
    table("instructions-redis-c32.md", {"floor-redis": 950, "rateguard-redis": 1000, "rules-redis-1": 900})
    found = {
        (t.number, t.text.split(" ([")[0]): (t.measured, t.passed) for t in instruction_targets(tmp_path)
    }
    assert found == {
        ("1", "rateguard memory vs floor-memory, one client >= 0.97x"): ("0.970x", True),
        ("2", "rateguard Redis vs floor-redis, 32 connections >= 0.95x"): ("0.950x", True),
        ("5", "a two-rule limit() on Redis vs the one-rule limit(), one at a time >= 0.95x"): (
            "0.949x",
            False,
        ),
    }  # issue 13's rows need rateguard-redis-before; T5 at 32 connections, rules-redis-2
