"""What a RedisStore keeps per event loop: its connections, tasks and timers (`Bound`).

redis-py's connections, asyncio's transports, tasks and timers all belong to the loop that made
them. A store makes a `Bound` on first use in a loop; a loop that ended takes its `Bound` with
it (its keeper closes the connections when the loop's runner cancels what is left), and the next
loop gets a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import TYPE_CHECKING, Any

from rateguard.errors import StoreError
from rateguard.stores.redis.admin import Admin
from rateguard.stores.redis.batcher import Batcher, Channel
from rateguard.stores.redis.cluster import SlotMap
from rateguard.stores.redis.connect import cluster_nodes, discover
from rateguard.stores.redis.deny import ResetListener, Subscription
from rateguard.stores.redis.pipeline import PipelineChannel
from rateguard.stores.redis.script import SCRIPT, SHA
from rateguard.stores.redis.subscriber import Subscriber
from rateguard.stores.redis.wire import Address, ConnectionLost, ReplyError

if TYPE_CHECKING:
    from rateguard.stores.redis import RedisStore

# close() takes at most this long (plus a loop turn): a last flush of the shared totals and the
# background tasks get what is left of it after `CLIENT_CLOSE`, which closing redis-py's clients
# is always given.
CLOSE_WAIT = 0.07
CLIENT_CLOSE = 0.02


def head_of(key: str) -> str:
    """The part of a key that names its client: ``<prefix>{<client>}:``."""
    return key[: key.index("}") + 2]


class Bound:
    """Everything of a store that belongs to one event loop: connections, tasks, timers."""

    def __init__(self, store: RedisStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.closed = False
        self.tasks: set[asyncio.Task[Any]] = set()
        d = store.deployment
        self.owns_client = d.kind != "client"
        if store._unbound is not None:
            (client, self.sentinel), store._unbound = store._unbound, None
        else:
            self.sentinel = store._new_sentinel()
            client = d.admin_client(max(store.timeout, 0.1), self.sentinel)
        self.admin = Admin(client, store.prefix, store.is_cluster)
        self.slots: SlotMap | None = None
        self.batcher = Batcher(
            sha=SHA, script=SCRIPT, settings=d.settings, timeout=store.timeout, route=self._route,
            on_failure=store._failed, on_success=store._succeeded, latency=store._latency,
            locate=self._locate_slot if store.is_cluster else None,
            redirected=self._redirected if store.is_cluster else None,
        )  # fmt: skip
        if d.kind == "client" and d.cluster_wire is None:
            self.channel: Channel | None = PipelineChannel(self.batcher, d.client)
        elif d.kind in ("cluster", "client"):
            self.channel = None
            seeds = _fixed_seeds(d.address) if d.address is not None else partial(cluster_nodes, d.client)
            self.slots = SlotMap(seeds, d.settings, lambda a: Channel(self.batcher, _fixed(a)))
        else:
            self.channel = Channel(self.batcher, self._locate)
        self.batcher.channel = self.channel  # one node: every decision goes there, no routing
        # The deny cache's subscription: on rateguard's own connection, or through a client of
        # yours (its pub/sub; a RedisCluster before redis-py 8 has none: the cache stays off).
        self.listener: Subscriber | ResetListener | None = None
        self.subscription: Subscription | None = None
        if store.deny_cache:
            self.subscription = subscription = Subscription(
                store._deny, store._on_reset, lambda keys: store._deny.forget_keys(keys, head_of),
                lambda: store.where,
            )  # fmt: skip
            backoff, wait = partial(_resubscribe_after, store), admin_wait(store)
            if not isinstance(self.channel, PipelineChannel):
                self.listener = Subscriber(
                    self._node, d.settings, store._channel, subscription, backoff, wait
                )
            elif hasattr(client, "pubsub"):
                self.listener = ResetListener(client, store._channel, subscription, backoff, wait)
            if self.listener is not None:
                self.spawn(self.listener.run())
        # Kept until the loop ends or the store closes: when a loop runner (asyncio.run, a test's
        # loop, anyio's portal) cancels what is left, this closes the connections while the loop
        # still runs.
        self.keeper = loop.create_task(self._keep())

    def _route(self, keys: tuple[str, ...]) -> Channel | None:
        if self.channel is not None:
            return self.channel
        assert self.slots is not None
        return self.slots.route(keys)

    async def _locate_slot(self, keys: tuple[str, ...]) -> Channel:
        assert self.slots is not None
        return await self.slots.locate(keys)

    async def _redirected(self, reply: str) -> None:
        assert self.slots is not None
        await self.slots.redirected(reply)

    async def _locate(self) -> Address:
        d = self.store.deployment
        if self.sentinel is not None:
            assert d.service_name is not None
            return await discover(self.sentinel, d.service_name)
        assert d.address is not None
        return d.address

    async def _node(self, attempt: int) -> Address:
        """Where to subscribe: the server, or a Cluster's primaries in turn (PUBLISH reaches all)."""
        if self.slots is None:
            return await self._locate()
        if attempt:
            await self.slots.load()  # the node we knew failed: the map may have changed
        addresses = await self.slots.addresses()
        return addresses[attempt % len(addresses)]

    def channels(self) -> list[Channel]:
        if self.channel is not None:
            return [self.channel]
        assert self.slots is not None
        return list(self.slots.channels.values())

    async def publish(self, message: str) -> None:
        """PUBLISH on the store's reset channel: every server's deny cache hears it."""
        channel = self.store._channel
        if isinstance(self.channel, PipelineChannel):
            if hasattr(self.admin.client, "publish"):  # a RedisCluster before redis-py 8 has none
                await self.admin.client.publish(channel, message)
            return
        for attempt in (1, 2):  # once more on a connection found broken: PUBLISH is safe to repeat
            if self.slots is not None:
                [node, *_] = await self.slots.primaries()  # any node: PUBLISH reaches every one
            else:
                assert self.channel is not None
                node = self.channel
            try:
                reply = await node.call(("PUBLISH", channel, message))
            except ConnectionLost:
                if attempt == 2:
                    raise
                continue
            if isinstance(reply, ReplyError):
                raise StoreError(f"Redis answered PUBLISH with {reply}")
            return

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def start_probe(self) -> None:
        breaker = self.store._breaker
        breaker.probing = True
        self.spawn(self._probe())

    async def _probe(self) -> None:
        store = self.store
        try:
            channels = await self.slots.primaries() if self.slots is not None else self.channels()
            await self.batcher.ping(channels)
        except (StoreError, TimeoutError, OSError) as exc:
            store._failed(exc)
        else:
            store._succeeded()
        finally:
            store._breaker.probing = False

    def flush_soon(self) -> None:
        if not self.closed and not self.store._breaker.degraded:
            self.spawn(self.flush())

    async def flush(self) -> None:
        await self.store._counters.flush(self.admin.client)

    def spawn_close(self) -> None:
        """Close on this loop, in a task of its own (asked from another thread)."""
        self.loop.create_task(self.aclose(flush=True))

    async def _keep(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not self.closed:
                await self.aclose(flush=False)
            raise

    async def aclose(self, *, flush: bool) -> None:
        """Close on this loop: connections, tasks and timers, within `CLOSE_WAIT` in all."""
        if self.closed:
            return
        self.closed = True
        deadline = self.loop.time() + CLOSE_WAIT
        store = self.store
        self._stop()
        if flush and not store._breaker.degraded:
            with contextlib.suppress(Exception):
                async with asyncio.timeout_at(deadline - CLIENT_CLOSE):
                    await self.flush()
        tasks = [t for t in self.tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - CLIENT_CLOSE - self.loop.time()))
        if self.owns_client:
            # Each client closes its sockets as its close begins: a wait of `CLIENT_CLOSE` at
            # least lets every close begin, so no connection is left open (ResourceWarning).
            clients = [self.admin.client, *(self.sentinel.sentinels if self.sentinel is not None else ())]
            closing = [self.loop.create_task(c.aclose()) for c in clients]
            await asyncio.wait(closing, timeout=max(CLIENT_CLOSE, deadline - self.loop.time()))
            for task in closing:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # retrieved: a failed close is no news

    def _stop(self) -> None:
        """What stops at once, on any loop: timers, the subscription, the decision connections."""
        store = self.store
        if self.listener is not None:
            self.listener.closing = True
        if self.subscription is not None:
            self.subscription.detached = True
        if store._bound is None or store._bound is self:  # not if the store serves another loop now
            store._counters.disarm(cancel=not self.loop.is_closed())
            store._breaker.probing = False  # a probe of this loop may never finish
            store._deny.live = False
            store._deny.clear()
        if self.loop.is_closed():
            return  # its tasks and connections went with it
        if self.keeper is not asyncio.current_task():
            self.keeper.cancel()
        self.batcher.close(self.channels())
        if self.slots is not None:
            self.slots.close()

    def abandon(self) -> None:
        """Drop what belongs to a loop that is not running (one that ended), without waiting on it."""
        self.closed = True
        self._stop()
        if not self.loop.is_closed():
            for task in self.tasks:
                task.cancel()


def _resubscribe_after(store: RedisStore, failures: int) -> float:
    """The wait before subscribing again: the breaker's back-off, doubled per failure in a row."""
    return float(min(store.max_backoff, store._breaker.backoff * 2 ** min(failures - 1, 16)))


def admin_wait(store: RedisStore) -> float:
    """The bound on one admin step or (re)subscription: longer than a decision may take."""
    return max(1.0, store.connect_timeout * 4)


def _fixed_seeds(address: Address) -> Any:
    async def seeds() -> list[Address]:
        return [address]

    return seeds


def _fixed(address: Address) -> Any:
    async def locate() -> Address:
        return address

    return locate


__all__ = ["CLOSE_WAIT", "Bound", "admin_wait", "head_of"]
