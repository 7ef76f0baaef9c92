"""The admin side of a RedisStore: inspect, reset and count buckets over SCAN, through redis-py.

None of this is on a request's path. A Cluster is walked through redis-py's public calls:
``initialize()``, ``get_node_from_key()``, ``get_primaries()`` and ``target_nodes=``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from rateguard.bucket import BucketState, refill
from rateguard.errors import StoreError

T = TypeVar("T")
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


# Each bucket as "tokens last capacity rate" ('' if it expired), after the server's TIME.
INSPECT = """
local t = redis.call('TIME')
local out = {t[1], t[2]}
for i = 1, #KEYS do
  local v = redis.pcall('GET', KEYS[i])
  local f = ''
  if type(v) == 'string' then
    f = string.format('%.17g %.17g %.17g %.17g', struct.unpack('<dddd', v))
  elseif type(v) == 'table' and v.err then  -- a bucket in the earlier hash form
    local h = redis.call('HMGET', KEYS[i], 't', 'ts', 'c', 'r')
    if h[1] and h[2] and h[3] and h[4] then f = table.concat(h, ' ') end
  end
  out[#out + 1] = f
end
return out
"""


def _num(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


def bucket_name(key: bytes | str, prefix: str, client: str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return unquote(text[len(prefix) + len(client) + 3 :])


class Admin:
    """Admin operations on one redis-py client (plain, Sentinel or Cluster)."""

    def __init__(self, client: Any, prefix: str, cluster: bool) -> None:
        self.client = client
        self.prefix = prefix
        self.cluster = cluster

    async def twice(self, operation: Callable[[], Awaitable[T]]) -> T:
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

    async def _on_node(self, node: Any, *command: Any) -> Any:
        """One command on one cluster node (redis-py may answer {node name: reply} for those)."""
        reply = await self.client.execute_command(*command, target_nodes=node)
        if isinstance(reply, dict) and len(reply) == 1:
            return next(iter(reply.values()))
        if command[0] == "SCAN" and isinstance(reply[0], dict):  # ({node: cursor}, keys)
            return next(iter(reply[0].values())), reply[1]
        return reply

    async def _scan_node(self, node: Any, pattern: str) -> list[bytes]:
        keys: list[bytes] = []
        cursor: Any = 0
        while True:
            cursor, batch = await self._on_node(node, "SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            keys.extend(batch)
            if int(cursor) == 0:
                return keys

    async def client_keys(self, client: str) -> list[bytes]:
        pattern = f"{self.prefix}{{{client}}}:".translate(_GLOB_SPECIAL) + "*"
        if self.cluster:
            # One client's keys share a slot: scan only the node that owns it.
            await self.client.initialize()
            return await self._scan_node(
                self.client.get_node_from_key(f"{self.prefix}{{{client}}}:x"), pattern
            )
        return [k async for k in self.client.scan_iter(match=pattern, count=1000)]

    async def inspect(self, client: str) -> list[BucketState]:
        try:
            keys = await self.client_keys(client)
            if not keys:
                return []
            # One script for all of them (one client's keys share a slot): Redis unpacks the
            # binary values, so a user's client with decode_responses=True reads them too.
            sec, usec, *results = await self.client.eval(INSPECT, len(keys), *keys)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis could not inspect {client!r}: {exc}") from exc
        now = int(sec) + int(usec) / 1_000_000
        out = []
        for k, fields in zip(keys, results, strict=True):
            if not fields:
                continue  # expired between SCAN and the script: a full bucket, nothing to show
            tokens, last, cap, rate = (_num(f) for f in fields.split())
            out.append(
                BucketState(
                    bucket_name(k, self.prefix, client),
                    refill(tokens, last, now, rate, int(cap)),
                    int(cap),
                    rate,
                )
            )
        return sorted(out, key=lambda state: state.bucket)  # not SCAN's order, which servers differ in

    async def reset(self, client: str) -> list[str]:
        """Delete a client's buckets (the store then tells every server's deny cache)."""
        try:
            keys = await self.client_keys(client)
            if keys:
                await self.client.delete(*keys)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis could not reset {client!r}: {exc}") from exc
        return sorted(bucket_name(k, self.prefix, client) for k in keys)  # not SCAN's order

    async def count(self) -> int:
        pattern = self.prefix.translate(_GLOB_SPECIAL) + "{*"
        try:
            if self.cluster:
                await self.client.initialize()
                n = 0
                for node in self.client.get_primaries():
                    n += len(await self._scan_node(node, pattern))
                return n
            n = 0
            async for _ in self.client.scan_iter(match=pattern, count=1000):
                n += 1
            return n
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis could not count buckets: {exc}") from exc

    async def clear(self) -> int:
        """Delete every bucket under the prefix (not the shared totals); how many there were."""
        pattern = self.prefix.translate(_GLOB_SPECIAL) + "{*"
        deleted = 0
        try:
            if self.cluster:
                await self.client.initialize()
                for node in self.client.get_primaries():
                    by_slot: dict[int, list[bytes]] = {}
                    for key in await self._scan_node(node, pattern):
                        by_slot.setdefault(key_slot(key), []).append(key)
                    for keys in by_slot.values():  # one command, one slot: what a Cluster allows
                        deleted += int(await self._on_node(node, "DEL", *keys))
                return deleted
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(await self.client.delete(*batch))
                    batch = []
            if batch:
                deleted += int(await self.client.delete(*batch))
            return deleted
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis could not clear the buckets: {exc}") from exc

    async def totals(self, key: str) -> tuple[int, int]:
        allowed, limited = await self.client.hmget(key, "allowed", "limited")
        return int(allowed or 0), int(limited or 0)


__all__ = ["Admin", "bucket_name"]
