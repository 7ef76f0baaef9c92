"""Coalesce the decisions of concurrent requests into pipelined round trips to Redis.

Every request still runs its own atomic EVALSHA; what is shared is the trip. Commands submitted
during one event-loop turn go out together in one write on a dedicated connection; batches are
written as soon as they are ready (pipelined: no waiting for the previous batch), and a reader
matches the replies, which Redis sends in order, to futures in order. Per-command Python work
and waiting, not Redis, is the cost, so the common case is kept lean: a batch for plain Redis is
written straight from the event loop's callback (no task), EVALSHA is packed once per rule and
cost with only the key formatted per request, and replies are parsed by hiredis in the
transport's own callback, all the replies of a socket read in one loop, with no reader task to
wake (a batch's deadline timer is cancelled when its reply comes, so an idle loop is not woken
50 ms later either). On a 2-core machine a middleware that calls redis-py once per request runs
at ~0.5x the throughput of no limiter; see benchmarks/results for what this gives.

Correctness rules kept here:
- A consume script is never resent after a connection error or a timeout: it may have run.
  Only NOSCRIPT/TRYAGAIN (the script did not run) and MOVED/ASK (not run on that node) are resent.
- Every batch has a deadline. A stalled Redis fails everything in flight on that connection, the
  connection is dropped (its state is unknown), and callers fall back by the store's policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)

pack_command: Callable[[Any], bytes] | None
_HiredisReader: Any
try:  # hiredis packs a command in C: several times faster than redis-py's Python packer
    from hiredis import pack_command
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    pack_command = None
try:  # what redis-py's hiredis parser answers when a reply is incomplete (see Channel._read)
    from hiredis import Reader as _HiredisReader
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - then replies are read through redis-py, one by one
    _HiredisReader = NOT_ENOUGH_DATA = None

Command = tuple[Any, ...]

# How often one decision may be resent after NOSCRIPT / MOVED before it counts as failed.
_MAX_ATTEMPTS = 3


class BatchFailed(Exception):
    """A command could not be answered (connection lost, deadline passed, node refusing)."""


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


class _Entry:
    """One command on the wire, waiting for its reply."""

    __slots__ = ("answered", "args", "attempts", "deadline", "future", "key", "sent")

    def __init__(self, key: str, args: Command, future: asyncio.Future[Any], attempts: int = 0) -> None:
        self.key = key
        self.args = args
        self.future = future
        self.attempts = attempts
        self.answered = False
        self.sent = 0.0  # set on the last command of a batch: its reply times the round trip
        # The batch's deadline timer, on its last command; cancelled when the reply comes. Left to
        # fire, every batch's timer would wake an idle event loop 50 ms later: at one request at a
        # time that is a wake-up per request, which on a VM costs tens of microseconds each.
        self.deadline: asyncio.TimerHandle | None = None


class Channel:
    """A dedicated, pipelined connection: batches are written as they come, replies read in order."""

    def __init__(self, make_connection: Callable[[], Any], batcher: Batcher) -> None:
        self._make = make_connection
        self._batcher = batcher
        self._conn: Any = None
        self._reader: asyncio.Task[None] | None = None  # without hiredis: a task reads the replies
        self._replies: _Replies | None = None  # with hiredis: the transport hands them over
        self._lock = asyncio.Lock()
        self._fifo: deque[_Entry] = deque()

    async def write(self, entries: list[_Entry], commands: list[Command], probe: bool = False) -> None:
        """Write one batch; its replies are delivered by the reader."""
        loop = asyncio.get_running_loop()
        try:
            async with self._lock:  # keeps writes (and so the reply order) in submission order
                conn = self._conn
                if conn is None and self._batcher.failing and not probe:
                    # Redis just failed: only the store's probe may pay for a new connection.
                    raise BatchFailed("Redis is unavailable")
                if conn is None:
                    conn = self._make()
                    # One deadline per batch (below) instead of a timer per read and write.
                    conn.socket_timeout = None
                    async with asyncio.timeout(self._batcher.timeout):
                        await conn.connect()
                    self._conn = conn
                    if not self._take_over(conn):
                        self._reader = loop.create_task(self._read(conn))
                if pack_command is not None:
                    packed: Any = b"".join([pack_command(c) for c in commands])
                else:
                    packed = conn.pack_commands(commands)
                self._fifo.extend(entries)
                await conn.send_packed_command(packed, check_health=False)
        except (TimeoutError, RedisError, OSError, BatchFailed) as exc:
            self.fail(exc, entries)
            return
        last = entries[-1]
        last.sent = now = loop.time()
        last.deadline = loop.call_at(now + self._batcher.timeout, self._deadline, last)

    @property
    def in_flight(self) -> bool:
        """Commands written and not answered yet."""
        return bool(self._fifo)

    def write_now(self, entries: list[_Entry], packed: bytes) -> bool:
        """Write one batch without a task, if the connection is up and no write is under way.

        The common case, and the cheap one: no task, no lock, no extra event-loop turn before
        the bytes leave. False means: use `write` (connecting, a write waiting on a full
        buffer, or no hiredis to pack with).
        """
        conn = self._conn
        writer = getattr(conn, "_writer", None)
        if writer is None or self._lock.locked() or writer.is_closing():
            return False
        # The FIFO grows in the same step as the bytes are written, as in `write`: replies and
        # entries stay in one order however the two kinds of write interleave.
        self._fifo.extend(entries)
        writer.write(packed)
        last = entries[-1]
        last.sent = now = self._batcher.loop.time()
        last.deadline = self._batcher.loop.call_at(now + self._batcher.timeout, self._deadline, last)
        return True

    def _deadline(self, last: _Entry) -> None:
        if not last.answered:
            self.fail(TimeoutError(f"no reply from Redis within {self._batcher.timeout * 1000:.0f} ms"))

    def _take_over(self, conn: Any) -> bool:
        """Read this connection's replies in its transport's callback, if hiredis parses them.

        redis-py has connected, authenticated and selected the database; from here on its
        transport hands every socket read to a `_Replies`, which parses it with redis-py's own
        hiredis reader (error replies become redis-py's exceptions) and answers the commands at
        once. A reader task would cost an event-loop turn per read: a wake-up and a task step
        between the reply and the request it answers. False: no hiredis, use `_read`.
        """
        writer: Any = getattr(conn, "_writer", None)
        stream: Any = getattr(conn, "_reader", None)
        parser: Any = getattr(getattr(conn, "_parser", None), "_reader", None)
        if _HiredisReader is None or not isinstance(parser, _HiredisReader) or writer is None:
            return False
        transport = writer.transport
        replies = _Replies(self, conn, parser, transport.get_protocol())
        transport.set_protocol(replies)
        self._replies = replies
        buffered = getattr(stream, "_buffer", None)
        if buffered:  # read by redis-py's stream but not parsed: nothing should be, but hand it on
            data = bytes(buffered)
            buffered.clear()
            replies.data_received(data)
        return True

    def lost(self, conn: Any, exc: BaseException) -> None:
        """The connection ``conn`` broke (or sent what nobody asked for): fail it if it is current."""
        if self._conn is conn:
            self.fail(exc)

    async def _read(self, conn: Any) -> None:
        """Without hiredis: one reply at a time, through redis-py."""
        try:
            while True:
                try:
                    reply = await conn.read_response(disable_decoding=True, timeout=math.inf)
                except ResponseError as exc:  # an error reply: the stream is still in step
                    reply = exc
                if not self._deliver([reply]):
                    return
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, BatchFailed) as exc:
            self.lost(conn, exc)

    def _deliver(self, replies: list[Any]) -> bool:
        """Answer the oldest commands with these replies; False if the connection was failed."""
        fifo = self._fifo
        batcher = self._batcher
        for reply in replies:
            if not fifo:
                raise BatchFailed("a reply nobody asked for: the connection is out of step")
            entry = fifo.popleft()
            entry.answered = True
            if entry.sent:
                batcher.latency.observe(batcher.loop.time() - entry.sent)
                if entry.deadline is not None:
                    entry.deadline.cancel()
            if isinstance(reply, ResponseError):
                if not batcher.on_error_reply(entry, reply):
                    self.fail(BatchFailed(f"{type(reply).__name__}: {reply}"), [entry])
                    return False
            elif not entry.future.done():
                entry.future.set_result(reply)
        if batcher.failing:
            batcher.on_success()
        return True

    def fail(self, exc: BaseException, extra: Sequence[_Entry] = ()) -> None:
        """Fail every command on this connection and drop it; the store's breaker hears of it."""
        error = BatchFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        entries = [*self._fifo, *extra]
        self._fifo.clear()
        for entry in entries:
            entry.answered = True
            if entry.deadline is not None:
                entry.deadline.cancel()
            if not entry.future.done():
                entry.future.set_exception(error)
        self._drop()
        self._batcher.on_failure(exc)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._stop_replies()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if conn is not None:
            self._batcher.spawn(_disconnect(conn))

    def _stop_replies(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.active = False  # whatever still arrives on the old socket is not ours

    async def aclose(self) -> None:
        self._stop_replies()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader], timeout=1)
        conn, self._conn = self._conn, None
        if conn is not None:
            await _disconnect(conn)
        for entry in self._fifo:
            if not entry.future.done():
                entry.future.set_exception(BatchFailed("store closed"))
        self._fifo.clear()


class _Replies(asyncio.Protocol):
    """The protocol of a channel's transport once `Channel._take_over` has it: replies parsed in
    ``data_received``. Flow control and the close still reach redis-py's own stream protocol, so
    its writer's ``drain()``, ``close()`` and ``wait_closed()`` work as before."""

    def __init__(self, channel: Channel, conn: Any, parser: Any, stream_protocol: Any) -> None:
        self.channel = channel
        self.conn = conn
        self.parser = parser
        self.stream_protocol = stream_protocol
        self.active = True

    def data_received(self, data: bytes) -> None:
        if not self.active:
            return
        parser = self.parser
        try:
            parser.feed(data)
            replies = []
            reply = parser.gets(False)
            while reply is not NOT_ENOUGH_DATA and reply is not False:
                replies.append(reply)
                reply = parser.gets(False)
            if replies and not self.channel._deliver(replies):
                self.active = False
        except Exception as exc:  # a reply nobody asked for, bytes hiredis can't parse: out of step
            self.active = False
            self.channel.lost(self.conn, exc)

    def eof_received(self) -> bool:
        self._lost(RedisConnectionError("Connection closed by server."))
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc or RedisConnectionError("Connection closed by server."))
        self.stream_protocol.connection_lost(exc)

    def _lost(self, exc: BaseException) -> None:
        if self.active:
            self.active = False
            self.channel.lost(self.conn, exc)

    def pause_writing(self) -> None:
        self.stream_protocol.pause_writing()

    def resume_writing(self) -> None:
        self.stream_protocol.resume_writing()


async def _disconnect(conn: Any) -> None:
    with contextlib.suppress(Exception):  # best effort: the socket may already be gone
        await conn.disconnect(nowait=True)


class Batcher:
    """Queue EVALSHA commands; at the end of each event-loop turn write them out, per node.

    ``route(key)`` gives the `Channel` a key's command goes to: one for plain Redis and Sentinel,
    one per primary for a Cluster (so a batch is split by node). ``on_moved`` refreshes the
    cluster map. ``on_failure``/``on_success`` drive the store's circuit breaker.
    """

    def __init__(
        self,
        *,
        sha: str,
        script: bytes,
        timeout: float,
        route: Callable[[str], Channel | Awaitable[Channel]],
        on_failure: Callable[[BaseException], None],
        on_success: Callable[[], None],
        on_moved: Callable[[], Awaitable[None]] | None = None,
        latency: Histogram | None = None,
        direct: bool = False,
    ) -> None:
        self.sha = sha
        self.script = script
        self.timeout = timeout
        self._route = route
        self._on_failure = on_failure
        self._on_success = on_success
        self._on_moved = on_moved
        self._direct = direct  # one channel for every key (not a cluster): batches may skip the task
        self._packed: dict[Command, tuple[bytes, bytes]] = {}  # args -> EVALSHA before and after the key
        self._loop = self.loop = asyncio.get_running_loop()
        self.latency = latency if latency is not None else Histogram()
        self._pending: list[_Entry] = []
        self._reload: list[_Entry] = []  # to resend after loading the script
        self._scheduled = False
        self.failing = False  # a failure was reported and no success since
        self._tasks: set[asyncio.Task[Any]] = set()

    def make_channel(self, make_connection: Callable[[], Any]) -> Channel:
        return Channel(make_connection, self)

    def submit(self, key: str, args: Command) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        entry = _Entry(key, args, fut)
        # Nothing else is waiting to go out this turn. If nothing is in flight either (a quiet
        # server), send it now: waiting for the end of the turn would gather nothing and cost a
        # loop turn. Under load something is always in flight, and the commands of one turn
        # still go out together.
        if not self._scheduled and self._write_direct([entry], only_if_idle=True):
            return fut
        self._pending.append(entry)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def pack_evalsha(self, key: str, args: Command) -> bytes:
        """``EVALSHA <sha> 1 <key> <args...>`` in RESP, as hiredis packs it.

        Only the key changes from one request to the next: the rest is packed once per set of
        arguments (a rule and a cost), which spares formatting the rate, a float, every time.
        """
        parts = self._packed.get(args)
        if parts is None:
            assert pack_command is not None
            if len(args) > 3:  # a caller's own clock (tests): not worth keeping
                return pack_command(("EVALSHA", self.sha, 1, key, *args))
            head = pack_command(("EVALSHA", self.sha, 1))
            head = b"*%d\r\n%s" % (4 + len(args), head[head.index(b"\n") + 1 :])
            tail = pack_command(args)
            parts = (head, tail[tail.index(b"\n") + 1 :])
            if len(self._packed) < 1024:  # rules and costs are few
                self._packed[args] = parts
        encoded = key.encode()
        return b"%s$%d\r\n%s\r\n%s" % (parts[0], len(encoded), encoded, parts[1])

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, []
        reload, self._reload = self._reload, []
        for entry in (*pending, *reload):
            if not entry.future.done():
                entry.future.set_exception(exc)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending and not self._reload:
            return
        pending, self._pending = self._pending, []
        reload, self._reload = self._reload, []
        if not reload and self._write_direct(pending):
            return
        self.spawn(self._write(pending, reload))

    def _write_direct(self, entries: list[_Entry], *, only_if_idle: bool = False) -> bool:
        """Write these EVALSHAs from this callback, for one Redis; False: take the task path."""
        if not self._direct or pack_command is None:
            return False
        channel = self._route(entries[0].key)
        if not isinstance(channel, Channel) or (only_if_idle and channel.in_flight):
            return False
        return channel.write_now(entries, b"".join([self.pack_evalsha(e.key, e.args) for e in entries]))

    async def _write(self, pending: list[_Entry], reload: list[_Entry]) -> None:
        groups: dict[int, tuple[Channel, list[_Entry], list[Command]]] = {}
        sha = self.sha
        for entries, load in ((reload, True), (pending, False)):
            for entry in entries:
                try:
                    channel = self._route(entry.key)
                    if not isinstance(channel, Channel):
                        channel = await channel
                except (TimeoutError, RedisError, OSError) as exc:
                    self._fail_entries([entry], exc)
                    continue
                group = groups.get(id(channel))
                if group is None:
                    group = groups[id(channel)] = (channel, [], [])
                if load and not any(c[0] == "SCRIPT" for c in group[2]):
                    # The script may be missing (restart, SCRIPT FLUSH, new primary): load it
                    # in the same trip, ahead of the commands that are resent.
                    group[1].append(_Entry("", (), self._loop.create_future()))
                    group[2].append(("SCRIPT", "LOAD", self.script))
                group[1].append(entry)
                group[2].append(("EVALSHA", sha, 1, entry.key, *entry.args))
        for channel, entries, commands in groups.values():
            await channel.write(entries, commands)

    def _fail_entries(self, entries: Sequence[_Entry], exc: BaseException) -> None:
        error = BatchFailed(f"{type(exc).__name__}: {exc}")
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)
        self.on_failure(exc)

    def on_error_reply(self, entry: _Entry, reply: ResponseError) -> bool:
        """Handle an error reply; False means the connection's node can't serve (an outage)."""
        if not entry.key:  # our own SCRIPT LOAD
            if not entry.future.done():
                entry.future.set_exception(reply)
            return True
        if isinstance(reply, NoScriptError | TryAgainError | AskError) and entry.attempts < _MAX_ATTEMPTS:
            # Not run: safe to send again (after loading the script, or to the right node).
            entry.attempts += 1
            if isinstance(reply, AskError) and self._on_moved is not None:
                self.spawn(self._after_moved(entry))
            else:
                self._reload.append(entry)
                if not self._scheduled:
                    self._scheduled = True
                    self._loop.call_soon(self._flush)
            return True
        if isinstance(reply, ReadOnlyError | ClusterDownError | MasterDownError):
            return False  # a failover in progress, a replica in the primary's place
        # Anything else (OOM, a broken script): this decision fails and the store falls back for
        # it; the rest of the batch stands.
        if not entry.future.done():
            entry.future.set_exception(BatchFailed(f"{type(reply).__name__}: {reply}"))
        return True

    async def _after_moved(self, entry: _Entry) -> None:
        assert self._on_moved is not None
        try:
            await self._on_moved()
        except (TimeoutError, RedisError, OSError) as exc:
            self._fail_entries([entry], exc)
            return
        self._reload.append(entry)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def on_failure(self, exc: BaseException) -> None:
        self.failing = True
        self._on_failure(exc)

    def on_success(self) -> None:
        self.failing = False
        self._on_success()

    async def ping(self, channels: Sequence[Channel]) -> None:
        """A probe: one PING on every channel; raises if any does not answer in time."""
        futures = []
        for channel in channels:
            fut: asyncio.Future[Any] = self._loop.create_future()
            futures.append(fut)
            await channel.write([_Entry("", (), fut)], [("PING",)], probe=True)
        async with asyncio.timeout(self.timeout):
            for fut in futures:
                await fut

    async def aclose(self, channels: Sequence[Channel]) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.fail_pending(BatchFailed("store closed"))
        for channel in channels:
            await channel.aclose()
