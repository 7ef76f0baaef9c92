"""The admin dashboard in a real browser: Debian's headless Chromium, driven by Playwright, on a real demo.

A ``uvicorn demo.app:app`` process with an admin token; the page is opened, the token typed in,
traffic sent with httpx from chosen loopback addresses (each its own client), and what the page
shows is checked as a person would see it. Without ``/usr/bin/chromium`` (``apt-get install -y
chromium``) or the ``playwright`` package these tests skip, except in CI (``CI`` set), where they
fail. Playwright never downloads a browser here: it drives the system's Chromium.

``RATEGUARD_SCREENSHOT=docs/dashboard.png pytest tests/test_dashboard_browser.py`` refreshes the
screenshot the docs show; otherwise it is written to the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import rateguard.middleware

from .conftest import free_port
from .helpers import stop_process

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
ROUTE = "GET,POST /api/expensive"

pytestmark = pytest.mark.slow


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must have it: the dashboard is tested in a real browser)", pytrace=False)
    pytest.skip(reason)


class Demo:
    """A real demo server process on a free loopback port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RATEGUARD_RPM")}
        env["RATEGUARD_ADMIN_TOKEN"] = TOKEN
        self.log = log
        command = [sys.executable, "-m", "uvicorn", "demo.app:app", "--host", "127.0.0.1"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the demo did not start:\n{log.read_text()}")
            time.sleep(0.05)

    def client(self, ip: str) -> httpx.Client:
        """Requests from ``ip`` (any 127.x address): the demo sees each address as its own client."""
        return httpx.Client(base_url=self.url, transport=httpx.HTTPTransport(local_address=ip), timeout=5)

    def stop(self) -> None:
        stop_process(self.proc)  # by pid: only the process this test started


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    server = Demo(tmp_path_factory.mktemp("demo") / "uvicorn.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Chromium context with a fresh profile (``--user-data-dir``) for this module."""
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[dev]' (never `playwright install`)")
    playwright = sync_playwright().start()
    try:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(5000)
        try:
            yield context
        finally:
            context.close()
    finally:
        playwright.stop()


def open_dashboard(browser: Any, demo: Demo) -> tuple[Any, list[str]]:
    """The page, signed in with the token; and the script errors and CSP violations it reports."""
    from playwright.sync_api import expect

    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
    page.on(
        "console",
        lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    page.goto(demo.url + "/api/admin/")
    # The page itself needs no token; its first poll is refused, and it asks for one.
    expect(page.locator("#status")).to_have_text("token needed")
    page.fill("#token", TOKEN)
    page.click("#connect")
    expect(page.locator("#status")).to_have_text("live")
    return page, problems


def number(page: Any, selector: str) -> int:
    return int(page.text_content(selector).replace(",", ""))


def until_limited(client: httpx.Client, path: str = "/api/expensive", limit: int = 20) -> list[int]:
    codes: list[int] = []
    while len(codes) < limit and 429 not in codes:
        codes.append(client.get(path).status_code)
    return codes


def chart_colours(page: Any) -> dict[str, int]:
    """How many chart pixels are drawn in the allowed (green) and limited (red) colours."""
    return page.evaluate(
        """() => {
        const c = document.getElementById("chart");
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let allowed = 0, limited = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (d[i] < 80 && d[i + 1] > 130 && d[i + 2] < 120) allowed++;
          if (d[i] > 180 && d[i + 1] < 100 && d[i + 2] < 100) limited++;
        }
        return {allowed, limited};
      }"""
    )


def background_traffic(demo: Demo, seconds: float) -> list[threading.Thread]:
    """A few clients, some over their limit, for a chart worth looking at."""

    def run(ip: str, path: str, pause: float) -> None:
        end = time.monotonic() + seconds
        with demo.client(ip) as c:
            while time.monotonic() < end:
                c.get(path)
                time.sleep(pause)

    threads = [
        threading.Thread(target=run, args=(f"127.0.0.{i}", path, pause))
        for i, path, pause in [
            (10, "/api/expensive", 0.05),
            (11, "/api/expensive", 0.15),
            (12, "/api/data", 0.08),
            (13, "/api/data", 0.3),
        ]
    ]
    for t in threads:
        t.start()
    return threads


def test_dashboard_shows_traffic_then_resets_a_client(browser: Any, demo: Demo, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page, problems = open_dashboard(browser, demo)
    allowed, limited = number(page, "#allowed-total"), number(page, "#limited-total")

    with demo.client("127.0.0.2") as client:
        codes = until_limited(client)
        assert codes == [200] * 5 + [429]
        # The page polls every second: the totals move (each request is checked by the global
        # limit and the route's, so 5 admitted requests and 1 denied one are 11 + 1 decisions).
        expect(page.locator("#limited-total")).to_have_text(str(limited + 1))
        expect(page.locator("#allowed-total")).to_have_text(str(allowed + 11))
        expect(page.locator("#limited-rate")).to_have_text(re.compile(r"^[0-9.,]+$"))  # a rate, per poll
        colours = chart_colours(page)
        assert colours["allowed"] > 0 and colours["limited"] > 0, colours

        # Inspect the client: its route bucket is empty.
        page.fill("#client", "127.0.0.2")
        page.click("#inspect")
        route_row = page.locator("#buckets tr", has_text=ROUTE)
        expect(route_row.locator("td").nth(1)).to_have_text(re.compile(r"^0(\.\d)? / 5$"))
        expect(page.locator("#message")).to_have_text("2 bucket(s), 2 stored")

        # Reset it from the page: the buckets are full again, and its next request is allowed.
        page.click("#reset")
        expect(page.locator("#message")).to_have_text("Reset 127.0.0.2: cleared 2 bucket(s)")
        expect(route_row.locator("td").nth(1)).to_have_text("5 / 5")
        after = client.get("/api/expensive")
        assert after.status_code == 200
        assert after.headers["x-ratelimit-remaining"] == "4"

    # Some traffic from other clients, for the screenshot the docs show: taken while it runs.
    traffic = background_traffic(demo, 6)
    # The store's row is refreshed from /stats every 5 s: it comes to count the new buckets.
    page.wait_for_function(
        "() => Number(document.querySelector('#stores td:nth-child(7)').textContent) >= 6", timeout=7000
    )
    page.fill("#client", "127.0.0.10")
    page.click("#inspect")
    expect(page.locator("#message")).to_have_text("2 bucket(s), 2 stored")
    page.wait_for_timeout(1000)
    shot = Path(os.environ.get("RATEGUARD_SCREENSHOT") or tmp_path / "dashboard.png")
    page.screenshot(path=str(shot), full_page=True)
    for t in traffic:
        t.join()
    assert shot.stat().st_size > 10_000
    assert problems == []
    page.close()


@pytest.mark.xfail(
    not hasattr(rateguard.middleware, "LIMITED"),
    reason="RateGuard and limit() do not feed rateguard.topk.LIMITED yet (the two-line hook on denial)",
    run=False,
)
def test_dashboard_lists_the_most_limited_clients(browser: Any, demo: Demo) -> None:
    from playwright.sync_api import expect

    with demo.client("127.0.0.20") as client:
        codes = until_limited(client)
        codes += [client.get("/api/expensive").status_code for _ in range(2)]
    assert codes == [200] * 5 + [429] * 3

    page, problems = open_dashboard(browser, demo)
    row = page.locator("#top-clients tr", has_text="127.0.0.20")
    expect(row.locator("td").nth(1)).to_have_text("3")
    expect(row.locator("td").nth(2)).to_have_text(ROUTE)
    row.get_by_role("button", name="inspect").click()
    expect(page.locator("#client")).to_have_value("127.0.0.20")
    expect(page.locator("#buckets tr", has_text=ROUTE)).to_be_visible()
    assert problems == []
    page.close()
