"""The drop-in transport: the real anthropic SDK (its own types, errors and streaming events)
through `limited_http_client`, against the fake provider and a REAL limiterd."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import grpc
import grpc.aio
import pytest
from client_daemon import Daemon, over_backends
from fake_provider import FakeProvider, Reply
from wire import Recorder

from limiterd.ledger.model import Outcome
from limiterd_client import Limiter, SyncLimiter, estimate_chars
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.transport import limited_http_client, wrap

SONNET, SCARCE = "claude-sonnet-4-6", "claude-scarce-1"
MSG: dict[str, Any] = {"max_tokens": 64, "messages": [{"role": "user", "content": "Hi there"}]}
TOOL = ("get_weather", '{"city": "Paris", "unit": "celsius"}')


@pytest.fixture
async def rec_lim(daemon: Daemon) -> Any:
    rec = Recorder()
    async with grpc.aio.insecure_channel(daemon.target, interceptors=[rec]) as ch:
        yield rec, Limiter(channel=ch)


def sdk(provider: FakeProvider, lim: Limiter, max_wait: float = 60,
        **kw: Any) -> anthropic.AsyncAnthropic:
    # The one line an existing app changes: http_client=limited_http_client(limiter)
    return anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url,
                                    http_client=limited_http_client(lim, max_wait=max_wait),
                                    **kw)


def outcomes(daemon: Daemon) -> list[tuple[str, Outcome | None]]:
    return [(r.model, r.settlement.outcome if r.settlement else None) for r in daemon.settled()]


@over_backends
async def test_create_keeps_the_sdk_types_and_reports_usage_and_headers(
        daemon: Daemon, provider: FakeProvider, rec_lim: Any) -> None:
    rec, lim = rec_lim
    provider.script(SONNET, Reply.ok("Hello there", input_tokens=40, output_tokens=9,
                                     cache_creation_input_tokens=5, tool_use=TOOL))
    async with sdk(provider, lim) as client:
        msg = await client.messages.create(model=SONNET, **MSG)
    assert isinstance(msg, anthropic.types.Message)  # the SDK's own type, untouched
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    [acquire], [report] = rec.of("Acquire"), rec.of("Report")
    assert acquire.max_output_tokens == 64
    assert acquire.input_tokens == estimate_chars(MSG)
    assert (report.outcome, report.actual_input_tokens, report.actual_output_tokens) == (
        pb.OK, 45, 9)  # cache writes count as input
    assert report.provider.http_status == 200
    assert "anthropic-ratelimit-requests-remaining" in report.provider.headers
    assert await daemon.open_leases() == []


@over_backends
async def test_a_stream_with_tool_use_keeps_every_sdk_event_and_reports_its_usage(
        daemon: Daemon, provider: FakeProvider, rec_lim: Any) -> None:
    rec, lim = rec_lim
    provider.script(SONNET, Reply.ok("Let me check", input_tokens=30, thinking="hmm",
                                     tool_use=TOOL))
    async with sdk(provider, lim) as client:
        async with client.messages.stream(model=SONNET, **MSG) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
    assert "input_json" in kinds and "thinking" in kinds and "text" in kinds
    tool = [b for b in final.content if b.type == "tool_use"]
    assert tool and tool[0].input == {"city": "Paris", "unit": "celsius"}  # type: ignore
    [report] = rec.of("Report")
    assert (report.outcome, report.actual_input_tokens) == (pb.OK, 30)
    assert report.actual_output_tokens == final.usage.output_tokens
    assert await daemon.open_leases() == []


@over_backends
async def test_provider_errors_stay_the_sdks_and_a_refusal_uses_nothing(
        daemon: Daemon, provider: FakeProvider, rec_lim: Any) -> None:
    rec, lim = rec_lim
    provider.script(SONNET, Reply.overloaded(), Reply.rate_limited(retry_after="7"))
    async with sdk(provider, lim, max_retries=0) as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(model=SONNET, **MSG)
        assert info.value.status_code == 529
        with pytest.raises(anthropic.RateLimitError):  # existing except blocks still hold
            await client.messages.create(model=SONNET, **MSG)
    first, second = rec.of("Report")
    assert (first.outcome, first.actual_input_tokens, first.actual_output_tokens) == (
        pb.OVERLOADED, 0, 0)
    assert (second.outcome, second.retry_after_ms) == (pb.RATE_LIMITED, 7000)
    assert second.provider.headers["retry-after"] == "7"


@over_backends
async def test_the_sdks_own_retries_are_each_reserved_and_reported(
        daemon: Daemon, provider: FakeProvider, rec_lim: Any) -> None:
    rec, lim = rec_lim
    provider.script(SONNET, Reply.server_error(500), Reply.ok("second time"))
    async with sdk(provider, lim, max_retries=1) as client:
        msg = await client.messages.create(model=SONNET, **MSG)
    assert msg.content[0].text == "second time"  # type: ignore[union-attr]
    assert [r.outcome for r in rec.of("Report")] == [pb.ERROR, pb.OK]
    assert len(rec.of("Acquire")) == 2


@over_backends
async def test_a_limiter_that_cannot_grant_answers_as_a_429(
        daemon: Daemon, provider: FakeProvider, rec_lim: Any) -> None:
    rec, lim = rec_lim
    async with sdk(provider, lim, max_wait=0, max_retries=0) as client:
        for _ in range(2):  # SCARCE admits 2 a minute
            await client.messages.create(model=SCARCE, **MSG)
        with pytest.raises(anthropic.RateLimitError, match="limiterd") as info:
            await client.messages.create(model=SCARCE, **MSG)
    assert int(info.value.response.headers["retry-after"]) > 0
    assert provider.models_called() == [SCARCE, SCARCE]  # the third never left


@over_backends
async def test_an_app_that_stops_reading_a_stream_reports_what_it_got(
        daemon: Daemon, provider: FakeProvider, rec_lim: Any) -> None:
    rec, lim = rec_lim
    async with sdk(provider, lim) as client:
        async with client.messages.stream(model=SONNET, **MSG) as stream:
            async for _ in stream.text_stream:
                break
    assert outcomes(daemon) == [(SONNET, Outcome.CANCELLED)]


@over_backends
async def test_the_sync_sdk_with_a_sync_limiter(daemon: Daemon, provider: FakeProvider) -> None:
    provider.script(SONNET, Reply.ok("sync", tool_use=TOOL), Reply.ok("streamed"))

    def app() -> tuple[str, str]:
        with SyncLimiter(daemon.target) as lim, anthropic.Anthropic(
                api_key="sk-test", base_url=provider.base_url,
                http_client=limited_http_client(lim)) as client:
            msg = client.messages.create(model=SONNET, **MSG)
            with client.messages.stream(model=SONNET, **MSG) as stream:
                text = "".join(stream.text_stream)
            return msg.content[0].text, text  # type: ignore[union-attr]

    assert await asyncio.to_thread(app) == ("sync", "streamed")
    assert outcomes(daemon) == [(SONNET, Outcome.OK), (SONNET, Outcome.OK)]


@over_backends
async def test_wrap_meters_an_existing_client(daemon: Daemon, provider: FakeProvider,
                                              rec_lim: Any) -> None:
    rec, lim = rec_lim
    async with anthropic.AsyncAnthropic(api_key="sk-test", base_url=provider.base_url) as raw:
        async with wrap(raw, lim) as client:  # a copy: closing it closes its http client
            await client.messages.create(model=SONNET, **MSG)
        await raw.messages.create(model=SONNET, **MSG)  # the original stays unmetered
    assert len(rec.of("Acquire")) == 1 and len(rec.of("Report")) == 1
    assert provider.models_called() == [SONNET, SONNET]
