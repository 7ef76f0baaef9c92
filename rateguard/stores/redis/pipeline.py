"""Decisions through a redis-py client you made (``RedisStore(client=...)``), by its public API.

Each batch of decisions is one non-transactional pipeline of EVALSHA (on a ``RedisCluster``,
whose pipelines refuse scripts, concurrent calls): coalesced like on rateguard's own connection,
but with redis-py's per-command work, so slower (see the benchmarks). Whatever the client is configured with (TLS, credentials, retries, a Cluster's
routing, a Sentinel's failover) applies as it is.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from rateguard.stores.redis.batcher import Batcher, BatchFailed, Channel, Entry
from rateguard.stores.redis.wire import ReplyError

# redis-py parses an error reply into an exception and drops its code: put the code back, so the
# batcher decides as it does for its own connection (resend, outage, or fail).
_CODES: tuple[tuple[type[Exception], str], ...] = (
    (NoScriptError, "NOSCRIPT"),
    (TryAgainError, "TRYAGAIN"),
    (ReadOnlyError, "READONLY"),
    (ClusterDownError, "CLUSTERDOWN"),
    (MasterDownError, "MASTERDOWN"),
)


def _as_reply_error(exc: Exception) -> ReplyError:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return ReplyError(f"{code} {exc}")
    return ReplyError(f"ERR {exc}")


class PipelineChannel(Channel):
    """The one channel of a store built on a user's client."""

    def __init__(self, batcher: Batcher, client: Any) -> None:
        super().__init__(batcher, self._no_address)
        self.client = client
        self.cluster = hasattr(client, "get_node_from_key")
        self._in_flight = 0
        self._warm = False  # the client has connected (a Cluster: read its slot map) once

    @staticmethod
    async def _no_address() -> Any:
        raise AssertionError("a pipeline channel has no address of its own")

    @property
    def ready(self) -> bool:
        return self._warm and self._in_flight == 0 and not self.batcher.failing

    def send(self, entries: list[Entry], data: bytes) -> None:
        self._in_flight += 1
        self.batcher.spawn(self._answered(entries))

    async def _answered(self, entries: list[Entry]) -> None:
        try:
            await self._run(entries)
        except asyncio.CancelledError:  # the store closes: every decision hears of it
            failure = BatchFailed("store closed")
            for entry in entries:
                entry.fail(failure)
            raise

    async def _warm_up(self) -> None:
        """Connect once outside the batch deadline: redis-py connects (and a Cluster reads its
        slot map) on first use, which takes longer than a decision may."""
        async with asyncio.timeout(max(1.0, self.batcher.settings.connect_timeout * 10)):
            if self.cluster:
                await self.client.initialize()
            else:
                await self.client.ping()
        self._warm = True

    async def _run(self, entries: list[Entry]) -> None:
        batcher = self.batcher
        if not self._warm:
            try:
                await self._warm_up()
            except Exception as exc:
                self._in_flight -= 1
                failure = BatchFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                for entry in entries:
                    entry.fail(failure)
                batcher.failed(failure)
                return
        sent = perf_counter()
        try:
            async with asyncio.timeout(batcher.timeout):
                if self.cluster:
                    # redis-py's cluster pipelines refuse EVALSHA: concurrent calls instead, each
                    # routed to its slot's node by the client.
                    calls = [self.client.evalsha(batcher.sha, len(e.keys), *e.keys, *e.args) for e in entries]
                    results = await asyncio.gather(*calls, return_exceptions=True)
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for entry in entries:
                        pipe.evalsha(batcher.sha, len(entry.keys), *entry.keys, *entry.args)
                    results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # whatever the client raises, every decision hears of it
            failure = BatchFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            for entry in entries:
                entry.fail(failure)
            batcher.failed(failure)
            return
        finally:
            self._in_flight -= 1
        batcher.latency.observe(perf_counter() - sent)
        broken = next(
            (r for r in results if isinstance(r, Exception) and not isinstance(r, ResponseError)), None
        )
        if broken is not None:  # a connection error in one of the cluster's calls
            batcher.failed(broken)
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, ResponseError):
                entry.reply(_as_reply_error(result))
            elif isinstance(result, Exception):
                entry.fail(BatchFailed(f"{type(result).__name__}: {result}"))
            else:
                entry.reply(result)

    async def load_script(self, script: bytes, loading: dict[int, asyncio.Future[Any]]) -> None:
        try:
            async with asyncio.timeout(self.batcher.timeout + self.batcher.settings.connect_timeout):
                await self.client.script_load(script)
        except (TimeoutError, RedisError, OSError) as exc:
            raise BatchFailed(f"SCRIPT LOAD failed: {exc}") from None

    async def ping(self) -> None:
        try:
            await self._warm_up()
        except (RedisError, OSError) as exc:
            raise BatchFailed(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        """Nothing of its own to close: the client is the user's."""


__all__ = ["PipelineChannel"]
