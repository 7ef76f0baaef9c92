"""limit() on websockets: connection attempts are limited, a refusal is a 429 (or 1008), never a 500."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import rateguard
from rateguard import MemoryStore, RateGuard, limit

from .conftest import free_port
from .helpers import stop_process


def ws_app(*, guard: bool = False, install: bool = False, per_message: Any = None) -> FastAPI:
    app = FastAPI(dependencies=[Depends(limit(2, store=MemoryStore()))])  # app-wide: HTTP and websockets
    if guard:
        app.add_middleware(RateGuard, requests_per_minute=1000)
    if install:
        rateguard.install(app)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                if per_message is not None:
                    verdict = await per_message.hit(websocket)
                    if not verdict.allowed:
                        await websocket.send_text(f"slow down: {verdict.retry_after:.0f} s")
                        continue
                await websocket.send_text(f"echo {text}")
        except WebSocketDisconnect:
            return

    @app.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    return app


def attempt(client: TestClient) -> str:
    with client.websocket_connect("/ws") as ws:
        ws.send_text("hi")
        return str(ws.receive_text())


@pytest.mark.parametrize("how", ["rateguard", "install"])
def test_a_refused_handshake_is_a_429_with_retry_after(how: str) -> None:
    app = ws_app(guard=how == "rateguard", install=how == "install")
    with TestClient(app, client=("203.0.113.7", 5000)) as client:
        assert [attempt(client), attempt(client)] == ["echo hi", "echo hi"]
        with pytest.raises(WebSocketDenialResponse) as info:
            attempt(client)
        http = client.get("/")  # the same limit, the same bucket name? no: the HTTP route has its own
    denied = info.value
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == "30"
    assert denied.json()["retry_after"] == 30
    assert http.status_code == 200


def test_without_rateguard_or_install_the_handshake_is_closed_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from rateguard.checks import forget_warnings

    forget_warnings()
    app = ws_app()
    with TestClient(app) as client:
        attempt(client)
        attempt(client)
        with pytest.raises(WebSocketDisconnect) as info:
            attempt(client)
    assert info.value.code == 1008
    assert "Retry after 30 s" in (info.value.reason or "")
    assert any("[websocket-429]" in r.getMessage() for r in caplog.records)


async def test_where_the_server_cannot_send_a_429_it_accepts_and_closes_1008() -> None:
    # A server without the websocket denial response extension: RateGuard accepts, then closes.
    app = ws_app(guard=True)
    sent: list[dict[str, Any]] = []
    for _ in range(3):
        sent.clear()
        incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]

        async def receive(incoming: list[dict[str, Any]] = incoming) -> dict[str, Any]:
            return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

        async def send(message: dict[str, Any], out: list[dict[str, Any]] = sent) -> None:
            out.append(message)

        scope = {
            "type": "websocket", "asgi": {"version": "3.0"}, "path": "/ws", "raw_path": b"/ws", "root_path": "",
            "scheme": "ws", "query_string": b"", "headers": [], "client": ("198.51.100.9", 1),
            "server": ("testserver", 80), "subprotocols": [], "extensions": {}, "state": {},
        }  # fmt: skip
        await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == 1008 and "Retry after 30 s" in sent[1]["reason"]


def test_per_message_limits_with_hit() -> None:
    messages = limit("2/minute", store=MemoryStore())
    app = ws_app(guard=True, per_message=messages)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        replies = []
        for i in range(3):
            ws.send_text(str(i))
            replies.append(ws.receive_text())
    assert replies == ["echo 0", "echo 1", "slow down: 30 s"]


@pytest.mark.slow
def test_a_real_uvicorn_answers_a_refused_upgrade_with_429(tmp_path: Path) -> None:
    (tmp_path / "wsapp.py").write_text(
        textwrap.dedent(
            """
            from fastapi import Depends, FastAPI, WebSocket
            from rateguard import RateGuard, limit

            app = FastAPI()
            app.add_middleware(RateGuard, requests_per_minute=1000)

            @app.websocket("/ws", dependencies=[Depends(limit(1))])
            async def ws(websocket: WebSocket) -> None:
                await websocket.accept()
                await websocket.close()
            """
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "wsapp:app", "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        statuses = [_upgrade(port) for _ in range(2)]
    finally:
        stop_process(proc)
        assert proc.stdout is not None
        with proc.stdout:
            output = proc.stdout.read().decode()
    assert statuses[0].startswith("HTTP/1.1 101")
    assert statuses[1].startswith("HTTP/1.1 429")
    assert "retry-after: 60" in statuses[1].lower()
    assert "Traceback" not in output and "500" not in output


def _upgrade(port: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode("latin-1")
