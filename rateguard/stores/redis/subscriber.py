"""The reset channel on rateguard's own connection: ``SUBSCRIBE``, then every reply is a push.

One connection per store and event loop, to any node that hears the store's PUBLISHes (the
server; a Sentinel set's primary; on a Cluster, one primary: classic PUBLISH reaches every node).
Each message goes to a `deny.Subscription`; the connection is checked with a PING now and then,
and made again when it is lost, after a back-off that doubles while attempts fail. Every wait is bounded, and the loop
checks `deny.stopping` each time round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from rateguard.stores.redis.deny import Subscription, stopping
from rateguard.stores.redis.wire import (
    Address,
    Connection,
    ConnectionLost,
    ReplyError,
    Settings,
    open_connection,
    pack_command,
)

# A silent connection is asked for a PONG this often (seconds): a subscription that died without
# a word would otherwise keep the deny cache on while resets go unheard.
HEALTH_CHECK = 5.0


class Subscriber:
    """Keeps one subscription to ``channel`` while it runs (`run`, a task its owner cancels)."""

    def __init__(
        self,
        locate: Callable[[int], Awaitable[Address]],
        settings: Settings,
        channel: str,
        subscription: Subscription,
        backoff: Callable[[int], float],
        timeout: float,
    ) -> None:
        self.locate = locate  # the node to subscribe on, given the number of the attempt
        self.settings = settings
        self.channel = channel
        self.subscription = subscription
        self.backoff = backoff  # the wait before attempt n (n failures in a row)
        self.timeout = timeout
        self.closing = False
        self.conn: Connection | None = None
        self._waiting: dict[bytes, asyncio.Future[None]] = {}  # b"subscribe" / b"pong": who waits
        self._gone: asyncio.Future[BaseException] | None = None

    async def run(self) -> None:
        attempt = 0
        while not stopping(self.closing):
            error: BaseException | None = None
            try:
                await self._subscribe(attempt)
                attempt = 0
                self.subscription.subscribed()
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # lost, refused, too slow: subscribe again after the back-off
                error = exc
            finally:
                conn, self.conn = self.conn, None
                if conn is not None:
                    conn.close()
                self.subscription.lost(None if stopping(self.closing) else error)
            if stopping(self.closing):
                break
            attempt += 1
            await asyncio.sleep(self.backoff(attempt))

    async def _subscribe(self, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        self._gone = gone = loop.create_future()
        async with asyncio.timeout(self.timeout):
            address = await self.locate(attempt)
            self.conn = conn = await open_connection(address, self.settings, self._lost)
            conn.on_push = self._push
            await self._ask(conn, ("SUBSCRIBE", self.channel), b"subscribe", gone)

    async def _listen(self) -> None:
        gone = self._gone
        assert gone is not None and self.conn is not None
        while not stopping(self.closing):
            done, _ = await asyncio.wait([gone], timeout=HEALTH_CHECK)
            if done:
                raise gone.result()
            async with asyncio.timeout(self.timeout):
                await self._ask(self.conn, ("PING",), b"pong", gone)

    async def _ask(
        self, conn: Connection, command: tuple[str, ...], answer: bytes, gone: asyncio.Future[BaseException]
    ) -> None:
        """Send a command whose answer comes as a push, and wait for it (or for the loss)."""
        reply = self._waiting[answer] = asyncio.get_running_loop().create_future()
        conn.write(pack_command(command), ())
        try:
            await asyncio.wait([reply, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting.pop(answer, None)
        if gone.done():
            raise gone.result()

    def _push(self, reply: Any) -> None:
        if isinstance(reply, ReplyError) or not isinstance(reply, list) or not reply:
            raise ConnectionLost(f"the reset channel got {reply!r}")  # the connection is dropped
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            self.subscription.message(reply[2])
            return
        waiter = self._waiting.get(kind)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lost(self, conn: Connection, exc: BaseException) -> None:
        gone = self._gone
        if gone is not None and not gone.done():
            gone.set_result(exc)


__all__ = ["HEALTH_CHECK", "Subscriber"]
