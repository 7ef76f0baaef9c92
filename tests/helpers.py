"""Small apps and clients for HTTP tests."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
from fastapi import Depends, FastAPI

from rateguard import RateGuard, limit


def client_for(app: Any, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def header_values(response: httpx.Response, name: str) -> list[str]:
    return response.headers.get_list(name)


def demo_like_app(store: Any = None, rpm: float = 60, **middleware: Any) -> FastAPI:
    """A global RateGuard plus a 5/min route, like the README's snippet."""
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=rpm, store=store, **middleware)

    @app.get("/api/data")
    async def data() -> dict[str, str]:
        return {"ok": "data"}

    @app.post("/api/expensive", dependencies=[Depends(limit(5))])
    async def expensive() -> dict[str, str]:
        return {"ok": "expensive"}

    return app


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 5) -> None:
    """Stop a child this test started (by its pid): SIGTERM, then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
