"""Rates as people write them: ``"10/second; 1000/day"`` becomes `Rule`s.

Grammar, one rule: ``<n>/<unit>`` or ``<n> per <unit>``, with an optional multiple of the unit
(``100/5 minutes``, ``20 per 30s``); units ``second``, ``minute``, ``hour``, ``day`` and their
short forms (``s``/``sec``, ``m``/``min``, ``h``/``hr``, ``d``) and plurals, any case. Several
rules are separated by ``;`` (or ``,``), and every one of them must pass. A rule ``n/period`` is
a bucket of ``n`` tokens refilled at ``n`` per period. A bare number is requests per minute, as
``limit(5)`` has always meant.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rateguard.bucket import Rule
from rateguard.errors import ConfigurationError

GRAMMAR = (
    "'<n>/<unit>' or '<n> per <unit>', unit second|minute|hour|day (or s, sec, m, min, h, hr, d, "
    "plurals), an optional multiple such as '100/5 minutes', several rules joined by ';'"
)

_UNITS = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86_400),
}
_UNIT_NAMES = {1: "second", 60: "minute", 3600: "hour", 86_400: "day"}
_RULE = re.compile(r"\s*(\d+)\s*(?:/|\s+per\s+)\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*", re.IGNORECASE)

# What a user may give as a rate: a number (a minute's worth), a string, a Rule, or several.
RateValue = float | str | Rule | Sequence[float | str | Rule]


def parse_rule(text: str) -> Rule:
    """One rule, ``"10/second"`` or ``"100 per 5 minutes"``."""
    match = _RULE.fullmatch(text)
    unit = _UNITS.get(match.group(3).lower()) if match else None
    if match is None or unit is None:
        raise ConfigurationError(f"can't read the rate {text.strip()!r}; write {GRAMMAR}")
    amount = int(match.group(1))
    multiple = float(match.group(2)) if match.group(2) else 1.0
    if amount < 1 or multiple <= 0 or math.isinf(multiple):
        raise ConfigurationError(f"the rate {text.strip()!r} must allow at least 1 request in a period > 0")
    seconds = multiple * unit
    name = _UNIT_NAMES[unit] + ("s" if multiple != 1 else "")
    label = f"{amount}/{name}" if multiple == 1 else f"{amount}/{multiple:g} {name}"
    return Rule.per(amount, seconds, label=label)


def parse_rules(value: Any, *, capacity: int | None = None, source: str = "rate") -> tuple[Rule, ...]:
    """Every rule a rate value stands for, checked; ``capacity`` only goes with a single rule."""
    items: list[Any] = []
    for item in value if isinstance(value, list | tuple) else [value]:
        if isinstance(item, str):
            parts = [p for p in re.split(r"[;,]", item) if p.strip()]
            if not parts:
                raise ConfigurationError(f"{source} {item!r} names no rule; write {GRAMMAR}")
            items.extend(parts)
        else:
            items.append(item)
    if not items:
        raise ConfigurationError(f"{source} names no rule; write {GRAMMAR}")
    rules: list[Rule] = []
    for item in items:
        if isinstance(item, Rule):
            rules.append(item)
        elif isinstance(item, str):
            rules.append(parse_rule(item))
        elif isinstance(item, int | float) and not isinstance(item, bool):
            rules.append(Rule(item))  # a minute's worth, as limit(5) has always meant
        else:
            raise ConfigurationError(
                f"{source} must be a number of requests a minute, a string such as '10/second', "
                f"or a list of those, got {item!r}"
            )
    if capacity is not None:
        if len(rules) != 1:
            raise ConfigurationError(
                f"capacity= sets the burst of a single rule, but {source} has {len(rules)}; "
                "write each rule's own count instead (e.g. '20/second; 1000/day')"
            )
        only = rules[0]
        rules = [Rule(only.requests_per_minute, capacity, label=only.label)]
    windows: dict[int, Rule] = {}
    for rule in rules:
        other = windows.get(rule.window)
        if other is not None:
            raise ConfigurationError(
                f"{source} has two rules that refill over the same {rule.window} s ({other} and {rule}); "
                "one of them always decides alone: keep the tighter"
            )
        windows[rule.window] = rule
    return tuple(rules)


def period_label(seconds: int) -> str:
    """A short name for a window, for bucket names: ``1s``, ``5m``, ``1h``, ``1d``, ``90s``."""
    for size, unit in ((86_400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


__all__ = ["GRAMMAR", "RateValue", "parse_rule", "parse_rules", "period_label"]
