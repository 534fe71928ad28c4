"""`limiterd gateway` end to end: the real anthropic SDK -> the gateway (a subprocess) -> the
fake provider (a loopback HTTP server), with a real daemon keeping the ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import pytest

from client.tests.fake_provider import FakeProvider, Reply
from limiterd.config.loader import parse_config
from limiterd.ledger.model import Outcome
from limiterd.server import running_server
from limiterd_client import scope_for_api_key
from tests.gateway_harness import (
    DAEMON_CONFIG,
    DaemonView,
    Gateway,
    actual,
    start_gateway,
    wait_for,
)

MODEL = "claude-gw-test-1"  # any name the daemon knows (claude-*) that the SDK does not deprecate
MESSAGES = [{"role": "user", "content": "Hello through the gateway"}]


@pytest.fixture
async def daemon() -> AsyncIterator[DaemonView]:
    async with running_server(config=parse_config(DAEMON_CONFIG, "<gateway tests>")) as srv:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            yield DaemonView(srv, ch)


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


@pytest.fixture
async def gateway(tmp_path: Path, daemon: DaemonView, provider: FakeProvider
                  ) -> AsyncIterator[Gateway]:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url)
    yield gw
    assert gw.stop() == 0, gw.log_text()


def sdk(gw: Gateway, key: str = "sk-test-1", **kw: object) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=gw.base_url, **kw)  # type: ignore[arg-type]


async def post(gw: Gateway, body: bytes, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    h = {"x-api-key": "sk-raw", "content-type": "application/json",
         "anthropic-version": "2023-06-01", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(gw.base_url + "/v1/messages", data=body,
                                                    headers=h) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# ---- the first slice: create and stream, reserved and reported ---------------------------


async def test_create_is_forwarded_unchanged_and_reports_the_usage(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    provider.script(MODEL, Reply.ok("four words of text", input_tokens=120, output_tokens=7,
                                    cache_creation_input_tokens=30))
    async with sdk(gateway) as client:
        raw = await client.messages.with_raw_response.create(
            model=MODEL, max_tokens=500, messages=MESSAGES,  # type: ignore[arg-type]
            system="be brief")
        msg = await raw.parse()
    assert msg.content[0].text == "four words of text"  # type: ignore[union-attr]
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "50"  # headers pass back
    [req] = provider.requests
    assert req.body == {"model": MODEL, "max_tokens": 500, "messages": MESSAGES,
                        "system": "be brief"}
    sent = req.headers.get("x-api-key") or req.headers["authorization"]  # SDK 2.x: bearer
    assert sent.endswith("sk-test-1")
    [r] = await daemon.wait_settled("sk-test-1", 1)
    assert r.scope == scope_for_api_key("sk-test-1")
    assert r.settlement is not None and r.settlement.outcome is Outcome.OK
    assert r.reserved.output_tokens == 500
    assert actual(r) == (150, 7)  # cache writes count as input
    assert await daemon.open_leases() == []


async def test_stream_passes_every_event_through_and_reports_at_the_end(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    reply = Reply.ok("let me look that up", input_tokens=40, output_tokens=33,
                     thinking="The user wants the weather.",
                     tool_use=("get_weather", '{"city": "Paris", "unit": "c"}'))
    provider.script(MODEL, reply, reply)

    async def events(base_url: str) -> tuple[list[Any], Any]:
        client = anthropic.AsyncAnthropic(api_key="sk-test-2", base_url=base_url)
        async with client, client.messages.stream(
                model=MODEL, max_tokens=300, messages=MESSAGES,  # type: ignore[arg-type]
                thinking={"type": "enabled", "budget_tokens": 200}) as stream:
            seen = [e.type async for e in stream]
            return seen, await stream.get_final_message()

    direct, direct_msg = await events(provider.base_url)
    via, via_msg = await events(gateway.base_url)
    assert via == direct
    assert [b.type for b in via_msg.content] == ["thinking", "text", "tool_use"]
    assert via_msg.content[0].thinking == "The user wants the weather."
    assert via_msg.content[2].input == {"city": "Paris", "unit": "c"}
    assert via_msg.stop_reason == "tool_use"
    assert via_msg.model_dump(exclude={"id"}) == direct_msg.model_dump(exclude={"id"})
    [r] = await daemon.wait_settled("sk-test-2", 1)
    assert r.settlement is not None and r.settlement.outcome is Outcome.OK
    assert actual(r) == (40, 33)


# ---- bad input: a 400 in the provider's format, nothing reserved, nothing forwarded --------


BAD_BODIES = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"model": MODEL, "messages": MESSAGES}).encode(), "max_tokens"),
    (json.dumps({"model": MODEL, "max_tokens": 0, "messages": MESSAGES}).encode(), "max_tokens"),
    (json.dumps({"max_tokens": 10, "messages": MESSAGES}).encode(), "model"),
    (json.dumps({"model": MODEL, "max_tokens": 10}).encode(), "messages"),
    (json.dumps({"model": "gpt-4o", "max_tokens": 10, "messages": MESSAGES}).encode(),
     "gpt-4o"),
    (json.dumps({"model": MODEL, "max_tokens": 10, "messages": MESSAGES,
                 "pad": "x" * 70_000}).encode(), "larger than"),
]


async def test_bad_input_is_a_400_in_provider_format_and_reserves_nothing(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url,
                             "[gateway]\nmax_body_bytes = 65536\n")
    try:
        for body, field in BAD_BODIES:
            status, _, answer = await post(gw, body)
            assert status == 400, (body[:40], answer)
            doc = json.loads(answer)
            assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
            assert field in doc["error"]["message"], (field, doc)
    finally:
        assert gw.stop() == 0
    assert provider.requests == []
    assert daemon.settled() == [] and await daemon.open_leases() == []


async def test_bad_input_through_the_sdk_raises_its_bad_request_error(
        gateway: Gateway, provider: FakeProvider) -> None:
    async with sdk(gateway) as client:
        with pytest.raises(anthropic.BadRequestError, match="unknown model|model"):
            await client.messages.create(model="not-a-model", max_tokens=10,
                                         messages=MESSAGES)  # type: ignore[arg-type]
    assert provider.requests == []


async def test_the_api_key_is_never_logged(gateway: Gateway, daemon: DaemonView) -> None:
    key = "sk-ant-secret-value-123"
    async with sdk(gateway, key) as client:
        await client.messages.create(model=MODEL, max_tokens=10,
                                     messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="nope", max_tokens=10,
                                         messages=MESSAGES)  # type: ignore[arg-type]
    await daemon.wait_settled(key, 1)
    assert gateway.stop() == 0
    assert key not in gateway.log_text()
    assert scope_for_api_key(key) not in gateway.log_text()


_ = (asyncio, wait_for)
