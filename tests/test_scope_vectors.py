"""The scope of an API key is the same in every client language (shared vector file).

clients/node/test/scope.test.ts checks the same file against the Node client's scopeForApiKey;
a change to either side's hashing fails one of the two suites.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from limiterd_client import scope_for_api_key
from limiterd_client.scope import DEFAULT_SALT

VECTORS = Path(__file__).parent / "data" / "scope_vectors.json"
DOC: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))


def _salt(case: dict[str, str]) -> str | bytes:
    if "salt_hex" in case:
        return bytes.fromhex(case["salt_hex"])
    return case.get("salt", DEFAULT_SALT)


def test_default_salt_matches() -> None:
    assert DOC["default_salt"] == DEFAULT_SALT


@pytest.mark.parametrize("case", DOC["cases"], ids=lambda c: repr(c["key"])[:24])
def test_vector(case: dict[str, str]) -> None:
    salt = _salt(case)
    if "salt" not in case and "salt_hex" not in case:
        assert scope_for_api_key(case["key"]) == case["scope"]
    assert scope_for_api_key(case["key"], salt=salt) == case["scope"]
    # The definition, independently: HMAC-SHA256 over UTF-8, lower-case hex.
    salt_bytes = salt.encode() if isinstance(salt, str) else salt
    expected = hmac.new(salt_bytes, case["key"].encode(), hashlib.sha256).hexdigest()
    assert case["scope"] == expected


def test_vectors_cover_the_hard_cases() -> None:
    keys = [c["key"] for c in DOC["cases"]]
    assert any(not k.isascii() for k in keys)
    assert any("salt_hex" in c for c in DOC["cases"])
    assert any(c.get("salt") == "" for c in DOC["cases"])
