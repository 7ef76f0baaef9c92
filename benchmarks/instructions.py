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

Not counted: the kernel (socket reads and writes, epoll), which every real request also pays, so
real req/s ratios are closer to 1 than the instruction ratios. Redis variants are left out: most
of their work is in redis-server and the kernel, which callgrind does not see.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.variants import BY_NAME, Variant

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


async def _drive(variant: Variant, count: int) -> None:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from benchmarks import apps

    loop = asyncio.get_running_loop()
    cfg = Config(
        apps.build(variant.name),
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    cfg.load()
    transport = FakeTransport()
    state = ServerState()
    protocol = HttpToolsProtocol(cfg, state, {}, loop)
    protocol.connection_made(transport)  # type: ignore[arg-type]

    async def one() -> None:
        transport.waiter = loop.create_future()
        protocol.data_received(REQUEST)
        await transport.waiter
        await asyncio.sleep(0)
        if state.tasks:  # the request's task is still going (BaseHTTPMiddleware's task group): finish it
            await asyncio.wait(state.tasks)

    for _ in range(WARMUP):
        await one()
    want = 429 if variant.blocked else 200
    warm = _statuses(transport)
    if len(warm) != WARMUP or warm[-1] != want:
        raise SystemExit(f"{variant.name}: warm-up answered {len(warm)} responses, the last {warm[-1:]}")
    gc.collect()
    gc.freeze()
    for _ in range(count):
        await one()
    got = _statuses(transport)
    bad = [s for s in got if s != want]
    if len(got) != count or bad:
        raise SystemExit(
            f"{variant.name}: {count} requests, {len(got)} responses, {len(bad)} not {want} (first {bad[:1]})"
        )


def drive(name: str, count: int) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_drive(BY_NAME[name], count))
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


def valgrind_command(valgrind: str, name: str, count: int) -> list[str]:
    return [
        valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "benchmarks.instructions", "--drive", name, "--requests", str(count),
    ]  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def run_jobs(jobs: list[Job], valgrind: str, parallel: int, workdir: Path, timeout: float) -> None:
    """Run every job's valgrind, ``parallel`` at a time; fill in its count of instructions or its
    error. Every child is killed in a `finally`."""
    env = dict(os.environ, PYTHONHASHSEED="0", BENCH_VARIANT="none")  # apps.py builds one app on import
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
                    job.proc = subprocess.Popen(
                        valgrind_command(valgrind, job.variant.name, job.count),
                        env=env,
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


def markdown(rows: list[Row], count: int, notes: list[str]) -> str:
    base = next((r.per_request for r in rows if r.variant.name == "none"), None)
    lines = [
        f"# Instructions per request, {dt.date.today().isoformat()}",
        "",
        f"CPU instructions of the whole in-process server path of one keep-alive `GET /`, counted by "
        f"`valgrind --tool=callgrind`: uvicorn's `HttpToolsProtocol` on a fake transport (httptools "
        f"parsing, the ASGI app, the response's bytes), on uvloop, after {WARMUP} warm-up requests and "
        f"`gc.freeze()`. Per variant, (Ir({count} requests) - Ir(0 requests)) / {count}: start-up and "
        "imports cancel, and the count is the same from one run to the next, where HTTP figures here "
        "move by ±20-30%. Every response is checked (200, or 429 for the blocked variant).",
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
            if r.variant.name == "none"
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
        f"benchmarks.instructions --drive <variant> --requests <0 or {count}>`",
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
        return drive(args.drive, args.requests)
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print(VALGRIND_HELP, file=sys.stderr)
        return 2

    notes: list[str] = []
    if args.variants:
        names = args.variants.split(",")
    else:
        names = [*DEFAULT_VARIANTS, *(n for n in IF_INSTALLED if not BY_NAME[n].missing())]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    if "none" not in names:
        names.insert(0, "none")
    variants: list[Variant] = []
    for name in dict.fromkeys(names):
        v = BY_NAME[name]
        why = None
        if v.redis:
            why = "needs Redis, whose work callgrind does not see"
        elif v.missing():
            why = f"{', '.join(v.missing())} not installed: pip install -e '.[bench]'"
        if why:
            notes.append(f"{name}: skipped, {why}")
            log(f"skipping {name}: {why}")
        else:
            variants.append(v)

    jobs = [Job(v, n) for v in variants for n in (0, args.requests)]
    log(
        f"{len(variants)} variants x 2 valgrind runs (0 and {args.requests} requests after {WARMUP} warm-up), "
        f"{args.parallel} at a time: about {len(jobs) * 35 / args.parallel / 60:.0f} min"
    )

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="rateguard-instructions-"))
    started = time.monotonic()
    try:
        run_jobs(jobs, valgrind, args.parallel, workdir, args.timeout)
    except KeyboardInterrupt as exc:
        log(f"interrupted: {exc!r}")
        return 130
    finally:
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

    text = markdown(rows, args.requests, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "instructions.md"
    path.write_text(text, encoding="utf-8")
    log("")
    log(text)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min; wrote {path}")
    return 1 if any(r.per_request is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
