"""rateguard: distributed token-bucket rate limiting for FastAPI and Starlette."""

from rateguard.admin import admin_router
from rateguard.bucket import BucketState, Decision, Rule
from rateguard.dependencies import LimiterUnavailable, RateLimitExceeded, WebSocketRateLimited, limit
from rateguard.errors import ConfigurationError, RateGuardError, StoreError, StoreUnavailable
from rateguard.identity import ClientAddress, encode_identifier
from rateguard.install import install
from rateguard.limiter import Limiter, Verdict
from rateguard.middleware import RateGuard
from rateguard.stores import Store, StoreStats
from rateguard.stores.memory import MemoryStore
from rateguard.stores.redis import RedisStore

__version__ = "0.2.0"

__all__ = [
    "BucketState",
    "ClientAddress",
    "ConfigurationError",
    "Decision",
    "Limiter",
    "LimiterUnavailable",
    "MemoryStore",
    "RateGuard",
    "RateGuardError",
    "RateLimitExceeded",
    "RedisStore",
    "Rule",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "Verdict",
    "WebSocketRateLimited",
    "admin_router",
    "encode_identifier",
    "install",
    "limit",
]
