"""From a request to a `Decision`, and from decisions to HTTP: shared by middleware and `limit()`."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, Union

from starlette.requests import Request

from rateguard.bucket import EPSILON, Decision, Rule
from rateguard.errors import ConfigurationError, StoreError
from rateguard.identity import ClientAddress, encode_identifier
from rateguard.stores import Store

DEFAULT_MESSAGE = "Too many requests, please try again later."

# Where a request's rate-limit decisions are collected, so that the outermost RateGuard renders
# every limit that applied (global and per-route) into one set of headers.
SCOPE_KEY = "rateguard"

MaybeAwaitable = Union[Awaitable[Any], Any]  # noqa: UP007
Identifier = Callable[[Request], MaybeAwaitable]
Predicate = Callable[[Request], MaybeAwaitable]
Cost = Union[int, Callable[[Request], MaybeAwaitable]]  # noqa: UP007


# Which rate-limit header fields responses carry: both sets (True), none (False; a 429 still has
# Retry-After), or one set: "ietf" (RateLimit, RateLimit-Policy) or "x-ratelimit" (the X- trio).
Headers = Union[bool, Literal["ietf", "x-ratelimit"]]  # noqa: UP007
HEADER_CHOICES: tuple[Headers, ...] = (True, False, "ietf", "x-ratelimit")


def header_fields(value: object) -> Headers:
    """Validate the ``headers`` option."""
    for choice in HEADER_CHOICES:
        if value is choice or (isinstance(value, str) and value == choice):
            return choice
    raise ConfigurationError(
        f"headers must be True (RateLimit and X-RateLimit-* fields), 'ietf', 'x-ratelimit' or "
        f"False (none; a 429 keeps Retry-After), got {value!r}"
    )


def _name_of(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


class Policy:
    """One configured limit: a rule, a store (or none: use the app's), and the options."""

    __slots__ = (
        "client_address",
        "cost",
        "counts",
        "headers",
        "identifier",
        "message",
        "name",
        "rule",
        "skip",
        "store",
    )

    def __init__(
        self,
        *,
        requests_per_minute: float = 60,
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
        self.rule = Rule(requests_per_minute, capacity)
        self.headers = header_fields(headers)
        if store is not None and not isinstance(store, Store):
            raise ConfigurationError(
                f"store must be a rateguard store such as MemoryStore() or "
                f"RedisStore(url='redis://localhost:6379'), got {type(store).__name__}"
            )
        for option, value in (("identifier", identifier), ("skip", skip)):
            if value is not None and not callable(value):
                raise ConfigurationError(
                    f"{option} must be a callable taking the request, got {value!r}; "
                    f"e.g. {option}=lambda request: ..."
                )
        if callable(cost):
            self.cost: Cost = cost
        else:
            self.cost = self.rule.check_cost(cost)
        if not isinstance(message, str):
            raise ConfigurationError(f"message must be a string, got {type(message).__name__}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigurationError(f"name must be a non-empty string, got {name!r}")
        self.store = store
        self.identifier = identifier
        self.skip = skip
        self.message = message
        self.name = name
        self.client_address = ClientAddress(trusted_proxies, ipv6_prefix, proxy_header)
        # Decisions per bucket name: [allowed, limited, degraded], read by metrics and the admin.
        self.counts: dict[str, list[int]] = {}

    def counter(self, bucket: str) -> list[int]:
        """The decision counts of one bucket name (created on first use, bounded)."""
        counts = self.counts.get(bucket)
        if counts is None:
            counts = [0, 0, 0]
            if len(self.counts) < 1024:  # bucket names are route templates: few
                self.counts[bucket] = counts
        return counts

    @property
    def needs_request(self) -> bool:
        return self.identifier is not None or self.skip is not None or callable(self.cost)

    async def should_skip(self, request: Request) -> bool:
        if self.skip is None:
            return False
        try:
            result = self.skip(request)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            exc.add_note(f"raised by the rateguard skip callable {_name_of(self.skip)}")
            raise
        return bool(result)

    async def client_id(self, scope: Any, request: Request | None) -> str:
        """The encoded store key part for this request's client."""
        if self.identifier is not None and request is not None:
            try:
                ident = self.identifier(request)
                if inspect.isawaitable(ident):
                    ident = await ident
                if ident is not None and not isinstance(ident, str):
                    ident = str(ident)  # an int user id, a UUID: its text is the identity
            except Exception as exc:
                exc.add_note(f"raised by the rateguard identifier callable {_name_of(self.identifier)}")
                raise
            if ident:
                # A user identity never collides with an address: it gets its own namespace.
                return "id:" + encode_identifier(ident)
        return encode_identifier(self.client_address(scope))

    async def cost_of(self, request: Request | None) -> int:
        cost = self.cost
        if isinstance(cost, int):
            return cost
        assert request is not None  # needs_request is true whenever cost is callable
        try:
            value = cost(request)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            exc.add_note(f"raised by the rateguard cost callable {_name_of(cost)}")
            raise
        return self.rule.check_cost(value, f"the value of cost callable {_name_of(cost)}")


# ---------------------------------------------------------------------------------------------
# Headers


def _sf_string(text: str) -> str:
    """A Structured Field string (RFC 9651): printable ASCII, quotes and backslashes escaped."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def count(counts: list[int], decision: Decision) -> None:
    if decision.degraded:
        counts[2] += 1
    elif decision.allowed:
        counts[0] += 1
    else:
        counts[1] += 1


class PolicyHeader:
    """The parts of a policy's headers that never change, rendered once as bytes."""

    __slots__ = ("item", "limit", "limit_field", "name", "policy_field", "ratelimit_format", "sf_name")

    def __init__(self, name: str, rule: Rule) -> None:
        self.name = name
        sf = _sf_string(name)
        self.sf_name = sf.encode("latin-1")
        self.item = f"{sf};q={rule.burst};w={rule.window}".encode("latin-1")
        self.limit = str(rule.burst).encode()
        # Whole header fields for the one-policy case, which every response of a plain app takes.
        self.policy_field = (b"ratelimit-policy", self.item)
        self.limit_field = (b"x-ratelimit-limit", self.limit)
        self.ratelimit_format = self.sf_name.replace(b"%", b"%%") + b";r=%d;t=%d"


def _ceil(seconds: float) -> int:
    """Whole seconds, rounded up (a float error of 1e-9 past a whole second doesn't count)."""
    whole = math.ceil(seconds - 1e-9)
    return whole if whole > 0 else 0


def _next_token_seconds(d: Decision) -> int:
    """`Decision.next_token_after` rounded up: the ``t`` of the ``RateLimit`` field."""
    if not d.allowed:
        return _ceil(d.retry_after)
    rate = d.rate
    if d.reset_after <= EPSILON or rate <= 0:
        return 0
    # capacity is whole, so the fraction of a token missing is the fraction of reset_after
    missing = d.reset_after * rate
    frac = missing - math.floor(missing)
    whole = math.ceil((frac if frac > EPSILON else 1.0) / rate - 1e-9)
    return whole if whole > 0 else 0


class Applied:
    """A decision together with the policy it was made under."""

    __slots__ = ("decision", "policy")

    def __init__(self, policy: PolicyHeader, decision: Decision) -> None:
        self.policy = policy
        self.decision = decision

    @property
    def name(self) -> str:
        return self.policy.name


def _ratelimit_item(a: Applied) -> bytes:
    d = a.decision
    return a.policy.ratelimit_format % (d.remaining, _next_token_seconds(d))


_IETF_FIELDS = (b"ratelimit-policy", b"ratelimit")
_X_FIELDS = (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")


def render_headers(applied: list[Applied], fields: Headers = True) -> list[tuple[bytes, bytes]]:
    """`render_headers_all`, less the fields the ``headers`` option leaves out."""
    headers = render_headers_all(applied)
    if fields is True:
        return headers
    dropped = _IETF_FIELDS + _X_FIELDS if fields is False else _X_FIELDS if fields == "ietf" else _IETF_FIELDS
    return [(name, value) for name, value in headers if name not in dropped]


def render_headers_all(applied: list[Applied]) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers for every limit that applied to one request.

    ``RateLimit-Policy``/``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10) list each policy;
    the ``X-RateLimit-*`` trio describes the most restrictive one; ``Retry-After`` only on denial.
    """
    if len(applied) == 1:  # the common case, kept cheap: it runs on every response
        only = applied[0]
        d = only.decision
        policy = only.policy
        remaining = d.remaining
        reset = math.ceil(d.reset_after - 1e-9)  # _ceil(), inline: reset_after is never < 0
        headers = [
            policy.policy_field,
            (b"ratelimit", policy.ratelimit_format % (remaining, _next_token_seconds(d))),
            policy.limit_field,
            (b"x-ratelimit-remaining", b"%d" % remaining),
            (b"x-ratelimit-reset", b"%d" % (reset if reset > 0 else 0)),
        ]
        if not d.allowed:
            headers.append((b"retry-after", b"%d" % max(1, _ceil(d.retry_after))))
        return headers
    # Denied beats allowed; then fewest remaining; then longest wait.
    worst = min(applied, key=lambda a: (a.decision.allowed, a.decision.remaining, -a.decision.retry_after))
    d = worst.decision
    headers = [
        (b"ratelimit-policy", b", ".join([a.policy.item for a in applied])),
        (b"ratelimit", b", ".join([_ratelimit_item(a) for a in applied])),
        (b"x-ratelimit-limit", worst.policy.limit),
        (b"x-ratelimit-remaining", b"%d" % d.remaining),
        (b"x-ratelimit-reset", b"%d" % _ceil(d.reset_after)),
    ]
    denied = [a.decision.retry_after for a in applied if not a.decision.allowed]
    if denied:
        headers.append((b"retry-after", b"%d" % max(1, _ceil(max(denied)))))
    return headers


def retry_after_seconds(applied: list[Applied]) -> int:
    return max(
        1,
        _ceil(max((a.decision.retry_after for a in applied if not a.decision.allowed), default=1)),
    )


UNAVAILABLE_MESSAGE = "The rate limiter's store is unavailable, please try again shortly."


def unavailable_seconds(exc: StoreError) -> int:
    return max(1, _ceil(getattr(exc, "retry_after", 1.0)))


def error_body(message: str, retry_after: int, error: str = "Too Many Requests") -> bytes:
    return json.dumps(
        {"error": error, "message": message, "retry_after": retry_after},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


class RequestLimits:
    """Per-request record, kept in ``scope["rateguard"]`` by the outermost `RateGuard`."""

    __slots__ = ("applied", "fields", "store")

    def __init__(self, store: Store, fields: Headers = True) -> None:
        self.store = store
        self.fields = fields  # the headers option of whoever renders the headers
        self.applied: list[Applied] = []
