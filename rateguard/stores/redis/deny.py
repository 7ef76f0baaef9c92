"""The deny cache: a client Redis has just refused is refused here, with no round trip, until its
buckets could hold the cost again.

That is exact for a token bucket: tokens only come back by refill, or by a give-back or an admin
reset, and both of those reach every server through Redis pub/sub (the give-back script
publishes itself). The cache is on only while that subscription is live (`Subscription`): kept
by `subscriber.Subscriber` on rateguard's own connection, or by `ResetListener` through a
redis-py client of yours; each a task with an owner and an exit that never relies on a library
honouring cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from rateguard.bucket import EPSILON, Decision, Rule, new_decision, refill
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
        # Public for the hot path's one test: an empty cache answers nothing, no call needed.
        self.entries: dict[tuple[str, ...], _Denied] = {}
        self._by_client: dict[str, set[tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def refusal_one(self, keys: tuple[str, ...], rule: Rule, cost: int) -> Decision | None:
        """`refusal` for one bucket, written out: every request of a blocked client comes here."""
        entry = self.entries.get(keys)
        if entry is None:
            return None
        rate, cap = rule.rate, rule.burst
        rules = entry.rules
        if len(rules) != 1 or rules[0][0] != rate or rules[0][1] != cap:  # a new plan: ask Redis
            self._drop(entry)
            return None
        t = refill(entry.tokens[0], entry.at, self.clock(), rate, cap)
        if t + EPSILON >= cost:
            self._drop(entry)
            return None
        self.hits += 1
        return new_decision(False, cap, math.floor(t + EPSILON), (cost - t) / rate, (cap - t) / rate, rate)

    def refusal(self, keys: tuple[str, ...], buckets: Buckets, cost: int) -> tuple[Decision, ...] | None:
        """The refusal Redis would give now, if the remembered state proves it; else None."""
        entry = self.entries.get(keys)
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
        if len(self.entries) >= _MAX_ENTRIES:
            self._prune()
        rules = tuple((r.rate, r.burst) for _, r in buckets)
        entry = _Denied(head, keys, [max(0.0, d.tokens) for d in decisions], self.clock(), rules)
        old = self.entries.get(keys)
        if old is not None:
            self._drop(old)
        self.entries[keys] = entry
        self._by_client.setdefault(head, set()).add(keys)

    def forget_client(self, head: str) -> None:
        for keys in self._by_client.pop(head, ()):
            self.entries.pop(keys, None)

    def forget_keys(self, refunded: Sequence[str], head_of: Callable[[str], str]) -> None:
        """Tokens came back to these keys: no refusal that involves one of them stands."""
        gone = set(refunded)
        for key in refunded:
            head = head_of(key)
            for keys in list(self._by_client.get(head, ())):
                if gone.intersection(keys):
                    entry = self.entries.get(keys)
                    if entry is not None:
                        self._drop(entry)

    def clear(self) -> None:
        self.entries.clear()
        self._by_client.clear()

    def _drop(self, entry: _Denied) -> None:
        self.entries.pop(entry.keys, None)
        group = self._by_client.get(entry.head)
        if group is not None:
            group.discard(entry.keys)
            if not group:
                del self._by_client[entry.head]

    def _prune(self) -> None:
        now = self.clock()
        for entry in list(self.entries.values()):
            if all(
                refill(t, entry.at, now, r, c) >= c
                for t, (r, c) in zip(entry.tokens, entry.rules, strict=True)
            ):
                self._drop(entry)
        if len(self.entries) >= _MAX_ENTRIES:
            self.clear()


class Subscription:
    """What a subscriber to the reset channel does with it, however it is subscribed.

    The deny cache answers only while subscribed: `lost` turns it off and empties it (a reset
    may be missed meanwhile), `subscribed` turns it on again; each change is logged once.
    A message is a client's reset (its encoded id) or a give-back (``REFUND`` and the keys).
    """

    def __init__(
        self,
        cache: DenyCache,
        on_reset: Callable[[str], None],
        on_refund: Callable[[list[str]], None],
        where: Callable[[], str],
    ) -> None:
        self.cache = cache
        self.on_reset = on_reset
        self.on_refund = on_refund
        self.where = where
        self.detached = False  # its store serves another loop now: the cache is no longer its own
        self._lost_at = 0.0

    def subscribed(self) -> None:
        if self.detached:
            return
        self.cache.live = True
        if self._lost_at:
            logger.info("rateguard: Redis %s reset channel back; deny cache on", self.where())
            self._lost_at = 0.0

    def lost(self, exc: BaseException | None) -> None:
        """The subscription ended (``exc`` None: closed on purpose, nothing to log)."""
        if self.detached:
            return
        if self.cache.live and exc is not None:
            logger.info(
                "rateguard: Redis %s reset channel lost (%s); deny cache off until it is back",
                self.where(),
                type(exc).__name__,
            )
            self._lost_at = time.monotonic()
        self.cache.live = False
        self.cache.clear()

    def message(self, data: bytes | str) -> None:
        if self.detached:
            return
        text = data.decode() if isinstance(data, bytes) else str(data)
        if text.startswith(REFUND):
            self.on_refund(text[len(REFUND) :].split("\n"))
        else:
            self.on_reset(text)


def stopping(closing: bool) -> bool:
    """Whether a background loop must end: closed by its owner, or its task is being cancelled.

    Checked each time round, because a library may swallow the cancellation itself (Python
    3.11's ``asyncio.wait_for``, gh-86296), and a loop that trusted it would never end.
    """
    task = asyncio.current_task()
    return closing or (task is not None and task.cancelling() > 0)


class ResetListener:
    """The reset channel through a redis-py client's pub/sub (for a ``client=`` of yours).

    Every wait is bounded by its own timeout, and the loop checks `stopping` each time round.
    """

    def __init__(
        self,
        client: Any,
        channel: str,
        subscription: Subscription,
        backoff: Callable[[int], float],
        timeout: float,
    ) -> None:
        self.client = client
        self.channel = channel
        self.subscription = subscription
        self.backoff = backoff
        self.timeout = timeout
        self.closing = False

    async def run(self) -> None:
        failures = 0
        while not stopping(self.closing):
            pubsub = None
            error: BaseException | None = None
            try:
                pubsub = self.client.pubsub()
                async with asyncio.timeout(self.timeout):
                    await pubsub.subscribe(self.channel)
                while not stopping(self.closing):
                    async with asyncio.timeout(1.5):  # bounded even if get_message is not
                        message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        failures = 0
                        self.subscription.subscribed()
                    elif message["type"] == "message":
                        self.subscription.message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: the cache is off until subscribed again
                error = exc
            finally:
                self.subscription.lost(None if stopping(self.closing) else error)
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.timeout):
                            await pubsub.aclose()
            if stopping(self.closing):
                break
            failures += 1
            await asyncio.sleep(self.backoff(failures))


__all__ = ["REFUND", "DenyCache", "ResetListener", "Subscription", "stopping"]
