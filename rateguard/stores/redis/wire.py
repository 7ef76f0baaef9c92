"""The decision connection: a small asyncio protocol of rateguard's own, on hiredis.

Commands are written as they come (pipelined) and replies, which Redis sends in order, are
parsed by ``hiredis.Reader`` in ``data_received`` and handed to their waiters in order: no
reader task, no extra event-loop turn between a reply and the request it answers. Connecting
covers TCP or a unix socket, TLS with the caller's SSL context, ``AUTH`` (with a username) and
``SELECT``, all inside one connect deadline; each failure becomes a `StoreError` that says in
words what is wrong and where.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import hiredis

from rateguard.errors import StoreError

Command = Sequence[Any]
pack_command = cast(Callable[[Command], bytes], hiredis.pack_command)
ReplyError = hiredis.ReplyError


class Waiter(Protocol):
    """Whoever waits for one reply: told the reply, or that it will never come."""

    def reply(self, value: Any) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class FutureWaiter:
    """A `Waiter` that resolves a future (for the handshake, probes and slot maps)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def reply(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(frozen=True, slots=True)
class Address:
    """Where one Redis node listens: ``host:port`` or a unix socket ``path``."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """How to talk to every node of one deployment (the same for each)."""

    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: ssl.SSLContext | None = None
    connect_timeout: float = 0.05


class ConnectionLost(StoreError):
    """The connection broke, or a deadline passed on it: whatever was in flight may have run."""


class Connection(asyncio.Protocol):
    """One connection to one node. Use `open_connection` to get one that is ready."""

    def __init__(
        self, address: Address, on_lost: Callable[[Connection, BaseException], None] | None = None
    ) -> None:
        self.address = address
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.waiting: deque[Waiter] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._on_lost = on_lost
        # Set on a subscribed connection: replies no command waits for (pushes) go here.
        self.on_push: Callable[[Any], None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's subclasses

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        waiting = self.waiting
        try:
            reader.feed(data)
            reply = reader.gets()
            while reply is not False:
                if not waiting:
                    if self.on_push is not None:
                        self.on_push(reply)
                        reply = reader.gets()
                        continue
                    raise ConnectionLost(
                        f"{self.address}: a reply nobody asked for; the connection is out of step"
                    )
                waiting.popleft().reply(reply)
                reply = reader.gets()
        except Exception as exc:  # out of step, or bytes hiredis can't parse: the stream is lost
            self.lose(exc if isinstance(exc, StoreError) else ConnectionLost(f"{self.address}: {exc}"))

    def eof_received(self) -> bool:
        self.lose(ConnectionLost(f"{self.address}: connection closed by the server"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose(ConnectionLost(f"{self.address}: {exc or 'connection closed'}"))

    # -- use ----------------------------------------------------------------------------------

    def write(self, data: bytes, waiters: Sequence[Waiter]) -> None:
        """Send packed commands; each waiter, in order, gets one reply."""
        if self.closed or self.transport is None:
            exc = ConnectionLost(f"{self.address}: not connected")
            for waiter in waiters:
                waiter.fail(exc)
            return
        self.waiting.extend(waiters)
        self.transport.write(data)

    def call(self, *commands: Command) -> list[asyncio.Future[Any]]:
        """Send commands; a future per reply."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in commands]
        self.write(b"".join([pack_command(c) for c in commands]), [FutureWaiter(f) for f in futures])
        return futures

    def lose(self, exc: BaseException) -> None:
        """Drop the connection: every waiter fails (what was sent may have run), once."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()  # its state is unknown: nothing more is read from it
            if self._on_lost is not None:
                self._on_lost(self, exc)
        waiting, self.waiting = self.waiting, deque()
        for waiter in waiting:
            waiter.fail(exc)

    def close(self) -> None:
        """Close now, without waiting: pending waiters fail."""
        self.lose(ConnectionLost(f"{self.address}: closed"))


async def open_connection(
    address: Address, settings: Settings, on_lost: Callable[[Connection, BaseException], None] | None = None
) -> Connection:
    """A connection that has connected, authenticated and selected its database, or `StoreError`."""
    loop = asyncio.get_running_loop()
    conn = Connection(address, on_lost)
    try:
        async with asyncio.timeout(settings.connect_timeout):
            if address.path:
                await loop.create_unix_connection(lambda: conn, address.path, ssl=settings.ssl)
            else:
                await loop.create_connection(
                    lambda: conn,
                    address.host,
                    address.port,
                    ssl=settings.ssl,
                    server_hostname=address.host if settings.ssl is not None else None,
                )
            hello: list[Command] = []
            if settings.password is not None:
                auth = (
                    ("AUTH", settings.username, settings.password)
                    if settings.username
                    else ("AUTH", settings.password)
                )
                hello.append(auth)
            if settings.db:
                hello.append(("SELECT", settings.db))
            hello.append(("PING",))  # a server that needs a password answers this NOAUTH
            replies = await asyncio.gather(*conn.call(*hello), return_exceptions=True)
    except BaseException as exc:
        connected = conn.transport is not None
        conn.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise connect_error(address, settings, exc, connected=connected) from None
    for command, reply in zip(hello, replies, strict=True):
        if isinstance(reply, ReplyError):  # an error reply (hiredis gives it as a value)
            conn.close()
            raise StoreError(f"Redis at {address}: {describe_reply_error(str(reply), command, settings)}")
        if isinstance(reply, BaseException):
            conn.close()
            raise connect_error(address, settings, reply) from None
    return conn


async def round_trip(address: Address, settings: Settings) -> float:
    """Seconds one PING takes on a fresh connection (which is then closed); `StoreError` if it fails."""
    conn = await open_connection(address, settings)
    try:
        start = time.perf_counter()
        async with asyncio.timeout(settings.connect_timeout):
            [pong] = conn.call(("PING",))
            await pong
        return time.perf_counter() - start
    except TimeoutError:
        raise StoreError(
            f"Redis at {address}: no answer to PING within {settings.connect_timeout * 1000:.0f} ms"
        ) from None
    finally:
        conn.close()


def describe_reply_error(text: str, command: Command, settings: Settings) -> str:
    """An error reply to the handshake, said in words, with what to do."""
    head = text.split(" ", 1)[0]
    if head == "NOAUTH":
        return (
            "it needs a password: give password= (and username= for an ACL user), or put it in the "
            "URL: redis://:password@host:6379/0"
        )
    if head == "WRONGPASS" or "invalid password" in text or "invalid username-password" in text:
        return "wrong password, or no such user: check password= and username=, or the URL"
    if command and command[0] == "AUTH" and "without any password configured" in text:
        return "a password was given, but it has none set: leave password= out"
    if command and command[0] == "SELECT":
        return (
            f"no such database: db {settings.db} (a server has 16 by default, 0 to 15; its "
            f"'databases' setting says how many): {text}"
        )
    return text


def connect_error(
    address: Address, settings: Settings, exc: BaseException, *, connected: bool = False
) -> StoreError:
    """A failure to connect, said in words (``connected``: the TCP/TLS connection was made)."""
    if isinstance(exc, socket.gaierror):
        return StoreError(f"Redis at {address}: no such host ({address.host!r} does not resolve)")
    if isinstance(exc, ConnectionRefusedError):
        return StoreError(f"Redis at {address}: connection refused (is Redis running and listening there?)")
    if isinstance(exc, FileNotFoundError):
        return StoreError(f"Redis at {address}: no such unix socket")
    if isinstance(exc, ssl.SSLError):
        return StoreError(
            f"Redis at {address}: TLS failed ({exc.reason or exc}); if this port speaks plain Redis, "
            "use redis:// instead of rediss://"
        )
    if isinstance(exc, TimeoutError):
        ms = f"{settings.connect_timeout * 1000:.0f} ms"
        if connected:
            hint = "; if that port speaks TLS, use rediss://" if settings.ssl is None else ""
            return StoreError(f"Redis at {address}: connected, but no answer within {ms}{hint}")
        if settings.ssl is not None:
            return StoreError(
                f"Redis at {address}: no TLS handshake within {ms}; if that port speaks plain Redis, "
                "use redis:// instead of rediss://"
            )
        return StoreError(
            f"Redis at {address}: could not connect within {ms} (is the host up and the port open? "
            "a far server needs a longer connect_timeout=)"
        )
    if isinstance(exc, ConnectionLost | ConnectionResetError | BrokenPipeError):
        hint = "; if that port speaks TLS, use rediss://" if settings.ssl is None else ""
        return StoreError(f"Redis at {address}: the server closed the connection{hint}")
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"Redis at {address}: {type(exc).__name__}: {exc}")


__all__ = [
    "Address",
    "Connection",
    "ConnectionLost",
    "FutureWaiter",
    "ReplyError",
    "Settings",
    "Waiter",
    "open_connection",
    "pack_command",
    "round_trip",
]
