"""Who the client is, and how any identifier becomes a safe, bounded store key.

The default identity is the socket peer address (``scope["client"]``). A forwarding header
(``X-Forwarded-For``, or ``Forwarded`` if chosen) is only read when the peer is a proxy the
operator trusts: otherwise any client could choose its own identity by sending one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from rateguard.errors import ConfigurationError

UNKNOWN_CLIENT = "unknown"

# Characters that are kept as they are in a key: enough for IPv4, IPv6 and most API keys, and none
# that Redis treats specially (hash tags `{}`, glob patterns `*?[]\`) or that could split a key.
_SAFE = re.compile(r"[A-Za-z0-9.:_\-]{1,128}")
_SAFE_CHARS = ".:_-"
_MAX_KEY_LEN = 128
_HASH_MARK = "#"  # never produced by percent-encoding, so hashed and plain keys can't collide

# Forwarding hops looked at, from the nearest outwards: enough for any real chain of proxies, and
# a bound on the work a long header can cause.
_MAX_HOPS = 32
# Longer than any address with brackets, zone and port: anything longer is not one.
_MAX_ADDRESS_LEN = 100
_PROXY_HEADERS = {"x-forwarded-for": b"x-forwarded-for", "forwarded": b"forwarded"}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED_IPV4 = ipaddress.IPv6Network("::ffff:0:0/96")


def encode_identifier(identifier: str) -> str:
    """Map any text to a key part of at most 128 safe characters.

    Injective: short identifiers are percent-encoded (reversible); long ones are replaced by
    ``#`` + SHA-256, which no percent-encoded text starts with.
    """
    if _SAFE.fullmatch(identifier):
        return identifier
    # Percent-encoding never shortens text, so a long identifier is hashed without encoding it
    # first (quote() is a Python loop per byte: slow on 100 kB).
    if 0 < len(identifier) <= _MAX_KEY_LEN:
        encoded = quote(identifier, safe=_SAFE_CHARS, errors="surrogatepass")
        if len(encoded) <= _MAX_KEY_LEN:
            return encoded
    # "surrogatepass": text decoded with surrogateescape (invalid UTF-8) still hashes injectively.
    digest = hashlib.sha256(identifier.encode("utf-8", "surrogatepass")).hexdigest()
    return _HASH_MARK + digest


def parse_networks(networks: Iterable[str] | None, option: str = "trusted_proxies") -> tuple[IPNetwork, ...]:
    """Parse CIDRs (or single addresses) with an error that names the bad entry."""
    if networks is None:
        return ()
    if isinstance(networks, str):
        networks = [networks]
    parsed: list[IPNetwork] = []
    for net in networks:
        try:
            network = ipaddress.ip_network(str(net).strip(), strict=False)
        except ValueError:
            raise ConfigurationError(
                f"{option} entry {net!r} is not an IP network; use CIDRs such as '10.0.0.0/8' "
                "or single addresses such as '127.0.0.1'"
            ) from None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_IPV4):
            # Addresses are compared with IPv4-mapped ones unmapped, so networks are too.
            mapped = network.network_address.ipv4_mapped
            assert mapped is not None
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        parsed.append(network)
    return tuple(parsed)


def parse_address(text: str) -> IPAddress | None:
    """The IP address in a peer host or a forwarding hop, or None if there is none.

    Accepts ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]:443`` and zone ids
    (``fe80::1%eth0``, dropped). An IPv4-mapped IPv6 address is its IPv4 address. ``unknown``,
    obfuscated identifiers (``_hidden``) and garbage give None.
    """
    if len(text) > _MAX_ADDRESS_LEN:  # before the cache: it must not hold long strings
        return None
    return _parse_address(text)


@lru_cache(maxsize=4096)
def _parse_address(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        port = text[end + 1 :]
        if end < 0 or (port and not _is_port(port)):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not _is_port(":" + port):
            return None
    text = text.partition("%")[0]  # the zone: the same host, whichever interface it came in on
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _is_port(text: str) -> bool:
    return len(text) > 1 and text[0] == ":" and text[1:].isascii() and text[1:].isdigit()


@lru_cache(maxsize=4096)
def _address_key(addr: IPAddress, ipv6_prefix: int) -> str:
    if isinstance(addr, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


@lru_cache(maxsize=4096)
def _peer_key(host: str, ipv6_prefix: int) -> str:
    addr = parse_address(host)
    return host if addr is None else _address_key(addr, ipv6_prefix)


class ClientAddress:
    """Resolve the client address of an HTTP scope to a key: an address, a network or "unknown".

    ``trusted_proxies``: networks of the proxies in front of the app. Only when the peer is one of
    them is ``proxy_header`` read, and the client is then the right-most address in it that is
    not itself a trusted proxy. ``proxy_header``: ``"x-forwarded-for"`` (default) or
    ``"forwarded"`` (RFC 7239): only the one the proxies set, since the other passes from the
    client untouched. ``ipv6_prefix``: IPv6 clients are grouped by this prefix (64 by default),
    since one host usually owns a whole /64 and could otherwise take a fresh bucket per address.

    Called with an ASGI scope (or a Starlette ``Request``, which reads as one).
    """

    __slots__ = ("_header", "ipv6_prefix", "proxy_header", "trusted")

    def __init__(
        self,
        trusted_proxies: Iterable[str] | None = None,
        ipv6_prefix: int = 64,
        proxy_header: str = "x-forwarded-for",
    ) -> None:
        if not isinstance(ipv6_prefix, int) or isinstance(ipv6_prefix, bool) or not 1 <= ipv6_prefix <= 128:
            raise ConfigurationError(
                f"ipv6_prefix must be an int from 1 to 128, got {ipv6_prefix!r}; "
                "64 groups a host's whole /64, 128 limits each address on its own"
            )
        header = _PROXY_HEADERS.get(proxy_header.lower()) if isinstance(proxy_header, str) else None
        if header is None:
            raise ConfigurationError(
                f"proxy_header must be 'x-forwarded-for' or 'forwarded', got {proxy_header!r}; "
                "name the one header your proxies set"
            )
        self.trusted = parse_networks(trusted_proxies)
        self.ipv6_prefix = ipv6_prefix
        self.proxy_header = proxy_header.lower()
        self._header = header

    def __repr__(self) -> str:
        trusted = [str(n) for n in self.trusted]
        return (
            f"ClientAddress(trusted_proxies={trusted!r}, ipv6_prefix={self.ipv6_prefix}, "
            f"proxy_header={self.proxy_header!r})"
        )

    def __call__(self, scope: Mapping[str, Any]) -> str:
        client = scope.get("client")
        host = client[0] if client else None
        if not host:
            return UNKNOWN_CLIENT  # a unix socket, or a server or test client that gives none
        if not isinstance(host, str):
            host = str(host)
        if self.trusted:
            addr = parse_address(host)
            if addr is not None:
                if self._is_trusted(addr):
                    addr = self._forwarded_client(scope, addr)
                return _address_key(addr, self.ipv6_prefix)
        elif ":" in host and len(host) <= _MAX_ADDRESS_LEN:
            return _peer_key(host, self.ipv6_prefix)
        return host  # IPv4 as the server wrote it (the fast path), or a name that is no address

    def _is_trusted(self, addr: IPAddress) -> bool:
        return any(addr in net for net in self.trusted)

    def _forwarded_client(self, scope: Mapping[str, Any], peer: IPAddress) -> IPAddress:
        # Every hop of the header was appended by the proxy to its right, so walking from the
        # nearest hop outwards, each one was written by a trusted proxy until the first address
        # that is not one: that is the client. What lies beyond it, the client wrote.
        name = self._header
        lines = [value for key, value in scope.get("headers", ()) if key == name]
        forwarded = name == b"forwarded"
        nearest = peer
        for hop in _hops_from_right(lines, forwarded):
            addr = parse_address(hop) if hop is not None else None
            if addr is None:
                # "unknown", an obfuscated "_id" or garbage, written by a trusted proxy: the
                # client can't be told apart, and the proxy that reported it is the best we know.
                return nearest
            if not self._is_trusted(addr):
                return addr
            nearest = addr
        # Every hop is a trusted proxy (or there are none): the request started inside; the
        # left-most hop is where (uvicorn's ProxyHeadersMiddleware decides the same).
        return nearest


def _hops_from_right(lines: list[bytes], forwarded: bool) -> Iterator[str | None]:
    """The hops of a forwarding header, nearest first; at most `_MAX_HOPS`.

    Several header lines are one list in order (RFC 9110 5.3). Empty list elements are skipped
    (RFC 9110 5.6.1). A `Forwarded` element yields its ``for=`` value, or None if it has none.
    """
    budget = _MAX_HOPS
    for line in reversed(lines):
        text = line.decode("latin-1")
        elements = _split_from_right(text) if forwarded else reversed(text.rsplit(",", budget))
        for element in elements:
            if not element or element.isspace():
                continue
            yield _forwarded_for(element) if forwarded else element
            budget -= 1
            if not budget:
                return


def _split_from_right(text: str) -> Iterator[str]:
    """Split at commas outside quoted strings, from the right.

    Right to left, so a client's malformed part (an unclosed quote) can't change how the part
    the proxies appended after it is read.
    """
    end = pos = len(text)
    while True:
        comma = text.rfind(",", 0, pos)
        quote_end = text.rfind('"', 0, pos)
        if quote_end > comma:
            quote_start = _opening_quote(text, quote_end)
            if quote_start < 0:
                yield text[:end]  # unbalanced: the rest is one garbled element
                return
            pos = quote_start
            continue
        yield text[comma + 1 : end]
        if comma < 0:
            return
        end = pos = comma


def _opening_quote(text: str, close: int) -> int:
    """Where the quoted string that ends at ``close`` starts, or -1."""
    pos = close
    while True:
        pos = text.rfind('"', 0, pos)
        if pos < 0:
            return -1
        backslashes = 0
        while pos - backslashes > 0 and text[pos - backslashes - 1] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            return pos


_PAIR = re.compile(r'\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_ESCAPE = re.compile(r"\\(.)")


def _forwarded_for(element: str) -> str | None:
    """The ``for=`` value of one `Forwarded` element, unquoted; None if it has none or two."""
    if len(element) > 4 * _MAX_ADDRESS_LEN:
        return None
    found = None
    for match in _PAIR.finditer(element):
        if match.group(1).lower() == "for":
            if found is not None:
                return None
            value = match.group(2).strip()
            if value.startswith('"'):
                value = _ESCAPE.sub(r"\1", value[1:-1])
            found = value
    return found
