"""Hostile and odd input: any identifier makes a safe, bounded, distinct key and never a 500."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rateguard import ClientAddress, MemoryStore, RateGuard, Rule, encode_identifier, limit
from rateguard.stores import Store

from . import raw_asgi

# Anything a header, a token or a user id could hold, and then some.
NASTY = [
    "",
    " ",
    "*",
    "?",
    "[a-z]",
    "\\",
    "{}",
    "{",
    "}",
    "a:*:{b}",
    "\r\n",
    "a\r\nSet-Cookie: x=1",
    "\x00",
    "a\x00b",
    "%",
    "%41",
    "A",
    "#",
    "#" + "0" * 64,
    "é",
    "\u2603\U0001f600",
    "\udcff",  # a lone surrogate: invalid UTF-8 decoded with surrogateescape
    "\ud83d\ude00",  # a surrogate pair that is not the character it looks like
    "\xff\xfe",
    "x" * 128,
    "x" * 129,
    "x" * 100_000,
    "x" * 100_000 + "y",
    "é" * 43,  # 129 characters once percent-encoded
    "id:alice",
    "2001:db8::/64",
    "unknown",
]
SAFE_KEY = re.compile(r"[A-Za-z0-9.:_\-%~#]{1,128}")

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)


def test_nasty_identifiers_make_safe_bounded_distinct_keys() -> None:
    keys = [encode_identifier(identifier) for identifier in NASTY]
    for identifier, key in zip(NASTY, keys, strict=True):
        assert SAFE_KEY.fullmatch(key), (identifier[:20], key)
        assert key == encode_identifier(identifier)  # stable
    assert len(set(keys)) == len(NASTY)


def test_long_identifiers_are_hashed_and_short_ones_kept_readable() -> None:
    assert encode_identifier("203.0.113.7") == "203.0.113.7"
    assert encode_identifier("a b/c") == "a%20b%2Fc"
    assert encode_identifier("x" * 128) == "x" * 128
    hashed = encode_identifier("x" * 129)
    assert hashed.startswith("#") and len(hashed) == 65
    # A key that looks hashed is itself percent-encoded, so it can't meet a real hash.
    assert encode_identifier(hashed) == "%23" + hashed[1:]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(any_text, any_text)
def test_encoding_is_injective_and_safe(a: str, b: str) -> None:
    ka, kb = encode_identifier(a), encode_identifier(b)
    assert SAFE_KEY.fullmatch(ka)
    assert (ka == kb) == (a == b)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(max_size=20), st.text(min_size=1, max_size=5), st.text(min_size=1, max_size=5))
def test_long_identifiers_differing_only_at_the_end_stay_apart(stem: str, end_a: str, end_b: str) -> None:
    long = "k" * 200 + stem
    assert (encode_identifier(long + end_a) == encode_identifier(long + end_b)) == (end_a == end_b)


# ---------------------------------------------------------------------------------------------
# In both stores


async def test_every_nasty_identifier_gets_its_own_bucket(store: Store) -> None:
    rule = Rule(1, capacity=1)  # one request, then nothing for a minute
    clients = [encode_identifier(identifier) for identifier in NASTY]
    for client in clients:
        assert (await store.take(client, "global", rule)).allowed
    for client in clients:  # each one's bucket is empty: nobody shared it
        assert not (await store.take(client, "global", rule)).allowed
    assert await store.count() == len(NASTY)
    # Inspect and reset touch exactly one client, even one that looks like a pattern.
    for client in clients:
        assert [b.bucket for b in await store.inspect(client)] == ["global"]
    assert await store.reset(encode_identifier("*")) == ["global"]
    assert await store.count() == len(NASTY) - 1
    assert (await store.take(encode_identifier("*"), "global", rule)).allowed
    assert not (await store.take(encode_identifier("?"), "global", rule)).allowed


async def test_bucket_names_of_any_text(store: Store) -> None:
    rule = Rule(1, capacity=1)
    for name in ("*", "{x}", "a\r\nb", "\x00", "é", "GET /items/{id}", "n" * 1_000):
        assert (await store.take("client", name, rule)).allowed
        assert not (await store.take("client", name, rule)).allowed
    assert len(await store.inspect("client")) == 7


# ---------------------------------------------------------------------------------------------
# Over HTTP, driven with raw ASGI so that any header bytes get through


# Header values as raw bytes: ASGI servers pass them on as they came; Starlette decodes latin-1.
RAW_VALUES = [
    b"*",
    b"{}",
    b"{a}:*",
    b"\x00",
    b"a\x00b",
    b"\r\n",
    b"a\rb\nc",
    b"\x80\x81\xfe\xff",  # not UTF-8
    b"\xc3\xa9",  # UTF-8 for "e acute", which reads as two latin-1 characters
    b"%00",
    b"x" * 100_000,
    b"x" * 100_000 + b"y",
    b"#" + b"f" * 64,
    b" ",
]


def api_key(request: Request) -> str | None:
    return request.headers.get("x-api-key")


def middleware_app(store: Store) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1, store=store, identifier=api_key)

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


def dependency_app(store: Store) -> FastAPI:
    app = FastAPI()

    @app.get("/", dependencies=[Depends(limit(1, store=store, identifier=api_key))])
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


APPS = pytest.mark.parametrize("make_app", [middleware_app, dependency_app], ids=["RateGuard", "limit"])


@APPS
async def test_http_identifiers_of_any_bytes(store: Store, make_app: Any) -> None:
    app = make_app(store)

    async def get(value: bytes) -> int:
        response = await raw_asgi.request(app, headers=[(b"x-api-key", value)])
        assert response.status != 500
        return response.status

    assert [await get(value) for value in RAW_VALUES] == [200] * len(RAW_VALUES)
    assert [await get(value) for value in RAW_VALUES] == [429] * len(RAW_VALUES)
    # None of them took the bucket of the client's address ...
    assert (await raw_asgi.request(app)).status == 200
    # ... and an empty key falls back to it.
    assert await get(b"") == 429


async def test_http_hostile_forwarding_headers_with_trusted_proxies(store: Store) -> None:
    app = FastAPI()

    @app.get("/", dependencies=[Depends(limit(1000, store=store, trusted_proxies=["10.0.0.0/8"]))])
    async def root() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(RateGuard, requests_per_minute=1000, store=store, trusted_proxies=["10.0.0.0/8"])
    values = [
        *RAW_VALUES,
        b"\x80\xff, 198.51.100.1",
        b'for="\x00", for="[::1', b"for=" + b'"' * 10_000,
        b", , ,",
        b"198.51.100.1, " * 5_000,
        b"[" * 10_000,
    ]  # fmt: skip
    for name in (b"x-forwarded-for", b"forwarded"):
        for value in values:
            response = await raw_asgi.request(app, client=("10.0.0.1", 1), headers=[(name, value)] * 3)
            assert response.status == 200, (name, value[:30])


async def test_odd_peers_never_fail() -> None:
    store = MemoryStore()
    app = middleware_app(store)
    peers = [
        (None, 200),
        (("", 0), 429),  # no address either: the same "unknown" key
        (("testclient", 0), 200),
        (("::1", 0), 200),
        (("[::1]", 0), 429),  # the same address
        (("x" * 10_000, 0), 200),
        (("\x00", 0), 200),
        ((b"192.0.2.1", 0), 200),  # bytes where a str belongs
    ]
    for client, status in peers:
        assert (await raw_asgi.request(app, client=client)).status == status, client
    assert len(await store.inspect(encode_identifier("x" * 10_000))) == 1
    assert ClientAddress()({"client": ("x" * 10_000, 0)}) == "x" * 10_000


@pytest.mark.parametrize("value", [42, b"bytes", 3.5, ("a", 1)])
async def test_identifier_values_that_are_not_text(value: object) -> None:
    store = MemoryStore()
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1, store=store, identifier=lambda request: value)

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    assert (await raw_asgi.request(app)).status == 200
    assert (await raw_asgi.request(app)).status == 429
    assert await store.inspect("id:" + encode_identifier(str(value)))


@APPS
async def test_hostile_bucket_names_over_http(store: Store, make_app: Any) -> None:
    app = FastAPI()
    name = "a*{b}\r\n\x00é" + "n" * 300

    @app.get("/", dependencies=[Depends(limit(1, store=store, name=name))])
    async def root() -> dict[str, bool]:
        return {"ok": True}

    first, second = await raw_asgi.request(app), await raw_asgi.request(app)
    assert (first.status, second.status) == (200, 429)
    for response in (first, second):
        for _, header in response.headers:
            header.decode("ascii")  # the policy name was made printable in the headers


# ---------------------------------------------------------------------------------------------
# A user's callable that raises: the app's own error, with a note naming the callable


class BrokenHere(Exception):
    pass


def broken_sync(request: Request) -> str:
    raise BrokenHere("the user's bug")


async def broken_async(request: Request) -> str:
    raise BrokenHere("the user's bug")


@pytest.mark.parametrize("callable_", [broken_sync, broken_async], ids=["sync", "async"])
@pytest.mark.parametrize("option", ["identifier", "skip", "cost"])
@pytest.mark.parametrize("where", ["RateGuard", "limit"])
async def test_a_raising_callable_propagates_with_a_note(callable_: Any, option: str, where: str) -> None:
    app = FastAPI()
    options = {option: callable_, "store": MemoryStore()}
    if where == "RateGuard":
        app.add_middleware(RateGuard, requests_per_minute=10, **options)
        dependencies = []
    else:
        dependencies = [Depends(limit(10, **options))]

    @app.get("/", dependencies=dependencies)
    async def root() -> dict[str, bool]:
        return {"ok": True}

    with pytest.raises(BrokenHere, match="the user's bug") as info:
        await raw_asgi.request(app)
    notes = getattr(info.value, "__notes__", [])
    assert notes == [f"raised by the rateguard {option} callable {callable_.__qualname__}"]


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.binary(max_size=200))
async def test_any_header_bytes_over_asgi(key: bytes, forwarded: bytes) -> None:
    # A fresh store per example: the property is "never a 500", not the limit.
    app = FastAPI()
    app.add_middleware(
        RateGuard,
        requests_per_minute=60,
        store=MemoryStore(),
        identifier=api_key,
        trusted_proxies=["10.0.0.0/8"],
    )

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    headers = [(b"x-api-key", key), (b"x-forwarded-for", forwarded), (b"forwarded", forwarded)]
    assert (await raw_asgi.request(app, client=("10.0.0.1", 1), headers=headers)).status == 200
