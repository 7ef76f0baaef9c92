"""Who the client is, and how any identifier becomes a safe, bounded store key.

The default identity is the socket peer address (``scope["client"]``). Forwarding headers
(``X-Forwarded-For``, ``Forwarded``) are only read when the operator names the proxies it trusts:
otherwise any client could choose its own identity by sending one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
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

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def encode_identifier(identifier: str) -> str:
    """Map any text to a key part of at most 128 safe characters.

    Injective: short identifiers are percent-encoded (reversible); long ones are replaced by
    ``#`` + SHA-256, which no percent-encoded text starts with.
    """
    if _SAFE.fullmatch(identifier):
        return identifier
    encoded = quote(identifier, safe=_SAFE_CHARS, errors="surrogatepass")
    if len(encoded) <= _MAX_KEY_LEN and encoded:
        return encoded
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
            parsed.append(ipaddress.ip_network(str(net).strip(), strict=False))
        except ValueError:
            raise ConfigurationError(
                f"{option} entry {net!r} is not an IP network; use CIDRs such as '10.0.0.0/8' "
                "or single addresses such as '127.0.0.1'"
            ) from None
    return tuple(parsed)


@lru_cache(maxsize=4096)
def _group_ipv6(host: str, prefix: int) -> str:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if prefix < 128:
            return str(ipaddress.IPv6Network((addr, prefix), strict=False))
    return str(addr)


class ClientAddress:
    """Resolve the client address of an HTTP scope.

    ``trusted_proxies``: networks whose forwarding headers are believed; the client is then the
    right-most address in ``X-Forwarded-For`` (or ``Forwarded: for=``) that is not itself a trusted
    proxy. ``ipv6_prefix``: IPv6 clients are grouped by this prefix (64 by default), since one host
    usually owns a whole /64 and could otherwise take a fresh bucket per address.
    """

    __slots__ = ("ipv6_prefix", "trusted")

    def __init__(self, trusted_proxies: Iterable[str] | None = None, ipv6_prefix: int = 64) -> None:
        if not isinstance(ipv6_prefix, int) or isinstance(ipv6_prefix, bool) or not 1 <= ipv6_prefix <= 128:
            raise ConfigurationError(
                f"ipv6_prefix must be an int from 1 to 128, got {ipv6_prefix!r}; "
                "64 groups a host's whole /64, 128 limits each address on its own"
            )
        self.trusted = parse_networks(trusted_proxies)
        self.ipv6_prefix = ipv6_prefix

    def __call__(self, scope: Any) -> str:
        client = scope.get("client")
        host = client[0] if client else None
        if not host:
            return UNKNOWN_CLIENT
        if self.trusted and self._is_trusted(host):
            host = self._forwarded_client(scope, host)
        if ":" in host:
            return _group_ipv6(host, self.ipv6_prefix)
        return str(host)

    def _is_trusted(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted)

    def _forwarded_client(self, scope: Any, peer: str) -> str:
        hops: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                hops.extend(h.strip() for h in value.decode("latin-1").split(","))
            elif name == b"forwarded":
                hops.extend(_forwarded_for(value.decode("latin-1")))
        # Walk from the nearest hop outwards; the first untrusted address is the client.
        for hop in reversed(hops):
            addr = _clean_address(hop)
            if addr is None:
                return peer  # a garbled hop: don't guess, fall back to the proxy we can see
            if not self._is_trusted(addr):
                return addr
        return _clean_address(hops[0]) or peer if hops else peer


def _forwarded_for(value: str) -> list[str]:
    out = []
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, val = pair.strip().partition("=")
            if key.strip().lower() == "for":
                out.append(val.strip().strip('"'))
    return out


def _clean_address(hop: str) -> str | None:
    hop = hop.strip()
    if hop.startswith("["):  # [2001:db8::1]:443
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:  # 1.2.3.4:5678
        hop = hop.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None
