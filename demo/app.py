"""The rateguard demo: `uvicorn demo.app:app --port 3001` (memory store; REDIS_URL set = Redis)."""

from __future__ import annotations

import os

from fastapi import Depends, FastAPI

from rateguard import MemoryStore, RateGuard, RedisStore, limit

REDIS_URL = os.environ.get("REDIS_URL")
store = RedisStore(url=REDIS_URL) if REDIS_URL else MemoryStore()

app = FastAPI(title="rateguard demo")
app.add_middleware(RateGuard, requests_per_minute=60, store=store)


@app.get("/api/data")
async def data() -> dict[str, str]:
    return {"data": "cheap"}


@app.api_route("/api/expensive", methods=["GET", "POST"], dependencies=[Depends(limit(5))])
async def expensive() -> dict[str, str]:
    return {"result": "expensive work done"}
