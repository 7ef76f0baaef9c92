"""rateguard uses its dependencies' public API only; what it can't, it keeps in rateguard/_compat.py.

Two checks on the source, and one on the framework shape `_compat` relies on:
- no private module of redis-py, hiredis, Starlette or FastAPI is imported (``redis._parsers``,
  ``starlette._utils``...), anywhere but in `_compat`;
- no private attribute is read of an object that is not rateguard's own: every ``x._name`` in the
  package must name something rateguard itself defines (a ``_name`` of one of its classes or
  modules), so ``conn._reader``, ``cluster._initialize`` or ``route.dependant``-like internals
  can't come back unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI

from rateguard import limit
from rateguard._compat import served_routes

PACKAGE = Path(__file__).resolve().parent.parent / "rateguard"
FOREIGN = ("redis", "hiredis", "starlette", "fastapi", "anyio", "uvicorn", "prometheus_client")
# Underscored, but documented public API (typing.NamedTuple's methods).
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def _sources() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in PACKAGE.rglob("*.py")}


def _own_private_names(trees: dict[Path, ast.Module]) -> set[str]:
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_")
            ):
                names.add(node.value)  # __slots__ entries
    return {n for n in names if n.startswith("_")}


def test_no_private_module_of_a_dependency_is_imported() -> None:
    found = []
    for path, tree in _sources().items():
        if path.name == "_compat.py":
            continue
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[0] in FOREIGN and any(p.startswith("_") for p in parts[1:]):
                    found.append(f"{path.name}:{node.lineno} imports {module}")
    assert found == []


def test_no_private_attribute_of_a_dependency_is_read() -> None:
    trees = _sources()
    own = _own_private_names(trees)
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not (node.attr.startswith("__") and node.attr.endswith("__"))
                and node.attr not in own
                and node.attr not in PUBLIC_UNDERSCORED
            ):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
    assert found == []


def test_served_routes_sees_included_routes_with_their_full_paths_and_dependencies() -> None:
    # What `_compat.served_routes` relies on, in whichever shape this FastAPI has.
    guard = limit(5)
    router = APIRouter(dependencies=[Depends(guard)])
    router.get("/items/{item_id}")(lambda item_id: {"id": item_id})
    app = FastAPI()
    app.include_router(router, prefix="/v1")
    routes = {getattr(r, "path", None): r for r in served_routes(app)}
    route = routes["/v1/items/{item_id}"]
    assert route.methods == {"GET"}
    assert any(dep.dependency is guard for dep in route.dependencies)
