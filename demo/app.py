"""The rateguard demo: ``uvicorn demo.app:app --port 3001`` (or ``make demo`` on :3000).

Environment:
    REDIS_URL              redis://localhost:6379 shares the limits with every server on that Redis;
                           unset = MemoryStore (this process only)
    RATEGUARD_RPM          the global limit in requests per minute (default 60)
    RATEGUARD_ADMIN_TOKEN  bearer token for /api/admin; unset = admin answers loopback clients only

GET /metrics is the Prometheus scrape (needs ``pip install 'fastapi-rateguard[prometheus]'``); the admin
dashboard is at /api/admin/.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from rateguard import (
    ConfigurationError,
    MemoryStore,
    RateGuard,
    RedisStore,
    Rule,
    admin_router,
    install,
    limit,
)
from rateguard.stores import Store

EXPENSIVE_RPM = 5
ADMIN_PREFIX = "/api/admin"
FREE_PATHS = frozenset({"/", "/health", "/metrics"})

logger = logging.getLogger("rateguard.demo")

LINKS = {
    "/health": "liveness, never limited",
    "/api/data": "global limit only",
    "/api/expensive": f"global limit + {EXPENSIVE_RPM} per minute (GET or POST)",
    "/metrics": "Prometheus metrics (decisions per rule, store latency, errors, circuit state)",
    f"{ADMIN_PREFIX}/": "admin dashboard",
    f"{ADMIN_PREFIX}/stats": "admin: counters, store health, rules",
    f"{ADMIN_PREFIX}/bucket/127.0.0.1": "admin: one client's buckets",
    "/docs": "OpenAPI docs",
}


def _show_logs() -> None:
    # uvicorn configures only its own loggers. Give rateguard's (this start-up line, admin resets,
    # Redis outages) a handler that looks like uvicorn's, unless the app configured logging itself.
    library = logging.getLogger("rateguard")
    if library.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    try:
        from uvicorn.logging import DefaultFormatter

        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    except ImportError:  # run by another server
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _rpm() -> float:
    text = os.environ.get("RATEGUARD_RPM", "").strip()
    if not text:
        return 60
    try:
        return Rule(float(text)).requests_per_minute
    except ValueError:  # ConfigurationError is a ValueError too
        raise ConfigurationError(
            f"RATEGUARD_RPM must be a number of requests per minute > 0, got {text!r}; e.g. RATEGUARD_RPM=120"
        ) from None


def _is_free(request: Request) -> bool:
    # Health checks, scrapes and the admin API must work even when this client is limited: an
    # operator resets a limited client from the same machine. Admin calls are guarded by
    # token/loopback; /metrics holds no client data (its labels are rules and store kinds).
    path = request.url.path
    return path in FREE_PATHS or path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def _metrics(app: FastAPI) -> Callable[[], Response]:
    """The /metrics endpoint: this app's limits on a registry of its own (one per app built)."""
    try:
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            ProcessCollector,
            generate_latest,
        )

        from rateguard.metrics import instrument
    except ImportError:
        hint = "prometheus-client is not installed: pip install 'fastapi-rateguard[prometheus]'\n"
        return lambda: PlainTextResponse(hint, status_code=501)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    instrument(app, registry)
    return lambda: Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def create_app() -> FastAPI:
    """Build the demo from the environment variables above, read now."""
    redis_url = os.environ.get("REDIS_URL", "").strip()
    rpm = _rpm()
    # RATEGUARD_REDIS_CLUSTER=1: REDIS_URL names one node of a Redis Cluster (compose's cluster profile).
    cluster = os.environ.get("RATEGUARD_REDIS_CLUSTER", "").strip().lower() in {"1", "true", "yes"}
    store: Store = RedisStore(url=redis_url, cluster=cluster) if redis_url else MemoryStore()
    admin = admin_router()  # reads RATEGUARD_ADMIN_TOKEN
    store_text = f"RedisStore at {_redacted(redis_url)}" if redis_url else "MemoryStore (this process only)"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _show_logs()
        logger.info(
            "rateguard demo: store %s; limits: global %g/min per client, /api/expensive %d/min; "
            "admin API at %s (%s)",
            store_text,
            rpm,
            EXPENSIVE_RPM,
            ADMIN_PREFIX,
            "bearer token" if admin.token_required else "loopback clients only",
        )
        yield  # RateGuard closes the store at shutdown

    app = FastAPI(title="rateguard demo", lifespan=lifespan)
    app.add_middleware(RateGuard, requests_per_minute=rpm, store=store, skip=_is_free)
    install(app)  # limit()'s 429s declared in the OpenAPI schema at /docs
    app.mount(ADMIN_PREFIX, admin)
    app.state.store = store
    app.state.admin = admin

    @app.get("/", response_model=None)
    async def index(request: Request) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            items = "".join(f'<li><a href="{path}">{path}</a>: {text}</li>' for path, text in LINKS.items())
            return HTMLResponse(
                f"<!doctype html><title>rateguard demo</title><h1>rateguard demo</h1><ul>{items}</ul>"
            )
        return JSONResponse({"name": "rateguard demo", "store": store.kind, "links": LINKS})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    metrics = _metrics(app)

    @app.get("/metrics", response_model=None)
    async def prometheus() -> Response:
        return metrics()

    @app.get("/api/data")
    async def data() -> dict[str, object]:
        return {"data": [1, 2, 3], "limit": f"global, {rpm:g} per minute"}

    @app.api_route("/api/expensive", methods=["GET", "POST"], dependencies=[Depends(limit(EXPENSIVE_RPM))])
    async def expensive() -> dict[str, str]:
        return {"result": "expensive work done", "limit": f"{EXPENSIVE_RPM} per minute, and the global limit"}

    return app


app = create_app()
