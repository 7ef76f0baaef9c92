"""What clients see: the RateLimit fields, X-RateLimit-*, Retry-After and the 429/503 bodies.

``RateLimit-Policy``/``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10) list every limit
that applied; the ``X-RateLimit-*`` trio describes the tightest; ``Retry-After`` comes with a
refusal only. Every value is a valid RFC 9651 structured field: names are sf-strings (anything
outside printable ASCII percent-encoded, so it survives), integers have at most 15 digits (rules
are bounded at configuration).
"""

from __future__ import annotations

import json
import math
from urllib.parse import quote

from rateguard.bucket import EPSILON, Decision, Rule
from rateguard.errors import StoreError
from rateguard.policy import Headers

UNAVAILABLE_MESSAGE = "The rate limiter's store is unavailable, please try again shortly."


def sf_string(text: str) -> str:
    """A Structured Field string: printable ASCII; ``%`` and anything else percent-encoded."""
    cleaned = quote(text, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~\"\\", errors="surrogatepass")
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


class PolicyHeader:
    """The parts of one bucket's fields that never change, rendered once as bytes."""

    __slots__ = ("item", "limit", "limit_field", "name", "policy_field", "ratelimit_format")

    def __init__(self, name: str, rule: Rule) -> None:
        self.name = name
        sf = sf_string(name).encode("ascii")
        self.item = b"%s;q=%d;w=%d" % (sf, rule.burst, rule.window)
        self.limit = b"%d" % rule.burst
        # Whole header fields for the one-policy case, which every response of a plain app takes.
        self.policy_field = (b"ratelimit-policy", self.item)
        self.limit_field = (b"x-ratelimit-limit", self.limit)
        self.ratelimit_format = sf.replace(b"%", b"%%") + b";r=%d;t=%d"


# One applied limit of a request: the bucket's header parts and its decision.
Applied = tuple[PolicyHeader, Decision]


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


_IETF_FIELDS = (b"ratelimit-policy", b"ratelimit")
_X_FIELDS = (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")


def render(applied: list[Applied], fields: Headers = True) -> list[tuple[bytes, bytes]]:
    """`render_all`, less the fields the ``headers`` option leaves out (``Retry-After`` stays)."""
    headers = render_all(applied)
    if fields is True:
        return headers
    dropped = _IETF_FIELDS + _X_FIELDS if fields is False else _X_FIELDS if fields == "ietf" else _IETF_FIELDS
    return [(name, value) for name, value in headers if name not in dropped]


def render_all(applied: list[Applied]) -> list[tuple[bytes, bytes]]:
    """Every field for the limits that applied to one request."""
    if len(applied) == 1:  # the common case, kept cheap: it runs on every response
        policy, d = applied[0]
        allowed, _, remaining, retry_after, reset_after, rate, _ = d  # unpacked once: fewer lookups
        reset = math.ceil(reset_after - 1e-9)  # _ceil(), inline: reset_after is never < 0
        if allowed and reset_after > EPSILON and rate > 0:  # `_next_token_seconds`, inline
            missing = reset_after * rate
            frac = missing - math.floor(missing)
            t = math.ceil((frac if frac > EPSILON else 1.0) / rate - 1e-9)
        else:
            t = _next_token_seconds(d)
        headers = [
            policy.policy_field,
            (b"ratelimit", policy.ratelimit_format % (remaining, t if t > 0 else 0)),
            policy.limit_field,
            (b"x-ratelimit-remaining", b"%d" % remaining),
            (b"x-ratelimit-reset", b"%d" % (reset if reset > 0 else 0)),
        ]
        if not allowed:
            headers.append((b"retry-after", b"%d" % max(1, _ceil(retry_after))))
        return headers
    # The X- fields follow the worst limit: denied beats allowed; then fewest remaining; then the
    # longest wait (the first of equals). One loop, written out, each decision unpacked once: a
    # two-rule limit runs it on every response.
    worst = None
    w_allowed, w_remaining, w_retry, w_reset = True, 0, 0.0, 0.0
    items = []
    parts = []
    refused = False
    for policy, (allowed, _, remaining, retry_after, reset_after, rate, _) in applied:
        items.append(policy.item)
        if not allowed:
            refused = True
            t = _ceil(retry_after)
        elif reset_after <= EPSILON or rate <= 0:
            t = 0
        else:  # `_next_token_seconds`, inline: this runs for every rule of every response
            missing = reset_after * rate
            frac = missing - math.floor(missing)
            t = math.ceil((frac if frac > EPSILON else 1.0) / rate - 1e-9)
        parts.append(policy.ratelimit_format % (remaining, t if t > 0 else 0))
        if worst is None or (
            allowed < w_allowed
            or (
                allowed == w_allowed
                and (remaining < w_remaining or (remaining == w_remaining and retry_after > w_retry))
            )
        ):
            worst, w_allowed, w_remaining, w_retry, w_reset = (
                policy,
                allowed,
                remaining,
                retry_after,
                reset_after,
            )
    assert worst is not None  # applied has two limits or more here
    reset = math.ceil(w_reset - 1e-9)  # _ceil(), inline
    headers = [
        (b"ratelimit-policy", b", ".join(items)),
        (b"ratelimit", b", ".join(parts)),
        (b"x-ratelimit-limit", worst.limit),
        (b"x-ratelimit-remaining", b"%d" % w_remaining),
        (b"x-ratelimit-reset", b"%d" % (reset if reset > 0 else 0)),
    ]
    if refused:
        headers.append((b"retry-after", b"%d" % retry_after_seconds(applied)))
    return headers


def retry_after_seconds(applied: list[Applied]) -> int:
    """Whole seconds until every limit that refused would pass: the longest of their waits."""
    return max(1, _ceil(max((d.retry_after for _, d in applied if not d.allowed), default=1)))


def unavailable_seconds(exc: StoreError) -> int:
    return max(1, _ceil(getattr(exc, "retry_after", 1.0)))


def error_body(message: str, retry_after: int, error: str = "Too Many Requests") -> bytes:
    return json.dumps(
        {"error": error, "message": message, "retry_after": retry_after},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


__all__ = [
    "UNAVAILABLE_MESSAGE",
    "Applied",
    "PolicyHeader",
    "as_dict",
    "error_body",
    "render",
    "render_all",
    "retry_after_seconds",
    "sf_string",
    "unavailable_seconds",
]
