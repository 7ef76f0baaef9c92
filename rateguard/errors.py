"""The exceptions rateguard raises.

    RateGuardError              base of everything below
    ├── ConfigurationError      bad options, raised at construction (also a ValueError)
    └── StoreError              a store could not make a decision (e.g. Redis unreachable)

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
