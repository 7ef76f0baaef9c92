"""Shared totals: every server adds its decision counts to one small hash, about once a second.

This process's counts are plain ints, whatever the event loop; the flush timer belongs to the
loop that serves decisions now (`arm` is called from it), and counts a flush could not write are
kept for the next one, on this loop or a later one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import RedisError

_TTL = 86_400  # like every rateguard key, the totals expire: after a day with no traffic


class Counters:
    """This process's decisions, and the deltas not yet added to the shared totals."""

    def __init__(self, key: str, timeout: float) -> None:
        self.key = key
        self.timeout = timeout
        self.allowed = 0
        self.limited = 0
        self._unflushed = [0, 0]
        self._timer: asyncio.TimerHandle | None = None
        self._flushing = False

    def count(self, allowed: bool, loop: asyncio.AbstractEventLoop | None, flush: Any) -> None:
        """Count a decision, and flush within a second even if the server goes idle (``flush`` is
        called on ``loop``; None: the decision outlived its loop's binding, whose timer is gone)."""
        if allowed:
            self.allowed += 1
            self._unflushed[0] += 1
        else:
            self.limited += 1
            self._unflushed[1] += 1
        if self._timer is None and loop is not None:
            self._timer = loop.call_later(1.0, self._due, flush)

    def _due(self, flush: Any) -> None:
        self._timer = None
        if not self._flushing and (self._unflushed[0] or self._unflushed[1]):
            flush()

    def disarm(self, *, cancel: bool = True) -> None:
        """Forget the flush timer (``cancel=False``: its loop is closed, leave it alone)."""
        timer, self._timer = self._timer, None
        if timer is not None and cancel:
            timer.cancel()
        self._flushing = False  # a flush of a loop that ended will never finish

    async def flush(self, client: Any) -> bool:
        """Add the deltas to the shared totals; False (deltas kept) if Redis did not take them."""
        # Taken before the first await: a concurrent flush can't add the same counts twice.
        allowed, limited = self._unflushed
        if not allowed and not limited:
            return True
        self._unflushed = [0, 0]
        self._flushing = True
        written = False
        try:
            async with asyncio.timeout(self.timeout):
                async with client.pipeline(transaction=False) as pipe:
                    pipe.hincrby(self.key, "allowed", allowed)
                    pipe.hincrby(self.key, "limited", limited)
                    pipe.expire(self.key, _TTL)
                    await pipe.execute()
            written = True
        except (TimeoutError, RedisError, OSError):
            return False
        finally:  # failed, or cancelled (the store closes): the counts wait for the next flush
            self._flushing = False
            if not written:
                self._unflushed[0] += allowed
                self._unflushed[1] += limited
        return True


__all__ = ["Counters"]
