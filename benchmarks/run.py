"""Run every benchmark variant side by side and write the results: `python -m benchmarks.run`.

Everything runs on 127.0.0.1 and is started here: a private redis-server on a free port, one
uvicorn process per variant (one worker, uvloop + httptools), wrk as the load, and redis-benchmark
for the Redis ceiling. With two CPUs or more the servers are pinned to the first and wrk and
redis-server to the second (`taskset`).

Every variant's server is started once, warmed up once, and kept up for all the rounds. A round
loads each variant in turn with short runs (2 s at 32 connections, 1 s at one), in an order rotated
every round, the variants a target divides back to back (`ADJACENT`): slow drift of the machine hits all variants alike, and each ratio is taken against the
no-limiter run of the same round, seconds away rather than minutes. Every child is stopped by its
process group, in a `finally`.

    python -m benchmarks.run                      # 10 rounds x (2 s + 1 s) per variant: the published figures
    python -m benchmarks.run --quick              # 3 rounds x (1 s + 1 s), while developing
    python -m benchmarks.run --variants none,rateguard-redis --rounds 20
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_py

from benchmarks.variants import BY_NAME, VARIANTS, Variant

REPO = Path(__file__).resolve().parent.parent
WRK_HELP = "wrk is not installed: sudo apt-get install -y wrk (Debian/Ubuntu) or brew install wrk (macOS)"
REDIS_HELP = "redis-server is not installed: sudo apt-get install -y redis-server (Debian/Ubuntu) or brew install redis (macOS)"
TINY_VARIANTS = ("none", "rateguard-memory")


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Options


@dataclass
class Options:
    # Many short rounds rather than a few long ones: the machine drifts by +-20-30% over minutes,
    # so a ratio is only as good as the time between the two runs it divides. 15 default variants
    # x (2 s + 1 s) is about 47 s a round; 10 rounds, start-up and the store bench take about
    # 9 minutes, inside the 10 the issue allows (the growth runs are `benchmarks.scale`).
    rounds: int = 10
    # wrk takes whole seconds.
    duration: int = 2  # each measured run at `connections`
    warmup: int = 1  # wrk once on each server after it starts, same connections, not recorded
    latency_duration: int = 1  # the one-connection run; 0 leaves it out
    connections: int = 32
    variants: list[str] = field(default_factory=lambda: [v.name for v in VARIANTS if v.default])
    out: Path = REPO / "benchmarks" / "results"
    store_seconds: float = 1.0  # one timed store-only run; 0 leaves the micro-benchmark out
    store_reps: int = 3
    store_redis: bool = True
    ceiling_requests: int = 200_000  # redis-benchmark -n
    gc_freeze: bool = True
    pin: bool = True
    max_minutes: float = 15.0
    mode: str = "full"
    argv: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Side-by-side benchmarks of rateguard and its peers (needs wrk and redis-server).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 rounds of 1 s runs: for development")
    mode.add_argument(
        "--tiny",
        action="store_true",
        help=f"smoke mode: {' and '.join(TINY_VARIANTS)}, 1 round, 1 s, no Redis; checks the harness, not speed",
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds ({Options.rounds})")
    parser.add_argument(
        "--duration",
        type=int,
        help=f"seconds of each measured run, per variant and round ({Options.duration})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help=f"seconds of load on each server once it has started, not recorded, 0 for none ({Options.warmup})",
    )
    parser.add_argument(
        "--latency-duration",
        type=int,
        help=f"seconds of the one-connection run, per variant and round, 0 for none ({Options.latency_duration})",
    )
    parser.add_argument(
        "--connections", type=int, help=f"wrk connections of the throughput run ({Options.connections})"
    )
    parser.add_argument(
        "--variants",
        help="comma-separated names, or 'all' (default: "
        + ",".join(v.name for v in VARIANTS if v.default)
        + "; also: "
        + ",".join(v.name for v in VARIANTS if not v.default)
        + ")",
    )
    parser.add_argument(
        "--out", type=Path, help="directory for <date>.md/.png and latest.md/.png (benchmarks/results)"
    )
    parser.add_argument(
        "--store-seconds",
        type=float,
        help=f"one store-only timed run, 0 for none ({Options.store_seconds:g})",
    )
    parser.add_argument("--no-gc-freeze", action="store_true", help="do not call gc.freeze() after start-up")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help=f"stop, keeping what was measured, after this ({Options.max_minutes:g})",
    )
    args = parser.parse_args(argv)

    opts = Options(argv=list(sys.argv[1:] if argv is None else argv))
    if args.quick:
        opts.mode = "quick"
        opts.rounds, opts.duration, opts.warmup, opts.latency_duration = 3, 1, 1, 1
        opts.store_seconds, opts.store_reps, opts.ceiling_requests = 0.5, 1, 100_000
    elif args.tiny:
        opts.mode = "tiny"
        opts.rounds, opts.duration, opts.warmup, opts.latency_duration = 1, 1, 1, 1
        opts.variants = list(TINY_VARIANTS)
        opts.store_seconds, opts.store_reps, opts.store_redis = 0.2, 1, False
    for name in ("rounds", "duration", "warmup", "latency_duration", "connections", "out", "store_seconds"):
        value = getattr(args, name)
        if value is not None:
            setattr(opts, name, value)
    if args.max_minutes is not None:
        opts.max_minutes = args.max_minutes
    if args.variants:
        names = [v.name for v in VARIANTS] if args.variants == "all" else args.variants.split(",")
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        if "none" not in names:
            names.insert(0, "none")  # every ratio is to the no-limiter run of the same round
        opts.variants = names
    opts.gc_freeze = not args.no_gc_freeze
    opts.pin = not args.no_pin
    if opts.rounds < 1 or opts.duration < 1 or opts.connections < 1:
        parser.error("--rounds, --duration and --connections must be at least 1")
    if opts.warmup < 0 or opts.latency_duration < 0 or opts.store_seconds < 0:
        parser.error("--warmup, --latency-duration and --store-seconds must not be negative")
    return opts


# ---------------------------------------------------------------------------------------------
# Child processes


class Children:
    """Every process the harness starts, each in its own process group, so it can be stopped whole."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """SIGTERM to the child's group, SIGKILL after ``grace`` seconds, then reap it."""
        self.stop_many([proc], grace)

    def stop_many(self, procs: Sequence[subprocess.Popen[bytes]], grace: float = 3.0) -> None:
        """Stop several children at once: SIGTERM to every group, then one shared ``grace`` period
        before SIGKILL to whatever is left, then reap them all."""
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        self.stop_many(list(reversed(self.procs)), grace=2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pinning:
    server: list[str]  # prefix for the app server, store bench and redis-benchmark
    load: list[str]  # prefix for wrk and redis-server
    note: str
    server_cpu: int | None = None  # the CPU the server is pinned to


def pinning(enabled: bool) -> Pinning:
    taskset = shutil.which("taskset")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled:
        return Pinning([], [], "not pinned (--no-pin)")
    if taskset is None or len(cpus) < 2:
        why = "taskset is not installed" if taskset is None else f"only {len(cpus)} CPU available"
        return Pinning([], [], f"not pinned ({why}): figures are noisier")
    a, b = cpus[0], cpus[1]
    return Pinning(
        [taskset, "-c", str(a)],
        [taskset, "-c", str(b)],
        f"server on CPU {a}; wrk and redis-server on CPU {b} (taskset)",
        a,
    )


class RedisServer:
    """A private redis-server: no persistence, a free port, a temporary directory."""

    def __init__(self, children: Children, workdir: Path, prefix: list[str], databases: int = 16) -> None:
        self.children = children
        self.workdir = workdir
        self.prefix = prefix
        self.databases = databases
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = redis_py.Redis(port=self.port)

    @property
    def url(self) -> str:
        return self.url_db(0)

    def url_db(self, db: int) -> str:
        """The URL of one of the server's numbered databases (0 to ``databases`` - 1)."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = self.children.start(
            [*self.prefix, binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
             "--databases", str(self.databases)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client = redis_py.Redis(port=self.port, socket_timeout=10, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client.ping():
                    return
            except redis_py.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis-server did not start on port {self.port}; see {self.workdir}/redis.log"
                )
            time.sleep(0.02)

    def flush(self) -> None:
        self.client.flushall()
        self.client.script_flush()

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None:
            self.children.stop(self.proc)
            self.proc = None


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Wrk:
    """What one wrk run reported."""

    rps: float
    mean_us: float
    p50_us: float
    p99_us: float
    requests: int
    non2xx: int
    socket_errors: int
    server_cpu: float | None = None  # CPU seconds the server used / wall seconds of the run
    other_cpu: float | None = None  # the same for everything else on the server's CPU


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> Wrk:
    def find(pattern: str) -> str:
        m = re.search(pattern, output, re.MULTILINE)
        if m is None:
            raise ValueError(f"wrk output has no match for {pattern!r}:\n{output}")
        return m.group(1)

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Wrk(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)")),
        mean_us=_us(find(r"^\s+Latency\s+(\S+)")),
        p50_us=_us(find(r"^\s+50%\s+(\S+)")),
        p99_us=_us(find(r"^\s+99%\s+(\S+)")),
        requests=int(find(r"^\s+(\d+) requests in")),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def wrk_command(
    url: str, connections: int, seconds: int, prefix: list[str], script: Path | None = None, threads: int = 1
) -> list[str]:
    wrk = shutil.which("wrk") or "wrk"
    return [
        *prefix,
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        *(["-s", str(script)] if script is not None else []),
        url,
    ]


def run_wrk(
    url: str, connections: int, seconds: int, prefix: list[str], script: Path | None = None, threads: int = 1
) -> Wrk:
    cmd = wrk_command(url, connections, seconds, prefix, script, threads)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return parse_wrk(out.stdout)


def wait_ready(port: int, proc: subprocess.Popen[bytes], logfile: Path, timeout: float = 20.0) -> int:
    """Poll ``GET /`` until the server answers; returns that first status."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(logfile)}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{_tail(logfile)}") from None
            time.sleep(0.05)
        finally:
            conn.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), to tell a starved server from a slow one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_busy(cpu: int | None) -> float | None:
    """Seconds one CPU has spent not idle (Linux /proc/stat; steal counts as busy)."""
    if cpu is None:
        return None
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in line.split()[1:9])
                return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    return None


def server_command(port: int, prefix: list[str]) -> list[str]:
    return [
        *prefix, sys.executable, "-m", "uvicorn", "benchmarks.apps:app", "--app-dir", str(REPO),
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--workers", "1", "--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "2",
    ]  # fmt: skip


@dataclass
class Server:
    """One variant's uvicorn, up for the whole run."""

    variant: Variant
    port: int
    proc: subprocess.Popen[bytes]
    logfile: Path
    children: Children | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def ready(self, timeout: float = 20.0) -> None:
        """Wait until it answers; stop it if it never does."""
        try:
            wait_ready(self.port, self.proc, self.logfile, timeout)
        except BaseException:
            if self.children is not None:
                self.children.stop(self.proc)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{_tail(self.logfile)}")


def redis_checks(servers: dict[str, Server], redis_urls: dict[str, str]) -> list[str]:
    """Notes for variants that did not measure what they say: a Redis variant whose database
    stayed empty, or any server where rateguard logged deciding without Redis. (Its fallback is
    fast: a "Redis" row once looked good that never reached Redis.)"""
    notes = []
    for name, server in servers.items():
        url = redis_urls.get(name)
        if url is not None:
            with contextlib.suppress(redis_py.RedisError, OSError):
                client = redis_py.Redis.from_url(url)
                try:
                    if client.dbsize() == 0:
                        notes.append(
                            f"{name}: nothing was written to its Redis database: it did not use Redis"
                        )
                finally:
                    client.close()
        log_text = server.logfile.read_text(errors="replace") if server.logfile.exists() else ""
        if "deciding with on_error" in log_text:
            notes.append(f"{name}: rateguard logged Redis as unavailable: decisions were made without it")
    for note in notes:
        log(f"warning: {note}")
    return notes


def start_server(
    variant: Variant,
    children: Children,
    workdir: Path,
    pin: Pinning,
    redis_url: str | None,
    gc_freeze: bool,
    extra_env: dict[str, str] | None = None,
    ready_timeout: float = 20.0,
    wait: bool = True,
) -> Server:
    """Start the variant's server and wait until it answers; stop it again if it never does.

    ``wait=False`` returns at once (several servers then start side by side): `Server.ready` waits.
    """
    port = free_port()
    env = dict(os.environ, BENCH_VARIANT=variant.name, BENCH_GC_FREEZE="1" if gc_freeze else "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if redis_url is not None:
        env["BENCH_REDIS_URL"] = redis_url
    if variant.commit is not None:
        env["BENCH_RATEGUARD_PATH"] = str(extract_commit(variant.commit, workdir))
    env.update(extra_env or {})
    logfile = workdir / f"{variant.name}-{port}.log"
    with logfile.open("ab") as logf:
        # cwd is the scratch directory: a peer that reads ./.env (slowapi does) finds none.
        proc = children.start(
            server_command(port, pin.server), env=env, cwd=workdir, stdout=logf, stderr=logf
        )
    server = Server(variant, port, proc, logfile, children)
    if wait:
        server.ready(ready_timeout)
    return server


def commit_available(commit: str) -> bool:
    try:
        found = subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return found.returncode == 0


def extract_commit(commit: str, workdir: Path) -> Path:
    """rateguard/ as it was at ``commit``, in a directory of the scratch directory (once per run)."""
    target = workdir / f"rateguard-{commit}"
    if not (target / "rateguard" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "rateguard"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if archive.returncode != 0:
            raise RuntimeError(
                f"git archive {commit} failed (a shallow clone?): {archive.stderr.decode(errors='replace').strip()}"
            )
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, timeout=30, check=True)
    return target


def measure(server: Server, opts: Options, pin: Pinning) -> dict[str, Any]:
    """One round of one variant: the throughput run, then the one-connection run."""
    server.check()
    before = cpu_seconds(server.pid), cpu_busy(pin.server_cpu), time.monotonic()
    load = run_wrk(server.url, opts.connections, opts.duration, pin.load)
    after = cpu_seconds(server.pid), cpu_busy(pin.server_cpu), time.monotonic()
    wall = after[2] - before[2]
    if before[0] is not None and after[0] is not None:
        load.server_cpu = (after[0] - before[0]) / wall
        if before[1] is not None and after[1] is not None:
            load.other_cpu = max(0.0, (after[1] - before[1]) / wall - load.server_cpu)
    one = None
    if opts.latency_duration > 0 and not server.variant.blocked:
        one = run_wrk(server.url, 1, opts.latency_duration, pin.load)
    server.check()  # a server that died during the runs fails them, whatever wrk made of it
    return {"load": asdict(load), "one": asdict(one) if one else None}


def store_bench(opts: Options, pin: Pinning, redis: RedisServer | None) -> tuple[dict[str, Any], list[str]]:
    cmd = [
        *pin.server, sys.executable, "-m", "benchmarks.storebench",
        "--seconds", str(opts.store_seconds), "--reps", str(opts.store_reps), "--concurrency", "1,64",
    ]  # fmt: skip
    if redis is not None:
        redis.flush()
        cmd += ["--redis-url", redis.url]
    timeout = 60 + 4 * 2 * opts.store_reps * opts.store_seconds * 2
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"store bench failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), cmd


def evalsha_ceiling(opts: Options, pin: Pinning, redis: RedisServer) -> dict[str, Any]:
    """redis-benchmark running the very token-bucket script: what one redis-server can decide."""
    from rateguard.bucket import Rule
    from rateguard.stores.redis import TOKEN_BUCKET_LUA

    redis.flush()
    sha = redis.client.script_load(TOKEN_BUCKET_LUA)
    rule = Rule(10**9, 10**9)
    binary = shutil.which("redis-benchmark")
    assert binary is not None
    results: dict[str, Any] = {"sha": sha}
    for label, pipeline in (("pipelined", ["-P", "16"]), ("unpipelined", [])):
        cmd = [
            *pin.server, binary, "-p", str(redis.port), "-n", str(opts.ceiling_requests), "-c", "32",
            *pipeline, "-q", "EVALSHA", sha, "1", "rateguard:{127.0.0.1}:global", "1", "", "", repr(rule.rate), str(rule.burst),
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        found = re.findall(r"([\d.]+) requests per second", out.stdout)
        if out.returncode != 0 or not found:
            raise RuntimeError(f"redis-benchmark failed: {out.stderr.strip() or out.stdout[-500:]}")
        results[label] = {"rps": float(found[-1]), "command": shown(cmd, {str(redis.port): "<port>"})}
    return results


def shown(cmd: list[str], subs: dict[str, str] | None = None) -> str:
    """A command as a reader would type it: bare program names, paths relative to the repository."""
    words = []
    for word in cmd:
        if word == sys.executable:
            word = "python"
        elif os.path.isabs(word) and shutil.which(os.path.basename(word)) == word:
            word = os.path.basename(word)
        elif word == str(REPO):
            word = "."
        elif subs and word in subs:
            word = subs[word]
        words.append(word if "<" in word and "{" not in word else shlex.quote(word))  # <placeholders>
    return " ".join(words)


def commands(
    opts: Options,
    pin: Pinning,
    store_cmd: list[str],
    ceiling: dict[str, Any] | None,
    redis: RedisServer | None,
) -> list[str]:
    url = "http://127.0.0.1:<port>/"
    out = [
        shown(["python", "-m", "benchmarks.run", *opts.argv]),
        "BENCH_VARIANT=<variant> BENCH_REDIS_URL=<redis url> "
        + shown(server_command(0, pin.server)).replace("--port 0", "--port <port>"),
    ]
    if opts.warmup > 0:
        out.append(
            shown(wrk_command(url, opts.connections, opts.warmup, pin.load)) + "   # warm-up, once per server"
        )
    out.append(shown(wrk_command(url, opts.connections, opts.duration, pin.load)))
    if opts.latency_duration > 0:
        out.append(shown(wrk_command(url, 1, opts.latency_duration, pin.load)))
    if store_cmd:
        out.append(shown(store_cmd, {redis.url: "<redis url>"} if redis else None))
    for key in ("pipelined", "unpipelined"):
        if ceiling and key in ceiling:
            out.append(ceiling[key]["command"])
    return out


# ---------------------------------------------------------------------------------------------
# The run


STARTUP_S = 1.0  # one server's start-up and readiness check (0.5 s measured on a 2-vCPU VM)
WRK_OVERHEAD_S = 0.15  # starting wrk, connecting, reporting


# The variants a target divides, in chains that always run back to back. The machine drifts over
# seconds (in one run on this VM: a run's noise correlated 0.66 with the run before it, 0.07 with
# the fifth before), so a ratio of two runs seconds apart is far steadier than of two runs half a
# round apart. A chain runs forward in even rounds and backward in odd ones (A B, then B A), so
# neither side always runs first; a variant in two targets sits in the middle of its chain.
ADJACENT: tuple[tuple[str, ...], ...] = (
    ("rateguard-redis-before", "rateguard-redis", "floor-redis"),
    ("floor-memory", "rateguard-memory"),
    ("rateguard-memory-blocked", "rateguard-redis-blocked"),
)


def round_order(live: Sequence[str], r: int, chains: Sequence[Sequence[str]] = ADJACENT) -> list[str]:
    """Round ``r``'s order of ``live``: each chain's members (those live) back to back, reversed
    in odd rounds, and the blocks (chains and lone variants) rotated by one every round, so no
    variant always runs first or after the same one."""
    blocks: list[list[str]] = []
    placed: set[str] = set()
    for name in live:
        if name in placed:
            continue
        chain = next((c for c in chains if name in c), (name,))
        block = [n for n in chain if n in live and n not in placed]
        placed.update(block)
        blocks.append(block[::-1] if r % 2 else block)
    shift = r % len(blocks) if blocks else 0
    return [name for block in blocks[shift:] + blocks[:shift] for name in block]


def round_seconds(opts: Options, variants: list[Variant]) -> float:
    return sum(
        opts.duration
        + WRK_OVERHEAD_S
        + (0 if v.blocked or opts.latency_duration == 0 else opts.latency_duration + WRK_OVERHEAD_S)
        for v in variants
    )


def estimate_seconds(opts: Options, variants: list[Variant]) -> float:
    start = sum(STARTUP_S + (opts.warmup + WRK_OVERHEAD_S if opts.warmup > 0 else 0) for _ in variants)
    store = 8 * opts.store_reps * opts.store_seconds + 3 if opts.store_seconds > 0 else 0
    return start + opts.rounds * round_seconds(opts, variants) + store + 5


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("wrk") is None:
        print(WRK_HELP, file=sys.stderr)
        return 2

    variants: list[Variant] = []
    skipped: list[tuple[str, str]] = []
    have_redis = shutil.which("redis-server") is not None
    for name in opts.variants:
        v = BY_NAME[name]
        missing = v.missing()
        if missing:
            why = f"{', '.join(missing)} not installed: pip install -e '.[bench]'"
        elif v.redis and not have_redis:
            why = REDIS_HELP
        elif v.commit is not None and not commit_available(v.commit):
            why = f"commit {v.commit} is not in this git checkout (a shallow clone?): git fetch --unshallow"
        else:
            variants.append(v)
            continue
        skipped.append((name, why))
        log(f"skipping {name}: {why}")
    need_redis = any(v.redis for v in variants) or (opts.store_seconds > 0 and opts.store_redis)
    if need_redis and not have_redis:
        log(f"no Redis figures: {REDIS_HELP}")
        need_redis = False

    from benchmarks import report

    pin = pinning(opts.pin)
    started = time.time()
    deadline = time.monotonic() + opts.max_minutes * 60
    log(
        f"rateguard benchmarks: {len(variants)} variants x {opts.rounds} round(s) of {opts.duration:g} s at "
        f"{opts.connections} connections"
        + (f" + {opts.latency_duration:g} s at 1" if opts.latency_duration > 0 else "")
        + f" (about {round_seconds(opts, variants):.0f} s a round); about "
        f"{estimate_seconds(opts, variants) / 60:.1f} min in all. {pin.note}."
    )
    meta = report.machine_and_versions()
    meta["load_before"] = os.getloadavg()
    source = report.source_digest()

    children = Children()
    rounds: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    round_walls: list[float] = []
    store: dict[str, Any] | None = None
    store_cmd: list[str] = []
    ceiling: dict[str, Any] | None = None
    notes: list[str] = []
    errors = (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired, redis_py.RedisError)

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # stop like Ctrl-C: clean up, keep what was measured

    old_term = signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="rateguard-bench-"))
    redis: RedisServer | None = None
    servers: dict[str, Server] = {}
    servers_source: str | None = None  # digest of rateguard/ once every server has started
    store_source: str | None = None  # and when the store bench started
    try:
        if need_redis:
            redis = RedisServer(children, workdir, pin.load)
            redis.start()
            # Flushed once, before any server connects: the servers then keep their state (the
            # blocked variants stay blocked) for the whole run. Each Redis variant has a database
            # of its own, so none sees another's keys (rateguard-redis and rateguard-redis-blocked
            # would otherwise share one bucket key).
            redis.flush()
        out_of_time = False
        redis_db = 0
        redis_urls: dict[str, str] = {}  # variant -> the database it was given
        for v in variants:
            if time.monotonic() > deadline:
                out_of_time = True
                notes.append(f"stopped after --max-minutes {opts.max_minutes:g}, while starting the servers")
                log(notes[-1])
                break
            redis_url = None
            if v.redis and redis is not None:
                redis_db += 1
                redis_url = redis_urls[v.name] = redis.url_db(redis_db)
            t0 = time.monotonic()
            server: Server | None = None
            try:
                server = start_server(v, children, workdir, pin, redis_url, opts.gc_freeze)
                if opts.warmup > 0:
                    run_wrk(server.url, opts.connections, opts.warmup, pin.load)
                    server.check()
                servers[v.name] = server
                log(
                    f"started {v.name:26} port {server.port}, pid {server.pid}, in {time.monotonic() - t0:.1f} s"
                )
            except errors as exc:
                if server is not None:
                    children.stop(server.proc)
                msg = f"{v.name}: server did not start: {exc}"
                rounds[v.name].append({"round": 1, "error": str(exc)})
                notes.append(msg)
                log(f"error: {msg}")
        # The servers have loaded rateguard/ by now: a later edit of it changes nothing they run.
        servers_source = report.source_digest()
        live = [v for v in variants if v.name in servers]
        for r in range(opts.rounds if live and not out_of_time else 0):
            # A new list: `live` may lose a variant during the round.
            names = round_order([v.name for v in live], r)
            order = [next(v for v in live if v.name == n) for n in names]
            round_start = time.monotonic()
            for v in order:
                out_of_time = time.monotonic() > deadline
                if out_of_time:
                    notes.append(f"stopped after --max-minutes {opts.max_minutes:g}, in round {r + 1}")
                    log(notes[-1])
                    break
                try:
                    data = measure(servers[v.name], opts, pin)
                    data["round"] = r + 1
                    rounds[v.name].append(data)
                    load = data["load"]
                    line = f"round {r + 1}  {v.name:26} {load['rps']:9.0f} req/s  p99 {load['p99_us'] / 1000:6.2f} ms"
                    if data["one"]:
                        line += f"  1 conn {data['one']['mean_us']:7.1f} us"
                    log(line)
                except errors as exc:
                    msg = f"round {r + 1} {v.name}: {exc}"
                    rounds[v.name].append({"round": r + 1, "error": str(exc)})
                    notes.append(msg)
                    log(f"error: {msg}")
                    if servers[v.name].proc.poll() is not None:
                        live.remove(v)  # its server died: the later rounds go on without it
            if out_of_time or not live:
                break
            round_walls.append(time.monotonic() - round_start)
        notes.extend(redis_checks(servers, redis_urls))
        # The servers are done: stopped before the store bench, which runs on the same CPU.
        children.stop_many([s.proc for s in servers.values()])
        if opts.store_seconds > 0 and not out_of_time:
            log("store-only micro-benchmark ...")
            store_source = report.source_digest()
            try:
                store, store_cmd = store_bench(opts, pin, redis if opts.store_redis else None)
                if redis is not None and opts.store_redis:
                    ceiling = evalsha_ceiling(opts, pin, redis)
            except errors as exc:
                notes.append(f"store bench: {exc}")
                log(f"error: store bench: {exc}")
    except KeyboardInterrupt as exc:
        log(f"interrupted: {exc!r}; writing what was measured")
        notes.append(f"interrupted: {exc!r}")
    finally:
        if redis is not None:
            redis.stop()
        children.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(workdir, ignore_errors=True)

    meta["load_after"] = os.getloadavg()
    meta["source_changed"] = (servers_source or report.source_digest()) != source
    if meta["source_changed"]:
        log("rateguard/ changed while the servers started: the figures mix two versions of it")
    meta["store_source_changed"] = store_source is not None and store_source != servers_source
    if meta["store_source_changed"]:
        log("rateguard/ changed during the HTTP rounds: the store bench ran newer code than the servers")
    meta["elapsed_s"] = time.time() - started
    meta["started"] = started
    meta["pinning"] = pin.note
    meta["round_seconds"] = round_walls  # wall time of each complete round
    meta["rounds_run"] = max(
        (r["round"] for rs in rounds.values() for r in rs if "error" not in r), default=0
    )
    meta["commands"] = commands(opts, pin, store_cmd, ceiling, redis)
    written = report.write(
        opts=opts,
        variants=variants,
        skipped=skipped,
        rounds=rounds,
        store=store,
        ceiling=ceiling,
        meta=meta,
        notes=notes,
    )
    log(f"done in {meta['elapsed_s'] / 60:.1f} min; wrote {', '.join(str(p) for p in written)}")
    if notes:
        log(f"{len(notes)} problem(s), listed under Notes in the results")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
