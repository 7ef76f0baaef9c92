"""Shared fixtures: a real server (redis-server or Valkey, see servers.py) on a free port, a fake
clock, a store per backend."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from rateguard import MemoryStore, RedisStore
from rateguard.stores import Store
from rateguard.testing import FakeClock

from . import servers
from .helpers import stop_process
from .redis_topologies import _die_with_parent as die_with_parent

# Real Redis Cluster and Sentinel topologies (fixtures redis_cluster, redis_sentinel, ...).
pytest_plugins = ["tests.redis_topologies"]


def pytest_configure(config: pytest.Config) -> None:
    # A typo (RATEGUARD_TEST_SERVER=valky) stops the run at once, not as an error in every Redis test.
    requested = os.environ.get(servers.ENV_VAR, "").strip().lower()
    if requested not in ("", *servers.CHOICES):
        raise pytest.UsageError(
            f"{servers.ENV_VAR}={requested!r}: expected one of {', '.join(servers.CHOICES)}, or unset"
        )


def _server_lines() -> list[str]:
    try:
        lines = [f"redis server: {servers.chosen().describe()}"]
    except servers.ServerUnavailable as e:
        lines = [f"redis server: none, the Redis tests will fail: {e}"]
    external = os.environ.get("RATEGUARD_TEST_REDIS_URL")
    if external:
        lines.append(f"redis server: RATEGUARD_TEST_REDIS_URL={external} for the redis_server fixture")
    return lines


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which server binary this run starts, so a CI log shows what the Redis tests ran against."""
    return _server_lines()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if config.get_verbosity() < 0:  # -q hides the header: say it at the end instead
        for line in _server_lines():
            terminalreporter.write_line(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private server process (the binary servers.py chose): started on a free port, stopped (and
    restartable) by tests."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = servers.server_path()
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(self.workdir / f"redis-{self.port}.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # no server outlives a killed test run
        )  # fmt: skip
        deadline = time.monotonic() + 10
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{self.binary} did not start on port {self.port}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session; tests flush it before use."""
    external = os.environ.get("RATEGUARD_TEST_REDIS_URL")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    if external:  # a server the Makefile or a developer started already
        server.port = int(external.rsplit(":", 1)[1].split("/")[0])
        yield server
        return
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


def contract_store(url: str) -> RedisStore:
    """A RedisStore for contract tests: a slow reply on a busy CI machine fails loudly (503,
    StoreUnavailable) instead of being decided quietly by the local fallback."""
    return RedisStore(url=url, on_error="deny", timeout=2.0, connect_timeout=2.0)


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = contract_store(redis_url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def clock() -> FakeClock:
    """The documented way to test with time: `rateguard.testing.FakeClock`, moved by hand."""
    return FakeClock(1_700_000_000.0)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Every store, for contract tests that must hold for both."""
    if request.param == "memory":
        yield MemoryStore()
        return
    url = request.getfixturevalue("redis_url")
    rs = contract_store(url)
    try:
        yield rs
    finally:
        await rs.close()
