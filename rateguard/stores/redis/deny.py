"""The deny cache: a client Redis has just refused is refused here, with no round trip, until its
buckets could hold the cost again.

That is exact for a token bucket: tokens only come back by refill, or by a give-back or an admin
reset, and both of those reach every server through Redis pub/sub (the give-back script
publishes itself). The cache is on only while that subscription is live: `ResetListener` keeps
it, a task with an owner and an exit that never relies on redis-py honouring cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from rateguard.bucket import EPSILON, Decision, new_decision, refill
from rateguard.stores import Buckets

logger = logging.getLogger("rateguard.redis")

REFUND = "refund\n"  # a give-back's message: the keys that got tokens back, one per line
_MAX_ENTRIES = 100_000


class _Denied:
    __slots__ = ("at", "head", "keys", "rules", "tokens")

    def __init__(
        self,
        head: str,
        keys: tuple[str, ...],
        tokens: list[float],
        at: float,
        rules: tuple[tuple[float, int], ...],
    ) -> None:
        self.head = head
        self.keys = keys
        self.tokens = tokens
        self.at = at
        self.rules = rules


class DenyCache:
    """Refusals remembered per group of keys (the buckets one limit decides together)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.live = False  # the reset channel is subscribed: only then may the cache answer
        self.hits = 0
        self._entries: dict[tuple[str, ...], _Denied] = {}
        self._by_client: dict[str, set[tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def refusal(self, keys: tuple[str, ...], buckets: Buckets, cost: int) -> tuple[Decision, ...] | None:
        """The refusal Redis would give now, if the remembered state proves it; else None."""
        entry = self._entries.get(keys)
        if entry is None:
            return None
        rules = tuple((r.rate, r.burst) for _, r in buckets)
        if rules != entry.rules:  # the rules changed (a new plan): ask Redis
            self._drop(entry)
            return None
        now = self.clock()
        # Tokens known at `at`, refilled since: an upper bound (other servers only take more).
        tokens = [
            refill(t, entry.at, now, rate, cap) for t, (rate, cap) in zip(entry.tokens, rules, strict=True)
        ]
        if all(t + EPSILON >= cost for t in tokens):
            self._drop(entry)
            return None
        self.hits += 1
        return tuple(
            new_decision(
                t + EPSILON >= cost,
                cap,
                math.floor(t + EPSILON),
                0.0 if t + EPSILON >= cost else (cost - t) / rate,
                (cap - t) / rate,
                rate,
            )
            for t, (rate, cap) in zip(tokens, rules, strict=True)
        )

    def remember(
        self, head: str, keys: tuple[str, ...], buckets: Buckets, decisions: Sequence[Decision]
    ) -> None:
        if len(self._entries) >= _MAX_ENTRIES:
            self._prune()
        rules = tuple((r.rate, r.burst) for _, r in buckets)
        entry = _Denied(head, keys, [max(0.0, d.tokens) for d in decisions], self.clock(), rules)
        old = self._entries.get(keys)
        if old is not None:
            self._drop(old)
        self._entries[keys] = entry
        self._by_client.setdefault(head, set()).add(keys)

    def forget_client(self, head: str) -> None:
        for keys in self._by_client.pop(head, ()):
            self._entries.pop(keys, None)

    def forget_keys(self, refunded: Sequence[str], head_of: Callable[[str], str]) -> None:
        """Tokens came back to these keys: no refusal that involves one of them stands."""
        gone = set(refunded)
        for key in refunded:
            head = head_of(key)
            for keys in list(self._by_client.get(head, ())):
                if gone.intersection(keys):
                    entry = self._entries.get(keys)
                    if entry is not None:
                        self._drop(entry)

    def clear(self) -> None:
        self._entries.clear()
        self._by_client.clear()

    def _drop(self, entry: _Denied) -> None:
        self._entries.pop(entry.keys, None)
        group = self._by_client.get(entry.head)
        if group is not None:
            group.discard(entry.keys)
            if not group:
                del self._by_client[entry.head]

    def _prune(self) -> None:
        now = self.clock()
        for entry in list(self._entries.values()):
            if all(
                refill(t, entry.at, now, r, c) >= c
                for t, (r, c) in zip(entry.tokens, entry.rules, strict=True)
            ):
                self._drop(entry)
        if len(self._entries) >= _MAX_ENTRIES:
            self.clear()


class ResetListener:
    """Subscribes to the store's reset channel and keeps the deny cache honest.

    Every wait is bounded by its own timeout, and the loop checks ``cancelling()`` and its own
    ``closing`` flag each time round: Python 3.11's ``asyncio.wait_for`` (inside redis-py) can
    swallow a cancellation, and a loop that trusted it would never end.
    """

    def __init__(
        self,
        client: Any,
        channel: str,
        cache: DenyCache,
        on_reset: Callable[[str], None],
        on_refund: Callable[[list[str]], None],
        backoff: Callable[[], float],
        where: Callable[[], str],
        timeout: float,
    ) -> None:
        self.client = client
        self.channel = channel
        self.cache = cache
        self.on_reset = on_reset
        self.on_refund = on_refund
        self.backoff = backoff
        self.where = where
        self.timeout = timeout
        self.closing = False

    def _stopping(self) -> bool:
        task = asyncio.current_task()
        return self.closing or (task is not None and task.cancelling() > 0)

    async def run(self) -> None:
        lost_at = 0.0
        while not self._stopping():
            pubsub = None
            try:
                pubsub = self.client.pubsub()
                async with asyncio.timeout(self.timeout):
                    await pubsub.subscribe(self.channel)
                while not self._stopping():
                    async with asyncio.timeout(1.5):  # bounded even if get_message is not
                        message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.cache.live = True
                        if lost_at:
                            logger.info("rateguard: Redis %s reset channel back; deny cache on", self.where())
                            lost_at = 0.0
                    elif message["type"] == "message":
                        data = message["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        if text.startswith(REFUND):
                            self.on_refund(text[len(REFUND) :].split("\n"))
                        else:
                            self.on_reset(text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: the cache is off until subscribed again
                if self.cache.live:
                    logger.info(
                        "rateguard: Redis %s reset channel lost (%s); deny cache off until it is back",
                        self.where(),
                        type(exc).__name__,
                    )
                    lost_at = time.monotonic()
            finally:
                self.cache.live = False
                self.cache.clear()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(0.5):
                            await pubsub.aclose()
            if self._stopping():
                break
            await asyncio.sleep(self.backoff())


__all__ = ["REFUND", "DenyCache", "ResetListener"]
