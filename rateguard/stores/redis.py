"""RedisStore: buckets in Redis, shared by every app server, one atomic Lua step per decision."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.resources import files
from typing import Any, Literal, TypeVar
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from rateguard.bucket import EPSILON, BucketState, Decision, Rule, new_decision, refill
from rateguard.errors import ConfigurationError, StoreError, StoreUnavailable
from rateguard.identity import encode_identifier
from rateguard.stores import StoreStats
from rateguard.stores._pipeline import Batcher, BatchFailed, Channel, Histogram
from rateguard.stores.memory import MemoryStore

TOKEN_BUCKET_LUA = files("rateguard.stores").joinpath("token_bucket.lua").read_text("utf-8")
_SCRIPT = TOKEN_BUCKET_LUA.encode("utf-8")
_SHA = hashlib.sha1(_SCRIPT).hexdigest()

_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})
OnError = Literal["local", "allow", "deny"]
_ON_ERROR = ("local", "allow", "deny")

logger = logging.getLogger("rateguard.redis")
T = TypeVar("T")


def _num(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


def _positive_seconds(name: str, value: object, hint: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or math.isnan(value)
        or not 0 < value <= 60
    ):
        raise ConfigurationError(f"{name} must be a number of seconds in (0, 60], got {value!r}; {hint}")
    return float(value)


class _DenyEntry:
    __slots__ = ("at", "capacity", "rate", "tokens")

    def __init__(self, tokens: float, at: float, rate: float, capacity: int) -> None:
        self.tokens = tokens
        self.at = at
        self.rate = rate
        self.capacity = capacity


class RedisStore:
    """Token buckets in Redis, so several servers share one limit with no race.

    Connect with exactly one of: ``url`` (``redis://``, ``rediss://``, ``unix://``; add
    ``cluster=True`` for a Redis Cluster), ``host``/``port``/``db``/``password``, ``sentinels`` +
    ``service_name``, or a ready ``client`` (``redis.asyncio.Redis``, ``RedisCluster``, or
    ``Sentinel.master_for(...)``). Nothing connects until the first decision.

    Keys are ``<prefix>{<client>}:<bucket>``: the hash tag keeps one client's buckets in one
    Cluster slot while clients spread over all shards. Each key expires once its bucket is full.

    Outages: every batch of decisions has a deadline of ``timeout`` seconds. When Redis fails or
    is too slow, a circuit breaker stops sending decisions to it for a back-off that doubles from
    ``retry_backoff`` up to ``max_backoff``, then probes it; decisions meanwhile follow
    ``on_error``: ``"local"`` (default) limits with an in-process bucket of the same rule (with N
    servers, up to N x the limit), ``"allow"`` lets requests through, ``"deny"`` answers 503.

    ``deny_cache``: a client that Redis has just denied is denied locally, with no round trip,
    until its bucket could hold enough tokens again. That is exact for a token bucket (tokens only
    come back by refill); an admin `reset` reaches every server's cache through pub/sub, and the
    cache is off whenever that subscription is not live.
    """

    kind = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        host: str | None = None,
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        client: Any = None,
        cluster: bool = False,
        sentinels: Sequence[tuple[str, int]] | None = None,
        service_name: str | None = None,
        prefix: str = "rateguard:",
        on_error: OnError = "local",
        timeout: float = 0.05,
        connect_timeout: float = 0.05,
        retry_backoff: float = 0.25,
        max_backoff: float = 5.0,
        deny_cache: bool = True,
        local_max_keys: int = 100_000,
    ) -> None:
        given = [
            name
            for name, v in (("url", url), ("host", host), ("client", client), ("sentinels", sentinels))
            if v is not None
        ]
        if len(given) > 1:
            raise ConfigurationError(
                f"RedisStore takes one of url=, host=/port=, sentinels= or client=, got {' and '.join(given)}"
            )
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"prefix must be a non-empty string without braces, got {prefix!r}; the default is 'rateguard:'"
            )
        if on_error not in _ON_ERROR:
            raise ConfigurationError(
                f"on_error must be 'local', 'allow' or 'deny', got {on_error!r}; 'local' (the default) "
                "keeps limiting in each process while Redis is unreachable"
            )
        self.timeout = _positive_seconds("timeout", timeout, "the default is 0.05 (50 ms)")
        self.connect_timeout = _positive_seconds(
            "connect_timeout", connect_timeout, "the default is 0.05 (50 ms)"
        )
        self.retry_backoff = _positive_seconds("retry_backoff", retry_backoff, "the default is 0.25")
        self.max_backoff = _positive_seconds("max_backoff", max_backoff, "the default is 5")
        if self.max_backoff < self.retry_backoff:
            raise ConfigurationError(
                f"max_backoff ({max_backoff}) must be >= retry_backoff ({retry_backoff})"
            )
        timeouts: dict[str, Any] = {
            "socket_timeout": max(self.timeout, 0.1),
            "socket_connect_timeout": self.connect_timeout,
        }

        if client is not None:
            if not hasattr(client, "evalsha"):
                raise ConfigurationError(
                    f"client must be a redis.asyncio client (Redis, RedisCluster or "
                    f"Sentinel.master_for(...)), got {type(client).__name__}"
                )
            if not hasattr(client, "get_node_from_key") and not hasattr(client, "connection_pool"):
                raise ConfigurationError(
                    f"client must be an asyncio client from redis.asyncio, got {type(client).__name__}"
                )
            self._client = client
        elif sentinels is not None:
            if not service_name or not isinstance(service_name, str):
                raise ConfigurationError(
                    "sentinels= needs service_name=, the name the sentinels monitor (e.g. 'mymaster')"
                )
            try:
                hosts = [(str(h), int(p)) for h, p in sentinels]
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"sentinels must be a list of (host, port) pairs, got {sentinels!r}"
                ) from None
            if not hosts:
                raise ConfigurationError("sentinels must name at least one (host, port)")
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                hosts, sentinel_kwargs=timeouts, password=password, db=db, **timeouts
            )
            self._client = self._sentinel.master_for(service_name)
            self._service_name = service_name
        elif url is not None:
            if not isinstance(url, str) or "://" not in url:
                raise ConfigurationError(f"url must look like 'redis://host:6379/0', got {url!r}")
            try:
                if cluster:
                    self._client = RedisCluster.from_url(url, **timeouts)
                else:
                    self._client = aioredis.Redis.from_url(url, **timeouts)
            except (ValueError, RedisError) as exc:
                raise ConfigurationError(f"bad Redis url {_redact(url)!r}: {exc}") from None
        else:
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise ConfigurationError(f"port must be an int from 1 to 65535, got {port!r}")
            if cluster:
                self._client = RedisCluster(
                    host=host or "localhost", port=port, password=password, **timeouts
                )
            else:
                self._client = aioredis.Redis(
                    host=host or "localhost", port=port, db=db, password=password, **timeouts
                )
        if service_name is not None and sentinels is None:
            raise ConfigurationError("service_name= goes with sentinels=")

        self.prefix = prefix
        self.on_error: OnError = on_error
        self.deny_cache = bool(deny_cache)
        self.is_cluster = hasattr(self._client, "get_node_from_key")
        self._stats_key = f"{prefix}stats"
        self._channel_name = f"{prefix}reset"
        self._local = MemoryStore(max_keys=local_max_keys)

        # Circuit breaker state
        self.degraded = False
        self._backoff = 0.0
        self._retry_at = 0.0
        self._degraded_since = 0.0
        self.last_error: str | None = None
        self._probing = False

        # Counters: this process's decisions; deltas not yet added to the shared totals.
        self.allowed = 0
        self.limited = 0
        self.degraded_decisions = 0
        self.errors = 0  # failed round trips (connection, timeout, refusing node)
        self.deny_cache_hits = 0
        self._unflushed = [0, 0]
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flushing = False

        self._deny: dict[str, _DenyEntry] = {}
        self._latency = Histogram()
        self._bucket_parts: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batcher: Batcher | None = None
        self._channels: dict[str, Channel] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = False
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"RedisStore({self.where}, prefix={self.prefix!r}, on_error={self.on_error!r})"

    @property
    def where(self) -> str:
        """Where this store's Redis is, for logs: host:port (or the cluster/sentinel), never a password."""
        if hasattr(self, "_sentinel"):
            return f"sentinel service {self._service_name!r}"
        client = self._client
        try:
            if self.is_cluster:
                node = client.get_default_node() or next(iter(client.nodes_manager.startup_nodes.values()))
                return f"cluster {node.host}:{node.port}"
            kwargs = client.connection_pool.connection_kwargs
            if "path" in kwargs:
                return f"unix:{kwargs['path']}"
            return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
        except Exception:  # an unusual client: say what it is, nothing more
            return type(client).__name__

    @property
    def client(self) -> Any:
        """The redis-py client, for commands of your own (shares the connection pool)."""
        return self._client

    def key(self, client: str, bucket: str) -> str:
        part = self._bucket_parts.get(bucket)
        if part is None:
            part = encode_identifier(bucket)
            if len(self._bucket_parts) < 4096:  # bucket names are few: "global" and route templates
                self._bucket_parts[bucket] = part
        return f"{self.prefix}{{{client}}}:{part}"

    # -- the hot path ---------------------------------------------------------------------------

    async def take(
        self, client: str, bucket: str, rule: Rule, cost: int = 1, *, now: float | None = None
    ) -> Decision:
        key = self.key(client, bucket)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        if self.degraded:
            if time.monotonic() < self._retry_at:
                return self._fallback(client, bucket, rule, cost)
            self._start_probe()
            return self._fallback(client, bucket, rule, cost)

        if self._subscribed and now is None:
            entry = self._deny.get(key)
            if entry is not None:
                denied = self._cached_denial(key, entry, rule, cost)
                if denied is not None:
                    return denied

        assert self._batcher is not None
        args: tuple[Any, ...] = (
            (rule.rate, rule.burst, cost) if now is None else (rule.rate, rule.burst, cost, now)
        )
        try:
            reply = await self._batcher.submit(key, args)
        except BatchFailed as exc:
            self.last_error = str(exc)
            return self._fallback(client, bucket, rule, cost)
        allowed, remaining, retry_after, reset_after = reply
        retry = float(retry_after)
        self._count(allowed)
        if not allowed and self.deny_cache and self._subscribed and now is None:
            self._remember_denial(key, cost - retry * rule.rate, rule)
        return new_decision(bool(allowed), rule.burst, int(remaining), retry, float(reset_after), rule.rate)

    @property
    def latency(self) -> Histogram:
        """Round-trip times of decision batches (seconds), for metrics."""
        return self._latency

    def _cached_denial(self, key: str, entry: _DenyEntry, rule: Rule, cost: int) -> Decision | None:
        """A denial without a round trip, if the bucket can't hold ``cost`` tokens yet."""
        if entry.rate != rule.rate or entry.capacity != rule.burst:
            del self._deny[key]
            return None
        # Tokens known at `at`, refilled since: an upper bound (other servers only take more).
        tokens = refill(entry.tokens, entry.at, time.monotonic(), entry.rate, entry.capacity)
        if tokens + EPSILON >= cost:
            del self._deny[key]
            return None
        self._count(False)
        self.deny_cache_hits += 1
        return new_decision(
            False,
            rule.burst,
            math.floor(tokens + EPSILON),
            (cost - tokens) / rule.rate,
            (rule.burst - tokens) / rule.rate,
            rule.rate,
        )

    def _remember_denial(self, key: str, tokens: float, rule: Rule) -> None:
        if len(self._deny) >= 100_000:
            now = time.monotonic()
            self._deny = {
                k: e
                for k, e in self._deny.items()
                if refill(e.tokens, e.at, now, e.rate, e.capacity) < e.capacity
            }
            if len(self._deny) >= 100_000:
                self._deny.clear()
        self._deny[key] = _DenyEntry(max(0.0, tokens), time.monotonic(), rule.rate, rule.burst)

    # -- outage handling ------------------------------------------------------------------------

    def _fallback(self, client: str, bucket: str, rule: Rule, cost: int) -> Decision:
        self.degraded_decisions += 1
        if self.on_error == "local":
            d = self._local.take_now(client, bucket, rule, cost)
            decision = Decision(d.allowed, d.limit, d.remaining, d.retry_after, d.reset_after, d.rate, True)
        elif self.on_error == "allow":
            decision = Decision(True, rule.burst, rule.burst, 0.0, 0.0, rule.rate, True)
        else:
            raise StoreUnavailable(
                f"Redis is unavailable ({self.last_error}); on_error='deny'",
                retry_after=max(1.0, self._retry_at - time.monotonic()),
            )
        self._count(decision.allowed)
        return decision

    def _on_failure(self, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.degraded and now < self._retry_at:
            return  # more news of the same outage: the back-off stands
        if not self.degraded:
            self.degraded = True
            self._degraded_since = now
            self._backoff = self.retry_backoff
            logger.warning(
                "rateguard: Redis %s unavailable (%s); deciding with on_error=%r until it answers again",
                self.where,
                self.last_error,
                self.on_error,
            )
        else:
            self._backoff = min(self.max_backoff, self._backoff * 2)
        self._retry_at = now + self._backoff
        self._deny.clear()  # a reset may be missed while we can't hear Redis
        if self._batcher is not None:
            self._batcher.fail_pending(BatchFailed(self.last_error))

    def _on_success(self) -> None:
        if self.degraded:
            self.degraded = False
            logger.info(
                "rateguard: Redis %s answers again after %.1f s; limits are shared again",
                self.where,
                time.monotonic() - self._degraded_since,
            )
            self._backoff = 0.0
            self.last_error = None
            self._local = MemoryStore(max_keys=self._local.max_keys)

    def _start_probe(self) -> None:
        if self._probing or self._batcher is None:
            return
        self._probing = True
        self._spawn(self._probe())

    async def _probe(self) -> None:
        assert self._batcher is not None
        try:
            await self._batcher.ping(await self._all_channels())
        except (BatchFailed, TimeoutError, RedisError, OSError) as exc:
            self._on_failure(exc)
        else:
            self._on_success()
        finally:
            self._probing = False

    # -- connections ----------------------------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set up the per-event-loop parts: the batcher, its connections, the reset listener."""
        self._loop = loop
        self._channels = {}
        self._deny.clear()
        self._subscribed = False
        self._batcher = Batcher(
            sha=_SHA,
            script=_SCRIPT,
            timeout=self.timeout,
            route=self._route,
            on_failure=self._on_failure,
            on_success=self._on_success,
            on_moved=self._refresh_cluster if self.is_cluster else None,
            latency=self._latency,
            direct=not self.is_cluster,
        )
        if self.deny_cache:
            self._listener = loop.create_task(self._listen_for_resets())

    def _route(self, key: str) -> Channel | Awaitable[Channel]:
        if not self.is_cluster:
            channel = self._channels.get("")
            if channel is None:
                assert self._batcher is not None
                pool = self._client.connection_pool
                channel = self._channels[""] = self._batcher.make_channel(pool.make_connection)
            return channel
        return self._cluster_route(key)

    async def _cluster_route(self, key: str) -> Channel:
        cluster = self._client
        if not cluster.nodes_manager.nodes_cache or cluster._initialize:
            await cluster.initialize()
        return self._node_channel(cluster.get_node_from_key(key))

    def _node_channel(self, node: Any) -> Channel:
        channel = self._channels.get(node.name)
        if channel is None:
            assert self._batcher is not None
            channel = self._channels[node.name] = self._batcher.make_channel(_connection_factory(node))
        return channel

    async def _all_channels(self) -> list[Channel]:
        if not self.is_cluster:
            channel = self._route("")
            assert isinstance(channel, Channel)
            return [channel]
        cluster = self._client
        if not cluster.nodes_manager.nodes_cache or cluster._initialize:
            await cluster.initialize()
        return [self._node_channel(node) for node in cluster.get_primaries()]

    async def _refresh_cluster(self) -> None:
        await self._client.nodes_manager.initialize()

    async def _listen_for_resets(self) -> None:
        """Keep the deny cache honest: drop a client's entries when any server resets it."""
        lost_at = 0.0
        while not self._closing:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel_name)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed = True
                        if lost_at:
                            logger.info("rateguard: Redis %s reset channel back; deny cache on", self.where)
                            lost_at = 0.0
                    elif message["type"] == "message":
                        data = message["data"]
                        client = data.decode() if isinstance(data, bytes) else str(data)
                        self._forget_client(client)
                        await self._local.reset(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: the cache is off until subscribed again
                if self._subscribed:
                    logger.info(
                        "rateguard: Redis %s reset channel lost (%s); deny cache off until it is back",
                        self.where,
                        type(exc).__name__,
                    )
                    lost_at = time.monotonic()
                self._subscribed = False
                self._deny.clear()
            finally:
                self._subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(max(self._backoff, self.retry_backoff))

    def _forget_client(self, client: str) -> None:
        head = f"{self.prefix}{{{client}}}:"
        for key in [k for k in self._deny if k.startswith(head)]:
            del self._deny[key]

    # -- shared counters ------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _count(self, allowed: Any) -> None:
        if allowed:
            self.allowed += 1
            self._unflushed[0] += 1
        else:
            self.limited += 1
            self._unflushed[1] += 1
        if self._flush_handle is None and self._loop is not None:
            # Add this process's counts to the shared totals within a second, even if it goes idle.
            self._flush_handle = self._loop.call_later(1.0, self._flush_counters_soon)

    def _flush_counters_soon(self) -> None:
        self._flush_handle = None
        if self.degraded:  # kept until Redis answers again
            if self._loop is not None and not self._closing:
                self._flush_handle = self._loop.call_later(1.0, self._flush_counters_soon)
            return
        if not self._flushing and not self._closing:
            self._flushing = True
            self._spawn(self._flush_counters())

    async def _flush_counters(self) -> None:
        # Taken before the first await: a concurrent flush can't add the same counts twice.
        allowed, limited = self._unflushed
        self._unflushed = [0, 0]
        try:
            if allowed or limited:
                async with asyncio.timeout(self.timeout * 4):
                    async with self._client.pipeline(transaction=False) as pipe:
                        pipe.hincrby(self._stats_key, "allowed", allowed)
                        pipe.hincrby(self._stats_key, "limited", limited)
                        # Like every rateguard key, the totals expire: after a day with no traffic.
                        pipe.expire(self._stats_key, 86_400)
                        await pipe.execute()
        except (TimeoutError, RedisError, OSError):
            self._unflushed[0] += allowed  # kept for the next flush
            self._unflushed[1] += limited
        finally:
            self._flushing = False

    # -- admin ----------------------------------------------------------------------------------

    def _client_pattern(self, client: str) -> str:
        return f"{self.prefix}{{{client}}}:".translate(_GLOB_SPECIAL) + "*"

    async def _client_keys(self, client: str) -> list[bytes]:
        pattern = self._client_pattern(client)
        if self.is_cluster:
            # One client's keys share a slot: scan only the node that owns it.
            cluster = self._client
            if not cluster.nodes_manager.nodes_cache or cluster._initialize:
                await cluster.initialize()
            node = cluster.get_node_from_key(f"{self.prefix}{{{client}}}:x")
            keys: list[bytes] = []
            cursor = 0
            while True:
                cursor, batch = await self._on_node(node, "SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                keys.extend(batch)
                if int(cursor) == 0:
                    return keys
        return [k async for k in self._client.scan_iter(match=pattern, count=1000)]

    async def _twice(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run an admin operation, once more if a pooled connection turns out to be stale.

        After a Redis restart the pool still holds connections to the old server; the first
        command on each fails. Admin reads and resets are safe to repeat; decisions never are,
        and they don't come here.
        """
        try:
            return await operation()
        except RedisConnectionError:
            return await operation()
        except StoreError as exc:
            if not isinstance(exc.__cause__, RedisConnectionError):
                raise
            return await operation()

    async def inspect(self, client: str) -> list[BucketState]:
        return await self._twice(lambda: self._inspect(client))

    async def _inspect(self, client: str) -> list[BucketState]:
        try:
            keys = await self._client_keys(client)
            if not keys:
                return []
            results = []
            for k in keys:
                results.append(await self._client.hmget(k, "t", "ts", "c", "r"))
            sec, usec = await self._client.time() if not self.is_cluster else await self._time_for(keys[0])
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis could not inspect {client!r}: {exc}") from exc
        now = sec + usec / 1_000_000
        out = []
        for k, fields in zip(keys, results, strict=True):
            if None in fields:
                continue  # expired between SCAN and HMGET: a full bucket, nothing to show
            tokens, last, cap, rate = (_num(f) for f in fields)
            bucket = _bucket_name(k, self.prefix, client)
            out.append(BucketState(bucket, refill(tokens, last, now, rate, int(cap)), int(cap), rate))
        return out

    async def _time_for(self, key: bytes) -> tuple[int, int]:
        sec, usec = await self._on_node(self._client.get_node_from_key(key), "TIME")
        return int(sec), int(usec)

    async def _on_node(self, node: Any, *command: Any) -> Any:
        """One command on one cluster node (redis-py answers {node name: reply} for those)."""
        reply = await self._client.execute_command(*command, target_nodes=node)
        if isinstance(reply, dict) and len(reply) == 1:
            return next(iter(reply.values()))
        if command[0] == "SCAN" and isinstance(reply[0], dict):  # ({node: cursor}, keys)
            return next(iter(reply[0].values())), reply[1]
        return reply

    async def reset(self, client: str) -> list[str]:
        return await self._twice(lambda: self._reset(client))

    async def _reset(self, client: str) -> list[str]:
        try:
            keys = await self._client_keys(client)
            if keys:
                await self._client.delete(*keys)
            # Every server (this one too) drops its cached denials and fallback buckets.
            self._forget_client(client)
            await self._local.reset(client)
            await self._client.publish(self._channel_name, client)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis could not reset {client!r}: {exc}") from exc
        return [_bucket_name(k, self.prefix, client) for k in keys]

    async def count(self) -> int:
        return await self._twice(self._count_keys)

    async def _count_keys(self) -> int:
        pattern = self.prefix.translate(_GLOB_SPECIAL) + "{*"
        try:
            if self.is_cluster:
                n = 0
                for node in self._client.get_primaries():
                    cursor = 0
                    while True:
                        cursor, batch = await self._on_node(
                            node, "SCAN", cursor, "MATCH", pattern, "COUNT", 1000
                        )
                        n += len(batch)
                        if int(cursor) == 0:
                            break
                return n
            n = 0
            async for _ in self._client.scan_iter(match=pattern, count=1000):
                n += 1
            return n
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis could not count buckets: {exc}") from exc

    async def stats(self) -> StoreStats:
        local_allowed, local_limited = self.allowed, self.limited
        try:
            async with asyncio.timeout(max(1.0, self.timeout * 10)):
                await self._twice(self._client.ping)  # also clears a stale pooled connection
                t0 = time.perf_counter()
                await self._client.ping()
                latency = (time.perf_counter() - t0) * 1000
                if self._background:  # a flush in flight: let its counts land first
                    await asyncio.wait(self._background, timeout=self.timeout * 4)
                await self._flush_counters()
                totals = await self._client.hmget(self._stats_key, "allowed", "limited")
                buckets = await self.count()
        except (TimeoutError, RedisError, OSError, StoreError) as exc:
            return StoreStats(
                "redis", local_allowed, local_limited, local_allowed, local_limited,
                await self._local.count(), False, None, self.degraded, f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
        allowed_total, limited_total = (int(v) if v is not None else 0 for v in totals)
        return StoreStats(
            "redis", local_allowed, local_limited, allowed_total, limited_total, buckets, True,
            round(latency, 3), self.degraded, self.last_error,
        )  # fmt: skip

    async def close(self) -> None:
        self._closing = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._listener is not None:
            # redis-py may turn a cancellation in the middle of a connect into a ConnectionError;
            # the flag ends the loop then, and the wait is bounded whatever happens.
            self._listener.cancel()
            await asyncio.wait([self._listener], timeout=2)
            self._listener = None
        # Let short background work (a counter flush, a probe) finish: each has a deadline, and
        # cancelling one halfway through a connect would leak its socket.
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        if self._batcher is not None:
            await self._batcher.aclose(list(self._channels.values()))
        self._channels = {}
        self._loop = None
        await self._client.aclose()
        sentinel = getattr(self, "_sentinel", None)
        if sentinel is not None:
            for s in sentinel.sentinels:
                await s.aclose()


def _redact(url: str) -> str:
    """The url without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"


def _connection_factory(node: Any) -> Any:
    """A dedicated connection to one cluster node, configured as the cluster client's own."""
    return lambda: node.connection_class(**node.connection_kwargs)


def _bucket_name(key: bytes | str, prefix: str, client: str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return unquote(text[len(prefix) + len(client) + 3 :])


__all__ = ["TOKEN_BUCKET_LUA", "RedisStore"]
