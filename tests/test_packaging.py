"""The distribution's metadata: its name, and lower bounds that are the versions CI tests.

CI runs the suite twice over: on the newest releases, and on constraints/lowest.txt, which pins
every `>=` bound of pyproject.toml (``make test-matrix``). These tests keep the two files saying
the same thing, so a bound can't be raised or lowered without the lowest run following it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import rateguard

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints" / "lowest.txt"
# The groups a user or CI installs; `bench` (the peers of the benchmarks) is never tested at its floor.
PINNED_EXTRAS = ("fastapi", "prometheus", "demo", "dev")
# What rateguard reaches into beyond the documented API: capped below their next major version.
CAPPED = ("starlette", "fastapi", "redis", "hiredis")


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirements() -> list[tuple[str, Requirement]]:
    """``(group, requirement)`` for [project] dependencies and each pinned extra."""
    project = pyproject()["project"]
    groups = {"dependencies": project["dependencies"]}
    groups |= {f"[{name}]": project["optional-dependencies"][name] for name in PINNED_EXTRAS}
    return [(group, Requirement(line)) for group, lines in groups.items() for line in lines]


def floor(req: Requirement) -> Version:
    """The one ``>=`` bound of a requirement."""
    lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(lows) == 1, f"{req}: needs exactly one `>=` bound (the version CI tests), has {len(lows)}"
    return lows[0]


def floors() -> dict[str, Version]:
    """The lower bound of each dependency; one package bounded alike in every group."""
    out: dict[str, Version] = {}
    where: dict[str, str] = {}
    for group, req in requirements():
        name = canonicalize_name(req.name)
        low = floor(req)
        if name in out:
            assert out[name] == low, f"{req.name}: >={out[name]} in {where[name]} but >={low} in {group}"
        out[name], where[name] = low, group
    return out


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for number, raw in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        where = f"{CONSTRAINTS.relative_to(ROOT)}:{number}"
        assert len(specs) == 1 and specs[0].operator == "==", f"{where}: {line!r} is not `name==version`"
        assert not req.extras and req.marker is None, f"{where}: {line!r}: a pin has no extras or markers"
        name = canonicalize_name(req.name)
        assert name not in out, f"{where}: {req.name} pinned twice"
        out[name] = Version(specs[0].version)
    return out


def test_the_distribution_is_fastapi_rateguard_and_imports_as_rateguard() -> None:
    project = pyproject()["project"]
    assert project["name"] == "fastapi-rateguard"  # PyPI's `rateguard` is another project
    assert project["version"] == rateguard.__version__
    assert pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["rateguard"]


def test_the_lowest_constraints_pin_exactly_the_lower_bounds() -> None:
    bounds, pinned = floors(), pins()
    differ = {
        n: f">={bounds[n]}, =={pinned[n]}" for n in bounds.keys() & pinned.keys() if bounds[n] != pinned[n]
    }
    assert not differ, "pyproject.toml's bound and constraints/lowest.txt's pin differ"
    assert not bounds.keys() - pinned.keys(), "bounded in pyproject.toml, not pinned"
    assert not pinned.keys() - bounds.keys(), "pinned, but bounds nothing in pyproject.toml"


def test_every_pin_satisfies_every_requirement_on_it() -> None:
    """So `pip install -c constraints/lowest.txt -e '.[dev]'` can resolve: no pin above a cap."""
    pinned = pins()
    for group, req in requirements():
        version = pinned[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), f"{group}: {req} excludes {version}"


@pytest.mark.parametrize("name", CAPPED)
def test_what_rateguard_reaches_into_is_capped_at_a_major_version(name: str) -> None:
    found = False
    for group, req in requirements():
        if canonicalize_name(req.name) != name:
            continue
        found = True
        caps = [Version(s.version) for s in req.specifier if s.operator == "<"]
        assert len(caps) == 1, f"{group}: {req} needs one upper bound, `<N` for an untested major N"
        assert not any(caps[0].release[1:]), f"{group}: {req}: cap at a major version (`<{caps[0].major}`)"
        assert caps[0] > floor(req), f"{group}: {req}: the cap is below the floor"
    assert found, f"{name} is not a dependency any more: drop it from CAPPED"


def test_the_sdist_patterns_are_anchored_and_name_what_exists() -> None:
    sdist = pyproject()["tool"]["hatch"]["build"]["targets"]["sdist"]
    for pattern in sdist["include"] + sdist.get("exclude", []):
        assert pattern.startswith("/"), f"{pattern!r} matches at any depth; anchor it: '/{pattern}'"
    for pattern in sdist["include"]:
        assert (ROOT / pattern.lstrip("/")).exists(), f"sdist pattern {pattern!r} names nothing"


def test_the_license_is_shipped() -> None:
    project = pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
