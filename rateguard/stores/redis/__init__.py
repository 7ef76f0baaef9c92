"""RedisStore: buckets in Redis, shared by every app server, one atomic Lua step per decision.

The parts, one job each: `connect` (where Redis is), `wire` (rateguard's own decision
connection), `batcher` (coalesced, pipelined EVALSHA), `cluster` (the slot map), `pipeline` (a
user's client), `breaker` (outages), `deny` (the deny cache and its subscription), `counters`
(shared totals), `admin` (inspect, reset, count). This module wires them, and binds what
belongs to an event loop to the loop that uses the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from rateguard.bucket import BucketState, Decision, Rule, new_decision
from rateguard.errors import ConfigurationError, StoreError
from rateguard.identity import encode_identifier
from rateguard.stores import Buckets, StoreStats
from rateguard.stores.redis.batcher import BatchFailed, Histogram
from rateguard.stores.redis.binding import Bound, admin_wait, head_of
from rateguard.stores.redis.breaker import ON_ERROR, Breaker, OnError
from rateguard.stores.redis.connect import ADMIN_TIMEOUT, Deployment, discover, from_options
from rateguard.stores.redis.counters import Counters
from rateguard.stores.redis.deny import DenyCache
from rateguard.stores.redis.script import TOKEN_BUCKET_LUA
from rateguard.stores.redis.wire import round_trip


def _seconds(name: str, value: object, hint: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or math.isnan(value)
        or not 0 < value <= 60
    ):
        raise ConfigurationError(f"{name} must be a number of seconds in (0, 60], got {value!r}; {hint}")
    return float(value)


_new_tuple = tuple.__new__  # `new_decision`, inline, where a decision is made per bucket


def _wait(value: Any) -> float:
    """A time of the script's reply in seconds: whole nanoseconds, or text for very long waits."""
    return value / 1e9 if type(value) is int else float(value)


class RedisStore:
    """Token buckets in Redis, so several servers share one limit with no race.

    Connect with exactly one of: ``url`` (``redis://``, ``rediss://``, ``unix://``; add
    ``cluster=True`` for a Redis Cluster), ``host``/``port``/``db``/``username``/``password``
    (``ssl=True`` for TLS), ``sentinels`` + ``service_name``, or a ready ``client``
    (``redis.asyncio.Redis``, ``RedisCluster``, or ``Sentinel.master_for(...)``, never closed by
    rateguard). Nothing connects until the first decision (or `ping`).

    Keys are ``<prefix>{<client>}:<bucket>``: the hash tag keeps one client's buckets in one
    Cluster slot while clients spread over all shards. Each key expires once its bucket is full.

    Outages: every batch of decisions has a deadline of ``timeout`` seconds. When Redis fails or
    is too slow, a circuit breaker stops sending decisions to it for a back-off that doubles from
    ``retry_backoff`` up to ``max_backoff``, then probes it; decisions meanwhile follow
    ``on_error``: ``"local"`` (default) limits with an in-process bucket of the same rule (with N
    servers, up to N x the limit), ``"allow"`` lets requests through, ``"deny"`` answers 503.

    ``deny_cache``: a client that Redis has just denied is denied locally, with no round trip,
    until its bucket could hold enough tokens again; resets and give-backs reach every server's
    cache through pub/sub, and the cache is off whenever that subscription is not live.

    Event loops: a store serves the loop that uses it. Used from a new loop after the old one
    ended (``asyncio.run`` twice, a test per loop), it drops what belonged to the old one and
    starts afresh; two loops running at once in two threads need a store each.
    """

    kind = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        host: str | None = None,
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: bool = False,
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
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"prefix must be a non-empty string without braces, got {prefix!r}; the default is 'rateguard:'"
            )
        if on_error not in ON_ERROR:
            raise ConfigurationError(
                f"on_error must be 'local', 'allow' or 'deny', got {on_error!r}; 'local' (the default) "
                "keeps limiting in each process while Redis is unreachable"
            )
        self.timeout = _seconds("timeout", timeout, "the default is 0.05 (50 ms)")
        self.connect_timeout = _seconds("connect_timeout", connect_timeout, "the default is 0.05 (50 ms)")
        self.retry_backoff = _seconds("retry_backoff", retry_backoff, "the default is 0.25")
        self.max_backoff = _seconds("max_backoff", max_backoff, "the default is 5")
        if self.max_backoff < self.retry_backoff:
            raise ConfigurationError(
                f"max_backoff ({max_backoff}) must be >= retry_backoff ({retry_backoff})"
            )
        self.deployment: Deployment = from_options(
            url=url, host=host, port=port, db=db, username=username, password=password, ssl=ssl, client=client,
            cluster=cluster, sentinels=sentinels, service_name=service_name, connect_timeout=self.connect_timeout,
        )  # fmt: skip
        self.prefix = prefix
        self.on_error: OnError = on_error
        self.deny_cache = bool(deny_cache)
        self.is_cluster = self.deployment.kind == "cluster" or hasattr(client, "get_node_from_key")
        self._stats_key = f"{prefix}stats"
        self._channel = f"{prefix}reset"
        self._breaker = Breaker(
            lambda: self.where, on_error, self.retry_backoff, self.max_backoff, local_max_keys
        )
        self._counters = Counters(self._stats_key, self.timeout * 4)
        self._deny = DenyCache()
        self._latency = Histogram()
        self._bucket_parts: dict[str, str] = {}
        self._args: dict[tuple[int, int], tuple[Any, ...]] = {}  # per (rule, cost): EVALSHA's arguments
        # per (buckets, cost): (buckets, EVALSHA's arguments, each bucket's part of its key)
        self._all_args: dict[tuple[int, int], tuple[Buckets, tuple[Any, ...], tuple[str, ...]]] = {}
        self._args_by_value: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._bound: Bound | None = None
        # `client` asked for outside any event loop: that client (and its Sentinel), which the
        # loop that uses the store next adopts, and closes with the rest.
        self._unbound: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"RedisStore({self.where}, prefix={self.prefix!r}, on_error={self.on_error!r})"

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- what metrics and the admin API read ------------------------------------------------------

    @property
    def where(self) -> str:
        """Where this store's Redis is, for logs: host:port (or the cluster/sentinel), never a password."""
        return self.deployment.where

    @property
    def client(self) -> Any:
        """A redis-py client on this store's Redis, for commands of your own, in this event loop.

        The store closes it with the loop's other connections (at `close`, or when the loop ends):
        ask for it again in another loop. Outside any loop, it is the client the next loop to use
        the store will have.
        """
        try:
            return self._bind().admin.client
        except RuntimeError:  # no running loop
            if self._unbound is None:
                sentinel = self._new_sentinel()
                self._unbound = (self.deployment.admin_client(max(self.timeout, 0.1), sentinel), sentinel)
            return self._unbound[0]

    def _new_sentinel(self) -> Any:
        d = self.deployment
        return d.sentinel(max(self.timeout, 0.1)) if d.kind == "sentinel" else None

    @property
    def latency(self) -> Histogram:
        """Round-trip times of decision batches (seconds), for metrics."""
        return self._latency

    @property
    def degraded(self) -> bool:
        return self._breaker.degraded

    @property
    def last_error(self) -> str | None:
        return self._breaker.last_error

    @property
    def errors(self) -> int:
        return self._breaker.errors

    @property
    def degraded_decisions(self) -> int:
        return self._breaker.degraded_decisions

    @property
    def deny_cache_hits(self) -> int:
        return self._deny.hits

    @property
    def deny_cache_live(self) -> bool:
        """Whether the deny cache answers now (its reset subscription is up)."""
        return self._deny.live

    @property
    def deny_cache_size(self) -> int:
        """Refusals remembered now."""
        return len(self._deny)

    @property
    def allowed(self) -> int:
        return self._counters.allowed

    @property
    def limited(self) -> int:
        return self._counters.limited

    def key(self, client: str, bucket: str) -> str:
        return f"{self.prefix}{{{client}}}:{self._bucket_parts.get(bucket) or self._part(bucket)}"

    # -- decisions --------------------------------------------------------------------------------

    async def take(
        self, client: str, bucket: str, rule: Rule, cost: int = 1, *, now: float | None = None
    ) -> Decision:
        # `take_all` for one bucket, written out: it runs on every request. Its guard is take_all's
        # too, repeated rather than shared: a helper would add a call to every decision.
        bound = self._bound
        if (
            now is not None
            or bound is None
            or bound.closed
            or bound.loop is not asyncio.get_running_loop()
            or self._breaker.degraded
        ):
            return (await self._take_all(client, ((bucket, rule),), cost, now))[0]  # the same test, once
        keys = (f"{self.prefix}{{{client}}}:{self._bucket_parts.get(bucket) or self._part(bucket)}",)
        deny = self._deny
        if deny.live and deny.entries:
            refused = deny.refusal_one(keys, rule, cost)
            if refused is not None:
                self._counters.count(False, bound.loop, bound.flush_soon)
                return refused
        args = self._args.get((id(rule), cost))
        if args is None or args[3] is not rule.rate or args[4] != rule.burst:
            args = self._args_of(rule, cost)
        try:
            e, remaining, retry_after, reset_after = await bound.batcher.submit(keys, args)
        except BatchFailed:
            return self._fallback(client, ((bucket, rule),), cost, bound)[0]
        allowed = e == 1
        self._counters.count(allowed, bound.loop, bound.flush_soon)
        decision = _new_tuple(  # `new_decision`, inline
            Decision,
            (
                allowed,
                rule.burst,
                remaining,  # an integer reply
                retry_after / 1e9 if type(retry_after) is int else float(retry_after),  # `_wait`, inline
                reset_after / 1e9 if type(reset_after) is int else float(reset_after),
                rule.rate,
                False,
            ),
        )
        if not allowed and self.deny_cache and deny.live:
            deny.remember(keys[0][: keys[0].index("}") + 2], keys, ((bucket, rule),), (decision,))
        return decision

    def _args_of(self, rule: Rule, cost: int) -> tuple[Any, ...]:
        """EVALSHA's arguments for one rule and cost, kept: the batcher packs them once."""
        args = (cost, "", "", rule.rate, rule.burst)
        if len(self._args) >= 1024:  # rules and costs are few; this only bounds a runaway
            self._args.clear()
        self._args[(id(rule), cost)] = args
        return args

    async def take_all(
        self, client: str, buckets: Buckets, cost: int = 1, *, now: float | None = None
    ) -> tuple[Decision, ...]:
        # The common case written out, as in `take`: a limit of several rules runs this on every
        # request. Anything else (a test clock, no binding yet, a new loop, an outage) goes the
        # general way.
        bound = self._bound
        if (
            now is not None
            or bound is None
            or bound.closed
            or bound.loop is not asyncio.get_running_loop()
            or self._breaker.degraded
        ):
            return await self._take_all(client, buckets, cost, now)
        found = self._all_args.get((id(buckets), cost))
        if found is None or found[0] is not buckets:
            found = self._plan_of(buckets, cost)
        _, args, parts = found
        head = f"{self.prefix}{{{client}}}:"
        # Two rules (a burst and a quota) is the usual limit of several: its keys without a loop.
        keys = (head + parts[0], head + parts[1]) if len(parts) == 2 else tuple([head + p for p in parts])
        deny = self._deny
        if deny.live and deny.entries:
            denied = deny.refusal(keys, buckets, cost)
            if denied is not None:
                self._counters.count(False, bound.loop, bound.flush_soon)
                return denied
        try:
            reply = await bound.batcher.submit(keys, args)
        except BatchFailed:
            return self._fallback(client, buckets, cost, bound)
        decisions = []
        allowed = True
        i = 0
        for _, rule in buckets:  # four values a bucket: enough, whole tokens left, the two waits
            enough = reply[i] == 1
            if not enough:
                allowed = False
            retry_after, reset_after = reply[i + 2], reply[i + 3]
            decisions.append(
                _new_tuple(
                    Decision,
                    (
                        enough,
                        rule.burst,
                        reply[i + 1],
                        retry_after / 1e9 if type(retry_after) is int else float(retry_after),  # `_wait`
                        reset_after / 1e9 if type(reset_after) is int else float(reset_after),
                        rule.rate,
                        False,
                    ),
                )
            )
            i += 4
        out = tuple(decisions)
        # `_count`, inline (a decision that outlived a close counts without its loop's timer)
        self._counters.count(allowed, bound.loop if bound is self._bound else None, bound.flush_soon)
        if not allowed and self.deny_cache and deny.live:
            deny.remember(head, keys, buckets, out)
        return out

    def _part(self, bucket: str) -> str:
        """A bucket name's part of its keys, kept (they are few: "global" and route templates)."""
        part = encode_identifier(bucket)
        if len(self._bucket_parts) < 4096:  # bucket names are few: "global" and route templates
            self._bucket_parts[bucket] = part
        return part

    def _plan_of(self, buckets: Buckets, cost: int) -> tuple[Buckets, tuple[Any, ...], tuple[str, ...]]:
        """EVALSHA's arguments for several rules and the buckets' parts of their keys, kept per
        ``buckets`` (a limit's plan keeps one tuple); the arguments one tuple per distinct value,
        so the batcher's pack cache finds it."""
        args: list[Any] = [cost, "", ""]
        for _, rule in buckets:
            args += (rule.rate, rule.burst)
        value = tuple(args)
        if len(self._all_args) >= 1024:  # limits and costs are few; this only bounds a runaway
            self._all_args.clear()
            self._args_by_value.clear()
        value = self._args_by_value.setdefault(value, value)
        found = (buckets, value, tuple([self._bucket_parts.get(b) or self._part(b) for b, _ in buckets]))
        if type(buckets) is tuple:  # a list could change under the same identity
            self._all_args[(id(buckets), cost)] = found
        return found

    async def _take_all(
        self, client: str, buckets: Buckets, cost: int, now: float | None
    ) -> tuple[Decision, ...]:
        keys = tuple([self.key(client, bucket) for bucket, _ in buckets])
        bound = self._bind()
        breaker = self._breaker
        if breaker.degraded:
            if breaker.probe_due():
                bound.start_probe()
            return self._fallback(client, buckets, cost, bound)
        deny = self._deny
        if deny.live and now is None:
            denied = deny.refusal(keys, buckets, cost)
            if denied is not None:
                self._count(False, bound)
                return denied
        args: list[Any] = [cost, "" if now is None else now, ""]
        for _, rule in buckets:
            args += (rule.rate, rule.burst)
        try:
            reply = await bound.batcher.submit(keys, tuple(args))
        except BatchFailed:
            return self._fallback(client, buckets, cost, bound)
        decisions = tuple(
            [
                new_decision(
                    reply[i] == 1,
                    rule.burst,
                    int(reply[i + 1]),
                    _wait(reply[i + 2]),
                    _wait(reply[i + 3]),
                    rule.rate,
                )
                for i, (_, rule) in zip(range(0, 4 * len(buckets), 4), buckets, strict=True)
            ]
        )
        allowed = all(d.allowed for d in decisions)
        self._count(allowed, bound)
        if not allowed and self.deny_cache and deny.live and now is None:
            deny.remember(keys[0][: keys[0].index("}") + 2], keys, buckets, decisions)
        return decisions

    async def give_back(
        self, client: str, buckets: Buckets, cost: int = 1, *, now: float | None = None
    ) -> None:
        keys = tuple([self.key(client, bucket) for bucket, _ in buckets])
        bound = self._bind()
        self._deny.forget_keys(keys, head_of)
        if self._breaker.degraded:
            self._breaker.local.give_back_now(client, buckets, cost)
            return
        args: list[Any] = [-cost, "" if now is None else now, self._channel if self.deny_cache else ""]
        for _, rule in buckets:
            args += (rule.rate, rule.burst)
        with contextlib.suppress(BatchFailed):
            await bound.batcher.submit(keys, tuple(args))

    def _fallback(self, client: str, buckets: Buckets, cost: int, bound: Bound) -> tuple[Decision, ...]:
        decisions = self._breaker.fallback(client, buckets, cost)
        self._count(all(d.allowed for d in decisions), bound)
        return decisions

    def _count(self, allowed: bool, bound: Bound) -> None:
        current = bound is self._bound  # else a decision that outlived a close: its loop's timer is gone
        self._counters.count(allowed, bound.loop if current else None, bound.flush_soon)

    def _failed(self, exc: BaseException) -> None:
        if self._breaker.failed(exc):
            self._deny.clear()  # a reset may be missed while we can't hear Redis

    def _succeeded(self) -> None:
        self._breaker.succeeded()

    # -- event loops ------------------------------------------------------------------------------

    def _bind(self) -> Bound:
        """This loop's parts: made on first use in it; those of a loop that ended are dropped."""
        loop = asyncio.get_running_loop()
        bound = self._bound
        if bound is not None:
            if bound.loop is loop:
                if not bound.closed:
                    return bound
                # Closed by its keeper while the loop goes on (its tasks were all cancelled): anew.
            elif bound.loop.is_running():
                raise StoreError(
                    f"{self!r} is in use by an event loop running in another thread; a store serves one "
                    "loop at a time: create one store per event loop (per thread)"
                )
            else:
                bound.abandon()
        bound = self._bound = Bound(self, loop)
        return bound

    async def close(self) -> None:
        """Stop background work and close this store's connections; quick, and safe to repeat.

        A ``client=`` of yours is left open. The store opens again if it is used afterwards.
        """
        bound, self._bound = self._bound, None
        if bound is None:
            return
        if bound.loop is asyncio.get_running_loop():
            await bound.aclose(flush=True)
        elif bound.loop.is_running():  # another thread's loop: it closes its own, we don't wait
            bound.loop.call_soon_threadsafe(bound.spawn_close)
        else:
            bound.abandon()

    # -- admin ------------------------------------------------------------------------------------

    async def ping(self) -> float:
        """Seconds one PING round trip takes; `StoreError` saying what is wrong (host, auth, db, TLS)."""
        d = self.deployment
        if d.kind == "client":
            start = time.perf_counter()
            try:
                async with asyncio.timeout(max(1.0, self.connect_timeout)):
                    await d.client.ping()
            except Exception as exc:
                raise StoreError(f"Redis at {self.where}: {type(exc).__name__}: {exc}") from None
            return time.perf_counter() - start
        if d.kind == "sentinel":
            bound = self._bind()
            assert d.service_name is not None and bound.sentinel is not None
            address = await discover(bound.sentinel, d.service_name)
        else:
            assert d.address is not None
            address = d.address
        # A check, not a decision: at least a second, as for a client= and the admin client, so a
        # busy machine gets "connection refused" (or the real cause), not a 50 ms deadline.
        timeout = max(d.settings.connect_timeout, ADMIN_TIMEOUT)
        return await round_trip(address, dataclasses.replace(d.settings, connect_timeout=timeout))

    async def inspect(self, client: str) -> list[BucketState]:
        admin = self._bind().admin
        return await admin.twice(lambda: admin.inspect(client))

    async def reset(self, client: str) -> list[str]:
        bound = self._bind()
        admin = bound.admin
        names = await admin.twice(lambda: admin.reset(client))
        # This server too: its cached denials and fallback buckets of that client.
        self._deny.forget_client(f"{self.prefix}{{{client}}}:")
        self._breaker.local.reset_now(client)
        try:
            async with asyncio.timeout(admin_wait(self)):
                await bound.publish(client)
        except (StoreError, TimeoutError, RedisError, OSError) as exc:
            raise StoreError(
                f"Redis at {self.where} reset {client!r}, but could not tell the other servers' deny "
                f"caches: {type(exc).__name__}: {exc}"
            ) from exc
        return names

    def _on_reset(self, client: str) -> None:
        self._deny.forget_client(f"{self.prefix}{{{client}}}:")
        self._breaker.local.reset_now(client)

    async def count(self) -> int:
        admin = self._bind().admin
        return await admin.twice(admin.count)

    async def clear(self) -> int:
        """Delete every bucket under this store's prefix, on every server: each client starts full.

        For tests (`rateguard.testing.reset`): on a shared Redis, every app using the prefix
        loses its buckets. The shared totals stay. Returns how many buckets there were.
        """
        admin = self._bind().admin
        deleted = await admin.twice(admin.clear)
        self._deny.clear()
        self._breaker.local.clear()
        return deleted

    async def stats(self) -> StoreStats:
        allowed, limited = self._counters.allowed, self._counters.limited
        bound = self._bind()
        try:
            async with asyncio.timeout(max(1.0, self.timeout * 10)):
                await bound.admin.twice(bound.admin.client.ping)  # also clears a stale pooled connection
                start = time.perf_counter()
                await bound.admin.client.ping()
                latency = (time.perf_counter() - start) * 1000
                await bound.flush()
                allowed_total, limited_total = await bound.admin.totals(self._stats_key)
                buckets = await self.count()
        except Exception as exc:  # unreachable, or a redis-py error: reported, never raised
            return StoreStats(
                "redis", allowed, limited, allowed, limited, self._breaker.local.size, False, None,
                self.degraded, f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
        return StoreStats(
            "redis", allowed, limited, allowed_total, limited_total, buckets, True, round(latency, 3),
            self.degraded, self.last_error,
        )  # fmt: skip


__all__ = ["TOKEN_BUCKET_LUA", "RedisStore"]
