"""limit(): limits for FastAPI routes, routers and apps, ``dependencies=[Depends(limit(5))]``."""

# No `from __future__ import annotations` here: FastAPI reads the dependency's signature at
# run time, and before 0.11x it could not resolve string annotations on a callable object
# (``request``/``response`` became query parameters: every request got a 422).

import inspect
import typing
from typing import Any, Unpack

from starlette.exceptions import HTTPException, WebSocketException
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import BaseRoute

from rateguard._compat import served_routes
from rateguard.bucket import Rule
from rateguard.checks import warn_once
from rateguard.errors import StoreError
from rateguard.headers import UNAVAILABLE_MESSAGE, as_dict, render, retry_after_seconds, unavailable_seconds
from rateguard.limiter import SCOPE_KEY, Planner, RequestLimits, ShadowLog, Verdict, claim, decide
from rateguard.policy import LimitOptions, Policy
from rateguard.registry import AppLimits
from rateguard.stores import Store
from rateguard.stores.memory import MemoryStore

# Close code for a refused websocket where the server can't answer the handshake with a 429:
# 1008, policy violation (RFC 6455 7.4.1); the reason says when to come back.
WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013


class RateLimitExceeded(HTTPException):
    """Raised by `limit()` when a request is over its limit: a 429 with ``Retry-After``.

    An app's own handler for it (or for ``HTTPException``, or for status 429) renders it; with
    none, FastAPI's answers ``{"detail": message}``, and `rateguard.install(app)` gives it
    rateguard's body, the same as `RateGuard`'s.
    """

    def __init__(
        self, message: str, retry_after: int, headers: dict[str, str] | None, verdict: Verdict | None = None
    ) -> None:
        super().__init__(status_code=429, detail=message, headers=headers)
        self.message = message
        self.retry_after = retry_after
        self.verdict = verdict


class LimiterUnavailable(HTTPException):
    """Raised by `limit()` when its store can't decide and its outage policy refuses: a 503."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(503, UNAVAILABLE_MESSAGE, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class WebSocketRateLimited(WebSocketException):
    """Raised by `limit()` on a websocket over its limit.

    With `RateGuard` in front (or `rateguard.install(app)`), the handshake is answered with HTTP
    429 and ``Retry-After`` where the server supports the websocket denial response extension,
    else it is accepted and closed at once with code 1008 and the wait in the reason. With
    neither, Starlette closes it before accepting, which servers answer with 403.
    """

    def __init__(self, message: str, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(WS_POLICY_VIOLATION, f"{message} Retry after {retry_after} s."[:120])
        self.message = message
        self.retry_after = retry_after
        self.headers = headers


def _route_name(route: Any, scope: Any, limits: RequestLimits) -> str:
    """``"<METHODS> <full path template>"`` of the route that matched, e.g. ``"GET /items/{id}"``.

    The route object may lack the prefix it was included or mounted under (FastAPI hands the
    router's own route to every inclusion), so the prefix is what the request path has in front
    of the route's own part: ``/v1/items/{id}`` and ``/v2/items/{id}`` (and ``/v1/{rest:path}``
    and ``/v2/{rest:path}``) are different buckets.
    """
    template = getattr(route, "path", None) or getattr(route, "path_format", None)
    methods = getattr(route, "methods", None)
    kind = ",".join(sorted(methods)) if methods else ("WS" if scope.get("type") == "websocket" else "")
    if not isinstance(template, str):
        return f"{kind} {scope.get('path', '')}".strip()
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    suffix = template
    convertors = getattr(route, "param_convertors", None)
    if convertors:
        # The route's own part of this path: its path_format with the parameters put back (what
        # url_path_for does, without its checks: this runs on every request to the route).
        params = scope.get("path_params", {})
        try:
            suffix = route.path_format.format_map({k: c.to_string(params[k]) for k, c in convertors.items()})
        except Exception:  # not this route's parameters: name it by its template alone
            suffix = ""
    prefix = path[: len(path) - len(suffix)] if suffix and path.endswith(suffix) else ""
    # A mount's part of the path: root_path beyond what it was where the first limit saw it.
    base_root = scope.get("app_root_path", limits.root_path)
    mount = root[len(base_root) :] if root.startswith(base_root) else root
    return f"{kind} {mount}{prefix}{template}".strip()


def _returns_response(route: Any) -> bool:
    endpoint = getattr(route, "endpoint", None)
    try:
        annotation = typing.get_type_hints(endpoint).get("return") if endpoint is not None else None
    except Exception:  # unresolvable annotations: can't tell
        return False
    return inspect.isclass(annotation) and issubclass(annotation, Response)


class limit:
    """A limit for a route, a router or a whole app: ``dependencies=[Depends(limit(5))]``.

    ``limit(5)`` is 5 a minute; ``limit("10/second", "1000/day")`` and ``limit(rate=...)`` take
    rates as `RateGuard` does (see the README). Each rule of each route it guards gets its own
    bucket per client, named after the route's method set and full path template
    (``"POST /items/{id}"``, with ``:1d`` and the like after it when a limit has several rules)
    unless ``name=`` is given. Without ``store=`` it uses the store of the app's `RateGuard`, or
    else a `MemoryStore` of the app's own. It works on websocket routes too (a connection attempt
    takes a token), and `hit()` checks it from your own code (a websocket message, say).
    """

    def __init__(self, *rates: float | str | Rule, **options: Unpack[LimitOptions]) -> None:
        self.policy = Policy("limit", rates, options)
        self._planner = Planner()
        self._shadow = ShadowLog()
        self._checked: set[int] = set()  # routes whose dropped-headers check ran
        self._own_store: MemoryStore | None = None  # only outside any app (hit() on a bare connection)
        # Route names already worked out, per route and path: `_route_name` on every request
        # would redo the same string work. Bounded: a route with parameters has a path per item.
        self._names: dict[tuple[Any, ...], str] = {}

    def __repr__(self) -> str:
        return f"limit({self.policy.describe()!r})"

    def _store(self, limits: RequestLimits) -> Store:
        policy_store = self.policy.store
        if policy_store is not None:
            return policy_store
        if limits.store is not None:
            return limits.store
        if limits.registry is not None:
            return limits.registry.default_store
        if self._own_store is None:
            self._own_store = MemoryStore()
        return self._own_store

    async def hit(self, connection: HTTPConnection) -> Verdict:
        """Decide this limit for a connection yourself (each websocket message, say): a `Verdict`.

        Its buckets are named after the connection's route with `` (hit)`` after it (or
        ``name=``), apart from the route's own limits; nothing is raised and no header is sent:
        look at ``verdict.allowed`` and ``verdict.retry_after``.
        """
        scope = connection.scope
        outer: RequestLimits | None = scope.get(SCOPE_KEY)  # the connection's own, from its handshake
        if outer is not None:  # the same store and registry as the route's limits: RateGuard's, say
            limits = RequestLimits(
                outer.store, outer.registry, self.policy.headers, False, None, outer.root_path
            )
        else:
            limits = RequestLimits(
                None, AppLimits.of(scope), self.policy.headers, False, None, scope.get("root_path", "")
            )
        route_name = _route_name(scope.get("route"), scope, limits)
        base = self.policy.name or f"{route_name} (hit)"  # apart from the route's own limits
        verdict = await decide(
            self.policy,
            self._planner,
            self._shadow,
            self._store(limits),
            base,
            route_name,
            connection.scope,
            connection,
            limits,
        )
        return verdict if verdict is not None else Verdict(True, ())

    async def __call__(self, connection: HTTPConnection, response: Response) -> None:
        scope = connection.scope
        policy = self.policy
        limits: RequestLimits | None = scope.get(SCOPE_KEY)
        if limits is None:
            limits = scope[SCOPE_KEY] = RequestLimits(None, AppLimits.of(scope), policy.headers, False)
            limits.root_path = scope.get("root_path", "")
        route = scope.get("route")
        key = (
            id(route),
            scope["type"],
            scope.get("path", ""),
            scope.get("root_path", ""),
            scope.get("app_root_path", limits.root_path),
        )
        route_name = self._names.get(key)
        if route_name is None:
            route_name = _route_name(route, scope, limits)
            if len(self._names) >= 1024:
                self._names.clear()
            self._names[key] = route_name
        base = limits.claim(policy.name or route_name, policy.name is not None)
        websocket = scope["type"] == "websocket"
        try:
            verdict = await decide(
                policy,
                self._planner,
                self._shadow,
                self._store(limits),
                base,
                route_name,
                scope,
                connection,
                limits,
            )
        except StoreError as exc:
            if websocket:
                raise WebSocketException(WS_TRY_AGAIN_LATER, UNAVAILABLE_MESSAGE) from exc
            raise LimiterUnavailable(unavailable_seconds(exc)) from exc
        if verdict is None or not limits.applied:
            return
        headers = (
            None if limits.guarded and limits.fields is not False else render(limits.applied, limits.fields)
        )
        if verdict.allowed:
            if headers:
                response.headers.update(as_dict(headers))
                if id(route) not in self._checked:
                    self._checked.add(id(route))
                    if _returns_response(route):
                        warn_once(
                            policy.validate,
                            "dropped-headers",
                            f"limit() on {route_name} has no RateGuard in front, and the endpoint returns a "
                            "Response, so FastAPI drops the rate-limit headers limit() sets; add "
                            "app.add_middleware(RateGuard, ...) to send them on every response",
                        )
            return
        retry_after = retry_after_seconds(limits.applied)
        refusal = as_dict(headers if headers is not None else render(limits.applied, limits.fields))
        if websocket:
            if not limits.guarded:
                warn_once(
                    policy.validate,
                    "websocket-429",
                    "limit() refused a websocket, but with no RateGuard in front the handshake can only be "
                    "closed (servers answer 403); add app.add_middleware(RateGuard, ...) or call "
                    "rateguard.install(app) to answer 429 with Retry-After",
                )
            raise WebSocketRateLimited(policy.message, retry_after, refusal)
        raise RateLimitExceeded(policy.message, retry_after, refusal, verdict)


def register_declared(app: Any, registry: AppLimits, store: Store) -> None:
    """Register the limits an app declares in ``dependencies=`` (route, router and app level).

    So the admin API and metrics list them from the start; limits declared elsewhere (inside
    another dependency, a mounted app) are registered when first used. ``store`` is what a limit
    without ``store=`` uses: the outermost `RateGuard`'s.
    """
    for route in served_routes(app):
        path = getattr(route, "path", None) or getattr(route, "path_format", None)
        if not isinstance(path, str):
            continue
        methods = getattr(route, "methods", None)
        route_name = f"{','.join(sorted(methods)) if methods else 'WS'} {path}"
        claims: list[str] = []
        for dep in getattr(route, "dependencies", ()):
            guard = getattr(dep, "dependency", None)
            if isinstance(guard, limit):
                policy = guard.policy
                base = claim(claims, policy.name or route_name, policy.name is not None)
                if policy.rate_fn is None:  # a rate callable's rules depend on the request
                    guard._planner.plan(
                        policy, policy.store or store, registry, base, policy.rules, route_name
                    )


def route_has_limit(route: BaseRoute) -> bool:
    """Whether a route's own ``dependencies`` (route, router and app level) include a `limit`."""
    return any(
        isinstance(getattr(dep, "dependency", None), limit) for dep in getattr(route, "dependencies", ())
    )


__all__ = [
    "LimiterUnavailable",
    "RateLimitExceeded",
    "WebSocketRateLimited",
    "limit",
    "register_declared",
    "route_has_limit",
]
