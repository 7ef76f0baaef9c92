"""A Redis Cluster's slot map, read over rateguard's own connection with ``CLUSTER SLOTS``.

Each decision goes to the primary that owns its slot (one client's keys share a slot through
their hash tag); a MOVED reply reloads the map. The slot of a key is ``redis.crc.key_slot``,
the function redis-py itself uses.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable

from redis.crc import key_slot

from rateguard.errors import StoreError
from rateguard.stores.redis.batcher import Channel
from rateguard.stores.redis.wire import Address, ReplyError, Settings, open_connection


class SlotMap:
    """Slots to primaries, and a decision channel per primary."""

    def __init__(
        self,
        seeds: Callable[[], Awaitable[list[Address]]],
        settings: Settings,
        make_channel: Callable[[Address], Channel],
    ) -> None:
        self.seeds = seeds
        self.settings = settings
        self._make_channel = make_channel
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, Address]] = []
        self.channels: dict[Address, Channel] = {}
        self._loading: asyncio.Task[None] | None = None

    def route(self, keys: tuple[str, ...]) -> Channel | None:
        """The channel of the primary that owns these keys' slot; None until the map knows it."""
        slot = key_slot(keys[0].encode())
        i = bisect.bisect_right(self._starts, slot) - 1
        if i >= 0:
            start, end, address = self._ranges[i]
            if start <= slot <= end:
                return self.channel(address)
        return None

    async def locate(self, keys: tuple[str, ...]) -> Channel:
        """`route`, after reading the map if it doesn't know the slot yet."""
        return self.route(keys) or await self._route_after_load(key_slot(keys[0].encode()))

    def channel(self, address: Address) -> Channel:
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = self._make_channel(address)
        return channel

    async def _route_after_load(self, slot: int) -> Channel:
        await self.load()
        i = bisect.bisect_right(self._starts, slot) - 1
        if i < 0 or not self._ranges[i][0] <= slot <= self._ranges[i][1]:
            raise StoreError(f"no Cluster node serves slot {slot}")
        return self.channel(self._ranges[i][2])

    async def primaries(self) -> list[Channel]:
        return [self.channel(address) for address in await self.addresses()]

    async def addresses(self) -> list[Address]:
        """The primaries, in slot order (the map is read first if it is not known yet)."""
        if not self._ranges:
            await self.load()
        return list(dict.fromkeys(r[2] for r in self._ranges))

    async def redirected(self, reply: str) -> None:
        """A MOVED or ASK: the map changed, read it again."""
        await self.load()

    async def load(self) -> None:
        """Read the map once, however many ask at a time."""
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load())
        task = self._loading
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._loading = None

    def close(self) -> None:
        """Stop a load in flight (its connection closes with it)."""
        if self._loading is not None:
            self._loading.cancel()

    async def _load(self) -> None:
        known = [*dict.fromkeys([*(r[2] for r in self._ranges), *await self.seeds()])]
        errors: list[str] = []
        for address in known:
            try:
                conn = await open_connection(address, self.settings)
            except StoreError as exc:
                errors.append(str(exc))
                continue
            try:
                [slots] = conn.call(("CLUSTER", "SLOTS"))
                async with asyncio.timeout(max(self.settings.connect_timeout, 0.5)):
                    reply = await slots
            except (TimeoutError, StoreError) as exc:
                errors.append(f"{address}: {exc or 'no answer'}")
                continue
            finally:
                conn.close()
            if isinstance(reply, ReplyError) or not reply:
                errors.append(f"{address}: CLUSTER SLOTS answered {reply!r}")
                continue
            ranges = []
            for start, end, primary, *_ in reply:
                host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
                ranges.append((int(start), int(end), Address(host or address.host, int(primary[1]))))
            ranges.sort()
            self._ranges = ranges
            self._starts = [r[0] for r in ranges]
            return
        raise StoreError("could not read the Cluster's slot map: " + "; ".join(errors))


__all__ = ["SlotMap"]
