"""Performance as the work grows (issue 16): `python -m benchmarks.scale` (`make bench-scale`).

The same machinery as `benchmarks.run` (one private redis-server, one pinned uvicorn per variant,
interleaved rounds, every child stopped in a `finally`), in five parts:

    memory    bytes per bucket, no HTTP: MemoryStore and RedisStore at 100k and 1M buckets, a bounded
              MemoryStore under churn, and the least Python and least Redis bucket (benchmarks.memorybench)
    clients   1, 10,000, 100,000 and 1,000,000 distinct clients: wrk's script sends x-api-key from a
              walk over N keys; every app keyed by it; rateguard and the floors start with the N
              buckets made (the peers start empty). One set of servers per N.
    rules     one rule, two rules in one limit(), RateGuard + a route limit(), on both stores
    servers   two uvicorn processes on one Redis: total req/s (one wrk, a thread per server), and
              exactness (a limit of 1000, many requests, the 200s counted across both)
    Redis time per decision comes with every Redis run: CONFIG RESETSTAT before it, INFO
    commandstats and INFO cpu after; MONITOR, once per server, tells a script's own calls from
    the client's; redis-benchmark gives a bare INCR and an empty script on the same server.

    python -m benchmarks.scale                 # everything, about 13 minutes: the published figures
    python -m benchmarks.scale --quick         # 2 short rounds, up to 100k clients: while developing
    python -m benchmarks.scale --parts clients --keys 1,100000 --rounds 3

Writes results/scale-<date>.md and .png, copies them to scale-latest.*, writes scale-latest.json,
and then results/summary.md from it and the last `benchmarks.run` (latest.json).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_py

from benchmarks.run import (
    REDIS_HELP,
    REPO,
    WRK_HELP,
    Children,
    Pinning,
    RedisServer,
    Server,
    cpu_busy,
    cpu_seconds,
    log,
    pinning,
    round_order,
    run_wrk,
    server_command,
    shown,
    start_server,
    wrk_command,
)
from benchmarks.variants import BY_NAME, SCALE_BY_NAME, Variant

KEYS = (1, 10_000, 100_000, 1_000_000)
BOUNDED_MAX_KEYS = 100_000  # keyed-rateguard-memory-bounded: MemoryStore's default
CLIENT_VARIANTS = (
    "keyed-none",
    "keyed-floor-memory",
    "keyed-rateguard-memory",
    "keyed-rateguard-memory-bounded",
    "keyed-floor-redis",
    "keyed-rateguard-redis",
    "keyed-slowapi-redis",
    "keyed-fastapi-limiter-redis",
    "keyed-throttled-redis",
)
RULE_VARIANTS = (
    "none",
    "rules-memory-1",
    "rules-memory-2",
    "rules-memory-global-route",
    "rules-redis-1",
    "rules-redis-2",
    "rules-redis-global-route",
)
# The variants a target divides, back to back in every round (see benchmarks.run.ADJACENT).
ADJACENT = (
    ("keyed-floor-memory", "keyed-rateguard-memory"),
    ("keyed-floor-redis", "keyed-none", "keyed-rateguard-redis"),
    ("rules-memory-1", "rules-memory-2"),
    ("rules-redis-1", "rules-redis-2"),
)
TINY_VARIANTS = ("keyed-none", "keyed-floor-memory", "keyed-rateguard-memory")
PARTS = ("memory", "clients", "rules", "servers")
EXACT_LIMIT = 1000  # benchmarks.apps.EXACT_LIMIT
ALL = {**BY_NAME, **SCALE_BY_NAME}
ERRORS = (
    RuntimeError,
    ValueError,
    OSError,
    subprocess.TimeoutExpired,
    redis_py.RedisError,
    json.JSONDecodeError,
)


@dataclass
class Options:
    rounds: int = 5
    duration: int = 2
    warmup: int = 1
    latency_duration: int = 1  # the rules part's one-connection run
    connections: int = 32
    keys: list[int] = field(default_factory=lambda: list(KEYS))
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    variants: list[str] = field(default_factory=lambda: list(CLIENT_VARIANTS))
    memory_sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    out: Path = REPO / "benchmarks" / "results"
    gc_freeze: bool = True
    pin: bool = True
    max_minutes: float = 25.0
    mode: str = "full"
    argv: list[str] = field(default_factory=list)


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description="rateguard as the work grows (issue 16)."
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="2 rounds of 1 s, up to 100k clients: for development"
    )
    mode.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke mode: {', '.join(TINY_VARIANTS)} at 1000 clients, 1 round, memory only; checks the harness",
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds per part ({Options.rounds})")
    parser.add_argument("--duration", type=int, help=f"seconds of each measured run ({Options.duration})")
    parser.add_argument(
        "--warmup", type=int, help=f"seconds of load on each server after start-up ({Options.warmup})"
    )
    parser.add_argument("--keys", help="distinct clients, comma-separated (1,10000,100000,1000000)")
    parser.add_argument("--parts", help=f"comma-separated, of {','.join(PARTS)} (all)")
    parser.add_argument(
        "--variants", help=f"the clients part's variants (default: {','.join(CLIENT_VARIANTS)})"
    )
    parser.add_argument("--memory-sizes", help="buckets of the memory part (100000,1000000)")
    parser.add_argument("--out", type=Path, help="directory for the results (benchmarks/results)")
    parser.add_argument("--no-gc-freeze", action="store_true", help="do not call gc.freeze() after start-up")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument(
        "--max-minutes", type=float, help=f"stop, keeping what was measured ({Options.max_minutes:g})"
    )
    args = parser.parse_args(argv)
    opts = Options(argv=list(sys.argv[1:] if argv is None else argv))
    if args.quick:
        opts.mode = "quick"
        opts.rounds, opts.duration = 2, 1
        opts.keys = [1, 10_000, 100_000]
        opts.memory_sizes = [100_000]
    elif args.tiny:
        opts.mode = "tiny"
        opts.rounds, opts.duration, opts.warmup = 1, 1, 0
        opts.keys, opts.parts, opts.variants = [1000], ["memory", "clients"], list(TINY_VARIANTS)
        opts.memory_sizes = [2000, 10_000]
    for name in ("rounds", "duration", "warmup", "out"):
        value = getattr(args, name)
        if value is not None:
            setattr(opts, name, value)
    if args.keys:
        opts.keys = _ints(args.keys)
    if args.memory_sizes:
        opts.memory_sizes = _ints(args.memory_sizes)
    if args.parts:
        opts.parts = [p for p in args.parts.split(",") if p]
        unknown = [p for p in opts.parts if p not in PARTS]
        if unknown:
            parser.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    if args.variants:
        names = [n for n in args.variants.split(",") if n]
        unknown = [n for n in names if n not in CLIENT_VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(CLIENT_VARIANTS)}")
        opts.variants = ["keyed-none", *(n for n in names if n != "keyed-none")]
    if args.max_minutes is not None:
        opts.max_minutes = args.max_minutes
    opts.gc_freeze = not args.no_gc_freeze
    opts.pin = not args.no_pin
    if opts.rounds < 1 or opts.duration < 1 or not opts.keys or min(opts.keys) < 1:
        parser.error("--rounds, --duration and every --keys value must be at least 1")
    return opts


# ---------------------------------------------------------------------------------------------
# wrk's scripts


def walk_step(n: int) -> int:
    """A step coprime with n near 0.618 n: the walk visits every key once per n requests, and
    consecutive requests are far apart in the key space (no locality a cache could exploit)."""
    step = max(1, int(n * 0.6180339887)) | 1
    while math.gcd(step, n) != 1:
        step += 2
    return step


def keys_script(workdir: Path, n: int) -> Path:
    path = workdir / f"keys-{n}.lua"
    path.write_text(
        f"-- x-api-key from a walk over {n} keys (k0..k{n - 1}): each key once every {n} requests\n"
        f"local n, step, i = {n}, {walk_step(n)}, {n // 3}\n"
        "request = function()\n"
        "  i = (i + step) % n\n"
        '  return wrk.format(nil, nil, {["x-api-key"] = "k" .. i})\n'
        "end\n"
    )
    return path


def hosts_script(workdir: Path, name: str, ports: list[int], api_key: str | None = None) -> Path:
    """Thread i of wrk connects to ports[i % len(ports)]: one wrk spreads its load over servers."""
    path = workdir / f"{name}.lua"
    lines = [
        f"-- wrk's thread i goes to 127.0.0.1:ports[i]: {len(ports)} server(s)",
        "local ports = {" + ", ".join(str(p) for p in ports) + "}",
        "local count = 0",
        "function setup(thread)",
        "  count = count + 1",
        '  thread.addr = wrk.lookup("127.0.0.1", tostring(ports[(count - 1) % #ports + 1]))[1]',
        "end",
    ]
    if api_key is not None:
        lines.append(f'wrk.headers["x-api-key"] = "{api_key}"')
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Redis: what each run cost the server


def redis_reset(redis: RedisServer) -> dict[str, float]:
    # Requests still queued in the last server when its wrk stopped finish first, so their Redis
    # calls are not counted in the next variant's run (a loaded server can lag by a few ms).
    time.sleep(0.1)
    redis.client.config_resetstat()
    cpu = redis.client.info("cpu")
    return {"cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])}


def redis_read(redis: RedisServer, before: dict[str, float]) -> dict[str, Any]:
    stats = redis.client.info("commandstats")
    cpu = redis.client.info("cpu")
    commands = {
        name.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
        for name, v in stats.items()
        if name.removeprefix("cmdstat_").split("|")[0] not in ("config", "info")  # the harness's own
    }
    return {
        "commands": commands,
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]) - before["cpu"],
    }


MONITOR_LINE = re.compile(r'^[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"')


def monitor_sample(
    redis: RedisServer, server: Server, keyed: bool, requests: int = 20
) -> dict[str, dict[str, int]]:
    """Which commands a variant sends itself and which its scripts call, from MONITOR (a few
    requests; commandstats counts a script's own calls too, inside the script's time)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        return {}
    proc = subprocess.Popen(
        [cli, "-p", str(redis.port), "monitor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(0.3)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for i in range(requests):
                conn.request("GET", "/", headers={"x-api-key": f"k{i}"} if keyed else {})
                conn.getresponse().read()
        finally:
            conn.close()
        time.sleep(0.3)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=5)
    top: Counter[str] = Counter()
    lua: Counter[str] = Counter()
    for line in out.splitlines():
        m = MONITOR_LINE.match(line)
        if m:
            (lua if m.group(1) == "lua" else top)[m.group(2).lower()] += 1
    top.pop("monitor", None)
    return {"top": dict(top), "lua": dict(lua), "requests": {"count": requests}}


# The least a Lua token bucket does: Redis's clock, the state read, the refill and take, the state
# written with its expiry, two numbers back. rateguard's script does this and more (several keys,
# all or nothing, give-backs, exact float text, the rule stored, four values per key). Both keep
# the state as packed doubles in one string: GET and SET PX cost less than a hash's three commands.
LEAST_LUA = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local s = redis.call('GET', KEYS[1])
local tokens, last = cap, now
if s then tokens, last = struct.unpack('<dd', s) end
tokens = math.min(cap, tokens + (now - last) * rate)
local ok = tokens >= 1
if ok then tokens = tokens - 1 end
redis.call('SET', KEYS[1], struct.pack('<dd', tokens, now), 'PX', math.ceil((cap - tokens) / rate * 1000))
return {ok and 1 or 0, math.floor(tokens)}
"""


def script_costs(redis: RedisServer, pin: Pinning, n: int, db: int) -> dict[str, Any]:
    """usec_per_call on the same redis-server: a bare INCR, an empty script, the least Lua token
    bucket, rateguard's script (redis-benchmark, 32 clients, keys spread over n; once to make the
    keys, then measured)."""
    from rateguard.stores.redis import TOKEN_BUCKET_LUA

    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {}
    client = redis_py.Redis(port=redis.port, db=db)
    empty = client.script_load("return 0")
    least = client.script_load(LEAST_LUA)
    sha = client.script_load(TOKEN_BUCKET_LUA)
    spread = ["-r", str(n)] if n > 1 else []

    def key(kind: str) -> str:  # a key space of its own per case: INCR's strings are no hashes
        return f"{kind}:{{__rand_int__}}" if n > 1 else f"{kind}:{{1}}"

    rate, capacity = repr(1 / 3600), str(10**9)
    cases = {
        "INCR": ("incr", ["INCR", key("incr")]),
        "empty script": ("evalsha", ["EVALSHA", empty, "0"]),
        "least Lua token bucket": ("evalsha", ["EVALSHA", least, "1", key("least"), rate, capacity]),
        "rateguard's script": (
            "evalsha",
            ["EVALSHA", sha, "1", key("rateguard"), "1", "", "", rate, capacity],
        ),
    }
    out: dict[str, Any] = {}
    try:
        for label, (command, args) in cases.items():
            cmd = [
                *pin.server,
                binary,
                "-p",
                str(redis.port),
                "--dbnum",
                str(db),
                "-n",
                "100000",
                "-c",
                "32",
                *spread,
                "-q",
                *args,
            ]
            for _ in range(2):  # the first makes the keys; the second is read
                redis.client.config_resetstat()
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
                if run.returncode != 0:
                    raise RuntimeError(f"redis-benchmark failed: {run.stderr.strip() or run.stdout[-300:]}")
            stat = redis.client.info("commandstats").get(f"cmdstat_{command}", {})
            calls = int(stat.get("calls", 0))
            out[label] = {
                "usec_per_call": int(stat.get("usec", 0)) / calls if calls else None,
                "command": shown(cmd, {str(redis.port): "<port>"}),
            }
    finally:
        client.flushdb()
        client.close()
    return out


# ---------------------------------------------------------------------------------------------
# Servers and runs


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bench_state(server: Server) -> dict[str, Any]:
    state: dict[str, Any] = {"rss": rss_bytes(server.pid)}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/_bench/state")
        response = conn.getresponse()
        body = response.read()
        if response.status == 200:
            state.update(json.loads(body))
    except (OSError, ValueError):
        pass
    finally:
        conn.close()
    return state


@dataclass
class Run:
    """What a part's runs need: where things are, how long, how to stop."""

    opts: Options
    pin: Pinning
    children: Children
    workdir: Path
    redis: RedisServer | None
    deadline: float
    notes: list[str]
    next_db: int = 1

    def db(self) -> str:
        assert self.redis is not None
        url = self.redis.url_db(self.next_db)
        self.next_db += 1
        return url

    @property
    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def note(self, message: str) -> None:
        self.notes.append(message)
        log(f"error: {message}" if not message.startswith("stopped") else message)


def measure(
    run: Run,
    servers: list[Server],
    script: Path | None,
    redis: RedisServer | None,
    threads: int = 1,
    one_conn: bool = False,
    seconds: int | None = None,
) -> dict[str, Any]:
    """One load run at the part's connections (and with ``one_conn`` a one-connection run after it)."""
    opts, pin = run.opts, run.pin
    for s in servers:
        s.check()
    seconds = seconds or opts.duration
    redis_before = redis_reset(redis) if redis is not None else None
    cpu0 = [cpu_seconds(s.pid) for s in servers]
    busy0, t0 = cpu_busy(pin.server_cpu), time.monotonic()
    load = run_wrk(servers[0].url, opts.connections, seconds, pin.load, script, threads)
    cpu1 = [cpu_seconds(s.pid) for s in servers]
    busy1, t1 = cpu_busy(pin.server_cpu), time.monotonic()
    data: dict[str, Any] = {}
    if redis is not None and redis_before is not None:
        data["redis"] = redis_read(redis, redis_before)
    wall = t1 - t0
    if None not in cpu0 and None not in cpu1:
        load.server_cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / wall  # type: ignore[operator]
        if busy0 is not None and busy1 is not None:
            load.other_cpu = max(0.0, (busy1 - busy0) / wall - load.server_cpu)
    one = None
    if one_conn and opts.latency_duration > 0:
        one = run_wrk(servers[0].url, 1, opts.latency_duration, pin.load, script, 1)
    for s in servers:
        s.check()
    data.update({"load": asdict(load), "one": asdict(one) if one else None})
    return data


def start_all(
    run: Run, variants: list[Variant], extra_env: Callable[[Variant], dict[str, str]], timeout: float
) -> tuple[dict[str, Server], dict[str, str]]:
    """Start every variant's server side by side (their prefills overlap), then wait for each."""
    started: dict[str, Server] = {}
    urls: dict[str, str] = {}
    pending: list[tuple[Variant, Server, float]] = []
    for v in variants:
        url = run.db() if v.redis and run.redis is not None else None
        try:
            server = start_server(
                v, run.children, run.workdir, run.pin, url, run.opts.gc_freeze, extra_env(v), wait=False
            )
        except ERRORS as exc:
            run.note(f"{v.name}: server did not start: {exc}")
            continue
        if url is not None:
            urls[v.name] = url
        pending.append((v, server, time.monotonic()))
    for v, server, t0 in pending:
        try:
            server.ready(timeout)
            started[v.name] = server
            log(f"started {v.name:32} port {server.port}, pid {server.pid}, in {time.monotonic() - t0:.1f} s")
        except ERRORS as exc:
            run.note(f"{v.name}: server did not start: {exc}")
    return started, urls


def rounds_of(
    run: Run,
    phase: str,
    servers: dict[str, Server],
    script: Path | None,
    one_conn: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Interleaved rounds over the servers: ADJACENT's chains back to back, the rest rotated."""
    opts = run.opts
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    live = list(servers)
    for r in range(opts.rounds):
        if not live:
            break
        for name in round_order(live, r, ADJACENT):
            if run.out_of_time:
                run.note(f"stopped after --max-minutes {opts.max_minutes:g}, in {phase}, round {r + 1}")
                return rounds
            server = servers[name]
            try:
                data = measure(
                    run, [server], script, run.redis if server.variant.redis else None, one_conn=one_conn
                )
            except ERRORS as exc:
                rounds[name].append({"round": r + 1, "error": str(exc)})
                run.note(f"{phase} round {r + 1} {name}: {exc}")
                if server.proc.poll() is not None:
                    live.remove(name)
                continue
            data["round"] = r + 1
            rounds[name].append(data)
            load = data["load"]
            line = f"{phase:>10} round {r + 1}  {name:32} {load['rps']:9.0f} req/s  p99 {load['p99_us'] / 1000:6.2f} ms"
            if data.get("one"):
                line += f"  1 conn {data['one']['mean_us']:7.1f} us"
            log(line)
    return rounds


def stop_and_flush(run: Run, servers: dict[str, Server], urls: dict[str, str]) -> None:
    run.children.stop_many([s.proc for s in servers.values()])
    for url in urls.values():
        with contextlib.suppress(redis_py.RedisError, OSError):
            client = redis_py.Redis.from_url(url)
            client.flushdb(asynchronous=True)
            client.close()


def check_logs(run: Run, phase: str, servers: dict[str, Server]) -> None:
    for name, server in servers.items():
        text = server.logfile.read_text(errors="replace") if server.logfile.exists() else ""
        if "deciding with on_error" in text:
            run.note(
                f"{phase} {name}: rateguard logged Redis as unavailable: some decisions were made without it"
            )


# ---------------------------------------------------------------------------------------------
# The parts


def memory_part(run: Run) -> dict[str, Any]:
    """benchmarks.memorybench, each store in a fresh process on the servers' CPU."""
    sizes = ",".join(str(n) for n in run.opts.memory_sizes)
    jobs: list[tuple[str, list[str]]] = [
        ("memory", ["--what", "memory", "--buckets", sizes]),
        ("memory traced", ["--what", "memory", "--buckets", sizes, "--traced"]),
        ("floor", ["--what", "floor", "--buckets", sizes]),
        ("floor traced", ["--what", "floor", "--buckets", sizes, "--traced"]),
    ]
    if run.opts.mode == "tiny":  # RSS only: the traced passes take longer than the smoke test may
        jobs = [job for job in jobs if "traced" not in job[0]]
    largest = max(run.opts.memory_sizes)
    if largest > BOUNDED_MAX_KEYS:
        jobs.append(
            ("bounded", ["--what", "bounded", "--buckets", str(largest), "--max-keys", str(BOUNDED_MAX_KEYS)])
        )
    url = run.db() if run.redis is not None else None
    if url is not None:
        jobs += [
            ("redis", ["--what", "redis", "--buckets", sizes, "--redis-url", url]),
            ("redis least", ["--what", "redis-least", "--buckets", sizes, "--redis-url", url]),
            ("redis least named", ["--what", "redis-least-named", "--buckets", sizes, "--redis-url", url]),
        ]
    out: dict[str, Any] = {"commands": []}
    for label, args in jobs:
        if run.out_of_time:
            run.note(f"stopped after --max-minutes {run.opts.max_minutes:g}, in the memory part")
            break
        cmd = [*run.pin.server, sys.executable, "-m", "benchmarks.memorybench", *args]
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-1500:])
            out[label] = json.loads(done.stdout.strip().splitlines()[-1])
        except ERRORS as exc:
            run.note(f"memory part, {label}: {exc}")
            continue
        out["commands"].append(shown(cmd, {url: "<redis url>"} if url else None))
        log(f"    memory {label:16} {json.dumps(out[label])[:150]} ({time.monotonic() - t0:.0f} s)")
    return out


def clients_part(run: Run, n: int, variants: list[Variant]) -> dict[str, Any]:
    """All the client variants at n distinct clients: started (and prefilled) together, rounds."""
    opts = run.opts
    chosen = [v for v in variants if not (v.name.endswith("-bounded") and n <= BOUNDED_MAX_KEYS)]
    script = keys_script(run.workdir, n)
    log(
        f"{n:,} clients: starting {len(chosen)} servers"
        + (f", each prefilled with {n:,} buckets" if n > 1 else "")
    )
    servers, urls = start_all(
        run, chosen, lambda v: {"BENCH_PREFILL": str(n) if v.prefill else "0"}, timeout=120 + n / 5000
    )
    result: dict[str, Any] = {"clients": n, "rounds": {}, "state": {}, "monitor": {}, "scripts": {}}
    try:
        for name, server in servers.items():
            if opts.warmup > 0:
                try:
                    run_wrk(server.url, opts.connections, opts.warmup, run.pin.load, script)
                except ERRORS as exc:
                    run.note(f"{n} clients, {name}: warm-up failed: {exc}")
            if server.variant.redis and run.redis is not None:
                try:
                    result["monitor"][name] = monitor_sample(run.redis, server, keyed=True)
                except ERRORS as exc:
                    run.note(f"{n} clients, {name}: MONITOR sample failed: {exc}")
        result["rounds"] = rounds_of(run, f"{n} keys", servers, script)
        for name, server in servers.items():
            state = bench_state(server)
            if name in urls:
                with contextlib.suppress(redis_py.RedisError, OSError):
                    client = redis_py.Redis.from_url(urls[name])
                    state["dbsize"] = client.dbsize()
                    client.close()
            result["state"][name] = state
            v = server.variant
            held = state.get("buckets")
            if v.prefill and held is not None and not name.endswith("-bounded") and held > n + 2:
                run.note(
                    f"{n} clients, {name}: {held} buckets after the runs, more than the {n} prefilled: the "
                    "prefill did not make the buckets the requests use"
                )
        check_logs(run, f"{n} clients", servers)
        if run.redis is not None and any(v.redis for v in chosen) and not run.out_of_time:
            try:
                result["scripts"] = script_costs(run.redis, run.pin, n, int(run.db().rsplit("/", 1)[1]))
            except ERRORS as exc:
                run.note(f"{n} clients: redis-benchmark references failed: {exc}")
    finally:
        stop_and_flush(run, servers, urls)
    return result


def rules_part(run: Run) -> dict[str, Any]:
    variants = [ALL[name] for name in RULE_VARIANTS if run.redis is not None or not ALL[name].redis]
    log(f"rules: starting {len(variants)} servers")
    servers, urls = start_all(run, variants, lambda v: {}, timeout=30)
    try:
        for server in servers.values():
            if run.opts.warmup > 0:
                with contextlib.suppress(*ERRORS):
                    run_wrk(server.url, run.opts.connections, run.opts.warmup, run.pin.load)
        rounds = rounds_of(run, "rules", servers, None, one_conn=True)
        check_logs(run, "rules", servers)
    finally:
        stop_and_flush(run, servers, urls)
    return {"rounds": rounds}


def servers_part(run: Run) -> dict[str, Any]:
    """Two uvicorn processes (both on the servers' CPU) on one Redis database, one wrk with a
    thread per server; and the exactness of a small limit across both."""
    opts = run.opts
    assert run.redis is not None
    out: dict[str, Any] = {"rounds": {}, "exact": [], "limit": EXACT_LIMIT}
    pairs: dict[str, list[Server]] = {}
    urls: dict[str, str] = {}
    try:
        for name in ("none", "rateguard-redis", "exact-redis", "exact-memory"):
            v = ALL[name]
            url = run.db() if v.redis else None
            pair = [
                start_server(v, run.children, run.workdir, run.pin, url, opts.gc_freeze, wait=False)
                for _ in range(2)
            ]
            pairs[name] = pair
            if url is not None:
                urls[name] = url
        for pair in pairs.values():
            for server in pair:
                server.ready(30)
        log("servers: started " + ", ".join(f"{name} x2" for name in pairs))
        groups = {
            f"{name} x{count}": (
                pairs[name][:count],
                hosts_script(run.workdir, f"{name}-{count}", [s.port for s in pairs[name][:count]]),
            )
            for name in ("none", "rateguard-redis")
            for count in (1, 2)
        }
        for servers, script in groups.values():
            if opts.warmup > 0:
                run_wrk(servers[0].url, opts.connections, opts.warmup, run.pin.load, script, threads=2)
        order = list(groups)
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in order}
        for r in range(opts.rounds):
            shift = r % len(order)
            for label in order[shift:] + order[:shift]:
                if run.out_of_time:
                    run.note(f"stopped after --max-minutes {opts.max_minutes:g}, in the servers part")
                    break
                servers, script = groups[label]
                redis = run.redis if servers[0].variant.redis else None
                try:
                    data = measure(run, servers, script, redis, threads=2)
                except ERRORS as exc:
                    rounds[label].append({"round": r + 1, "error": str(exc)})
                    run.note(f"servers round {r + 1} {label}: {exc}")
                    continue
                data["round"] = r + 1
                rounds[label].append(data)
                log(
                    f"   servers round {r + 1}  {label:32} {data['load']['rps']:9.0f} req/s  p99 {data['load']['p99_us'] / 1000:6.2f} ms"
                )
            for name in ("exact-redis", "exact-memory"):
                if run.out_of_time:
                    break
                pair = pairs[name]
                key = f"trial-{r + 1}"  # a client never seen: a full bucket on every server
                script = hosts_script(run.workdir, f"{name}-{key}", [s.port for s in pair], api_key=key)
                try:
                    data = measure(
                        run, pair, script, run.redis if pair[0].variant.redis else None, threads=2, seconds=1
                    )
                except ERRORS as exc:
                    run.note(f"servers exactness {name} round {r + 1}: {exc}")
                    continue
                load = data["load"]
                admitted = load["requests"] - load["non2xx"]
                out["exact"].append(
                    {
                        "variant": name,
                        "round": r + 1,
                        "admitted": admitted,
                        "requests": load["requests"],
                        "socket_errors": load["socket_errors"],
                    }
                )
                log(
                    f"   servers round {r + 1}  {name:32} {admitted} of {load['requests']} admitted (limit {EXACT_LIMIT})"
                )
        out["rounds"] = rounds
        check_logs(run, "servers", {f"{n} {i}": s for n, pair in pairs.items() for i, s in enumerate(pair)})
    finally:
        run.children.stop_many([s.proc for pair in pairs.values() for s in pair])
        stop_and_flush(run, {}, urls)
    return out


# ---------------------------------------------------------------------------------------------


def commands(run: Run) -> list[str]:
    url = "http://127.0.0.1:<port>/"
    opts, pin = run.opts, run.pin
    return [
        shown(["python", "-m", "benchmarks.scale", *opts.argv]),
        "BENCH_VARIANT=<variant> BENCH_PREFILL=<clients> BENCH_REDIS_URL=<redis url> "
        + shown(server_command(0, pin.server)).replace("--port 0", "--port <port>"),
        shown(wrk_command(url, opts.connections, opts.duration, pin.load, Path("keys-<clients>.lua")))
        + "   # the clients part",
        shown(wrk_command(url, opts.connections, opts.duration, pin.load))
        + f"   # the rules part, then -c1 -d{opts.latency_duration}s",
        shown(wrk_command(url, opts.connections, opts.duration, pin.load, Path("<servers>.lua"), threads=2))
        + "   # the servers part: thread i to server i",
    ]


def estimate_seconds(opts: Options, variants: list[Variant]) -> float:
    """About how long a run takes, from what the parts do (measured on a 2-vCPU VM)."""
    run_s = opts.duration + 0.3  # wrk's start and report, Redis's counters read
    total = 0.0
    if "memory" in opts.parts:
        total += 5 + 110 * sum(opts.memory_sizes) / 1e6  # fills at ~70k/s, tracemalloc's pass slower
    if "clients" in opts.parts:
        for n in opts.keys:
            here = [v for v in variants if not (v.name.endswith("-bounded") and n <= BOUNDED_MAX_KEYS)]
            total += 5 + n / 25_000  # start-up; the Redis prefills at ~25k buckets/s
            total += len(here) * (opts.warmup + 0.2) + 15  # warm-ups, MONITOR samples, redis-benchmark
            total += opts.rounds * len(here) * run_s
    if "rules" in opts.parts:
        total += 8 + len(RULE_VARIANTS) * (opts.warmup + opts.rounds * (run_s + opts.latency_duration + 0.2))
    if "servers" in opts.parts:
        total += 10 + opts.rounds * (4 * run_s + 2 * 1.4)
    return total


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("wrk") is None:
        print(WRK_HELP, file=sys.stderr)
        return 2
    from benchmarks import report, scale_report

    have_redis = shutil.which("redis-server") is not None
    needs_redis = opts.mode != "tiny"
    variants: list[Variant] = []
    skipped: list[tuple[str, str]] = []
    for name in opts.variants:
        v = ALL[name]
        why = None
        if v.missing():
            why = f"{', '.join(v.missing())} not installed: pip install -e '.[bench]'"
        elif v.redis and (not have_redis or opts.mode == "tiny"):
            why = REDIS_HELP if not have_redis else "tiny mode: no Redis"
        if why:
            skipped.append((name, why))
            log(f"skipping {name}: {why}")
        else:
            variants.append(v)
    if needs_redis and not have_redis:
        log(f"no Redis figures: {REDIS_HELP}")

    pin = pinning(opts.pin)
    started = time.time()
    meta = report.machine_and_versions()
    meta["load_before"] = os.getloadavg()
    source = report.source_digest()
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="rateguard-scale-"))
    notes: list[str] = []
    run = Run(opts, pin, children, workdir, None, time.monotonic() + opts.max_minutes * 60, notes)
    results: dict[str, Any] = {"clients": {}}
    log(
        f"rateguard growth benchmarks: parts {', '.join(opts.parts)}; clients {', '.join(f'{n:,}' for n in opts.keys)}; "
        f"{opts.rounds} round(s) of {opts.duration} s at {opts.connections} connections; about "
        f"{estimate_seconds(opts, variants) / 60:.0f} min. {pin.note}."
    )

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        if needs_redis and have_redis:
            run.redis = RedisServer(children, workdir, pin.load, databases=64)
            run.redis.start()
            run.redis.flush()
        if "memory" in opts.parts:
            log("memory per bucket ...")
            results["memory"] = memory_part(run)
        if "clients" in opts.parts:
            for n in opts.keys:
                if run.out_of_time:
                    run.note(f"stopped after --max-minutes {opts.max_minutes:g}, before {n} clients")
                    break
                results["clients"][str(n)] = clients_part(run, n, variants)
        if "rules" in opts.parts and not run.out_of_time:
            results["rules"] = rules_part(run)
        if "servers" in opts.parts and run.redis is not None and not run.out_of_time:
            results["servers"] = servers_part(run)
    except KeyboardInterrupt as exc:
        log(f"interrupted: {exc!r}; writing what was measured")
        notes.append(f"interrupted: {exc!r}")
    except ERRORS as exc:
        log(f"error: {exc}; writing what was measured")
        notes.append(f"stopped by an error: {exc}")
    finally:
        if run.redis is not None:
            run.redis.stop()
        children.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(workdir, ignore_errors=True)

    meta["load_after"] = os.getloadavg()
    meta["source_changed"] = report.source_digest() != source
    meta["elapsed_s"] = time.time() - started
    meta["started"] = started
    meta["pinning"] = pin.note
    meta["commands"] = commands(run)
    written = scale_report.write(opts, results, meta, notes, skipped)
    log(f"done in {meta['elapsed_s'] / 60:.1f} min; wrote {', '.join(str(p) for p in written)}")
    if notes:
        log(f"{len(notes)} problem(s), listed under Notes in the results")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
