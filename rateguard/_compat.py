"""The one place rateguard leans on framework details beyond their documented API, and why.

- Routes with their full paths, for the OpenAPI 429s of `install()`: FastAPI 0.115 lists every
  included route in ``app.routes`` with its prefix; newer FastAPI keeps included routers as
  routers there and offers ``fastapi.routing.iter_route_contexts`` (public, but young) to see
  the routes as served. tests/test_compat.py fails if either shape changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def served_routes(app: Any) -> Iterator[Any]:
    """Each route of a FastAPI app as it is served: ``.path``, ``.methods``, ``.dependencies``."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # FastAPI before the included-router rework: the routes are flat
        yield from app.routes
        return
    yield from iter_route_contexts(app.routes)


__all__ = ["served_routes"]
