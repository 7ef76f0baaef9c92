"""Who the client is: peer address, trusted proxies, X-Forwarded-For / Forwarded, IPv6 grouping."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import Depends, FastAPI

from rateguard import ClientAddress, ConfigurationError, MemoryStore, RateGuard, limit
from rateguard.identity import UNKNOWN_CLIENT, parse_address

from . import raw_asgi
from .helpers import client_for

PROXY = "10.0.0.1"
TRUSTED = ["10.0.0.0/8", "2001:db8:ffff::/48"]


def scope(peer: str | None = "203.0.113.7", *headers: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "client": (peer, 50000) if peer is not None else None,
        "headers": [(name.encode(), value.encode("latin-1")) for name, value in headers],
    }


def xff(value: str) -> tuple[str, str]:
    return ("x-forwarded-for", value)


def fwd(value: str) -> tuple[str, str]:
    return ("forwarded", value)


# ---------------------------------------------------------------------------------------------
# Without trusted proxies: the peer, whatever the headers say


@pytest.mark.parametrize(
    "header",
    [xff("198.51.100.1"), xff("198.51.100.1, 10.0.0.2"), fwd("for=198.51.100.1"), ("x-real-ip", "1.1.1.1")],
)
def test_forwarding_headers_are_ignored_without_trusted_proxies(header: tuple[str, str]) -> None:
    assert ClientAddress()(scope("203.0.113.7", header)) == "203.0.113.7"
    assert ClientAddress()(scope(PROXY, header)) == PROXY


def test_a_spoofed_header_from_an_untrusted_peer_changes_nothing() -> None:
    resolve = ClientAddress(TRUSTED)
    for header in (xff("10.0.0.5"), xff("198.51.100.1, 10.0.0.2"), fwd("for=198.51.100.1")):
        assert resolve(scope("203.0.113.7", header)) == "203.0.113.7"
    assert ClientAddress(TRUSTED, proxy_header="forwarded")(scope("203.0.113.7", fwd("for=1.2.3.4"))) == (
        "203.0.113.7"
    )


# ---------------------------------------------------------------------------------------------
# Trusted proxies: the right-most address that is not one of them


@pytest.mark.parametrize(
    ("value", "client"),
    [
        ("198.51.100.1", "198.51.100.1"),
        ("198.51.100.1, 10.0.0.2", "198.51.100.1"),  # two proxies
        ("6.6.6.6, 198.51.100.1, 10.0.0.2", "198.51.100.1"),  # the client's own claim is left of it
        ("6.6.6.6,198.51.100.1,10.0.0.2", "198.51.100.1"),  # no spaces
        ("  198.51.100.1 ,  ", "198.51.100.1"),  # empty list elements are skipped (RFC 9110 5.6.1)
        ("198.51.100.1:4711", "198.51.100.1"),  # a port
        ("[2001:db8:1:2::17]:4711, 10.0.0.2", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::17", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.1", "198.51.100.1"),  # IPv4-mapped
        ("fe80::1%eth0", "fe80::/64"),  # a zone id
        ("198.51.100.1, 2001:db8:ffff::1", "198.51.100.1"),  # an IPv6 proxy
    ],
)
def test_trusted_proxy_chain_gives_the_right_most_untrusted_address(value: str, client: str) -> None:
    assert ClientAddress(TRUSTED)(scope(PROXY, xff(value))) == client


def test_several_header_lines_are_one_list_in_order() -> None:
    resolve = ClientAddress(TRUSTED)
    # The client sent one line; the proxy added its own line rather than appending.
    assert resolve(scope(PROXY, xff("6.6.6.6"), xff("198.51.100.1"))) == "198.51.100.1"
    assert resolve(scope(PROXY, xff("6.6.6.6"), xff("198.51.100.1, 10.0.0.3"))) == "198.51.100.1"
    assert resolve(scope(PROXY, xff("198.51.100.1"), xff("10.0.0.3"))) == "198.51.100.1"


def test_every_hop_trusted_gives_the_left_most() -> None:
    """The request started inside the trusted networks (uvicorn decides the same)."""
    resolve = ClientAddress(TRUSTED)
    assert resolve(scope(PROXY, xff("10.1.2.3, 10.0.0.2"))) == "10.1.2.3"
    assert resolve(scope(PROXY)) == PROXY  # no header at all: the proxy itself
    assert resolve(scope(PROXY, xff(""))) == PROXY


@pytest.mark.parametrize(
    "value",
    [
        "unknown",
        "_hidden",
        "garbage",
        "1.2.3",
        "1.2.3.4.5",
        "198.51.100.1:port",
        "[2001:db8::1",
        "x" * 10_000,
    ],
)
def test_a_hop_that_is_no_address_falls_back_to_the_proxy_that_reported_it(value: str) -> None:
    resolve = ClientAddress(TRUSTED)
    assert resolve(scope(PROXY, xff(value))) == PROXY
    assert resolve(scope(PROXY, xff(f"{value}, 10.0.0.9"))) == "10.0.0.9"
    # Beyond the client, it is the client's own text and changes nothing.
    assert resolve(scope(PROXY, xff(f"{value}, 198.51.100.1"))) == "198.51.100.1"


def test_a_huge_header_is_read_from_the_right_and_only_so_far() -> None:
    resolve = ClientAddress(TRUSTED)
    padding = ", ".join(f"6.6.{i % 256}.{i // 256 % 256}" for i in range(50_000))
    assert resolve(scope(PROXY, xff(f"{padding}, 198.51.100.1, 10.0.0.2"))) == "198.51.100.1"
    assert resolve(scope(PROXY, xff("a" * 1_000_000 + ", 198.51.100.1"))) == "198.51.100.1"
    # A chain longer than any real one stops at 32 hops: the furthest one looked at.
    chain = ", ".join(f"10.0.{i // 256}.{i % 256}" for i in range(1_000))
    assert resolve(scope(PROXY, xff(f"198.51.100.1, {chain}"))) == "10.0.3.200"


def test_trusted_networks_may_be_written_in_several_ways() -> None:
    for trusted in (["10.0.0.1"], "10.0.0.1", ["::ffff:10.0.0.0/104"], [" 10.0.0.0/255.0.0.0 "]):
        assert ClientAddress(trusted)(scope(PROXY, xff("198.51.100.1"))) == "198.51.100.1"
    # A mapped peer is the same IPv4 proxy.
    assert ClientAddress(["10.0.0.0/8"])(scope("::ffff:10.0.0.1", xff("198.51.100.1"))) == "198.51.100.1"
    assert ClientAddress(["2001:db8:ffff::/48"])(scope("2001:db8:ffff::5", xff("198.51.100.1"))) == (
        "198.51.100.1"
    )


# ---------------------------------------------------------------------------------------------
# Forwarded (RFC 7239)


@pytest.mark.parametrize(
    ("value", "client"),
    [
        ("for=198.51.100.1", "198.51.100.1"),
        ("For=198.51.100.1;Proto=https;by=10.0.0.1", "198.51.100.1"),
        ('for="198.51.100.1:4711"', "198.51.100.1"),
        ('for="[2001:db8:1:2::17]:4711";proto=https', "2001:db8:1:2::/64"),
        ('for="[2001:db8:1:2::17]"', "2001:db8:1:2::/64"),
        ("for=6.6.6.6, for=198.51.100.1", "198.51.100.1"),
        ("for=198.51.100.1, for=10.0.0.2;proto=http", "198.51.100.1"),
        ('for=198.51.100.1;host="a,b;c", for=10.0.0.2', "198.51.100.1"),  # commas inside quotes
        ('for="_gazonk", for=198.51.100.1', "198.51.100.1"),
        ('for="unclosed, for=198.51.100.1', "198.51.100.1"),  # the client's malformed part
        ('for="6.6.6.6\\", for=198.51.100.1', "198.51.100.1"),  # an escaped quote
    ],
)
def test_forwarded_header(value: str, client: str) -> None:
    resolve = ClientAddress(TRUSTED, proxy_header="forwarded")
    assert resolve(scope(PROXY, fwd(value))) == client


@pytest.mark.parametrize(
    "value",
    [
        "for=unknown",
        'for="_hidden"',
        "for=_hidden",
        "proto=https",  # the proxy sent no for=: it can't be skipped, or the next one would be trusted
        "for=1.2.3.4;for=5.6.7.8",  # twice in one element: invalid
        "for=",
        "garbage",
    ],
)
def test_forwarded_without_a_usable_address_falls_back_to_the_proxy(value: str) -> None:
    resolve = ClientAddress(TRUSTED, proxy_header="forwarded")
    assert resolve(scope(PROXY, fwd(f"for=6.6.6.6, {value}"))) == PROXY
    assert resolve(scope(PROXY, fwd(f"for=6.6.6.6, {value}, for=10.0.0.7"))) == "10.0.0.7"


def test_only_the_configured_header_is_read() -> None:
    """The header the proxies don't set passes from the client untouched: it must not count."""
    both = (xff("198.51.100.1"), fwd("for=6.6.6.6"))
    assert ClientAddress(TRUSTED)(scope(PROXY, *both)) == "198.51.100.1"
    assert ClientAddress(TRUSTED)(scope(PROXY, *reversed(both))) == "198.51.100.1"
    assert ClientAddress(TRUSTED)(scope(PROXY, fwd("for=6.6.6.6"))) == PROXY
    by_forwarded = ClientAddress(TRUSTED, proxy_header="Forwarded")
    assert by_forwarded(scope(PROXY, xff("6.6.6.6"), fwd("for=198.51.100.1"))) == "198.51.100.1"
    assert by_forwarded(scope(PROXY, xff("6.6.6.6"))) == PROXY


# ---------------------------------------------------------------------------------------------
# IPv6 grouping, odd peers


def test_ipv6_clients_are_grouped_by_their_64() -> None:
    resolve = ClientAddress()
    assert resolve(scope("2001:db8:1:2::1")) == "2001:db8:1:2::/64"
    assert resolve(scope("2001:db8:1:2:ffff:ffff:ffff:ffff")) == "2001:db8:1:2::/64"
    assert resolve(scope("2001:db8:1:3::1")) == "2001:db8:1:3::/64"
    assert resolve(scope("::ffff:192.0.2.1")) == "192.0.2.1"
    assert resolve(scope("::1")) == "::/64"


@pytest.mark.parametrize(
    ("prefix", "key"),
    [(48, "2001:db8:1::/48"), (56, "2001:db8:1:200::/56"), (128, "2001:db8:1:2ab::1"), (1, "::/1")],
)
def test_ipv6_prefix_is_configurable(prefix: int, key: str) -> None:
    assert ClientAddress(ipv6_prefix=prefix)(scope("2001:db8:1:2ab::1")) == key
    assert ClientAddress(ipv6_prefix=prefix)(scope("192.0.2.1")) == "192.0.2.1"  # IPv4 never grouped


@pytest.mark.parametrize("client", [None, ("", 0), (None, 0), []])
def test_no_client_address_is_unknown(client: Any) -> None:
    s = scope(None)
    s["client"] = client
    assert ClientAddress()(s) == UNKNOWN_CLIENT
    assert ClientAddress(TRUSTED)(s) == UNKNOWN_CLIENT
    assert ClientAddress()({"type": "http"}) == UNKNOWN_CLIENT


def test_a_peer_that_is_no_address_is_kept_as_it_is() -> None:
    """Some servers and test clients name the peer ("testclient"); it is still one stable key."""
    assert ClientAddress()(scope("testclient")) == "testclient"
    assert ClientAddress(TRUSTED)(scope("testclient", xff("198.51.100.1"))) == "testclient"


def test_parse_address() -> None:
    assert str(parse_address(" 192.0.2.1 ")) == "192.0.2.1"
    assert str(parse_address("[::1]:80")) == "::1"
    assert str(parse_address("::ffff:c000:201")) == "192.0.2.1"
    for text in ("", ":80", "[::1]x", "1.2.3.4:", "1.2.3.4:\uff18\uff10", "01.2.3.4", "1" * 200, "[]"):
        assert parse_address(text) is None, text


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"proxy_header": "x-real-ip"}, "proxy_header must be 'x-forwarded-for' or 'forwarded'"),
        ({"proxy_header": None}, "proxy_header must be"),
        ({"ipv6_prefix": 129}, "ipv6_prefix must be an int from 1 to 128"),
        ({"ipv6_prefix": True}, "ipv6_prefix must be an int"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies entry '10.0.0.0/33'"),
    ],
)
def test_bad_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        ClientAddress(**options)


def test_repr_names_the_options() -> None:
    assert repr(ClientAddress(["10.0.0.0/8"], 56)) == (
        "ClientAddress(trusted_proxies=['10.0.0.0/8'], ipv6_prefix=56, proxy_header='x-forwarded-for')"
    )


# ---------------------------------------------------------------------------------------------
# Over HTTP: RateGuard and limit()


def guarded_app(**options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=1, store=MemoryStore(), **options)

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


def route_limited_app(**options: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/", dependencies=[Depends(limit(1, store=MemoryStore(), **options))])
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


APPS = pytest.mark.parametrize("make_app", [guarded_app, route_limited_app], ids=["RateGuard", "limit"])


@APPS
async def test_http_spoofed_forwarded_for_is_ignored_by_default(make_app: Any) -> None:
    app = make_app()
    async with client_for(app, "203.0.113.7") as client:
        first = await client.get("/", headers={"x-forwarded-for": "198.51.100.1"})
        second = await client.get("/", headers={"x-forwarded-for": "198.51.100.2"})
        third = await client.get("/", headers={"forwarded": "for=198.51.100.3"})
    assert [r.status_code for r in (first, second, third)] == [200, 429, 429]


@APPS
async def test_http_spoofed_header_from_an_untrusted_peer_is_ignored(make_app: Any) -> None:
    app = make_app(trusted_proxies=["10.0.0.0/8"])
    async with client_for(app, "203.0.113.7") as client:
        codes = [
            (await client.get("/", headers={"x-forwarded-for": f"198.51.100.{i}"})).status_code
            for i in range(3)
        ]
    assert codes == [200, 429, 429]


@APPS
async def test_http_clients_behind_trusted_proxies(make_app: Any) -> None:
    app = make_app(trusted_proxies=["10.0.0.0/8"])
    async with client_for(app, "10.0.0.1") as proxy_a, client_for(app, "10.0.0.2") as proxy_b:
        one = await proxy_a.get("/", headers={"x-forwarded-for": "198.51.100.1"})
        two = await proxy_a.get("/", headers={"x-forwarded-for": "198.51.100.2"})
        # The same client through another proxy, with a spoofed claim of its own in front.
        again = await proxy_b.get("/", headers={"x-forwarded-for": "6.6.6.6, 198.51.100.1"})
        spoof = await proxy_b.get("/", headers={"x-forwarded-for": "198.51.100.9, 198.51.100.2"})
    assert [r.status_code for r in (one, two, again, spoof)] == [200, 200, 429, 429]


@APPS
async def test_http_ipv6_grouping(make_app: Any) -> None:
    app = make_app()
    async with client_for(app, "2001:db8:1:2::1") as a, client_for(app, "2001:db8:1:2::99") as b:
        assert (await a.get("/")).status_code == 200
        assert (await b.get("/")).status_code == 429  # the same /64
    async with client_for(app, "2001:db8:1:3::1") as c:
        assert (await c.get("/")).status_code == 200

    app = make_app(ipv6_prefix=128)
    async with client_for(app, "2001:db8:1:2::1") as a, client_for(app, "2001:db8:1:2::99") as b:
        assert (await a.get("/")).status_code == 200
        assert (await b.get("/")).status_code == 200


@APPS
async def test_http_no_client_address_gets_one_stable_unknown_key(make_app: Any) -> None:
    app = make_app(trusted_proxies=["10.0.0.0/8"])
    first = await raw_asgi.request(app, client=None)
    second = await raw_asgi.request(app, client=None, headers=[(b"x-forwarded-for", b"198.51.100.1")])
    assert (first.status, second.status) == (200, 429)
