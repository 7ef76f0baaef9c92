"""From the growth runs (`benchmarks.scale`) to `results/scale-<date>.md`, `.png` and their figures."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.report import (
    Target,
    _fmt,
    _med,
    _ms,
    _ok,
    _pct,
    paired_ratio,
    summarize,
    target_table,
)
from benchmarks.variants import BY_NAME, SCALE_BY_NAME

if TYPE_CHECKING:
    from benchmarks.scale import Options

ALL = {**BY_NAME, **SCALE_BY_NAME}
PEERS = ("keyed-slowapi-redis", "keyed-fastapi-limiter-redis", "keyed-throttled-redis")
FLOORS = ("keyed-floor-memory", "keyed-floor-redis")
SCRIPT_COMMANDS = ("evalsha", "eval", "fcall")
TARGET_CLIENTS = "100000"  # targets 1 (many clients), 3 and 6 are read at 100k clients
BIG, SMALL = "1000000", "10000"  # target 4's cliff: 1M against 10k


def label(name: str) -> str:
    v = ALL.get(name)
    return v.label if v is not None else name


def _clients(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(sorted(results.get("clients", {}).items(), key=lambda kv: int(kv[0])))


def _summaries(phase: dict[str, Any]) -> dict[str, Any]:
    return summarize(phase.get("rounds", {}), none="keyed-none")


# ---------------------------------------------------------------------------------------------
# Redis time per request, from commandstats and the MONITOR sample


def top_share(monitor: dict[str, Any], command: str) -> float:
    """The share of a command's calls that the client sent itself (not a script): 1 if unseen."""
    name = command.split("|")[0]
    top = monitor.get("top", {}).get(name, 0)
    lua = monitor.get("lua", {}).get(name, 0)
    return 1.0 if top + lua == 0 else top / (top + lua)


def redis_per_request(phase: dict[str, Any], name: str) -> dict[str, float | None]:
    """Medians over the variant's rounds: Redis time (commandstats, the client's own commands, a
    script's calls inside its time), Redis CPU, script calls and script usec per call."""
    monitor = phase.get("monitor", {}).get(name, {})
    times, cpus, calls, per_call, commands = [], [], [], [], []
    for r in _ok(phase.get("rounds", {}).get(name, [])):
        stats = r.get("redis")
        requests = r["load"]["requests"]
        if not stats or requests <= 0:
            continue
        cmds = stats["commands"]
        times.append(sum(c["usec"] * top_share(monitor, n) for n, c in cmds.items()) / requests)
        commands.append(sum(c["calls"] * top_share(monitor, n) for n, c in cmds.items()) / requests)
        cpus.append(stats["cpu_s"] * 1e6 / requests)
        script_calls = sum(c["calls"] for n, c in cmds.items() if n in SCRIPT_COMMANDS)
        script_usec = sum(c["usec"] for n, c in cmds.items() if n in SCRIPT_COMMANDS)
        calls.append(script_calls / requests)
        if script_calls:
            per_call.append(script_usec / script_calls)
    return {
        "usec": _med(times),
        "cpu_usec": _med(cpus),
        "commands": _med(commands),
        "script_calls": _med(calls),
        "script_usec_per_call": _med(per_call),
    }


def command_mix(phase: dict[str, Any], name: str) -> str:
    """The client's own commands per request and their usec per call, e.g. ``evalsha 1.00 x 6.1 us``."""
    monitor = phase.get("monitor", {}).get(name, {})
    total: dict[str, list[float]] = {}
    requests = 0
    for r in _ok(phase.get("rounds", {}).get(name, [])):
        stats = r.get("redis")
        if not stats:
            continue
        requests += r["load"]["requests"]
        for n, c in stats["commands"].items():
            share = top_share(monitor, n)
            if share > 0:
                acc = total.setdefault(n, [0.0, 0.0])
                acc[0] += c["calls"] * share
                acc[1] += c["usec"] * share
    if not requests:
        return ""
    parts = [
        f"{n} {calls / requests:.2f} x {usec / calls:.1f} us"
        for n, (calls, usec) in sorted(total.items(), key=lambda kv: -kv[1][1])
        if calls / requests >= 0.005
    ]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Targets


def _mem(results: dict[str, Any], what: str, size: str, key: str = "bytes_per_bucket") -> float | None:
    value = results.get("memory", {}).get(what, {}).get(size, {}).get(key)
    return float(value) if value is not None else None


def cliff(results: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    """(x no limiter at 1M / at 10k, req/s at 1M / at 10k) of a variant."""
    phases = results.get("clients", {})
    if BIG not in phases or SMALL not in phases:
        return None, None
    big, small = _summaries(phases[BIG]).get(name), _summaries(phases[SMALL]).get(name)
    if big is None or small is None:
        return None, None
    ratio = big.ratio / small.ratio if big.ratio and small.ratio else None
    raw = big.rps / small.rps if big.rps and small.rps else None
    return ratio, raw


def best_peer(phase: dict[str, Any]) -> str | None:
    s = _summaries(phase)
    peers = [(s[p].ratio, p) for p in PEERS if p in s and s[p].ratio is not None]
    return max(peers)[1] if peers else None


def scale_targets(results: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    phases = results.get("clients", {})
    many = phases.get(TARGET_CLIENTS)

    def at_least(number: str, text: str, value: float | None, floor: float, context: str = "") -> Target:
        return Target(
            number, text, _fmt(value, ".2f", "x"), None if value is None else value >= floor, context
        )

    def xnone(phase: dict[str, Any] | None, name: str) -> str:
        if phase is None:
            return ""
        sm = _summaries(phase).get(name)
        return "" if sm is None or sm.ratio is None else f"{label(name)}: {sm.ratio:.2f}x no limiter"

    def joined(*parts: str) -> str:
        return "; ".join(p for p in parts if p)

    rounds = many.get("rounds", {}) if many else {}
    out.append(
        at_least(
            "1",
            "rateguard memory req/s >= 0.97x floor-memory, 100,000 clients",
            paired_ratio(rounds, "keyed-rateguard-memory", "keyed-floor-memory"),
            0.97,
            joined(xnone(many, "keyed-floor-memory"), xnone(many, "keyed-rateguard-memory")),
        )
    )
    out.append(
        at_least(
            "3",
            "100,000 clients on Redis: rateguard req/s >= 0.75x the same app without a limiter",
            paired_ratio(rounds, "keyed-rateguard-redis", "keyed-none"),
            0.75,
            joined(xnone(many, "keyed-floor-redis"), xnone(many, "keyed-rateguard-redis")),
        )
    )
    peer = best_peer(many) if many else None
    out.append(
        at_least(
            "3",
            "100,000 clients on Redis: rateguard req/s >= 2x the best peer on the same keys"
            + (f" ({label(peer)})" if peer else ""),
            paired_ratio(rounds, "keyed-rateguard-redis", peer) if peer else None,
            2.0,
            (
                f"least Redis round trip: {_fmt(paired_ratio(rounds, 'keyed-floor-redis', peer), '.2f', 'x')} "
                f"the same peer; {xnone(many, peer)}"
            )
            if peer
            else "",
        )
    )
    rss = _mem(results, "memory", BIG)
    traced = _mem(results, "memory traced", BIG)
    least = _mem(results, "floor", BIG)
    out.append(
        Target(
            "4",
            "1,000,000 buckets: MemoryStore bytes per bucket <= 300 (RSS growth)",
            _fmt(rss, ".0f", " B"),
            None if rss is None else rss <= 300,
            f"tracemalloc: {_fmt(traced, '.0f', ' B')}; least Python bucket (a dict of [tokens, last]): "
            f"{_fmt(least, '.0f', ' B')} RSS, {_fmt(_mem(results, 'floor traced', BIG), '.0f', ' B')} traced",
        )
    )
    per_key = _mem(results, "redis", BIG, "bytes_per_key")
    usage = _mem(results, "redis", BIG, "memory_usage_median")
    least_redis = _mem(results, "redis least", BIG, "bytes_per_key")
    least_named = _mem(results, "redis least named", BIG, "bytes_per_key")
    out.append(
        Target(
            "4",
            "1,000,000 buckets: Redis bytes per bucket <= 150 (used_memory growth / keys)",
            _fmt(per_key, ".0f", " B"),
            None if per_key is None else per_key <= 150,
            f"MEMORY USAGE of a key: {_fmt(usage, '.0f', ' B')}; least Redis bucket (a short key, one string, "
            f"an expiry): {_fmt(least_redis, '.0f', ' B')}; the same under rateguard's key "
            f"(`rateguard:{{k…}}:global`, 16 bytes): {_fmt(least_named, '.0f', ' B')}",
        )
    )
    for name, floor_name in (
        ("keyed-rateguard-memory", "keyed-floor-memory"),
        ("keyed-rateguard-redis", "keyed-floor-redis"),
    ):
        ratio, raw = cliff(results, name)
        floor_ratio, _ = cliff(results, floor_name)
        out.append(
            at_least(
                "4",
                f"{label(name)}: req/s at 1,000,000 clients >= 0.9x at 10,000 (no cliff; x no limiter of each)",
                ratio,
                0.9,
                f"raw req/s 1M / 10k: {_fmt(raw, '.2f', 'x')}; {label(floor_name)}: {_fmt(floor_ratio, '.2f', 'x')}",
            )
        )
    rules = results.get("rules", {}).get("rounds", {})
    if rules:
        phase = results["rules"]
        one, two = redis_per_request(phase, "rules-redis-1"), redis_per_request(phase, "rules-redis-2")
        both = redis_per_request(phase, "rules-redis-global-route")
        out.append(
            at_least(
                "5",
                "a two-rule limit() on Redis req/s >= 0.95x the one-rule limit()",
                paired_ratio(rules, "rules-redis-2", "rules-redis-1"),
                0.95,
                f"EVALSHA per request: one rule {_fmt(one['script_calls'], '.2f')}, two rules "
                f"{_fmt(two['script_calls'], '.2f')}, RateGuard + route limit {_fmt(both['script_calls'], '.2f')}",
            )
        )
    if many is not None:
        ours = redis_per_request(many, "keyed-rateguard-redis")
        refs = many.get("scripts", {})
        incr = refs.get("INCR", {}).get("usec_per_call")
        empty = refs.get("empty script", {}).get("usec_per_call")
        least = refs.get("least Lua token bucket", {}).get("usec_per_call")
        per_call = ours["script_usec_per_call"]
        out.append(
            Target(
                "6",
                "rateguard's script costs Redis <= 2x a bare INCR per call (usec_per_call, 100,000 clients)",
                _fmt(per_call / incr if per_call and incr else None, ".2f", "x INCR"),
                None if per_call is None or not incr else per_call <= 2 * incr,
                f"script {_fmt(per_call, '.2f', ' us')}, INCR {_fmt(incr, '.2f', ' us')}; least Lua token "
                f"bucket: {_fmt(least / incr if least and incr else None, '.2f', 'x INCR')}; empty script: "
                f"{_fmt(empty / incr if empty and incr else None, '.2f', 'x INCR')}",
            )
        )
        for p in PEERS:
            theirs = redis_per_request(many, p)
            if theirs["usec"] is None:
                continue
            out.append(
                Target(
                    "6",
                    f"rateguard's Redis time per request < {label(p)}'s (commandstats, 100,000 clients)",
                    f"{_fmt(ours['usec'], '.2f', ' us')} vs {_fmt(theirs['usec'], '.2f', ' us')}",
                    None if ours["usec"] is None else ours["usec"] < theirs["usec"],
                    f"Redis CPU per request: {_fmt(ours['cpu_usec'], '.1f', ' us')} vs {_fmt(theirs['cpu_usec'], '.1f', ' us')}",
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def _noisy(results: dict[str, Any], meta: dict[str, Any]) -> tuple[bool, float]:
    others = [
        r["load"]["other_cpu"]
        for phase in [
            *results.get("clients", {}).values(),
            results.get("rules", {}),
            results.get("servers", {}),
        ]
        for rs in (phase or {}).get("rounds", {}).values()
        for r in _ok(rs)
        if r["load"].get("other_cpu") is not None
    ]
    top = statistics.median(sorted(others)[len(others) // 2 :]) if others else 0.0  # the upper half's median
    return meta["load_before"][0] > 0.5 or top > 0.05, top


def markdown(
    opts: Options,
    results: dict[str, Any],
    meta: dict[str, Any],
    notes: list[str],
    skipped: list[tuple[str, str]],
    date: str,
    chart: str | None,
) -> str:
    lines: list[str] = []
    add = lines.append
    title = f"# rateguard as the work grows, {date}"
    if opts.mode != "full":
        title += f" ({opts.mode} mode: not for publishing)"
    add(title)
    add("")
    add(
        f"`python -m benchmarks.scale` (issue 16). One uvicorn worker per variant (uvloop, httptools), "
        f"{meta['pinning']}; {opts.rounds} interleaved round(s) of `wrk -t1 -c{opts.connections} -d{opts.duration}s` "
        "per part, the order rotated every round (the variants a target divides back to back: A B, then B A), each ratio to the no-limiter run of the same round. "
        "Clients are told apart by an `x-api-key` header that wrk's script takes from a walk over N keys "
        "(each key once every N requests, consecutive keys far apart); every app is keyed by it "
        '(rateguard: `identifier=lambda r: r.headers.get("x-api-key")`). Every limit is a bucket of '
        "10^9 refilled at one token an hour: nothing is refused, and every bucket a client touched stays "
        "in the store for the whole run, as under a real daily limit. rateguard and the floors start "
        "with the buckets of all N clients made (through rateguard's public `Limiter`, the same keys); "
        "the peers start empty and hold only what the runs made."
    )
    add("")
    noisy, others = _noisy(results, meta)
    if noisy:
        add(
            f"**Noisy machine**: load average {meta['load_before'][0]:.2f} before the run; other processes took "
            f"{100 * others:.0f}% of the servers' CPU in the busier half of the runs. Treat these figures as "
            "provisional and re-run on a quiet machine."
        )
        add("")
    if meta.get("source_changed"):
        add(
            "**rateguard/ changed during the run**: servers started at different times ran different code. Re-run."
        )
        add("")
    if chart:
        add(f"![cost against the number of clients]({chart})")
        add("")

    phases = _clients(results)
    if phases:
        names = list(dict.fromkeys(n for ph in phases.values() for n in ph.get("rounds", {})))
        ns = list(phases)
        add(f"## Distinct clients: wrk -t1 -c{opts.connections} -d{opts.duration}s, x-api-key over N keys")
        add("")
        add(
            "req/s relative to the same app without a limiter, same round (median; min-max of the rounds), and p99."
        )
        add("")
        add("| variant | " + " | ".join(f"{int(n):,} clients" for n in ns) + " |")
        add("|---|" + "--:|" * len(ns))
        sums = {n: _summaries(ph) for n, ph in phases.items()}
        for name in names:
            cells = []
            for n in ns:
                sm = sums[n].get(name)
                if sm is None or sm.rounds == 0:
                    cells.append("")
                    continue
                spread = (
                    f" ({min(sm.ratios):.2f}-{max(sm.ratios):.2f})"
                    if name != "keyed-none" and sm.ratios
                    else ""
                )
                ratio = "1.00" if name == "keyed-none" else _fmt(sm.ratio)
                cells.append(f"{ratio}{spread}, {_ms(sm.p99_us)}")
            add(f"| {label(name)} | " + " | ".join(cells) + " |")
        add("")
        add(
            "| variant | "
            + " | ".join(f"req/s, {int(n):,}" for n in ns)
            + " | server CPU | others on it | answers |"
        )
        add("|---|" + "--:|" * len(ns) + "--:|--:|---|")
        for name in names:
            rps = [_fmt(sums[n][name].rps, ",.0f") if name in sums[n] else "" for n in ns]
            present = [sums[n][name] for n in ns if name in sums[n]]
            cpu = _pct(_med([sm.server_cpu for sm in present if sm.server_cpu is not None]))
            oth = _pct(_med([sm.other_cpu for sm in present if sm.other_cpu is not None]))
            bad = sum(sm.non2xx for sm in present)
            errs = sum(sm.socket_errors for sm in present)
            answers = "all 2xx" if not bad else f"**{bad} not 2xx**"
            if errs:
                answers += f", {errs} socket errors"
            add(f"| {label(name)} | " + " | ".join(rps) + f" | {cpu} | {oth} | {answers} |")
        add("")
        add("### Server memory after the runs")
        add("")
        add(
            "RSS of each server once its rounds were done, and the buckets its store held (`GET /_bench/state`; "
            "one more than the clients: the readiness check's request, keyed by address). For Redis, the "
            "keys in its database."
        )
        add("")
        add("| variant | " + " | ".join(f"{int(n):,} clients" for n in ns) + " |")
        add("|---|" + "--:|" * len(ns))
        for name in names:
            cells = []
            for n in ns:
                st = phases[n].get("state", {}).get(name)
                if not st:
                    cells.append("")
                    continue
                parts = [f"{st['rss'] / 2**20:,.0f} MB" if st.get("rss") else "?"]
                if st.get("buckets") is not None:
                    parts.append(f"{st['buckets']:,} buckets")
                if st.get("dbsize") is not None:
                    parts.append(f"{st['dbsize']:,} keys")
                cells.append(", ".join(parts))
            add(f"| {label(name)} | " + " | ".join(cells) + " |")
        add("")

    if phases and any(ALL[n].redis for n in names if n in ALL):
        add("## Redis server time per decision")
        add("")
        add(
            "Each Redis run starts with `CONFIG RESETSTAT` and ends with `INFO commandstats` and `INFO cpu` "
            "(nothing else uses the server meanwhile). *Redis time*: the usec of the commands the variant "
            "sends itself per request (a script's own calls are inside its time; which are which comes from "
            "a `MONITOR` sample of each server); *Redis CPU*: the server's user + system CPU per request, "
            "reading and writing the sockets included. *Commands*: the client's own, per request, with "
            "their usec per call. The references are redis-benchmark on the same server (32 clients, keys "
            "spread over the same N): a bare `INCR`, an empty script (`return 0`: what any script call "
            "costs), the least Lua token bucket (read, refill, take, write, expire: no more) and "
            "rateguard's script, without HTTP."
        )
        add("")
        add("| clients | variant | commands per request | Redis time | Redis CPU |")
        add("|--:|---|---|--:|--:|")
        for n, ph in phases.items():
            for name in names:
                if not ALL.get(name) or not ALL[name].redis or name not in ph.get("rounds", {}):
                    continue
                rr = redis_per_request(ph, name)
                add(
                    f"| {int(n):,} | {label(name)} | {command_mix(ph, name)} | {_fmt(rr['usec'], '.2f', ' us')} | "
                    f"{_fmt(rr['cpu_usec'], '.1f', ' us')} |"
                )
            for ref, v in ph.get("scripts", {}).items():
                add(
                    f"| {int(n):,} | *reference:* {ref}, redis-benchmark | | {_fmt(v.get('usec_per_call'), '.2f', ' us')} | |"
                )
        add("")

    mem = results.get("memory")
    if mem:
        add("## Memory per bucket")
        add("")
        add(
            "No HTTP: each store in a fresh process (`python -m benchmarks.memorybench`), filled with the "
            "buckets of clients k0, k1, ... through rateguard's `Limiter` (the keys `identifier=` makes), "
            "then measured: the process's RSS growth and, in a second pass, tracemalloc's count, per bucket; "
            "for Redis, `used_memory` growth per key and `MEMORY USAGE` of sampled keys. Both include the "
            "client's key, which a store must hold."
        )
        add("")
        sizes = sorted({int(k) for what in ("memory", "redis") for k in mem.get(what, {})})
        add("| store | " + " | ".join(f"{n:,} buckets" for n in sizes) + " |")
        add("|---|" + "--:|" * len(sizes))
        rows = (
            ("MemoryStore, RSS", "memory", "bytes_per_bucket"),
            ("MemoryStore, tracemalloc", "memory traced", "bytes_per_bucket"),
            ("*reference:* least Python bucket (dict of [tokens, last]), RSS", "floor", "bytes_per_bucket"),
            ("*reference:* least Python bucket, tracemalloc", "floor traced", "bytes_per_bucket"),
            ("RedisStore, used_memory / keys", "redis", "bytes_per_key"),
            ("RedisStore, MEMORY USAGE (median)", "redis", "memory_usage_median"),
            (
                "*reference:* least Redis bucket (key `b{k…}`, one string, PX), used_memory / keys",
                "redis least",
                "bytes_per_key",
            ),
            ("*reference:* least Redis bucket, MEMORY USAGE", "redis least", "memory_usage_median"),
            (
                "*reference:* least Redis bucket under rateguard's key (`rateguard:{k…}:global`, 16 bytes), used_memory / keys",
                "redis least named",
                "bytes_per_key",
            ),
        )
        for text, what, key in rows:
            if what in mem:
                add(
                    f"| {text} | "
                    + " | ".join(_fmt(_mem(results, what, str(n), key), ",.0f", " B") for n in sizes)
                    + " |"
                )
        add("")
        red = mem.get("redis", {})
        if red:
            last = red[str(max(int(k) for k in red))]
            add(
                f"RedisStore: {last.get('keys_per_client', 0):.2f} keys per client (one per rule, plus one "
                f"`rateguard:stats` key per store); a key: `{last.get('example_key')}` = "
                f"`{json.dumps(last.get('example_fields'))}`."
            )
            add("")
        b = mem.get("bounded")
        if b:
            add(
                f"Bounded: `MemoryStore(max_keys={b['max_keys']:,})` given {b['clients']:,} clients in turn holds "
                f"{b['held']:,} buckets; its RSS grew {b['rss_at_bound'] / 2**20:.1f} MB to the bound and "
                f"{b['rss_after'] / 2**20:.1f} MB in all (bounded). Decisions/s while every one evicts: "
                f"{b['churn_per_s']:,.0f}; for clients it holds: {b['hits_per_s']:,.0f} "
                f"({b['churn_per_s'] / b['hits_per_s']:.2f}x)."
            )
            add("")

    rules = results.get("rules")
    if rules and rules.get("rounds"):
        rr = rules["rounds"]
        s = summarize(rr)
        add(
            f"## Rules per request: wrk -t1 -c{opts.connections} -d{opts.duration}s, then -c1 -d{opts.latency_duration}s"
        )
        add("")
        add(
            "One client (wrk's address). *x one rule*: req/s over the same store's one-rule `limit()` in the "
            "same round. *EVALSHA per request*: from commandstats (one round trip carries every rule of a limit)."
        )
        add("")
        add(
            "| variant | req/s | x no limiter | x one rule | p99 | added latency, 1 connection | EVALSHA per request |"
        )
        add("|---|--:|--:|--:|--:|--:|--:|")
        for name in rr:
            sm = s[name]
            store = "redis" if "redis" in name else "memory"
            one = f"rules-{store}-1"
            x_one = paired_ratio(rr, name, one) if name != "none" else None
            calls = redis_per_request(rules, name)["script_calls"] if ALL[name].redis else None
            add(
                f"| {label(name)} | {_fmt(sm.rps, ',.0f')} | {_fmt(sm.ratio)} | {_fmt(x_one)} | {_ms(sm.p99_us)} | "
                f"{'—' if name == 'none' else _fmt(sm.one_added_us, '+.1f', ' us')} | {_fmt(calls, '.2f')} |"
            )
        add("")

    servers = results.get("servers")
    if servers and servers.get("rounds"):
        sr = servers["rounds"]
        add("## Several servers on one Redis")
        add("")
        add(
            "Two uvicorn processes of the same app (both on the servers' CPU: this machine has two), one "
            "Redis database; one wrk (`-t2 -c32`) whose script sends thread 1 to the first server and "
            "thread 2 to the second (16 connections each). *x one server*: against the same variant on one "
            "server with the same wrk, same round."
        )
        add("")
        add("| variant | servers | req/s | x one server | p99 | servers' CPU | EVALSHA per request |")
        add("|---|--:|--:|--:|--:|--:|--:|")
        s = summarize(sr, none="none x1")
        for group in sr:
            name, count = group.rsplit(" x", 1)
            sm = s[group]
            x_one = paired_ratio(sr, group, f"{name} x1") if count != "1" else None
            calls = redis_per_request(servers, group)["script_calls"] if ALL[name].redis else None
            add(
                f"| {label(name)} | {count} | {_fmt(sm.rps, ',.0f')} | {_fmt(x_one)} | {_ms(sm.p99_us)} | "
                f"{_pct(sm.server_cpu)} | {_fmt(calls, '.2f')} |"
            )
        add("")
        exact = servers.get("exact", [])
        if exact:
            add(
                f"Exactness: a limit of {servers['limit']} (capacity {servers['limit']}, a refill of one token in "
                "~1.9 years) for a client never seen, `wrk -t2 -c32 -d1s` over both servers, the 200s counted."
            )
            add("")
            add("| variant | admitted, each round | exact |")
            add("|---|---|---|")
            for name in dict.fromkeys(e["variant"] for e in exact):
                got = [e["admitted"] for e in exact if e["variant"] == name]
                ok = all(g == servers["limit"] for g in got)
                add(f"| {label(name)} | {' '.join(str(g) for g in got)} | {'yes' if ok else 'no'} |")
            add("")

    tg = scale_targets(results)
    add("## Targets (issue 16, as the work grows; one client's are in latest.md)")
    add("")
    add(
        "Each ratio is the median over rounds of the two variants' req/s in the same round. *floor, same run*: "
        "the minimal references of the same run; when a floor misses a target too, no design can meet it here."
    )
    add("")
    lines.extend(target_table(tg))
    add("")

    add("## Machine and versions")
    add("")
    load_before = ", ".join(f"{x:.2f}" for x in meta["load_before"])
    load_after = ", ".join(f"{x:.2f}" for x in meta["load_after"])
    add(f"- CPU: {meta['cpu']}, {meta['cores']} cores, {meta['memory']} memory, {meta['os']}")
    add(f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}")
    add(
        f"- took {meta['elapsed_s'] / 60:.1f} min, started {time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(meta['started']))}"
    )
    add("- " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    add("")
    add("## Variants")
    add("")
    shown_names = list(
        dict.fromkeys(
            [n for ph in phases.values() for n in ph.get("rounds", {})]
            + list((results.get("rules") or {}).get("rounds", {}))
            + (["none", "rateguard-redis", "exact-redis", "exact-memory"] if results.get("servers") else [])
        )
    )
    for name in shown_names:
        v = ALL[name]
        add(f"- **{v.label}** (`{v.name}`): {v.what}.")
    for name, why in skipped:
        add(f"- `{name}`: skipped, {why}.")
    add("")
    add("## Commands")
    add("")
    add("```")
    lines.extend(meta["commands"])
    lines.extend((results.get("memory") or {}).get("commands", []))
    for ph in phases.values():
        for ref in ph.get("scripts", {}).values():
            lines.append(ref["command"])
        break
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
    add("| part | round | variant | req/s | p50 | p99 | 1-conn req/s |")
    add("|---|--:|---|--:|--:|--:|--:|")
    everything = [(f"{int(n):,} clients", ph.get("rounds", {})) for n, ph in phases.items()]
    everything.append(("rules", (results.get("rules") or {}).get("rounds", {})))
    everything.append(("servers", (results.get("servers") or {}).get("rounds", {})))
    for part, rounds in everything:
        for name, rs in rounds.items():
            for r in rs:
                if "error" in r:
                    add(f"| {part} | {r['round']} | {name} | error | | | |")
                    continue
                one = f"{r['one']['rps']:,.0f}" if r.get("one") else ""
                add(
                    f"| {part} | {r['round']} | {name} | {r['load']['rps']:,.0f} | {_ms(r['load']['p50_us'])} | "
                    f"{_ms(r['load']['p99_us'])} | {one} |"
                )
    add("")
    add("</details>")
    add("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Chart: cost against the number of clients


STYLE = {
    "keyed-rateguard-memory": ("#1f77b4", "-", "o"),
    "keyed-rateguard-memory-bounded": ("#1f77b4", ":", "s"),
    "keyed-rateguard-redis": ("#08306b", "-", "D"),
    "keyed-floor-memory": ("#999999", "--", "o"),
    "keyed-floor-redis": ("#555555", "--", "D"),
    "keyed-slowapi-redis": ("#ff7f0e", "-", "^"),
    "keyed-fastapi-limiter-redis": ("#d62728", "-", "v"),
    "keyed-throttled-redis": ("#9467bd", "-", "<"),
}


def chart(path: Path, results: dict[str, Any], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", flush=True)
        return False
    phases = _clients(results)
    if not phases:
        return False
    sums = {int(n): _summaries(ph) for n, ph in phases.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for name, (color, style, marker) in STYLE.items():
        xs = [n for n in sums if name in sums[n] and sums[n][name].ratio is not None]
        if not xs:
            continue
        ratios = [sums[n][name].ratio for n in xs]
        p99 = [(sums[n][name].p99_us or 0) / 1000 for n in xs]
        lows = [r - min(sums[n][name].ratios) for n, r in zip(xs, ratios, strict=True)]
        highs = [max(sums[n][name].ratios) - r for n, r in zip(xs, ratios, strict=True)]
        left.errorbar(
            xs,
            ratios,
            yerr=[lows, highs],
            color=color,
            linestyle=style,
            marker=marker,
            label=label(name),
            capsize=2,
            linewidth=1.4,
        )
        right.plot(xs, p99, color=color, linestyle=style, marker=marker, label=label(name), linewidth=1.4)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(list(sums), [f"{n:,}" for n in sums])
        ax.minorticks_off()
        ax.set_xlabel("distinct clients (x-api-key), each with its bucket held")
        ax.grid(True, which="major", axis="y", color="#dddddd")
    left.axhline(1.0, color="#333333", linewidth=0.8)
    left.axhline(0.75, color="#2ca02c", linestyle=":", linewidth=0.8, label="target 3, Redis: 0.75")
    left.set_ylim(0, 1.15)
    left.set_ylabel("req/s relative to no limiter, same round")
    right.set_ylabel("p99 at 32 connections (ms)")
    right.set_ylim(bottom=0)
    left.legend(fontsize=7, loc="lower left", framealpha=0.9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------


def write(
    opts: Options,
    results: dict[str, Any],
    meta: dict[str, Any],
    notes: list[str],
    skipped: list[tuple[str, str]],
) -> list[Path]:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d", time.localtime(meta["started"]))
    written: list[Path] = []
    png = out / f"scale-{date}.png"
    title = f"rateguard as clients grow, {date}: wrk -c{opts.connections}, {opts.rounds} round(s) x {opts.duration} s, {meta['cores']} cores"
    has_chart = chart(png, results, title)
    if has_chart:
        shutil.copyfile(png, out / "scale-latest.png")
        written += [png, out / "scale-latest.png"]
    for name, chart_name in (
        (f"scale-{date}.md", f"scale-{date}.png"),
        ("scale-latest.md", "scale-latest.png"),
    ):
        text = markdown(opts, results, meta, notes, skipped, date, chart_name if has_chart else None)
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    raw = {
        "mode": opts.mode,
        "date": date,
        "results": results,
        "meta": meta,
        "notes": notes,
        "opts": {
            "rounds": opts.rounds,
            "duration": opts.duration,
            "connections": opts.connections,
            "keys": opts.keys,
            "argv": opts.argv,
            "latency_duration": opts.latency_duration,
        },
    }
    (out / "scale-latest.json").write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    written.append(out / "scale-latest.json")
    from benchmarks import summary

    written.extend(summary.write(out))
    return written
