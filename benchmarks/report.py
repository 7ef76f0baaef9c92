"""From measured rounds to `results/<date>.md` and `<date>.png`, and their `latest.*` copies."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.variants import Variant

if TYPE_CHECKING:
    from benchmarks.run import Options

REPO = Path(__file__).resolve().parent.parent
DISTS = (
    "fastapi-rateguard",
    "starlette",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "redis",
    "hiredis",
    "slowapi",
    "limits",
    "fastapi-limiter",
    "pyrate-limiter",
    "throttled-py",
    "matplotlib",
)

# ---------------------------------------------------------------------------------------------
# Machine and versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def source_digest() -> str:
    """A digest of every file under rateguard/, to tell whether the code changed during a run."""
    h = hashlib.sha256()
    for path in sorted((REPO / "rateguard").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def machine_and_versions() -> dict[str, Any]:
    versions: dict[str, str] = {"python": platform.python_version()}
    for dist in DISTS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--", "rateguard"])
        changes = f", uncommitted changes in rateguard/, digest {source_digest()}" if dirty else ""
        versions["fastapi-rateguard"] += f" (git {commit}{changes})"
    wrk = re.search(r"wrk (\S+)", _run([shutil.which("wrk") or "wrk", "-v"]))
    versions["wrk"] = wrk.group(1) if wrk else "?"
    redis = re.search(r"v=(\S+)", _run(["redis-server", "--version"]))
    versions["redis-server"] = redis.group(1) if redis else "not installed"
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        memory = "?"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


# ---------------------------------------------------------------------------------------------
# Summaries


def _ok(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rounds if "error" not in r]


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Summary:
    rounds: int  # rounds that ran without error
    rps: float | None
    ratio: float | None  # median over rounds of rps / no-limiter rps of the same round
    ratios: list[float]
    p50_us: float | None
    p99_us: float | None
    p99_ratio: float | None
    requests: int
    non2xx: int
    socket_errors: int
    server_cpu: float | None  # median share of a CPU the server used during the measured run
    other_cpu: float | None  # median share of the server's CPU that other processes used
    one_rps: float | None
    one_mean_us: float | None
    one_added_us: float | None  # median over rounds of mean latency minus the no-limiter's
    one_added_min_us: float | None  # fastest round's time per request minus the no-limiter's fastest
    one_p50_us: float | None
    one_p99_us: float | None


def paired(
    a: list[dict[str, Any]], b: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
) -> list[tuple[float, float]]:
    """(a, b) values of the rounds where both ran, matched by round number."""
    by_round = {r["round"]: r for r in _ok(b)}
    out = []
    for ra in _ok(a):
        rb = by_round.get(ra["round"])
        if rb is None:
            continue
        va, vb = value(ra), value(rb)
        if va is not None and vb is not None:
            out.append((va, vb))
    return out


def _load(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r["load"][key]


def _one(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r["one"][key] if r.get("one") else None


def summarize(rounds: dict[str, list[dict[str, Any]]], none: str = "none") -> dict[str, Summary]:
    """Per variant: medians over its rounds, and ratios to ``none`` (the no-limiter) in the same round."""
    base = rounds.get(none, [])
    out: dict[str, Summary] = {}
    for name, rs in rounds.items():
        ok = _ok(rs)
        ones = [r["one"] for r in ok if r.get("one")]
        ratios = [a / b for a, b in paired(rs, base, _load("rps")) if b > 0]
        ones_paired = paired(rs, base, _one("rps"))
        out[name] = Summary(
            rounds=len(ok),
            rps=_med([r["load"]["rps"] for r in ok]),
            ratio=_med(ratios),
            ratios=ratios,
            p50_us=_med([r["load"]["p50_us"] for r in ok]),
            p99_us=_med([r["load"]["p99_us"] for r in ok]),
            p99_ratio=_med([a / b for a, b in paired(rs, base, _load("p99_us")) if b > 0]),
            requests=sum(r["load"]["requests"] for r in ok),
            non2xx=sum(r["load"]["non2xx"] for r in ok),
            socket_errors=sum(r["load"]["socket_errors"] for r in ok),
            server_cpu=_med([r["load"]["server_cpu"] for r in ok if r["load"].get("server_cpu") is not None]),
            other_cpu=_med([r["load"]["other_cpu"] for r in ok if r["load"].get("other_cpu") is not None]),
            one_rps=_med([o["rps"] for o in ones]),
            one_mean_us=_med([o["mean_us"] for o in ones]),
            # Closed loop at one connection: 1/req/s is the time per request, to the microsecond,
            # where wrk's percentiles are rounded; the difference cancels wrk's own share.
            one_added_us=_med([1e6 / a - 1e6 / b for a, b in ones_paired]),
            # Noise (a neighbour, an interrupt, a slow CPU) only ever adds time, so each side's
            # fastest round is its best estimate of the undisturbed cost; the difference of the two
            # minima, over the same rounds. (The minimum of the per-round differences would instead
            # pick the round where the no-limiter run was the most disturbed.)
            one_added_min_us=(
                min(1e6 / a for a, _ in ones_paired) - min(1e6 / b for _, b in ones_paired)
                if ones_paired
                else None
            ),
            one_p50_us=_med([o["p50_us"] for o in ones]),
            one_p99_us=_med([o["p99_us"] for o in ones]),
        )
    return out


@dataclass
class Target:
    number: str
    text: str
    measured: str
    passed: bool | None  # None: not measured in this run
    floor: str = ""  # what the minimal reference designs measured in the same run, for context


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


FLOOR_LABELS = {
    "headers-only": "5 fields alone",
    "floor-memory": "least Python token bucket + 5 fields",
    "floor-redis": "least Redis round trip + 5 fields",
}


def targets(
    rounds: dict[str, list[dict[str, Any]]], s: dict[str, Summary], ping_rtt_us: float | None = None
) -> list[Target]:
    # The floors: deliberately minimal references measured in the same run (the fields alone, an
    # inline dict bucket with them, one raw EVALSHA with them) and one bare Redis round trip.
    def floor_of(name: str, attr: str, spec: str, suffix: str) -> str:
        value = getattr(s[name], attr) if name in s else None
        return "" if value is None else f"{FLOOR_LABELS[name]}: {value:{spec}}{suffix}"

    def joined(*parts: str) -> str:
        return "; ".join(p for p in parts if p)

    ping = "" if ping_rtt_us is None else f"one bare PING round trip: {ping_rtt_us:.1f} us"
    memory_floor = joined(
        floor_of("floor-memory", "ratio", ".2f", "x"), floor_of("headers-only", "ratio", ".2f", "x")
    )
    memory_added_floor = floor_of("floor-memory", "one_added_us", ".1f", " us")
    redis_ratio_floor = floor_of("floor-redis", "ratio", ".2f", "x")
    redis_p99_floor = floor_of("floor-redis", "p99_ratio", ".2f", "x")
    redis_added_floor = joined(floor_of("floor-redis", "one_added_us", ".1f", " us"), ping)

    def ratio_target(number: str, text: str, name: str, floor: float, context: str = "") -> Target:
        r = s[name].ratio if name in s else None
        return Target(number, text, _fmt(r, ".2f", "x"), None if r is None else r >= floor, context)

    def added_target(number: str, text: str, name: str, ceiling_us: float, context: str = "") -> Target:
        a = s[name].one_added_us if name in s else None
        return Target(number, text, _fmt(a, ".1f", " us"), None if a is None else a <= ceiling_us, context)

    def pair_target(number: str, text: str, a: str, b: str, floor: float) -> Target:
        if a not in rounds or b not in rounds:
            return Target(number, text, "n/a", None)
        r = _med([x / y for x, y in paired(rounds[a], rounds[b], _load("rps")) if y > 0])
        return Target(number, text, _fmt(r, ".2f", "x"), None if r is None else r >= floor)

    p99 = s["rateguard-redis"].p99_ratio if "rateguard-redis" in s else None
    out = [
        ratio_target(
            "1", "RateGuard + MemoryStore req/s >= 0.95x no limiter", "rateguard-memory", 0.95, memory_floor
        ),
        added_target(
            "1",
            "RateGuard + MemoryStore added latency at 1 connection <= 15 us",
            "rateguard-memory",
            15,
            memory_added_floor,
        ),
        ratio_target(
            "2",
            "RateGuard + RedisStore req/s >= 0.75x no limiter",
            "rateguard-redis",
            0.75,
            redis_ratio_floor,
        ),
        Target(
            "2",
            "RateGuard + RedisStore p99 <= 1.5x no-limiter p99",
            _fmt(p99, ".2f", "x"),
            None if p99 is None else p99 <= 1.5,
            redis_p99_floor,
        ),
        added_target(
            "2",
            "RateGuard + RedisStore added latency at 1 connection <= 100 us",
            "rateguard-redis",
            100,
            redis_added_floor,
        ),
    ]
    for ours in ("rateguard-memory", "rateguard-redis"):
        for peer in ("slowapi-redis", "fastapi-limiter-redis"):
            out.append(pair_target("3", f"{ours} req/s >= 2x {peer}", ours, peer, 2.0))
    out.append(
        pair_target(
            "4",
            "all clients blocked: Redis-backed 429s/s >= 0.9x memory-backed",
            "rateguard-redis-blocked",
            "rateguard-memory-blocked",
            0.9,
        )
    )
    return out


def paired_ratio(rounds: dict[str, list[dict[str, Any]]], a: str, b: str, key: str = "rps") -> float | None:
    """Median over the rounds both ran of a's value / b's (req/s at 32 connections by default)."""
    if a not in rounds or b not in rounds:
        return None
    return _med([x / y for x, y in paired(rounds[a], rounds[b], _load(key)) if y > 0])


def paired_added(rounds: dict[str, list[dict[str, Any]]], a: str, b: str) -> float | None:
    """Median over rounds of a's time per request at one connection minus b's, in microseconds."""
    if a not in rounds or b not in rounds:
        return None
    return _med([1e6 / x - 1e6 / y for x, y in paired(rounds[a], rounds[b], _one("rps")) if x > 0 and y > 0])


def growth_targets(
    rounds: dict[str, list[dict[str, Any]]], s: dict[str, Summary], ping_rtt_us: float | None = None
) -> list[Target]:
    """The targets of issue 16 (and issue 13's before/after) that the one-key run measures."""

    def at_least(number: str, text: str, value: float | None, floor: float, context: str = "") -> Target:
        return Target(
            number, text, _fmt(value, ".2f", "x"), None if value is None else value >= floor, context
        )

    def x_none(name: str) -> str:
        sm = s.get(name)
        return "" if sm is None or sm.ratio is None else f"{sm.ratio:.2f}x no limiter"

    def added(name: str) -> str:
        sm = s.get(name)
        return "" if sm is None or sm.one_added_us is None else f"+{sm.one_added_us:.1f} us"

    out = [
        at_least(
            "1",
            "rateguard memory req/s >= 0.97x floor-memory, one client",
            paired_ratio(rounds, "rateguard-memory", "floor-memory"),
            0.97,
            f"floor-memory: {x_none('floor-memory')}; rateguard memory: {x_none('rateguard-memory')}",
        ),
        at_least(
            "2",
            "rateguard Redis req/s >= 0.95x floor-redis, 32 connections",
            paired_ratio(rounds, "rateguard-redis", "floor-redis"),
            0.95,
            f"floor-redis: {x_none('floor-redis')}; rateguard Redis: {x_none('rateguard-redis')}",
        ),
    ]
    over = paired_added(rounds, "rateguard-redis", "floor-redis")
    ping = "" if ping_rtt_us is None else f"; one bare PING round trip: {ping_rtt_us:.1f} us"
    out.append(
        Target(
            "2",
            "rateguard Redis added latency at one connection <= floor-redis's + 20 us",
            _fmt(over, "+.1f", " us over floor-redis"),
            None if over is None else over <= 20,
            f"floor-redis: {added('floor-redis')}; rateguard Redis: {added('rateguard-redis')}{ping}",
        )
    )
    out.append(
        at_least(
            "7",
            "all clients blocked: Redis-backed 429s/s >= 0.9x memory-backed",
            paired_ratio(rounds, "rateguard-redis-blocked", "rateguard-memory-blocked"),
            0.9,
        )
    )
    # Issue 13: the rewritten RedisStore against the one before it, same harness, same run.
    out.append(
        at_least(
            "13",
            "rateguard Redis req/s at 32 connections >= 0.98x before the rewrite (6d6b562)",
            paired_ratio(rounds, "rateguard-redis", "rateguard-redis-before"),
            0.98,
            f"before: {x_none('rateguard-redis-before')}; now: {x_none('rateguard-redis')}",
        )
    )
    faster = paired_added(rounds, "rateguard-redis", "rateguard-redis-before")
    out.append(
        Target(
            "13",
            "rateguard Redis added latency at one connection <= before the rewrite's + 5 us",
            _fmt(faster, "+.1f", " us vs before"),
            None if faster is None else faster <= 5,
            f"before: {added('rateguard-redis-before')}; now: {added('rateguard-redis')}",
        )
    )
    return out


def target_table(tg: list[Target]) -> list[str]:
    lines = ["| # | target | measured | result | floor, same run |", "|---|---|--:|---|---|"]
    for t in tg:
        result = "not measured" if t.passed is None else ("PASS" if t.passed else "**FAIL**")
        lines.append(f"| {t.number} | {t.text} | {t.measured} | {result} | {t.floor} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Markdown


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _ms(us: float | None) -> str:
    return "n/a" if us is None else f"{us / 1000:.2f} ms"


def _answers(v: Variant, sm: Summary) -> str:
    if sm.rounds == 0:
        return "failed"
    bad = sm.requests - sm.non2xx if v.blocked else sm.non2xx
    want = "429" if v.blocked else "2xx"
    text = f"all {want}" if bad == 0 else f"**{bad} of {sm.requests} not {want}**"
    if sm.socket_errors:
        text += f", {sm.socket_errors} socket errors"
    return text


def markdown(
    *,
    opts: Options,
    variants: list[Variant],
    skipped: list[tuple[str, str]],
    rounds: dict[str, list[dict[str, Any]]],
    store: dict[str, Any] | None,
    ceiling: dict[str, Any] | None,
    meta: dict[str, Any],
    notes: list[str],
    date: str,
    chart: str | None,
) -> str:
    s = summarize(rounds)
    store = dict(store) if store else None
    ping_rtt_us: float | None = store.pop("ping_rtt_us", None) if store else None
    lines: list[str] = []
    add = lines.append
    title = f"# rateguard benchmarks, {date}"
    if opts.mode != "full":
        title += f" ({opts.mode} mode: not for publishing)"
    add(title)
    add("")
    n_rounds = meta.get("rounds_run", opts.rounds)
    walls = meta.get("round_seconds") or []
    per_round = f"{opts.duration:g} s at {opts.connections} connections"
    if opts.latency_duration > 0:
        per_round += f", then {opts.latency_duration:g} s at one"
    add(
        f"Medians of {n_rounds} interleaved round(s). Every variant's server is started once, warmed up "
        f"once ({opts.warmup:g} s of wrk) and kept up for the whole run; each round loads every variant in "
        f"turn ({per_round}), in an order rotated every round, the variants a target divides back to back "
        "(A B, then B A)"
        + (f", and took {statistics.median(walls):.0f} s" if walls else "")
        + ". Ratios are to the no-limiter run of the same round, so slow drift of the machine cancels. "
        f"One uvicorn worker per variant (uvloop, httptools), trivial FastAPI endpoint, wrk from one "
        f"address (so one bucket: for Redis, one hot key, the worst case). {meta['pinning']}. "
        f"gc.freeze() after start-up: {'yes' if opts.gc_freeze else 'no'}."
    )
    add("")
    others = [sm.other_cpu for sm in s.values() if sm.other_cpu is not None]
    if meta["load_before"][0] > 0.5 or (others and max(others) > 0.05):
        add(
            f"**Noisy machine**: load average {meta['load_before'][0]:.2f} before the run; other processes "
            f"took up to {100 * max(others, default=0):.0f}% of the server's CPU during it (median of a "
            "variant's rounds). Treat these figures as provisional and re-run on a quiet machine."
        )
        add("")
    if meta.get("source_changed"):
        add(
            "**rateguard/ changed while the servers started**: servers started at different times ran "
            "different code, and the figures mix both. Re-run."
        )
        add("")
    if meta.get("store_source_changed"):
        add(
            "**rateguard/ changed during the HTTP rounds**: the servers ran the code they loaded at "
            "start, the store-only benchmark the newer code."
        )
        add("")
    if chart:
        add(f"![throughput relative to no limiter]({chart})")
        add("")

    add(f"## Throughput: wrk -t1 -c{opts.connections} -d{opts.duration:g}s, once a round")
    add("")
    add(
        "| variant | req/s | x no limiter | each round | p50 | p99 | p99 x no limiter | server CPU | "
        "others on it | answers |"
    )
    add("|---|--:|--:|--|--:|--:|--:|--:|--:|---|")
    for v in variants:
        sm = s[v.name]
        per_round = " ".join(f"{r:.2f}" for r in sm.ratios) if v.name != "none" else ""
        add(
            f"| {v.label} | {_fmt(sm.rps, ',.0f')} | {_fmt(sm.ratio)} | {per_round} | {_ms(sm.p50_us)} | "
            f"{_ms(sm.p99_us)} | {_fmt(sm.p99_ratio)} | {_pct(sm.server_cpu)} | {_pct(sm.other_cpu)} | "
            f"{_answers(v, sm)} |"
        )
    add("")
    add(
        "*server CPU*: the server's CPU time over the run's wall time. Near 100% it was busy all along; "
        "well below, it was waiting: for Redis, or for its CPU. *others on it*: the share of the "
        "server's CPU that other processes took meanwhile; more than a few % and the run measured "
        "the neighbours too."
    )
    add("")

    if opts.latency_duration > 0:
        add(f"## Added latency at one connection: wrk -t1 -c1 -d{opts.latency_duration:g}s, once a round")
        add("")
        add(
            "Closed loop, one request at a time: time per request = 1 / req/s. *Added* is that time "
            "minus the no-limiter's in the same round (median over rounds), so the client's and the "
            "server's fixed costs cancel; it is the headline. *Added, min* is the variant's fastest "
            "round minus the no-limiter's fastest round: noise only ever adds time, so the minima are "
            "the least disturbed runs; when it is far below the median, the rounds were noisy."
        )
        add("")
        add("| variant | req/s | time per request | added | added, min | p50 | p99 |")
        add("|---|--:|--:|--:|--:|--:|--:|")
        for v in variants:
            sm = s[v.name]
            if v.blocked:
                continue
            add(
                f"| {v.label} | {_fmt(sm.one_rps, ',.0f')} | {_fmt(1e6 / sm.one_rps if sm.one_rps else None, '.1f', ' us')} | "
                f"{'—' if v.name == 'none' else _fmt(sm.one_added_us, '+.1f', ' us')} | "
                f"{'—' if v.name == 'none' else _fmt(sm.one_added_min_us, '+.1f', ' us')} | "
                f"{_fmt(sm.one_p50_us, '.0f', ' us')} | {_fmt(sm.one_p99_us, '.0f', ' us')} |"
            )
        add("")
        if ping_rtt_us is not None:
            add(
                f"One bare Redis round trip (PING on a plain blocking socket, from the server's CPU to "
                f"the redis-server on the other, median) took {ping_rtt_us:.1f} us in this run: the "
                "least any Redis-backed limiter adds to a request here, before its client library, its "
                "script or the event loop do anything. On a VM most of it is waking the two CPUs up."
            )
            add("")

    if store:
        add("## Store only: decisions per second, no HTTP")
        add("")
        add(
            f"`store.take()` in a loop from N asyncio tasks on one bucket, uvloop, {opts.store_seconds:g} s "
            f"runs, median of {opts.store_reps}. The ceiling is redis-benchmark running the same "
            "token-bucket script with EVALSHA on the same redis-server (32 clients): what that server "
            "can decide, whatever the client."
        )
        add("")
        top = (ceiling or {}).get("pipelined", {}).get("rps")
        add("| store | concurrency 1 | concurrency 64 | c64 / EVALSHA ceiling |")
        add("|---|--:|--:|--:|")
        for name, per in store.items():
            c1, c64 = per.get("1"), per.get("64")
            share = _fmt(c64 / top, ".2f", "x") if (name == "redis" and top and c64) else "—"
            add(f"| {name} | {_fmt(c1, ',.0f')} | {_fmt(c64, ',.0f')} | {share} |")
        if ceiling:
            for label in ("pipelined", "unpipelined"):
                if label in ceiling:
                    add(
                        f"| redis-benchmark EVALSHA, {label} | | {ceiling[label]['rps']:,.0f} | "
                        f"{'1.00x' if label == 'pipelined' else ''} |"
                    )
        add("")

    add("## Targets (issue 16, one client; the growth targets are in scale-latest.md)")
    add("")
    add(
        "Each ratio is the median over rounds of the two variants' req/s in the same round; each "
        "latency difference, the median over rounds of their times per request at one connection. "
        "*floor, same run*: the minimal references measured in the same rounds. Issue 13 compares "
        "the rewritten RedisStore with the one before it (`rateguard-redis-before`: commit 6d6b562, "
        "extracted from git, the same app and harness)."
    )
    add("")
    lines.extend(target_table(growth_targets(rounds, s, ping_rtt_us)))
    add("")
    add("## Targets (issue 5)")
    add("")
    add(
        "*floor, same run*: what the least possible design measured here, for scale: a token bucket "
        "written inline with the same five header fields (`floor-memory`), the fields alone "
        "(`headers-only`), one raw EVALSHA per request with the same fields (`floor-redis`), one bare "
        "PING round trip to the same redis-server from the server's CPU."
    )
    add("")
    lines.extend(target_table(targets(rounds, s, ping_rtt_us)))
    add("")

    add("## Machine and versions")
    add("")
    load_before = ", ".join(f"{x:.2f}" for x in meta["load_before"])
    load_after = ", ".join(f"{x:.2f}" for x in meta["load_after"])
    add(f"- CPU: {meta['cpu']}, {meta['cores']} cores, {meta['memory']} memory, {meta['os']}")
    add(
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}. Anything else running "
        "on the machine shows up here; a quiet machine is near 0 before a run."
    )
    add(
        f"- took {meta['elapsed_s'] / 60:.1f} min, started {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(meta['started']))}"
    )
    add("- " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    add("")

    add("## Variants")
    add("")
    for v in variants:
        add(f"- **{v.label}** (`{v.name}`): {v.what}.")
    for name, why in skipped:
        add(f"- `{name}`: skipped, {why}.")
    add("")

    add("## Commands")
    add("")
    add("```")
    lines.extend(meta["commands"])
    add("```")
    add("")

    if notes:
        add("## Notes")
        add("")
        for n in notes:
            first, _, rest = n.partition("\n")
            add(f"- {first}")
            if rest:
                add("")
                add("  ```")
                lines.extend(f"  {line}" for line in rest.splitlines())
                add("  ```")
        add("")

    add("<details><summary>Every round</summary>")
    add("")
    add("| round | variant | req/s | p50 | p99 | 1-conn req/s |")
    add("|--:|---|--:|--:|--:|--:|")
    for v in variants:
        for r in rounds[v.name]:
            if "error" in r:
                add(f"| {r['round']} | {v.label} | error | | | |")
                continue
            one = f"{r['one']['rps']:,.0f}" if r.get("one") else ""
            add(
                f"| {r['round']} | {v.label} | {r['load']['rps']:,.0f} | {_ms(r['load']['p50_us'])} | "
                f"{_ms(r['load']['p99_us'])} | {one} |"
            )
    add("")
    add("</details>")
    add("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Chart


def chart(path: Path, variants: list[Variant], rounds: dict[str, list[dict[str, Any]]], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", flush=True)
        return False
    s = summarize(rounds)
    shown = [v for v in variants if v.name != "none" and s[v.name].ratio is not None]
    if not shown:
        return False
    labels = [v.label for v in shown]
    values = [s[v.name].ratio or 0.0 for v in shown]
    lows = [min(s[v.name].ratios) for v in shown]
    highs = [max(s[v.name].ratios) for v in shown]
    colors = [
        "#1f77b4"
        if v.name.startswith("rateguard")
        else (
            "#bbbbbb"
            if v.name in ("basehttp-noop", "headers-only", "floor-memory", "floor-redis")
            else "#ff7f0e"
        )  # references: grey
        for v in shown
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.6))
    y = list(range(len(shown)))[::-1]
    ax.barh(y, values, color=colors)
    ax.errorbar(
        values,
        y,
        xerr=[
            [v - lo for v, lo in zip(values, lows, strict=True)],
            [hi - v for v, hi in zip(values, highs, strict=True)],
        ],
        fmt="none",
        ecolor="#333333",
        capsize=3,
        linewidth=1,
    )
    for yi, v, hi in zip(y, values, highs, strict=True):
        ax.text(max(v, hi) + 0.03, yi, f"{v:.2f}", va="center", fontsize=9, backgroundcolor="white")
    ax.axvline(1.0, color="#333333", linewidth=1)
    ax.axvline(0.95, color="#2ca02c", linestyle="--", linewidth=0.8, label="target 1, memory: 0.95")
    ax.axvline(0.75, color="#2ca02c", linestyle=":", linewidth=0.8, label="target 2, Redis: 0.75")
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    ax.set_yticks(y, labels)
    ax.set_xlim(0, max(1.15, max(highs) + 0.25))
    ax.set_xlabel("req/s relative to no limiter, same round (median; bars: min-max of rounds)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def write(
    *,
    opts: Options,
    variants: list[Variant],
    skipped: list[tuple[str, str]],
    rounds: dict[str, list[dict[str, Any]]],
    store: dict[str, Any] | None,
    ceiling: dict[str, Any] | None,
    meta: dict[str, Any],
    notes: list[str],
) -> list[Path]:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d", time.localtime(meta["started"]))
    title = (
        f"rateguard benchmarks {date}: wrk -c{opts.connections}, {meta.get('rounds_run', opts.rounds)} "
        f"round(s) x {opts.duration:g} s, {meta['cores']} cores"
    )
    written: list[Path] = []
    png = out / f"{date}.png"
    has_chart = chart(png, variants, rounds, title)
    if has_chart:
        shutil.copyfile(png, out / "latest.png")
        written += [png, out / "latest.png"]
    for name, chart_name in ((f"{date}.md", f"{date}.png"), ("latest.md", "latest.png")):
        text = markdown(
            opts=opts,
            variants=variants,
            skipped=skipped,
            rounds=rounds,
            store=store,
            ceiling=ceiling,
            meta=meta,
            notes=notes,
            date=date,
            chart=chart_name if has_chart else None,
        )
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    # Every figure, for summary.md (python -m benchmarks.summary) and for later reading.
    raw = {
        "mode": opts.mode,
        "date": date,
        "variants": [v.name for v in variants],
        "labels": {v.name: v.label for v in variants},
        "rounds": rounds,
        "store": store,
        "ceiling": ceiling,
        "meta": meta,
        "notes": notes,
        "connections": opts.connections,
    }
    (out / "latest.json").write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    written.append(out / "latest.json")
    from benchmarks import summary  # the README's fragment, from this run and the last growth run

    written.extend(summary.write(out))
    return written
