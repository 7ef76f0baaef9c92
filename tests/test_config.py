"""Bad configuration fails at construction, with a ValueError that says what to do."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette

from rateguard import ConfigurationError, MemoryStore, RateGuard, RedisStore, limit


def noop_app() -> Starlette:
    return Starlette()


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"requests_per_minute": 0}, "requests_per_minute must be a finite number > 0"),
    ({"requests_per_minute": -1}, "requests_per_minute must be a finite number > 0"),
    ({"requests_per_minute": float("nan")}, "requests_per_minute"),
    ({"requests_per_minute": float("inf")}, "requests_per_minute"),
    ({"requests_per_minute": None}, "requests_per_minute"),
    ({"capacity": 0}, "capacity must be >= 1"),
    ({"capacity": float("nan")}, "capacity must be a whole number"),
    ({"cost": 0}, "cost must be between 1 and capacity"),
    ({"cost": 61}, "cost must be between 1 and capacity \\(60\\)"),
    ({"capacity": 5, "cost": 6}, "raise capacity or lower the cost"),
    ({"cost": 1.5}, "cost must be an int"),
    ({"identifier": "x-api-key"}, "identifier must be a callable"),
    ({"skip": True}, "skip must be a callable"),
    ({"store": "redis://localhost"}, "store must be a rateguard store"),
    ({"store": object()}, "store must be a rateguard store"),
    ({"message": 429}, "message must be a string"),
    ({"trusted_proxies": ["not-a-network"]}, "trusted_proxies entry 'not-a-network'"),
    ({"ipv6_prefix": 0}, "ipv6_prefix must be an int from 1 to 128"),
]


@pytest.mark.parametrize(("options", "fragment"), BAD_OPTIONS)
def test_middleware_rejects(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        RateGuard(noop_app(), **options)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("options", "fragment"), BAD_OPTIONS)
def test_limit_rejects(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        limit(**options)


def test_limit_positional_rate_is_checked() -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        limit(0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"url": "localhost:6379"}, "url must look like 'redis://host:6379/0'"),
        ({"url": "redis://x", "host": "y"}, "one of url=, host=/port=, sentinels= or client="),
        ({"port": 0}, "port must be an int from 1 to 65535"),
        ({"port": "6379"}, "port must be an int"),
        ({"client": "redis://x"}, "client must be a redis.asyncio client"),
        ({"prefix": ""}, "prefix must be a non-empty string"),
        ({"prefix": "a{b}"}, "without braces"),
    ],
)
def test_redis_store_rejects(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        RedisStore(**kwargs)


@pytest.mark.parametrize("max_keys", [0, -1, 1.5, None])
def test_memory_store_rejects_bad_bound(max_keys: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_keys must be an int >= 1"):
        MemoryStore(max_keys=max_keys)


def test_good_options_construct() -> None:
    RateGuard(noop_app(), requests_per_minute=0.5)
    RateGuard(noop_app(), requests_per_minute=100, capacity=10, cost=lambda r: 2)
    limit(5, capacity=1, identifier=lambda r: "x", skip=lambda r: False, message="no")
    RedisStore(host="localhost", port=6379, db=1, password="secret")
    RedisStore(url="redis://localhost:6379/0")
    RedisStore()
