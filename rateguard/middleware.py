"""RateGuard: a pure ASGI middleware that applies one token bucket to every HTTP request."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rateguard.bucket import Decision
from rateguard.errors import StoreError
from rateguard.identity import encode_identifier
from rateguard.limiter import (
    DEFAULT_MESSAGE,
    SCOPE_KEY,
    UNAVAILABLE_MESSAGE,
    Applied,
    Cost,
    Identifier,
    Policy,
    PolicyHeader,
    Predicate,
    RequestLimits,
    count,
    error_body,
    render_headers,
    retry_after_seconds,
    unavailable_seconds,
)
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore
from rateguard.topk import LIMITED


class RateGuard:
    """Limit every HTTP request of an app: ``app.add_middleware(RateGuard, requests_per_minute=100)``.

    :param requests_per_minute: refill rate in tokens per minute (a float > 0; 0.5 = one per 2 min).
    :param capacity: bucket size, the largest burst; defaults to ``requests_per_minute``.
    :param store: ``MemoryStore()`` (default, one process) or ``RedisStore(...)`` (shared). Routes
        limited with ``limit()`` and no ``store=`` use this store too.
    :param identifier: ``request -> str`` (sync or async); ``None``/``""`` falls back to the client IP.
    :param skip: ``request -> bool`` (sync or async); True means not limited and no token taken.
    :param message: the text of the 429 body.
    :param cost: tokens one request takes: an int, or ``request -> int``.
    :param name: the policy name in the ``RateLimit`` headers and the bucket name (``"global"``).
    :param trusted_proxies: CIDRs of proxies whose ``X-Forwarded-For``/``Forwarded`` is believed.
    :param ipv6_prefix: IPv6 clients are grouped by this prefix length (64).
    :param proxy_header: the header trusted proxies set: ``"x-forwarded-for"`` (default) or ``"forwarded"``.
    :param proxy_header: which header trusted proxies set: ``"x-forwarded-for"`` or ``"forwarded"``.

    Pure ASGI rather than ``BaseHTTPMiddleware``: streaming, background tasks and context
    variables pass through untouched, and it costs a fraction of the per-request overhead.
    """

    def __init__(
        self,
        app: ASGIApp,
        requests_per_minute: float = 60,
        *,
        capacity: int | None = None,
        store: Store | None = None,
        identifier: Identifier | None = None,
        skip: Predicate | None = None,
        message: str = DEFAULT_MESSAGE,
        cost: Cost = 1,
        name: str = "global",
        trusted_proxies: Iterable[str] | None = None,
        ipv6_prefix: int = 64,
        proxy_header: str = "x-forwarded-for",
    ) -> None:
        self.app = app
        self.policy = Policy(
            requests_per_minute=requests_per_minute,
            capacity=capacity,
            store=store,
            identifier=identifier,
            skip=skip,
            message=message,
            cost=cost,
            name=name,
            trusted_proxies=trusted_proxies,
            ipv6_prefix=ipv6_prefix,
            proxy_header=proxy_header,
        )
        self.store: Store = store if store is not None else MemoryStore()
        self.name = name
        self._header = PolicyHeader(name, self.policy.rule)
        self._plain = not self.policy.needs_request
        self._counts = self.policy.counter(name)
        self._cost = self.policy.cost if isinstance(self.policy.cost, int) else 1
        # MemoryStore decides without awaiting; calling it directly saves a coroutine per request.
        self._take_now = self.store.take_now if type(self.store) is MemoryStore else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        limits: RequestLimits | None = scope.get(SCOPE_KEY)
        outermost = limits is None
        if limits is None:
            limits = scope[SCOPE_KEY] = RequestLimits(self.store)

        policy = self.policy
        decision: Decision | None = None
        try:
            if self._plain:
                # No user callables: no Request object, no awaits but the store's.
                client = encode_identifier(policy.client_address(scope))
                if self._take_now is not None:
                    decision = self._take_now(client, self.name, policy.rule, self._cost)
                else:
                    decision = await self.store.take(client, self.name, policy.rule, self._cost)
            else:
                request = Request(scope, receive)
                if not await policy.should_skip(request):
                    client = await policy.client_id(scope, request)
                    cost = await policy.cost_of(request)
                    decision = await self.store.take(client, self.name, policy.rule, cost)
        except StoreError as exc:
            # The store is down and its policy refuses (RedisStore(on_error="deny")), or a custom
            # store failed: answer 503, never a 500.
            await self._unavailable(exc, send)
            return
        if decision is not None:
            count(self._counts, decision)
            limits.applied.append(Applied(self._header, decision))
            if not decision.allowed:
                LIMITED.add(client, self.name)  # the rare path: feeds the dashboard's top-k
                # An outer RateGuard's send wrapper adds the headers; the outermost adds its own.
                await self._reject(limits.applied, outermost, send)
                return

        if not outermost:
            await self.app(scope, receive, send)  # the outermost RateGuard renders the headers
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and limits.applied:
                message["headers"] = [*message.get("headers", ()), *render_headers(limits.applied)]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _unavailable(self, exc: StoreError, send: Send) -> None:
        retry_after = unavailable_seconds(exc)
        body = error_body(UNAVAILABLE_MESSAGE, retry_after, "Service Unavailable")
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _reject(self, applied: list[Applied], with_headers: bool, send: Send) -> None:
        body = error_body(self.policy.message, retry_after_seconds(applied))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if with_headers:
            headers += render_headers(applied)
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
