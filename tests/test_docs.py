"""Every code block of README.md and docs/ runs here, or says why it can't: the docs can't drift.

A block is a fence of backticks; the word after the fence is its language, and attributes may
follow in braces, as pymdownx.superfences reads them: ```` ```console { .not-run reason="..." } ````
(a title too goes in the braces then: ```` ```python { title="slowapi" .not-run reason="..." } ````).
Each page (README.md, docs/*.md) runs on its own, top to bottom, in a fresh temporary working
directory, its python, pycon and console blocks in the order they appear. The pages run at the
same time, a thread each (most of their time is servers starting, in other processes); what runs
in this process takes turns, one step at a time, and sees os.environ as it was: a step that sets
``RATEGUARD_MODE`` sets it for itself only.

``python``
    Executed. The blocks of one page share one namespace, like a doctest file: a page may build
    on its earlier blocks (an ``app`` made above, ``from fastapi import ...`` once). Top-level
    ``await`` works; one event loop serves the whole page.
``pycon``
    A doctest in the page's namespace; the output must match exactly (``await`` works here too).
``console``
    Each ``$ `` line is a command, run by bash in the working directory, with the repository on
    ``PYTHONPATH``; ``.venv/bin/`` stands for this interpreter's bin directory and ``redis-server``
    for the server binary the test suite uses (tests/servers.py). The lines after a command are
    its output: they must match what it prints (stdout and stderr), after the normalizing below,
    and it must exit with 0 (write ``; echo "exit code $?"`` to show a failure). The docs use
    ``curl``, which must be installed. A ``pytest`` they run loads only pytest-asyncio among the
    plugins installed (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``): the same output, in half the time;
    commands run with ``PYTHONWARNINGS=ignore::DeprecationWarning``, since what a dependency
    deprecates differs between the versions CI tests.
    A command that starts ``uvicorn`` or ``redis-server`` (no ``;``, ``|`` or ``&&`` in it) is a
    server: it runs in the background until the page ends (or another server takes its port), and
    the lines shown after it must match the start of its log once it listens. Every ``--port N``
    of a server is mapped to a free port, and N is replaced wherever later commands name it;
    outputs are mapped back, so the docs show the ports a reader uses.
``json``
    Parsed.
a block with a file name as its title (``title="app.py"``, ``title="pytest.ini"``)
    Also written to the working directory under that name, whatever its language, for the
    page's console blocks to use (``uvicorn app:app``, ``pytest test_app.py``); the directory is
    on ``sys.path`` while the page's python runs, so its blocks can import those files too.
anything else, or a block that can't run here
    (Docker, a package index, a browser, ``make bench``, a diagram): it carries the class
    ``.not-run`` and says why in ``reason="..."``. `test_every_block_is_run_or_marked` fails on
    any block that is neither.

The ports of a page's servers are mapped in its python and pycon blocks too (code and output),
so a block can connect to the Redis a console block started on "6379".

Hidden steps: an HTML comment ``<!-- test: ... -->`` holds Python that runs at that point of the
page, in its namespace; readers don't see it. It does a block's setup, checks what a block
claims, or does what the text asks the reader to do by hand: ``console.stop(6379)`` stops the
server on that port (Ctrl+C in its terminal), ``console.unused(6379)`` maps the port to one
where nothing listens (a Redis that isn't running).

Comparing output: trailing spaces and ``\\r`` go; ``date:`` header values, process ids
(``[1234]``, ``"pid": 1234``), ``"host"`` values, pytest's ``in 0.12s`` and the fractional
values of the timing-dependent JSON fields (``tokens``, ``reset_after``, ``retry_after``,
``latency_ms``, ``t``, ``sum``) are replaced by placeholders in both the docs and the output. In
the docs' output, ``…`` matches any text within a line, and a line that starts with ``…``
matches any number of lines (what follows it on that line is a comment for the reader).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import doctest
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import servers
from .helpers import stop_process

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
RUN = {"python", "pycon", "console", "json"}
BIN = Path(sys.executable).parent
# A server dies with the thread that started it, if this test process is killed (util-linux's
# setpriv; not preexec_fn, which isn't safe with threads).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^`]*)$")
HIDDEN = re.compile(r"<!--\s*test:(?P<code>.*?)-->", re.DOTALL)
ATTRIBUTES = re.compile(r"^(?P<lang>[\w+-]*)\s*(?:\{(?P<attrs>[^}]*)\})?\s*(?P<options>.*)$")
OPTION = re.compile(r'([\w-]+)="([^"]*)"')


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    classes: set[str]
    options: dict[str, str]
    body: str

    @property
    def file(self) -> str | None:
        """The file name in ``title="..."``, if the title is one: the block is written there."""
        title = self.options.get("title", "")
        return title if re.fullmatch(r"[\w.-]+\.\w+", title) else None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass
class Hidden:
    page: Path
    line: int
    code: str


def parse(page: Path) -> list[Block | Hidden]:
    """A page's fenced blocks and hidden test steps, in order."""
    lines = page.read_text("utf-8").splitlines()
    items: list[Block | Hidden] = []
    i = 0
    text_start = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        items.extend(_hidden(page, lines, text_start, i))
        indent, fence = match["indent"], match["fence"]
        close = re.compile(rf"^{re.escape(indent)}`{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        assert j < len(lines), f"{page.name}:{i + 1}: a fence that is never closed"
        info = ATTRIBUTES.match(match["info"].strip())
        assert info is not None, f"{page.name}:{i + 1}: can't read the fence's info string"
        assert "{" not in (info["options"] or ""), (
            f"{page.name}:{i + 1}: options and braces don't mix (superfences reads one or the other): "
            'write ```python { title="..." .not-run reason="..." }'
        )
        classes: set[str] = set()
        options = dict(OPTION.findall(info["options"] or ""))
        lang = info["lang"]
        for word in (info["attrs"] or "").split():
            if word.startswith("."):
                classes.add(word[1:])
        options.update(OPTION.findall(info["attrs"] or ""))
        if not lang:  # ``` { .python ... }: the first class is the language
            lang = next((w[1:] for w in (info["attrs"] or "").split() if w.startswith(".")), "")
            classes.discard(lang)
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j]
        )
        items.append(Block(page, i + 1, lang, classes, options, body + "\n" if body else ""))
        i = text_start = j + 1
    items.extend(_hidden(page, lines, text_start, len(lines)))
    return items


def _hidden(page: Path, lines: list[str], start: int, end: int) -> Iterator[Hidden]:
    text = "\n".join(lines[start:end])
    for m in HIDDEN.finditer(text):
        line = start + text[: m.start()].count("\n") + 1
        yield Hidden(page, line, textwrap.dedent(m["code"]).strip("\n"))


def blocks(page: Path) -> list[Block]:
    return [b for b in parse(page) if isinstance(b, Block)]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# -- every block is run or marked -------------------------------------------------------------


def test_every_block_is_run_or_marked() -> None:
    unmarked, unexplained, counted = [], [], 0
    for page in PAGES:
        for block in blocks(page):
            counted += 1
            if "not-run" in block.classes:
                if not block.options.get("reason", "").strip():
                    unexplained.append(block.where)
            elif block.lang not in RUN and not block.file:
                unmarked.append(f"{block.where} ({block.lang or 'no language'})")
    assert counted > 0
    assert not unmarked, (
        f"blocks that neither run here nor say why (add {{ .not-run reason=... }}): {unmarked}"
    )
    assert not unexplained, f"blocks marked .not-run with no reason=: {unexplained}"


def test_the_pages_are_the_ones_mkdocs_builds() -> None:
    """Every page in docs/ is in mkdocs.yml's nav, and every nav entry exists."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text("utf-8"))

    def entries(nav: Any) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list):
            for item in nav:
                yield from entries(item)
        elif isinstance(nav, dict):
            for value in nav.values():
                yield from entries(value)

    listed = {e for e in entries(config["nav"]) if e.endswith(".md")}
    present = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").glob("**/*.md")}
    assert listed == present


# -- running a page ---------------------------------------------------------------------------


class _TopLevelAwait(ast.NodeTransformer):
    """``await x`` outside any function becomes ``__await__(x)``, for doctest, which can't await."""

    def visit_AsyncFunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_FunctionDef = visit_Lambda = visit_AsyncFunctionDef

    def visit_Await(self, node: ast.Await) -> ast.AST:
        call = ast.Call(ast.Name("__await__", ast.Load()), [self.visit(node.value)], [])
        return ast.copy_location(call, node)


class _AwaitingParser(doctest.DocTestParser):
    def parse(self, string: str, name: str = "<string>") -> list[Any]:
        parts = super().parse(string, name)
        for part in parts:
            if isinstance(part, doctest.Example) and "await" in part.source:
                tree = ast.parse(part.source, mode="exec")
                part.source = ast.unparse(ast.fix_missing_locations(_TopLevelAwait().visit(tree))) + "\n"
        return parts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    command: str
    doc_port: int
    port: int
    proc: subprocess.Popen[bytes]
    expected: list[str]
    where: str
    log: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.log.append(raw.decode("utf-8", "replace").rstrip("\r\n"))


class Console:
    """The shell a page's console blocks share: its environment, its servers, its ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "80",
            "NO_COLOR": "1",
            # A pytest the docs run loads only the plugin they use: the same output, in half the time.
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "PYTEST_PLUGINS": "pytest_asyncio.plugin",
            # What a dependency deprecates differs between the versions CI runs (the lowest
            # Starlette's TestClient and a newer anyio): not the docs' business.
            "PYTHONWARNINGS": "ignore::DeprecationWarning",
        }
        for name in ("REDIS_URL", "RATEGUARD_RPM", "RATEGUARD_ADMIN_TOKEN", "RATEGUARD_MODE", "CI"):
            self.env.pop(name, None)
        self.ports: dict[int, int] = {}  # the port the docs name -> the one used here
        self.servers: dict[int, Server] = {}
        self.pending: list[Server] = []

    # -- what the docs write, as it runs here --

    def command(self, text: str) -> str:
        text = text.replace(".venv/bin/", f"{BIN}/")
        text = re.sub(r"(?<![\w/.-])redis-server(?![\w-])", shlex.quote(servers.server_path()), text)
        return self.ports_in(text)

    def ports_in(self, text: str) -> str:
        for doc, real in self.ports.items():
            text = re.sub(rf"(?<!\d){doc}(?!\d)", str(real), text)
        return text

    def shown(self, output: str) -> str:
        for doc, real in self.ports.items():
            output = re.sub(rf"(?<!\d){real}(?!\d)", str(doc), output)
        return output

    # -- running --

    def run_block(self, block: Block) -> None:
        for command, expected in commands(block):
            if is_server(command):
                self.start(command, expected, block.where)
                continue
            self.wait_for_servers(command)
            if command.startswith("export "):
                self.export(command, block.where)
                actual = ""
            else:
                actual = self.run(command, block.where)
            check_output(expected, self.shown(actual), f"{block.where}: $ {command}")

    def run(self, command: str, where: str) -> str:
        if re.search(r"(?<![\w-])curl ", command) and shutil.which("curl") is None:
            pytest.fail(f"{where}: the docs' examples need curl: apt-get install curl (brew install curl)")
        done = subprocess.run(
            ["bash", "-c", self.command(command)],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
        output = done.stdout.decode("utf-8", "replace")
        assert done.returncode == 0, f"{where}: $ {command}\nexited {done.returncode}:\n{output}"
        return output

    def export(self, command: str, where: str) -> None:
        out = self.run(f"{command}\nenv -0", where)
        self.env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)

    def start(self, command: str, expected: list[str], where: str) -> None:
        match = re.search(r"--port[ =](\d+)", command)
        assert match is not None, f"{where}: a server command needs --port: {command}"
        doc_port = int(match[1])
        self.stop(doc_port)
        self.ports[doc_port] = free_port()
        env_words, rest = [], shlex.split(command)
        while rest and re.match(r"^\w+=", rest[0]):
            env_words.append(rest.pop(0))
        line = " ".join([*map(shlex.quote, env_words), "exec", *map(shlex.quote, rest)])
        proc = subprocess.Popen(
            [*DIE_WITH_PARENT, "bash", "-c", self.command(line)],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        server = Server(command, doc_port, self.ports[doc_port], proc, expected, where)
        threading.Thread(target=server.read, daemon=True).start()
        self.servers[doc_port] = server
        self.pending.append(server)

    def wait_for_servers(self, command: str | None = None) -> None:
        """Wait for the servers a command names the port of (all of them, with no command).

        Servers start in the background, so those a page starts one after the other (or while
        it runs other commands) start together.
        """
        names = (lambda s: re.search(rf"(?<!\d){s.doc_port}(?!\d)", command)) if command else None
        pending = [s for s in self.pending if names is None or names(s)]
        self.pending = [s for s in self.pending if s not in pending]
        for server in pending:
            deadline = time.monotonic() + 20
            while True:
                assert server.proc.poll() is None, (
                    f"{server.where}: $ {server.command}\nexited {server.proc.returncode}:\n"
                    + "\n".join(server.log)
                )
                try:
                    socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{server.where}: {server.command} did not listen"
                    time.sleep(0.02)
            if server.expected:
                wanted = len([line for line in server.expected if not line.startswith("…")])
                while len(server.log) < wanted and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.05)  # a line logged together with the last one
                check_output(
                    server.expected,
                    self.shown("\n".join(server.log)),
                    f"{server.where}: $ {server.command}",
                    prefix=True,
                )

    def unused(self, doc_port: int) -> None:
        """Map a port the docs name to a free one where nothing listens (a server that is down)."""
        self.stop(doc_port)
        self.ports[doc_port] = free_port()

    def stop(self, doc_port: int) -> None:
        """Stop the server on this port (the docs: Ctrl+C in its terminal)."""
        server = self.servers.get(doc_port)
        if server is None:
            return
        try:
            if server in self.pending:  # check what it logged first
                self.pending.remove(server)
                self.pending.insert(0, server)
                self.wait_for_servers(str(doc_port))
        finally:
            del self.servers[doc_port]
            stop_process(server.proc)
            if server.proc.stdout is not None:
                server.proc.stdout.close()

    def close(self) -> None:
        """Stop every server (without checking them: `wait_for_servers` does, at the page's end)."""
        self.pending.clear()
        running = list(self.servers.values())
        self.servers.clear()
        for server in running:  # all at once: each takes a moment to shut down
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in running:
            stop_process(server.proc)
            if server.proc.stdout is not None:
                server.proc.stdout.close()


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """The commands of a console block, each with the output lines shown after it."""
    found: list[tuple[str, list[str]]] = []
    lines = block.body.splitlines()
    assert lines and lines[0].startswith("$ "), f"{block.where}: a console block starts with '$ '"
    i = 0
    while i < len(lines):
        command = lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + "\n" + lines[i]
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        found.append((command, output))
    return found


def is_server(command: str) -> bool:
    if re.search(r";|\||&&", command):
        return False
    words = [w for w in shlex.split(command, comments=True) if not re.match(r"^\w+=", w)]
    return bool(words) and Path(words[0]).name in ("uvicorn", "redis-server")


_NORMALIZE = [
    (re.compile(r"^date: .*$", re.MULTILINE | re.IGNORECASE), "date: <date>"),
    (re.compile(r"(server process )\[\d+\]"), r"\1[<pid>]"),
    (re.compile(r'("pid": ?)\d+'), r"\1<pid>"),
    (re.compile(r'("host": ?)"[^"]*"'), r"\1<host>"),
    (
        re.compile(r'("(?:tokens|reset_after|retry_after|latency_ms|t|sum)": ?)-?\d+\.\d+(?:e-?\d+)?'),
        r"\1<float>",
    ),
    (re.compile(r" in \d+\.\d+s\b"), " in <seconds>"),
]


def normalize(text: str) -> list[str]:
    text = text.replace("\r", "")
    for pattern, replacement in _NORMALIZE:
        text = pattern.sub(replacement, text)
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _matches(expected: list[str], actual: list[str], prefix: bool) -> bool:
    patterns = [
        None if line.startswith("…") else re.compile("^" + ".*".join(map(re.escape, line.split("…"))) + "$")
        for line in expected
    ]

    def at(e: int, a: int) -> bool:
        while e < len(patterns):
            pattern = patterns[e]
            if pattern is None:  # any number of lines
                return any(at(e + 1, k) for k in range(a, len(actual) + 1))
            if a >= len(actual) or not pattern.match(actual[a]):
                return False
            e, a = e + 1, a + 1
        return prefix or a == len(actual)

    return at(0, 0)


def check_output(expected: list[str], actual: str, what: str, *, prefix: bool = False) -> None:
    wanted = normalize("\n".join(expected))
    got = normalize(actual)
    if not _matches(wanted, got, prefix):
        pytest.fail(
            f"{what}\n--- the docs show:\n" + "\n".join(wanted) + "\n--- it printed:\n" + "\n".join(got)
        )


# What runs in this process (python, pycon, hidden steps) holds this lock, one step at a time,
# with the page's directory on sys.path, and os.environ put back afterwards.
IN_PROCESS = threading.RLock()


class Page:
    """One page's run: its namespace, event loop, working directory and console."""

    def __init__(self, page: Path, workdir: Path) -> None:
        self.page = page
        self.workdir = workdir
        self.runner = asyncio.Runner()
        with IN_PROCESS:
            self.console = Console(workdir)
        self.namespace: dict[str, Any] = {
            "__name__": "__docs__",
            "__await__": self.runner.run,
            "console": self.console,
            "workdir": workdir,
        }

    def run(self) -> None:
        try:
            for item in parse(self.page):
                if isinstance(item, Hidden):
                    # Not port-mapped: hidden steps name the docs' ports (console.stop(6379)).
                    self.python(item.code, f"{page_id(item.page)}:{item.line} (hidden)", mapped=False)
                    continue
                if "not-run" in item.classes:
                    continue
                if item.file:
                    (self.workdir / item.file).write_text(self.console.ports_in(item.body), "utf-8")
                if item.lang == "python":
                    self.python(item.body, item.where)
                elif item.lang == "pycon":
                    self.pycon(item)
                elif item.lang == "console":
                    self.console.run_block(item)
                elif item.lang == "json":
                    json.loads(item.body)
            self.console.wait_for_servers()  # and check what the last ones logged
        finally:
            self.console.close()
            with self.in_process():
                self.runner.close()

    @contextlib.contextmanager
    def in_process(self) -> Iterator[None]:
        with IN_PROCESS:
            environ = dict(os.environ)
            before = set(sys.modules)
            sys.path.insert(0, str(self.workdir))
            try:
                yield
            finally:
                sys.path.remove(str(self.workdir))
                # Put back what the step changed, key by key: other threads read os.environ
                # meanwhile (shutil.which reads PATH), so it must never be empty.
                for name in set(os.environ) - set(environ):
                    del os.environ[name]
                for name, value in environ.items():
                    if os.environ.get(name) != value:
                        os.environ[name] = value
                for name in set(sys.modules) - before:  # this page's modules (app.py, ...) are its own
                    if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(self.workdir)):
                        del sys.modules[name]

    def python(self, source: str, where: str, *, mapped: bool = True) -> None:
        if mapped:
            source = self.console.ports_in(source)
        code = compile(source, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        with self.in_process():
            result = eval(code, self.namespace)  # the docs' own code
            if asyncio.iscoroutine(result):
                self.runner.run(result)

    def pycon(self, block: Block) -> None:
        test = _AwaitingParser().get_doctest(
            block.body, self.namespace, block.where, str(block.page), block.line
        )
        for example in test.examples:  # the page's servers' ports, in the code and in what it shows
            example.source = self.console.ports_in(example.source)
            example.want = self.console.ports_in(example.want)
            if example.exc_msg is not None:
                example.exc_msg = self.console.ports_in(example.exc_msg)
        out = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=doctest.DONT_ACCEPT_BLANKLINE)
        with self.in_process():
            runner.run(test, out=out.write, clear_globs=False)
        if runner.failures:
            pytest.fail(f"{block.where}: pycon block\n{out.getvalue()}")


class PageRun:
    """A page running in a thread; `result` waits for it and raises what it raised."""

    def __init__(self, page: Path, slots: threading.Semaphore) -> None:
        self.page = page
        self.slots = slots
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"docs {page_id(page)}", daemon=True)

    def _run(self) -> None:
        with self.slots, tempfile.TemporaryDirectory(prefix="rateguard-docs-") as tmp:
            try:
                Page(self.page, Path(tmp)).run()
            except BaseException as exc:  # pytest.fail's too: re-raised by result()
                self.error = exc

    def result(self) -> None:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), f"{page_id(self.page)} did not finish in 5 minutes"
        if self.error is not None:
            raise self.error


# The pages with servers to start first: they take longest.
_SLOW_FIRST = ["README.md", "docs/lifecycle.md", "docs/observability.md", "docs/admin.md", "docs/testing.md"]


@pytest.fixture(scope="session")
def page_runs(request: pytest.FixtureRequest) -> dict[Path, PageRun]:
    from rateguard.checks import forget_warnings

    forget_warnings()  # a page that shows a once-per-process warning sees it
    slots = threading.Semaphore(max(2, os.cpu_count() or 1))
    selected = {  # the pages this session tests (all, unless -k or a node id chose some)
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_page"
    }
    order = sorted(selected, key=lambda p: _SLOW_FIRST.index(page_id(p)) if page_id(p) in _SLOW_FIRST else 99)
    runs = {page: PageRun(page, slots) for page in order}
    for run in runs.values():
        run.thread.start()
    # All of them end here, in this fixture's setup: pytest switches sys.stdout between a test's
    # phases, and a doctest running meanwhile in another thread would lose its output.
    for run in runs.values():
        run.thread.join(timeout=300)
    return runs


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page(page: Path, page_runs: dict[Path, PageRun]) -> None:
    page_runs[page].result()
