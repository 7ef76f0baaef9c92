"""rateguard: distributed token-bucket rate limiting for FastAPI and Starlette."""

from rateguard.admin import admin_router
from rateguard.bucket import BucketState, Decision, Rule
from rateguard.dependencies import RateLimitExceeded, limit
from rateguard.errors import ConfigurationError, RateGuardError, StoreError
from rateguard.identity import ClientAddress, encode_identifier
from rateguard.middleware import RateGuard
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore
from rateguard.stores.redis import RedisStore

__version__ = "0.1.0"

__all__ = [
    "BucketState",
    "ClientAddress",
    "ConfigurationError",
    "Decision",
    "MemoryStore",
    "RateGuard",
    "RateGuardError",
    "RateLimitExceeded",
    "RedisStore",
    "Rule",
    "Store",
    "StoreError",
    "admin_router",
    "encode_identifier",
    "limit",
]
