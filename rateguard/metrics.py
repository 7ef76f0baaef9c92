"""Prometheus metrics for an app's rate limits, read when Prometheus scrapes: no cost per request.

    from prometheus_client import make_asgi_app
    from rateguard.metrics import instrument

    instrument(app)                          # on prometheus_client's default registry
    app.mount("/metrics", make_asgi_app())

Needs the ``prometheus`` extra: ``pip install 'fastapi-rateguard[prometheus]'``. Every label value is a
rule (a bucket name: ``global``, a route template or a ``limit(name=...)``), an outcome or a
store label (``memory``, ``redis``): never a client, so the number of series is fixed by the
app's configuration, not by its traffic.

    rateguard_decisions_total{rule,outcome}      outcome: allowed, limited, degraded (decided by
                                                 the fallback while Redis was unreachable),
                                                 shadow_limited (would have been refused; shadow mode)
    rateguard_store_latency_seconds{store}       histogram of Redis round trips (decision batches)
    rateguard_store_errors_total{store}          failed Redis round trips
    rateguard_circuit_open{store}                1 while Redis is skipped after failures, else 0
    rateguard_degraded_decisions_total{store}    decisions made by the fallback
    rateguard_deny_cache_hits_total{store}       denials answered from the local deny cache
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "rateguard.metrics needs prometheus-client; install it with: pip install 'fastapi-rateguard[prometheus]'"
    ) from None

from rateguard.admin import decision_counts, discover_rules, labelled_stores
from rateguard.errors import ConfigurationError
from rateguard.stores import Store

_OUTCOMES = ("allowed", "limited", "degraded", "shadow_limited")


class RateGuardCollector(Collector):
    """Collects the decision counts and store health of the apps it is given.

    One collector per registry serves every app instrumented on it (`instrument` adds them):
    an app factory called twice, or two apps in one process, are counted together (each rule's
    counts summed), and an app that is gone drops out.

    :param app: an app whose limits are reported (read from its registry, ``app.state.rateguard``).
    :param store: a store to report besides those the app's limits use.
    """

    def __init__(self, app: Any = None, *, store: Store | None = None) -> None:
        self._apps: weakref.WeakSet[Any] = weakref.WeakSet()
        self._stores: list[Store] = []
        if app is not None:
            self.add(app, store=store)

    def add(self, app: Any, *, store: Store | None = None) -> None:
        if store is not None and not isinstance(store, Store):
            raise ConfigurationError(
                f"store must be a rateguard store such as MemoryStore() or RedisStore(...), "
                f"got {type(store).__name__}"
            )
        self._apps.add(app)
        if store is not None and not any(s is store for s in self._stores):
            self._stores.append(store)

    def describe(self) -> Iterator[Metric]:
        # The names without reading anything, so a registry can refuse a clashing collector early.
        yield from _families()

    def collect(self) -> Iterator[Metric]:
        decisions, latency, errors, circuit, degraded, deny_hits = _families()
        totals: dict[str, list[int]] = {}
        stores: list[Store] = list(self._stores)
        for app in list(self._apps):
            for rule, counts in decision_counts(app).items():
                summed = totals.setdefault(rule, [0] * len(_OUTCOMES))
                for i, value in enumerate(counts):
                    summed[i] += value
            for r in discover_rules(app):
                if not any(s is r.store for s in stores):
                    stores.append(r.store)
        for rule, summed in sorted(totals.items()):
            for outcome, value in zip(_OUTCOMES, summed, strict=True):
                decisions.add_metric([rule, outcome], value)
        yield decisions

        for label, store in labelled_stores(stores):
            hist = getattr(store, "latency", None)
            if hist is not None:
                latency.add_metric([label], _cumulative(hist), sum_value=float(hist.sum))
            if hasattr(store, "errors"):
                errors.add_metric([label], store.errors)
            if hasattr(store, "degraded"):
                circuit.add_metric([label], 1.0 if store.degraded else 0.0)
            if hasattr(store, "degraded_decisions"):
                degraded.add_metric([label], store.degraded_decisions)
            if hasattr(store, "deny_cache_hits"):
                deny_hits.add_metric([label], store.deny_cache_hits)
        yield from (latency, errors, circuit, degraded, deny_hits)


def _families() -> tuple[
    CounterMetricFamily,
    HistogramMetricFamily,
    CounterMetricFamily,
    GaugeMetricFamily,
    CounterMetricFamily,
    CounterMetricFamily,
]:
    return (
        CounterMetricFamily(
            "rateguard_decisions",
            "Rate-limit decisions in this process, by rule (bucket name) and outcome "
            "(degraded: made by the fallback while the store was unreachable).",
            labels=["rule", "outcome"],
        ),
        HistogramMetricFamily(
            "rateguard_store_latency_seconds",
            "Round trips to the store (one per batch of decisions), in seconds.",
            labels=["store"],
        ),
        CounterMetricFamily("rateguard_store_errors", "Failed round trips to the store.", labels=["store"]),
        GaugeMetricFamily(
            "rateguard_circuit_open",
            "1 while the store is skipped after failures (decisions use the fallback), else 0.",
            labels=["store"],
        ),
        CounterMetricFamily(
            "rateguard_degraded_decisions",
            "Decisions made by the fallback while the store was unreachable.",
            labels=["store"],
        ),
        CounterMetricFamily(
            "rateguard_deny_cache_hits",
            "Denials answered from the local deny cache, without a round trip.",
            labels=["store"],
        ),
    )


def _cumulative(hist: Any) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, ending in +Inf) from per-bound counts."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(hist.BOUNDS, hist.counts, strict=True):
        running += n
        buckets.append((repr(float(bound)) if math.isfinite(bound) else "+Inf", float(running)))
    if not buckets or buckets[-1][0] != "+Inf":
        buckets.append(("+Inf", float(running)))
    return buckets


# The collector of each registry instrument() was called for: a registry holds one, whatever the
# number of apps (keyed weakly: a registry that is gone takes its collector with it).
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, RateGuardCollector] = weakref.WeakKeyDictionary()


def instrument(
    app: Any, registry: CollectorRegistry | None = None, *, store: Store | None = None
) -> RateGuardCollector:
    """Report ``app``'s limits on ``registry`` (prometheus_client's default); returns the collector.

    Safe to call again, for another app or for the same (an app factory): the registry's one
    rateguard collector then reports them all.
    """
    target = REGISTRY if registry is None else registry
    collector = _collectors.get(target)
    if collector is None:
        collector = _collectors[target] = RateGuardCollector()
        target.register(collector)
    collector.add(app, store=store)
    return collector


__all__ = ["RateGuardCollector", "instrument"]
