"""CPU instructions per request, counted by callgrind: `python -m benchmarks.instructions`.

HTTP figures on a shared machine move by ±20-30% over minutes; instruction counts do not. For each
variant, a driver builds the app (``benchmarks.apps.build``), puts uvicorn's ``HttpToolsProtocol``
on a fake transport and feeds it keep-alive ``GET /`` requests on uvloop, one at a time, the way a
socket would. That is the whole in-process server path: httptools parsing, the ASGI app (FastAPI,
the middleware, the endpoint), the response's bytes. It runs under
``valgrind --tool=callgrind`` twice, with 0 and with N measured requests after the same warm-up;
(Ir(N) - Ir(0)) / N cancels start-up and imports. Two runs at a time, one per CPU.

    python -m benchmarks.instructions                       # the default variants, N = 1000
    python -m benchmarks.instructions --variants none,rateguard-memory --requests 2000
    python -m benchmarks.instructions --keys 100000 --variants keyed-floor-memory,keyed-rateguard-memory

``--keys N`` measures the growth runs' keyed variants as `benchmarks.scale` serves them: every
request carries an ``x-api-key`` from the same walk over N keys, each app starts with the N
buckets made (its lifespan runs first), and the reference is ``keyed-none``.

``--concurrency 32`` drives 32 connections, one request on each at a time, all sent in one loop
turn: as wrk's 32 connections do, and as a RedisStore coalesces them into one write.

    python -m benchmarks.instructions --variants rateguard-redis,rateguard-redis-before --concurrency 32

Redis variants (against a private redis-server the run starts, one database per run) count the
app's side only: redis-server is another process, which callgrind does not follow. Under valgrind
their store's deadlines are 30 s and an outage answers 503, so no request is decided by the local
fallback unseen. ``rateguard-redis-before`` runs the RedisStore of commit 6d6b562, extracted from
git, as `benchmarks.run` does: the same-run comparison of issue 13 that the machine's noise can't
blur (wall-clock rounds here differ by ±30% from one to the next).

Not counted: the kernel (socket reads and writes, epoll), which every real request also pays, so
real req/s ratios are closer to 1 than the instruction ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.run import Children, RedisServer, commit_available, extract_commit
from benchmarks.variants import BY_NAME, SCALE_BY_NAME, Variant

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
VALGRIND_HELP = "valgrind is not installed: sudo apt-get install -y valgrind (Debian/Ubuntu)"
DEFAULT_VARIANTS = (
    "none",
    "headers-only",
    "floor-memory",
    "rateguard-memory",
    "rateguard-memory-noheaders",
    "rateguard-memory-blocked",
    "basehttp-noop",
)
IF_INSTALLED = ("slowapi-memory",)  # added to the defaults when its peer is importable
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\n\r\n"
WARMUP = 200  # requests before the count starts: caches filled, the blocked bucket emptied
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")
DISTS = ("uvicorn", "httptools", "uvloop", "starlette", "fastapi", "pydantic", "slowapi")
ALL = {**BY_NAME, **SCALE_BY_NAME}


def keyed_requests(keys: int, count: int, start: int = 0) -> list[bytes]:
    """The requests of benchmarks.scale's wrk script: x-api-key from its walk over ``keys`` keys."""
    from benchmarks.scale import walk_step

    step, i, out = walk_step(keys), keys // 3 + start, []
    for _ in range(count):
        i = (i + step) % keys
        out.append(REQUEST[:-2] + b"x-api-key: k%d\r\n\r\n" % i)
    return out


async def _lifespan_startup(app: Any) -> asyncio.Task[None]:
    """Run the app's lifespan start-up (a keyed app's prefill) and keep it open."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started: asyncio.Future[dict[str, Any]] = loop.create_future()
    await queue.put({"type": "lifespan.startup"})

    async def receive() -> dict[str, Any]:
        return await queue.get()

    async def send(message: dict[str, Any]) -> None:
        if message["type"].startswith("lifespan.startup") and not started.done():
            started.set_result(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    task = loop.create_task(app(scope, receive, send))
    message = await started
    if message["type"] != "lifespan.startup.complete":
        raise SystemExit(f"lifespan start-up failed: {message.get('message')}")
    return task


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# The driver: runs inside valgrind, one variant, `count` measured requests.


class FakeTransport:
    """Just enough of an asyncio transport for uvicorn: records what is written, and wakes the
    driver on the first write of a response."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None
        self.extra = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _statuses(transport: FakeTransport) -> list[int]:
    statuses = [int(m.group(1)) for m in STATUS.finditer(b"".join(transport.written))]
    transport.written.clear()
    return statuses


async def _drive(variant: Variant, count: int, keys: int = 0, concurrency: int = 1) -> None:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from benchmarks import apps

    loop = asyncio.get_running_loop()
    app = apps.build(variant.name)
    if keys:
        await _lifespan_startup(app)
    warm_requests = keyed_requests(keys, WARMUP) if keys else [REQUEST] * WARMUP
    requests = keyed_requests(keys, count, WARMUP) if keys else [REQUEST] * count
    cfg = Config(
        app,
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    cfg.load()
    state = ServerState()
    if concurrency > 1:
        await _drive_concurrent(variant, cfg, state, count, concurrency)
        return
    transport = FakeTransport()
    protocol = HttpToolsProtocol(cfg, state, {}, loop)
    protocol.connection_made(transport)  # type: ignore[arg-type]

    async def one(request: bytes) -> None:
        transport.waiter = loop.create_future()
        protocol.data_received(request)
        await transport.waiter
        await asyncio.sleep(0)
        if state.tasks:  # the request's task is still going (BaseHTTPMiddleware's task group): finish it
            await asyncio.wait(state.tasks)

    for request in warm_requests:
        await one(request)
    want = 429 if variant.blocked else 200
    warm = _statuses(transport)
    if len(warm) != WARMUP or warm[-1] != want:
        raise SystemExit(f"{variant.name}: warm-up answered {len(warm)} responses, the last {warm[-1:]}")
    gc.collect()
    gc.freeze()
    for request in requests:
        await one(request)
    got = _statuses(transport)
    bad = [s for s in got if s != want]
    if len(got) != count or bad:
        raise SystemExit(
            f"{variant.name}: {count} requests, {len(got)} responses, {len(bad)} not {want} (first {bad[:1]})"
        )


async def _drive_concurrent(variant: Variant, cfg: Any, state: Any, count: int, concurrency: int) -> None:
    """``concurrency`` keep-alive connections, one request on each at a time, all sent in one loop
    turn and awaited together: what a server sees from `wrk -c<concurrency>`, where a RedisStore
    coalesces the decisions of a loop turn into one write. ``count`` is rounded up to whole turns."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(concurrency):
        transport = FakeTransport()
        protocol = HttpToolsProtocol(cfg, state, {}, loop)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        conns.append((transport, protocol))

    async def turn() -> None:
        for transport, _ in conns:
            transport.waiter = loop.create_future()
        for _, protocol in conns:
            protocol.data_received(REQUEST)
        await asyncio.gather(*(t.waiter for t, _ in conns if t.waiter is not None))
        await asyncio.sleep(0)
        if state.tasks:
            await asyncio.wait(state.tasks)

    def statuses() -> list[int]:
        return [s for transport, _ in conns for s in _statuses(transport)]

    turns = -(-WARMUP // concurrency)
    for _ in range(turns):
        await turn()
    want = 429 if variant.blocked else 200
    warm = statuses()
    if len(warm) != turns * concurrency or warm[-1] != want:
        raise SystemExit(f"{variant.name}: warm-up answered {len(warm)} responses, the last {warm[-1:]}")
    gc.collect()
    gc.freeze()
    turns = -(-count // concurrency)
    for _ in range(turns):
        await turn()
    got = statuses()
    bad = [s for s in got if s != want]
    if len(got) != turns * concurrency or bad:
        raise SystemExit(
            f"{variant.name}: {turns * concurrency} requests, {len(got)} responses, {len(bad)} not {want} "
            f"(first {bad[:1]})"
        )


def drive(name: str, count: int, keys: int = 0, concurrency: int = 1) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_drive(ALL[name], count, keys, concurrency))
    return 0


# ---------------------------------------------------------------------------------------------
# The measurement: two valgrind runs per variant, two at a time.


@dataclass
class Job:
    variant: Variant
    count: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    instructions: int | None = None
    error: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # a Redis database, an earlier rateguard/


def valgrind_command(
    valgrind: str, name: str, count: int, keys: int = 0, out: str = "/dev/null", concurrency: int = 1
) -> list[str]:
    return [
        valgrind, "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, "-m", "benchmarks.instructions", "--drive", name, "--requests", str(count),
        "--keys", str(keys), "--concurrency", str(concurrency),
    ]  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def run_jobs(
    jobs: list[Job],
    valgrind: str,
    parallel: int,
    workdir: Path,
    timeout: float,
    keys: int = 0,
    keep: Path | None = None,
    concurrency: int = 1,
) -> None:
    """Run every job's valgrind, ``parallel`` at a time; fill in its count of instructions or its
    error. Every child is killed in a `finally`. ``keep``: a directory for callgrind's output
    files, for `callgrind_annotate` (else they are not written)."""
    env = dict(os.environ, PYTHONHASHSEED="0", BENCH_VARIANT="none")  # apps.py builds one app on import
    env["BENCH_PREFILL"] = str(keys)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    waiting = list(jobs)
    running: list[tuple[Job, float]] = []
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                job = waiting.pop(0)
                job.log = workdir / f"{job.variant.name}-{job.count}.log"
                with job.log.open("wb") as out:
                    # cwd is a scratch directory: a peer that reads ./.env (slowapi does) finds none.
                    out_file = (
                        str(keep / f"callgrind.{job.variant.name}.{job.count}") if keep else "/dev/null"
                    )
                    job.proc = subprocess.Popen(
                        valgrind_command(valgrind, job.variant.name, job.count, keys, out_file, concurrency),
                        env={**env, **job.env},
                        cwd=workdir,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                running.append((job, time.monotonic()))
            time.sleep(0.2)
            for job, started in list(running):
                assert job.proc is not None and job.log is not None
                if job.proc.poll() is None:
                    if time.monotonic() - started > timeout:
                        _stop(job.proc)
                        job.error = f"timed out after {timeout:.0f} s"
                        running.remove((job, started))
                    continue
                running.remove((job, started))
                text = job.log.read_text(errors="replace")
                found = COLLECTED.findall(text)
                if job.proc.returncode != 0 or not found:
                    lines = [line for line in text.splitlines() if not line.startswith("==")]
                    tail = "\n".join(lines[-15:])
                    job.error = f"exit status {job.proc.returncode}:\n{tail or text[-2000:]}"
                else:
                    job.instructions = int(found[-1])
    finally:
        for job, _ in running:
            if job.proc is not None:
                _stop(job.proc)


# ---------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    variant: Variant
    per_request: float | None
    error: str | None = None


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def versions() -> str:
    from benchmarks.report import source_digest

    parts = [f"python {platform.python_version()}"]
    for dist in DISTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
    commit = _git("rev-parse", "--short", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--", "rateguard")
        commit += f", uncommitted changes in rateguard/, digest {source_digest()}" if dirty else ""
        parts.insert(1, f"rateguard git {commit}")
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False)
    parts.append(valgrind.stdout.strip())
    return ", ".join(parts)


def markdown(rows: list[Row], count: int, notes: list[str], keys: int = 0, concurrency: int = 1) -> str:
    reference = "keyed-none" if keys else "none"
    base = next((r.per_request for r in rows if r.variant.name == reference), None)
    clients = (
        f" Each request carries an `x-api-key` from a walk over {keys:,} keys (the growth runs' wrk "
        f"script), and each app started with those {keys:,} buckets made."
        if keys
        else ""
    )
    if concurrency > 1:
        clients += (
            f" {concurrency} keep-alive connections, one request on each at a time, all {concurrency} "
            "sent in one loop turn and awaited together (as `wrk -c" + str(concurrency) + "` keeps them)."
        )
    if any(r.variant.redis for r in rows):
        clients += (
            " Redis variants count the app's side (redis-py or rateguard's own connection, the "
            "batching, the replies) against a private redis-server, whose own work callgrind does not "
            "see; under valgrind their deadlines are 30 s and an outage answers 503, so no request "
            "passes by the local fallback."
        )
    lines = [
        f"# Instructions per request, {dt.date.today().isoformat()}"
        + (f", {keys:,} clients" if keys else ""),
        "",
        f"CPU instructions of the whole in-process server path of one keep-alive `GET /`, counted by "
        f"`valgrind --tool=callgrind`: uvicorn's `HttpToolsProtocol` on a fake transport (httptools "
        f"parsing, the ASGI app, the response's bytes), on uvloop, after {WARMUP} warm-up requests and "
        f"`gc.freeze()`. Per variant, (Ir({count} requests) - Ir(0 requests)) / {count}: start-up and "
        "imports cancel, and the count is the same from one run to the next, where HTTP figures here "
        "move by ±20-30%. Every response is checked (200, or 429 for the blocked variant)." + clients,
        "",
        "| variant | instructions/request | + vs no limiter | ratio = none / variant |",
        "|---|--:|--:|--:|",
    ]
    for r in rows:
        label = f"{r.variant.label} (`{r.variant.name}`)"
        if r.per_request is None:
            lines.append(f"| {label} | failed | | |")
            continue
        if base is None:
            lines.append(f"| {label} | {r.per_request:,.0f} | n/a | n/a |")
            continue
        added = (
            "—"
            if r.variant.name == reference
            else f"{r.per_request - base:+,.0f} ({r.per_request / base - 1:+.1%})"
        )
        lines.append(f"| {label} | {r.per_request:,.0f} | {added} | {base / r.per_request:.2f} |")
    lines += [
        "",
        "*ratio*: the req/s ratio to no limiter that a CPU-bound server would get if its time were "
        "proportional to instructions. The kernel's work for each request (socket reads and writes, "
        "epoll) is not counted here but is paid by every variant alike, and instructions differ in "
        "cost (cache misses, branches), so real ratios are closer to 1.",
        "",
        f"- {versions()}",
        f"- `PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m "
        f"benchmarks.instructions --drive <variant> --requests <0 or {count}> --keys {keys} "
        f"--concurrency {concurrency}`" + (f" with `BENCH_PREFILL={keys}`" if keys else ""),
    ]
    if notes:
        lines += ["", "## Notes", ""]
        for n in notes:
            first, _, rest = n.partition("\n")
            lines.append(f"- {first}")
            if rest:
                lines += ["", "  ```", *(f"  {line}" for line in rest.splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description="CPU instructions per request of each variant's server path, under callgrind.",
    )
    parser.add_argument(
        "--variants",
        help="comma-separated names (default: "
        + ",".join(DEFAULT_VARIANTS)
        + ", and "
        + ",".join(IF_INSTALLED)
        + " if installed); 'none' is always added: it is the reference",
    )
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per run (1000)")
    parser.add_argument(
        "--parallel", type=int, default=2, help="valgrind runs at a time (2: one per CPU of a 2-vCPU machine)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds one valgrind run may take (900)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="directory for instructions.md (benchmarks/results)"
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=0,
        help="clients: requests carry x-api-key from a walk over this many keys, apps start with their "
        "buckets (keyed-* variants; the reference is keyed-none). Writes instructions-<keys>-keys.md",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep callgrind's output files here, for callgrind_annotate (else /dev/null)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="connections, one request on each at a time, sent in one loop turn (1: one request at a "
        "time). Writes instructions[-redis]-c<N>.md (-redis: with Redis variants)",
    )
    parser.add_argument("--drive", metavar="VARIANT", help=argparse.SUPPRESS)  # the run under valgrind
    args = parser.parse_args(argv)
    if args.requests < 1 and args.drive is None:
        parser.error("--requests must be at least 1")
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive is not None:
        return drive(args.drive, args.requests, args.keys, args.concurrency)
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print(VALGRIND_HELP, file=sys.stderr)
        return 2

    notes: list[str] = []
    if args.variants:
        names = args.variants.split(",")
    else:
        names = [*DEFAULT_VARIANTS, *(n for n in IF_INSTALLED if not BY_NAME[n].missing())]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(ALL)}", file=sys.stderr)
        return 2
    reference = "keyed-none" if args.keys else "none"
    if reference not in names:
        names.insert(0, reference)
    variants: list[Variant] = []
    for name in dict.fromkeys(names):
        v = ALL[name]
        why = None
        if v.redis and shutil.which("redis-server") is None:
            why = "needs redis-server (sudo apt-get install -y redis-server)"
        elif v.commit is not None and not commit_available(v.commit):
            why = f"needs commit {v.commit} (a full clone)"
        elif v.missing():
            why = f"{', '.join(v.missing())} not installed: pip install -e '.[bench]'"
        if why:
            notes.append(f"{name}: skipped, {why}")
            log(f"skipping {name}: {why}")
        else:
            variants.append(v)

    jobs = [Job(v, n) for v in variants for n in (0, args.requests)]
    redis_jobs = [j for j in jobs if j.variant.redis]
    log(
        f"{len(variants)} variants x 2 valgrind runs (0 and {args.requests} requests after {WARMUP} warm-up), "
        f"{args.parallel} at a time: about {len(jobs) * 35 / args.parallel / 60:.0f} min"
    )

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="rateguard-instructions-"))
    started = time.monotonic()
    children = Children()
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
        if redis_jobs:
            # The app's side only: redis-server's work is its own process, which callgrind does not
            # follow. One database per run, so no run finds another's buckets.
            redis = RedisServer(children, workdir, [], databases=max(16, len(redis_jobs) + 1))
            redis.start()
            for db, job in enumerate(redis_jobs, start=1):
                job.env.update(BENCH_REDIS_URL=redis.url_db(db), BENCH_REDIS_DEADLINE="30")
        for job in jobs:
            if job.variant.commit is not None:
                path = str(extract_commit(job.variant.commit, workdir))
                job.env.update(BENCH_RATEGUARD_PATH=path, PYTHONPATH=os.pathsep.join([path, str(REPO)]))
        run_jobs(jobs, valgrind, args.parallel, workdir, args.timeout, args.keys, args.keep, args.concurrency)
    except KeyboardInterrupt as exc:
        log(f"interrupted: {exc!r}")
        return 130
    finally:
        children.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(workdir, ignore_errors=True)

    rows: list[Row] = []
    for v in variants:
        zero, full = (j for j in jobs if j.variant is v)
        if zero.instructions is None or full.instructions is None:
            error = "; ".join(f"{j.count} requests: {j.error}" for j in (zero, full) if j.error)
            notes.append(f"{v.name}: {error}")
            log(f"error: {v.name}: {error}")
            rows.append(Row(v, None, error))
        else:
            rows.append(Row(v, (full.instructions - zero.instructions) / args.requests))

    text = markdown(rows, args.requests, notes, args.keys, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "instructions" + (f"-{args.keys}-keys" if args.keys else "")
    name += "-redis" if any(v.redis for v in variants) else ""
    name += f"-c{args.concurrency}" if args.concurrency > 1 else ""
    path = args.out / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    log("")
    log(text)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min; wrote {path}")
    return 1 if any(r.per_request is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
