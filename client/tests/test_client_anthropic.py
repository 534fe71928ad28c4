"""The anthropic adapter, driven through the real SDK against the fake provider and a REAL
limiterd: retries, reports, fallback paths, streaming."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import anthropic
import grpc
import grpc.aio
import pytest
from client_daemon import Daemon, over_backends
from fake_provider import FakeProvider, Reply
from wire import Recorder

from limiterd.ledger.model import Outcome, State
from limiterd_client import (
    AnthropicAdapter,
    AsyncAnthropicAdapter,
    FailClosed,
    FallbackPolicy,
    FallbackTriggers,
    Hop,
    HopProposal,
    Limiter,
    LimiterUnavailable,
    PartialResponseError,
    ProviderError,
    RetryPolicy,
    SyncLimiter,
    count_tokens_estimator,
    estimate_chars,
    scope_for_api_key,
)
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb

OPUS, SONNET, HAIKU = "claude-opus-4-1", "claude-sonnet-4-6", "claude-haiku-4-5"
CHAIN = (OPUS, SONNET, HAIKU)
SCARCE = "claude-scarce-1"  # 2 requests a minute in the test config
MSG: dict[str, Any] = {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi there"}]}


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

    def sleep_sync(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def policy(ft: FakeTime, **kw: Any) -> RetryPolicy:
    return RetryPolicy.interactive(clock=ft.clock, sleep=ft.sleep, sleep_sync=ft.sleep_sync,
                                   random=lambda: 0.5, **kw)


def outcomes(daemon: Daemon) -> list[tuple[str, Outcome | None]]:
    return [(r.model, r.settlement.outcome if r.settlement else None) for r in daemon.settled()]


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
async def lim(daemon: Daemon, rec: Recorder) -> Any:
    """A Limiter on a real channel to the real daemon; `rec` sees every request sent."""
    async with grpc.aio.insecure_channel(daemon.target, interceptors=[rec]) as channel:
        yield Limiter(channel=channel)


CLIENTS: list[anthropic.AsyncAnthropic] = []


@pytest.fixture(autouse=True)
async def close_sdk_clients() -> Any:
    yield
    while CLIENTS:
        await CLIENTS.pop().close()


def adapter(provider: FakeProvider, lim: Limiter, ft: FakeTime, **kw: Any
            ) -> AsyncAnthropicAdapter:
    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url)
    CLIENTS.append(client)
    return AsyncAnthropicAdapter(client, lim, retry=kw.pop("retry", policy(ft)), **kw)


def test_estimator_counts_system_messages_and_tools() -> None:
    msgs = [{"role": "user", "content": "x" * 70}]
    tools = [{"name": "t", "input_schema": {"type": "object"}}]
    chars = len(json.dumps("y" * 35)) + len(json.dumps(msgs)) + len(json.dumps(tools))
    got = estimate_chars({"system": "y" * 35, "messages": msgs, "tools": tools, "model": "m"})
    assert got == math.ceil(chars / 3.5)
    assert estimate_chars({"messages": msgs}) == math.ceil(len(json.dumps(msgs)) / 3.5)
    assert estimate_chars({}) == 0


@over_backends
async def test_create_reserves_reports_usage_and_turns_sdk_retries_off(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(OPUS, Reply.ok("Hello there", input_tokens=40, output_tokens=9,
                                   cache_creation_input_tokens=5, cache_read_input_tokens=500))
    ad = adapter(provider, lim, ft)
    assert ad.client.max_retries == 0
    result = await ad.create(model=OPUS, **MSG)
    assert result.value.content[0].text == "Hello there"  # type: ignore[union-attr]
    assert result.model == OPUS and not result.fell_back and result.attempts == 1
    # cache writes count toward input, cache reads do not
    assert (result.usage.input_tokens, result.usage.output_tokens) == (45, 9)
    [res] = daemon.settled()
    assert res.settlement is not None and res.settlement.outcome is Outcome.OK
    assert res.reserved.output_tokens == 64  # max_tokens reserved for output
    assert res.reserved.input_tokens == estimate_chars(MSG)
    assert res.settlement.refunded.output_tokens == 64 - 9
    # the SDK did not retry on its own: one 529 is one request
    provider.script(OPUS, Reply.overloaded())
    with pytest.raises(ProviderError) as info:
        await adapter(provider, lim, ft, retry=RetryPolicy.none()).create(model=OPUS, **MSG)
    assert info.value.status == 529 and info.value.overloaded
    assert provider.models_called() == [OPUS, OPUS]


@over_backends
async def test_429_retry_after_is_honoured_and_pauses_the_scope_on_the_daemon(
        daemon: Daemon, provider: FakeProvider, lim: Limiter, rec: Recorder) -> None:
    paused: list[int] = []

    class Watching(FakeTime):
        async def sleep(self, s: float) -> None:
            paused.append((await daemon.bucket(SONNET)).paused_until_ms)
            await super().sleep(s)

    ft = Watching()
    provider.script(SONNET, Reply.rate_limited(retry_after="1"), Reply.ok("ok"))
    ad = adapter(provider, lim, ft)
    result = await ad.create(model=SONNET, **MSG)
    assert result.attempts == 2 and ft.sleeps == [1.0]
    assert outcomes(daemon) == [(SONNET, Outcome.RATE_LIMITED), (SONNET, Outcome.OK)]
    # while the client backed off, the daemon held every caller of this scope x model
    assert len(paused) == 1 and paused[0] > 0
    first = rec.of("Report")[0]
    assert (first.outcome, first.retry_after_ms) == (pb.RATE_LIMITED, 1000)
    assert first.provider.http_status == 429 and first.provider.headers["retry-after"] == "1"
    assert first.provider.error_type == "rate_limit_error"


@over_backends
async def test_ratelimit_headers_reach_the_daemon_and_correct_its_bucket(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    provider.script(SONNET, Reply.ok(headers=(("anthropic-ratelimit-requests-remaining", "4"),
                                              ("anthropic-ratelimit-requests-limit", "1000"))))
    await adapter(provider, lim, FakeTime()).create(model=SONNET, **MSG)
    dims = {d.name: d for d in (await daemon.bucket(SONNET)).dimensions}
    assert dims["requests"].capacity == 1000 and dims["requests"].level < 10


@over_backends
async def test_5xx_then_connection_reset_are_retried(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(SONNET, Reply.server_error(500), Reply.server_error(503), Reply.ok("fine"))
    result = await adapter(provider, lim, ft).create(model=SONNET, **MSG)
    assert result.attempts == 3 and len(ft.sleeps) == 2
    assert [o for _, o in outcomes(daemon)] == [Outcome.ERROR, Outcome.ERROR, Outcome.OK]


@over_backends
async def test_non_retryable_400_is_raised_at_once(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(SONNET, Reply.error(400, "invalid_request_error", "messages: empty"))
    with pytest.raises(ProviderError) as info:
        await adapter(provider, lim, ft).create(model=SONNET, **MSG)
    e = info.value
    assert (e.status, e.code, e.retryable, e.provider) == (400, "invalid_request_error", False,
                                                          "anthropic")
    assert e.request_id and e.request_id.startswith("req_") and "messages" in e.message
    assert ft.sleeps == []


@over_backends
async def test_overloaded_falls_back_with_per_model_adjustment(
        daemon: Daemon, provider: FakeProvider, lim: Limiter, rec: Recorder) -> None:
    ft = FakeTime()
    provider.script(OPUS, Reply.overloaded(), Reply.overloaded())
    fb = FallbackPolicy(CHAIN, adjust={SONNET: lambda p: {**p, "max_tokens": 32}})
    result = await adapter(provider, lim, ft, fallback=fb).create(model=OPUS, **MSG)
    assert result.model == SONNET and result.fell_back
    assert result.path == (Hop(OPUS, SONNET, "overloaded"),)
    assert provider.models_called() == [OPUS, OPUS, SONNET]
    assert provider.requests[-1].body["max_tokens"] == 32
    assert outcomes(daemon) == [(OPUS, Outcome.OVERLOADED), (OPUS, Outcome.OVERLOADED),
                                (SONNET, Outcome.OK)]
    assert daemon.settled()[-1].reserved.output_tokens == 32  # its own model's bucket
    assert lim.counters.fallbacks == 1
    reports = rec.of("Report")
    assert [r.outcome for r in reports] == [pb.OVERLOADED, pb.OVERLOADED, pb.OK]
    assert [r.provider.fell_back for r in reports] == [False, True, False]
    p = reports[1].provider
    assert (p.http_status, p.error_type) == (529, "overloaded_error")
    assert p.request_id.startswith("req_") and p.headers["request-id"] == p.request_id
    assert "anthropic-ratelimit-requests-remaining" in p.headers
    assert reports[2].provider.http_status == 200
    assert "anthropic-ratelimit-tokens-reset" in reports[2].provider.headers


@over_backends
async def test_rate_limited_beyond_threshold_hops_at_once(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(OPUS, Reply.rate_limited(retry_after="60"))
    fb = FallbackPolicy(CHAIN, triggers=FallbackTriggers(rate_limited_beyond=10))
    result = await adapter(provider, lim, ft, fallback=fb).create(model=OPUS, **MSG)
    assert result.path == (Hop(OPUS, SONNET, "rate_limited"),) and ft.sleeps == []


@over_backends
async def test_timeout_hops(daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(OPUS, Reply.error(408, "timeout_error", "Request timed out"))
    result = await adapter(provider, lim, ft, fallback=FallbackPolicy(CHAIN)).create(
        model=OPUS, **MSG)
    assert result.path == (Hop(OPUS, SONNET, "timeout"),)


@over_backends
async def test_limiter_wait_beyond_budget_hops_to_the_next_bucket(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    fb = FallbackPolicy((SCARCE, SONNET), triggers=FallbackTriggers(limiter_wait=0.05))
    ad = adapter(provider, lim, ft, fallback=fb)
    first = [await ad.create(model=SCARCE, **MSG) for _ in range(2)]  # it admits 2 a minute
    assert [r.model for r in first] == [SCARCE, SCARCE]
    third = await ad.create(model=SCARCE, **MSG)
    assert third.model == SONNET and third.path == (Hop(SCARCE, SONNET, "limiter_wait"),)
    assert provider.models_called() == [SCARCE, SCARCE, SONNET]  # never called a 3rd time
    assert lim.counters.fallbacks == 1


@over_backends
async def test_ask_callback_can_veto(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    asked: list[HopProposal] = []

    def ask(p: HopProposal) -> str | None:
        asked.append(p)
        return None

    provider.script(OPUS, *[Reply.overloaded()] * 3)
    fb = FallbackPolicy(CHAIN, mode="ask", ask=ask)
    with pytest.raises(ProviderError) as info:
        await adapter(provider, lim, ft, fallback=fb).create(model=OPUS, **MSG)
    assert info.value.overloaded
    assert provider.models_called() == [OPUS] * 3  # vetoed: retries stay on opus
    assert asked[0].from_model == OPUS and asked[0].reason == "overloaded"
    assert asked[0].candidates == (SONNET, HAIKU)
    assert all(r.settlement and r.settlement.state is State.REPORTED for r in daemon.settled())


@over_backends
async def test_ask_callback_can_pick_a_later_model(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()

    async def ask(p: HopProposal) -> str | None:
        return HAIKU

    provider.script(OPUS, Reply.overloaded(), Reply.overloaded())
    fb = FallbackPolicy(CHAIN, mode="ask", ask=ask)
    result = await adapter(provider, lim, ft, fallback=fb).create(model=OPUS, **MSG)
    assert result.model == HAIKU and result.models_tried == (OPUS, HAIKU)


@over_backends
async def test_ask_returning_a_model_outside_the_chain_is_a_clear_error(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(OPUS, Reply.overloaded(), Reply.overloaded())
    fb = FallbackPolicy(CHAIN, mode="ask", ask=lambda p: "gpt-4")
    with pytest.raises(ValueError, match="ask: returned 'gpt-4'"):
        await adapter(provider, lim, ft, fallback=fb).create(model=OPUS, **MSG)


def test_fallback_policy_validation() -> None:
    with pytest.raises(ValueError, match="chain"):
        FallbackPolicy(())
    with pytest.raises(ValueError, match="ask"):
        FallbackPolicy(CHAIN, mode="ask")
    with pytest.raises(ValueError, match="adjust"):
        FallbackPolicy(CHAIN, adjust={"other": lambda p: p})


@over_backends
async def test_stream_delivers_text_and_reports_usage(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(SONNET, Reply.ok("one two three", input_tokens=12))
    call = adapter(provider, lim, ft).stream(model=SONNET, **MSG)
    texts = [t async for t in call]
    assert "".join(texts) == "one two three"
    assert call.result is not None and call.result.model == SONNET
    assert (call.result.usage.input_tokens, call.result.usage.output_tokens) == (12, 3)
    [res] = daemon.settled()
    assert res.settlement is not None and res.settlement.refunded.output_tokens == 64 - 3


@over_backends
async def test_stream_overload_event_before_any_text_is_retried(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(SONNET, Reply.overload_in_stream(after_chunks=0), Reply.ok("second try"))
    call = adapter(provider, lim, ft).stream(model=SONNET, **MSG)
    assert "".join([t async for t in call]) == "second try"
    assert outcomes(daemon) == [(SONNET, Outcome.OVERLOADED), (SONNET, Outcome.OK)]


@over_backends
async def test_stream_cut_after_text_raises_partial_and_reports_what_was_used(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(SONNET, Reply.reset_mid_stream(after_chunks=2, input_tokens=20))
    call = adapter(provider, lim, ft).stream(model=SONNET, **MSG)
    got: list[str] = []
    with pytest.raises(PartialResponseError) as info:
        async for t in call:
            got.append(t)
    e = info.value
    assert e.text == "".join(got) == "Hello from"
    assert e.usage.input_tokens == 20 and e.usage.output_tokens >= 1
    assert e.cause.status is None and e.cause.retryable  # a connection error, not retried
    assert provider.models_called() == [SONNET]
    [res] = daemon.settled()
    st = res.settlement
    assert st is not None and st.outcome is Outcome.ERROR
    assert st.refunded.output_tokens == 64 - e.usage.output_tokens


@over_backends
async def test_stream_overload_event_after_text_is_partial_and_overloaded(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(SONNET, Reply.overload_in_stream(after_chunks=1))
    with pytest.raises(PartialResponseError) as info:
        async for _ in adapter(provider, lim, ft).stream(model=SONNET, **MSG):
            pass
    assert info.value.cause.overloaded and info.value.text == "Hello"
    assert outcomes(daemon) == [(SONNET, Outcome.OVERLOADED)]


@over_backends
async def test_stream_consumer_breaking_early_reports_cancelled(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    gen = adapter(provider, lim, ft).stream(model=SONNET, **MSG).__aiter__()
    assert await gen.__anext__() == "Hello"
    await gen.aclose()  # type: ignore[attr-defined]
    assert outcomes(daemon) == [(SONNET, Outcome.CANCELLED)]


async def test_daemon_down_fails_closed_and_the_provider_is_never_called(
        provider: FakeProvider) -> None:
    ft = FakeTime()
    async with Limiter("127.0.0.1:1", on_unavailable=FailClosed(), transport_attempts=1) as lim:
        with pytest.raises(LimiterUnavailable):
            await adapter(provider, lim, ft).create(model=SONNET, **MSG)
    assert provider.requests == []


@over_backends
async def test_sync_adapter_create_fallback_and_stream(
        daemon: Daemon, provider: FakeProvider) -> None:
    ft = FakeTime()
    provider.script(OPUS, Reply.overloaded(), Reply.overloaded())
    provider.script(SONNET, Reply.ok("sync ok"), Reply.overload_in_stream(0),
                    Reply.ok("streamed sync"))

    def script() -> tuple[Any, str, Any]:
        with (SyncLimiter(daemon.target) as lim,
              anthropic.Anthropic(api_key="sk-test", base_url=provider.base_url) as client):
            ad = AnthropicAdapter(client, lim, retry=policy(ft), fallback=FallbackPolicy(CHAIN))
            created = ad.create(model=OPUS, **MSG)
            call = ad.stream(model=SONNET, **MSG)
            text = "".join(call)
            return created, text, call.result

    created, text, streamed = await asyncio.to_thread(script)
    assert created.model == SONNET and created.path == (Hop(OPUS, SONNET, "overloaded"),)
    assert text == "streamed sync" and streamed.model == SONNET
    assert outcomes(daemon) == [(OPUS, Outcome.OVERLOADED), (OPUS, Outcome.OVERLOADED),
                                (SONNET, Outcome.OK), (SONNET, Outcome.OVERLOADED),
                                (SONNET, Outcome.OK)]


async def test_stream_param_on_create_is_refused(provider: FakeProvider, lim: Limiter) -> None:
    with pytest.raises(ValueError, match="stream"):
        await adapter(provider, lim, FakeTime()).create(model=SONNET, stream=True, **MSG)


@over_backends
async def test_sdk_timeout_maps_to_a_timeout_and_hops(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    ft = FakeTime()
    provider.script(OPUS, Reply.ok(delay=2.0))
    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url,
                                      timeout=0.2)
    CLIENTS.append(client)
    ad = AsyncAnthropicAdapter(client, lim, retry=policy(ft), fallback=FallbackPolicy(CHAIN))
    result = await ad.create(model=OPUS, **MSG)
    assert result.path == (Hop(OPUS, SONNET, "timeout"),)
    assert outcomes(daemon) == [(OPUS, Outcome.ERROR), (SONNET, Outcome.OK)]


@over_backends
async def test_connection_refused_is_retried_then_raised(
        daemon: Daemon, lim: Limiter) -> None:
    ft = FakeTime()
    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url="http://127.0.0.1:1")
    CLIENTS.append(client)
    ad = AsyncAnthropicAdapter(client, lim, retry=policy(ft))
    with pytest.raises(ProviderError) as info:
        await ad.create(model=SONNET, **MSG)
    assert info.value.status is None and info.value.code == "connection_error"
    assert info.value.retryable and len(ft.sleeps) == 2  # interactive: 2 retries
    assert [o for _, o in outcomes(daemon)] == [Outcome.ERROR] * 3


@over_backends
async def test_count_tokens_estimator_reserves_the_api_count(
        daemon: Daemon, provider: FakeProvider, lim: Limiter) -> None:
    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url)
    CLIENTS.append(client)
    ad = AsyncAnthropicAdapter(client, lim, retry=policy(FakeTime()),
                               estimator=count_tokens_estimator(client))
    await ad.create(model=SONNET, system="be brief", **MSG)
    counted = [r for r in provider.requests if r.path == "/v1/messages/count_tokens"]
    assert len(counted) == 1 and counted[0].body["system"] == "be brief"
    [res] = daemon.settled()
    body = counted[0].body
    expected = math.ceil(len(json.dumps([body.get("system"), body.get("messages"),
                                         body.get("tools")])) / 4)  # the fake's count
    assert res.reserved.input_tokens == expected


def test_scope_defaults_to_the_keyed_hash_of_the_api_key(provider: FakeProvider) -> None:
    client = anthropic.Anthropic(api_key="sk-secret", base_url=provider.base_url)
    ad = AnthropicAdapter(client, SyncLimiter("127.0.0.1:1"), salt="team-salt")
    assert ad.scope == scope_for_api_key("sk-secret", salt="team-salt")
    assert "sk-secret" not in ad.scope
    ad.limiter.close()
