"""check-dist: the built wheel and sdist hold what they must, and their metadata says who they are.

Usage: python .ci/dist_contents.py WHEEL SDIST SOURCE_DIR  (SOURCE_DIR: the tree they were built from;
needs `packaging`, which `build` brings)
"""

import email.parser
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement

wheel, sdist, src = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
config = tomllib.loads((src / "pyproject.toml").read_text())
project = config["project"]
sdist_config = config["tool"]["hatch"]["build"]["targets"]["sdist"]
excluded = [pattern.lstrip("/") for pattern in sdist_config.get("exclude", [])]
problems: list[str] = []


def source_files(top: str) -> Iterator[str]:
    """The files under src/top that a build ships: no bytecode, nothing the sdist excludes."""
    for f in sorted((src / top).rglob("*")):
        rel = f.relative_to(src).as_posix()
        shipped = f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"
        if shipped and not any(rel == e or rel.startswith(e + "/") for e in excluded):
            yield rel


def same(a: Requirement, b: Requirement) -> bool:
    return (a.name, a.extras, a.specifier, a.marker) == (b.name, b.extras, b.specifier, b.marker)


# The wheel: the package with every data file, its license, and nothing else.
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    dist_info = f"fastapi_rateguard-{project['version']}.dist-info"
    meta = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
for needed in ("rateguard/stores/redis/token_bucket.lua", "rateguard/dashboard.html", "rateguard/py.typed"):
    if needed not in names:
        problems.append(f"wheel lacks {needed}")
problems += [f"wheel lacks {n}" for n in source_files("rateguard") if n not in names]
problems += [f"wheel has a stray {n}" for n in names if not n.startswith(("rateguard/", dist_info + "/"))]
problems += [f"wheel has bytecode {n}" for n in names if "__pycache__" in n or n.endswith(".pyc")]
if f"{dist_info}/licenses/LICENSE" not in names:
    problems.append(f"wheel lacks {dist_info}/licenses/LICENSE")

expect = {
    "Name": "fastapi-rateguard",
    "Version": project["version"],
    "License-Expression": "MIT",
    "License-File": "LICENSE",
    "Requires-Python": project["requires-python"],
}
problems += [f"METADATA {k}: {meta[k]!r}, expected {v!r}" for k, v in expect.items() if meta[k] != v]
requires = [Requirement(r) for r in meta.get_all("Requires-Dist", [])]
for line in project["dependencies"]:
    if not any(same(Requirement(line), r) for r in requires):
        problems.append(f"METADATA has no Requires-Dist {line}")
core = ", ".join(str(r) for r in requires if r.marker is None)
print(f"wheel {wheel.name}: {len(names)} files; {meta['Name']} {meta['Version']}, Requires-Dist {core}")

# The sdist: the whole include list, and nothing outside it.
with tarfile.open(sdist) as t:
    members = [m.name for m in t.getmembers() if not m.isdir()]
root = f"fastapi_rateguard-{project['version']}"
inside = {n.removeprefix(root + "/") for n in members}
want = {"pyproject.toml", "PKG-INFO"}
for pattern in sdist_config["include"]:
    path = pattern.lstrip("/")
    want |= {path} if (src / path).is_file() else set(source_files(path))
problems += [f"sdist lacks {n}" for n in sorted(want - inside)]
problems += [f"sdist has a stray {n}" for n in sorted(inside - want - {".gitignore"})]
problems += [f"sdist member outside {root}/: {n}" for n in members if not n.startswith(root + "/")]
less = f", less {' '.join(excluded)}" if excluded else ""
print(f"sdist {sdist.name}: {len(members)} files: {' '.join(sdist_config['include'])}{less}")

if problems:
    sys.exit("check-dist: FAIL\n  " + "\n  ".join(problems))
print("OK: the metadata, every file of rateguard/ in the wheel, the whole include list in the sdist")
