"""`limiterd gateway` end to end: the real anthropic SDK -> the gateway (a subprocess) -> the
fake provider (a loopback HTTP server), with a real daemon keeping the ledger."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import grpc
import pytest

from client.tests.fake_provider import FakeProvider, Reply, _estimate_input
from limiterd.config.loader import parse_config
from limiterd.ledger.model import Outcome
from limiterd.server import running_server
from limiterd_client import estimate_chars, scope_for_api_key
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
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
    assert await gw.close() == 0, gw.log_text()


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


async def test_the_query_string_goes_on_too(gateway: Gateway, provider: FakeProvider) -> None:
    """Claude Code calls /v1/messages?beta=true."""
    async with sdk(gateway, "sk-beta") as client:
        await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES,
                                     extra_query={"beta": "true"})  # type: ignore[arg-type]
    [req] = provider.requests
    assert (req.path, req.query) == ("/v1/messages", "beta=true")


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
        assert await gw.close() == 0
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
    assert await gateway.close() == 0
    assert key not in gateway.log_text()
    assert scope_for_api_key(key) not in gateway.log_text()


# ---- streams under stress: many at once, a caller hanging up, the upstream breaking --------


async def test_fifty_concurrent_streams_all_complete_and_settle(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    text = "one two three four five six seven eight"

    async def one(client: anthropic.AsyncAnthropic) -> str:
        async with client.messages.stream(model=MODEL, max_tokens=64,
                                          messages=MESSAGES) as stream:  # type: ignore[arg-type]
            return "".join([t async for t in stream.text_stream])

    provider.default = Reply.ok(text)
    async with sdk(gateway, "sk-fifty", max_retries=0) as client:
        texts = await asyncio.gather(*(one(client) for _ in range(50)))
    assert texts == [text] * 50
    settled = await daemon.wait_settled("sk-fifty", 50)
    assert all(r.settlement and r.settlement.outcome is Outcome.OK for r in settled)
    assert {actual(r)[1] for r in settled} == {8}  # one token per word, from message_delta
    assert await daemon.open_leases() == []
    async with aiohttp.ClientSession() as s, s.get(gateway.base_url + "/limiterd/metrics") as m:
        metrics = await m.text()
    # MODEL is not named in the gateway's config, so its label is "other"
    assert 'limiterd_gateway_requests_total{model="other",route="messages"} 50.0' in metrics
    assert 'limiterd_gateway_stream_ends_total{end="complete",model="other"} 50.0' in metrics
    assert ('limiterd_gateway_upstream_responses_total{model="other",route="messages",'
            'status="2xx"} 50.0') in metrics
    assert 'limiterd_gateway_waits_total{model="other",result="granted"} 50.0' in metrics
    [streamed] = [line for line in metrics.splitlines()
                  if line.startswith("limiterd_gateway_streamed_bytes_total")]
    assert float(streamed.split()[-1]) > 50 * 500  # every event of every stream
    assert MODEL not in metrics


async def test_a_caller_hanging_up_mid_stream_is_reported_with_the_usage_so_far(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    hold = threading.Event()
    provider.script(MODEL, Reply.ok("alpha beta gamma delta epsilon", input_tokens=77,
                                    output_tokens=5, pause=hold, pause_after=2))
    try:
        async with sdk(gateway, "sk-hangup") as client:
            async with client.messages.stream(model=MODEL, max_tokens=400,
                                              messages=MESSAGES) as stream:  # type: ignore[arg-type]
                got = ""
                async for t in stream.text_stream:
                    got += t
                    if got == "alpha beta":
                        break  # leaving the block closes the connection
        [r] = await daemon.wait_settled("sk-hangup", 1)
    finally:
        hold.set()
    assert r.settlement is not None and r.settlement.outcome is Outcome.CANCELLED
    # input as the provider said in message_start; output estimated from the text delivered
    assert actual(r) == (77, 3)
    assert await daemon.open_leases() == []


async def test_an_upstream_break_mid_stream_reaches_the_caller_as_an_error_event(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    provider.script(MODEL, Reply.reset_mid_stream(after_chunks=2, input_tokens=50,
                                                  text="red green blue yellow"))
    got = ""
    async with sdk(gateway, "sk-break", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError, match="mid-stream") as info:
            async with client.messages.stream(model=MODEL, max_tokens=400,
                                              messages=MESSAGES) as stream:  # type: ignore[arg-type]
                async for t in stream.text_stream:
                    got += t
    assert got == "red green"
    assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    [r] = await daemon.wait_settled("sk-break", 1)
    assert r.settlement is not None and r.settlement.outcome is Outcome.ERROR
    assert actual(r) == (50, 3)  # 9 characters delivered


# ---- refusals: passed through unchanged by default, reported, costing nothing --------------


async def test_a_429_passes_through_is_reported_and_pauses_the_other_callers(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url,
                             "[gateway]\nmax_wait_s = 0.3\n")
    provider.script(MODEL, Reply.rate_limited(retry_after="20"))
    try:
        async with sdk(gw, "sk-429", max_retries=0) as first:
            with pytest.raises(anthropic.RateLimitError) as info:
                await first.messages.create(model=MODEL, max_tokens=100,
                                            messages=MESSAGES)  # type: ignore[arg-type]
        assert info.value.response.headers["retry-after"] == "20"
        assert info.value.response.headers["anthropic-ratelimit-requests-remaining"] == "49"
        assert info.value.body["error"]["message"] == "rate limited"  # type: ignore[index]
        [r] = await daemon.wait_settled("sk-429", 1)
        assert r.settlement is not None and r.settlement.outcome is Outcome.RATE_LIMITED
        assert actual(r) == (0, 0)  # a refused attempt costs no tokens
        assert (await daemon.bucket("sk-429", MODEL)).paused_until_ms > 0
        # Another app with the same key: held by the pause, answered by the gateway itself
        # (max_wait_s is shorter than the pause), and never sent to the provider.
        async with sdk(gw, "sk-429", max_retries=0) as second:
            with pytest.raises(anthropic.RateLimitError, match="limiterd") as again:
                await second.messages.create(model=MODEL, max_tokens=100,
                                             messages=MESSAGES)  # type: ignore[arg-type]
        assert int(again.value.response.headers["retry-after"]) >= 1
        assert len(provider.requests) == 1
    finally:
        assert await gw.close() == 0


async def test_a_529_passes_through_unchanged_and_is_reported_overloaded(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    provider.script(MODEL, Reply.overloaded())
    async with sdk(gateway, "sk-529", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(model=MODEL, max_tokens=100,
                                         messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 529
    assert info.value.body == {"type": "error", "error": {"type": "overloaded_error",
                                                          "message": "Overloaded"}}
    [r] = await daemon.wait_settled("sk-529", 1)
    assert r.settlement is not None and r.settlement.outcome is Outcome.OVERLOADED
    assert actual(r) == (0, 0)


async def test_rate_limit_headers_reach_the_daemon(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    """The provider says 29,000 input tokens remain (the fake's headers); the daemon's bucket
    (1,000,000 a minute) is lowered to match, which it only learns from Report."""
    async with sdk(gateway, "sk-sync") as client:
        await client.messages.create(model=MODEL, max_tokens=100,
                                     messages=MESSAGES)  # type: ignore[arg-type]
    await daemon.wait_settled("sk-sync", 1)
    bucket = await daemon.bucket("sk-sync", MODEL)
    [level] = [d.level for d in bucket.dimensions if d.name == "input_tokens"]
    assert level < 500_000  # refills 16,667/s from 29,000; untouched it would be ~1,000,000


# ---- waits: bounded, kept alive for streams when asked -------------------------------------


async def _stream_raw(gw: Gateway, session: aiohttp.ClientSession, key: str
                      ) -> aiohttp.ClientResponse:
    body = {"model": "claude-one-1", "max_tokens": 50, "messages": MESSAGES, "stream": True}
    return await session.post(gw.base_url + "/v1/messages", json=body,
                              headers={"x-api-key": key, "anthropic-version": "2023-06-01"})


async def _hold_the_only_slot(gw: Gateway, provider: FakeProvider, hold: threading.Event,
                              session: aiohttp.ClientSession) -> aiohttp.ClientResponse:
    """A first stream on claude-one-1 (max_concurrent = 1) that stays open until `hold`."""
    provider.script("claude-one-1", Reply.ok("first holds the slot", pause=hold))
    first = await _stream_raw(gw, session, "sk-wait")
    await first.content.readuntil(b"event: content_block_delta")  # granted and streaming
    return first


async def test_a_waiting_stream_gets_200_and_pings_until_granted(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url,
                             "[gateway]\nstream_keepalive_after_s = 0.05\n"
                             "ping_interval_s = 0.05\n")
    hold = threading.Event()
    try:
        async with aiohttp.ClientSession() as session:
            first = await _hold_the_only_slot(gw, provider, hold, session)
            second = await _stream_raw(gw, session, "sk-wait")
            assert second.status == 200  # answered while still queued
            assert await second.content.readuntil(b"\n\n") == \
                b'event: ping\ndata: {"type": "ping"}\n\n'
            hold.set()
            await first.read()
            rest = (await second.read()).decode()
        assert rest.index("event: message_start") > rest.rfind("event: ping")
        assert rest.rstrip().endswith('data: {"type": "message_stop"}')
        settled = await daemon.wait_settled("sk-wait", 2)
        assert all(r.settlement and r.settlement.outcome is Outcome.OK for r in settled)
        assert settled[1].waited_s > 0
    finally:
        hold.set()
        assert await gw.close() == 0


async def test_a_wait_that_fails_after_pings_ends_in_an_error_event(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url,
                             "[gateway]\nstream_keepalive_after_s = 0.05\n"
                             "ping_interval_s = 0.05\nmax_wait_s = 0.5\n")
    hold = threading.Event()
    try:
        async with aiohttp.ClientSession() as session:
            first = await _hold_the_only_slot(gw, provider, hold, session)
            second = await _stream_raw(gw, session, "sk-wait")
            assert second.status == 200
            events = (await second.read()).decode().strip().split("\n\n")
            assert events[0].startswith("event: ping")
            name, data = events[-1].split("\n")
            assert name == "event: error"
            assert json.loads(data.removeprefix("data: "))["error"]["type"] == \
                "rate_limit_error"
            # a caller that does not stream is told 429 with a retry-after, in the same time
            async with sdk(gw, "sk-wait", max_retries=0) as client:
                with pytest.raises(anthropic.RateLimitError, match="limiterd") as info:
                    await client.messages.create(model="claude-one-1", max_tokens=10,
                                                 messages=MESSAGES)  # type: ignore[arg-type]
            assert int(info.value.response.headers["retry-after"]) >= 1
            hold.set()
            await first.read()
        assert len(provider.requests) == 1  # neither waiter reached the provider
    finally:
        hold.set()
        assert await gw.close() == 0


# ---- everything else is proxied, not counted -------------------------------------------------


async def test_other_routes_are_proxied_unchanged_and_not_counted(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    async with sdk(gateway, "sk-other") as client:
        counted = await client.messages.count_tokens(model=MODEL,
                                                     messages=MESSAGES)  # type: ignore[arg-type]
        models = await client.models.list()
    assert counted.input_tokens > 0
    assert [m.id for m in models.data] == ["claude-sonnet-4-5"]
    status, _, body = await post(gateway, json.dumps({"requests": []}).encode(),
                                 {"x-api-key": "sk-other"})
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway.base_url + "/v1/messages/batches", json={"requests": []},
                          headers={"x-api-key": "sk-other"}) as resp:
            batch = await resp.json()
    assert batch["type"] == "message_batch"
    assert status == 400  # /v1/messages itself still validates
    assert [r.path for r in provider.requests] == [
        "/v1/messages/count_tokens", "/v1/models", "/v1/messages/batches"]
    assert daemon.settled() == [] and await daemon.open_leases() == []
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.base_url + "/limiterd/metrics") as resp:
            metrics = await resp.text()
    assert 'limiterd_gateway_requests_total{model="other",route="batches"} 1.0' in metrics
    assert 'limiterd_gateway_requests_total{model="other",route="count_tokens"} 1.0' in metrics


# ---- policy: retries and fallback inside the gateway, when configured ------------------------

POLICY = """
[models."claude-big-1"]
retries = 1
max_retry_after_s = 5
fallback = ["claude-small-1"]

[models."claude-small-1"]
max_tokens = 100
"""


async def test_overloads_are_retried_then_fall_back_with_headers_saying_so(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url, POLICY)
    provider.script("claude-big-1", Reply.overloaded(), Reply.overloaded())
    provider.script("claude-small-1", Reply.ok("from the small one"))
    try:
        async with sdk(gw, "sk-fall", max_retries=0) as client:
            raw = await client.messages.with_raw_response.create(
                model="claude-big-1", max_tokens=1000, messages=MESSAGES)  # type: ignore[arg-type]
            msg = await raw.parse()
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.base_url + "/limiterd/metrics") as resp:
                metrics = await resp.text()
    finally:
        assert await gw.close() == 0
    assert msg.content[0].text == "from the small one"  # type: ignore[union-attr]
    assert raw.headers["x-limiterd-served-by"] == "claude-small-1"
    assert "claude-big-1: overloaded_error (529)" in raw.headers["x-limiterd-fallback"]
    assert provider.models_called() == ["claude-big-1", "claude-big-1", "claude-small-1"]
    assert provider.requests[-1].body["max_tokens"] == 100
    settled = await daemon.wait_settled("sk-fall", 3)
    assert [r.settlement.outcome for r in settled if r.settlement] == [
        Outcome.OVERLOADED, Outcome.OVERLOADED, Outcome.OK]
    assert [r.model for r in settled] == ["claude-big-1", "claude-big-1", "claude-small-1"]
    assert 'limiterd_gateway_retries_total{model="claude-big-1",status="529"} 1.0' in metrics
    assert 'limiterd_gateway_fallbacks_total{model="claude-big-1",reason="529"} 1.0' in metrics


async def test_a_retry_after_beyond_the_bound_is_not_waited_for(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url, POLICY)
    provider.script("claude-big-1", Reply.rate_limited(retry_after="1"),
                    Reply.rate_limited(retry_after="60"))
    provider.script("claude-small-1", Reply.ok("small"))
    try:
        async with sdk(gw, "sk-bound", max_retries=0) as client:
            raw = await client.messages.with_raw_response.create(
                model="claude-big-1", max_tokens=50, messages=MESSAGES)  # type: ignore[arg-type]
    finally:
        assert await gw.close() == 0
    # 429 after 1 s: retried once; 429 asking for 60 s (> max_retry_after_s): fall back
    assert provider.models_called() == ["claude-big-1", "claude-big-1", "claude-small-1"]
    assert raw.headers["x-limiterd-retries"] == "1"
    assert raw.headers["x-limiterd-fallback"] == "claude-big-1: rate_limit_error (429)"
    assert raw.headers["x-limiterd-served-by"] == "claude-small-1"
    assert provider.requests[-1].body["max_tokens"] == 50  # already under the cap


async def test_without_a_policy_nothing_is_retried_in_the_gateway(
        gateway: Gateway, provider: FakeProvider) -> None:
    provider.script("claude-big-1", Reply.overloaded(), Reply.ok("second"))
    async with sdk(gateway, "sk-nopolicy", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError):
            await client.messages.create(model="claude-big-1", max_tokens=10,
                                         messages=MESSAGES)  # type: ignore[arg-type]
    assert provider.models_called() == ["claude-big-1"]


async def test_per_user_limits_and_a_shorter_wait_from_request_headers(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    def ask(user: str, wait: str = "0.2") -> dict[str, str]:
        return {"x-limiterd-user": user, "x-limiterd-max-wait": wait}

    async with sdk(gateway, "sk-users", max_retries=0) as client:
        await client.messages.create(model="claude-user-1", max_tokens=5, messages=MESSAGES,
                                     extra_headers=ask("agent-a"))  # type: ignore[arg-type]
        with pytest.raises(anthropic.RateLimitError, match="within 0.2 s"):
            await client.messages.create(model="claude-user-1", max_tokens=5,
                                         messages=MESSAGES,  # type: ignore[arg-type]
                                         extra_headers=ask("agent-a"))
        await client.messages.create(model="claude-user-1", max_tokens=5, messages=MESSAGES,
                                     extra_headers=ask("agent-b"))  # type: ignore[arg-type]
        with pytest.raises(anthropic.BadRequestError, match="x-limiterd-max-wait"):
            await client.messages.create(model="claude-user-1", max_tokens=5,
                                         messages=MESSAGES,  # type: ignore[arg-type]
                                         extra_headers=ask("agent-c", "soon"))
    assert [r.user for r in await daemon.wait_settled("sk-users", 2)] == ["agent-a", "agent-b"]
    assert len(provider.requests) == 2
    assert all(not k.startswith("x-limiterd-") for r in provider.requests for k in r.headers)


# ---- the input estimate, and a daemon that cannot be reached -----------------------------


async def test_count_tokens_estimate_reserves_the_upstream_count(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url,
                             '[gateway]\nestimate = "count_tokens"\n')
    try:
        async with sdk(gw, "sk-count") as client:
            await client.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES,
                                         system="x" * 400)  # type: ignore[arg-type]
    finally:
        assert await gw.close() == 0
    count, call = provider.requests
    assert (count.path, call.path) == ("/v1/messages/count_tokens", "/v1/messages")
    assert count.body == {"model": MODEL, "messages": MESSAGES, "system": "x" * 400}
    [r] = await daemon.wait_settled("sk-count", 1)
    # the fake counts len(JSON) / 4, where the default estimate counts characters / 3.5
    assert r.reserved.input_tokens == _estimate_input(count.body)
    assert r.reserved.input_tokens != estimate_chars(count.body)


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 200)])
async def test_an_unreachable_daemon_fails_closed_or_open_as_configured(
        tmp_path: Path, provider: FakeProvider, mode: str, status: int) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    gw = await start_gateway(tmp_path, dead, provider.base_url,
                             f'[gateway]\non_unavailable = "{mode}"\n')
    try:
        got, _, body = await post(gw, json.dumps({"model": MODEL, "max_tokens": 5,
                                                  "messages": MESSAGES}).encode())
    finally:
        assert await gw.close() == 0
    assert got == status, body
    if mode == "closed":
        assert json.loads(body)["error"]["type"] == "api_error"
        assert provider.requests == []
    else:
        assert provider.models_called() == [MODEL]


# ---- more endings: an overload inside a stream, a caller leaving the queue, SIGTERM ----------


async def test_an_overload_event_inside_a_stream_passes_through_and_reports_overloaded(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    provider.script(MODEL, Reply.overload_in_stream(after_chunks=1, input_tokens=10,
                                                    text="partial answer"))
    async with sdk(gateway, "sk-ovl", max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError, match="Overloaded") as info:
            async with client.messages.stream(model=MODEL, max_tokens=100,
                                              messages=MESSAGES) as stream:  # type: ignore[arg-type]
                async for _ in stream:
                    pass
    assert info.value.body == {"type": "error", "error": {"type": "overloaded_error",
                                                          "message": "Overloaded"}}
    [r] = await daemon.wait_settled("sk-ovl", 1)
    assert r.settlement is not None and r.settlement.outcome is Outcome.OVERLOADED
    assert actual(r) == (10, 2)  # "partial" delivered: 7 characters


async def test_a_caller_leaving_the_queue_leaves_no_place_and_no_reservation(
        tmp_path: Path, daemon: DaemonView, provider: FakeProvider) -> None:
    gw = await start_gateway(tmp_path, daemon.target, provider.base_url,
                             "[gateway]\nstream_keepalive_after_s = 0.05\n"
                             "ping_interval_s = 0.05\n")
    hold = threading.Event()
    try:
        async with aiohttp.ClientSession() as session:
            first = await _hold_the_only_slot(gw, provider, hold, session)
            second = await _stream_raw(gw, session, "sk-wait")
            await second.content.readuntil(b"event: ping")
            assert (await daemon.bucket("sk-wait", "claude-one-1")).queue_depth == 1
            second.close()  # hang up while queued

            depth = [1]

            async def poll() -> None:
                while depth[0]:
                    depth[0] = (await daemon.bucket("sk-wait", "claude-one-1")).queue_depth
            await asyncio.wait_for(poll(), 15)
            hold.set()
            await first.read()
        settled = await daemon.wait_settled("sk-wait", 1)
        assert len(settled) == 1 and await daemon.open_leases() == []
        assert len(provider.requests) == 1
    finally:
        hold.set()
        assert await gw.close() == 0


async def test_sigterm_lets_a_stream_in_flight_finish(
        gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    hold = threading.Event()
    provider.script(MODEL, Reply.ok("finish what you started", pause=hold, pause_after=1))
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "max_tokens": 50, "messages": MESSAGES, "stream": True}
        resp = await session.post(gateway.base_url + "/v1/messages", json=body,
                                  headers={"x-api-key": "sk-term"})
        await resp.content.readuntil(b"event: content_block_delta")
        gateway.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "stopping" in gateway.log_text(), "the gateway to stop")
        hold.set()
        rest = (await resp.read()).decode()
    assert rest.rstrip().endswith('data: {"type": "message_stop"}')
    [r] = await daemon.wait_settled("sk-term", 1)
    assert r.settlement is not None and r.settlement.outcome is Outcome.OK
    await asyncio.to_thread(gateway.proc.wait, 15)
    assert gateway.proc.returncode == 0


async def test_every_part_its_own_process(tmp_path: Path, provider: FakeProvider) -> None:
    """`limiterd serve` and `limiterd gateway` as the operator starts them, the SDK as an app."""
    from tests.test_process import serve

    config = tmp_path / "limiterd.toml"
    config.write_text(DAEMON_CONFIG)
    daemon, target = await asyncio.to_thread(
        serve, "--config", str(config), "--db", str(tmp_path / "state.sqlite3"))
    try:
        gw = await start_gateway(tmp_path, target, provider.base_url)
        try:
            async with sdk(gw, "sk-procs") as client:
                msg = await client.messages.create(model=MODEL, max_tokens=20,
                                                   messages=MESSAGES)  # type: ignore[arg-type]
        finally:
            assert await gw.close() == 0
        assert msg.usage.output_tokens > 0
        async with grpc.aio.insecure_channel(target) as ch:
            admin = pb_grpc.AdminStub(ch)
            leases = (await admin.ListLeases(pb.ListLeasesRequest())).leases
            [bucket] = (await admin.GetBuckets(pb.GetBucketsRequest(
                scope=scope_for_api_key("sk-procs")))).buckets
        assert list(leases) == []
        [requests] = [d for d in bucket.dimensions if d.name == "requests"]
        assert requests.level < requests.capacity  # the call was counted
    finally:
        daemon.terminate()
        daemon.communicate(timeout=20)


# ---- the official TypeScript SDK, where Node is available -----------------------------------

NODE_CHECK = Path(__file__).resolve().parent / "node_gateway"


@pytest.fixture(scope="module")
def node_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tests/node_gateway with @anthropic-ai/sdk installed from the lockfile."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed; the TypeScript SDK check cannot run")
    work = tmp_path_factory.mktemp("node_gateway")
    for name in ("package.json", "package-lock.json", "sdk_via_gateway.mjs"):
        shutil.copy2(NODE_CHECK / name, work / name)
    done = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"npm ci failed:\n{done.stderr[-2000:]}"
    return work


async def test_the_typescript_sdk_through_the_gateway(
        node_sdk: Path, gateway: Gateway, daemon: DaemonView, provider: FakeProvider) -> None:
    provider.script(MODEL, Reply.ok("hi from upstream"),
                    Reply.ok("checking", thinking="Think first.",
                             tool_use=("lookup", '{"q": "limits"}')))
    node = shutil.which("node")
    assert node is not None
    done = await asyncio.to_thread(
        subprocess.run, [node, "sdk_via_gateway.mjs", gateway.base_url, MODEL], cwd=node_sdk,
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["text"] == "hi from upstream"
    assert out["blocks"] == ["thinking", "text", "tool_use"]
    assert out["toolInput"] == {"q": "limits"}
    assert out["events"][0] == "message_start" and out["events"][-1] == "message_stop"
    assert out["refused"] == {"status": 400, "type": "invalid_request_error"}
    settled = await daemon.wait_settled("sk-node", 2)
    assert [r.settlement.outcome for r in settled if r.settlement] == [Outcome.OK, Outcome.OK]
