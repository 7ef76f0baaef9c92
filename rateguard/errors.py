"""The exceptions rateguard raises.

    RateGuardError              base of everything below
    ├── ConfigurationError      bad options, raised at construction (also a ValueError)
    └── StoreError              a store could not make or read a decision
        └── StoreUnavailable    the store is down and its policy is to refuse (HTTP 503)

Errors raised by user callables (``identifier``, ``skip``, ``cost``) are not wrapped: they are the
application's own bugs and propagate unchanged, with a note naming the callable.
"""

from __future__ import annotations


class RateGuardError(Exception):
    """Base class of every rateguard error."""


class ConfigurationError(RateGuardError, ValueError):
    """An option has a value rateguard cannot work with; the message says what to do."""


class StoreError(RateGuardError):
    """A store failed to make or read a decision."""


class StoreUnavailable(StoreError):
    """The store can't decide and its outage policy says to refuse: answered with 503."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
