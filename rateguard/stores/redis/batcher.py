"""Coalesce the decisions of concurrent requests into pipelined round trips to Redis.

Every request still runs its own atomic EVALSHA; what is shared is the trip. Commands submitted
during one event-loop turn go out together in one write per node; batches are written as soon
as they are ready (pipelined: no waiting for the previous batch) and matched to their replies in
order by the connection (`wire.Connection`). A command with nothing in flight goes out at once.
EVALSHA is packed once per set of arguments, with only the keys formatted per request.

Correctness rules kept here:
- A consume script is never resent after a connection error or a timeout: it may have run.
  Only NOSCRIPT/TRYAGAIN (the script did not run) and MOVED/ASK (not run on that node) are resent.
- Every batch has a deadline. A stalled Redis fails everything in flight on that connection, the
  connection is dropped (its state is unknown), and callers fall back by the store's policy.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from time import perf_counter
from typing import Any

from rateguard.errors import StoreError
from rateguard.stores.redis.wire import (
    Address,
    Connection,
    ReplyError,
    Settings,
    open_connection,
    pack_command,
)

Args = tuple[Any, ...]  # everything after the keys: cost, now, (rate, capacity) per key

# How often one decision may be resent after NOSCRIPT / MOVED before it counts as failed.
_MAX_ATTEMPTS = 3
# Error replies that mean this node can't decide now: a failover in progress, a replica.
_OUTAGE_REPLIES = ("READONLY", "CLUSTERDOWN", "MASTERDOWN", "LOADING")


class BatchFailed(StoreError):
    """A decision could not be answered (connection lost, deadline passed, node refusing)."""


class Histogram:
    """Counts of observations per upper bound (seconds), Prometheus style; cheap to update."""

    BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, math.inf)

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                self.counts[i] += 1
                return

    @property
    def count(self) -> int:
        return sum(self.counts)


class Entry:
    """One EVALSHA on the wire, waiting for its reply."""

    __slots__ = ("args", "attempts", "batcher", "deadline", "future", "keys", "sent")

    def __init__(
        self, batcher: Batcher, keys: tuple[str, ...], args: Args, future: asyncio.Future[Any]
    ) -> None:
        self.batcher = batcher
        self.keys = keys
        self.args = args
        self.future = future
        self.attempts = 0
        self.sent = 0.0  # set on the last command of a batch: its reply times the round trip
        # The batch's deadline timer, on its last command; cancelled when the reply comes. Left to
        # fire, every batch's timer would wake an idle event loop 50 ms later: at one request at a
        # time that is a wake-up per request, which on a VM costs tens of microseconds each.
        self.deadline: asyncio.TimerHandle | None = None

    def reply(self, value: Any) -> None:
        batcher = self.batcher
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
            batcher.latency.observe(perf_counter() - self.sent)
        if type(value) is ReplyError:
            batcher.error_reply(self, value)
            return
        if not self.future.done():
            self.future.set_result(value)
        if batcher.failing:
            batcher.succeeded()

    def fail(self, exc: BaseException) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if not self.future.done():
            self.future.set_exception(exc if isinstance(exc, BatchFailed) else BatchFailed(str(exc)))


class Channel:
    """The decision connection to one node: opened on demand, replaced when it breaks."""

    def __init__(self, batcher: Batcher, locate: Callable[[], Awaitable[Address]]) -> None:
        self.batcher = batcher
        self.locate = locate
        self.conn: Connection | None = None
        self._connecting: asyncio.Task[Connection | None] | None = None

    @property
    def ready(self) -> bool:
        """Connected and idle: a command sent now goes out at once."""
        conn = self.conn
        return conn is not None and not conn.waiting and not conn.closed

    def send(self, entries: list[Entry], data: bytes) -> None:
        """Write one batch now if connected, else once connected (or fail it)."""
        conn = self.conn
        if conn is not None and not conn.closed:
            self._write(conn, entries, data)
            return
        self.batcher.spawn(self._send_when_connected(entries, data))

    def _write(self, conn: Connection, entries: list[Entry], data: bytes) -> None:
        conn.write(data, entries)
        batcher = self.batcher
        last = entries[-1]
        # Timed with perf_counter: uvloop's loop.time() ticks in whole milliseconds, which would
        # read a 0.2 ms round trip as 0 or 1 ms. The deadline stays on the loop's clock.
        last.sent = perf_counter()
        last.deadline = batcher.loop.call_later(batcher.timeout, self._expired, conn, last)

    def _expired(self, conn: Connection, last: Entry) -> None:
        if last.deadline is not None:  # not answered in time: the connection is stuck
            last.deadline = None
            conn.lose(
                BatchFailed(
                    f"no reply from Redis at {conn.address} within {self.batcher.timeout * 1000:.0f} ms"
                )
            )

    async def _send_when_connected(self, entries: list[Entry], data: bytes) -> None:
        conn = None
        try:
            conn = await self.connect(probe=False)
        finally:  # not connected, or cancelled as the store closes: the decisions hear of it
            if conn is None:
                why = "store closed" if self.batcher.closed else self.batcher.last_error
                _fail_all(entries, BatchFailed(why or "Redis is unavailable"))
        if conn is not None:
            self._write(conn, entries, data)

    async def connect(self, *, probe: bool) -> Connection | None:
        """The open connection, connecting once however many ask; None if that fails."""
        conn = self.conn
        if conn is not None and not conn.closed:
            return conn
        if self.batcher.failing and not probe:
            return None  # Redis just failed: only the store's probe may pay for a new connection
        if self.batcher.closed:
            return None
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        task = self._connecting
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                return None  # the connecting was stopped (the store closes), not the caller
            raise

    async def _open(self) -> Connection | None:
        try:
            address = await self.locate()
            conn = await open_connection(address, self.batcher.settings, self._lost)
        except StoreError as exc:
            self.batcher.failed(exc)
            return None
        finally:
            self._connecting = None
        self.conn = conn
        return conn

    async def load_script(self, script: bytes, loading: dict[int, asyncio.Future[Any]]) -> None:
        """``SCRIPT LOAD`` on this node, once per connection however many decisions missed it."""
        conn = await self.connect(probe=True)
        if conn is None:
            raise BatchFailed(self.batcher.last_error or "Redis is unavailable")
        loaded = loading.get(id(conn))
        if loaded is None:
            [loaded] = conn.call(("SCRIPT", "LOAD", script))
            loading[id(conn)] = loaded
            loaded.add_done_callback(lambda _: loading.pop(id(conn), None))
        reply = await asyncio.shield(loaded)
        if type(reply) is ReplyError:
            raise BatchFailed(f"SCRIPT LOAD failed: {reply}")

    async def ping(self) -> None:
        reply = await self.call(("PING",))
        if type(reply) is ReplyError:
            raise BatchFailed(f"Redis answered PING with {reply}")

    async def call(self, command: tuple[Any, ...]) -> Any:
        """One command of rateguard's own (PING, PUBLISH) on this connection, connecting if need be;
        its reply (a `ReplyError` for an error reply). The caller bounds the wait."""
        conn = await self.connect(probe=True)
        if conn is None:
            raise BatchFailed(self.batcher.last_error or "Redis is unavailable")
        [reply] = conn.call(command)
        return await reply

    def _lost(self, conn: Connection, exc: BaseException) -> None:
        if self.conn is conn:  # not one this channel closed itself
            self.conn = None
            self.batcher.failed(exc)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        if self._connecting is not None:
            self._connecting.cancel()


class Batcher:
    """Queue decisions; at the end of each event-loop turn write them out, a batch per node.

    ``route(keys)`` gives the `Channel` a command goes to (one for plain Redis and Sentinel, one
    per primary for a Cluster), or None while a Cluster's slot map is loading; then
    ``locate(keys)`` finds it.
    ``redirected(reply)`` learns from a MOVED/ASK. ``on_failure``/``on_success`` drive the store's
    circuit breaker.
    """

    def __init__(
        self,
        *,
        sha: str,
        script: bytes,
        settings: Settings,
        timeout: float,
        route: Callable[[tuple[str, ...]], Channel | None],
        on_failure: Callable[[BaseException], None],
        on_success: Callable[[], None],
        locate: Callable[[tuple[str, ...]], Awaitable[Channel]] | None = None,
        redirected: Callable[[str], Awaitable[None]] | None = None,
        latency: Histogram | None = None,
    ) -> None:
        self.sha = sha
        self.script = script
        self.settings = settings
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.latency = latency if latency is not None else Histogram()
        self.failing = False  # a failure was reported and no success since
        self.closed = False
        self.last_error: str | None = None
        self._route = route
        self._locate = locate
        self._on_failure = on_failure
        self._on_success = on_success
        self._redirected = redirected
        # EVALSHA before and after the keys, per set of arguments; keyed by the arguments' identity
        # (the store keeps one tuple per rule and cost), with the tuple kept alive beside it.
        self._packed: dict[int, tuple[bytes, bytes, Args, int]] = {}
        self.channel: Channel | None = None  # the one channel, when every key goes to one node
        self._pending: list[Entry] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loading: dict[int, asyncio.Future[Any]] = {}  # SCRIPT LOAD in flight, per connection

    def submit(self, keys: tuple[str, ...], args: Args) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        entry = Entry(self, keys, args, fut)
        if not self._scheduled:
            # Nothing else waits to go out this turn. If nothing is in flight either (a quiet
            # server), send it now: waiting for the end of the turn would gather nothing and cost
            # a loop turn. Under load something is always in flight, and the commands of one turn
            # still go out together.
            channel = self.channel or self._route(keys)
            if channel is not None and channel.ready:
                channel.send([entry], self.pack(keys, args))
                return fut
            self._scheduled = True
            self.loop.call_soon(self._flush)
        self._pending.append(entry)
        return fut

    def resubmit(self, entry: Entry) -> None:
        self._pending.append(entry)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def pack(self, keys: tuple[str, ...], args: Args) -> bytes:
        """``EVALSHA <sha> <n> <keys...> <args...>`` in RESP, as hiredis packs it.

        Only the keys change from one request to the next: the rest is packed once per set of
        arguments (a cost and the rules), which spares formatting the rates, floats, each time.
        """
        n = len(keys)
        parts = self._packed.get(id(args))
        if parts is None or parts[2] is not args or parts[3] != n:
            head = pack_command(("EVALSHA", self.sha, n))
            head = b"*%d\r\n%s" % (3 + n + len(args), head[head.index(b"\n") + 1 :])
            tail = pack_command(args)
            parts = (head, tail[tail.index(b"\n") + 1 :], args, n)
            if len(self._packed) < 1024 and args[1] == "":  # rules and costs are few; test clocks are not
                self._packed[id(args)] = parts
        if n == 1:  # the common case, in one formatting
            encoded = keys[0].encode()
            return b"%s$%d\r\n%s\r\n%s" % (parts[0], len(encoded), encoded, parts[1])
        if n == 2:  # a burst and a quota, the usual limit of several rules: one formatting too
            first, second = keys[0].encode(), keys[1].encode()
            return b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n%s" % (
                parts[0],
                len(first),
                first,
                len(second),
                second,
                parts[1],
            )
        out = [parts[0]]
        for key in keys:
            encoded = key.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(encoded), encoded))
        out.append(parts[1])
        return b"".join(out)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        pack = self.pack
        one = self.channel
        if one is not None:  # one node (no Cluster): the whole turn in one write, no routing
            one.send(pending, b"".join([pack(e.keys, e.args) for e in pending]))
            return
        groups: dict[int, tuple[Channel, list[Entry]]] = {}
        waiting: list[Entry] = []
        for entry in pending:
            channel = self._route(entry.keys)
            if channel is None:
                waiting.append(entry)
                continue
            group = groups.get(id(channel))
            if group is None:
                group = groups[id(channel)] = (channel, [])
            group[1].append(entry)
        for channel, entries in groups.values():
            channel.send(entries, b"".join([pack(e.keys, e.args) for e in entries]))
        for entry in waiting:
            self.spawn(self._send_located(entry))

    async def _channel(self, keys: tuple[str, ...]) -> Channel:
        channel = self._route(keys)
        if channel is None:
            assert self._locate is not None
            channel = await self._locate(keys)
        return channel

    async def _send_located(self, entry: Entry) -> None:
        try:
            channel = await self._channel(entry.keys)
        except StoreError as exc:
            entry.fail(exc)
            return
        except asyncio.CancelledError:  # the store closes: the decision hears of it
            entry.fail(BatchFailed("store closed"))
            raise
        channel.send([entry], self.pack(entry.keys, entry.args))

    def error_reply(self, entry: Entry, reply: ReplyError) -> None:
        """An error reply to one decision: resend it if it did not run, else fail it."""
        text = str(reply)
        head = text.split(" ", 1)[0]
        if head in ("NOSCRIPT", "MOVED", "ASK", "TRYAGAIN") and entry.attempts < _MAX_ATTEMPTS:
            entry.attempts += 1  # not run: safe to send again
            self.spawn(self._retry(entry, head, text))
            return
        if head in _OUTAGE_REPLIES:
            self.failed(BatchFailed(f"Redis refuses: {text}"))
        entry.fail(BatchFailed(f"Redis answered {text}"))

    async def _retry(self, entry: Entry, head: str, text: str) -> None:
        try:
            if head == "NOSCRIPT":
                # The script is missing (restart, SCRIPT FLUSH, new primary): load it there first.
                channel = await self._channel(entry.keys)
                await channel.load_script(self.script, self._loading)
            elif head in ("MOVED", "ASK") and self._redirected is not None:
                await self._redirected(text)
            elif head == "TRYAGAIN":
                await asyncio.sleep(0.01)  # a slot in migration: Redis says to come back shortly
        except (StoreError, ReplyError, OSError) as exc:
            entry.fail(exc)
            return
        except asyncio.CancelledError:  # the store closes: the decision hears of it
            entry.fail(BatchFailed("store closed"))
            raise
        self.resubmit(entry)

    def failed(self, exc: BaseException) -> None:
        if self.closed:
            return  # what closing breaks is no outage
        self.failing = True
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._on_failure(exc)

    def succeeded(self) -> None:
        self.failing = False
        self._on_success()

    async def ping(self, channels: Sequence[Channel]) -> None:
        """A probe: one PING on every channel (connecting if needed); raises if any fails."""
        async with asyncio.timeout(self.timeout + self.settings.connect_timeout):
            for channel in channels:
                await channel.ping()

    def close(self, channels: Sequence[Channel]) -> None:
        """Stop now: tasks cancelled, connections closed, whatever waits fails."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        exc = BatchFailed("store closed")
        pending, self._pending = self._pending, []
        for entry in pending:
            entry.fail(exc)
        for channel in channels:
            channel.close()


def _fail_all(entries: list[Entry], exc: BaseException) -> None:
    for entry in entries:
        entry.fail(exc)


__all__ = ["BatchFailed", "Batcher", "Channel", "Entry", "Histogram"]
