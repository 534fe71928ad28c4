"""Errors a person can act on, the unified attempt loop's triggers, hooks and spans, and the
unavailable policies (per-model safe capacity, a quiet fail-open). A REAL limiterd, the real
SDK, the fake provider."""

from __future__ import annotations

import logging
from typing import Any

import anthropic
import grpc
import grpc.aio
import pytest
from client_daemon import Daemon, over_backends
from fake_provider import FakeProvider, Reply
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from limiterd.server import running_server
from limiterd_client import (
    AnthropicAdapter,
    AsyncAnthropicAdapter,
    CallEvent,
    FailOpen,
    FallbackPolicy,
    FallbackTriggers,
    Hop,
    Limiter,
    LimiterBusy,
    LimiterRejected,
    LimiterUnavailable,
    ProviderError,
    RetryPolicy,
    SafeCapacity,
    SyncLimiter,
    WaitTooLong,
)
from limiterd_client._core import map_status
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb

OPUS, SONNET, HAIKU = "claude-opus-4-1", "claude-sonnet-4-6", "claude-haiku-4-5"
SCARCE = "claude-scarce-1"  # 2 requests a minute in the client test config
MSG: dict[str, Any] = {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def clock(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s

    def sleep_sync(self, s: float) -> None:
        self.t += s


def policy(ft: FakeTime, **kw: Any) -> RetryPolicy:
    return RetryPolicy.interactive(clock=ft.clock, sleep=ft.sleep, sleep_sync=ft.sleep_sync,
                                   random=lambda: 0.5, **kw)


@pytest.fixture
async def sdk(provider: FakeProvider) -> Any:
    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url)
    yield client
    await client.close()


# -- targets, start-up, mixing the sync and async worlds ----------------------------------

@pytest.mark.parametrize(("target", "says"), [
    ("http://127.0.0.1:50051", "is a URL"), ("127.0.0.1", "has no port"),
    ("", "empty"), ("   ", "empty"), ("localhost:http", "port must be a number"),
    ("127.0.0.1:70000", "port must be a number"), ("unix:", "names no socket path"),
])
def test_a_bad_target_says_what_to_write_instead(target: str, says: str) -> None:
    for cls in (Limiter, SyncLimiter):
        with pytest.raises(ValueError, match=says) as info:
            cls(target)
        assert "127.0.0.1:50051" in str(info.value)  # an example of what works


def test_good_targets_are_accepted() -> None:
    for target in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "unix:/run/l.sock",
                   "unix:///run/l.sock", "dns:///localhost:50051"):
        SyncLimiter(target).close()


@over_backends
async def test_wait_ready_waits_for_the_daemon_or_says_it_is_not_there(
        daemon: Daemon, dead: str) -> None:
    async with Limiter(daemon.target) as lim:
        await lim.wait_ready(10)
    async with Limiter(dead) as lim:
        with pytest.raises(LimiterUnavailable, match=f"{dead} did not accept a connection"):
            await lim.wait_ready(0.3)
    with SyncLimiter(dead) as slim, pytest.raises(LimiterUnavailable, match="is it running"):
        slim.wait_ready(0.3)


async def test_mixing_sync_and_async_names_the_class_to_use(provider: FakeProvider,
                                                            sdk: Any) -> None:
    lim, slim = Limiter("127.0.0.1:1"), SyncLimiter("127.0.0.1:1")
    sync_sdk = anthropic.Anthropic(api_key="sk-test", base_url=provider.base_url)
    with pytest.raises(TypeError, match="use AsyncAnthropicAdapter"):
        AnthropicAdapter(sync_sdk, lim)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use AnthropicAdapter"):
        AsyncAnthropicAdapter(sdk, slim)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use AnthropicAdapter"):
        AsyncAnthropicAdapter(sync_sdk, lim)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SyncLimiter in synchronous code"), lim:  # type: ignore
        pass
    with pytest.raises(TypeError, match="Limiter with `async with`"):
        async with slim:  # type: ignore[attr-defined]
            pass
    with pytest.raises(TypeError, match="use `async with`"), lim.reserve(  # type: ignore
            "s", "m", input_tokens=1, max_output_tokens=1):
        pass
    with pytest.raises(TypeError, match="use SyncLimiter"):
        Limiter(channel=grpc.insecure_channel("127.0.0.1:1"))  # type: ignore[arg-type]
    sync_sdk.close()
    slim.close()
    await lim.close()


async def test_an_auth_token_only_client_is_told_to_pass_a_scope(provider: FakeProvider) -> None:
    client = anthropic.AsyncAnthropic(auth_token="tok", api_key=None, base_url=provider.base_url)
    async with Limiter("127.0.0.1:1") as lim:
        with pytest.raises(ValueError, match=r"pass scope=.*organization or workspace"):
            AsyncAnthropicAdapter(client, lim)
        assert AsyncAnthropicAdapter(client, lim, scope="org-hash").scope == "org-hash"
    await client.close()


def test_cancelled_by_a_draining_daemon_is_unavailable_not_a_generic_error() -> None:
    err = map_status(grpc.StatusCode.CANCELLED, "Cancelling all calls", None)
    assert isinstance(err, LimiterUnavailable)


# -- a paused model, give-up reasons ------------------------------------------------------

@over_backends
async def test_a_paused_model_says_so_and_until_when(daemon: Daemon) -> None:
    async with Limiter(daemon.target) as lim:
        async with lim.reserve("s", SONNET, input_tokens=1, max_output_tokens=1) as r:
            r.mark_called()
            await r.report(0, 0, outcome=pb.RATE_LIMITED, retry_after_ms=60_000)
        with pytest.raises(LimiterBusy, match=r"is paused until \d\d:\d\d:\d\d UTC after the "
                                              r"provider answered 429"):
            async with lim.reserve("s", SONNET, input_tokens=1, max_output_tokens=1):
                pass


@over_backends
async def test_giving_up_says_why_and_which_models_were_tried(
        daemon: Daemon, provider: FakeProvider, sdk: Any) -> None:
    ft = FakeTime()
    provider.script(OPUS, *[Reply.overloaded()] * 3)
    async with Limiter(daemon.target) as lim:
        ad = AsyncAnthropicAdapter(sdk, lim, retry=policy(ft))
        with pytest.raises(ProviderError) as info:
            await ad.create(model=OPUS, **MSG)
        assert "gave up after 3 attempts (models tried: claude-opus-4-1)" in str(info.value)
        assert "3 of max_attempts=3 attempts used" in info.value.gave_up

        provider.script(SONNET, Reply.rate_limited(retry_after="60"))
        fb = FallbackPolicy((SONNET, HAIKU), triggers=FallbackTriggers(rate_limited_beyond=None,
                                                                       exhausted=False))
        ad = AsyncAnthropicAdapter(sdk, lim, retry=policy(ft), fallback=fb)
        with pytest.raises(ProviderError) as info:
            await ad.create(model=SONNET, **MSG)
        assert "Retry-After 60.0 s is longer than the 15.0 s left" in str(info.value)
        assert info.value.models_tried == (SONNET,)


# -- too large for one model: fall back; for all: say which limit and how to raise it ------

async def test_too_large_for_one_model_falls_back_to_one_it_fits(
        provider: FakeProvider, sdk: Any) -> None:
    sonnet, haiku = "claude-sonnet-4-5", "claude-haiku-4-5"
    async with running_server() as srv, Limiter(srv.target) as lim:  # built-in Tier 1 limits
        ad = AsyncAnthropicAdapter(sdk, lim, retry=policy(FakeTime()),
                                   fallback=FallbackPolicy((sonnet, haiku)),
                                   estimator=lambda p: 46_000)  # Sonnet 30k, Haiku 50k a min
        result = await ad.create(model=sonnet, **MSG)
        assert result.model == haiku and result.path == (Hop(sonnet, haiku, "too_large"),)
        assert provider.models_called() == [haiku]

        ad = AsyncAnthropicAdapter(sdk, lim, retry=policy(FakeTime()),
                                   fallback=FallbackPolicy((sonnet, haiku)),
                                   estimator=lambda p: 60_000)
        with pytest.raises(LimiterRejected) as info:
            await ad.create(model=sonnet, **MSG)
        text = str(info.value)
        assert "input_tokens: asked for 60000" in text and "holds at most 30000" in text
        assert "holds at most 50000" in text  # each model's own limit
        assert "--config" in text and "Tier 1" in text
        assert info.value.models_tried == (sonnet, haiku)


# -- streams honor the limiter-wait trigger; hooks; spans ------------------------------------

@over_backends
async def test_a_stream_hops_on_the_live_wait_estimate_like_a_plain_call(
        daemon: Daemon, provider: FakeProvider, sdk: Any) -> None:
    events: list[CallEvent] = []
    fb = FallbackPolicy((SCARCE, SONNET), triggers=FallbackTriggers(limiter_wait=3))
    async with Limiter(daemon.target) as lim:
        ad = AsyncAnthropicAdapter(sdk, lim, retry=policy(FakeTime()), fallback=fb,
                                   on_event=events.append)
        for _ in range(2):  # SCARCE admits 2 a minute
            assert (await ad.create(model=SCARCE, **MSG)).model == SCARCE
        call = ad.stream(model=SCARCE, **MSG)
        assert "".join([t async for t in call])
    assert call.result is not None and call.result.model == SONNET
    [hop] = [e for e in events if e.kind == "fallback"]
    # The daemon's estimate (~30 s) is over the 3 s budget: it hops at the first update,
    # instead of waiting the 3 s out.
    assert (hop.model, hop.to_model, hop.reason) == (SCARCE, SONNET, "limiter_wait")
    assert isinstance(hop.error, WaitTooLong)
    waits = [e for e in events if e.kind == "limiter_wait"]
    assert waits and waits[0].model == SCARCE and waits[0].wait is not None
    assert waits[0].wait.estimated_wait_s > 3


@over_backends
async def test_events_for_retry_fallback_and_give_up(
        daemon: Daemon, provider: FakeProvider, sdk: Any) -> None:
    seen: list[tuple[str, str, str]] = []

    async def on_event(e: CallEvent) -> None:  # async callbacks are awaited
        seen.append((e.kind, e.model, e.reason))

    provider.script(OPUS, Reply.overloaded(), Reply.overloaded())
    provider.script(SONNET, Reply.error(400, "invalid_request_error", "bad"))
    async with Limiter(daemon.target) as lim:
        ad = AsyncAnthropicAdapter(sdk, lim, retry=policy(FakeTime()),
                                   fallback=FallbackPolicy((OPUS, SONNET)), on_event=on_event)
        with pytest.raises(ProviderError):
            await ad.create(model=OPUS, **MSG)
    assert seen == [("retry", OPUS, "overloaded"), ("fallback", OPUS, "overloaded"),
                    ("give_up", SONNET, "the provider's answer is not retryable (http_400)")]


@over_backends
async def test_a_span_per_call_with_its_events_when_opentelemetry_is_there(
        daemon: Daemon, provider: FakeProvider, sdk: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer", tracer_provider.get_tracer)
    provider.script(OPUS, Reply.overloaded(), Reply.overloaded())
    async with Limiter(daemon.target) as lim:
        ad = AsyncAnthropicAdapter(sdk, lim, retry=policy(FakeTime()),
                                   fallback=FallbackPolicy((OPUS, SONNET)))
        await ad.create(model=OPUS, **MSG)
    [span] = exporter.get_finished_spans()
    assert span.name == "limiterd.call" and span.attributes is not None
    assert span.attributes["limiterd.model.requested"] == OPUS
    assert span.attributes["limiterd.model"] == SONNET
    assert span.attributes["limiterd.attempts"] == 3
    assert [e.name for e in span.events] == ["limiterd.retry", "limiterd.fallback"]


# -- when the daemon is away -----------------------------------------------------------------

async def test_safe_capacity_is_per_model(dead: str) -> None:
    async with Limiter(dead, transport_attempts=1,
                       on_unavailable=SafeCapacity(requests_per_minute=1,
                                                   tokens_per_minute=1000)) as lim:
        for model in (OPUS, SONNET):  # one pool would refuse the second
            async with lim.reserve("s", model, input_tokens=10, max_output_tokens=10) as r:
                assert r.mode == "local"
        with pytest.raises(LimiterBusy, match="claude-opus-4-1"):
            async with lim.reserve("s", OPUS, input_tokens=10, max_output_tokens=10):
                pass


async def test_fail_open_warns_at_most_every_few_seconds_with_a_count(
        caplog: pytest.LogCaptureFixture, dead: str) -> None:
    ft = FakeTime()
    async with Limiter(dead, transport_attempts=1,
                       on_unavailable=FailOpen(), clock=ft.clock) as lim:
        with caplog.at_level(logging.WARNING, "limiterd_client"):
            for _ in range(50):
                async with lim.reserve("s", OPUS, input_tokens=1, max_output_tokens=1):
                    ft.t += 0.2  # 50 calls over 10 s
    warnings = [r.getMessage() for r in caplog.records if "failing open" in r.getMessage()]
    assert lim.counters.fail_open == 50
    assert len(warnings) == 2  # at 0 s and 5 s, not 50
    assert "(25 times since the last such warning)" in warnings[1]
