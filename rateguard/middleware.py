"""RateGuard: a pure ASGI middleware that limits every HTTP request of an app.

It also owns the edges of the app's life: at ``lifespan.startup`` it checks its store and the
deployment (one warning each), at ``lifespan.shutdown`` it closes the stores the app's limits
use. On websocket routes it does not limit, but it answers the handshake a `limit()` refused with
HTTP 429 (or, where the server can't, accept-and-close 1008).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, Unpack, cast

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rateguard.checks import is_preflight, rewritten_by_server, warn_once, worker_processes
from rateguard.errors import ConfigurationError, StoreError
from rateguard.headers import (
    UNAVAILABLE_MESSAGE,
    Applied,
    error_body,
    render,
    render_all,
    retry_after_seconds,
    unavailable_seconds,
)
from rateguard.identity import encode_identifier
from rateguard.limiter import SCOPE_KEY, Planner, RequestLimits, ShadowLog, decide
from rateguard.policy import OPTION_NAMES, CommonOptions, LimitOptions, Policy, check_option_names
from rateguard.registry import ALLOWED, DEGRADED, LIMITED, AppLimits
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore

logger = logging.getLogger("rateguard")

# Peer addresses whose keys are remembered; past this many the memory starts over.
_KEY_CACHE_SIZE = 4096
# Requests on which the server's own X-Forwarded-For rewriting is looked for (then never again).
_PROXY_CHECKS = 256
_LIFESPAN_KEY = "rateguard.lifespan"  # set by the outermost RateGuard's lifespan

StoreCheck = Literal["warn", "fail", "off"]
_STORE_CHECKS = ("warn", "fail", "off")
_RATE_LIMIT_FIELDS = frozenset(
    (
        b"ratelimit",
        b"ratelimit-policy",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
        b"retry-after",
    )
)


class GuardOptions(CommonOptions, total=False):
    store_check: StoreCheck


_UNSET: Any = object()


class RateGuard:
    """Limit every HTTP request of an app: ``app.add_middleware(RateGuard, requests_per_minute=100)``.

    :param requests_per_minute: refill rate in tokens per minute (a float > 0; 0.5 = one per 2 min).
        Or ``rate="100/minute; 10000/day"`` (several rules, all must pass), or ``rate=callable``
        (per request: plans per client). See the README for every option; they are the same as
        `limit()`'s, plus ``store_check``.
    :param store_check: at start-up, ``"warn"`` (default: one warning if the store can't be
        reached, the app still starts), ``"fail"`` (start-up fails with the reason, so the server
        exits) or ``"off"``.

    Pure ASGI rather than ``BaseHTTPMiddleware``: streaming, background tasks and context
    variables pass through untouched, and it costs a fraction of the per-request overhead.
    """

    def __init__(
        self, app: ASGIApp, requests_per_minute: Any = _UNSET, **options: Unpack[GuardOptions]
    ) -> None:
        self.app = app
        store_check = options.pop("store_check", "warn")
        if store_check not in _STORE_CHECKS:
            raise ConfigurationError(
                f"store_check must be 'warn' (log if the store can't be reached at start-up), 'fail' "
                f"(fail the start-up) or 'off', got {store_check!r}"
            )
        check_option_names("RateGuard", options, OPTION_NAMES | {"store_check"})
        positional: tuple[Any, ...] = ()
        settings: dict[str, Any] = dict(options)
        if isinstance(requests_per_minute, str | list | tuple):
            positional = (requests_per_minute,)  # RateGuard(app, "100/minute; 10000/day")
        elif requests_per_minute is not _UNSET:
            settings["requests_per_minute"] = requests_per_minute
        self.policy = policy = Policy("RateGuard", positional, cast(LimitOptions, settings))
        self.store_check: StoreCheck = store_check
        self.store: Store = policy.store if policy.store is not None else MemoryStore()
        self.name = policy.name or "global"
        self._explicit = policy.name is not None
        self._fields = policy.headers
        self._render: Callable[[list[Applied]], list[tuple[bytes, bytes]]] | None = (
            render_all
            if self._fields is True
            else None
            if self._fields is False
            else partial(render, fields=self._fields)
        )
        self._planner = Planner()
        self._shadow = ShadowLog()
        self._app: Any = _UNSET  # the Starlette app of the last request (None: no app), and its registry
        self._registry: AppLimits | None = None
        self._plain: bool | None = None  # decided on the first request: the mode is known then
        self._single: Any = None  # the common path's (bucket, rule), header, counts, buckets, registry
        self._cost = policy.cost if isinstance(policy.cost, int) else 1
        # MemoryStore decides without awaiting; calling it directly saves a coroutine per request.
        self._take_now = self.store.take_now if type(self.store) is MemoryStore else None
        # Peer address -> key. Only when no proxy is trusted: the key then depends on the peer
        # address alone, and encoding it (a regex, perhaps IPv6 grouping) is most of its cost.
        self._keys: dict[str, str] | None = None if policy.client_address.trusted else {}
        self._proxy_checks = _PROXY_CHECKS if not policy.client_address.trusted else 0
        self._default_handlers: tuple[Any, bool] | None = None

    def __repr__(self) -> str:
        return f"RateGuard({self.policy.describe()!r}, name={self.name!r}, store={self.store!r})"

    def _registry_of(self, scope: Scope, outermost: bool = True) -> AppLimits | None:
        app = scope.get("app")
        if app is not self._app:
            self._app = app
            registry = self._registry = AppLimits.of(scope)
            if registry is not None:
                self._register(app, registry, outermost)
        return self._registry

    def _register(self, app: Any, registry: AppLimits, outermost: bool) -> None:
        """Put this RateGuard's rule, and (outermost) the app's declared limits, in the registry."""
        registry.use_store(self.store)
        if self.policy.rules and (outermost or self._explicit):  # an inner one's name is per request
            self._planner.plan(
                self.policy, self.store, registry, self.name, self.policy.rules, "every request"
            )
        if outermost and hasattr(app, "routes"):
            from rateguard.dependencies import register_declared  # FastAPI's part, loaded if used

            register_declared(app, registry, self.store)

    # -- HTTP -------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "websocket":
                await self._websocket(scope, receive, send)
            elif kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        limits: RequestLimits | None = scope.get(SCOPE_KEY)
        outermost = limits is None
        if limits is None:
            app = scope.get("app")
            registry = self._registry if app is self._app else self._registry_of(scope)
            limits = scope[SCOPE_KEY] = RequestLimits(
                self.store, registry, self._fields, True, self.name, scope.get("root_path", "")
            )
            base = self.name
        else:
            base = self._inner_name(scope, limits)
        if self._proxy_checks:
            self._check_request(scope)
        if scope["method"] == "OPTIONS" and is_preflight(scope):
            send = self._watch_preflight(send)

        try:
            single = self._single
            if single is not None and outermost and single[4] is limits.registry:
                # The common case, written out: one fixed rule, the first limit of the request. No
                # Request object without user callables, no coroutine but the store's (none for
                # MemoryStore) and those of async callables.
                (bucket, rule), header, counts, buckets, _ = single
                policy = self.policy
                cost = self._cost
                if not policy.needs_connection:
                    try:
                        client = self._keys[scope["client"][0]]  # type: ignore[index]
                    except (KeyError, TypeError, IndexError):  # not seen yet, or no peer, or no cache
                        client = self._client_key(scope)
                else:  # identifier=, skip= or cost=: called with a Request, awaited only if async
                    conn = Request(scope, receive)
                    if policy.skip is not None and await policy.should_skip(conn):
                        await self.app(scope, receive, send)
                        return
                    found = (
                        policy.client_id_now(scope, conn)
                        if policy.sync_identity
                        else policy.client_id(scope, conn)
                    )
                    client = found if type(found) is str else await found  # type: ignore[misc]
                    if not policy.fixed_cost:
                        cost = await policy.cost_of(conn, policy.rules)
                take_now = self._take_now
                if take_now is not None:
                    decision = take_now(client, bucket, rule, cost)
                else:
                    decision = await self.store.take(client, bucket, rule, cost)
                limits.applied.append((header, decision))
                if decision.degraded:
                    counts[DEGRADED] += 1
                elif decision.allowed:
                    counts[ALLOWED] += 1
                    limits.taken.append((self.store, client, buckets, cost))
                else:
                    counts[LIMITED] += 1
                    if limits.registry is not None:
                        limits.registry.limited.add(client, bucket)  # the rare path: the dashboard's top-k
                if not decision.allowed:
                    await self._reject(limits, True, send)
                    return
            else:
                connection = Request(scope, receive) if self.policy.needs_connection else None
                verdict = await decide(
                    self.policy,
                    self._planner,
                    self._shadow,
                    self.store,
                    base,
                    "every request",
                    scope,
                    connection,
                    limits,
                )
                if outermost:
                    self._settle(limits)  # later requests of this app take the common path, if they can
                if verdict is not None and not verdict.allowed:
                    await self._reject(limits, outermost, send)
                    return
        except StoreError as exc:
            # The store is down and its policy refuses (RedisStore(on_error="deny")), or a custom
            # store failed: answer 503, never a 500.
            await self._unavailable(exc, send)
            return

        if not outermost:  # the outermost RateGuard renders the headers
            await self.app(scope, receive, send)
            return

        replacing = False

        # What it needs is read from `self` and `limits` when the response starts, not captured
        # here: every name captured is a cell made on every request.
        async def send_with_headers(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start":
                if limits.refusal is not None:  # a limit() refused: the rare path
                    replacing = await self._refused_start(scope, message, limits, send)
                    if replacing:
                        return
                render_fields = self._render
                if render_fields is not None and limits.applied:
                    message["headers"] = [*message.get("headers", ()), *render_fields(limits.applied)]
            elif replacing:
                return  # the body of the response replaced
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _settle(self, limits: RequestLimits) -> None:
        """After a request on the general path: prepare the common path if it applies (one rule,
        no user callables, enforce mode; the mode is known once a request has been decided)."""
        policy = self.policy
        if self._plain is None:
            self._plain = policy.rate_fn is None and policy.mode == "enforce" and len(policy.rules) == 1
        if self._plain:
            plan = self._planner.plan(
                policy, self.store, limits.registry, self.name, policy.rules, "every request"
            )
            self._single = (plan.single, plan.headers[0], plan.counts[0], plan.buckets, limits.registry)

    async def _refused_start(self, scope: Scope, message: Message, limits: RequestLimits, send: Send) -> bool:
        """A limit() refused: send RateGuard's own 429 if the app would answer FastAPI's default
        (True: the app's response is dropped), else send its fields once, not twice."""
        if message["status"] == 429 and self._renders_refusals(scope):
            await self._reject(limits, True, send, limits.message)
            return True
        # Its exception carried the fields too: they are sent once, from here.
        message["headers"] = [h for h in message.get("headers", ()) if h[0].lower() not in _RATE_LIMIT_FIELDS]
        if self._fields is False:
            message["headers"] += render(limits.applied, False)
        return False

    def _renders_refusals(self, scope: Scope) -> bool:
        """Whether a limit()'s 429 would get FastAPI's default body: the app has no handler of its own.

        Then RateGuard sends its own 429 instead, so every refusal looks the same. An app's own
        handler for RateLimitExceeded, HTTPException or 429 is always left to answer.
        """
        app = scope.get("app")
        known = self._default_handlers
        if known is not None and known[0] is app:
            return known[1]
        handlers = getattr(app, "exception_handlers", None)
        plain = isinstance(handlers, dict) and _only_default_handlers(handlers)
        self._default_handlers = (app, plain)
        return plain

    def _inner_name(self, scope: Scope, limits: RequestLimits) -> str:
        """This RateGuard's name behind another limit: ``global /v2`` inside a mount at /v2."""
        base = self.name
        if not self._explicit:
            root = scope.get("root_path", "")
            if root != limits.root_path and root.startswith(limits.root_path):
                base = f"{base} {root[len(limits.root_path) :]}"
        return limits.claim(base, self._explicit)

    def _client_key(self, scope: Scope) -> str:
        """The store key of the client: its address, encoded; remembered per peer address."""
        keys = self._keys
        if keys is not None:
            peer = scope.get("client")
            host = peer[0] if peer else None
            if type(host) is str:
                key = keys.get(host)
                if key is None:
                    key = encode_identifier(self.policy.client_address(scope))
                    if len(keys) >= _KEY_CACHE_SIZE:
                        keys.clear()  # a flood of fresh addresses: start over rather than grow
                    keys[host] = key
                return key
        return encode_identifier(self.policy.client_address(scope))

    def _check_request(self, scope: Scope) -> None:
        self._proxy_checks -= 1
        if rewritten_by_server(scope):
            self._proxy_checks = 0
            warn_once(
                self.policy.validate,
                "proxy-headers",
                "the server set this request's client address from X-Forwarded-For (uvicorn does for "
                "peers in --forwarded-allow-ips, 127.0.0.1 by default; gunicorn likewise), so whoever can "
                "reach the server from a trusted address chooses the identity the limit counts; if a proxy "
                "on this host sets X-Forwarded-For, that is right; otherwise run uvicorn with "
                "--no-proxy-headers, and to read the header yourself give RateGuard trusted_proxies=[...] "
                "(your proxies' addresses), which reads it only from those peers",
            )

    def _watch_preflight(self, send: Send) -> Send:
        """A CORS preflight reached RateGuard: if CORSMiddleware answers it inside, the order is wrong."""

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start" and any(
                name.lower() == b"access-control-allow-origin" for name, _ in message.get("headers", ())
            ):
                warn_once(
                    self.policy.validate,
                    "cors-order",
                    "RateGuard runs before CORSMiddleware (it was added after it), so CORS preflights spend "
                    "tokens and a 429 has no Access-Control-Allow-Origin: browsers can't read its "
                    "Retry-After; add RateGuard first, then CORSMiddleware (the last added runs first)",
                )
            await send(message)

        return watching_send

    async def _unavailable(self, exc: StoreError, send: Send) -> None:
        retry_after = unavailable_seconds(exc)
        body = error_body(UNAVAILABLE_MESSAGE, retry_after, "Service Unavailable")
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"retry-after", b"%d" % retry_after),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _reject(
        self, limits: RequestLimits, outermost: bool, send: Send, message: str | None = None
    ) -> None:
        applied = limits.applied
        body = error_body(self.policy.message if message is None else message, retry_after_seconds(applied))
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        # The outermost RateGuard adds the headers: its send wrapper or, here, its own. One that
        # sends none has no wrapper, so then the 429 carries its Retry-After from here.
        if outermost or limits.fields is False:
            headers += render(applied, limits.fields)
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- websockets --------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Not limited here; a handshake a `limit()` refused is answered with 429."""
        if SCOPE_KEY in scope:
            await self.app(scope, receive, send)
            return
        limits = scope[SCOPE_KEY] = RequestLimits(self.store, self._registry_of(scope), self._fields, True)
        limits.root_path = scope.get("root_path", "")
        accepted = False

        async def guarded_send(message: Message) -> None:
            nonlocal accepted
            kind = message["type"]
            if kind == "websocket.accept":
                accepted = True
            elif kind == "websocket.close" and not accepted and limits.refusal is not None:
                await deny_websocket(scope, send, limits, self.policy.message)
                return
            await send(message)

        await self.app(scope, receive, guarded_send)

    # -- lifespan ----------------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        outermost = _LIFESPAN_KEY not in scope
        scope[_LIFESPAN_KEY] = True
        self._app = _UNSET  # a new lifespan: register afresh (the app may have new routes)
        registry = self._registry_of(scope, outermost)

        failure: str | None = None

        async def lifespan_receive() -> Message:
            if failure is not None:  # start-up failed: the app shuts down before the server hears it
                return {"type": "lifespan.shutdown"}
            return await receive()

        async def lifespan_send(message: Message) -> None:
            nonlocal failure
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                failure = await self._startup_checks()
                if failure is not None:
                    return
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await close_stores(registry.stores if registry is not None else [self.store])
                if failure is not None:
                    message = {"type": "lifespan.startup.failed", "message": failure}
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)
        if failure is not None:
            # The server has heard start-up failed (uvicorn exits quietly then); a test client
            # waits for the app to end, and this is what it re-raises.
            raise StoreError(failure)

    async def _startup_checks(self) -> str | None:
        """Check the store and the deployment; the reason start-up must fail, if it must."""
        if isinstance(self.store, MemoryStore):
            workers = worker_processes()
            if workers > 1:
                warn_once(
                    self.policy.validate,
                    "workers",
                    f"RateGuard uses a MemoryStore in a server running {workers} worker processes: each "
                    f"has its own buckets, so a client gets up to {workers} times the limit; use "
                    "RedisStore(url=...) to share one limit, or run one worker",
                )
        if self.store_check == "off":
            return None
        try:
            async with asyncio.timeout(5):
                await self.store.ping()
        except (StoreError, TimeoutError) as exc:
            reason = str(exc) or "the store did not answer within 5 s"
            if self.store_check == "fail":
                return f"rateguard: the store can't be reached: {reason} (store_check='fail')"
            logger.warning("rateguard: the store can't be reached at start-up: %s; starting anyway", reason)
        return None


def _only_default_handlers(handlers: dict[Any, Any]) -> bool:
    from starlette.exceptions import HTTPException

    from rateguard.dependencies import RateLimitExceeded

    if 429 in handlers or RateLimitExceeded in handlers:
        return False
    handler = handlers.get(HTTPException)
    if handler is None:
        return True
    try:
        from fastapi.exception_handlers import http_exception_handler
    except ImportError:
        return False
    return bool(handler is http_exception_handler)


async def deny_websocket(scope: Scope, send: Send, limits: RequestLimits, message: str) -> None:
    """Answer a refused handshake: HTTP 429 where the server can, else accept and close 1008."""
    retry_after = retry_after_seconds(limits.applied)
    headers = render(limits.applied, limits.fields)
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error_body(message, retry_after)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    *headers,
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.accept"})
    await send(
        {"type": "websocket.close", "code": 1008, "reason": f"{message} Retry after {retry_after} s."[:120]}
    )


async def close_stores(stores: list[Store]) -> None:
    """Close each store (each is quick; one failing does not keep the others open)."""
    for store in list(stores):
        try:
            await store.close()
        except Exception:  # a custom store's own bug must not fail the shutdown
            logger.exception("rateguard: closing %r failed", store)


__all__ = ["GuardOptions", "RateGuard", "StoreCheck"]
