"""RateGuard: a pure ASGI middleware that applies one token bucket to every HTTP request."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

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
    Headers,
    Identifier,
    Policy,
    PolicyHeader,
    Predicate,
    RequestLimits,
    count,
    error_body,
    render_headers,
    render_headers_all,
    retry_after_seconds,
    unavailable_seconds,
)
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore
from rateguard.topk import LIMITED

# Peer addresses whose keys are remembered; past this many the memory starts over.
_KEY_CACHE_SIZE = 4096


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
    :param headers: the rate-limit fields responses carry: ``True`` (``RateLimit``,
        ``RateLimit-Policy`` and ``X-RateLimit-*``), ``"ietf"``, ``"x-ratelimit"``, or ``False``
        (none; a 429 still has ``Retry-After``). Each field costs uvicorn about 1% of a trivial
        request, so ``False`` is the cheapest.

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
        headers: Headers = True,
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
            headers=headers,
        )
        self.store: Store = store if store is not None else MemoryStore()
        self.name = name
        self._header = PolicyHeader(name, self.policy.rule)
        self._fields = self.policy.headers
        self._render: Callable[[list[Applied]], list[tuple[bytes, bytes]]] = (
            render_headers_all if self._fields is True else partial(render_headers, fields=self._fields)
        )
        self._plain = not self.policy.needs_request
        self._counts = self.policy.counter(name)
        self._cost = self.policy.cost if isinstance(self.policy.cost, int) else 1
        # MemoryStore decides without awaiting; calling it directly saves a coroutine per request.
        self._take_now = self.store.take_now if type(self.store) is MemoryStore else None
        # Peer address -> key. Only when no proxy is trusted: the key then depends on the peer
        # address alone, and encoding it (a regex, perhaps IPv6 grouping) is most of its cost.
        self._keys: dict[str, str] | None = None if self.policy.client_address.trusted else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        limits: RequestLimits | None = scope.get(SCOPE_KEY)
        outermost = limits is None
        if limits is None:
            limits = scope[SCOPE_KEY] = RequestLimits(self.store, self._fields)

        policy = self.policy
        decision: Decision | None = None
        try:
            if self._plain:
                # No user callables: no Request object, no awaits but the store's.
                try:
                    client = self._keys[scope["client"][0]]  # type: ignore[index]
                except (KeyError, TypeError, IndexError):  # not seen yet, or no peer, or no cache
                    client = self._client_key(scope)
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
                # The outermost RateGuard adds the headers: its send wrapper or, here, its own.
                # One that sends none has no wrapper, so then the 429 carries its Retry-After.
                await self._reject(limits, outermost or limits.fields is False, send)
                return

        if not outermost or self._fields is False:
            # The outermost RateGuard renders the headers, unless told to send none.
            await self.app(scope, receive, send)
            return

        applied = limits.applied
        render = self._render

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and applied:
                message["headers"] = [*message.get("headers", ()), *render(applied)]
            await send(message)

        await self.app(scope, receive, send_with_headers)

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

    async def _reject(self, limits: RequestLimits, with_headers: bool, send: Send) -> None:
        applied = limits.applied
        body = error_body(self.policy.message, retry_after_seconds(applied))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if with_headers:
            headers += render_headers(applied, limits.fields)
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
