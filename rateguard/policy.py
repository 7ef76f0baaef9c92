"""The options of a limit, declared once, checked once, and the user callables called safely.

`RateGuard`, `limit()` and `Limiter` all take these keyword options (``LimitOptions``); a
`Policy` holds them validated. Errors raised by the user's own callables (``identifier``,
``skip``, ``cost``, ``rate``) are the application's bugs: they propagate unchanged, with a note
naming the callable.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypedDict, Union

from starlette.requests import HTTPConnection

from rateguard.bucket import Rule
from rateguard.checks import Validate, check_validate, warn_once
from rateguard.errors import ConfigurationError
from rateguard.identity import ClientAddress, encode_identifier
from rateguard.rates import RateValue, parse_rules
from rateguard.stores import Store

DEFAULT_MESSAGE = "Too many requests, please try again later."
MODE_ENV = "RATEGUARD_MODE"

MaybeAwaitable = Union[Awaitable[Any], Any]  # noqa: UP007
Identifier = Callable[[HTTPConnection], MaybeAwaitable]
Predicate = Callable[[HTTPConnection], MaybeAwaitable]
Cost = Union[int, Callable[[HTTPConnection], MaybeAwaitable]]  # noqa: UP007
RateCallable = Callable[[HTTPConnection], MaybeAwaitable]
Rate = Union[RateValue, RateCallable]  # noqa: UP007

# Which rate-limit header fields responses carry: both sets (True), none (False; a 429 still has
# Retry-After), or one set: "ietf" (RateLimit, RateLimit-Policy) or "x-ratelimit" (the X- trio).
Headers = Union[bool, Literal["ietf", "x-ratelimit"]]  # noqa: UP007
HEADER_CHOICES: tuple[Headers, ...] = (True, False, "ietf", "x-ratelimit")

# enforce: refuse over the limit; shadow: decide and count, but let everything through; off: nothing.
Mode = Literal["enforce", "shadow", "off"]
MODES: tuple[Mode, ...] = ("enforce", "shadow", "off")


class CommonOptions(TypedDict, total=False):
    """The keyword options of `RateGuard`, `limit()` and `Limiter` (see the README's table)."""

    rate: Rate
    capacity: int | None
    store: Store | None
    identifier: Identifier | None
    skip: Predicate | None
    message: str
    cost: Cost
    name: str | None
    trusted_proxies: Iterable[str] | None
    ipv6_prefix: int
    proxy_header: str
    headers: Headers
    mode: Mode
    validate: Validate


class LimitOptions(CommonOptions, total=False):
    requests_per_minute: float  # RateGuard takes it as its first argument


OPTION_NAMES = frozenset(LimitOptions.__annotations__)


def check_option_names(owner: str, given: Iterable[str], allowed: Iterable[str] = OPTION_NAMES) -> None:
    """A misspelt option fails loudly, with the nearest real one."""
    known = sorted(allowed)
    for option in given:
        if option not in known:
            near = difflib.get_close_matches(option, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; the options are {', '.join(known)}"
            raise ConfigurationError(f"{owner} has no option {option!r}{hint}")


def header_fields(value: object) -> Headers:
    """Validate the ``headers`` option."""
    for choice in HEADER_CHOICES:
        if value is choice or (isinstance(value, str) and value == choice):
            return choice
    raise ConfigurationError(
        f"headers must be True (RateLimit and X-RateLimit-* fields), 'ietf', 'x-ratelimit' or "
        f"False (none; a 429 keeps Retry-After), got {value!r}"
    )


def check_mode(value: object, source: str = "mode") -> Mode:
    for mode in MODES:
        if value == mode:
            return mode
    raise ConfigurationError(
        f"{source} must be 'enforce' (refuse over the limit), 'shadow' (decide and count, refuse "
        f"nothing) or 'off' (no limiting), got {value!r}"
    )


def mode_from_env() -> Mode | None:
    """``RATEGUARD_MODE``, when set: it overrides the mode of every limit in the process."""
    value = os.environ.get(MODE_ENV, "").strip().lower()
    return check_mode(value, MODE_ENV) if value else None


def _is_async(func: Any) -> bool:
    call = type(func).__call__ if not inspect.isroutine(func) else None
    return inspect.iscoroutinefunction(func) or (call is not None and inspect.iscoroutinefunction(call))


def name_of(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


async def _call(func: Callable[[HTTPConnection], Any], conn: HTTPConnection, what: str) -> Any:
    try:
        result = func(conn)
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        exc.add_note(f"raised by the rateguard {what} callable {name_of(func)}")
        raise
    return result


class Policy:
    """One limit's options, validated: its rules (or rate callable), store and user callables."""

    __slots__ = (
        "_mode",
        "_rates",
        "client_address",
        "cost",
        "fixed_cost",
        "headers",
        "identifier",
        "message",
        "mode_given",
        "name",
        "needs_connection",
        "rate_fn",
        "rules",
        "skip",
        "store",
        "sync_identity",
        "validate",
    )

    def __init__(self, owner: str, positional: tuple[Any, ...], options: LimitOptions) -> None:
        check_option_names(owner, options)
        capacity = options.get("capacity")
        rate = options.get("rate")
        given = [("positional rates", bool(positional)), ("rate=", "rate" in options)]
        given.append(("requests_per_minute=", "requests_per_minute" in options))
        named = [what for what, present in given if present]
        if len(named) > 1:
            raise ConfigurationError(
                f"{owner} takes its rate one way: {' or '.join(named)}, not both; e.g. "
                f"{owner}(rate='100/minute; 10000/day') or {owner}(requests_per_minute=100)"
            )
        self.rate_fn: Callable[[HTTPConnection], Any] | None = None
        self._rates: dict[Any, tuple[Rule, ...]] = {}  # a rate callable's results, parsed
        if "requests_per_minute" in options:
            self.rules: tuple[Rule, ...] = (Rule(options["requests_per_minute"], capacity),)
        elif callable(rate) and not isinstance(rate, Rule):
            if capacity is not None:
                raise ConfigurationError(
                    "capacity= goes with a fixed rate; a rate callable returns the burst too"
                )
            self.rate_fn = rate
            self.rules = ()
        elif rate is not None or positional:
            self.rules = parse_rules(list(positional) if positional else rate, capacity=capacity)
        else:
            self.rules = (Rule(60, capacity),)
        self.headers = header_fields(options.get("headers", True))
        store = options.get("store")
        if store is not None and not isinstance(store, Store):
            raise ConfigurationError(
                f"store must be a rateguard store such as MemoryStore() or "
                f"RedisStore(url='redis://localhost:6379'), got {type(store).__name__}"
            )
        self.store = store
        for option in ("identifier", "skip"):
            value = options.get(option)
            if value is not None and not callable(value):
                raise ConfigurationError(
                    f"{option} must be a callable taking the request, got {value!r}; "
                    f"e.g. {option}=lambda request: ..."
                )
        self.identifier: Identifier | None = options.get("identifier")
        self.skip: Predicate | None = options.get("skip")
        cost = options.get("cost", 1)
        if callable(cost):
            self.cost: Cost = cost
        else:
            for rule in self.rules:
                rule.check_cost(cost)
            if not isinstance(cost, int) or isinstance(cost, bool) or cost < 1:
                raise ConfigurationError(f"cost must be an int >= 1, got {cost!r}")  # a rate callable's
            self.cost = cost
        message = options.get("message", DEFAULT_MESSAGE)
        if not isinstance(message, str):
            raise ConfigurationError(f"message must be a string, got {type(message).__name__}")
        self.message = message
        name = options.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigurationError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.client_address = ClientAddress(
            options.get("trusted_proxies"),
            options.get("ipv6_prefix", 64),
            options.get("proxy_header", "x-forwarded-for"),
        )
        self.validate = check_validate(options.get("validate", True))
        if any(net.prefixlen == 0 for net in self.client_address.trusted):
            warn_once(
                self.validate,
                "trust-all",
                f"trusted_proxies {[str(n) for n in self.client_address.trusted]} trusts every address of a "
                "family, so any client can choose its identity with X-Forwarded-For; list only your proxies",
            )
        # Whether deciding calls user code with the request (else no Request object is built).
        self.needs_connection = (
            self.identifier is not None
            or self.skip is not None
            or callable(self.cost)
            or self.rate_fn is not None
        )
        # Whether a request's identity and cost are known without awaiting (no async callable).
        self.sync_identity = self.identifier is None or not _is_async(self.identifier)
        # The cost of every request, or 0 when each request's is computed (a callable, a rate callable).
        self.fixed_cost = self.cost if isinstance(self.cost, int) and self.rate_fn is None else 0
        self.mode_given: Mode = check_mode(options.get("mode", "enforce"))
        mode_from_env()  # a bad RATEGUARD_MODE fails here, at configuration, not on a request
        self._mode: Mode | None = None

    @property
    def mode(self) -> Mode:
        """The mode in force: ``RATEGUARD_MODE`` if set (read on first use), else ``mode=``."""
        mode = self._mode
        if mode is None:
            mode = self._mode = mode_from_env() or self.mode_given
        return mode

    @property
    def rule(self) -> Rule:
        """The one rule of a single-rule limit (the first, if it has several)."""
        if not self.rules:
            raise AttributeError("a limit with a rate callable has its rules per request")
        return self.rules[0]

    def describe(self) -> str:
        if self.rate_fn is not None:
            return f"rate={name_of(self.rate_fn)}"
        return "; ".join(str(rule) for rule in self.rules)

    async def should_skip(self, conn: HTTPConnection) -> bool:
        return self.skip is not None and bool(await _call(self.skip, conn, "skip"))

    async def client_id(self, scope: Any, conn: HTTPConnection | None) -> str:
        """The encoded store key part for this request's client."""
        if self.identifier is not None and conn is not None:
            return self._key_of(await _call(self.identifier, conn, "identifier"), scope)
        return encode_identifier(self.client_address(scope))

    def client_id_now(self, scope: Any, conn: HTTPConnection | None) -> str | Awaitable[str]:
        """`client_id` with no coroutine when the identifier is not async (or there is none);
        a sync callable that returns an awaitable anyway gives one back, to be awaited."""
        identifier = self.identifier
        if identifier is not None and conn is not None:
            try:
                ident = identifier(conn)
            except Exception as exc:
                exc.add_note(f"raised by the rateguard identifier callable {name_of(identifier)}")
                raise
            if inspect.isawaitable(ident):
                return self._key_later(ident, scope)
            return self._key_of(ident, scope)
        return encode_identifier(self.client_address(scope))

    async def _key_later(self, ident: Awaitable[Any], scope: Any) -> str:
        try:
            value = await ident
        except Exception as exc:
            exc.add_note(f"raised by the rateguard identifier callable {name_of(self.identifier)}")
            raise
        return self._key_of(value, scope)

    def _key_of(self, ident: Any, scope: Any) -> str:
        if ident is not None and not isinstance(ident, str):
            ident = str(ident)  # an int user id, a UUID: its text is the identity
        if ident:
            # A user identity never collides with an address: it gets its own namespace.
            return "id:" + encode_identifier(ident)
        return encode_identifier(self.client_address(scope))

    async def rules_for(self, conn: HTTPConnection | None) -> tuple[Rule, ...]:
        """This request's rules: the fixed ones, or what the rate callable answers for it."""
        rate_fn = self.rate_fn
        if rate_fn is None:
            return self.rules
        assert conn is not None
        value = await _call(rate_fn, conn, "rate")
        key = tuple(value) if isinstance(value, list) else value
        try:
            rules = self._rates.get(key)
        except TypeError:  # not hashable: not a rate either; parse_rules says why
            rules, key = None, None
        if rules is None:
            try:
                rules = parse_rules(value, source=f"the value of rate callable {name_of(rate_fn)}")
            except ConfigurationError as exc:
                exc.add_note(f"returned by the rateguard rate callable {name_of(rate_fn)}")
                raise
            if key is not None and len(self._rates) < 256:  # plans are few
                self._rates[key] = rules
        return rules

    async def cost_of(self, conn: HTTPConnection | None, rules: tuple[Rule, ...]) -> int:
        cost = self.cost
        if isinstance(cost, int):
            if self.rate_fn is not None:
                for rule in rules:
                    rule.check_cost(cost, "cost (for the rate callable's rules)")
            return cost
        assert conn is not None  # needs_connection is true whenever cost is callable
        value = await _call(cost, conn, "cost")
        source = f"the value of cost callable {name_of(cost)}"
        for rule in rules:
            rule.check_cost(value, source)
        return int(value)


__all__ = [
    "DEFAULT_MESSAGE",
    "HEADER_CHOICES",
    "MODES",
    "MODE_ENV",
    "Cost",
    "Headers",
    "Identifier",
    "LimitOptions",
    "Mode",
    "Policy",
    "Predicate",
    "Rate",
    "RateCallable",
    "check_mode",
    "header_fields",
]
