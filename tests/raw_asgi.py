"""Drive an ASGI app with a hand-made scope: any header bytes, any client, no HTTP client between."""

from __future__ import annotations

from typing import Any

Headers = list[tuple[bytes, bytes]]


class Response:
    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


async def request(
    app: Any,
    path: str = "/",
    *,
    client: Any = ("203.0.113.7", 50000),
    headers: Headers | None = None,
    method: str = "GET",
) -> Response:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "headers": headers or [], "client": client,
        "server": ("testserver", 80), "state": {},
    }  # fmt: skip
    messages: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Response(start["status"], list(start.get("headers", [])), body)
