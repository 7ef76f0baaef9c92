"""The ``headers`` option: which rate-limit fields responses carry, on RateGuard and limit()."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI

from rateguard import ConfigurationError, MemoryStore, RateGuard, limit

from .helpers import client_for

IETF = {"ratelimit", "ratelimit-policy"}
X = {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}
CHOICES = [(True, IETF | X), ("ietf", IETF), ("x-ratelimit", X), (False, set())]


def _fields(headers: object) -> set[str]:
    return {name for name in headers if name in IETF | X}  # type: ignore[attr-defined]


def guarded_app(headers: object, *, route_headers: object = True, global_limit: bool = True) -> FastAPI:
    app = FastAPI()
    if global_limit:
        app.add_middleware(RateGuard, requests_per_minute=60, capacity=2, headers=headers)  # type: ignore[arg-type]

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    # Without a RateGuard, a store of its own: the process-wide default outlives one test.
    store = None if global_limit else MemoryStore()
    guard = limit(60, capacity=1, headers=route_headers, store=store)  # type: ignore[arg-type]

    @app.get("/route", dependencies=[Depends(guard)])
    async def route() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.mark.parametrize(("choice", "expected"), CHOICES)
async def test_middleware_sends_the_chosen_fields(choice: object, expected: set[str]) -> None:
    async with client_for(guarded_app(choice)) as client:
        allowed = [await client.get("/") for _ in range(2)]
        denied = await client.get("/")
    assert [r.status_code for r in allowed] == [200, 200]
    assert _fields(allowed[0].headers) == expected
    assert denied.status_code == 429
    assert _fields(denied.headers) == expected
    assert denied.headers.get_list("retry-after") == ["1"]  # whatever the choice
    assert denied.json()["retry_after"] == 1


@pytest.mark.parametrize(("choice", "expected"), CHOICES)
async def test_limit_without_middleware_sends_the_chosen_fields(choice: object, expected: set[str]) -> None:
    app = guarded_app(True, route_headers=choice, global_limit=False)
    async with client_for(app) as client:
        allowed = await client.get("/route")
        denied = await client.get("/route")
    assert allowed.status_code == 200 and _fields(allowed.headers) == expected
    assert denied.status_code == 429 and _fields(denied.headers) == expected
    assert denied.headers.get_list("retry-after") == ["1"]


async def test_a_route_limit_behind_a_silent_middleware_still_sends_retry_after() -> None:
    # RateGuard(headers=False) has no send wrapper to add them: the route's 429 brings its own.
    async with client_for(guarded_app(False)) as client:
        allowed = await client.get("/route")
        denied = await client.get("/route")
    assert allowed.status_code == 200 and _fields(allowed.headers) == set()
    assert denied.status_code == 429
    assert _fields(denied.headers) == set()
    assert denied.headers.get_list("retry-after") == ["1"]


async def test_stacked_middlewares_the_outermost_choice_wins() -> None:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(RateGuard, requests_per_minute=60, capacity=1, name="inner")
    app.add_middleware(RateGuard, requests_per_minute=600, name="outer", headers=False)
    async with client_for(app) as client:
        allowed = await client.get("/")
        denied = await client.get("/")  # denied by the inner one
    assert _fields(allowed.headers) == set()
    assert denied.status_code == 429
    assert _fields(denied.headers) == set()
    assert denied.headers.get_list("retry-after") == ["1"]


@pytest.mark.parametrize("bad", ["all", "IETF ", None, 1, 0, "x-ratelimit-limit"])
def test_bad_choice_fails_at_construction(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="headers must be True"):
        limit(5, headers=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="'ietf', 'x-ratelimit' or False"):
        RateGuard(FastAPI(), headers=bad)  # type: ignore[arg-type]
