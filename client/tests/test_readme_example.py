"""The README's anthropic example runs as written: a real daemon, the real SDK, and the fake
provider standing in for Anthropic (opus overloaded twice, so the chain falls back)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
from fake_provider import FakeProvider, Reply

from limiterd.server import running_server

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "anthropic_fallback.py"


async def test_readme_example_falls_back_and_leaves_nothing_open(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("anthropic_fallback", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with FakeProvider() as provider:
        provider.script("claude-opus-4-1", Reply.overloaded(), Reply.overloaded())
        async with running_server() as daemon:  # the shipped default limits
            monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
            monkeypatch.setenv("ANTHROPIC_BASE_URL", provider.base_url)
            monkeypatch.setenv("LIMITERD_TARGET", daemon.target)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the SDK's model notices
                await example.main()
            assert list(daemon.engine.ledger.open_reservations()) == []
    out = capsys.readouterr().out
    assert "served by claude-sonnet-4-5 after trying claude-opus-4-1 -> claude-sonnet-4-5" in out
    assert "fallbacks: 1" in out
    assert "usage:" in out
