"""The token-bucket script, as shipped in the package, and its SHA for EVALSHA."""

from __future__ import annotations

import hashlib
from importlib.resources import files

TOKEN_BUCKET_LUA = files("rateguard.stores.redis").joinpath("token_bucket.lua").read_text("utf-8")
SCRIPT = TOKEN_BUCKET_LUA.encode("utf-8")
SHA = hashlib.sha1(SCRIPT).hexdigest()

__all__ = ["SCRIPT", "SHA", "TOKEN_BUCKET_LUA"]
