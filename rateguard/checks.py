"""Warnings for deployments that make a limit wrong: one each, once per process, with the fix.

Each has a short code; ``RateGuard(validate=False)`` (or ``limit(validate=False)``) turns them
all off for that limit, ``validate={"workers": False}`` one of them. They go to the
``rateguard.checks`` logger at WARNING, so logging's own filters can silence them too.

    workers          MemoryStore in a server running several worker processes
    proxy-headers    the server rewrote the client address from X-Forwarded-For
    trust-all        trusted_proxies names a whole address family (0.0.0.0/0, ::/0)
    cors-order       RateGuard runs before CORSMiddleware (added after it)
    dropped-headers  limit() without RateGuard on an endpoint that returns a Response
    websocket-429    limit() refused a websocket with no RateGuard to answer it with 429
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from rateguard.errors import ConfigurationError

logger = logging.getLogger("rateguard.checks")

CODES = ("workers", "proxy-headers", "trust-all", "cors-order", "dropped-headers", "websocket-429")

# Validation = True (every check), False (none) or {code: bool} (the ones given False are off).
Validate = bool | Mapping[str, bool]

_warned: set[str] = set()  # "once per process" is the contract, so this one set is process-wide


def check_validate(value: object) -> Validate:
    if isinstance(value, bool):
        return value
    if isinstance(value, Mapping):
        unknown = [code for code in value if code not in CODES]
        if unknown or not all(isinstance(v, bool) for v in value.values()):
            raise ConfigurationError(
                f"validate must be True, False or a dict of {{code: bool}} with codes from "
                f"{', '.join(CODES)}; got {dict(value)!r}"
            )
        return dict(value)
    raise ConfigurationError(f"validate must be True, False or a dict {{code: bool}}, got {value!r}")


def enabled(validate: Validate, code: str) -> bool:
    if isinstance(validate, bool):
        return validate
    return validate.get(code, True)


def warn_once(validate: Validate, code: str, message: str) -> bool:
    """Log ``message`` under ``code`` unless switched off or said already; True if it was logged."""
    if not enabled(validate, code) or code in _warned:
        return False
    _warned.add(code)
    logger.warning("rateguard [%s]: %s (switch off with validate={%r: False})", code, message, code)
    return True


def forget_warnings() -> None:
    """Let every warning be logged once more (for tests)."""
    _warned.clear()


def worker_processes(environ: Mapping[str, str] = os.environ, argv: list[str] | None = None) -> int:
    """How many worker processes the server was asked to run, as far as can be told.

    ``WEB_CONCURRENCY`` (read by uvicorn and gunicorn), then the command line: uvicorn's spawned
    workers and gunicorn's forked ones both keep the server's ``sys.argv``.
    """
    argv = sys.argv if argv is None else argv
    found = 1
    text = environ.get("WEB_CONCURRENCY", "").strip()
    if text.isdigit():
        found = max(found, int(text))
    args = [*argv, *environ.get("GUNICORN_CMD_ARGS", "").split()]
    for i, arg in enumerate(args):
        match = re.fullmatch(r"(?:--workers|-w)(?:=(\d+))?|-w(\d+)", arg)
        if match is None:
            continue
        value = match.group(1) or match.group(2) or (args[i + 1] if i + 1 < len(args) else "")
        if value.isdigit():
            found = max(found, int(value))
    return found


def rewritten_by_server(scope: Mapping[str, Any]) -> bool:
    """Whether the server set ``scope["client"]`` from X-Forwarded-For.

    uvicorn's proxy-headers support (on by default, trusting 127.0.0.1) and gunicorn's put the
    forwarded address in ``client`` with port 0; the header itself is still there.
    """
    client = scope.get("client")
    if not client or client[1] != 0:
        return False
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            return client[0] in [hop.strip() for hop in value.decode("latin-1").split(",")]
    return False


def is_preflight(scope: Mapping[str, Any]) -> bool:
    if scope.get("method") != "OPTIONS":
        return False
    names = {name for name, _ in scope.get("headers", ())}
    return b"origin" in names and b"access-control-request-method" in names


__all__ = [
    "CODES",
    "Validate",
    "check_validate",
    "enabled",
    "forget_warnings",
    "warn_once",
    "worker_processes",
]
