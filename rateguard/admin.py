"""The admin API: stats, one client's buckets, and reset, as an ASGI app to mount.

    app.mount("/api/admin", admin_router())

    GET  /                         the dashboard: one static page that polls the endpoints below
    GET  /stats                    decisions allowed/limited (this server, and every server on Redis),
                                   buckets, store health, rules in force
    GET  /live                     cheap counters for polling: decisions per rule, circuit state,
                                   store errors and latency, the clients limited most (no store I/O)
    GET  /bucket/{identifier}      every bucket of one client, stored or (if it has none) full
    POST /reset/{identifier}       clear every bucket of one client, on every server sharing the store

What it reports is read from the app it is mounted in: the `RateGuard` middleware and every
`limit()` dependency of its routes, with their stores. Access: with a token (``token=`` or the
``RATEGUARD_ADMIN_TOKEN`` environment variable) every call needs ``Authorization: Bearer <token>``;
without one, only loopback peers (``scope["client"]``) that carry no forwarding headers may call.
With a token, the dashboard page itself is served to anyone: a browser can't send the header when
it navigates, so the page holds no data and asks for the token, which its script then sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import time
from functools import cache
from importlib.resources import files
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from rateguard.bucket import BucketState
from rateguard.errors import ConfigurationError, StoreError
from rateguard.identity import UNKNOWN_CLIENT, ClientAddress, encode_identifier, parse_address
from rateguard.registry import AppLimits, RuleInForce
from rateguard.stores import Store, StoreStats
from rateguard.topk import Limited, LimitedClients

TOKEN_ENV = "RATEGUARD_ADMIN_TOKEN"
_SHORT_TOKEN = 16
_FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")
_KINDS = ("any", "address", "identifier")
_TOP_CLIENTS = 10

logger = logging.getLogger("rateguard.admin")


def admin_router(
    store: Store | None = None, *, token: str | None = None, limited: LimitedClients | None = None
) -> AdminAPI:
    """The admin API as an ASGI app: ``app.mount("/api/admin", admin_router())``.

    :param store: a store to report on and reset besides those found in the app (the stores of its
        `RateGuard` and ``limit()`` dependencies); needed only when the limits live elsewhere.
    :param token: the bearer token every call must carry; by default ``RATEGUARD_ADMIN_TOKEN``,
        read now. Without a token only loopback clients are served.
    :param limited: where the clients limited most are read from; by default the app's own, which
        its `RateGuard` and ``limit()``s feed (``app.state.rateguard.limited``).
    """
    return AdminAPI(store=store, token=token, limited=limited)


class AdminAPI:
    """Stats, inspect and reset for an app's rate limits, behind a bearer token or loopback."""

    def __init__(
        self,
        *,
        store: Store | None = None,
        token: str | None = None,
        limited: LimitedClients | None = None,
    ) -> None:
        if store is not None and not isinstance(store, Store):
            raise ConfigurationError(
                f"store must be a rateguard store such as MemoryStore() or RedisStore(...), "
                f"got {type(store).__name__}"
            )
        self.store = store
        self.limited = limited
        self._digest = _token_digest(token)
        self.router = Router(
            routes=[
                Route("/live", self.live, methods=["GET"]),
                Route("/stats", self.stats, methods=["GET"]),
                Route("/bucket/{identifier:path}", self.bucket, methods=["GET"]),
                Route("/reset/{identifier:path}", self.reset, methods=["POST"]),
            ]
        )

    @property
    def token_required(self) -> bool:
        return self._digest is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Every path, known or not, is checked before routing: nothing is told to a stranger.
            # The one exception: with a token, the dashboard page (no data in it) is served to
            # anyone, since a browser can't send the token when it navigates to a page. It is
            # answered here, not routed, so nothing else can be reached by that exception.
            page = _is_dashboard(scope)
            refusal = None if page and self._digest is not None else self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            if page:
                await self.dashboard()(scope, receive, send)
                return
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.router(scope, receive, send)

    # -- access -----------------------------------------------------------------------------

    def _refusal(self, scope: Scope) -> Response | None:
        if self._digest is not None:
            given = _bearer_token(scope)
            if given is not None and hmac.compare_digest(hashlib.sha256(given).digest(), self._digest):
                return None
            challenge = 'Bearer realm="rateguard-admin"'
            if given is not None:
                challenge += ', error="invalid_token"'
            return _error(
                401,
                "Unauthorized",
                "the admin API needs the header 'Authorization: Bearer <RATEGUARD_ADMIN_TOKEN>'",
                {"WWW-Authenticate": challenge},
            )
        client = scope.get("client")
        if not client or not _is_loopback(str(client[0])):
            return _error(
                403,
                "Forbidden",
                "without RATEGUARD_ADMIN_TOKEN the admin API only answers clients on this machine "
                "(loopback); set the token to call it from elsewhere",
            )
        if any(name in _FORWARDING_HEADERS for name, _ in scope.get("headers", ())):
            # A loopback peer forwarding someone else's request is a proxy on this host: the real
            # client is not local, and a header is no proof of who it is.
            return _error(
                403,
                "Forbidden",
                "the request came through a proxy; without RATEGUARD_ADMIN_TOKEN the admin API only "
                "answers direct loopback clients",
            )
        return None

    # -- endpoints --------------------------------------------------------------------------

    def dashboard(self) -> Response:
        """The page: static HTML with its own script and style, no data in it."""
        page, headers = _dashboard()
        return HTMLResponse(page, headers=headers)

    async def live(self, request: Request) -> Response:
        """What the dashboard polls every second: counters read from memory, never from a store."""
        app = request.scope.get("app")
        rules = discover_rules(app)
        totals = [0, 0, 0, 0]
        rule_rows = []
        for r in rules:
            for i in range(4):
                totals[i] += r.counts[i]
            allowed, limited, degraded, shadow = r.counts
            rule_rows.append(
                {
                    **r.as_json(),
                    "allowed": allowed,
                    "limited": limited,
                    "degraded": degraded,
                    "shadow_limited": shadow,
                }
            )
        tracker = self._limited(request)
        body = {
            "t": time.monotonic(),  # server seconds: rates are differences over this clock
            "decisions": {
                "allowed": totals[0],
                "limited": totals[1],
                "degraded": totals[2],
                "shadow_limited": totals[3],
            },
            "rules": rule_rows,
            "stores": [store_health(label, store) for label, store in labelled_stores(self._stores(rules))],
            "limited_clients": {
                "window": tracker.window,
                "clients": [_limited_json(c) for c in tracker.top(_TOP_CLIENTS)],
            },
            "server": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        return JSONResponse(body)

    async def stats(self, request: Request) -> Response:
        rules = discover_rules(request.scope.get("app"))
        stores = self._stores(rules)
        per_store: list[dict[str, Any]] = []
        totals = {"allowed": 0, "limited": 0, "allowed_total": 0, "limited_total": 0, "buckets": 0}
        for store in stores:
            st = await _stats(store)
            for name in totals:
                totals[name] += getattr(st, name)
            per_store.append(
                {
                    "kind": st.kind,
                    "shared": st.kind != "memory",
                    "healthy": st.healthy,
                    "latency_ms": st.latency_ms,
                    "degraded": st.degraded,
                    "detail": st.detail,
                    "allowed": st.allowed_total,
                    "limited": st.limited_total,
                    "buckets": st.buckets,
                }
            )
        body = {
            # Counted per decision: a request that passes the global limit and a route's limit
            # makes two. On a shared store the totals hold each server's counts as of its last flush.
            "decisions": {
                "allowed": totals["allowed_total"],
                "limited": totals["limited_total"],
                "this_server": {"allowed": totals["allowed"], "limited": totals["limited"]},
            },
            "buckets": totals["buckets"],
            "store": per_store[0] if per_store else None,
            "stores": per_store,
            "rules": [r.as_json() for r in rules],
            "server": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        return JSONResponse(body)

    async def bucket(self, request: Request) -> Response:
        target = _target(request)
        if isinstance(target, Response):
            return target
        identifier, kind, rules, keys = target
        stores = self._stores(rules)
        try:
            found = [
                (store, key, state) for store in stores for key in keys for state in await store.inspect(key)
            ]
        except StoreError as exc:
            return _error(503, "Service Unavailable", str(exc))

        buckets: list[dict[str, Any]] = []
        shown: set[int] = set()
        for r in rules:
            mine = [
                (i, key, state)
                for i, (store, key, state) in enumerate(found)
                if store is r.store and state.bucket == r.bucket
            ]
            for i, key, state in mine:
                shown.add(i)
                buckets.append(_bucket_json(key, state, r, stored=True))
            if not mine and r.rule is not None:  # (a rate callable's rule depends on the request)
                # No stored bucket means a full one: that is how a token bucket starts.
                key = _natural_key(keys, r)
                full = BucketState(r.bucket, float(r.rule.burst), r.rule.burst, r.rule.rate)
                buckets.append(_bucket_json(key, full, r, stored=False))
        for i, (_, key, state) in enumerate(found):
            if i not in shown:  # a bucket no current rule names (e.g. a route since removed)
                buckets.append(_bucket_json(key, state, None, stored=True))
        return JSONResponse({"identifier": identifier, "kind": kind, "keys": keys, "buckets": buckets})

    async def reset(self, request: Request) -> Response:
        target = _target(request)
        if isinstance(target, Response):
            return target
        identifier, kind, rules, keys = target
        cleared: list[dict[str, str]] = []
        try:
            for store in self._stores(rules):
                for key in keys:
                    for name in await store.reset(key):
                        cleared.append({"key": key, "bucket": name, "store": store.kind})
        except StoreError as exc:
            return _error(503, "Service Unavailable", str(exc))
        peer = request.scope.get("client")
        # An identifier may be an API key: the log shows addresses whole, anything else masked.
        plain = kind != "identifier" and _is_address(identifier)
        logger.info(
            "admin reset of %r (keys %s) from %s cleared %d bucket(s)",
            identifier if plain else mask(identifier),
            ", ".join(keys if plain else [_masked_key(key) for key in keys]),
            peer[0] if peer else "unknown",
            len(cleared),
        )
        return JSONResponse({"identifier": identifier, "kind": kind, "keys": keys, "cleared": cleared})

    def _limited(self, request: Request) -> LimitedClients:
        if self.limited is not None:
            return self.limited
        registry = AppLimits.of(request.scope)
        return registry.limited if registry is not None else LimitedClients()

    def _stores(self, rules: list[RuleInForce]) -> list[Store]:
        stores: list[Store] = [] if self.store is None else [self.store]
        for r in rules:
            if not any(s is r.store for s in stores):
                stores.append(r.store)
        return stores


# ---------------------------------------------------------------------------------------------
# Which limits an app has


def _target(request: Request) -> tuple[str, str, list[RuleInForce], list[str]] | Response:
    """The client a bucket/reset call names: identifier, kind, the app's rules, its store keys."""
    identifier: str = request.path_params["identifier"]
    kind = request.query_params.get("kind", "any")
    if kind not in _KINDS:
        return _error(400, "Bad Request", f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    rules = discover_rules(request.scope.get("app"))
    return identifier, kind, rules, client_keys(identifier, kind, rules)


def _registry(app: Any) -> AppLimits | None:
    state = getattr(app, "state", None)
    registry = getattr(state, "rateguard", None) if state is not None else None
    return registry if isinstance(registry, AppLimits) else None


def discover_rules(app: Any) -> list[RuleInForce]:
    """The buckets an app's limits use, with their rules and stores, from its registry.

    `RateGuard` registers its rule at start-up and every limit its buckets when first used, so
    a route's limit is listed once the route has served a request.
    """
    registry = _registry(app)
    return list(registry.rules.values()) if registry is not None else []


def decision_counts(app: Any) -> dict[str, tuple[int, ...]]:
    """Decisions ``(allowed, limited, degraded, shadow_limited)`` per bucket name in this process."""
    registry = _registry(app)
    return registry.counts() if registry is not None else {}


def labelled_stores(stores: list[Store]) -> list[tuple[str, Store]]:
    """A short, stable label per store: its kind, numbered when an app has two of one kind."""
    seen: dict[str, int] = {}
    out: list[tuple[str, Store]] = []
    for store in stores:
        n = seen[store.kind] = seen.get(store.kind, 0) + 1
        out.append((store.kind if n == 1 else f"{store.kind}_{n}", store))
    return out


def store_health(label: str, store: Store) -> dict[str, Any]:
    """A store's counters and circuit state from its attributes: no I/O, cheap to poll."""
    latency = getattr(store, "latency", None)
    bounds = getattr(latency, "BOUNDS", None)
    return {
        "store": label,
        "kind": store.kind,
        "shared": store.kind != "memory",
        "allowed": getattr(store, "allowed", None),
        "limited": getattr(store, "limited", None),
        "circuit_open": bool(getattr(store, "degraded", False)),
        "errors": getattr(store, "errors", None),
        "degraded_decisions": getattr(store, "degraded_decisions", None),
        "deny_cache_hits": getattr(store, "deny_cache_hits", None),
        "last_error": getattr(store, "last_error", None),
        "latency": None
        if latency is None or bounds is None
        else {
            # Upper bounds in seconds (the last, +Inf, is null in JSON) and counts per bound.
            "bounds": [b if b != float("inf") else None for b in bounds],
            "counts": list(latency.counts),
            "sum": latency.sum,
        },
    }


# ---------------------------------------------------------------------------------------------
# From a path identifier to store keys


def client_keys(identifier: str, kind: str, rules: list[RuleInForce]) -> list[str]:
    """The store keys an identifier from a URL stands for; the text is never a pattern.

    ``address``: the key the client's IP gets, IPv6 grouped by each rule's ``ipv6_prefix`` (an
    address inside a /64 finds the /64's bucket). ``identifier``: the key of an ``identifier=``
    callable's value (``"id:" + encode_identifier(value)``). ``any``: both.
    """
    keys: list[str] = []
    if kind in ("any", "address"):
        host = identifier
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        prefixes = sorted({r.owner.client_address.ipv6_prefix for r in rules} or {64})
        for prefix in prefixes:
            key = encode_identifier(ClientAddress(ipv6_prefix=prefix)({"client": (host, 0)}))
            if key not in keys:
                keys.append(key)
    if kind in ("any", "identifier"):
        key = "id:" + encode_identifier(identifier)
        if key not in keys:
            keys.append(key)
    return keys


def _natural_key(keys: list[str], rule: RuleInForce) -> str:
    if rule.owner.identifier is not None:
        for key in keys:
            if key.startswith("id:"):
                return key
    return keys[0]


def client_label(key: str) -> tuple[str, str | None]:
    """How a store key's client is shown, and the text that finds it again (None if masked).

    Addresses (``203.0.113.7``, ``2001:db8::/64``) are shown whole. Identities from an
    ``identifier=`` callable are often API keys: they are masked, and so can't be searched.
    """
    if key.startswith("id:"):
        return "id:" + mask(unquote(key[3:])), None
    address = unquote(key)
    return address, address


def mask(text: str) -> str:
    """A form of a possibly secret identifier that can be recognised but not used: ``abcd… (32)``."""
    keep = min(4, len(text) // 4)
    return f"{text[:keep]}… ({len(text)})"


def _masked_key(key: str) -> str:
    return "id:" + mask(unquote(key[3:])) if key.startswith("id:") else mask(unquote(key))


def _is_address(text: str) -> bool:
    if text == UNKNOWN_CLIENT or parse_address(text) is not None:
        return True
    try:
        ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        return False
    return True


def _limited_json(entry: Limited) -> dict[str, Any]:
    shown, search = client_label(entry.client)
    return {
        "client": shown,
        "search": search,
        "count": entry.count,
        "error": entry.error,
        "bucket": entry.bucket,
        "seconds_ago": round(entry.seconds_ago, 1),
    }


@cache
def _dashboard() -> tuple[str, dict[str, str]]:
    """The page, and headers that let only its own inline style and script run."""
    page = files("rateguard").joinpath("dashboard.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'" for text in found
        )

    policy = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return page, headers


def _route_path(scope: Scope) -> str:
    """The path inside the mount (Starlette keeps the full path and adds the mount to root_path)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def _is_dashboard(scope: Scope) -> bool:
    return scope.get("method") in ("GET", "HEAD") and _route_path(scope) in ("", "/")


# ---------------------------------------------------------------------------------------------
# Helpers


def _bucket_json(key: str, state: BucketState, rule: RuleInForce | None, *, stored: bool) -> dict[str, Any]:
    return {
        "bucket": state.bucket,
        "key": key,
        "stored": stored,
        "tokens": round(state.tokens, 3),
        "capacity": state.capacity,
        "rate": state.rate,
        "requests_per_minute": round(state.requests_per_minute, 6),
        "retry_after": round(state.retry_after, 3),
        "reset_after": round(state.reset_after, 3),
        "applies_to": ", ".join(rule.applies_to) if rule is not None else None,  # None: no rule names it
    }


async def _stats(store: Store) -> StoreStats:
    try:
        return await store.stats()
    except Exception as exc:  # a broken store is reported, not turned into a 500
        return StoreStats(store.kind, 0, 0, 0, 0, 0, False, None, False, f"{type(exc).__name__}: {exc}")


def _error(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": error, "message": message}, status_code=status, headers=headers)


def _token_digest(token: str | None) -> bytes | None:
    source = "token"
    if token is None:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
        source = TOKEN_ENV
        if token is None:
            return None
    if not isinstance(token, str) or not token:
        raise ConfigurationError(
            f"token must be a non-empty string, got {token!r}; leave it out to read {TOKEN_ENV}, "
            "or generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if any(not "\x21" <= c <= "\x7e" for c in token):
        raise ConfigurationError(
            f"{source} must be printable ASCII with no spaces (it travels in an HTTP header); "
            "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if len(token) < _SHORT_TOKEN:
        logger.warning(
            "%s is only %d characters long; use at least %d random ones, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            source,
            len(token),
            _SHORT_TOKEN,
        )
    return hashlib.sha256(token.encode("ascii")).digest()


def _bearer_token(scope: Scope) -> bytes | None:
    values = [value for name, value in scope.get("headers", ()) if name == b"authorization"]
    if len(values) != 1:
        return None  # none, or several: ambiguous, refuse
    scheme, _, credentials = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    credentials = credentials.strip()
    return credentials or None


def _is_loopback(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.split("%", 1)[0]  # an IPv6 zone
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name, a unix socket path, "testclient": not provably local
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


__all__ = [
    "TOKEN_ENV",
    "AdminAPI",
    "RuleInForce",
    "admin_router",
    "client_keys",
    "client_label",
    "decision_counts",
    "discover_rules",
    "labelled_stores",
    "mask",
    "store_health",
]
