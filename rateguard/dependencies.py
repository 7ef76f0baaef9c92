"""limit(): a per-route limit for FastAPI, ``dependencies=[Depends(limit(5))]``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from rateguard.errors import StoreError
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
    retry_after_seconds,
    unavailable_seconds,
)
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore
from rateguard.topk import LIMITED

_default_store: MemoryStore | None = None


def default_store() -> MemoryStore:
    """The process-wide store of `limit()`s that have no ``store=`` and no `RateGuard` to share."""
    global _default_store
    if _default_store is None:
        _default_store = MemoryStore()
    return _default_store


class RateLimitExceeded(HTTPException):
    """Raised by `limit()` when a request is over its limit; rendered as the 429 JSON body."""

    def __init__(self, message: str, retry_after: int, headers: dict[str, str] | None) -> None:
        super().__init__(status_code=429, detail=message, headers=headers)
        self.message = message
        self.retry_after = retry_after


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """Render `RateLimitExceeded` as ``{"error", "message", "retry_after"}``, like `RateGuard` does."""
    assert isinstance(exc, RateLimitExceeded)
    return Response(
        error_body(exc.message, exc.retry_after),
        status_code=429,
        headers=exc.headers,
        media_type="application/json",
    )


def _install_handler(request: Request) -> None:
    # FastAPI renders any HTTPException as {"detail": ...}. The handler table of the app's
    # ExceptionMiddleware is looked up per request from the scope; registering our handler for our
    # own exception class (only if the app has none) gives limit() the same 429 body as RateGuard.
    # An app's own handler for 429 or for RateLimitExceeded still wins.
    handlers = request.scope.get("starlette.exception_handlers")
    if handlers and isinstance(handlers[0], dict):
        handlers[0].setdefault(RateLimitExceeded, rate_limit_exceeded_handler)


def _as_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


def _route_bucket(scope: Any) -> str:
    """``"<METHODS> <path template>"`` of the route that matched, e.g. ``"GET /items/{id}"``.

    FastAPI hands the dependency the router's own route object, whose template lacks the prefix
    it was included under (``include_router(r, prefix="/v1")``); the prefix is recovered from the
    request path, so ``/v1/items/{id}`` and ``/v2/items/{id}`` don't share a bucket.
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template is None:
        return str(scope.get("path", ""))
    prefix = ""
    path = scope.get("path")
    regex = getattr(route, "path_regex", None)
    if path is not None and regex is not None:
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if not regex.match(path):
            for i in range(1, len(path)):
                if path[i] == "/" and regex.match(path[i:]):
                    prefix = path[:i]
                    break
        prefix = root + prefix
    methods = getattr(route, "methods", None)
    full = prefix + template
    return f"{','.join(sorted(methods))} {full}" if methods else full


class limit:
    """A per-route limit: ``@app.post("/x", dependencies=[Depends(limit(5))])`` = 5 per minute.

    Takes the same options as `RateGuard`. Each route it guards gets its own bucket per client,
    named after the route's method set and path template (``"POST /items/{id}"``) unless ``name=``
    is given. Without ``store=`` it uses the store of the app's `RateGuard`, or else one
    process-wide `MemoryStore`.
    """

    def __init__(
        self,
        requests_per_minute: float = 60,
        *,
        capacity: int | None = None,
        store: Store | None = None,
        identifier: Identifier | None = None,
        skip: Predicate | None = None,
        message: str = DEFAULT_MESSAGE,
        cost: Cost = 1,
        name: str | None = None,
        trusted_proxies: Iterable[str] | None = None,
        ipv6_prefix: int = 64,
        proxy_header: str = "x-forwarded-for",
        headers: Headers = True,
    ) -> None:
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
        self._headers: dict[str, PolicyHeader] = {}  # bucket name -> its pre-rendered headers

    def __repr__(self) -> str:
        rule = self.policy.rule
        return f"limit({rule.requests_per_minute!r}, capacity={rule.burst})"

    async def __call__(self, request: Request, response: Response) -> None:
        policy = self.policy
        if await policy.should_skip(request):
            return
        scope = request.scope
        limits: RequestLimits | None = scope.get(SCOPE_KEY)
        behind_middleware = limits is not None
        if limits is None:
            limits = scope[SCOPE_KEY] = RequestLimits(
                policy.store if policy.store is not None else default_store(), policy.headers
            )
        store = policy.store if policy.store is not None else limits.store

        bucket = policy.name or _route_bucket(scope)
        header = self._headers.get(bucket)
        if header is None:
            header = PolicyHeader(bucket, policy.rule)
            if len(self._headers) < 1024:  # route templates are few; raw paths (no route) are not
                self._headers[bucket] = header
        client = await policy.client_id(scope, request)
        cost = await policy.cost_of(request)
        try:
            decision = await store.take(client, bucket, policy.rule, cost)
        except StoreError as exc:
            raise HTTPException(
                503, UNAVAILABLE_MESSAGE, headers={"Retry-After": str(unavailable_seconds(exc))}
            ) from exc
        count(policy.counter(bucket), decision)
        limits.applied.append(Applied(header, decision))

        # Behind RateGuard, its send wrapper renders the headers of every limit that applied, unless
        # it was told to send none: then a 429 still needs its Retry-After from here.
        fields = limits.fields
        headers = (
            None
            if behind_middleware and fields is not False
            else _as_dict(render_headers(limits.applied, fields))
        )
        if not decision.allowed:
            LIMITED.add(client, bucket)  # the rare path: feeds the dashboard's top-k
            _install_handler(request)
            raise RateLimitExceeded(policy.message, retry_after_seconds(limits.applied), headers)
        if headers:
            response.headers.update(headers)
