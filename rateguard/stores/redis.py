"""RedisStore: buckets in Redis, shared by every app server, one atomic Lua step per decision."""

from __future__ import annotations

from importlib.resources import files
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rateguard.bucket import BucketState, Decision, Rule, refill
from rateguard.errors import ConfigurationError, StoreError
from rateguard.stores import StoreStats

TOKEN_BUCKET_LUA = files("rateguard.stores").joinpath("token_bucket.lua").read_text("utf-8")

_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def _num(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


class RedisStore:
    """Token buckets in Redis, so several servers share one limit with no race.

    Give exactly one of ``url`` (``redis://``, ``rediss://``, ``unix://``), ``host``/``port``, or
    a ready ``client`` (a ``redis.asyncio.Redis``). Keys are ``<prefix>{<client>}:<bucket>``: the
    hash tag keeps one client's buckets in one Redis Cluster slot. Nothing connects until the
    first decision, so constructing a store never blocks.
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
        client: aioredis.Redis | None = None,
        prefix: str = "rateguard:",
    ) -> None:
        given = [name for name, v in (("url", url), ("host", host), ("client", client)) if v is not None]
        if len(given) > 1:
            raise ConfigurationError(
                f"RedisStore takes one of url=, host=/port= or client=, got {' and '.join(given)}"
            )
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"prefix must be a non-empty string without braces, got {prefix!r}; "
                "the default is 'rateguard:'"
            )
        if client is not None:
            if not hasattr(client, "evalsha"):
                raise ConfigurationError(
                    f"client must be a redis.asyncio client, got {type(client).__name__}"
                )
            self._client = client
        elif url is not None:
            if not isinstance(url, str) or "://" not in url:
                raise ConfigurationError(f"url must look like 'redis://host:6379/0', got {url!r}")
            try:
                self._client = aioredis.Redis.from_url(url)
            except ValueError as exc:
                raise ConfigurationError(f"bad Redis url {url!r}: {exc}") from None
        else:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigurationError(f"port must be an int from 1 to 65535, got {port!r}")
            self._client = aioredis.Redis(host=host or "localhost", port=port, db=db, password=password)
        self.prefix = prefix
        self._script = self._client.register_script(TOKEN_BUCKET_LUA)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def key(self, client: str, bucket: str) -> str:
        from rateguard.identity import encode_identifier

        return f"{self.prefix}{{{client}}}:{encode_identifier(bucket)}"

    async def take(
        self, client: str, bucket: str, rule: Rule, cost: int = 1, *, now: float | None = None
    ) -> Decision:
        args: list[Any] = [repr(rule.rate), rule.burst, cost]
        if now is not None:
            args.append(repr(float(now)))  # tests only: pin the script's clock
        try:
            allowed, remaining, retry_after, reset_after = await self._script(
                keys=[self.key(client, bucket)], args=args
            )
        except RedisError as exc:
            raise StoreError(f"Redis could not decide: {exc}") from exc
        return Decision(
            bool(allowed),
            rule.burst,
            int(remaining),
            _num(retry_after),
            _num(reset_after),
            rule.rate,
        )

    async def _client_keys(self, client: str) -> list[bytes]:
        pattern = f"{self.prefix}{{{client}}}:".translate(_GLOB_SPECIAL) + "*"
        return [k async for k in self._client.scan_iter(match=pattern, count=1000)]

    async def inspect(self, client: str) -> list[BucketState]:
        try:
            keys = await self._client_keys(client)
            if not keys:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.time()
                for k in keys:
                    pipe.hmget(k, "t", "ts", "c", "r")
                results = await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"Redis could not inspect {client!r}: {exc}") from exc
        sec, usec = results[0]
        now = sec + usec / 1_000_000
        out = []
        for k, fields in zip(keys, results[1:], strict=True):
            if None in fields:
                continue  # expired between SCAN and HMGET: a full bucket, nothing to show
            tokens, last, cap, rate = (_num(f) for f in fields)
            bucket = _bucket_name(k, self.prefix, client)
            out.append(BucketState(bucket, refill(tokens, last, now, rate, int(cap)), int(cap), rate))
        return out

    async def reset(self, client: str) -> list[str]:
        try:
            keys = await self._client_keys(client)
            if keys:
                await self._client.unlink(*keys)
        except RedisError as exc:
            raise StoreError(f"Redis could not reset {client!r}: {exc}") from exc
        return [_bucket_name(k, self.prefix, client) for k in keys]

    async def count(self) -> int:
        pattern = self.prefix.translate(_GLOB_SPECIAL) + "*"
        try:
            n = 0
            async for _ in self._client.scan_iter(match=pattern, count=1000):
                n += 1
            return n
        except RedisError as exc:
            raise StoreError(f"Redis could not count buckets: {exc}") from exc

    async def stats(self) -> StoreStats:
        # Placeholder until the batching store lands: local counters only.
        import time

        try:
            t0 = time.perf_counter()
            await self._client.ping()
            latency = (time.perf_counter() - t0) * 1000
            buckets = await self.count()
        except (RedisError, StoreError) as exc:
            return StoreStats("redis", 0, 0, 0, 0, 0, False, None, False, str(exc))
        return StoreStats("redis", 0, 0, 0, 0, buckets, True, latency)

    async def close(self) -> None:
        await self._client.aclose()


def _bucket_name(key: bytes | str, prefix: str, client: str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return unquote(text[len(prefix) + len(client) + 3 :])


__all__ = ["TOKEN_BUCKET_LUA", "RedisStore"]
