"""Scopes: what the daemon sees instead of an API key."""

from __future__ import annotations

import hashlib
import hmac

DEFAULT_SALT = "limiterd-scope-v1"


def scope_for_api_key(key: str, *, salt: str | bytes = DEFAULT_SALT) -> str:
    """HMAC-SHA256 (hex) of the API key keyed by `salt`, so the raw key never leaves the process.

    Every app that shares a daemon and a key must use the same salt to land in the same scope.
    """
    if not key:
        raise ValueError("key: must be a non-empty API key")
    salt_bytes = salt.encode() if isinstance(salt, str) else salt
    return hmac.new(salt_bytes, key.encode(), hashlib.sha256).hexdigest()
