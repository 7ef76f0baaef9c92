"""check-dist: the README's quick start on the installed wheel, run from outside the source tree.

MemoryStore always; RedisStore too when REDIS_URL names a running server (check-dist starts one).
"""

import importlib.metadata
import importlib.resources
import logging
import os
import sys
import time

from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

import rateguard
from rateguard import MemoryStore, RateGuard, RedisStore, limit

assert "/site-packages/" in rateguard.__file__, f"imported from {rateguard.__file__}, not the wheel"
assert importlib.metadata.version("fastapi-rateguard") == rateguard.__version__
package = importlib.resources.files("rateguard")
assert package.joinpath("py.typed").is_file(), "no py.typed: type checkers would ignore rateguard's types"
for data in ("dashboard.html", "stores/redis/token_bucket.lua"):
    assert package.joinpath(data).read_text("utf-8").strip(), f"{data} is empty"


class Warnings(logging.Handler):
    """rateguard's log records at WARNING and above: a run with a healthy server has none."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


warnings = Warnings()
logging.getLogger("rateguard").addHandler(warnings)


def app_with(store):
    app = FastAPI()
    app.add_middleware(RateGuard, requests_per_minute=100, store=store)

    @app.post("/api/expensive", dependencies=[Depends(limit(5))])
    async def expensive():
        return {"ok": True}

    return app


stores = {"MemoryStore": MemoryStore}
if url := os.environ.get("REDIS_URL"):
    import redis

    server = redis.Redis.from_url(url)
    for _ in range(100):  # the redis-server started above may still be starting
        try:
            server.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    stores["RedisStore"] = lambda: RedisStore(url=url)
else:
    print("no redis-server on the PATH: the quick start runs on MemoryStore only")
for name, make in stores.items():
    with TestClient(app_with(make())) as client:
        codes = [client.post("/api/expensive").status_code for _ in range(7)]
    print(f"{name}: {codes}")
    if codes != [200] * 5 + [429] * 2:
        sys.exit(f"FAIL: {name}: expected five 200s and two 429s")
    if warnings.records:
        sys.exit(f"FAIL: {name}: rateguard logged warnings with its server up: {warnings.records}")
if url:  # decided by the Lua script in Redis, not by on_error="local" beside it
    buckets = sorted(k.decode() for k in server.scan_iter("rateguard:{testclient}:*"))
    print(f"the client's buckets in Redis: {buckets}")
    assert len(buckets) == 2, "expected the global bucket and the route's"
    server.close()
print(f"OK: {rateguard.__file__}")
